import random

import pytest

from shardnode.raft import (
    ConfChange,
    ConfChangeType,
    Config,
    ConfigError,
    ConfState,
    EntryType,
    MemoryStorage,
    Message,
    MessageType,
    ProposalDropped,
    RaftError,
    RawNode,
    StateRole,
)


def _single() -> tuple[RawNode, MemoryStorage]:
    storage = MemoryStorage(ConfState(voters=(1,)))
    return RawNode(Config(id=1), storage, random.Random(1)), storage


def _persist(node: RawNode, storage: MemoryStorage):
    ready = node.ready()
    if ready.snapshot is not None:
        storage.apply_snapshot(ready.snapshot)
    storage.append(ready.entries)
    if ready.hard_state is not None:
        storage.set_hard_state(ready.hard_state)
    node.advance(ready)
    return ready


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="id"):
        Config(id=0)
    with pytest.raises(ConfigError, match="election_tick"):
        Config(id=1, election_tick=2, heartbeat_tick=2)


def test_single_node_commits_only_after_its_own_persist() -> None:
    node, storage = _single()
    node.campaign()
    _persist(node, storage)
    assert node.status().role is StateRole.LEADER
    proposal = node.propose(b"hello")
    ready = node.ready()
    assert [e.data for e in ready.entries] == [b"hello"]
    assert not any(e.data == b"hello" for e in ready.committed_entries), "not durable yet"
    storage.append(ready.entries)
    node.advance(ready)
    ready = _persist(node, storage)
    assert [e.index for e in ready.committed_entries][-1] == proposal.index


def test_ready_contract_is_enforced() -> None:
    node, storage = _single()
    node.campaign()
    ready = node.ready()
    with pytest.raises(RaftError):
        node.ready()
    assert not node.has_ready(), "nothing new while a Ready is outstanding"
    storage.append(ready.entries)
    node.advance(ready)
    with pytest.raises(RaftError):
        node.advance(ready)


def test_local_messages_cannot_come_from_peers() -> None:
    node, _ = _single()
    with pytest.raises(RaftError, match="local"):
        node.step(Message(MessageType.HUP, from_=2, to=1))


def test_follower_refuses_proposals_with_a_leader_hint() -> None:
    storage = MemoryStorage(ConfState(voters=(1, 2, 3)))
    node = RawNode(Config(id=2), storage, random.Random(2))
    node.step(Message(MessageType.HEARTBEAT, from_=1, to=2, term=1))
    with pytest.raises(ProposalDropped) as info:
        node.propose(b"x")
    assert info.value.leader == 1


def test_only_one_membership_change_at_a_time() -> None:
    node, storage = _single()
    node.campaign()
    _persist(node, storage)
    _persist(node, storage)
    node.propose_conf_change(ConfChange.add_learner(2, "host2", "127.0.0.2:1"))
    with pytest.raises(ProposalDropped, match="membership"):
        node.propose_conf_change(ConfChange.add_learner(3))
    ready = _persist(node, storage)
    while node.has_ready():
        ready = _persist(node, storage)
    change = [e for e in ready.committed_entries if e.type is EntryType.CONF_CHANGE]
    conf = node.apply_conf_change(ConfChange.decode(change[0].data)) if change else None
    assert conf is not None and conf.voters == (1,) and conf.learners == (2,)
    assert conf.member(2) is not None and conf.member(2).address == "127.0.0.2:1"
    node.propose_conf_change(ConfChange.add_learner(3))   # allowed now


def test_conf_change_encoding_round_trips_and_rejects_garbage() -> None:
    change = ConfChange(ConfChangeType.REMOVE_NODE, 7, b"ctx")
    assert ConfChange.decode(change.encode()) == change
    added = ConfChange.add_learner(9, "host9", "10.0.0.9:50100")
    assert ConfChange.decode(added.encode()) == added
    # The first encoding (type byte, 8-byte id, context) still decodes.
    legacy = bytes([2]) + (9).to_bytes(8, "big") + b"ctx"
    assert ConfChange.decode(legacy) == ConfChange(ConfChangeType.ADD_LEARNER_NODE, 9, b"ctx")
    for garbage in (b"", b"\x81", b"\x81\x93\x00\x01\x02", b"\x07" + bytes(8)):
        with pytest.raises(ValueError):
            ConfChange.decode(garbage)
    with pytest.raises(ValueError):
        ConfChange.decode(b"\x00")
