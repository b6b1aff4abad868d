"""The router's client-facing gRPC service (proto/kv.proto)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import grpc

from ..config import ClusterConfig
from ..errors import (CAUSE_METADATA_KEY, GROUP_METADATA_KEY, DeadlineExceeded, InvalidArgument, NoLeader,
                      NoQuorum, ShardnodeError, Unavailable)
from ..proto import kv_pb2 as pb
from ..proto import kv_pb2_grpc as pb_grpc
from ..proto import worker_pb2 as wpb
from ..ring import ShardMap
from ..supervisor import worker_program
from .forwarder import ChannelPool, GroupForwarder
from .map_follower import MapFollower
from .metrics import RouterMetrics
from .monitor import GroupMonitor, GroupView, probe_group
from .processes import ProcessWatch

log = logging.getLogger("shardnode.router")

DEFAULT_TIMEOUT = 10.0
STATUS_TIMEOUT = 1.0
#: The router answers this much before the caller's deadline (at most), so
#: that its explanation arrives before the caller's own deadline expires.
DEADLINE_MARGIN = 0.05
#: Pauses between readings of the shard map while a key moves between groups.
REDIRECT_PAUSE_MIN = 0.01
REDIRECT_PAUSE_MAX = 0.2

WOp = wpb.Operation
_OP_NAMES = {WOp.GET: "get", WOp.PUT: "put", WOp.DELETE: "delete"}
_KIND = {pb.BatchOperation.GET: WOp.GET, pb.BatchOperation.PUT: WOp.PUT, pb.BatchOperation.DELETE: WOp.DELETE}


class RouterSessions:
    """Sessions for writes that arrive without one (client_id 0), so that the
    router's own retries are applied at most once. A session carries at most
    one write at a time; the pool grows to the number of concurrent writes."""

    def __init__(self) -> None:
        self._idle: list[list[int]] = []        # [client_id, last sequence]

    def acquire(self) -> list[int]:
        session = self._idle.pop() if self._idle else [secrets.randbits(63) | 1, 0]
        session[1] += 1
        return session

    def release(self, session: list[int]) -> None:
        self._idle.append(session)


class KVService(pb_grpc.KVServicer):
    def __init__(self, cluster: ClusterConfig, host_name: str, channels: ChannelPool,
                 metrics: RouterMetrics | None = None) -> None:
        self.cluster = cluster
        self.host_name = host_name
        self.channels = channels
        # The live shard map (docs/router.md, "Following the shard map"): until
        # the metadata group answers, the last one saved here, else cluster.toml's.
        self.map_follower = MapFollower(cluster, host_name, self._adopt_map)
        self.shard_map: ShardMap = self.map_follower.shard_map
        # Keyed by group number: groups come and go with the map.
        self.forwarders: dict[int, GroupForwarder] = {
            g: GroupForwarder(cluster, g, channels, host_name) for g in self.shard_map.groups}
        self.sessions = RouterSessions()
        self.metrics = metrics
        self.monitor = GroupMonitor(cluster, channels, self.forwarders)
        self.processes = ProcessWatch(cluster, host_name)
        self.processes.want(self._worker_groups(self.shard_map))
        if metrics is not None:
            metrics.watch(self.forwarders, self.processes, lambda: self.shard_map.epoch)

    def start(self) -> None:
        """Start following the shard map, watching every group's health and
        the host's processes (call inside the event loop)."""
        self.map_follower.start()
        self.monitor.start()
        self.processes.start()

    async def close(self) -> None:
        await self.map_follower.close()
        await self.monitor.close()
        await self.processes.close()

    # --- Following the shard map ------------------------------------------------------------

    async def refresh_map(self) -> ShardMap:
        """Read the shard map from the metadata group now (a worker said a key
        is not its group's any more); the map known afterwards."""
        return await self.map_follower.refresh()

    async def _adopt_map(self, new: ShardMap) -> None:  # noqa: RUF029 - awaited by MapFollower
        """Route with `new` from now on: forwarders for the groups it adds
        (placed where the map says, until the group's own members answer),
        then the map, then the groups it drops go."""
        for group in new.groups:
            if group in self.forwarders:
                continue
            forwarder = GroupForwarder(self.cluster, group, self.channels, self.host_name)
            placed = self.cluster.placed_replicas(group, new.placements.get(group, ()))
            if placed:
                # Not probed here (its workers may still be starting): the monitor does within a second.
                forwarder.observe(GroupView(group, placed, (None,) * len(placed), time.monotonic()))
            self.forwarders[group] = forwarder
        self.shard_map = new
        for group in [g for g in self.forwarders if g not in new.groups]:
            del self.forwarders[group]
        self.processes.want(self._worker_groups(new))

    def _worker_groups(self, shard_map: ShardMap) -> set[int]:
        """The data groups whose workers should run on this host: those it
        has data of, or that the map places here."""
        return {g for g in shard_map.groups
                if self.host_name in shard_map.placements.get(g, ())
                or self.cluster.worker_data_dir(self.host_name, g).exists()}

    # --- Helpers ------------------------------------------------------------------------

    @staticmethod
    def _deadline(context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        timeout = DEFAULT_TIMEOUT if remaining is None else max(0.0, remaining - min(DEADLINE_MARGIN, remaining / 10))
        return time.monotonic() + timeout

    def _check_key(self, key: bytes) -> None:
        if not 1 <= len(key) <= self.cluster.max_key_bytes:
            raise InvalidArgument(f"key must be 1 to {self.cluster.max_key_bytes} bytes (got {len(key)})")

    def _check_value(self, value: bytes) -> None:
        if len(value) > self.cluster.max_value_bytes:
            raise InvalidArgument(f"value must be at most {self.cluster.max_value_bytes} bytes (got {len(value)})")

    async def _execute(self, operation: wpb.Operation, deadline: float, allow_stale: bool = False) -> wpb.OperationResult:
        """Validate, route and forward one operation; raises the error tree."""
        began = time.perf_counter()
        group: int | None = None      # unknown for a request refused before routing
        code = "OK"
        try:
            self._check_key(operation.key)
            if operation.kind == WOp.PUT:
                self._check_value(operation.value)
            router_session = operation.client_id == 0
            while True:
                shard_map = self.shard_map
                group = shard_map.group_for(operation.key)
                operation.shard_epoch = shard_map.epoch
                result = await self._forward(self.forwarders[group], operation, deadline, allow_stale)
                if not result.wrong_group:
                    return result
                # Refused at the worker, nothing done: the key moved (or is
                # moving) since this map. Route again with a newer one.
                if router_session:
                    operation.client_id = operation.sequence = 0
                await self._await_newer_map(shard_map, group, deadline)
        except Exception as exc:
            code = _code(exc).name
            raise
        finally:
            if self.metrics is not None:
                self.metrics.observe(group, _OP_NAMES.get(operation.kind, "unknown"), code,
                                     time.perf_counter() - began)

    async def _await_newer_map(self, stale: ShardMap, group: int, deadline: float) -> None:
        """Return once the router has a map newer than `stale` (it reads the
        metadata group again, briefly pausing between reads while a move
        finishes); DeadlineExceeded if none comes before `deadline`."""
        if self.metrics is not None:
            self.metrics.count_stale_epoch_redirect(group)
        pause = REDIRECT_PAUSE_MIN
        while self.shard_map.epoch <= stale.epoch:
            if time.monotonic() + pause >= deadline:
                raise DeadlineExceeded(f"deadline exceeded while the key moved away from group {group} "
                                       f"(shard map epoch {stale.epoch} here)")
            try:
                await asyncio.wait_for(self.map_follower.refresh(), max(0.001, deadline - time.monotonic()))
            except (asyncio.TimeoutError, ShardnodeError):
                pass
            if self.shard_map.epoch > stale.epoch:
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, REDIRECT_PAUSE_MAX)

    async def _forward(self, forwarder: GroupForwarder, operation: wpb.Operation, deadline: float,
                       allow_stale: bool) -> wpb.OperationResult:
        if operation.kind == WOp.GET:
            return await forwarder.submit(operation, deadline, allow_stale)
        session = None
        if operation.client_id == 0:
            session = self.sessions.acquire()
            operation.client_id, operation.sequence = session
        elif operation.sequence == 0:
            raise InvalidArgument("a session needs a sequence number starting at 1")
        try:
            result = await forwarder.submit(operation, deadline)
        finally:
            if session is not None:
                # Known outcome or not, the next write on this session takes
                # the next sequence: a late copy of this one is then refused.
                self.sessions.release(session)
        if result.error:
            raise _StaleSession(result.error)
        return result

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
        await context.abort(_code(exc), str(exc), trailing_metadata=_cause(exc))

    # --- KV --------------------------------------------------------------------------------

    async def Put(self, request: pb.PutRequest, context) -> pb.PutResponse:
        operation = WOp(kind=WOp.PUT, key=request.key, value=request.value,
                        client_id=request.session.client_id, sequence=request.session.sequence)
        try:
            result = await self._execute(operation, self._deadline(context))
        except (InvalidArgument, Unavailable, DeadlineExceeded, _StaleSession) as exc:
            await self._abort(context, exc)
        return pb.PutResponse(existed=result.existed, old_value=result.value)

    async def Get(self, request: pb.GetRequest, context) -> pb.GetResponse:
        operation = WOp(kind=WOp.GET, key=request.key)
        try:
            result = await self._execute(operation, self._deadline(context), request.allow_stale)
        except (InvalidArgument, Unavailable, DeadlineExceeded) as exc:
            await self._abort(context, exc)
        return pb.GetResponse(found=result.existed, value=result.value)

    async def Delete(self, request: pb.DeleteRequest, context) -> pb.DeleteResponse:
        operation = WOp(kind=WOp.DELETE, key=request.key,
                        client_id=request.session.client_id, sequence=request.session.sequence)
        try:
            result = await self._execute(operation, self._deadline(context))
        except (InvalidArgument, Unavailable, DeadlineExceeded, _StaleSession) as exc:
            await self._abort(context, exc)
        return pb.DeleteResponse(existed=result.existed, old_value=result.value)

    async def Batch(self, request: pb.BatchRequest, context) -> pb.BatchResponse:
        deadline = self._deadline(context)

        async def one(op: pb.BatchOperation) -> pb.BatchResult:
            kind = _KIND.get(op.kind)
            if kind is None:
                return pb.BatchResult(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=f"unknown kind {op.kind}")
            if kind != WOp.PUT and op.value:
                return pb.BatchResult(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="only PUT carries a value")
            operation = WOp(kind=kind, key=op.key, value=op.value,
                            client_id=op.session.client_id, sequence=op.session.sequence)
            try:
                result = await self._execute(operation, deadline, request.allow_stale)
            except (InvalidArgument, Unavailable, DeadlineExceeded, _StaleSession) as exc:
                return pb.BatchResult(code=_code(exc).value[0], message=str(exc))
            return pb.BatchResult(code=0, existed=result.existed, value=result.value)

        results = await asyncio.gather(*(one(op) for op in request.operations))
        return pb.BatchResponse(results=results)

    # --- Cluster information -----------------------------------------------------------------

    async def ShardMap(self, request: pb.ShardMapRequest, context) -> pb.ShardMapResponse:
        # The live map: the metadata group's, as of the last poll.
        return pb.ShardMapResponse(
            cluster=self.cluster.name,
            epoch=self.shard_map.epoch,
            groups=len(self.shard_map.groups),
            virtual_nodes=self.cluster.virtual_nodes,
            routers=[h.router_address for h in self.cluster.hosts],
        )

    async def Processes(self, request: pb.ProcessesRequest, context) -> pb.ProcessesResponse:
        watch = self.processes
        return pb.ProcessesResponse(
            host=self.host_name, supervised=watch.supervised,
            processes=[pb.ProcessInfo(program=p.program, state=p.state, restarts=p.restarts,
                                      uptime_seconds=p.uptime, exit_status=p.exit_status)
                       for p in sorted(watch.programs.values(), key=lambda p: p.program)],
        )

    async def _host_processes(self) -> dict[tuple[str, str], pb.ProcessInfo]:
        """(host, program) → its state, from every host's router (a router
        knows its own host's supervisord)."""

        async def ask(host) -> pb.ProcessesResponse | None:  # type: ignore[no-untyped-def]
            if host.name == self.host_name:
                return await self.Processes(pb.ProcessesRequest(), None)
            try:
                return await pb_grpc.KVStub(self.channels.channel(host.router_address)).Processes(
                    pb.ProcessesRequest(), timeout=STATUS_TIMEOUT)
            except grpc.aio.AioRpcError:
                return None

        answers = await asyncio.gather(*(ask(h) for h in self.cluster.hosts))
        return {(a.host, p.program): p for a in answers if a is not None for p in a.processes}

    async def Status(self, request: pb.StatusRequest, context) -> pb.StatusResponse:
        shard_map = self.shard_map
        groups, processes = await asyncio.gather(
            asyncio.gather(*(self._group_status(g, shard_map) for g in shard_map.groups if g in self.forwarders)),
            self._host_processes())
        for group in groups:
            for replica in group.replicas:
                process = processes.get((replica.host, worker_program(group.group)))
                if process is not None:
                    replica.process_state, replica.restarts = process.state, process.restarts
        return pb.StatusResponse(
            cluster=self.cluster.name,
            router_host=self.host_name,
            shard_map_epoch=shard_map.epoch,
            groups=list(groups),
        )

    async def _group_status(self, group: int, shard_map: ShardMap) -> pb.GroupStatus:
        view = await probe_group(self.cluster, self.channels, group, timeout=STATUS_TIMEOUT,
                                 known=self.forwarders[group].members)
        self.monitor.observe(view)
        leader = view.leader
        match = {p.node_id: p.match for p in leader.peers} if leader is not None else {}
        statuses = []
        for replica, answer in zip(view.replicas, view.answers):
            status = pb.ReplicaStatus(host=replica.host.name, node_id=replica.node_id, address=replica.address,
                                      reachable=answer is not None)
            if answer is not None:
                status.role = answer.role
                status.term = answer.term
                status.commit_index = answer.commit_index
                status.applied_index = answer.applied_index
                status.last_index = answer.last_index
                if leader is not None:
                    acked = match.get(replica.node_id, answer.last_index)
                    status.lag = max(0, leader.last_index - acked)
            statuses.append(status)
        return pb.GroupStatus(
            group=group,
            leader_id=leader.node_id if leader is not None else 0,
            has_quorum=view.has_quorum,
            replicas=statuses,
            share=shard_map.share(group),
        )


class _StaleSession(Exception):
    """The worker refused a write whose session sequence was already passed."""


def _cause(exc: Exception) -> tuple[tuple[str, str], ...]:
    """The error's cause as trailing metadata, for clients to raise the matching exception."""
    cause = {NoQuorum: "no_quorum", NoLeader: "no_leader", DeadlineExceeded: "deadline"}.get(type(exc))
    group = getattr(exc, "group", None)
    if cause is None:
        return ()
    return ((CAUSE_METADATA_KEY, cause),) + (((GROUP_METADATA_KEY, str(group)),) if group is not None else ())


def _code(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, _StaleSession):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.UNAVAILABLE
