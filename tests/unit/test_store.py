"""ReplicaStore as Raft storage (against MemoryStorage), as a state machine
with exactly-once sessions, and its compaction and restart behaviour."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest

from shardnode.raft import (
    CompactedError,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Member,
    MemoryStorage,
    SnapshotMetadata,
    UnavailableError,
)
from shardnode.storage import (
    ApplyResult,
    Command,
    CommandOp,
    ReplicaStore,
    StorageClosed,
    StorageError,
    encode_command,
)
from shardnode.storage import store as store_module
from shardnode.storage.engine import (
    CorruptionError,
    decode_conf_state,
    decode_metadata,
    encode_conf_state,
    encode_metadata,
)

VOTERS = (1, 2, 3)
OpenStore = Callable[..., ReplicaStore]


@pytest.fixture
def open_store(tmp_path: Path) -> Iterator[OpenStore]:
    """open_store(name="db", **options): (re)open a store under tmp_path;
    every store opened is closed at the end."""
    opened: list[ReplicaStore] = []

    def _open(name: str = "db", **options: object) -> ReplicaStore:
        options.setdefault("initial_voters", VOTERS)
        store = ReplicaStore.open(tmp_path / name, **options)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield _open
    for store in opened:
        store.close()


def put(
    index: int, key: bytes, value: bytes, client_id: int = 0, sequence: int = 0, ts: int = 1_000, term: int = 1
) -> Entry:
    return Entry(term, index, encode_command(Command(CommandOp.PUT, key, value, client_id, sequence, ts)))


def delete(index: int, key: bytes, client_id: int = 0, sequence: int = 0, ts: int = 1_000, term: int = 1) -> Entry:
    return Entry(term, index, encode_command(Command(CommandOp.DELETE, key, None, client_id, sequence, ts)))


def noops(lo: int, hi: int, term: int = 1) -> list[Entry]:
    return [Entry(term, i) for i in range(lo, hi)]


def persist_and_apply(store: ReplicaStore, entries: list[Entry]) -> list[ApplyResult | None]:
    store.persist(HardState(term=entries[-1].term, vote=1, commit=entries[-1].index), entries)
    return store.apply(entries)


# --- The Storage protocol --------------------------------------------------------------


def test_a_fresh_store_is_an_empty_log_with_the_initial_membership(open_store: OpenStore) -> None:
    store = open_store()
    assert store.initial_state() == (HardState(), ConfState(voters=VOTERS))
    assert (store.first_index(), store.last_index(), store.term(0), store.applied_index) == (1, 0, 0, 0)
    with pytest.raises(UnavailableError):
        store.term(1)
    with pytest.raises(UnavailableError):
        store.entries(1, 2)


def test_persist_then_read_entries_terms_and_bounds(open_store: OpenStore) -> None:
    store = open_store()
    entries = [Entry(1 + i // 3, i, b"x" * i) for i in range(1, 10)]
    store.persist(HardState(4, 2, 3), entries)
    assert (store.first_index(), store.last_index()) == (1, 9)
    assert [store.term(i) for i in range(10)] == [0, 1, 1, 2, 2, 2, 3, 3, 3, 4]
    assert store.entries(3, 6) == entries[2:5]
    assert store.entries(4, 4) == []
    # max_size: the longest prefix that fits, but at least one entry
    assert store.entries(1, 10, max_size=0) == entries[:1]
    assert store.entries(1, 10, max_size=entries[0].size() + entries[1].size()) == entries[:2]
    with pytest.raises(UnavailableError):
        store.entries(5, 11)


def test_persist_truncates_a_conflicting_suffix(open_store: OpenStore) -> None:
    store = open_store(entry_cache_entries=2)  # the conflict starts below the cache
    store.persist(None, [Entry(1, i) for i in range(1, 10)])
    store.persist(None, [Entry(7, 5, b"new"), Entry(7, 6)])
    assert store.last_index() == 6
    assert [store.term(i) for i in range(1, 7)] == [1, 1, 1, 1, 7, 7]
    with pytest.raises(UnavailableError):
        store.term(7)
    assert store.entries(4, 7) == [Entry(1, 4), Entry(7, 5, b"new"), Entry(7, 6)]
    store.close()
    reopened = open_store()
    assert reopened.last_index() == 6
    assert reopened.entries(4, 7) == [Entry(1, 4), Entry(7, 5, b"new"), Entry(7, 6)]


def test_persist_refuses_a_gap_and_non_consecutive_entries(open_store: OpenStore) -> None:
    store = open_store()
    store.persist(None, noops(1, 4))
    with pytest.raises(UnavailableError):
        store.persist(None, [Entry(1, 6)])
    with pytest.raises(ValueError):
        store.persist(None, [Entry(1, 4), Entry(1, 6)])
    assert store.last_index() == 3


def test_persist_refuses_to_truncate_applied_entries(open_store: OpenStore) -> None:
    store = open_store()
    persist_and_apply(store, noops(1, 5))
    with pytest.raises(StorageError):
        store.persist(None, [Entry(2, 3)])
    assert store.term(3) == 1


def test_hard_state_log_applied_sessions_and_membership_survive_reopen(open_store: OpenStore) -> None:
    store = open_store()
    entries = [put(1, b"a", b"1", client_id=5, sequence=1), put(2, b"b", b"2"), Entry(2, 3), delete(4, b"a", 5, 2)]
    store.persist(HardState(2, 3, 4), entries)
    store.apply(entries[:3], conf_state=ConfState(voters=(1, 2, 3, 4)))
    store.close()
    store = open_store()
    assert store.initial_state() == (HardState(2, 3, 4), ConfState(voters=(1, 2, 3, 4)))
    assert (store.last_index(), store.applied_index) == (4, 3)
    assert store.entries(1, 5) == entries
    assert store.get(b"a") == b"1" and store.get(b"b") == b"2"
    assert store.sessions()[5].last_sequence == 1
    # the remaining committed entry is applied once after the restart
    assert store.apply(entries) == [None, None, None, ApplyResult(4, 5, 2, True, b"1")]
    assert store.get(b"a") is None


def test_initial_voters_of_an_existing_store_are_ignored(open_store: OpenStore) -> None:
    open_store().close()
    assert open_store(initial_voters=(9,)).conf_state == ConfState(voters=VOTERS)


def test_close_is_idempotent_and_the_store_refuses_use_after_it(open_store: OpenStore) -> None:
    store = open_store()
    store.close()
    store.close()
    with pytest.raises(StorageClosed):
        store.persist(None, noops(1, 2))
    with pytest.raises(StorageClosed):
        store.get(b"k")


def _compare(store: ReplicaStore, memory: MemoryStorage, rng: random.Random) -> None:
    assert (store.first_index(), store.last_index()) == (memory.first_index(), memory.last_index())
    assert store.initial_state()[0] == memory.initial_state()[0]
    first, last = memory.first_index(), memory.last_index()
    for index in range(max(0, first - 3), last + 3):
        assert _outcome(store.term, index) == _outcome(memory.term, index), index
    for _ in range(20):
        lo = rng.randint(max(0, first - 2), last + 2)
        hi = rng.randint(lo, last + 3)
        max_size = rng.choice([None, 0, 20, 50, 200])
        expected = _outcome(memory.entries, lo, hi, max_size)
        assert _outcome(store.entries, lo, hi, max_size) == expected, (lo, hi, max_size)


def _outcome(function: Callable[..., object], *args: object) -> object:
    try:
        return function(*args)
    except (CompactedError, UnavailableError) as exc:
        return type(exc)


@pytest.mark.parametrize("seed", range(4))
def test_behaves_like_memory_storage_on_a_random_sequence(open_store: OpenStore, seed: int) -> None:
    rng = random.Random(seed)
    cache = [0, 3, 8192, 5][seed]
    store = open_store(entry_cache_entries=cache)
    memory = MemoryStorage(ConfState(voters=VOTERS))
    term = 1
    compactions = reopens = 0
    for _ in range(150):
        action = rng.random()
        first, last = memory.first_index(), memory.last_index()
        if action < 0.55:
            # append, possibly replacing a suffix above the applied index
            lo = rng.randint(max(first, store.applied_index + 1), last + 1)
            if rng.random() < 0.3:
                term += 1
            # valid commands of varied sizes (max_size matters), so that applying them is quiet
            entries = [put(i, b"k", bytes(rng.randrange(40)), term=term) for i in range(lo, lo + rng.randint(1, 6))]
            hard_state = HardState(term, 1, store.applied_index) if rng.random() < 0.5 else None
            store.persist(hard_state, entries)
            memory.append(entries)
            if hard_state is not None:
                memory.set_hard_state(hard_state)
        elif action < 0.75 and last > store.applied_index:
            upto = rng.randint(store.applied_index + 1, last)
            commit = HardState(term, 1, upto)
            store.persist(commit, [])
            memory.set_hard_state(commit)
            store.apply(store.entries(store.applied_index + 1, upto + 1))
        elif action < 0.9:
            point = store.compact(rng.randint(0, 6))
            if point is not None:
                memory.compact(point)
                compactions += 1
        else:
            store.close()
            store = open_store(entry_cache_entries=cache)
            reopens += 1
        _compare(store, memory, rng)
    assert compactions and reopens  # the sequence exercised both


# --- Applying commands ----------------------------------------------------------------


def test_put_and_delete_return_the_old_values(open_store: OpenStore) -> None:
    store = open_store()
    results = persist_and_apply(store, [put(1, b"k", b"v1"), put(2, b"k", b"v2"), delete(3, b"k"), delete(4, b"k")])
    assert results == [
        ApplyResult(1, 0, 0, False, None),
        ApplyResult(2, 0, 0, True, b"v1"),
        ApplyResult(3, 0, 0, True, b"v2"),
        ApplyResult(4, 0, 0, False, None),
    ]
    assert store.get(b"k") is None and store.applied_index == 4


def test_noops_conf_changes_and_undecodable_data_only_advance_the_applied_index(
    open_store: OpenStore, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store()
    change = ConfChange(ConfChangeType.ADD_NODE, 4)
    entries = [
        Entry(1, 1),
        Entry(1, 2, change.encode(), EntryType.CONF_CHANGE),
        Entry(1, 3, b"\xc1garbage"),
        put(4, b"k", b"v"),
    ]
    results = persist_and_apply(store, entries)
    assert results[:3] == [None, None, None] and results[3] == ApplyResult(4, 0, 0, False, None)
    assert store.applied_index == 4
    assert any("undecodable" in record.getMessage() for record in caplog.records)


def test_reapplying_entries_at_or_below_the_applied_index_is_a_no_op(open_store: OpenStore) -> None:
    store = open_store()
    entries = [put(1, b"k", b"a"), put(2, b"k", b"b")]
    persist_and_apply(store, entries)
    assert store.apply(entries) == [None, None]
    store.persist(None, [put(3, b"k", b"c")])
    assert store.apply(entries + [put(3, b"k", b"c")]) == [None, None, ApplyResult(3, 0, 0, True, b"b")]
    assert store.get(b"k") == b"c"


def test_apply_refuses_a_gap_and_entries_not_persisted(open_store: OpenStore) -> None:
    store = open_store()
    store.persist(None, noops(1, 4))
    with pytest.raises(StorageError):
        store.apply([Entry(1, 2)])
    with pytest.raises(StorageError):
        store.apply([put(1, b"k", b"v")] + noops(2, 5))  # 4 is not on disk
    assert store.applied_index == 0 and store.get(b"k") is None


def test_a_batch_sees_its_own_earlier_writes(open_store: OpenStore) -> None:
    store = open_store()
    results = persist_and_apply(store, [put(1, b"k", b"a"), put(2, b"k", b"b", 7, 1), delete(3, b"k", 7, 2)])
    assert [(r.existed, r.old_value) for r in results if r] == [(False, None), (True, b"a"), (True, b"b")]


def test_a_process_crash_after_apply_keeps_kv_and_applied_index_together(tmp_path: Path) -> None:
    """The apply batch is not synced, but it is one atomic batch with the
    applied index: whatever survives, the two agree."""
    script = textwrap.dedent(
        f"""
        import os
        from shardnode.raft import Entry, HardState
        from shardnode.storage import Command, CommandOp, ReplicaStore, encode_command
        store = ReplicaStore.open({str(tmp_path / "db")!r}, initial_voters=(1,))
        put = lambda i: Entry(1, i, encode_command(Command(CommandOp.PUT, b"k%d" % i, b"v", 0, 0, 1)))
        entries = [put(i) for i in range(1, 101)]
        store.persist(HardState(1, 1, 100), entries)
        store.apply(entries[:60])
        os._exit(0)   # no close(), no flush
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).resolve().parents[2])
    store = ReplicaStore.open(tmp_path / "db", initial_voters=(1,))
    try:
        applied = store.applied_index
        assert all(store.get(b"k%d" % i) == b"v" for i in range(1, applied + 1))
        assert all(store.get(b"k%d" % i) is None for i in range(applied + 1, 101))
        assert store.last_index() == 100  # the log was synced
    finally:
        store.close()


