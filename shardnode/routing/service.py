"""The router's client-facing gRPC service (proto/kv.proto)."""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import grpc

from ..config import METADATA_GROUP, ClusterConfig, group_label
from ..limits import LimitExceeded, refuse
from ..errors import (CAUSE_METADATA_KEY, GROUP_METADATA_KEY, DeadlineExceeded, InvalidArgument, NoLeader,
                      NoQuorum, PermissionDenied, ShardnodeError, Unavailable)
from ..proto import kv_pb2 as pb
from ..proto import kv_pb2_grpc as pb_grpc
from ..proto import worker_pb2 as wpb
from ..placement.shard_map import ShardMap
from ..supervisor import ProcessControl, worker_program
from ..etcd.gateway import Gateway
from ..etcd.requests import EtcdError, RangePlan
from ..storage.etcd_ops import Compare, CompareResult, CompareTarget, PutOp, RangeOp, Txn
from ..access.rules import Grants
from .access import READ, WRITE, RouterAccess, check
from .admission import Admission, StreamBudget
from .forwarder import ChannelPool, GroupForwarder
from .map_follower import MapFollower
from .metrics import RouterMetrics
from .monitor import GroupMonitor, GroupView, probe_group
from ..placement.scheduler_watch import SchedulerWatch
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
                 metrics: RouterMetrics | None = None, access: RouterAccess | None = None) -> None:
        self.cluster = cluster
        self.host_name = host_name
        self.channels = channels
        # Users and roles: what each caller may read and write (routing/access.py).
        self.access = RouterAccess(cluster) if access is None else access
        # The live shard map (docs/router.md, "Following the shard map"): until
        # the metadata group answers, the last one saved here, else cluster.toml's.
        self.map_follower = MapFollower(cluster, host_name, self._adopt_map, adopt_access=self.access.adopt)
        self.shard_map: ShardMap = self.map_follower.shard_map
        # Keyed by group number: groups come and go with the map.
        self.forwarders: dict[int, GroupForwarder] = {
            g: GroupForwarder(cluster, g, channels, host_name) for g in self.shard_map.groups}
        self.sessions = RouterSessions()
        self.gateway = Gateway(self)        # scans and transactions (the etcd API's too)
        self.metrics = metrics
        self.limits = cluster.limits
        self.admission = Admission(cluster.limits)
        self._status_calls = 0          # Status calls being served (each fans out to every replica)
        self._draining = asyncio.Event()
        self._reroutes: set[asyncio.Task[None]] = set()      # operations being routed again (keys that moved)
        self.monitor = GroupMonitor(cluster, channels, self.forwarders)
        # Asks other hosts' supervisords for `status` when their router is down.
        self._status_control = ProcessControl(cluster, rpc_timeout=STATUS_TIMEOUT)
        self.processes = ProcessWatch(cluster, host_name, wanted=self.held_groups,
                                      held_down_file=cluster.held_down_file(host_name))
        # The scheduler acts only where supervisord runs (it starts and stops workers).
        self.scheduler_watch = SchedulerWatch(cluster, host_name, supervised=lambda: self.processes.supervised)
        if metrics is not None:
            metrics.watch(self.forwarders, self.processes, lambda: self.shard_map.epoch)

    def start(self) -> None:
        """Start following the shard map, watching every group's health and
        the host's processes (call inside the event loop)."""
        self.map_follower.start()
        self.monitor.start()
        self.processes.start()
        self.scheduler_watch.start()

    async def close(self) -> None:
        await self.map_follower.close()
        await self.monitor.close()
        await self.processes.close()
        await self.scheduler_watch.close()

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
                forwarder.observe(GroupView(group, placed, (None,) * len(placed), time.monotonic(),
                                            unprobed=True))
            self.forwarders[group] = forwarder
        self.shard_map = new
        for group in [g for g in self.forwarders if g not in new.groups]:
            del self.forwarders[group]

    def held_groups(self) -> set[int]:
        """The groups whose workers should run on this host (its process
        watch starts them): the data groups of the live map that list a
        replica here in their live membership, that the map places here, or
        that have data here; and the metadata group where it has a replica."""
        shard_map = self.shard_map
        held = {g for g in shard_map.groups
                if self.host_name in shard_map.placements.get(g, ())
                or (g in self.forwarders and self.forwarders[g].local is not None)
                or self.cluster.worker_data_dir(self.host_name, g).exists()}
        if any(r.host.name == self.host_name for r in self.cluster.meta_group_replicas()) \
                or self.cluster.worker_data_dir(self.host_name, METADATA_GROUP).exists():
            held.add(METADATA_GROUP)
        return held

    # --- Helpers ------------------------------------------------------------------------

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        if remaining is not None:
            # limits.max_timeout_ms: a caller cannot hold operations (and their memory) longer.
            remaining = min(remaining, self.limits.max_timeout_seconds)
        timeout = DEFAULT_TIMEOUT if remaining is None else max(0.0, remaining - min(DEADLINE_MARGIN, remaining / 10))
        return time.monotonic() + timeout

    def _check_key(self, key: bytes) -> None:
        if not 1 <= len(key) <= self.cluster.max_key_bytes:
            raise InvalidArgument(f"key must be 1 to {self.cluster.max_key_bytes} bytes (got {len(key)})")

    def _check_value(self, value: bytes) -> None:
        if len(value) > self.cluster.max_value_bytes:
            raise InvalidArgument(f"value must be at most {self.cluster.max_value_bytes} bytes (got {len(value)})")

    async def _execute(self, operation: wpb.Operation, deadline: float, allow_stale: bool = False,
                       wait_for_quorum: bool = False) -> wpb.OperationResult:
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
                result = await self._forward(self.forwarders[group], operation, deadline, allow_stale,
                                             wait_for_quorum)
                if not result.wrong_group:
                    return result
                if allow_stale:
                    # This host's replica does not serve the key (yet): its
                    # copy of the group may lag behind the map, which may
                    # be the newest there is. Read at the leader instead.
                    allow_stale = False
                    continue
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
                       allow_stale: bool, wait_for_quorum: bool = True) -> wpb.OperationResult:
        if operation.kind == WOp.GET:
            return await forwarder.submit(operation, deadline, allow_stale, wait_for_quorum)
        session = None
        if operation.client_id == 0:
            session = self.sessions.acquire()
            operation.client_id, operation.sequence = session
        elif operation.sequence == 0:
            raise InvalidArgument("a session needs a sequence number starting at 1")
        try:
            result = await forwarder.submit(operation, deadline, wait_for_quorum=wait_for_quorum)
        finally:
            if session is not None:
                # Known outcome or not, the next write on this session takes
                # the next sequence: a late copy of this one is then refused.
                self.sessions.release(session)
        if result.error and not result.wrong_group:
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
            check(self.access.grants(context), WRITE, request.key)
            result = await self._execute(operation, self._deadline(context),
                                         wait_for_quorum=request.wait_for_quorum)
        except (InvalidArgument, Unavailable, DeadlineExceeded, _StaleSession, LimitExceeded, PermissionDenied) as exc:
            await self._abort(context, exc)
        return pb.PutResponse(existed=result.existed, old_value=result.value)

    async def Get(self, request: pb.GetRequest, context) -> pb.GetResponse:
        operation = WOp(kind=WOp.GET, key=request.key)
        try:
            check(self.access.grants(context), READ, request.key)
            result = await self._execute(operation, self._deadline(context), request.allow_stale,
                                         request.wait_for_quorum)
        except (InvalidArgument, Unavailable, DeadlineExceeded, LimitExceeded, PermissionDenied) as exc:
            await self._abort(context, exc)
        return pb.GetResponse(found=result.existed, value=result.value)

    async def Delete(self, request: pb.DeleteRequest, context) -> pb.DeleteResponse:
        operation = WOp(kind=WOp.DELETE, key=request.key,
                        client_id=request.session.client_id, sequence=request.session.sequence)
        try:
            check(self.access.grants(context), WRITE, request.key)
            result = await self._execute(operation, self._deadline(context),
                                         wait_for_quorum=request.wait_for_quorum)
        except (InvalidArgument, Unavailable, DeadlineExceeded, _StaleSession, LimitExceeded, PermissionDenied) as exc:
            await self._abort(context, exc)
        return pb.DeleteResponse(existed=result.existed, old_value=result.value)

    async def Batch(self, request: pb.BatchRequest, context) -> pb.BatchResponse:
        count = len(request.operations)
        if not count:
            return pb.BatchResponse()
        peer = context.peer()
        try:
            # Before anything is started: a refused Batch changes nothing.
            self.admission.take_batch(peer, count)
        except LimitExceeded as exc:
            await self._abort(context, exc)
        results: list[pb.BatchResult | None] = [None] * count
        done = asyncio.get_running_loop().create_future()
        left = count
        answer_bytes = 0
        limit = self.limits.max_request_bytes

        def answered(index: int, result: pb.BatchResult) -> None:
            nonlocal left, answer_bytes
            left -= 1
            if left == 0:
                self.admission.release(peer, count)
            if done.done():
                return      # the answers are dropped (over the limit), or the caller is gone
            answer_bytes += len(result.value) + len(result.message) + 16
            if answer_bytes > limit:
                # The answers could not be sent anyway (gRPC's send limit): stop holding them.
                results.clear()
                done.set_exception(refuse("max_request_bytes", limit,
                                          f"the answers of a Batch of {count} operations came to more than "
                                          f"{limit} bytes (its operations were carried out; only the answers "
                                          "were dropped)"))
                return
            results[index] = result
            if left == 0:
                done.set_result(None)

        self._start(request, self._deadline(context), answered, grants=self.access.grants(context))
        try:
            await done
        except LimitExceeded as exc:
            await self._abort(context, exc)
        return pb.BatchResponse(results=results)

    async def BatchStream(self, requests, context) -> None:
        """Many callers' operations on one stream: each request message is
        started at once (its operations queued on their groups' forwarders,
        each group's sent as one Execute call), and results go back as they
        come, all those ready at the same moment in one response message
        (or a few, each within limits.max_request_bytes). At most
        limits.max_stream_operations are in flight: past it, the stream is not
        read until answers have gone out (admission.py)."""
        budget = StreamBudget(context.peer())
        replies = _Replies(context, self.admission, budget, self.limits.max_request_bytes)
        writer = asyncio.ensure_future(replies.write())
        reader = asyncio.ensure_future(self._read_stream(requests, replies, budget, self.access.user(context)))
        draining = asyncio.ensure_future(self._draining.wait())
        try:
            # Until the caller closes its side, or the router stops: then the
            # operations already received are answered and the stream ends (the
            # client sends what it had not yet sent through another router).
            await asyncio.wait((reader, draining), return_when=asyncio.FIRST_COMPLETED)
            if reader.done() and not reader.cancelled() and isinstance(reader.exception(), LimitExceeded):
                # A message larger than a Batch may be: nothing of it was started.
                replies.finish()
                await writer
                await self._abort(context, reader.exception())
            reader.cancel()
            replies.finish()
            await writer
        finally:
            for task in (writer, reader, draining):
                task.cancel()
            self.admission.close_stream(budget)

    async def _read_stream(self, requests, replies: "_Replies", budget: StreamBudget,  # type: ignore[no-untyped-def]
                           user: str | None) -> None:
        async for request in requests:
            count = len(request.operations)
            await self.admission.take_stream(budget, count)
            replies.started += count
            # The user's grants as they are now: the rules may have changed since the stream opened.
            self._start(request, None, replies.add, stream=True, grants=self.access.grants_of(user))

    def drain(self) -> None:
        """The router is stopping: every stream answers what it has received,
        then ends (call before the gRPC server's graceful stop)."""
        self._draining.set()

    def _start(self, request: pb.BatchRequest, call_deadline: float | None,
               answer: Callable[[int, pb.BatchResult], None], *, stream: bool = False,
               grants: Grants | None = None) -> None:
        """Validate, route and queue every operation of `request`, then send
        each touched group's queue; `answer(slot, result)` is called once per
        operation (slot: its id on a stream, its position in a Batch).
        `grants`: what the caller may do (None: everything); an operation
        they do not allow is answered PERMISSION_DENIED, and only it."""
        now = time.monotonic()
        pumps: set[tuple[int, bool]] = set()
        for index, op in enumerate(request.operations):
            slot = op.id if stream else index
            began = time.perf_counter()
            kind = _KIND.get(op.kind)
            try:
                if kind is None:
                    raise InvalidArgument(f"unknown kind {op.kind}")
                if kind != WOp.PUT and op.value:
                    raise InvalidArgument("only PUT carries a value")
                self._check_key(op.key)
                if kind == WOp.PUT:
                    self._check_value(op.value)
                if grants is not None:
                    check(grants, READ if kind == WOp.GET else WRITE, op.key)
                session = None
                allow_stale = False
                if kind == WOp.GET:
                    allow_stale = request.allow_stale or op.allow_stale
                    operation = WOp(kind=kind, key=op.key)
                else:
                    client_id, sequence = op.session.client_id, op.session.sequence
                    if client_id == 0:
                        session = self.sessions.acquire()
                        client_id, sequence = session
                    elif sequence == 0:
                        raise InvalidArgument("a session needs a sequence number starting at 1")
                    operation = WOp(kind=kind, key=op.key, value=op.value, client_id=client_id, sequence=sequence)
            except InvalidArgument as exc:
                self._observe(None, kind, "INVALID_ARGUMENT", began)
                answer(slot, pb.BatchResult(id=op.id, code=_INVALID, message=str(exc)))
                continue
            except PermissionDenied as exc:
                self._observe(None, kind, "PERMISSION_DENIED", began)
                answer(slot, pb.BatchResult(id=op.id, code=_DENIED, message=str(exc)))
                continue
            deadline = self._operation_deadline(op.timeout_ms, now, call_deadline)
            group = self._enqueue(_Queued(answer, slot, op.id, kind, began, session, operation, deadline,
                                          allow_stale, op.wait_for_quorum))
            pumps.add((group, allow_stale))
        for group, allow_stale in pumps:
            self.forwarders[group].pump(allow_stale)

    def _enqueue(self, queued: _Queued) -> int:
        """Queue an operation on the forwarder of the group the current map
        names (not sent until that forwarder is pumped); returns the group."""
        shard_map = self.shard_map
        group = shard_map.group_for(queued.operation.key)
        queued.operation.shard_epoch = shard_map.epoch
        future = self.forwarders[group].enqueue(queued.operation, queued.deadline, queued.allow_stale,
                                                queued.wait_for_quorum)
        future.add_done_callback(functools.partial(self._answered, queued, group, shard_map))
        return group

    async def _reroute(self, queued: _Queued, group: int, stale: ShardMap) -> None:
        """A worker refused the operation (its key moved): route it again
        with a newer map, within its deadline."""
        try:
            await self._await_newer_map(stale, group, queued.deadline)
        except DeadlineExceeded as exc:
            self._reply_error(queued, group, exc)
            return
        if queued.router_session:
            queued.session = self.sessions.acquire()
            queued.operation.client_id, queued.operation.sequence = queued.session
        new_group = self._enqueue(queued)
        self.forwarders[new_group].pump(queued.allow_stale)

    def _operation_deadline(self, timeout_ms: int, now: float, call_deadline: float | None) -> float:
        if timeout_ms:
            # limits.max_timeout_ms: timeout_ms may say 2**32 ms; no operation waits longer than the limit.
            timeout = min(timeout_ms, self.limits.max_timeout_ms) / 1000
            deadline = now + timeout - min(DEADLINE_MARGIN, timeout / 10)
            return deadline if call_deadline is None else min(deadline, call_deadline)
        return now + DEFAULT_TIMEOUT if call_deadline is None else call_deadline

    def _answered(self, queued: _Queued, group: int, shard_map: ShardMap, future: asyncio.Future) -> None:
        """One queued operation is over: its result (or error) to the caller,
        or, if its key moved away from `group`, routed again."""
        if queued.session is not None:
            # Known outcome or not, the next write on this session takes
            # the next sequence: a late copy of this one is then refused.
            self.sessions.release(queued.session)
            queued.session = None
        if future.cancelled():
            error: Exception | None = Unavailable(f"group {group}: the router is stopping")
        else:
            error = future.exception()      # type: ignore[assignment]
        if error is None:
            result = future.result()
            if result.wrong_group and queued.allow_stale:
                # A stale read refused by this host's replica (behind the
                # map, perhaps): read at the group's leader instead, now.
                queued.allow_stale = False
                new_group = self._enqueue(queued)
                self.forwarders[new_group].pump(False)
                return
            if result.wrong_group:
                # Refused at the worker with nothing done: route it again.
                task = asyncio.ensure_future(self._reroute(queued, group, shard_map))
                self._reroutes.add(task)
                task.add_done_callback(self._reroutes.discard)
                return
            if result.error:
                error = _StaleSession(result.error)
        if error is None:
            self._observe(group, queued.kind, "OK", queued.began)
            queued.answer(queued.slot, pb.BatchResult(id=queued.op_id, existed=result.existed, value=result.value))
            return
        self._reply_error(queued, group, error)

    def _reply_error(self, queued: _Queued, group: int, error: Exception) -> None:
        code = _code(error)
        self._observe(group, queued.kind, code.name, queued.began)
        reply = pb.BatchResult(id=queued.op_id, code=code.value[0], message=str(error))
        cause = _CAUSE_NAMES.get(type(error))
        if cause is not None:
            reply.cause = cause
            error_group = getattr(error, "group", None)
            if error_group is not None:
                reply.group = error_group
        queued.answer(queued.slot, reply)

    def _observe(self, group: int | None, kind: int | None, code: str, began: float) -> None:
        if self.metrics is not None:
            self.metrics.observe(group, _OP_NAMES.get(kind, "unknown"), code, time.perf_counter() - began)

    # --- Scan and compare-and-set (the etcd operations under shardnode's names) --------------

    async def Scan(self, request: pb.ScanRequest, context) -> pb.ScanResponse:
        plan = RangePlan(RangeOp(request.start or b"\0", request.end or b"\0", request.limit, request.keys_only),
                         request.limit, 0, False, (0, 0, 0, 0), request.allow_stale, False)
        try:
            if request.end and request.end <= (request.start or b"\0"):
                raise InvalidArgument("scan: end must come after start")
            if len(request.start) > self.cluster.max_key_bytes or len(request.end) > self.cluster.max_key_bytes:
                raise InvalidArgument(f"scan: start and end must be at most {self.cluster.max_key_bytes} bytes")
            check(self.access.grants(context), READ, request.start or b"\0", request.end or b"\0")
            response, revision = await self.gateway.range(plan, self._deadline(context))
        except EtcdError as exc:
            await context.abort(exc.code, exc.message)
        except (InvalidArgument, Unavailable, DeadlineExceeded, PermissionDenied) as exc:
            await self._abort(context, exc)
        return pb.ScanResponse(
            items=[pb.ScanItem(key=k, value=v, create_revision=c, mod_revision=m, version=n)
                   for k, c, m, n, v, _ in response.kvs],
            more=response.more, count=response.count, revision=revision)

    async def CompareAndSet(self, request: pb.CompareAndSetRequest, context) -> pb.CompareAndSetResponse:
        key = request.key
        try:
            self._check_key(key)
            self._check_value(request.value)
            if request.expected_absent and request.expected:
                raise InvalidArgument("compare-and-set: expected a value or absence, not both")
            if request.session.client_id and not request.session.sequence:
                raise InvalidArgument("a session needs a sequence number starting at 1")
            grants = self.access.grants(context)
            check(grants, READ, key)        # the answer tells the current value
            check(grants, WRITE, key)
            compare = (Compare(key, CompareTarget.CREATE, CompareResult.EQUAL, 0) if request.expected_absent
                       else Compare(key, CompareTarget.VALUE, CompareResult.EQUAL, request.expected))
            txn = Txn(0, (compare,), success=(PutOp(key, request.value, 0, prev_kv=True),), failure=(RangeOp(key),))
            result = await self.gateway.txn(lambda epoch: replace(txn, epoch=epoch), [key], self._deadline(context),
                                            (request.session.client_id, request.session.sequence))
        except EtcdError as exc:
            await context.abort(exc.code, exc.message)
        except (InvalidArgument, Unavailable, DeadlineExceeded, _StaleSession, PermissionDenied) as exc:
            await self._abort(context, exc)
        answer = result.responses[0]
        if result.succeeded:
            before = answer.prev_kv                     # type: ignore[union-attr]
            return pb.CompareAndSetResponse(swapped=True, existed=before is not None,
                                            current=before[4] if before else b"", revision=result.revision)
        found = answer.kvs[0] if answer.kvs else None   # type: ignore[union-attr]
        return pb.CompareAndSetResponse(swapped=False, existed=found is not None, current=found[4] if found else b"",
                                        revision=found[2] if found else 0)

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
                                      uptime_seconds=p.uptime, exit_status=p.exit_status,
                                      held_down=p.held_down, problem=p.problem)
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
                # Its router is down (a host killed with `die`): its
                # supervisord still says what its programs are doing.
                return await asyncio.to_thread(self._supervisord_processes, host.name)

        answers = await asyncio.gather(*(ask(h) for h in self.cluster.hosts))
        return {(a.host, p.program): p for a in answers if a is not None for p in a.processes}

    def _supervisord_processes(self, host_name: str) -> pb.ProcessesResponse | None:
        """A host's programs from its supervisord, when its router does not
        answer (restarts unknown: 0); None if the supervisord does not answer
        either, or this router may not ask it."""
        try:
            infos = self._status_control.processes(host_name)
        except (ShardnodeError, OSError):
            return None
        return pb.ProcessesResponse(host=host_name, supervised=True, processes=[
            pb.ProcessInfo(program=i.name, state=i.state, exit_status=i.exitstatus) for i in infos.values()])

    async def Status(self, request: pb.StatusRequest, context) -> pb.StatusResponse:
        limit = self.limits.max_concurrent_status
        if self._status_calls >= limit:
            # Each call asks every replica of every group: a flood of them would be a flood on every worker.
            await self._abort(context, refuse("max_concurrent_status", limit,
                                              f"{self._status_calls} Status calls are being served"))
        self._status_calls += 1
        try:
            return await self._status()
        finally:
            self._status_calls -= 1

    async def _status(self) -> pb.StatusResponse:
        shard_map = self.shard_map
        groups, meta, processes = await asyncio.gather(
            asyncio.gather(*(self._group_status(g, shard_map) for g in shard_map.groups if g in self.forwarders)),
            self._group_status(METADATA_GROUP, shard_map),
            self._host_processes())
        for group in [*groups, meta]:
            for replica in group.replicas:
                process = processes.get((replica.host, worker_program(group.group)))
                if process is not None:
                    replica.process_state, replica.restarts = process.state, process.restarts
                    replica.process_problem = process.problem
        return pb.StatusResponse(
            cluster=self.cluster.name,
            router_host=self.host_name,
            shard_map_epoch=shard_map.epoch,
            groups=list(groups),
            metadata_group=meta,
        )

    async def _group_status(self, group: int, shard_map: ShardMap) -> pb.GroupStatus:
        metadata = group == METADATA_GROUP
        known = self.cluster.meta_group_replicas() if metadata else self.forwarders[group].members
        view = await probe_group(self.cluster, self.channels, group, timeout=STATUS_TIMEOUT, known=known)
        if not metadata:
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
                status.quiesced = answer.quiesced
                if leader is not None:
                    acked = match.get(replica.node_id, answer.last_index)
                    status.lag = max(0, leader.last_index - acked)
            statuses.append(status)
        return pb.GroupStatus(
            group=group,
            leader_id=leader.node_id if leader is not None else 0,
            has_quorum=view.has_quorum,
            replicas=statuses,
            share=0.0 if metadata else shard_map.share(group),
            name=group_label(group),
        )


