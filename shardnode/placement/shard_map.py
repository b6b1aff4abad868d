"""The shard map: which group owns which part of the key space.

A key's position (shardnode/keyspace.py) lies in [0, 2**64). The space of positions [0, 2**64) is cut into ranges, each owned by one
group: `starts[i]` is the first position of range i, which runs to
`starts[i + 1]` (the last to 2**64), and `owners[i]` owns it.

The first map of a cluster comes from cluster.toml by consistent hashing:
each group owns `virtual_nodes` points on the ring (point v of group G is
the position of b"group-G/vnode-V"), and a key belongs to the first point
at or after it, wrapping around. `ShardMap.build` turns that ring into
ranges. Afterwards the map lives in the metadata group and changes only by
moving ranges between groups (docs/sharding.md), each change with epoch + 1.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import msgpack

from ..keyspace import SPACE, KeyRange, KeySpaceError, RangeSet, stable_hash

__all__ = ["SPACE", "KeyRange", "KeySpaceError", "Move", "RangeSet", "ShardMap", "ShardMapConflict", "ShardMapError",
           "initial_ownership", "stable_hash"]

MAP_FORMAT_VERSION = 1


class ShardMapError(KeySpaceError):
    """A shard map that is not well formed (bytes from the metadata group)."""


class ShardMapConflict(Exception):
    """The metadata group's map changed since it was read: read it again."""


@dataclass(slots=True, frozen=True)
class Move:
    """Key space to move from one group to another (one step of a plan)."""

    source: int
    target: int
    ranges: RangeSet