def test_conf_state_is_recorded_with_the_apply_batch(open_store: OpenStore) -> None:
    store = open_store()
    change = Entry(1, 1, ConfChange(ConfChangeType.ADD_LEARNER_NODE, 9).encode(), EntryType.CONF_CHANGE)
    persist_and_apply(store, [change])
    store.apply([change], conf_state=ConfState(voters=VOTERS, learners=(9,)))
    store.close()
    store = open_store()
    assert store.conf_state == ConfState(voters=VOTERS, learners=(9,))
    assert store.initial_state()[1] == ConfState(voters=VOTERS, learners=(9,))


def test_conf_state_encoding_keeps_removed_ids_and_addresses_and_reads_the_first_format() -> None:
    conf = ConfState(voters=(1, 2), learners=(5,), removed=(3, 4), members=(Member(5, "host5", "127.0.0.5:50100"),))
    assert decode_conf_state(encode_conf_state(conf)) == conf
    metadata = SnapshotMetadata(10, 2, conf)
    assert decode_metadata(encode_metadata(metadata)) == metadata
    # What the first format wrote: (voters, learners, voters_outgoing) only.
    first_format = msgpack.packb(((1, 2, 3), (4,), ()), use_bin_type=True)
    assert decode_conf_state(first_format) == ConfState(voters=(1, 2, 3), learners=(4,))
    for bad in (((1,), (), (), ()), ((1,), (), (), (), ((5, "h"),)), ((1,), (), (), (0,), ())):
        with pytest.raises(CorruptionError):
            decode_conf_state(msgpack.packb(bad, use_bin_type=True))


