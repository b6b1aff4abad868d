"""The whole system under supervisord: routers, workers, the client library
and the kv739 functions, with hosts killed and restarted through
kv739_die/kv739_start (each host's process control, in its supervisord)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardnode import kv739
from shardnode.client import Client
from shardnode.errors import DeadlineExceeded, InvalidArgument, NoQuorum, ShardnodeError, Unavailable
from shardnode.placement.shard_map import ShardMap
from shardnode.testing.linearizability import HistoryRecorder, OpKind, check_history

from .ports import write_cluster_toml
from .supervised import SupervisedCluster, start_supervised

pytestmark = pytest.mark.timeout(300)


def _write_cluster(tmp: Path, tls: bool = False) -> Path:
    return write_cluster_toml(tmp, name="full-itest", hosts=5, groups=2, replicas=3, tls=tls)


# The secure variant of a test: @pytest.mark.parametrize("cluster", SECURITY, indirect=True).
SECURITY = ["plain", "tls"]


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[SupervisedCluster]:
    """5 hosts, 2 groups of 3 replicas (group 0 on h1-h3, group 1 on h2-h4),
    a router on every host; mutual TLS on every link when the parameter is
    "tls" (certificates made as `make run` makes them). kv739 is shut down
    afterwards whatever happened."""
    tls = getattr(request, "param", "plain") == "tls"
    with start_supervised(tmp_path, _write_cluster(tmp_path, tls=tls)) as env:
        _wait_ready(env)
        try:
            yield env
        finally:
            kv739.kv739_shutdown()


def _wait_ready(env: SupervisedCluster, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with Client.from_config(env.tmp / "cluster.toml", timeout=2.0) as client:
        while time.monotonic() < deadline:
            try:
                if all(group.has_quorum for group in client.status().groups):
                    return
            except ShardnodeError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"cluster not ready within {timeout}s\n{env.log_tail()}")


def _key_in_group(env: SupervisedCluster, group: int, prefix: str = "key") -> str:
    ring = ShardMap.build(env.cluster.groups, env.cluster.virtual_nodes)
    return next(k for k in (f"{prefix}-{i}" for i in range(10_000)) if ring.group_for(k.encode()) == group)


@pytest.mark.parametrize("cluster", SECURITY, indirect=True)
def test_kv739_conventions_and_keys_spread_over_every_group(cluster: SupervisedCluster) -> None:
    config = str(cluster.tmp / "cluster.toml")
    assert kv739.kv739_get("k") == (-1, "")                         # before init
    assert kv739.kv739_init(config) == 0
    assert kv739.kv739_get("missing") == (1, "")
    assert kv739.kv739_put("k", "v1") == (1, "")                    # new key
    assert kv739.kv739_put("k", "v2") == (0, "v1")                  # overwrite: old value
    assert kv739.kv739_get("k") == (0, "v2")
    ring = ShardMap.build(cluster.cluster.groups, cluster.cluster.virtual_nodes)
    keys = [f"spread-{i}" for i in range(40)]
    for key in keys:
        assert kv739.kv739_put(key, key.upper()) == (1, "")
    assert {ring.group_for(k.encode()) for k in keys} == set(range(cluster.cluster.groups))
    assert all(kv739.kv739_get(k) == (0, k.upper()) for k in keys)
    assert kv739.kv739_shutdown() == 0
    assert kv739.kv739_shutdown() == -1                             # double shutdown
    if cluster.cluster.security.tls:
        return      # a plain list of routers names no certificate: only a cluster.toml reaches a TLS cluster
    # The other init form: one router address per line.
    addresses = cluster.tmp / "routers.txt"
    addresses.write_text("\n".join(h.router_address for h in cluster.cluster.hosts) + "\n")
    assert kv739.kv739_init(str(addresses)) == 0
    assert kv739.kv739_get("k") == (0, "v2")
    assert kv739.kv739_shutdown() == 0


def _run_clients(config: Path, recorder: HistoryRecorder, keys: list[str], stop: threading.Event,
                 acked_times: list[float], writers: int = 6, readers: int = 2) -> list[threading.Thread]:
    def writer(client_id: int) -> None:
        rng = random.Random(client_id)
        with Client.from_config(config, timeout=5.0) as client:
            n = 0
            while not stop.is_set():
                n += 1
                key, value = rng.choice(keys), f"w{client_id}-{n}"
                handle = recorder.invoke(client_id, OpKind.PUT, key.encode(), value.encode())
                try:
                    old = client.put(key, value)
                except InvalidArgument:
                    recorder.failed(handle)
                    raise
                except (Unavailable, DeadlineExceeded, ShardnodeError):
                    recorder.unknown(handle)
                    continue
                recorder.ok(handle, old)
                acked_times.append(time.monotonic())

    def reader(client_id: int) -> None:
        rng = random.Random(client_id)
        with Client.from_config(config, timeout=5.0) as client:
            while not stop.is_set():
                key = rng.choice(keys)
                handle = recorder.invoke(client_id, OpKind.GET, key.encode())
                try:
                    value = client.get(key)
                except ShardnodeError:
                    recorder.failed(handle)     # a read without an answer had no effect
                    continue
                recorder.ok(handle, value)

    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(1, writers + 1)]
    threads += [threading.Thread(target=reader, args=(100 + i,), daemon=True) for i in range(readers)]
    for thread in threads:
        thread.start()
    return threads


@pytest.mark.parametrize("cluster", SECURITY, indirect=True)
def test_sigkill_of_a_host_while_clients_write_loses_nothing(cluster: SupervisedCluster) -> None:
    config = cluster.tmp / "cluster.toml"
    assert kv739.kv739_init(str(config)) == 0
    keys = [_key_in_group(cluster, g, f"hot{g}") for g in range(cluster.cluster.groups)]
    keys += [_key_in_group(cluster, g, f"warm{g}") for g in range(cluster.cluster.groups)]
    recorder = HistoryRecorder()
    acked_times: list[float] = []
    stop = threading.Event()
    threads = _run_clients(config, recorder, keys, stop, acked_times)
    try:
        time.sleep(2.0)
        # h2 holds replicas of both groups (and a router): kill the whole host.
        victim = cluster.cluster.host("h2")
        killed_at = time.monotonic()
        assert kv739.kv739_die(victim.router_address, 0) == 0
        time.sleep(5.0)
        assert kv739.kv739_start(victim.router_address, 0) == 0
        time.sleep(2.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=20)
    before = [t for t in acked_times if t < killed_at]
    after = sorted(t for t in acked_times if t >= killed_at)
    assert before and after, "writes were acknowledged before and after the kill"
    resumed = after[0] - killed_at
    assert resumed < 5.0, f"service resumed {resumed:.1f}s after the kill"
    result = check_history(recorder.operations(), timeout=120)
    assert result.ok, result.explanation


def test_a_group_that_lost_its_majority_fails_fast_then_recovers(cluster: SupervisedCluster) -> None:
    config = cluster.tmp / "cluster.toml"
    assert kv739.kv739_init(str(config)) == 0
    key0, key1 = _key_in_group(cluster, 0), _key_in_group(cluster, 1)
    assert kv739.kv739_put(key0, "before")[0] in (0, 1)
    # h2's router reports a quorum it has seen lost: wait until it has seen group 0 ready.
    router_log = cluster.tmp / "data" / "h2" / "logs" / "router.log"
    deadline = time.monotonic() + 10
    while "router.group_ready host=h2 group=0 " not in router_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    # Group 0 lives on h1, h2, h3: take down h1 and h3 (group 1 keeps h2 and h4).
    for name in ("h1", "h3"):
        assert kv739.kv739_die(cluster.cluster.host(name).router_address, 0) == 0
    began = time.monotonic()
    assert kv739.kv739_put(key0, "during") == (-1, "")
    elapsed = time.monotonic() - began
    assert elapsed < kv739.DEFAULT_TIMEOUT + 2.0, f"a failed put took {elapsed:.1f}s: it must not hang"
    assert kv739.kv739_put(key1, "other group")[0] in (0, 1), "the other group still serves"
    # The error names its cause, and the routers that saw it logged the loss as a structured WARNING.
    # (A 5 s budget: the router answers half a second before it, which outlasts a loaded CI machine's stalls.)
    with Client([cluster.cluster.host("h2").router_address], timeout=5.0, cluster=cluster.cluster) as client:
        with pytest.raises(NoQuorum, match=r"^get: no quorum in group 0: 2 of 3 replicas unreachable") as info:
            client.get(key0)
    assert info.value.group == 0
    assert cluster.cluster.host("h1").worker_address(0) in str(info.value)
    lost = [line for line in router_log.read_text().splitlines() if "router.quorum_lost host=h2 group=0 " in line]
    assert lost and " WARNING router.quorum_lost " in lost[0] and "reason=no_majority" in lost[-1], lost
    for name in ("h1", "h3"):
        assert kv739.kv739_start(cluster.cluster.host(name).router_address, 0) == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        code, old = kv739.kv739_put(key0, "after")
        if code != -1:
            break
    assert code == 0 and old in ("before", "during"), (code, old)
    assert kv739.kv739_get(key0) == (0, "after")
    regained_event = "router.quorum_regained host=h2 group=0 "
    deadline = time.monotonic() + 10
    while regained_event not in router_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    regained = [line for line in router_log.read_text().splitlines() if regained_event in line]
    assert regained and " INFO router.quorum_regained " in regained[0], router_log.read_text()
