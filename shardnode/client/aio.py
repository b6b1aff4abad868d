"""The asyncio client, and the engine of the blocking one (client.py).

    from shardnode.client import AsyncClient
    async with AsyncClient.from_config("etc/cluster.toml") as kv:
        old = await kv.put(b"k", b"v")
        vals = await kv.get_many([b"a", b"b"])

Every operation goes to a router through that router's `RouterPipe`
(pipe.py): concurrent operations of many tasks share one stream and leave
many to a message. Each keeps its own deadline, session and result, and the
same retry rules as one call at a time (client.py's docstring):
UNAVAILABLE and broken streams move to the next router, a DEADLINE_EXCEEDED
with time left is asked again, every router once at once and then with a
backoff from 20 ms doubling to 500 ms; a retried write carries the session
(client_id, sequence) of its first attempt, so it is applied once.
"""

from __future__ import annotations

import asyncio
import functools
import math
import threading
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc

from ..channel_cache import RETIRE_GRACE, CredentialWatch
from ..config import ClusterConfig
from ..errors import (DeadlineExceeded, InvalidArgument, NoQuorum, PermissionDenied, RoutersUnreachable,
                      ShardnodeError, TLSMismatch, Unavailable)
from ..proto import kv_pb2, kv_pb2_grpc
from ..placement.shard_map import ShardMap
from ..security import aio_channel
from .common import (CONNECTION_FAILED, BACKOFF_MAX, BACKOFF_MIN, CAUSES, CHANNEL_OPTIONS, CODES, DEADLINE_SLACK,
                     DEFAULT_TIMEOUT, REFUSED, TRY_ELSEWHERE, Cause, ClientSettings, Key, StaleSession, Value,
                     all_refuse, jitter, scan_request, speaks_tls, status_of)
from .leases_watch import LeaseWatchMixin
from .pipe import RouterPipe
from .sessions import SessionPool

__all__ = ["AsyncClient", "BlockingCall"]

BatchOperation = kv_pb2.BatchOperation
_OK = 0
#: How much earlier than the operation's deadline the router is asked to
#: answer, at most (a tenth of the time left, up to this).
ROUTER_MARGIN = 0.5
#: What a pipe's operation gets when the client's own deadline passes first.
_NO_ANSWER = kv_pb2.BatchResult(code=grpc.StatusCode.DEADLINE_EXCEEDED.value[0], message="no answer before the deadline")
#: (result, payload) of one attempt: the payload is the result itself for
#: key-value operations, the response for unary calls (status).
Attempt = Callable[[int, float], Awaitable[tuple[kv_pb2.BatchResult, Any]]]


