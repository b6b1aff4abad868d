"""The wire codec: round trips, strict validation, fuzzing, speed."""

import time

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardnode.raft.messages import (
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
from shardnode.transport import (
    FRAME_VERSION,
    Frame,
    FrameError,
    decode_frame,
    encode_frame,
    encode_message,
    frame_prefix,
    join_frame,
)

pytestmark = pytest.mark.timeout(30)

WIRE_TYPES = [t for t in MessageType if t not in LOCAL_MESSAGES]
MAX = (1 << 63) - 1

SNAPSHOT = Snapshot(
    SnapshotMetadata(
        index=120,
        term=7,
        conf_state=ConfState(
            voters=(1, 2, 3),
            learners=(4,),
            voters_outgoing=(1, 2, 5),
            removed=(6, 7),
            members=(Member(4, "host4", "127.0.0.4:50100"),),
        ),
    ),
    data=b"\x00descriptor\xff",
)
ENTRIES = (
    Entry(7, 11, b"put k v"),
    Entry(7, 12, b"", EntryType.NORMAL),
    Entry(7, 13, b"\x00" * 9 + b"ctx", EntryType.CONF_CHANGE),
)


def _frame(*messages: Message, from_node: int = 1, to_node: int = 2) -> Frame:
    return Frame("cluster-a", 7, from_node, to_node, tuple(messages))


def _full_message(mtype: MessageType) -> Message:
    """Every field set to a non-default value (the snapshot and entries only where they belong)."""
    app = mtype is MessageType.APP
    return Message(
        mtype,
        to=2,
        from_=1,
        term=9,
        log_term=7 if app else 8,
        index=10 if app else MAX,
        entries=ENTRIES if app else (),
        commit=10,
        snapshot=SNAPSHOT if mtype is MessageType.SNAP else None,
        reject=True,
        reject_hint=5,
        context=b"read-ctx-\x01",
    )


@pytest.mark.parametrize("mtype", WIRE_TYPES, ids=lambda t: t.name)
def test_every_wire_message_type_round_trips(mtype: MessageType) -> None:
    messages = [_full_message(mtype)]
    if mtype is not MessageType.SNAP:
        messages.append(Message(mtype, to=2, from_=1))  # all defaults
    for message in messages:
        frame = _frame(message)
        decoded = decode_frame(encode_frame(frame))
        assert decoded == frame
        assert type(decoded.messages[0].type) is MessageType
        assert all(type(e.type) is EntryType for e in decoded.messages[0].entries)


def test_frame_of_many_messages_and_empty_frame_round_trip() -> None:
    messages = tuple(_full_message(t) for t in WIRE_TYPES) * 3
    frame = _frame(*messages)
    assert decode_frame(encode_frame(frame)) == frame
    empty = _frame()
    assert decode_frame(encode_frame(empty)) == empty


@pytest.mark.parametrize("count", [0, 1, 15, 16, 65535, 65536])
def test_incremental_encoding_equals_whole_frame_encoding(count: int) -> None:
    message = Message(MessageType.HEARTBEAT, to=2, from_=1, term=3, commit=count)
    frame = _frame(*([message] * count))
    prefix = frame_prefix("cluster-a", 7, 1, 2)
    encoded = join_frame(prefix, [encode_message(message)] * count)
    assert encoded == encode_frame(frame)
    assert encoded == msgpack.packb(msgpack.unpackb(encoded))  # canonical msgpack, array headers included
    assert decode_frame(encoded) == frame


# --- Who is talking: frame version 2 ---------------------------------------------------------

IDS = {"cluster_id": 0x5EED_0001, "group_incarnation": 0x6A0F, "incarnation": MAX}


def test_the_frame_header_carries_the_cluster_group_and_sender_identity() -> None:
    message = Message(MessageType.HEARTBEAT, to=2, from_=1, term=3, commit=7)
    frame = Frame("cluster-a", 7, 1, 2, (message,), **IDS)
    decoded = decode_frame(encode_frame(frame))
    assert (decoded.cluster_id, decoded.group_incarnation, decoded.incarnation) == tuple(IDS.values())
    # The sender's incarnation is stamped on each of its messages (one per frame on the wire).
    assert decoded.messages == (Message(MessageType.HEARTBEAT, to=2, from_=1, term=3, commit=7,
                                        incarnation=IDS["incarnation"]),)
    prefix = frame_prefix("cluster-a", 7, 1, 2, **IDS)
    assert join_frame(prefix, [encode_message(message)]) == encode_frame(frame)


def test_a_forwarded_message_does_not_carry_the_forwarders_incarnation() -> None:
    # A follower forwards TRANSFER_LEADER with from_ = the transferee: the
    # frame's incarnation is the follower's, not the transferee's.
    frame = Frame("cluster-a", 7, 1, 2, (Message(MessageType.TRANSFER_LEADER, to=2, from_=3, term=4),), **IDS)
    assert decode_frame(encode_frame(frame)).messages[0].incarnation == 0


def test_a_version_1_frame_still_decodes_with_every_id_unknown() -> None:
    message = _full_message(MessageType.APP)
    v1 = msgpack.packb([1, "cluster-a", 7, 1, 2, [msgpack.unpackb(encode_message(message))]])
    decoded = decode_frame(v1)
    assert decoded == _frame(message)
    assert (decoded.cluster_id, decoded.group_incarnation, decoded.incarnation) == (0, 0, 0)


def test_snapshot_bindings_round_trip_and_earlier_snapshot_shapes_decode() -> None:
    bound = Snapshot(SnapshotMetadata(120, 7, ConfState(voters=(1, 2, 3), incarnations=((1, 11), (3, MAX)))), b"d")
    frame = _frame(Message(MessageType.SNAP, to=2, from_=1, term=7, snapshot=bound))
    assert decode_frame(encode_frame(frame)).messages[0].snapshot == bound
    eight = [120, 7, [1, 2, 3], [], [], b"d", [9], [4, "h4", "127.0.0.4:1"]]
    message = _message_fields(type=int(MessageType.SNAP), entries=[], snapshot=eight)
    conf = decode_frame(_raw(_frame_fields(messages=[message]))).messages[0].snapshot.metadata.conf_state
    assert conf.removed == (9,) and conf.members == (Member(4, "h4", "127.0.0.4:1"),) and conf.incarnations == ()


def test_encoding_is_compact() -> None:
    heartbeat = Message(MessageType.HEARTBEAT, to=2, from_=1, term=3, commit=1000)
    assert len(encode_message(heartbeat)) <= 16
    entry_overhead = len(encode_message(Message(MessageType.APP, to=2, from_=1, term=3, index=999,
                                                entries=(Entry(3, 1000, b"x" * 100),))))
    assert entry_overhead - len(encode_message(Message(MessageType.APP, to=2, from_=1, term=3, index=999))) <= 100 + 8


def test_transfer_leader_may_carry_the_transferee_as_sender() -> None:
    # A follower forwards TRANSFER_LEADER with from_ = the transferee (the core's convention).
    frame = _frame(Message(MessageType.TRANSFER_LEADER, to=2, from_=3, term=4))
    assert decode_frame(encode_frame(frame)) == frame


def _raw(fields: list) -> bytes:
    return msgpack.packb(fields)


def _message_fields(**overrides) -> list:
    fields = {
        "type": int(MessageType.APP),
        "to": 2,
        "from_": 1,
        "term": 1,
        "log_term": 1,
        "index": 1,
        "entries": [1, 2, 0, b"data"],
        "commit": 1,
        "snapshot": None,
        "reject": False,
        "reject_hint": 0,
        "context": b"",
    }
    fields.update(overrides)
    return list(fields.values())


def _frame_fields(messages: list | None = None, **overrides) -> list:
    fields = {"version": FRAME_VERSION, "cluster": "c", "group": 7, "from": 1, "to": 2,
              "cluster_id": 0, "group_incarnation": 0, "incarnation": 0}
    fields.update(overrides)
    return [*fields.values(), [_message_fields()] if messages is None else messages]


GOOD_SNAPSHOT = [5, 2, [1, 2, 3], [], [], b"img"]

REJECTED = {
    "not msgpack": b"\xc1",
    "truncated": encode_frame(_frame(_full_message(MessageType.APP)))[:-3],
    "trailing data": encode_frame(_frame()) + b"\x00",
    "a map": msgpack.packb({"version": 1}),
    "an ext type": msgpack.packb(msgpack.ExtType(5, b"xx")),
    "a timestamp": msgpack.packb(msgpack.Timestamp(1, 0)),
    "deep nesting": b"\x91" * 5000 + b"\x00",
    "invalid utf-8 cluster": b"\x96\x01\xa2\xff\xfe\x07\x01\x02\x90",
    "not an array": _raw(1),
    "short frame": _raw(_frame_fields()[:5]),
    "long frame": _raw([*_frame_fields(), 0]),
    "wrong version": _raw(_frame_fields(version=3)),
    "version 1 with identity": _raw(_frame_fields(version=1)),
    "version 2 without identity": _raw([FRAME_VERSION, "c", 7, 1, 2, []]),
    "negative cluster id": _raw(_frame_fields(cluster_id=-1)),
    "incarnation too large": _raw(_frame_fields(incarnation=1 << 63)),
    "group incarnation as bytes": _raw(_frame_fields(group_incarnation=b"\x01")),
    "bool version": _raw(_frame_fields(version=True)),
    "cluster as bytes": _raw(_frame_fields(cluster=b"c")),
    "negative group": _raw(_frame_fields(group=-1)),
    "group too large": _raw(_frame_fields(group=1 << 63)),
    "float node": _raw(_frame_fields(**{"from": 1.0})),
    "messages not array": _raw(_frame_fields(messages=b"")),
    "message not array": _raw(_frame_fields(messages=[5])),
    "short message": _raw(_frame_fields(messages=[_message_fields()[:11]])),
    "local type": _raw(_frame_fields(messages=[_message_fields(type=int(MessageType.PROPOSE))])),
    "unknown type": _raw(_frame_fields(messages=[_message_fields(type=99)])),
    "bool type": _raw(_frame_fields(messages=[_message_fields(type=True)])),
    "to not the frame's": _raw(_frame_fields(messages=[_message_fields(to=3)])),
    "from not the frame's": _raw(_frame_fields(messages=[_message_fields(from_=3)])),
    "negative term": _raw(_frame_fields(messages=[_message_fields(term=-1)])),
    "huge index": _raw(_frame_fields(messages=[_message_fields(index=1 << 63)])),
    "None commit": _raw(_frame_fields(messages=[_message_fields(commit=None)])),
    "bool hint": _raw(_frame_fields(messages=[_message_fields(reject_hint=False)])),
    "int reject": _raw(_frame_fields(messages=[_message_fields(reject=1)])),
    "str context": _raw(_frame_fields(messages=[_message_fields(context="ctx")])),
    "entries not array": _raw(_frame_fields(messages=[_message_fields(entries=b"")])),
    "entries not by 4": _raw(_frame_fields(messages=[_message_fields(entries=[1, 2, 0])])),
    "entry term negative": _raw(_frame_fields(messages=[_message_fields(entries=[-1, 2, 0, b""])])),
    "entry index bool": _raw(_frame_fields(messages=[_message_fields(entries=[1, True, 0, b""])])),
    "entry type unknown": _raw(_frame_fields(messages=[_message_fields(entries=[1, 2, 2, b""])])),
    "entry type bool": _raw(_frame_fields(messages=[_message_fields(entries=[1, 2, False, b""])])),
    "entry data str": _raw(_frame_fields(messages=[_message_fields(entries=[1, 2, 0, "d"])])),
    "entry data nil": _raw(_frame_fields(messages=[_message_fields(entries=[1, 2, 0, b"", 1, 3, 0, None])])),
    "snapshot on APP": _raw(_frame_fields(messages=[_message_fields(snapshot=GOOD_SNAPSHOT)])),
    "SNAP without snapshot": _raw(_frame_fields(messages=[_message_fields(type=int(MessageType.SNAP), entries=[])])),
    "snapshot short": _raw(
        _frame_fields(messages=[_message_fields(type=int(MessageType.SNAP), entries=[], snapshot=GOOD_SNAPSHOT[:5])])
    ),
    "snapshot voters not ints": _raw(
        _frame_fields(messages=[_message_fields(type=int(MessageType.SNAP), entries=[], snapshot=[5, 2, ["1"], [], [], b""])])
    ),
    "snapshot learners not array": _raw(
        _frame_fields(messages=[_message_fields(type=int(MessageType.SNAP), entries=[], snapshot=[5, 2, [1], 4, [], b""])])
    ),
    "snapshot incarnations odd": _raw(
        _frame_fields(messages=[_message_fields(type=int(MessageType.SNAP), snapshot=[*GOOD_SNAPSHOT, [], [], [4]])])
    ),
    "snapshot incarnations not ints": _raw(
        _frame_fields(messages=[_message_fields(type=int(MessageType.SNAP), snapshot=[*GOOD_SNAPSHOT, [], [], [4, "x"]])])
    ),
    "snapshot of 7 fields": _raw(
        _frame_fields(messages=[_message_fields(type=int(MessageType.SNAP), snapshot=[*GOOD_SNAPSHOT, []])])
    ),
    "snapshot removed not ints": _raw(
        _frame_fields(messages=[_message_fields(type=int(MessageType.SNAP), snapshot=[*GOOD_SNAPSHOT, [-1], []])])
    ),
    "snapshot members not triples": _raw(
        _frame_fields(messages=[_message_fields(type=int(MessageType.SNAP), snapshot=[*GOOD_SNAPSHOT, [], [4, "h"]])])
    ),
    "snapshot member address bytes": _raw(
        _frame_fields(
            messages=[_message_fields(type=int(MessageType.SNAP), snapshot=[*GOOD_SNAPSHOT, [], [4, "h", b"a"]])]
        )
    ),
    "snapshot data str": _raw(
        _frame_fields(messages=[_message_fields(type=int(MessageType.SNAP), entries=[], snapshot=[5, 2, [1], [], [], "x"])])
    ),
}

# Well-formed msgpack that breaks a rule of the protocol, with the reason a receiver counts.
REFUSED_WITH_REASON = {
    "entries with a gap": ("bad_entries", _frame_fields(messages=[_message_fields(
        entries=[1, 2, 0, b"a", 1, 4, 0, b"b"])])),
    "entries not from index + 1": ("bad_entries", _frame_fields(messages=[_message_fields(index=5)])),
    "entries repeated": ("bad_entries", _frame_fields(messages=[_message_fields(
        entries=[1, 2, 0, b"a", 1, 2, 0, b"b"])])),
    "entry terms falling": ("bad_entries", _frame_fields(messages=[_message_fields(
        term=3, entries=[2, 2, 0, b"a", 1, 3, 0, b"b"])])),
    "entry term above the message's": ("bad_entries", _frame_fields(messages=[_message_fields(
        term=1, entries=[2, 2, 0, b"a"])])),
    "entry term below log_term": ("bad_entries", _frame_fields(messages=[_message_fields(
        term=5, log_term=4, entries=[3, 2, 0, b"a"])])),
    "entries on a heartbeat": ("bad_entries", _frame_fields(messages=[_message_fields(
        type=int(MessageType.HEARTBEAT))])),
    "from node 0": ("bad_id", _frame_fields(messages=[], **{"from": 0})),
    "to node 0": ("bad_id", _frame_fields(messages=[], to=0)),
    "transfer from node 0": ("bad_id", _frame_fields(messages=[_message_fields(
        type=int(MessageType.TRANSFER_LEADER), from_=0, entries=[])])),
    "snapshot voter 0": ("bad_id", _frame_fields(messages=[_message_fields(
        type=int(MessageType.SNAP), entries=[], snapshot=[5, 2, [0, 1], [], [], b""])])),
    "unknown type": ("unknown_type", _frame_fields(messages=[_message_fields(type=99)])),
    "local type": ("unknown_type", _frame_fields(messages=[_message_fields(type=int(MessageType.HUP))])),
}


@pytest.mark.parametrize("case", list(REFUSED_WITH_REASON), ids=list(REFUSED_WITH_REASON))
def test_protocol_violations_are_refused_with_their_reason(case: str) -> None:
    reason, fields = REFUSED_WITH_REASON[case]
    with pytest.raises(FrameError) as error:
        decode_frame(_raw(fields))
    assert error.value.reason == reason


def test_a_frame_over_the_limit_is_refused_as_too_large() -> None:
    data = encode_frame(_frame(Message(MessageType.HEARTBEAT, to=2, from_=1)))
    with pytest.raises(FrameError) as error:
        decode_frame(data, max_bytes=len(data) - 1)
    assert error.value.reason == "too_large"


def test_the_rejection_table_is_built_on_a_valid_frame() -> None:
    good = decode_frame(_raw(_frame_fields()))
    assert good.messages[0].entries == (Entry(1, 2, b"data"),)
    snap_fields = _message_fields(type=int(MessageType.SNAP), entries=[], snapshot=GOOD_SNAPSHOT)
    snap = decode_frame(_raw(_frame_fields(messages=[snap_fields])))
    # GOOD_SNAPSHOT is the first (6-field) version: it still decodes.
    assert snap.messages[0].snapshot == Snapshot(SnapshotMetadata(5, 2, ConfState((1, 2, 3))), b"img")
    current = [*GOOD_SNAPSHOT, [9], [4, "host4", "127.0.0.4:1"]]
    snap_fields = _message_fields(type=int(MessageType.SNAP), entries=[], snapshot=current)
    snap = decode_frame(_raw(_frame_fields(messages=[snap_fields])))
    assert snap.messages[0].snapshot.metadata.conf_state == ConfState(
        (1, 2, 3), removed=(9,), members=(Member(4, "host4", "127.0.0.4:1"),)
    )


@pytest.mark.parametrize("data", list(REJECTED.values()), ids=list(REJECTED))
def test_malformed_frames_are_rejected(data: bytes) -> None:
    with pytest.raises(FrameError):
        decode_frame(data)


def test_size_limit_and_input_type() -> None:
    data = encode_frame(_frame(Message(MessageType.APP, to=2, from_=1, term=1, entries=(Entry(1, 1, b"x" * 1000),))))
    assert decode_frame(data, max_bytes=len(data)).messages
    with pytest.raises(FrameError, match="exceeds"):
        decode_frame(data, max_bytes=len(data) - 1)
    assert decode_frame(memoryview(data)) == decode_frame(bytearray(data))
    with pytest.raises(FrameError):
        decode_frame("not bytes")  # type: ignore[arg-type]
    with pytest.raises(FrameError):
        decode_frame(None)  # type: ignore[arg-type]


def test_frame_error_is_a_value_error() -> None:
    assert issubclass(FrameError, ValueError)


# ------------------------------------------------------------------ property tests

_u63 = st.integers(min_value=0, max_value=MAX)
_small = st.integers(min_value=0, max_value=1000)
_ids1 = st.integers(min_value=1, max_value=MAX)
_ids = st.lists(_ids1, max_size=5).map(tuple)
_entries = st.lists(
    st.builds(Entry, term=_u63, index=_u63, data=st.binary(max_size=40), type=st.sampled_from(EntryType)),
    max_size=6,
).map(tuple)
_snapshots = st.builds(
    Snapshot,
    metadata=st.builds(
        SnapshotMetadata,
        index=_u63,
        term=_u63,
        conf_state=st.builds(
            ConfState,
            _ids,
            _ids,
            _ids,
            _ids,
            st.lists(st.builds(Member, st.integers(min_value=1, max_value=MAX), st.text(max_size=8), st.text(max_size=12)),
                     max_size=3).map(tuple),
        ),
    ),
    data=st.binary(max_size=40),
)


@st.composite
def _log_piece(draw) -> tuple[int, int, int, tuple[Entry, ...]]:
    """(term, log_term, index, entries) of a valid APP: entries follow index
    one by one, terms never fall, between log_term and term."""
    term = draw(_u63)
    log_term = draw(st.integers(min_value=0, max_value=term))
    index = draw(st.integers(min_value=0, max_value=MAX - 10))
    count = draw(st.integers(min_value=0, max_value=6))
    terms = sorted(draw(st.lists(st.integers(min_value=log_term, max_value=term), min_size=count,
                                 max_size=count)))
    entries = tuple(Entry(t, index + 1 + i, draw(st.binary(max_size=40)), draw(st.sampled_from(EntryType)))
                    for i, t in enumerate(terms))
    return term, log_term, index, entries


@st.composite
def _messages(draw, from_node: int = 1, to_node: int = 2) -> Message:
    mtype = draw(st.sampled_from(WIRE_TYPES))
    if mtype is MessageType.APP:
        term, log_term, index, entries = draw(_log_piece())
    else:
        term, log_term, index, entries = draw(_u63), draw(_small | _u63), draw(_u63), ()
    return Message(
        mtype,
        to=to_node,
        from_=draw(_ids1) if mtype is MessageType.TRANSFER_LEADER else from_node,
        term=term,
        log_term=log_term,
        index=index,
        entries=entries,
        commit=draw(_u63),
        snapshot=draw(_snapshots) if mtype is MessageType.SNAP else None,
        reject=draw(st.booleans()),
        reject_hint=draw(_small),
        context=draw(st.binary(max_size=20)),
    )


@st.composite
def _frames(draw) -> Frame:
    from_node = draw(st.integers(min_value=1, max_value=MAX))
    to_node = draw(st.integers(min_value=1, max_value=MAX))
    return Frame(
        draw(st.text(max_size=20)),
        draw(_u63),
        from_node,
        to_node,
        tuple(draw(st.lists(_messages(from_node, to_node), max_size=5))),
    )


@settings(max_examples=300, deadline=None)
@given(_frames())
def test_any_valid_frame_round_trips(frame: Frame) -> None:
    assert decode_frame(encode_frame(frame)) == frame


def _decode_or_frame_error(data: bytes) -> None:
    try:
        frame = decode_frame(data)
    except FrameError:
        return
    # Whatever is accepted is a well-formed frame that encodes back to the same value.
    assert decode_frame(encode_frame(frame)) == frame


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_frame_error(data: bytes) -> None:
    _decode_or_frame_error(data)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_frames(), st.data())
