"""The state machine's side of the etcd API: per-key metadata (revisions,
version, lease) kept with the value, the group's revision, transactions,
range scans, and what snapshots, moves, restarts and old stores do to them
(docs/etcd.md, "Revisions" and "Transactions")."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from shardnode.raft import Entry, HardState
from shardnode.storage import Command, CommandOp, ReplicaStore, encode_command
from shardnode.storage import engine as engine_module
from shardnode.storage.etcd_ops import (
    Compare,
    CompareResult,
    CompareTarget,
    DeleteOp,
    PutOp,
    RangeOp,
    RevokeOp,
    Txn,
    decode_result,
    decode_txn,
    encode_txn,
    TxnError,
)
from shardnode.storage.kv_records import (
    META_KV_RECORDS,
    KeyRecord,
    decode_record,
    encode_record,
    next_revision,
)

VOTERS = (1, 2, 3)
T0 = 1_700_000_000_000          # a wall clock in ms


class Group:
    """One store fed entries one by one, as a replica's apply loop would."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.store = ReplicaStore.open(path, initial_voters=VOTERS)
        self.index = self.store.applied_index

    def apply(self, command: Command):  # type: ignore[no-untyped-def]
        self.index += 1
        entry = Entry(1, self.index, encode_command(command))
        self.store.persist(HardState(1, 1, self.index), [entry])
        return self.store.apply([entry])[0]

    def put(self, key: bytes, value: bytes, ts: int = T0, client_id: int = 0, sequence: int = 0):  # type: ignore[no-untyped-def]
        return self.apply(Command(CommandOp.PUT, key, value, client_id, sequence, ts))

    def delete(self, key: bytes, ts: int = T0):  # type: ignore[no-untyped-def]
        return self.apply(Command(CommandOp.DELETE, key, None, 0, 0, ts))

    def txn(self, txn: Txn, ts: int = T0, client_id: int = 0, sequence: int = 0):  # type: ignore[no-untyped-def]
        key = (txn.keys() or [b"x"])[0]
        result = self.apply(Command(CommandOp.TXN, key, encode_txn(txn), client_id, sequence, ts))
        return result, decode_result(result.old_value) if result.old_value else None

    def reopen(self) -> None:
        self.store.close()
        self.store = ReplicaStore.open(self.path)


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Group]:
    g = Group(tmp_path / "g")
    yield g
    g.store.close()


def test_a_record_round_trips_and_a_bare_value_is_not_one() -> None:
    record = KeyRecord(b"v", 5, 9, 3, 77)
    assert decode_record(encode_record(record)) == record
    with pytest.raises(engine_module.CorruptionError):
        decode_record(b"v")


def test_revisions_follow_the_clock_and_never_go_back() -> None:
    assert next_revision(0, 1) == 1 << 12
    assert next_revision(1 << 12, 1) == (1 << 12) + 1          # same millisecond: the counter
    assert next_revision(10 << 12, 3) == (10 << 12) + 1        # a clock behind: still increasing
    assert next_revision(0, 1, floor=99 << 12) == 99 << 12     # a key's own history is a floor


def test_puts_and_deletes_keep_etcd_metadata(group: Group) -> None:
    group.put(b"k", b"a", ts=T0)
    first = group.store.get_record(b"k")
    assert first is not None and first.version == 1 and first.create_revision == first.mod_revision
    assert group.store.revision == first.mod_revision
    group.put(b"k", b"b", ts=T0)
    second = group.store.get_record(b"k")
    assert second is not None and second.value == b"b" and second.version == 2
    assert second.create_revision == first.create_revision and second.mod_revision > first.mod_revision
    assert group.store.get(b"k") == b"b"                  # the native read: the value alone
    group.delete(b"k", ts=T0)
    assert group.store.revision > second.mod_revision      # a delete is a change
    group.put(b"k", b"c", ts=T0)
    again = group.store.get_record(b"k")
    assert again is not None and again.version == 1 and again.create_revision > second.mod_revision


