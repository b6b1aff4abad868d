"""Moving key space from one group to another, online (docs/sharding.md).

A move takes ranges R from a source group S to a target group T:

    planned    → IMPORT_BEGIN at T           (T accepts ingest into R, serves nothing of it)
    importing  → EXPORT_BEGIN at S           (S records every key of R changed from here on: the dirty set)
    exporting  → copy R from S into T        (pages of a live scan of S; copy INGESTs at T)
    copied     → EXPORT_FREEZE at S          (S refuses R from this log index on: its R is final)
    frozen     → ship the delta, activate    (pages of the dirty keys' final values or deletions and the
                                              sessions R needs, delta INGESTs at T; then IMPORT_ACTIVATE:
                                              T serves R)
    activated  → flip the shard map          (metadata group: R → T, epoch + 1)
    flipped    → EXPORT_FINISH at S          (S deletes R and forgets it)
    done

Why nothing is lost, duplicated or resurrected: after the freeze S's R no
longer changes, and every key whose scanned copy may be stale (changed after
EXPORT_BEGIN, including deletions and keys created behind the scan) is in the
dirty set, whose final state the delta ships; S and T never both serve a key
(S stops at the freeze, T starts at activation, both by log entries checked
at apply time); a write retried across the move finds its session at T,
because the sessions whose last write touched R travel with the delta (the
higher sequence wins; storage/export_reads.py says why no others are needed).

Every step is idempotent on the groups (shard_commands.py) and the phase is
recorded in the metadata group after the step, so a mover that dies anywhere
is resumed by running the record again: the step it may have done already is
done again, harmlessly. Until the freeze a move can be rolled back (abort at
both ends); from the freeze on it only goes forward, since S has stopped
serving R and only T can take over.

Two movers may run one move at once (a scheduler and its deposed
predecessor, a router finishing a stalled move). What keeps them from
undoing each other:
- fencing: every shard command carries the scheduler's token (`fence`) and
  every metadata write its lease (`guards`), so once a newer scheduler has
  FENCEd a group (`fence_groups`) and taken the lease, nothing the old one
  sends lands there or in the records (storage/fencing.py);
- the records: a mover checks before every step that its record is still
  there in the phase it expects, and changes it only by a compare-and-set
  of exactly that record (the map flip too, guarded by the records): if
  another run finished, advanced, aborted or forgot the move, this one stops
  with MoveSuperseded instead of going on;
- the target: once a move's delta began there, its copy chunks are refused,
  so no page scanned before some change lands after the delta that carried
  it; one import per range; a finished or aborted move is remembered, so a
  late step of it is a no-op (ownership.py).

The groups and the metadata group are reached through two small interfaces
(GroupPort, DirectoryPort) so that the same code runs against real workers
and inside the deterministic simulation (tests/sim/test_move_simulation.py).
"""

from __future__ import annotations

import enum
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

import msgpack

from ..errors import ShardnodeError
from .directory import GuardFailed, Guards
from .shard_map import Move, RangeSet, ShardMap, ShardMapConflict, ShardMapError
from ..storage.export_reads import DeltaPage
from ..storage.shard_commands import ShardCommand, ShardOp

log = logging.getLogger("shardnode.placement.moves")
T = TypeVar("T")

MOVES_KEY = b"moves"
MOVES_FORMAT = 1
#: Bytes of key-values per INGEST command (one Raft entry).
INGEST_BYTES = 256 << 10


class MoveError(ShardnodeError):
    """A move step was refused (nothing changed by it); the message says why."""


class MoveSuperseded(MoveError):
    """This run of a move stopped because it is not the one carrying it out
    any more: another run finished, advanced, aborted or forgot the move, or
    this mover's scheduler lost its lease or its fencing token was
    superseded. What this run did was either done as well by the other one
    or is refused by the groups. `finished`: the move's record is gone and
    the shard map gives its ranges to its target (someone finished it)."""

    def __init__(self, message: str, *, finished: bool = False) -> None:
        super().__init__(message)
        self.finished = finished


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
                   max_bytes: int) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
        """A page of the copy: records after the cursor `after` (None: from the
        start) and the cursor to continue after (None: the end)."""
        ...

    async def delta(self, group: int, move_id: int, after: bytes | None, max_bytes: int) -> DeltaPage:
        """A page of a frozen export's delta after the cursor `after` (None:
        from the start); its `next_after` is None on the last page."""
        ...


