"""How often the router's group monitor probes a group (routing/probe_schedule.py):
less and less while the group is idle and healthy, every tick again as soon
as it is used or anything changes, and fail fast kept (two probes a tick
apart find the majority gone)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from shardnode.config import ClusterConfig
from shardnode.proto import worker_pb2 as wpb
from shardnode.routing import monitor as monitor_module
from shardnode.routing.forwarder import ChannelPool, GroupForwarder
from shardnode.routing.monitor import GroupMonitor, GroupView
from shardnode.routing.probe_schedule import ProbeSchedule

ROOT = Path(__file__).resolve().parents[2]
TICK = 0.05
IDLE = 8 * TICK


def test_steady_probes_double_the_interval_up_to_the_longest_and_anything_else_resets_it() -> None:
    schedule = ProbeSchedule(1.0, 8.0)
    assert schedule.due(0.0, 0, busy=False)                 # never probed
    intervals = []
    for at in range(6):
        schedule.probed(float(at), steady=True, calls=0)
        intervals.append(schedule.interval)
    assert intervals == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert not schedule.due(5.0 + 7.0, 0, busy=False) and schedule.due(5.0 + 7.5, 0, busy=False)
    assert schedule.due(6.0, 1, busy=False)                 # a call sent since the last probe
    assert schedule.due(6.0, 0, busy=True)                  # operations waiting or in flight
    schedule.probed(6.0, steady=True, calls=1)              # same picture, but calls were sent
    assert schedule.interval == 1.0
    schedule.probed(7.0, steady=True, calls=1)
    schedule.probed(8.0, steady=False, calls=1)             # a change, an unhealthy group
    assert schedule.interval == 1.0


class FakeProbes:
    """probe_group's stand-in: the replicas in `down` do not answer; node 1 leads."""

    def __init__(self) -> None:
        self.down: set[int] = set()
        self.probes: list[float] = []

    async def probe(self, cluster: ClusterConfig, channels: ChannelPool, group: int,
                    timeout: float = 0.5, known: object = None) -> GroupView:
        replicas = cluster.group_replicas(group)
        self.probes.append(time.monotonic())
        answers = tuple(None if r.node_id in self.down else
                        wpb.StatusResponse(role="leader" if r.node_id == replicas[0].node_id else "follower",
                                           term=3, node_id=r.node_id) for r in replicas)
        return GroupView(group, replicas, answers, time.monotonic())


@pytest.fixture
def cluster() -> ClusterConfig:
    return ClusterConfig.load(ROOT / "etc" / "cluster.toml")       # 5 replicas per group


def _run(cluster: ClusterConfig, monkeypatch: pytest.MonkeyPatch, scenario) -> None:  # type: ignore[no-untyped-def]
    fake = FakeProbes()
    monkeypatch.setattr(monitor_module, "probe_group", fake.probe)

    async def run() -> None:
        forwarder = GroupForwarder(cluster, 0, ChannelPool(), "host1")
        monitor = GroupMonitor(cluster, ChannelPool(), {0: forwarder}, interval=TICK, idle_interval=IDLE)
        monitor.start()
        try:
            await scenario(fake, forwarder)
        finally:
            await monitor.close()

    asyncio.run(run())


def test_an_idle_healthy_group_is_probed_less_and_a_call_brings_the_probes_back(
        cluster: ClusterConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(fake: FakeProbes, forwarder: GroupForwarder) -> None:
        await asyncio.sleep(30 * TICK)
        # Every tick would be 30 probes; backing off to IDLE (8 ticks): 1, 2, 4, 8, 8... about 7.
        assert 4 <= len(fake.probes) <= 12
        gaps = [b - a for a, b in zip(fake.probes, fake.probes[1:])]
        assert max(gaps) >= IDLE - TICK
        forwarder.stats.calls += 1         # the group is used
        used = time.monotonic()
        count = len(fake.probes)
        await asyncio.sleep(2.5 * TICK)
        assert len(fake.probes) > count and fake.probes[count] - used <= 2 * TICK

    _run(cluster, monkeypatch, scenario)


def test_a_replica_lost_while_idle_is_followed_every_tick_and_fails_fast(
        cluster: ClusterConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(fake: FakeProbes, forwarder: GroupForwarder) -> None:
        await asyncio.sleep(20 * TICK)     # backed off
        members = [r.node_id for r in forwarder.members]
        fake.down = set(members[2:])       # three of five gone: no majority
        lost = time.monotonic()
        await asyncio.sleep(IDLE + 3 * TICK)
        # Seen at the next probe due (at most IDLE later), then every tick: two probes in a row.
        assert forwarder.no_quorum_now()
        after = [t for t in fake.probes if t > lost]
        assert len(after) >= 3 and max(b - a for a, b in zip(after[1:], after[2:])) <= 2 * TICK
        fake.down = set(members[4:])       # back to four of five: a member still missing
        await asyncio.sleep(5 * TICK)
        count = len(fake.probes)
        await asyncio.sleep(5 * TICK)
        assert len(fake.probes) - count >= 3 and not forwarder.no_quorum_now()

    _run(cluster, monkeypatch, scenario)
