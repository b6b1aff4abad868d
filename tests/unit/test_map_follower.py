"""The router's MapFollower with a fake metadata group: the map at start
(saved, else cluster.toml's), adopting newer maps only, saving them, and
refreshes that share one read."""

from __future__ import annotations

import asyncio
from pathlib import Path

from shardnode.config import ClusterConfig
from shardnode.errors import Unavailable
from shardnode.placement.shard_map import ShardMap
from shardnode.routing.map_follower import MapFollower
from shardnode.placement import initial_map
from shardnode.access.rules import AUTH_KEY
from shardnode.placement.directory import SHARD_MAP_KEY


def _cluster(tmp_path: Path) -> ClusterConfig:
    return ClusterConfig.from_dict({
        "cluster": {"name": "follow", "replicas": 3, "groups": 2, "virtual_nodes": 8, "data_dir": str(tmp_path)},
        "host": [{"name": f"h{i}", "address": f"127.0.0.{i}", "router_port": 50051, "worker_port_base": 50100,
                  "metrics_port": 9090} for i in (1, 2, 3)],
    })


class FakeDirectory:
    def __init__(self) -> None:
        self.value: bytes | None = None
        self.reads = 0
        self.down = False
        self.gate: asyncio.Event | None = None

    async def read(self, key: bytes) -> bytes | None:
        assert key == SHARD_MAP_KEY
        self.reads += 1
        value = self.value              # the read's linearization point: when it starts
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise Unavailable("metadata group down")
        return value

    async def read_many(self, keys: tuple[bytes, ...]) -> tuple[bytes | None, ...]:
        # The map and the access rules come in one read (the rules are absent here).
        assert keys == (SHARD_MAP_KEY, AUTH_KEY)
        return await self.read(SHARD_MAP_KEY), None

    async def close(self) -> None:
        pass


def _follower(cluster: ClusterConfig, adopted: list[ShardMap]) -> tuple[MapFollower, FakeDirectory]:
    async def adopt(new: ShardMap) -> None:
        adopted.append(new)

    follower = MapFollower(cluster, "h1", adopt)
    fake = FakeDirectory()
    follower._directory = fake  # type: ignore[assignment]
    return follower, fake


def test_start_with_the_saved_map_else_cluster_tomls(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    initial = initial_map(cluster)
    assert _follower(cluster, [])[0].shard_map == initial
    saved = initial.with_group(2, ("h1", "h2", "h3"))
    path = cluster.shard_map_file("h1")
    path.parent.mkdir(parents=True)
    path.write_bytes(saved.encode())
    assert _follower(cluster, [])[0].shard_map == saved
    path.write_bytes(b"\x00 not a map")
    assert _follower(cluster, [])[0].shard_map == initial


def test_newer_maps_are_adopted_and_saved_older_ones_ignored(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    adopted: list[ShardMap] = []
    follower, fake = _follower(cluster, adopted)
    initial = follower.shard_map
    two = initial.with_group(2, ("h1", "h2"))
    three = two.with_group(3, ("h3",))

    async def run() -> None:
        assert await follower.refresh() == initial and not adopted   # nothing written yet
        assert follower.loaded
        fake.value = two.encode()
        assert await follower.refresh() == two and adopted == [two]
        assert await follower.refresh() == two and adopted == [two]  # same bytes: nothing to do
        fake.value = initial.encode()                                  # an older map never replaces a newer
        assert await follower.refresh() == two
        fake.down = True                                               # unreachable: route with what we have
        assert await follower.refresh() == two
        fake.down = False
        fake.value = three.encode()
        assert await follower.refresh() == three and adopted == [two, three]
        await follower.close()

    asyncio.run(run())
    assert ShardMap.decode(cluster.shard_map_file("h1").read_bytes()) == three


def test_refreshes_arriving_together_share_one_read_that_starts_after_them(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    follower, fake = _follower(cluster, [])
    two = follower.shard_map.with_group(2, ("h1",))

    async def run() -> None:
        fake.gate = asyncio.Event()
        first = asyncio.ensure_future(follower.refresh())
        await asyncio.sleep(0.01)
        assert fake.reads == 1                      # a read in flight (it may miss a change made now)
        fake.value = two.encode()
        waiting = [asyncio.ensure_future(follower.refresh()) for _ in range(20)]
        await asyncio.sleep(0.01)
        fake.gate.set()
        assert (await first).epoch == 1
        assert all(m == two for m in await asyncio.gather(*waiting))
        assert fake.reads == 2                      # the twenty shared the next read
        await follower.close()

    asyncio.run(run())
