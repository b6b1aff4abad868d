"""shardnode against etcd on the same machine: the same closed-loop load, one
gRPC call per operation, rounds interleaved.

    .venv/bin/python bench/versus_etcd.py [--seconds 10] [--callers 1,16,64] [--ops put,get,range,txn]
                                          [--modes rpc,client,async] [--warmup 1]
                                          [--profile DIR [--profile-op put|get] [--profile-via rpc|async]
                                           [--native] [--gil]] [--json]

It starts, on loopback, a 3-node etcd (Debian's etcd-server, installed with
apt-get when `etcd` is missing and we are root; 127.0.1.1-3, data in a temp
directory, default fsync) and a 3-host shardnode cluster (127.0.0.1-3, one
group of 3 replicas, a router per host: the processes
tests/integration/harness.py:LocalCluster starts, tick 100 ms like etcd's
heartbeat). Both get 10,000 keys with 100-byte values first. Then, for each
operation and number of callers, one etcd round and one shardnode round
(etcd, shardnode, etcd, ...: noise hits both):

- N asyncio tasks in this process, each sending one operation at a time
  (closed loop) on random keys, caller i to endpoint i mod 3 (etcd's client
  balances over its endpoints the same way; a shardnode client over the
  routers);
- etcd: `etcdserverpb.KV/Put` and `KV/Range` (linearizable, the default),
  stubs from the routers' own copy of etcd's protos; shardnode: the
  router's `KV/Put` (no session: the router uses its own) and `KV/Get`
  (linearizable, the default);
- `range` (not by default): the RANGE_KEYS keys from a random key on, etcd's
  `KV/Range` with a range_end against shardnode's `KV/Scan` (gathered from
  every group, docs/etcd.md); `txn`: a compare-and-swap of a random key
  (its value must be the one it has; the same value written again), etcd's
  `KV/Txn` against shardnode's `KV/CompareAndSet` (one transaction of the
  key's group);
- shardnode is also driven through its own clients (`--modes`): `client`,
  one shared `shardnode.client.Client` called by N threads, and `async`,
  one `AsyncClient` called by N tasks; their calls are coalesced on one
  stream per router (docs/client.md). Each etcd round is followed by one
  shardnode round per mode, and each table row compares one of them with
  that etcd round;
- after `--warmup` seconds, `--seconds` of measurement: operations completed
  per second, p50 and p99 latency, and server CPU per operation (utime +
  stime of every server process from /proc/PID/stat, before and after).

It prints one table (and `--json`: every round, with CPU per process).
`--profile DIR` then runs one more shardnode round (`--profile-op`, put by
default; `--profile-via async`: through the AsyncClient) at the largest
number of callers with `py-spy record` attached to the leader worker, a
follower and a router (the leader's host's, or the one the AsyncClient
uses; py-spy must be on the PATH or in the venv) and prints the
functions that take the most time. Every process it starts is killed by PID
at the end, also on failure; the temp directory is removed.
Exit status: 0, 1 when a system failed to start, 2 when etcd is missing and
cannot be installed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from shardnode.client import AsyncClient, Client, ShardnodeError  # noqa: E402
from shardnode.proto import kv_pb2, kv_pb2_grpc  # noqa: E402
from shardnode.security import aio_channel  # noqa: E402
from tests.integration.harness import LocalCluster, signal_and_wait  # noqa: E402
from tests.integration.ports import free_port  # noqa: E402

KEYS = 10_000
VALUE_BYTES = 100
ETCD_ADDRESSES = ("127.0.1.1", "127.0.1.2", "127.0.1.3")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RPC_TIMEOUT = 10.0


# --- Small helpers (unit-tested in tests/unit/test_bench_versus_etcd.py) --------------


def parse_list(text: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    """"put,get" -> ["put", "get"]; refuses names outside `allowed`."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("empty list")
    if allowed is not None:
        bad = [item for item in items if item not in allowed]
        if bad:
            raise ValueError(f"unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
    return items


def parse_callers(text: str) -> list[int]:
    callers = [int(item) for item in parse_list(text)]
    if any(c < 1 for c in callers):
        raise ValueError("callers must be at least 1")
    return callers


def cpu_seconds_from_stat(stat: str) -> float:
    """utime + stime of a /proc/PID/stat line, in seconds. The command name
    (field 2) may hold spaces and parentheses: fields are counted after its
    last ')'. utime and stime are fields 14 and 15."""
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), math.ceil(q * len(sorted_values))))
    return sorted_values[rank - 1]