class _StaleSession(Exception):
    """The worker refused a write whose session sequence was already passed."""


@dataclass(slots=True)
class _Queued:
    """One operation of a Batch or BatchStream, from its queueing to its answer."""

    answer: Callable[[int, pb.BatchResult], None]
    slot: int
    op_id: int
    kind: int | None
    began: float
    session: list[int] | None        # a router session in use (writes sent without one)
    operation: wpb.Operation
    deadline: float
    allow_stale: bool
    wait_for_quorum: bool = False
    router_session: bool = False

    def __post_init__(self) -> None:
        self.router_session = self.session is not None


class _Replies:
    """The answers of one BatchStream, written back in as few messages as
    possible: every result ready when the writer gets to run leaves in one
    BatchResponse (or several, each within `max_bytes`). An operation stays
    counted by the admission until its answer is written."""

    def __init__(self, context: grpc.aio.ServicerContext, admission: Admission, budget: StreamBudget,
                 max_bytes: int) -> None:
        self._context = context
        self._admission = admission
        self._budget = budget
        # Room for gRPC's own framing within the send limit.
        self._max_bytes = max(1, max_bytes - (64 << 10))
        self._results: list[pb.BatchResult] = []
        self._ready = asyncio.Event()
        self.started = 0            # operations received
        self._answered = 0
        self._finished = False      # the caller sends no more

    def add(self, slot: int, result: pb.BatchResult) -> None:
        self._results.append(result)
        self._answered += 1
        self._ready.set()

    def finish(self) -> None:
        self._finished = True
        self._ready.set()

    async def write(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            results, self._results = self._results, []
            for chunk in self._chunks(results):
                await self._context.write(pb.BatchResponse(results=chunk))
                self._admission.release(self._budget.peer, len(chunk), self._budget)
            if self._finished and self._answered >= self.started and not self._results:
                return

    def _chunks(self, results: list[pb.BatchResult]) -> list[list[pb.BatchResult]]:
        chunks: list[list[pb.BatchResult]] = []
        chunk: list[pb.BatchResult] = []
        size = 0
        for result in results:
            grows = len(result.value) + len(result.message) + 32
            if chunk and size + grows > self._max_bytes:
                chunks.append(chunk)
                chunk, size = [], 0
            chunk.append(result)
            size += grows
        if chunk:
            chunks.append(chunk)
        return chunks


_INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]
_CAUSE_NAMES: dict[type, str] = {NoQuorum: "no_quorum", NoLeader: "no_leader", DeadlineExceeded: "deadline"}


def _cause(exc: Exception) -> tuple[tuple[str, str], ...]:
    """The error's cause as trailing metadata, for clients to raise the matching exception."""
    cause = _CAUSE_NAMES.get(type(exc))
    group = getattr(exc, "group", None)
    if cause is None:
        return ()
    return ((CAUSE_METADATA_KEY, cause),) + (((GROUP_METADATA_KEY, str(group)),) if group is not None else ())


def _code(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, LimitExceeded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, _StaleSession):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, PermissionDenied):
        return grpc.StatusCode.PERMISSION_DENIED
    return grpc.StatusCode.UNAVAILABLE
