"""Fencing tokens and the guarded compare-and-set (storage/fencing.py,
replica/shape_policy.py): what lets one scheduler at a time change the
cluster's shape, and a deposed one change nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardnode.keyspace import SPACE, KeyRange, RangeSet
from shardnode.raft import ConfChange, ConfState, Entry, EntryType, HardState
from shardnode.replica import shape_policy
from shardnode.storage import Command, CommandError, CommandOp, ReplicaStore, decode_command, encode_command
from shardnode.storage import fencing
from shardnode.storage.ownership import ShardState
from shardnode.storage.shard_commands import ShardCommand, ShardOp, ShardResult, shard_command_from_fields

import msgpack

EVERYTHING = RangeSet([KeyRange(0, SPACE)])


class Log:
    def __init__(self, store: ReplicaStore) -> None:
        self.store = store
        self.index = 0

    def apply(self, data: bytes, entry_type: EntryType = EntryType.NORMAL):  # type: ignore[no-untyped-def]
        self.index += 1
        entry = Entry(1, self.index, data, entry_type)
        self.store.persist(HardState(1, 1, self.index), [entry])
        (result,) = self.store.apply([entry])
        return result

    def cas(self, key: bytes, expected: bytes | None, value: bytes, guards=(), client_id: int = 7,  # type: ignore[no-untyped-def]
            sequence: int = 1):
        return self.apply(encode_command(Command(CommandOp.CAS, key, value, client_id, sequence, 1_000,
                                                 expected=expected, guards=guards)))


@pytest.fixture
def log(tmp_path: Path) -> Log:
    store = ReplicaStore.open(tmp_path / "db", initial_voters=(1,), node_id=1)
    store.configure_ownership(None)
    yield Log(store)
    store.close()


def test_guarded_cas_writes_only_while_every_guard_holds(log: Log) -> None:
    log.cas(b"lease", None, b"A/1", sequence=1)
    held = log.cas(b"moves", None, b"m1", guards=((b"lease", b"A/1"),), sequence=2)
    assert held.swapped and log.store.get(b"moves") == b"m1"
    log.cas(b"lease", b"A/1", b"B/2", client_id=8, sequence=1)           # B takes the lease over
    stale = log.cas(b"moves", b"m1", b"m2", guards=((b"lease", b"A/1"),), sequence=3)
    assert not stale.swapped and log.store.get(b"moves") == b"m1"
    absent_guard = log.cas(b"other", None, b"x", guards=((b"nobody", None),), sequence=4)
    assert absent_guard.swapped


def test_a_retried_guarded_cas_gets_its_original_answer(log: Log) -> None:
    log.cas(b"lease", None, b"B/2", client_id=8)
    first = log.cas(b"k", None, b"v", guards=((b"lease", b"A/1"),), sequence=5)
    assert not first.swapped
    # The key still holds what the CAS expected: only the session knows the guard failed.
    retry = log.cas(b"k", None, b"v", guards=((b"lease", b"A/1"),), sequence=5)
    assert retry.duplicate and not retry.swapped


def test_guards_travel_and_are_validated() -> None:
    command = Command(CommandOp.CAS, b"k", b"v", 1, 1, 1, expected=b"old", guards=((b"g", None), (b"h", b"x")))
    assert decode_command(encode_command(command)) == command
    plain = Command(CommandOp.CAS, b"k", b"v", 1, 1, 1, expected=None)
    assert decode_command(encode_command(plain)).guards == ()
    with pytest.raises(CommandError):
        Command(CommandOp.PUT, b"k", b"v", 1, 1, 1, guards=((b"g", None),))
    with pytest.raises(CommandError):
        Command(CommandOp.CAS, b"k", b"v", 1, 1, 1, guards=((b"", None),))
    bad = msgpack.packb((1, 3, b"k", b"v", 1, 1, 1, None, [[b"g"]]), use_bin_type=True)
    with pytest.raises(CommandError):
        decode_command(bad)


def test_shard_commands_carry_their_token() -> None:
    command = ShardCommand(ShardOp.EXPORT_FREEZE, 9, fence=41)
    fields = msgpack.unpackb(command.encode(), use_list=False, raw=False)
    assert shard_command_from_fields(fields) == command
    unfenced = ShardCommand(ShardOp.EXPORT_FREEZE, 9)
    assert len(msgpack.unpackb(unfenced.encode())) == 4       # the old shape, for old logs and tools
    with pytest.raises(CommandError):
        shard_command_from_fields(fields[:4] + (-1,))


def test_a_smaller_token_is_refused_at_apply_and_changes_nothing(tmp_path: Path) -> None:
    store = ReplicaStore.open(tmp_path / "db", initial_voters=(1,), node_id=1)
    store.configure_ownership(RangeSet([KeyRange(0, SPACE // 2)]))
    log = Log(store)
    try:
        upper = RangeSet([KeyRange(SPACE // 2, SPACE)])
        assert log.apply(ShardCommand(ShardOp.FENCE, 5, fence=5).encode()).ok
        assert store.shard_state.fence == 5
        before = store.shard_state
        zombie = log.apply(ShardCommand(ShardOp.IMPORT_BEGIN, 3, peer=1, ranges=upper, fence=4).encode())
        assert isinstance(zombie, ShardResult) and not zombie.ok and "superseded" in zombie.message
        assert store.shard_state == before
        unfenced = log.apply(ShardCommand(ShardOp.IMPORT_BEGIN, 3, peer=1, ranges=upper).encode())
        assert not unfenced.ok
        current = log.apply(ShardCommand(ShardOp.IMPORT_BEGIN, 3, peer=1, ranges=upper, fence=5).encode())
        assert current.ok and 3 in store.shard_state.imports
        newer = log.apply(ShardCommand(ShardOp.IMPORT_ABORT, 3, fence=6).encode())
        assert newer.ok and store.shard_state.fence == 6
    finally:
        store.close()
    reopened = ReplicaStore.open(tmp_path / "db")
    try:
        assert reopened.shard_state.fence == 6              # durable, and in every snapshot (shard column family)
    finally:
        reopened.close()


def test_membership_changes_are_fenced_by_the_same_token(log: Log) -> None:
    fenced = ConfChange.add_learner(4, "h4", "a:4")
    fenced = ConfChange(fenced.type, 4, fencing.conf_change_context(9), "h4", "a:4")
    assert log.store.admits_conf_change(fenced.encode())
    log.apply(fenced.encode(), EntryType.CONF_CHANGE)           # applying the entry raises the group's token
    assert log.store.shard_state.fence == 9
    stale = ConfChange(fenced.type, 5, fencing.conf_change_context(8), "h5", "a:5")
    assert not log.store.admits_conf_change(stale.encode())
    assert not log.store.admits_conf_change(ConfChange.remove(2).encode())        # unfenced, after a token
    assert log.store.admits_conf_change(ConfChange.promote(4).encode())           # the leader's own promotion
    assert log.store.admits_conf_change(ConfChange.bind(4, 77).encode())          # the leader's own binding
    assert fencing.conf_change_fence(b"garbage") == 0


def test_shard_state_of_the_first_format_reads_as_unfenced() -> None:
    old = msgpack.packb((1, None, 3, {}, {}, [7]), use_bin_type=True)
    state = ShardState.decode(old)
    assert state.fence == 0 and state.completed == (7,) and state.version == 3
    assert ShardState.decode(ShardState(owned=None, fence=12).encode()).fence == 12


# --- The leader's shape policy -----------------------------------------------------------------


def conf(voters: tuple[int, ...], learners: tuple[int, ...] = ()) -> ConfState:
    return ConfState(voters=voters, learners=learners)


def test_a_removal_never_leaves_fewer_than_three_voters() -> None:
    assert shape_policy.check(conf((1, 2, 3, 4)), ConfChange.remove(4), 1, {1, 2, 3, 4}) is None
    problem = shape_policy.check(conf((1, 2, 3)), ConfChange.remove(3), 1, {1, 2, 3})
    assert problem is not None and "drop to 2 voters" in problem
    assert shape_policy.check(conf((1, 2, 3), (4,)), ConfChange.remove(4), 1, {1}) is None   # a learner


def test_a_change_keeps_a_live_majority() -> None:
    problem = shape_policy.check(conf((1, 2, 3, 4, 5)), ConfChange.remove(5), 1, {1, 2})
    assert problem is not None and "live majority" in problem and "3, 4" in problem
    assert shape_policy.check(conf((1, 2, 3, 4, 5)), ConfChange.remove(5), 1, {2, 3}) is None
    problem = shape_policy.check(conf((1, 2, 3), (4,)), ConfChange.promote(4), 1, {4})
    assert problem is not None and "live majority" in problem


def test_a_change_decided_on_another_configuration_is_refused() -> None:
    current = conf((1, 2, 3, 4), (6,))
    assert shape_policy.check(current, ConfChange.remove(4), 1, {1, 2, 3, 4}, ((1, 2, 3, 4), (6,))) is None
    problem = shape_policy.check(current, ConfChange.remove(4), 1, {1, 2, 3, 4}, ((1, 2, 3, 4, 5), ()))
    assert problem is not None and "changed meanwhile" in problem