def test_a_leader_clock_behind_still_gives_increasing_revisions(group: Group) -> None:
    group.put(b"k", b"a", ts=T0 + 1000)
    ahead = group.store.revision
    group.put(b"j", b"b", ts=T0)                          # a new leader whose clock is behind
    assert group.store.revision == ahead + 1


def test_metadata_and_the_group_revision_survive_a_restart(group: Group) -> None:
    group.put(b"k", b"a")
    group.put(b"k", b"b")
    before, revision = group.store.get_record(b"k"), group.store.revision
    group.reopen()
    assert group.store.get_record(b"k") == before and group.store.revision == revision


def test_a_transaction_compares_then_runs_one_branch(group: Group) -> None:
    group.put(b"k", b"v1")
    record = group.store.get_record(b"k")
    assert record is not None
    txn = Txn(1, compares=(Compare(b"k", CompareTarget.MOD, CompareResult.EQUAL, record.mod_revision),
                           Compare(b"k", CompareTarget.VALUE, CompareResult.EQUAL, b"v1")),
              success=(PutOp(b"k", b"v2", 0, prev_kv=True), RangeOp(b"k")),
              failure=(RangeOp(b"k"),))
    _, result = group.txn(txn)
    assert result.error == "" and result.succeeded
    put_response, range_response = result.responses
    assert put_response.prev_kv[4] == b"v1"               # (key, create, mod, version, value, lease)
    assert range_response.kvs[0][4] == b"v2" and range_response.kvs[0][3] == 2   # sees the put before it
    assert result.revision == group.store.revision
    # The same compare now fails (the mod revision moved): the failure branch, nothing written.
    _, result = group.txn(txn)
    assert not result.succeeded and result.responses[0].kvs[0][4] == b"v2"
    assert group.store.get(b"k") == b"v2"


def test_compares_on_an_absent_key_follow_etcd(group: Group) -> None:
    create_if_absent = Txn(1, compares=(Compare(b"lock", CompareTarget.CREATE, CompareResult.EQUAL, 0),),
                           success=(PutOp(b"lock", b"me", 0),), failure=(RangeOp(b"lock"),))
    _, first = group.txn(create_if_absent)
    _, second = group.txn(create_if_absent)
    assert first.succeeded and not second.succeeded and second.responses[0].kvs[0][4] == b"me"
    value_on_absent = Txn(1, compares=(Compare(b"none", CompareTarget.VALUE, CompareResult.NOT_EQUAL, b"x"),))
    _, result = group.txn(value_on_absent)
    assert not result.succeeded                             # etcd: a value compare on an absent key is false


def test_ignore_value_on_an_absent_key_fails_the_whole_transaction(group: Group) -> None:
    txn = Txn(1, success=(PutOp(b"a", b"1", 0), PutOp(b"b", None, 0)))
    _, result = group.txn(txn)
    assert result.error.startswith("etcdserver: key not found")
    assert group.store.get(b"a") is None


def test_a_retried_transaction_gets_its_first_answer(group: Group) -> None:
    txn = Txn(1, compares=(Compare(b"c", CompareTarget.VERSION, CompareResult.EQUAL, 0),),
              success=(PutOp(b"c", b"1", 0),), failure=(PutOp(b"c", b"again", 0),))
    first, answer = group.txn(txn, client_id=7, sequence=1)
    retry, again = group.txn(txn, client_id=7, sequence=1)
    assert retry.duplicate and again == answer and answer.succeeded
    assert group.store.get(b"c") == b"1"


