"""Each host's metrics endpoint, scraped from a cluster run under supervisord."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from shardnode.client import Client
from shardnode.config import METADATA_GROUP
from shardnode.testing.exposition import check_exposition

from .supervised import SupervisedCluster, start_supervised
from .test_cluster import _wait_ready, _write_cluster

pytestmark = pytest.mark.timeout(300)

REQUIRED = {
    # The original design's seven, then what an operator needs.
    "raft_replication_lag": {"group", "node", "peer"},
    "raft_request_latency_seconds": {"group", "node", "op", "component"},
    "raft_node_health": {"group", "node"},
    "raft_term": {"group", "node"},
    "raft_state": {"group", "node"},
    "raft_log_size": {"group", "node"},
    "raft_committed_index": {"group", "node"},
    "raft_applied_index": {"group", "node"},
    "raft_proposals": {"group", "node"},
    "raft_proposal_batch_size": {"group", "node"},
    "raft_fsync_latency_seconds": {"group", "node"},
    "raft_elections_started": {"group", "node"},
    "raft_elections_won": {"group", "node"},
    "raft_leader_changes": {"group", "node"},
    "raft_snapshots_sent": {"group", "node"},
    "raft_snapshots_received": {"group", "node"},
    "raft_snapshots_taken": {"group", "node"},
    "raft_snapshot_send_seconds": {"group", "node"},
    "raft_peer_queue_depth": {"group", "node", "peer"},
    "raft_peer_dropped_messages": {"group", "node", "peer"},
    "raft_router_retries": {"group", "node"},
    "raft_router_redirects": {"group", "node"},
    "raft_router_requests": {"group", "node", "op", "code", "component"},
    "raft_shard_map_epoch": {"node", "component"},
}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SupervisedCluster]:
    with start_supervised(tmp_path, _write_cluster(tmp_path)) as env:
        _wait_ready(env)
        yield env


def page(env: SupervisedCluster, host: str) -> str:
    config = env.cluster.host(host)
    url = f"http://{config.address}:{config.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def scrape(env: SupervisedCluster, host: str) -> dict[str, list]:
    return {family.name: family.samples for family in text_string_to_metric_families(page(env, host))}


def _value(samples: list, **labels: str) -> float | None:
    for sample in samples:
        if all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    return None


def test_every_metric_is_present_with_its_labels_and_one_leader_per_group(cluster: SupervisedCluster) -> None:
    with Client.from_config(cluster.tmp / "cluster.toml") as client:
        for i in range(20):
            client.put(f"m{i}", "v")
            client.get(f"m{i}")
    # Each router's view of its workers' health comes from its last probe (a second old at most
    # while anything fails to answer): on a loaded machine a probe of a starting worker may have
    # timed out just before. Scrape until every replica reads healthy, then check everything.
    deadline = time.monotonic() + 15
    while True:
        pages = {h.name: scrape(cluster, h.name) for h in cluster.cluster.hosts}
        healthy_everywhere = all(
            [_value(page.get("raft_node_health", []), group=str(g)) for page in pages.values()].count(1)
            == cluster.cluster.replicas for g in range(cluster.cluster.groups))
        if healthy_everywhere or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for name, labels in REQUIRED.items():
        samples = [s for page in pages.values() for s in page.get(name, [])]
        assert samples, f"{name} is missing"
        assert any(labels <= set(s.labels) for s in samples), (name, samples[0].labels)
    for group in range(cluster.cluster.groups):
        leaders = [
            host for host, page in pages.items() if _value(page.get("raft_state", []), group=str(group)) == 2
        ]
        assert len(leaders) == 1, (group, leaders)
        healthy = [_value(page.get("raft_node_health", []), group=str(group)) for page in pages.values()]
        assert healthy.count(1) == cluster.cluster.replicas
    # The metadata group's workers are on their hosts' pages too; every router routes with epoch 1.
    meta = [_value(page.get("raft_node_health", []), group="meta") for page in pages.values()]
    assert meta.count(1) == cluster.cluster.meta_replicas
    assert all(_value(page["raft_shard_map_epoch"], component="router") == 1 for page in pages.values())
    # Both the router and the workers report request latency.
    components = {s.labels.get("component") for page in pages.values()
                  for s in page.get("raft_request_latency_seconds", [])}
    assert {"router", "worker"} <= components


def test_every_host_page_is_valid_while_the_cluster_serves_traffic(cluster: SupervisedCluster) -> None:
    """Each page passes the text format's strict rules (and `promtool check
    metrics` where promtool is installed) while routers and workers of the
    same host add series to the same families."""
    promtool = shutil.which("promtool")
    stop = threading.Event()
    done = [0]

    def traffic(number: int) -> None:
        # One client per router: every host's router serves, and so does every group's leader.
        router = cluster.cluster.hosts[number].router_address
        with Client([router], cluster=cluster.cluster) as client:
            i = 0
            while not stop.is_set():
                client.put(f"page-{number}-{i % 50}", "x" * 64)
                client.get(f"page-{number}-{i % 50}")
                done[0] += 1
                i += 1

    threads = [threading.Thread(target=traffic, args=(n,), daemon=True) for n in range(len(cluster.cluster.hosts))]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        for _ in range(3):
            for host in cluster.cluster.hosts:
                text = page(cluster, host.name)
                assert check_exposition(text) == [], (host.name, check_exposition(text)[:10])
                assert "_created" not in text
                if promtool:
                    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                                             text=True, timeout=30)
                    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", ""), (host.name, checked)
            time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
    assert done[0] > 20, "the cluster served traffic while its pages were checked"
    # A host that leads a group merged its router's and its leader's latency into one family.
    leaders = 0
    for host in cluster.cluster.hosts:
        families = {f.name: f for f in text_string_to_metric_families(page(cluster, host.name))}
        if "raft_state" in families and any(s.value == 2 for s in families["raft_state"].samples):
            leaders += 1
            components = {s.labels["component"] for s in families["raft_request_latency_seconds"].samples}
            assert components == {"router", "worker"}, (host.name, components)
    assert leaders >= 1


def test_latency_histograms_move_under_load(cluster: SupervisedCluster) -> None:
    def puts_counted() -> float:
        total = 0.0
        for host in cluster.cluster.hosts:
            for sample in scrape(cluster, host.name).get("raft_request_latency_seconds", []):
                if sample.name.endswith("_count") and sample.labels.get("op") == "put":
                    total += sample.value
        return total

    before = puts_counted()
    with Client.from_config(cluster.tmp / "cluster.toml") as client:
        for i in range(50):
            client.put(f"load-{i}", "x" * 100)
    after = puts_counted()
    assert after >= before + 100, (before, after)   # each put: one router and one worker observation


def test_a_killed_worker_reads_unhealthy_then_its_series_return(cluster: SupervisedCluster) -> None:
    host = cluster.cluster.host("h1")
    processes = cluster.control.processes("h1")
    pid = processes["worker-g0"].pid
    os.kill(pid, signal.SIGKILL)     # supervisord restarts it (autorestart)
    saw_down = False
    deadline = time.monotonic() + 30
    back = False
    while time.monotonic() < deadline:
        page = scrape(cluster, "h1")
        health = _value(page["raft_node_health"], group="0", node=str(host.node_id))
        if health == 0:
            saw_down = True
            assert _value(page.get("raft_term", []), group="0") is None, "no stale series from the dead process"
        elif saw_down and health == 1 and _value(page.get("raft_term", []), group="0") is not None:
            back = True
            break
        time.sleep(0.05)
    assert saw_down, "raft_node_health went to 0 while the worker was down"
    assert back, "the restarted worker's series returned within 30 s"
    assert cluster.control.processes("h1")["worker-g0"].pid != pid
    # The restart is counted: on the host's metrics page and in `shardnode status`.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        page = scrape(cluster, "h1")
        if ((_value(page.get("raft_process_restarts", []), program="worker-g0") or 0) >= 1
                and _value(page.get("raft_process_state", []), program="worker-g0", state="RUNNING") == 1):
            break
        time.sleep(0.2)
    assert _value(page["raft_process_restarts"], program="worker-g0") >= 1
    assert _value(page["raft_process_state"], program="worker-g0", state="RUNNING") == 1
    with Client.from_config(cluster.tmp / "cluster.toml", timeout=5.0) as client:
        replicas = {(r.host, g.group): r for g in client.status().groups for r in g.replicas}
    assert replicas[("h1", 0)].restarts >= 1 and replicas[("h1", 0)].process_state == "RUNNING"


def test_routers_and_workers_answer_the_standard_health_check(cluster: SupervisedCluster) -> None:
    host = cluster.cluster.host("h2")
    for address, service in ((host.router_address, "shardnode.kv.KV"),
                             (host.worker_address(0), "shardnode.worker.Worker")):
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for name in ("", service):
                answer = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
