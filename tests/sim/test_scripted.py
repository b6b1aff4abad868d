"""Hand-written interaction scenarios, each a short story with the safety
checker watching every step (see scripted.py)."""

from __future__ import annotations

import pytest

from shardnode.raft import MessageType, ProposalDropped, StateRole
from shardnode.raft.log import RaftLog

from .invariants import SafetyViolation
from .node import NodeParams
from .scripted import ScriptedCluster


def _no_prevote(**overrides) -> NodeParams:
    params = dict(election_tick=10, heartbeat_tick=1, max_inflight_msgs=1, max_size_per_msg=1,
                  pre_vote=False, check_quorum=False)
    params.update(overrides)
    return NodeParams(**params)


def play_figure_8(c: ScriptedCluster) -> None:
    """Figure 8 of the Raft paper: an entry of an old term, replicated to a
    majority by a later leader, must not count as committed."""
    c.elect(1)                                           # term 1, noop at 1 everywhere
    c.deliver_all()
    c.connect_only({1, 2}, {3}, {4}, {5})
    c.propose(1, b"x", b"old-term")                      # index 2, term 1: only n1, n2
    c.deliver_all()
    c.crash(1)
    c.connect_only({3, 4, 5}, {1}, {2})
    c.campaign(5)                                        # term 2 with votes of n3, n4
    c.deliver_until(lambda: c.role(5) is StateRole.LEADER)
    c.isolate(5)                                         # its entries stay on n5 alone
    c.propose(5, b"x", b"term-2")
    c.deliver_all()
    c.crash(5)
    c.restart(1)
    c.connect_only({1, 2, 3}, {4}, {5})
    c.elect(1)                                           # term 3 with votes of n2, n3
    # n1 walks n3 back and sends it the old entry 2; stop n1 the moment it
    # could count entry 2 (of term 1) as replicated on a majority.
    c.deliver_until(lambda: c[3].rawnode.raft.log.term_or_zero(2) == 1)
    c.queue = [m for m in c.queue if m.type is MessageType.APP_RESP and m.from_ == 3 and m.index == 2]
    c.note("only n3's acknowledgement of entry 2 gets through")
    c.deliver_one()
    c.crash(1)
    c.restart(5)
    c.connect_only({2, 3, 4, 5}, {1})
    c.elect(5)                                           # n5's last term (2) beats n3's and n4's
    c.deliver_all()


def test_figure_8_is_safe() -> None:
    cluster = ScriptedCluster(5, _no_prevote())
    play_figure_8(cluster)
    # Entry 2 of term 1 was never committed; n5's entry of term 2 took its place.
    assert cluster.checker.committed[1].term == 2
    assert cluster[2].rawnode.raft.log.term(2) == 2


def test_figure_8_with_commit_by_counting_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def commit_by_counting(self: RaftLog, index: int, term: int) -> bool:
        if index > self.committed:
            self.commit_to(index)
            return True
        return False

    monkeypatch.setattr(RaftLog, "maybe_commit", commit_by_counting)
    cluster = ScriptedCluster(5, _no_prevote())
    with pytest.raises(SafetyViolation, match="leader completeness|committed entry changed"):
        play_figure_8(cluster)


def _stable_cluster(size: int = 3) -> ScriptedCluster:
    c = ScriptedCluster(size)
    c.elect(1)
    c.deliver_all()
    return c


def test_pre_vote_keeps_a_rejoining_node_from_disrupting_the_leader() -> None:
    c = _stable_cluster(3)
    term = c.term(1)
    c.isolate(3)
    c.tick(3, 50)                                        # would have campaigned many times
    c.deliver_all()
    assert c.term(3) == term, "pre-vote: a cut-off node does not raise its term"
    c.heal()
    c.tick_all(3)
    assert c.leader() == 1 and c.term(1) == term


def test_check_quorum_makes_a_partitioned_leader_step_down() -> None:
    c = _stable_cluster(3)
    c.isolate(1)
    c.tick(1, 25)
    assert c.role(1) is StateRole.FOLLOWER
    with pytest.raises(ProposalDropped):
        c[1].rawnode.propose(b"late")


