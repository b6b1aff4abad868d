"""Every replica a host holds runs there (issue 23, point 1): after `die` of
two hosts of three (the metadata group loses its quorum) and their start,
the replicas of a group created online come back on both — on one through
`shardnode start`, on the other through its router alone (a start that
named only cluster.toml's groups, as `shardnode start` did). Also point 5:
`die` names the programs it stopped, `status` shows a killed host's
programs as its supervisord does."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardnode.client import Client
from .ports import write_cluster_toml
from .supervised import ROOT, start_supervised

pytestmark = [pytest.mark.timeout(180)]


def _shardnode(config: Path, *args: str, timeout: float = 90.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardnode.cli", "--config", str(config), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_a_group_created_online_comes_back_on_hosts_restarted_without_the_metadata_group(tmp_path: Path) -> None:
    config = write_cluster_toml(tmp_path, name="reconcile-itest", hosts=3, groups=1, max_groups=3)
    with start_supervised(tmp_path, config) as env:
        began = time.monotonic()
        # A generous --timeout: right after the start the metadata group may still be electing (under load).
        added = _shardnode(config, "--timeout", "60", "group", "add")
        assert added.returncode == 0, added.stdout + added.stderr
        with Client.from_config(config, timeout=20.0) as client:
            for i in range(50):
                client.put(f"k{i}", f"v{i}")
        for host in ("h1", "h2", "h3"):
            env.wait_states(host, {"worker-g1": "RUNNING"})
        h1, h2 = env.cluster.host("h1"), env.cluster.host("h2")
        for host in (h1, h2):
            died = _shardnode(config, "die", host.router_address)
            assert died.returncode == 0, died.stderr
            # Only the programs that ran (the host has one for every possible group: 0..2).
            assert f"({host.router_address}: router, worker-meta, worker-g0, worker-g1) killed" in died.stdout, \
                died.stdout
        # A killed host's replicas: `stopped`, as its supervisord says (its router is down).
        status = _shardnode(config, "status", "--json")
        replicas = [r for g in json.loads(status.stdout)["groups"] for r in g["replicas"] if r["host"] in ("h1", "h2")]
        assert {r["process_state"] for r in replicas} == {"STOPPED"}, status.stdout
        # h1 as a start that names only cluster.toml's group: its router brings group 1 back.
        env.control.start(h1.router_address, groups=[0])
        # h2 with `shardnode start`, while the metadata group has no quorum.
        started = _shardnode(config, "start", h2.router_address)
        assert started.returncode == 0, started.stdout + started.stderr
        for host in ("h1", "h2"):
            env.wait_states(host, {"worker-g1": "RUNNING", "worker-g0": "RUNNING", "router": "RUNNING"}, timeout=40)
        with Client.from_config(config, timeout=20.0) as client:
            assert [client.get(f"k{i}") for i in range(50)] == [f"v{i}".encode() for i in range(50)]
        # A worker stopped on its own stays down: the router does not start it again.
        worker = h1.worker_address(1)
        assert _shardnode(config, "die", worker).returncode == 0
        time.sleep(3.0)
        assert env.control.status("h1")["worker-g1"] == "STOPPED"
        assert _shardnode(config, "start", worker).returncode == 0
        env.wait_states("h1", {"worker-g1": "RUNNING"})
        print(f"\n[reconcile] {time.monotonic() - began:.1f} s")