def test_mutated_frames_raise_only_frame_error(frame: Frame, data: st.DataObject) -> None:
    encoded = bytearray(encode_frame(frame))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        action = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        position = data.draw(st.integers(min_value=0, max_value=max(len(encoded) - 1, 0)))
        if action == "flip" and encoded:
            encoded[position] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "set" and encoded:
            encoded[position] = data.draw(st.integers(0, 255))
        elif action == "insert":
            encoded[position:position] = data.draw(st.binary(min_size=1, max_size=9))
        elif action == "delete" and encoded:
            del encoded[position : position + data.draw(st.integers(1, 9))]
        elif action == "truncate":
            del encoded[position:]
    _decode_or_frame_error(bytes(encoded))


_any_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats()
    | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=2),
    max_leaves=10,
)


def _replace_a_leaf(tree, path: list[int], value):
    if not path or not isinstance(tree, list) or not tree:
        return value
    index = path[0] % len(tree)
    copy = list(tree)
    copy[index] = _replace_a_leaf(copy[index], path[1:], value)
    return copy


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_frames(), st.lists(st.integers(min_value=0, max_value=100), max_size=6), _any_value)
def test_structurally_mutated_frames_raise_only_frame_error(frame: Frame, path: list[int], value) -> None:
    # Byte flips rarely get past msgpack; replacing one node of the decoded tree
    # with any msgpack value reaches every field check.
    tree = msgpack.unpackb(encode_frame(frame))
    _decode_or_frame_error(msgpack.packb(_replace_a_leaf(tree, path, value)))


