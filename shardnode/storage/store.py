"""ReplicaStore: the durable state of one Raft group member (a worker).

It is at once
- the Raft core's `Storage` (hard state, log, snapshot descriptor), fed by
  `persist()` with one synced WriteBatch per Ready (group commit);
- the replicated state machine: the user's keys, the client sessions
  that make writes exactly-once, and which part of the key space the group
  owns (ownership.py; moves of key space arrive as shard commands),
  advanced by `apply()`;
- log compaction, and both ends of snapshot transfer.

Invariants kept here (and where):
- The stored log is exactly the entries (snapshot_index, last_index], no
  gaps; snapshot_index/term name the entry just before it (0/0 at the start).
  persist(), compact() and the install keep it; open() checks it.
- snapshot_index <= applied_index <= last_index, and applied entries are
  committed: compaction stops at applied_index, persist() refuses to
  truncate below it, an install moves all three together.
- The applied index is written in the same batch as the changes of the
  entries it covers (apply()), so after a crash the state machine is exactly
  "applied up to applied_index" and re-applies the rest once.
- Everything a replica's state machine computes depends only on the log:
  the only clock is the command timestamps (made monotonic, see apply()).

Threading: the worker may run persist() in a thread (the fsync) while its
event loop keeps stepping the core, which reads through the Storage methods,
and serving get(). The in-memory log view is therefore swapped under a short
lock once a batch is durable; writers (persist, compact, staging, install)
are serialized by another; the state machine (apply, get, snapshot capture,
install) by a third. Lock order: _scan_lock → _write_lock → _staging_lock →
_sm_lock → _view_lock. The Ready contract already orders persist() before
apply(); outside an install they write disjoint keys, and an install holds
the state-machine lock so that no reader sees a half-replaced state.
A move's export reads (export_scan, export_delta) take the state-machine
lock only to open their cut of the state (iterators and a snapshot), then
read it without it, holding only _scan_lock, which close() takes to wait
for them (export_reads.py).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from rocksdict import WriteBatch

from shardnode.config import StorageConfig
from shardnode.raft import (
    CompactedError,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Snapshot,
    SnapshotMetadata,
    SnapshotOutOfDate,
    SnapshotTemporarilyUnavailable,
    UnavailableError,
)
from shardnode.raft.messages import EMPTY_HARD_STATE
from shardnode.raft.storage import entries_size as _entries_size, limit_size, size_limited_end

import msgpack

from ..keyspace import RangeSet, stable_hash
from .commands import Command, CommandError, CommandOp, command_from_fields
from . import position_index
from . import kv_records
from . import etcd_apply
from .etcd_ops import RangeOp, RangeResponse, run_range
from .kv_records import SHARD_REVISION, KeyRecord, decode_record, decode_revision, encode_record, \
    encode_revision, next_revision, record_value
from .export_reads import DeltaPage, delta_page, scan_page
from .engine import (
    SHARD_STATE,
    dirty_key,
    dirty_prefix,
    FORMAT_VERSION,
    LOG_END,
    META_APPLY_STATE,
    META_CONF_STATE,
    META_FORMAT,
    META_HARD_STATE,
    META_INSTALLING,
    META_SELF,
    META_SNAPSHOT_POINT,
    META_STAGING,
    ApplyState,
    CorruptionError,
    Engine,
    SessionRecord,
    SnapshotBusy,
    SnapshotNotStaged,
    StorageClosed,
    StorageError,
    StorageFault,
    decode_apply_state,
    decode_conf_state,
    decode_entry,
    decode_hard_state,
    decode_metadata,
    decode_session,
    encode_apply_state,
    encode_conf_state,
    encode_entry,
    encode_hard_state,
    encode_metadata,
    encode_session,
    log_index,
    log_key,
    new_batch,
    open_engine,
    session_client,
    session_key,
)
from . import fencing
from . import incarnation
from .incarnation import StoreIdentity
from .ownership import Export, Import, ShardState
from .shard_commands import SHARD_FORMAT, ShardCommand, ShardOp, ShardResult, shard_command_from_fields
from .snapshot import (
    CapturedSnapshot,
    SnapshotReader,
    SnapshotStaging,
    StagingState,
    decode_staging_state,
    encode_staging_state,
    move_staged_into_place,
)

log = logging.getLogger("shardnode.storage")

#: Captured snapshots kept for streaming; older ones are dropped (their
#: readers, if any, finish first).
MAX_REGISTERED_SNAPSHOTS = 2
#: The expiry sweep runs when the applied index crosses a multiple of
#: SESSION_SWEEP_EVERY, and examines SESSION_SWEEP_COUNT sessions: one per two
#: entries, at least as many as writes can create, for the cost of one
#: iterator per 256 entries (it was one per apply batch: 4 % of a replica's time).
SESSION_SWEEP_EVERY = 256
SESSION_SWEEP_COUNT = 128


@dataclass(slots=True, frozen=True)
class ApplyResult:
    """The outcome of applying one command.

    duplicate: the command was not applied now. With stale=False it is a
    retry of the session's last command, and existed/old_value are that
    command's original outcome; with stale=True it is older than the
    session's last command, its outcome is no longer known (existed=False,
    old_value=None), and the client must not take these as its answer.
    """

    index: int
    client_id: int
    sequence: int
    existed: bool
    old_value: bytes | None
    duplicate: bool = False
    stale: bool = False
    swapped: bool = False        # CAS: the new value was written
    wrong_group: bool = False    # refused, nothing changed: the group does not serve the key now


@dataclass(slots=True, frozen=True)
class ChangeEvent:
    """One change of a key by a client's write: `record` None for a delete;
    `previous` what the key held before (None: absent)."""

    revision: int
    key: bytes
    record: KeyRecord | None
    previous: KeyRecord | None


class StoreNotInitialized(StorageError):
    """There is no initialized store here (perhaps a first start that crashed
    before it finished), and nothing to initialize one with."""


class StoreBusy(StorageError):
    """The state machine is being replaced by a snapshot install; retry."""


class ReplicaStore:
    """See the module docstring. Create with ReplicaStore.open()."""

    # --- Opening and closing -------------------------------------------------------------

    def __init__(self, engine: Engine, *, session_ttl_ms: int, entry_cache_entries: int) -> None:
        if session_ttl_ms <= 0:
            raise ValueError("session_ttl_ms must be positive")
        if entry_cache_entries < 0:
            raise ValueError("entry_cache_entries must not be negative")
        self._engine = engine
        self._session_ttl_ms = session_ttl_ms
        self._cache_capacity = entry_cache_entries
        self._closed = False
        self._write_lock = threading.RLock()
        self._staging_lock = threading.RLock()
        self._sm_lock = threading.RLock()
        self._view_lock = threading.Lock()
        # Held while an export page reads its cut of the state (close() waits for it).
        self._scan_lock = threading.RLock()
        # Log view (guarded by _view_lock).
        self._hard_state: HardState = EMPTY_HARD_STATE
        self._snapshot_index = 0
        self._snapshot_term = 0
        self._last_index = 0
        # The newest entries: a contiguous run ending at _last_index (or empty,
        # then _cache_first == _last_index + 1).
        self._cache: list[Entry] = []
        self._cache_first = 1
        # State machine (guarded by _sm_lock).
        self._apply_state = ApplyState()
        self._conf_state = ConfState()
        # Ownership: the stored state, or `_shard_default` while none is
        # stored (a group that never took part in a move).
        self._shard_default = ShardState(owned=None)
        self._shard: ShardState | None = None
        self._captures: OrderedDict[tuple[int, int], CapturedSnapshot] = OrderedDict()
        self._staging: SnapshotStaging | None = None
        # A completed staging handed to the core (hand_over_staging): it must
        # stay until persist() installs it, whatever streams arrive meanwhile.
        self._handed_over: tuple[int, int] | None = None
        self._node_id: int | None = None
        self._identity = StoreIdentity(0)
        # A store written before the position index existed gets it now (once).
        if position_index.ensure_built(engine):
            log.info("storage.position_index_built", extra={"path": engine.path})
        # And one written before kv records (etcd's per-key metadata) has its values wrapped (once).
        if kv_records.ensure_upgraded(engine):
            log.info("storage.kv_records_upgraded", extra={"path": engine.path})
        # The group's last assigned revision (guarded by _sm_lock; kv_records.py).
        self._revision = 0
        # Told every change of a user's key once its apply batch is written, in log order
        # (ChangeEvent; the etcd API's watches, replica/watch_hub.py). Not moves: they change no key.
        self.on_changes: Callable[[list[ChangeEvent]], None] | None = None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        initial_voters: tuple[int, ...] = (),
        initial_conf: ConfState | None = None,
        node_id: int | None = None,
        session_ttl_ms: int = 3_600_000,
        entry_cache_entries: int = 8192,
        storage: StorageConfig = StorageConfig(),
    ) -> ReplicaStore:
        """Open the store at `path`, creating it if it does not exist: with
        `initial_conf` as its membership (a replica joining a running group:
        the configuration that added it), or else `initial_voters` (the
        group's first members); `node_id` is recorded as the replica's own id.
        An existing store keeps its own membership and id. Completes an
        install interrupted by a crash."""
        conf = initial_conf if initial_conf is not None else ConfState(voters=tuple(initial_voters))
        engine = open_engine(os.fspath(path), storage)
        try:
            store = cls(engine, session_ttl_ms=session_ttl_ms, entry_cache_entries=entry_cache_entries)
            store._load(conf, node_id)
        except BaseException:
            engine.close()
            raise
        return store

    @staticmethod
    def exists(path: str | os.PathLike[str]) -> bool:
        """Whether a database was ever created at `path` (without opening it)."""
        return os.path.exists(os.path.join(os.fspath(path), "CURRENT"))

    def _load(self, initial_conf: ConfState, node_id: int | None) -> None:
        meta = self._engine.meta.view
        version = meta.get(META_FORMAT)
        if version is None:
            self._initialize(initial_conf, node_id)
            version = meta.get(META_FORMAT)
        if version != bytes((FORMAT_VERSION,)):
            raise CorruptionError(f"unsupported storage format {version!r}")
        self._identity = incarnation.load(self._engine)
        raw = meta.get(META_SELF)
        self._node_id = int.from_bytes(raw, "big") if raw is not None else None
        raw = meta.get(META_HARD_STATE)
        self._hard_state = decode_hard_state(raw) if raw is not None else EMPTY_HARD_STATE
        point = decode_metadata(meta[META_SNAPSHOT_POINT], "snapshot point")
        self._snapshot_index, self._snapshot_term = point.index, point.term
        self._apply_state = decode_apply_state(meta[META_APPLY_STATE])
        self._conf_state = decode_conf_state(meta[META_CONF_STATE])
        self._load_shard_state()
        raw = meta.get(META_STAGING)
        if raw is not None:
            self._staging = self._make_staging(decode_staging_state(raw))
        self._load_log()
        raw = meta.get(META_INSTALLING)
        if raw is not None:
            metadata = decode_metadata(raw, "install marker")
            log.warning(
                "storage.install_resumed",
                extra={"path": self._engine.path, "index": metadata.index, "term": metadata.term},
            )
            with self._write_lock, self._staging_lock, self._sm_lock:
                self._install_and_persist(metadata, None, [], write_marker=False)
        if not self._snapshot_index <= self._apply_state.applied_index <= self._last_index:
            raise CorruptionError(
                f"applied index {self._apply_state.applied_index} outside the log "
                f"[{self._snapshot_index}, {self._last_index}]"
            )

    def _initialize(self, conf: ConfState, node_id: int | None) -> None:
        if not conf.voters and not conf.learners:
            raise StoreNotInitialized(f"no store at {self._engine.path}, and no initial members to create one with")
        batch = new_batch()
        meta = self._engine.meta.handle
        batch.put(META_CONF_STATE, encode_conf_state(conf), meta)
        batch.put(META_SNAPSHOT_POINT, encode_metadata(SnapshotMetadata(0, 0, conf)), meta)
        batch.put(META_APPLY_STATE, encode_apply_state(ApplyState()), meta)
        if node_id is not None:
            batch.put(META_SELF, node_id.to_bytes(8, "big"), meta)
        incarnation.put_new_incarnation(batch, meta)
        batch.put(META_FORMAT, bytes((FORMAT_VERSION,)), meta)  # last: its presence means "initialized"
        self._engine.write(batch, sync=True)

    def _load_shard_state(self) -> None:
        raw = self._engine.shard.view.get(SHARD_STATE)
        self._shard = ShardState.decode(raw) if raw is not None else None
        self._revision = decode_revision(self._engine.shard.view.get(SHARD_REVISION))

    @property
    def revision(self) -> int:
        """The last revision this group assigned (0: none yet)."""
        return self._revision

    def configure_ownership(self, default_owned: RangeSet | None) -> None:
        """What the group owns while no shard command ever changed it: its
        ranges of the cluster's first map (None: everything, the metadata
        group). Every replica is given the same (from cluster.toml)."""
        with self._sm_lock:
            self._shard_default = ShardState(owned=default_owned)

    @property
    def shard_state(self) -> ShardState:
        shard = self._shard
        return shard if shard is not None else self._shard_default

    def admits_conf_change(self, data: bytes) -> bool:
        """Whether the committed CONF_CHANGE entry `data` may take effect
        now: its fencing token is not smaller than the group's (fencing.py).
        Asked by the driver just before it applies that entry, so the answer
        is the same on every replica. Promotions and incarnation bindings
        (the leader's own, token 0) always may: a promotion only follows an
        admitted ADD_LEARNER, and a binding changes no member."""
        try:
            change = ConfChange.decode(data)
        except ValueError:
            return True         # undecodable: the core applies it as a no-op
        return fencing.admits_membership_change(
            self.shard_state.fence, fencing.conf_change_fence(change.context),
            leaders_own=change.type in (ConfChangeType.ADD_NODE, ConfChangeType.BIND_INCARNATION))

    def owns(self, key: bytes) -> bool:
        """Whether the state machine serves `key` now (reads check this after
        their read barrier; writes are checked when applied)."""
        return self.shard_state.accepts(key)

    def _load_log(self) -> None:
        """Find the last index, check the log starts right after the snapshot
        point, and warm the entry cache with the newest entries."""
        engine = self._engine
        iterator = engine.iterator(engine.log)
        iterator.seek_to_last()
        if not iterator.valid():
            self._last_index = self._snapshot_index
        else:
            self._last_index = log_index(iterator.key())
            iterator.seek_to_first()
            first = log_index(iterator.key())
            if first != self._snapshot_index + 1:
                raise CorruptionError(f"log starts at {first}, expected {self._snapshot_index + 1}")
        del iterator
        self._cache = []
        self._cache_first = self._last_index + 1
        if self._cache_capacity and self._last_index > self._snapshot_index:
            lo = max(self._snapshot_index + 1, self._last_index - self._cache_capacity + 1)
            self._cache, _ = self._read_log(lo, self._last_index + 1, None)
            if len(self._cache) != self._last_index + 1 - lo:
                raise CorruptionError(f"log has a gap in [{lo}, {self._last_index}]")
            self._cache_first = lo

    def close(self) -> None:
        """Release the database (idempotent). Open snapshot readers fail after."""
        with self._scan_lock, self._write_lock, self._staging_lock, self._sm_lock:
            if self._closed:
                return
            self._closed = True
            for capture in self._captures.values():
                capture.release()
            self._captures.clear()
            self._staging = None
            self._engine.close()

    @property
    def node_id(self) -> int | None:
        """This replica's own node id, as recorded when the store was created
        (None for a store of the first format: its id is its host's)."""
        return self._node_id

    @property
    def path(self) -> str:
        """The database directory."""
        return self._engine.path

    @property
    def identity(self) -> StoreIdentity:
        """This store's incarnation, and its cluster's id and group's
        incarnation as far as known (storage/incarnation.py)."""
        return self._identity

    def record_identity(self, cluster_id: int, group_incarnation: int) -> StoreIdentity:
        """Durably record the cluster id and group incarnation, where unknown."""
        with self._write_lock:
            self._check_open()
            self._identity = incarnation.record(self._engine, self._identity, cluster_id, group_incarnation)
            return self._identity

    def __enter__(self) -> ReplicaStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StorageClosed("replica store is closed")

    # --- The Storage protocol ------------------------------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        with self._view_lock:
            hard_state = self._hard_state
        return hard_state, self._conf_state

    def first_index(self) -> int:
        return self._snapshot_index + 1

    def last_index(self) -> int:
        return self._last_index

    def term(self, index: int) -> int:
        with self._view_lock:
            if index == self._snapshot_index:
                return self._snapshot_term
            if index < self._snapshot_index:
                raise CompactedError(f"term of {index}: compacted up to {self._snapshot_index}")
            if index > self._last_index:
                raise UnavailableError(f"term of {index}: last index is {self._last_index}")
            if index >= self._cache_first:
                return self._cache[index - self._cache_first].term
        self._check_open()
        value = self._engine.log.view.get(log_key(index))
        if value is None:
            # Only a compaction running concurrently can have removed it.
            raise CompactedError(f"term of {index}: compacted up to {self._snapshot_index}")
        return decode_entry(index, value).term

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        with self._view_lock:
            if lo <= self._snapshot_index:
                raise CompactedError(f"entries from {lo}: compacted up to {self._snapshot_index}")
            if hi > self._last_index + 1:
                raise UnavailableError(f"entries up to {hi - 1}: last index is {self._last_index}")
            if lo >= hi:
                return []
            cache_first = self._cache_first
            if lo >= cache_first:
                start, stop = lo - cache_first, hi - cache_first
                return self._cache[start : size_limited_end(self._cache, start, stop, max_size)]
            cached = self._cache[: hi - cache_first] if hi > cache_first else []
        self._check_open()
        stored_hi = min(hi, cache_first)
        stored, limited = self._read_log(lo, stored_hi, max_size)
        if limited:
            return stored
        if len(stored) < stored_hi - lo:
            # Only a compaction running concurrently deletes stored entries
            # (the core never reads a suffix that persist() is replacing).
            raise CompactedError(f"entries from {lo}: compacted up to {self._snapshot_index}")
        return stored + limit_size(cached, max_size, used=_entries_size(stored)) if cached else stored

    def _read_log(self, lo: int, hi: int, max_size: int | None) -> tuple[list[Entry], bool]:
        """Stored entries [lo, hi), stopping at the first hole, or before the
        entry that would take the total over max_size (never before the first
        one). Returns (entries, whether the size limit stopped the read)."""
        engine = self._engine
        iterator = engine.iterator(engine.log, upper_bound=log_key(hi))
        iterator.seek(log_key(lo))
        result: list[Entry] = []
        total = 0
        expected = lo
        while iterator.valid():
            index = log_index(iterator.key())
            if index != expected:
                break
            entry = decode_entry(index, iterator.value())
            if max_size is not None:
                total += entry.size()
                if result and total > max_size:
                    return result, True
            result.append(entry)
            expected += 1
            iterator.next()
        return result, False

    def snapshot(self) -> Snapshot:
        """The state at the applied index, as a descriptor for the core; the
        state itself is captured now and registered for open_snapshot_reader()."""
        with self._sm_lock:
            self._check_open()
            applied = self._apply_state.applied_index
            if applied == 0:
                raise SnapshotTemporarilyUnavailable("nothing applied yet")
            metadata = SnapshotMetadata(index=applied, term=self.term(applied), conf_state=self._conf_state)
            key = (metadata.index, metadata.term)
            capture = self._captures.get(key)
            if capture is None or capture.metadata != metadata:
                if capture is not None:
                    capture.unregister()
                engine = self._engine
                capture = CapturedSnapshot(
                    metadata,
                    kv=engine.iterator(engine.kv),
                    sessions=engine.iterator(engine.sessions),
                    clock_ms=self._apply_state.clock_ms,
                    shard=engine.iterator(engine.shard),
                )
                self._captures[key] = capture
                log.debug("storage.snapshot_captured", extra={"index": metadata.index, "term": metadata.term})
            self._captures.move_to_end(key)
            while len(self._captures) > MAX_REGISTERED_SNAPSHOTS:
                _, oldest = self._captures.popitem(last=False)
                oldest.unregister()
            return Snapshot(metadata, b"")

    def open_snapshot_reader(self, index: int, term: int) -> SnapshotReader:
        """A reader of the capture registered under (index, term); KeyError if
        there is none (never taken, or dropped for newer ones)."""
        with self._sm_lock:
            self._check_open()
            return SnapshotReader(self._captures[(index, term)])

    # --- Persisting a Ready --------------------------------------------------------------

    def persist(
        self,
        hard_state: HardState | None,
        entries: list[Entry],
        snapshot: Snapshot | None = None,
        *,
        sync: bool = True,
    ) -> None:
        """Make a Ready durable with one WriteBatch: the snapshot (if any)
        first, then the entries (replacing any conflicting suffix), then the
        hard state. Synced unless `sync` is False, which the driver passes
        only for a Ready that merely moves the commit index (Ready.must_sync).
        Raises SnapshotNotStaged if the snapshot's state was not staged and
        finished; UnavailableError if the entries leave a gap."""
        if not sync and (entries or snapshot is not None):
            raise StorageError("entries and snapshots are always written with sync=True")
        with self._write_lock:
            self._check_open()
            if snapshot is None:
                self._persist_log(hard_state, entries, install=None, sync=sync)
            else:
                with self._staging_lock, self._sm_lock:
                    self._install_and_persist(snapshot.metadata, hard_state, entries, write_marker=True)

    def _persist_log(
        self,
        hard_state: HardState | None,
        entries: list[Entry],
        install: tuple[SnapshotMetadata, int] | None,
        sync: bool = True,
    ) -> None:
        """Build and write the Ready's batch, then publish the new view.
        `install` = (metadata, staged clock) adds the end of an install to
        the front of the batch (the state was moved into place already)."""
        engine = self._engine
        log_cf, meta = engine.log, engine.meta
        batch = new_batch()
        snapshot_index, snapshot_term, last = self._snapshot_index, self._snapshot_term, self._last_index
        applied = self._apply_state.applied_index
        new_apply_state: ApplyState | None = None
        if install is not None:
            metadata, clock_ms = install
            snapshot_index, snapshot_term, last = metadata.index, metadata.term, metadata.index
            applied = metadata.index
            new_apply_state = ApplyState(metadata.index, clock_ms, b"")
            batch.delete_range(log_key(0), LOG_END, log_cf.handle)
            batch.put(META_SNAPSHOT_POINT, encode_metadata(metadata), meta.handle)
            batch.put(META_CONF_STATE, encode_conf_state(metadata.conf_state), meta.handle)
            batch.put(META_APPLY_STATE, encode_apply_state(new_apply_state), meta.handle)
            engine.delete_all(batch, engine.staging)
            batch.delete(META_STAGING, meta.handle)
            batch.delete(META_INSTALLING, meta.handle)
            # The core counts everything up to the snapshot as committed; a
            # stored commit below it would fail its start-up check.
            base = hard_state if hard_state is not None else self._hard_state
            if base.commit < metadata.index:
                hard_state = replace(base, commit=metadata.index)
        if entries:
            entries = self._new_entries(entries, snapshot_index, last)
        if entries:
            first_new = entries[0].index
            if first_new <= applied:
                raise StorageError(f"refusing to truncate the log at {first_new}: entries up to {applied} are applied")
            if first_new <= last:
                batch.delete_range(log_key(first_new), LOG_END, log_cf.handle)
            for entry in entries:
                batch.put(log_key(entry.index), encode_entry(entry), log_cf.handle)
            last = entries[-1].index
        if hard_state is not None:
            batch.put(META_HARD_STATE, encode_hard_state(hard_state), meta.handle)
        if not len(batch):
            return
        engine.write(batch, sync=sync)
        with self._view_lock:
            if hard_state is not None:
                self._hard_state = hard_state
            if install is not None:
                self._snapshot_index, self._snapshot_term = snapshot_index, snapshot_term
                self._cache, self._cache_first = [], snapshot_index + 1
            if entries:
                self._cache_append(entries)
            self._last_index = last
        if install is not None:
            assert new_apply_state is not None
            self._apply_state = new_apply_state
            self._conf_state = install[0].conf_state
            self._load_shard_state()
            self._staging = None

    @staticmethod
    def _new_entries(entries: list[Entry], snapshot_index: int, last: int) -> list[Entry]:
        """Check and trim entries to append: consecutive, no gap after `last`,
        without the part already compacted (as MemoryStorage.append)."""
        first = entries[0].index
        for offset, entry in enumerate(entries):
            if entry.index != first + offset:
                raise ValueError(f"entries to persist are not consecutive at {entry.index}")
        if entries[-1].index <= snapshot_index:
            return []
        if first <= snapshot_index:
            entries = entries[snapshot_index + 1 - first :]
        if entries[0].index > last + 1:
            raise UnavailableError(f"append at {entries[0].index} leaves a gap after last index {last}")
        return entries

    def _cache_append(self, entries: list[Entry]) -> None:
        """Caller holds _view_lock. Keeps the cache a contiguous run ending at
        the new last index, at most about _cache_capacity long."""
        capacity = self._cache_capacity
        if not capacity:
            self._cache_first = entries[-1].index + 1
            return
        first_new = entries[0].index
        if self._cache and first_new >= self._cache_first:
            del self._cache[first_new - self._cache_first :]
            self._cache.extend(entries)
        else:
            self._cache = list(entries[-capacity:])
            self._cache_first = self._cache[0].index
            return
        # Trim in steps of a quarter so that trimming stays amortized O(1).
        if len(self._cache) > capacity + capacity // 4:
            drop = len(self._cache) - capacity
            del self._cache[:drop]
            self._cache_first += drop

    # --- Compaction ----------------------------------------------------------------------

    def compact(self, threshold: int) -> int | None:
        """If more than `threshold` applied entries are in the log, make the
        applied index the new snapshot point and delete the entries up to it
        (one synced batch, which also makes earlier unsynced apply batches
        durable: the WAL is sequential). Returns the new point, else None."""
        with self._write_lock:
            self._check_open()
            with self._sm_lock:
                applied = self._apply_state.applied_index
                conf_state = self._conf_state
            if applied - self._snapshot_index <= threshold or applied <= self._snapshot_index:
                return None
            term = self.term(applied)
            metadata = SnapshotMetadata(applied, term, conf_state)
            batch = new_batch()
            batch.put(META_SNAPSHOT_POINT, encode_metadata(metadata), self._engine.meta.handle)
            batch.delete_range(log_key(0), log_key(applied + 1), self._engine.log.handle)
            self._engine.write(batch, sync=True)
            with self._view_lock:
                self._snapshot_index, self._snapshot_term = applied, term
                if self._cache_first <= applied:
                    del self._cache[: applied + 1 - self._cache_first]
                    self._cache_first = applied + 1
            log.info("storage.compacted", extra={"index": applied, "term": term})
            return applied

    # --- The state machine ---------------------------------------------------------------

    @property
    def applied_index(self) -> int:
        return self._apply_state.applied_index

    def closed_revision(self) -> int:
        """A revision that every change applied here from now on will be
        above: the group's last revision, or just below what the state
        machine's clock already guarantees (kv_records.next_revision: a
        revision is at least clock_ms << 12, and the clock never goes back).
        Every change at or below it has been applied here. An idle group's
        clock moves on with any command, an empty transaction too: a watch
        asks for one to see the group's changes closed up to now."""
        with self._sm_lock:
            return max(self._revision, (self._apply_state.clock_ms << 12) - 1)

    @property
    def conf_state(self) -> ConfState:
        return self._conf_state

    def get(self, key: bytes) -> bytes | None:
        """The key's value as of the applied index. Raises StoreBusy instead
        of waiting while a snapshot install holds the state machine (seconds,
        on the persist thread): the caller, often an event loop that must
        keep ticking, retries later or elsewhere."""
        raw = self._read_raw(key)
        return None if raw is None else record_value(raw)

    def get_record(self, key: bytes) -> KeyRecord | None:
        """The key's value with its etcd metadata, as get() (StoreBusy during an install)."""
        raw = self._read_raw(key)
        return None if raw is None else decode_record(raw)

    def _read_raw(self, key: bytes) -> bytes | None:
        if not self._sm_lock.acquire(blocking=False):
            raise StoreBusy("a snapshot is being installed; retry")
        try:
            self._check_open()
            try:
                return self._engine.kv.view.get(key)
            except Exception as exc:  # rocksdict raises a bare Exception on I/O errors
                raise StorageFault(f"RocksDB read failed at {self._engine.path}: {exc}") from exc
        finally:
            self._sm_lock.release()

    def lease_keys(self, lease: int, epoch: int) -> list[bytes] | None:
        """The keys this group serves that are attached to `lease`, in key
        order; None as scan() (ownership newer than `epoch`, or frozen)."""
        with self._scan_lock:
            if not self._sm_lock.acquire(blocking=False):
                raise StoreBusy("a snapshot is being installed; retry")
            try:
                self._check_open()
                shard = self.shard_state
                if not etcd_apply.range_allowed(shard, epoch):
                    return None
                engine = self._engine
                prefix = kv_records.lease_index_prefix(lease)
                cursor = engine.iterator(engine.shard)
                cursor.seek(prefix)
                candidates = []
                while cursor.valid() and cursor.key().startswith(prefix):
                    candidates.append(cursor.key()[len(prefix):])
                    cursor.next()
                del cursor
                keys = []
                for key in candidates:
                    raw = engine.kv.view.get(key)
                    # The index is a hint (a key that moved away leaves its entry): the record decides.
                    if raw is not None and shard.accepts(key) and decode_record(raw).lease == lease:
                        keys.append(key)
                return keys
            finally:
                self._sm_lock.release()

    def scan(self, op: RangeOp, epoch: int) -> tuple[RangeResponse, int] | None:
        """etcd's Range over this group's keys as of the applied index: the
        response and the group's revision; None if the group's ownership
        changed after the shard map epoch `epoch` the caller routed with, or
        part of it is frozen in a move (the caller routes again: otherwise a
        key could be seen in two groups or in none). Reads one cut of the
        state (an iterator) without holding up applies; memory is bounded by
        the op's limit (the rest is only counted). StoreBusy during an install."""
        # _scan_lock: close() waits for the iteration (as for a move's export reads).
        with self._scan_lock:
            if not self._sm_lock.acquire(blocking=False):
                raise StoreBusy("a snapshot is being installed; retry")
            try:
                self._check_open()
                shard = self.shard_state
                if not etcd_apply.range_allowed(shard, epoch):
                    return None
                revision = self._revision
                engine = self._engine
                cursor = None
                if op.range_end:
                    cursor = engine.iterator(engine.kv, upper_bound=None if op.range_end == b"\0" else op.range_end)
                    cursor.seek(op.key)
                else:
                    raw = engine.kv.view.get(op.key)
            finally:
                self._sm_lock.release()
            if cursor is None:
                matches = [] if raw is None or not shard.accepts(op.key) else [(op.key, decode_record(raw))]
                return run_range(op, iter(matches)), revision

            def records():  # type: ignore[no-untyped-def]
                while cursor.valid():
                    key = cursor.key()
                    if shard.accepts(key):
                        yield key, decode_record(cursor.value())
                    cursor.next()

            response = run_range(op, records())
            del cursor
            return response, revision

    def apply(self, entries: Sequence[Entry],
              conf_state: ConfState | None = None) -> list[ApplyResult | ShardResult | None]:
        """Apply committed entries, in order, as ONE WriteBatch holding the kv
        changes, the session changes and the new applied index (unsynced: the
        log is the source of truth, and since the applied index travels with
        the changes, a restart re-applies exactly what was lost).

        Returns one item per entry: an ApplyResult for a command, None for
        anything else (an entry at or below the applied index, a no-op, a
        conf change, undecodable data — which is logged and skipped the same
        way on every replica). `conf_state`, if given, is the membership
        after this batch's conf change entries (what RawNode.apply_conf_change
        returned) and is recorded in the same batch.

        Session expiry uses the state machine clock: the largest command
        timestamp applied so far. A leader's clock can run behind its
        predecessor's; a monotonic clock keeps "expired" a property of the
        log position, so the background sweep (which runs at batch
        boundaries that differ between replicas) can never make replicas
        disagree about whether a session exists.
        """
        with self._sm_lock:
            self._check_open()
            state = self._apply_state
            applied = state.applied_index
            clock_ms = state.clock_ms
            pending = _ApplyBatch(self._engine, self._revision)
            shard = self.shard_state
            shard_changed = False
            results: list[ApplyResult | ShardResult | None] = []
            for entry in entries:
                if entry.index <= applied:
                    results.append(None)
                    continue
                if entry.index != applied + 1:
                    raise StorageError(f"apply: entry {entry.index} does not follow applied index {applied}")
                if entry.index > self._last_index:
                    raise StorageError(f"apply: entry {entry.index} is not persisted (last index {self._last_index})")
                applied = entry.index
                if entry.type is EntryType.CONF_CHANGE:
                    fence = _conf_change_fence(entry.data)
                    if fence > shard.fence:
                        shard, shard_changed = replace(shard, fence=fence), True
                        pending.batch.put(SHARD_STATE, shard.encode(), self._engine.shard.handle)
                    results.append(None)
                    continue
                if entry.type != EntryType.NORMAL or not entry.data:
                    results.append(None)
                    continue
                try:
                    command = _decode_entry_data(entry.data)
                except CommandError as exc:
                    log.warning("storage.undecodable_command", extra={"index": entry.index, "error": str(exc)})
                    results.append(None)
                    continue
                if isinstance(command, ShardCommand):
                    result, new_shard = self._apply_shard_command(entry.index, command, shard, pending)
                    if new_shard is not shard:
                        shard, shard_changed = new_shard, True
                        pending.batch.put(SHARD_STATE, shard.encode(), self._engine.shard.handle)
                    results.append(result)
                    continue
                if command.timestamp_ms > clock_ms:
                    clock_ms = command.timestamp_ms
                results.append(self._apply_command(entry.index, command, clock_ms, pending, shard))
            if applied == state.applied_index and conf_state is None:
                return results
            cursor = state.sweep_cursor
            if applied // SESSION_SWEEP_EVERY != state.applied_index // SESSION_SWEEP_EVERY:
                cursor = self._sweep_sessions(cursor, clock_ms, pending)
            new_state = ApplyState(applied, clock_ms, cursor)
            batch = pending.batch
            if pending.revision != self._revision:
                batch.put(SHARD_REVISION, encode_revision(pending.revision), self._engine.shard.handle)
            meta = self._engine.meta.handle
            batch.put(META_APPLY_STATE, encode_apply_state(new_state), meta)
            if conf_state is not None:
                batch.put(META_CONF_STATE, encode_conf_state(conf_state), meta)
            self._engine.write(batch, sync=False)
            self._apply_state = new_state
            self._revision = pending.revision
            if pending.events and self.on_changes is not None:
                self.on_changes(pending.events)
            if conf_state is not None:
                self._conf_state = conf_state
            if shard_changed:
                self._shard = shard
            return results

    def _apply_command(self, index: int, command: Command, clock_ms: int, pending: _ApplyBatch,
                       shard: ShardState) -> ApplyResult:
        client_id, sequence = command.client_id, command.sequence
        if client_id:
            session = pending.session(client_id)
            if session is not None and session.last_active_ms < clock_ms - self._session_ttl_ms:
                pending.delete_session(client_id)
                session = None
            if session is not None:
                if sequence == session.last_sequence:
                    # A retry of a write applied here (perhaps before its key
                    # moved away): its original answer, whoever owns the key now.
                    pending.put_session(client_id, replace(session, last_active_ms=clock_ms))
                    if session.swapped is not None:
                        swapped = session.swapped
                    else:
                        swapped = command.op is CommandOp.CAS and session.old_value == command.expected
                    return ApplyResult(index, client_id, sequence, session.existed, session.old_value,
                                       duplicate=True, swapped=swapped)
                if sequence < session.last_sequence:
                    return ApplyResult(index, client_id, sequence, False, None, duplicate=True, stale=True)
        key = command.key
        position = stable_hash(key)
        if command.op is CommandOp.TXN:
            return self._apply_txn(index, command, clock_ms, pending, shard)
        if not shard.accepts_position(position):
            # Checked here, at apply, by every replica alike: a write routed
            # with an old map can never land in a group that no longer owns
            # its key. Not recorded in the session: it may be sent again, to
            # the owner.
            return ApplyResult(index, client_id, sequence, False, None, wrong_group=True)
        old = pending.record(key)
        old_value = None if old is None else old.value
        existed = old is not None
        swapped = False
        if command.op is CommandOp.PUT:
            record = _put_record(old, command.value, pending.next_revision(clock_ms, old))
            pending.put_record(key, record, existed=existed, position=position)
            pending.follow_lease(key, old, None)
            pending.changed(key, record, old)
        elif command.op is CommandOp.CAS:
            swapped = old_value == command.expected and all(
                shard.accepts(guard_key) and pending.value(guard_key) == guard_value
                for guard_key, guard_value in command.guards)
            if swapped:
                record = _put_record(old, command.value, pending.next_revision(clock_ms, old))
                pending.put_record(key, record, existed=existed, position=position)
                pending.follow_lease(key, old, None)
                pending.changed(key, record, old)
        elif existed:
            pending.next_revision(clock_ms, old)      # a delete is a change: it takes a revision (etcd's too)
            pending.put(key, None, existed=True, position=position)
            pending.follow_lease(key, old, None)
            pending.changed(key, None, old)
        if shard.exports and (command.op is not CommandOp.CAS or swapped):
            for move_id in shard.dirty_moves(position):
                pending.batch.put(dirty_key(move_id, key), b"", self._engine.shard.handle)
        if client_id:
            pending.put_session(client_id, SessionRecord(sequence, existed, old_value, clock_ms,
                                                         swapped if command.op is CommandOp.CAS else None,
                                                         position))
        return ApplyResult(index, client_id, sequence, existed, old_value, swapped=swapped)

    def _apply_txn(self, index: int, command: Command, clock_ms: int, pending: _ApplyBatch,
                   shard: ShardState) -> ApplyResult:
        """An etcd transaction (etcd_apply.py). Refused as wrong_group, nothing
        done and nothing recorded, if the group does not serve it now; else
        its answer is the session's, so that a retry gets it again."""
        answer = etcd_apply.apply_txn(self._engine, command.value or b"", clock_ms, pending, shard)
        if answer is None:
            return ApplyResult(index, command.client_id, command.sequence, False, None, wrong_group=True)
        if command.client_id:
            pending.put_session(command.client_id, SessionRecord(command.sequence, True, answer, clock_ms, None,
                                                                 stable_hash(command.key)))
        return ApplyResult(index, command.client_id, command.sequence, True, answer)

    # --- Moving key space (shard commands) ------------------------------------------------

    def _apply_shard_command(self, index: int, command: ShardCommand, shard: ShardState,
                             pending: _ApplyBatch) -> tuple[ShardResult, ShardState]:
        """Apply one shard command; returns its result and the new state (the
        same object if nothing changed). Deterministic, idempotent, and a
        refusal changes nothing."""
        op, move_id = command.op, command.move_id
        if not fencing.admits(shard.fence, command.fence):
            message = (f"superseded: a newer scheduler (fencing token {shard.fence}) took over from this one "
                       f"(token {command.fence})")
            log.warning("storage.shard_command_refused", extra={"index": index, "op": op.name, "move": move_id,
                                                                  "reason": message})
            return ShardResult(index, False, message), shard
        if command.fence > shard.fence:
            # A newer scheduler's token: from now on its predecessors' commands are refused.
            shard = replace(shard, fence=command.fence)
        done = move_id in shard.completed

        def ok(new: ShardState = shard) -> tuple[ShardResult, ShardState]:
            return ShardResult(index, True), new

        def refuse(message: str) -> tuple[ShardResult, ShardState]:
            log.warning("storage.shard_command_refused", extra={"index": index, "op": op.name, "move": move_id,
                                                                  "reason": message})
            return ShardResult(index, False, message), shard

        if op is ShardOp.FENCE:
            return ok()
        if op is ShardOp.IMPORT_BEGIN:
            if done or move_id in shard.imports:
                return ok()
            if shard.owned is None:
                return refuse("the metadata group takes no key space")
            if _overlap_sets(shard.owned, command.ranges):
                return refuse("this group already owns part of the ranges")
            others = shard.imported_elsewhere(move_id, command.ranges)
            if others:
                # One import per range: a second one could write into the
                # range behind the first one's delta, or its abort delete
                # what the first one ingested.
                return refuse(f"part of the ranges is being imported by move {others[0]}")
            return ok(replace(shard, imports={**shard.imports, move_id: Import(command.ranges)}))
        if op is ShardOp.INGEST:
            imported = shard.imports.get(move_id)
            if imported is None:
                return ok() if done else refuse("no import of this move in progress")
            if not imported.admits(command.delta):
                # A page scanned before some key changed could otherwise
                # overwrite the final value the delta brought (another run
                # of this move, or a superseded one, still copying).
                return refuse("a copy chunk after the delta began: another run of this move is ahead of this one")
            ranges = imported.ranges
            for key, value in command.puts:
                if stable_hash(key) in ranges:
                    if not kv_records.is_record(value):
                        # From a source of the earlier format (a bare value): as its own upgrade would.
                        value = encode_record(KeyRecord(value, kv_records.LEGACY_REVISION,
                                                        kv_records.LEGACY_REVISION, 1))
                    # The keys keep their revisions; the group's revision never falls behind them.
                    record = decode_record(value)
                    pending.take_revision(max(pending.revision, record.mod_revision))
                    pending.put(key, value)
                    pending.follow_lease(key, None, record)
            for key in command.deletes:
                if stable_hash(key) in ranges:
                    pending.put(key, None)
            for client_id, raw in command.sessions:
                incoming = decode_session(raw)
                current = pending.session(client_id)
                if current is None or current.last_sequence < incoming.last_sequence:
                    pending.put_session(client_id, incoming)
            if command.delta and not imported.delta_begun:
                return ok(replace(shard, imports={**shard.imports, move_id: replace(imported, delta_begun=True)}))
            return ok()
        if op is ShardOp.IMPORT_ACTIVATE:
            imported = shard.imports.get(move_id)
            if imported is None:
                return ok() if done else refuse("no import of this move in progress")
            imports = {i: r for i, r in shard.imports.items() if i != move_id}
            owned = (shard.owned or RangeSet()).union(imported.ranges)
            return ok(shard.complete(move_id, owned=owned, imports=imports,
                                     version=max(shard.version, command.epoch)))
        if op is ShardOp.IMPORT_ABORT:
            if done:
                return ok()
            imported = shard.imports.get(move_id)
            if imported is None:
                # Remembered all the same: a late IMPORT_BEGIN of this move
                # (a mover that has not heard of the abort) is then a no-op.
                return ok(shard.complete(move_id))
            # Only what the import brought: never key space this group owns.
            self._delete_keys_in(imported.ranges.difference(shard.owned or RangeSet()), pending)
            return ok(shard.complete(move_id, imports={i: r for i, r in shard.imports.items() if i != move_id}))
        if op is ShardOp.EXPORT_BEGIN:
            if done or move_id in shard.exports:
                return ok()
            if shard.owned is None or not shard.owned.covers(command.ranges):
                return refuse("this group does not own all of the ranges")
            if any(_overlap_sets(e.ranges, command.ranges) for e in shard.exports.values()):
                return refuse("part of the ranges is already moving")
            exports = {**shard.exports, move_id: Export(command.peer, command.ranges)}
            return ok(replace(shard, exports=exports))
        if op is ShardOp.EXPORT_FREEZE:
            export = shard.exports.get(move_id)
            if export is None:
                return ok() if done else refuse("no export of this move in progress")
            if export.frozen:
                return ok()
            return ok(replace(shard, exports={**shard.exports, move_id: replace(export, frozen=True)}))
        if op is ShardOp.EXPORT_FINISH:
            export = shard.exports.get(move_id)
            if export is None:
                return ok() if done else refuse("no export of this move in progress")
            if not export.frozen:
                return refuse("an export finishes only once frozen")
            self._delete_keys_in(export.ranges, pending)
            self._delete_dirty_marks(move_id, pending)
            exports = {i: e for i, e in shard.exports.items() if i != move_id}
            owned = (shard.owned or RangeSet()).difference(export.ranges)
            return ok(shard.complete(move_id, owned=owned, exports=exports,
                                     version=max(shard.version, command.epoch)))
        if op is ShardOp.EXPORT_ABORT:
            if done:
                return ok()
            export = shard.exports.get(move_id)
            if export is None:
                # Remembered, as at the target: a late EXPORT_BEGIN is a no-op.
                return ok(shard.complete(move_id))
            if export.frozen:
                return refuse("a frozen export can only go forward")
            self._delete_dirty_marks(move_id, pending)
            return ok(shard.complete(move_id, exports={i: e for i, e in shard.exports.items() if i != move_id}))
        return refuse(f"unknown shard operation {op!r}")

    def _delete_keys_in(self, ranges: RangeSet, pending: _ApplyBatch) -> None:
        """Delete every key in `ranges`: the position index lists them (no
        scan of the whole store), their kv records go one by one and their
        index records by one range deletion per range."""
        engine = self._engine
        cursor = engine.iterator(engine.position)
        at_last: list[bytes] = []
        for record in position_index.records_in(cursor, ranges):
            pending.forget(position_index.user_key(record))
            if position_index.at_last_position(record):
                at_last.append(record)
        del cursor
        position_index.delete_ranges(pending.batch, engine, ranges, at_last)
        # Keys created earlier in this same batch are not in the database's index yet.
        for key, value in list(pending.overlay_items()):
            if value is not None and stable_hash(key) in ranges:
                pending.put(key, None)

    def _delete_dirty_marks(self, move_id: int, pending: _ApplyBatch) -> None:
        prefix = dirty_prefix(move_id)
        iterator = self._engine.iterator(self._engine.shard)
        iterator.seek(prefix)
        while iterator.valid() and iterator.key().startswith(prefix):
            pending.batch.delete(iterator.key(), self._engine.shard.handle)
            iterator.next()

    # --- The source side of a move: reads for the mover -------------------------------

    def export_scan(self, ranges: RangeSet, after: bytes | None, max_bytes: int) -> tuple[list[tuple[bytes, bytes]],
                                                                                        bytes | None]:
        """The kv records in `ranges` after the cursor `after` (None: from the
        start), about max_bytes of them, in position order; returns (records,
        the cursor to continue after, or None at the end). Each page is one
        cut of the live state, read without holding up reads or applies
        (export_reads.py): the delta of the export corrects whatever changes
        behind the scan. ValueError if `after` is not a cursor of this scan."""
        if after is not None and len(after) < position_index.POSITION_BYTES:
            raise ValueError(f"not a copy cursor: {after!r}")
        with self._scan_lock:
            with self._sm_lock:
                self._check_open()
                engine = self._engine
                index = engine.iterator(engine.position)
                values = engine.kv.view.snapshot()
            page = scan_page(index, values, ranges, after, max_bytes)
            del index, values
            return page.records, page.next_after

    def export_delta(self, move_id: int, after: bytes | None = None, max_bytes: int = 4 << 20) -> DeltaPage:
        """For a frozen export, one page of its delta after the cursor `after`
        (None: from the start), about max_bytes: keys changed since it began,
        with their final value (puts) or their absence (deletes), then the
        client sessions whose last write touched the moved ranges (the target
        merges them: exactly-once across the move). StorageError if the
        export is not here or not frozen, ValueError if `after` is not a
        cursor of this delta."""
        with self._scan_lock:
            with self._sm_lock:
                self._check_open()
                export = self.shard_state.exports.get(move_id)
                if export is None or not export.frozen:
                    raise StorageError(f"move {move_id}: no frozen export here")
                engine = self._engine
                dirty = engine.iterator(engine.shard)
                values = engine.kv.view.snapshot()
                sessions = engine.iterator(engine.sessions)
            page = delta_page(dirty, values, sessions, move_id, export.ranges, after, max_bytes)
            del dirty, values, sessions
            return page

    def _sweep_sessions(self, cursor: bytes, clock_ms: int, pending: _ApplyBatch) -> bytes:
        """Delete expired sessions among the next few after `cursor` (in key
        order, wrapping around); returns the new cursor. Bounded work per
        batch, whatever the number of sessions."""
        engine = self._engine
        iterator = engine.iterator(engine.sessions)
        if cursor:
            iterator.seek(cursor)
            if iterator.valid() and iterator.key() == cursor:
                iterator.next()
        else:
            iterator.seek_to_first()
        expired_before = clock_ms - self._session_ttl_ms
        for _ in range(SESSION_SWEEP_COUNT):
            if not iterator.valid():
                return b""
            key = iterator.key()
            client_id = session_client(key)
            record = pending.session(client_id, stored=iterator.value())
            if record is not None and record.last_active_ms < expired_before:
                pending.delete_session(client_id)
            cursor = key
            iterator.next()
        return cursor

    def sessions(self) -> dict[int, SessionRecord]:
        """Every stored session (diagnostics and tests; includes expired ones
        the sweep has not reached)."""
        with self._sm_lock:
            self._check_open()
            return {session_client(k): decode_session(v) for k, v in self._engine.sessions.view.items()}

    # --- Receiving a snapshot --------------------------------------------------------------

    def begin_snapshot(self, metadata: SnapshotMetadata) -> SnapshotStaging:
        """Start (or resume) staging the state of an incoming snapshot.

        Staging of the same (index, term) already on disk is resumed: its
        position() says where the sender should continue. Any other staging
        is discarded, unless it was handed over to the core and awaits its
        install: then SnapshotBusy (the sender retries later)."""
        with self._staging_lock:
            self._check_open()
            current = self._staging
            wanted = (metadata.index, metadata.term)
            if current is not None and (current.metadata.index, current.metadata.term) == wanted:
                return current
            if self._handed_over is not None:
                raise SnapshotBusy(
                    f"snapshot {self._handed_over} is staged and awaits its install; "
                    f"cannot stage {wanted} now"
                )
            state = StagingState(metadata)
            batch = new_batch()
            self._engine.delete_all(batch, self._engine.staging)
            batch.put(META_STAGING, encode_staging_state(state), self._engine.meta.handle)
            self._engine.write(batch, sync=False)
            self._staging = self._make_staging(state)
            log.info("storage.snapshot_staging", extra={"index": metadata.index, "term": metadata.term})
            return self._staging

    def hand_over_staging(self, metadata: SnapshotMetadata) -> None:
        """Mark the completed staging of `metadata` as given to the core: from
        now until persist() installs it (or release_staging()), no other
        stream may discard it. Call just before stepping the SNAP message."""
        with self._staging_lock:
            self._check_open()
            staging = self._staging
            key = (metadata.index, metadata.term)
            if staging is None or (staging.metadata.index, staging.metadata.term) != key or not staging.complete:
                raise SnapshotNotStaged(f"no completed staging for snapshot {key}")
            self._handed_over = key

    def release_staging(self, metadata: SnapshotMetadata) -> None:
        """The core did not take the snapshot handed over: let later streams
        replace its staging."""
        with self._staging_lock:
            if self._handed_over == (metadata.index, metadata.term):
                self._handed_over = None

    def _make_staging(self, state: StagingState) -> SnapshotStaging:
        return SnapshotStaging(self._engine, state, self._staging_lock, self._is_current_staging)

    def _is_current_staging(self, staging: SnapshotStaging) -> bool:
        return not self._closed and self._staging is staging

    def _install_and_persist(
        self,
        metadata: SnapshotMetadata,
        hard_state: HardState | None,
        entries: list[Entry],
        *,
        write_marker: bool,
    ) -> None:
        """Install a staged snapshot, crash-safely. Caller holds _write_lock,
        _staging_lock and _sm_lock.

        1. a synced marker "installing (metadata)";
        2. kv and sessions replaced by the staged records (unsynced batches);
        3. one synced batch: log reset to the snapshot point, membership,
           applied index, staging and marker dropped — plus the Ready's own
           entries and hard state.
        A crash before 3 leaves the marker, and open() redoes 2 and 3 (the
        staging is still there: only 3 removes it)."""
        if metadata.index < self._snapshot_index:
            raise SnapshotOutOfDate(f"snapshot at {metadata.index} is older than {self._snapshot_index}")
        staging = self._staging
        if (
            staging is None
            or (staging.metadata.index, staging.metadata.term) != (metadata.index, metadata.term)
            or not staging.complete
        ):
            raise SnapshotNotStaged(f"no completed staging for snapshot ({metadata.index}, {metadata.term})")
        if write_marker:
            batch = new_batch()
            batch.put(META_INSTALLING, encode_metadata(metadata), self._engine.meta.handle)
            self._engine.write(batch, sync=True)
        clock_ms = move_staged_into_place(self._engine)
        self._persist_log(hard_state, entries, install=(metadata, clock_ms))
        self._handed_over = None
        log.info("storage.snapshot_installed", extra={"index": metadata.index, "term": metadata.term})


def _decode_entry_data(data: bytes) -> Command | ShardCommand:
    """A client command or a shard command; CommandError if neither."""
    if type(data) is not bytes:
        raise CommandError(f"entry data must be bytes, got {type(data).__name__}")
    try:
        fields = msgpack.unpackb(data, use_list=False, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise CommandError(f"not a msgpack document: {exc}") from None
    if type(fields) is tuple and fields and fields[0] == SHARD_FORMAT:
        return shard_command_from_fields(fields)
    return command_from_fields(fields)


def _conf_change_fence(data: bytes) -> int:
    try:
        return fencing.conf_change_fence(ConfChange.decode(data).context)
    except ValueError:
        return 0


def _overlap_sets(a: RangeSet, b: RangeSet) -> bool:
    return a.difference(b) != a


def _put_record(old: KeyRecord | None, value: bytes, revision: int) -> KeyRecord:
    """A plain put (shardnode's own API): a new version, and no lease (as etcd's put without one)."""
    if old is None:
        return KeyRecord(value, revision, revision, 1)
    return KeyRecord(value, old.create_revision, revision, old.version + 1)


class _ApplyBatch:
    """The WriteBatch of one apply() call, with overlays so that a command
    reads the writes of earlier commands of the same batch (reads go to the
    overlay first, then to the database)."""

    __slots__ = ("batch", "_kv_get", "_kv_handle", "_index_handle", "_sessions_get", "_sessions_handle", "_kv",
                 "_sessions", "revision", "_engine", "_lease_index", "_revoked", "events")

    def __init__(self, engine: Engine, revision: int) -> None:
        self.batch: WriteBatch = new_batch()
        self.events: list[ChangeEvent] = []
        self._engine = engine
        # Lease records written by this batch: (lease, key) -> present; lease -> revoked.
        self._lease_index: dict[tuple[int, bytes], bool] = {}
        self._revoked: set[int] = set()
        # The group's last assigned revision as of this point of the batch.
        self.revision = revision
        kv, sessions = engine.kv, engine.sessions
        self._kv_get = kv.view.get
        self._kv_handle = kv.handle
        self._index_handle = engine.position.handle
        self._sessions_get = sessions.view.get
        self._sessions_handle = sessions.handle
        self._kv: dict[bytes, bytes | None] = {}
        self._sessions: dict[int, SessionRecord | None] = {}

    def get(self, key: bytes) -> bytes | None:
        """The stored record (kv_records.py), raw."""
        if key in self._kv:
            return self._kv[key]
        return self._kv_get(key)

    def record(self, key: bytes) -> KeyRecord | None:
        raw = self.get(key)
        return None if raw is None else decode_record(raw)

    def value(self, key: bytes) -> bytes | None:
        """The user's value."""
        raw = self.get(key)
        return None if raw is None else record_value(raw)

    def next_revision(self, clock_ms: int, old: KeyRecord | None) -> int:
        """Take the revision of a change of one key (kv_records.next_revision)."""
        floor = 0 if old is None else old.mod_revision + 1
        return self.take_revision(next_revision(self.revision, clock_ms, floor))

    def take_revision(self, revision: int) -> int:
        self.revision = revision
        return revision

    def changed(self, key: bytes, new: KeyRecord | None, old: KeyRecord | None) -> None:
        """A user's change of `key` (new None: deleted), at the current revision."""
        self.events.append(ChangeEvent(self.revision, key, new, old))

    def follow_lease(self, key: bytes, old: KeyRecord | None, new: KeyRecord | None) -> None:
        """Keep the lease index (kv_records.py) in step with a change of `key`."""
        old_lease = 0 if old is None else old.lease
        new_lease = 0 if new is None else new.lease
        if old_lease == new_lease:
            return
        shard = self._engine.shard.handle
        if old_lease:
            self._lease_index[(old_lease, key)] = False
            self.batch.delete(kv_records.lease_index_key(old_lease, key), shard)
        if new_lease:
            self._lease_index[(new_lease, key)] = True
            self.batch.put(kv_records.lease_index_key(new_lease, key), b"", shard)

    def lease_keys(self, lease: int) -> list[bytes]:
        """The keys the index lists for `lease` as of this point of the batch, in key order."""
        prefix = kv_records.lease_index_prefix(lease)
        cursor = self._engine.iterator(self._engine.shard)
        cursor.seek(prefix)
        keys = set()
        while cursor.valid() and cursor.key().startswith(prefix):
            keys.add(cursor.key()[len(prefix):])
            cursor.next()
        for (entry_lease, key), present in self._lease_index.items():
            if entry_lease == lease:
                if present:
                    keys.add(key)
                else:
                    keys.discard(key)
        return sorted(keys)

    def lease_revoked(self, lease: int) -> bool:
        return lease in self._revoked or self._engine.shard.view.get(kv_records.revoked_key(lease)) is not None

    def revoke_lease(self, lease: int, clock_ms: int) -> None:
        """Refuse `lease` in this group's puts from now on, and drop its index entries."""
        self._revoked.add(lease)
        shard = self._engine.shard.handle
        self.batch.put(kv_records.revoked_key(lease), clock_ms.to_bytes(8, "big"), shard)
        for key in self.lease_keys(lease):
            self._lease_index[(lease, key)] = False
            self.batch.delete(kv_records.lease_index_key(lease, key), shard)

    def put_record(self, key: bytes, record: KeyRecord, *, existed: bool | None = None,
                   position: int | None = None) -> None:
        self.put(key, encode_record(record), existed=existed, position=position)

    def overlay_items(self):  # type: ignore[no-untyped-def]
        """The kv writes of this batch so far (key, value or None)."""
        return self._kv.items()

    def put(self, key: bytes, value: bytes | None, *, existed: bool | None = None,
            position: int | None = None) -> None:
        """value None deletes. The position index follows in the same batch:
        a key created gets its index record, a key deleted loses it.
        `existed` (whether the key holds a value now, if the caller knows)
        spares the index write when nothing changes there (an overwrite: the
        common write costs no more than before); `position`, the key's
        position when the caller has it."""
        self._kv[key] = value
        if value is None:
            self.batch.delete(key, self._kv_handle)
            if existed is not False:
                self.batch.delete(position_index.index_key(key, position), self._index_handle)
        else:
            self.batch.put(key, value, self._kv_handle)
            if not existed:
                self.batch.put(position_index.index_key(key, position), b"", self._index_handle)

    def forget(self, key: bytes) -> None:
        """Delete the kv record of `key` only: the caller deletes its index
        record itself (by range)."""
        self._kv[key] = None
        self.batch.delete(key, self._kv_handle)

    def session(self, client_id: int, stored: bytes | None = None) -> SessionRecord | None:
        """The session as of this point of the batch. `stored` is its value in
        the database when the caller already has it."""
        if client_id in self._sessions:
            return self._sessions[client_id]
        if stored is None:
            stored = self._sessions_get(session_key(client_id))
            if stored is None:
                return None
        return decode_session(stored)

    def put_session(self, client_id: int, record: SessionRecord) -> None:
        self._sessions[client_id] = record
        self.batch.put(session_key(client_id), encode_session(record), self._sessions_handle)

    def delete_session(self, client_id: int) -> None:
        self._sessions[client_id] = None
        self.batch.delete(session_key(client_id), self._sessions_handle)
