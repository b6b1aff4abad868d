"""Raft messages on the wire: msgpack frames between the members of one group.

A frame is one batch of messages from one node to another. Everything is a
positional msgpack array (no field names on the wire), version first:

    frame    = [2, cluster: str, group, from_node, to_node,
                cluster_id, group_incarnation, sender_incarnation, [message, ...]]
    message  = [type, to, from_, term, log_term, index, entries, commit,
                snapshot, reject: bool, reject_hint, context: bin]
    entries  = [term, index, type, data: bin, term, index, type, data, ...]
    snapshot = nil | [index, term, voters, learners, voters_outgoing, data: bin,
                      removed, members, incarnations]
    members  = [node_id, host: str, address: str, node_id, host, address, ...]
    incarnations = [node_id, incarnation, node_id, incarnation, ...]

The header says who is talking (docs/security.md): the cluster's id (random,
made at its first start), the group's incarnation (random, made when the
group was placed) and the sender's incarnation (the life of its store); 0 is
"unknown". The receiver refuses a frame from another cluster or another life
of the group when both sides know theirs, and stamps the sender's
incarnation on each message whose `from_` is the frame's sender (the Raft
core checks it against the group's bindings).

Earlier shapes still decode: a version-1 frame `[1, cluster, group,
from_node, to_node, [message, ...]]` (every id unknown), and snapshot arrays
of 6 fields (no removed ids, no member addresses) or 8 (no incarnations).

Entries are one flat array, four items per entry: it saves an array header
per entry, and lets the decoder check each column (all terms, all indexes,
...) with a few C-level passes instead of a Python loop per field.

Messages are encoded one by one (`encode_message`) and joined behind a
pre-encoded header (`frame_prefix` + `join_frame`): the transport encodes a
message once, when it is queued, knows its exact size for batching, and builds
a frame with a single `bytes.join`.

`decode_frame` is the trust boundary: whatever bytes arrive, it returns a
fully validated `Frame` or raises `FrameError`, nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from operator import le as _le

import msgpack

from ..raft.messages import (
    LOCAL_MESSAGES,
    ConfState,
    Entry,
    EntryType,
    Member,
    Message,
    MessageType,
    Snapshot,
    SnapshotMetadata,
)

__all__ = [
    "FRAME_VERSION",
    "Frame",
    "FrameError",
    "JOIN_OVERHEAD",
    "decode_frame",
    "encode_frame",
    "encode_message",
    "frame_prefix",
    "join_frame",
]

FRAME_VERSION = 2
# The first version: no identity in the header (decoded as "unknown").
_FRAME_VERSION_1 = 1

# Every integer on the wire (ids, terms, indexes, hints) is in [0, 2**63):
# what a signed 64-bit field elsewhere (RocksDB keys, protobuf) can hold.
_INT_LIMIT = 1 << 63

# Message types that may travel: local ones (HUP, BEAT, PROPOSE, ...) are only
# ever stepped inside a node, and a peer that sends one is broken or hostile.
_WIRE_TYPES: dict[int, MessageType] = {int(t): t for t in MessageType if t not in LOCAL_MESSAGES}
_ENTRY_TYPES: dict[int, EntryType] = {int(t): t for t in EntryType}
_ENTRY_TYPE_VALUES = frozenset(_ENTRY_TYPES)
_INT_TYPE = frozenset({int})
_BYTES_TYPE = frozenset({bytes})

_MESSAGE_FIELDS = 12
_SNAPSHOT_FIELDS = 9
_SNAPSHOT_FIELDS_V2 = 8
_SNAPSHOT_FIELDS_V1 = 6
_FRAME_FIELDS = 9
_FRAME_FIELDS_V1 = 6

_packb = msgpack.packb


class FrameError(ValueError):
    """Bytes that are not a valid frame: not msgpack, a wrong shape or type,
    an unknown or local message type, a message not between the frame's two
    nodes, a node id 0, entries that do not follow their message's index, or
    too many bytes. `reason` names the kind, for metrics: `too_large`,
    `unknown_type`, `bad_id`, `bad_entries`, or `malformed` (anything else)."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True, frozen=True)
class Frame:
    """A batch of Raft messages from `from_node` to `to_node` of one group,
    with who sent it: the cluster's id, the group's incarnation and the
    sender's incarnation (0: unknown, as in a version-1 frame)."""

    cluster: str
    group: int
    from_node: int
    to_node: int
    messages: tuple[Message, ...]
    cluster_id: int = 0
    group_incarnation: int = 0
    incarnation: int = 0


