"""Membership changes of a whole cluster under supervisord, driven exactly as
users drive them (kv739_leave / kv739_start, the shardnode CLI), while
clients read and write. Every history is checked for linearizability and
every acknowledged write must survive with its last acknowledged value.

The cluster: h1…h4 hold every group (2 groups of 4 voters), h5 is a
standby host that holds nothing at first.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardnode import kv739
from shardnode.placement.membership import MembershipAdmin, ShapeRefused

from .ports import write_cluster_toml
from .supervised import ROOT, SupervisedCluster, start_supervised
from .workload import Load

pytestmark = [pytest.mark.timeout(420), pytest.mark.xdist_group("cluster_shape")]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SupervisedCluster]:
    config = write_cluster_toml(tmp_path, name="shape-itest", hosts=5, groups=2, replicas=4, standby=("h5",))
    with start_supervised(tmp_path, config) as env:
        with MembershipAdmin(env.cluster) as admin:
            _wait_groups(admin, voters=4)
        try:
            yield env
        finally:
            kv739.kv739_shutdown()


def _wait_groups(admin: MembershipAdmin, voters: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            states = admin.groups()
        except ShapeRefused:        # the metadata group is still starting: the live groups are not known yet
            time.sleep(0.5)
            continue
        if all(s.leader_id and len(s.voters) == voters and all(m.reachable for m in s.members) for s in states):
            return
        time.sleep(0.2)
    raise AssertionError(f"groups never had {voters} reachable voters: {admin.groups()}")


def _leaders_per_host(admin: MembershipAdmin) -> dict[str, int]:
    counts: dict[str, int] = {}
    for state in admin.groups():
        if state.leader is not None:
            counts[state.leader.host] = counts.get(state.leader.host, 0) + 1
    return counts


def _shardnode(env: SupervisedCluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardnode.cli", "--config", str(env.tmp / "cluster.toml"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)


def test_every_host_in_turn_leaves_and_rejoins_empty_while_clients_write(cluster: SupervisedCluster) -> None:
    """The original design's membership suite, under load. The first host to
    leave is the one that leads the most groups (its leadership moves first)."""
    config = cluster.tmp / "cluster.toml"
    assert kv739.kv739_init(str(config)) == 0
    load = Load(config)
    with MembershipAdmin(cluster.cluster) as admin:
        leaders = _leaders_per_host(admin)
        order = sorted(["h1", "h2", "h3", "h4"], key=lambda h: -leaders.get(h, 0))
        load.start()
        timings = []
        try:
            time.sleep(1.5)
            for name in order:
                router = cluster.cluster.host(name).router_address
                began = time.monotonic()
                assert kv739.kv739_leave(router, 1) == 0, cluster.log_tail()
                left = time.monotonic()
                for state in admin.groups():
                    assert state.member_at(cluster.cluster.host(name).worker_address(state.group)) is None
                    assert len(state.voters) == 3 and state.leader is not None and state.leader.host != name
                assert kv739.kv739_start(router, 0) == -1, "a host that left does not start from its data"
                assert kv739.kv739_start(router, 1) == 0, cluster.log_tail()
                timings.append((name, round(left - began, 1), round(time.monotonic() - left, 1)))
                _wait_groups(admin, voters=4)
                time.sleep(1.0)
        finally:
            load.finish()
        states = admin.groups()
    checked, lost = load.verify()
    print(f"\n[membership] leave/rejoin (host, seconds to leave, seconds to rejoin): {timings}; "
          f"operations={len(load.recorder.operations())} keys_checked={checked} keys_lost={len(lost)}")
    assert not lost, f"{len(lost)} acknowledged keys lost, e.g. {lost[:5]}"
    assert checked > 0
    for state in states:
        # Every original id was removed once and replaced by a new one.
        assert {m.host for m in state.voters} == {"h1", "h2", "h3", "h4"}
        assert all(m.node_id > 5 for m in state.members) and set(state.removed) == {1, 2, 3, 4}


def test_a_host_lost_for_good_is_replaced_on_a_standby_host(cluster: SupervisedCluster) -> None:
    """h2 dies (SIGKILL) and its disk is gone. Its replicas are removed with
    `shardnode member remove`, and the standby h5 takes its place with
    `shardnode start --new`."""
    config = cluster.tmp / "cluster.toml"
    assert kv739.kv739_init(str(config)) == 0
    load = Load(config)
    load.start()
    try:
        time.sleep(1.5)
        h2 = cluster.cluster.host("h2")
        assert kv739.kv739_die(h2.router_address, 0) == 0
        shutil.rmtree(cluster.cluster.data_dir / "h2" / "group-0")
        shutil.rmtree(cluster.cluster.data_dir / "h2" / "group-1")
        for group in (0, 1):
            removed = _shardnode(cluster, "member", "remove", str(group), "h2")
            assert removed.returncode == 0, removed.stderr + cluster.log_tail()
            assert "removing node" in removed.stdout
        joined = _shardnode(cluster, "start", cluster.cluster.host("h5").router_address, "--new")
        assert joined.returncode == 0, joined.stderr + cluster.log_tail()
        assert "catching up" in joined.stdout or "is a voter" in joined.stdout
        time.sleep(1.0)
    finally:
        load.finish()
    checked, lost = load.verify()
    assert not lost and checked > 0, lost[:5]
    listing = _shardnode(cluster, "member", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    for group in json.loads(listing.stdout)["groups"]:
        voters = {m["host"] for m in group["members"] if m["role"] == "voter"}
        assert voters == {"h1", "h3", "h4", "h5"}, group
        assert all(m["reachable"] for m in group["members"])


def test_refused_changes_change_nothing(cluster: SupervisedCluster) -> None:
    env = cluster
    config = env.tmp / "cluster.toml"
    assert kv739.kv739_init(str(config)) == 0
    h = {name: env.cluster.host(name) for name in ("h1", "h2", "h3", "h4", "h5")}
    with MembershipAdmin(env.cluster) as admin:
        assert kv739.kv739_leave(h["h1"].router_address, 1) == 0
        before = [(s.group, sorted(m.node_id for m in s.voters)) for s in admin.groups()]
        # Three voters left: a second leave would drop every group to two.
        assert kv739.kv739_leave(h["h2"].router_address, 1) == -1
        refused = _shardnode(env, "leave", h["h2"].router_address)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
        assert "would drop to 2 voters" in refused.stderr
        # Refused: an address of no host, a plain start of a host that left.
        for args in (("leave", "127.0.0.9:1"), ("start", h["h1"].router_address)):
            result = _shardnode(env, *args)
            assert result.returncode == 2 and result.stderr.count("\n") == 1, (args, result.stderr)
        # What is there already is done, not refused (a rerun converges), and changes nothing:
        # h1 left, h5 (standby) never held group 1, h3 holds a voter of group 0.
        for args, said in ((("member", "remove", "0", "h1"), "holds no replica of group 0"),
                           (("member", "remove", "1", "h5"), "holds no replica of group 1"),
                           (("member", "add", "0", "h3"), "holds voter")):
            result = _shardnode(env, *args)
            assert result.returncode == 0 and said in result.stdout, (args, result.stdout, result.stderr)
        # The live majority: group 0 with five voters, two of them down. Removing a
        # third live one would leave 2 of 4 remaining voters answering.
        assert kv739.kv739_start(h["h1"].router_address, 1) == 0
        added = _shardnode(env, "member", "add", "0", "h5")
        assert added.returncode == 0, added.stderr
        assert kv739.kv739_die(h["h4"].router_address, 0) == 0
        assert kv739.kv739_die(h["h5"].router_address, 0) == 0
        five = sorted(m.node_id for m in admin.group(0).voters)
        assert len(five) == 5
        # If h4 or h5 led group 0, the other three elect a leader first (a
        # change refused for want of one would be refused for another reason).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            leader = admin.group(0).leader
            if leader is not None and leader.reachable and leader.role == "leader":
                break
            time.sleep(0.2)
        majority = _shardnode(env, "member", "remove", "0", "h3")
        assert majority.returncode == 2 and "would lose its live majority: 2 of 4" in majority.stderr, \
            majority.stderr
        assert sorted(m.node_id for m in admin.group(0).voters) == five, "nothing changed"
        assert kv739.kv739_start(h["h4"].router_address, 0) == 0
        assert kv739.kv739_start(h["h5"].router_address, 0) == 0
        assert before and all(len(v) == 3 for _, v in before)


def test_a_host_that_died_without_leaving_starts_anew_with_new(cluster: SupervisedCluster) -> None:
    """The original design's kv739_die + kv739_start(server, 1): its old
    replicas are removed (their ids never come back), its data discarded, and
    it joins again as new members that catch up."""
    config = cluster.tmp / "cluster.toml"
    assert kv739.kv739_init(str(config)) == 0
    assert kv739.kv739_put("before", "1") == (1, "")
    h3 = cluster.cluster.host("h3")
    assert kv739.kv739_start(h3.router_address, 1) == -1, "a running member does not start anew"
    assert kv739.kv739_die(h3.router_address, 0) == 0
    assert kv739.kv739_put("while-down", "2") == (1, "")
    assert kv739.kv739_start(h3.router_address, 1) == 0, cluster.log_tail()
    with MembershipAdmin(cluster.cluster) as admin:
        for state in admin.groups():
            member = state.member_at(h3.worker_address(state.group))
            assert member is not None and not member.learner and member.node_id > 5, state
            assert 3 in state.removed and len(state.voters) == 4
            assert member.applied_index >= state.commit_index - 5
    assert kv739.kv739_get("before") == (0, "1") and kv739.kv739_get("while-down") == (0, "2")