# --- Sessions ---------------------------------------------------------------------------


def test_a_retried_command_returns_its_first_outcome_without_applying_again(open_store: OpenStore) -> None:
    store = open_store()
    persist_and_apply(store, [put(1, b"k", b"old")])
    first = persist_and_apply(store, [put(2, b"k", b"mine", client_id=42, sequence=1)])[0]
    persist_and_apply(store, [put(3, b"k", b"theirs", client_id=43, sequence=1)])
    retry = persist_and_apply(store, [put(4, b"k", b"mine", client_id=42, sequence=1)])[0]
    assert first == ApplyResult(2, 42, 1, True, b"old")
    assert retry == ApplyResult(4, 42, 1, True, b"old", duplicate=True)
    assert store.get(b"k") == b"theirs"  # the retry did not overwrite


def test_an_older_sequence_is_flagged_stale(open_store: OpenStore) -> None:
    store = open_store()
    persist_and_apply(store, [put(1, b"k", b"a", 42, 1), put(2, b"k", b"b", 42, 2)])
    stale = persist_and_apply(store, [put(3, b"k", b"a", 42, 1)])[0]
    assert stale == ApplyResult(3, 42, 1, False, None, duplicate=True, stale=True)
    assert store.get(b"k") == b"b"


def test_sessions_expire_by_command_timestamps_not_the_local_clock(open_store: OpenStore) -> None:
    store = open_store(session_ttl_ms=1_000)
    persist_and_apply(store, [put(1, b"k", b"a", 42, 1, ts=10_000)])
    # within the TTL (per the commands' own clock): still a duplicate
    assert persist_and_apply(store, [put(2, b"k", b"a", 42, 1, ts=10_900)])[0].duplicate
    # the retry refreshed the session; another client's command moves the clock on
    persist_and_apply(store, [put(3, b"x", b"1", 7, 1, ts=12_000)])
    assert 42 not in store.sessions() or store.sessions()[42].last_active_ms < 12_000 - 1_000
    # session 42 is gone: the same sequence is now applied as a new command
    result = persist_and_apply(store, [put(4, b"k", b"a", 42, 1, ts=12_001)])[0]
    assert result == ApplyResult(4, 42, 1, True, b"a")