# --------------------------------------------------------------------- encode


def encode_message(message: Message) -> bytes:
    """The msgpack encoding of one message, ready for `join_frame`.

    The input is trusted (the Raft core made it): it is not validated here,
    the receiver's `decode_frame` is where validation happens.
    """
    entries = message.entries
    if entries:
        flat: list[object] = []
        extend = flat.extend
        for entry in entries:
            extend((entry.term, entry.index, entry.type, entry.data))
    else:
        flat = []
    snapshot = message.snapshot
    if snapshot is None:
        encoded_snapshot = None
    else:
        metadata = snapshot.metadata
        conf_state = metadata.conf_state
        encoded_snapshot = (
            metadata.index,
            metadata.term,
            conf_state.voters,
            conf_state.learners,
            conf_state.voters_outgoing,
            snapshot.data,
            conf_state.removed,
            [field for m in conf_state.members for field in (m.node_id, m.host, m.address)],
            [value for pair in conf_state.incarnations for value in pair],
        )
    return _packb(
        (
            message.type,
            message.to,
            message.from_,
            message.term,
            message.log_term,
            message.index,
            flat,
            message.commit,
            encoded_snapshot,
            message.reject,
            message.reject_hint,
            message.context,
        )
    )


def frame_prefix(cluster: str, group: int, from_node: int, to_node: int, *, cluster_id: int = 0,
                 group_incarnation: int = 0, incarnation: int = 0) -> bytes:
    """The constant start of every frame between two nodes (computed once per
    peer, and again when this node learns its cluster's or group's id)."""
    return (b"\x99" + _packb(FRAME_VERSION) + _packb(cluster) + _packb(group) + _packb(from_node) + _packb(to_node)
            + _packb(cluster_id) + _packb(group_incarnation) + _packb(incarnation))


# The most bytes `join_frame` adds to the prefix and the messages (an array32 header).
JOIN_OVERHEAD = 5


def join_frame(prefix: bytes, encoded_messages: Sequence[bytes]) -> bytes:
    """A frame from a `frame_prefix` and messages from `encode_message`."""
    count = len(encoded_messages)
    if count < 16:
        header = bytes((0x90 | count,))
    elif count < 1 << 16:
        header = b"\xdc" + count.to_bytes(2, "big")
    else:
        header = b"\xdd" + count.to_bytes(4, "big")
    return b"".join((prefix, header, *encoded_messages))


def encode_frame(frame: Frame) -> bytes:
    """Encode a whole frame (see `frame_prefix` / `join_frame` for the incremental way)."""
    return join_frame(
        frame_prefix(frame.cluster, frame.group, frame.from_node, frame.to_node, cluster_id=frame.cluster_id,
                     group_incarnation=frame.group_incarnation, incarnation=frame.incarnation),
        [encode_message(message) for message in frame.messages],
    )


# --------------------------------------------------------------------- decode