# ------------------------------------------------------------------ speed


def _measure(frame: Frame, rounds: int) -> tuple[float, float, int]:
    encoded = encode_frame(frame)
    start = time.perf_counter()
    for _ in range(rounds):
        encode_frame(frame)
    encode_seconds = (time.perf_counter() - start) / rounds
    start = time.perf_counter()
    for _ in range(rounds):
        decode_frame(encoded)
    decode_seconds = (time.perf_counter() - start) / rounds
    return encode_seconds, decode_seconds, len(encoded)


def test_codec_speed(capsys: pytest.CaptureFixture[str]) -> None:
    heartbeat = Message(MessageType.HEARTBEAT, to=2, from_=1, term=12, commit=4096)
    entries = tuple(Entry(12, 1000 + i, b"v" * 100) for i in range(64))
    append = Message(MessageType.APP, to=2, from_=1, term=12, log_term=12, index=999, entries=entries, commit=990)
    small = _measure(_frame(heartbeat), 2000)
    big = _measure(_frame(*[append] * 64), 10)
    with capsys.disabled():
        print(
            f"\ncodec: 1 heartbeat: {small[2]} B, encode {small[0] * 1e6:.1f} us, decode {small[1] * 1e6:.1f} us; "
            f"64 APP x 64 entries x 100 B: {big[2]} B, encode {big[0] * 1e3:.2f} ms, decode {big[1] * 1e3:.2f} ms"
        )
    # Generous bounds (shared CI machines): a heartbeat must stay cheap, and a
    # 400 KB frame must not take longer than a tick.
    assert small[0] + small[1] < 200e-6
    assert big[0] + big[1] < 100e-3


