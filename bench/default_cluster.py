"""`shardnode bench` on the default cluster's shape, in a temporary directory.

    .venv/bin/python bench/default_cluster.py [--engine async|threads] [--clients N] [--workload a] [--duration 10]

Starts 5 hosts on 127.0.0.1-5 under supervisord with 4 groups of 5
replicas (etc/cluster.toml's shape, fsync on, 100 ms ticks), loads the key
space (`shardnode bench --workload load`), runs the workload, prints the
bench's JSON summary, and stops everything. Not part of `make test`.

Then one line of CPU (utime + stime from /proc, every process of the
cluster, by kind: routers, data-group workers, metadata-group workers,
supervisords): the cores each kind used while the cluster was idle (5 s
before the load) and its CPU per operation during the workload.

--profile DIR also records, with `py-spy record --gil`, 5 s of group 0's
leader worker, one of its followers and the router of the leader's host
while the workload runs, and prints each one's busiest functions
(bench/versus_etcd.py's summary).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.versus_etcd import cpu_seconds, format_profiles, py_spy_binary, summarize_collapsed  # noqa: E402
from tests.integration.ports import write_cluster_toml  # noqa: E402
from tests.integration.supervised import start_supervised  # noqa: E402


def _bench(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardnode.cli", "--config", str(config), "bench", "--json",
                           "--no-progress", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process; 0 once it has exited (bench/versus_etcd.py reads /proc)."""
    used = cpu_seconds(pid)
    return 0.0 if math.isnan(used) else used


def _kind(program: str) -> str:
    if program == "router":
        return "routers"
    return "metadata workers" if program == "worker-meta" else "data workers"


def _cpu_by_kind(env) -> dict[str, float]:  # type: ignore[no-untyped-def]
    totals: dict[str, float] = {}
    for host, programs in env.record_pids().items():
        for program, pid in programs.items():
            if pid:
                totals[_kind(program)] = totals.get(_kind(program), 0.0) + _cpu_seconds(pid)
    supervisors = [int(p.read_text()) for p in (env.tmp / "data").glob("*/supervisord.pid")]
    totals["supervisords"] = sum(_cpu_seconds(pid) for pid in supervisors) + _cpu_seconds(env.top.pid)
    return totals


def _difference(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {kind: after[kind] - before.get(kind, 0.0) for kind in after}


def _profile(env, config: Path, out_dir: Path) -> dict:  # type: ignore[no-untyped-def]
    """5 s of py-spy (--gil) on group 0's leader, a follower and the leader's host's router."""
    binary = py_spy_binary()
    if binary is None:
        raise SystemExit("--profile needs py-spy (make bench-etcd installs it)")
    status = json.loads(subprocess.run([sys.executable, "-m", "shardnode.cli", "--config", str(config), "status",
                                        "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout)
    replicas = next(g for g in status["groups"] if g["group"] == 0)["replicas"]
    leader = next(r["host"] for r in replicas if r["role"] == "leader")
    follower = next(r["host"] for r in replicas if r["role"] == "follower")
    pids = env.record_pids()
    chosen = {"leader worker (group 0)": (leader, "worker-g0"), "follower worker (group 0)": (follower, "worker-g0"),
              "router (leader's host)": (leader, "router")}
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = {}
    for role, (host, program) in chosen.items():
        path = out_dir / f"{host}-{program}.txt"
        procs[role] = (path, subprocess.Popen(
            [binary, "record", "--pid", str(pids[host][program]), "--duration", "5", "--rate", "100", "--gil",
             "--nonblocking", "--threads", "--format", "raw", "--output", str(path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True))
    profiles = {}
    for role, (path, proc) in procs.items():
        proc.wait(timeout=60)
        lines = path.read_text().splitlines() if path.exists() else []
        host, program = chosen[role]
        profiles[role] = {"process": f"{host}/{program}", "file": str(path), **summarize_collapsed(lines),
                          "thread_cpu_ms_per_op": {}}
    return profiles


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="async", choices=["async", "threads"],
                        help="shardnode bench's engine (default async: tasks sharing one AsyncClient)")
    parser.add_argument("--clients", default=None, help="callers (default: the bench's, 256 async, 16 threads)")
    parser.add_argument("--workload", default="a")
    parser.add_argument("--duration", default="10")
    parser.add_argument("--keys", default="10000")
    parser.add_argument("--profile", type=Path, help="py-spy a leader, a follower and a router into DIR")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config = write_cluster_toml(tmp, name="bench-default", hosts=5, groups=4, replicas=5, tick_ms=100)
        with start_supervised(tmp, config) as env:
            ready = subprocess.run([sys.executable, "-m", "shardnode.cli", "--config", str(config), "status",
                                    "--wait", "180"], cwd=ROOT, capture_output=True, text=True, timeout=300)
            if ready.returncode != 0:
                print(ready.stderr, file=sys.stderr)
                return 1
            time.sleep(2)
            idle_began, idle_before = time.monotonic(), _cpu_by_kind(env)
            time.sleep(5)
            idle = _difference(_cpu_by_kind(env), idle_before)
            idle_seconds = time.monotonic() - idle_began
            loaded = _bench(config, "--workload", "load", "--keys", args.keys)
            if loaded.returncode != 0:
                print(loaded.stderr, file=sys.stderr)
                return 1
            before = _cpu_by_kind(env)
            workload = ("--workload", args.workload, "--engine", args.engine, "--keys", args.keys,
                        "--duration", args.duration) + (("--clients", args.clients) if args.clients else ())
            if args.profile is not None:
                with ThreadPoolExecutor(1) as pool:
                    running = pool.submit(_bench, config, *workload)
                    time.sleep(2)
                    profiles = _profile(env, config, args.profile)
                    run = running.result()
            else:
                run = _bench(config, *workload)
            busy = _difference(_cpu_by_kind(env), before)
            print(run.stdout.strip())
            if run.returncode != 0:
                print(run.stderr, file=sys.stderr)
                return 1
            ops = json.loads(run.stdout)["total"]["ops"]
            if args.profile is not None:
                print(format_profiles(profiles))
            print("idle, cores: " + ", ".join(f"{k} {v / idle_seconds:.2f}" for k, v in sorted(idle.items())))
            print("workload, CPU ms per operation: "
                  + ", ".join(f"{k} {v * 1000 / max(ops, 1):.3f}" for k, v in sorted(busy.items()))
                  + f"; total {sum(busy.values()) * 1000 / max(ops, 1):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
