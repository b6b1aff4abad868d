import pytest

from shardnode.raft import ConfState, Entry, MemoryStorage, Snapshot, SnapshotMetadata
from shardnode.raft.log import RaftLog


def _log(terms: list[int], committed: int = 0) -> RaftLog:
    storage = MemoryStorage(ConfState(voters=(1,)))
    raft_log = RaftLog(storage)
    raft_log.append([Entry(term, i + 1) for i, term in enumerate(terms)])
    raft_log.committed = committed
    return raft_log


def test_maybe_append_matches_then_truncates_conflicts() -> None:
    raft_log = _log([1, 1, 2, 2], committed=1)
    assert raft_log.maybe_append(9, 2, 4, (Entry(2, 10),)) is None     # no match at 9
    assert raft_log.maybe_append(2, 1, 4, (Entry(3, 3), Entry(3, 4))) == 4
    assert [raft_log.term(i) for i in range(1, 5)] == [1, 1, 3, 3]
    assert raft_log.committed == 4


def test_maybe_append_never_commits_beyond_what_matched() -> None:
    raft_log = _log([1, 1, 1, 1, 1], committed=0)
    assert raft_log.maybe_append(1, 1, 5, ()) == 1
    assert raft_log.committed == 1


def test_a_conflict_with_a_committed_entry_is_a_bug() -> None:
    raft_log = _log([1, 1, 2], committed=3)
    with pytest.raises(AssertionError):
        raft_log.maybe_append(1, 1, 3, (Entry(5, 2),))


def test_find_conflict_by_term_skips_a_whole_term() -> None:
    raft_log = _log([1, 1, 4, 4, 4, 4, 5, 5])
    assert raft_log.find_conflict_by_term(8, 3) == (2, 1)
    assert raft_log.find_conflict_by_term(8, 4) == (6, 4)
    assert raft_log.find_conflict_by_term(8, 9) == (8, 5)
    assert raft_log.find_conflict_by_term(0, 0) == (0, 0)


def test_is_up_to_date_compares_last_term_then_length() -> None:
    raft_log = _log([1, 2, 2])
    assert raft_log.is_up_to_date(1, 3)
    assert raft_log.is_up_to_date(3, 2)
    assert not raft_log.is_up_to_date(2, 2)
    assert not raft_log.is_up_to_date(10, 1)


def test_commit_only_counts_entries_of_the_given_term() -> None:
    raft_log = _log([1, 1, 2])
    assert not raft_log.maybe_commit(2, 2)   # entry 2 is of term 1
    assert raft_log.maybe_commit(3, 2)
    assert raft_log.committed == 3


def test_stable_to_ignores_a_replaced_entry() -> None:
    raft_log = _log([1, 1, 1])
    raft_log.append([Entry(2, 3)])          # replaces unstable entry 3
    raft_log.stable_to(3, 1)                 # an old persist report for the replaced entry
    assert raft_log.unstable.offset == 1
    raft_log.stable_to(3, 2)
    assert raft_log.unstable.entries == []


def test_restore_from_snapshot() -> None:
    raft_log = _log([1, 1])
    snapshot = Snapshot(SnapshotMetadata(10, 3, ConfState(voters=(1,))), b"")
    raft_log.restore(snapshot)
    assert (raft_log.committed, raft_log.first_index(), raft_log.last_index(), raft_log.term(10)) == (10, 11, 10, 3)
    assert raft_log.persisted_last_index() == 0   # not on disk until the Ready is persisted
    raft_log.stable_snap_to(10)
    assert raft_log.unstable.snapshot is None


def test_next_committed_entries_respects_applied_and_size() -> None:
    storage = MemoryStorage(ConfState(voters=(1,)))
    raft_log = RaftLog(storage, max_committed_size=40)
    raft_log.append([Entry(1, i, b"x" * 10) for i in range(1, 6)])
    raft_log.commit_to(5)
    raft_log.applied_to(1)
    assert [e.index for e in raft_log.next_committed_entries()] == [2]   # 26 bytes each, 40 max
    raft_log.applied_to(5)
    assert not raft_log.has_next_committed_entries()
