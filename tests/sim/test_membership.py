"""Membership changes, one story each, with the safety checker watching every
step (see scripted.py). The random simulation covers the same ground under
faults; these pin down each rule of docs/raft.md "Membership"."""

from __future__ import annotations

import random

import pytest

from shardnode.raft import (
    ConfChange,
    ConfState,
    Config,
    Entry,
    EntryType,
    InvalidConfChange,
    MemoryStorage,
    Message,
    MessageType,
    ProposalDropped,
    RawNode,
    StateRole,
    confchange,
)
from shardnode.raft.raft import Raft
from shardnode.raft.tracker import Progress, ProgressState

from .node import NodeParams
from .scripted import ScriptedCluster


def _stable(size: int = 3, **params) -> ScriptedCluster:
    c = ScriptedCluster(size, NodeParams(election_tick=10, heartbeat_tick=1, **params) if params else None)
    c.elect(1)
    c.deliver_all()
    return c


def _voters(c: ScriptedCluster, node_id: int) -> tuple[int, ...]:
    return c[node_id].rawnode.conf_state().voters


# --- Joining ---------------------------------------------------------------------------------


def test_a_node_added_after_the_last_snapshot_joins_through_it() -> None:
    c = _stable(3, compact_threshold=4)
    for i in range(12):
        c.propose(1, b"k%d" % (i % 3), b"v%d" % i)
        c.deliver_all()
    stored = c[1].disk.snapshot().metadata
    assert stored.index > 1 and 4 not in stored.conf_state.ids(), "the stored snapshot predates n4"
    c.add_learner(1, 4)
    c.deliver_all()
    c.tick_all(3)
    # The snapshot the leader sent carried its applied configuration, with n4.
    assert c[4].disk.snapshot().metadata.index >= stored.index
    assert 4 in c[4].disk.snapshot().metadata.conf_state.learners
    assert c[4].kv == c[1].kv and c[4].applied_index == c[1].applied_index
    assert 4 in c[1].rawnode.caught_up_learners()
    c.change(1, ConfChange.promote(4))
    c.deliver_all()
    c.tick_all(2)
    assert all(_voters(c, i) == (1, 2, 3, 4) for i in (1, 2, 3, 4))


def test_without_the_applied_configuration_in_the_snapshot_the_new_node_never_joins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The issue as first found: the leader sends the stored snapshot, whose
    # configuration predates n4, and n4 refuses it again and again.
    monkeypatch.setattr(Raft, "_maybe_send_snapshot", _send_stored_snapshot)
    c = _stable(3, compact_threshold=4)
    for i in range(12):
        c.propose(1, b"k%d" % (i % 3), b"v%d" % i)
        c.deliver_all()
    c.add_learner(1, 4)
    c.deliver_all()
    c.tick_all(10)
    assert c[4].applied_index == 0 and c[4].disk.snapshot().metadata.index == 0
    assert 4 not in c[1].rawnode.caught_up_learners()


def _send_stored_snapshot(self: Raft, to: int, progress) -> bool:
    snapshot = self.log.snapshot()
    progress.become_snapshot(snapshot.metadata.index)
    self._send(Message(MessageType.SNAP, to=to, from_=self.id, term=self.term, snapshot=snapshot))
    return True


def test_a_learner_is_replicated_to_but_never_votes_or_counts() -> None:
    c = _stable(3)
    c.add_learner(1, 4)
    c.deliver_all()
    c.crash(2)
    c.crash(3)
    index = c.propose(1, b"k", b"v")
    c.deliver_all()
    assert c[4].rawnode.raft.log.last_index() >= index, "the learner receives the log"
    assert c[1].rawnode.raft.log.committed < index, "a learner's acknowledgement does not commit"
    c.tick(4, 100)
    assert c.role(4) is StateRole.FOLLOWER, "a learner never campaigns"


# --- Promotion -------------------------------------------------------------------------------


