"""`group add` with data and clients: how long it takes and what clients see.

    .venv/bin/python bench/group_add.py [--keys 100000] [--value-size 100] [--clients 8] [--replicas 5]

The default local cluster's shape under supervisord (5 hosts on 127.0.0.1-5,
4 groups of `replicas`, fsync on), in a temporary directory. It loads KEYS
keys of VALUE_SIZE bytes (batched, straight to each group's leader), starts
CLIENTS threads doing 50/50 linearizable gets and puts of those keys through
the routers (one Client each), measures them for a while, runs `group add`
(in process, as the CLI does), keeps measuring, then reads every key back
from its owner and counts the keys lost (a key whose value is not the last
one written). Prints a table and, with --json, one JSON line. Not part of
`make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardnode.client import Client  # noqa: E402
from shardnode.config import ClusterConfig  # noqa: E402
from shardnode.errors import ShardnodeError  # noqa: E402
from shardnode.proto import worker_pb2 as pb  # noqa: E402
from shardnode.proto import worker_pb2_grpc as pb_grpc  # noqa: E402
from shardnode.security import aio_channel  # noqa: E402
from shardnode.placement.cluster import cluster_group_admin  # noqa: E402
from shardnode.placement.directory import ShardDirectory  # noqa: E402
from shardnode.placement.worker_groups import WorkerGroups  # noqa: E402
from tests.integration.ports import write_cluster_toml  # noqa: E402
from tests.integration.supervised import start_supervised  # noqa: E402

BATCH = 500


def key_of(i: int) -> bytes:
    return b"user%08d" % i


class Load:
    """Closed-loop clients; every answered operation is (end time, latency, kind)."""

    def __init__(self, config: Path, clients: int, keys: int, value_size: int) -> None:
        self.config, self.clients, self.keys, self.value_size = config, clients, keys, value_size
        self.samples: list[tuple[float, float, str]] = []
        self.errors: list[tuple[float, str]] = []
        self.written: dict[bytes, bytes] = {}        # key -> last value acknowledged
        self.unknown: dict[bytes, set[bytes]] = {}  # key -> values whose write had an unknown outcome
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(c,), daemon=True) for c in range(clients)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self, client_number: int) -> None:
        rng = random.Random(client_number)
        with Client.from_config(self.config, timeout=10.0) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                began = time.monotonic()
                if n % 2:
                    # Each client writes its own keys (i % clients): a key's last
                    # acknowledged value is then the value it must hold.
                    key = key_of(rng.randrange(client_number, self.keys, self.clients))
                    value = (b"c%d-%d-" % (client_number, n)).ljust(self.value_size, b"x")
                    try:
                        client.put(key, value)
                    except ShardnodeError as exc:
                        with self._lock:
                            self.errors.append((time.monotonic(), type(exc).__name__))
                            self.unknown.setdefault(key, set()).add(value)
                        continue
                    with self._lock:
                        self.written[key] = value
                    kind = "put"
                else:
                    key = key_of(rng.randrange(self.keys))
                    try:
                        client.get(key)
                    except ShardnodeError as exc:
                        with self._lock:
                            self.errors.append((time.monotonic(), type(exc).__name__))
                        continue
                    kind = "get"
                end = time.monotonic()
                with self._lock:
                    self.samples.append((end, end - began, kind))

    def window(self, start: float, end: float) -> dict:
        with self._lock:
            latencies = sorted(lat for t, lat, _ in self.samples if start <= t < end)
            errors = sum(1 for t, _ in self.errors if start <= t < end)
        seconds = max(end - start, 1e-9)
        if not latencies:
            return {"ops_per_s": 0.0, "p50_ms": None, "p99_ms": None, "errors": errors, "seconds": round(seconds, 1)}
        return {
            "ops_per_s": round(len(latencies) / seconds, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 1),
            "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 1),
            "errors": errors,
            "seconds": round(seconds, 1),
        }


async def _leaders(cluster: ClusterConfig, groups: list[int]) -> dict[int, str]:
    finder = WorkerGroups(cluster)
    try:
        leaders = {}
        for group in groups:
            deadline = time.monotonic() + 60
            while not (address := await finder.leader_address(group)):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"group {group} has no leader")
                await asyncio.sleep(0.2)
            leaders[group] = address
        return leaders
    finally:
        await finder.close()


async def _by_owner(cluster: ClusterConfig, keys: list[bytes], make_op, check) -> None:  # type: ignore[no-untyped-def]
    """Send operations for `keys` to their owners' leaders in batches."""
    directory = ShardDirectory(cluster)
    try:
        shard_map = await directory.load_map()
    finally:
        await directory.close()
    owners: dict[int, list[bytes]] = {}
    for key in keys:
        owners.setdefault(shard_map.group_for(key), []).append(key)
    leaders = await _leaders(cluster, sorted(owners))
    channels = {g: aio_channel(a, cluster.security, None) for g, a in leaders.items()}
    try:
        async def send(group: int, batch: list[bytes]) -> None:
            request = pb.ExecuteRequest(cluster=cluster.name, group=group, operations=[make_op(k) for k in batch])
            response = await pb_grpc.WorkerStub(channels[group]).Execute(request, timeout=60)
            if response.status != pb.ExecuteResponse.OK:
                raise RuntimeError(f"group {group}: {pb.ExecuteResponse.Status.Name(response.status)} "
                                   f"{response.message}")
            check(batch, response.results)

        jobs = [send(g, ks[i:i + BATCH]) for g, ks in owners.items() for i in range(0, len(ks), BATCH)]
        for start in range(0, len(jobs), 8):
            await asyncio.gather(*jobs[start:start + 8])
    finally:
        await asyncio.gather(*(c.close() for c in channels.values()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--value-size", type=int, default=100)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--replicas", type=int, default=5)
    parser.add_argument("--before", type=float, default=15.0, help="seconds measured before the change")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config = write_cluster_toml(tmp, name="bench-group-add", hosts=5, groups=4, replicas=args.replicas,
                                    max_groups=8, tick_ms=100)
        with start_supervised(tmp, config) as env:
            result = _run(env.cluster, config, args)
    if args.json:
        print(json.dumps(result))
    else:
        for name in ("before", "during", "after"):
            w = result[name]
            print(f"{name:>6}: {w['ops_per_s']:>8} ops/s  p50 {w['p50_ms']} ms  p99 {w['p99_ms']} ms  "
                  f"errors {w['errors']}  ({w['seconds']} s)")
        print(f"load {result['keys']:,} keys: {result['load_seconds']} s; group add: {result['add_seconds']} s "
              f"({result['moved_keys']:,} keys copied, {result['delta_keys']:,} caught up); "
              f"keys lost: {result['keys_lost']}; throughput during/before: {result['throughput_ratio']}")
    return 0 if result["keys_lost"] == 0 else 1


def _run(cluster: ClusterConfig, config: Path, args: argparse.Namespace) -> dict:
    deadline = time.monotonic() + 180
    while True:             # the metadata group and every group's first leader
        try:
            asyncio.run(_leaders(cluster, list(range(cluster.groups))))
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    value = b"v" * args.value_size
    keys = [key_of(i) for i in range(args.keys)]
    began = time.monotonic()

    def loaded(batch, results) -> None:  # type: ignore[no-untyped-def]
        pass

    asyncio.run(_by_owner(cluster, keys, lambda k: pb.Operation(kind=pb.Operation.PUT, key=k, value=value), loaded))
    load_seconds = time.monotonic() - began
    load = Load(config, args.clients, args.keys, args.value_size)
    load.start()
    time.sleep(2.0)                          # warm-up
    before_start = time.monotonic()
    time.sleep(args.before)
    add_start = time.monotonic()

    async def add():  # type: ignore[no-untyped-def]
        admin, close = cluster_group_admin(cluster)
        try:
            return await admin.add()
        finally:
            await close()

    report = asyncio.run(add())
    add_end = time.monotonic()
    time.sleep(args.before)
    after_end = time.monotonic()
    load.stop()
    lost: list[bytes] = []

    def verify(batch, results) -> None:  # type: ignore[no-untyped-def]
        for key, result in zip(batch, results):
            got = result.value if result.existed else None
            if key in load.written:
                ok = got == load.written[key] or got in load.unknown.get(key, ())
            else:
                ok = got == value or got in load.unknown.get(key, ())
            if not ok:
                lost.append(key)

    asyncio.run(_by_owner(cluster, keys, lambda k: pb.Operation(kind=pb.Operation.GET, key=k), verify))
    before = load.window(before_start, add_start)
    during = load.window(add_start, add_end)
    return {
        "keys": args.keys, "value_size": args.value_size, "clients": args.clients, "replicas": args.replicas,
        "load_seconds": round(load_seconds, 1), "add_seconds": round(add_end - add_start, 1),
        "moved_keys": report.keys, "delta_keys": report.delta_keys, "moved_bytes": report.bytes,
        "new_group_share": round(report.shares.get(report.group, 0.0), 4),
        "before": before, "during": during, "after": load.window(add_end, after_end),
        "throughput_ratio": round(during["ops_per_s"] / before["ops_per_s"], 2) if before["ops_per_s"] else None,
        "keys_lost": len(lost), "lost_examples": [k.decode() for k in lost[:5]],
        "error_kinds": dict(collections.Counter(kind for _, kind in load.errors)),
    }


if __name__ == "__main__":
    sys.exit(main())
