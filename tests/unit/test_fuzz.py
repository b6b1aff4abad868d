"""Property-based fuzzing of what strangers can hand a node: peer frames,
snapshot streams, and cluster.toml. Bounded in `make test`; FUZZ_EXAMPLES=N
for a longer run (the router and worker RPCs are fuzzed in
tests/integration/test_fuzz_rpcs.py)."""

from __future__ import annotations

import asyncio
import copy
import tomllib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardnode.config import ClusterConfig, ConfigError
from shardnode.raft import ConfState, Entry, SnapshotMetadata
from shardnode.raft.messages import Message, MessageType, Snapshot
from shardnode.replica.peer_security import transport_security
from shardnode.storage import ReplicaStore, SnapshotDataError
from shardnode.storage.snapshot import CHUNK_FORMAT_VERSION, chunk_mismatch, decode_chunk, encode_chunk
from shardnode.transport import SNAPSHOT_METHOD, Frame, FrameError, RaftTransport, decode_frame, encode_frame

from ..fuzzing import examples

pytestmark = pytest.mark.timeout(300)

_FUZZ = settings(max_examples=examples(200), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.function_scoped_fixture])

# --------------------------------------------------------------------------- peer codec


def _valid_frame() -> bytes:
    entries = tuple(Entry(3, 11 + i, b"cmd-%d" % i) for i in range(3))
    return encode_frame(Frame("c", 0, 1, 2, (
        Message(MessageType.APP, to=2, from_=1, term=3, log_term=2, index=10, entries=entries, commit=9),
        Message(MessageType.HEARTBEAT, to=2, from_=1, term=3, commit=9),
        Message(MessageType.SNAP, to=2, from_=1, term=3,
                snapshot=Snapshot(SnapshotMetadata(40, 3, ConfState((1, 2, 3))), b"")),
    )))


_VALID = _valid_frame()
_VALID_FIELDS = msgpack.unpackb(_VALID)


def _assert_only_well_formed(data: bytes) -> None:
    """decode_frame either refuses with FrameError (and a reason) or returns a
    frame that keeps every rule a receiver relies on."""
    try:
        frame = decode_frame(data, max_bytes=1 << 16)
    except FrameError as exc:
        assert exc.reason in {"malformed", "too_large", "unknown_type", "bad_id", "bad_entries"}
        return
    assert frame.from_node >= 1 and frame.to_node >= 1
    for message in frame.messages:
        assert message.to == frame.to_node and message.from_ >= 1
        if message.entries:
            assert message.type is MessageType.APP
            assert [e.index for e in message.entries] == list(
                range(message.index + 1, message.index + 1 + len(message.entries)))
            terms = [e.term for e in message.entries]
            assert terms == sorted(terms) and message.log_term <= terms[0] and terms[-1] <= message.term
    assert decode_frame(encode_frame(frame)) == frame


@_FUZZ
@given(st.data())
def test_mutated_frames_are_refused_or_well_formed(data: st.DataObject) -> None:
    raw = bytearray(_VALID)
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "flip":
            raw[position] = data.draw(st.integers(0, 255))
        elif action == "insert":
            raw[position:position] = data.draw(st.binary(min_size=1, max_size=8))
        elif len(raw) > 1:
            del raw[position]
    _assert_only_well_formed(bytes(raw))


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.binary(max_size=8) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=5),
    max_leaves=12,
)


def _set_path(fields: list, path: list[int], value: object) -> None:
    node = fields
    for step in path[:-1]:
        if not isinstance(node, list) or not node:
            return
        node = node[step % len(node)]
    if isinstance(node, list) and node:
        node[path[-1] % len(node)] = value


@_FUZZ
@given(st.lists(st.tuples(st.lists(st.integers(0, 20), min_size=1, max_size=4), _values), min_size=1, max_size=4))
def test_frames_with_random_fields_are_refused_or_well_formed(changes: list[tuple[list[int], object]]) -> None:
    fields = copy.deepcopy(_VALID_FIELDS)
    for path, value in changes:
        _set_path(fields, path, value)
    _assert_only_well_formed(msgpack.packb(fields))


# --------------------------------------------------------------------------- snapshot stream

_METADATA = SnapshotMetadata(40, 3, ConfState((1, 2, 3)))
_GOOD_CHUNK = encode_chunk(_METADATA, [(0, b"key-1", b"v1"), (0, b"key-2", b"v2")], False)


