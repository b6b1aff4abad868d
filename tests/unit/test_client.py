"""shardnode.client.Client against fake routers.

`FakeRouter` is an in-process gRPC server implementing kv.proto's KV service
over a `FakeStore` (an in-memory dict with the servers' session semantics:
a write's (client_id, sequence) is applied once, a retry gets the original
answer, an older sequence is refused with FAILED_PRECONDITION). Several fake
routers can share one store, like the routers of one cluster. A router can be
told to fail (UNAVAILABLE, DEADLINE_EXCEEDED, a lost response, a crash, a
hang) so that fail-over and retries can be tested; the store records session
misuse (two different writes in flight on one session, a sequence going
backwards) in `violations`.

The client sends every operation on the router's BatchStream (many to a
message); the fake router runs each operation of the stream through the
same handler as its unary call, faults included, concurrently. With
`streaming = False` it answers BatchStream UNIMPLEMENTED, as an older router
would, and the client falls back to one unary call per operation.

test_kv739.py and test_cli.py import FakeRouter and FakeStore from here.
"""

from __future__ import annotations

import collections
import math
import queue
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from shardnode.client import (Client, DeadlineExceeded, InvalidArgument, NoQuorum, RoutersUnreachable, ShardnodeError,
                              Unavailable)
from shardnode.client.sessions import SessionPool
from shardnode.config import ClusterConfig
from shardnode.proto import kv_pb2, kv_pb2_grpc
from shardnode.testing.linearizability import HistoryRecorder, OpKind, check_history

pytestmark = pytest.mark.timeout(60)

MAX_KEY = 4096
MAX_VALUE = 1 << 20


def free_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeStore:
    """The data and sessions shared by fake routers, with session checks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.data: dict[bytes, bytes] = {}
        # client_id -> (last sequence applied, the answer it got)
        self.sessions: dict[int, tuple[int, Any]] = {}
        # client_id -> sequence -> attempts of that write now in the server
        self.in_flight: dict[int, collections.Counter[int]] = collections.defaultdict(collections.Counter)
        self.highest_seen: dict[int, int] = {}
        self.violations: list[str] = []
        self.applied = 0
        self.write_log: list[tuple[int, int]] = []      # (client_id, sequence) of every write received

    def enter(self, client_id: int, sequence: int) -> None:
        with self.lock:
            self.write_log.append((client_id, sequence))
            if client_id == 0:
                return
            if sequence == 0:
                self.violations.append(f"session {client_id:#x} used sequence 0")
            others = [s for s, n in self.in_flight[client_id].items() if n and s != sequence]
            if others:
                self.violations.append(f"session {client_id:#x}: write {sequence} while {others} in flight")
            if sequence < self.highest_seen.get(client_id, 0):
                self.violations.append(f"session {client_id:#x}: sequence {sequence} after "
                                       f"{self.highest_seen[client_id]}")
            self.highest_seen[client_id] = max(sequence, self.highest_seen.get(client_id, 0))
            self.in_flight[client_id][sequence] += 1

    def leave(self, client_id: int, sequence: int) -> None:
        if client_id:
            with self.lock:
                self.in_flight[client_id][sequence] -= 1

    def write(self, client_id: int, sequence: int, apply: Callable[[], Any], context: grpc.ServicerContext) -> Any:
        """Apply once per (client_id, sequence), as the workers' state machine does."""
        with self.lock:
            if client_id:
                last = self.sessions.get(client_id)
                if last is not None and sequence == last[0]:
                    return last[1]
                if last is not None and sequence < last[0]:
                    stale = True
                else:
                    stale = False
                    result = apply()
                    self.applied += 1
                    self.sessions[client_id] = (sequence, result)
                    return result
            else:
                result = apply()
                self.applied += 1
                return result
        if stale:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"session sequence {sequence} is stale")
        raise AssertionError("unreachable")


def default_status(cluster: str = "fake") -> kv_pb2.StatusResponse:
    def replica(host: str, node: int, role: str, reachable: bool = True, lag: int = 0) -> kv_pb2.ReplicaStatus:
        return kv_pb2.ReplicaStatus(host=host, node_id=node, address=f"127.0.0.{node}:50100",
                                    reachable=reachable, role=role if reachable else "", term=3 if reachable else 0,
                                    commit_index=10 if reachable else 0, applied_index=10 if reachable else 0,
                                    last_index=10 + lag if reachable else 0, lag=lag)
    return kv_pb2.StatusResponse(
        cluster=cluster, router_host="host1", shard_map_epoch=1,
        groups=[
            kv_pb2.GroupStatus(group=0, leader_id=1, has_quorum=True, share=0.625, replicas=[
                replica("host1", 1, "leader"), replica("host2", 2, "follower"),
                replica("host3", 3, "follower", lag=2)]),
            kv_pb2.GroupStatus(group=1, leader_id=0, has_quorum=False, share=0.375, replicas=[
                replica("host2", 2, "candidate"), replica("host3", 3, "follower", reachable=False),
                replica("host1", 1, "follower", reachable=False)]),
        ])


