"""A worker that lost its data, and one that missed its own removal, under
supervisord, driven as an operator would (docs/membership.md, "Replacing a
host", "How a worker knows who it is").

- The issue's reproduction: with two followers of group 0 stopped, writes are
  acknowledged by the other three; the leader and one follower are paused;
  the third follower's data directory is deleted and its worker started
  again; the two stopped followers are started. Its new store is not the
  life the group bound to its id: it is told so by the first peer it
  contacts, so its forgotten vote elects nobody, and it stays down with one
  log line naming the recovery command. Once everyone is back every
  acknowledged write reads back (the history checked for linearizability),
  and `shardnode start ADDR --new` brings it back as a new member.
- A member removed while it was down, started again while nobody answers
  its questions, learns its removal from a peer (a notice), checks it with
  the group and retires.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from shardnode.client import Client
from shardnode.placement.membership import GroupState, MembershipAdmin, ShapeRefused
from shardnode.replica.identity import observe_group
from shardnode.supervisor import worker_program
from shardnode.storage.retirement import read_tombstone

from .ports import write_cluster_toml
from .supervised import ROOT, SupervisedCluster, start_supervised
from .workload import Load

pytestmark = [pytest.mark.timeout(300), pytest.mark.xdist_group("lost_disk")]


@pytest.fixture
def five(tmp_path: Path) -> Iterator[SupervisedCluster]:
    """5 hosts, one group of 5 voters (the default cluster's shape), routers."""
    config = write_cluster_toml(tmp_path, name="lost-disk-itest", hosts=5, groups=1, replicas=5)
    with start_supervised(tmp_path, config) as env:
        yield env


@pytest.fixture
def four(tmp_path: Path) -> Iterator[SupervisedCluster]:
    """4 hosts, one group of 4 voters, no routers."""
    config = write_cluster_toml(tmp_path, name="removed-itest", hosts=4, groups=1, replicas=4)
    with start_supervised(tmp_path, config, include_router=False) as env:
        yield env


def _settled(admin: MembershipAdmin, env: SupervisedCluster, voters: int, timeout: float = 90.0) -> GroupState:
    """Group 0 with a leader, `voters` reachable voters, and every member's
    incarnation bound (the leader binds them as it hears from them)."""
    deadline = time.monotonic() + timeout
    state: GroupState | None = None
    while time.monotonic() < deadline:
        try:
            state = admin.group(0)
        except ShapeRefused:
            state = None
        if (state is not None and state.leader is not None and len(state.voters) == voters
                and all(m.reachable for m in state.members)):
            view = asyncio.run(observe_group(env.cluster, 0, "h1"))
            if view is not None and all(view.conf.incarnation_of(m.node_id) for m in state.members):
                return state
        time.sleep(0.2)
    raise AssertionError(f"group 0 never settled with {voters} bound voters: {state}\n{env.log_tail()}")


def _pid(env: SupervisedCluster, host: str) -> int:
    return env.control.processes(host)[worker_program(0)].pid


@contextmanager
def _paused(env: SupervisedCluster, hosts: list[str]) -> Iterator[None]:
    """SIGSTOP these hosts' group-0 workers; SIGCONT them on the way out, pass or fail."""
    pids = [_pid(env, host) for host in hosts]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def _wait_exited(env: SupervisedCluster, host: str, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    info = None
    while time.monotonic() < deadline:
        info = env.control.processes(host)[worker_program(0)]
        if info.state == "EXITED":
            assert info.exitstatus == 0, info
            return
        time.sleep(0.2)
    raise AssertionError(f"{host}'s worker of group 0 never exited: {info}\n{env.log_tail()}")


def _log(env: SupervisedCluster, host: str) -> str:
    return Path(env.control.processes(host)[worker_program(0)].logfile).read_text(errors="replace")


def _shardnode(env: SupervisedCluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardnode.cli", "--config", str(env.tmp / "cluster.toml"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)


def test_a_wiped_follower_cannot_vote_away_acknowledged_writes_and_rejoins_with_start_new(
        five: SupervisedCluster) -> None:
    env = five
    config = env.tmp / "cluster.toml"
    with MembershipAdmin(env.cluster) as admin:
        state = _settled(admin, env, voters=5)
        leader = state.leader
        assert leader is not None
        followers = [m for m in state.voters if m.node_id != leader.node_id]
        stopped, paused, wiped = followers[:2], followers[2], followers[3]
        load = Load(config)
        load.start()
        try:
            time.sleep(1.0)
            for member in stopped:
                env.control.stop(member.address, clean=False)
            with Client.from_config(config, timeout=10.0) as client:
                client.put("acknowledged", "by three of five")
            time.sleep(0.5)
            with _paused(env, [leader.host, paused.host]):
                env.control.stop(wiped.address, clean=False)
                shutil.rmtree(env.cluster.worker_data_dir(wiped.host, 0))
                # Nobody answers its questions: it bootstraps an empty store under its old id.
                env.control.start(wiped.address)
                for member in stopped:
                    env.control.start(member.address)
                # The first peer it reaches tells it it is not the life the group bound.
                _wait_exited(env, wiped.host)
            back = _settled_without(admin, env, missing=wiped.node_id)
            assert back.leader is not None and back.leader.node_id != wiped.node_id
            time.sleep(1.0)
        finally:
            load.finish()
        with Client.from_config(config, timeout=20.0) as client:
            assert client.get("acknowledged") == b"by three of five"
        checked, lost = load.verify()
        assert checked > 0 and not lost, f"{len(lost)} acknowledged keys lost, e.g. {lost[:5]}"

        # It stays down, and says once what to do.
        time.sleep(2.0)
        assert env.control.processes(wiped.host)[worker_program(0)].state == "EXITED"
        lines = [line for line in _log(env, wiped.host).splitlines() if "--new" in line]
        assert len(lines) == 1 and f"shardnode start {wiped.address} --new" in lines[0], lines
        assert "data_lost" in lines[0]
        assert read_tombstone(env.cluster.worker_data_dir(wiped.host, 0)) is not None

        # The recovery command: the old id goes, a new member joins and catches up.
        joined = _shardnode(env, "start", wiped.address, "--new")
        assert joined.returncode == 0, joined.stderr + env.log_tail()
        state = admin.group(0)
        member = state.member_at(wiped.address)
        assert member is not None and not member.learner and member.node_id > 5, state
        assert wiped.node_id in state.removed and len(state.voters) == 5
    print(f"\n[lost disk] keys checked={checked} lost={len(lost)} operations={len(load.recorder.operations())}")


def _settled_without(admin: MembershipAdmin, env: SupervisedCluster, missing: int,
                     timeout: float = 60.0) -> GroupState:
    """Group 0 led again, with every voter but `missing` reachable."""
    deadline = time.monotonic() + timeout
    state: GroupState | None = None
    while time.monotonic() < deadline:
        state = admin.group(0)
        others = [m for m in state.voters if m.node_id != missing]
        if state.leader is not None and state.leader.role == "leader" and all(m.reachable for m in others):
            return state
        time.sleep(0.2)
    raise AssertionError(f"group 0 never came back: {state}\n{env.log_tail()}")


def test_a_member_removed_while_down_learns_it_from_a_peer_and_retires(four: SupervisedCluster) -> None:
    env = four
    with MembershipAdmin(env.cluster) as admin:
        state = _settled(admin, env, voters=4)
        victim = next(m for m in state.voters if state.leader is not None and m.node_id != state.leader.node_id)
        env.control.stop(victim.address, clean=False)
        removed = _shardnode(env, "member", "remove", "0", victim.host)
        assert removed.returncode == 0, removed.stderr + env.log_tail()
        others = [m.host for m in admin.group(0).voters]
        # It starts while no member answers it: it opens its data, as a member it thinks it is.
        with _paused(env, others):
            env.control.start(victim.address)
            time.sleep(2.5)
            assert env.control.processes(victim.host)[worker_program(0)].state == "RUNNING"
        # Its campaign is answered with a notice; it checks with the group, then retires.
        _wait_exited(env, victim.host)
        log = _log(env, victim.host)
        assert "worker.removal_confirmed" in log and "worker.retired" in log, log[-3000:]
        data_dir = env.cluster.worker_data_dir(victim.host, 0)
        assert not data_dir.exists() and read_tombstone(data_dir) is not None
        state = admin.group(0)
        assert victim.node_id in state.removed and len(state.voters) == 3 and state.leader is not None
