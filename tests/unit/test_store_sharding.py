"""The state machine's side of moving key space: ownership checked at apply
time, the shard commands (idempotent, refusals change nothing), the export's
dirty set, and a snapshot carrying all of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shardnode.storage.kv_records import record_value
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
    delta = source.store.export_delta(MOVE)
    puts, deletes, sessions = delta.puts, delta.deletes, delta.sessions
    assert delta.next_after is None
    # Records travel as stored: the value with its etcd metadata (kv_records.py).
    assert (moving[0], b"new") in [(k, record_value(v)) for k, v in puts] and moving[1] in deletes
    assert any(client == 9 for client, _ in sessions)
    assert target.put(moving[0], b"too early").wrong_group      # importing: not served yet
    assert target.shard(ShardOp.INGEST, puts=tuple(puts), deletes=tuple(deletes), sessions=tuple(sessions),
                        delta=True).ok
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
    assert [(k, record_value(v)) for k, v in receiver.store.export_delta(MOVE).puts] == [(key, b"dirty")]
    path = source.store.path
    source.store.close()
    reopened = ReplicaStore.open(path)
    try:
        assert reopened.shard_state == state
    finally:
        reopened.close()


# --- Two runs of one move, aborts, and what a delta carries ----------------------------------


def _begin(source: Group, target: Group, move_id: int = MOVE, ranges: RangeSet = HIGH) -> None:
    assert target.apply(ShardCommand(ShardOp.IMPORT_BEGIN, move_id, peer=0, ranges=ranges).encode()).ok
    assert source.apply(ShardCommand(ShardOp.EXPORT_BEGIN, move_id, peer=1, ranges=ranges).encode()).ok


def _full_delta(store: ReplicaStore, move_id: int = MOVE, max_bytes: int = 1 << 20):  # type: ignore[no-untyped-def]
    puts, deletes, sessions, pages, after = [], [], [], 0, None
    while True:
        page = store.export_delta(move_id, after, max_bytes)
        puts += page.puts
        deletes += page.deletes
        sessions += page.sessions
        pages += 1
        after = page.next_after
        if after is None:
            return puts, deletes, sessions, pages


@pytest.mark.parametrize("change", ["rewrite", "delete"])
def test_a_copy_page_of_another_run_after_the_delta_is_refused(groups, change: str) -> None:  # type: ignore[no-untyped-def]
    """Mover B scans a page holding k=v1; a client changes k (acknowledged);
    mover A freezes and ships the delta; B's page then reaches the target.
    It must not land: k would go back to v1 (or come back from its deletion)."""
    source, target = groups("s", LOW.union(HIGH)), groups("t", RangeSet())
    key = keys_in(HIGH, 1)[0]
    source.put(key, b"v1")
    _begin(source, target)
    b_page, _ = source.store.export_scan(HIGH, None, 1 << 20)          # mover B's page
    if change == "rewrite":
        source.put(key, b"v2", client_id=3, sequence=1)
    else:
        source.delete(key)
    assert source.shard(ShardOp.EXPORT_FREEZE).ok                       # mover A
    puts, deletes, sessions, _ = _full_delta(source.store)
    assert target.shard(ShardOp.INGEST, puts=tuple(puts), deletes=tuple(deletes), sessions=tuple(sessions),
                        delta=True).ok
    late = target.shard(ShardOp.INGEST, puts=tuple(b_page))             # mover B's copy chunk
    assert not late.ok and "delta" in late.message
    assert target.shard(ShardOp.IMPORT_ACTIVATE, epoch=2).ok
    assert target.store.get(key) == (b"v2" if change == "rewrite" else None)
    # Delta chunks of either run still apply (the same final state), and
    # after the activation every late chunk is a no-op.
    assert target.shard(ShardOp.INGEST, puts=tuple(b_page)).ok
    assert target.store.get(key) == (b"v2" if change == "rewrite" else None)


def test_one_import_per_range(groups) -> None:  # type: ignore[no-untyped-def]
    """A second move importing the same range is refused until the first is
    gone: its abort could otherwise delete what the second one brought."""
    source, target = groups("s", LOW.union(HIGH)), groups("t", RangeSet())
    key = keys_in(HIGH, 1)[0]
    source.put(key, b"v")
    assert target.shard(ShardOp.IMPORT_BEGIN, peer=0, ranges=HIGH).ok                 # move 77, then left
    second = target.apply(ShardCommand(ShardOp.IMPORT_BEGIN, 78, peer=0, ranges=HIGH).encode())
    assert not second.ok and "imported by move 77" in second.message
    part = RangeSet([KeyRange(SPACE // 2 + 10, SPACE // 2 + 20)])
    assert not target.apply(ShardCommand(ShardOp.IMPORT_BEGIN, 79, peer=0, ranges=part).encode()).ok
    assert target.shard(ShardOp.IMPORT_ABORT).ok
    _begin(source, target, 78)
    assert target.apply(ShardCommand(ShardOp.INGEST, 78, puts=((key, b"v"),)).encode()).ok
    assert source.apply(ShardCommand(ShardOp.EXPORT_FREEZE, 78).encode()).ok
    assert target.apply(ShardCommand(ShardOp.INGEST, 78, delta=True).encode()).ok
    assert target.apply(ShardCommand(ShardOp.IMPORT_ACTIVATE, 78, epoch=2).encode()).ok
    assert target.shard(ShardOp.IMPORT_ABORT).ok                                      # late: a no-op
    assert target.store.get(key) == b"v" and target.store.owns(key)


def test_an_aborted_move_is_remembered_at_both_ends(groups) -> None:  # type: ignore[no-untyped-def]
    """After an abort, a late step of the aborted move (a mover that did not
    hear of it) starts nothing again."""
    source, target = groups("s", LOW.union(HIGH)), groups("t", RangeSet())
    key = keys_in(HIGH, 1)[0]
    source.put(key, b"v")
    _begin(source, target)
    assert source.shard(ShardOp.EXPORT_ABORT).ok and target.shard(ShardOp.IMPORT_ABORT).ok
    before_s, before_t = source.store.shard_state, target.store.shard_state
    assert MOVE in before_s.completed and MOVE in before_t.completed
    _begin(source, target)                                      # late steps: no-ops
    assert target.shard(ShardOp.INGEST, puts=((key, b"stale"),)).ok
    assert source.shard(ShardOp.EXPORT_FREEZE).ok
    assert source.store.shard_state == before_s and target.store.shard_state == before_t
    assert target.store.get(key) is None and not source.put(key, b"w").wrong_group
    # An abort that reaches a group before the move began there is remembered too.
    other = groups("o", RangeSet())
    assert other.apply(ShardCommand(ShardOp.IMPORT_ABORT, 90).encode()).ok
    assert other.apply(ShardCommand(ShardOp.IMPORT_BEGIN, 90, peer=0, ranges=HIGH).encode()).ok
    assert other.store.shard_state.imports == {}


def test_an_import_abort_never_deletes_owned_key_space(groups, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Even over a state where an import overlaps what the group owns (one
    admitted before imports were checked for overlaps), the abort deletes
    only what the group does not own."""
    from shardnode.storage.engine import SHARD_STATE, new_batch
    from shardnode.storage.ownership import Import

    target = groups("t", HIGH)
    owned_key = keys_in(HIGH, 1)[0]
    target.put(owned_key, b"mine")
    imported_key = keys_in(LOW, 1)[0]
    engine = target.store._engine
    state = ShardState(owned=HIGH, imports={MOVE: Import(LOW.union(HIGH))})
    batch = new_batch()
    batch.put(SHARD_STATE, state.encode(), engine.shard.handle)
    engine.write(batch, sync=True)
    target.store._load_shard_state()
    assert target.shard(ShardOp.INGEST, puts=((imported_key, b"theirs"),)).ok
    assert target.shard(ShardOp.IMPORT_ABORT).ok
    assert target.store.get(owned_key) == b"mine"
    assert target.store.get(imported_key) is None


