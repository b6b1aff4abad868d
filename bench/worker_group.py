"""Throughput, latency and CPU per operation of one Raft group of real worker
processes (RocksDB with fsync on, gRPC on loopback), at several client
concurrencies.

    .venv/bin/python bench/worker_group.py [--members 3] [--seconds 10] [--writers 1,16,64]
        [--ops put,get] [--modes single,coalesced] [--compare BASE_TREE] [--profile DIR] [--tls] [--json]

Each caller is an asyncio task sending one operation at a time straight to
the leader: a PUT (100-byte value, its own session) or a linearizable GET.
`single` mode sends one Execute call per operation; `coalesced` mode lets
operations waiting together share one call, as a router does. The worker
proposes each call's writes as one batch, and everything that arrives while
an fsync runs shares the next one (group commit); reads go through ReadIndex.

For each row it reports ops/s, p50/p99 latency, the CPU (utime + stime from
/proc) the leader and one follower spent per operation, and the leader's
group commit over the row: synced writes (fsyncs), entries proposed, and
entries per fsync (its raft_fsync_latency_seconds and raft_proposal_batch_size
histograms, read through the Worker.Metrics RPC).

--compare BASE_TREE runs a second group from another source tree (e.g. a
`git archive` of the base commit, with its generated protobuf code) and
interleaves the rows: base, this tree, this tree, base, ... so that the
machine's noise hits both. --profile DIR runs one more 64-caller put row
(--profile-op get: gets) with `py-spy record --gil` on the leader and a
follower of this tree.
With --tls, every link is mutual TLS, as with `[security] tls = true`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.harness import WorkerGroup, get, put  # noqa: E402
from shardnode.proto import worker_pb2 as pb  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class TreeGroup(WorkerGroup):
    """A WorkerGroup whose workers (and metadata group) run the code of another source tree."""

    def __init__(self, tmp: Path, tree: Path, **kwargs) -> None:
        super().__init__(tmp, source_tree=tree, **kwargs)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (every thread), from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def leader_counters(group: WorkerGroup, leader: str) -> dict[str, float]:
    """The leader's group-commit counters (sums and counts of two histograms)."""
    wanted = ("raft_fsync_latency_seconds_count", "raft_fsync_latency_seconds_sum",
              "raft_proposal_batch_size_count", "raft_proposal_batch_size_sum")
    response = await group.stub(leader).Metrics(pb.MetricsRequest(), timeout=5)
    values: dict[str, float] = {}
    for line in response.text.decode().splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            values[name] = float(line.rsplit(" ", 1)[1])
    return values


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
                    future.set_exception(RuntimeError(f"operation failed: {response.status} {response.message}"))
                else:
                    future.set_result(result)
            if self.queue and len(self.queue) <= self.max_batch:
                asyncio.ensure_future(self._send())


async def _caller(group: WorkerGroup, leader: str, op: str, client: int, until: float, latencies: list[float],
                  coalescer: Coalescer | None) -> int:
    stub = group.stub(leader)
    done = 0
    sequence = 0
    value = b"v" * 100
    while time.monotonic() < until:
        sequence += 1
        key = b"bench-%d-%d" % (client % 64, sequence % 1000)
        operation = put(key, value, client, sequence) if op == "put" else get(key)
        began = time.perf_counter()
        if coalescer is not None:
            await coalescer.execute(operation)
        else:
            response = await stub.Execute(
                pb.ExecuteRequest(cluster=group.name, group=0, operations=[operation]), timeout=10
            )
            if response.status != pb.ExecuteResponse.OK:
                raise RuntimeError(f"operation failed: {response}")
        latencies.append(time.perf_counter() - began)
        done += 1
    return done


async def measure(group: WorkerGroup, op: str, callers: int, seconds: float, coalesce: bool,
                  during=None) -> dict:
    leader = await group.wait_leader()
    follower = next(h for h in group.hosts if h != leader and h in group.processes)
    pids = {"leader": group.processes[leader].pid, "follower": group.processes[follower].pid}
    latencies: list[float] = []
    coalescer = Coalescer(group, leader) if coalesce else None
    counters_before = await leader_counters(group, leader)
    cpu_before = {role: cpu_seconds(pid) for role, pid in pids.items()}
    began = time.monotonic()
    jobs = [_caller(group, leader, op, 1000 * callers + c, began + seconds, latencies, coalescer)
            for c in range(callers)]
    if during is not None:
        jobs.append(during(pids))
    counts = (await asyncio.gather(*jobs))[:callers]
    elapsed = time.monotonic() - began
    cpu_after = {role: cpu_seconds(pid) for role, pid in pids.items()}
    counters_after = await leader_counters(group, leader)
    ops = sum(counts)
    latencies.sort()
    ms = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 2)  # noqa: E731
    delta = lambda name: counters_after.get(name, 0.0) - counters_before.get(name, 0.0)  # noqa: E731
    fsyncs = delta("raft_fsync_latency_seconds_count")
    entries = delta("raft_proposal_batch_size_sum")
    return {
        "op": op,
        "mode": "coalesced" if coalesce else "single",
        "callers": callers,
        "ops": ops,
        "ops_per_second": round(ops / elapsed),
        "p50_ms": ms(0.50),
        "p99_ms": ms(0.99),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2),
        "leader_cpu_ms_per_op": round(1000 * (cpu_after["leader"] - cpu_before["leader"]) / max(1, ops), 3),
        "follower_cpu_ms_per_op": round(1000 * (cpu_after["follower"] - cpu_before["follower"]) / max(1, ops), 3),
        "fsyncs": int(fsyncs),
        "mean_fsync_ms": round(1000 * delta("raft_fsync_latency_seconds_sum") / fsyncs, 3) if fsyncs else None,
        "entries_per_fsync": round(entries / fsyncs, 1) if fsyncs else None,
        "entries_per_proposal": round(entries / delta("raft_proposal_batch_size_count"), 1)
        if delta("raft_proposal_batch_size_count") else None,
        "load_average": os.getloadavg()[0],
    }


