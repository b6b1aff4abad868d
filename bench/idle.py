"""What the default local cluster costs while nobody uses it.

    .venv/bin/python bench/idle.py [--config etc/cluster.toml] [--seconds 30] [--settle 10] [--json]

Starts a cluster of CONFIG's shape (hosts, data groups, replicas, metadata
group, timing, etcd API, TLS) the way `make run` does — a top supervisord
whose programs are one supervisord per host — but on free ports of
127.0.0.N and with its data in a temporary directory, so it never collides
with a running `make run`. It waits until every group has a leader, lets the
cluster settle (`--settle`), then reads utime + stime (/proc/PID/stat) of
every process it started, at the start and at the end of `--seconds`, and
prints the cores each kind of process used: routers, the workers of each
data group, the metadata group's workers, the hosts' supervisords, the top
supervisord, and the total. `--profile DIR` then records 10 s of the
busiest process and 10 s of the busiest data-group worker (py-spy, raw
collapsed stacks in DIR) and prints their busiest functions.
Every process it started is stopped on exit, also on a failure or Ctrl-C
(by PID: tests/integration/supervised.py). Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.versus_etcd import cpu_seconds, py_spy_binary, summarize_collapsed  # noqa: E402
from shardnode.config import ClusterConfig  # noqa: E402
from tests.integration.ports import write_cluster_toml  # noqa: E402
from tests.integration.supervised import start_supervised  # noqa: E402

SUPERVISORDS = "supervisords"
TOP_SUPERVISORD = "top supervisord"
ROUTERS = "routers"


def temporary_copy(source: ClusterConfig, tmp: Path) -> Path:
    """A cluster.toml of `source`'s shape on free ports, its data under `tmp`."""
    return write_cluster_toml(
        tmp, name=f"{source.name}-idle", hosts=len(source.hosts), groups=source.groups, replicas=source.replicas,
        meta_replicas=source.meta_replicas, tick_ms=source.timing.tick_ms, tls=source.security.tls,
        etcd=any(h.etcd_port for h in source.hosts),
        standby=tuple(f"h{i}" for i, h in enumerate(source.hosts, 1) if h.standby))


