"""What the core reads from stable storage, and an in-memory implementation.

The core never writes storage: the driver persists each Ready (hard state,
entries, snapshot) and only then tells the core with RawNode.advance. The
core reads back through this interface, so a Storage must reflect exactly what
was persisted.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import Protocol

from .errors import CompactedError, SnapshotOutOfDate, UnavailableError
from .messages import EMPTY_HARD_STATE, ENTRY_OVERHEAD, ConfState, Entry, HardState, Snapshot, SnapshotMetadata


class Storage(Protocol):
    def initial_state(self) -> tuple[HardState, ConfState]:
        """The persisted hard state and the membership to start from."""

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        """Entries [lo, hi). At least one entry is returned if any is in range,
        whatever max_size says. Raises CompactedError / UnavailableError."""

    def term(self, index: int) -> int:
        """Term of the entry at index; the snapshot's term at the snapshot index."""

    def first_index(self) -> int:
        """Index of the first entry that may be read (snapshot index + 1)."""

    def last_index(self) -> int:
        """Index of the last persisted entry (the snapshot index if the log is empty)."""

    def snapshot(self) -> Snapshot:
        """The most recent snapshot (may raise SnapshotTemporarilyUnavailable)."""


def limit_size(entries: list[Entry], max_size: int | None, used: int = 0) -> list[Entry]:
    """The longest prefix within max_size bytes (with `used` already taken),
    but never fewer than one entry when nothing is used."""
    end = size_limited_end(entries, 0, len(entries), max_size, used)
    return entries if end == len(entries) else entries[:end]


def entries_size(entries: Sequence[Entry]) -> int:
    """What the entries count for against a size limit (sum of Entry.size())."""
    return sum(map(len, map(_data, entries))) + ENTRY_OVERHEAD * len(entries)


# Entries are summed this many at a time in C (map/sum) before any Python
# loop runs: the loop only walks the chunk where the limit falls.
_SIZE_CHUNK = 64
_data = attrgetter("data")


def size_limited_end(
    entries: Sequence[Entry], start: int, stop: int, max_size: int | None, used: int = 0
) -> int:
    """The end of the longest run entries[start:end] (end <= stop) whose size,
    added to `used` bytes already taken, stays within max_size. When nothing
    is used yet the run holds at least one entry (an entry larger than the
    limit still travels, alone).

    It reads the entries in place (no copy of the range) and stops at the
    limit: the work is proportional to what is returned, not to the range, so
    a long log tail costs nothing beyond the part that fits.
    """
    if max_size is None or start >= stop:
        return stop
    total = used
    position = start
    while position < stop:
        chunk_end = min(stop, position + _SIZE_CHUNK)
        chunk = sum(map(len, map(_data, entries[position:chunk_end]))) + ENTRY_OVERHEAD * (chunk_end - position)
        if total + chunk <= max_size:
            total += chunk
            position = chunk_end
            continue
        for index in range(position, chunk_end):
            total += len(entries[index].data) + ENTRY_OVERHEAD
            if total > max_size:
                return index if index > start or used else start + 1
        return chunk_end  # not reached: the chunk's total was over the limit
    return stop


class MemoryStorage:
    """A Storage held in memory: used by the simulator (as each node's "disk")
    and by tests. Not thread-safe; the simulation is single-threaded.

    Invariant: self._entries[0] is a dummy entry carrying the index and term of
    the last snapshot (or of the start of the log), so first_index() is
    self._entries[0].index + 1.
    """

    def __init__(self, conf_state: ConfState | None = None) -> None:
        self.hard_state: HardState = EMPTY_HARD_STATE
        self._snapshot = Snapshot(SnapshotMetadata(0, 0, conf_state or ConfState()))
        self._entries: list[Entry] = [Entry(term=0, index=0)]

    # --- Storage interface -------------------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        return self.hard_state, self._snapshot.metadata.conf_state

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        offset = self._entries[0].index
        if lo <= offset:
            raise CompactedError(f"entries from {lo}: compacted up to {offset}")
        if hi > self.last_index() + 1:
            raise UnavailableError(f"entries up to {hi - 1}: last index is {self.last_index()}")
        end = size_limited_end(self._entries, lo - offset, hi - offset, max_size)
        return self._entries[lo - offset : end]

    def term(self, index: int) -> int:
        offset = self._entries[0].index
        if index < offset:
            raise CompactedError(f"term of {index}: compacted up to {offset}")
        if index - offset >= len(self._entries):
            raise UnavailableError(f"term of {index}: last index is {self.last_index()}")
        return self._entries[index - offset].term

    def first_index(self) -> int:
        return self._entries[0].index + 1

    def last_index(self) -> int:
        return self._entries[0].index + len(self._entries) - 1

    def snapshot(self) -> Snapshot:
        return self._snapshot

    # --- What a driver does when it persists a Ready ------------------------

    def set_hard_state(self, hard_state: HardState) -> None:
        self.hard_state = hard_state

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        """Replace the whole log with the snapshot's point."""
        if snapshot.metadata.index < self._snapshot.metadata.index:
            raise SnapshotOutOfDate(
                f"snapshot at {snapshot.metadata.index} is older than {self._snapshot.metadata.index}"
            )
        self._snapshot = snapshot
        self._entries = [Entry(term=snapshot.metadata.term, index=snapshot.metadata.index)]

    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        """Append entries, truncating any conflicting suffix first."""
        if not entries:
            return
        first = self.first_index()
        last_new = entries[-1].index
        if last_new < first:
            return  # everything offered is already compacted
        if entries[0].index < first:
            entries = entries[first - entries[0].index :]
        offset = entries[0].index - self._entries[0].index
        if offset > len(self._entries):
            raise UnavailableError(
                f"append at {entries[0].index} leaves a gap after last index {self.last_index()}"
            )
        del self._entries[offset:]
        self._entries.extend(entries)

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        """Record a snapshot of the applied state at `index` (<= applied)."""
        if index <= self._snapshot.metadata.index:
            raise SnapshotOutOfDate(f"snapshot at {index} is not newer than {self._snapshot.metadata.index}")
        if index > self.last_index():
            raise UnavailableError(f"snapshot at {index}: last index is {self.last_index()}")
        metadata = SnapshotMetadata(index=index, term=self.term(index), conf_state=conf_state)
        self._snapshot = Snapshot(metadata, data)
        return self._snapshot

    def compact(self, compact_index: int) -> None:
        """Discard entries up to compact_index (which must be covered by a snapshot
        or be applied everywhere it matters; the caller decides)."""
        offset = self._entries[0].index
        if compact_index <= offset:
            raise CompactedError(f"compact to {compact_index}: already compacted up to {offset}")
        if compact_index > self.last_index():
            raise UnavailableError(f"compact to {compact_index}: last index is {self.last_index()}")
        keep = compact_index - offset
        dummy = Entry(term=self._entries[keep].term, index=compact_index)
        self._entries = [dummy] + self._entries[keep + 1 :]
