"""The part of the log not yet on stable storage.

Entries (and possibly an incoming snapshot) live here from the moment the core
accepts them until the driver reports them persisted (RawNode.advance). A
crash loses exactly this part, which is what the simulator models.
"""

from __future__ import annotations

from .messages import Entry, Snapshot
from .storage import size_limited_end


class Unstable:
    """Invariant: entries[i].index == offset + i; if snapshot is set, offset ==
    snapshot.metadata.index + 1."""

    __slots__ = ("snapshot", "entries", "offset")

    def __init__(self, offset: int) -> None:
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []
        self.offset = offset

    def maybe_first_index(self) -> int | None:
        if self.snapshot is not None:
            return self.snapshot.metadata.index + 1
        return None

    def maybe_last_index(self) -> int | None:
        if self.entries:
            return self.offset + len(self.entries) - 1
        if self.snapshot is not None:
            return self.snapshot.metadata.index
        return None

    def maybe_term(self, index: int) -> int | None:
        if index < self.offset:
            if self.snapshot is not None and self.snapshot.metadata.index == index:
                return self.snapshot.metadata.term
            return None
        last = self.maybe_last_index()
        if last is None or index > last:
            return None
        return self.entries[index - self.offset].term

    def stable_to(self, index: int, term: int) -> None:
        """Entries up to index (of that term) are persisted: forget them. If the
        entry was replaced meanwhile (different term), keep it."""
        known_term = self.maybe_term(index)
        if known_term is None or index < self.offset:
            return
        if known_term == term:
            del self.entries[: index + 1 - self.offset]
            self.offset = index + 1

    def stable_snap_to(self, index: int) -> None:
        if self.snapshot is not None and self.snapshot.metadata.index == index:
            self.snapshot = None

    def restore(self, snapshot: Snapshot) -> None:
        self.offset = snapshot.metadata.index + 1
        self.entries = []
        self.snapshot = snapshot

    def truncate_and_append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        first_new = entries[0].index
        if first_new == self.offset + len(self.entries):
            self.entries.extend(entries)
        elif first_new <= self.offset:
            # Replaces everything unstable; the driver will overwrite storage
            # from first_new on when it persists these.
            self.offset = first_new
            self.entries = list(entries)
        else:
            del self.entries[first_new - self.offset :]
            self.entries.extend(entries)

    def slice(self, lo: int, hi: int, max_size: int | None = None, used: int = 0) -> list[Entry]:
        """Entries [lo, hi), which the caller has checked are all here, cut at
        max_size bytes (with `used` already taken: see size_limited_end).
        Only the part returned is copied."""
        if lo < self.offset or hi > self.offset + len(self.entries):
            raise AssertionError(
                f"unstable.slice[{lo},{hi}) out of bounds [{self.offset},{self.offset + len(self.entries)})"
            )
        start, stop = lo - self.offset, hi - self.offset
        return self.entries[start : size_limited_end(self.entries, start, stop, max_size, used)]
