"""`shardnode chaos` against a 5-host cluster on loopback (process and shape
faults; the network kinds run in test_chaos_network.py, in namespaces):
the command runs its workloads, pauses and kills hosts and group leaders,
changes the cluster's shape beside them, heals everything and prints a
verdict with no anomaly. What it cannot do here it refuses in one line,
before anything is injected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardnode.cli.ready import NotReady, wait_ready
from shardnode.client import Client

from .ports import write_cluster_toml
from .supervised import ROOT, SupervisedCluster, start_supervised

#: CHAOS_SECONDS=N runs longer (the timeouts grow with it).
DURATION = int(os.environ.get("CHAOS_SECONDS", "30"))
pytestmark = [pytest.mark.xdist_group("chaos"), pytest.mark.timeout(420 + 2 * DURATION)]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SupervisedCluster]:
    config = write_cluster_toml(tmp_path, name="chaos", hosts=5, groups=2, replicas=5)
    with start_supervised(tmp_path, config) as env:
        _wait_ready(env)
        yield env


def _wait_ready(env: SupervisedCluster) -> None:
    """Every group led (the command refuses a cluster that is not ready
    within 30 s; a loaded CI machine can take longer to start one)."""
    with Client.from_config(env.tmp / "cluster.toml", timeout=5.0) as client:
        try:
            wait_ready(client, 120.0)
        except NotReady as exc:
            raise AssertionError(f"{exc}\n{env.log_tail()}") from None


def _chaos(env: SupervisedCluster, *args: str, timeout: float = 360 + 2 * DURATION) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardnode.cli", "--config", str(env.tmp / "cluster.toml"),
                           "chaos", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_chaos_pauses_kills_and_reshapes_then_finds_no_anomaly(cluster: SupervisedCluster) -> None:
    # Network faults need namespaces, power loss lazyfs mounts: refused at once, nothing injected.
    refused = _chaos(cluster, "--duration", "20", "--faults", "partition,kill")
    assert refused.returncode == 2 and "need each host in its own network namespace" in refused.stderr, refused
    refused = _chaos(cluster, "--duration", "20", "--faults", "powerloss")
    assert refused.returncode == 2 and "lazyfs" in refused.stderr, refused
    assert _chaos(cluster, "--faults", "flood").returncode == 2

    began = time.monotonic()
    done = _chaos(cluster, "--duration", str(DURATION), "--faults", "pause,kill,shape", "--seed", "14",
                  "--clients", "4", "--json")
    elapsed = time.monotonic() - began
    assert done.stdout, done.stderr[-3000:]
    report = json.loads(done.stdout)
    print(f"\n[chaos] {elapsed:.0f} s, {report['operations']} operations, exit {done.returncode}")
    for verdict in report["verdicts"]:
        print(f"[chaos] {verdict}")
    for fault in report["faults"]:
        print(f"[chaos] fault {fault}")
    assert done.returncode == 0, (report["checks"], done.stderr[-3000:])
    assert report["anomalies"] == 0 and report["recovered"]
    verdicts = {v["kind"]: v for v in report["verdicts"]}
    assert verdicts["pause"]["injected"] >= 1 and verdicts["kill"]["injected"] >= 1, verdicts
    assert verdicts["shape"]["faults"] >= 1, verdicts
    assert all(c["valid"] for c in report["checks"]), report["checks"]
    assert report["operations"] > 200
    # Each fault's start and end were logged.
    assert done.stderr.count("chaos.fault_start") == done.stderr.count("chaos.fault_end") >= 2, done.stderr[-2000:]
    # The cluster serves, with its initial shape.
    with Client.from_config(cluster.tmp / "cluster.toml", timeout=10.0) as client:
        status = client.status()
        assert all(g.has_quorum for g in status.groups)
        assert sorted(g.group for g in status.groups) == [0, 1]
