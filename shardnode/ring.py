"""Consistent hashing: which group owns a key.

Each group owns `virtual_nodes` points on a ring of 64-bit positions; a key
belongs to the group owning the first point at or after the key's position
(wrapping around). The hash is specified, not Python's `hash()` (which is
salted per process): BLAKE2b with an 8-byte digest, read as a big-endian
unsigned integer. A group's point v is the hash of b"group-G/vnode-V".
Every router and client computes the same map from the same
(groups, virtual_nodes), and the map carries an epoch so that a later change
(moving ranges, adding groups) can be told apart from the one a router has.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass


def stable_hash(data: bytes) -> int:
    """The ring position of `data`: BLAKE2b-64, big-endian."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


@dataclass(slots=True, frozen=True)
class ShardMap:
    epoch: int
    groups: int
    virtual_nodes: int
    points: tuple[int, ...]     # sorted ring positions
    owners: tuple[int, ...]     # owners[i] is the group of points[i]

    @classmethod
    def build(cls, groups: int, virtual_nodes: int, epoch: int = 1) -> "ShardMap":
        if groups < 1 or virtual_nodes < 1:
            raise ValueError("a shard map needs at least one group and one virtual node per group")
        ring = sorted(
            (stable_hash(b"group-%d/vnode-%d" % (group, vnode)), group)
            for group in range(groups)
            for vnode in range(virtual_nodes)
        )
        return cls(epoch, groups, virtual_nodes, tuple(p for p, _ in ring), tuple(g for _, g in ring))

    def group_for(self, key: bytes) -> int:
        position = bisect.bisect_left(self.points, stable_hash(key))
        return self.owners[position % len(self.points)]
