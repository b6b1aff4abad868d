"""The coalescing clients against a real cluster: kv.proto's BatchStream at
the router, Client (many threads) and AsyncClient (many tasks) sharing one
stream per router, and a leader killed under them with the history checked
for linearizability."""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time
from datetime import datetime
from collections.abc import Iterator

import pytest

from shardnode.client import AsyncClient, Client, DeadlineExceeded, InvalidArgument, ShardnodeError, Unavailable
from shardnode.proto import kv_pb2 as pb
from shardnode.proto import kv_pb2_grpc as pb_grpc
from shardnode.placement.shard_map import ShardMap
from shardnode.testing.linearizability import HistoryRecorder, OpKind, check_history

from .harness import LocalCluster

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def cluster(tmp_path) -> Iterator[LocalCluster]:  # type: ignore[no-untyped-def]
    local = LocalCluster(tmp_path / "cluster", hosts=3, groups=2, replicas=3)
    with local.running():
        yield local


def _keys_in_group(cluster: LocalCluster, group: int, count: int, prefix: str = "key") -> list[bytes]:
    ring = ShardMap.build(cluster.groups, cluster.config.virtual_nodes)
    keys = (f"{prefix}-{i}".encode() for i in range(100_000))
    return [k for k in keys if ring.group_for(k) == group][:count]


def test_batch_stream_answers_each_operation_by_id(cluster: LocalCluster) -> None:
    stub = pb_grpc.KVStub(cluster.client_channel("h2"))
    session = pb.Session(client_id=12345, sequence=1)
    first = pb.BatchRequest(operations=[
        pb.BatchOperation(id=7, kind=pb.BatchOperation.PUT, key=b"a", value=b"1", session=session, timeout_ms=5000),
        pb.BatchOperation(id=8, kind=pb.BatchOperation.PUT, key=b"b", value=b"2", timeout_ms=5000),
        pb.BatchOperation(id=9, kind=pb.BatchOperation.PUT, key=b"", value=b"x", timeout_ms=5000),
        pb.BatchOperation(id=10, kind=pb.BatchOperation.GET, key=b"b", value=b"no", timeout_ms=5000),
    ])
    second = pb.BatchRequest(operations=[
        # The same session and sequence again: a retry, answered with the original result.
        pb.BatchOperation(id=11, kind=pb.BatchOperation.PUT, key=b"a", value=b"1", session=session, timeout_ms=5000),
    ])

    def requests() -> Iterator[pb.BatchRequest]:
        yield first
        time.sleep(1.0)             # the first message's writes are applied by now
        yield second

    results = {}
    for response in stub.BatchStream(requests(), timeout=20):
        for result in response.results:
            results[result.id] = result
    assert set(results) == {7, 8, 9, 10, 11}
    assert results[7].code == 0 and not results[7].existed
    assert results[8].code == 0
    assert results[9].code == 3 and "key" in results[9].message
    assert results[10].code == 3 and "value" in results[10].message
    assert results[11].code == 0 and not results[11].existed, "the retry was not applied again"
    get = stub.Get(pb.GetRequest(key=b"a"), timeout=5)
    assert get.found and get.value == b"1"


def test_client_threads_and_async_tasks_are_coalesced(cluster: LocalCluster) -> None:
    routers = list(cluster.router_addresses.values())
    with Client(routers, cluster=cluster.config) as kv:
        kv._preferred = 0
        errors: list[str] = []

        def worker(i: int) -> None:
            key = f"thread-{i}".encode()
            previous = None
            for n in range(15):
                value = f"{i}-{n}".encode()
                old = kv.put(key, value)
                if old != previous:
                    errors.append(f"{key!r}: {old!r} != {previous!r}")
                previous = value
            if kv.get_many([key, b"absent-" + key]) != [previous, None]:
                errors.append(f"{key!r}: get_many")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        pipes = kv.engine.pipes
        assert sum(p.operations for p in pipes) == 32 * 17
        assert sum(p.messages for p in pipes) < 32 * 17, "concurrent callers shared messages"

    async def tasks() -> None:
        async with AsyncClient(routers, cluster=cluster.config) as akv:
            olds = await akv.put_many([(f"task-{i}", f"v{i}") for i in range(200)])
            assert olds == [None] * 200
            values = await asyncio.gather(*(akv.get(f"task-{i}") for i in range(200)))
            assert values == [f"v{i}".encode() for i in range(200)]
            # A stale read may be older (a follower that has not applied the put yet), never other.
            stale = await akv.get_many([f"task-{i}" for i in range(5)], allow_stale=True)
            assert all(value in (None, f"v{i}".encode()) for i, value in enumerate(stale)), stale
            assert sum(p.messages for p in akv.pipes) < 400 / 4
            with pytest.raises(InvalidArgument):
                await akv.put(b"k" * (cluster.config.max_key_bytes + 1), b"v")

    asyncio.run(tasks())


def _leader_host(kv: Client, group: int) -> str:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status = kv.status(timeout=2)
        info = status.groups[group]
        leader = [r for r in info.replicas if r.node_id == info.leader_id and r.role == "leader"]
        if leader:
            return leader[0].host
        time.sleep(0.2)
    raise AssertionError(f"group {group} has no leader")


