"""Write throughput and latency of one Raft group of real worker processes
(RocksDB with fsync on, gRPC on loopback), at several client concurrencies.

    .venv/bin/python bench/worker_group.py [--members 3] [--seconds 10] [--writers 1,16,64] [--tls] [--json]

Each writer is an asyncio task sending one PUT at a time (100-byte values,
its own session) straight to the leader, first as one Execute call per
write, then coalesced as a router does (writes waiting together share one
call). The worker proposes each call's writes as one batch, and everything
that arrives while an fsync runs shares the next one (group commit).
With --tls, every link (the bench's calls and the Raft traffic between the
workers) is mutual TLS, as with `[security] tls = true`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.harness import WorkerGroup, put  # noqa: E402
from shardnode.proto import worker_pb2 as pb  # noqa: E402


class Coalescer:
    """What a router does for a group: operations that wait at the same time
    travel in one Execute call (up to `max_in_flight` calls at once)."""

    def __init__(self, group: WorkerGroup, leader: str, max_batch: int = 512, max_in_flight: int = 2) -> None:
        self.stub = group.stub(leader)
        self.name = group.name
        self.queue: list[tuple[pb.Operation, asyncio.Future]] = []
        self.max_batch = max_batch
        self.slots = asyncio.Semaphore(max_in_flight)
        self.batches = 0

    async def execute(self, operation: pb.Operation) -> pb.OperationResult:
        future = asyncio.get_running_loop().create_future()
        self.queue.append((operation, future))
        if len(self.queue) == 1:
            asyncio.ensure_future(self._send())
        return await future

    async def _send(self) -> None:
        async with self.slots:
            batch, self.queue = self.queue[: self.max_batch], self.queue[self.max_batch :]
            if not batch:
                return
            if self.queue:
                asyncio.ensure_future(self._send())
            self.batches += 1
            response = await self.stub.Execute(
                pb.ExecuteRequest(cluster=self.name, group=0, operations=[op for op, _ in batch]), timeout=10
            )
            for (_, future), result in zip(batch, response.results):
                if response.status != pb.ExecuteResponse.OK:
                    future.set_exception(RuntimeError(f"write failed: {response.status} {response.message}"))
                else:
                    future.set_result(result)
            if self.queue and len(self.queue) <= self.max_batch:
                asyncio.ensure_future(self._send())


async def _writer(group: WorkerGroup, leader: str, client: int, until: float, latencies: list[float],
                  coalescer: Coalescer | None) -> int:
    stub = group.stub(leader)
    done = 0
    sequence = 0
    value = b"v" * 100
    while time.monotonic() < until:
        sequence += 1
        operation = put(b"bench-%d-%d" % (client, sequence % 1000), value, client, sequence)
        began = time.perf_counter()
        if coalescer is not None:
            await coalescer.execute(operation)
        else:
            response = await stub.Execute(
                pb.ExecuteRequest(cluster=group.name, group=0, operations=[operation]), timeout=10
            )
            if response.status != pb.ExecuteResponse.OK:
                raise RuntimeError(f"write failed: {response}")
        latencies.append(time.perf_counter() - began)
        done += 1
    return done


async def measure(group: WorkerGroup, writers: int, seconds: float, coalesce: bool = False) -> dict:
    leader = await group.wait_leader()
    latencies: list[float] = []
    coalescer = Coalescer(group, leader) if coalesce else None
    began = time.monotonic()
    counts = await asyncio.gather(
        *(_writer(group, leader, 1000 * writers + c, began + seconds, latencies, coalescer) for c in range(writers))
    )
    elapsed = time.monotonic() - began
    latencies.sort()
    ms = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 2)  # noqa: E731
    return {
        "mode": "coalesced" if coalesce else "one call per write",
        "writers": writers,
        "ops": sum(counts),
        "ops_per_second": round(sum(counts) / elapsed),
        "p50_ms": ms(0.50),
        "p99_ms": ms(0.99),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--writers", default="1,16,64")
    parser.add_argument("--tls", action="store_true", help="mutual TLS on every link")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shardnode-bench-") as tmp:
        group = WorkerGroup(Path(tmp), size=args.members, tick_ms=100, tls=args.tls)
        group.start_all()
        try:
            async def run_all() -> list[dict]:
                try:
                    await group.wait_leader(timeout=30)
                    return [
                        await measure(group, int(w), args.seconds, coalesce)
                        for coalesce in (False, True)
                        for w in args.writers.split(",")
                    ]
                finally:
                    await group.close_channels()

            results = asyncio.run(run_all())
        finally:
            group.stop_all()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        tls = "mutual TLS" if args.tls else "plaintext"
        print(f"{args.members}-member group, fsync on, 100-byte values, {tls}, {args.seconds:.0f}s per row")
        print(f"{'mode':>20} {'writers':>8} {'ops/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
        for r in results:
            print(f"{r['mode']:>20} {r['writers']:>8} {r['ops_per_second']:>8} {r['p50_ms']:>8} {r['p99_ms']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