def _descendants(root: int) -> set[int]:
    """Every live process below `root` (and root itself): the hosts'
    supervisords, their routers and workers."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, to_visit = set(), [root]
    while to_visit:
        pid = to_visit.pop()
        if pid not in found:
            found.add(pid)
            to_visit.extend(children.get(pid, ()))
    return found


def kind_of(cmdline: list[str]) -> str:
    """The kind a process is counted under, from its command line."""
    if "router" in cmdline and "-m" in cmdline:
        return ROUTERS
    if "worker" in cmdline and "--group" in cmdline:
        group = cmdline[cmdline.index("--group") + 1]
        return "metadata workers" if group == "meta" else f"group {group} workers"
    if any("supervisord" in part for part in cmdline):
        return SUPERVISORDS
    return "other"


def _processes(root: int) -> dict[int, str]:
    kinds = {}
    for pid in _descendants(root):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        # The top supervisord apart: nothing but its own loop runs there, while the hosts'
        # also answer their routers' process watch (XML-RPC every second).
        kinds[pid] = TOP_SUPERVISORD if pid == root else kind_of(cmdline)
    return kinds


def _cpu(pids: dict[int, str]) -> dict[int, float]:
    return {pid: cpu_seconds(pid) for pid in pids}


def measure(top_pid: int, seconds: float) -> dict:
    """Cores used by kind over `seconds` (a process that exits meanwhile is left out and counted)."""
    processes = _processes(top_pid)
    began, before = time.monotonic(), _cpu(processes)
    time.sleep(seconds)
    after, elapsed = _cpu(processes), time.monotonic() - began
    cores: dict[str, float] = {}
    counts: dict[str, int] = {}
    exited = 0
    busiest = (0, "", -1.0)
    busiest_data_worker = (0, "", -1.0)
    for pid, kind in processes.items():
        if math.isnan(before[pid]) or math.isnan(after[pid]):
            exited += 1
            continue
        used = (after[pid] - before[pid]) / elapsed
        cores[kind] = cores.get(kind, 0.0) + used
        counts[kind] = counts.get(kind, 0) + 1
        if used > busiest[2]:
            busiest = (pid, kind, used)
        if kind.startswith("group ") and used > busiest_data_worker[2]:
            busiest_data_worker = (pid, kind, used)
    return {"seconds": round(elapsed, 1), "processes": sum(counts.values()), "exited": exited,
            "cores": {kind: round(value, 4) for kind, value in sorted(cores.items())},
            "counts": dict(sorted(counts.items())), "total_cores": round(sum(cores.values()), 4),
            "busiest": {"pid": busiest[0], "kind": busiest[1], "cores": round(busiest[2], 4)},
            "busiest_data_worker": {"pid": busiest_data_worker[0], "kind": busiest_data_worker[1],
                                    "cores": round(busiest_data_worker[2], 4)}}


def profile(pid: int, out_dir: Path, seconds: int = 10) -> dict:
    """`seconds` of py-spy on `pid` (all threads, idle ones left out): the busiest functions."""
    binary = py_spy_binary()
    if binary is None:
        raise SystemExit("--profile needs py-spy (.venv/bin/pip install -e '.[bench]')")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"idle-{pid}.txt"
    subprocess.run([binary, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "100",
                    "--nonblocking", "--threads", "--format", "raw", "--output", str(path)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=seconds + 60)
    lines = path.read_text().splitlines() if path.exists() else []
    return {"file": str(path), **summarize_collapsed(lines)}


def format_table(result: dict) -> str:
    lines = [f"idle for {result['seconds']} s, {result['processes']} processes"
             + (f" ({result['exited']} exited meanwhile, not counted)" if result["exited"] else "")]
    for kind, value in result["cores"].items():
        lines.append(f"  {kind:<20} {result['counts'][kind]:>3} processes  {value:.3f} cores")
    lines.append(f"  {'total':<20} {result['processes']:>3} processes  {result['total_cores']:.3f} cores")
    for which in ("busiest", "busiest_data_worker"):
        busiest = result[which]
        lines.append(f"  {which.replace('_', ' ')}: {busiest['kind']} (pid {busiest['pid']}) "
                     f"{busiest['cores']:.4f} cores")
        spy = result.get("profiles", {}).get(which)
        if spy:
            lines.append(f"  its profile ({spy['samples']} samples, {spy['file']}), own time:")
            lines += [f"    {pct:5.1f}%  {name}" for name, _, pct in spy["own"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "etc" / "cluster.toml"), help="the shape to copy")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to measure (default 30)")
    parser.add_argument("--settle", type=float, default=10.0,
                        help="wait this long after the cluster is ready before measuring (default 10)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="then 10 s of py-spy on the busiest process")
    args = parser.parse_args(argv)
    source = ClusterConfig.load(Path(args.config))
    with tempfile.TemporaryDirectory(prefix="shardnode-idle-") as tmp_name:
        tmp = Path(tmp_name)
        config = temporary_copy(source, tmp)
        with start_supervised(tmp, config) as env:
            ready = subprocess.run([sys.executable, "-m", "shardnode.cli", "--config", str(config), "status",
                                    "--wait", "180"], cwd=ROOT, capture_output=True, text=True, timeout=300)
            if ready.returncode != 0:
                print(f"idle.py: the cluster did not become ready: {ready.stderr.strip()}", file=sys.stderr)
                return 1
            time.sleep(args.settle)
            env.record_pids()
            result = measure(env.top.pid, args.seconds)
            if args.profile is not None:
                result["profiles"] = {which: profile(result[which]["pid"], args.profile)
                                      for which in ("busiest", "busiest_data_worker") if result[which]["pid"]}
            result["config"] = os.path.relpath(args.config, ROOT)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
