"""Groups added and removed while clients read and write, under supervisord,
driven as users drive them (the shardnode CLI, kv739_start with new=1).
Every history is checked for linearizability, and every acknowledged write
must be readable afterwards with its last acknowledged value.

The cluster: 5 hosts and 4 groups as by default, with 3 replicas per group
(5 would be the default; 3 keeps 5 hosts' processes within the 2 cores CI
has), and the metadata group on the first 3 hosts.
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shardnode import kv739
from shardnode.client import Client
from shardnode.config import ClusterConfig
from shardnode.errors import RoutersUnreachable
from shardnode.placement.shard_map import ShardMap
from shardnode.placement.directory import ShardDirectory
from shardnode.placement.moves import MOVES_KEY, Phase, decode_moves
from shardnode.placement.worker_groups import WorkerGroups
from shardnode.supervisor import ROUTER_PROGRAM, ProcessControl

from .ports import write_cluster_toml
from .supervised import ROOT, SupervisedCluster, start_supervised
from .workload import Load

pytestmark = [pytest.mark.timeout(480), pytest.mark.xdist_group("dynamic_sharding")]
PRELOAD = 3000


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SupervisedCluster]:
    config = write_cluster_toml(tmp_path, name="sharding-itest", hosts=5, groups=4, replicas=3, max_groups=8)
    with start_supervised(tmp_path, config) as env:
        _wait_for_map(env.cluster, lambda m: len(m.groups) == 4)
        try:
            yield env
        finally:
            kv739.kv739_shutdown()


def _load_map(cluster: ClusterConfig) -> ShardMap:
    async def load() -> ShardMap:
        directory = ShardDirectory(cluster)
        try:
            return await directory.load_map()
        finally:
            await directory.close()
    return asyncio.run(load())


def _moves(cluster: ClusterConfig) -> list:
    async def read() -> list:
        directory = ShardDirectory(cluster)
        try:
            return decode_moves(await directory.read(MOVES_KEY))
        finally:
            await directory.close()
    return asyncio.run(read())


def _wait_for_map(cluster: ClusterConfig, ready, timeout: float = 180.0) -> ShardMap:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            shard_map = _load_map(cluster)
            if ready(shard_map):
                return shard_map
        except Exception as exc:          # the metadata group still starting
            last = exc
        time.sleep(0.3)
    raise AssertionError(f"the shard map never became ready ({last})")


def _shardnode(env: SupervisedCluster, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shardnode.cli", "--config", str(env.tmp / "cluster.toml"),
                             *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _preload(config: Path, count: int = PRELOAD) -> dict[str, str]:
    values = {f"pre-{i}": f"v{i}" for i in range(count)}
    with Client.from_config(config, timeout=20.0) as client, ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda item: client.put(*item), values.items()))
    return values


def _check_all(config: Path, expected: dict[str, str]) -> list[str]:
    with Client.from_config(config, timeout=20.0) as client:
        return [k for k, v in expected.items() if client.get(k) != v.encode()]


def _kill_source_leader_mid_move(env: SupervisedCluster, done: threading.Event) -> list[str]:
    """Once a move is past its copy's start, SIGKILL a source group's worker on
    the host that leads it, then start it again; returns what it did."""
    actions: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not done.is_set():
        records = _moves(env.cluster)
        exporting = [r for r in records if r.phase >= Phase.EXPORTING]
        if exporting:
            source = exporting[0].source
            address = _leader_address(env, source)
            if address:
                assert kv739.kv739_die(address, 0) == 0
                actions.append(f"killed group {source}'s leader {address} in phase {exporting[0].phase.name}")
                time.sleep(1.0)
                assert kv739.kv739_start(address, 0) == 0
                actions.append(f"restarted {address}")
                return actions
        time.sleep(0.05)
    return actions


def _leader_address(env: SupervisedCluster, group: int) -> str:
    async def find() -> str:
        groups = WorkerGroups(env.cluster)
        try:
            return await groups.leader_address(group)
        finally:
            await groups.close()
    return asyncio.run(find())


def test_group_add_under_load_with_a_worker_killed_mid_move_and_a_router_down(cluster: SupervisedCluster) -> None:
    """`group add` while clients read and write: a source group's leader is
    SIGKILLed mid-move, and h5's router is down for the whole move (it must
    learn the new map when it comes back)."""
    config = cluster.tmp / "cluster.toml"
    assert kv739.kv739_init(str(config)) == 0
    preloaded = _preload(config)
    load = Load(config)
    load.start()
    done = threading.Event()
    try:
        time.sleep(1.0)
        ProcessControl(cluster.cluster).stop_programs("h5", [ROUTER_PROGRAM])
        began = time.monotonic()
        command = _shardnode(cluster, "group", "add")
        killer_actions: list[str] = []
        killer = threading.Thread(target=lambda: killer_actions.extend(_kill_source_leader_mid_move(cluster, done)))
        killer.start()
        out, err = command.communicate(timeout=300)
        done.set()
        killer.join(timeout=60)
        took = time.monotonic() - began
        assert command.returncode == 0, err + cluster.log_tail()
        time.sleep(1.0)
    finally:
        load.finish()
    checked, lost = load.verify()
    lost_preloaded = _check_all(config, preloaded)
    shard_map = _load_map(cluster.cluster)
    new_group = max(shard_map.groups)
    counts = collections.Counter(shard_map.group_for(k.encode()) for k in preloaded)
    print(f"\n[sharding] group add: {took:.1f} s; {killer_actions}; operations={len(load.recorder.operations())} "
          f"keys_checked={checked + len(preloaded)} lost={len(lost) + len(lost_preloaded)}; "
          f"new group {new_group} holds {counts[new_group] / len(preloaded):.1%} of the keys; {out.strip()}")
    assert not lost and not lost_preloaded, (lost[:5], lost_preloaded[:5])
    assert shard_map.groups == (0, 1, 2, 3, 4) and new_group == 4
    assert abs(shard_map.share(4) - 0.2) < 0.01
    assert 0.15 < counts[4] / len(preloaded) < 0.25
    assert not _moves(cluster.cluster), "no move left unfinished"
    assert killer_actions, "the worker was killed mid-move"
    _check_a_returning_router(cluster, "h5", preloaded)


def _check_a_returning_router(cluster: SupervisedCluster, host_name: str, expected: dict[str, str]) -> None:
    """Start the host's router again: alone, it must route every key by the new map."""
    host = cluster.cluster.host(host_name)
    ProcessControl(cluster.cluster).start_programs(host_name, [ROUTER_PROGRAM])
    cluster.wait_states(host_name, {ROUTER_PROGRAM: "RUNNING"})
    with Client([host.router_address], timeout=20.0) as client:
        deadline = time.monotonic() + 30
        while True:                 # until it listens
            try:
                client.get("after-the-move")
                break
            except RoutersUnreachable:
                assert time.monotonic() < deadline, f"{host_name}'s router did not come back"
                time.sleep(0.2)
        wrong = [k for k, v in expected.items() if client.get(k) != v.encode()]
        assert client.put("after-the-move", "1") is None
    assert not wrong, wrong[:5]