# --- The header first (issue 20: a decode bomb) -------------------------------------------------------


def _bomb(empty_arrays: int) -> bytes:
    """A frame whose messages are `empty_arrays` empty msgpack arrays (one
    byte each on the wire, a Python list each once decoded)."""
    return frame_prefix("c", 0, 1, 2) + b"\xdd" + empty_arrays.to_bytes(4, "big") + b"\x90" * empty_arrays


def test_a_refused_header_costs_no_decoding_of_the_body() -> None:
    import tracemalloc

    data = _bomb(8 << 20)

    def admit(header: Frame) -> None:
        assert (header.cluster, header.group, header.from_node, header.to_node) == ("c", 0, 1, 2)
        assert header.messages == ()
        raise FrameError("not from here", "wrong_cluster")

    tracemalloc.start()
    try:
        began = time.perf_counter()
        with pytest.raises(FrameError) as refused:
            decode_frame(data, max_bytes=16 << 20, admit=admit)
        took = time.perf_counter() - began
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.reason == "wrong_cluster"
    # The old decoder unpacked all 8 M arrays first: over 500 MB and seconds.
    assert peak < 1 << 20, peak
    assert took < 0.1, took


def test_a_body_that_cannot_hold_its_messages_is_refused_before_it_is_unpacked() -> None:
    # 2 M messages announced, 2 M bytes of body: a message takes at least 13 bytes.
    with pytest.raises(FrameError, match="cannot fit"):
        decode_frame(_bomb(2 << 20))


