"""State transfer to a follower that is behind the compacted log.

The Raft core only ever sees a small descriptor (`Snapshot(metadata, b"")`);
the state itself (the kv and sessions families plus the state machine clock)
is streamed by the transport in bounded chunks:

sending side
    ReplicaStore.snapshot() captures a consistent view of the state at the
    applied index and registers it under (index, term);
    ReplicaStore.open_snapshot_reader(index, term).chunks() produces the
    chunks, each with a `position` from which a broken stream can resume.

receiving side
    ReplicaStore.begin_snapshot(metadata) → SnapshotStaging; write() each
    chunk's data, finish() once the last one is in; then the core's Ready
    carries the snapshot and persist() installs the staged state.

Chunk data (msgpack): ``(version, index, term, last, records)`` where
``records`` is a list of ``(tag, key, value)`` in stream order: every kv
record (TAG_KV) in key order, then every session (TAG_SESSIONS), then the
state records (TAG_STATE), then the shard family (TAG_SHARD: ownership and
the dirty keys of exports in progress, see ownership.py). A record's position is ``bytes([tag]) + key``,
so positions grow strictly along the stream and "resume after position p"
is a seek.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import msgpack

from shardnode.raft import SnapshotMetadata

from .engine import (
    META_STAGING,
    DIRTY_PREFIX,
    SHARD_STATE,
    STATE_CLOCK,
    TAG_KV,
    TAG_SESSIONS,
    TAG_SHARD,
    TAG_STATE,
    U64_MAX,
    Column,
    CorruptionError,
    Cursor,
    Engine,
    SnapshotDataError,
    StorageClosed,
    StorageError,
    conf_state_fields,
    conf_state_from_fields,
    decode_clock,
    decode_session,
    encode_clock,
    new_batch,
)
from .kv_records import LEASE_INDEX_PREFIX, REVOKED_PREFIX, SHARD_REVISION, is_record
from .position_index import index_key

CHUNK_FORMAT_VERSION = 1
DEFAULT_CHUNK_BYTES = 1 << 20
# Per-record overhead counted toward a chunk's size (msgpack framing, tag).
_RECORD_OVERHEAD = 8
# Size of the write batches that move staged records into place on install.
_INSTALL_BATCH_BYTES = 4 << 20
_TAGS = (TAG_KV, TAG_SESSIONS, TAG_STATE, TAG_SHARD)

Record = tuple[int, bytes, bytes]


@dataclass(slots=True, frozen=True)
class SnapshotChunk:
    """One piece of a snapshot stream. `position` is opaque to the transport:
    hand it back as `resume_after` to continue after this chunk."""

    data: bytes
    position: bytes
    last: bool


def record_position(tag: int, key: bytes) -> bytes:
    return bytes((tag,)) + key


def _split_position(position: bytes) -> tuple[int, bytes]:
    if type(position) is not bytes or not position or position[0] not in _TAGS:
        raise ValueError(f"not a snapshot stream position: {position!r}")
    return position[0], position[1:]


def encode_chunk(metadata: SnapshotMetadata, records: list[Record], last: bool) -> bytes:
    return msgpack.packb(
        (CHUNK_FORMAT_VERSION, metadata.index, metadata.term, last, records),
        use_bin_type=True,
    )


def chunk_mismatch(metadata: SnapshotMetadata, data: object) -> str | None:
    """Why `data` is not a chunk of the snapshot `metadata` describes (its
    format version, index and term), or None. Reads only the chunk's header:
    cheap enough for the transport to check every chunk before storage does."""
    if type(data) is not bytes:
        return "a chunk is bytes"
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(data) + 1)
    unpacker.feed(data)
    try:
        if unpacker.read_array_header() != 5:
            return "a chunk is (version, index, term, last, records)"
        version, index, term = unpacker.unpack(), unpacker.unpack(), unpacker.unpack()
    except Exception:          # msgpack's errors are ValueError subclasses and OutOfData; be total
        return "a chunk is not msgpack"
    if type(version) is not int or version != CHUNK_FORMAT_VERSION:
        return f"chunk format version {version!r} (this node reads {CHUNK_FORMAT_VERSION})"
    if (index, term) != (metadata.index, metadata.term):
        return f"chunk of snapshot ({index!r}, {term!r}) in a stream of snapshot ({metadata.index}, {metadata.term})"
    return None


@dataclass(slots=True, frozen=True)
class _DecodedChunk:
    index: int
    term: int
    last: bool
    records: tuple[Record, ...]


def _validate_record(record: object) -> Record:
    if type(record) is not tuple or len(record) != 3:
        raise SnapshotDataError("record: expected (tag, key, value)")
    tag, key, value = record
    if type(tag) is not int or tag not in _TAGS:
        raise SnapshotDataError(f"record: unknown tag {tag!r}")
    if type(key) is not bytes or type(value) is not bytes:
        raise SnapshotDataError("record: key and value must be bytes")
    try:
        if tag == TAG_KV:
            if not key:
                raise ValueError("empty key")
            if not is_record(value):
                raise ValueError("kv value is not a record (a value with its etcd metadata, kv_records.py)")
        elif tag == TAG_SESSIONS:
            if len(key) != 8:
                raise ValueError("session key must be an 8-byte client id")
            decode_session(value)
        elif tag == TAG_STATE:
            if key != STATE_CLOCK:
                raise ValueError(f"unknown state record {key!r}")
            decode_clock(value)
        else:
            if key == SHARD_STATE:
                from .ownership import ShardState     # ownership imports engine; avoid a cycle at import
                try:
                    ShardState.decode(value)
                except StorageError as exc:
                    raise ValueError(str(exc)) from None
            elif key == SHARD_REVISION:
                if len(value) != 8:
                    raise ValueError("the group's revision must be 8 bytes")
            elif key.startswith(LEASE_INDEX_PREFIX) and len(key) > 9 and value == b"":
                pass
            elif key.startswith(REVOKED_PREFIX) and len(key) == 9 and len(value) == 8:
                pass
            elif not (key.startswith(DIRTY_PREFIX) and len(key) > 9 and value == b""):
                raise ValueError(f"unknown shard record {key[:16]!r}")
    except ValueError as exc:
        raise SnapshotDataError(f"record: {exc}") from None
    return tag, key, value


def decode_chunk(data: bytes) -> _DecodedChunk:
    """Validate untrusted chunk data completely; SnapshotDataError if bad."""
    if type(data) is not bytes:
        raise SnapshotDataError("chunk data must be bytes")
    try:
        fields = msgpack.unpackb(data, use_list=False, raw=False)
    except Exception as exc:
        raise SnapshotDataError(f"chunk: not a msgpack document ({exc})") from None
    if type(fields) is not tuple or len(fields) != 5:
        raise SnapshotDataError("chunk: expected (version, index, term, last, records)")
    version, index, term, last, records = fields
    if type(version) is not int or version != CHUNK_FORMAT_VERSION:
        raise SnapshotDataError(f"chunk: unsupported version {version!r}")
    if type(index) is not int or type(term) is not int or type(last) is not bool:
        raise SnapshotDataError("chunk: bad header")
    if type(records) is not tuple:
        raise SnapshotDataError("chunk: records must be an array")
    return _DecodedChunk(index, term, last, tuple(_validate_record(r) for r in records))


# --- Sending side ------------------------------------------------------------------------


class CapturedSnapshot:
    """The state at one applied index, held for streaming.

    Why iterators rather than a rocksdict `Snapshot`: in rocksdict 0.3.29
    `Snapshot.iter()/items()` ignore the snapshot (only `snapshot[key]`
    honours it), so they would stream the live, moving state. A RocksDB
    iterator reads from an implicit snapshot taken when it is created, for
    its whole life, including after seek(); the store creates both iterators
    under its state-machine lock with no write in between, so together they
    are one consistent cut at `metadata.index`. They pin that version of the
    data (and its memtables) until released, which is why at most two
    captures are registered at a time.

    Several readers may stream one capture concurrently (two followers): each
    chunk re-seeks under `_lock`, so the shared iterators never interleave.
    """

    def __init__(
        self,
        metadata: SnapshotMetadata,
        kv: Cursor,
        sessions: Cursor,
        clock_ms: int,
        shard: Cursor,
    ) -> None:
        self.metadata = metadata
        # In stream (tag) order: iterators, and the state records as a list.
        self._sources: list[tuple[int, Cursor | list[tuple[bytes, bytes]]]] | None = [
            (TAG_KV, kv), (TAG_SESSIONS, sessions), (TAG_STATE, [(STATE_CLOCK, encode_clock(clock_ms))]),
            (TAG_SHARD, shard),
        ]
        self._lock = threading.Lock()
        self._readers = 0
        self._registered = True

    # Lifetime: alive while registered or read; released at the end of both.

    def acquire_reader(self) -> None:
        with self._lock:
            if self._sources is None:
                raise KeyError((self.metadata.index, self.metadata.term))
            self._readers += 1

    def release_reader(self) -> None:
        with self._lock:
            self._readers -= 1
            self._maybe_release()

    def unregister(self) -> None:
        with self._lock:
            self._registered = False
            self._maybe_release()

    def release(self) -> None:
        """Drop the iterators now (store closing): readers will fail."""
        with self._lock:
            self._sources = None

    def _maybe_release(self) -> None:
        if not self._registered and self._readers <= 0:
            self._sources = None

    def read_after(self, position: bytes | None, max_bytes: int) -> tuple[list[Record], bytes | None, bool]:
        """Records after `position`, up to about max_bytes (at least one if
        any remain). Returns (records, position of the last one, done)."""
        after_tag, after_key = (-1, b"") if position is None else _split_position(position)
        records: list[Record] = []
        size = 0
        last_position = position
        with self._lock:
            if self._sources is None:
                raise StorageClosed("snapshot capture was released (store closed)")
            for tag, source in self._sources:
                if tag < after_tag:
                    continue
                if isinstance(source, list):
                    for key, value in source:
                        if tag == after_tag and key <= after_key:
                            continue
                        record_size = len(key) + len(value) + _RECORD_OVERHEAD
                        if records and size + record_size > max_bytes:
                            return records, last_position, False
                        records.append((tag, key, value))
                        size += record_size
                        last_position = record_position(tag, key)
                    continue
                iterator = source
                if tag == after_tag:
                    iterator.seek(after_key)
                    if iterator.valid() and iterator.key() == after_key:
                        iterator.next()
                else:
                    iterator.seek_to_first()
                while iterator.valid():
                    key = iterator.key()
                    value = iterator.value()
                    record_size = len(key) + len(value) + _RECORD_OVERHEAD
                    if records and size + record_size > max_bytes:
                        return records, last_position, False
                    records.append((tag, key, value))
                    size += record_size
                    last_position = record_position(tag, key)
                    iterator.next()
        return records, last_position, True


class SnapshotReader:
    """Streams one registered capture. Close it (or use it as a context
    manager) when done: the capture is released after its last reader."""

    def __init__(self, capture: CapturedSnapshot) -> None:
        capture.acquire_reader()
        self._capture: CapturedSnapshot | None = capture
        self.metadata: SnapshotMetadata = capture.metadata

    def chunks(
        self, max_bytes: int = DEFAULT_CHUNK_BYTES, resume_after: bytes | None = None
    ) -> Iterator[SnapshotChunk]:
        """Chunks of about max_bytes (a single record larger than that gets a
        chunk of its own), in stream order, starting after `resume_after`.
        The final chunk has last=True; there is always at least one chunk."""
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if resume_after is not None:
            _split_position(resume_after)
        position = resume_after
        while True:
            capture = self._capture
            if capture is None:
                raise StorageError("snapshot reader is closed")
            records, position, done = capture.read_after(position, max_bytes)
            yield SnapshotChunk(
                data=encode_chunk(self.metadata, records, done),
                position=position if position is not None else b"",
                last=done,
            )
            if done:
                return

    def close(self) -> None:
        capture, self._capture = self._capture, None
        if capture is not None:
            capture.release_reader()

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- Receiving side ----------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class StagingState:
    """What is staged, stored in meta under META_STAGING.

    Invariant: the staging family holds exactly the records of the stream for
    `metadata` up to and including `position`; both are written in the same
    WriteBatch, so no crash can separate them.
    """

    metadata: SnapshotMetadata
    position: bytes | None = None
    saw_last: bool = False
    complete: bool = False


def encode_staging_state(state: StagingState) -> bytes:
    md = state.metadata
    return msgpack.packb(
        (md.index, md.term, conf_state_fields(md.conf_state), state.position, state.saw_last, state.complete),
        use_bin_type=True,
    )


def decode_staging_state(data: bytes) -> StagingState:
    try:
        fields = msgpack.unpackb(data, use_list=False, raw=False)
        index, term, conf, position, saw_last, complete = fields
        if type(index) is not int or type(term) is not int:
            raise ValueError("bad index/term")
        if position is not None:
            _split_position(position)
        if type(saw_last) is not bool or type(complete) is not bool:
            raise ValueError("bad flags")
        return StagingState(SnapshotMetadata(index, term, conf_state_from_fields(conf)), position, saw_last, complete)
    except Exception as exc:
        raise CorruptionError(f"staging state: {exc}") from None


class SnapshotStaging:
    """An incoming snapshot being written to disk, chunk by chunk.

    Why a staging column family rather than SstFileWriter files: each chunk's
    records and the new resume position go into ONE WriteBatch, so after any
    crash `position()` names exactly what is on disk and the sender resumes
    from there; an SST file cannot be appended to after a crash, and keeping
    file contents, directory entries and the position in step would need
    fsyncs of files and directories in a careful order. The price is one
    extra copy of the state at install time (staging → kv/sessions), small
    next to moving it over the network.

    Chunk writes are not synced (throughput); a crash may lose the last few,
    together with their position. After a restart, resume from position(),
    not from what was acknowledged before the crash. finish() is synced.

    Methods are called by one transport task at a time; the store's lock
    serializes them against begin_snapshot() and the install.
    """

    def __init__(
        self,
        engine: Engine,
        state: StagingState,
        lock: threading.RLock,
        is_current: Callable[[SnapshotStaging], bool],
    ) -> None:
        self._engine = engine
        self._state = state
        self._lock = lock
        self._is_current = is_current

    @property
    def metadata(self) -> SnapshotMetadata:
        return self._state.metadata

    @property
    def complete(self) -> bool:
        return self._state.complete

    def position(self) -> bytes | None:
        """The position of the last staged record (None: nothing staged yet)."""
        return self._state.position

    def write(self, chunk_data: bytes) -> None:
        """Stage one chunk. Records at or before position() are skipped (a
        chunk delivered again after a resume); everything is validated
        before anything is written, so bad data changes nothing."""
        chunk = decode_chunk(chunk_data)
        with self._lock:
            self._check_current()
            state = self._state
            md = state.metadata
            if (chunk.index, chunk.term) != (md.index, md.term):
                raise SnapshotDataError(
                    f"chunk of snapshot ({chunk.index}, {chunk.term}) given to staging of ({md.index}, {md.term})"
                )
            previous = state.position
            fresh: list[tuple[bytes, bytes]] = []
            for tag, key, value in chunk.records:
                position = record_position(tag, key)
                if previous is not None and position <= previous:
                    if fresh:
                        raise SnapshotDataError("chunk records are not in stream order")
                    continue  # already staged
                fresh.append((position, value))
                previous = position
            if state.saw_last and fresh:
                raise SnapshotDataError("records after the last chunk")
            if state.complete:
                return  # finished already; a late duplicate is harmless
            new_state = replace(state, position=previous, saw_last=state.saw_last or chunk.last)
            if new_state == state:
                return
            batch = new_batch()
            staging = self._engine.staging
            for position, value in fresh:
                batch.put(position, value, staging.handle)
            batch.put(META_STAGING, encode_staging_state(new_state), self._engine.meta.handle)
            self._engine.write(batch, sync=False)
            self._state = new_state

    def finish(self) -> None:
        """Every chunk is in: mark the staging complete, durably. Raises
        SnapshotDataError if the last chunk was never written."""
        with self._lock:
            self._check_current()
            if self._state.complete:
                return
            if not self._state.saw_last:
                raise SnapshotDataError("finish() before the last chunk was staged")
            new_state = replace(self._state, complete=True)
            batch = new_batch()
            batch.put(META_STAGING, encode_staging_state(new_state), self._engine.meta.handle)
            self._engine.write(batch, sync=True)
            self._state = new_state

    def _check_current(self) -> None:
        if not self._is_current(self):
            raise StorageError("this staging was superseded, installed or closed")


def move_staged_into_place(engine: Engine) -> int:
    """Install step: replace kv, sessions and the shard family with the staged records, and
    the position index with theirs (position_index.py); return
    the staged clock. Several unsynced batches (the state may be large): the
    caller holds a synced "installing" marker, so a crash in here is redone
    from the start on reopen, and the staging is only dropped by the final
    synced batch. Idempotent."""
    kv, sessions, shard, index = engine.kv, engine.sessions, engine.shard, engine.position
    batch = new_batch()
    engine.delete_all(batch, kv)
    engine.delete_all(batch, sessions)
    engine.delete_all(batch, shard)
    engine.delete_all(batch, index)
    engine.write(batch, sync=False)
    targets: dict[int, Column] = {TAG_KV: kv, TAG_SESSIONS: sessions, TAG_SHARD: shard}
    clock_ms = 0
    batch = new_batch()
    size = 0
    iterator = engine.iterator(engine.staging)
    iterator.seek_to_first()
    while iterator.valid():
        position = iterator.key()
        value = iterator.value()
        tag, key = position[0], position[1:]
        if tag == TAG_STATE:
            if key == STATE_CLOCK:
                clock_ms = decode_clock(value)
        else:
            batch.put(key, value, targets[tag].handle)
            if tag == TAG_KV:
                batch.put(index_key(key), b"", index.handle)
            size += len(key) + len(value)
            if size >= _INSTALL_BATCH_BYTES:
                engine.write(batch, sync=False)
                batch = new_batch()
                size = 0
        iterator.next()
    del iterator
    if len(batch):
        engine.write(batch, sync=False)
    if not 0 <= clock_ms <= U64_MAX:
        raise CorruptionError("staged clock out of range")
    return clock_ms
