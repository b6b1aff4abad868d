"""Changes of shape made at the same time and killed half way, under
supervisord, while clients read and write (docs/membership.md, "One
scheduler"): two `group add` at once, `group add` racing `group remove`,
each shape command SIGKILLed at its phases and run again, and two `leave`s
at once with a third that must be refused. Every history is checked for
linearizability and every acknowledged write read back.

One cluster for the whole module (starting one costs more than a scenario):
6 hosts, the last a standby host, 2 groups of 5 replicas, room for 6 groups,
the scheduler's lease at 3 s. The scenarios run in order and each leaves the
cluster in a known shape for the next.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shardnode.client import Client
from shardnode.config import ClusterConfig
from shardnode.placement.directory import ShardDirectory
from shardnode.placement.intents import IntentBook, unfinished
from shardnode.placement.membership import MembershipAdmin
from shardnode.placement.moves import MOVES_KEY, decode_moves
from shardnode.placement.shard_map import ShardMap

from .ports import write_cluster_toml
from .supervised import ROOT, SupervisedCluster, start_supervised
from .workload import Load

pytestmark = [pytest.mark.timeout(900), pytest.mark.xdist_group("shape_concurrency")]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SupervisedCluster]:
    tmp = tmp_path_factory.mktemp("shape")
    config = write_cluster_toml(tmp, name="concurrency-itest", hosts=6, groups=2, replicas=5, max_groups=6,
                                standby=("h6",))
    with start_supervised(tmp, config) as cluster:
        _wait(lambda: len(_load_map(cluster.cluster).groups) == 2 and all(
            s.leader_id for s in _admin(cluster).groups()), "the cluster to start")
        yield cluster


# --- Helpers ----------------------------------------------------------------------------------


def _admin(env: SupervisedCluster) -> MembershipAdmin:
    return MembershipAdmin(env.cluster)


def _metadata(cluster: ClusterConfig, read):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        directory = ShardDirectory(cluster)
        try:
            return await read(directory)
        finally:
            await directory.close()
    return asyncio.run(main())


def _load_map(cluster: ClusterConfig) -> ShardMap:
    return _metadata(cluster, lambda d: d.load_map())


def _moves(cluster: ClusterConfig) -> list:
    async def read(directory):  # type: ignore[no-untyped-def]
        return decode_moves(await directory.read(MOVES_KEY))
    return _metadata(cluster, read)


def _unfinished_intents(cluster: ClusterConfig) -> list:
    async def read(directory):  # type: ignore[no-untyped-def]
        return unfinished(await IntentBook(directory).all())
    return _metadata(cluster, read)


def _wait(ready, what: str, timeout: float = 180.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except Exception as exc:            # a cluster still starting, a leader election
            last = exc
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what} ({last})")


def _shardnode(env: SupervisedCluster, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shardnode.cli", "--config", str(env.tmp / "cluster.toml"),
                             *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(command: subprocess.Popen, timeout: float = 400) -> tuple[int, str, str]:
    out, err = command.communicate(timeout=timeout)
    return command.returncode, out, err


def _kill_after_lines(env: SupervisedCluster, args: tuple[str, ...], lines: int, timeout: float = 300) -> bool:
    """Run the command and SIGKILL it once it printed `lines` progress lines;
    False if it ended by itself first (its change is done)."""
    command = _shardnode(env, *args)
    assert command.stdout is not None
    seen = 0
    deadline = time.monotonic() + timeout
    while seen < lines and time.monotonic() < deadline:
        if not command.stdout.readline():
            break
        seen += 1
    killed = command.poll() is None and seen == lines
    if command.poll() is None:
        command.kill()
    command.communicate(timeout=60)
    return killed


def _intent_ids(cluster: ClusterConfig) -> set[int]:
    async def read(directory):  # type: ignore[no-untyped-def]
        return {intent.intent_id for intent in await IntentBook(directory).all()}
    return _metadata(cluster, read)


def _killed_and_run_again(env: SupervisedCluster, args: tuple[str, ...], kill_points: tuple[int, ...],
                          recorded: list[int] | None = None) -> int:
    """Kill the command after each of `kill_points` progress lines, running
    it again each time while its change is unfinished (as an operator who
    checks `group pending` would), then let a last run finish it. Returns
    how many times it was killed. `recorded` gets the ids of the changes the
    runs recorded: one, unless a router's scheduler finished it between an
    operator's look at `group pending` and the next run, which is then a
    new request of its own (the caller checks each was carried out once)."""
    known = _intent_ids(env.cluster)
    kills = 0
    for lines in kill_points:
        if kills and not _unfinished_intents(env.cluster):
            return kills            # a router, or the killed run's last step, finished it
        if not _kill_after_lines(env, args, lines):
            return kills            # it finished before that line: done
        kills += 1
    if _unfinished_intents(env.cluster):
        code, out, err = _finish(_shardnode(env, *args))
        assert code == 0, out + err
    if recorded is not None:
        recorded.extend(sorted(_intent_ids(env.cluster) - known))
    return kills


def _voters(env: SupervisedCluster) -> dict[int, list[str]]:
    with _admin(env) as admin:
        return {s.group: sorted(m.host for m in s.voters) for s in admin.groups()}


def _hosts_of(env: SupervisedCluster, group: int) -> list[str]:
    with _admin(env) as admin:
        return sorted(m.host for m in admin.group(group).members)


def _preload(env: SupervisedCluster, count: int, prefix: str) -> dict[str, str]:
    values = {f"{prefix}-{i}": f"v{i}" for i in range(count)}
    with Client.from_config(env.tmp / "cluster.toml", timeout=30.0) as client, ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda item: client.put(*item), values.items()))
    return values


def _lost(env: SupervisedCluster, expected: dict[str, str]) -> list[str]:
    with Client.from_config(env.tmp / "cluster.toml", timeout=30.0) as client:
        return [k for k, v in expected.items() if client.get(k) != v.encode()]


def _settled(env: SupervisedCluster) -> None:
    """Nothing recorded and unfinished, no move left."""
    _wait(lambda: not _unfinished_intents(env.cluster) and not _moves(env.cluster), "the scheduler to settle", 240)


class Loaded:
    """A client load around a scenario, verified at its end."""

    def __init__(self, env: SupervisedCluster, name: str) -> None:
        self.env, self.name = env, name
        self.load = Load(env.tmp / "cluster.toml", prefix="".join(c for c in name if c.isalnum()) + "/")

    def __enter__(self) -> Loaded:
        self.load.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.load.finish()
        if exc_info[0] is None:
            checked, lost = self.load.verify()
            print(f"\n[{self.name}] operations={len(self.load.recorder.operations())} keys_checked={checked} "
                  f"lost={len(lost)}")
            assert not lost, lost[:5]


# --- Scenarios ---------------------------------------------------------------------------------


def test_two_leaves_at_once_and_a_third_refused(env: SupervisedCluster) -> None:
    """Three operators ask three hosts to leave at once: the scheduler runs
    one change at a time and the group leader checks each against the
    configuration the previous one left; two leave (5 voters -> 3), the third
    would leave two voters and is refused, changing nothing."""
    with Loaded(env, "three leaves"):
        commands = {name: _shardnode(env, "leave", env.cluster.host(name).router_address, "--clean")
                    for name in ("h3", "h4", "h5")}
        results = {name: _finish(command) for name, command in commands.items()}
    codes = sorted(code for code, _, _ in results.values())
    assert codes == [0, 0, 2], results
    refused = next(err for code, _, err in results.values() if code == 2)
    assert "would drop to 2 voters" in refused and refused.count("\n") == 1, refused
    voters = _voters(env)
    assert all(len(v) == 3 for v in voters.values()), voters
    left = {name for name, (code, _, _) in results.items() if code == 0}
    assert all(not set(v) & left for v in voters.values()), (voters, left)
    _settled(env)
    # The two that left come back as new members, for the next scenarios.
    for name in sorted(left):
        code, out, err = _finish(_shardnode(env, "start", env.cluster.host(name).router_address, "--new"))
        assert code == 0, out + err
    assert all(len(v) == 5 for v in _voters(env).values())


def test_start_new_and_member_add_killed_at_each_phase_and_run_again(env: SupervisedCluster) -> None:
    """`leave`, `start --new` and `member add` are SIGKILLed part way (after
    some of their progress lines) and run again; each rerun carries the same change on
    (it attaches to the recorded intent), and the end state is the one a
    single run reaches: no member added twice, none left half done."""
    h5 = env.cluster.host("h5").router_address
    with Loaded(env, "killed leave / start --new"):
        kills = _killed_and_run_again(env, ("leave", h5, "--clean"), (2,))
        _settled(env)
        assert all("h5" not in v and len(v) == 4 for v in _voters(env).values()), _voters(env)
        kills += _killed_and_run_again(env, ("start", h5, "--new"), (1, 3))
        _settled(env)
    for group in (0, 1):
        hosts = _hosts_of(env, group)
        assert hosts == ["h1", "h2", "h3", "h4", "h5"], (group, hosts)
    with Loaded(env, "killed member add"):
        kills += _killed_and_run_again(env, ("member", "add", "0", "h6"), (1,))
        _settled(env)
    print(f"\n[membership kills] {kills} commands killed and run again")
    assert kills >= 3, kills
    assert _hosts_of(env, 0) == ["h1", "h2", "h3", "h4", "h5", "h6"]
    with _admin(env) as admin:
        assert len(admin.group(0).voters) == 6
    code, out, err = _finish(_shardnode(env, "member", "remove", "0", "h6"))
    assert code == 0, out + err
    assert _hosts_of(env, 0) == ["h1", "h2", "h3", "h4", "h5"]


def test_two_group_adds_at_once_then_add_racing_remove(env: SupervisedCluster) -> None:
    """Two operators run `group add` at the same time: one change is recorded
    (the second attaches to it), one group is added and given its share.
    Then `group add` and `group remove` of the new group run at the same
    time: the scheduler runs them in turn; no frozen range is left unserved
    and no key is lost."""
    preloaded = _preload(env, 500, "add")
    with Loaded(env, "two group adds"):
        first, second = _shardnode(env, "group", "add"), _shardnode(env, "group", "add")
        results = [_finish(first), _finish(second)]
    assert [code for code, _, _ in results] == [0, 0], results
    assert any("already recorded" in out for _, out, _ in results), results
    shard_map = _load_map(env.cluster)
    assert shard_map.groups == (0, 1, 2), shard_map.groups
    assert abs(shard_map.share(2) - 1 / 3) < 0.01
    _settled(env)
    assert not _lost(env, preloaded)
    with Loaded(env, "add racing remove"):
        add, remove = _shardnode(env, "group", "add"), _shardnode(env, "group", "remove", "2")
        results = [_finish(add), _finish(remove)]
    assert [code for code, _, _ in results] == [0, 0], results
    _settled(env)
    shard_map = _load_map(env.cluster)
    assert 2 in shard_map.retired and 3 in shard_map.groups and 2 not in shard_map.groups, shard_map
    assert abs(sum(shard_map.share(g) for g in shard_map.groups) - 1.0) < 1e-9
    assert not _lost(env, preloaded)


def test_group_add_and_remove_killed_at_each_phase_and_run_again(env: SupervisedCluster) -> None:
    """`group add` and `group remove` SIGKILLed part way (the group placed
    and elected; moves under way) and run again: the reruns carry the same change on, and exactly one
    group is added, then removed, with every key kept."""
    preloaded = _preload(env, 500, "killed")
    before = _load_map(env.cluster)
    recorded: list[int] = []
    with Loaded(env, "killed group add"):
        # Killed once the group is placed and elected, then again in the middle of its moves.
        kills = _killed_and_run_again(env, ("group", "add"), (2, 8), recorded)
        _settled(env)
    after = _load_map(env.cluster)
    added = sorted(set(after.groups) - set(before.groups))
    # Each recorded change added exactly one group: a killed run's change was carried on by its
    # reruns (or a router), never done twice (a rerun after it finished is a change of its own).
    assert len(recorded) >= 1 and len(added) == len(recorded), (before.groups, after.groups, recorded)
    assert abs(after.share(added[-1]) - 1 / len(after.groups)) < 0.02
    assert not _lost(env, preloaded)
    for extra in added[1:]:
        code, out, err = _finish(_shardnode(env, "group", "remove", str(extra)))
        assert code == 0, out + err
    with Loaded(env, "killed group remove"):
        kills += _killed_and_run_again(env, ("group", "remove", str(added[0])), (4,))
        _settled(env)
    print(f"\n[group kills] {kills} commands killed and run again")
    assert kills >= 2, kills
    final = _load_map(env.cluster)
    assert added[0] in final.retired and final.groups == before.groups
    assert not _lost(env, preloaded)
    pending = _shardnode(env, "group", "pending")
    code, out, err = _finish(pending)
    assert code == 0 and "0 unfinished change(s)" in out, out + err
