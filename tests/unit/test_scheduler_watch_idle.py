"""The router's scheduler watch (placement/scheduler_watch.py) while nothing is
recorded: it watches the intents and the moves instead of reading them every
poll, looks again as soon as the watch reports a change, polls while work is
recorded, and polls and subscribes again once the watch broke."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shardnode.config import ClusterConfig
from shardnode.keyspace import KeyRange, RangeSet
from shardnode.placement import scheduler_watch as module
from shardnode.placement.intents import INTENTS_KEY
from shardnode.placement.metadata_watch import WatchBroken
from shardnode.placement.moves import MOVES_KEY, MoveRecord, encode_moves
from shardnode.placement.scheduler_watch import SchedulerWatch
from tests.unit.metadata_watch_fakes import FakeWatches, until

ROOT = Path(__file__).resolve().parents[2]
POLL = 0.02
A_MOVE = encode_moves([MoveRecord(7, 0, 1, RangeSet([KeyRange(0, 1 << 32)]))])


class FakeDirectory:
    def __init__(self) -> None:
        self.moves: bytes | None = None
        self.reads = 0
        self.leader_address: str | None = None

    async def read_many(self, keys: tuple[bytes, ...]) -> tuple[bytes | None, ...]:
        assert keys == (INTENTS_KEY, MOVES_KEY)
        self.reads += 1
        return None, self.moves

    async def close(self) -> None:
        pass


class FakeScheduler:
    lease = None

    async def take_over_stalled(self, stalled) -> bool:  # type: ignore[no-untyped-def]
        return await stalled()          # never stalled here: the work keeps changing or is new


@pytest.fixture
def setting(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeDirectory, FakeWatches]:
    directory, watches = FakeDirectory(), FakeWatches()
    monkeypatch.setattr(module, "ShardDirectory", lambda cluster, host: directory)
    monkeypatch.setattr(module, "ClusterHands", lambda cluster, control: None)
    monkeypatch.setattr(module, "make_scheduler", lambda hands, directory, holder: FakeScheduler())
    monkeypatch.setattr(module, "MetadataWatch", watches.watch)
    monkeypatch.setattr(SchedulerWatch, "missing_credential", lambda self: "")
    return directory, watches


def _run(scenario) -> None:  # type: ignore[no-untyped-def]
    async def run() -> None:
        cluster = ClusterConfig.load(ROOT / "etc" / "cluster.toml")
        watch = SchedulerWatch(cluster, "host1", poll_seconds=POLL, idle_check_seconds=0.4)
        watch.start()
        try:
            await scenario()
        finally:
            await watch.close()

    asyncio.run(run())


def test_nothing_recorded_is_watched_not_polled_and_a_change_is_looked_at_at_once(  # type: ignore[no-untyped-def]
        setting) -> None:
    directory, watches = setting

    async def scenario() -> None:
        await until(lambda: directory.reads == 1)
        assert watches.opened[0][1] == (INTENTS_KEY, MOVES_KEY) and len(watches.live) == 1
        await asyncio.sleep(10 * POLL)
        assert directory.reads == 1                      # ten polls: no read
        directory.moves = A_MOVE
        watches.report()
        await until(lambda: directory.reads == 2)
        await asyncio.sleep(10 * POLL)                   # work recorded: polled again
        assert directory.reads >= 6
        directory.moves = None
        await asyncio.sleep(3 * POLL)
        reads = directory.reads
        await asyncio.sleep(10 * POLL)
        assert directory.reads <= reads + 1              # idle again
        await until(lambda: directory.reads >= reads + 2, timeout=1.0)    # the idle check (0.4 s)

    _run(scenario)


def test_a_broken_watch_means_polling_and_subscribing_again(setting) -> None:  # type: ignore[no-untyped-def]
    directory, watches = setting

    async def scenario() -> None:
        await until(lambda: len(watches.live) == 1 and directory.reads == 1)
        watches.refuse = True
        watches.report(WatchBroken("stream ended"))
        await asyncio.sleep(10 * POLL)
        assert directory.reads >= 5 and len(watches.opened) >= 5      # a subscription tried before each read
        watches.refuse = False
        await until(lambda: len(watches.live) == 1)
        await asyncio.sleep(3 * POLL)
        reads = directory.reads
        await asyncio.sleep(10 * POLL)
        assert directory.reads == reads

    _run(scenario)


def test_the_watch_moves_to_the_leader_once_a_read_finds_another_one(setting) -> None:  # type: ignore[no-untyped-def]
    directory, watches = setting

    async def scenario() -> None:
        await until(lambda: len(watches.live) == 1 and directory.reads == 1)
        directory.leader_address = "127.0.0.4:50116"
        watches.report()
        await until(lambda: len(watches.opened) == 2 and len(watches.live) == 1)
        assert watches.opened[1][0] == "127.0.0.4:50116"

    _run(scenario)
