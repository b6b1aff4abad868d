"""The replicated command format: what the data of a NORMAL Raft entry holds.

A command is encoded once by the leader and decoded by every replica when it
applies the entry, so decoding is a trust boundary: the bytes came over the
network and through the log, and a replica must reject anything malformed
(deterministically, the same way on every replica) instead of crashing or
applying something half-understood.

Wire shape (msgpack): a 7-element array
``(version, op, key, value, client_id, sequence, timestamp_ms)``, with keys
and values as msgpack ``bin``; a compare-and-set (used by the metadata
group) has an 8th element, the value the key must have (nil: absent), and
may have a 9th: guards, ``[[key, value or nil], ...]``, other keys that must
hold those values too (the placement scheduler conditions its writes on
holding the lease: a deposed scheduler's write changes nothing). A fixed-position array is the most compact
msgpack shape (no field names on the wire) and the version in front lets a
later format coexist with this one in old logs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import msgpack

from shardnode.errors import ShardnodeError

COMMAND_FORMAT_VERSION = 1
_U64_MAX = (1 << 64) - 1
_FIELD_COUNT = 7
_CAS_FIELD_COUNT = 8
_GUARDED_CAS_FIELD_COUNT = 9
#: Guards one compare-and-set may carry.
MAX_GUARDS = 8


class CommandError(ShardnodeError, ValueError):
    """A command that is malformed: wrong types, unknown op, missing value,
    an id out of range, or bytes that are not a command at all."""


class CommandOp(enum.IntEnum):
    PUT = 1
    DELETE = 2
    CAS = 3       # compare-and-set: value replaces the key's value if it equals `expected`
    TXN = 4       # an etcd transaction (etcd_ops.py) in `value`; `key` is one of its keys (for the session)


def _check_u64(name: str, value: object) -> int:
    # bool is an int subclass (and msgpack decodes true/false to it): refuse it.
    if type(value) is not int:
        raise CommandError(f"{name}: expected an integer, got {type(value).__name__}")
    if not 0 <= value <= _U64_MAX:
        raise CommandError(f"{name}: {value} is outside [0, 2**64)")
    return value


@dataclass(slots=True, frozen=True)
class Command:
    """One client write, as replicated through the log.

    `timestamp_ms` is the leader's wall clock when it proposed the command:
    the only clock the state machine ever sees, so every replica expires
    sessions at the same point of the log (see ReplicaStore.apply).

    Invariants (checked on construction, so an invalid Command cannot exist):
    op is a CommandOp; key is non-empty bytes; value is bytes for PUT and
    CAS and None for DELETE; `expected` (bytes, or None for "absent") only
    for CAS; ids are unsigned 64-bit; a command with a session
    (client_id != 0) has sequence >= 1.
    """

    op: CommandOp
    key: bytes
    value: bytes | None
    client_id: int
    sequence: int
    timestamp_ms: int
    expected: bytes | None = None
    # CAS only: other keys that must hold these values (None: absent) too.
    guards: tuple[tuple[bytes, bytes | None], ...] = ()

    def __post_init__(self) -> None:
        op = self.op
        if type(op) is not CommandOp:
            if type(op) is not int:
                raise CommandError(f"op: expected a CommandOp, got {type(op).__name__}")
            try:
                op = CommandOp(op)
            except ValueError:
                raise CommandError(f"op: unknown operation {op}") from None
            object.__setattr__(self, "op", op)
        if type(self.key) is not bytes:
            raise CommandError(f"key: expected bytes, got {type(self.key).__name__}")
        if not self.key:
            raise CommandError("key: must not be empty")
        if op is CommandOp.DELETE:
            if self.value is not None:
                raise CommandError("value: DELETE carries no value")
        elif type(self.value) is not bytes:
            raise CommandError(f"value: {op.name} needs bytes, got {type(self.value).__name__}")
        if op is CommandOp.CAS:
            if self.expected is not None and type(self.expected) is not bytes:
                raise CommandError(f"expected: bytes or absent, got {type(self.expected).__name__}")
        elif self.expected is not None or self.guards:
            raise CommandError("expected: only CAS compares")
        if self.guards:
            if type(self.guards) is not tuple or len(self.guards) > MAX_GUARDS:
                raise CommandError(f"guards: a tuple of at most {MAX_GUARDS} (key, value) pairs")
            for guard in self.guards:
                if (type(guard) is not tuple or len(guard) != 2 or type(guard[0]) is not bytes or not guard[0]
                        or (guard[1] is not None and type(guard[1]) is not bytes)):
                    raise CommandError("guards: each is (key bytes, value bytes or None)")
        _check_u64("client_id", self.client_id)
        _check_u64("sequence", self.sequence)
        _check_u64("timestamp_ms", self.timestamp_ms)
        if self.client_id != 0 and self.sequence == 0:
            raise CommandError("sequence: a client session numbers its commands from 1")


def encode_command(command: Command) -> bytes:
    """The bytes to propose. `command` is valid by construction."""
    fields: tuple = (
        COMMAND_FORMAT_VERSION,
        int(command.op),
        command.key,
        command.value,
        command.client_id,
        command.sequence,
        command.timestamp_ms,
    )
    if command.op is CommandOp.CAS:
        fields += (command.expected,)
        if command.guards:
            fields += ([list(g) for g in command.guards],)
    return msgpack.packb(fields, use_bin_type=True)


def decode_command(data: bytes) -> Command:
    """Decode entry data; raises CommandError (and nothing else) on anything
    that is not exactly a command of this format."""
    if type(data) is not bytes:
        raise CommandError(f"command data must be bytes, got {type(data).__name__}")
    try:
        fields = msgpack.unpackb(data, use_list=False, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise CommandError(f"not a msgpack document: {exc}") from None
    return command_from_fields(fields)


def command_from_fields(fields: object) -> Command:
    """A Command from a decoded msgpack array (see decode_command)."""
    if type(fields) is not tuple or len(fields) not in (_FIELD_COUNT, _CAS_FIELD_COUNT, _GUARDED_CAS_FIELD_COUNT):
        raise CommandError(f"expected a {_FIELD_COUNT}-element array")
    version, op, key, value, client_id, sequence, timestamp_ms = fields[:_FIELD_COUNT]
    if type(version) is not int or version != COMMAND_FORMAT_VERSION:
        raise CommandError(f"unsupported command format version {version!r}")
    if (len(fields) > _FIELD_COUNT) != (op == CommandOp.CAS):
        raise CommandError("only a CAS command has an expected value")
    guards: tuple = ()
    if len(fields) == _GUARDED_CAS_FIELD_COUNT:
        raw = fields[8]
        if type(raw) is not tuple or not all(type(g) is tuple and len(g) == 2 for g in raw):
            raise CommandError("guards: expected [[key, value], ...]")
        guards = tuple((g[0], g[1]) for g in raw)
    return Command(
        op=op,
        key=key,
        value=value,
        client_id=client_id,
        sequence=sequence,
        timestamp_ms=timestamp_ms,
        expected=fields[7] if len(fields) > _FIELD_COUNT else None,
        guards=guards,
    )
