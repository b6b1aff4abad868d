"""One worker's RocksDB: how it is opened, its column families, and the
on-disk layout of every record in them.

Column families (one RocksDB instance per Raft group member):

=========  ==========================================  =========================================
family     key                                         value
=========  ==========================================  =========================================
log        8-byte big-endian entry index               msgpack (term, type, data)
kv         the user's key                              the user's value
sessions   8-byte big-endian client id                 msgpack (last_sequence, existed,
                                                       old_value, last_active_ms)
meta       a short name (``META_*`` below)             msgpack, per key
staging    1-byte record tag + key                     value of an incoming snapshot's record
shard      ``state``; ``d`` + move id + key            ownership (ownership.py); dirty marks
position   8-byte big-endian position + the user's key  empty: the kv keys by position
           (the position index, position_index.py)
=========  ==========================================  =========================================

Big-endian indexes sort numerically, so a range of the log is one ordered
scan and truncation/compaction is one ``delete_range``. Everything is
written through WriteBatches, which RocksDB applies atomically across
column families: that is what lets one batch carry, say, the kv changes,
the session changes and the applied index of an apply step.

Durability: ``Engine.write(batch, sync=True)`` writes the batch, then
flushes and fsyncs the write-ahead log, and because the WAL is one
sequential file this also makes every earlier unsynced batch durable. ``point_in_time`` recovery replays the WAL up to the
first damaged record, so after a crash the database is exactly some prefix
of the batches written, never a mix.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import msgpack
import rocksdict
from rocksdict import (
    BlockBasedOptions,
    ColumnFamily,
    DBRecoveryMode,
    Options,
    Rdict,
    ReadOptions,
    WriteBatch,
    WriteOptions,
)

from shardnode.config import StorageConfig
from shardnode.errors import ShardnodeError
from shardnode.raft import ConfState, Entry, EntryType, HardState, Member, SnapshotMetadata

# --- Errors ----------------------------------------------------------------------------


class StorageError(ShardnodeError):
    """Base class of the errors this package raises (besides CommandError and
    the Raft storage errors of the Storage protocol)."""


class StorageClosed(StorageError):
    """The store was closed."""


class CorruptionError(StorageError):
    """Something on disk is not in the format this code wrote."""


class StorageFault(StorageError):
    """The disk or RocksDB failed (ENOSPC, EIO on fsync, a background error).

    RocksDB's background errors are sticky: the database refuses writes from
    then on, so nothing can be retried in place. A worker that sees this
    stops at once (fail-stop) and is restarted by its supervisor; it recovers
    from what was made durable."""


class SnapshotNotStaged(StorageError):
    """persist() was given a snapshot without a completed staging for it."""


class SnapshotBusy(StorageError):
    """Another snapshot is staged and awaits its install: try again later."""


class SnapshotDataError(StorageError, ValueError):
    """Snapshot chunk data that is malformed or does not belong to the staging."""


# --- Column families and options ---------------------------------------------------------

LOG_CF = "log"
KV_CF = "kv"
SESSIONS_CF = "sessions"
META_CF = "meta"
STAGING_CF = "staging"
SHARD_CF = "shard"        # ownership of key space and moves in progress (ownership.py); part of snapshots
POSITION_CF = "position"  # the kv keys by position (position_index.py); derived from kv, not in snapshots
COLUMN_FAMILIES = (LOG_CF, KV_CF, SESSIONS_CF, META_CF, STAGING_CF, SHARD_CF, POSITION_CF)

# A host runs many workers, each with its own RocksDB: keep memtables small.
WRITE_BUFFER_BYTES = 16 << 20
# With several column families one WAL file cannot be dropped while any family
# still has data from it in a memtable; cap the live WAL so that a rarely written
# family (meta) is flushed instead of pinning gigabytes of old log writes.
MAX_TOTAL_WAL_BYTES = 64 << 20


def _db_options(storage: StorageConfig) -> Options:
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.create_missing_column_families(True)
    # Obsolete WAL files go to archive/ while either limit allows (both 0:
    # deleted at once). See StorageConfig and docs/worker.md, "Disk use".
    options.set_wal_ttl_seconds(storage.wal_ttl_seconds)
    options.set_wal_size_limit_mb(storage.wal_size_limit_mb)
    options.set_wal_recovery_mode(DBRecoveryMode.point_in_time())
    options.set_max_total_wal_size(MAX_TOTAL_WAL_BYTES)
    options.set_max_background_jobs(2)
    options.set_keep_log_file_num(4)
    return options


def _cf_options(name: str) -> Options:
    options = Options(raw_mode=True)
    options.set_write_buffer_size(WRITE_BUFFER_BYTES)
    if name in (KV_CF, SESSIONS_CF):
        # Point lookups of absent keys (every new key's "old value") skip
        # SST files thanks to the bloom filter.
        table = BlockBasedOptions()
        table.set_bloom_filter(10, False)
        options.set_block_based_table_factory(table)
    return options


@dataclass(slots=True, frozen=True)
class Column:
    """A column family: `view` for reads (get, iter), `handle` for batch writes."""

    name: str
    view: Rdict
    handle: ColumnFamily


class Engine:
    """An open RocksDB with the column families above.

    RocksDB keeps its directory locked while any Python object refers to the
    database (views, handles, iterators), so close() drops the references it
    owns; whoever took iterators must drop them too (ReplicaStore does).
    """

    def __init__(self, path: str, db: Rdict) -> None:
        self.path = path
        self._db: Rdict | None = db
        self._columns = {
            name: Column(name, db.get_column_family(name), db.get_column_family_handle(name))
            for name in COLUMN_FAMILIES
        }
        self._no_sync = WriteOptions()
        self._no_sync.sync = False

    @property
    def closed(self) -> bool:
        return self._db is None

    @property
    def db(self) -> Rdict:
        """The database itself (its default family is unused)."""
        if self._db is None:
            raise StorageClosed(f"database at {self.path} is closed")
        return self._db

    def column(self, name: str) -> Column:
        try:
            return self._columns[name]
        except KeyError:
            raise StorageClosed(f"database at {self.path} is closed") from None

    @property
    def log(self) -> Column:
        return self.column(LOG_CF)

    @property
    def kv(self) -> Column:
        return self.column(KV_CF)

    @property
    def sessions(self) -> Column:
        return self.column(SESSIONS_CF)

    @property
    def meta(self) -> Column:
        return self.column(META_CF)

    @property
    def staging(self) -> Column:
        return self.column(STAGING_CF)

    @property
    def shard(self) -> Column:
        return self.column(SHARD_CF)

    @property
    def position(self) -> Column:
        return self.column(POSITION_CF)

    def write(self, batch: WriteBatch, *, sync: bool) -> None:
        if self._db is None:
            raise StorageClosed(f"database at {self.path} is closed")
        try:
            # A synced batch is written, then the WAL flushed and fsynced
            # (FlushWAL + SyncWAL), rather than written with sync=True: the
            # same durability (the WAL is one sequential file: its fsync
            # covers this batch and every earlier one; the power-loss tests
            # check it), but rocksdict holds the GIL through a synced
            # write's fsync and releases it in flush_wal, so the event loop
            # keeps running while the persist thread waits on the disk
            # (bench/rocksdict_gil.py). Readers may see the batch before the
            # fsync: the store publishes its in-memory view only after this
            # returns, and nothing reads past that view.
            self._db.write(batch, self._no_sync)
            if sync:
                self._db.flush_wal(True)
        except Exception as exc:  # rocksdict raises a bare Exception ("IO error: ...")
            raise StorageFault(f"RocksDB write failed at {self.path}: {exc}") from exc

    def iterator(self, column: Column, upper_bound: bytes | None = None) -> Cursor:
        """A new iterator over `column`: a consistent point-in-time view
        (RocksDB's implicit snapshot), also across seek()s."""
        return Cursor(column, upper_bound)

    def delete_all(self, batch: WriteBatch, column: Column) -> None:
        """Add to `batch` the deletion of every key of `column`.

        No byte string sorts after all others, so the exclusive end of a
        delete_range cannot be a constant for arbitrary keys: delete
        [b"", last) by range and `last` itself by point.
        """
        iterator = self.iterator(column)
        iterator.seek_to_last()
        if iterator.valid():
            last = iterator.key()
            batch.delete_range(b"", last, column.handle)
            batch.delete(last, column.handle)

    def close(self) -> None:
        db, self._db = self._db, None
        if db is None:
            return
        self._columns = {}
        db.close()


class Cursor:
    """A rocksdict iterator together with the ReadOptions it reads through.

    rocksdict's iterator points at its ReadOptions' bounds without owning
    them: if the options are garbage collected first, the bound becomes
    whatever memory is there. Holding both in one object ties their
    lifetimes. Only an upper bound is offered: this rocksdict's lower bound
    is broken in raw mode; seek() does that job.
    """

    __slots__ = ("_options", "_iterator", "valid", "key", "value", "next", "seek", "seek_to_first", "seek_to_last")

    def __init__(self, column: Column, upper_bound: bytes | None = None) -> None:
        self._options = ReadOptions()
        if upper_bound is not None:
            self._options.set_iterate_upper_bound(upper_bound)
        iterator: rocksdict.RdictIter = column.view.iter(self._options)
        self._iterator = iterator
        # Bound methods as attributes: these are called once per record.
        self.valid = iterator.valid
        self.key = iterator.key
        self.value = iterator.value
        self.next = iterator.next
        self.seek = iterator.seek
        self.seek_to_first = iterator.seek_to_first
        self.seek_to_last = iterator.seek_to_last


def new_batch() -> WriteBatch:
    return WriteBatch(raw_mode=True)


def open_engine(path: str, storage: StorageConfig = StorageConfig()) -> Engine:
    """Open (creating if needed) the worker database at `path`."""
    try:
        make_dirs_durable(path)
        db = Rdict(path, _db_options(storage),
                   column_families={name: _cf_options(name) for name in COLUMN_FAMILIES})
    except Exception as exc:
        raise StorageFault(f"cannot open RocksDB at {path}: {exc}") from exc
    return Engine(path, db)


#: Ancestors of a database directory fsynced at every open: data_dir/HOST/group-G
#: needs HOST and data_dir to hold their entries too.
DURABLE_ANCESTORS = 2


def make_dirs_durable(path: str | os.PathLike[str], ancestors: int = DURABLE_ANCESTORS) -> None:
    """Create `path` (and missing parents) so that it survives a power loss.

    A new directory's entry lives in its parent, and only an fsync of the
    parent makes it durable: without it a power loss soon after the first
    start can take the whole database with it, and the replica would come
    back with term 0 and no vote (and could vote twice in one term). Every
    directory created here is fsynced into its parent; `path` and its first
    `ancestors` ancestors are fsynced at every open too, because an earlier
    process may have created them and died before syncing."""
    path = os.path.abspath(path)
    missing = []
    directory = path
    while not os.path.isdir(directory):
        missing.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            pass
        fsync_directory(os.path.dirname(directory))
    directory = path
    for _ in range(ancestors + 1):
        fsync_directory(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def wal_archive_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of archived (obsolete) WAL files of the database at `path`."""
    total = 0
    try:
        with os.scandir(os.path.join(path, "archive")) as entries:
            for entry in entries:
                try:
                    total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    pass  # purged meanwhile
    except FileNotFoundError:
        return 0
    return total


# --- Keys --------------------------------------------------------------------------------

_U64 = struct.Struct(">Q")
U64_MAX = (1 << 64) - 1

#: Sorts after every 8-byte key: the exclusive end of "the rest of the log".
LOG_END = b"\xff" * 9


def log_key(index: int) -> bytes:
    return _U64.pack(index)


def log_index(key: bytes) -> int:
    return _U64.unpack(key)[0]


def session_key(client_id: int) -> bytes:
    return _U64.pack(client_id)


def session_client(key: bytes) -> int:
    return _U64.unpack(key)[0]


# Keys of the meta family.
META_FORMAT = b"format"                  # on-disk format version
META_HARD_STATE = b"hard_state"          # (term, vote, commit)
META_APPLY_STATE = b"apply_state"        # (applied_index, clock_ms, session sweep cursor)
META_CONF_STATE = b"conf_state"          # membership as of applied_index
META_SNAPSHOT_POINT = b"snapshot_point"  # (index, term, conf): the log starts after it
META_INSTALLING = b"installing"          # snapshot metadata of an install in progress
META_STAGING = b"staging"                # the incoming snapshot being staged
META_SELF = b"self"                      # this replica's node id (8 bytes); absent in stores of the first format
META_POSITION_INDEX = b"position_index"  # present once the position family indexes every kv key

FORMAT_VERSION = 1

# Record tags of snapshot streams and of the staging family, in stream order.
TAG_KV = 0
TAG_SESSIONS = 1
TAG_STATE = 2
TAG_SHARD = 3
# The only state record: the state machine's clock (see ReplicaStore.apply).
STATE_CLOCK = b"clock"

# The shard family: the ownership state, and one key per (export, dirty key).
SHARD_STATE = b"state"
DIRTY_PREFIX = b"d"


def dirty_key(move_id: int, key: bytes) -> bytes:
    return DIRTY_PREFIX + move_id.to_bytes(8, "big") + key


def dirty_prefix(move_id: int) -> bytes:
    return DIRTY_PREFIX + move_id.to_bytes(8, "big")

# --- Values ------------------------------------------------------------------------------

_ENTRY_TYPES = {int(t): t for t in EntryType}


def _pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(data: bytes, what: str) -> tuple:
    try:
        value = msgpack.unpackb(data, use_list=False, raw=False)
    except Exception as exc:
        raise CorruptionError(f"{what}: undecodable ({exc})") from None
    if type(value) is not tuple:
        raise CorruptionError(f"{what}: expected an array")
    return value


def encode_entry(entry: Entry) -> bytes:
    return msgpack.packb((entry.term, int(entry.type), entry.data), use_bin_type=True)


def decode_entry(index: int, value: bytes) -> Entry:
    try:
        term, entry_type, data = msgpack.unpackb(value, use_list=False)
        return Entry(term, index, data, _ENTRY_TYPES[entry_type])
    except Exception as exc:
        raise CorruptionError(f"log entry {index}: undecodable ({exc})") from None


def encode_hard_state(hard_state: HardState) -> bytes:
    return _pack((hard_state.term, hard_state.vote, hard_state.commit))


def decode_hard_state(data: bytes) -> HardState:
    fields = _unpack(data, "hard state")
    if len(fields) != 3 or not all(type(f) is int for f in fields):
        raise CorruptionError("hard state: expected (term, vote, commit)")
    return HardState(*fields)


def conf_state_fields(conf_state: ConfState) -> tuple:
    """The msgpack shape: (voters, learners, voters_outgoing, removed,
    members as (node_id, host, address) triples, incarnations as (node_id,
    incarnation) pairs). The first format had only the first three, the
    second no incarnations; conf_state_from_fields reads all three (a
    configuration written before incarnations has none bound). The sixth
    field is written only when a member is bound, so a configuration without
    bindings keeps the bytes an earlier version reads."""
    fields: tuple = (
        tuple(conf_state.voters),
        tuple(conf_state.learners),
        tuple(conf_state.voters_outgoing),
        tuple(conf_state.removed),
        tuple((m.node_id, m.host, m.address) for m in conf_state.members),
    )
    if conf_state.incarnations:
        fields += (tuple(conf_state.incarnations),)
    return fields


def conf_state_from_fields(fields: object) -> ConfState:
    """ConfState from its msgpack shape (either format); ValueError if it is not one."""
    if type(fields) is not tuple or len(fields) not in (3, 5, 6):
        raise ValueError("conf state: expected (voters, learners, voters_outgoing[, removed, members"
                         "[, incarnations]])")
    for ids in fields[:4]:
        if type(ids) is not tuple or not all(type(i) is int and 0 < i <= U64_MAX for i in ids):
            raise ValueError("conf state: node ids must be positive integers")
    members: tuple[Member, ...] = ()
    if len(fields) >= 5:
        raw_members = fields[4]
        if type(raw_members) is not tuple:
            raise ValueError("conf state: members must be an array")
        parsed = []
        for member in raw_members:
            if (
                type(member) is not tuple
                or len(member) != 3
                or type(member[0]) is not int
                or not 0 < member[0] <= U64_MAX
                or type(member[1]) is not str
                or type(member[2]) is not str
            ):
                raise ValueError("conf state: a member must be (node_id, host, address)")
            parsed.append(Member(*member))
        members = tuple(parsed)
    incarnations: tuple[tuple[int, int], ...] = ()
    if len(fields) == 6:
        raw_bindings = fields[5]
        if type(raw_bindings) is not tuple or not all(
            type(pair) is tuple and len(pair) == 2 and all(type(v) is int and 0 < v <= U64_MAX for v in pair)
            for pair in raw_bindings
        ):
            raise ValueError("conf state: incarnations must be (node_id, incarnation) pairs of positive integers")
        incarnations = tuple(sorted(raw_bindings))
    return ConfState(
        voters=fields[0],
        learners=fields[1],
        voters_outgoing=fields[2],
        removed=fields[3] if len(fields) >= 5 else (),
        members=members,
        incarnations=incarnations,
    )


def encode_conf_state(conf_state: ConfState) -> bytes:
    return _pack(conf_state_fields(conf_state))


def decode_conf_state(data: bytes) -> ConfState:
    try:
        return conf_state_from_fields(_unpack(data, "conf state"))
    except ValueError as exc:
        raise CorruptionError(str(exc)) from None


def encode_metadata(metadata: SnapshotMetadata) -> bytes:
    return _pack((metadata.index, metadata.term, conf_state_fields(metadata.conf_state)))


def decode_metadata(data: bytes, what: str = "snapshot metadata") -> SnapshotMetadata:
    fields = _unpack(data, what)
    try:
        if len(fields) != 3 or type(fields[0]) is not int or type(fields[1]) is not int:
            raise ValueError("expected (index, term, conf state)")
        return SnapshotMetadata(fields[0], fields[1], conf_state_from_fields(fields[2]))
    except ValueError as exc:
        raise CorruptionError(f"{what}: {exc}") from None


@dataclass(slots=True, frozen=True)
class ApplyState:
    """What the state machine has applied, written in every apply batch.

    `clock_ms` is the largest command timestamp applied so far: a clock that
    only moves forward along the log, identical on every replica.
    `sweep_cursor` is the session key after which the next expiry sweep
    starts (b"" = from the beginning).
    """

    applied_index: int = 0
    clock_ms: int = 0
    sweep_cursor: bytes = b""


def encode_apply_state(state: ApplyState) -> bytes:
    return _pack((state.applied_index, state.clock_ms, state.sweep_cursor))


def decode_apply_state(data: bytes) -> ApplyState:
    fields = _unpack(data, "apply state")
    if len(fields) != 3 or type(fields[0]) is not int or type(fields[1]) is not int or type(fields[2]) is not bytes:
        raise CorruptionError("apply state: expected (applied_index, clock_ms, sweep_cursor)")
    return ApplyState(*fields)


@dataclass(slots=True, frozen=True)
class SessionRecord:
    """A client session: the last command applied for it and its outcome, so
    that a retry of that command is answered without applying it again.

    Invariant: existed == (old_value is not None). `swapped`: whether a
    compare-and-set wrote its value (None for other commands, and for records
    written before it was kept: a retried CAS is then answered by comparing
    the old value with the expected one, as it used to be). `position`: the
    key-space position of the key that last command wrote (None in records
    written before it was kept): a move ships the sessions whose last write
    lies in the moved ranges (store.py, export_delta).
    """

    last_sequence: int
    existed: bool
    old_value: bytes | None
    last_active_ms: int
    swapped: bool | None = None
    position: int | None = None


def encode_session(record: SessionRecord) -> bytes:
    fields: tuple = (record.last_sequence, record.existed, record.old_value, record.last_active_ms)
    if record.position is not None:
        fields += (record.swapped, record.position)
    elif record.swapped is not None:
        fields += (record.swapped,)
    return _pack(fields)


def decode_session(data: bytes) -> SessionRecord:
    """Raises ValueError (not only CorruptionError: snapshot validation uses it
    on untrusted bytes) if `data` is not a session record."""
    try:
        fields = msgpack.unpackb(data, use_list=False, raw=False)
    except Exception as exc:
        raise ValueError(f"session record: undecodable ({exc})") from None
    if type(fields) is not tuple or len(fields) not in (4, 5, 6):
        raise ValueError("session record: expected (last_sequence, existed, old_value, last_active_ms"
                         "[, swapped[, position]])")
    last_sequence, existed, old_value, last_active_ms = fields[:4]
    swapped = fields[4] if len(fields) >= 5 else None
    position = fields[5] if len(fields) == 6 else None
    if swapped is not None and type(swapped) is not bool:
        raise ValueError("session record: bad swapped flag")
    if position is not None and (type(position) is not int or not 0 <= position <= U64_MAX):
        raise ValueError("session record: bad key position")
    if type(last_sequence) is not int or not 0 <= last_sequence <= U64_MAX:
        raise ValueError("session record: bad last_sequence")
    if type(last_active_ms) is not int or not 0 <= last_active_ms <= U64_MAX:
        raise ValueError("session record: bad last_active_ms")
    if type(existed) is not bool or (old_value is not None and type(old_value) is not bytes):
        raise ValueError("session record: bad result")
    if existed != (old_value is not None):
        raise ValueError("session record: existed disagrees with old_value")
    return SessionRecord(last_sequence, existed, old_value, last_active_ms, swapped, position)


def encode_clock(clock_ms: int) -> bytes:
    return _U64.pack(clock_ms)


def decode_clock(data: bytes) -> int:
    if type(data) is not bytes or len(data) != 8:
        raise ValueError("clock: expected 8 bytes")
    return _U64.unpack(data)[0]
