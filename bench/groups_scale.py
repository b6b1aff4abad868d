"""What one more Raft group costs, idle and under load: 3 hosts, 3 replicas per group.

    .venv/bin/python bench/groups_scale.py [--idle-groups 1,8,32] [--load-groups 1,2,4,8,16]
        [--settle 20] [--seconds 30] [--duration 15] [--callers 256] [--json]

For each number of data groups N (the union of both lists; one cluster each,
started as `make run` starts one, on free ports, data in a temporary
directory, 100 ms ticks, quiescence on as configured by default):

- start: seconds from starting the top supervisord to every worker and
  router RUNNING, and to every group (the metadata group included) having a
  leader (`shardnode status --wait`);
- idle (N in --idle-groups): after `--settle` seconds, the cores every
  process of the cluster used over `--seconds` (utime + stime from
  /proc/PID/stat, bench/idle.py's measure), by kind; the cores per data
  group (total / N); the resident memory (VmRSS) of each worker process;
- load (N in --load-groups): `shardnode bench --workload load`, then
  `--workload a` (50 % read, 50 % update, zipfian) with `--callers` tasks
  sharing one AsyncClient for `--duration` seconds: ops/s, read and update
  p50/p99, and the CPU per operation of each kind of process (the bench's
  own process, the load generator, included), and from the hosts' metrics
  pages the data groups' entries per proposal batch and per synced write
  (raft_proposal_batch_size, raft_fsync_latency_seconds). `--profile DIR` also records
  5 s of the busiest worker of the round with `py-spy record --gil`, 3 s
  into it, and prints its busiest functions.

At the end, the marginal idle cost of a group: (cores at the largest N −
cores at the smallest) / (difference in N). Every process it starts is
stopped by PID on exit, also on a failure, Ctrl-C or SIGTERM
(tests/integration/supervised.py). Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.idle import _processes, measure  # noqa: E402
from bench.versus_etcd import cpu_seconds, py_spy_binary, scrape_counters, summarize_collapsed  # noqa: E402
from shardnode.config import METADATA_GROUP, ClusterConfig  # noqa: E402
from tests.integration.ports import write_cluster_toml  # noqa: E402
from tests.integration.supervised import start_supervised  # noqa: E402

HOSTS = 3
TICK_MS = 100
LOAD_GENERATOR = "load generator (bench)"


def _groups(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if any(value < 1 for value in values):
        raise argparse.ArgumentTypeError("group counts are positive integers")
    return values


def _cli(config: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardnode.cli", "--config", str(config), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def _worker_rss(top_pid: int) -> dict:
    """VmRSS of every worker process: data workers and metadata workers apart."""
    data, meta = [], []
    for pid, kind in _processes(top_pid).items():
        if kind.startswith("group "):
            data.append(_rss_mib(pid))
        elif kind == "metadata workers":
            meta.append(_rss_mib(pid))
    data = [value for value in data if not math.isnan(value)]
    meta = [value for value in meta if not math.isnan(value)]

    def summary(values: list[float]) -> dict:
        if not values:
            return {"processes": 0}
        values.sort()
        return {"processes": len(values), "mean_mib": round(sum(values) / len(values), 1),
                "min_mib": round(values[0], 1), "max_mib": round(values[-1], 1)}
    return {"data workers": summary(data), "metadata workers": summary(meta)}


def _by_kind(cores: dict[str, float]) -> dict[str, float]:
    """bench/idle.py's kinds with the data groups summed into one kind."""
    merged: dict[str, float] = {}
    for kind, value in cores.items():
        key = "data workers" if kind.startswith("group ") else kind
        merged[key] = merged.get(key, 0.0) + value
    return merged


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _profile_busiest_worker(processes: dict[int, str], out_dir: Path) -> dict:
    """5 s of py-spy (--gil) on the worker that used the most CPU over the last second."""
    binary = py_spy_binary()
    if binary is None:
        raise SystemExit("--profile needs py-spy (.venv/bin/pip install -e '.[bench]')")
    workers = [pid for pid, kind in processes.items() if kind.startswith("group ")]
    before = {pid: cpu_seconds(pid) for pid in workers}
    time.sleep(1.0)
    used = {pid: cpu_seconds(pid) - before[pid] for pid in workers}
    pid = max((p for p in used if not math.isnan(used[p])), key=used.__getitem__)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"groups-worker-{pid}.txt"
    subprocess.run([binary, "record", "--pid", str(pid), "--duration", "5", "--rate", "100", "--gil",
                    "--nonblocking", "--threads", "--format", "raw", "--output", str(path)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    lines = path.read_text().splitlines() if path.exists() else []
    return {"pid": pid, "kind": processes[pid], "cores_before": round(used[pid], 3), "file": str(path),
            **summarize_collapsed(lines)}


_COMMIT_SERIES = ("raft_proposal_batch_size_sum", "raft_proposal_batch_size_count", "raft_fsync_latency_seconds_count")


def _commit_counters(config: Path) -> dict[str, float]:
    """The data groups' proposal and fsync counters, summed over every worker of every host."""
    totals = dict.fromkeys(_COMMIT_SERIES, 0.0)
    for host in ClusterConfig.load(config).hosts:
        for key, value in scrape_counters(f"http://{host.address}:{host.metrics_port}/metrics", _COMMIT_SERIES).items():
            if f'group="{METADATA_GROUP}"' in key or 'group="meta"' in key:
                continue
            totals[key.split("{", 1)[0]] += value
    return totals


def _load_round(top_pid: int, config: Path, callers: int, duration: float, keys: int,
                profile_dir: Path | None = None) -> dict:
    loaded = _cli(config, "bench", "--json", "--no-progress", "--workload", "load", "--keys", str(keys),
                  timeout=900)
    if loaded.returncode != 0:
        raise RuntimeError(f"bench --workload load failed: {loaded.stderr.strip()[-500:]}")
    processes = _processes(top_pid)
    commits_before = _commit_counters(config)
    before = {pid: cpu_seconds(pid) for pid in processes}
    generator_before = _children_cpu()
    command = [sys.executable, "-m", "shardnode.cli", "--config", str(config), "bench", "--json", "--no-progress",
               "--workload", "a", "--engine", "async", "--clients", str(callers), "--keys", str(keys),
               "--duration", str(duration)]
    spied = None
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as bench:
        try:
            if profile_dir is not None:
                time.sleep(2.0)
                spied = _profile_busiest_worker(processes, profile_dir)
            stdout, stderr = bench.communicate(timeout=900)
        finally:
            if bench.poll() is None:   # interrupted or timed out: stop the bench by its PID
                bench.kill()
                bench.wait()
    run = subprocess.CompletedProcess(command, bench.returncode, stdout, stderr)
    generator = _children_cpu() - generator_before
    after = {pid: cpu_seconds(pid) for pid in processes}
    commits = {name: value - commits_before[name] for name, value in _commit_counters(config).items()}
    if run.returncode != 0:
        raise RuntimeError(f"bench --workload a failed: {run.stderr.strip()[-500:]}")
    summary = json.loads(run.stdout)
    ops = max(summary["total"]["ops"], 1)
    cpu: dict[str, float] = {}
    for pid, kind in processes.items():
        if not (math.isnan(before[pid]) or math.isnan(after[pid])):
            cpu[kind] = cpu.get(kind, 0.0) + after[pid] - before[pid]
    cpu = _by_kind(cpu)
    cpu[LOAD_GENERATOR] = generator
    operations = summary["operations"]
    return {
        "ops_per_s": summary["total"]["ops_per_s"], "ops": summary["total"]["ops"],
        "errors": summary["total"]["errors"], "duration_s": summary["duration_s"],
        "read_ms": {q: operations.get("read", {}).get("latency_ms", {}).get(q) for q in ("p50", "p99")},
        "update_ms": {q: operations.get("update", {}).get("latency_ms", {}).get(q) for q in ("p50", "p99")},
        "cpu_ms_per_op": {kind: round(seconds * 1000 / ops, 3) for kind, seconds in sorted(cpu.items())},
        "server_cpu_ms_per_op": round(sum(v for k, v in cpu.items() if k != LOAD_GENERATOR) * 1000 / ops, 3),
        "cores_used": round(sum(cpu.values()) / max(summary["duration_s"], 1e-9), 2),
        "entries_per_proposal_batch": round(commits["raft_proposal_batch_size_sum"]
                                            / commits["raft_proposal_batch_size_count"], 1)
        if commits["raft_proposal_batch_size_count"] else None,
        "synced_writes_per_op": round(commits["raft_fsync_latency_seconds_count"] / ops, 2),
        **({"profile": spied} if spied else {}),
    }


def run_one(groups: int, *, idle: bool, load: bool, args: argparse.Namespace) -> dict:
    result: dict = {"groups": groups, "worker_processes": groups * HOSTS}
    with tempfile.TemporaryDirectory(prefix=f"shardnode-groups{groups}-") as tmp_name:
        tmp = Path(tmp_name)
        config = write_cluster_toml(tmp, name=f"scale-{groups}", hosts=HOSTS, groups=groups, replicas=HOSTS,
                                    tick_ms=TICK_MS)
        began = time.monotonic()
        with start_supervised(tmp, config, running_timeout=args.start_timeout) as env:
            result["running_s"] = round(time.monotonic() - began, 1)
            ready = _cli(config, "status", "--wait", str(args.start_timeout), timeout=args.start_timeout + 60)
            if ready.returncode != 0:
                result["error"] = f"not every group had a leader: {ready.stderr.strip()[-300:]}"
                return result
            result["all_led_s"] = round(time.monotonic() - began, 1)
            env.record_pids()
            if idle:
                time.sleep(args.settle)
                idle_result = measure(env.top.pid, args.seconds)
                cores = _by_kind(idle_result["cores"])
                result["idle"] = {
                    "seconds": idle_result["seconds"], "processes": idle_result["processes"],
                    "cores": {kind: round(value, 4) for kind, value in sorted(cores.items())},
                    "total_cores": idle_result["total_cores"],
                    "cores_per_group": round(idle_result["total_cores"] / groups, 4),
                    "data_worker_cores_per_group": round(cores.get("data workers", 0.0) / groups, 4),
                }
                result["rss"] = _worker_rss(env.top.pid)
            if load:
                result["load"] = _load_round(env.top.pid, config, args.callers, args.duration, args.keys,
                                             args.profile)
    return result


def format_report(results: list[dict], marginal: dict | None) -> str:
    lines = ["groups  workers  running_s  all_led_s  idle cores  per group  data workers/group  "
             "RSS data worker MiB (mean/max)"]
    for r in results:
        idle, rss = r.get("idle"), r.get("rss", {}).get("data workers", {})
        lines.append(
            f"{r['groups']:>6}  {r['worker_processes']:>7}  {r.get('running_s', '-'):>9}  {r.get('all_led_s', '-'):>9}  "
            + (f"{idle['total_cores']:>10.3f}  {idle['cores_per_group']:>9.4f}  "
               f"{idle['data_worker_cores_per_group']:>17.4f}  {rss.get('mean_mib', '-')}/{rss.get('max_mib', '-')}"
               if idle else f"{'-':>10}  {'-':>9}  {'-':>17}  -")
            + (f"  ERROR {r['error']}" if "error" in r else ""))
    for r in results:
        if "idle" in r:
            lines.append(f"  idle cores by kind, {r['groups']} groups: "
                         + ", ".join(f"{k} {v:.3f}" for k, v in r["idle"]["cores"].items()))
    if marginal:
        lines.append(f"marginal idle cost: {marginal['cores_per_group']:.4f} cores per group "
                     f"({marginal['from']} -> {marginal['to']} groups)")
    loads = [r for r in results if "load" in r]
    if loads:
        lines.append("")
        lines.append("groups  ops/s   read p50/p99 ms   update p50/p99 ms  errors  entries/batch  fsyncs/op  "
                     "server CPU ms/op  CPU ms/op by kind")
        for r in loads:
            load = r["load"]
            lines.append(
                f"{r['groups']:>6}  {load['ops_per_s']:>6.0f}  {load['read_ms']['p50']:>7}/{load['read_ms']['p99']:<8}"
                f"  {load['update_ms']['p50']:>8}/{load['update_ms']['p99']:<8}  {load['errors']:>6}  "
                f"{load['entries_per_proposal_batch']!s:>13}  {load['synced_writes_per_op']:>9}  "
                f"{load['server_cpu_ms_per_op']:>16.3f}  "
                + ", ".join(f"{k} {v:.3f}" for k, v in load["cpu_ms_per_op"].items()))
        for r in loads:
            spy = r["load"].get("profile")
            if spy:
                lines.append(f"profile, {r['groups']} groups: {spy['kind']} pid {spy['pid']} "
                             f"({spy['cores_before']} cores), {spy['samples']} GIL samples, own time:")
                lines += [f"    {pct:5.1f}%  {name}" for name, _, pct in spy["own"]]
    return "\n".join(lines)


def _stop_on_sigterm(signum: int, frame: object) -> None:
    # Raised in the main thread: the `with` blocks' finalizers stop every process by PID.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle-groups", type=_groups, default=_groups("1,8,32"))
    parser.add_argument("--load-groups", type=_groups, default=_groups("1,2,4,8,16"))
    parser.add_argument("--settle", type=float, default=20.0, help="seconds between all groups led and idle measure")
    parser.add_argument("--seconds", type=float, default=30.0, help="idle measure, seconds (default 30)")
    parser.add_argument("--duration", type=float, default=15.0, help="load round, seconds (default 15)")
    parser.add_argument("--callers", type=int, default=256, help="AsyncClient tasks in the load round")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--start-timeout", type=float, default=300.0,
                        help="seconds allowed for RUNNING and for all groups led (each)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="py-spy the busiest worker of each load round for 5 s (raw stacks in DIR)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the tables")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    results = []
    try:
        for groups in sorted(set(args.idle_groups) | set(args.load_groups)):
            result = run_one(groups, idle=groups in args.idle_groups, load=groups in args.load_groups, args=args)
            results.append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("groups_scale.py: interrupted; every process was stopped", file=sys.stderr)
        return 130
    idled = [r for r in results if "idle" in r]
    marginal = None
    if len(idled) >= 2 and idled[-1]["groups"] > idled[0]["groups"]:
        low, high = idled[0], idled[-1]
        marginal = {"from": low["groups"], "to": high["groups"], "cores_per_group": round(
            (high["idle"]["total_cores"] - low["idle"]["total_cores"]) / (high["groups"] - low["groups"]), 4)}
    print(json.dumps({"results": results, "marginal_idle": marginal}, indent=2) if args.json
          else format_report(results, marginal))
    return 0


if __name__ == "__main__":
    sys.exit(main())