@pytest.mark.parametrize("header, message", [
    (b"\x99\x02\x91\x01", "msgpack type 0x91"),                # an array where the cluster name is due
    (b"\x99\x02\xa1c\xff", "msgpack type 0xff"),               # a negative number as the group
    (b"\x99\x02\xdb\xff\xff\xff\xff", "msgpack type 0xdb"),    # a 4 GiB string announced
    (b"\x99\x02\xa5ab", "runs past the frame"),
    (b"\x99\x02", "ends inside its header"),
    (b"\x93\x02", "array of 9 fields"),
])
def test_a_bad_header_is_refused_before_anything_is_allocated(header: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        decode_frame(header)


def test_an_admitted_frame_cannot_hold_more_arrays_than_its_messages() -> None:
    """One APP message whose entries are 4 M empty arrays: a sender that got
    past the header (without TLS, anyone naming a node id above the members')
    made the old decoder build 4 M lists (over 250 MB); it stops at the first
    array past what one message can hold."""
    import tracemalloc

    arrays = 4 << 20
    entries = b"\xdd" + arrays.to_bytes(4, "big") + b"\x90" * arrays
    message = b"\x9c" + bytes([int(MessageType.APP), 2, 1, 1, 0, 0]) + entries + b"\x00\xc0\xc2\x00\xc4\x00"
    data = frame_prefix("c", 0, 1, 2) + b"\x91" + message
    tracemalloc.start()
    try:
        with pytest.raises(FrameError, match="more arrays than 1 messages hold"):
            decode_frame(data, max_bytes=16 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
