"""Membership changes on real workers (no supervisord: the test starts the
processes the admin asks for): join as a learner, promotion once caught up,
removal with retirement, refusals that change nothing, rejoin with a new id."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from shardnode.config import ClusterConfig
from shardnode.placement.membership import MembershipAdmin, ShapeRefused
from shardnode.proto import worker_pb2 as pb

from .harness import WorkerGroup, get, put

pytestmark = pytest.mark.timeout(240)
OK = pb.ExecuteResponse.OK


def _admin(group: WorkerGroup, lines: list[str]) -> MembershipAdmin:
    cluster = ClusterConfig.load(group.config_path)

    def launch(server: str, groups: list[int]) -> None:
        host = next(h.name for h in cluster.hosts if server in (h.router_address, h.worker_address(0)))
        group.start(host)

    return MembershipAdmin(cluster, launch=launch, progress=lines.append, timeout=60)


def _wait_exit(group: WorkerGroup, host: str, timeout: float = 20.0) -> int:
    process = group.processes[host]
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        assert time.monotonic() < deadline, f"{host} did not exit\n{group.log_tail()}"
        time.sleep(0.05)
    group.processes.pop(host)
    return process.returncode


async def _write(group: WorkerGroup, keys: range, tag: bytes) -> None:
    for start in range(keys.start, keys.stop, 50):
        chunk = range(start, min(start + 50, keys.stop))
        response = await group.execute([put(b"k%05d" % i, tag + b"%d" % i) for i in chunk], timeout=15.0)
        assert response.status == OK, response


async def _read(group: WorkerGroup, keys: range) -> dict[bytes, bytes | None]:
    response = await group.execute([get(b"k%05d" % i) for i in keys], timeout=15.0)
    assert response.status == OK, response
    return {b"k%05d" % i: (r.value if r.existed else None) for i, r in zip(keys, response.results)}


def test_a_host_joins_as_a_learner_is_promoted_and_a_member_leaves_and_rejoins(make_group) -> None:
    group: WorkerGroup = make_group(4, replicas=3, snapshot_threshold=200)
    for host in ("h1", "h2", "h3"):
        group.start(host)
    lines: list[str] = []
    admin = _admin(group, lines)
    h4_address = admin.cluster.host("h4").worker_address(0)

    async def scenario() -> None:
        try:
            await group.wait_leader(timeout=30)
            await _write(group, range(0, 600), b"a")        # past the snapshot threshold: a learner needs one
            state = await asyncio.to_thread(admin.group, 0)
            assert [m.node_id for m in state.voters] == [1, 2, 3] and not state.learners

            # h4 joins: a fresh id above every host's, learner, promoted once caught up.
            member = await asyncio.to_thread(admin.add_member, 0, "h4")
            assert member.node_id == 5 and not member.learner and member.address == h4_address
            assert any("learner" in line for line in lines) and any("is a voter" in line for line in lines)
            state = await asyncio.to_thread(admin.group, 0)
            assert sorted(m.node_id for m in state.voters) == [1, 2, 3, 5]
            local = await group.execute([get(b"k00599")], host="h4", allow_stale=True)
            assert local.results[0].value == b"a599", "the new member caught up (by snapshot)"

            # The leader leaves: leadership handed over, removed, retired (exit 0, data gone).
            leader = await group.wait_leader()
            await asyncio.to_thread(admin.remove_member, 0, leader)
            assert _wait_exit(group, leader) == 0
            data = Path(admin.cluster.worker_data_dir(leader, 0))
            assert not data.exists() and Path(str(data) + ".removed").exists()
            state = await asyncio.to_thread(admin.group, 0)
            assert len(state.voters) == 3 and leader not in {m.host for m in state.members}
            await _write(group, range(600, 700), b"b")

            # Refusals change nothing: below three voters. Removing what was
            # removed already is done, not refused (a rerun converges).
            with pytest.raises(ShapeRefused, match="would drop to 2 voters"):
                await asyncio.to_thread(admin.remove_member, 0, "h4")
            before = await asyncio.to_thread(admin.group, 0)
            await asyncio.to_thread(admin.remove_member, 0, leader)
            assert any("nothing to remove" in line for line in lines)
            after = await asyncio.to_thread(admin.group, 0)
            assert len(after.voters) == 3 and after.removed == before.removed

            # Started again as it was, the removed place does not come back.
            group.start(leader)
            assert _wait_exit(group, leader) == 0
            with pytest.raises(ShapeRefused, match="--new"):
                await asyncio.to_thread(admin.restart, admin.cluster.host(leader).worker_address(0))

            # start --new: a new member with a new id, caught up, promoted.
            joined = await asyncio.to_thread(admin.start_new, admin.cluster.host(leader).worker_address(0))
            assert joined[0][0] == 0 and joined[0][1].node_id == 6 and not joined[0][1].learner
            values = await _read(group, range(0, 700))
            assert values == {**{b"k%05d" % i: b"a%d" % i for i in range(600)},
                              **{b"k%05d" % i: b"b%d" % i for i in range(600, 700)}}
            local = await group.execute([get(b"k00650")], host=leader, allow_stale=True)
            assert local.results[0].value == b"b650"
        finally:
            admin.close()
            await group.close_channels()

    asyncio.run(scenario())
