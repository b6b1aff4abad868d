"""The Python client: talks to any router, fails over between routers and
retries safely within each call's deadline.

    from shardnode.client import Client
    with Client.from_config("etc/cluster.toml") as kv:
        old = kv.put(b"k", b"v")      # previous value or None
        val = kv.get(b"k")            # value or None (linearizable)
        old = kv.delete(b"k")         # previous value or None
        olds = kv.put_many([(b"a", b"1"), (b"b", b"2")])    # previous values, in order
        vals = kv.get_many([b"a", b"b"])                     # values or None, in order

Concurrent calls from many threads share one stream per router and leave
many to a message (kv.proto `BatchStream`): the calls are run by an
`AsyncClient` (aio.py) on one event-loop thread that the client starts on
its first call and stops in `close()`.

Errors are the `shardnode.errors` tree, never a raw gRPC error or a
TypeError:

- `InvalidArgument`: a key or value of the wrong type (only `bytes` and `str`
  are accepted, str is encoded as UTF-8), an empty or oversized key, an
  oversized value, a bad timeout. Checked here before any network traffic,
  and again by the router. Nothing was done.
- `Unavailable`: no router could serve the call before its deadline. Its
  subclasses name the cause: `RoutersUnreachable` (every router refused the
  connection: raised at once, not at the deadline; nothing was sent),
  `NoQuorum` (the key's group has no majority up: "no quorum in group N: 2
  of 3 replicas unreachable (...)"; raised at once, not at the deadline,
  unless the client was made with `wait_for_quorum=True`), `NoLeader` ("no
  leader yet in group N").
- `DeadlineExceeded`: the deadline passed while a router was still working
  on the call ("deadline exceeded while waiting for group N").
- `StaleSession` (a ShardnodeError): the servers refused a write's session
  as stale (should not happen with a healthy cluster).
- `ShardnodeError`: anything else (the client is closed, an unexpected
  server error).

After `Unavailable` or `DeadlineExceeded` a write's outcome is unknown: it
may or may not have been applied (exactly once, if it was).

Retries. Each operation has one deadline (`timeout`, 10 s by default). Within it:
UNAVAILABLE and broken connections move to the next router (round robin,
starting from the last router that answered); a DEADLINE_EXCEEDED a router
answered with time left is retried. Every router is tried once at once, then
retries back off from 20 ms, doubling to 500 ms, with jitter. A retried
write carries the same session `(client_id, sequence)` as its first attempt,
so the servers apply it once and answer every retry with the original result
(the right previous value), even through another router.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from typing import Any

from ..config import ClusterConfig
from ..errors import DeadlineExceeded, ShardnodeError
from ..proto import kv_pb2
from .aio import AsyncClient, BlockingCall
from .common import DEFAULT_TIMEOUT, ClientSettings, Key, StaleSession, Value
from .leases_watch import WatchEvent
from .sessions import SessionPool

__all__ = ["Client", "DEFAULT_TIMEOUT", "StaleSession"]

BatchOperation = kv_pb2.BatchOperation

#: How long past an operation's deadline a caller waits for the client's
#: thread before giving up on it (the engine answers by the deadline; this
#: only matters if that thread is stuck).
_GRACE = 5.0
#: Watch events waiting for the caller's thread before the stream waits for it.
WATCH_QUEUE = 1024
_CLOSE_TIMEOUT = 5.0


class Client(ClientSettings):
    """A thread-safe client of a shardnode cluster.

    `routers` are router addresses (`host:port`); a single string is taken as
    a list of one. One gRPC channel and one stream per router are opened on
    first use and shared by every thread. `timeout` is the default deadline
    of each operation, in seconds. `cluster`, when given, supplies the key
    and value size limits (otherwise 4096 and 1 MiB, the defaults of
    cluster.toml).

    Keys and values must be `bytes` or `str` (encoded as UTF-8); anything
    else raises InvalidArgument, not TypeError, before any network traffic.
    Results are always `bytes` (or None).
    """

    def __init__(self, routers: Sequence[str] | str, *, timeout: float = DEFAULT_TIMEOUT,
                 cluster: ClusterConfig | None = None, wait_for_quorum: bool = False) -> None:
        super().__init__(routers, timeout=timeout, cluster=cluster, wait_for_quorum=wait_for_quorum)
        self._engine = AsyncClient(self._routers, timeout=self._timeout, cluster=cluster,
                                   wait_for_quorum=wait_for_quorum)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._queue_lock = threading.Lock()
        self._queue: list[BlockingCall] = []
        self._drain_pending = False

    # --- Key-value operations ----------------------------------------------------------

    def put(self, key: Key, value: Value, *, timeout: float | None = None, lease: int = 0) -> bytes | None:
        """Set `key` to `value`; returns the previous value, or None if the key
        was absent. Applied exactly once, however often it is retried.
        `lease`: attach the key to that lease (lease_grant)."""
        if lease:
            return self._run(self._engine.put(key, value, timeout=timeout, lease=lease), timeout)
        op = BatchOperation(kind=BatchOperation.PUT, key=self._key(key), value=self._value(value),
                            wait_for_quorum=self._wait_for_quorum)
        result = self._perform([BlockingCall("put", op, self._budget(timeout), True)])[0]
        return result.value if result.existed else None

    def get(self, key: Key, *, timeout: float | None = None, allow_stale: bool = False) -> bytes | None:
        """The value of `key`, or None if it is absent. Linearizable unless
        `allow_stale` (then any replica's possibly older value may be read)."""
        op = BatchOperation(kind=BatchOperation.GET, key=self._key(key), allow_stale=bool(allow_stale),
                            wait_for_quorum=self._wait_for_quorum)
        result = self._perform([BlockingCall("get", op, self._budget(timeout), False)])[0]
        return result.value if result.existed else None

    def delete(self, key: Key, *, timeout: float | None = None) -> bytes | None:
        """Remove `key`; returns the value it had, or None if it was absent."""
        op = BatchOperation(kind=BatchOperation.DELETE, key=self._key(key), wait_for_quorum=self._wait_for_quorum)
        result = self._perform([BlockingCall("delete", op, self._budget(timeout), True)])[0]
        return result.value if result.existed else None

    def put_many(self, pairs: Iterable[tuple[Key, Value]], *, timeout: float | None = None) -> list[bytes | None]:
        """Put every (key, value) pair; returns their previous values, in order.
        Each is its own write (own session, applied exactly once; not a
        transaction) with its own deadline, all sent at once. Every argument
        is checked first (InvalidArgument: nothing was sent). If any fails,
        the first failure in order is raised once all are over."""
        budget = self._budget(timeout)
        calls = [BlockingCall("put", BatchOperation(kind=BatchOperation.PUT, key=k, value=v,
                                                             wait_for_quorum=self._wait_for_quorum), budget, True)
                 for k, v in self._pairs(pairs)]
        return [r.value if r.existed else None for r in self._perform(calls)]

    def get_many(self, keys: Iterable[Key], *, timeout: float | None = None,
                 allow_stale: bool = False) -> list[bytes | None]:
        """The values of `keys` (None where absent), in order; each read is
        linearizable on its own unless `allow_stale`. Failures as put_many."""
        budget = self._budget(timeout)
        stale = bool(allow_stale)
        calls = [BlockingCall("get", BatchOperation(kind=BatchOperation.GET, key=k, allow_stale=stale,
                                                             wait_for_quorum=self._wait_for_quorum), budget, False)
                 for k in self._keys(keys)]
        return [r.value if r.existed else None for r in self._perform(calls)]

    def scan(self, start: Key = b"", end: Key = b"", *, prefix: Key | None = None, limit: int = 0,
             keys_only: bool = False, allow_stale: bool = False,
             timeout: float | None = None) -> list[tuple[bytes, bytes]]:
        """The (key, value) pairs of [start, end) in key order (end empty: to
        the last key), or of the keys starting with `prefix`; at most `limit`
        (0: all). Each group's part is linearizable, the whole is not one
        snapshot (docs/etcd.md)."""
        return self._run(self._engine.scan(start, end, prefix=prefix, limit=limit, keys_only=keys_only,
                                           allow_stale=allow_stale, timeout=timeout), timeout)

    def scan_items(self, start: Key = b"", end: Key = b"", *, prefix: Key | None = None, limit: int = 0,
                   keys_only: bool = False, allow_stale: bool = False,
                   timeout: float | None = None) -> kv_pb2.ScanResponse:
        """scan() with each key's revisions and version, the count and `more`."""
        return self._run(self._engine.scan_items(start, end, prefix=prefix, limit=limit, keys_only=keys_only,
                                                 allow_stale=allow_stale, timeout=timeout), timeout)

    def compare_and_set(self, key: Key, expected: Value | None, value: Value, *,
                        timeout: float | None = None) -> tuple[bool, bytes | None]:
        """Set `key` to `value` if it holds `expected` (None: if absent);
        returns (swapped, the value held before). Atomic, applied once."""
        return self._run(self._engine.compare_and_set(key, expected, value, timeout=timeout), timeout)

    # --- Leases and watches (docs/etcd.md; leases_watch.py) ------------------------------

    def lease_grant(self, ttl: int, *, lease_id: int = 0, timeout: float | None = None) -> tuple[int, int]:
        """A new lease of `ttl` seconds: (its id, the TTL granted)."""
        return self._run(self._engine.lease_grant(ttl, lease_id=lease_id, timeout=timeout), timeout)

    def lease_keep_alive(self, lease_id: int, *, timeout: float | None = None) -> int:
        """Renew the lease for a full TTL; its TTL (LeaseNotFound if gone)."""
        return self._run(self._engine.lease_keep_alive(lease_id, timeout=timeout), timeout)

    def lease_revoke(self, lease_id: int, *, timeout: float | None = None) -> None:
        """Revoke the lease: its keys are deleted."""
        return self._run(self._engine.lease_revoke(lease_id, timeout=timeout), timeout)

    def lease_time_to_live(self, lease_id: int, *, timeout: float | None = None) -> tuple[int, int]:
        """(seconds left, TTL granted); LeaseNotFound if gone."""
        return self._run(self._engine.lease_time_to_live(lease_id, timeout=timeout), timeout)

    def leases(self, *, timeout: float | None = None) -> list[int]:
        return self._run(self._engine.leases(timeout=timeout), timeout)

    def watch(self, key: Key, *, prefix: bool = False, start_revision: int = 0,
              prev_value: bool = False) -> Iterator[WatchEvent]:
        """The changes of `key` (or of its prefix) as they happen: an endless
        iterator (break out of it, or close() it, to stop)."""
        # A task on the client's loop reads the stream into a queue this thread waits on: a
        # watch waits for as long as nothing changes, which no call deadline allows.
        events: queue.Queue[WatchEvent | BaseException] = queue.Queue(WATCH_QUEUE)

        async def pump() -> None:
            try:
                async for event in self._engine.watch(key, prefix=prefix, start_revision=start_revision,
                                                      prev_value=prev_value):
                    await asyncio.to_thread(events.put, event)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # handed to the caller's thread
                events.put(exc)

        if self._closed:
            raise ShardnodeError("the client is closed")
        loop = self._loop if self._loop is not None else self._start()
        task = asyncio.run_coroutine_threadsafe(pump(), loop)
        try:
            while True:
                item = events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            task.cancel()

    def status(self, *, timeout: float | None = None) -> kv_pb2.StatusResponse:
        """The cluster's status as one router sees it: every group, its leader
        and quorum, and every replica's role, term, indexes and lag."""
        return self._run(self._engine.status(timeout=timeout), timeout)

    # --- Life cycle --------------------------------------------------------------------

    def close(self) -> None:
        """Close every connection. Calls in flight fail with ShardnodeError;
        later calls too. Closing twice is harmless."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shut_down(), loop).result(_CLOSE_TIMEOUT)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(_CLOSE_TIMEOUT)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(routers={list(self._routers)!r}, timeout={self._timeout!r})"

    # --- The engine's thread -----------------------------------------------------------

    @property
    def _preferred(self) -> int:
        """The router the next call starts with."""
        return self._engine._preferred

    @_preferred.setter
    def _preferred(self, index: int) -> None:
        self._engine._preferred = index

    @property
    def _sessions(self) -> SessionPool:
        return self._engine._sessions

    @property
    def engine(self) -> AsyncClient:
        """The AsyncClient that runs this client's calls (on its own thread)."""
        return self._engine

    def _perform(self, calls: list[BlockingCall]) -> list[kv_pb2.BatchResult]:
        """Hand `calls` to the engine's thread and wait for all of them. Calls
        of many threads that arrive while the engine's thread is busy are
        handed over together (one wake-up) and leave in one stream message.
        Each write gets its own session here, kept for all its retries."""
        if not calls:
            return []
        slots = []
        for call in calls:
            if call.write:
                slot = self._sessions.acquire()
                call.op.session.client_id, call.op.session.sequence = slot.client_id, slot.sequence
                slots.append((call, slot))
        finished = False
        try:
            if self._closed:
                raise ShardnodeError("the client is closed")
            loop = self._loop if self._loop is not None else self._start()
            with self._queue_lock:
                self._queue.extend(calls)
                wake = not self._drain_pending
                self._drain_pending = True
            if wake:
                try:
                    loop.call_soon_threadsafe(self._drain)
                except RuntimeError:        # closed in the meantime: its loop is gone
                    raise ShardnodeError("the client is closed") from None
            for call in calls:
                if not call.wait(max(0.0, call.deadline - time.monotonic()) + _GRACE):
                    if self._closed:
                        raise ShardnodeError("the client is closed")
                    raise DeadlineExceeded(f"{call.name}: no answer from the client's thread within "
                                           f"{call.budget:g} s")
            finished = True
        finally:
            for call, slot in slots:
                # A write still in flight (we gave up waiting) keeps its session
                # out of the pool for good; a refused session is dropped too.
                if finished and not isinstance(call.error, StaleSession):
                    self._sessions.release(slot)
                else:
                    self._sessions.discard(slot)
        for call in calls:
            if call.error is not None:
                raise call.error
        return [call.result for call in calls]      # type: ignore[misc]

    def _drain(self) -> None:
        """On the engine's thread: start every call handed over so far."""
        with self._queue_lock:
            calls, self._queue = self._queue, []
            self._drain_pending = False
        self._engine.start_blocking(calls)

    def _run(self, coroutine: Coroutine[Any, Any, Any], timeout: float | None) -> Any:
        try:
            if self._closed:
                raise ShardnodeError("the client is closed")
            loop = self._loop if self._loop is not None else self._start()
            budget = self._budget(timeout)
            try:
                future = asyncio.run_coroutine_threadsafe(coroutine, loop)
            except RuntimeError:        # closed in the meantime: its loop is gone
                raise ShardnodeError("the client is closed") from None
        except BaseException:
            coroutine.close()
            raise
        try:
            return future.result(budget + _GRACE)
        except concurrent.futures.CancelledError:
            raise ShardnodeError("the client is closed") from None
        except concurrent.futures.TimeoutError:
            future.cancel()
            if self._closed:
                raise ShardnodeError("the client is closed") from None
            raise DeadlineExceeded(f"no answer from the client's thread within {budget:g} s") from None

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._closed:
                raise ShardnodeError("the client is closed")
            if self._loop is None:
                loop = _new_loop()
                thread = threading.Thread(target=_serve, args=(loop,), name="shardnode-client", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    async def _shut_down(self) -> None:
        """On the engine's thread: close the connections (calls in flight see
        the client closed), then end every call still running."""
        await self._engine.aclose()
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:         # uvloop is a dependency; the standard loop works too
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        try:
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()