class FakeRouter(kv_pb2_grpc.KVServicer):
    """A router on 127.0.0.1 serving a FakeStore.

    `faults` is a queue of actions, one consumed per request (any method);
    `default_fault` applies when the queue is empty; `key_faults[key]`, before
both, to every request on that key. Actions:
    "unavailable", "deadline" (DEADLINE_EXCEEDED with time left), "invalid",
    "stale" (FAILED_PRECONDITION), "internal", "limit" (RESOURCE_EXHAUSTED naming a limit), "drop" (apply, then answer
    UNAVAILABLE: the response is lost), "crash" (apply, then the server
    stops), "hang" (wait out the caller's deadline), "slow" (a few ms),
    "no_quorum" (UNAVAILABLE with the cause in trailing metadata, as the
    real router answers when the key's group has no majority).
    """

    def __init__(self, store: FakeStore | None = None) -> None:
        self.store = store if store is not None else FakeStore()
        self.faults: collections.deque[str] = collections.deque()
        self.default_fault: str | None = None
        self.key_faults: dict[bytes, str] = {}      # a fault for every request on that key
        self.calls: collections.Counter[str] = collections.Counter()
        self.status_response = default_status()
        self.port = 0
        self._server: grpc.Server | None = None
        self._calls_lock = threading.Lock()
        self.streaming = True
        self.streams = 0                        # BatchStream calls opened
        self.message_sizes: list[int] = []      # operations per BatchStream request message
        self.waited_for_quorum: list[bool] = []  # each stream operation's wait_for_quorum
        self._operations: futures.ThreadPoolExecutor | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "FakeRouter":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        self._operations = futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="fake-op")
        kv_pb2_grpc.add_KVServicer_to_server(self, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        assert self.port, "could not bind the fake router"
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop(0).wait(5)
        if self._operations is not None:
            self._operations.shutdown(wait=False, cancel_futures=True)

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    # --- helpers -------------------------------------------------------------------

    def _fault(self, method: str, key: bytes | None = None) -> str | None:
        with self._calls_lock:
            self.calls[method] += 1
            if key is not None and key in self.key_faults:
                return self.key_faults[key]
            if self.faults:
                return self.faults.popleft()
            return self.default_fault

    @staticmethod
    def _before(fault: str | None, context: grpc.ServicerContext) -> None:
        if fault == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, "group 0 has no leader")
        if fault == "no_quorum":
            context.set_trailing_metadata((("shardnode-cause", "no_quorum"), ("shardnode-group", "3")))
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          "no quorum in group 3: 2 of 3 replicas unreachable (h1:1, h3:1)")
        if fault == "deadline":
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "worker did not answer in time")
        if fault == "invalid":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "key must be 1 to 4096 bytes (got 0)")
        if fault == "stale":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "session sequence is stale")
        if fault == "internal":
            context.abort(grpc.StatusCode.INTERNAL, "boom")
        if fault == "limit":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          "limits.max_forwarder_queue (10) exceeded: 10 operations wait for group 0")
        if fault == "hang":
            end = time.monotonic() + (context.time_remaining() or 10.0)
            while context.is_active() and time.monotonic() < end:
                time.sleep(0.01)
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "hung")
        if fault == "slow":
            time.sleep(random.uniform(0, 0.003))

    def _after(self, fault: str | None, context: grpc.ServicerContext) -> None:
        if fault == "drop":
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost (simulated)")
        if fault == "crash":
            server = self._server
            if server is not None:
                server.stop(0)          # not waited for: this handler runs inside it
            end = time.monotonic() + 1.0
            while context.is_active() and time.monotonic() < end:
                time.sleep(0.005)       # the server cuts the call: the client never gets an answer

    @staticmethod
    def _check(key: bytes, value: bytes, context: grpc.ServicerContext) -> None:
        if not 1 <= len(key) <= MAX_KEY:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"key must be 1 to {MAX_KEY} bytes (got {len(key)})")
        if len(value) > MAX_VALUE:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"value must be at most {MAX_VALUE} bytes")

    # --- KV service ------------------------------------------------------------------

    def Put(self, request: kv_pb2.PutRequest, context: grpc.ServicerContext) -> kv_pb2.PutResponse:
        fault = self._fault("Put", request.key)
        session = request.session
        self.store.enter(session.client_id, session.sequence)
        try:
            self._before(fault, context)
            self._check(request.key, request.value, context)
            data = self.store.data

            def apply() -> kv_pb2.PutResponse:
                old = data.get(request.key)
                data[request.key] = request.value
                return kv_pb2.PutResponse(existed=old is not None, old_value=old or b"")

            response = self.store.write(session.client_id, session.sequence, apply, context)
            self._after(fault, context)
            return response
        finally:
            self.store.leave(session.client_id, session.sequence)

    def Delete(self, request: kv_pb2.DeleteRequest, context: grpc.ServicerContext) -> kv_pb2.DeleteResponse:
        fault = self._fault("Delete", request.key)
        session = request.session
        self.store.enter(session.client_id, session.sequence)
        try:
            self._before(fault, context)
            self._check(request.key, b"", context)
            data = self.store.data

            def apply() -> kv_pb2.DeleteResponse:
                old = data.pop(request.key, None)
                return kv_pb2.DeleteResponse(existed=old is not None, old_value=old or b"")

            response = self.store.write(session.client_id, session.sequence, apply, context)
            self._after(fault, context)
            return response
        finally:
            self.store.leave(session.client_id, session.sequence)

    def Get(self, request: kv_pb2.GetRequest, context: grpc.ServicerContext) -> kv_pb2.GetResponse:
        fault = self._fault("Get", request.key)
        self._before(fault, context)
        self._check(request.key, b"", context)
        with self.store.lock:
            value = self.store.data.get(request.key)
        self._after(fault, context)
        return kv_pb2.GetResponse(found=value is not None, value=value or b"")

    def BatchStream(self, requests: Iterator[kv_pb2.BatchRequest],
                    context: grpc.ServicerContext) -> Iterator[kv_pb2.BatchResponse]:
        if not self.streaming:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        with self._calls_lock:
            self.streams += 1
        replies: queue.Queue[kv_pb2.BatchResult | int] = queue.Queue()

        def run(op: kv_pb2.BatchOperation) -> None:
            replies.put(self._one(op, context))

        def read() -> None:
            received = 0
            try:
                for request in requests:
                    with self._calls_lock:
                        self.message_sizes.append(len(request.operations))
                    for op in request.operations:
                        received += 1
                        assert self._operations is not None
                        self._operations.submit(run, op)
            except Exception:       # the stream was cut
                pass
            replies.put(received)   # the caller sends no more: this many to answer

        threading.Thread(target=read, daemon=True).start()
        expected: int | None = None
        answered = 0
        while (expected is None or answered < expected) and context.is_active():
            try:
                item = replies.get(timeout=0.05)
            except queue.Empty:
                continue
            if isinstance(item, int):
                expected = item
                continue
            results = [item]
            while True:             # everything ready leaves in one message
                try:
                    more = replies.get_nowait()
                except queue.Empty:
                    break
                if isinstance(more, int):
                    expected = more
                else:
                    results.append(more)
            answered += len(results)
            yield kv_pb2.BatchResponse(results=results)

    def _one(self, op: kv_pb2.BatchOperation, stream: grpc.ServicerContext) -> kv_pb2.BatchResult:
        """One operation of a stream, through its unary handler."""
        with self._calls_lock:
            self.waited_for_quorum.append(op.wait_for_quorum)
        context = _OperationContext(stream, op.timeout_ms)
        try:
            if op.kind == kv_pb2.BatchOperation.GET:
                got = self.Get(kv_pb2.GetRequest(key=op.key, allow_stale=op.allow_stale), context)
                return kv_pb2.BatchResult(id=op.id, existed=got.found, value=got.value)
            if op.kind == kv_pb2.BatchOperation.PUT:
                put = self.Put(kv_pb2.PutRequest(key=op.key, value=op.value, session=op.session), context)
                return kv_pb2.BatchResult(id=op.id, existed=put.existed, value=put.old_value)
            deleted = self.Delete(kv_pb2.DeleteRequest(key=op.key, session=op.session), context)
            return kv_pb2.BatchResult(id=op.id, existed=deleted.existed, value=deleted.old_value)
        except _Aborted as abort:
            result = kv_pb2.BatchResult(id=op.id, code=abort.code.value[0], message=abort.details)
            metadata = dict(context.trailing)
            if "shardnode-cause" in metadata:
                result.cause = metadata["shardnode-cause"]
                if metadata.get("shardnode-group", "").isdigit():
                    result.group = int(metadata["shardnode-group"])
            return result

    def Status(self, request: kv_pb2.StatusRequest, context: grpc.ServicerContext) -> kv_pb2.StatusResponse:
        fault = self._fault("Status")
        self._before(fault, context)
        self._after(fault, context)
        return self.status_response


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _OperationContext:
    """The servicer context of one operation of a BatchStream: its own
    deadline (`timeout_ms`) and abort, the stream's liveness."""

    def __init__(self, stream: grpc.ServicerContext, timeout_ms: int) -> None:
        self._stream = stream
        self._deadline = time.monotonic() + (timeout_ms / 1000 if timeout_ms else 10.0)
        self.trailing: tuple[tuple[str, str], ...] = ()

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.trailing = metadata

    def time_remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def is_active(self) -> bool:
        return self._stream.is_active() and time.monotonic() < self._deadline