def test_delete_range_and_range_scan_with_limit_and_count(group: Group) -> None:
    for i in range(10):
        group.put(b"p/%d" % i, b"v%d" % i)
    group.put(b"q", b"other")
    response, revision = group.store.scan(RangeOp(b"p/", b"p0", limit=3), epoch=1)
    assert [kv[0] for kv in response.kvs] == [b"p/0", b"p/1", b"p/2"]
    assert response.count == 10 and response.more and revision == group.store.revision
    response, _ = group.store.scan(RangeOp(b"p/", b"p0", keys_only=True), epoch=1)
    assert all(kv[4] == b"" for kv in response.kvs) and not response.more
    response, _ = group.store.scan(RangeOp(b"p/", b"p0", count_only=True), epoch=1)
    assert response.kvs == () and response.count == 10
    response, _ = group.store.scan(RangeOp(b"p/5", b"\0"), epoch=1)              # from a key on
    assert [kv[0] for kv in response.kvs] == [b"p/5", b"p/6", b"p/7", b"p/8", b"p/9", b"q"]
    # Deletes within the batch and writes of earlier ops of the same transaction are seen.
    txn = Txn(1, success=(PutOp(b"p/99", b"new", 0), DeleteOp(b"p/", b"p0", prev_kv=True), RangeOp(b"p/", b"p0")))
    _, result = group.txn(txn)
    deleted = result.responses[1]
    assert deleted.deleted == 11 and {kv[0] for kv in deleted.prev_kvs} >= {b"p/99", b"p/0"}
    assert result.responses[2].count == 0
    response, _ = group.store.scan(RangeOp(b"p/", b"p0"), epoch=1)
    assert response.count == 0 and group.store.get(b"q") == b"other"


def test_malformed_transactions_are_refused_the_same_way_everywhere(group: Group) -> None:
    for garbage in (b"", b"\xc1", msgpack.packb((1, 0, [], [(9, b"k")], [])),
                    msgpack.packb((1, 0, [(b"k", 3, 0, 5)], [], [])),          # a value compare with an int
                    msgpack.packb((1, -1, [], [], []))):
        with pytest.raises(TxnError):
            decode_txn(garbage)
        result = group.apply(Command(CommandOp.TXN, b"k", garbage, 0, 0, T0))
        assert decode_result(result.old_value).error.startswith("malformed transaction")
    assert group.store.get(b"k") is None


def test_a_store_of_the_earlier_format_is_upgraded_once(tmp_path: Path) -> None:
    g = Group(tmp_path / "old")
    g.put(b"k", b"v")
    engine = g.store._engine
    # Make it look like a store written before records: bare values, no marker.
    engine.kv.view[b"k"] = b"v"
    engine.kv.view[b"k2"] = b"\x01short"           # a bare value that starts like a record's tag
    del engine.meta.view[META_KV_RECORDS]
    g.reopen()
    assert g.store.get(b"k") == b"v" and g.store.get(b"k2") == b"\x01short"
    record = g.store.get_record(b"k")
    assert record is not None and record.create_revision == 1 and record.version == 1
    g.reopen()                                      # not wrapped twice
    assert g.store.get(b"k2") == b"\x01short"
    g.store.close()


def test_metadata_and_the_group_revision_travel_in_snapshots(group: Group, tmp_path: Path) -> None:
    group.put(b"k", b"a")
    group.put(b"k", b"b")
    snapshot = group.store.snapshot()
    receiver = ReplicaStore.open(tmp_path / "receiver", initial_voters=VOTERS)
    try:
        with group.store.open_snapshot_reader(snapshot.metadata.index, snapshot.metadata.term) as reader:
            staging = receiver.begin_snapshot(snapshot.metadata)
            for chunk in reader.chunks(max_bytes=64):
                staging.write(chunk.data)
            staging.finish()
        receiver.persist(HardState(1, 0, snapshot.metadata.index), [], snapshot)
        assert receiver.get_record(b"k") == group.store.get_record(b"k")
        assert receiver.revision == group.store.revision > 0
    finally:
        receiver.close()


