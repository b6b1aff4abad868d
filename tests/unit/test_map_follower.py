"""The router's MapFollower with a fake metadata group: the map at start
(saved, else cluster.toml's), adopting newer maps only, saving them,
refreshes that share one read, and following the map by a watch (reads only
when it reports a change, after each subscription and at the safety
interval; polling while no watch can be had)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from shardnode.config import ClusterConfig
from shardnode.errors import Unavailable
from shardnode.placement.shard_map import ShardMap
from shardnode.routing.map_follower import MapFollower
from shardnode.placement.metadata_watch import WatchBroken
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
        self.leader_address: str | None = None

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


class FakeWatch:
    """MetadataWatch's surface, driven by the test: `refuse` fails the next
    subscriptions, `report` tells the follower that a key changed, `breaks`
    ends the stream."""

    def __init__(self, address: str, watches: "FakeWatches") -> None:
        self.address = address
        self._watches = watches
        self.news: asyncio.Queue[bool | WatchBroken] = asyncio.Queue()

    async def start(self) -> None:
        if self._watches.refuse:
            raise WatchBroken(f"{self.address}: refused")
        self._watches.live.append(self)

    async def wait(self, timeout: float) -> bool:
        try:
            news = await asyncio.wait_for(self.news.get(), timeout)
        except TimeoutError:
            return False
        if isinstance(news, WatchBroken):
            raise news
        return True

    async def close(self) -> None:
        if self in self._watches.live:
            self._watches.live.remove(self)


class FakeWatches:
    def __init__(self) -> None:
        self.refuse = False
        self.live: list[FakeWatch] = []
        self.opened: list[str] = []

    def open(self, address: str) -> FakeWatch:
        self.opened.append(address)
        return FakeWatch(address, self)

    def report(self) -> None:
        for watch in self.live:
            watch.news.put_nowait(True)

    def breaks(self) -> None:
        for watch in self.live:
            watch.news.put_nowait(WatchBroken("stream ended"))


def _follower(cluster: ClusterConfig, adopted: list[ShardMap], **kwargs: float) -> tuple[MapFollower, FakeDirectory]:
    async def adopt(new: ShardMap) -> None:
        adopted.append(new)

    follower = MapFollower(cluster, "h1", adopt, **kwargs)
    fake = FakeDirectory()
    follower._directory = fake  # type: ignore[assignment]
    return follower, fake


def _watched(cluster: ClusterConfig, adopted: list[ShardMap], **kwargs: float
             ) -> tuple[MapFollower, FakeDirectory, FakeWatches]:
    follower, fake = _follower(cluster, adopted, **kwargs)
    watches = FakeWatches()
    follower._open_watch = watches.open  # type: ignore[method-assign]
    return follower, fake, watches


async def _until(condition, timeout: float = 2.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


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


def test_with_a_watch_the_map_is_read_after_subscribing_and_on_each_change_only(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    adopted: list[ShardMap] = []
    follower, fake, watches = _watched(cluster, adopted, interval=0.02)
    two = follower.shard_map.with_group(2, ("h1", "h2"))
    three = two.with_group(3, ("h3",))

    async def run() -> None:
        fake.value = two.encode()        # changed before the router subscribed: no watch reports it
        follower.start()
        await _until(lambda: adopted == [two])
        assert fake.reads == 1 and follower.watching == watches.opened[0]
        await asyncio.sleep(0.2)         # ten poll intervals: no read while nothing changes
        assert fake.reads == 1
        fake.value = three.encode()
        watches.report()
        await _until(lambda: adopted == [two, three])
        assert fake.reads == 2 and len(watches.opened) == 1
        await follower.close()
        assert not watches.live

    asyncio.run(run())


def test_a_broken_watch_falls_back_to_polling_then_watches_again(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    adopted: list[ShardMap] = []
    follower, fake, watches = _watched(cluster, adopted, interval=0.02)
    two = follower.shard_map.with_group(2, ("h1", "h2"))

    async def run() -> None:
        follower.start()
        await _until(lambda: len(watches.live) == 1)
        watches.refuse = True
        watches.breaks()                 # e.g. the watched replica stopped
        await _until(lambda: len(watches.opened) >= 4)     # subscribing again at each poll
        reads = fake.reads
        fake.value = two.encode()        # a change while no watch holds: a poll finds it
        await _until(lambda: adopted == [two])
        assert fake.reads > reads and follower.watching is None
        # Subscriptions go round the metadata group's replicas while its leader is unknown.
        assert {a for a in watches.opened} == {r.address for r in cluster.meta_group_replicas()}
        watches.refuse = False
        await _until(lambda: len(watches.live) == 1)
        await asyncio.sleep(0.05)
        reads = fake.reads
        await asyncio.sleep(0.2)
        assert fake.reads == reads       # watching again: polling stopped
        await follower.close()

    asyncio.run(run())


def test_the_watch_subscribes_to_the_leader_known_and_reads_at_the_safety_interval(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    follower, fake, watches = _watched(cluster, [], interval=0.02, safety_interval=0.1)
    fake.leader_address = "127.0.0.3:50116"

    async def run() -> None:
        follower.start()
        await _until(lambda: fake.reads >= 4, timeout=1.0)    # one after subscribing, then one per 0.1 s
        assert watches.opened == ["127.0.0.3:50116"]
        await follower.close()

    asyncio.run(run())


def test_the_watch_moves_to_the_leader_once_a_read_finds_another_one(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    follower, fake, watches = _watched(cluster, [], interval=0.02)
    first = cluster.meta_group_replicas()[0].address

    async def run() -> None:
        follower.start()
        await _until(lambda: follower.watching == first)      # no leader known yet: the first replica
        fake.leader_address = "127.0.0.2:50116"                # a read found the leader elsewhere
        watches.report()
        await _until(lambda: follower.watching == "127.0.0.2:50116")
        assert len(watches.live) == 1 and watches.opened == [first, "127.0.0.2:50116"]
        await follower.close()

    asyncio.run(run())


def test_a_failed_read_while_watching_is_retried_at_the_poll_interval(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    adopted: list[ShardMap] = []
    follower, fake, watches = _watched(cluster, adopted, interval=0.02)
    two = follower.shard_map.with_group(2, ("h1", "h2"))

    async def run() -> None:
        fake.down = True                 # the watch is in place, the leader does not answer reads
        fake.value = two.encode()
        follower.start()
        await _until(lambda: fake.reads >= 3)
        assert len(watches.live) == 1 and not adopted
        fake.down = False
        await _until(lambda: adopted == [two])
        await follower.close()

    asyncio.run(run())
