"""The gRPC service a worker offers the routers (proto/worker.proto): batched
operations for its group, status, and leadership transfer."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from ..errors import DeadlineExceeded, NotLeader, Unavailable
from ..proto import worker_pb2 as pb
from ..proto import worker_pb2_grpc as pb_grpc
from ..raft import ConfChange, ConfState, InvalidConfChange, StateRole
from ..storage import Command, CommandOp
from .driver import ReplicaDriver
from .identity import observe_group

log = logging.getLogger("shardnode.replica.service")

# Used when the caller set no deadline: a request must never hang.
DEFAULT_TIMEOUT = 10.0
Op = pb.Operation
_OP_NAMES = {Op.GET: "get", Op.PUT: "put", Op.DELETE: "delete"}


class WorkerService(pb_grpc.WorkerServicer):
    def __init__(self, driver: ReplicaDriver) -> None:
        self.driver = driver
        self.cluster = driver.cluster

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return DEFAULT_TIMEOUT if remaining is None else max(0.0, remaining - 0.005)

    def _validate(self, request: pb.ExecuteRequest) -> str:
        """An explanation of the first invalid operation, or "" if all are valid."""
        limits = self.cluster
        for position, op in enumerate(request.operations):
            if not 1 <= len(op.key) <= limits.max_key_bytes:
                return f"operation {position}: key must be 1..{limits.max_key_bytes} bytes (got {len(op.key)})"
            if op.kind == Op.PUT and len(op.value) > limits.max_value_bytes:
                return f"operation {position}: value must be at most {limits.max_value_bytes} bytes (got {len(op.value)})"
            if op.kind != Op.PUT and op.value:
                return f"operation {position}: only PUT carries a value"
            if op.kind not in (Op.GET, Op.PUT, Op.DELETE):
                return f"operation {position}: unknown kind {op.kind}"
        return ""

    async def Execute(self, request: pb.ExecuteRequest, context: grpc.aio.ServicerContext) -> pb.ExecuteResponse:
        began = time.perf_counter()
        try:
            response = await self._execute(request, context)
        except BaseException:
            self.driver.metrics.count_error("DEADLINE_EXCEEDED")
            raise
        metrics = self.driver.metrics
        if response.status == pb.ExecuteResponse.OK:
            elapsed = time.perf_counter() - began
            for op in request.operations:
                metrics.observe_request(_OP_NAMES.get(op.kind, "unknown"), elapsed)
        else:
            metrics.count_error(pb.ExecuteResponse.Status.Name(response.status))
        return response

    async def Metrics(self, request: pb.MetricsRequest, context: grpc.aio.ServicerContext) -> pb.MetricsResponse:
        return pb.MetricsResponse(text=self.driver.metrics.exposition())

    async def _execute(self, request: pb.ExecuteRequest, context: grpc.aio.ServicerContext) -> pb.ExecuteResponse:
        driver = self.driver
        if request.cluster != self.cluster.name or request.group != driver.group:
            return pb.ExecuteResponse(
                status=pb.ExecuteResponse.WRONG_GROUP,
                message=f"this worker serves cluster {self.cluster.name!r} group {driver.group}, "
                f"not cluster {request.cluster!r} group {request.group}",
            )
        problem = self._validate(request)
        if problem:
            return pb.ExecuteResponse(status=pb.ExecuteResponse.INVALID_ARGUMENT, message=problem)
        timeout = self._timeout(context)
        results: list[pb.OperationResult | None] = [None] * len(request.operations)
        writes = [(i, op) for i, op in enumerate(request.operations) if op.kind != Op.GET]
        reads = [(i, op) for i, op in enumerate(request.operations) if op.kind == Op.GET]
        try:
            if request.allow_stale:
                for i, op in reads:
                    results[i] = _read_result(driver.read_local(op.key))
                reads = []
            jobs = []
            if writes:
                jobs.append(self._write(writes, results, timeout))
            if reads:
                jobs.append(self._read(reads, results, timeout))
            outcomes = await asyncio.gather(*jobs, return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        except NotLeader as exc:
            return pb.ExecuteResponse(
                status=pb.ExecuteResponse.NOT_LEADER, message=str(exc),
                leader_id=exc.leader_id, leader_address=exc.leader_address,
            )
        except Unavailable as exc:
            lead, address = driver.leader_hint()
            return pb.ExecuteResponse(status=pb.ExecuteResponse.UNAVAILABLE, message=str(exc),
                                      leader_id=lead, leader_address=address)
        except DeadlineExceeded as exc:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        return pb.ExecuteResponse(status=pb.ExecuteResponse.OK, results=results)

    async def _write(self, writes, results, timeout: float) -> None:
        now_ms = int(time.time() * 1000)
        commands = [
            Command(
                op=CommandOp.PUT if op.kind == Op.PUT else CommandOp.DELETE,
                key=op.key,
                value=op.value if op.kind == Op.PUT else None,
                client_id=op.client_id,
                sequence=op.sequence,
                timestamp_ms=now_ms,
            )
            for _, op in writes
        ]
        applied = await self.driver.write(commands, timeout)
        for (i, _), result in zip(writes, applied):
            if getattr(result, "stale", False):
                results[i] = pb.OperationResult(
                    duplicate=True, error="stale sequence number: a newer request of this session was already applied"
                )
            else:
                results[i] = pb.OperationResult(
                    existed=result.existed, value=result.old_value or b"", duplicate=result.duplicate
                )

    async def _read(self, reads, results, timeout: float) -> None:
        await self.driver.read_barrier(timeout)
        for i, op in reads:
            results[i] = _read_result(self.driver.read_local(op.key))

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        driver = self.driver
        status = driver.node.status()
        stats = driver.stats
        conf = driver.node.conf_state()
        role = status.role.name.lower()
        if driver.node_id in conf.learners:
            role = "learner"
        return pb.StatusResponse(
            cluster=self.cluster.name,
            group=driver.group,
            node_id=driver.node_id,
            host=driver.replica.host.name,
            term=status.term,
            role=role,
            leader_id=status.lead,
            commit_index=status.commit,
            applied_index=driver.store.applied_index,
            first_index=driver.store.first_index(),
            last_index=status.last_index,
            peers=[
                pb.PeerProgress(node_id=nid, match=p.match, next=p.next_index, state=p.state.name.lower(),
                                recent_active=p.recent_active, is_learner=p.is_learner, caught_up=p.caught_up)
                for nid, p in sorted(status.progress.items())
            ],
            snapshots_sent=stats.snapshots_sent,
            snapshots_received=stats.snapshots_received,
            snapshots_taken=stats.snapshots_taken,
            snapshot_send_seconds=stats.snapshot_send_seconds,
            snapshot_receive_seconds=stats.snapshot_receive_seconds,
            members=_members(conf, driver),
            removed=list(conf.removed),
        )

    async def TransferLeader(self, request: pb.TransferLeaderRequest, context) -> pb.TransferLeaderResponse:
        driver = self.driver
        if driver.node.raft.role is not StateRole.LEADER:
            lead, _ = driver.leader_hint()
            return pb.TransferLeaderResponse(ok=False, leader_id=lead, message="not the leader")
        ok = await driver.transfer_leadership(self._timeout(context), target=request.target_node_id)
        lead, _ = driver.leader_hint()
        return pb.TransferLeaderResponse(ok=ok, leader_id=lead, message="" if ok else "transfer did not complete")


    async def ChangeMembership(self, request: pb.ChangeMembershipRequest, context) -> pb.ChangeMembershipResponse:
        Status = pb.ChangeMembershipResponse
        Kind = pb.ChangeMembershipRequest
        driver = self.driver
        if request.kind == Kind.ADD_LEARNER:
            if not request.host or not request.address:
                return Status(status=Status.REFUSED, message="ADD_LEARNER needs the new member's host and address")
            change = ConfChange.add_learner(request.node_id, request.host, request.address)
        elif request.kind == Kind.PROMOTE:
            change = ConfChange.promote(request.node_id)
        elif request.kind == Kind.REMOVE:
            change = ConfChange.remove(request.node_id)
        else:
            return Status(status=Status.REFUSED, message=f"unknown change kind {request.kind}")
        try:
            conf = await driver.change_membership(change, self._timeout(context))
        except InvalidConfChange as exc:
            return Status(status=Status.REFUSED, message=str(exc))
        except NotLeader as exc:
            return Status(status=Status.NOT_LEADER, message=str(exc), leader_id=exc.leader_id,
                          leader_address=exc.leader_address)
        except (Unavailable, DeadlineExceeded) as exc:
            lead, address = driver.leader_hint()
            return Status(status=Status.RETRY, message=str(exc), leader_id=lead, leader_address=address)
        return Status(status=Status.OK, members=_members(conf, driver), removed=list(conf.removed))

    async def Retire(self, request: pb.RetireRequest, context) -> pb.RetireResponse:
        driver = self.driver
        if request.node_id != driver.node_id:
            return pb.RetireResponse(ok=False, message=f"this is node {driver.node_id}, not {request.node_id}")
        if not driver.removed.is_set():
            # The removal may be committed without this replica having heard
            # of it: the group's leader is the authority.
            view = await observe_group(self.cluster, driver.group, driver.replica.host.name,
                                       exclude=driver.replica.address,
                                       timeout=min(2.0, self._timeout(context)))
            if view is None or driver.node_id not in view.conf.removed:
                return pb.RetireResponse(ok=False, message=f"node {driver.node_id} is still a member of group "
                                                           f"{driver.group}; remove it first")
            driver.removed.set()
        return pb.RetireResponse(ok=True, message=f"node {driver.node_id} retires: its data is deleted")


def _members(conf: ConfState, driver: ReplicaDriver) -> list[pb.Member]:
    return [
        pb.Member(node_id=node_id, host=driver.member_hosts.get(node_id, ""),
                  address=driver.addresses.get(node_id, ""), learner=node_id in conf.learners)
        for node_id in sorted(conf.ids())
    ]


def _read_result(value: bytes | None) -> pb.OperationResult:
    return pb.OperationResult(existed=value is not None, value=value or b"")
