"""The source side of a move: the pages the mover reads (docs/sharding.md).

- the **copy** (`scan_page`): the keys of the moved ranges with their
  values, in position order (the position index, position_index.py), about
  `max_bytes` per page;
- the **delta** (`delta_page`), once the export is frozen: every key
  changed since the export began, with its final value or its absence, then
  the client sessions the moved keys need, about `max_bytes` per page.

Each page reads one consistent cut of the state: the store creates the
iterators (a RocksDB iterator reads the implicit snapshot taken when it is
created) and a snapshot of the kv family together, under its state-machine
lock with no write in between, then releases the lock and hands them here.
So a page never holds up reads or applies on the source's leader, however
many keys it scans.

Cursors are opaque to the mover: the copy's is the last index record
shipped; the delta's is b"d" + the last dirty key, or b"s" + the last
session key read.

Which sessions the delta carries, and why that is enough. A session record
answers only a retry of the session's *last* write (an older sequence is
refused as stale, with or without a move), and that retry is routed by its
key: if the key is in the moved ranges it arrives at the target after the
move, otherwise at a group that still holds the record. So the target needs
exactly the sessions whose last write touched a moved key, which the record
says (`SessionRecord.position`); records written before positions were kept
are carried, not knowing better. After the freeze, the source refuses the
moved keys, so no session's last write can move *into* the ranges while the
delta is read; one that moves out (the client's next write, on another key)
has been answered and needs no record at the target.
"""

from __future__ import annotations

from dataclasses import dataclass

from rocksdict import Snapshot

from ..keyspace import RangeSet
from .engine import Cursor, SessionRecord, StorageFault, decode_session, dirty_prefix, session_client
from .position_index import records_in, user_key

#: Cursor prefixes of the delta: the dirty keys, then the sessions.
DELTA_DIRTY = b"d"
DELTA_SESSIONS = b"s"
#: Per-record overhead counted toward a page's size.
_RECORD_OVERHEAD = 8
#: A delta page reads at most this many times its byte budget of session
#: records, most of which it may skip (their last write was elsewhere): the
#: page returns in bounded time whatever the number of sessions.
SESSION_READ_FACTOR = 8


@dataclass(slots=True, frozen=True)
class ScanPage:
    records: list[tuple[bytes, bytes]]
    next_after: bytes | None        # None: the copy is complete


@dataclass(slots=True, frozen=True)
class DeltaPage:
    puts: list[tuple[bytes, bytes]]
    deletes: list[bytes]
    sessions: list[tuple[int, bytes]]
    next_after: bytes | None        # None: the delta is complete


def snapshot_get(snapshot: Snapshot, key: bytes) -> bytes | None:
    """The key's value in `snapshot`, None if absent (rocksdict's Snapshot
    has no get(): absence is a bare Exception)."""
    try:
        return snapshot[key]
    except Exception as exc:            # noqa: BLE001 - rocksdict raises a bare Exception
        if str(exc) == "key not found":
            return None
        raise StorageFault(f"RocksDB snapshot read failed: {exc}") from exc


def scan_page(index: Cursor, values: Snapshot, ranges: RangeSet, after: bytes | None, max_bytes: int) -> ScanPage:
    """The kv records in `ranges` after the cursor `after` (None: from the
    first), about max_bytes of them. `index` and `values` are one cut."""
    records: list[tuple[bytes, bytes]] = []
    size = 0
    for record in records_in(index, ranges, after):
        key = user_key(record)
        value = snapshot_get(values, key)
        if value is None:
            raise StorageFault(f"the position index lists {key[:32]!r}, which the kv family does not hold")
        records.append((key, value))
        size += len(key) + len(value) + _RECORD_OVERHEAD
        if size >= max_bytes:
            return ScanPage(records, record)
    return ScanPage(records, None)


def session_needed(record: SessionRecord, ranges: RangeSet) -> bool:
    """Whether the target of a move of `ranges` needs this session (see the
    module docstring)."""
    return record.position is None or record.position in ranges


def delta_page(dirty: Cursor, values: Snapshot, sessions: Cursor, move_id: int, ranges: RangeSet,
               after: bytes | None, max_bytes: int) -> DeltaPage:
    """One page of a frozen export's delta after the cursor `after` (None:
    from the start). `dirty` iterates the shard family, `sessions` the
    sessions family; with `values` they are one cut."""
    puts: list[tuple[bytes, bytes]] = []
    deletes: list[bytes] = []
    shipped: list[tuple[int, bytes]] = []
    size = 0
    stage, mark = (DELTA_DIRTY, None) if not after else (after[:1], after[1:])
    if stage == DELTA_DIRTY:
        prefix = dirty_prefix(move_id)
        dirty.seek(prefix + mark if mark is not None else prefix)
        if mark is not None and dirty.valid() and dirty.key() == prefix + mark:
            dirty.next()
        while dirty.valid() and dirty.key().startswith(prefix):
            key = dirty.key()[len(prefix):]
            value = snapshot_get(values, key)
            if value is None:
                deletes.append(key)
                size += len(key) + _RECORD_OVERHEAD
            else:
                puts.append((key, value))
                size += len(key) + len(value) + _RECORD_OVERHEAD
            dirty.next()
            if size >= max_bytes:
                return DeltaPage(puts, deletes, shipped, DELTA_DIRTY + key)
        mark = None
    elif stage != DELTA_SESSIONS:
        raise ValueError(f"not a delta cursor: {after!r}")
    if mark is None:
        sessions.seek_to_first()
    else:
        sessions.seek(mark)
        if sessions.valid() and sessions.key() == mark:
            sessions.next()
    read = 0
    while sessions.valid():
        key, raw = sessions.key(), sessions.value()
        sessions.next()
        read += len(key) + len(raw)
        if session_needed(decode_session(raw), ranges):
            shipped.append((session_client(key), raw))
            size += len(key) + len(raw) + _RECORD_OVERHEAD
        if size >= max_bytes or read >= SESSION_READ_FACTOR * max_bytes:
            if not sessions.valid():
                break
            return DeltaPage(puts, deletes, shipped, DELTA_SESSIONS + key)
    return DeltaPage(puts, deletes, shipped, None)
