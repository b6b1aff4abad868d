"""Forwarding one group's operations to its leader, wherever it runs.

Operations that wait at the same time travel together in one Execute call
(up to MAX_BATCH, with at most MAX_IN_FLIGHT calls per group at once), so the
worker proposes them as one batch. The forwarder caches the group's leader,
follows NOT_LEADER hints, and on UNAVAILABLE or a broken connection tries the
other replicas with a short backoff, until each operation's own deadline.
A call to a replica that the group monitor's latest probe found unreachable
is abandoned and its operations sent elsewhere at once (`observe`): a
replica cut off by the network (packets dropped, nothing refused) would
otherwise hold its call, and every operation of the group queued behind it,
until the call's deadline.

Outcomes:
- a result: the operation was applied (or read) exactly once;
- InvalidArgument: nothing was done;
- a stale read (allow_stale) goes to this host's replica of the group; if
  that replica is down, unreachable or unavailable, it is read at the leader
  instead (a linearizable read), not retried there until its deadline;
- fail fast: an operation whose caller does not wait for the quorum
  (`wait_for_quorum` false, the default of clients) is answered NoQuorum at
  once while the group monitor's probes show that the group surely has no
  majority of its replicas up (`no_quorum_now`), as Redis Cluster answers
  CLUSTERDOWN; the others wait for the group until their deadline;
- when the operation's deadline comes first (it is answered then, never
  later), the error that says why: NoQuorum ("no quorum in group N: ..."),
  NoLeader ("no leader yet in group N: ..."), as the group monitor last saw
  the group, else the last failure of this operation, else DeadlineExceeded
  ("deadline exceeded while waiting for group N"). For a write the outcome
  is unknown; the caller retries with the same session.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from ..channel_cache import AioChannelCache
from ..config import ClusterConfig, Replica, SecurityConfig
from ..errors import DeadlineExceeded, InvalidArgument, NoLeader, NoQuorum, ShardnodeError, Unavailable
from ..futures import settle as _resolve
from ..limits import refuse
from ..proto import worker_pb2 as wpb
from ..proto import worker_pb2_grpc as wpb_grpc

if TYPE_CHECKING:
    from .monitor import GroupView

log = logging.getLogger("shardnode.router")

MAX_BATCH = 512
#: Room left in an Execute request for its own fields and protobuf framing.
REQUEST_OVERHEAD = 64 << 10
#: What an operation adds to an Execute request besides its key and value.
OPERATION_OVERHEAD = 64
#: One Execute call per group at a time: operations that arrive while it is
#: out wait for it and leave together in the next one (natural batching, as
#: etcd's proposals queue behind its Raft round). Measured with 64 callers of
#: one RPC per operation (docs/performance.md): 4 calls in flight made four
#: times more, smaller calls, and cost the leader 4x the CPU per operation;
#: one call gave 1.6x the operations per second at half the CPU.
MAX_IN_FLIGHT = 1
BACKOFF_MIN = 0.02
BACKOFF_MAX = 0.5
MAX_IMMEDIATE_REDIRECTS = 3
#: Fail fast: this many probes in a row (PROBE_INTERVAL apart) must have found
#: no majority of the group up, the last one at most FAIL_FAST_VIEW_AGE ago.
FAIL_FAST_PROBES = 2
FAIL_FAST_VIEW_AGE = 3.0
Status = wpb.ExecuteResponse


class ChannelPool:
    """One gRPC channel per worker address, shared by every group forwarder;
    TLS with the certificate of `host_name` when the cluster says so, renewed
    when the certificate files change (shardnode.channel_cache)."""

    def __init__(self, security: SecurityConfig = SecurityConfig(), host_name: str | None = None) -> None:
        self._cache = AioChannelCache(security, host_name, options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.initial_reconnect_backoff_ms", 50),
            ("grpc.max_reconnect_backoff_ms", 1000),
            # The forwarder retries by itself; gRPC's own retry
            # support costs every call its bookkeeping (8 % of a
            # unary call's CPU here).
            ("grpc.enable_retries", 0),
        ])

    def stub(self, address: str) -> wpb_grpc.WorkerStub:
        return wpb_grpc.WorkerStub(self.channel(address))

    def channel(self, address: str) -> grpc.aio.Channel:
        return self._cache.get(address)

    async def close(self) -> None:
        await self._cache.close()


@dataclass(slots=True)
class _Waiting:
    operation: wpb.Operation
    future: asyncio.Future
    deadline: float           # time.monotonic()
    fail_fast: bool = False   # answered NoQuorum at once while the group has no majority up
    redirects: int = 0        # NOT_LEADER hints followed without a pause
    arrived: float = field(default_factory=time.monotonic)
    timer: asyncio.TimerHandle | None = None    # answers it at its deadline


@dataclass
class ForwarderStats:
    calls: int = 0
    operations: int = 0
    redirects: int = 0
    retries: int = 0
    errors: dict[str, int] | None = None


class GroupForwarder:
    def __init__(self, cluster: ClusterConfig, group: int, channels: ChannelPool, local_host: str | None = None) -> None:
        self.cluster = cluster
        self.group = group
        self.channels = channels
        self.local_host = local_host
        self.leader: int | None = None
        self.membership_changed = False
        self._follow(cluster.group_replicas(group))
        self._rng = random.Random()
        self._queues: dict[bool, list[_Waiting]] = {False: [], True: []}
        self._in_flight = 0
        self._backoff = 0.0
        # The last failure per kind of request, and when it happened.
        self._last_error: dict[bool, tuple[ShardnodeError, float]] = {}
        self.view: GroupView | None = None      # the group monitor's last probe
        self.stats = ForwarderStats(errors={})
        # Execute calls in flight, by the node they went to; those abandoned by `observe`.
        self._calls: dict[int, set[grpc.aio.UnaryUnaryCall]] = {}
        self._abandoned: set[grpc.aio.UnaryUnaryCall] = set()
        # Fail fast (no_quorum_now): since when the probes in a row found no
        # majority up, how many, and the last OK answer of the group.
        self._no_majority_since: float | None = None
        self._no_majority_probes = 0
        self._last_ok = 0.0
        self._served = False        # the group had a quorum (or answered OK) since this router started

    def _follow(self, members: tuple[Replica, ...]) -> None:
        """Route to these members (the group's live membership)."""
        self.members = members
        self.replicas = {r.node_id: r.address for r in members}
        self.by_address = {address: node_id for node_id, address in self.replicas.items()}
        self.local = next((r.node_id for r in members if r.host.name == self.local_host), None)
        self._order = list(self.replicas)
        if self.leader is not None and self.leader not in self.replicas:
            self.leader = None

    @property
    def busy(self) -> bool:
        """Operations are waiting or in flight (the group monitor probes a busy group every second)."""
        return self._in_flight > 0 or any(self._queues.values())

    def observe(self, view: "GroupView") -> None:
        """The group monitor's latest probe: the membership it found (the
        group's own, which changes as members join and leave), and the
        leader it found fills an empty cache.

        Calls in flight to a replica that did not answer the probe are
        abandoned (their operations are retried elsewhere at once), and a
        cached leader that did not answer gives way to the leader the probe
        found: with packets dropped rather than refused, nothing else ends
        such a call before its deadline. Abandoning a call that was only
        slow costs a retry, which the worker's sessions make harmless (a
        write is applied once; its retry gets the first answer)."""
        self.view = view
        self.membership_changed = view.replicas != self.members
        if self.membership_changed:
            self._follow(view.replicas)
        if view.unprobed:
            return      # not a probe: no replica was found unreachable, no majority missing
        unreachable = {self.by_address[a] for a in view.unreachable if a in self.by_address}
        for node_id in unreachable:
            for call in self._calls.get(node_id, ()):
                self._abandoned.add(call)
                call.cancel()
        if self.leader in unreachable:
            self.leader = None
        if self.leader is None and view.leader_id in self.replicas and view.leader_id not in unreachable:
            self.leader = view.leader_id
        if view.has_quorum:
            self._served = True
        if view.reachable_voters < view.majority:
            self._no_majority_probes += 1
            if self._no_majority_since is None:
                self._no_majority_since = view.at
            if self.no_quorum_now():
                # What waits for the group and may not wait for its quorum is answered now.
                for queue in self._queues.values():
                    for waiting in [w for w in queue if w.fail_fast]:
                        queue.remove(waiting)
                        self._fail_now(waiting)
        else:
            self._no_majority_probes, self._no_majority_since = 0, None

    def no_quorum_now(self) -> bool:
        """Whether the group surely has no majority up now, so that an
        operation that may not wait is answered NoQuorum at once: the group
        had a quorum since this router started (a cluster still starting is
        waited for: the router's connections to workers that were not up yet
        recover only after a back-off), FAIL_FAST_PROBES probes in a row (a
        second apart) found fewer than a majority of its voters answering,
        the last one is recent, and no call to the group succeeded since the
        first of them (a probe that timed out on a loaded machine is not
        enough)."""
        view = self.view
        since = self._no_majority_since
        return (self._served and view is not None and since is not None
                and self._no_majority_probes >= FAIL_FAST_PROBES
                and time.monotonic() - view.at <= FAIL_FAST_VIEW_AGE and self._last_ok < since)

    def _fail_now(self, waiting: _Waiting) -> None:
        if waiting.timer is not None:
            waiting.timer.cancel()
        assert self.view is not None
        _resolve(waiting.future, NoQuorum(f"{self.view.explain()}; answered at once (the caller may wait for "
                                          f"the group's quorum instead: wait_for_quorum)", group=self.group))

    def failure(self, waiting: _Waiting, allow_stale: bool) -> ShardnodeError:
        """Why `waiting` could not be served before its deadline."""
        view = self.view
        if view is not None and not view.has_quorum:
            if view.reachable_voters < view.majority:
                return NoQuorum(view.explain(), group=self.group)
            if view.leader is None:
                return NoLeader(view.explain(), group=self.group)
        last = self._last_error.get(allow_stale)
        if last is not None and last[1] >= waiting.arrived and not isinstance(last[0], DeadlineExceeded):
            return last[0]
        leader = self.replicas.get(self.leader) if self.leader is not None else None
        waiting_for = f"its leader {leader} had not answered" if leader else "no leader known"
        return DeadlineExceeded(f"deadline exceeded while waiting for group {self.group} ({waiting_for})",
                                group=self.group)

    def _failed(self, allow_stale: bool, error: ShardnodeError) -> None:
        self._last_error[allow_stale] = (error, time.monotonic())

    # --- Submitting -----------------------------------------------------------------

    async def submit(self, operation: wpb.Operation, deadline: float, allow_stale: bool = False,
                     wait_for_quorum: bool = True) -> wpb.OperationResult:
        future = self.enqueue(operation, deadline, allow_stale, wait_for_quorum)
        self.pump(allow_stale)
        return await future

    def enqueue(self, operation: wpb.Operation, deadline: float, allow_stale: bool = False,
                wait_for_quorum: bool = True) -> asyncio.Future:
        """Queue one operation without sending it yet: a caller with many
        operations queues them all, then calls `pump` once, so that they
        leave together in as few Execute calls as the queue allows. The
        future is settled with the result or the error tree, by the
        deadline at the latest; without `wait_for_quorum`, with NoQuorum as
        soon as the group surely has no majority up (`no_quorum_now`)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        limit = self.cluster.limits.max_forwarder_queue
        queued = len(self._queues[False]) + len(self._queues[True])
        if queued >= limit:
            # The group's leader is slow or gone and operations pile up: refuse
            # more (nothing sent) rather than hold them all until their deadlines.
            future.set_exception(refuse("max_forwarder_queue", limit,
                                        f"{queued} operations wait for group {self.group}"))
            return future
        waiting = _Waiting(operation, future, deadline, fail_fast=not wait_for_quorum)
        if waiting.fail_fast and self.no_quorum_now():
            self._fail_now(waiting)
            return future
        # Answered at the deadline whatever happens (a call in flight, a backoff):
        # the caller hears why in time, not its own deadline's bare expiry.
        waiting.timer = loop.call_later(max(0.0, deadline - time.monotonic()), self._expire_one, waiting, allow_stale)
        self._queues[allow_stale].append(waiting)
        return future

    def _expire_one(self, waiting: _Waiting, allow_stale: bool) -> None:
        if not waiting.future.done():
            _resolve(waiting.future, self.failure(waiting, allow_stale))

    def pump(self, allow_stale: bool) -> None:
        """Send what is queued, as far as the calls in flight allow (the
        rest leaves as soon as a call returns)."""
        queue = self._queues[allow_stale]
        while queue and self._in_flight < MAX_IN_FLIGHT:
            count = self._batch_size(queue)
            batch, queue[:] = queue[:count], queue[count:]
            self._in_flight += 1
            asyncio.ensure_future(self._send(batch, allow_stale))

    def _batch_size(self, queue: list[_Waiting]) -> int:
        """How many of the first operations of `queue` go in one Execute call:
        up to MAX_BATCH, within limits.max_request_bytes (at least one)."""
        budget = self.cluster.limits.max_request_bytes - REQUEST_OVERHEAD
        size = 0
        for count, waiting in enumerate(queue[:MAX_BATCH]):
            size += len(waiting.operation.key) + len(waiting.operation.value) + OPERATION_OVERHEAD
            if size > budget and count:
                return count
        return min(len(queue), MAX_BATCH)

    # --- One call ------------------------------------------------------------------------

    def _target(self, allow_stale: bool) -> int:
        if allow_stale and self.local is not None:
            return self.local
        if self.leader is not None:
            return self.leader
        # No leader known: walk the replicas, those that answered the last probe first
        # (a call to one that did not would wait for the next probe to be abandoned).
        unreachable = set(self.view.unreachable) if self.view is not None else set()
        for _ in range(len(self._order)):
            node_id = self._order[0]
            self._order.append(self._order.pop(0))
            if self.replicas[node_id] not in unreachable:
                return node_id
        return node_id

    async def _send(self, batch: list[_Waiting], allow_stale: bool) -> None:
        retry: list[_Waiting] = []
        to_leader: list[_Waiting] = []      # stale reads this host's replica could not serve
        call: grpc.aio.UnaryUnaryCall | None = None
        target = 0
        try:
            batch = self._expire(batch, allow_stale)
            if not batch:
                return
            target = self._target(allow_stale)
            deadline = max(w.deadline for w in batch)
            timeout = max(0.001, deadline - time.monotonic())
            request = wpb.ExecuteRequest(
                cluster=self.cluster.name,
                group=self.group,
                operations=[w.operation for w in batch],
                allow_stale=allow_stale,
            )
            self.stats.calls += 1
            self.stats.operations += len(batch)
            call = self.channels.stub(self.replicas[target]).Execute(request, timeout=timeout)
            in_flight = self._calls.setdefault(target, set())
            in_flight.add(call)
            try:
                response = await call
            except asyncio.CancelledError:
                if call not in self._abandoned:
                    raise
                # `observe`: the monitor found the replica unreachable.
                self._count("ABANDONED")
                self._failed(allow_stale, Unavailable(
                    f"group {self.group}: replica {self.replicas.get(target, target)} unreachable "
                    "(no answer to the router's probe)"))
                if allow_stale:
                    to_leader = batch
                    return
                retry = batch
                return
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                self._count(code.name)
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    self._failed(allow_stale, DeadlineExceeded(
                        f"deadline exceeded while waiting for group {self.group} "
                        f"(replica {self.replicas[target]} had not answered)", group=self.group))
                else:
                    self._failed(allow_stale, Unavailable(
                        f"group {self.group}: replica {self.replicas[target]} unreachable ({code.name})"))
                if self.leader == target:
                    self.leader = None
                if allow_stale:
                    # This host's replica is down or unreachable: read at the
                    # leader rather than wait for it.
                    to_leader = batch
                    return
                retry = batch
                return
            self._handle(response, batch, target, allow_stale, retry)
            if allow_stale and retry:
                to_leader, retry[:] = list(retry), []
        except Exception as exc:  # a bug must fail the requests, not hang them
            log.exception("router.forward_failed", extra={"group": self.group})
            for waiting in batch:
                _resolve(waiting.future, Unavailable(f"group {self.group}: internal error: {exc}"))
        finally:
            self._in_flight -= 1
            if call is not None:
                self._calls.get(target, set()).discard(call)
                self._abandoned.discard(call)
            if to_leader:
                self._queues[False][:0] = to_leader
                self.pump(False)
            if retry:
                self.stats.retries += 1
                self._backoff = min(BACKOFF_MAX, max(BACKOFF_MIN, self._backoff * 2))
                await asyncio.sleep(self._backoff * (0.5 + self._rng.random()))
                self._queues[allow_stale][:0] = retry
            self.pump(allow_stale)

    def _handle(self, response: wpb.ExecuteResponse, batch: list[_Waiting], target: int, allow_stale: bool,
                retry: list[_Waiting]) -> None:
        status = response.status
        if status == Status.OK:
            self._backoff = 0.0
            self._last_ok = time.monotonic()
            self._served = True
            if not allow_stale:
                self.leader = target
            for waiting, result in zip(batch, response.results):
                _resolve(waiting.future, result)
                if waiting.timer is not None:
                    waiting.timer.cancel()
            return
        self._count(Status.Status.Name(status))
        if status == Status.NOT_LEADER:
            self.stats.redirects += 1
            hinted = self.by_address.get(response.leader_address)
            self.leader = hinted
            if hinted is None:
                self._failed(allow_stale, NoLeader(f"no leader yet in group {self.group} "
                                                   f"(replica {self.replicas[target]}: {response.message})",
                                                   group=self.group))
            else:
                self._failed(allow_stale, Unavailable(f"group {self.group}: no leader reachable ({response.message})"))
            fresh = [w for w in batch if w.redirects < MAX_IMMEDIATE_REDIRECTS]
            if hinted is not None and hinted != target and len(fresh) == len(batch):
                # A fresh hint: retry at once, no backoff (but replicas that
                # keep pointing at each other during an election get one).
                for waiting in batch:
                    waiting.redirects += 1
                self._queues[allow_stale][:0] = batch
                return
            for waiting in batch:
                waiting.redirects = 0
            retry.extend(batch)
        elif status == Status.UNAVAILABLE:
            self.leader = None
            self._failed(allow_stale, Unavailable(f"group {self.group}: {response.message}"))
            retry.extend(batch)
        elif status == Status.INVALID_ARGUMENT:
            for waiting in batch:
                _resolve(waiting.future, InvalidArgument(response.message))
        else:  # WRONG_GROUP: this router's configuration disagrees with the worker's
            for waiting in batch:
                _resolve(waiting.future, Unavailable(f"group {self.group}: configuration mismatch: {response.message}"))

    def _expire(self, batch: list[_Waiting], allow_stale: bool) -> list[_Waiting]:
        now = time.monotonic()
        alive = []
        for waiting in batch:
            if waiting.future.done():
                continue  # the caller gave up
            if waiting.deadline <= now:
                _resolve(waiting.future, self.failure(waiting, allow_stale))
            elif waiting.fail_fast and self.no_quorum_now():
                self._fail_now(waiting)
            else:
                alive.append(waiting)
        return alive

    def _count(self, reason: str) -> None:
        assert self.stats.errors is not None
        self.stats.errors[reason] = self.stats.errors.get(reason, 0) + 1