@pytest.fixture
def make_router() -> Iterator[Callable[..., FakeRouter]]:
    """Start fake routers (sharing a store when given one); all are stopped at the end."""
    started: list[FakeRouter] = []

    def make(store: FakeStore | None = None) -> FakeRouter:
        router = FakeRouter(store).start()
        started.append(router)
        return router

    yield make
    for router in started:
        router.stop()


@pytest.fixture
def router(make_router: Callable[..., FakeRouter]) -> FakeRouter:
    return make_router()


@pytest.fixture
def make_client() -> Iterator[Callable[..., Client]]:
    clients: list[Client] = []

    def make(routers: list[str], first: int | None = 0, **kwargs: Any) -> Client:
        client = Client(routers, **kwargs)
        if first is not None:
            client._preferred = first       # deterministic: start with routers[first]
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


# --- Conventions -------------------------------------------------------------------------


def test_put_get_delete_return_previous_values(router: FakeRouter, make_client: Callable[..., Client]) -> None:
    kv = make_client([router.address])
    assert kv.get(b"k") is None
    assert kv.put(b"k", b"v1") is None
    assert kv.put(b"k", b"v2") == b"v1"
    assert kv.get(b"k") == b"v2"
    assert kv.delete(b"k") == b"v2"
    assert kv.delete(b"k") is None
    assert kv.get(b"k") is None
    # An empty value is a value, not an absence.
    assert kv.put(b"e", b"") is None
    assert kv.get(b"e") == b""
    assert kv.put(b"e", b"x") == b""
    assert kv.get(b"e", allow_stale=True) == b"x"