class DirectoryPort(Protocol):
    """The metadata group (shardnode/placement/directory.py). `guards`: the
    write happens only while every guard key holds its value; a guarded
    compare_and_set that a guard refused returns (False, the unchanged
    value), a guarded update_map raises GuardFailed."""

    async def read(self, key: bytes) -> bytes | None: ...

    async def compare_and_set(self, key: bytes, expected: bytes | None, new: bytes, *,
                              guards: Guards = ()) -> tuple[bool, bytes | None]: ...

    async def load_map(self) -> ShardMap: ...

    async def update_map(self, old: ShardMap, new: ShardMap, *, guards: Guards = ()) -> ShardMap:
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
    """Runs moves (`plan`, `run`, `abort`). `fence`: the fencing token of the
    scheduler it works for, carried by every shard command (0: none);
    `guards`: what every metadata write it makes is conditioned on (the
    scheduler's lease key and value)."""

    def __init__(self, groups: GroupPort, directory: DirectoryPort,
                 on_progress: Callable[[MoveRecord, MoveProgress], None] | None = None, *,
                 fence: int = 0, guards: Guards = ()) -> None:
        self.groups = groups
        self.directory = directory
        self.on_progress = on_progress or (lambda record, progress: None)
        self.fence = fence
        self.guards = tuple(guards)

    def _command(self, op: ShardOp, move_id: int, **fields: object) -> ShardCommand:
        return ShardCommand(op, move_id, fence=self.fence, **fields)  # type: ignore[arg-type]

    # --- Records in the metadata group ---------------------------------------------------

    async def records(self) -> list[MoveRecord]:
        return decode_moves(await self.directory.read(MOVES_KEY))

    async def plan(self, moves: list[Move]) -> list[MoveRecord]:
        """Record new moves (phase PLANNED) and return them."""
        records = [MoveRecord.new(m) for m in moves]
        while True:
            raw = await self.directory.read(MOVES_KEY)
            new = encode_moves(decode_moves(raw) + records)
            swapped, current = await self.directory.compare_and_set(MOVES_KEY, raw, new, guards=self.guards)
            if swapped:
                return records
            if current == raw:
                raise MoveSuperseded("moves not planned: this mover's scheduler no longer holds its lease")

    async def _expect(self, record: MoveRecord) -> bytes | None:
        """Check that the metadata group holds `record` exactly (the phase this
        run is at); returns the records' stored bytes. MoveSuperseded if not."""
        raw = await self.directory.read(MOVES_KEY)
        await self._find(decode_moves(raw), record)
        return raw

    async def _find(self, records: list[MoveRecord], record: MoveRecord) -> int:
        for position, stored in enumerate(records):
            if stored.move_id == record.move_id:
                if stored != record:
                    raise MoveSuperseded(
                        f"move {record.move_id} is recorded {_describe(stored)}, not {_describe(record)}: "
                        f"another run of it went on without this one")
                return position
        shard_map = await self.directory.load_map()
        finished = shard_map.owned_by(record.target).covers(record.ranges)
        raise MoveSuperseded(f"move {record.move_id} is no longer recorded: another run "
                             f"{'finished' if finished else 'aborted or finished'} it", finished=finished)

    async def _replace(self, record: MoveRecord, new: MoveRecord | None) -> MoveRecord | None:
        """Compare-and-set of exactly `record` in the records: replaced by
        `new`, or removed (None). MoveSuperseded if the stored record is not
        `record` any more, or a guard (the lease) refused the write."""
        while True:
            raw = await self.directory.read(MOVES_KEY)
            records = decode_moves(raw)
            position = await self._find(records, record)
            if new is None:
                del records[position]
            else:
                records[position] = new
            swapped, current = await self.directory.compare_and_set(MOVES_KEY, raw, encode_moves(records),
                                                                    guards=self.guards)
            if swapped:
                return new
            if current == raw:
                raise MoveSuperseded(f"move {record.move_id}: not recorded {_describe(new) if new else 'done'}: "
                                     f"this mover's scheduler no longer holds its lease")
            # Another record changed meanwhile (moves run side by side): read again.

    async def _advance(self, record: MoveRecord, **changes: object) -> MoveRecord:
        new = await self._replace(record, replace(record, **changes))  # type: ignore[arg-type]
        assert new is not None
        return new

    async def _forget(self, record: MoveRecord) -> None:
        await self._replace(record, None)

    async def _check_guards(self) -> None:
        for key, value in self.guards:
            if await self.directory.read(key) != value:
                raise MoveSuperseded(f"this mover's scheduler no longer holds its lease ({key!r} changed)")

    # --- Taking over -----------------------------------------------------------------------

    async def fence_groups(self, groups: Iterable[int]) -> None:
        """Raise the fencing token of each group to this mover's: from then on
        those groups refuse every shard command and membership change of an
        older scheduler. A new scheduler does this before anything else."""
        if not self.fence:
            return
        for group in sorted(set(groups)):
            await self.groups.shard(group, self._command(ShardOp.FENCE, self.fence))

    # --- Running ---------------------------------------------------------------------------

    async def run(self, record: MoveRecord, *, stop_after: Phase | None = None) -> MoveRecord:
        """Drive `record` from its recorded phase to the end (or to
        `stop_after`: tests and the simulation stop a move at each phase).
        MoveSuperseded if another run of the move goes on without this one;
        MoveError if a group refuses a step."""
        if record.aborting:
            await self._expect(record)
            if await self._roll_back(record):
                return record
            record = await self._advance(record, aborting=False)
        progress = MoveProgress()
        source, target, move_id = record.source, record.target, record.move_id
        while True:
            phase = record.phase
            if stop_after is not None and phase > stop_after:
                return record
            await self._expect(record)
            if phase is Phase.PLANNED:
                await self._shard(record, target, self._command(ShardOp.IMPORT_BEGIN, move_id, peer=source,
                                                                ranges=record.ranges))
                record = await self._advance(record, phase=Phase.IMPORTING)
            elif phase is Phase.IMPORTING:
                await self._shard(record, source, self._command(ShardOp.EXPORT_BEGIN, move_id, peer=target,
                                                                ranges=record.ranges))
                record = await self._advance(record, phase=Phase.EXPORTING)
            elif phase is Phase.EXPORTING:
                await self._copy(record, progress)
                record = await self._advance(record, phase=Phase.COPIED)
            elif phase is Phase.COPIED:
                await self._shard(record, source, self._command(ShardOp.EXPORT_FREEZE, move_id))
                shard_map = await self.directory.load_map()
                record = await self._advance(record, phase=Phase.FROZEN, epoch=shard_map.epoch + 1)
            elif phase is Phase.FROZEN:
                await self._ship_delta(record, progress)
                await self._shard(record, target, self._command(ShardOp.IMPORT_ACTIVATE, move_id,
                                                                epoch=record.epoch))
                record = await self._advance(record, phase=Phase.ACTIVATED)
            elif phase is Phase.ACTIVATED:
                await self._flip(record)
                record = await self._advance(record, phase=Phase.FLIPPED)
            elif phase is Phase.FLIPPED:
                await self._shard(record, source, self._command(ShardOp.EXPORT_FINISH, move_id, epoch=record.epoch))
                await self._forget(record)
                log.info("sharding.move_done", extra={"move": move_id, "source": source, "target": target,
                                                       "keys": progress.keys, "bytes": progress.bytes})
                return record
            self.on_progress(record, progress)

    async def abort(self, record: MoveRecord) -> None:
        """Roll a move back; MoveError once it is frozen (it can only go
        forward), MoveSuperseded if its record is not `record` any more."""
        if record.phase >= Phase.FROZEN:
            raise MoveError(f"move {record.move_id} is past its freeze: it can only be resumed")
        if not record.aborting:
            # Recorded first (and only over the record as this caller saw it):
            # a rollback that dies half way is finished by whoever runs the
            # record next, never run forward into the freeze.
            record = await self._advance(record, aborting=True)
        else:
            await self._expect(record)
        if not await self._roll_back(record):
            await self._advance(record, aborting=False)
            raise MoveError(f"move {record.move_id} was frozen meanwhile: it can only be resumed")

    async def _roll_back(self, record: MoveRecord) -> bool:
        """EXPORT_ABORT at the source, IMPORT_ABORT at the target (both
        remember the move as over, and the target deletes only what the
        import brought), forget the record. False (nothing undone) if the
        source froze the export already: the freeze is recorded after it is
        applied, so a record at COPIED may be frozen."""
        try:
            await self._shard(record, record.source, self._command(ShardOp.EXPORT_ABORT, record.move_id))
        except MoveSuperseded:
            raise
        except MoveError:
            if await self._frozen_at_source(record):
                return False
            raise
        await self._shard(record, record.target, self._command(ShardOp.IMPORT_ABORT, record.move_id))
        await self._forget(record)
        log.info("sharding.move_aborted", extra={"move": record.move_id, "source": record.source,
                                                  "target": record.target})
        return True

    async def _frozen_at_source(self, record: MoveRecord) -> bool:
        """Whether the source refuses to abort because the export is frozen:
        freezing again is a no-op then, and succeeds."""
        try:
            await self.groups.shard(record.source, self._command(ShardOp.EXPORT_FREEZE, record.move_id))
        except MoveError:
            return False
        return True

    # --- Steps -------------------------------------------------------------------------------

    async def _shard(self, record: MoveRecord, group: int, command: ShardCommand) -> None:
        """A step of `record` at `group`. A refusal is MoveSuperseded when the
        record changed meanwhile (another run went ahead: its copy chunks
        after that run's delta, say, are refused), else the refusal itself."""
        await self._checked(record, self.groups.shard(group, command))

    async def _checked(self, record: MoveRecord, call: Awaitable[T]) -> T:
        """`call` (a request to a group about `record`); if the group refuses
        it, MoveSuperseded when the record changed meanwhile."""
        try:
            return await call
        except MoveSuperseded:
            raise
        except MoveError:
            await self._expect(record)
            raise

    async def _copy(self, record: MoveRecord, progress: MoveProgress) -> None:
        after: bytes | None = None
        while True:
            records, after = await self._checked(record, self.groups.scan(record.source, record.ranges, after,
                                                                          INGEST_BYTES))
            if records:
                await self._ingest(record, puts=records)
                progress.keys += len(records)
                progress.bytes += sum(len(k) + len(v) for k, v in records)
                self.on_progress(record, progress)
            if after is None:
                return

    async def _ship_delta(self, record: MoveRecord, progress: MoveProgress) -> None:
        """The delta, page by page. It begins with an empty delta INGEST: from
        that entry on the target refuses this move's copy chunks, whichever
        run sends them."""
        await self._shard(record, record.target, self._command(ShardOp.INGEST, record.move_id, delta=True))
        after: bytes | None = None
        while True:
            page = await self._checked(record, self.groups.delta(record.source, record.move_id, after, INGEST_BYTES))
            await self._ingest(record, puts=page.puts, deletes=page.deletes, sessions=page.sessions, delta=True)
            progress.delta_keys += len(page.puts) + len(page.deletes)
            progress.sessions += len(page.sessions)
            progress.bytes += sum(len(k) + len(v) for k, v in page.puts)
            after = page.next_after
            if after is None:
                return

    async def _ingest(self, record: MoveRecord, puts: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
                      deletes: list[bytes] = (), sessions: list[tuple[int, bytes]] = (),  # type: ignore[assignment]
                      delta: bool = False) -> None:
        """INGEST commands of about INGEST_BYTES each."""
        items: list[tuple[str, object]] = [("put", p) for p in puts] + [("delete", d) for d in deletes] \
            + [("session", s) for s in sessions]
        chunk: dict[str, list] = {"put": [], "delete": [], "session": []}
        size = 0

        async def flush() -> None:
            nonlocal chunk, size
            if any(chunk.values()):
                await self._shard(record, record.target, self._command(
                    ShardOp.INGEST, record.move_id, puts=tuple(chunk["put"]), deletes=tuple(chunk["delete"]),
                    sessions=tuple(chunk["session"]), delta=delta))
            chunk, size = {"put": [], "delete": [], "session": []}, 0

        for kind, item in items:
            chunk[kind].append(item)
            size += _size(item)
            if size >= INGEST_BYTES:
                await flush()
        await flush()

    async def _flip(self, record: MoveRecord) -> None:
        """The map gives the ranges to the target: a compare-and-set of the
        map guarded by the lease and by the records as read, which hold this
        move at ACTIVATED: a run whose move someone else finished (and
        perhaps moved on elsewhere since) can never flip it."""
        move = Move(record.source, record.target, record.ranges)
        while True:
            raw = await self._expect(record)
            current = await self.directory.load_map()
            if current.owned_by(record.target).covers(record.ranges):
                return          # flipped already (a resumed move)
            try:
                await self.directory.update_map(current, current.with_move(move),
                                                guards=self.guards + ((MOVES_KEY, raw),))
                return
            except GuardFailed:
                await self._check_guards()
                continue        # the records changed meanwhile (other moves): check this one again
            except ShardMapConflict:
                continue        # the map changed meanwhile: read it again


def _describe(record: MoveRecord) -> str:
    return f"{record.phase.name}{' (aborting)' if record.aborting else ''}"
