"""How the state machine applies an etcd transaction (etcd_ops.py) within
an apply batch of ReplicaStore.apply: the group's ownership checked, the
reads seeing the batch's own earlier writes, every change carrying its
revision, lease and dirty mark, and told to watches (ChangeEvent).

Deterministic: everything it reads is the replicated state as of this
point of the log (the database and the batch's overlay), and the clock is
the state machine's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..keyspace import stable_hash
from .engine import Engine, dirty_key
from .etcd_ops import TxnError, TxnResult, TxnState, decode_txn, encode_result, run_txn
from .kv_records import KeyRecord, decode_record, next_revision
from .ownership import ShardState

if TYPE_CHECKING:
    from .store import _ApplyBatch


def range_allowed(shard: ShardState, epoch: int) -> bool:
    """Whether an op over a range of keys (or every key: a revoke), routed
    with the shard map of `epoch`, may run here: the group's ownership did
    not change after that map, and none of it is frozen in a move (a frozen
    range is served by neither side until the map flips)."""
    return shard.version <= epoch and not any(e.frozen for e in shard.exports.values())


def apply_txn(engine: Engine, data: bytes, clock_ms: int, pending: _ApplyBatch, shard: ShardState) -> bytes | None:
    """The encoded answer of the transaction in `data`, applied to `pending`;
    None (nothing done) if the group does not serve one of its keys now, or,
    for an op over a range, its ownership changed after the router's map. A
    malformed transaction is answered with its error, the same on every
    replica."""
    try:
        txn = decode_txn(data)
    except TxnError as exc:
        return encode_result(TxnResult(f"malformed transaction: {exc}", False, pending.revision))
    if not all(shard.accepts(key) for key in txn.keys()) or (txn.has_ranges()
                                                             and not range_allowed(shard, txn.epoch)):
        return None
    shard_handle = engine.shard.handle

    def put(key: bytes, record: KeyRecord | None) -> None:
        position = stable_hash(key)
        old = pending.record(key)
        if record is None:
            pending.put(key, None, existed=old is not None, position=position)
        else:
            pending.put_record(key, record, existed=old is not None, position=position)
        pending.follow_lease(key, old, record)
        pending.changed(key, record, old)
        for move_id in shard.dirty_moves(position):
            pending.batch.put(dirty_key(move_id, key), b"", shard_handle)

    def attached(lease: int) -> list[tuple[bytes, KeyRecord]]:
        found = []
        for key in pending.lease_keys(lease):
            record = pending.record(key)
            # The index is a hint (a key that moved away leaves its entry): the record decides.
            if record is not None and record.lease == lease and shard.accepts(key):
                found.append((key, record))
        return found

    state = TxnState(pending.record, lambda start, end: scan_pending(engine, pending, shard, start, end), put,
                     revoked=pending.lease_revoked, attached=attached,
                     revoke=lambda lease: pending.revoke_lease(lease, clock_ms))
    result = run_txn(txn, state, pending.revision,
                     lambda floor: pending.take_revision(next_revision(pending.revision, clock_ms, floor)))
    return encode_result(result)


def scan_pending(engine: Engine, pending: _ApplyBatch, shard: ShardState, start: bytes,
                 range_end: bytes) -> Iterator[tuple[bytes, KeyRecord]]:
    """(key, record) of the keys in etcd's interval [start, range_end) that
    the group serves, as of this point of the apply batch: the database
    merged with the batch's own writes, in key order."""
    everything = range_end == b"\0"
    overlay = sorted((k, v) for k, v in pending.overlay_items() if k >= start and (everything or k < range_end))
    cursor = engine.iterator(engine.kv, upper_bound=None if everything else range_end)
    cursor.seek(start)
    at = 0
    while True:
        stored_key = cursor.key() if cursor.valid() else None
        if at < len(overlay) and (stored_key is None or overlay[at][0] <= stored_key):
            key, raw = overlay[at]
            at += 1
            if stored_key == key:
                cursor.next()
        elif stored_key is not None:
            key, raw = stored_key, cursor.value()
            cursor.next()
        else:
            return
        if raw is not None and shard.accepts(key):
            yield key, decode_record(raw)