def test_str_is_utf8_and_results_are_bytes(router: FakeRouter, make_client: Callable[..., Client]) -> None:
    kv = make_client([router.address])
    assert kv.put("ключ", "значение") is None
    assert router.store.data["ключ".encode()] == "значение".encode()
    assert kv.get("ключ".encode()) == "значение".encode()
    assert kv.put(b"\xff\x00", "x") is None
    assert kv.get(b"\xff\x00") == b"x"


@pytest.mark.parametrize(
    "call",
    [
        lambda kv: kv.put(123, b"v"),
        lambda kv: kv.put(None, b"v"),
        lambda kv: kv.put(bytearray(b"k"), b"v"),
        lambda kv: kv.put(b"", b"v"),
        lambda kv: kv.put("", b"v"),
        lambda kv: kv.put(b"k" * (MAX_KEY + 1), b"v"),
        lambda kv: kv.put(b"k", None),
        lambda kv: kv.put(b"k", 5),
        lambda kv: kv.put(b"k", b"v" * (MAX_VALUE + 1)),
        lambda kv: kv.put("\udc80", b"v"),
        lambda kv: kv.get(b""),
        lambda kv: kv.get(["k"]),
        lambda kv: kv.delete(b"k" * (MAX_KEY + 1)),
        lambda kv: kv.put(b"k", b"v", timeout=0),
        lambda kv: kv.get(b"k", timeout=-1),
        lambda kv: kv.get(b"k", timeout=math.nan),
        lambda kv: kv.get(b"k", timeout="1"),
    ],
)
def test_invalid_input_is_rejected_before_the_network(call: Callable[[Client], object], router: FakeRouter,
                                                       make_client: Callable[..., Client]) -> None:
    kv = make_client([router.address])
    with pytest.raises(InvalidArgument):
        call(kv)
    assert router.total_calls == 0
    assert router.store.write_log == []


def test_limits_at_the_edges_are_accepted(router: FakeRouter, make_client: Callable[..., Client]) -> None:
    kv = make_client([router.address])
    assert kv.put(b"k" * MAX_KEY, b"v" * MAX_VALUE) is None
    assert kv.get(b"k" * MAX_KEY) == b"v" * MAX_VALUE


def test_limits_come_from_the_cluster_config(router: FakeRouter, make_client: Callable[..., Client]) -> None:
    cluster = ClusterConfig.from_dict(cluster_dict([router.port], max_key_bytes=8, max_value_bytes=16))
    kv = make_client([router.address], cluster=cluster)
    assert kv.put(b"12345678", b"x" * 16) is None
    with pytest.raises(InvalidArgument, match="1 to 8 bytes"):
        kv.put(b"123456789", b"v")
    with pytest.raises(InvalidArgument, match="at most 16 bytes"):
        kv.put(b"k", b"x" * 17)
    assert router.total_calls == 1