def _py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def summarize_profile(path: Path, top: int = 18) -> dict:
    """Own share per function (innermost Python frame) of py-spy's raw output."""
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines() if path.exists() else []:
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith(("thread (", "process "))]
        count = int(count_text)
        total += count
        if frames:
            name, _, location = frames[-1].partition(" (")
            location = location.rstrip(")").rsplit(":", 1)[0]
            for marker in ("site-packages/", str(ROOT) + "/", "/lib/python3.11/"):
                if marker in location:
                    location = location.split(marker, 1)[1]
                    break
            own[f"{name} ({location})"] += count
    return {"samples": total,
            "own": [(name, round(100 * count / total, 1)) for name, count in own.most_common(top)] if total else []}


async def profile_row(group: WorkerGroup, op: str, seconds: float, out: Path, started: list[subprocess.Popen]) -> dict:
    binary = _py_spy()
    if binary is None:
        raise RuntimeError("--profile needs py-spy (pip install py-spy)")
    out.mkdir(parents=True, exist_ok=True)

    async def record(pids: dict[str, int]) -> None:
        procs = []
        for role, pid in pids.items():
            proc = subprocess.Popen(
                [binary, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds) - 1)), "--rate", "100",
                 "--nonblocking", "--gil", "--threads", "--format", "raw", "--output", str(out / f"{role}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
            started.append(proc)
            procs.append(proc)
        for proc in procs:
            while proc.poll() is None:
                await asyncio.sleep(0.2)

    row = await measure(group, op, 64, seconds, False, during=record)
    return {"row": row, **{role: summarize_profile(out / f"{role}.txt") for role in ("leader", "follower")}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--writers", default="1,16,64", help="numbers of concurrent callers")
    parser.add_argument("--ops", default="put", help="put, get or both (put,get)")
    parser.add_argument("--modes", default="single,coalesced")
    parser.add_argument("--compare", type=Path, help="another source tree to interleave with this one")
    parser.add_argument("--profile", type=Path, help="directory for py-spy profiles of a 64-caller row")
    parser.add_argument("--profile-op", default="put", choices=("put", "get"), help="the operation of that row")
    parser.add_argument("--tls", action="store_true", help="mutual TLS on every link")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    trees = {"this": ROOT}
    if args.compare is not None:
        trees = {"base": args.compare.resolve(), "this": ROOT}
    rows = [(op, mode == "coalesced", int(w)) for op in args.ops.split(",") for mode in args.modes.split(",")
            for w in args.writers.split(",")]
    started: list[subprocess.Popen] = []
    results: list[dict] = []
    profile: dict | None = None
    with tempfile.TemporaryDirectory(prefix="shardnode-bench-") as tmp:
        groups = {label: TreeGroup(Path(tmp) / label, tree, size=args.members, tick_ms=100, tls=args.tls)
                  for label, tree in trees.items()}
        try:
            for group in groups.values():
                group.start_all()

            async def run_all() -> None:
                nonlocal profile
                try:
                    for group in groups.values():
                        await group.wait_leader(timeout=30)
                    order = list(groups)
                    for op, coalesce, callers in rows:
                        for label in order:
                            row = await measure(groups[label], op, callers, args.seconds, coalesce)
                            results.append({"tree": label, **row})
                        order.reverse()  # base, this, this, base, ...
                    if args.profile is not None:
                        profile = await profile_row(groups["this"], args.profile_op, args.seconds, args.profile, started)
                finally:
                    for group in groups.values():
                        await group.close_channels()

            asyncio.run(run_all())
        finally:
            for proc in started:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            for group in groups.values():
                group.stop_all()
    if args.json:
        print(json.dumps({"rows": results, "profile": profile}, indent=2))
        return 0
    tls = "mutual TLS" if args.tls else "plaintext"
    print(f"{args.members}-member group, fsync on, 100-byte values, {tls}, {args.seconds:.0f}s per row, "
          f"{os.cpu_count()} CPUs")
    print(f"{'tree':>5} {'op':>4} {'mode':>10} {'callers':>7} {'ops/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'lead ms/op':>10} {'foll ms/op':>10} {'fsyncs':>7} {'ent/fsync':>9} {'load':>5}")
    for r in results:
        print(f"{r['tree']:>5} {r['op']:>4} {r['mode']:>10} {r['callers']:>7} {r['ops_per_second']:>7} "
              f"{r['p50_ms']:>7} {r['p99_ms']:>7} {r['leader_cpu_ms_per_op']:>10} {r['follower_cpu_ms_per_op']:>10} "
              f"{r['fsyncs']:>7} {str(r['entries_per_fsync']):>9} {r['load_average']:>5.1f}")
    if profile is not None:
        print(f"\nprofile (py-spy --gil, own time) of a 64-caller {args.profile_op} row: {profile['row']['ops_per_second']} ops/s")
        for role in ("leader", "follower"):
            print(f"  {role}: {profile[role]['samples']} samples")
            for name, share in profile[role]["own"]:
                print(f"    {share:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