def test_followers_in_lease_ignore_a_campaign_but_leadership_transfer_wins() -> None:
    c = _stable_cluster(3)
    c.campaign(2)
    c.deliver_all()
    assert c.leader() == 1, "nodes that hear from the leader ignore campaigns"
    c.tick_all(2)                                        # heartbeats bring n2 back to follower
    assert c.role(2) is StateRole.FOLLOWER
    c.step(1, lambda n: n.rawnode.transfer_leader(2), "transfer leadership to n2")
    c.deliver_all()
    assert c.leader() == 2 and c.role(1) is StateRole.FOLLOWER


def test_transfer_to_a_lagging_follower_catches_it_up_first() -> None:
    c = _stable_cluster(3)
    c.isolate(3)
    for i in range(5):
        c.propose(1, b"k", b"v%d" % i)
    c.deliver_all()
    c.heal()
    c.step(1, lambda n: n.rawnode.transfer_leader(3), "transfer leadership to n3")
    with pytest.raises(ProposalDropped, match="transfer"):
        c[1].rawnode.propose(b"during transfer")
    c.deliver_all()
    assert c.leader() == 3
    assert c[3].rawnode.raft.log.committed >= 7


def test_read_index_waits_for_a_heartbeat_round_and_follower_reads_work() -> None:
    c = _stable_cluster(3)
    index = c.propose(1, b"k", b"v")
    c.deliver_all()
    states = []

    def read(node) -> None:
        node.rawnode.read_index(b"ctx-1")

    c.step(1, read, "read_index ctx-1")
    assert not c[1].rawnode.has_ready() or not c[1].rawnode.raft.read_states
    # The read state only appears after a quorum answered the heartbeat.
    original_process = c._process

    def capture(node):
        if node.alive and node.rawnode.raft.read_states:
            states.extend((node.id, rs) for rs in node.rawnode.raft.read_states)
        original_process(node)

    c._process = capture
    c.deliver_all()
    c.step(2, lambda n: n.rawnode.read_index(b"ctx-2"), "follower read_index ctx-2")
    c.deliver_all()
    by_node = {node_id: rs for node_id, rs in states}
    assert by_node[1].request_context == b"ctx-1" and by_node[1].index >= index
    assert by_node[2].request_context == b"ctx-2" and by_node[2].index >= index


def test_read_index_without_a_leader_is_refused() -> None:
    c = ScriptedCluster(3)
    with pytest.raises(ProposalDropped):
        c[1].rawnode.read_index(b"nobody leads")


def test_a_node_behind_the_compacted_log_catches_up_by_snapshot() -> None:
    c = ScriptedCluster(3, NodeParams(election_tick=10, heartbeat_tick=1, compact_threshold=4))
    c.elect(1)
    c.crash(3)
    for i in range(20):
        c.propose(1, b"k%d" % (i % 3), b"v%d" % i)
        c.deliver_all()
    assert c[1].disk.first_index() > 2, "the leader compacted its log"
    c.restart(3)
    c.tick_all(3)
    c.deliver_all()
    assert c[3].disk.snapshot().metadata.index > 0, "n3 installed a snapshot"
    assert c[3].kv == c[1].kv
    assert c[3].applied_index == c[1].applied_index


def test_fast_backtracking_skips_a_whole_divergent_term_per_round_trip() -> None:
    c = _stable_cluster(3)
    c.isolate(1)
    for i in range(30):
        c.propose(1, b"k", b"lost-%d" % i)              # never committed: n1 is alone
    c.deliver_all()
    c.crash(1)
    c.heal()
    for _ in range(30):
        c.tick_all()
        if c.leader() in (2, 3):
            break
    leader = c.leader()
    assert leader in (2, 3)
    for i in range(5):
        c.propose(leader, b"k", b"kept-%d" % i)
    c.deliver_all()
    c.restart(1)
    c.heal()
    rejects_before = sum(1 for line in c.transcript if "REJECT" in line)
    c.tick_all(3)
    c.deliver_all()
    rejects = sum(1 for line in c.transcript if "REJECT" in line) - rejects_before
    assert c[1].rawnode.raft.log.committed == c[leader].rawnode.raft.log.committed
    assert rejects <= 3, f"{rejects} rejections to find the divergence point of 30 entries"


def test_a_single_node_group_commits_alone() -> None:
    c = ScriptedCluster(1)
    c.elect(1)
    index = c.propose(1, b"k", b"v")
    assert c[1].applied_index == index