def test_a_leader_with_a_slow_clock_cannot_revive_an_expired_session(open_store: OpenStore) -> None:
    """The state machine clock is the largest timestamp applied, so expiry
    depends only on the position in the log (replicas sweep at different
    batch boundaries and must still agree)."""
    store = open_store(session_ttl_ms=1_000)
    persist_and_apply(store, [put(1, b"k", b"a", 42, 1, ts=10_000), put(2, b"x", b"1", ts=20_000)])
    result = persist_and_apply(store, [put(3, b"k", b"a", 42, 1, ts=10_500)])[0]
    assert result is not None and not result.duplicate


def test_the_sweep_removes_idle_expired_sessions(open_store: OpenStore) -> None:
    store = open_store(session_ttl_ms=1_000)
    clients = store_module.SESSION_SWEEP_COUNT * 3
    persist_and_apply(store, [put(i, b"k%d" % i, b"v", client_id=i, sequence=1) for i in range(1, clients + 1)])
    assert len(store.sessions()) == clients
    index = clients
    every = store_module.SESSION_SWEEP_EVERY
    left = []
    for _ in range(4):  # each sweep (every SESSION_SWEEP_EVERY entries) examines a bounded number
        persist_and_apply(store, [put(index + j, b"other", b"v", ts=5_000) for j in range(1, every + 1)])
        index += every
        left.append(len(store.sessions()))
    assert left[0] > 0 and left[-1] == 0, left


