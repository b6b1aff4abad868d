"""The mover's way to the groups: each request goes to the group's leader
(found by asking the replicas on every host, then following NOT_LEADER
hints), with the admin credential, retried while the answer says the outcome
is unknown, until a deadline. This is `GroupPort` of moves.py for real
workers."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import msgpack

from ..channel_cache import AioChannelCache
from ..config import ClusterConfig
from .group_status import freshest
from ..proto import worker_pb2 as pb
from ..proto import worker_pb2_grpc as pb_grpc
from ..keyspace import RangeSet
from ..security import (SecurityError, admin_destinations, admin_metadata, check_admin_destination,
                        load_admin_credential)
from ..storage.export_reads import DeltaPage
from ..storage.shard_commands import ShardCommand
from .moves import MoveError

Status = pb.ShardResponse
#: How long one step may take, retries included.
STEP_TIMEOUT = 60.0
RPC_TIMEOUT = 10.0
RETRY_PAUSE = 0.1

log = logging.getLogger(__name__)


class WorkerGroups:
    def __init__(self, cluster: ClusterConfig, host_name: str | None = None, timeout: float = STEP_TIMEOUT) -> None:
        self.cluster = cluster
        self._identity = host_name
        self._timeout = timeout
        self._metadata = admin_metadata(load_admin_credential(cluster.security))
        self._destinations = admin_destinations(cluster)
        self._channels = AioChannelCache(cluster.security, host_name, options=[
            ("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)])
        self._leaders: dict[int, str] = {}

    async def close(self) -> None:
        await self._channels.close()

    def _stub(self, address: str) -> pb_grpc.WorkerStub:
        return pb_grpc.WorkerStub(self._channels.get(address))

    async def leader_address(self, group: int) -> str:
        """The address of the group's leader as its replicas report it ("" if none)."""
        async def ask(address: str) -> pb.StatusResponse | None:
            try:
                status = await self._stub(address).Status(pb.StatusRequest(), timeout=1.0)
            except grpc.aio.AioRpcError:
                return None
            return status if status.cluster == self.cluster.name and status.group == group else None

        addresses = [h.worker_address(group) for h in self.cluster.hosts]
        best = freshest(await asyncio.gather(*(ask(a) for a in addresses)))
        if best is None or not best.leader_id:
            return ""
        for member in best.members:
            if member.node_id == best.leader_id:
                return member.address
        return ""

    async def _call(self, group: int, call):  # type: ignore[no-untyped-def]
        """Run `call(stub)` on the leader until it answers OK or REFUSED."""
        deadline = time.monotonic() + self._timeout
        last = "no leader found"
        while time.monotonic() < deadline:
            address = self._leaders.get(group) or await self.leader_address(group)
            if not address:
                await asyncio.sleep(RETRY_PAUSE)
                continue
            self._leaders[group] = address
            try:
                check_admin_destination(self._destinations, address)
                answer = await call(self._stub(address))
            except SecurityError as exc:
                # A forged or stale hint: ask the hosts of cluster.toml again.
                log.warning("sharding.admin_destination_refused", extra={"group": group, "error": str(exc)})
                last = str(exc)
                self._leaders.pop(group, None)
                await asyncio.sleep(RETRY_PAUSE)
                continue
            except grpc.aio.AioRpcError as exc:
                last = f"{address}: {exc.code().name}"
                self._leaders.pop(group, None)
                await asyncio.sleep(RETRY_PAUSE)
                continue
            if answer.status in (Status.OK, Status.REFUSED):
                return answer
            last = answer.message
            if answer.status == Status.NOT_LEADER and answer.leader_address:
                self._leaders[group] = answer.leader_address
            else:
                self._leaders.pop(group, None)
                await asyncio.sleep(RETRY_PAUSE)
        raise MoveError(f"group {group}: no answer from its leader within {self._timeout:g} s ({last})")

    async def shard(self, group: int, command: ShardCommand) -> None:
        request = pb.ShardRequest(cluster=self.cluster.name, group=group, command=command.encode())
        answer = await self._call(group, lambda stub: stub.Shard(request, timeout=RPC_TIMEOUT,
                                                                 metadata=self._metadata))
        if answer.status == Status.REFUSED:
            raise MoveError(f"group {group} refused {command.op.name} of move {command.move_id}: {answer.message}")

    async def scan(self, group: int, ranges: RangeSet, after: bytes | None,
                   max_bytes: int) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
        request = pb.ExportScanRequest(cluster=self.cluster.name, group=group,
                                       ranges=msgpack.packb(ranges.to_wire()), after=after or b"",
                                       from_start=after is None, max_bytes=max_bytes)
        answer = await self._call(group, lambda stub: stub.ExportScan(request, timeout=RPC_TIMEOUT,
                                                                      metadata=self._metadata))
        if answer.status == Status.REFUSED:
            raise MoveError(f"group {group} refused the export scan: {answer.message}")
        return [(r.key, r.value) for r in answer.records], None if answer.done else answer.next_after

    async def delta(self, group: int, move_id: int, after: bytes | None, max_bytes: int) -> DeltaPage:
        request = pb.ExportDeltaRequest(cluster=self.cluster.name, group=group, move_id=move_id, after=after or b"",
                                        max_bytes=max_bytes)
        answer = await self._call(group, lambda stub: stub.ExportDelta(request, timeout=RPC_TIMEOUT,
                                                                       metadata=self._metadata))
        if answer.status == Status.REFUSED:
            raise MoveError(f"group {group} refused the export delta of move {move_id}: {answer.message}")
        return DeltaPage([(p.key, p.value) for p in answer.puts], list(answer.deletes),
                         [(s.client_id, s.record) for s in answer.sessions], answer.next_after or None)
