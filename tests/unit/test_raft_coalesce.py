"""One Ready's redundant messages are folded (shardnode/raft/coalesce.py)."""

import random

from shardnode.raft import Config, ConfState, Entry, MemoryStorage, Message, MessageType, RawNode, StateRole
from shardnode.raft.coalesce import coalesce

MT = MessageType


def _app(to: int, index: int, entries: int, commit: int, term: int = 2) -> Message:
    return Message(MT.APP, to=to, from_=1, term=term, log_term=term, index=index,
                   entries=tuple(Entry(term, index + 1 + i, b"x") for i in range(entries)), commit=commit)


def test_appends_that_continue_each_other_become_one() -> None:
    out = coalesce([_app(2, 10, 2, 9), _app(3, 10, 2, 9), _app(2, 12, 1, 10), _app(2, 13, 0, 11)], 1 << 20)
    assert [(m.to, m.index, [e.index for e in m.entries], m.commit) for m in out] == [
        (2, 10, [11, 12, 13], 11), (3, 10, [11, 12], 9)]


def test_appends_that_do_not_continue_or_exceed_the_size_stay_apart() -> None:
    gap = [_app(2, 10, 2, 9), _app(2, 13, 1, 9)]
    assert coalesce(gap, 1 << 20) == gap
    other_term = [_app(2, 10, 2, 9), _app(2, 12, 1, 9, term=3)]
    assert coalesce(other_term, 1 << 20) == other_term
    big = [_app(2, 10, 2, 9), _app(2, 12, 2, 9)]
    assert coalesce(big, 3 * 17) == big          # 4 entries of 17 bytes: over the limit
    assert len(coalesce(big, 4 * 17)) == 1


def test_only_the_furthest_acknowledgement_and_the_last_heartbeat_remain() -> None:
    def ack(index: int, reject: bool = False) -> Message:
        return Message(MT.APP_RESP, to=1, from_=2, term=2, index=index, reject=reject)

    def beat(context: bytes, mtype: MessageType = MT.HEARTBEAT) -> Message:
        return Message(mtype, to=2, from_=1, term=2, context=context)

    assert coalesce([ack(5), ack(7), ack(9)], 1 << 20) == [ack(9)]
    assert coalesce([ack(9), ack(7)], 1 << 20) == [ack(9), ack(7)]        # a lower one is not covered
    assert coalesce([ack(5), ack(3, reject=True), ack(9)], 1 << 20) == [ack(3, reject=True), ack(9)]
    assert coalesce([beat(b"a"), beat(b"b")], 1 << 20) == [beat(b"b")]
    assert coalesce([beat(b"a"), beat(b"")], 1 << 20) == [beat(b"a"), beat(b"")]  # the read context stays
    responses = [beat(b"a", MT.HEARTBEAT_RESP), beat(b"b", MT.HEARTBEAT_RESP)]
    assert coalesce(responses, 1 << 20) == responses[1:]
    # A response that wakes a quiesced leader (reject) is not folded into a plain one after it.
    wake = Message(MT.HEARTBEAT_RESP, to=1, from_=2, term=2, reject=True)
    plain = Message(MT.HEARTBEAT_RESP, to=1, from_=2, term=2)
    assert coalesce([wake, plain], 1 << 20) == [wake, plain]
    assert coalesce([plain, wake], 1 << 20) == [wake]


def _cluster() -> tuple[dict[int, RawNode], dict[int, MemoryStorage]]:
    storages = {i: MemoryStorage(ConfState(voters=(1, 2, 3))) for i in (1, 2, 3)}
    nodes = {i: RawNode(Config(id=i), storages[i], random.Random(i)) for i in (1, 2, 3)}
    return nodes, storages


def _run(nodes, storages, node_id: int) -> list[Message]:
    ready = nodes[node_id].ready()
    storages[node_id].append(ready.entries)
    if ready.hard_state is not None:
        storages[node_id].set_hard_state(ready.hard_state)
    nodes[node_id].advance(ready)
    return ready.messages


def _settle(nodes, storages) -> None:
    while any(node.has_ready() for node in nodes.values()):
        for node_id, node in nodes.items():
            if node.has_ready():
                for message in _run(nodes, storages, node_id):
                    nodes[message.to].step(message)


def test_a_ready_carries_one_append_per_follower_and_one_answer_back() -> None:
    nodes, storages = _cluster()
    nodes[1].campaign()
    _settle(nodes, storages)
    assert nodes[1].status().role is StateRole.LEADER
    for i in range(5):
        nodes[1].propose(b"p%d" % i)
    for i in range(3):
        nodes[1].read_index(b"r%d" % i)
    messages = _run(nodes, storages, 1)
    appends = [m for m in messages if m.type is MT.APP]
    assert sorted(m.to for m in appends) == [2, 3]
    assert all(len(m.entries) == 5 for m in appends)
    beats = [m for m in messages if m.type is MT.HEARTBEAT]
    assert sorted(m.to for m in beats) == [2, 3] and {m.context for m in beats} == {b"r2"}
    for message in messages:
        if message.to == 2:
            nodes[2].step(message)
    answers = _run(nodes, storages, 2)
    assert sorted(m.type.name for m in answers) == ["APP_RESP", "HEARTBEAT_RESP"]
    for message in answers:
        nodes[1].step(message)
    # One follower's answer (with the leader) is a quorum: the entries
    # commit, and the last read context releases every read queued before it.
    ready = nodes[1].ready()
    assert [e.data for e in ready.committed_entries][-5:] == [b"p%d" % i for i in range(5)]
    assert [r.request_context for r in ready.read_states] == [b"r0", b"r1", b"r2"]
