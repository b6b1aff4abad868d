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
import re
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
from shardnode.errors import RoutersUnreachable, ShardnodeError
from shardnode.placement.shard_map import ShardMap
from shardnode.placement.directory import ShardDirectory
from shardnode.keyspace import RangeSet, stable_hash
from shardnode.placement.moves import MOVES_KEY, MoveError, MoveRecord, Mover, MoveSuperseded, Phase, decode_moves
from shardnode.placement.shard_map import Move
from shardnode.placement.worker_groups import WorkerGroups
from shardnode.storage.export_reads import DeltaPage
from shardnode.supervisor import ROUTER_PROGRAM, ProcessControl, worker_program

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
    # The summary counts what every phase moved (it once showed only the last phase's: "0 keys").
    summary = re.search(r"([\d,]+) keys \([\d,]+ bytes\) copied and ([\d,]+) caught up", out)
    assert summary and sum(int(n.replace(",", "")) for n in summary.groups()) > 0, out
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
        try:
            wrong = [k for k, v in expected.items() if client.get(k) != v.encode()]
            assert client.put("after-the-move", "1") is None
        except ShardnodeError as exc:
            # Say why (a CI run once failed here with only the client's frame in its report).
            raise AssertionError(f"{host_name}'s returning router: {type(exc).__name__}: {exc}\n"
                                 + cluster.log_tail()) from exc
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


# --- A move carried out by a scheduler that is taken over mid-way ------------------------------

LEASE_KEY = b"itest_scheduler_lease"


async def _begin_move(cluster: ClusterConfig, move: Move) -> MoveRecord:
    """Scheduler A (token 5, its lease in the metadata group) plans the move
    and runs it up to the end of its copy."""
    directory, groups = ShardDirectory(cluster), WorkerGroups(cluster)
    try:
        swapped, _ = await directory.compare_and_set(LEASE_KEY, None, b"scheduler-A")
        assert swapped
        mover = Mover(groups, directory, fence=5, guards=((LEASE_KEY, b"scheduler-A"),))
        (record,) = await mover.plan([move])
        return await mover.run(record, stop_after=Phase.EXPORTING)
    finally:
        await groups.close()
        await directory.close()


async def _take_over_and_finish(cluster: ClusterConfig, record: MoveRecord) -> list[DeltaPage]:
    """Scheduler B takes the lease (token 6) and fences both groups; A, a
    zombie now, can change nothing; B freezes, reads the delta in small
    pages (returned), and finishes the move."""
    directory, groups = ShardDirectory(cluster), WorkerGroups(cluster)
    try:
        swapped, _ = await directory.compare_and_set(LEASE_KEY, b"scheduler-A", b"scheduler-B")
        assert swapped
        new = Mover(groups, directory, fence=6, guards=((LEASE_KEY, b"scheduler-B"),))
        old = Mover(groups, directory, fence=5, guards=((LEASE_KEY, b"scheduler-A"),))
        await new.fence_groups([record.source, record.target])
        with pytest.raises(MoveError, match="superseded"):
            await old.run(record)                       # its freeze is refused by the source
        with pytest.raises(MoveSuperseded, match="lease"):
            await old.plan([Move(record.source, record.target, record.ranges)])
        assert decode_moves(await directory.read(MOVES_KEY)) == [record]
        frozen = await new.run(record, stop_after=Phase.COPIED)
        pages: list[DeltaPage] = []
        after = None
        while True:
            page = await groups.delta(record.source, record.move_id, after, 1024)
            pages.append(page)
            after = page.next_after
            if after is None:
                break
        await new.run(frozen)
        return pages
    finally:
        await groups.close()
        await directory.close()


def test_a_scheduler_taken_over_mid_move_changes_nothing_and_stale_reads_follow_the_move(
        cluster: SupervisedCluster) -> None:
    """A move begun by one scheduler and finished by the next, over real
    workers: the old one's commands are refused by their fencing token and
    its metadata writes by its lost lease; the delta comes in pages of the
    size asked; every key ends at its new owner. One replica of the target
    is down during the move: stale reads through its host's router, right
    after it starts again (down, then catching up, refusing the moved keys),
    are answered at once by the leader."""
    config = cluster.tmp / "cluster.toml"
    env = cluster.cluster
    preloaded = _preload(config, 1500)
    shard_map = _load_map(env)
    source, target = 0, 1
    ranges = RangeSet(list(shard_map.owned_by(source))[::2])
    moved = [k for k in preloaded if stable_hash(k.encode()) in ranges]
    leader = _leader_address(cluster, target)
    lagging = next(r for r in env.group_replicas(target) if r.address != leader)
    control = ProcessControl(env)
    control.stop_programs(lagging.host.name, [worker_program(target)])
    record = asyncio.run(_begin_move(env, Move(source, target, ranges)))
    # Writes behind the copy (with sessions): the delta carries them.
    rewritten = {k: f"again-{k}" for k in moved[:300]}
    with Client.from_config(config, timeout=20.0) as client, ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda item: client.put(*item), rewritten.items()))
    expected = {**preloaded, **rewritten}
    pages = asyncio.run(_take_over_and_finish(env, record))
    delta_keys = sum(len(p.puts) + len(p.deletes) for p in pages)
    assert len(pages) > 3 and delta_keys == len(rewritten), (len(pages), delta_keys)
    assert all(sum(len(k) + len(v) for k, v in p.puts) + sum(len(r) for _, r in p.sessions) < 2048 for p in pages)
    assert sum(len(p.sessions) for p in pages) >= 1
    final = _wait_for_map(env, lambda m: m.owned_by(target).covers(ranges))
    assert not _moves(env)
    # Stale reads at the host whose replica of the target is down (they are
    # answered by the leader), then again as soon as that replica starts
    # (down, then catching up and refusing the moved keys for a while).
    stale_failures: list[str] = []

    def stale_reads(phase: str) -> float:
        began = time.monotonic()
        # 5 s, well under the default 20 s: they are answered at once, but a loaded 2-core machine
        # once held a leader's answer past the 1.5 s this used to allow.
        with Client([lagging.host.router_address], timeout=5.0) as client, ThreadPoolExecutor(8) as pool:
            def read(key: str) -> None:
                try:
                    if client.get(key, allow_stale=True) != expected[key].encode():
                        stale_failures.append(f"{phase} {key}: wrong value")
                except Exception as exc:         # noqa: BLE001 - every failure is reported
                    stale_failures.append(f"{phase} {key}: {type(exc).__name__}: {exc}")
            list(pool.map(read, moved))
        return time.monotonic() - began

    down_seconds = stale_reads("replica down:")
    control.start_programs(lagging.host.name, [worker_program(target)])
    restart_seconds = stale_reads("replica starting:")
    lost = _check_all(config, expected)
    print(f"\n[sharding] take-over mid-move: {len(moved)} keys moved, delta {delta_keys} keys in {len(pages)} pages, "
          f"stale reads: {len(moved)} with the replica down ({down_seconds:.1f} s), {len(moved)} as it starts "
          f"({restart_seconds:.1f} s), {len(stale_failures)} failed; "
          f"keys checked {len(expected)}, lost {len(lost)}; map epoch {final.epoch}")
    assert not stale_failures, stale_failures[:5]
    assert not lost, lost[:5]
