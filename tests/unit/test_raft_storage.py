import pytest

from shardnode.raft import CompactedError, ConfState, Entry, MemoryStorage, SnapshotOutOfDate, UnavailableError
from shardnode.raft.storage import entries_size, limit_size, size_limited_end


def _storage(last: int) -> MemoryStorage:
    storage = MemoryStorage(ConfState(voters=(1, 2, 3)))
    storage.append([Entry(term=1 + i // 3, index=i) for i in range(1, last + 1)])
    return storage


def test_bounds_terms_and_entries() -> None:
    s = _storage(9)
    assert (s.first_index(), s.last_index()) == (1, 9)
    assert s.term(0) == 0 and s.term(9) == 4
    assert [e.index for e in s.entries(3, 6)] == [3, 4, 5]
    with pytest.raises(UnavailableError):
        s.entries(5, 11)
    with pytest.raises(UnavailableError):
        s.term(10)


def test_append_truncates_a_conflicting_suffix() -> None:
    s = _storage(9)
    s.append([Entry(term=7, index=5), Entry(term=7, index=6)])
    assert s.last_index() == 6 and s.term(5) == 7 and s.term(4) == 2


def test_append_refuses_a_gap() -> None:
    s = _storage(3)
    with pytest.raises(UnavailableError):
        s.append([Entry(term=1, index=5)])


def test_snapshot_and_compaction_keep_the_term_of_the_compacted_boundary() -> None:
    s = _storage(9)
    snap = s.create_snapshot(6, ConfState(voters=(1, 2, 3)), b"state")
    assert (snap.metadata.index, snap.metadata.term) == (6, 3)
    s.compact(6)
    assert s.first_index() == 7 and s.term(6) == 3
    with pytest.raises(CompactedError):
        s.entries(5, 8)
    with pytest.raises(CompactedError):
        s.compact(4)
    with pytest.raises(SnapshotOutOfDate):
        s.create_snapshot(5, ConfState(), b"")
    # appending entries that are partly compacted keeps only the new part
    s.append([Entry(term=3, index=6), Entry(term=3, index=7), Entry(term=5, index=10)][:2])
    assert s.last_index() == 7


def test_apply_snapshot_replaces_the_log() -> None:
    s = _storage(4)
    other = _storage(12)
    snap = other.create_snapshot(10, ConfState(voters=(1, 2, 3)), b"x")
    s.apply_snapshot(snap)
    assert (s.first_index(), s.last_index(), s.term(10)) == (11, 10, 4)
    with pytest.raises(SnapshotOutOfDate):
        s.apply_snapshot(_storage(3).create_snapshot(2, ConfState(), b""))


def test_limit_size_returns_at_least_one_entry() -> None:
    entries = [Entry(1, i, b"x" * 100) for i in range(1, 6)]
    assert len(limit_size(entries, 1)) == 1
    assert len(limit_size(entries, 250)) == 2
    assert len(limit_size(entries, None)) == 5


def test_size_limited_end_reads_in_place_and_counts_what_is_used() -> None:
    entries = [Entry(1, i, b"x" * 100) for i in range(1, 201)]  # 116 bytes each
    assert size_limited_end(entries, 10, 200, None) == 200
    assert size_limited_end(entries, 10, 200, 116 * 3) == 13
    assert size_limited_end(entries, 10, 200, 116 * 3 + 115) == 13
    assert size_limited_end(entries, 10, 200, 1) == 11           # never fewer than one...
    assert size_limited_end(entries, 10, 200, 116, used=1) == 10  # ...unless something is taken already
    assert size_limited_end(entries, 0, 200, 116 * 150) == 150     # past the first summed chunk
    assert size_limited_end(entries, 5, 5, 10) == 5
    assert entries_size(entries[:7]) == sum(e.size() for e in entries[:7])


def test_slice_across_storage_and_unstable_respects_the_limit() -> None:
    from shardnode.raft.log import RaftLog

    log = RaftLog(_storage(6))
    log.append([Entry(3, i, b"y" * 84) for i in range(7, 12)])  # 100 bytes each, unstable
    assert [e.index for e in log.slice(5, 12, None)] == list(range(5, 12))
    # Entries 5 and 6 (16 bytes each) are stored; 7... are unstable.
    assert [e.index for e in log.slice(5, 12, 32 + 200)] == [5, 6, 7, 8]
    assert [e.index for e in log.slice(5, 12, 31)] == [5]
    assert [e.index for e in log.slice(7, 12, 1)] == [7]
