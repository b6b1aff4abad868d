"""Moving key space from one group to another, online (docs/sharding.md).

A move takes ranges R from a source group S to a target group T:

    planned    → IMPORT_BEGIN at T           (T accepts ingest into R, serves nothing of it)
    importing  → EXPORT_BEGIN at S           (S records every key of R changed from here on: the dirty set)
    exporting  → copy R from S into T        (a live scan of S; INGEST at T)
    copied     → EXPORT_FREEZE at S          (S refuses R from this log index on: its R is final)
    frozen     → ship the delta, activate    (the dirty keys' final values or deletions and S's sessions,
                                              INGEST at T; then IMPORT_ACTIVATE: T serves R)
    activated  → flip the shard map          (metadata group: R → T, epoch + 1)
    flipped    → EXPORT_FINISH at S          (S deletes R and forgets it)
    done

Why nothing is lost, duplicated or resurrected: after the freeze S's R no
longer changes, and every key whose scanned copy may be stale (changed after
EXPORT_BEGIN, including deletions and keys created behind the scan) is in the
dirty set, whose final state the delta ships; S and T never both serve a key
(S stops at the freeze, T starts at activation, both by log entries checked
at apply time); a write retried across the move finds its session at T,
because S's sessions travel with the delta (the higher sequence wins).

Every step is idempotent on the groups (shard_commands.py) and the phase is
recorded in the metadata group after the step, so a mover that dies anywhere
is resumed by running the record again: the step it may have done already is
done again, harmlessly. Until the freeze a move can be rolled back (abort at
both ends); from the freeze on it only goes forward, since S has stopped
serving R and only T can take over.

The groups and the metadata group are reached through two small interfaces
(GroupPort, DirectoryPort) so that the same code runs against real workers
and inside the deterministic simulation (tests/sim/test_move_simulation.py).
"""

from __future__ import annotations

import enum
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import msgpack

from ..errors import ShardnodeError
from .shard_map import Move, RangeSet, ShardMap, ShardMapConflict, ShardMapError
from ..storage.shard_commands import ShardCommand, ShardOp

log = logging.getLogger("shardnode.placement.moves")

MOVES_KEY = b"moves"
MOVES_FORMAT = 1
#: Bytes of key-values per INGEST command (one Raft entry).
INGEST_BYTES = 256 << 10


class MoveError(ShardnodeError):
    """A move step was refused (nothing changed by it); the message says why."""


class Phase(enum.IntEnum):
    PLANNED = 0
    IMPORTING = 1
    EXPORTING = 2
    COPIED = 3
    FROZEN = 4
    ACTIVATED = 5
    FLIPPED = 6


@dataclass(slots=True, frozen=True)
class MoveRecord:
    move_id: int
    source: int
    target: int
    ranges: RangeSet
    phase: Phase = Phase.PLANNED
    epoch: int = 0          # the map epoch T was activated with (from FROZEN on)
    aborting: bool = False  # being rolled back: whoever runs it next finishes the rollback

    @classmethod
    def new(cls, move: Move) -> MoveRecord:
        return cls(secrets.randbits(63) or 1, move.source, move.target, move.ranges)

    def to_wire(self) -> list:
        return [self.move_id, self.source, self.target, self.ranges.to_wire(), int(self.phase), self.epoch,
                self.aborting]

    @classmethod
    def from_wire(cls, raw: list) -> MoveRecord:
        move_id, source, target, ranges, phase, epoch = raw[:6]
        aborting = bool(raw[6]) if len(raw) > 6 else False
        return cls(move_id, source, target, RangeSet.from_wire(ranges), Phase(phase), epoch, aborting)


def encode_moves(records: list[MoveRecord]) -> bytes:
    return msgpack.packb([MOVES_FORMAT, [r.to_wire() for r in records]], use_bin_type=True)


def decode_moves(data: bytes | None) -> list[MoveRecord]:
    if data is None:
        return []
    try:
        version, raw = msgpack.unpackb(data, raw=False)
        if version != MOVES_FORMAT:
            raise ValueError(f"format {version}")
        return [MoveRecord.from_wire(r) for r in raw]
    except (ValueError, TypeError, ShardMapError) as exc:
        raise MoveError(f"the metadata group's move records are unreadable: {exc}") from None


def _size(item: object) -> int:
    """About the encoded size of an ingest item."""
    if isinstance(item, tuple):
        return 8 + sum(len(x) if isinstance(x, bytes) else 8 for x in item)
    return 8 + len(item) if isinstance(item, bytes) else 16


# --- What the mover needs from the cluster -------------------------------------------------


