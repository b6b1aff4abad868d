"""Where one caller's latency goes: the same sequential operations sent to
each hop of a 3-host, 1-group cluster (tick 100 ms, fsync on), so that each
hop's share shows as a difference of medians.

    .venv/bin/python bench/one_caller.py [--ops 400] [--json]

Rows (p50 and p99 of --ops sequential calls, one at a time):
- `worker Status`: a gRPC round trip to the leader worker that does no work
  (the floor of one hop);
- `worker Execute put/get`: straight to the leader worker (Raft, fsync,
  ReadIndex; no router);
- `router put/get, leader's host`: through the router on the leader's host;
- `router put/get, follower's host`: through a router whose host does not
  lead (the router forwards to another host);
- `AsyncClient put/get`: shardnode's client, given every router.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.harness import LocalCluster, get, put  # noqa: E402
from shardnode.client import AsyncClient  # noqa: E402
from shardnode.proto import kv_pb2, kv_pb2_grpc  # noqa: E402
from shardnode.proto import worker_pb2 as pb  # noqa: E402
from shardnode.proto import worker_pb2_grpc as pb_grpc  # noqa: E402
from shardnode.security import aio_channel  # noqa: E402

VALUE = b"v" * 100


async def timed(call, count: int) -> dict:  # type: ignore[no-untyped-def]
    for i in range(min(50, count)):    # warm the channel and the caches
        await call(i)
    latencies = []
    for i in range(count):
        began = time.perf_counter()
        await call(i)
        latencies.append((time.perf_counter() - began) * 1000)
    latencies.sort()
    return {"p50_ms": round(latencies[len(latencies) // 2], 3), "p99_ms": round(latencies[int(len(latencies) * 0.99)], 3)}


async def leader_host(cluster: LocalCluster) -> str:
    channel = aio_channel(next(iter(cluster.router_addresses.values())), cluster.config.security, None)
    try:
        status = await kv_pb2_grpc.KVStub(channel).Status(kv_pb2.StatusRequest(), timeout=5)
    finally:
        await channel.close()
    return next(r.host for g in status.groups for r in g.replicas if r.role == "leader")


async def measure(cluster: LocalCluster, ops: int) -> dict[str, dict]:
    leader = await leader_host(cluster)
    follower = next(h for h in cluster.host_names() if h != leader)
    security = cluster.config.security
    worker_address = cluster.config.host(leader).worker_address(0)
    rows: dict[str, dict] = {}
    channels = []

    def channel_to(address: str):  # type: ignore[no-untyped-def]
        channel = aio_channel(address, security, leader)
        channels.append(channel)
        return channel

    worker = pb_grpc.WorkerStub(channel_to(worker_address))
    name = cluster.config.name

    async def status(i: int) -> None:
        await worker.Status(pb.StatusRequest(), timeout=5)

    async def worker_put(i: int) -> None:
        response = await worker.Execute(pb.ExecuteRequest(cluster=name, group=0, operations=[
            put(b"k%d" % (i % 1000), VALUE, client_id=7, sequence=i + 1_000_000)]), timeout=5)
        assert response.status == pb.ExecuteResponse.OK, response

    async def worker_get(i: int) -> None:
        response = await worker.Execute(pb.ExecuteRequest(cluster=name, group=0, operations=[
            get(b"k%d" % (i % 1000))]), timeout=5)
        assert response.status == pb.ExecuteResponse.OK, response

    rows["worker Status"] = await timed(status, ops)
    rows["worker Execute put"] = await timed(worker_put, ops)
    rows["worker Execute get"] = await timed(worker_get, ops)
    for label, host in (("leader's host", leader), ("follower's host", follower)):
        router = kv_pb2_grpc.KVStub(channel_to(cluster.router_addresses[host]))

        async def router_put(i: int, router=router) -> None:  # type: ignore[no-untyped-def]
            await router.Put(kv_pb2.PutRequest(key=b"k%d" % (i % 1000), value=VALUE), timeout=5)

        async def router_get(i: int, router=router) -> None:  # type: ignore[no-untyped-def]
            await router.Get(kv_pb2.GetRequest(key=b"k%d" % (i % 1000)), timeout=5)

        rows[f"router put, {label}"] = await timed(router_put, ops)
        rows[f"router get, {label}"] = await timed(router_get, ops)
    client = AsyncClient(list(cluster.router_addresses.values()), timeout=5, cluster=cluster.config)
    try:
        rows["AsyncClient put"] = await timed(lambda i: client.put(b"k%d" % (i % 1000), VALUE), ops)
        rows["AsyncClient get"] = await timed(lambda i: client.get(b"k%d" % (i % 1000)), ops)
    finally:
        await client.aclose()
        for channel in channels:
            await channel.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=400, help="sequential calls per row")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="one-caller-") as tmp:
        cluster = LocalCluster(Path(tmp), hosts=3, groups=1, replicas=3, tick_ms=100, name="one-caller")
        try:
            cluster.start_all()
            cluster.wait_ready(timeout=60)
            rows = asyncio.run(measure(cluster, args.ops))
        finally:
            cluster.stop_all()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("| path | p50 ms | p99 ms |\n|---|---|---|")
        for label, row in rows.items():
            print(f"| {label} | {row['p50_ms']} | {row['p99_ms']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
