"""Stale reads at a router whose host's replica lags behind the shard map
(routing/service.py): the replica refuses the key (wrong_group: it has not
applied the move that gave its group the key), and the map the router
routes with is already the newest; the read must go to the group's leader
(a linearizable read there) at once, not wait out its deadline for a newer
map that will never come."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import grpc

from shardnode.config import ClusterConfig
from shardnode.proto import kv_pb2 as pb
from shardnode.proto import worker_pb2 as wpb
from shardnode.proto import worker_pb2_grpc as wpb_grpc
from shardnode.routing.forwarder import ChannelPool
from shardnode.routing.service import KVService

Status = wpb.ExecuteResponse


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Replica(wpb_grpc.WorkerServicer):
    """One replica of group 0. The local one (h1) lags: it refuses every key
    with wrong_group. The leader (h2) answers linearizable reads."""

    def __init__(self, cluster: "Group", address: str, lagging: bool) -> None:
        self.cluster = cluster
        self.address = address
        self.lagging = lagging
        self.stale_reads = 0
        self.leader_reads = 0

    async def Execute(self, request: wpb.ExecuteRequest, context) -> wpb.ExecuteResponse:
        if request.allow_stale:
            self.stale_reads += len(request.operations)
            if self.lagging:
                return Status(status=Status.OK, shard_epoch=1,
                              results=[wpb.OperationResult(wrong_group=True) for _ in request.operations])
            return Status(status=Status.OK, results=[self._value(op.key) for op in request.operations])
        if self.address != self.cluster.leader:
            return Status(status=Status.NOT_LEADER, leader_address=self.cluster.leader)
        self.leader_reads += len(request.operations)
        return Status(status=Status.OK, results=[self._value(op.key) for op in request.operations])

    def _value(self, key: bytes) -> wpb.OperationResult:
        value = self.cluster.data.get(key)
        return wpb.OperationResult(existed=value is not None, value=value or b"")


class Group:
    def __init__(self, tmp_path: Path) -> None:
        self.data = {b"moved-here": b"the value"}
        bases = [_free_port() for _ in range(3)]
        self.config = ClusterConfig.from_dict({
            "cluster": {"name": "stale-test", "replicas": 3, "groups": 1, "max_groups": 1, "virtual_nodes": 4,
                        "data_dir": str(tmp_path / "data")},
            "host": [{"name": f"h{i + 1}", "address": "127.0.0.1", "router_port": _free_port(),
                      "worker_port_base": base, "metrics_port": _free_port(), "supervisor_port": _free_port()}
                     for i, base in enumerate(bases)],
        })
        addresses = [r.address for r in self.config.group_replicas(0)]
        self.leader = addresses[1]
        self.replicas = [Replica(self, a, lagging=a.endswith(f":{bases[0]}")) for a in addresses]
        self.servers: list[grpc.aio.Server] = []

    async def start(self) -> None:
        for replica in self.replicas:
            server = grpc.aio.server()
            wpb_grpc.add_WorkerServicer_to_server(replica, server)
            server.add_insecure_port(replica.address)
            await server.start()
            self.servers.append(server)

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop(None) for s in self.servers))


class _Context:
    def __init__(self, timeout: float) -> None:
        self._deadline = time.monotonic() + timeout

    def time_remaining(self) -> float:
        return self._deadline - time.monotonic()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    async def abort(self, code, details, trailing_metadata=()):  # type: ignore[no-untyped-def]
        raise AssertionError(f"the read failed: {code.name}: {details}")


async def _with_router(tmp_path: Path, body) -> None:  # type: ignore[no-untyped-def]
    group = Group(tmp_path)
    await group.start()
    channels = ChannelPool()
    service = KVService(group.config, "h1", channels)
    try:
        await body(group, service)
    finally:
        await channels.close()
        await group.stop()


def test_a_stale_read_the_local_replica_refuses_is_read_at_the_leader(tmp_path: Path) -> None:
    async def body(group: Group, service: KVService) -> None:
        lagging = next(r for r in group.replicas if r.lagging)
        began = time.monotonic()
        answer = await service.Get(pb.GetRequest(key=b"moved-here", allow_stale=True), _Context(3.0))
        assert answer.found and answer.value == b"the value"
        assert time.monotonic() - began < 1.0
        assert lagging.stale_reads == 1 and sum(r.leader_reads for r in group.replicas) == 1

    asyncio.run(_with_router(tmp_path, body))


def test_stale_reads_in_a_batch_fall_back_to_the_leader_too(tmp_path: Path) -> None:
    async def body(group: Group, service: KVService) -> None:
        began = time.monotonic()
        request = pb.BatchRequest(allow_stale=True, operations=[
            pb.BatchOperation(kind=pb.BatchOperation.GET, key=b"moved-here", id=1),
            pb.BatchOperation(kind=pb.BatchOperation.GET, key=b"absent", id=2)])
        response = await service.Batch(request, _Context(3.0))
        assert [(r.code, r.existed, r.value) for r in response.results] == [(0, True, b"the value"),
                                                                           (0, False, b"")]
        assert time.monotonic() - began < 1.0

    asyncio.run(_with_router(tmp_path, body))


def test_a_stale_read_whose_local_replica_is_down_is_read_at_the_leader(tmp_path: Path) -> None:
    async def body(group: Group, service: KVService) -> None:
        local = next(r for r in group.replicas if r.lagging)
        await group.servers[group.replicas.index(local)].stop(None)      # h1's replica is down
        began = time.monotonic()
        answer = await service.Get(pb.GetRequest(key=b"moved-here", allow_stale=True), _Context(3.0))
        assert answer.found and answer.value == b"the value"
        assert time.monotonic() - began < 1.5

    asyncio.run(_with_router(tmp_path, body))
