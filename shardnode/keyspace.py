"""The key space: where a key lies, and sets of positions.

A key's position is BLAKE2b-64 of the key, read as a big-endian unsigned
integer (specified, not Python's salted `hash()`), so every process agrees.
Positions run over [0, 2**64). Storage checks ownership with these (a
group's state machine owns a RangeSet); the control plane's shard map
(shardnode/placement/shard_map.py) assigns ranges of positions to groups.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

SPACE = 1 << 64


class KeySpaceError(ValueError):
    """Key ranges that are not well formed (bytes from the network or a log)."""


def stable_hash(data: bytes) -> int:
    """The ring position of `data`: BLAKE2b-64, big-endian."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


@dataclass(slots=True, frozen=True)
class KeyRange:
    """Positions [start, end): end is exclusive, at most 2**64."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end <= SPACE:
            raise KeySpaceError(f"bad key range [{self.start}, {self.end})")

    @property
    def size(self) -> int:
        return self.end - self.start


class RangeSet:
    """A set of positions as sorted, disjoint, non-adjacent ranges."""

    __slots__ = ("_starts", "_ends")

    def __init__(self, ranges: Iterable[KeyRange] = ()) -> None:
        merged: list[list[int]] = []
        for r in sorted(ranges, key=lambda r: r.start):
            if merged and r.start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], r.end)
            else:
                merged.append([r.start, r.end])
        self._starts = [s for s, _ in merged]
        self._ends = [e for _, e in merged]

    def __contains__(self, position: int) -> bool:
        i = bisect.bisect_right(self._starts, position) - 1
        return i >= 0 and position < self._ends[i]

    def contains_key(self, key: bytes) -> bool:
        return stable_hash(key) in self

    def __iter__(self) -> Iterator[KeyRange]:
        return (KeyRange(s, e) for s, e in zip(self._starts, self._ends))

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeSet) and self._starts == other._starts and self._ends == other._ends

    def __repr__(self) -> str:
        return f"RangeSet({list(self)!r})"

    @property
    def size(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends))

    def union(self, other: Iterable[KeyRange]) -> RangeSet:
        return RangeSet([*self, *other])

    def difference(self, other: Iterable[KeyRange]) -> RangeSet:
        result: list[KeyRange] = []
        cuts = RangeSet(other)
        for r in self:
            start = r.start
            for c in cuts:
                if c.end <= start or c.start >= r.end:
                    continue
                if c.start > start:
                    result.append(KeyRange(start, c.start))
                start = max(start, c.end)
            if start < r.end:
                result.append(KeyRange(start, r.end))
        return RangeSet(result)

    def covers(self, other: Iterable[KeyRange]) -> bool:
        return not RangeSet(other).difference(self)

    def to_wire(self) -> list[list[int]]:
        """[[start, last], ...] with the last position included: 2**64 (an
        end) does not fit msgpack's integers."""
        return [[r.start, r.end - 1] for r in self]

    @classmethod
    def from_wire(cls, raw: object) -> RangeSet:
        if not isinstance(raw, (list, tuple)):
            raise KeySpaceError("key ranges: expected a list")
        ranges = []
        for item in raw:
            if not isinstance(item, (list, tuple)) or len(item) != 2 or not all(type(x) is int for x in item):
                raise KeySpaceError("key ranges: expected [start, last] pairs of integers")
            ranges.append(KeyRange(item[0], item[1] + 1))
        return cls(ranges)
