"""Snapshot transfer: capture and chunked export on the leader, staging and
crash-safe install on the follower."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest

from shardnode.raft import ConfState, Entry, HardState, Snapshot, SnapshotMetadata, SnapshotTemporarilyUnavailable
from shardnode.storage import (
    ApplyResult,
    Command,
    CommandOp,
    ReplicaStore,
    SnapshotBusy,
    SnapshotDataError,
    SnapshotNotStaged,
    SnapshotStaging,
    StorageError,
    encode_command,
)
from shardnode.storage.engine import encode_metadata
from shardnode.storage.snapshot import move_staged_into_place

VOTERS = (1, 2, 3)
OpenStore = Callable[..., ReplicaStore]


@pytest.fixture
def open_store(tmp_path: Path) -> Iterator[OpenStore]:
    opened: list[ReplicaStore] = []

    def _open(name: str, **options: object) -> ReplicaStore:
        options.setdefault("initial_voters", VOTERS)
        store = ReplicaStore.open(tmp_path / name, **options)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield _open
    for store in opened:
        store.close()


def _put(index: int, key: bytes, value: bytes, client_id: int = 0, sequence: int = 0, ts: int = 5_000) -> Entry:
    return Entry(1, index, encode_command(Command(CommandOp.PUT, key, value, client_id, sequence, ts)))


def _fill(store: ReplicaStore, keys: int = 300, clients: int = 20) -> list[Entry]:
    """keys puts (some overwriting), sessions for `clients` clients, then a
    compaction so that a follower could only catch up by snapshot."""
    entries = [_put(i, b"key-%05d" % (i % keys), b"value-%d" % i * 3) for i in range(1, keys + 41)]
    base = len(entries)
    for c in range(1, clients + 1):
        entries.append(_put(base + c, b"s%d" % c, b"v", client_id=1000 + c, sequence=1, ts=6_000 + c))
    store.persist(HardState(1, 1, len(entries)), entries)
    store.apply(entries, conf_state=ConfState(voters=VOTERS, learners=(4,)))
    assert store.compact(10) == len(entries)
    return entries


def _transfer(source: ReplicaStore, target: ReplicaStore, max_bytes: int = 512) -> Snapshot:
    snapshot = source.snapshot()
    reader = source.open_snapshot_reader(snapshot.metadata.index, snapshot.metadata.term)
    staging = target.begin_snapshot(snapshot.metadata)
    with reader:
        for chunk in reader.chunks(max_bytes=max_bytes):
            staging.write(chunk.data)
            assert staging.position() == chunk.position
    staging.finish()
    return snapshot


def _state(store: ReplicaStore) -> tuple[dict[bytes, bytes], dict, int, int, int, ConfState, int]:
    """Everything a snapshot must carry over, including the state machine clock."""
    kv = dict(store._engine.kv.view.items())
    clock = store._apply_state.clock_ms
    return kv, store.sessions(), store.applied_index, store.first_index(), store.last_index(), store.conf_state, clock


def test_a_snapshot_moves_kv_sessions_applied_index_and_log_start(open_store: OpenStore) -> None:
    source, target = open_store("source"), open_store("target")
    _fill(source)
    target.persist(HardState(1, 0, 0), [Entry(1, 1), Entry(1, 2)])  # a stale log to be replaced
    snapshot = _transfer(source, target, max_bytes=512)
    target.persist(HardState(2, 0, snapshot.metadata.index), [], snapshot)
    assert _state(target) == _state(source)
    assert target.term(snapshot.metadata.index) == snapshot.metadata.term
    assert target.initial_state() == (HardState(2, 0, snapshot.metadata.index), ConfState(voters=VOTERS, learners=(4,)))
    # the session table (and the clock) came along: a retry is still a duplicate
    retry = _put(snapshot.metadata.index + 1, b"s1", b"v", client_id=1001, sequence=1, ts=6_001)
    target.persist(None, [retry])
    assert target.apply([retry]) == [ApplyResult(retry.index, 1001, 1, False, None, duplicate=True)]
    # and it all survives a restart
    expected = _state(target)
    target.close()
    assert _state(open_store("target")) == expected


def test_chunks_are_bounded_and_there_are_many(open_store: OpenStore) -> None:
    source = open_store("source")
    _fill(source)
    snapshot = source.snapshot()
    with source.open_snapshot_reader(snapshot.metadata.index, snapshot.metadata.term) as reader:
        chunks = list(reader.chunks(max_bytes=256))
    assert len(chunks) > 50
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    positions = [c.position for c in chunks]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert all(len(c.data) < 256 + 64 for c in chunks)


def test_a_broken_stream_resumes_after_the_last_acknowledged_chunk(open_store: OpenStore) -> None:
    source, target = open_store("source"), open_store("target")
    _fill(source)
    snapshot = source.snapshot()
    index, term = snapshot.metadata.index, snapshot.metadata.term
    staging = target.begin_snapshot(snapshot.metadata)
    with source.open_snapshot_reader(index, term) as reader:
        for count, chunk in enumerate(reader.chunks(max_bytes=300)):
            staging.write(chunk.data)
            if count == 20:
                break  # the connection drops
    # the receiver restarts; it resumes the same staging from its own position
    target.close()
    target = open_store("target")
    staging = target.begin_snapshot(snapshot.metadata)
    position = staging.position()
    assert position is not None
    with source.open_snapshot_reader(index, term) as reader:
        for chunk in reader.chunks(max_bytes=300, resume_after=position):
            staging.write(chunk.data)
    staging.finish()
    target.persist(None, [], snapshot)
    assert _state(target) == _state(source)


def test_a_chunk_delivered_twice_is_staged_once(open_store: OpenStore) -> None:
    source, target = open_store("source"), open_store("target")
    _fill(source, keys=50, clients=3)
    snapshot = source.snapshot()
    staging = target.begin_snapshot(snapshot.metadata)
    with source.open_snapshot_reader(snapshot.metadata.index, snapshot.metadata.term) as reader:
        for chunk in reader.chunks(max_bytes=200):
            staging.write(chunk.data)
            staging.write(chunk.data)
    staging.finish()
    target.persist(None, [], snapshot)
    assert _state(target) == _state(source)


def test_the_capture_is_the_state_at_capture_time(open_store: OpenStore) -> None:
    source, target = open_store("source"), open_store("target")
    entries = _fill(source, keys=40, clients=2)
    snapshot = source.snapshot()
    expected = dict(source._engine.kv.view.items())
    later = [_put(len(entries) + 1, b"key-00001", b"changed"), _put(len(entries) + 2, b"new", b"x")]
    source.persist(None, later)
    source.apply(later)
    _transfer_registered(source, target, snapshot)
    target.persist(None, [], snapshot)
    assert dict(target._engine.kv.view.items()) == expected


def _transfer_registered(source: ReplicaStore, target: ReplicaStore, snapshot: Snapshot) -> None:
    staging = target.begin_snapshot(snapshot.metadata)
    with source.open_snapshot_reader(snapshot.metadata.index, snapshot.metadata.term) as reader:
        for chunk in reader.chunks(max_bytes=1000):
            staging.write(chunk.data)
    staging.finish()


def test_at_most_two_captures_are_registered(open_store: OpenStore) -> None:
    source = open_store("source")
    entries = _fill(source, keys=10, clients=1)
    snapshots = []
    for offset in range(1, 4):
        entry = _put(len(entries) + offset, b"k", b"v%d" % offset)
        source.persist(None, [entry])
        source.apply([entry])
        snapshots.append(source.snapshot().metadata)
    assert source.snapshot().metadata == snapshots[-1]  # same applied index: same capture
    with pytest.raises(KeyError):
        source.open_snapshot_reader(snapshots[0].index, snapshots[0].term)
    for metadata in snapshots[1:]:
        source.open_snapshot_reader(metadata.index, metadata.term).close()


def test_a_reader_outlives_the_registration_of_its_capture(open_store: OpenStore) -> None:
    source = open_store("source")
    entries = _fill(source, keys=10, clients=1)
    first = source.snapshot().metadata
    reader = source.open_snapshot_reader(first.index, first.term)
    for offset in range(1, 3):
        entry = _put(len(entries) + offset, b"k", b"v")
        source.persist(None, [entry])
        source.apply([entry])
        source.snapshot()
    with pytest.raises(KeyError):
        source.open_snapshot_reader(first.index, first.term)
    assert list(reader.chunks())[-1].last
    reader.close()


def test_persist_refuses_a_snapshot_that_is_not_completely_staged(open_store: OpenStore) -> None:
    source, target = open_store("source"), open_store("target")
    _fill(source, keys=20, clients=1)
    snapshot = source.snapshot()
    with pytest.raises(SnapshotNotStaged):
        target.persist(None, [], snapshot)  # nothing staged
    staging = target.begin_snapshot(snapshot.metadata)
    with source.open_snapshot_reader(snapshot.metadata.index, snapshot.metadata.term) as reader:
        chunks = list(reader.chunks(max_bytes=100))
    for chunk in chunks[:-1]:
        staging.write(chunk.data)
    with pytest.raises(SnapshotDataError):
        staging.finish()  # the last chunk is missing
    with pytest.raises(SnapshotNotStaged):
        target.persist(None, [], snapshot)  # staged but not finished
    staging.write(chunks[-1].data)
    staging.finish()
    other_term = SnapshotMetadata(snapshot.metadata.index, snapshot.metadata.term + 1, snapshot.metadata.conf_state)
    with pytest.raises(SnapshotNotStaged):
        target.persist(None, [], Snapshot(other_term))
    assert target.applied_index == 0 and target.get(b"key-00001") is None
    target.persist(None, [], snapshot)
    assert target.applied_index == snapshot.metadata.index


def test_a_crash_during_install_is_completed_on_reopen(open_store: OpenStore) -> None:
    source, target = open_store("source"), open_store("target")
    _fill(source)
    snapshot = _transfer(source, target)
    # What persist() does before its final batch, then a crash: the synced
    # marker, the staged state moved into kv (and a write that only a torn
    # move could leave), but no final batch.
    target._engine.meta.view.put(b"installing", encode_metadata(snapshot.metadata))
    move_staged_into_place(target._engine)
    target._engine.kv.view.put(b"zz-torn", b"x")
    target.close()
    target = open_store("target")
    assert _state(target) == _state(source)
    assert target._engine.meta.view.get(b"installing") is None
    assert list(target._engine.staging.view.keys()) == []


def test_a_crash_right_after_the_marker_is_completed_on_reopen(open_store: OpenStore) -> None:
    source, target = open_store("source"), open_store("target")
    _fill(source, keys=30, clients=2)
    snapshot = _transfer(source, target)
    target._engine.meta.view.put(b"installing", encode_metadata(snapshot.metadata))
    target.close()
    assert _state(open_store("target")) == _state(source)


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\xc1\xc1",
        msgpack.packb([1, 2, 3]),
        msgpack.packb((9, 1, 1, False, [])),                                   # unknown version
        msgpack.packb((1, 1, 1, "no", [])),                                    # bad flag
        msgpack.packb((1, 1, 1, False, [(7, b"k", b"v")]), use_bin_type=True),  # unknown tag
        msgpack.packb((1, 1, 1, False, [(0, "k", b"v")]), use_bin_type=True),   # str key
        msgpack.packb((1, 1, 1, False, [(0, b"", b"v")]), use_bin_type=True),   # empty key
        msgpack.packb((1, 1, 1, False, [(1, b"short", b"v")]), use_bin_type=True),  # bad client id
        msgpack.packb((1, 1, 1, False, [(1, b"\0" * 8, b"not a session")]), use_bin_type=True),
        msgpack.packb((1, 1, 1, False, [(2, b"clock", b"\x01")]), use_bin_type=True),
        msgpack.packb((1, 1, 1, False, [(2, b"other", b"\0" * 8)]), use_bin_type=True),
    ],
)
def test_garbage_chunk_data_is_rejected_without_changing_anything(open_store: OpenStore, garbage: bytes) -> None:
    _, staging, before = _half_staged(open_store)
    with pytest.raises(ValueError):
        staging.write(garbage)
    assert (staging.position(), _staged(staging)) == before


def test_out_of_order_records_and_foreign_chunks_are_rejected(open_store: OpenStore) -> None:
    _, staging, before = _half_staged(open_store)
    md = staging.metadata
    backwards = msgpack.packb(
        (1, md.index, md.term, False, [(0, b"zzz2", b"v"), (0, b"zzz1", b"v")]), use_bin_type=True
    )
    foreign = msgpack.packb((1, md.index + 1, md.term, False, [(0, b"zzz", b"v")]), use_bin_type=True)
    for data in (backwards, foreign):
        with pytest.raises(SnapshotDataError):
            staging.write(data)
    assert (staging.position(), _staged(staging)) == before


def _half_staged(open_store: OpenStore) -> tuple[ReplicaStore, SnapshotStaging, tuple[bytes | None, list]]:
    """A target store with the first chunks of a snapshot staged, and what
    is staged (position, records)."""
    source, target = open_store("source"), open_store("target")
    _fill(source, keys=30, clients=2)
    snapshot = source.snapshot()
    staging = target.begin_snapshot(snapshot.metadata)
    with source.open_snapshot_reader(snapshot.metadata.index, snapshot.metadata.term) as reader:
        for count, chunk in enumerate(reader.chunks(max_bytes=200)):
            if count == 3:
                break
            staging.write(chunk.data)
    return target, staging, (staging.position(), _staged(staging))


def _staged(staging: SnapshotStaging) -> list:
    return list(staging._engine.staging.view.items())


def test_a_new_staging_discards_an_older_one(open_store: OpenStore) -> None:
    target, staging, _ = _half_staged(open_store)
    md = staging.metadata
    assert target.begin_snapshot(md) is staging  # the same snapshot: resumed
    newer = target.begin_snapshot(SnapshotMetadata(md.index + 5, md.term, md.conf_state))
    assert newer.position() is None and _staged(newer) == []
    with pytest.raises(StorageError):
        staging.write(msgpack.packb((1, md.index, md.term, True, []), use_bin_type=True))


def test_a_ready_with_a_snapshot_and_entries_installs_first_then_appends(open_store: OpenStore) -> None:
    source, target = open_store("source"), open_store("target")
    _fill(source, keys=30, clients=1)
    snapshot = _transfer(source, target)
    index = snapshot.metadata.index
    entries = [Entry(1, index), Entry(2, index + 1, b"a"), Entry(2, index + 2, b"b")]  # the first is compacted
    target.persist(HardState(2, 1, index + 1), entries, snapshot)
    assert (target.first_index(), target.last_index(), target.applied_index) == (index + 1, index + 2, index)
    assert target.entries(index + 1, index + 3) == entries[1:]
    assert target.initial_state()[0] == HardState(2, 1, index + 1)


def test_a_store_with_nothing_applied_has_no_snapshot_yet(open_store: OpenStore) -> None:
    with pytest.raises(SnapshotTemporarilyUnavailable):
        open_store("empty").snapshot()


def test_a_staging_handed_to_the_core_survives_a_second_stream_until_installed(open_store: OpenStore) -> None:
    """The race of a second stream (a stale or a new leader's) that starts
    after the first snapshot was staged and stepped into the core, but before
    the persist thread installs it: the install must still find its staging."""
    source, target = open_store("source"), open_store("target")
    _fill(source, keys=30, clients=1)
    snapshot = _transfer(source, target)
    target.hand_over_staging(snapshot.metadata)
    other = SnapshotMetadata(snapshot.metadata.index + 7, snapshot.metadata.term + 1, snapshot.metadata.conf_state)
    with pytest.raises(SnapshotBusy):
        target.begin_snapshot(other)
    assert target.begin_snapshot(snapshot.metadata).complete  # the same snapshot: still there
    target.persist(HardState(1, 1, snapshot.metadata.index), [], snapshot)
    assert target.applied_index == snapshot.metadata.index
    # Installed: the next stream may stage again.
    assert target.begin_snapshot(other).position() is None


def test_a_staging_the_core_refused_can_be_replaced(open_store: OpenStore) -> None:
    source, target = open_store("source"), open_store("target")
    _fill(source, keys=30, clients=1)
    snapshot = _transfer(source, target)
    target.hand_over_staging(snapshot.metadata)
    target.release_staging(snapshot.metadata)
    other = SnapshotMetadata(snapshot.metadata.index + 7, snapshot.metadata.term, snapshot.metadata.conf_state)
    assert target.begin_snapshot(other).position() is None


def test_only_a_completed_staging_can_be_handed_over(open_store: OpenStore) -> None:
    target, staging, _ = _half_staged(open_store)
    with pytest.raises(SnapshotNotStaged):
        target.hand_over_staging(staging.metadata)


def test_reads_do_not_wait_behind_an_install(open_store: OpenStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """An install holds the state machine for as long as it copies the state
    (seconds for a large one, on the persist thread). A read from the event
    loop must not block meanwhile: it is told to retry."""
    import threading
    import time

    from shardnode.storage import StoreBusy
    from shardnode.storage import store as store_module

    source, target = open_store("source"), open_store("target")
    _fill(source, keys=30, clients=1)
    snapshot = _transfer(source, target)
    installing, release = threading.Event(), threading.Event()
    real_move = store_module.move_staged_into_place

    def slow_move(engine):  # type: ignore[no-untyped-def]
        installing.set()
        release.wait(10)
        return real_move(engine)

    monkeypatch.setattr(store_module, "move_staged_into_place", slow_move)
    install = threading.Thread(target=target.persist, args=(HardState(1, 1, snapshot.metadata.index), [], snapshot))
    install.start()
    try:
        assert installing.wait(10)
        began = time.monotonic()
        with pytest.raises(StoreBusy):
            target.get(b"key-00001")
        assert time.monotonic() - began < 0.5
    finally:
        release.set()
        install.join(10)
    assert target.get(b"key-00001") is not None