class GroupPort(Protocol):
    """A group's leader, reached with retries until a deadline. `shard`
    raises MoveError when the command was refused (applied as a no-op)."""

    async def shard(self, group: int, command: ShardCommand) -> None: ...

    async def scan(self, group: int, ranges: RangeSet, after: bytes | None,
                   max_bytes: int) -> tuple[list[tuple[bytes, bytes]], bytes | None]: ...

    async def delta(self, group: int, move_id: int) -> tuple[list[tuple[bytes, bytes]], list[bytes],
                                                             list[tuple[int, bytes]]]: ...


class DirectoryPort(Protocol):
    """The metadata group (shardnode/placement/directory.py)."""

    async def read(self, key: bytes) -> bytes | None: ...

    async def compare_and_set(self, key: bytes, expected: bytes | None, new: bytes) -> tuple[bool, bytes | None]: ...

    async def load_map(self) -> ShardMap: ...

    async def update_map(self, old: ShardMap, new: ShardMap) -> ShardMap:
        """Replace `old` by `new`; ShardMapConflict if the map is not `old` any more."""
        ...


@dataclass(slots=True)
class MoveProgress:
    """What a move did so far (for a progress bar and the closing figures)."""

    keys: int = 0
    bytes: int = 0
    delta_keys: int = 0
    sessions: int = 0


# --- The mover -------------------------------------------------------------------------------