def test_group_remove_under_load_then_a_killed_group_add_is_finished(cluster: SupervisedCluster) -> None:
    config = cluster.tmp / "cluster.toml"
    assert kv739.kv739_init(str(config)) == 0
    preloaded = _preload(config, 1500)
    load = Load(config)
    load.start()
    try:
        time.sleep(1.0)
        command = _shardnode(cluster, "group", "remove", "1")
        out, err = command.communicate(timeout=300)
        assert command.returncode == 0, err + cluster.log_tail()
        time.sleep(1.0)
    finally:
        load.finish()
    checked, lost = load.verify()
    lost_preloaded = _check_all(config, preloaded)
    shard_map = _load_map(cluster.cluster)
    assert not lost and not lost_preloaded, (lost[:5], lost_preloaded[:5])
    assert shard_map.groups == (0, 2, 3)
    assert abs(sum(shard_map.share(g) for g in shard_map.groups) - 1.0) < 1e-9
    # Removing it again: the desired state is reached, which is done, not refused.
    again = _shardnode(cluster, "group", "remove", "1")
    out, err = again.communicate(timeout=60)
    assert again.returncode == 0 and "removed already" in out, out + err
    refused = _shardnode(cluster, "group", "remove", "7")
    _, err = refused.communicate(timeout=60)
    assert refused.returncode == 2 and err.count("\n") == 1 and "no group 7" in err, err
    # Group 1's number is retired: the next group is 4.
    _killed_group_add_is_finished(cluster, preloaded, expected_groups=(0, 2, 3, 4), new_group=4)


@pytest.fixture
def standby_cluster(tmp_path: Path) -> Iterator[SupervisedCluster]:
    config = write_cluster_toml(tmp_path, name="standby-itest", hosts=6, groups=2, replicas=3, max_groups=4,
                                standby=("h4", "h5", "h6"))
    with start_supervised(tmp_path, config) as env:
        _wait_for_map(env.cluster, lambda m: len(m.groups) == 2)
        try:
            yield env
        finally:
            kv739.kv739_shutdown()


def test_three_standby_hosts_started_new_form_a_new_group(standby_cluster: SupervisedCluster) -> None:
    """The original design's growth: standby hosts started with new=1 find no
    group short of replicas, stay free, and the third one forms a new group
    with the other two, which takes a fair share of the key space."""
    env = standby_cluster
    config = env.tmp / "cluster.toml"
    assert kv739.kv739_init(str(config)) == 0
    preloaded = _preload(config, 600)
    load = Load(config)
    load.start()
    try:
        for name in ("h4", "h5"):
            assert kv739.kv739_start(env.cluster.host(name).router_address, 1) == 0, env.log_tail()
            assert _load_map(env.cluster).groups == (0, 1), "two free hosts form nothing yet"
        assert kv739.kv739_start(env.cluster.host("h6").router_address, 1) == 0, env.log_tail()
        time.sleep(1.0)
    finally:
        load.finish()
    checked, lost = load.verify()
    shard_map = _load_map(env.cluster)
    assert shard_map.groups == (0, 1, 2)
    assert shard_map.placements[2] == ("h4", "h5", "h6")
    assert abs(shard_map.share(2) - 1 / 3) < 0.01
    assert not lost and not _check_all(config, preloaded)


def _killed_group_add_is_finished(cluster: SupervisedCluster, preloaded: dict[str, str],
                                  expected_groups: tuple[int, ...], new_group: int) -> None:
    """The mover dies (SIGKILL of the command) with a move past its freeze:
    a router notices the stalled intent and carries it on (the frozen ranges
    are served by no group meanwhile), and `group add` run again attaches to
    that unfinished intent instead of adding another group. No key is lost."""
    config = cluster.tmp / "cluster.toml"
    command = _shardnode(cluster, "group", "add")
    deadline = time.monotonic() + 180
    phases: list[str] = []
    while time.monotonic() < deadline and command.poll() is None:
        records = _moves(cluster.cluster)
        if any(r.phase >= Phase.FROZEN for r in records):
            command.kill()
            phases = sorted({r.phase.name for r in records})
            break
        time.sleep(0.01)
    command.communicate(timeout=60)
    assert phases, "the command finished before it could be killed mid-move"
    killed_at = time.monotonic()
    while any(r.phase >= Phase.COPIED for r in _moves(cluster.cluster)):
        assert time.monotonic() - killed_at < 90, "no router finished the frozen move"
        time.sleep(0.5)
    resumed_after = time.monotonic() - killed_at
    assert not _check_all(config, preloaded), "every key is readable once the frozen moves are finished"
    left = _moves(cluster.cluster)
    if left:
        again = _shardnode(cluster, "group", "add")
        out, err = again.communicate(timeout=300)
        assert again.returncode == 0, err + cluster.log_tail()
        assert "already recorded" in out + err
    shard_map = _load_map(cluster.cluster)
    print(f"\n[sharding] killed in phases {phases}; frozen moves finished by a router after {resumed_after:.1f} s; "
          f"{len(left)} move(s) left when the command ran again")
    assert shard_map.groups == expected_groups
    assert abs(shard_map.share(new_group) - 1 / len(expected_groups)) < 0.01
    assert not _moves(cluster.cluster)
    assert not _check_all(config, preloaded)
