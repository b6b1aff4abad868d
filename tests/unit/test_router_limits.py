"""The router's [limits] (routing/service.py, routing/admission.py,
routing/forwarder.py), against a router service in process and fake
replicas whose answers the test holds back: each refusal is
RESOURCE_EXHAUSTED naming the limit, counted, and nothing of the refused
request reaches a replica."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import grpc
import pytest

from shardnode.config import ClusterConfig
from shardnode.limits import LimitExceeded, refusals
from shardnode.proto import kv_pb2 as pb
from shardnode.proto import worker_pb2 as wpb
from shardnode.proto import worker_pb2_grpc as wpb_grpc
from shardnode.routing.admission import Admission, StreamBudget
from shardnode.routing.forwarder import ChannelPool
from shardnode.routing.service import KVService

Status = wpb.ExecuteResponse
GET = pb.BatchOperation.GET


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Replica(wpb_grpc.WorkerServicer):
    """Every replica answers as the leader, once `release` is set."""

    def __init__(self, release: asyncio.Event) -> None:
        self.release = release
        self.operations = 0
        self.value = b""        # what every get finds

    async def Execute(self, request: wpb.ExecuteRequest, context) -> wpb.ExecuteResponse:
        self.operations += len(request.operations)
        await self.release.wait()
        return Status(status=Status.OK, results=[wpb.OperationResult(existed=bool(self.value), value=self.value)
                                                 for _ in request.operations])

    async def Status(self, request, context):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.5)
        return wpb.StatusResponse()


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class Context:
    def __init__(self, peer: str = "ipv4:127.0.0.1:40000", timeout: float | None = 10.0) -> None:
        self._peer = peer
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self.written: list[pb.BatchResponse] = []

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    async def abort(self, code, details, trailing_metadata=()):  # type: ignore[no-untyped-def]
        raise Aborted(code, details)

    async def write(self, message: pb.BatchResponse) -> None:
        self.written.append(message)


async def _with_router(tmp_path: Path, limits: dict, body) -> None:  # type: ignore[no-untyped-def]
    release = asyncio.Event()
    config = ClusterConfig.from_dict({
        "cluster": {"name": "limits-test", "replicas": 1, "groups": 1, "max_groups": 1, "virtual_nodes": 4,
                    "data_dir": str(tmp_path / "data")},
        "host": [{"name": "h1", "address": "127.0.0.1", "router_port": _free_port(),
                  "worker_port_base": _free_port(), "metrics_port": _free_port(), "supervisor_port": _free_port()}],
        "limits": limits,
    })
    replica = Replica(release)
    server = grpc.aio.server()
    wpb_grpc.add_WorkerServicer_to_server(replica, server)
    server.add_insecure_port(config.group_replicas(0)[0].address)
    await server.start()
    channels = ChannelPool()
    service = KVService(config, "h1", channels)
    try:
        await body(service, replica, release)
    finally:
        release.set()
        await channels.close()
        await server.stop(None)


def _gets(count: int, **fields: object) -> pb.BatchRequest:
    return pb.BatchRequest(operations=[pb.BatchOperation(kind=GET, key=b"k%d" % i, id=i, **fields)
                                       for i in range(count)])


def _counted(reason: str) -> int:
    return refusals().get(reason, 0)


def test_a_batch_past_max_batch_operations_is_refused_whole(tmp_path: Path) -> None:
    async def body(service: KVService, replica: Replica, release: asyncio.Event) -> None:
        release.set()
        before = _counted("max_batch_operations")
        with pytest.raises(Aborted) as refused:
            await service.Batch(_gets(1001), Context())
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.details == "limits.max_batch_operations (1000) exceeded: 1001 operations"
        assert _counted("max_batch_operations") == before + 1
        assert replica.operations == 0
        response = await service.Batch(_gets(1000), Context())
        assert len(response.results) == 1000 and replica.operations == 1000

    asyncio.run(_with_router(tmp_path, {"max_batch_operations": 1000}, body))


def test_a_batch_whose_answers_outgrow_max_request_bytes_is_refused_not_held(tmp_path: Path) -> None:
    async def body(service: KVService, replica: Replica, release: asyncio.Event) -> None:
        release.set()
        replica.value = b"v" * (1 << 20)
        assert len((await service.Batch(_gets(3), Context())).results) == 3
        with pytest.raises(Aborted) as refused:
            await service.Batch(_gets(5), Context())
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.details.startswith("limits.max_request_bytes (4194304) exceeded: the answers of a Batch "
                                                "of 5 operations came to more than 4194304 bytes")
        # A stream splits the same answers into messages that each fit.
        context = Context()

        async def requests():  # type: ignore[no-untyped-def]
            yield _gets(5)

        await service.BatchStream(requests(), context)
        assert [len(m.results) for m in context.written] == [3, 2]

    asyncio.run(_with_router(tmp_path, {}, body))


def test_operations_in_flight_per_connection_are_bounded(tmp_path: Path) -> None:
    limits = {"max_batch_operations": 1000, "max_stream_operations": 1000, "max_connection_operations": 1500}

    async def body(service: KVService, replica: Replica, release: asyncio.Event) -> None:
        first = asyncio.ensure_future(service.Batch(_gets(1000), Context("ipv4:10.0.0.1:1")))
        await asyncio.sleep(0.2)        # its operations are in flight (the replica holds them)
        with pytest.raises(Aborted) as refused:
            await service.Batch(_gets(1000), Context("ipv4:10.0.0.1:1"))
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.details.startswith("limits.max_connection_operations (1500) exceeded: 1000 operations "
                                                "in flight on this connection and 1000 more asked")
        # Another connection is not held back by this one.
        other = asyncio.ensure_future(service.Batch(_gets(1000), Context("ipv4:10.0.0.2:1")))
        await asyncio.sleep(0.1)
        release.set()
        assert len((await first).results) == 1000
        assert len((await other).results) == 1000
        # Answered: the connection's budget is free again.
        assert service.admission.in_flight("ipv4:10.0.0.1:1") == 0
        assert len((await service.Batch(_gets(1000), Context("ipv4:10.0.0.1:1"))).results) == 1000

    asyncio.run(_with_router(tmp_path, limits, body))


def test_deadlines_are_capped_at_max_timeout_ms(tmp_path: Path) -> None:
    async def body(service: KVService, replica: Replica, release: asyncio.Event) -> None:
        began = time.monotonic()
        # 2**32 - 1 ms (49 days) asked, per operation and for the call: answered after the 1 s limit.
        response = await service.Batch(_gets(2, timeout_ms=(1 << 32) - 1), Context(timeout=None))
        assert time.monotonic() - began < 3.0
        assert {r.code for r in response.results} == {grpc.StatusCode.DEADLINE_EXCEEDED.value[0]}
        began = time.monotonic()
        with pytest.raises(Aborted) as failed:
            await service.Get(pb.GetRequest(key=b"k"), Context(timeout=3600))
        assert failed.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - began < 3.0

    asyncio.run(_with_router(tmp_path, {"max_timeout_ms": 1000}, body))


def test_a_full_forwarder_queue_refuses_operations(tmp_path: Path) -> None:
    async def body(service: KVService, replica: Replica, release: asyncio.Event) -> None:
        # The replica holds the first call: what comes next waits in the group's queue.
        first = asyncio.ensure_future(service.Batch(_gets(1), Context()))
        await asyncio.sleep(0.2)
        before = _counted("max_forwarder_queue")
        second = asyncio.ensure_future(service.Batch(_gets(1000), Context()))
        await asyncio.sleep(0.2)
        release.set()
        results = (await second).results
        refused = [r for r in results if r.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]]
        assert len(refused) == 990
        assert refused[0].message == "limits.max_forwarder_queue (10) exceeded: 10 operations wait for group 0"
        assert _counted("max_forwarder_queue") == before + 990
        assert len([r for r in results if r.code == 0]) == 10
        await first
        assert replica.operations == 11      # the refused ones never left the router

    asyncio.run(_with_router(tmp_path, {"max_forwarder_queue": 10}, body))


def test_status_calls_at_once_are_bounded(tmp_path: Path) -> None:
    async def body(service: KVService, replica: Replica, release: asyncio.Event) -> None:
        calls = await asyncio.gather(*(service.Status(pb.StatusRequest(), Context()) for _ in range(3)),
                                     return_exceptions=True)
        refused = [c for c in calls if isinstance(c, Aborted)]
        assert len(refused) == 2, calls
        assert refused[0].code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused[0].details == "limits.max_concurrent_status (1) exceeded: 1 Status calls are being served"
        assert isinstance(await service.Status(pb.StatusRequest(), Context()), pb.StatusResponse)

    asyncio.run(_with_router(tmp_path, {"max_concurrent_status": 1}, body))


def test_a_stream_message_past_max_batch_operations_ends_the_stream(tmp_path: Path) -> None:
    async def body(service: KVService, replica: Replica, release: asyncio.Event) -> None:
        release.set()

        async def requests():  # type: ignore[no-untyped-def]
            yield _gets(3)
            yield _gets(1001)
            yield _gets(3)

        context = Context()
        with pytest.raises(Aborted) as refused:
            await service.BatchStream(requests(), context)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.details == "limits.max_batch_operations (1000) exceeded: 1001 operations"
        # The message before it was answered; nothing of it or after it was started.
        assert sum(len(m.results) for m in context.written) == 3
        assert replica.operations == 3

    asyncio.run(_with_router(tmp_path, {"max_batch_operations": 1000}, body))


def test_a_full_stream_is_not_read_until_answers_go_out() -> None:
    async def body() -> None:
        from shardnode.config import LimitsConfig

        admission = Admission(LimitsConfig(max_batch_operations=1000, max_stream_operations=1500,
                                           max_connection_operations=2000))
        stream = StreamBudget("ipv4:10.0.0.1:1")
        await admission.take_stream(stream, 1000)
        second = asyncio.ensure_future(admission.take_stream(stream, 1000))
        await asyncio.sleep(0.05)
        assert not second.done()            # 2000 would be past max_stream_operations
        other = StreamBudget("ipv4:10.0.0.1:1")
        await admission.take_stream(other, 1000)     # same connection, 2000 in flight: at its limit
        admission.release(stream.peer, 600, stream)
        await asyncio.sleep(0.05)
        assert not second.done()            # the stream has room, the connection not yet
        admission.close_stream(other)
        await asyncio.wait_for(second, 1)
        assert stream.in_flight == 1400 and admission.in_flight(stream.peer) == 1400
        with pytest.raises(LimitExceeded, match="max_batch_operations"):
            await admission.take_stream(stream, 1001)

    asyncio.run(body())


def test_execute_calls_to_a_worker_stay_within_max_request_bytes(tmp_path: Path) -> None:
    from shardnode.routing.forwarder import MAX_BATCH, GroupForwarder, _Waiting

    config = ClusterConfig.from_dict({
        "cluster": {"name": "limits-test", "replicas": 1, "groups": 1, "data_dir": str(tmp_path / "data")},
        "host": [{"name": "h1", "address": "127.0.0.1", "router_port": 50051, "worker_port_base": 50100,
                  "metrics_port": 9090}],
    })
    forwarder = GroupForwarder(config, 0, ChannelPool())

    def queue(count: int, value_bytes: int) -> list[_Waiting]:
        return [_Waiting(wpb.Operation(kind=wpb.Operation.PUT, key=b"k", value=b"v" * value_bytes), None, 0.0)
                for _ in range(count)]

    # 1 MiB values: three fit in 4 MiB with room for the call's own fields; a 512-operation call was 512 MiB.
    assert forwarder._batch_size(queue(10, 1 << 20)) == 3
    assert forwarder._batch_size(queue(2000, 10)) == MAX_BATCH
    assert forwarder._batch_size(queue(1, 8 << 20)) == 1      # one alone always leaves
