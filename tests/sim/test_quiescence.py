"""Quiescence of an idle group, played step by step (scripted.py): who stops
ticking, what wakes whom, and that nothing else changes. The random
simulation (cluster.py, profile "quiesce") and the broken variants in
test_broken_variants.py cover it under faults."""

from __future__ import annotations

from shardnode.raft import Message, MessageType, StateRole

from .node import NodeParams
from .scripted import ScriptedCluster

QUIESCE_TICKS = 5


def _quiet_group() -> ScriptedCluster:
    """Three nodes, n1 leading, one entry committed everywhere, then idle until quiesced."""
    cluster = ScriptedCluster(3, NodeParams(election_tick=10, heartbeat_tick=1, max_inflight_msgs=256,
                                            quiesce_ticks=QUIESCE_TICKS), bind=True)
    cluster.elect(1)
    cluster.deliver_all()
    cluster.propose(1, b"k", b"v")
    cluster.deliver_all()
    # The incarnations are bound first (the driver's proposals), then QUIESCE_TICKS idle ticks.
    _tick_until_quiesced(cluster)
    return cluster


def _tick_until_quiesced(cluster: ScriptedCluster) -> None:
    # QUIESCE_TICKS idle ticks, and the followers' acknowledgements of the
    # last heartbeat window (a follower not heard from lately delays it).
    for _ in range(3 * QUIESCE_TICKS + 10):
        cluster.tick_all()
        if all(_quiesced(cluster).values()):
            return


def _quiesced(cluster: ScriptedCluster) -> dict[int, bool]:
    return {i: n.rawnode.quiesced for i, n in cluster.nodes.items()}


def test_an_idle_group_quiesces_and_then_sends_nothing() -> None:
    cluster = _quiet_group()
    assert _quiesced(cluster) == {1: True, 2: True, 3: True}, "\n".join(cluster.transcript[-30:])
    # Many election timeouts of ticks: no message, no election, same leader and term.
    term = cluster.term(1)
    for _ in range(50):
        cluster.tick_all()
        assert not cluster.queue
    assert cluster.leader() == 1 and cluster.term(1) == term


def test_a_proposal_wakes_the_group_and_commits() -> None:
    cluster = _quiet_group()
    index = cluster.propose(1, b"k", b"w")
    assert not cluster[1].rawnode.quiesced
    cluster.deliver_all()
    assert cluster[1].rawnode.raft.log.committed >= index
    assert not any(_quiesced(cluster).values()), "an append woke the followers"
    cluster.tick_all()          # the followers learn the commit index from the next heartbeat
    assert all(n.rawnode.raft.log.committed >= index for n in cluster.nodes.values())
    _tick_until_quiesced(cluster)
    assert all(_quiesced(cluster).values()), "idle again: quiesced again"


def test_a_read_at_a_follower_wakes_it_and_its_leader() -> None:
    cluster = _quiet_group()
    cluster.step(2, lambda n: n.rawnode.read_index(b"read-1"), "read index")
    assert not cluster[2].rawnode.quiesced
    cluster.deliver_all()
    assert not cluster[1].rawnode.quiesced
    assert (2, b"read-1") in cluster.reads_done, "\n".join(cluster.transcript[-20:])


def test_a_follower_that_lacks_the_last_entry_does_not_quiesce_and_wakes_the_leader() -> None:
    cluster = ScriptedCluster(3, NodeParams(election_tick=10, heartbeat_tick=1, max_inflight_msgs=256,
                                            quiesce_ticks=QUIESCE_TICKS), bind=True)
    cluster.elect(1)
    cluster.deliver_all()
    cluster.propose(1, b"k", b"v")
    cluster.deliver_all()
    # The leader quiesces, but n3 is handed a QUIESCE naming an entry it does not hold
    # (as if it had lost it): it must not quiesce, and must ask the leader.
    raft = cluster[1].rawnode.raft
    fake = raft.log.last_index() + 5
    cluster.step(3, lambda n: n.rawnode.step(_quiesce(1, 3, raft.term, fake, raft.term)), "a QUIESCE beyond its log")
    assert not cluster[3].rawnode.quiesced
    assert [m.type for m in cluster.queue] == [MessageType.HEARTBEAT_RESP]


def test_the_leaders_link_failing_wakes_a_follower_and_a_new_leader_is_elected() -> None:
    cluster = _quiet_group()
    cluster.crash(1)
    # Another peer's link failing changes nothing for n2; its leader's does.
    cluster.step(2, lambda n: n.rawnode.report_unreachable(3), "n3 unreachable")
    assert cluster[2].rawnode.quiesced
    cluster.step(2, lambda n: n.rawnode.report_unreachable(1), "its leader unreachable")
    assert not cluster[2].rawnode.quiesced
    for _ in range(60):
        cluster.tick_all()
        if cluster.leader() in (2, 3):
            break
    assert cluster.leader() in (2, 3), "\n".join(cluster.transcript[-40:])
    assert cluster[cluster.leader()].rawnode.raft.role is StateRole.LEADER


def test_a_campaign_wakes_a_quiesced_follower_which_wakes_its_leader() -> None:
    cluster = _quiet_group()
    raft3 = cluster[3].rawnode.raft
    # n3 (cut off from the leader, say) campaigns: n2 wakes, ignores it (its leader's
    # lease holds), and tells n1, which wakes and heartbeats: n3 rejoins, no new term.
    cluster.step(3, lambda n: n.rawnode.campaign(), "campaign")
    term = cluster.term(1)
    cluster.deliver_all()
    assert cluster.leader() == 1 and cluster.term(1) == term
    assert not cluster[1].rawnode.quiesced
    assert raft3.role is StateRole.FOLLOWER and raft3.lead == 1


def _quiesce(sender: int, to: int, term: int, index: int, log_term: int) -> Message:
    return Message(MessageType.QUIESCE, to=to, from_=sender, term=term, index=index, log_term=log_term, commit=index)
