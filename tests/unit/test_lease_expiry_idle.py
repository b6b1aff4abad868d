"""A router's etcd lease expiry rounds (etcd/leases.py) while no lease exists:
none but at the watched idle interval while the watch on the lease records
holds, one at once when a record changes, every EXPIRY_INTERVAL while leases
exist, and every IDLE_EXPIRY_INTERVAL when no watch can be had."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shardnode.config import ClusterConfig
from shardnode.etcd import leases as module
from shardnode.etcd.lease_records import LEASE_PREFIX, LEASE_PREFIX_END
from shardnode.etcd.leases import Leases
from shardnode.placement.metadata_watch import WatchBroken
from tests.unit.metadata_watch_fakes import FakeWatches, until

ROOT = Path(__file__).resolve().parents[2]
TICK = 0.02


@pytest.fixture
def watches(monkeypatch: pytest.MonkeyPatch) -> FakeWatches:
    fakes = FakeWatches()
    monkeypatch.setattr(module, "MetadataWatch", fakes.watch)
    monkeypatch.setattr(module, "EXPIRY_INTERVAL", TICK)
    monkeypatch.setattr(module, "IDLE_EXPIRY_INTERVAL", 2 * TICK)
    monkeypatch.setattr(module, "WATCHED_IDLE_EXPIRY_INTERVAL", 20 * TICK)
    return fakes


def _run(scenario) -> None:  # type: ignore[no-untyped-def]
    async def run() -> None:
        leases = Leases(ClusterConfig.load(ROOT / "etc" / "cluster.toml"), "host1", core=None)  # type: ignore[arg-type]
        existing = [0]
        leases.rounds = 0  # type: ignore[attr-defined]

        async def expire_once() -> tuple[list[int], int]:
            leases.rounds += 1  # type: ignore[attr-defined]
            return [], existing[0]

        leases.expire_once = expire_once  # type: ignore[method-assign]
        leases.start()
        try:
            await scenario(leases, existing)
        finally:
            await leases.close()

    asyncio.run(run())


def test_no_lease_means_no_round_until_a_record_changes(watches: FakeWatches) -> None:
    async def scenario(leases: Leases, existing: list[int]) -> None:
        await until(lambda: leases.rounds == 1)
        assert watches.opened[0][1] == ((LEASE_PREFIX, LEASE_PREFIX_END),)
        await asyncio.sleep(10 * TICK)
        assert leases.rounds == 1                   # five idle intervals without a watch: no round
        existing[0] = 1                             # a lease granted (through any router)
        watches.report()
        await until(lambda: leases.rounds == 2)
        await asyncio.sleep(10 * TICK)
        assert leases.rounds >= 6                   # a lease exists: a round every EXPIRY_INTERVAL
        existing[0] = 0
        await asyncio.sleep(3 * TICK)
        rounds = leases.rounds
        await asyncio.sleep(10 * TICK)
        assert leases.rounds <= rounds + 1
        await until(lambda: leases.rounds >= rounds + 2, timeout=1.0)    # the watched idle interval

    _run(scenario)


def test_without_a_watch_the_idle_rounds_go_on(watches: FakeWatches) -> None:
    async def scenario(leases: Leases, existing: list[int]) -> None:
        await until(lambda: leases.rounds == 1 and len(watches.live) == 1)
        watches.refuse = True
        watches.report(WatchBroken("stream ended"))
        await asyncio.sleep(20 * TICK)
        assert leases.rounds >= 6 and len(watches.opened) >= 6      # subscribing again before each round
        watches.refuse = False
        await until(lambda: len(watches.live) == 1)
        await asyncio.sleep(3 * TICK)
        rounds = leases.rounds
        await asyncio.sleep(10 * TICK)
        assert leases.rounds == rounds

    _run(scenario)