def test_leader_kill_under_coalesced_clients_is_linearizable(cluster: LocalCluster) -> None:
    """One Client shared by 12 threads and one AsyncClient with 24 tasks,
    on a few hot keys of group 0, while group 0's leader worker is killed
    (SIGKILL) and started again: the history of every acknowledged, failed
    and unknown operation is linearizable (so no write was applied twice),
    and writes are acknowledged again soon after the kill."""
    routers = list(cluster.router_addresses.values())
    keys = _keys_in_group(cluster, 0, 4, "hot") + _keys_in_group(cluster, 1, 2, "warm")
    recorder = HistoryRecorder()
    stop = threading.Event()
    acked: list[float] = []

    shared = Client(routers, timeout=3.0, cluster=cluster.config)

    def thread_worker(client_id: int) -> None:
        rng = random.Random(client_id)
        n = 0
        while not stop.is_set():
            n += 1
            key = rng.choice(keys)
            if rng.random() < 0.6:
                value = f"t{client_id}-{n}".encode()
                handle = recorder.invoke(client_id, OpKind.PUT, key, value)
                try:
                    old = shared.put(key, value)
                except (Unavailable, DeadlineExceeded):
                    recorder.unknown(handle)
                    continue
                recorder.ok(handle, old)
                acked.append(time.monotonic())
            else:
                handle = recorder.invoke(client_id, OpKind.GET, key)
                try:
                    got = shared.get(key)
                except ShardnodeError:
                    recorder.failed(handle)     # a read without an answer had no effect
                    continue
                recorder.ok(handle, got)

    async def async_workers() -> None:
        async with AsyncClient(routers, timeout=3.0, cluster=cluster.config) as akv:
            async def one(client_id: int) -> None:
                rng = random.Random(client_id)
                n = 0
                while not stop.is_set():
                    n += 1
                    key = rng.choice(keys)
                    if rng.random() < 0.6:
                        value = f"a{client_id}-{n}".encode()
                        handle = recorder.invoke(client_id, OpKind.PUT, key, value)
                        try:
                            old = await akv.put(key, value)
                        except (Unavailable, DeadlineExceeded):
                            recorder.unknown(handle)
                            continue
                        recorder.ok(handle, old)
                        acked.append(time.monotonic())
                    else:
                        handle = recorder.invoke(client_id, OpKind.GET, key)
                        try:
                            got = await akv.get(key)
                        except ShardnodeError:
                            recorder.failed(handle)
                            continue
                        recorder.ok(handle, got)

            await asyncio.gather(*(one(1000 + i) for i in range(24)))

    threads = [threading.Thread(target=thread_worker, args=(i,), daemon=True) for i in range(1, 13)]
    threads.append(threading.Thread(target=lambda: asyncio.run(async_workers()), daemon=True))
    try:
        for t in threads:
            t.start()
        time.sleep(2.0)
        victim = _leader_host(shared, 0)
        killed_at = time.monotonic()
        cluster.kill((victim, "worker-g0"), signal.SIGKILL)
        time.sleep(4.0)
        cluster.start_worker(victim, 0)
        time.sleep(3.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        shared.close()
    assert not any(t.is_alive() for t in threads)
    before = [t for t in acked if t < killed_at]
    after = sorted(t for t in acked if t >= killed_at)
    assert before and after, "writes were acknowledged before and after the kill"
    assert after[0] - killed_at < 5.0, f"service resumed {after[0] - killed_at:.1f}s after the kill"
    operations = recorder.operations()
    assert len(operations) > 200
    result = check_history(operations, timeout=120)
    assert result.ok, result.explanation


def test_a_stopping_router_ends_its_streams_and_the_client_goes_on_elsewhere(cluster: LocalCluster) -> None:
    routers = list(cluster.router_addresses.values())
    stop = threading.Event()
    failures: list[BaseException] = []
    done = [0]
    with Client(routers, timeout=5.0, cluster=cluster.config) as kv:
        kv._preferred = 0           # h1's router first

        def writer(i: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    kv.put(f"drain-{i}", f"{n}")
                    done[0] += 1
                except BaseException as exc:    # noqa: BLE001 - the test reports it
                    failures.append(exc)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        status = cluster.kill(("h1", "router"), signal.SIGTERM)
        before = done[0]
        time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join(10)
    assert status == 0
    # From its log: how long the graceful stop took (the gRPC server's grace is
    # 2 s: a stream that did not end would hold it that long).
    stamps = {}
    for line in (cluster.tmp / "h1-router.log").read_text().splitlines():
        for event in ("router.stopping", "router.stopped"):
            if f" {event} " in line:
                stamps[event] = datetime.fromisoformat(line.split()[0].replace("Z", "+00:00"))
    stopped_in = (stamps["router.stopped"] - stamps["router.stopping"]).total_seconds()
    assert stopped_in < 1.9, f"the router took {stopped_in:.1f}s to stop: its streams held it up to the grace period"
    assert failures == [], failures[:3]
    assert done[0] > before, "the writes went on through the other routers"
