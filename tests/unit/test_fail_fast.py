"""Fail fast (issue 23, point 7): when a router's forwarder answers NoQuorum
at once, and when it waits (shardnode/routing/forwarder.py, no_quorum_now)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from shardnode.config import ClusterConfig
from shardnode.errors import NoQuorum
from shardnode.proto import worker_pb2 as wpb
from shardnode.routing.forwarder import ChannelPool, GroupForwarder
from shardnode.routing.monitor import GroupView

ROOT = Path(__file__).resolve().parents[2]


def view(forwarder: GroupForwarder, up: int, *, unprobed: bool = False, leader: bool = True) -> GroupView:
    """A probe in which the first `up` replicas answer (the first leads)."""
    answers = tuple((wpb.StatusResponse(role="leader" if i == 0 and leader else "follower", term=2) if i < up
                     else None) for i in range(len(forwarder.members)))
    return GroupView(forwarder.group, forwarder.members, answers, time.monotonic(), unprobed=unprobed)


@pytest.fixture
def forwarder() -> GroupForwarder:
    cluster = ClusterConfig.load(ROOT / "etc" / "cluster.toml")       # 5 replicas per group
    return GroupForwarder(cluster, 0, ChannelPool(), "host1")


def test_a_group_seen_without_a_majority_twice_is_answered_at_once(forwarder: GroupForwarder) -> None:
    async def scenario() -> None:
        forwarder.observe(view(forwarder, 5))                    # it had a quorum
        forwarder.observe(view(forwarder, 2))
        assert not forwarder.no_quorum_now()                     # one probe is not enough
        forwarder.observe(view(forwarder, 2))
        assert forwarder.no_quorum_now()
        began = time.monotonic()
        future = forwarder.enqueue(wpb.Operation(kind=wpb.Operation.GET, key=b"k"), time.monotonic() + 10,
                                   wait_for_quorum=False)
        with pytest.raises(NoQuorum, match=r"^no quorum in group 0: 3 of 5 replicas unreachable .*answered at once"):
            await future
        assert time.monotonic() - began < 0.5
        # A caller that waits is queued (answered at its deadline, or once the group is back).
        waiting = forwarder.enqueue(wpb.Operation(kind=wpb.Operation.GET, key=b"k"), time.monotonic() + 0.3,
                                    wait_for_quorum=True)
        assert not waiting.done()
        with pytest.raises(NoQuorum, match="no quorum in group 0"):
            await waiting
        assert time.monotonic() - began >= 0.3
        # The group is back: no more failing fast.
        forwarder.observe(view(forwarder, 3))
        assert not forwarder.no_quorum_now()

    asyncio.run(scenario())


def test_operations_already_waiting_are_answered_when_the_majority_is_seen_gone(forwarder: GroupForwarder) -> None:
    async def scenario() -> None:
        forwarder.observe(view(forwarder, 5))
        fast = forwarder.enqueue(wpb.Operation(kind=wpb.Operation.GET, key=b"k"), time.monotonic() + 10,
                                 wait_for_quorum=False)
        patient = forwarder.enqueue(wpb.Operation(kind=wpb.Operation.GET, key=b"k"), time.monotonic() + 10,
                                    wait_for_quorum=True)
        forwarder.observe(view(forwarder, 1))
        forwarder.observe(view(forwarder, 1))
        assert fast.done() and isinstance(fast.exception(), NoQuorum)
        assert not patient.done()
        patient.cancel()

    asyncio.run(scenario())


def test_no_failing_fast_before_the_group_was_seen_with_a_quorum_or_on_an_unprobed_view(
        forwarder: GroupForwarder) -> None:
    # A router that starts with the cluster: its connections to the workers
    # come up after a back-off, and its first probes find nobody.
    forwarder.observe(view(forwarder, 0))
    forwarder.observe(view(forwarder, 0))
    forwarder.observe(view(forwarder, 0))
    assert not forwarder.no_quorum_now()
    # A majority up without a leader (an election) is waited for.
    forwarder.observe(view(forwarder, 3, leader=False))
    forwarder.observe(view(forwarder, 3, leader=False))
    assert not forwarder.no_quorum_now()


def test_a_call_that_succeeded_since_outweighs_the_probes(forwarder: GroupForwarder) -> None:
    forwarder.observe(view(forwarder, 5))
    forwarder.observe(view(forwarder, 1))
    forwarder._last_ok = time.monotonic()       # the leader answered OK after that probe (a slow probe, not an outage)
    forwarder.observe(view(forwarder, 1))
    assert not forwarder.no_quorum_now()
    # An unprobed view (a group just added, no probe yet) never counts.
    fresh = GroupForwarder(forwarder.cluster, 1, ChannelPool(), "host1")
    fresh._served = True
    fresh.observe(view(fresh, 0, unprobed=True))
    fresh.observe(view(fresh, 0, unprobed=True))
    assert not fresh.no_quorum_now()