@_FUZZ
@given(st.one_of(
    st.binary(max_size=200),
    st.builds(lambda v, i, t, last, recs: msgpack.packb((v, i, t, last, recs), use_bin_type=True),
              st.integers(0, 3) | _values, st.integers(0, 100) | _values, st.integers(0, 10) | _values,
              st.booleans() | _values, st.lists(st.tuples(st.integers(0, 3), st.binary(max_size=9),
                                                          st.binary(max_size=9)), max_size=4) | _values),
    st.binary(min_size=1, max_size=4).map(lambda tail: _GOOD_CHUNK[:-len(tail)] + tail),
))
def test_chunk_checks_agree_with_the_full_decoder(data: bytes) -> None:
    """The transport's header check (chunk_mismatch) never raises, and a chunk
    it lets through is either refused by the full decoder or is exactly of
    the header's snapshot."""
    problem = chunk_mismatch(_METADATA, data)
    assert problem is None or (isinstance(problem, str) and "\n" not in problem)
    try:
        chunk = decode_chunk(data)
    except SnapshotDataError:
        return
    if problem is None:
        assert (chunk.index, chunk.term) == (_METADATA.index, _METADATA.term)
    elif (chunk.index, chunk.term) == (_METADATA.index, _METADATA.term):
        pytest.fail(f"a chunk of the right snapshot refused: {problem}")


@pytest.fixture
def staging_store(tmp_path: Path):
    store = ReplicaStore.open(tmp_path / "target", initial_voters=(1, 2, 3))
    yield store
    store.close()


@settings(max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(
    st.binary(max_size=80),
    st.lists(st.tuples(st.integers(0, 3), st.binary(max_size=6), st.binary(max_size=10)), max_size=4).map(
        lambda records: msgpack.packb((CHUNK_FORMAT_VERSION, 40, 3, False, records), use_bin_type=True)),
), min_size=1, max_size=5))
def test_random_chunks_never_get_past_staging_unchecked(staging_store: ReplicaStore, chunks: list[bytes]) -> None:
    """Whatever chunks arrive, staging refuses with SnapshotDataError (a
    ValueError) or stages them; it never raises anything else, and a refused
    chunk changes nothing staged."""
    staging = staging_store.begin_snapshot(_METADATA)
    for data in chunks:
        before = (staging.position(), list(staging._engine.staging.view.items()))
        try:
            staging.write(data)
        except SnapshotDataError:
            assert (staging.position(), list(staging._engine.staging.view.items())) == before


def test_a_snapshot_stream_whose_chunks_do_not_match_is_refused_before_the_receiver() -> None:
    """Over the wire: a header for snapshot (40, 3), then a chunk of (41, 3)
    or of another format: refused as snapshot_mismatch, counted, and the
    receiver never sees the chunk."""

    async def main() -> None:
        seen: list[bytes] = []

        async def receive(header, chunks: AsyncIterator[bytes]) -> None:
            async for chunk in chunks:
                seen.append(chunk)

        cluster = ClusterConfig.from_dict({
            "cluster": {"name": "c", "replicas": 2, "groups": 1, "max_groups": 1},
            "host": [{"name": f"h{i}", "address": "127.0.0.1", "router_port": 20000 + i,
                      "worker_port_base": 20010 + 2 * i, "metrics_port": 20020 + i, "supervisor_port": 20030 + i}
                     for i in (1, 2)],
        })
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        security = transport_security(cluster, "h2", 0)
        transport = RaftTransport(cluster="c", group=0, node_id=2, peers={1: "127.0.0.1:1"}, deliver=lambda m: None,
                                  on_snapshot=receive, **security)
        transport.register(server)
        await server.start()
        async with AsyncExitStack() as stack:
            stack.push_async_callback(server.stop, None)
            stack.push_async_callback(transport.close)
            header = encode_frame(Frame("c", 0, 1, 2, (Message(
                MessageType.SNAP, to=2, from_=1, term=3, snapshot=Snapshot(_METADATA, b"")),)))
            foreign = encode_chunk(SnapshotMetadata(41, 3, ConfState((1, 2))), [(0, b"k", b"v")], True)
            for chunks in ([_GOOD_CHUNK, foreign], [b"\x93\x01\x02\x03"], [msgpack.packb((9, 40, 3, True, []))]):
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    call = channel.stream_unary(SNAPSHOT_METHOD)()
                    try:
                        await call.write(header)
                        for chunk in chunks:
                            await call.write(chunk)
                        await call.done_writing()
                        await call
                    except grpc.aio.AioRpcError:
                        pass
                    assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert (await call.details()).startswith("snapshot_mismatch")
        assert seen == [_GOOD_CHUNK]
        assert transport.stats.rejected_frames["snapshot_mismatch"] == 3

    asyncio.run(main())