def test_bad_router_addresses_and_timeouts_are_invalid_arguments() -> None:
    for routers in ([], ["nohostport"], ["host:0"], ["host:x"], [":50051"], [50051]):
        with pytest.raises(InvalidArgument):
            Client(routers)                                   # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        Client(["127.0.0.1:1"], timeout=0)
    Client("127.0.0.1:50051").close()                         # one address as a str is fine


def test_invalid_argument_from_the_server_is_not_retried(router: FakeRouter,
                                                         make_client: Callable[..., Client]) -> None:
    kv = make_client([router.address])
    router.faults.append("invalid")
    with pytest.raises(InvalidArgument, match="key must be"):
        kv.put(b"k", b"v")
    assert router.total_calls == 1


def test_unexpected_server_error_is_a_shardnode_error_without_retry(
        router: FakeRouter, make_client: Callable[..., Client]) -> None:
    kv = make_client([router.address])
    router.faults.append("internal")
    with pytest.raises(ShardnodeError, match="INTERNAL") as info:
        kv.put(b"k", b"v")
    assert not isinstance(info.value, (Unavailable, DeadlineExceeded, InvalidArgument))
    assert "outcome is unknown" in str(info.value)
    assert router.total_calls == 1


def test_a_limit_refusal_is_one_error_saying_nothing_was_done(
        router: FakeRouter, make_client: Callable[..., Client]) -> None:
    kv = make_client([router.address])
    router.faults.append("limit")
    with pytest.raises(ShardnodeError) as info:
        kv.put(b"k", b"v")
    assert str(info.value) == (f"put: refused by {router.address}: limits.max_forwarder_queue (10) exceeded: "
                               "10 operations wait for group 0; nothing was done")
    assert router.total_calls == 1
    assert kv.get(b"k") is None


def test_status_returns_the_routers_answer(router: FakeRouter, make_client: Callable[..., Client]) -> None:
    kv = make_client([router.address])
    status = kv.status()
    assert isinstance(status, kv_pb2.StatusResponse)
    assert [g.group for g in status.groups] == [0, 1]