def test_the_delta_carries_the_sessions_its_keys_need_and_no_others(groups) -> None:  # type: ignore[no-untyped-def]
    from shardnode.storage.engine import SessionRecord, encode_session, new_batch, session_key

    source, target = groups("s", LOW.union(HIGH)), groups("t", RangeSet())
    moving, staying = keys_in(HIGH, 3), keys_in(LOW, 2)
    source.put(moving[0], b"before", client_id=1, sequence=1)       # before the export: not dirty
    source.put(staying[0], b"x", client_id=2, sequence=1)
    source.put(moving[1], b"y", client_id=2, sequence=2)            # client 2's last write: moving
    source.put(moving[2], b"z", client_id=3, sequence=1)
    source.put(staying[1], b"w", client_id=3, sequence=2)           # client 3's last write: staying
    old = SessionRecord(4, True, b"old", 1_000)                      # a record of the previous release
    batch = new_batch()
    batch.put(session_key(4), encode_session(old), source.store._engine.sessions.handle)
    source.store._engine.write(batch, sync=False)
    _begin(source, target)
    assert source.shard(ShardOp.EXPORT_FREEZE).ok
    _, _, sessions, _ = _full_delta(source.store)
    assert sorted(client for client, _ in sessions) == [1, 2, 4]
    # Exactly-once across the move, for the write made before the export began.
    copied, _ = source.store.export_scan(HIGH, None, 1 << 20)
    assert target.shard(ShardOp.INGEST, puts=tuple(copied)).ok
    assert target.shard(ShardOp.INGEST, sessions=tuple(sessions), delta=True).ok
    assert target.shard(ShardOp.IMPORT_ACTIVATE, epoch=2).ok
    again = target.put(moving[0], b"before", client_id=1, sequence=1)
    assert again.duplicate and not again.existed
    assert target.store.get(moving[0]) == b"before"