def summarize_collapsed(lines: list[str], top: int = 15) -> dict:
    """Own and inclusive time per function from py-spy's raw (collapsed
    stack) output: each line is `frame;frame;...;leaf COUNT`, a frame is
    `function (file:line)`; with --threads the first frame names the thread.
    A function is `function (file)`: every line of it counts together."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in lines:
        line = line.rstrip("\n")
        if not line or " " not in line:
            continue
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = stack.split(";")
        if frames and frames[0].startswith(("thread (", "process ")):
            threads[frames[0]] += count
            frames = frames[1:]
            if frames and frames[0].startswith("thread ("):
                threads[frames[0]] += 0
                frames = frames[1:]
        total += count
        names = [_function_name(frame) for frame in frames]
        if names:
            own[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    return {
        "samples": total,
        "threads": dict(threads.most_common()),
        "own": [(name, count, round(100 * count / total, 1)) for name, count in own.most_common(top)] if total else [],
        "inclusive": [(name, count, round(100 * count / total, 1)) for name, count in inclusive.most_common(top)]
        if total else [],
    }


def _function_name(frame: str) -> str:
    """`put (shardnode/x.py:12)` -> `put (shardnode/x.py)`, paths shortened
    to what follows site-packages/ or the project root."""
    name, sep, location = frame.partition(" (")
    if not sep:
        return frame
    location = location.rstrip(")")
    path = location.rsplit(":", 1)[0]
    for marker in ("site-packages/", str(ROOT) + "/", "/lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


# --- Processes -----------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    try:
        return cpu_seconds_from_stat(Path(f"/proc/{pid}/stat").read_text())
    except (FileNotFoundError, ProcessLookupError):
        return float("nan")


def thread_cpu_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds per thread of a process: TID -> (/proc name, seconds)."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            threads[int(task.name)] = ((task / "comm").read_text().strip(),
                                       cpu_seconds_from_stat((task / "stat").read_text()))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return threads


def name_threads(cpu_ms: dict[int, tuple[str, float]], spy_threads: dict[str, int]) -> dict[str, float]:
    """Per-thread CPU keyed by py-spy's thread name when py-spy saw the thread
    (`thread (TID): NAME`), else by its /proc name (gRPC's and RocksDB's own
    threads); threads of the same name add up."""
    spy_names = {}
    for key in spy_threads:
        tid_text, _, name = key.removeprefix("thread (").partition("): ")
        if tid_text.isdigit():
            spy_names[int(tid_text)] = name
    named: Counter[str] = Counter()
    for tid, (comm, ms) in cpu_ms.items():
        named[spy_names.get(tid, f"{comm} (native)")] += ms
    return {name: round(ms, 3) for name, ms in named.most_common() if ms > 0}


def ensure_etcd() -> str | None:
    """The etcd binary, installed with apt-get (Debian's etcd-server) when
    missing and we are root; None when that is not possible."""
    found = shutil.which("etcd")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print("versus_etcd: etcd is missing: apt-get install -y etcd-server", file=sys.stderr)
    for commands in ([["apt-get", "install", "-y", "etcd-server"]],
                     [["apt-get", "update"], ["apt-get", "install", "-y", "etcd-server"]]):
        if all(subprocess.run(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
               for c in commands):
            break
    return shutil.which("etcd")


@dataclass
class EtcdCluster:
    """Three etcd members on 127.0.1.1-3, each in its own session, data under tmp."""

    binary: str
    tmp: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.members = []
        for i, address in enumerate(ETCD_ADDRESSES, start=1):
            self.members.append((f"etcd{i}", address, free_port(address), free_port(address)))
        self.initial_cluster = ",".join(f"{name}=http://{a}:{peer}" for name, a, _, peer in self.members)

    @property
    def endpoints(self) -> list[str]:
        return [f"{address}:{client}" for _, address, client, _ in self.members]

    def start_all(self) -> None:
        for name, address, client, peer in self.members:
            log = open(self.tmp / f"{name}.log", "ab")
            self.processes[name] = subprocess.Popen(
                [self.binary, "--name", name, "--data-dir", str(self.tmp / name),
                 "--listen-client-urls", f"http://{address}:{client}",
                 "--advertise-client-urls", f"http://{address}:{client}",
                 "--listen-peer-urls", f"http://{address}:{peer}",
                 "--initial-advertise-peer-urls", f"http://{address}:{peer}",
                 "--initial-cluster", self.initial_cluster, "--initial-cluster-state", "new",
                 "--initial-cluster-token", f"versus-etcd-{os.getpid()}",
                 "--logger", "zap", "--log-level", "warn"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
            log.close()

    def stop_all(self) -> None:
        for name in list(self.processes):
            signal_and_wait(self.processes.pop(name), signal.SIGKILL)

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.processes.items()}

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(
            f"--- {path.name} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            for path in sorted(self.tmp.glob("etcd*.log"))
        )


def etcd_stubs():  # type: ignore[no-untyped-def]
    """(messages, KVStub) of etcd's API: the copy of etcd's protos the routers
    serve (proto/etcd_rpc.proto), so that one process holds one copy."""
    from shardnode.proto import etcd_rpc_pb2, etcd_rpc_pb2_grpc

    return etcd_rpc_pb2, etcd_rpc_pb2_grpc.KVStub


# --- The two systems, as the load generator sees them --------------------------------------


@dataclass
class Target:
    """One system: an operation per caller and key, and the server processes."""

    name: str
    put: Callable[[int, bytes, bytes], Awaitable[object]]
    get: Callable[[int, bytes], Awaitable[object]]
    pids: Callable[[], dict[str, int]]
    channels: list[grpc.aio.Channel]
    # [start, end) in key order, and a compare-and-swap of (key, value): the range and txn rounds.
    range: Callable[[int, bytes, bytes], Awaitable[object]] | None = None
    txn: Callable[[int, bytes, bytes], Awaitable[object]] | None = None

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


def etcd_target(cluster: EtcdCluster, messages, stub_class) -> Target:  # type: ignore[no-untyped-def]
    channels = [grpc.aio.insecure_channel(endpoint) for endpoint in cluster.endpoints]
    stubs = [stub_class(channel) for channel in channels]

    async def put(caller: int, key: bytes, value: bytes) -> object:
        return await stubs[caller % len(stubs)].Put(messages.PutRequest(key=key, value=value), timeout=RPC_TIMEOUT)

    async def get(caller: int, key: bytes) -> object:
        response = await stubs[caller % len(stubs)].Range(messages.RangeRequest(key=key), timeout=RPC_TIMEOUT)
        if not response.kvs:
            raise LookupError(key)
        return response

    async def range_(caller: int, start: bytes, end: bytes) -> object:
        response = await stubs[caller % len(stubs)].Range(messages.RangeRequest(key=start, range_end=end),
                                                          timeout=RPC_TIMEOUT)
        if not response.kvs:
            raise LookupError(start)
        return response

    async def txn(caller: int, key: bytes, value: bytes) -> object:
        compare = messages.Compare(key=key, target=messages.Compare.VALUE, result=messages.Compare.EQUAL, value=value)
        swap = messages.RequestOp(request_put=messages.PutRequest(key=key, value=value))
        response = await stubs[caller % len(stubs)].Txn(messages.TxnRequest(compare=[compare], success=[swap]),
                                                        timeout=RPC_TIMEOUT)
        if not response.succeeded:
            raise LookupError(key)
        return response

    return Target("etcd", put, get, cluster.pids, channels, range_, txn)


def shardnode_target(cluster: LocalCluster) -> Target:
    addresses = list(cluster.router_addresses.values())
    channels = [aio_channel(address, cluster.config.security, None) for address in addresses]
    stubs = [kv_pb2_grpc.KVStub(channel) for channel in channels]

    async def put(caller: int, key: bytes, value: bytes) -> object:
        return await stubs[caller % len(stubs)].Put(kv_pb2.PutRequest(key=key, value=value), timeout=RPC_TIMEOUT)

    async def get(caller: int, key: bytes) -> object:
        response = await stubs[caller % len(stubs)].Get(kv_pb2.GetRequest(key=key), timeout=RPC_TIMEOUT)
        if not response.found:
            raise LookupError(key)
        return response

    async def range_(caller: int, start: bytes, end: bytes) -> object:
        response = await stubs[caller % len(stubs)].Scan(kv_pb2.ScanRequest(start=start, end=end), timeout=RPC_TIMEOUT)
        if not response.items:
            raise LookupError(start)
        return response

    async def txn(caller: int, key: bytes, value: bytes) -> object:
        response = await stubs[caller % len(stubs)].CompareAndSet(
            kv_pb2.CompareAndSetRequest(key=key, value=value, expected=value), timeout=RPC_TIMEOUT)
        if not response.swapped:
            raise LookupError(key)
        return response

    def pids() -> dict[str, int]:
        return {f"{host}/{program}": p.pid for (host, program), p in cluster.processes.items()}

    return Target("shardnode", put, get, pids, channels, range_, txn)


def shardnode_async_client_target(cluster: LocalCluster) -> tuple[Target, AsyncClient]:
    """shardnode through its AsyncClient: every caller is a task of one
    client, whose operations share one stream per router (coalesced)."""
    kv = AsyncClient(list(cluster.router_addresses.values()), timeout=RPC_TIMEOUT, cluster=cluster.config)

    async def put(caller: int, key: bytes, value: bytes) -> object:
        return await kv.put(key, value)

    async def get(caller: int, key: bytes) -> object:
        found = await kv.get(key)
        if found is None:
            raise LookupError(key)
        return found

    async def range_(caller: int, start: bytes, end: bytes) -> object:
        found = await kv.scan(start, end)
        if not found:
            raise LookupError(start)
        return found

    async def txn(caller: int, key: bytes, value: bytes) -> object:
        swapped, _ = await kv.compare_and_set(key, value, value)
        if not swapped:
            raise LookupError(key)
        return swapped

    def pids() -> dict[str, int]:
        return {f"{host}/{program}": p.pid for (host, program), p in cluster.processes.items()}

    return Target("shardnode", put, get, pids, [], range_, txn), kv


async def shardnode_roles(cluster: LocalCluster) -> dict[str, str]:
    """'h1/worker-g0' -> 'leader' / 'follower', as the first router sees it."""
    channel = aio_channel(next(iter(cluster.router_addresses.values())), cluster.config.security, None)
    try:
        status = await kv_pb2_grpc.KVStub(channel).Status(kv_pb2.StatusRequest(), timeout=5)
    finally:
        await channel.close()
    return {f"{r.host}/worker-g{g.group}": r.role for g in status.groups for r in g.replicas}


async def wait_etcd(target: Target, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            for caller in range(3):
                await target.put(caller, b"versus-etcd-ready", b"1")
            return
        except grpc.aio.AioRpcError as exc:
            last = exc.details()
            await asyncio.sleep(0.2)
    raise RuntimeError(f"etcd not ready within {timeout:.0f}s: {last}")


# --- The load generator ---------------------------------------------------------------


def bench_key(index: int) -> bytes:
    return b"bench-%05d" % index


#: Keys a range round reads: [its random key, the key RANGE_KEYS further).
RANGE_KEYS = 10


def range_end(key: bytes) -> bytes:
    """The end (excluded) of the range a round reads from `key` on."""
    return bench_key(min(int(key[len(b"bench-"):]) + RANGE_KEYS, KEYS))


async def preload(target: Target, value: bytes, callers: int = 64) -> None:
    """Every bench key, so that gets find a value."""
    async def caller(i: int) -> None:
        for index in range(i, KEYS, callers):
            await target.put(i, bench_key(index), value)
    await asyncio.gather(*(caller(i) for i in range(callers)))


async def run_round(target: Target, op: str, callers: int, warmup: float, seconds: float, value: bytes,
                    during: Callable[[], Awaitable[None]] | None = None,
                    at_window: Callable[[str], None] | None = None) -> dict:
    """One closed-loop round: `callers` tasks, each one operation at a time.
    Counted: operations that complete between the end of the warm-up and
    the end of the round; CPU: the server processes over the same window.
    `during` runs alongside the measured window; `at_window("start")` and
    `at_window("end")` are called at its edges (to take more readings)."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    window = [float("inf"), float("inf")]
    stop = False

    async def caller(i: int) -> None:
        rng = random.Random(i * 7919 + callers)
        while not stop:
            key = bench_key(rng.randrange(KEYS))
            began = time.perf_counter()
            try:
                if op == "put":
                    await target.put(i, key, value)
                elif op == "get":
                    await target.get(i, key)
                elif op == "range":
                    await target.range(i, key, range_end(key))    # type: ignore[misc]
                else:
                    await target.txn(i, key, value)                # type: ignore[misc]
            except (grpc.aio.AioRpcError, LookupError, ShardnodeError) as exc:
                done = time.perf_counter()
                if window[0] <= done <= window[1]:
                    errors[error_name(exc)] += 1
                if isinstance(exc, grpc.aio.AioRpcError) and exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    await asyncio.sleep(0.01)
                continue
            done = time.perf_counter()
            if window[0] <= done <= window[1]:
                latencies.append(done - began)

    tasks = [asyncio.create_task(caller(i)) for i in range(callers)]
    try:
        await asyncio.sleep(warmup)
        pids = target.pids()
        cpu_before = {label: cpu_seconds(pid) for label, pid in pids.items()}
        self_before = time.process_time()
        if at_window is not None:
            at_window("start")
        window[0] = time.perf_counter()
        if during is not None:
            await asyncio.gather(asyncio.sleep(seconds), during())
        else:
            await asyncio.sleep(seconds)
        window[1] = time.perf_counter()
        if at_window is not None:
            at_window("end")
        cpu_after = {label: cpu_seconds(pid) for label, pid in pids.items()}
        self_after = time.process_time()
        stop = True
        await asyncio.gather(*tasks)
    finally:
        stop = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return round_result(target.name, op, callers, window, latencies, errors, pids, cpu_before, cpu_after,
                        self_after - self_before)


def error_name(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    if isinstance(exc, LookupError):
        return "NOT_FOUND"
    return type(exc).__name__


def run_thread_round(client: Client, op: str, callers: int, warmup: float, seconds: float, value: bytes,
                     pids: dict[str, int]) -> dict:
    """One closed-loop round through the blocking Client: `callers` threads
    sharing the one client (as a threaded application would), each one
    operation at a time. Counted and measured as run_round."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    window = [float("inf"), float("inf")]
    stop = threading.Event()

    def caller(i: int) -> None:
        rng = random.Random(i * 7919 + callers)
        mine: list[float] = []
        while not stop.is_set():
            key = bench_key(rng.randrange(KEYS))
            began = time.perf_counter()
            try:
                if op == "put":
                    client.put(key, value)
                elif op == "get":
                    if client.get(key) is None:
                        raise LookupError(key)
                elif op == "range":
                    if not client.scan(key, range_end(key)):
                        raise LookupError(key)
                elif not client.compare_and_set(key, value, value)[0]:
                    raise LookupError(key)
            except (LookupError, ShardnodeError) as exc:
                done = time.perf_counter()
                if window[0] <= done <= window[1]:
                    errors[error_name(exc)] += 1
                continue
            done = time.perf_counter()
            if window[0] <= done <= window[1]:
                mine.append(done - began)
        latencies.extend(mine)          # list.extend is atomic under the GIL

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(callers)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(warmup)
        cpu_before = {label: cpu_seconds(pid) for label, pid in pids.items()}
        self_before = time.process_time()
        window[0] = time.perf_counter()
        time.sleep(seconds)
        window[1] = time.perf_counter()
        cpu_after = {label: cpu_seconds(pid) for label, pid in pids.items()}
        self_after = time.process_time()
    finally:
        stop.set()
        for thread in threads:
            thread.join(RPC_TIMEOUT + 5)
    return round_result("shardnode", op, callers, window, latencies, errors, pids, cpu_before, cpu_after,
                        self_after - self_before)


def round_result(system: str, op: str, callers: int, window: list[float], latencies: list[float],
                 errors: Counter[str], pids: dict[str, int], cpu_before: dict[str, float],
                 cpu_after: dict[str, float], generator_cpu: float) -> dict:
    elapsed = window[1] - window[0]
    latencies.sort()
    ops = len(latencies)
    cpu = {label: round(cpu_after[label] - cpu_before[label], 3) for label in pids}
    server_cpu = sum(cpu.values())
    return {
        "system": system,
        "op": op,
        "callers": callers,
        "seconds": round(elapsed, 2),
        "ops": ops,
        "errors": dict(errors),
        "ops_per_second": round(ops / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "server_cpu_seconds": round(server_cpu, 3),
        "cpu_ms_per_op": round(1000 * server_cpu / ops, 3) if ops else None,
        "cpu_seconds_by_process": cpu,
        "cpu_ms_per_op_by_process": {label: round(1000 * s / ops, 3) if ops else None for label, s in cpu.items()},
        "load_generator_cpu_ms_per_op": round(1000 * generator_cpu / ops, 3) if ops else None,
        "loadavg_1min_at_end": round(os.getloadavg()[0], 2),
    }


def scrape_counters(url: str, prefixes: tuple[str, ...]) -> dict[str, float]:
    """Sample values of a Prometheus text page whose names start with one of
    `prefixes` (labels kept in the key); {} when the page does not answer."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        if line.startswith(prefixes):
            name, _, value = line.rpartition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                continue
    return values


def group_commit_stats(before: dict[str, float], after: dict[str, float], node_label: str) -> dict:
    """Synced writes (Readys) and proposals of one worker over a round, from
    its raft_fsync_latency_seconds and raft_proposal_batch_size histograms."""
    def delta(name: str) -> float:
        key = next((k for k in after if k.startswith(name) and node_label in k), None)
        return after.get(key, 0.0) - before.get(key, 0.0) if key else 0.0
    fsyncs = delta("raft_fsync_latency_seconds_count")
    proposals = delta("raft_proposal_batch_size_count")
    entries = delta("raft_proposal_batch_size_sum")
    return {"fsyncs": fsyncs, "fsync_seconds": round(delta("raft_fsync_latency_seconds_sum"), 3),
            "mean_fsync_ms": round(1000 * delta("raft_fsync_latency_seconds_sum") / fsyncs, 3) if fsyncs else None,
            "proposal_batches": proposals, "entries_proposed": entries}


# --- Profiling -------------------------------------------------------------------------


def py_spy_binary() -> str | None:
    return shutil.which("py-spy") or (str(Path(sys.executable).parent / "py-spy")
                                      if (Path(sys.executable).parent / "py-spy").exists() else None)


async def profile_round(target: Target, cluster: LocalCluster, callers: int, warmup: float, seconds: float,
                        value: bytes, out_dir: Path, started: list[subprocess.Popen], native: bool,
                        gil: bool, op: str = "put", router_host: str | None = None) -> dict:
    """A shardnode round of `op` (put by default) with py-spy recording the leader worker, a
    follower and the leader's host's router for `seconds`: Python frames
    only, without pausing the processes (--nonblocking), or with `native`
    also the C/Cython frames (gRPC, uvloop, RocksDB), pausing the process
    at each sample; with `gil` only samples of the thread holding the GIL
    (Python's own CPU: py-spy otherwise counts a thread blocked in a C call,
    an fsync or gRPC's poller, as busy)."""
    binary = py_spy_binary()
    if binary is None:
        raise RuntimeError("--profile needs py-spy (pip install py-spy)")
    roles = await shardnode_roles(cluster)
    leader = next(label for label, role in roles.items() if role == "leader")
    follower = next(label for label, role in roles.items() if role == "follower")
    # The router the load goes through (an AsyncClient's preferred one), else the leader's host's.
    router = (router_host or leader.split("/")[0]) + "/router"
    pids = target.pids()
    chosen = {"leader worker": leader, "follower worker": follower,
              "router (leader's host)" if router_host is None else "router (the client's)": router}
    out_dir.mkdir(parents=True, exist_ok=True)

    leader_host = next(h for h in cluster.config.hosts if h.name == leader.split("/")[0])
    metrics_url = f"http://{leader_host.address}:{leader_host.metrics_port}/metrics"
    prefixes = ("raft_fsync_latency_seconds_count", "raft_fsync_latency_seconds_sum",
                "raft_proposal_batch_size_count", "raft_proposal_batch_size_sum")
    readings: dict[str, tuple[dict, dict]] = {}

    def at_window(edge: str) -> None:
        # Per-thread CPU and the leader's counters over the measured window only.
        readings[edge] = ({label: thread_cpu_seconds(pids[label]) for label in chosen.values()},
                          scrape_counters(metrics_url, prefixes))

    async def record() -> None:
        procs = {}
        for role, label in chosen.items():
            path = out_dir / f"{label.replace('/', '-')}.txt"
            proc = subprocess.Popen(
                [binary, "record", "--pid", str(pids[label]), "--duration", str(int(seconds)), "--rate", "100",
                 "--native" if native else "--nonblocking", *(["--gil"] if gil else []),
                 "--threads", "--format", "raw", "--output", str(path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
            )
            started.append(proc)
            procs[role] = proc
        for proc in procs.values():
            while proc.poll() is None:
                await asyncio.sleep(0.2)

    result = await run_round(target, op, callers, warmup, seconds, value, during=record, at_window=at_window)
    # Per-thread CPU: what py-spy's samples cannot tell apart, CPU from
    # waiting in a system call (an fsync).
    (threads_before, counters_before), (threads_after, counters_after) = readings["start"], readings["end"]
    stats = group_commit_stats(counters_before, counters_after, "")
    if stats["fsyncs"]:
        stats["entries_per_fsync"] = round(stats["entries_proposed"] / stats["fsyncs"], 1)
    if stats["proposal_batches"]:
        stats["entries_per_proposal"] = round(stats["entries_proposed"] / stats["proposal_batches"], 1)
    result["leader_group_commit"] = stats
    thread_cpu_ms = {
        label: {tid: (comm, 1000 * (after - threads_before[label].get(tid, ("", 0.0))[1]) / max(1, result["ops"]))
                for tid, (comm, after) in threads_after[label].items()}
        for label in chosen.values()}
    profiles = {}
    for role, label in chosen.items():
        path = out_dir / f"{label.replace('/', '-')}.txt"
        lines = path.read_text().splitlines() if path.exists() else []
        summary = summarize_collapsed(lines)
        profiles[role] = {"process": label, "file": str(path), **summary,
                          "thread_cpu_ms_per_op": name_threads(thread_cpu_ms[label], summary["threads"]),
                          "group_commit": result["leader_group_commit"] if label == leader else None}
    return {"round": result, "profiles": profiles}


# --- Output ---------------------------------------------------------------------------


#: How a shardnode round reaches the cluster, as the table names it.
MODES = {
    "rpc": "router API, 1 RPC per op",
    "client": "Client, {n} threads",
    "async": "AsyncClient, {n} tasks",
}


def format_table(rows: list[tuple[dict, dict, str]]) -> str:
    """One line per (etcd round, shardnode round, how shardnode was driven)."""
    head = ("| op | callers | shardnode via | etcd ops/s | p50 ms | p99 ms | CPU ms/op | shardnode ops/s | p50 ms "
            "| p99 ms | CPU ms/op | ratio | CPU × |")
    lines = [head, "|" + "---|" * 13]
    for etcd, shard, mode in rows:
        ratio = shard["ops_per_second"] / etcd["ops_per_second"] if etcd["ops_per_second"] else float("nan")
        cpu_ratio = (shard["cpu_ms_per_op"] / etcd["cpu_ms_per_op"]
                     if etcd["cpu_ms_per_op"] and shard["cpu_ms_per_op"] else float("nan"))
        cells = [etcd["op"], etcd["callers"], MODES.get(mode, mode).format(n=shard["callers"])]
        for r in (etcd, shard):
            cells += [f"{r['ops_per_second']:,.0f}", r["p50_ms"], r["p99_ms"],
                      "-" if r["cpu_ms_per_op"] is None else f"{r['cpu_ms_per_op']:.3f}"]
        cells += [f"{ratio:.2f}", f"{cpu_ratio:.1f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        errors = {k: v for r in (etcd, shard) for k, v in r["errors"].items()}
        if errors:
            lines.append(f"|   (errors: etcd {etcd['errors']}, shardnode {shard['errors']}) |")
    return "\n".join(lines)


def format_profiles(profiles: dict) -> str:
    out = []
    for role, p in profiles.items():
        out.append(f"{role} ({p['process']}): {p['samples']} samples, threads {p['threads']}")
        if role == "leader worker" and p.get("group_commit"):
            out.append(f"  group commit over the measured window: {p['group_commit']}")
        if p.get("thread_cpu_ms_per_op"):
            out.append(f"  CPU ms per op by thread: {p['thread_cpu_ms_per_op']}")
        out.append("  own time:")
        out += [f"    {pct:5.1f}%  {name}" for name, _, pct in p["own"]]
        out.append("  inclusive:")
        out += [f"    {pct:5.1f}%  {name}" for name, _, pct in p["inclusive"]]
    return "\n".join(out)


# --- Main ------------------------------------------------------------------------------


def report_round(result: dict, mode: str) -> None:
    via = "" if result["system"] == "etcd" else " via " + MODES[mode].format(n=result["callers"])
    print(f"versus_etcd: {result['system']}{via} {result['op']} x{result['callers']}: "
          f"{result['ops_per_second']:,.0f} ops/s p50 {result['p50_ms']} ms p99 {result['p99_ms']} ms "
          f"cpu {result['cpu_ms_per_op']} ms/op load {os.getloadavg()[0]:.2f}", file=sys.stderr)


async def bench(args: argparse.Namespace, tmp: Path, etcd: EtcdCluster, shard: LocalCluster,
                started: list[subprocess.Popen]) -> dict:
    messages, stub_class = etcd_stubs()
    etcd_t = etcd_target(etcd, messages, stub_class)
    shard_t = shardnode_target(shard)
    value = bytes(random.Random(11).getrandbits(8) for _ in range(VALUE_BYTES))
    try:
        await wait_etcd(etcd_t, 30)
        for target in (etcd_t, shard_t):
            began = time.monotonic()
            await preload(target, value)
            print(f"versus_etcd: {target.name}: {KEYS} keys loaded in {time.monotonic() - began:.1f}s",
                  file=sys.stderr)
        rounds = []
        rows = []
        async_t, async_client = shardnode_async_client_target(shard)
        sync_client = Client(list(shard.router_addresses.values()), timeout=RPC_TIMEOUT, cluster=shard.config)
        try:
            for op in args.ops:
                for callers in args.callers:
                    # etcd, then shardnode driven each way: the same load, interleaved.
                    etcd_round = await run_round(etcd_t, op, callers, args.warmup, args.seconds, value)
                    report_round(etcd_round, "rpc")
                    rounds.append(etcd_round)
                    for mode in args.modes:
                        if mode == "rpc":
                            result = await run_round(shard_t, op, callers, args.warmup, args.seconds, value)
                        elif mode == "async":
                            result = await run_round(async_t, op, callers, args.warmup, args.seconds, value)
                        else:
                            result = await asyncio.to_thread(run_thread_round, sync_client, op, callers, args.warmup,
                                                             args.seconds, value, shard_t.pids())
                        result["via"] = mode
                        result["roles"] = await shardnode_roles(shard)
                        report_round(result, mode)
                        rounds.append(result)
                        rows.append((etcd_round, result, mode))
        finally:
            await async_client.aclose()
            await asyncio.to_thread(sync_client.close)
        report = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                  "loadavg_at_end": os.getloadavg(), "cpus": os.cpu_count(), "keys": KEYS,
                  "value_bytes": VALUE_BYTES, "seconds": args.seconds, "warmup": args.warmup,
                  "etcd_version": subprocess.run([etcd.binary, "--version"], capture_output=True,
                                                 text=True).stdout.splitlines()[0],
                  "rounds": rounds, "table": format_table(rows)}
        if args.profile:
            if args.profile_via == "async":
                profile_t, profile_client = shardnode_async_client_target(shard)
            else:
                profile_t, profile_client = shard_t, None
            try:
                router_host = None
                if profile_client is not None:
                    address = profile_client.routers[profile_client._preferred]
                    router_host = next(h.name for h in shard.config.hosts if h.router_address == address)
                report["profile"] = await profile_round(profile_t, shard, max(args.callers), args.warmup,
                                                        args.seconds, value, Path(args.profile), started,
                                                        args.native, args.gil, args.profile_op, router_host)
            finally:
                if profile_client is not None:
                    await profile_client.aclose()
        return report
    finally:
        await etcd_t.close()
        await shard_t.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per round")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds at the start of each round")
    parser.add_argument("--callers", type=parse_callers, default=parse_callers("1,16,64"))
    parser.add_argument("--ops", type=lambda text: parse_list(text, ("put", "get", "range", "txn")),
                        default=["put", "get"], help="put, get; range and txn (docs/etcd.md) when asked")
    parser.add_argument("--tick-ms", type=int, default=100, help="shardnode's Raft tick (etcd: 100 ms heartbeat)")
    parser.add_argument("--modes", type=lambda text: parse_list(text, tuple(MODES)), default=list(MODES),
                        help="how shardnode is driven: rpc (one router call per op, as the etcd load), "
                             "client (one Client, a thread per caller), async (one AsyncClient, a task per caller)")
    parser.add_argument("--profile", metavar="DIR", help="then profile a shardnode round with py-spy")
    parser.add_argument("--profile-op", choices=("put", "get"), default="put", help="the profiled round's operation")
    parser.add_argument("--profile-via", choices=("rpc", "async"), default="rpc",
                        help="the profiled round's load: one RPC per op, or the AsyncClient")
    parser.add_argument("--native", action="store_true", help="--profile with C/Cython frames (py-spy --native)")
    parser.add_argument("--gil", action="store_true", help="--profile only the thread holding the GIL (py-spy --gil)")
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON")
    args = parser.parse_args()

    binary = ensure_etcd()
    if binary is None:
        print("versus_etcd: etcd is not installed and cannot be installed here "
              "(needs root and apt-get: apt-get install etcd-server)", file=sys.stderr)
        return 2

    # SIGTERM/SIGHUP unwind through the finally below like Ctrl-C does.
    def _raise(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)

    started: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="versus-etcd-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "etcd").mkdir()
        etcd = EtcdCluster(binary, tmp / "etcd")
        shard = LocalCluster(tmp / "shardnode", hosts=3, groups=1, replicas=3, tick_ms=args.tick_ms,
                             name="versus-etcd")
        try:
            etcd.start_all()
            shard.start_all()
            try:
                shard.wait_ready(timeout=60)
            except AssertionError as exc:
                print(f"versus_etcd: shardnode did not start: {str(exc).splitlines()[0]}", file=sys.stderr)
                print(shard.log_tail(), file=sys.stderr)
                return 1
            try:
                report = asyncio.run(bench(args, tmp, etcd, shard, started))
            except RuntimeError as exc:
                print(f"versus_etcd: {exc}", file=sys.stderr)
                print(etcd.log_tail(), file=sys.stderr)
                return 1
        finally:
            for proc in started:
                if proc.poll() is None:
                    signal_and_wait(proc, signal.SIGKILL)
            shard.stop_all()
            etcd.stop_all()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['date']}, {report['cpus']} CPUs, load average at the end {report['loadavg_at_end']}, "
              f"{report['etcd_version']}, {KEYS} keys, {VALUE_BYTES}-byte values, {args.seconds:g} s per round")
        print(report["table"])
        if "profile" in report:
            print()
            print(format_profiles(report["profile"]["profiles"]))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as interrupt:   # Ctrl-C or SIGTERM: every process is already killed
        print(f"versus_etcd: stopped ({interrupt or 'interrupted'}); every process it started is killed",
              file=sys.stderr)
        sys.exit(130)