def test_from_config_uses_every_hosts_router_and_limits(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(cluster_toml([50051, 50052], max_key_bytes=100))
    with Client.from_config(path, timeout=2.5) as kv:
        assert kv.routers == ("127.0.0.1:50051", "127.0.0.1:50052")
        assert kv.max_key_bytes == 100
        assert kv.timeout == 2.5
    with pytest.raises(ValueError, match="no such file"):
        Client.from_config(tmp_path / "missing.toml")


def test_closed_client_refuses_calls(router: FakeRouter) -> None:
    with Client([router.address]) as kv:
        assert kv.put(b"k", b"v") is None
    with pytest.raises(ShardnodeError, match="closed"):
        kv.get(b"k")
    kv.close()                                                # twice is fine


# --- Fail-over and retries -------------------------------------------------------------------


def test_fails_over_to_the_second_router_when_the_first_is_down(
        router: FakeRouter, make_client: Callable[..., Client]) -> None:
    dead = f"127.0.0.1:{free_port()}"
    kv = make_client([dead, router.address], first=0, timeout=5)
    start = time.monotonic()
    assert kv.put(b"k", b"v") is None
    assert kv.get(b"k") == b"v"
    assert time.monotonic() - start < 2.0
    # The router that worked is where the next calls start.
    calls = router.total_calls
    for _ in range(5):
        kv.get(b"k")
    assert router.total_calls == calls + 5


def test_fails_over_when_a_router_dies_and_comes_back(
        make_router: Callable[..., FakeRouter], make_client: Callable[..., Client]) -> None:
    a = make_router()
    b = make_router(a.store)
    kv = make_client([a.address, b.address], first=0, timeout=5)
    assert kv.put(b"k", b"1") is None
    assert a.total_calls == 1
    a.stop()
    assert kv.put(b"k", b"2") == b"1"
    assert b.total_calls == 1
    b.stop()
    a.start()                                                 # same port
    assert kv.put(b"k", b"3") == b"2"
    assert a.store.violations == []


def test_a_router_that_failed_a_call_is_not_where_the_next_one_starts(
        make_router: Callable[..., FakeRouter], make_client: Callable[..., Client]) -> None:
    """A router cut off from a group's leader by a partition holds each operation until
    the deadline (it keeps trying the group): no time is left to try another router
    within that call. The next call must start elsewhere, or a client whose first
    router is on the wrong side fails every call while the partition lasts
    (tests/integration/test_partitions.py)."""
    cut_off = make_router()
    serving = make_router(cut_off.store)
    cut_off.default_fault = "hang"
    kv = make_client([cut_off.address, serving.address], first=0, timeout=0.5)
    with pytest.raises(DeadlineExceeded):
        kv.put(b"k", b"v1")
    hung = cut_off.total_calls
    assert hung >= 1 and serving.total_calls == 0
    assert kv.put(b"k", b"v2") is None                      # the hung write was never applied
    assert kv.get(b"k") == b"v2"
    assert cut_off.total_calls == hung and serving.total_calls == 2


def test_retry_after_a_lost_response_reuses_the_session_and_returns_the_original_old_value(
        make_router: Callable[..., FakeRouter], make_client: Callable[..., Client]) -> None:
    a = make_router()
    b = make_router(a.store)
    kv = make_client([a.address, b.address], first=0)
    assert kv.put(b"k", b"v1") is None
    a.faults.append("drop")                                   # applied, then the answer is lost
    applied = a.store.applied
    assert kv.put(b"k", b"v2") == b"v1"                       # not b"v2": the retry was not re-applied
    assert a.store.applied == applied + 1
    assert a.store.data[b"k"] == b"v2"
    first, retry = a.store.write_log[-2:]
    assert first == retry                                     # same (client_id, sequence)
    assert b.total_calls == 1                                 # the retry went to the other router
    # Deletes too.
    a.faults.append("drop")
    b.faults.append("drop")
    assert kv.delete(b"k") == b"v2"
    assert b"k" not in a.store.data
    assert len(set(a.store.write_log[-3:])) == 1
    assert a.store.violations == []


def test_retry_after_a_router_crash_returns_the_original_old_value(
        make_router: Callable[..., FakeRouter], make_client: Callable[..., Client]) -> None:
    a = make_router()
    b = make_router(a.store)
    kv = make_client([a.address, b.address], first=0, timeout=5)
    assert kv.put(b"k", b"v1") is None
    a.faults.append("crash")
    assert kv.put(b"k", b"v2") == b"v1"
    assert a.store.data[b"k"] == b"v2"
    assert a.store.write_log[-1] == a.store.write_log[-2]
    assert b.total_calls == 1


def test_next_write_after_an_unknown_outcome_uses_the_next_sequence(
        router: FakeRouter, make_client: Callable[..., Client]) -> None:
    kv = make_client([router.address])
    router.default_fault = "drop"                             # applied, never acknowledged
    with pytest.raises(Unavailable, match="may or may not have been applied"):
        kv.put(b"k", b"v1", timeout=0.3)
    router.default_fault = None
    assert kv.put(b"k", b"v2") == b"v1"
    (cid1, seq1), (cid2, seq2) = router.store.write_log[0], router.store.write_log[-1]
    assert cid1 == cid2 and seq2 == seq1 + 1
    assert router.store.violations == []


def test_server_deadline_with_time_left_is_retried(router: FakeRouter, make_client: Callable[..., Client]) -> None:
    kv = make_client([router.address])
    router.faults.extend(["deadline", "deadline"])
    assert kv.put(b"k", b"v") is None
    assert router.total_calls == 3
    assert len(set(router.store.write_log)) == 1


def test_transient_unavailability_is_retried(router: FakeRouter, make_client: Callable[..., Client]) -> None:
    kv = make_client([router.address])
    router.faults.extend(["unavailable"] * 3)
    assert kv.get(b"k") is None
    assert router.total_calls == 4


def test_stale_session_is_an_error_and_the_session_is_replaced(
        router: FakeRouter, make_client: Callable[..., Client]) -> None:
    kv = make_client([router.address])
    assert kv.put(b"k", b"1") is None
    router.faults.append("stale")
    with pytest.raises(ShardnodeError, match="stale") as info:
        kv.put(b"k", b"2")
    assert not isinstance(info.value, (Unavailable, DeadlineExceeded))
    assert kv.put(b"k", b"3") == b"1"
    assert router.store.write_log[-1][0] != router.store.write_log[0][0]


def test_always_unavailable_router_gives_unavailable_within_the_deadline(
        router: FakeRouter, make_client: Callable[..., Client]) -> None:
    router.default_fault = "unavailable"
    kv = make_client([router.address], timeout=1.0)
    start = time.monotonic()
    with pytest.raises(Unavailable) as info:
        kv.put(b"k", b"v")
    elapsed = time.monotonic() - start
    assert 0.9 <= elapsed < 1.5
    assert "may or may not have been applied" in str(info.value)
    assert router.total_calls > 3                             # it kept trying, with backoff
    start = time.monotonic()
    with pytest.raises(Unavailable):
        kv.get(b"k", timeout=0.5)
    assert time.monotonic() - start < 1.0


def test_every_router_refusing_fails_fast_and_says_so(make_client: Callable[..., Client]) -> None:
    routers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    kv = make_client(routers, timeout=5)
    start = time.monotonic()
    with pytest.raises(RoutersUnreachable, match="every router refused the connection") as info:
        kv.delete("k")
    assert time.monotonic() - start < 1.0, "no waiting out the deadline when nothing listens"
    assert isinstance(info.value, Unavailable) and info.value.routers == tuple(routers)
    assert "make run" in str(info.value) and "nothing was written" in str(info.value)


def test_a_write_that_reached_a_router_before_every_router_refused_has_an_unknown_outcome(
        router: FakeRouter, make_client: Callable[..., Client]) -> None:
    """The router applies the write and dies before it answers; from then on
    every router refuses. That is not "nothing was written"
    (RoutersUnreachable): the outcome is unknown (found while building the
    chaos workloads, which count RoutersUnreachable as not applied)."""
    router.faults.append("crash")
    kv = make_client([router.address], timeout=3.0)
    with pytest.raises(Unavailable) as info:
        kv.put(b"k", b"v")
    assert not isinstance(info.value, RoutersUnreachable), info.value
    assert "may or may not have been applied" in str(info.value)
    assert router.store.data.get(b"k") == b"v"             # it was applied


def test_a_router_that_answers_is_not_counted_as_refused(
        router: FakeRouter, make_client: Callable[..., Client]) -> None:
    router.default_fault = "unavailable"
    kv = make_client([router.address, f"127.0.0.1:{free_port()}"], timeout=0.6)
    start = time.monotonic()
    with pytest.raises(Unavailable) as info:
        kv.get("k")
    assert not isinstance(info.value, RoutersUnreachable)
    assert time.monotonic() - start >= 0.5, "one router answers: keep trying until the deadline"


def test_a_cause_the_router_names_is_raised_as_its_class(
        router: FakeRouter, make_client: Callable[..., Client]) -> None:
    router.default_fault = "no_quorum"
    kv = make_client([router.address], timeout=0.4, wait_for_quorum=True)
    with pytest.raises(NoQuorum) as info:
        kv.put("k", "v")
    assert info.value.group == 3
    message = str(info.value)
    assert message.startswith("put: no quorum in group 3: 2 of 3 replicas unreachable")
    assert "gave up after 0.4 s" in message and "may or may not have been applied" in message
    assert set(router.waited_for_quorum) == {True}


def test_no_quorum_fails_at_once_once_every_router_says_so(make_router: Callable[..., FakeRouter],
                                                         make_client: Callable[..., Client]) -> None:
    """Issue 23: a request to a group without quorum waited out its whole
    deadline although the router knew. By default every router is asked
    once, then NoQuorum, at once."""
    a = make_router()
    b = make_router(a.store)
    a.default_fault = b.default_fault = "no_quorum"
    kv = make_client([a.address, b.address], timeout=10.0)
    began = time.monotonic()
    with pytest.raises(NoQuorum, match=r"^get: no quorum in group 3: 2 of 3 replicas unreachable") as info:
        kv.get("k")
    assert time.monotonic() - began < 2.0
    assert "gave up" not in str(info.value) and info.value.group == 3
    assert a.calls["Get"] == 1 and b.calls["Get"] == 1
    assert set(a.waited_for_quorum) | set(b.waited_for_quorum) == {False}
    # A router that sees the quorum (another side of a partition) serves it.
    b.default_fault = None
    a.store.data[b"k"] = b"v"
    assert kv.get("k") == b"v"


def test_a_tls_client_is_told_that_the_router_does_not_speak_tls(router: FakeRouter, tmp_path: Path) -> None:
    from shardnode.certs import init_cluster
    from shardnode.client import TLSMismatch

    path = tmp_path / "cluster.toml"
    path.write_text(cluster_toml([router.port]) + f'\n[security]\ntls = true\ncerts_dir = "{tmp_path / "certs"}"\n'
                    f'admin_file = "{tmp_path / "admin"}"\n')
    init_cluster(ClusterConfig.load(path))
    began = time.monotonic()
    with Client.from_config(path, timeout=10.0) as kv, pytest.raises(TLSMismatch, match="does not: is it another"):
        kv.get("k")
    assert time.monotonic() - began < 3.0
    assert router.total_calls == 0


def test_hanging_router_gives_deadline_exceeded_within_the_deadline(
        router: FakeRouter, make_client: Callable[..., Client]) -> None:
    router.default_fault = "hang"
    kv = make_client([router.address], timeout=0.6)
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="may or may not have been applied"):
        kv.put(b"k", b"v")
    assert time.monotonic() - start < 1.1


