"""`shardnode chaos` with network faults, against a 5-host cluster whose hosts
each run in their own network namespace: partitions of every kind and
random loss (or netem delay where the kernel has it) while the workloads
run; every fault healed, no anomaly, the cluster serving again, nothing of
the network left behind (the fixture checks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .namespaced import NamespacedCluster, requires_namespaces, start_namespaced
from .ports import write_cluster_toml
from .supervised import ROOT

#: CHAOS_SECONDS=N runs longer (the timeouts grow with it).
DURATION = int(os.environ.get("CHAOS_SECONDS", "30"))
pytestmark = [requires_namespaces, pytest.mark.xdist_group("netns"), pytest.mark.timeout(420 + 2 * DURATION)]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NamespacedCluster]:
    config = write_cluster_toml(tmp_path, name="chaos-net", hosts=5, groups=2, replicas=5)
    with start_namespaced(tmp_path, config) as namespaced:
        yield namespaced


def test_chaos_partitions_and_loss_find_no_anomaly(cluster: NamespacedCluster) -> None:
    done = subprocess.run([sys.executable, "-m", "shardnode.cli", "--config", str(cluster.config), "chaos",
                           "--duration", str(DURATION), "--faults", "partition,delay", "--seed", "11",
                           "--clients", "4", "--json"],
                          capture_output=True, text=True, timeout=360 + 2 * DURATION, cwd=ROOT)
    assert done.stdout, done.stderr[-3000:]
    report = json.loads(done.stdout)
    print(f"\n[chaos-net] {report['seconds']} s, {report['operations']} operations, exit {done.returncode}")
    for verdict in report["verdicts"]:
        print(f"[chaos-net] {verdict}")
    for fault in report["faults"]:
        print(f"[chaos-net] fault {fault}")
    assert done.returncode == 0, (report["checks"], done.stderr[-3000:])
    verdicts = {v["kind"]: v for v in report["verdicts"]}
    assert verdicts["partition"]["injected"] >= 2, verdicts
    assert verdicts["delay"]["injected"] >= 1, verdicts
    assert all(f["healed"] for f in report["faults"] if f["injected"]), report["faults"]
    assert report["anomalies"] == 0 and all(c["valid"] for c in report["checks"])
    # The majority side served while each fault lasted.
    assert verdicts["partition"]["availability"] > 0.5, verdicts["partition"]
    assert not cluster.faults.blocked()