def test_catch_up_is_a_threshold_not_equality() -> None:
    progress = Progress(next_index=100, max_inflight=4, is_learner=True)
    progress.match, progress.recent_active = 995, True
    progress.become_replicate()
    assert confchange.learner_caught_up(progress, commit=1000), "5 behind of 1000: close enough"
    progress.match = 850
    assert not confchange.learner_caught_up(progress, commit=1000)
    progress.match = 995
    progress.state = ProgressState.SNAPSHOT
    assert not confchange.learner_caught_up(progress, commit=1000), "still waiting for a snapshot"
    progress.state, progress.recent_active = ProgressState.REPLICATE, False
    assert not confchange.learner_caught_up(progress, commit=1000), "not heard from lately"
    # Long logs: the allowance is capped, not 10% of a million.
    progress.recent_active = True
    progress.match = 1_000_000 - confchange.LEARNER_CATCH_UP_ENTRIES - 1
    assert not confchange.learner_caught_up(progress, commit=1_000_000)


def test_a_learner_that_has_not_caught_up_is_not_promoted() -> None:
    c = _stable(3)
    c.add_learner(1, 4)
    c.isolate(4)
    for i in range(20):
        c.propose(1, b"k", b"v%d" % i)
    c.deliver_all()
    assert 4 not in c[1].rawnode.caught_up_learners()
    with pytest.raises(ProposalDropped, match="not caught up"):
        c[1].rawnode.propose_conf_change(ConfChange.promote(4))
    c.heal()
    c.tick_all(3)
    assert 4 in c[1].rawnode.caught_up_learners()
    c.change(1, ConfChange.promote(4))


# --- The dissertation's conditions -----------------------------------------------------------


def test_one_change_in_flight_and_none_before_the_leader_applied_an_entry_of_its_term() -> None:
    c = ScriptedCluster(3)
    c.campaign(1)
    c.deliver_until(lambda: c.role(1) is StateRole.LEADER)
    with pytest.raises(ProposalDropped, match="entry of its term"):
        c[1].rawnode.propose_conf_change(ConfChange.add_learner(4))
    c.deliver_all()
    c.add_learner(1, 4)
    with pytest.raises(ProposalDropped, match="still in progress"):
        c[1].rawnode.propose_conf_change(ConfChange.remove(3))
    c.deliver_all()
    c.change(1, ConfChange.remove(3))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (ConfChange.promote(2), "already a voter"),
        (ConfChange.promote(9), "not a learner"),
        (ConfChange.add_learner(2), "already a voter"),
        (ConfChange.remove(9), "not a member"),
        (ConfChange.add_learner(3), "removed"),
        (ConfChange.add_learner(0), "positive"),
    ],
)
def test_invalid_changes_are_refused_and_never_reach_the_log(change: ConfChange, reason: str) -> None:
    c = _stable(3)
    c.change(1, ConfChange.remove(3))
    c.deliver_all()
    last = c[1].rawnode.raft.log.last_index()
    with pytest.raises(InvalidConfChange, match=reason):
        c[1].rawnode.propose_conf_change(change)
    assert c[1].rawnode.raft.log.last_index() == last


def test_the_last_voter_cannot_be_removed() -> None:
    c = ScriptedCluster(1)
    c.elect(1)
    with pytest.raises(InvalidConfChange, match="last voter"):
        c[1].rawnode.propose_conf_change(ConfChange.remove(1))


def test_a_committed_invalid_change_is_a_no_op_on_every_replica() -> None:
    # As if written by an older version: entries the validation would refuse,
    # and one that does not even decode. Every replica applies them as no-ops.
    c = _stable(3)
    before = [c[i].rawnode.conf_state() for i in (1, 2, 3)]
    bad = [ConfChange.promote(9).encode(), ConfChange.remove(9).encode(), b"\x81garbage", b"\x00"]

    def append_raw(node) -> None:
        raft = node.rawnode.raft
        raft._append_entries([Entry(0, 0, data, EntryType.CONF_CHANGE) for data in bad])
        raft._bcast_append()

    c.step(1, append_raw, "append committed-to-be invalid changes")
    c.deliver_all()
    c.tick_all(2)
    assert all(c[i].applied_index == c[1].rawnode.raft.log.committed for i in (1, 2, 3))
    assert [c[i].rawnode.conf_state() for i in (1, 2, 3)] == before
    c.propose(1, b"k", b"still works")
    c.deliver_all()


# --- Removal ---------------------------------------------------------------------------------


