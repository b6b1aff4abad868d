"""A router whose cached leader of a group is cut off by the network
(packets dropped: nothing refuses, nothing answers) while the rest of the
group elected another (routing/forwarder.py, `GroupForwarder.observe`).

Found with real partitions (tests/integration/test_partitions.py): the call
to the old leader waited for its whole deadline, and every operation of the
group on that router queued behind it (one call in flight per group), so
routers on the majority side served nothing for up to a client deadline
after the cut. The group monitor's probe finds the old leader unreachable
within a second: the call is abandoned and its operations go to the new
leader."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import grpc

from shardnode.config import ClusterConfig
from shardnode.proto import worker_pb2 as wpb
from shardnode.proto import worker_pb2_grpc as wpb_grpc
from shardnode.routing.forwarder import ChannelPool, GroupForwarder
from shardnode.routing.monitor import GroupView, probe_group

Status = wpb.ExecuteResponse


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Replica(wpb_grpc.WorkerServicer):
    """Node 1 is cut off: it never answers anything. Node 2 leads; node 3 points at it."""

    def __init__(self, group: "Group", node_id: int) -> None:
        self.group = group
        self.node_id = node_id
        self.executed = 0

    async def _cut_off(self) -> None:
        if self.node_id == 1:
            await asyncio.sleep(3600)

    async def Execute(self, request: wpb.ExecuteRequest, context) -> wpb.ExecuteResponse:
        await self._cut_off()
        if self.node_id != 2:
            return Status(status=Status.NOT_LEADER, leader_address=self.group.addresses[2])
        self.executed += len(request.operations)
        return Status(status=Status.OK, results=[wpb.OperationResult() for _ in request.operations])

    async def Status(self, request: wpb.StatusRequest, context) -> wpb.StatusResponse:
        await self._cut_off()
        return wpb.StatusResponse(cluster=self.group.config.name, group=0, node_id=self.node_id, term=2,
                                  role="leader" if self.node_id == 2 else "follower", leader_id=2)


class Group:
    def __init__(self, tmp_path: Path) -> None:
        self.config = ClusterConfig.from_dict({
            "cluster": {"name": "cut-test", "replicas": 3, "groups": 1, "max_groups": 1, "virtual_nodes": 4,
                        "data_dir": str(tmp_path / "data")},
            "host": [{"name": f"h{i}", "address": "127.0.0.1", "router_port": _free_port(),
                      "worker_port_base": _free_port(), "metrics_port": _free_port(),
                      "supervisor_port": _free_port()} for i in (1, 2, 3)],
        })
        self.addresses = {r.node_id: r.address for r in self.config.group_replicas(0)}
        self.replicas = {node_id: Replica(self, node_id) for node_id in self.addresses}
        self.servers: list[grpc.aio.Server] = []

    async def start(self) -> None:
        for node_id, replica in self.replicas.items():
            server = grpc.aio.server()
            wpb_grpc.add_WorkerServicer_to_server(replica, server)
            server.add_insecure_port(self.addresses[node_id])
            await server.start()
            self.servers.append(server)

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop(None) for s in self.servers))


def _put(key: bytes) -> wpb.Operation:
    return wpb.Operation(kind=wpb.Operation.PUT, key=key, value=b"v")


def test_a_call_to_a_leader_the_probe_cannot_reach_is_abandoned_for_the_new_leader(tmp_path: Path) -> None:
    async def main() -> None:
        group = Group(tmp_path)
        await group.start()
        channels = ChannelPool()
        forwarder = GroupForwarder(group.config, 0, channels)
        forwarder.leader = 1                 # what the router knew before the cut
        try:
            began = time.monotonic()
            first = asyncio.ensure_future(forwarder.submit(_put(b"a"), began + 8.0))
            await asyncio.sleep(0.2)
            queued = asyncio.ensure_future(forwarder.submit(_put(b"b"), began + 8.0))   # behind the first call
            await asyncio.sleep(0.2)
            # The group monitor's probe, as it runs every second.
            view = await probe_group(group.config, channels, 0, timeout=0.3)
            assert view.unreachable == (group.addresses[1],) and view.leader_id == 2
            forwarder.observe(view)
            await asyncio.wait_for(asyncio.gather(first, queued), timeout=3.0)
            assert time.monotonic() - began < 2.0, "served by the new leader, not after the old one's deadline"
            assert group.replicas[2].executed == 2 and forwarder.leader == 2
            assert forwarder.stats.errors.get("ABANDONED") == 1
        finally:
            await channels.close()
            await group.stop()

    asyncio.run(main())


def test_without_a_leader_known_the_walk_skips_replicas_the_probe_could_not_reach(tmp_path: Path) -> None:
    config = Group(tmp_path).config
    forwarder = GroupForwarder(config, 0, ChannelPool())
    replicas = config.group_replicas(0)
    answers = (None, None, wpb.StatusResponse(cluster=config.name, group=0, node_id=3, role="follower"))
    forwarder.observe(GroupView(0, replicas, answers, time.monotonic()))
    assert forwarder.leader is None
    assert {forwarder._target(False) for _ in range(6)} == {3}
