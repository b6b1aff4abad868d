"""A store's incarnation and the cluster and group it belongs to
(storage/incarnation.py), and ConfState's bindings in the store's encodings."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from shardnode.raft import ConfState, Member, SnapshotMetadata
from shardnode.storage import ReplicaStore, StorageError
from shardnode.storage.engine import (
    CorruptionError,
    decode_conf_state,
    decode_metadata,
    encode_conf_state,
    encode_metadata,
    new_batch,
)
from shardnode.storage.incarnation import META_INCARNATION


def test_every_new_store_gets_its_own_incarnation_kept_across_opens(tmp_path: Path) -> None:
    first = ReplicaStore.open(tmp_path / "a", initial_voters=(1,), node_id=1)
    second = ReplicaStore.open(tmp_path / "b", initial_voters=(1,), node_id=1)
    incarnation = first.identity.incarnation
    assert 0 < incarnation < 1 << 63 and incarnation != second.identity.incarnation
    assert (first.identity.cluster_id, first.identity.group_incarnation) == (0, 0)
    first.close()
    second.close()
    with ReplicaStore.open(tmp_path / "a") as reopened:
        assert reopened.identity.incarnation == incarnation


def test_a_store_from_before_incarnations_gets_one_on_first_open_and_keeps_it(tmp_path: Path) -> None:
    with ReplicaStore.open(tmp_path / "old", initial_voters=(1,), node_id=1) as store:
        batch = new_batch()
        batch.delete(META_INCARNATION, store._engine.meta.handle)
        store._engine.write(batch, sync=True)       # as a store written before this version
    with ReplicaStore.open(tmp_path / "old") as store:
        given = store.identity.incarnation
        assert given
    with ReplicaStore.open(tmp_path / "old") as store:
        assert store.identity.incarnation == given, "trusted as its first life, then kept"


def test_the_cluster_id_and_group_incarnation_are_recorded_once(tmp_path: Path) -> None:
    with ReplicaStore.open(tmp_path / "s", initial_voters=(1,), node_id=1) as store:
        store.record_identity(0xC1, 0)                      # the group's not known yet
        assert (store.identity.cluster_id, store.identity.group_incarnation) == (0xC1, 0)
        store.record_identity(0xC1, 0x61)
        with pytest.raises(StorageError, match="cluster id c1, not c2"):
            store.record_identity(0xC2, 0x61)
    with ReplicaStore.open(tmp_path / "s") as store:
        assert (store.identity.cluster_id, store.identity.group_incarnation) == (0xC1, 0x61)


def test_bindings_survive_the_stores_encodings_and_older_shapes_still_decode() -> None:
    conf = ConfState(voters=(1, 2, 3), learners=(4,), removed=(5,), members=(Member(4, "h4", "a:4"),),
                     incarnations=((1, 11), (4, (1 << 63) - 1)))
    assert decode_conf_state(encode_conf_state(conf)) == conf
    assert decode_metadata(encode_metadata(SnapshotMetadata(9, 2, conf))).conf_state == conf
    unbound = ConfState(voters=(1, 2, 3), members=(Member(4, "h4", "a:4"),))
    assert len(msgpack.unpackb(encode_conf_state(unbound))) == 5, "no binding: the bytes an earlier version reads"
    three = msgpack.packb(((1, 2), (), ()))
    assert decode_conf_state(three) == ConfState(voters=(1, 2))
    with pytest.raises(CorruptionError, match="incarnations"):
        decode_conf_state(msgpack.packb(((1,), (), (), (), (), ((1, 0),))))
