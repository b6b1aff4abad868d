"""The Raft log: stable storage plus the unstable tail, with the commit and
apply cursors.

Invariant: applied <= committed <= last_index(), and every committed entry is
readable (from storage or unstable) unless compacted into a snapshot.
"""

from __future__ import annotations

from .errors import CompactedError, UnavailableError
from .log_unstable import Unstable
from .messages import Entry, Snapshot
from .storage import Storage, entries_size


class RaftLog:
    __slots__ = ("storage", "unstable", "committed", "applied", "max_committed_size")

    def __init__(self, storage: Storage, max_committed_size: int | None = None) -> None:
        self.storage = storage
        first = storage.first_index()
        last = storage.last_index()
        self.unstable = Unstable(offset=last + 1)
        # Everything up to the snapshot is committed and applied by definition.
        self.committed = first - 1
        self.applied = first - 1
        self.max_committed_size = max_committed_size

    def __repr__(self) -> str:
        return (
            f"RaftLog(committed={self.committed}, applied={self.applied}, "
            f"unstable.offset={self.unstable.offset}, unstable={len(self.unstable.entries)})"
        )

    # --- Bounds -------------------------------------------------------------

    def first_index(self) -> int:
        index = self.unstable.maybe_first_index()
        return index if index is not None else self.storage.first_index()

    def last_index(self) -> int:
        index = self.unstable.maybe_last_index()
        return index if index is not None else self.storage.last_index()

    def persisted_last_index(self) -> int:
        """The last index that is both in this log and on stable storage: what
        the leader may count for itself toward a commit quorum."""
        if self.unstable.snapshot is not None:
            return 0
        if self.unstable.entries:
            return self.unstable.offset - 1
        return self.last_index()

    def term(self, index: int) -> int:
        """Term at index. The entry just before first_index() is compacted but its
        term is still known (the snapshot's), which appends need for matching."""
        term = self.unstable.maybe_term(index)
        if term is not None:
            return term
        if index + 1 < self.first_index():
            raise CompactedError(f"term of {index}: compacted before {self.first_index()}")
        if index > self.last_index():
            raise UnavailableError(f"term of {index}: last index is {self.last_index()}")
        return self.storage.term(index)

    def term_or_zero(self, index: int) -> int:
        try:
            return self.term(index)
        except (CompactedError, UnavailableError):
            return 0

    def last_term(self) -> int:
        return self.term(self.last_index())

    def match_term(self, index: int, term: int) -> bool:
        try:
            return self.term(index) == term
        except (CompactedError, UnavailableError):
            return False

    def is_up_to_date(self, last_index: int, term: int) -> bool:
        """Section 5.4.1: a candidate's log is at least as up to date as ours."""
        our_last_term = self.last_term()
        return term > our_last_term or (term == our_last_term and last_index >= self.last_index())

    # --- Appending ------------------------------------------------------------

    def maybe_append(self, index: int, log_term: int, committed: int, entries: tuple[Entry, ...]) -> int | None:
        """Follower side of AppendEntries. Returns the last index now known to
        match the leader, or None if (index, log_term) does not match our log."""
        if not self.match_term(index, log_term):
            return None
        last_new_index = index + len(entries)
        conflict_index = self.find_conflict(entries)
        if conflict_index:
            if conflict_index <= self.committed:
                raise AssertionError(
                    f"entry {conflict_index} conflicts with committed entry (committed={self.committed})"
                )
            self.append(entries[conflict_index - (index + 1) :])
        self.commit_to(min(committed, last_new_index))
        return last_new_index

    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> int:
        if not entries:
            return self.last_index()
        if entries[0].index - 1 < self.committed:
            raise AssertionError(f"append after {entries[0].index - 1} is below committed {self.committed}")
        self.unstable.truncate_and_append(entries)
        return self.last_index()

    def find_conflict(self, entries: tuple[Entry, ...] | list[Entry]) -> int:
        """Index of the first entry whose term differs from ours (or that we lack);
        0 if all of them are already in our log."""
        for entry in entries:
            if not self.match_term(entry.index, entry.term):
                return entry.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The largest index <= `index` whose term is <= `term`, with that term.

        Used for fast backtracking: a rejected append tells the leader where
        our logs can possibly agree, skipping a whole term per round trip.
        """
        while index > 0:
            try:
                our_term = self.term(index)
            except (CompactedError, UnavailableError):
                return index, 0
            if our_term <= term:
                return index, our_term
            index -= 1
        return 0, 0

    # --- Reading --------------------------------------------------------------

    def unstable_entries(self) -> list[Entry]:
        return list(self.unstable.entries)

    def entries(self, lo: int, max_size: int | None = None) -> list[Entry]:
        last = self.last_index()
        if lo > last:
            return []
        return self.slice(lo, last + 1, max_size)

    def slice(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        """Entries [lo, hi) from storage and unstable; raises CompactedError."""
        if lo >= hi:
            return []
        first = self.first_index()
        if lo < first:
            raise CompactedError(f"entries from {lo}: compacted before {first}")
        if hi > self.last_index() + 1:
            raise AssertionError(f"slice[{lo},{hi}) beyond last index {self.last_index()}")
        offset = self.unstable.offset
        if hi <= offset:
            return self.storage.entries(lo, hi, max_size)
        if lo >= offset:
            return self.unstable.slice(lo, hi, max_size)
        stored = self.storage.entries(lo, offset, max_size)
        if len(stored) < offset - lo:
            return stored  # storage stopped at the size limit
        used = 0 if max_size is None else entries_size(stored)
        return stored + self.unstable.slice(offset, hi, max_size, used)

    def has_next_committed_entries(self) -> bool:
        return self.committed > max(self.applied, self.first_index() - 1)

    def next_committed_entries(self) -> list[Entry]:
        lo = max(self.applied + 1, self.first_index())
        if self.committed + 1 > lo:
            return self.slice(lo, self.committed + 1, self.max_committed_size)
        return []

    def snapshot(self) -> Snapshot:
        if self.unstable.snapshot is not None:
            return self.unstable.snapshot
        return self.storage.snapshot()

    # --- Cursors --------------------------------------------------------------

    def commit_to(self, index: int) -> None:
        if index > self.committed:
            if index > self.last_index():
                raise AssertionError(f"commit {index} beyond last index {self.last_index()}")
            self.committed = index

    def maybe_commit(self, index: int, term: int) -> bool:
        """Commit up to index only if that entry is of `term` (the current term):
        Raft section 5.4.2; earlier terms' entries commit indirectly."""
        if index > self.committed and self.term_or_zero(index) == term:
            self.commit_to(index)
            return True
        return False

    def applied_to(self, index: int) -> None:
        if index == 0:
            return
        if index > self.committed or index < self.applied:
            raise AssertionError(f"applied_to({index}) outside [{self.applied}, {self.committed}]")
        self.applied = index

    def stable_to(self, index: int, term: int) -> None:
        self.unstable.stable_to(index, term)

    def stable_snap_to(self, index: int) -> None:
        self.unstable.stable_snap_to(index)

    def restore(self, snapshot: Snapshot) -> None:
        self.committed = snapshot.metadata.index
        self.unstable.restore(snapshot)