def test_a_leader_that_removes_itself_steps_down_and_never_campaigns_again() -> None:
    c = _stable(3)
    term = c.term(1)
    c.change(1, ConfChange.remove(1))
    c.deliver_all()
    assert c.role(1) is StateRole.FOLLOWER and c[1].rawnode.removed
    # It handed over to an up-to-date voter, which campaigned at once.
    assert c.leader() in (2, 3) and c.term(c.leader()) == term + 1
    c.tick(1, 100)
    c.deliver_all()
    assert c.role(1) is StateRole.FOLLOWER
    leader = c.leader()
    c.propose(leader, b"k", b"after removal")
    c.deliver_all()
    assert _voters(c, leader) == (2, 3)


def test_a_removed_node_that_never_learned_it_cannot_disrupt_the_group() -> None:
    c = _stable(3, pre_vote=False, check_quorum=False)
    c.isolate(3)
    c.change(1, ConfChange.remove(3))
    c.deliver_all()
    c.propose(1, b"k", b"v")
    c.deliver_all()
    assert _voters(c, 1) == (1, 2) and _voters(c, 3) == (1, 2, 3), "n3 never heard of its removal"
    c.tick(3, 40)                                       # campaigns at ever higher terms
    assert c.term(3) > c.term(1)
    term = c.term(1)
    c.heal()
    c.deliver_all()
    c.tick_all(5)
    assert c.leader() == 1 and c.term(1) == term, "its votes and appends were dropped, its term ignored"


def test_a_leader_removed_while_transferring_hands_over_first() -> None:
    c = _stable(3)
    c.step(1, lambda n: n.rawnode.transfer_leader(2), "transfer leadership to n2")
    c.deliver_all()
    assert c.leader() == 2
    c.tick_all(1)
    c.change(2, ConfChange.remove(1))
    c.deliver_all()
    assert c[1].rawnode.removed and c.leader() == 2


# --- Joint configurations --------------------------------------------------------------------


def test_a_joint_configuration_from_a_snapshot_does_not_wedge_a_node() -> None:
    # This core never enters a joint configuration; one written by something
    # else is honoured (both majorities) and single-server changes still apply.
    storage = MemoryStorage(ConfState(voters=(1, 2, 3), voters_outgoing=(1, 2, 4)))
    node = RawNode(Config(id=1), storage, random.Random(1))
    conf = node.apply_conf_change(ConfChange.add_learner(5))
    assert conf.voters_outgoing == (1, 2, 4) and conf.learners == (5,)
    conf = node.apply_conf_change(ConfChange.remove(3))
    assert conf.voters == (1, 2) and conf.voters_outgoing == (1, 2, 4)
    # Removing a node only in the outgoing half is refused, as a no-op.
    assert node.apply_conf_change(ConfChange.remove(4)) == conf
    node.campaign()
    node.step(Message(MessageType.PRE_VOTE_RESP, to=1, from_=2, term=1))
    assert node.raft.role is StateRole.CANDIDATE
    node.step(Message(MessageType.VOTE_RESP, to=1, from_=2, term=1))
    assert node.raft.role is StateRole.LEADER, "1 and 2 are a majority of both halves"


# --- When followers learn the commit index (docs/raft.md "Replication") ----------------------


def _committed(c: ScriptedCluster, node_id: int) -> int:
    return c[node_id].rawnode.raft.log.committed


def test_a_write_commit_rides_on_the_next_append_or_heartbeat() -> None:
    c = _stable(3)
    index = c.propose(1, b"k", b"v")
    c.deliver_all()
    assert _committed(c, 1) == index
    # No append carrying only the commit index went out: the followers hold
    # the entry but do not know it is committed yet ...
    assert _committed(c, 2) < index and _committed(c, 3) < index
    c.propose(1, b"k2", b"v2")
    c.deliver_all()
    # ... until the next append (or, at rest, the next heartbeat) brings it.
    assert _committed(c, 2) >= index and _committed(c, 3) >= index
    last = _committed(c, 1)
    c.tick(1)
    c.deliver_all()
    assert _committed(c, 2) == _committed(c, 3) == last


def test_a_removed_member_learns_its_removal_at_once() -> None:
    # The leader stops talking to a member once its removal applies: the
    # commit of a membership change must go out at once, or the removed
    # member would never apply its removal (and never retire).
    c = _stable(3)
    c.change(1, ConfChange.remove(3))
    c.deliver_all()
    assert _voters(c, 1) == (1, 2)
    assert c[3].rawnode.removed, "n3 did not learn that the group removed it"