class Mover:
    def __init__(self, groups: GroupPort, directory: DirectoryPort,
                 on_progress: Callable[[MoveRecord, MoveProgress], None] | None = None, *, fence: int = 0,
                 guards: tuple[tuple[bytes, bytes | None], ...] = ()) -> None:
        self.groups = groups
        self.directory = directory
        self.on_progress = on_progress or (lambda record, progress: None)
        # Interim (the fenced mover lands separately): the scheduler's token and lease guard.
        self.fence = fence
        self.guards = guards

    async def _shard(self, group: int, command: ShardCommand) -> None:
        await self.groups.shard(group, replace(command, fence=self.fence))

    # --- Records in the metadata group ---------------------------------------------------

    async def records(self) -> list[MoveRecord]:
        return decode_moves(await self.directory.read(MOVES_KEY))

    async def _update_records(self, change: Callable[[list[MoveRecord]], list[MoveRecord]]) -> None:
        while True:
            raw = await self.directory.read(MOVES_KEY)
            new = encode_moves(change(decode_moves(raw)))
            swapped, _ = await self.directory.compare_and_set(MOVES_KEY, raw, new)
            if swapped:
                return

    async def plan(self, moves: list[Move]) -> list[MoveRecord]:
        """Record new moves (phase PLANNED) and return them."""
        records = [MoveRecord.new(m) for m in moves]
        await self._update_records(lambda existing: existing + records)
        return records

    async def _record(self, record: MoveRecord) -> MoveRecord:
        await self._update_records(lambda existing: [record if r.move_id == record.move_id else r for r in existing])
        return record

    async def _forget(self, record: MoveRecord) -> None:
        await self._update_records(lambda existing: [r for r in existing if r.move_id != record.move_id])

    # --- Running ---------------------------------------------------------------------------

    async def run(self, record: MoveRecord, *, stop_after: Phase | None = None) -> MoveRecord:
        """Drive `record` from its recorded phase to the end (or to
        `stop_after`: tests and the simulation stop a move at each phase)."""
        if record.aborting:
            if await self._roll_back(record):
                return record
            record = await self._record(replace(record, aborting=False))
        progress = MoveProgress()
        source, target, move_id = record.source, record.target, record.move_id
        while True:
            phase = record.phase
            if stop_after is not None and phase > stop_after:
                return record
            if phase is Phase.PLANNED:
                await self._shard(target, ShardCommand(ShardOp.IMPORT_BEGIN, move_id, peer=source,
                                                             ranges=record.ranges))
                record = await self._record(replace(record, phase=Phase.IMPORTING))
            elif phase is Phase.IMPORTING:
                await self._shard(source, ShardCommand(ShardOp.EXPORT_BEGIN, move_id, peer=target,
                                                             ranges=record.ranges))
                record = await self._record(replace(record, phase=Phase.EXPORTING))
            elif phase is Phase.EXPORTING:
                await self._copy(record, progress)
                record = await self._record(replace(record, phase=Phase.COPIED))
            elif phase is Phase.COPIED:
                await self._shard(source, ShardCommand(ShardOp.EXPORT_FREEZE, move_id))
                shard_map = await self.directory.load_map()
                record = await self._record(replace(record, phase=Phase.FROZEN, epoch=shard_map.epoch + 1))
            elif phase is Phase.FROZEN:
                await self._ship_delta(record, progress)
                await self._shard(target, ShardCommand(ShardOp.IMPORT_ACTIVATE, move_id, epoch=record.epoch))
                record = await self._record(replace(record, phase=Phase.ACTIVATED))
            elif phase is Phase.ACTIVATED:
                await self._flip(record)
                record = await self._record(replace(record, phase=Phase.FLIPPED))
            elif phase is Phase.FLIPPED:
                await self._shard(source, ShardCommand(ShardOp.EXPORT_FINISH, move_id, epoch=record.epoch))
                await self._forget(record)
                log.info("sharding.move_done", extra={"move": move_id, "source": source, "target": target,
                                                       "keys": progress.keys, "bytes": progress.bytes})
                return record
            self.on_progress(record, progress)

    async def abort(self, record: MoveRecord) -> None:
        """Roll a move back; MoveError once it is frozen (it can only go forward)."""
        if record.phase >= Phase.FROZEN:
            raise MoveError(f"move {record.move_id} is past its freeze: it can only be resumed")
        if not record.aborting:
            # Recorded first: a rollback that dies half way is finished by
            # whoever runs the record next, never run forward into the freeze.
            record = await self._record(replace(record, aborting=True))
        if not await self._roll_back(record):
            await self._record(replace(record, aborting=False))
            raise MoveError(f"move {record.move_id} was frozen meanwhile: it can only be resumed")

    async def _roll_back(self, record: MoveRecord) -> bool:
        """EXPORT_ABORT at the source, IMPORT_ABORT at the target, forget the
        record. False (nothing undone) if the source froze the export already:
        the freeze is recorded after it is applied, so a record at COPIED may
        be frozen."""
        try:
            await self._shard(record.source, ShardCommand(ShardOp.EXPORT_ABORT, record.move_id))
        except MoveError:
            if await self._frozen_at_source(record):
                return False
            raise
        await self._shard(record.target, ShardCommand(ShardOp.IMPORT_ABORT, record.move_id))
        await self._forget(record)
        return True

    async def _frozen_at_source(self, record: MoveRecord) -> bool:
        """Whether the source refuses to abort because the export is frozen:
        freezing again is a no-op then, and succeeds."""
        try:
            await self._shard(record.source, ShardCommand(ShardOp.EXPORT_FREEZE, record.move_id))
        except MoveError:
            return False
        return True

    # --- Steps -------------------------------------------------------------------------------

    async def _copy(self, record: MoveRecord, progress: MoveProgress) -> None:
        after: bytes | None = None
        while True:
            records, after = await self.groups.scan(record.source, record.ranges, after, INGEST_BYTES)
            if records:
                await self._ingest(record, puts=records)
                progress.keys += len(records)
                progress.bytes += sum(len(k) + len(v) for k, v in records)
                self.on_progress(record, progress)
            if after is None:
                return

    async def _ship_delta(self, record: MoveRecord, progress: MoveProgress) -> None:
        puts, deletes, sessions = await self.groups.delta(record.source, record.move_id)
        await self._ingest(record, puts=puts, deletes=deletes, sessions=sessions)
        progress.delta_keys += len(puts) + len(deletes)
        progress.sessions += len(sessions)
        progress.bytes += sum(len(k) + len(v) for k, v in puts)

    async def _ingest(self, record: MoveRecord, puts: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
                      deletes: list[bytes] = (), sessions: list[tuple[int, bytes]] = ()) -> None:  # type: ignore[assignment]
        """INGEST commands of about INGEST_BYTES each."""
        items: list[tuple[str, object]] = [("put", p) for p in puts] + [("delete", d) for d in deletes] \
            + [("session", s) for s in sessions]
        chunk: dict[str, list] = {"put": [], "delete": [], "session": []}
        size = 0

        async def flush() -> None:
            nonlocal chunk, size
            if any(chunk.values()):
                await self._shard(record.target, ShardCommand(
                    ShardOp.INGEST, record.move_id, puts=tuple(chunk["put"]), deletes=tuple(chunk["delete"]),
                    sessions=tuple(chunk["session"])))
            chunk, size = {"put": [], "delete": [], "session": []}, 0

        for kind, item in items:
            chunk[kind].append(item)
            size += _size(item)
            if size >= INGEST_BYTES:
                await flush()
        await flush()

    async def _flip(self, record: MoveRecord) -> None:
        move = Move(record.source, record.target, record.ranges)
        while True:
            current = await self.directory.load_map()
            if current.owned_by(record.target).covers(record.ranges):
                return          # flipped already (a resumed move)
            try:
                await self.directory.update_map(current, current.with_move(move))
                return
            except ShardMapConflict:
                continue        # the map changed meanwhile: read it again