# --------------------------------------------------------------------------- cluster.toml

_GOOD_TOML = """
[cluster]
name = "fuzz"
replicas = 3
groups = 2
data_dir = "/tmp/fuzz-data"
[timing]
tick_ms = 100
[storage]
wal_ttl_seconds = 0
[security]
tls = true
allowed_clients = ["client"]
[[host]]
name = "h1"
address = "127.0.0.1"
router_port = 50051
worker_port_base = 50100
metrics_port = 9090
[[host]]
name = "h2"
address = "127.0.0.2"
router_port = 50051
worker_port_base = 50100
metrics_port = 9090
[[host]]
name = "h3"
address = "127.0.0.3"
router_port = 50051
worker_port_base = 50100
metrics_port = 9090
"""
_GOOD_RAW = tomllib.loads(_GOOD_TOML)

_toml_values = st.recursive(
    st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


def _parse_is_clean(raw: dict) -> None:
    try:
        config = ClusterConfig.from_dict(raw, source=Path("/tmp/fuzz/cluster.toml"))
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message
        return
    assert config.hosts and 1 <= config.replicas <= len(config.hosts)
    assert isinstance(config.security.tls, bool)


@_FUZZ
@given(st.lists(st.tuples(st.sampled_from(["cluster", "timing", "storage", "security", "host"]),
                          st.text(max_size=20), _toml_values), min_size=1, max_size=4))
def test_cluster_toml_with_random_fields_parses_or_fails_in_one_line(changes) -> None:
    raw = copy.deepcopy(_GOOD_RAW)
    known = {
        "cluster": ["name", "replicas", "groups", "virtual_nodes", "data_dir", "snapshot_threshold",
                    "max_key_bytes", "max_value_bytes"],
        "timing": ["tick_ms", "election_ticks", "heartbeat_ticks"],
        "storage": ["wal_ttl_seconds", "wal_size_limit_mb"],
        "security": ["tls", "certs_dir", "ca_file", "client_cert_file", "client_key_file", "admin_file",
                     "allowed_clients"],
        "host": ["name", "address", "router_port", "worker_port_base", "metrics_port", "supervisor_port"],
    }
    for table, key, value in changes:
        # Mostly a known field with a random value, sometimes an unknown one or a whole table replaced.
        field = known[table][len(key) % len(known[table])] if len(key) % 5 else key
        target = raw.get(table)
        if table == "host" and isinstance(target, list) and target:
            target = target[len(key) % len(target)]
        if len(key) == 7:
            raw[table] = value
        elif isinstance(target, dict):
            target[field] = value
    _parse_is_clean(raw)


@_FUZZ
@given(st.text(max_size=300))
def test_any_text_as_cluster_toml_is_refused_in_one_line_or_loads(text: str) -> None:
    try:
        raw = tomllib.loads(_GOOD_TOML[: len(text) % len(_GOOD_TOML)] + text)
    except tomllib.TOMLDecodeError:
        return
    _parse_is_clean(raw)


def test_the_good_file_of_the_fuzzer_loads() -> None:
    config = ClusterConfig.from_dict(copy.deepcopy(_GOOD_RAW), source=Path("/tmp/fuzz/cluster.toml"))
    assert config.security.tls and len(config.hosts) == 3


def test_fuzz_examples_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUZZ_EXAMPLES", "20000")
    assert examples(10) == 20000
    monkeypatch.setenv("FUZZ_EXAMPLES", "lots")
    with pytest.raises(ValueError, match="FUZZ_EXAMPLES"):
        examples(10)
    monkeypatch.delenv("FUZZ_EXAMPLES")
    assert examples(10) == 10





@pytest.mark.parametrize("table, field, value", [
    ("cluster", "name", "fuzz\n"),
    ("host", "address", "127.0.0.1\n"),
    ("host", "name", "h1\n"),
    ("cluster", "colour\n", 1),
])
def test_what_the_fuzzer_found_stays_fixed(table: str, field: str, value: object) -> None:
    """`$` matches before a trailing newline: names and addresses are matched whole,
    and an unknown key with a newline is quoted in its one-line error."""
    raw = copy.deepcopy(_GOOD_RAW)
    (raw[table][0] if table == "host" else raw[table])[field] = value
    with pytest.raises(ConfigError) as error:
        ClusterConfig.from_dict(raw)
    assert "\n" not in str(error.value)