def decode_frame(data: bytes, *, max_bytes: int = 64 << 20,
                 admit: Callable[[Frame], None] | None = None) -> Frame:
    """Decode and validate a frame; raise `FrameError` for anything malformed.

    The header (version, cluster, group, nodes, ids) is read first, on its
    own, and handed to `admit` (a `Frame` without messages), which raises
    FrameError to refuse it: a frame from a stranger costs its header only,
    never the decoding of its body. The body is then decoded with msgpack's
    limits sized to it, after a cheap check that it can hold as many
    messages as it announces.

    Checked: size, msgpack syntax, the exact shape and type of every field,
    integers in [0, 2**63), booleans and bytes where expected, known message
    and entry types, no local message type, a snapshot on SNAP messages and
    only there, and every message's `to` and `from_` equal to the frame's
    nodes. One exception: a TRANSFER_LEADER forwarded by a follower carries
    the transferee in `from_` (that is how the core names it), so its `from_`
    may be any node (and its incarnation is left unknown: it is not the
    sender's). A version-1 frame decodes with every id unknown (0).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FrameError(f"a frame is bytes, not {type(data).__name__}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_bytes:
        raise FrameError(f"frame of {size} bytes exceeds the limit of {max_bytes}", "too_large")
    header, body_offset = _decode_header(data)
    if admit is not None:
        admit(header)
    body = memoryview(data)[body_offset:]
    count = _array_length(body)
    if count * _SMALLEST_MESSAGE > len(body):
        raise FrameError(f"{count} messages cannot fit in {len(body)} bytes")
    # A message holds at most _ARRAYS_PER_MESSAGE arrays (itself, its entries,
    # a snapshot's six): more arrays than the announced messages can hold is
    # a bomb (empty arrays cost a byte each on the wire and a list each in
    # memory), stopped at the first array past the budget.
    arrays_left = 1 + count * _ARRAYS_PER_MESSAGE

    def count_array(items: list[object]) -> list[object]:
        nonlocal arrays_left
        arrays_left -= 1
        if arrays_left < 0:
            raise FrameError(f"more arrays than {count} messages hold")
        return items

    try:
        # No maps and no extension types exist in the format: refusing them
        # here also avoids unhashable-key and timestamp surprises. No string,
        # byte string or array can be longer than the body itself.
        raw_messages = msgpack.unpackb(body, raw=False, use_list=True, list_hook=count_array, max_map_len=0,
                                       max_ext_len=0, max_str_len=len(body), max_bin_len=len(body),
                                       max_array_len=len(body))
    except FrameError:
        raise
    except Exception as exc:  # msgpack raises ValueError subclasses; be total at the boundary
        raise FrameError(f"not msgpack: {exc}") from None
    if type(raw_messages) is not list:
        raise FrameError("messages is not an array")
    from_node, to_node, incarnation = header.from_node, header.to_node, header.incarnation
    messages = tuple([_decode_message(fields, from_node, to_node, incarnation) for fields in raw_messages])
    # The header becomes the frame: no one else holds it yet (`admit` only
    # read it), and a second frozen dataclass costs a microsecond per frame.
    object.__setattr__(header, "messages", messages)
    return header


# The most arrays a message holds: itself, its entries, and a snapshot
# (itself, voters, learners, outgoing voters, removed, members, incarnations).
_ARRAYS_PER_MESSAGE = 9
# The least bytes a message takes: an array header and 12 one-byte fields.
_SMALLEST_MESSAGE = 1 + _MESSAGE_FIELDS
_INT_WIDTHS = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_STR_WIDTHS = {0xD9: 1, 0xDA: 2}
_ARRAY_WIDTHS = {0xDC: 2, 0xDD: 4}


def _decode_header(data: bytes | bytearray | memoryview) -> tuple[Frame, int]:
    """The frame's header (a Frame without messages) and where its messages
    array starts. Read by hand, a field at a time: it holds a string and
    integers only, and anything else is refused before it is allocated."""
    view = memoryview(data)
    if not len(view):
        raise FrameError(f"a frame is an array of {_FRAME_FIELDS} fields")
    fields = view[0] - 0x90
    if fields not in (_FRAME_FIELDS, _FRAME_FIELDS_V1):
        raise FrameError(f"a frame is an array of {_FRAME_FIELDS} fields")
    values: list[object] = []
    offset = 1
    try:
        for _ in range(fields - 1):
            first = view[offset]
            if first <= 0x7F:
                values.append(first)
                offset += 1
            elif first in _INT_WIDTHS:
                width = _INT_WIDTHS[first]
                values.append(int.from_bytes(view[offset + 1:offset + 1 + width], "big"))
                offset += 1 + width
            elif 0xA0 <= first <= 0xBF or first in _STR_WIDTHS:
                if first <= 0xBF:
                    length, offset = first & 0x1F, offset + 1
                else:
                    width = _STR_WIDTHS[first]
                    length, offset = int.from_bytes(view[offset + 1:offset + 1 + width], "big"), offset + 1 + width
                if offset + length > len(view):
                    raise FrameError("a header string runs past the frame")
                values.append(bytes(view[offset:offset + length]).decode())
                offset += length
            else:
                # A negative number, a float, an array, ... where a string or an integer is due.
                raise FrameError(f"a header field of msgpack type 0x{first:02x}, not a string or an integer")
    except IndexError:
        raise FrameError("the frame ends inside its header") from None
    except UnicodeDecodeError:
        raise FrameError("cluster name is not UTF-8") from None
    version = values[0]
    expected = _FRAME_FIELDS_V1 if version == _FRAME_VERSION_1 else _FRAME_FIELDS
    if version not in (FRAME_VERSION, _FRAME_VERSION_1):
        raise FrameError(f"unsupported frame version {version!r} (this node speaks {FRAME_VERSION})")
    if fields != expected:
        raise FrameError(f"a version-{version} frame is an array of {expected} fields")
    if version == _FRAME_VERSION_1:
        _, cluster, group, from_node, to_node = values
        cluster_id = group_incarnation = incarnation = 0
    else:
        _, cluster, group, from_node, to_node, cluster_id, group_incarnation, incarnation = values
        if not _are_u63((cluster_id, group_incarnation, incarnation)):
            raise FrameError("cluster id, group incarnation and sender incarnation must be integers in [0, 2**63)")
    if type(cluster) is not str:
        raise FrameError("cluster name is not a string")
    if not _are_u63((group, from_node, to_node)):
        raise FrameError("group, from_node and to_node must be integers in [0, 2**63)")
    if from_node == 0 or to_node == 0:
        raise FrameError("node id 0 names no node", "bad_id")
    return Frame(cluster, group, from_node, to_node, (), cluster_id, group_incarnation, incarnation), offset


def _array_length(body: memoryview) -> int:
    """The length an msgpack array header at the start of `body` announces."""
    if not len(body):
        raise FrameError("messages is missing")
    first = body[0]
    if 0x90 <= first <= 0x9F:
        return first & 0x0F
    width = _ARRAY_WIDTHS.get(first)
    if width is None or len(body) < 1 + width:
        raise FrameError("messages is not an array")
    return int.from_bytes(body[1:1 + width], "big")


def _are_u63(values: Sequence[object]) -> bool:
    # `type(v) is int` and not isinstance: bool is an int subclass and never valid here.
    for value in values:
        if type(value) is not int or not 0 <= value < _INT_LIMIT:  # type: ignore[operator]
            return False
    return True


def _is_u63_column(column: list[object]) -> bool:
    """All items are ints in [0, 2**63); `column` is not empty. Runs at C speed."""
    return (
        set(map(type, column)) <= _INT_TYPE
        and min(column) >= 0  # type: ignore[type-var,operator]
        and max(column) < _INT_LIMIT  # type: ignore[type-var,operator]
    )


def _decode_message(fields: object, from_node: int, to_node: int, incarnation: int) -> Message:
    if type(fields) is not list or len(fields) != _MESSAGE_FIELDS:
        raise FrameError(f"a message is an array of {_MESSAGE_FIELDS} fields")
    (
        raw_type,
        to,
        from_,
        term,
        log_term,
        index,
        flat_entries,
        commit,
        raw_snapshot,
        reject,
        reject_hint,
        context,
    ) = fields
    if not _are_u63((raw_type, to, from_, term, log_term, index, commit, reject_hint)):
        raise FrameError("message integer fields must be integers in [0, 2**63)")
    message_type = _WIRE_TYPES.get(raw_type)
    if message_type is None:
        kind = "local" if raw_type in MessageType._value2member_map_ else "unknown"
        raise FrameError(f"{kind} message type {raw_type} cannot travel between nodes", "unknown_type")
    if to != to_node:
        raise FrameError(f"a message to {to} in a frame to {to_node}")
    if from_ != from_node and message_type is not MessageType.TRANSFER_LEADER:
        raise FrameError(f"a message from {from_} in a frame from {from_node}")
    if from_ == 0:
        raise FrameError("a message from node 0", "bad_id")
    if type(reject) is not bool:
        raise FrameError("reject is not a boolean")
    if type(context) is not bytes:
        raise FrameError("context is not bytes")
    entries = _decode_entries(flat_entries, message_type, term, log_term, index)
    if message_type is MessageType.SNAP:
        snapshot: Snapshot | None = _decode_snapshot(raw_snapshot)
    elif raw_snapshot is not None:
        raise FrameError(f"a {message_type.name} message carries a snapshot")
    else:
        snapshot = None
    return Message(
        message_type, to, from_, term, log_term, index, entries, commit, snapshot, reject, reject_hint, context,
        incarnation if from_ == from_node else 0,
    )


def _decode_entries(flat: object, message_type: MessageType, term: int, log_term: int,
                    index: int) -> tuple[Entry, ...]:
    if type(flat) is not list:
        raise FrameError("entries is not an array")
    if not flat:
        return ()
    if message_type is not MessageType.APP:
        raise FrameError(f"a {message_type.name} message carries entries", "bad_entries")
    if len(flat) % 4:
        raise FrameError("entries array length is not a multiple of 4")
    terms = flat[0::4]
    indexes = flat[1::4]
    types = flat[2::4]
    datas = flat[3::4]
    if not (_is_u63_column(terms) and _is_u63_column(indexes) and set(map(type, types)) <= _INT_TYPE):
        raise FrameError("entry term, index and type must be integers in [0, 2**63)")
    if not set(types) <= _ENTRY_TYPE_VALUES:
        raise FrameError(f"unknown entry type in {sorted(set(types) - _ENTRY_TYPE_VALUES)}")
    if not set(map(type, datas)) <= _BYTES_TYPE:
        raise FrameError("entry data is not bytes")
    # Entries are a piece of the leader's log: indexes one by one from the
    # message's index + 1, terms never falling, from at least log_term (the
    # term of the entry before them) to at most the leader's term. Anything
    # else would reach the log as a hole or a reordering. (C-level passes.)
    if indexes != list(range(index + 1, index + 1 + len(indexes))):
        raise FrameError(f"entries {indexes[:4]}... do not follow index {index} one by one", "bad_entries")
    if terms[0] < log_term or terms[-1] > term or not all(map(_le, terms, islice(terms, 1, None))):
        raise FrameError(f"entry terms out of order (log_term {log_term}, message term {term})", "bad_entries")
    return tuple(map(Entry, terms, indexes, datas, map(_ENTRY_TYPES.__getitem__, types)))


def _decode_ids(raw: object, name: str) -> tuple[int, ...]:
    if type(raw) is not list:
        raise FrameError(f"snapshot {name} is not an array")
    if raw and not _is_u63_column(raw):
        raise FrameError(f"snapshot {name} must be integers in [0, 2**63)")
    if 0 in raw:
        raise FrameError(f"snapshot {name} hold node id 0", "bad_id")
    return tuple(raw)  # type: ignore[arg-type]


def _decode_members(raw: object) -> tuple[Member, ...]:
    if type(raw) is not list or len(raw) % 3:
        raise FrameError("snapshot members must be an array of (node_id, host, address) triples")
    members = []
    for offset in range(0, len(raw), 3):
        node_id, host, address = raw[offset : offset + 3]
        if not _are_u63((node_id,)) or type(host) is not str or type(address) is not str:
            raise FrameError("a snapshot member is (node_id: int, host: str, address: str)")
        members.append(Member(node_id, host, address))
    return tuple(members)


def _decode_incarnations(raw: object) -> tuple[tuple[int, int], ...]:
    if type(raw) is not list or len(raw) % 2:
        raise FrameError("snapshot incarnations must be an array of (node_id, incarnation) pairs")
    if raw and not _is_u63_column(raw):
        raise FrameError("snapshot incarnations must be integers in [0, 2**63)")
    if 0 in raw:
        raise FrameError("snapshot incarnations hold a 0 (no node, or no incarnation)", "bad_id")
    return tuple(sorted(zip(raw[0::2], raw[1::2])))  # type: ignore[arg-type]


def _decode_snapshot(raw: object) -> Snapshot:
    if type(raw) is not list or len(raw) not in (_SNAPSHOT_FIELDS, _SNAPSHOT_FIELDS_V2, _SNAPSHOT_FIELDS_V1):
        raise FrameError(f"a SNAP message needs a snapshot array of {_SNAPSHOT_FIELDS} fields")
    index, term, voters, learners, voters_outgoing, data = raw[:_SNAPSHOT_FIELDS_V1]
    if not _are_u63((index, term)):
        raise FrameError("snapshot index and term must be integers in [0, 2**63)")
    if type(data) is not bytes:
        raise FrameError("snapshot data is not bytes")
    removed: tuple[int, ...] = ()
    members: tuple[Member, ...] = ()
    incarnations: tuple[tuple[int, int], ...] = ()
    if len(raw) >= _SNAPSHOT_FIELDS_V2:
        removed = _decode_ids(raw[6], "removed")
        members = _decode_members(raw[7])
    if len(raw) == _SNAPSHOT_FIELDS:
        incarnations = _decode_incarnations(raw[8])
    conf_state = ConfState(
        _decode_ids(voters, "voters"),
        _decode_ids(learners, "learners"),
        _decode_ids(voters_outgoing, "voters_outgoing"),
        removed,
        members,
        incarnations,
    )
    return Snapshot(SnapshotMetadata(index, term, conf_state), data)
