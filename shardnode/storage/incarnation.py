"""Which life of a replica a store is, and which cluster and group it belongs to.

A store gets a random *incarnation* when it is created (in the same batch
that marks it initialized): the Raft group binds the member's id to it
(docs/raft.md, "Incarnations"), so a process that lost the store's disk and
runs under the same id is never counted as this one. A store created before
incarnations existed gets one the first time it is opened, and is trusted as
its member's first life.

The store also records the *cluster id* and the *group incarnation* it
belongs to (docs/security.md: frames from another cluster, or another life
of the group, are refused). They are known when the store is created (from
the cluster's recorded initial placement, or from the group the replica
joins), or learned later (the metadata group's replicas start before the
record exists); 0 means unknown, and unknown ids are not checked. A known id
never changes.

Every id is a random 63-bit positive integer: what every integer on the
wire (transport/codec.py) may hold.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from rocksdict import ColumnFamily, WriteBatch

from .engine import CorruptionError, Engine, StorageError, new_batch

META_INCARNATION = b"incarnation"              # this store's life (8 bytes, big-endian)
META_CLUSTER_ID = b"cluster_id"                # the cluster's id, once known
META_GROUP_INCARNATION = b"group_incarnation"  # the group's incarnation, once known


@dataclass(slots=True, frozen=True)
class StoreIdentity:
    incarnation: int
    cluster_id: int = 0          # 0: unknown
    group_incarnation: int = 0   # 0: unknown


def random_id() -> int:
    """A new incarnation or cluster id: random, positive, below 2**63."""
    return secrets.randbits(63) or 1


def put_new_incarnation(batch: WriteBatch, meta: ColumnFamily) -> None:
    """Give a store being created its incarnation (in its initializing batch)."""
    batch.put(META_INCARNATION, random_id().to_bytes(8, "big"), meta)


def load(engine: Engine) -> StoreIdentity:
    """The store's identity; a store from before incarnations gets its
    incarnation now (durably), as its first life."""
    view = engine.meta.view
    if view.get(META_INCARNATION) is None:
        batch = new_batch()
        put_new_incarnation(batch, engine.meta.handle)
        engine.write(batch, sync=True)
    return StoreIdentity(_read(view, META_INCARNATION), _read(view, META_CLUSTER_ID),
                         _read(view, META_GROUP_INCARNATION))


def record(engine: Engine, known: StoreIdentity, cluster_id: int, group_incarnation: int) -> StoreIdentity:
    """Durably record the ids that were unknown (0 leaves one unknown);
    StorageError for an attempt to change a known one."""
    for name, old, new in (("cluster id", known.cluster_id, cluster_id),
                           ("group incarnation", known.group_incarnation, group_incarnation)):
        if old and new and old != new:
            raise StorageError(f"the store at {engine.path} belongs to {name} {old:x}, not {new:x}")
    updated = StoreIdentity(known.incarnation, known.cluster_id or cluster_id,
                            known.group_incarnation or group_incarnation)
    if updated != known:
        batch = new_batch()
        meta = engine.meta.handle
        if updated.cluster_id != known.cluster_id:
            batch.put(META_CLUSTER_ID, updated.cluster_id.to_bytes(8, "big"), meta)
        if updated.group_incarnation != known.group_incarnation:
            batch.put(META_GROUP_INCARNATION, updated.group_incarnation.to_bytes(8, "big"), meta)
        engine.write(batch, sync=True)
    return updated


def _read(view, key: bytes) -> int:  # type: ignore[no-untyped-def]
    raw = view.get(key)
    if raw is None:
        return 0
    if len(raw) != 8:
        raise CorruptionError(f"meta key {key!r}: expected 8 bytes, found {len(raw)}")
    return int.from_bytes(raw, "big")
