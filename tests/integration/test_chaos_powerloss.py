"""`shardnode chaos --faults powerloss` against a 3-host cluster whose hosts
each keep their data on a lazy filesystem (shardnode/testing/lazyfs: a
power loss drops every byte and directory entry not fsynced): hosts lose
power one at a time while the workloads run, and nothing acknowledged may be
missing afterwards. The chaos command finds each host's disk by the control
socket beside its mount (data/HOST.control)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardnode.cli.ready import NotReady, wait_ready
from shardnode.client import Client
from shardnode.testing.lazyfs import lazyfs_unavailable, mounted_lazyfs

from .ports import write_cluster_toml
from .supervised import ROOT, SupervisedCluster, start_supervised

_unavailable = lazyfs_unavailable()
#: CHAOS_SECONDS=N runs longer (the timeouts grow with it).
DURATION = int(os.environ.get("CHAOS_SECONDS", "30"))
pytestmark = [
    pytest.mark.skipif(_unavailable is not None, reason=_unavailable or ""),
    # One lazyfs daemon per host, in Python: keep these off the other xdist worker's power-loss tests.
    pytest.mark.xdist_group("power_loss"),
    pytest.mark.timeout(420 + 2 * DURATION),
]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SupervisedCluster]:
    config = write_cluster_toml(tmp_path, name="chaos-power", hosts=3, groups=1, replicas=3)
    with contextlib.ExitStack() as stack:
        for host in ("h1", "h2", "h3"):
            stack.enter_context(mounted_lazyfs(tmp_path / "data" / host))
        # Every process is killed (by pid) before the disks are unmounted (LIFO).
        env = stack.enter_context(start_supervised(tmp_path, config))
        with Client.from_config(env.tmp / "cluster.toml", timeout=5.0) as client:
            try:
                wait_ready(client, 120.0)   # the command itself waits 30 s: a loaded machine takes longer
            except NotReady as exc:
                raise AssertionError(f"{exc}\n{env.log_tail()}") from None
        yield env


def test_power_loss_of_one_host_at_a_time_under_chaos_loses_nothing(cluster: SupervisedCluster) -> None:
    done = subprocess.run([sys.executable, "-m", "shardnode.cli", "--config", str(cluster.tmp / "cluster.toml"),
                           "chaos", "--duration", str(DURATION), "--faults", "powerloss", "--seed", "3",
                           "--clients", "4", "--json"],
                          capture_output=True, text=True, timeout=360 + 2 * DURATION, cwd=ROOT)
    assert done.stdout, done.stderr[-3000:]
    report = json.loads(done.stdout)
    print(f"\n[chaos-power] {report['seconds']} s, {report['operations']} operations, exit {done.returncode}")
    for fault in report["faults"]:
        print(f"[chaos-power] fault {fault}")
    for check in report["checks"]:
        print(f"[chaos-power] {check['checker']}: valid={check['valid']} {check['figures']}")
    assert done.returncode == 0, (report["checks"], done.stderr[-3000:])
    powerloss = next(v for v in report["verdicts"] if v["kind"] == "powerloss")
    assert powerloss["injected"] >= 2, report["faults"]
    assert all("dropped" in f["note"] for f in report["faults"] if f["injected"]), report["faults"]
    assert report["anomalies"] == 0 and all(c["valid"] for c in report["checks"])