def test_a_range_op_routed_with_an_older_map_than_the_groups_ownership_is_refused(group: Group) -> None:
    group.put(b"k", b"v")
    version = group.store.shard_state.version
    assert group.store.scan(RangeOp(b"a", b"z"), epoch=version - 1) is None
    result, _ = group.txn(Txn(version - 1, success=(DeleteOp(b"a", b"z"),)))
    assert result.wrong_group and group.store.get(b"k") == b"v"


def test_revoking_a_lease_deletes_its_keys_once_and_refuses_it_after(group: Group, tmp_path: Path) -> None:
    _, result = group.txn(Txn(1, success=(PutOp(b"a", b"1", 7), PutOp(b"b", b"2", 7), PutOp(b"c", b"3", 8))))
    assert result.error == "" and group.store.get_record(b"a").lease == 7
    group.put(b"b", b"native")                 # a put without a lease detaches the key (as etcd's)
    _, revoked = group.txn(Txn(1, success=(RevokeOp(7),)))
    assert revoked.responses[0].deleted == 1 and revoked.revision == group.store.revision
    assert group.store.get(b"a") is None and group.store.get(b"b") == b"native" and group.store.get(b"c") == b"3"
    _, again = group.txn(Txn(1, success=(RevokeOp(7),)))
    assert again.responses[0].deleted == 0
    _, late = group.txn(Txn(1, success=(PutOp(b"d", b"4", 7),)))
    assert late.error.startswith("etcdserver: requested lease not found") and group.store.get(b"d") is None
    # The refusal and the other lease's index travel in snapshots.
    snapshot = group.store.snapshot()
    receiver = ReplicaStore.open(tmp_path / "receiver", initial_voters=VOTERS)
    try:
        with group.store.open_snapshot_reader(snapshot.metadata.index, snapshot.metadata.term) as reader:
            staging = receiver.begin_snapshot(snapshot.metadata)
            for chunk in reader.chunks(max_bytes=64):
                staging.write(chunk.data)
            staging.finish()
        receiver.persist(HardState(1, 0, snapshot.metadata.index), [], snapshot)
        other = Group.__new__(Group)
        other.path, other.store, other.index = tmp_path / "receiver", receiver, receiver.applied_index
        _, late = other.txn(Txn(1, success=(PutOp(b"d", b"4", 7),)))
        assert late.error.startswith("etcdserver: requested lease not found")
        _, revoked = other.txn(Txn(1, success=(RevokeOp(8),)))
        assert revoked.responses[0].deleted == 1 and receiver.get(b"c") is None
    finally:
        receiver.close()


def test_a_key_put_and_revoked_in_one_batch_is_found_through_the_batch(group: Group) -> None:
    entries = []
    for offset, txn in enumerate((Txn(1, success=(PutOp(b"k", b"v", 5),)), Txn(1, success=(RevokeOp(5),)))):
        entries.append(Entry(1, group.index + 1 + offset,
                             encode_command(Command(CommandOp.TXN, b"k", encode_txn(txn), 0, 0, T0))))
    group.store.persist(HardState(1, 1, entries[-1].index), entries)
    results = group.store.apply(entries)
    group.index = entries[-1].index
    assert decode_result(results[1].old_value).responses[0].deleted == 1 and group.store.get(b"k") is None


def test_a_snapshot_chunk_with_a_bare_value_is_refused() -> None:
    from shardnode.raft import SnapshotMetadata
    from shardnode.storage.engine import SnapshotDataError, TAG_KV
    from shardnode.storage.snapshot import decode_chunk, encode_chunk

    metadata = SnapshotMetadata(5, 1)
    good = encode_chunk(metadata, [(TAG_KV, b"k", encode_record(KeyRecord(b"v", 1, 1, 1)))], last=True)
    assert decode_chunk(good).records[0][1] == b"k"
    with pytest.raises(SnapshotDataError):
        decode_chunk(encode_chunk(metadata, [(TAG_KV, b"k", b"bare")], last=True))
