"""`shardnode rebalance` on a cluster under supervisord while clients read and
write: every history checked for linearizability, every acknowledged write
read back with its last acknowledged value.

The cluster: h1…h4 hold 3 groups of 3 (h3 holds all three), h5 is a standby
host that joins group 0 with `member add` (so it counts, with one replica).
Leadership is concentrated on h3 with TransferLeader: h3 leads 3 of 3 groups
and holds 3 replicas where h5 holds 1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardnode import kv739
from shardnode.placement.balance import Rebalancer, plan, unbalanced
from shardnode.placement.membership import MembershipAdmin, ShapeRefused

from .ports import write_cluster_toml
from .supervised import SupervisedCluster, start_supervised
from .test_cluster_shape import Load, _shardnode

pytestmark = [pytest.mark.timeout(420), pytest.mark.xdist_group("cluster_shape")]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SupervisedCluster]:
    config = write_cluster_toml(tmp_path, name="rebalance-itest", hosts=5, groups=3, replicas=3, standby=("h5",))
    with start_supervised(tmp_path, config) as env:
        with MembershipAdmin(env.cluster) as admin:
            _wait_leaders(admin)
        try:
            yield env
        finally:
            kv739.kv739_shutdown()


def _wait_leaders(admin: MembershipAdmin, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            states = admin.groups()
        except ShapeRefused:        # the groups are not known yet (a cluster still starting)
            time.sleep(0.5)
            continue
        if all(s.leader_id and not s.learners and all(m.reachable for m in s.members) for s in states):
            return
        time.sleep(0.2)
    raise AssertionError("groups never settled (a leader, no learner, every replica answering)")


def _leader_hosts(admin: MembershipAdmin) -> list[str]:
    return [s.leader.host if s.leader is not None else "-" for s in admin.groups()]


def test_rebalance_spreads_replicas_and_leaders_while_clients_write(cluster: SupervisedCluster) -> None:
    env = cluster
    config = env.tmp / "cluster.toml"
    assert kv739.kv739_init(str(config)) == 0
    added = _shardnode(env, "member", "add", "0", "h5")
    assert added.returncode == 0, added.stderr + env.log_tail()
    with MembershipAdmin(env.cluster) as admin:
        for state in admin.groups():
            h3 = state.member_at(env.cluster.host("h3").worker_address(state.group))
            assert h3 is not None
            for _ in range(5):
                if admin.transfer_leader(state.group, h3.node_id) == h3.node_id:
                    break
        assert _leader_hosts(admin) == ["h3", "h3", "h3"], "leadership concentrated on h3"
        before = Rebalancer(admin).read()
        assert before.replica_counts() == {"h1": 2, "h2": 2, "h3": 3, "h4": 2, "h5": 1}

        dry = _shardnode(env, "rebalance", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "plan (" in dry.stdout and "move a replica from h3 to h5" in dry.stdout, dry.stdout
        assert "dry run: nothing was changed" in dry.stdout
        assert _leader_hosts(admin) == ["h3", "h3", "h3"], "a dry run changes nothing"

        load = Load(config)
        load.start()
        try:
            time.sleep(1.5)
            began = time.monotonic()
            result = _shardnode(env, "rebalance")
            took = time.monotonic() - began
            assert result.returncode == 0, result.stdout + result.stderr + env.log_tail()
            time.sleep(1.0)
        finally:
            load.finish()
        assert "step 1/" in result.stdout and "balanced in" in result.stdout, result.stdout
        assert "is a voter" in result.stdout and "handing leadership" in result.stdout, result.stdout

        _wait_leaders(admin)
        after = Rebalancer(admin).read()
        replicas, leaders = after.replica_counts(), after.leader_counts()
        assert max(replicas.values()) - min(replicas.values()) <= 1, replicas
        assert max(leaders.values()) <= math.ceil(3 / 5), leaders
        assert unbalanced(after) == [] and plan(after) == []
        for state in admin.groups():
            hosts = [m.host for m in state.members]
            assert len(hosts) == len(set(hosts)) and len(state.voters) >= 3, state

    again = _shardnode(env, "rebalance")
    assert again.returncode == 0 and "already balanced" in again.stdout, again.stdout + again.stderr
    checked, lost = load.verify()
    print(f"\n[rebalance] {took:.1f} s; replicas {replicas}; leaders {leaders}; "
          f"operations={len(load.recorder.operations())} keys_checked={checked} keys_lost={len(lost)}")
    assert not lost, f"{len(lost)} acknowledged keys lost, e.g. {lost[:5]}"
    assert checked > 0


def test_rebalance_refuses_with_one_line_and_changes_nothing(cluster: SupervisedCluster) -> None:
    """The balance needs a replica of h3 to move to h5; the groups h3 could
    give up (1 and 2) both have a voter on h4, which is down: refused. Then
    group 2 loses its quorum too (h1's replica killed): refused for that."""
    env = cluster
    assert kv739.kv739_init(str(env.tmp / "cluster.toml")) == 0
    added = _shardnode(env, "member", "add", "0", "h5")
    assert added.returncode == 0, added.stderr + env.log_tail()
    h1, h4 = env.cluster.host("h1"), env.cluster.host("h4")
    with MembershipAdmin(env.cluster) as admin:
        assert kv739.kv739_die(h4.router_address, 0) == 0
        _wait_until(lambda: all(s.leader is not None and s.leader.reachable for s in admin.groups()))
        before = [(s.group, sorted((m.node_id, m.host, m.learner) for m in s.members)) for s in admin.groups()]

        refused = _shardnode(env, "rebalance")
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stdout + refused.stderr
        assert "on h4 down" in refused.stderr and "nothing was changed" in refused.stderr, refused.stderr
        dry = _shardnode(env, "rebalance", "--dry-run")
        assert dry.returncode == 2 and dry.stderr == refused.stderr, dry.stderr

        assert kv739.kv739_die(h1.worker_address(2), 0) == 0
        _wait_until(lambda: admin.group(2).leader is None or not admin.group(2).leader.reachable)
        # The routers' view of group 2 follows within a few probes; until
        # then the refusal may still name h4 (each refusal changes nothing).
        deadline = time.monotonic() + 30
        while True:
            no_quorum = _shardnode(env, "rebalance")
            assert no_quorum.returncode == 2 and no_quorum.stderr.count("\n") == 1, no_quorum.stderr
            if "group 2 has no leader" in no_quorum.stderr or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        assert "group 2 has no leader" in no_quorum.stderr, no_quorum.stderr

        after = [(s.group, sorted((m.node_id, m.host, m.learner) for m in s.members)) for s in admin.groups()]
        assert after == before, "a refusal changes nothing"


def _wait_until(condition, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the cluster never got there"
        time.sleep(0.2)