@dataclass(slots=True, frozen=True)
class ShardMap:
    epoch: int
    starts: tuple[int, ...]          # starts[0] == 0, strictly increasing
    owners: tuple[int, ...]          # owners[i] owns [starts[i], starts[i+1])
    groups: tuple[int, ...]          # every live group, owning key space or not, sorted
    # The initial hosts of groups created online (groups of cluster.toml are
    # placed by the configuration): group -> host names, node id i+1 on the
    # i-th [[host]] as everywhere.
    placements: dict[int, tuple[str, ...]] = field(default_factory=dict)
    # Groups removed from the cluster: their numbers are never used again
    # (their replicas' tombstones would stop a new group of that number).
    retired: tuple[int, ...] = ()
    # The incarnation of each group created online (random, made when it was
    # placed): its replicas refuse frames of another life of the group
    # (docs/security.md). Groups of cluster.toml have theirs in the
    # cluster's recorded initial placement.
    incarnations: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epoch < 1:
            raise ShardMapError("epoch must be >= 1")
        if not self.starts or self.starts[0] != 0 or len(self.starts) != len(self.owners):
            raise ShardMapError("a shard map's ranges must start at 0, one owner each")
        if any(b <= a for a, b in zip(self.starts, self.starts[1:])) or self.starts[-1] >= SPACE:
            raise ShardMapError("range starts must increase strictly and stay below 2**64")
        if not set(self.owners) <= set(self.groups):
            raise ShardMapError("a range is owned by a group that is not in the map")
        if set(self.retired) & set(self.groups):
            raise ShardMapError("a retired group is still in the map")

    # --- Building -------------------------------------------------------------

    @classmethod
    def build(cls, groups: int, virtual_nodes: int, epoch: int = 1) -> ShardMap:
        """The consistent-hash ring of cluster.toml, as ranges."""
        if groups < 1 or virtual_nodes < 1:
            raise ValueError("a shard map needs at least one group and one virtual node per group")
        ring = sorted(
            (stable_hash(b"group-%d/vnode-%d" % (group, vnode)), group)
            for group in range(groups)
            for vnode in range(virtual_nodes)
        )
        # Point p owns (previous point, p]; the first point also owns the
        # positions after the last one (the wrap).
        starts, owners = [0], [ring[0][1]]
        for (point, _), (_, next_owner) in zip(ring, ring[1:] + [(None, ring[0][1])]):
            if point + 1 < SPACE:
                starts.append(point + 1)
                owners.append(next_owner)
        return cls._normalized(epoch, starts, owners, tuple(range(groups)), {})

    @classmethod
    def _normalized(cls, epoch: int, starts: list[int], owners: list[int], groups: Iterable[int],
                    placements: dict[int, tuple[str, ...]], retired: tuple[int, ...] = (),
                    incarnations: dict[int, int] | None = None) -> ShardMap:
        merged_starts: list[int] = []
        merged_owners: list[int] = []
        for start, owner in sorted(zip(starts, owners)):
            if merged_starts and merged_starts[-1] == start:
                raise ShardMapError("two ranges start at the same position")
            if merged_owners and merged_owners[-1] == owner:
                continue
            merged_starts.append(start)
            merged_owners.append(owner)
        return cls(epoch, tuple(merged_starts), tuple(merged_owners), tuple(sorted(set(groups))), dict(placements),
                   retired, dict(incarnations or {}))

    # --- Lookups --------------------------------------------------------------

    def group_for(self, key: bytes) -> int:
        return self.owners[bisect.bisect_right(self.starts, stable_hash(key)) - 1]

    def ranges(self) -> Iterator[tuple[KeyRange, int]]:
        ends = self.starts[1:] + (SPACE,)
        for start, end, owner in zip(self.starts, ends, self.owners):
            yield KeyRange(start, end), owner

    def owned_by(self, group: int) -> RangeSet:
        return RangeSet(r for r, owner in self.ranges() if owner == group)

    @property
    def next_group(self) -> int:
        """The number a new group gets: above every group there ever was."""
        return max((*self.groups, *self.retired)) + 1

    def share(self, group: int) -> float:
        """The fraction of the key space `group` owns."""
        return self.owned_by(group).size / SPACE

    # --- Changes (each returns a new map with epoch + 1) ----------------------

    def with_group(self, group: int, hosts: tuple[str, ...], incarnation: int | None = None) -> ShardMap:
        """A new, empty group placed on `hosts`, with its incarnation (default: a new random one)."""
        if group in self.groups or group in self.retired:
            raise ShardMapError(f"group {group} exists or existed")
        if incarnation is None:
            from ..storage.incarnation import random_id     # not at import: clients read maps, never make groups

            incarnation = random_id()
        if not 0 < incarnation < 1 << 63:
            raise ShardMapError(f"a group's incarnation is a positive 63-bit integer, not {incarnation}")
        return ShardMap(self.epoch + 1, self.starts, self.owners, tuple(sorted({*self.groups, group})),
                        {**self.placements, group: tuple(hosts)}, self.retired,
                        {**self.incarnations, group: incarnation})

    def without_group(self, group: int) -> ShardMap:
        if self.owned_by(group):
            raise ShardMapError(f"group {group} still owns key space")
        placements = {g: h for g, h in self.placements.items() if g != group}
        incarnations = {g: i for g, i in self.incarnations.items() if g != group}
        return ShardMap(self.epoch + 1, self.starts, self.owners, tuple(g for g in self.groups if g != group),
                        placements, tuple(sorted({*self.retired, group})), incarnations)

    def with_move(self, move: Move) -> ShardMap:
        """`move.ranges` (all owned by move.source) now belong to move.target."""
        if not self.owned_by(move.source).covers(move.ranges):
            raise ShardMapError(f"group {move.source} does not own all of the moving ranges")
        if move.target not in self.groups:
            raise ShardMapError(f"group {move.target} is not in the map")
        cuts = sorted({*self.starts, *(r.start for r in move.ranges), *(r.end for r in move.ranges if r.end < SPACE)})
        moving = move.ranges
        owners = [move.target if start in moving else self._owner_at(start) for start in cuts]
        return self._normalized(self.epoch + 1, cuts, owners, self.groups, self.placements, self.retired,
                                self.incarnations)

    def _owner_at(self, position: int) -> int:
        return self.owners[bisect.bisect_right(self.starts, position) - 1]

    # --- Plans ------------------------------------------------------------------

    def plan_add(self, new_group: int) -> list[Move]:
        """Moves that give `new_group` a fair share: each group gives the tail
        1/(n+1) of each of its ranges, so every group keeps n/(n+1) of what it
        had and the new one gets 1/(n+1) of the space."""
        donors = [g for g in self.groups if g != new_group and self.owned_by(g)]
        total = len(donors) + 1
        moves = []
        for donor in donors:
            taken = []
            for r in self.owned_by(donor):
                cut = r.end - r.size // total
                if cut < r.end:
                    taken.append(KeyRange(cut, r.end))
            if taken:
                moves.append(Move(donor, new_group, RangeSet(taken)))
        return moves

    def plan_remove(self, group: int) -> list[Move]:
        """Moves that hand `group`'s ranges to the other groups, each range to
        the group that owns the least at that point."""
        others = [g for g in self.groups if g != group]
        if not others:
            raise ShardMapError("the last group cannot be removed")
        owned = {g: self.owned_by(g).size for g in others}
        received: dict[int, list[KeyRange]] = {g: [] for g in others}
        for r in sorted(self.owned_by(group), key=lambda r: -r.size):
            target = min(others, key=lambda g: (owned[g], g))
            received[target].append(r)
            owned[target] += r.size
        return [Move(group, g, RangeSet(rs)) for g, rs in received.items() if rs]

    # --- Wire format (the metadata group's value) --------------------------------

    def encode(self) -> bytes:
        fields: tuple = (MAP_FORMAT_VERSION, self.epoch, list(self.starts), list(self.owners), list(self.groups),
                         {g: list(self.placements[g]) for g in sorted(self.placements)}, list(self.retired))
        if self.incarnations:
            # An eighth field only when a group has one: a map without keeps
            # the bytes an earlier version reads.
            fields += ({g: self.incarnations[g] for g in sorted(self.incarnations)},)
        return msgpack.packb(fields, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> ShardMap:
        try:
            fields = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises several unrelated types on garbage
            raise ShardMapError(f"shard map: not msgpack: {exc}") from None
        if not isinstance(fields, list) or len(fields) not in (6, 7, 8) or fields[0] != MAP_FORMAT_VERSION:
            raise ShardMapError("shard map: unknown format")
        _, epoch, starts, owners, groups, placements = fields[:6]
        retired = fields[6] if len(fields) >= 7 else []
        incarnations = fields[7] if len(fields) == 8 else {}
        if not isinstance(incarnations, dict) or not all(
                type(g) is int and type(i) is int and 0 < i < 1 << 63 for g, i in incarnations.items()):
            raise ShardMapError("shard map: group incarnations must map groups to positive integers")
        if not isinstance(retired, list) or not all(type(g) is int for g in retired):
            raise ShardMapError("shard map: retired groups must be integers")
        if not (type(epoch) is int and all(isinstance(x, list) for x in (starts, owners, groups))
                and isinstance(placements, dict)):
            raise ShardMapError("shard map: wrong field types")
        if not all(type(x) is int for x in (*starts, *owners, *groups, *placements)):
            raise ShardMapError("shard map: integers expected")
        if not all(isinstance(h, list) and all(isinstance(n, str) for n in h) for h in placements.values()):
            raise ShardMapError("shard map: placements must be lists of host names")
        return cls(epoch, tuple(starts), tuple(owners), tuple(groups), {g: tuple(h) for g, h in placements.items()},
                   tuple(retired), dict(incarnations))


def initial_ownership(groups: int, virtual_nodes: int, group: int, *, metadata: bool = False) -> RangeSet | None:
    """What a group's state machine owns before any move changed it: its
    ranges of the cluster's first map (none for a group created online), or
    everything (None) for the metadata group."""
    if metadata:
        return None
    if group >= groups:
        return RangeSet()
    return ShardMap.build(groups, virtual_nodes).owned_by(group)
