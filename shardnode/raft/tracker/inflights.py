"""The bounded window of appends a leader has sent to a follower but not yet
seen acknowledged: pipelining without unbounded memory."""

from __future__ import annotations

from collections import deque


class Inflights:
    """Each in-flight append is remembered by its last index, in send order."""

    __slots__ = ("capacity", "_last_indexes")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._last_indexes: deque[int] = deque()

    def __len__(self) -> int:
        return len(self._last_indexes)

    def add(self, last_index: int) -> None:
        if self.full():
            raise AssertionError("cannot add to a full inflights window")
        self._last_indexes.append(last_index)

    def free_le(self, index: int) -> None:
        """An ack up to index frees every append that ended at or before it."""
        window = self._last_indexes
        while window and window[0] <= index:
            window.popleft()

    def free_first_one(self) -> None:
        if self._last_indexes:
            self._last_indexes.popleft()

    def full(self) -> bool:
        return len(self._last_indexes) >= self.capacity

    def reset(self) -> None:
        self._last_indexes.clear()
