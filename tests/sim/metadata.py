"""An in-memory metadata group for tests and simulations: keys and values,
linearizable compare-and-set with guards (as ReplicaStore applies a CAS with
guards), and the shard map on top (DirectoryPort of shardnode/placement).

Every call answers at once (no await suspends), so a simulation can drive
coroutines that use it without an event loop (tests.sim.moves.drive)."""

from __future__ import annotations

from shardnode.placement.directory import MapConflict
from shardnode.placement.shard_map import ShardMap

SHARD_MAP_KEY = b"shard_map"


class InMemoryMetadata:
    def __init__(self, initial: ShardMap | None = None) -> None:
        self.values: dict[bytes, bytes] = {}
        self.initial = initial
        self.writes = 0

    async def read(self, key: bytes, timeout: float | None = None) -> bytes | None:
        return self.values.get(key)

    async def compare_and_set(self, key: bytes, expected: bytes | None, new: bytes, timeout: float | None = None,
                              guards: tuple[tuple[bytes, bytes | None], ...] = ()) -> tuple[bool, bytes | None]:
        current = self.values.get(key)
        if current != expected or any(self.values.get(k) != v for k, v in guards):
            return False, current
        self.values[key] = new
        self.writes += 1
        return True, new

    async def load_map(self, timeout: float | None = None) -> ShardMap:
        raw = self.values.get(SHARD_MAP_KEY)
        if raw is None:
            assert self.initial is not None, "no shard map"
            return self.initial
        return ShardMap.decode(raw)

    async def update_map(self, old: ShardMap, new: ShardMap, timeout: float | None = None,
                         guards: tuple[tuple[bytes, bytes | None], ...] = ()) -> ShardMap:
        stored = self.values.get(SHARD_MAP_KEY)
        current = ShardMap.decode(stored) if stored is not None else self.initial
        if current != old:
            raise MapConflict("the shard map changed meanwhile", current)
        swapped, _ = await self.compare_and_set(SHARD_MAP_KEY, stored, new.encode(), guards=guards)
        if not swapped:
            raise MapConflict("a guard of the map update failed", current)
        return new

    async def close(self) -> None:
        return None
