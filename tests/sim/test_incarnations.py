"""Incarnations and notices, one story each (docs/raft.md, "Incarnations"),
with the safety checker watching every step (scripted.py): a member's id is
bound to the life of its store; whatever another life sends under that id is
never counted; a node that is not recognised (removed, or another life) is
told so and never campaigns again."""

from __future__ import annotations

import pytest

from shardnode.raft import (
    ConfChange,
    ConfChangeType,
    InvalidConfChange,
    Message,
    MessageType,
    NoticeReason,
    ProposalDropped,
    StateRole,
)

from .node import NodeParams
from .scripted import ScriptedCluster


def _bound(c: ScriptedCluster, size: int) -> ScriptedCluster:
    """Elect n1 and let it bind every member's incarnation (as the worker's driver does)."""
    c.elect(1)
    c.deliver_all()
    c.tick_all(3)
    conf = c[1].rawnode.conf_state()
    assert dict(conf.incarnations) == {i: c[i].incarnation for i in range(1, size + 1)}, conf
    return c


# --- Removal ---------------------------------------------------------------------------------


def test_a_removed_follower_that_missed_the_commit_learns_it_from_a_notice_and_stops_campaigning() -> None:
    c = ScriptedCluster(3)
    c.elect(1)
    c.deliver_all()
    c.isolate(3)                                  # cut off while the group removes it
    c.change(1, ConfChange.remove(3))
    c.deliver_all()
    c.tick_all(2)
    assert c[1].rawnode.conf_state().voters == (1, 2) and c[3].rawnode.conf_state().voters == (1, 2, 3)
    c.heal()
    # Nobody sends it anything now (it is no member anywhere); it campaigns,
    # and its campaign is answered with a notice instead of silence.
    c.tick(3, 40)
    c.deliver_all()
    notice = c[3].rawnode.notice
    assert notice is not None and notice.reason is NoticeReason.REMOVED, "\n".join(c.transcript[-30:])
    assert c.role(3) is StateRole.FOLLOWER and not c[3].rawnode.raft.promotable()
    queued = len(c.queue)
    c.tick(3, 100)
    assert len(c.queue) == queued, "a node told it was removed never campaigns again"
    assert c.leader() == 1


# --- A lost disk -----------------------------------------------------------------------------


def test_the_leader_binds_its_own_and_every_members_incarnation_once() -> None:
    c = _bound(ScriptedCluster(3, bind=True), 3)
    binds = [e for e in c[1].rawnode.raft.log.slice(1, c[1].rawnode.raft.log.last_index() + 1)
             if e.type.name == "CONF_CHANGE" and ConfChange.decode(e.data).type is ConfChangeType.BIND_INCARNATION]
    assert len(binds) == 3
    assert c[2].rawnode.conf_state() == c[1].rawnode.conf_state() == c[3].rawnode.conf_state()
    assert c[1].rawnode.incarnations_to_bind() == ()
    # The first binding wins: another incarnation for a bound id is refused
    # when proposed, and a no-op if it is committed anyway.
    with pytest.raises(InvalidConfChange, match="already bound"):
        c[1].rawnode.propose_conf_change(ConfChange.bind(2, 12345))
    before = c[2].rawnode.conf_state()
    assert c[2].rawnode.apply_conf_change(ConfChange.bind(2, 12345)) == before


def test_a_wiped_follower_cannot_vote_a_node_without_a_committed_entry_into_leadership() -> None:
    # The reproduction: two followers down, a key acknowledged by the
    # other three, the leader and one follower paused, the third follower's
    # disk wiped and its worker started again, the two down ones back.
    c = _bound(ScriptedCluster(5, NodeParams(election_tick=10, heartbeat_tick=1, max_inflight_msgs=256),
                               bind=True), 5)
    c.crash(4)
    c.crash(5)
    index = c.propose(1, b"k", b"acknowledged")
    c.deliver_all()
    assert c[1].rawnode.raft.log.committed >= index, "acknowledged by n1, n2, n3"
    c.isolate(1)
    c.isolate(2)                                  # paused
    c.crash(3)
    c.wipe(3)
    c.restart(3)                                  # an empty disk under id 3, a new incarnation
    c.restart(4)
    c.restart(5)
    for _ in range(6):
        c.tick_all(10)
    # n3's forgotten vote is not counted: neither n4 nor n5 (without the
    # entry) can win, and n3 was told it is not the life the group bound.
    assert c.leader() in (None, 1), "\n".join(c.transcript[-40:])
    notice = c[3].rawnode.notice
    assert notice is not None and notice.reason is NoticeReason.REINCARNATED
    assert notice.bound_incarnation != c[3].incarnation
    c.heal()
    for _ in range(6):
        c.tick_all(10)
    leader = c.leader()
    assert leader is not None and leader != 3
    assert c[leader].rawnode.raft.log.term(index) == c[1].rawnode.raft.log.term(index), "the entry survived"


def test_a_wiped_learner_is_not_promoted_on_its_old_acknowledgements() -> None:
    c = _bound(ScriptedCluster(3, bind=True), 3)
    c.add_learner(1, 4)
    c.deliver_all()
    c.tick_all(4)
    assert 4 in c[1].rawnode.caught_up_learners() and c[1].rawnode.conf_state().incarnation_of(4)
    c.crash(4)
    c.wipe(4)
    c.restart(4)
    c.tick_all(2)
    assert 4 not in c[1].rawnode.caught_up_learners(), "what the lost disk acknowledged is forgotten"
    progress = c[1].rawnode.status().progress[4]
    assert progress.match == 0 and not progress.recent_active
    with pytest.raises(ProposalDropped, match="not caught up"):
        c[1].rawnode.propose_conf_change(ConfChange.promote(4))
    assert c[4].rawnode.notice is not None and c[4].rawnode.notice.reason is NoticeReason.REINCARNATED


def test_a_node_that_bootstrapped_while_its_group_was_down_is_told_by_the_first_peer() -> None:
    c = _bound(ScriptedCluster(3, bind=True), 3)
    c.propose(1, b"k", b"v")
    c.deliver_all()
    for node_id in (1, 2, 3):
        c.crash(node_id)
    c.wipe(2)
    for node_id in (2, 1, 3):                     # n2 first: nobody answered it
        c.restart(node_id)
    c.tick(2, 30)
    c.deliver_all()
    assert c[2].rawnode.notice is not None and c[2].rawnode.notice.reason is NoticeReason.REINCARNATED
    c.tick_all(30)
    assert c.leader() in (1, 3)


def test_a_notice_for_the_bound_incarnation_itself_changes_nothing() -> None:
    c = _bound(ScriptedCluster(3, bind=True), 3)
    mine = c[2].incarnation
    c.step(2, lambda n: n.rawnode.step(Message(MessageType.NOTICE, to=2, from_=1, index=mine,
                                                context=NoticeReason.REINCARNATED.value.encode())),
           "a notice naming its own incarnation")
    assert c[2].rawnode.notice is None and c[2].rawnode.raft.promotable()
