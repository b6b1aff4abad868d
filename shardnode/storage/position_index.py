"""The position index: every key of the kv family, ordered by its position in
the key space (docs/sharding.md, "The position index").

The kv family is ordered by the user's key, but key space moves by ranges of
*positions* (BLAKE2b-64 of the key, keyspace.py): without an index, copying
a range, or deleting one when it leaves the group, means reading every key
of the store and hashing it, and the deletion did so inside apply, on every
replica. The `position` family holds one empty record per kv key, keyed by

    8-byte big-endian position + the user's key

so the keys of a range [start, end) are one ordered seek and scan, and its
records one range deletion.

Invariant: the position family holds exactly the keys of the kv family.
- Every write of the state machine keeps it (store.py, `_ApplyBatch.put`,
  in the same WriteBatch as the kv change): a key created adds its record,
  a key deleted drops it; overwriting an existing key costs nothing here.
- A snapshot install rebuilds it from the installed kv records
  (snapshot.move_staged_into_place); snapshots do not carry it.
- A store that lacks it (written before it existed, or a build that a crash
  interrupted) gets it on open (`ensure_built`): META_POSITION_INDEX is
  written only once every record is in.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from rocksdict import WriteBatch

from ..keyspace import SPACE, RangeSet, stable_hash
from .engine import META_POSITION_INDEX, Cursor, Engine, new_batch

POSITION_BYTES = 8
_U64 = struct.Struct(">Q")
#: The position prefix of the last position of the space: no fixed byte
#: string bounds every key behind it, so ranges reaching the end of the space
#: are range-deleted up to it and the keys at that one position point-deleted.
_LAST_POSITION = _U64.pack(SPACE - 1)
#: Records per batch while building the index on open.
_BUILD_BATCH = 4096
_FORMAT = b"\x01"


def index_key(key: bytes, position: int | None = None) -> bytes:
    """The index record of `key` (`position`: its position, when the caller
    has it already)."""
    return _U64.pack(stable_hash(key) if position is None else position) + key


def position_of(record: bytes) -> int:
    return _U64.unpack_from(record)[0]


def user_key(record: bytes) -> bytes:
    return record[POSITION_BYTES:]


def records_in(cursor: Cursor, ranges: RangeSet, after: bytes | None = None) -> Iterator[bytes]:
    """The index records of the keys in `ranges`, in position order, after
    the record `after` (None: from the first). `cursor` is an iterator over
    the position family; the caller may stop early."""
    after_position = position_of(after) if after is not None else -1
    for r in ranges:
        if r.end <= after_position:
            continue
        if after is not None and r.start <= after_position:
            cursor.seek(after)
            if cursor.valid() and cursor.key() == after:
                cursor.next()
        else:
            cursor.seek(_U64.pack(r.start))
        end = None if r.end == SPACE else _U64.pack(r.end)
        while cursor.valid():
            record = cursor.key()
            if end is not None and record >= end:
                break
            yield record
            cursor.next()


def delete_ranges(batch: WriteBatch, engine: Engine, ranges: RangeSet, listed_last: list[bytes]) -> None:
    """Add to `batch` the deletion of every index record in `ranges`: one
    range deletion per range. `listed_last`: the records at the very last
    position of the space among those the caller listed (no exclusive end
    bound covers them, so they go one by one)."""
    handle = engine.position.handle
    for r in ranges:
        if r.end == SPACE:
            if r.start < SPACE - 1:
                batch.delete_range(_U64.pack(r.start), _LAST_POSITION, handle)
        else:
            batch.delete_range(_U64.pack(r.start), _U64.pack(r.end), handle)
    for record in listed_last:
        batch.delete(record, handle)


def at_last_position(record: bytes) -> bool:
    return record.startswith(_LAST_POSITION)


def ensure_built(engine: Engine) -> bool:
    """Build the index from the kv family if this store has none yet;
    returns whether it did. One pass over kv, in batches; the marker is
    written last and synced, so a crash part way builds it again."""
    meta = engine.meta
    if meta.view.get(META_POSITION_INDEX) == _FORMAT:
        return False
    position = engine.position
    batch = new_batch()
    engine.delete_all(batch, position)
    engine.write(batch, sync=False)
    batch = new_batch()
    cursor = engine.iterator(engine.kv)
    cursor.seek_to_first()
    while cursor.valid():
        batch.put(index_key(cursor.key()), b"", position.handle)
        if len(batch) >= _BUILD_BATCH:
            engine.write(batch, sync=False)
            batch = new_batch()
        cursor.next()
    del cursor
    batch.put(META_POSITION_INDEX, _FORMAT, meta.handle)
    engine.write(batch, sync=True)
    return True
