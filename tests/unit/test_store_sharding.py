"""The state machine's side of moving key space: ownership checked at apply
time, the shard commands (idempotent, refusals change nothing), the export's
dirty set, and a snapshot carrying all of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shardnode.raft import Entry, HardState
from shardnode.placement.shard_map import SPACE, KeyRange, RangeSet, stable_hash
from shardnode.storage import Command, CommandOp, ReplicaStore, encode_command
from shardnode.storage.ownership import ShardState
from shardnode.storage.shard_commands import ShardCommand, ShardOp, ShardResult

LOW = RangeSet([KeyRange(0, SPACE // 2)])
HIGH = RangeSet([KeyRange(SPACE // 2, SPACE)])
MOVE = 77


def keys_in(ranges: RangeSet, count: int, prefix: bytes = b"k") -> list[bytes]:
    found, i = [], 0
    while len(found) < count:
        key = prefix + b"%d" % i
        if stable_hash(key) in ranges:
            found.append(key)
        i += 1
    return found


class Group:
    """One group's state machine, fed entries in log order."""

    def __init__(self, store: ReplicaStore) -> None:
        self.store = store
        self.index = store.applied_index

    def apply(self, data: bytes):  # type: ignore[no-untyped-def]
        self.index += 1
        entry = Entry(1, self.index, data)
        self.store.persist(HardState(1, 1, self.index), [entry])
        (result,) = self.store.apply([entry])
        return result

    def put(self, key: bytes, value: bytes, client_id: int = 0, sequence: int = 0):  # type: ignore[no-untyped-def]
        return self.apply(encode_command(Command(CommandOp.PUT, key, value, client_id, sequence, 1_000)))

    def delete(self, key: bytes):  # type: ignore[no-untyped-def]
        return self.apply(encode_command(Command(CommandOp.DELETE, key, None, 0, 0, 1_000)))

    def shard(self, op: ShardOp, **fields: object) -> ShardResult:
        result = self.apply(ShardCommand(op, MOVE, **fields).encode())  # type: ignore[arg-type]
        assert isinstance(result, ShardResult)
        return result


@pytest.fixture
def groups(tmp_path: Path) -> Iterator[Callable[[str, RangeSet], Group]]:
    opened: list[ReplicaStore] = []

    def _open(name: str, owned: RangeSet) -> Group:
        store = ReplicaStore.open(tmp_path / name, initial_voters=(1,))
        store.configure_ownership(owned)
        opened.append(store)
        return Group(store)

    yield _open
    for store in opened:
        store.close()


def test_a_write_to_a_key_the_group_does_not_own_is_refused_at_apply(groups) -> None:  # type: ignore[no-untyped-def]
    group = groups("a", LOW)
    mine, theirs = keys_in(LOW, 1)[0], keys_in(HIGH, 1)[0]
    assert not group.put(mine, b"1").wrong_group
    refused = group.put(theirs, b"1", client_id=5, sequence=1)
    assert refused.wrong_group and not refused.existed
    assert group.store.get(theirs) is None and 5 not in group.store.sessions()
    assert group.store.owns(mine) and not group.store.owns(theirs)


def test_a_whole_move_with_writes_deletes_and_a_retry_across_it(groups) -> None:  # type: ignore[no-untyped-def]
    source, target = groups("s", LOW.union(HIGH)), groups("t", RangeSet())
    moving = keys_in(HIGH, 40)
    staying = keys_in(LOW, 5)
    for key in moving + staying:
        source.put(key, b"old")
    assert target.shard(ShardOp.IMPORT_BEGIN, peer=0, ranges=HIGH).ok
    assert source.shard(ShardOp.EXPORT_BEGIN, peer=1, ranges=HIGH).ok
    # The copy: a scan in pages, while writes go on behind it.
    copied, after = [], None
    while True:
        page, after = source.store.export_scan(HIGH, after, 200)
        copied += page
        if after is None:
            break
    assert {k for k, _ in copied} == set(moving)
    source.put(moving[0], b"new")                         # changed behind the scan
    source.delete(moving[1])                               # deleted behind the scan
    born = keys_in(HIGH, 1, prefix=b"born")[0]
    source.put(born, b"x")                                 # created behind the scan
    retried = source.put(moving[3], b"session-write", client_id=9, sequence=4)
    assert target.shard(ShardOp.INGEST, puts=tuple(copied)).ok
    # Before the freeze, the source serves; after it, it refuses the range.
    assert source.shard(ShardOp.EXPORT_FREEZE).ok
    assert source.put(moving[4], b"late").wrong_group
    assert not source.store.owns(moving[4]) and source.store.owns(staying[0])
    puts, deletes, sessions = source.store.export_delta(MOVE)
    assert (moving[0], b"new") in puts and moving[1] in deletes
    assert any(client == 9 for client, _ in sessions)
    assert target.put(moving[0], b"too early").wrong_group      # importing: not served yet
    assert target.shard(ShardOp.INGEST, puts=tuple(puts), deletes=tuple(deletes), sessions=tuple(sessions)).ok
    assert target.shard(ShardOp.IMPORT_ACTIVATE, epoch=2).ok
    assert source.shard(ShardOp.EXPORT_FINISH, epoch=2).ok
    # The target has the final state: the change, the deletion, the rest.
    assert target.store.get(moving[0]) == b"new"
    assert target.store.get(moving[1]) is None
    assert target.store.get(born) == b"x"
    assert all(target.store.get(k) == b"old" for k in moving[4:])
    assert target.store.get(moving[3]) == b"session-write"
    # A retry of the write applied at the source is answered from the moved session.
    again = target.put(moving[3], b"session-write", client_id=9, sequence=4)
    assert again.duplicate and again.existed == retried.existed and again.old_value == retried.old_value
    # The source forgot the range, kept the rest, and both know the epoch.
    assert all(source.store.get(k) is None for k in moving)
    assert all(source.store.get(k) == b"old" for k in staying)
    assert source.store.shard_state.owned == LOW and target.store.shard_state.owned == HIGH
    assert source.store.shard_state.version == target.store.shard_state.version == 2
    assert [k for k in source.store._engine.shard.view.keys() if k.startswith(b"d")] == []   # dirty marks gone