# --- Concurrency and sessions ------------------------------------------------------------------


def test_sixteen_threads_share_one_client(make_router: Callable[..., FakeRouter],
                                          make_client: Callable[..., Client]) -> None:
    a = make_router()
    b = make_router(a.store)
    a.default_fault = b.default_fault = "slow"
    kv = make_client([a.address, b.address], first=None)
    errors: list[BaseException] = []
    rounds = 40

    def worker(n: int) -> None:
        try:
            key = f"thread-{n}"
            previous = None
            for i in range(rounds):
                assert kv.put(key, str(i)) == previous
                previous = str(i).encode()
                assert kv.get(key) == previous
                kv.put(b"shared", key)                        # contended key: no assertion on the result
            assert kv.delete(key) == previous
        except BaseException as exc:                          # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert a.store.violations == []
    assert kv._sessions.created <= 16
    assert a.store.applied == 16 * (2 * rounds + 1)


def test_sessions_never_carry_two_writes_at_once_even_with_retries(
        make_router: Callable[..., FakeRouter], make_client: Callable[..., Client]) -> None:
    a = make_router()
    b = make_router(a.store)
    rng = random.Random(7)
    a.faults.extend(rng.choice(["slow", "slow", "drop", "unavailable", "deadline"]) for _ in range(400))
    b.default_fault = "slow"
    kv = make_client([a.address, b.address], first=None)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(25):
                kv.put(f"{n}-{i % 3}", b"x")
                kv.delete(f"{n}-{(i + 1) % 3}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert a.store.violations == []
    # Every new write took the next sequence of its session.
    per_session: dict[int, list[int]] = collections.defaultdict(list)
    for client_id, sequence in a.store.write_log:
        if not per_session[client_id] or per_session[client_id][-1] != sequence:
            per_session[client_id].append(sequence)
    for sequences in per_session.values():
        assert sequences == list(range(1, len(sequences) + 1))


def test_histories_with_retries_and_lost_answers_are_linearizable(
        make_router: Callable[..., FakeRouter], make_client: Callable[..., Client]) -> None:
    a = make_router()
    b = make_router(a.store)
    rng = random.Random(11)
    for router in (a, b):
        router.faults.extend(rng.choice(["slow"] * 6 + ["drop", "drop", "unavailable", "deadline", "hang"])
                             for _ in range(300))
    kv = make_client([a.address, b.address], first=None, timeout=0.25)
    history = HistoryRecorder()
    keys = [b"x", b"y", b"z"]

    def worker(n: int) -> None:
        local = random.Random(n)
        for i in range(30):
            key = local.choice(keys)
            kind = local.choice([OpKind.GET, OpKind.PUT, OpKind.PUT, OpKind.DELETE])
            value = f"{n}.{i}".encode() if kind is OpKind.PUT else None
            handle = history.invoke(n, kind, key, value)
            try:
                if kind is OpKind.GET:
                    output = kv.get(key)
                elif kind is OpKind.PUT:
                    output = kv.put(key, value)
                else:
                    output = kv.delete(key)
            except (Unavailable, DeadlineExceeded):
                history.unknown(handle)
            else:
                history.ok(handle, output)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    result = check_history(history.operations(), timeout=20)
    assert result.ok, result.explanation
    # (No check of store.violations here: after a "hang" the client gives up
    # on a write while the server still holds it, and the session's next
    # write may overlap it. That is the intended semantics: the old write is
    # then either applied first or refused as stale.)


def test_session_pool_hands_out_each_session_once() -> None:
    pool = SessionPool()
    first = pool.acquire()
    second = pool.acquire()
    assert first.client_id != second.client_id
    assert 0 < first.client_id < 1 << 63
    assert (first.sequence, second.sequence) == (1, 1)
    pool.release(first)
    again = pool.acquire()
    assert (again.client_id, again.sequence) == (first.client_id, 2)
    pool.discard(second)
    pool.release(again)
    assert pool.idle == 1 and pool.created == 2


# --- Helpers shared with test_kv739.py and test_cli.py -------------------------------------------


def cluster_dict(router_ports: list[int], **cluster: Any) -> dict[str, Any]:
    """A one-replica cluster whose hosts' routers are on the given loopback ports."""
    hosts = []
    for i, port in enumerate(router_ports):
        base = 40000 + 10 * i
        hosts.append({"name": f"host{i + 1}", "address": "127.0.0.1", "router_port": port,
                      "worker_port_base": base, "metrics_port": base + 5, "supervisor_port": base + 6})
    # max_groups 3: worker ports base..base+3 (the last the metadata group's) stay clear of base+5, base+6.
    return {"cluster": {"name": "test", "replicas": 1, "groups": 2, "max_groups": 3, **cluster}, "host": hosts}


def cluster_toml(router_ports: list[int], **cluster: Any) -> str:
    raw = cluster_dict(router_ports, **cluster)
    lines = ["[cluster]"]
    lines += [f"{k} = {v!r}".replace("'", '"') for k, v in raw["cluster"].items()]
    for host in raw["host"]:
        lines.append("\n[[host]]")
        lines += [f"{k} = {v!r}".replace("'", '"') for k, v in host.items()]
    return "\n".join(lines) + "\n"
