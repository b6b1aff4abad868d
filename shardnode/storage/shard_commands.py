"""Shard commands: the log entries that move key space between groups.

They travel through a group's Raft log like client commands, so every
replica applies them at the same index (ownership.py says why that
matters). The mover (shardnode/placement/moves.py) proposes them through the
worker's Shard RPC. Each is idempotent: applying it again, or after the move
finished, changes nothing and reports success, which is what lets a crashed
mover resume from any step.

Wire shape (msgpack): ``(SHARD_FORMAT, kind, move_id, payload[, fence])``.
An INGEST says whether it is a copy chunk or part of the delta (a 4th
payload element, True; absent: a copy chunk): once a move's delta began at
the target, its copy chunks are refused (ownership.py, `Import`).
The first element tells them from client commands (whose first element is
the command format version, 1). `fence` is the scheduler's fencing token
(fencing.py; absent: 0): a command with a smaller token than the group has
applied is refused, and a larger one raises the group's. FENCE does nothing
else: a new scheduler sends it to every group it will touch before anything
else (its move_id is the token itself).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

import msgpack

from ..keyspace import KeySpaceError, RangeSet
from .commands import CommandError
from .engine import StorageError, decode_session

SHARD_FORMAT = 16


class ShardOp(enum.IntEnum):
    IMPORT_BEGIN = 1      # payload: (source, ranges)
    INGEST = 2            # payload: (puts [(key, value)], deletes [key], sessions [(client_id, record)][, delta])
    IMPORT_ACTIVATE = 3   # payload: epoch
    IMPORT_ABORT = 4      # payload: None
    EXPORT_BEGIN = 5      # payload: (target, ranges)
    EXPORT_FREEZE = 6     # payload: None
    EXPORT_FINISH = 7     # payload: epoch
    EXPORT_ABORT = 8      # payload: None
    FENCE = 9             # payload: None; raises the group's fencing token


@dataclass(slots=True, frozen=True)
class ShardCommand:
    op: ShardOp
    move_id: int
    peer: int = 0                                   # IMPORT_BEGIN: source; EXPORT_BEGIN: target
    ranges: RangeSet = field(default_factory=RangeSet)
    epoch: int = 0                                  # IMPORT_ACTIVATE, EXPORT_FINISH
    puts: tuple[tuple[bytes, bytes], ...] = ()
    deletes: tuple[bytes, ...] = ()
    sessions: tuple[tuple[int, bytes], ...] = ()
    delta: bool = False                             # INGEST: part of the delta (else a copy chunk)
    fence: int = 0                                  # the scheduler's fencing token (fencing.py)

    def encode(self) -> bytes:
        op = self.op
        if op in (ShardOp.IMPORT_BEGIN, ShardOp.EXPORT_BEGIN):
            payload: object = (self.peer, self.ranges.to_wire())
        elif op is ShardOp.INGEST:
            chunk = ([list(p) for p in self.puts], list(self.deletes), [list(s) for s in self.sessions])
            payload = chunk + (True,) if self.delta else chunk
        elif op in (ShardOp.IMPORT_ACTIVATE, ShardOp.EXPORT_FINISH):
            payload = self.epoch
        else:
            payload = None
        fields: tuple = (SHARD_FORMAT, int(op), self.move_id, payload)
        if self.fence:
            fields += (self.fence,)
        return msgpack.packb(fields, use_bin_type=True)


@dataclass(slots=True, frozen=True)
class ShardResult:
    """The outcome of a shard command: ok, or why it was refused (nothing changed)."""

    index: int
    ok: bool
    message: str = ""


def shard_command_from_fields(fields: tuple) -> ShardCommand:
    """A ShardCommand from a decoded msgpack array; CommandError if malformed."""
    if len(fields) not in (4, 5):
        raise CommandError("a shard command is a 4- or 5-element array")
    _, op, move_id, payload = fields[:4]
    fence = fields[4] if len(fields) == 5 else 0
    if type(fence) is not int or not 0 <= fence < 1 << 64:
        raise CommandError("shard command: the fencing token must be an unsigned 64-bit integer")
    command = _command_from_fields(op, move_id, payload)
    return command if not fence else replace(command, fence=fence)


def _command_from_fields(op: object, move_id: object, payload: object) -> ShardCommand:
    try:
        op = ShardOp(op)
    except ValueError:
        raise CommandError(f"unknown shard operation {op!r}") from None
    if type(move_id) is not int or not 0 < move_id < 1 << 64:
        raise CommandError("shard command: move id must be a positive 64-bit integer")
    try:
        if op in (ShardOp.IMPORT_BEGIN, ShardOp.EXPORT_BEGIN):
            peer, ranges = payload
            if type(peer) is not int:
                raise CommandError("shard command: group must be an integer")
            return ShardCommand(op, move_id, peer=peer, ranges=RangeSet.from_wire(ranges))
        if op is ShardOp.INGEST:
            if type(payload) is not tuple or len(payload) not in (3, 4):
                raise CommandError("ingest: expected (puts, deletes, sessions[, delta])")
            puts, deletes, sessions = payload[:3]
            delta = payload[3] if len(payload) == 4 else False
            if type(delta) is not bool:
                raise CommandError("ingest: the delta flag must be a boolean")
            if not all(len(p) == 2 and all(type(x) is bytes for x in p) for p in puts):
                raise CommandError("ingest: puts must be (key, value) byte pairs")
            if not all(type(k) is bytes and k for k in deletes):
                raise CommandError("ingest: deletes must be keys")
            if not all(len(s) == 2 and type(s[0]) is int and 0 < s[0] < 1 << 64 and type(s[1]) is bytes
                       for s in sessions):
                raise CommandError("ingest: sessions must be (client id, record) pairs")
            for _, record in sessions:
                try:
                    decode_session(record)
                except (ValueError, StorageError) as exc:
                    raise CommandError(f"ingest: bad session record: {exc}") from None
            return ShardCommand(op, move_id, puts=tuple(tuple(p) for p in puts), deletes=tuple(deletes),
                                sessions=tuple(tuple(s) for s in sessions), delta=delta)
        if op in (ShardOp.IMPORT_ACTIVATE, ShardOp.EXPORT_FINISH):
            if type(payload) is not int or payload < 1:
                raise CommandError("shard command: epoch must be a positive integer")
            return ShardCommand(op, move_id, epoch=payload)
        if payload is not None:
            raise CommandError(f"{op.name} carries no payload")
        return ShardCommand(op, move_id)
    except (TypeError, ValueError, KeySpaceError) as exc:
        if isinstance(exc, CommandError):
            raise
        raise CommandError(f"malformed {op.name}: {exc}") from None