def test_sessions_survive_reopen(open_store: OpenStore) -> None:
    store = open_store()
    persist_and_apply(store, [put(1, b"k", b"a", 42, 1), put(2, b"k", b"b", 42, 2)])
    store.close()
    store = open_store()
    assert persist_and_apply(store, [put(3, b"k", b"b", 42, 2)])[0] == ApplyResult(3, 42, 2, True, b"a", duplicate=True)


# --- Compaction ---------------------------------------------------------------------------


def test_compaction_respects_the_threshold_and_keeps_the_boundary_term(open_store: OpenStore) -> None:
    store = open_store(entry_cache_entries=4)
    store.persist(None, [Entry(1 + i // 4, i) for i in range(1, 21)])
    store.persist(HardState(5, 1, 12), [])
    store.apply(store.entries(1, 13))
    assert store.compact(12) is None
    assert store.compact(11) == 12
    assert (store.first_index(), store.last_index(), store.term(12)) == (13, 20, 4)
    with pytest.raises(CompactedError):
        store.term(11)
    with pytest.raises(CompactedError):
        store.entries(12, 14)
    assert [e.index for e in store.entries(13, 21)] == list(range(13, 21))
    assert store.compact(0) is None  # nothing applied beyond the point
    store.close()
    store = open_store(entry_cache_entries=4)
    assert (store.first_index(), store.last_index(), store.term(12), store.applied_index) == (13, 20, 4, 12)
    store.persist(None, [Entry(9, 21)])
    assert store.entries(20, 22)[-1] == Entry(9, 21)


@pytest.mark.parametrize("archives", [True, False])
def test_obsolete_wal_files_are_archived_only_when_the_storage_settings_say_so(tmp_path: Path, archives: bool) -> None:
    from shardnode.config import StorageConfig
    from shardnode.storage import wal_archive_bytes
    from shardnode.storage.engine import COLUMN_FAMILIES

    storage = StorageConfig() if archives else StorageConfig(wal_ttl_seconds=0, wal_size_limit_mb=0)
    store = ReplicaStore.open(tmp_path / "db", initial_voters=(1,), storage=storage)
    try:
        for round_ in range(3):
            store.persist(HardState(1, 1, 0), [Entry(1, round_ * 100 + i + 1, b"x" * 1000) for i in range(100)])
            for name in COLUMN_FAMILIES:  # every family flushed: the WAL file becomes obsolete
                store._engine.column(name).view.flush(wait=True)
        archived = wal_archive_bytes(store.path)
        assert (archived > 100_000) if archives else (archived == 0)
    finally:
        store.close()


def test_storage_errors_surface_as_storage_faults(tmp_path: Path) -> None:
    """rocksdict raises a bare Exception; the worker must recognise a failing
    disk to stop (fail-stop), so the engine names it."""
    from shardnode.storage import StorageFault

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(StorageFault):
        ReplicaStore.open(blocker / "db", initial_voters=(1,))


def test_every_directory_created_for_a_store_is_fsynced_into_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data_dir/HOST/group-G on a fresh machine: all three entries are new,
    and each is durable only once its parent is fsynced."""
    from shardnode.storage import engine

    synced: list[str] = []
    real = engine.fsync_directory
    monkeypatch.setattr(engine, "fsync_directory", lambda path: (synced.append(path), real(path)))
    store = ReplicaStore.open(tmp_path / "data" / "host1" / "group-0", initial_voters=(1,))
    store.close()
    for created in ("data", "data/host1", "data/host1/group-0"):
        assert str((tmp_path / created).parent) in synced, created
