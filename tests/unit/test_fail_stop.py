"""Fail-stop of a replica driver: a storage fault in its essential work trips
it at once, fails every waiting request (outcome unknown, never acked), and
it answers nothing afterwards. The process-level exit is tested with real
workers on the lazy filesystem (tests/integration/test_power_loss.py)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from shardnode.config import ClusterConfig
from shardnode.errors import Unavailable
from shardnode.failstop import FailStop, describe
from shardnode.replica.driver import ReplicaDriver
from shardnode.storage import Command, CommandOp, ReplicaStore, StorageFault


def _single_replica_cluster(tmp_path: Path, snapshot_threshold: int = 10_000) -> ClusterConfig:
    return ClusterConfig.from_dict({
        "cluster": {"name": "failstop", "replicas": 1, "groups": 1, "data_dir": str(tmp_path),
                    "snapshot_threshold": snapshot_threshold},
        "timing": {"tick_ms": 10, "election_ticks": 3, "heartbeat_ticks": 1},
        "host": [{"name": "h1", "address": "127.0.0.1", "router_port": 1, "worker_port_base": 5, "metrics_port": 3,
                  "supervisor_port": 4}],
    })


def _put(key: bytes, sequence: int) -> Command:
    return Command(CommandOp.PUT, key, b"v", client_id=7, sequence=sequence, timestamp_ms=1)


def _single_replica(tmp_path: Path, snapshot_threshold: int = 10_000) -> tuple[ReplicaDriver, ReplicaStore]:
    cluster = _single_replica_cluster(tmp_path, snapshot_threshold)
    replica = cluster.replica(0, "h1")
    store = ReplicaStore.open(cluster.worker_data_dir("h1", 0), initial_voters=(replica.node_id,))
    return ReplicaDriver(cluster, replica, store), store


async def _until_leader(driver: ReplicaDriver) -> None:
    for _ in range(200):
        if driver.is_leader:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("a single replica did not elect itself")


async def _drive_until_fault(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    driver, store = _single_replica(tmp_path)
    await driver.start()
    try:
        await _until_leader(driver)
        assert (await driver.write([_put(b"a", 1)], timeout=5))[0].existed is False

        real_persist = store.persist

        def failing_persist(*args, **kwargs):  # the disk fills up
            raise StorageFault("RocksDB write failed: IO error: No space left on device")

        store.persist = failing_persist  # type: ignore[method-assign]
        with pytest.raises(Unavailable):
            await driver.write([_put(b"b", 2)], timeout=5)
        store.persist = real_persist  # type: ignore[method-assign]

        assert driver.fail_stop.failed
        assert driver.fail_stop.tripped.is_set()
        assert "No space left on device" in (driver.fail_stop.reason or "")
        assert not driver.is_leader
        with pytest.raises(Unavailable, match="stopped after a fault"):
            await driver.write([_put(b"c", 3)], timeout=1)
        with pytest.raises(Unavailable, match="stopped after a fault"):
            await driver.read_barrier(timeout=1)
        with pytest.raises(Unavailable, match="stopped after a fault"):
            driver.read_local(b"a")
        # Nothing more is persisted or applied: the failed write never landed.
        assert store.get(b"b") is None
    finally:
        await driver.stop()
        store.close()


def test_a_storage_fault_in_persist_trips_fail_stop_and_nothing_is_acknowledged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.CRITICAL, logger="shardnode"):
        asyncio.run(_drive_until_fault(tmp_path, caplog))
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1, "one CRITICAL line, naming the cause"
    assert critical[0].getMessage() == "process.fail_stop"
    assert "No space left on device" in critical[0].reason  # type: ignore[attr-defined]


def test_an_essential_task_that_ends_trips_fail_stop_unless_stopping() -> None:
    async def scenario() -> tuple[str | None, str | None]:
        tripped = FailStop(logging.getLogger("shardnode.test"))

        async def crash() -> None:
            raise AssertionError("broken invariant: commit went backwards")

        task = asyncio.create_task(crash())
        tripped.watch(task, "the ready loop")
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)

        quiet = FailStop(logging.getLogger("shardnode.test"))
        quiet.stopping = True
        other = asyncio.create_task(asyncio.sleep(0))
        quiet.watch(other, "the tick loop")
        await other
        await asyncio.sleep(0)
        return tripped.reason, quiet.reason

    reason, quiet_reason = asyncio.run(scenario())
    assert reason is not None and reason.startswith("the ready loop failed: AssertionError: broken invariant")
    assert "test_fail_stop.py:" in reason  # where it was raised, on the same line
    assert quiet_reason is None


def test_describe_is_one_line() -> None:
    try:
        raise StorageFault("IO error:\nfsync failed")
    except StorageFault as exc:
        text = describe(exc)
    assert "\n" not in text and text.startswith("StorageFault: IO error: fsync failed (at ")


def test_compaction_fsyncs_off_the_event_loop(tmp_path: Path) -> None:
    """compact() is a synced write: on the loop it would stop ticks and
    heartbeats for as long as the disk takes."""
    import threading

    async def scenario() -> list[str]:
        driver, store = _single_replica(tmp_path, snapshot_threshold=5)
        threads: list[str] = []
        real_compact = store.compact

        def recording_compact(threshold: int):  # type: ignore[no-untyped-def]
            threads.append(threading.current_thread().name)
            return real_compact(threshold)

        store.compact = recording_compact  # type: ignore[method-assign]
        await driver.start()
        try:
            await _until_leader(driver)
            for sequence in range(1, 21):
                await driver.write([_put(b"k%d" % sequence, sequence)], timeout=5)
            assert store.first_index() > 5, "the log was compacted"
        finally:
            await driver.stop()
            store.close()
        return threads

    threads = asyncio.run(scenario())
    assert threads and threading.main_thread().name not in threads
