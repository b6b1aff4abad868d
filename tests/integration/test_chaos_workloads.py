"""The chaos workloads and checkers against a live cluster under supervisord:
both workloads run for about 10 s while the leader worker of group 0 is
SIGKILLed and, 3 s later, started again; afterwards both checkers must find
nothing wrong, and the availability of each phase is measured (printed;
run with -s to see it).

3 hosts, 2 groups of 3 replicas: killing one replica keeps a majority, so
the load should carry on after an election.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from shardnode.chaos.checkers import availability, check_registers, check_set, resume_seconds
from shardnode.chaos.operations import Action, LoggedOperation, OperationLog, Outcome
from shardnode.chaos.workloads import RegisterWorkload, SetWorkload
from shardnode.client import Client
from shardnode.errors import ShardnodeError
from shardnode.placement.shard_map import ShardMap

from .ports import write_cluster_toml
from .supervised import SupervisedCluster, start_supervised

pytestmark = pytest.mark.timeout(240)

BEFORE_KILL = 3.0
KILLED_FOR = 3.0
AFTER_RESTART = 4.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SupervisedCluster]:
    config = write_cluster_toml(tmp_path, name="chaos-itest", hosts=3, groups=2, replicas=3)
    with start_supervised(tmp_path, config) as env:
        _wait_ready(env)
        yield env


def _wait_ready(env: SupervisedCluster, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with Client.from_config(env.tmp / "cluster.toml", timeout=2.0) as client:
        while time.monotonic() < deadline:
            try:
                status = client.status()
                if status.groups and all(g.has_quorum and g.leader_id for g in status.groups):
                    return
            except ShardnodeError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"cluster not ready within {timeout}s\n{env.log_tail()}")


def _leader_worker(env: SupervisedCluster, group: int) -> str:
    """The worker address of the group's leader (a worker address names that worker alone)."""
    with Client.from_config(env.tmp / "cluster.toml", timeout=5.0) as client:
        (status,) = [g for g in client.status().groups if g.group == group]
    return env.cluster.host_by_node_id(status.leader_id).worker_address(group)


def _rate(entries: Sequence[LoggedOperation], actions: set[Action], start: float, end: float) -> float:
    """Operations of `actions` started per second in [start, end)."""
    return sum(1 for op in entries if op.action in actions and start <= op.start < end) / (end - start)


def _share(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction:.3f}"


def test_workloads_and_checkers_through_a_sigkilled_leader(cluster: SupervisedCluster) -> None:
    config = cluster.tmp / "cluster.toml"
    log = OperationLog()
    registers = RegisterWorkload(config, clients=4, seed=1, log=log)
    elements = SetWorkload(config, clients=4, seed=1, log=log)
    victim = _leader_worker(cluster, 0)

    started = log.clock()
    registers.start()
    elements.start()
    time.sleep(BEFORE_KILL)
    killed_at = log.clock()
    cluster.control.stop(victim, clean=False)       # SIGKILL, stays down
    time.sleep(KILLED_FOR)
    restarted_at = log.clock()
    cluster.control.start(victim)
    cluster.record_pids()
    time.sleep(AFTER_RESTART)
    registers.stop()
    elements.stop()
    stopped = log.clock()

    read_back = log.clock()
    registers.read_back(timeout=30.0)
    readback = elements.read_back(timeout=30.0)
    read_time = log.clock() - read_back

    register_result = check_registers(registers.history(), log=[op for op in log.operations()
                                                                if op.start < stopped], timeout=60.0)
    set_result = check_set(elements.attempts(), readback)

    entries = [op for op in log.operations() if op.start < stopped]
    windows = [(started, killed_at), (killed_at, restarted_at), (restarted_at, stopped)]
    names = ["before the kill", "leader killed", "after restart"]
    all_ops = availability(entries, windows)
    writes = availability(entries, windows, actions={Action.PUT, Action.INSERT})
    print(f"\nkilled {victim} (leader of group 0) at +{killed_at - started:.1f} s, "
          f"restarted at +{restarted_at - started:.1f} s, stopped at +{stopped - started:.1f} s")
    print(f"register workload: {_rate(entries, {Action.PUT, Action.GET}, started, stopped):.0f} ops/s; "
          f"set workload: {_rate(entries, {Action.INSERT}, started, stopped):.0f} inserts/s; "
          f"read-back {read_time:.1f} s")
    for name, every, write in zip(names, all_ops, writes):
        print(f"  {name:16} {every.operations:5} ops, availability {_share(every.fraction)} "
              f"(writes {_share(write.fraction)})")
    # The killed leader's group alone: its writes wait for an election.
    shard_map = ShardMap.build(cluster.cluster.groups, cluster.cluster.virtual_nodes)
    group_0 = [op for op in entries if shard_map.group_for(op.key) == 0]
    (group_0_killed,) = availability(group_0, [(killed_at, restarted_at)])
    resumed = resume_seconds(group_0, killed_at)
    print(f"  group 0 while its leader was down: {group_0_killed.operations} ops, availability "
          f"{_share(group_0_killed.fraction)}; its first write started after the kill was acknowledged "
          f"{'never' if resumed is None else f'{resumed:.2f} s'} after it")
    print(" ", register_result.summary())
    print(" ", set_result.summary(), dict(set_result.figures))

    assert register_result.valid, [a.detail for a in register_result.anomalies] or register_result.undecided
    assert set_result.valid, [a.detail for a in set_result.anomalies] or set_result.undecided
    # The load really ran, on every group, and the checkers saw it.
    assert {shard_map.group_for(k) for k in registers.hot_keys} == {0, 1}
    assert {shard_map.group_for(a.key) for a in elements.attempts()
            if a.outcome is Outcome.OK} == {0, 1}
    assert register_result.ok > 100 and set_result.figures["acknowledged"] > 100
    assert all(w.operations > 0 for w in all_ops)
    # One replica of three down: the group keeps a majority, so writes resume.
    assert writes[2].fraction is not None and writes[2].fraction > 0.5
    assert resumed is not None