def test_the_delta_comes_in_pages(groups) -> None:  # type: ignore[no-untyped-def]
    source = groups("s", LOW.union(HIGH))
    moving = keys_in(HIGH, 120)
    for key in moving[:60]:
        source.put(key, b"old")
    assert source.shard(ShardOp.EXPORT_BEGIN, peer=1, ranges=HIGH).ok
    for i, key in enumerate(moving[30:]):
        source.put(key, b"new-%d" % i, client_id=100 + i, sequence=1)
    for key in moving[30:40]:
        source.delete(key)
    assert source.shard(ShardOp.EXPORT_FREEZE).ok
    whole = source.store.export_delta(MOVE, None, 1 << 30)
    assert whole.next_after is None
    puts, deletes, sessions, pages = _full_delta(source.store, max_bytes=200)
    assert pages > 10
    assert sorted(puts) == sorted(whole.puts) and len(puts) == 80
    assert sorted(deletes) == sorted(whole.deletes) == sorted(moving[30:40])
    assert sorted(sessions) == sorted(whole.sessions) and len(sessions) == 90


def test_formats_old_and_new_records_decode() -> None:
    import msgpack

    from shardnode.storage.engine import SessionRecord, decode_session, encode_session
    from shardnode.storage.ownership import Import
    from shardnode.storage.shard_commands import shard_command_from_fields

    with_position = SessionRecord(3, True, b"old", 9, None, 12345)
    assert decode_session(encode_session(with_position)) == with_position
    cas = SessionRecord(3, False, None, 9, True, 7)
    assert decode_session(encode_session(cas)) == cas
    assert decode_session(msgpack.packb((3, False, None, 9))).position is None          # first format
    assert decode_session(msgpack.packb((3, False, None, 9, True))).swapped is True      # with swapped
    with pytest.raises(ValueError):
        decode_session(msgpack.packb((3, False, None, 9, None, -1)))
    # An INGEST says whether it is part of the delta; the old 3-element payload is a copy chunk.
    delta = ShardCommand(ShardOp.INGEST, 4, puts=((b"k", b"v"),), delta=True)
    fields = msgpack.unpackb(delta.encode(), use_list=False, raw=False)
    assert shard_command_from_fields(fields) == delta
    copy = ShardCommand(ShardOp.INGEST, 4, puts=((b"k", b"v"),))
    assert len(msgpack.unpackb(copy.encode(), use_list=False, raw=False)[3]) == 3
    # Ownership of the previous format: an import was its ranges alone.
    previous = msgpack.packb((2, HIGH.to_wire(), 3, {}, {9: LOW.to_wire()}, [1], 4), use_bin_type=True)
    state = ShardState.decode(previous)
    assert state.imports == {9: Import(LOW)} and state.fence == 4
    begun = ShardState(owned=HIGH, imports={9: Import(LOW, delta_begun=True)})
    assert ShardState.decode(begun.encode()) == begun


def test_a_moved_key_keeps_its_etcd_metadata_and_its_revisions_keep_growing(groups) -> None:  # type: ignore[no-untyped-def]
    source, target = groups("s", LOW.union(HIGH)), groups("t", RangeSet())
    (key,) = keys_in(HIGH, 1)
    source.apply(encode_command(Command(CommandOp.PUT, key, b"a", 0, 0, 9_000_000)))   # a clock far ahead
    source.put(key, b"b")
    before = source.store.get_record(key)
    assert target.shard(ShardOp.IMPORT_BEGIN, peer=0, ranges=HIGH).ok
    assert source.shard(ShardOp.EXPORT_BEGIN, peer=1, ranges=HIGH).ok
    records, _ = source.store.export_scan(HIGH, None, 1 << 20)
    assert target.shard(ShardOp.INGEST, puts=tuple(records)).ok
    assert source.shard(ShardOp.EXPORT_FREEZE).ok
    assert target.shard(ShardOp.INGEST, delta=True).ok and target.shard(ShardOp.IMPORT_ACTIVATE, epoch=2).ok
    assert target.store.get_record(key) == before and target.store.revision >= before.mod_revision
    target.put(key, b"c")                        # the target's clock (1 s) is far behind the source's
    after = target.store.get_record(key)
    assert after.version == before.version + 1 and after.create_revision == before.create_revision
    assert after.mod_revision > before.mod_revision
