"""`make run`'s launcher (scripts/run_cluster.py): one line when the cluster
is ready, one when it is late, a clean stop on SIGTERM, nothing left running."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shardnode.config import ClusterConfig
from shardnode.supervisor import ProcessControl

from .ports import write_cluster_toml

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[2]


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line.rstrip("\n"))
    into.put(None)


def _next_line(lines: queue.Queue, timeout: float) -> str | None:
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no line within {timeout} s") from None


def test_run_says_when_it_is_late_then_ready_and_stops_cleanly(tmp_path: Path) -> None:
    config = write_cluster_toml(tmp_path, name="run-itest", hosts=3, groups=2, replicas=3)
    cluster = ClusterConfig.load(config)
    launcher = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "run_cluster.py"), "--config", str(config),
         "--out", str(tmp_path / "etc"), "--ready-timeout", "0.5"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(launcher.stdout, lines), daemon=True).start()
    pids: list[int] = []
    try:
        first = _next_line(lines, 30)
        assert first.startswith("make run: starting run-itest (3 hosts; 2 data groups of 3 replicas and the "
                                "metadata group of 3)"), first
        late = _next_line(lines, 30)
        assert late.startswith("make run: run-itest is not ready after "), late
        assert "It keeps running and trying" in late and "stop: Ctrl-C" in late
        ready = _next_line(lines, 90)
        assert ready.startswith("make run: run-itest is ready (") and \
            "all 2 data groups and the metadata group have a leader" in ready, ready
        assert "Logs: " in ready and "/logs/" in ready and "status: " in ready and "stop: Ctrl-C" in ready
        control = ProcessControl(cluster)
        pids = [info.pid for host in cluster.hosts for info in control.processes(host.name).values() if info.pid]
        # Issue 23: a second `make run` while this one listens said `ready (0.1 s)` for this one while its own
        # hosts exited with status 2. It refuses, with one line naming the process.
        second = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "run_cluster.py"), "--config", str(config),
             "--out", str(tmp_path / "etc2")], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and second.stdout == "", second
        assert second.stderr.count("\n") == 1, second.stderr
        h1 = cluster.host("h1")
        router_pid = control.processes("h1")["router"].pid
        assert second.stderr.startswith(f"make run: {h1.router_address} (h1's router port) is already taken by pid "
                                        f"{router_pid} ("), second.stderr
        assert f"-m router --config {config} --host h1" in second.stderr and "another cluster running" in second.stderr
        # A router, two workers and a metadata group worker per host (groups created online: none yet).
        assert len(pids) == 3 * (1 + 2 + 1), pids

        stop_began = time.monotonic()
        os.kill(launcher.pid, signal.SIGTERM)                   # as `kill PID` of make run would
        assert launcher.wait(timeout=90) == 0
        took = time.monotonic() - stop_began
        rest = []
        while (line := _next_line(lines, 10)) is not None:
            rest.append(line)
        assert rest and rest[-1].startswith("make run: run-itest stopped in "), rest
        # Issue 23: stopping took 24 s and said nothing. Every host stops at once, its programs
        # in parallel, with one line per host as it stops.
        assert rest[0].startswith("make run: stopping run-itest: every host at once"), rest
        assert sorted(line.split()[2] for line in rest if " stopped after " in line) == ["h1", "h2", "h3"], rest
        print(f"\n[run] stop took {took:.1f} s")
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in pids if _alive(pid)], "every router and worker stopped"
    finally:
        if launcher.poll() is None:
            # The top supervisord stops its hosts' supervisords, which stop their programs.
            os.killpg(launcher.pid, signal.SIGTERM)
            try:
                launcher.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait(timeout=10)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of a child reaped late still "exists": read its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_the_start_line_counts_groups_as_the_ready_line_does(tmp_path: Path) -> None:
    """Issue 23: the start line said `4 groups of 5 replicas` (cluster.toml's),
    the ready line `all 5 groups` (the live map's, with a group created
    online). Both count the live map's data groups, and the metadata group."""
    import importlib.util

    from shardnode.placement.shard_map import ShardMap

    spec = importlib.util.spec_from_file_location("run_cluster", ROOT / "scripts" / "run_cluster.py")
    assert spec is not None and spec.loader is not None
    run_cluster = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_cluster)
    cluster = ClusterConfig.load(write_cluster_toml(tmp_path, name="lines", hosts=3, groups=2, replicas=3))
    assert run_cluster.describe_shape(cluster) == "3 hosts; 2 data groups of 3 replicas and the metadata group of 3"
    live = ShardMap.build(2, cluster.virtual_nodes).with_group(2, ("h1", "h2", "h3"))
    path = cluster.shard_map_file("h2")
    path.parent.mkdir(parents=True)
    path.write_bytes(live.encode())
    assert run_cluster.describe_shape(cluster) == \
        "3 hosts; 3 data groups (+1 since cluster.toml's 2) of 3 replicas and the metadata group of 3"
