"""The Mover (shardnode/placement/moves.py) against real state machines and an
in-memory metadata group: fenced and guarded, it never goes on with a
record someone else changed, and two runs of one move cannot undo each
other's work."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardnode.keyspace import SPACE, KeyRange, RangeSet, stable_hash
from shardnode.placement import moves as moves_module
from shardnode.placement.directory import GuardFailed
from shardnode.placement.moves import (MOVES_KEY, MoveError, MoveProgress, MoveRecord, Mover, MoveSuperseded, Phase,
                                       decode_moves)
from shardnode.placement.shard_map import Move, ShardMap, ShardMapConflict
from shardnode.raft import Entry, HardState
from shardnode.storage import Command, CommandOp, ReplicaStore, StorageError, encode_command
from shardnode.storage.export_reads import DeltaPage
from shardnode.storage.shard_commands import ShardCommand, ShardOp, ShardResult

LEASE = b"lease"
SHARD_MAP_KEY = b"shard_map"


class Groups:
    """GroupPort over real stores, each fed its entries in log order."""

    def __init__(self, tmp_path: Path, shard_map: ShardMap) -> None:
        self.stores: dict[int, ReplicaStore] = {}
        self.sent: list[ShardCommand] = []
        for group in shard_map.groups:
            store = ReplicaStore.open(tmp_path / f"g{group}", initial_voters=(1,))
            store.configure_ownership(shard_map.owned_by(group))
            self.stores[group] = store
        self.pause_after_scan: asyncio.Event | None = None

    def apply(self, group: int, data: bytes):  # type: ignore[no-untyped-def]
        store = self.stores[group]
        entry = Entry(1, store.last_index() + 1, data)
        store.persist(HardState(1, 1, entry.index), [entry])
        (result,) = store.apply([entry])
        return result

    def write(self, key: bytes, value: bytes | None, group: int) -> None:
        op = CommandOp.PUT if value is not None else CommandOp.DELETE
        result = self.apply(group, encode_command(Command(op, key, value, 0, 0, 1_000)))
        assert not result.wrong_group

    async def shard(self, group: int, command: ShardCommand) -> None:
        self.sent.append(command)
        result = self.apply(group, command.encode())
        assert isinstance(result, ShardResult)
        if not result.ok:
            raise MoveError(f"group {group} refused {command.op.name}: {result.message}")

    async def scan(self, group, ranges, after, max_bytes):  # type: ignore[no-untyped-def]
        page = self.stores[group].export_scan(ranges, after, max_bytes)
        if self.pause_after_scan is not None:
            pause, self.pause_after_scan = self.pause_after_scan, None
            await pause.wait()
        return page

    async def delta(self, group: int, move_id: int, after: bytes | None, max_bytes: int) -> DeltaPage:
        try:
            return self.stores[group].export_delta(move_id, after, max_bytes)
        except StorageError as exc:
            raise MoveError(str(exc)) from None

    def close(self) -> None:
        for store in self.stores.values():
            store.close()


class Directory:
    """DirectoryPort over a dict, recording the guards of every write."""

    def __init__(self, shard_map: ShardMap) -> None:
        self.data: dict[bytes, bytes] = {SHARD_MAP_KEY: shard_map.encode(), LEASE: b"holder-7"}
        self.guarded_writes: list[tuple[bytes, tuple]] = []

    async def read(self, key: bytes) -> bytes | None:
        await asyncio.sleep(0)
        return self.data.get(key)

    async def compare_and_set(self, key, expected, new, *, guards=()):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0)
        self.guarded_writes.append((key, tuple(guards)))
        current = self.data.get(key)
        if current != expected or any(self.data.get(k) != v for k, v in guards):
            return False, current
        self.data[key] = new
        return True, new

    async def load_map(self) -> ShardMap:
        return ShardMap.decode(self.data[SHARD_MAP_KEY])

    async def update_map(self, old: ShardMap, new: ShardMap, *, guards=()) -> ShardMap:  # type: ignore[no-untyped-def]
        self.guarded_writes.append((SHARD_MAP_KEY, tuple(guards)))
        if self.data[SHARD_MAP_KEY] != old.encode():
            raise ShardMapConflict("the map changed")
        if any(self.data.get(k) != v for k, v in guards):
            raise GuardFailed("a guard no longer holds")
        self.data[SHARD_MAP_KEY] = new.encode()
        return new


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.map = ShardMap.build(3, 1)
        self.groups = Groups(tmp_path, self.map)
        self.directory = Directory(self.map)

    def mover(self, fence: int = 7, lease: bytes = b"holder-7") -> Mover:
        return Mover(self.groups, self.directory, fence=fence, guards=((LEASE, lease),))

    def current_map(self) -> ShardMap:
        return ShardMap.decode(self.directory.data[SHARD_MAP_KEY])

    def records(self) -> list[MoveRecord]:
        return decode_moves(self.directory.data.get(MOVES_KEY))

    def keys_of(self, group: int, count: int, prefix: bytes = b"k") -> list[bytes]:
        owned, found, i = self.map.owned_by(group), [], 0
        while len(found) < count:
            key = prefix + b"%d" % i
            if stable_hash(key) in owned:
                found.append(key)
            i += 1
        return found

    def move(self, source: int, target: int) -> Move:
        return Move(source, target, self.current_map().owned_by(source))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.groups.close()


def test_every_command_carries_the_token_and_every_write_the_lease(world: World) -> None:
    async def body() -> None:
        mover = world.mover()
        (record,) = await mover.plan([world.move(0, 1)])
        await mover.run(record)

    asyncio.run(body())
    assert world.groups.sent and all(c.fence == 7 for c in world.groups.sent)
    assert world.directory.guarded_writes
    assert all((LEASE, b"holder-7") in guards for _, guards in world.directory.guarded_writes)
    # The flip is guarded by the move records too (as they held the move at ACTIVATED).
    flips = [guards for key, guards in world.directory.guarded_writes if key == SHARD_MAP_KEY]
    assert flips and all(any(k == MOVES_KEY for k, _ in guards) for guards in flips)
    assert world.current_map().owned_by(1).covers(world.map.owned_by(0)) and not world.records()


def test_a_mover_that_lost_its_lease_changes_nothing(world: World) -> None:
    async def body() -> None:
        mover = world.mover()
        (record,) = await mover.plan([world.move(0, 1)])
        record = await mover.run(record, stop_after=Phase.PLANNED)
        world.directory.data[LEASE] = b"holder-8"                    # taken over
        before = dict(world.directory.data)
        with pytest.raises(MoveSuperseded, match="lease"):
            await mover.run(record)
        assert world.directory.data == before
        with pytest.raises(MoveSuperseded, match="lease"):
            await mover.plan([world.move(2, 1)])

    asyncio.run(body())


def test_a_stale_run_of_a_finished_move_stops_instead_of_flipping_it_back(world: World) -> None:
    """Mover B holds a move at ACTIVATED; A finished it, and a later move took
    the range on to a third group. B must neither flip the range back to a
    group that no longer serves it nor put the finished move back."""

    async def body() -> None:
        a, b = world.mover(), world.mover()
        (record,) = await a.plan([world.move(0, 1)])
        stale = await a.run(record, stop_after=Phase.FROZEN)          # ACTIVATED
        assert stale.phase is Phase.ACTIVATED
        await a.run(stale)                                             # A finishes it
        (onward,) = await a.plan([world.move(1, 2)])
        await a.run(onward)                                            # and the range moves on to group 2
        map_before = world.current_map()
        with pytest.raises(MoveSuperseded):
            await b.run(stale)
        assert world.current_map() == map_before
        assert map_before.owned_by(2).covers(record.ranges)
        assert world.records() == []

    asyncio.run(body())


def test_a_run_whose_record_moved_on_stops_before_its_next_step(world: World) -> None:
    async def body() -> None:
        a, b = world.mover(), world.mover()
        (record,) = await a.plan([world.move(0, 1)])
        ahead = await a.run(record, stop_after=Phase.IMPORTING)        # EXPORTING now
        sent = len(world.groups.sent)
        with pytest.raises(MoveSuperseded, match="recorded EXPORTING, not PLANNED"):
            await b.run(record)
        assert len(world.groups.sent) == sent                            # not even its first step
        assert world.records() == [ahead]
        with pytest.raises(MoveSuperseded):
            await b.abort(record)                                      # nor an abort over a record it did not see
        assert world.records() == [ahead]
        finished = await a.run(ahead)
        with pytest.raises(MoveSuperseded) as caught:
            await b.run(ahead)
        assert caught.value.finished and finished.move_id == ahead.move_id

    asyncio.run(body())


def test_a_copy_page_read_before_the_delta_never_lands_after_it(world: World) -> None:
    """The issue's story: B reads a page holding k=v1, a client writes k=v2,
    A freezes and ships the delta, then B's page arrives: it is refused, B
    stops, and v2 survives the move."""
    key = world.keys_of(0, 1)[0]
    world.groups.write(key, b"v1", group=0)

    async def body() -> None:
        a, b = world.mover(), world.mover()
        (record,) = await a.plan([world.move(0, 1)])
        exporting = await a.run(record, stop_after=Phase.IMPORTING)
        resume = asyncio.Event()
        world.groups.pause_after_scan = resume
        copier = asyncio.ensure_future(b.run(exporting))               # B reads its page, then pauses
        while world.groups.pause_after_scan is not None:
            await asyncio.sleep(0)
        world.groups.write(key, b"v2", group=0)                        # acknowledged, dirty
        frozen = await a.run(exporting, stop_after=Phase.COPIED)      # A copies and freezes
        await a._ship_delta(frozen, MoveProgress())                    # and ships the delta (not activated yet)
        assert world.groups.stores[1].get(key) == b"v2"
        resume.set()                                                   # B's page arrives
        with pytest.raises(MoveSuperseded):
            await copier
        assert world.groups.stores[1].get(key) == b"v2"
        await a.run(frozen)
        assert world.groups.stores[1].get(key) == b"v2" and world.groups.stores[1].owns(key)

    asyncio.run(body())


def test_an_abort_is_recorded_first_and_remembered_by_both_groups(world: World) -> None:
    async def body() -> None:
        mover = world.mover()
        (record,) = await mover.plan([world.move(0, 1)])
        record = await mover.run(record, stop_after=Phase.EXPORTING)   # COPIED
        await mover.abort(record)
        assert world.records() == []
        for group in (0, 1):
            assert record.move_id in world.groups.stores[group].shard_state.completed
        # A late step of the aborted move (a mover that did not hear of it)
        # starts nothing again, and a late run of it stops at once.
        await world.groups.shard(1, ShardCommand(ShardOp.IMPORT_BEGIN, record.move_id, peer=0,
                                                 ranges=record.ranges, fence=7))
        await world.groups.shard(0, ShardCommand(ShardOp.EXPORT_BEGIN, record.move_id, peer=1,
                                                 ranges=record.ranges, fence=7))
        assert world.groups.stores[1].shard_state.imports == {}
        assert world.groups.stores[0].shard_state.exports == {}
        with pytest.raises(MoveSuperseded):
            await world.mover().run(MoveRecord(record.move_id, 0, 1, record.ranges, Phase.PLANNED))

    asyncio.run(body())


def test_a_new_scheduler_fences_the_groups_against_the_old_one(world: World) -> None:
    async def body() -> None:
        old = world.mover(fence=7)
        (record,) = await old.plan([world.move(0, 1)])
        record = await old.run(record, stop_after=Phase.PLANNED)
        world.directory.data[LEASE] = b"holder-8"
        new = world.mover(fence=8, lease=b"holder-8")
        await new.fence_groups([record.source, record.target])
        with pytest.raises(MoveError, match="superseded"):
            await old.run(record)
        assert world.groups.stores[0].shard_state.exports == {}
        await new.run(record)
        assert world.current_map().owned_by(1).covers(record.ranges)

    asyncio.run(body())


def test_the_delta_is_shipped_page_by_page(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(moves_module, "INGEST_BYTES", 256)
    keys = world.keys_of(0, 60)

    async def body() -> None:
        mover = world.mover()
        (record,) = await mover.plan([world.move(0, 1)])
        record = await mover.run(record, stop_after=Phase.EXPORTING)   # copied: now rewrite everything
        for i, key in enumerate(keys):
            world.groups.write(key, b"after-the-copy-%d" % i if i % 5 else None, group=0)
        deltas_before = sum(1 for c in world.groups.sent if c.op is ShardOp.INGEST and c.delta)
        await mover.run(record)
        delta_chunks = sum(1 for c in world.groups.sent if c.op is ShardOp.INGEST and c.delta) - deltas_before
        assert delta_chunks > 5
        for i, key in enumerate(keys):
            assert world.groups.stores[1].get(key) == (b"after-the-copy-%d" % i if i % 5 else None)

    asyncio.run(body())


def test_a_full_space_move_ends_where_the_map_says(world: World) -> None:
    """Sanity: the whole space of a group, with keys at both ends, arrives."""
    keys = world.keys_of(2, 30)
    for key in keys:
        world.groups.write(key, b"v", group=2)

    async def body() -> None:
        mover = world.mover()
        (record,) = await mover.plan([world.move(2, 0)])
        await mover.run(record)

    asyncio.run(body())
    assert all(world.groups.stores[0].get(k) == b"v" and world.groups.stores[2].get(k) is None for k in keys)
    assert world.current_map().owned_by(2) == RangeSet()
    assert RangeSet([KeyRange(0, SPACE)]) == world.current_map().owned_by(0).union(world.current_map().owned_by(1))
