"""The replicated command format: round trips, and strict rejection of
anything malformed (decoding runs on every replica, on bytes from the log)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardnode.storage import COMMAND_FORMAT_VERSION, Command, CommandError, CommandOp, decode_command, encode_command

U64_MAX = (1 << 64) - 1


def _raw(*fields: object) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def test_round_trip_put_and_delete() -> None:
    put = Command(CommandOp.PUT, b"key", b"value" * 100, client_id=U64_MAX, sequence=7, timestamp_ms=1_700_000_000_000)
    delete = Command(CommandOp.DELETE, b"\x00", None, client_id=0, sequence=0, timestamp_ms=0)
    for command in (put, delete):
        assert decode_command(encode_command(command)) == command
    assert decode_command(encode_command(put)).op is CommandOp.PUT


def test_encoding_is_compact() -> None:
    command = Command(CommandOp.PUT, b"k" * 16, b"v" * 100, client_id=2**63, sequence=1, timestamp_ms=1_700_000_000_000)
    # 7-element array: 1 byte header + version + op + bin(16) + bin(100) + three ints
    assert len(encode_command(command)) <= 1 + 1 + 1 + 18 + 102 + 9 + 1 + 9


def test_an_int_op_is_accepted_and_normalized() -> None:
    assert Command(1, b"k", b"v", 0, 0, 0).op is CommandOp.PUT  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",                                     # never-used msgpack byte
        b"\x93\x01",                                 # truncated
        _raw(COMMAND_FORMAT_VERSION, 1, b"k", b"v", 0, 0, 0) + b"\x00",  # trailing bytes
        msgpack.packb({"op": 1}),                    # a map
        msgpack.packb(42),
        _raw(COMMAND_FORMAT_VERSION, 1, b"k", b"v", 0, 0),                   # too short
        _raw(COMMAND_FORMAT_VERSION, 1, b"k", b"v", 0, 0, 0, 0),             # too long
        _raw(2, 1, b"k", b"v", 0, 0, 0),                                     # unknown version
        _raw(True, 1, b"k", b"v", 0, 0, 0),                                  # version as bool
        _raw(COMMAND_FORMAT_VERSION, 3, b"k", b"v", 0, 0, 0),                # unknown op
        _raw(COMMAND_FORMAT_VERSION, 0, b"k", b"v", 0, 0, 0),
        _raw(COMMAND_FORMAT_VERSION, True, b"k", b"v", 0, 0, 0),             # op as bool
        _raw(COMMAND_FORMAT_VERSION, "PUT", b"k", b"v", 0, 0, 0),
        _raw(COMMAND_FORMAT_VERSION, 1, "k", b"v", 0, 0, 0),                 # str key
        _raw(COMMAND_FORMAT_VERSION, 1, b"", b"v", 0, 0, 0),                 # empty key
        _raw(COMMAND_FORMAT_VERSION, 1, None, b"v", 0, 0, 0),
        _raw(COMMAND_FORMAT_VERSION, 1, b"k", None, 0, 0, 0),                # PUT without value
        _raw(COMMAND_FORMAT_VERSION, 1, b"k", "v", 0, 0, 0),                 # str value
        _raw(COMMAND_FORMAT_VERSION, 2, b"k", b"v", 0, 0, 0),                # DELETE with value
        _raw(COMMAND_FORMAT_VERSION, 1, b"k", b"v", -1, 0, 0),               # negative ids
        _raw(COMMAND_FORMAT_VERSION, 1, b"k", b"v", 0, -1, 0),
        _raw(COMMAND_FORMAT_VERSION, 1, b"k", b"v", 0, 0, -5),
        _raw(COMMAND_FORMAT_VERSION, 1, b"k", b"v", 1.5, 0, 0),              # float id
        _raw(COMMAND_FORMAT_VERSION, 1, b"k", b"v", False, 0, 0),            # bool id
        _raw(COMMAND_FORMAT_VERSION, 1, b"k", b"v", 9, 0, 0),                # session without sequence
        _raw(COMMAND_FORMAT_VERSION, 1, b"k", b"v", 0, 0, None),
        msgpack.packb([COMMAND_FORMAT_VERSION, 1, b"k", b"v", 0, 0, msgpack.ExtType(1, b"x")], use_bin_type=True),
        b"\x97\x01\x01\xa1\xff\xc4\x01v\x00\x00\x00",  # invalid UTF-8 in a str key
    ],
)
def test_malformed_input_raises_command_error(data: bytes) -> None:
    with pytest.raises(CommandError):
        decode_command(data)


@pytest.mark.parametrize("data", [None, "text", bytearray(b"\x90"), memoryview(b"\x90")])
def test_non_bytes_input_raises_command_error(data: object) -> None:
    with pytest.raises(CommandError):
        decode_command(data)  # type: ignore[arg-type]


def test_invalid_commands_cannot_be_constructed() -> None:
    with pytest.raises(CommandError):
        Command(CommandOp.PUT, b"k", None, 0, 0, 0)
    with pytest.raises(CommandError):
        Command(CommandOp.DELETE, b"k", b"v", 0, 0, 0)
    with pytest.raises(CommandError):
        Command(CommandOp.PUT, b"k", b"v", 1 << 64, 1, 0)
    with pytest.raises(CommandError):
        Command(7, b"k", b"v", 0, 0, 0)  # type: ignore[arg-type]
    assert issubclass(CommandError, ValueError)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise_command_error(data: bytes) -> None:
    try:
        command = decode_command(data)
    except CommandError:
        return
    assert encode_command(command) == data or decode_command(encode_command(command)) == command


_msgpack_atoms = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=U64_MAX),
    st.floats(allow_nan=False),
    st.binary(max_size=8),
    st.text(max_size=4),
)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.one_of(_msgpack_atoms, st.lists(_msgpack_atoms, max_size=2)),
        min_size=5,
        max_size=8,
    ),
    st.booleans(),
)
def test_arbitrary_msgpack_arrays_decode_or_raise_command_error(fields: list[object], pin_version: bool) -> None:
    if pin_version:
        fields[0] = COMMAND_FORMAT_VERSION
    data = msgpack.packb(fields, use_bin_type=True)
    try:
        command = decode_command(data)
    except CommandError:
        return
    assert decode_command(encode_command(command)) == command


@given(
    op=st.sampled_from(CommandOp),
    key=st.binary(min_size=1, max_size=64),
    value=st.binary(max_size=64),
    client_id=st.integers(min_value=0, max_value=U64_MAX),
    sequence=st.integers(min_value=1, max_value=U64_MAX),
    timestamp_ms=st.integers(min_value=0, max_value=U64_MAX),
)
def test_valid_commands_round_trip(
    op: CommandOp, key: bytes, value: bytes, client_id: int, sequence: int, timestamp_ms: int
) -> None:
    command = Command(op, key, None if op is CommandOp.DELETE else value, client_id, sequence, timestamp_ms,
                      expected=value[:3] if op is CommandOp.CAS and len(value) % 2 else None)
    assert decode_command(encode_command(command)) == command


def test_only_cas_carries_an_expected_value() -> None:
    cas = Command(CommandOp.CAS, b"k", b"new", 0, 0, 0, expected=None)   # "must be absent"
    assert decode_command(encode_command(cas)) == cas
    with pytest.raises(CommandError):
        Command(CommandOp.PUT, b"k", b"v", 0, 0, 0, expected=b"old")
    with pytest.raises(CommandError):
        Command(CommandOp.CAS, b"k", None, 0, 0, 0)
    import msgpack
    with pytest.raises(CommandError):     # a PUT with an 8th field
        decode_command(msgpack.packb((1, 1, b"k", b"v", 0, 0, 0, b"x")))