def test_every_step_is_idempotent_and_refusals_change_nothing(groups) -> None:  # type: ignore[no-untyped-def]
    source, target = groups("s", LOW.union(HIGH)), groups("t", RangeSet())
    key = keys_in(HIGH, 1)[0]
    source.put(key, b"v")
    for _ in range(2):
        assert target.shard(ShardOp.IMPORT_BEGIN, peer=0, ranges=HIGH).ok
        assert source.shard(ShardOp.EXPORT_BEGIN, peer=1, ranges=HIGH).ok
    assert not source.shard(ShardOp.EXPORT_FINISH, epoch=2).ok       # not frozen: refused
    assert source.store.get(key) == b"v"
    for _ in range(2):
        assert source.shard(ShardOp.EXPORT_FREEZE).ok
    assert not source.shard(ShardOp.EXPORT_ABORT).ok                  # frozen: only forward
    assert target.shard(ShardOp.INGEST, puts=((key, b"v"),)).ok
    for _ in range(2):
        assert target.shard(ShardOp.IMPORT_ACTIVATE, epoch=2).ok
        assert source.shard(ShardOp.EXPORT_FINISH, epoch=2).ok
    # Late repeats of earlier steps, after the move finished, change nothing.
    state_s, state_t = source.store.shard_state, target.store.shard_state
    assert target.shard(ShardOp.IMPORT_BEGIN, peer=0, ranges=HIGH).ok
    assert target.shard(ShardOp.INGEST, puts=((key, b"stale"),)).ok
    assert source.shard(ShardOp.EXPORT_BEGIN, peer=1, ranges=HIGH).ok
    assert source.store.shard_state == state_s and target.store.shard_state == state_t
    assert target.store.get(key) == b"v"


def test_an_aborted_move_leaves_both_groups_as_before(groups) -> None:  # type: ignore[no-untyped-def]
    source, target = groups("s", LOW.union(HIGH)), groups("t", RangeSet())
    key = keys_in(HIGH, 1)[0]
    source.put(key, b"v")
    target.shard(ShardOp.IMPORT_BEGIN, peer=0, ranges=HIGH)
    source.shard(ShardOp.EXPORT_BEGIN, peer=1, ranges=HIGH)
    target.shard(ShardOp.INGEST, puts=((key, b"v"),))
    source.put(key, b"v2")
    assert source.shard(ShardOp.EXPORT_ABORT).ok and target.shard(ShardOp.IMPORT_ABORT).ok
    assert target.store.get(key) is None and source.store.get(key) == b"v2"
    assert source.store.shard_state.exports == {} and target.store.shard_state.imports == {}
    assert not source.put(key, b"v3").wrong_group


def test_refused_shard_commands(groups) -> None:  # type: ignore[no-untyped-def]
    group = groups("a", LOW)
    assert not group.shard(ShardOp.EXPORT_BEGIN, peer=1, ranges=HIGH).ok      # not owned
    assert not group.shard(ShardOp.IMPORT_BEGIN, peer=1, ranges=LOW).ok       # already owned
    assert not group.shard(ShardOp.INGEST, puts=((b"k", b"v"),)).ok          # no import
    assert not group.shard(ShardOp.EXPORT_FREEZE).ok
    assert group.store.shard_state == ShardState(owned=LOW)


def test_ownership_and_the_dirty_set_survive_a_restart_and_travel_in_snapshots(groups, tmp_path) -> None:  # type: ignore[no-untyped-def]
    source = groups("s", LOW.union(HIGH))
    key = keys_in(HIGH, 1)[0]
    source.shard(ShardOp.EXPORT_BEGIN, peer=1, ranges=HIGH)
    source.put(key, b"dirty")
    state = source.store.shard_state
    snapshot = source.store.snapshot()
    receiver = groups("r", RangeSet())
    with source.store.open_snapshot_reader(snapshot.metadata.index, snapshot.metadata.term) as reader:
        staging = receiver.store.begin_snapshot(snapshot.metadata)
        for chunk in reader.chunks(max_bytes=64):
            staging.write(chunk.data)
        staging.finish()
    receiver.store.persist(HardState(1, 0, snapshot.metadata.index), [], snapshot)
    assert receiver.store.shard_state == state
    receiver.index = receiver.store.applied_index
    receiver.shard(ShardOp.EXPORT_FREEZE)
    assert receiver.store.export_delta(MOVE)[0] == [(key, b"dirty")]
    path = source.store.path
    source.store.close()
    reopened = ReplicaStore.open(path)
    try:
        assert reopened.shard_state == state
    finally:
        reopened.close()