class AsyncClient(LeaseWatchMixin, ClientSettings):
    """A client of a shardnode cluster for asyncio programs.

    The same arguments and errors as `Client`. It may be used from one event
    loop at a time (its connections belong to the loop of its first call);
    any number of tasks may call it at once: their operations are coalesced
    on the wire.
    """

    def __init__(self, routers: Sequence[str] | str, *, timeout: float = DEFAULT_TIMEOUT,
                 cluster: ClusterConfig | None = None, wait_for_quorum: bool = False) -> None:
        super().__init__(routers, timeout=timeout, cluster=cluster, wait_for_quorum=wait_for_quorum)
        self._pipes: list[RouterPipe | None] = [None] * len(self._routers)
        self._channels: list[grpc.aio.Channel | None] = [None] * len(self._routers)
        self._pipe_generations = [0] * len(self._routers)
        # With TLS, the client certificate's files: a change renews the pipes (shardnode.channel_cache).
        security = self._cluster.security if self._cluster is not None else None
        self._credentials = CredentialWatch(security, None) if security is not None and security.tls else None
        self._retiring: set[asyncio.Task[None]] = set()
        self._closed = False
        self._sessions = SessionPool()
        self._shard_map: ShardMap | None = None     # built on first need (error messages)
        self._retrying: set[asyncio.Task] = set()   # blocking calls past their first attempt
        self._tls_checked: set[int] = set()        # routers asked whether they speak TLS (speaks_tls)
        self._random = random.Random()      # private: jitter and the first router
        # The router the next call starts with: the last one that answered.
        # Clients start at a random one so that they spread over the routers.
        self._preferred = self._random.randrange(len(self._routers))

    # --- Key-value operations ----------------------------------------------------------

    async def put(self, key: Key, value: Value, *, timeout: float | None = None, lease: int = 0) -> bytes | None:
        """Set `key` to `value`; returns the previous value, or None if the key
        was absent. Applied exactly once, however often it is retried.
        `lease`: attach the key to that lease (lease_grant; see leases_watch.py)."""
        if lease:
            return await self._put_leased(self._key(key), self._value(value), lease, timeout)
        result = await self._write("put", BatchOperation.PUT, self._key(key), self._value(value),
                                   self._budget(timeout))
        return result.value if result.existed else None

    async def get(self, key: Key, *, timeout: float | None = None, allow_stale: bool = False) -> bytes | None:
        """The value of `key`, or None if it is absent. Linearizable unless
        `allow_stale` (then any replica's possibly older value may be read)."""
        op = BatchOperation(kind=BatchOperation.GET, key=self._key(key), allow_stale=bool(allow_stale),
                            wait_for_quorum=self._wait_for_quorum)
        result = await self._operation("get", op, self._budget(timeout), write=False)
        return result.value if result.existed else None

    async def delete(self, key: Key, *, timeout: float | None = None) -> bytes | None:
        """Remove `key`; returns the value it had, or None if it was absent."""
        result = await self._write("delete", BatchOperation.DELETE, self._key(key), b"", self._budget(timeout))
        return result.value if result.existed else None

    async def put_many(self, pairs: Iterable[tuple[Key, Value]], *, timeout: float | None = None) -> list[bytes | None]:
        """Put every (key, value) pair; returns their previous values, in order.
        Each is its own write (its own session, applied exactly once; not a
        transaction), all sent at once. Every argument is checked first
        (InvalidArgument: nothing was sent). If any fails, the first failure in
        order is raised once all are over; the others were applied."""
        checked = self._pairs(pairs)
        budget = self._budget(timeout)
        results = await _all([self._write("put", BatchOperation.PUT, k, v, budget) for k, v in checked])
        return [r.value if r.existed else None for r in results]

    async def get_many(self, keys: Iterable[Key], *, timeout: float | None = None,
                       allow_stale: bool = False) -> list[bytes | None]:
        """The values of `keys` (None where absent), in order; each read is
        linearizable on its own unless `allow_stale`. Failures as put_many."""
        checked = self._keys(keys)
        budget = self._budget(timeout)
        stale = bool(allow_stale)
        results = await _all([self._operation("get", BatchOperation(kind=BatchOperation.GET, key=k, allow_stale=stale,
                                                                   wait_for_quorum=self._wait_for_quorum),
                                              budget, write=False) for k in checked])
        return [r.value if r.existed else None for r in results]

    async def scan(self, start: Key = b"", end: Key = b"", *, prefix: Key | None = None, limit: int = 0,
                   keys_only: bool = False, allow_stale: bool = False,
                   timeout: float | None = None) -> list[tuple[bytes, bytes]]:
        """The (key, value) pairs of [start, end) in key order (end empty: to
        the last key), or of the keys starting with `prefix`; at most `limit`
        (0: all). Gathered from every group: each group's part is
        linearizable, the whole is not one snapshot (docs/etcd.md)."""
        response = await self.scan_items(start, end, prefix=prefix, limit=limit, keys_only=keys_only,
                                         allow_stale=allow_stale, timeout=timeout)
        return [(item.key, item.value) for item in response.items]

    async def scan_items(self, start: Key = b"", end: Key = b"", *, prefix: Key | None = None, limit: int = 0,
                         keys_only: bool = False, allow_stale: bool = False,
                         timeout: float | None = None) -> kv_pb2.ScanResponse:
        """scan() with each key's revisions and version, the count of every
        match and whether more matched than `limit`."""
        request = scan_request(self._key_or_empty(start), self._key_or_empty(end),
                               None if prefix is None else self._key(prefix), limit, keys_only, allow_stale)

        async def attempt(index: int, remaining: float) -> tuple[kv_pb2.BatchResult, Any]:
            return await self._unary(index, "Scan", request, remaining)

        return await self._call("scan", attempt, self._budget(timeout), write=False, key=b"")

    async def compare_and_set(self, key: Key, expected: Value | None, value: Value, *,
                              timeout: float | None = None) -> tuple[bool, bytes | None]:
        """Set `key` to `value` if it holds `expected` (None: if it is
        absent); returns (swapped, the value it held before: the one that did
        not match when not swapped, None if absent). Atomic and applied
        exactly once, however often it is retried."""
        key = self._key(key)
        value = self._value(value)
        expected_bytes = None if expected is None else self._value(expected)
        slot = self._sessions.acquire()
        stale = False
        request = kv_pb2.CompareAndSetRequest(
            key=key, value=value, expected=expected_bytes or b"", expected_absent=expected is None,
            session=kv_pb2.Session(client_id=slot.client_id, sequence=slot.sequence))

        async def attempt(index: int, remaining: float) -> tuple[kv_pb2.BatchResult, Any]:
            return await self._unary(index, "CompareAndSet", request, remaining)

        try:
            response = await self._call("compare-and-set", attempt, self._budget(timeout), write=True, key=key)
        except StaleSession:
            stale = True
            raise
        finally:
            if stale:
                self._sessions.discard(slot)
            else:
                self._sessions.release(slot)
        return response.swapped, response.current if response.existed else None

    def _key_or_empty(self, key: object) -> bytes:
        return b"" if key in (b"", "") else self._key(key)

    async def _unary(self, index: int, method: str, request: Any, remaining: float) -> tuple[kv_pb2.BatchResult, Any]:
        self._pipe(index)       # opens the channel
        stub = kv_pb2_grpc.KVStub(self._channels[index])
        try:
            return _SUCCESS, await getattr(stub, method)(request, timeout=remaining)
        except grpc.aio.AioRpcError as exc:
            code, details = status_of(exc)
            return kv_pb2.BatchResult(code=code.value[0], message=details), None

    async def status(self, *, timeout: float | None = None) -> kv_pb2.StatusResponse:
        """The cluster's status as one router sees it (see Client.status)."""
        return await self._call("status", self._status_attempt, self._budget(timeout), write=False, key=b"")

    # --- Life cycle --------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close every connection. Operations in flight fail with
        ShardnodeError; later ones too. Closing twice is harmless."""
        self._closed = True
        pipes = [p for p in self._pipes if p is not None]
        channels = [c for c in self._channels if c is not None]
        self._pipes = [None] * len(self._routers)
        self._channels = [None] * len(self._routers)
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        await asyncio.gather(*(p.close() for p in pipes), return_exceptions=True)
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(routers={list(self._routers)!r}, timeout={self._timeout!r})"

    @property
    def pipes(self) -> list[RouterPipe]:
        """The routers' pipes opened so far (their counters show the coalescing)."""
        return [p for p in self._pipes if p is not None]

    # --- Calls, retries and fail-over ---------------------------------------------------

    async def _write(self, op_name: str, kind: int, key: bytes, value: bytes, budget: float) -> kv_pb2.BatchResult:
        """One write on one session: the same (client_id, sequence) for every
        retry; the session goes back to the pool when the call is over, its
        sequence already advanced (see sessions.py)."""
        slot = self._sessions.acquire()
        stale = False
        try:
            op = BatchOperation(kind=kind, key=key, value=value,
                                session=kv_pb2.Session(client_id=slot.client_id, sequence=slot.sequence),
                                wait_for_quorum=self._wait_for_quorum)
            return await self._operation(op_name, op, budget, write=True)
        except StaleSession:
            stale = True
            raise
        finally:
            if stale:
                self._sessions.discard(slot)
            else:
                self._sessions.release(slot)

    def _operation(self, op_name: str, op: BatchOperation, budget: float, *, write: bool,
                   deadline: float | None = None, first: tuple[int, kv_pb2.BatchResult] | None = None
                   ) -> Awaitable[Any]:
        async def attempt(index: int, remaining: float) -> tuple[kv_pb2.BatchResult, Any]:
            pipe = self._pipe(index)
            op.timeout_ms = _router_timeout_ms(remaining)
            op_id, future = pipe.submit(op)
            timer = asyncio.get_running_loop().call_later(remaining, _no_answer, future)
            try:
                result = await future
            finally:
                timer.cancel()
                pipe.forget(op_id)
            return result, result

        return self._call(op_name, attempt, budget, write=write, key=op.key, deadline=deadline, first=first)

    # --- The blocking client's fast path ---------------------------------------------------

    def start_blocking(self, calls: list["BlockingCall"]) -> None:
        """On the loop: send each call's first attempt straight to the
        preferred router's pipe; a call answered OK is finished from the
        pipe's callback (no task per operation); any other answer goes on
        through `_call`'s retry rules in a task of its own."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        for call in calls:
            try:
                index = self._preferred
                pipe = self._pipe(index)
            except ShardnodeError as exc:
                call.finish(None, exc)
                continue
            remaining = call.deadline - now
            if remaining <= 0:
                self._continue(call, None)
                continue
            call.op.timeout_ms = _router_timeout_ms(remaining)
            op_id, future = pipe.submit(call.op)
            timer = loop.call_later(remaining, _no_answer, future)
            future.add_done_callback(functools.partial(self._first_answered, call, index, pipe, op_id, timer))

    def _first_answered(self, call: "BlockingCall", index: int, pipe: RouterPipe, op_id: int,
                        timer: asyncio.TimerHandle, future: asyncio.Future) -> None:
        timer.cancel()
        pipe.forget(op_id)
        if future.cancelled():
            call.finish(None, ShardnodeError("the client is closed"))
            return
        result = future.result()
        if result.code == _OK:
            self._preferred = index
            call.finish(result, None)
        else:
            self._continue(call, (index, result))

    def _continue(self, call: "BlockingCall", first: tuple[int, kv_pb2.BatchResult] | None) -> None:
        async def rest() -> None:
            try:
                result = await self._operation(call.name, call.op, call.budget, write=call.write,
                                               deadline=call.deadline, first=first)
            except asyncio.CancelledError:
                call.finish(None, ShardnodeError("the client is closed"))
                raise
            except Exception as exc:
                call.finish(None, exc)
            else:
                call.finish(result, None)

        task = asyncio.ensure_future(rest())
        self._retrying.add(task)
        task.add_done_callback(self._retrying.discard)

    async def _status_attempt(self, index: int, remaining: float) -> tuple[kv_pb2.BatchResult, Any]:
        self._pipe(index)       # opens the channel
        stub = kv_pb2_grpc.KVStub(self._channels[index])
        try:
            return _SUCCESS, await stub.Status(kv_pb2.StatusRequest(), timeout=remaining)
        except grpc.aio.AioRpcError as exc:
            code, details = status_of(exc)
            return kv_pb2.BatchResult(code=code.value[0], message=details), None

    def _pipe(self, index: int) -> RouterPipe:
        pipe = self._pipes[index]
        generation = self._credentials.generation() if self._credentials is not None else 0
        if pipe is not None and self._pipe_generations[index] == generation:
            return pipe
        if self._closed:
            raise ShardnodeError("the client is closed")
        if pipe is not None:
            # The certificate files changed: a channel would reconnect with the
            # old ones. The old pipe answers what it carries, then closes.
            self._retire(pipe, self._channels[index])
        # TLS with the clients' certificate when the cluster says so.
        security = self._cluster.security if self._cluster is not None else None
        if security is not None:
            channel = aio_channel(self._routers[index], security, None, CHANNEL_OPTIONS)
        else:
            channel = grpc.aio.insecure_channel(self._routers[index], options=list(CHANNEL_OPTIONS))
        self._channels[index] = channel
        self._pipe_generations[index] = generation
        pipe = self._pipes[index] = RouterPipe(self._routers[index], channel)
        return pipe

    def _retire(self, pipe: RouterPipe, channel: grpc.aio.Channel | None) -> None:
        async def retire() -> None:
            await asyncio.sleep(RETIRE_GRACE)
            await pipe.close()
            if channel is not None:
                await channel.close()

        task = asyncio.ensure_future(retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _call(self, op: str, attempt: Attempt, budget: float, *, write: bool, key: bytes,
                    deadline: float | None = None, first: tuple[int, kv_pb2.BatchResult] | None = None) -> Any:
        """The operation's attempts until one succeeds, fails for good, or the
        deadline passes. `first`: (router index, result) of a first attempt
        already made (the blocking client's fast path), to go on from."""
        if self._closed:
            raise ShardnodeError("the client is closed")
        if deadline is None:
            deadline = time.monotonic() + budget
        count = len(self._routers)
        index = self._preferred if first is None else first[0]
        tried_since_backoff: set[int] = set()
        refused: set[int] = set()  # routers whose last attempt found nothing listening
        reached = ""               # a router an attempt may have reached (a write may have been applied there)
        backoff = BACKOFF_MIN
        last_error = ""
        cause: Cause | None = None   # the last failure a router explained (no quorum in group N…)
        timed_out = False          # was the last failure a timeout (vs. unavailable)?
        # Routers that answered at once that the key's group has no quorum
        # (fail fast): once every router did (or refuses), NoQuorum now.
        no_quorum: set[int] = set()
        at_once = False
        mismatched: set[int] = set()   # routers that speak TLS when we do not, or the reverse
        while True:
            router = self._routers[index]
            if first is not None:
                # The answer of the attempt already made counts even when it came
                # at the deadline: it may say why (no quorum in group N, ...).
                result = payload = first[1]
                first = None
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (remaining <= DEADLINE_SLACK and last_error):
                    # (A sliver of time left after a backoff is not worth an attempt:
                    # it would end as a bare timeout and hide why the others failed.)
                    break
                result, payload = await attempt(index, remaining)
                if result is _NO_ANSWER and last_error and not timed_out:
                    # Our own deadline ended this attempt: the routers' earlier
                    # answers (unavailable, no quorum, ...) say more than a bare
                    # timeout of the last, late attempt would.
                    break
            tried_since_backoff.add(index)
            if result.code == _OK:
                self._preferred = index
                return payload
            if self._closed:
                raise ShardnodeError("the client is closed")
            if self._preferred == index:
                # The next call starts at another router. This one may be cut off from the
                # group's leader by the network: it then holds each operation until (almost)
                # the deadline, leaving no time to try another, and a client that kept
                # starting there would fail every call for as long as the cut lasts.
                self._preferred = (index + 1) % count
            code = CODES.get(result.code, grpc.StatusCode.UNKNOWN)
            details = result.message
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(details or f"{op}: invalid argument")
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                raise StaleSession(f"{op}: refused by {router}: {details}")
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                # Past one of the router's [limits]: refused, nothing was done.
                raise ShardnodeError(f"{op}: refused by {router}: {details}; nothing was done")
            if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                # The user's roles (or the certificate): every router answers the same.
                raise PermissionDenied(f"{op}: refused by {router}: {details}")
            last_error = f"{router}: {code.name}: {details}"
            error = CAUSES.get(result.cause)
            if error is not None:
                cause = Cause(error, details, result.group if result.HasField("group") else None)
            if error is NoQuorum and not self._wait_for_quorum:
                no_quorum.add(index)
            else:
                no_quorum.discard(index)
            if code == grpc.StatusCode.UNAVAILABLE and REFUSED in details.lower():
                refused.add(index)
                # gRPC reports a refusal from its last connection attempt (it waits
                # up to a second before the next one): a router that has just been
                # started again would look refused. A fresh TCP connection decides.
                if len(refused) == count and await asyncio.get_running_loop().run_in_executor(
                        None, all_refuse, self._routers, deadline):
                    # Nothing listens anywhere: waiting out the deadline would not help.
                    if write and reached:
                        # An earlier attempt got further (the router died after, or
                        # while, applying it): not "nothing was written".
                        raise Unavailable(
                            f"{op}: every router refuses the connection now ({', '.join(self._routers)}), "
                            f"after an earlier attempt reached {reached}; the write's outcome is unknown "
                            "(it may or may not have been applied)")
                    raise RoutersUnreachable(
                        f"{op}: every router refused the connection ({', '.join(self._routers)}); "
                        "is the cluster running? (`make run` starts the local one)"
                        + ("; nothing was written" if write else ""), routers=self._routers)
            else:
                refused.discard(index)
                if code == grpc.StatusCode.UNAVAILABLE and error is None and CONNECTION_FAILED in details \
                        and index not in self._tls_checked:
                    # The connection failed without a reason (plaintext to a TLS router
                    # says "Socket closed"): ask the router whether it speaks TLS.
                    self._tls_checked.add(index)
                    speaks = await asyncio.get_running_loop().run_in_executor(
                        None, speaks_tls, router, max(0.05, min(0.5, deadline - time.monotonic())))
                    if speaks is not None and speaks != self._uses_tls:
                        mismatched.add(index)
                if index not in mismatched:
                    reached = router
            if mismatched and len(mismatched | refused) == count:
                raise TLSMismatch(self._tls_mismatch(op, sorted(self._routers[i] for i in mismatched)),
                                  routers=self._routers)
            if code in TRY_ELSEWHERE:
                timed_out = False
                index = (index + 1) % count
            elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                timed_out = True
                if deadline - time.monotonic() <= DEADLINE_SLACK:
                    break
                # The router gave up before our deadline: ask again.
            else:
                unknown = " (the write's outcome is unknown)" if write else ""
                raise ShardnodeError(f"{op}: {router} answered {code.name}: {details}{unknown}")
            if no_quorum and len(no_quorum | refused) == count:
                at_once = True      # every router sees the group without a majority: do not wait for it
                break
            if index in tried_since_backoff:
                # Every router had its chance since the last pause: back off.
                pause = min(jitter(self._random, backoff), deadline - time.monotonic())
                if pause > 0:
                    await asyncio.sleep(pause)
                backoff = min(backoff * 2, BACKOFF_MAX)
                tried_since_backoff.clear()

        unknown = "; the write's outcome is unknown (it may or may not have been applied)" if write else ""
        if cause is not None:
            # A router said why (no quorum in group N, no leader yet, deadline while waiting for group N).
            after = "" if at_once else f"; gave up after {budget:g} s"
            raise cause.error(f"{op}: {cause.message}{after}{unknown}", group=cause.group)
        detail = f" (last error: {last_error})" if last_error else ""
        group = self._group_of(key)
        if timed_out or not last_error:
            waiting = f" while waiting for group {group}" if group is not None else ""
            raise DeadlineExceeded(f"{op}: deadline of {budget:g} s exceeded{waiting}{unknown}{detail}", group=group)
        raise Unavailable(f"{op}: no router could serve it within {budget:g} s{unknown}{detail}")

    @property
    def _uses_tls(self) -> bool:
        return self._cluster is not None and self._cluster.security.tls

    def _tls_mismatch(self, op: str, routers: list[str]) -> str:
        where = ", ".join(routers)
        if self._uses_tls:
            return (f"{op}: this client uses TLS ([security] tls = true in its cluster.toml) but the router at "
                    f"{where} does not: is it another cluster, or one configured without TLS? Nothing was sent")
        return (f"{op}: the router at {where} requires TLS and this client connects in plaintext: make the client "
                "with Client.from_config(PATH) (or kv739_init(PATH)) from the cluster's own cluster.toml, which has "
                "[security] tls = true and the certificates' location, not from a list of router addresses "
                "(docs/security.md). Nothing was sent")

    def _group_of(self, key: bytes) -> int | None:
        """The group of the key, when the cluster's shape is known."""
        if not key or self._cluster is None:
            return None
        if self._shard_map is None:
            self._shard_map = ShardMap.build(self._cluster.groups, self._cluster.virtual_nodes)
        return self._shard_map.group_for(key)


_SUCCESS = kv_pb2.BatchResult(code=_OK)


class BlockingCall:
    """One operation of a thread of the blocking client: what it sends, and
    a lock it waits on, released with the outcome (a lock is the cheapest
    thing a thread can sleep on)."""

    __slots__ = ("name", "op", "budget", "deadline", "write", "result", "error", "_done")

    def __init__(self, name: str, op: BatchOperation, budget: float, write: bool) -> None:
        self.name = name
        self.op = op
        self.budget = budget
        self.deadline = time.monotonic() + budget
        self.write = write
        self.result: kv_pb2.BatchResult | None = None
        self.error: BaseException | None = None
        self._done = threading.Lock()
        self._done.acquire()

    def finish(self, result: kv_pb2.BatchResult | None, error: BaseException | None) -> None:
        self.result, self.error = result, error
        self._done.release()

    def wait(self, timeout: float) -> bool:
        return self._done.acquire(timeout=timeout)


def _router_timeout_ms(remaining: float) -> int:
    """The deadline the router is given: a little before ours (a tenth of the
    time left, up to half a second), so that its answer, and the reason it
    gives (no quorum in group N, ...), arrives before our own deadline ends
    the attempt even on a loaded machine, whose stalls last a few hundred ms."""
    return max(1, math.ceil((remaining - min(ROUTER_MARGIN, remaining / 10)) * 1000))


def _no_answer(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(_NO_ANSWER)


async def _all(calls: list[Awaitable[Any]]) -> list[Any]:
    """Run every call at once; their results in order, or the first failure
    in order once every call is over (no write is left running)."""
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes
