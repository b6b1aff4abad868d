"""One router's end of the coalescing stream (kv.proto `BatchStream`).

Every operation a client sends to a router goes through that router's
`RouterPipe`: the operations submitted while the previous message was being
written leave together in the next `BatchRequest`, each tagged with an id,
its own deadline (`timeout_ms`) and its own session; results come back many
per `BatchResponse`, in any order, and are matched by id. So many concurrent
callers cost the router one stream message per batch instead of one gRPC
call per operation (TiKV's batch commands work this way).

A pipe answers every submitted operation with a `BatchResult`, never an
exception: a broken stream (the router stopped, the connection was refused)
answers all its operations with that stream's gRPC status (UNAVAILABLE,
CANCELLED, ...), so that the caller's retry rules treat it as a failed call.
The next operation opens a new stream. A router that does not know
BatchStream (an older version: UNIMPLEMENTED) is spoken to with one unary
call per operation from then on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import grpc

from ..config import CLIENT_MESSAGE_OPERATIONS
from ..proto import kv_pb2, kv_pb2_grpc
from .common import cause_of_metadata, status_of

__all__ = ["RouterPipe"]

log = logging.getLogger("shardnode.client")

_OK = grpc.StatusCode.OK.value[0]
#: How a stream can end when its router goes away mid-call (besides UNAVAILABLE).
_STREAM_BROKEN = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED,
                            grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED})
BatchOperation = kv_pb2.BatchOperation


#: A message carries at most this many operations and (unless one operation
#: alone is larger) this many bytes of keys and values: within every router's
#: [limits] (max_batch_operations is at least CLIENT_MESSAGE_OPERATIONS,
#: max_request_bytes at least 2 MiB).
MESSAGE_OPERATIONS = CLIENT_MESSAGE_OPERATIONS
MESSAGE_BYTES = 1 << 20


def _take_message(outbox: list[BatchOperation]) -> list[BatchOperation]:
    """Remove and return the first operations of `outbox` that fit in one message."""
    size = 0
    count = 0
    for op in outbox[:MESSAGE_OPERATIONS]:
        size += len(op.key) + len(op.value) + 32
        if count and size > MESSAGE_BYTES:
            break
        count += 1
    taken = outbox[:count]
    del outbox[:count]
    return taken


class _Stream:
    """One BatchStream call and the operations it carries."""

    __slots__ = ("call", "waiting", "outbox", "wake", "broken")

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self.call = call
        self.waiting: dict[int, tuple[asyncio.Future, BatchOperation]] = {}
        self.outbox: list[BatchOperation] = []
        self.wake = asyncio.Event()
        self.broken = False


class RouterPipe:
    def __init__(self, address: str, channel: grpc.aio.Channel) -> None:
        self.address = address
        self._channel = channel
        self._stub = kv_pb2_grpc.KVStub(channel)
        self._ids = itertools.count(1)
        self._stream: _Stream | None = None
        self._tasks: set[asyncio.Task] = set()
        self.unary = False          # the router does not know BatchStream
        self.messages = 0           # BatchRequest messages sent (tests check the coalescing)
        self.operations = 0         # operations sent in them

    def submit(self, op: BatchOperation) -> tuple[int, asyncio.Future]:
        """Send `op` with the next message; its future gets the BatchResult.
        `op.timeout_ms` must be set (the operation's own deadline)."""
        future = asyncio.get_running_loop().create_future()
        op.id = op_id = next(self._ids)
        if self.unary:
            self._spawn(self._unary(op, future))
            return op_id, future
        stream = self._stream
        if stream is None or stream.broken:
            stream = self._stream = _Stream(self._stub.BatchStream())
            self._spawn(self._send(stream))
            self._spawn(self._receive(stream))
        stream.waiting[op_id] = (future, op)
        stream.outbox.append(op)
        stream.wake.set()
        return op_id, future

    def forget(self, op_id: int) -> None:
        """The caller stopped waiting for `op_id` (its deadline passed)."""
        stream = self._stream
        if stream is not None:
            stream.waiting.pop(op_id, None)

    async def close(self) -> None:
        """Cancel the stream: its operations are answered CANCELLED."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.call.cancel()
            self._fail(stream, grpc.StatusCode.CANCELLED, "the client is closed")
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- The stream's two halves ---------------------------------------------------------------

    def _spawn(self, coroutine) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, stream: _Stream) -> None:
        """Write what waits in the outbox, all of it in one message; what is
        submitted during a write leaves with the next one."""
        try:
            while True:
                await stream.wake.wait()
                stream.wake.clear()
                if stream.broken:
                    return
                while stream.outbox:
                    ops = _take_message(stream.outbox)
                    self.messages += 1
                    self.operations += len(ops)
                    await stream.call.write(kv_pb2.BatchRequest(operations=ops))
        except asyncio.CancelledError:
            raise
        except Exception as exc:            # the call ended: the receiving half says how
            log.debug("client.stream_write_failed", extra={"router": self.address, "error": repr(exc)})

    async def _receive(self, stream: _Stream) -> None:
        code, details = grpc.StatusCode.UNAVAILABLE, f"router {self.address} closed the stream"
        try:
            async for response in stream.call:
                waiting = stream.waiting
                for result in response.results:
                    entry = waiting.pop(result.id, None)
                    if entry is not None and not entry[0].done():
                        entry[0].set_result(result)
        except grpc.aio.AioRpcError as exc:
            code, details = status_of(exc)
            if code in _STREAM_BROKEN:
                # The stream itself failed (the router stopped or crashed, the
                # connection broke): its operations' outcomes are unknown, and a
                # retry through another router (same session) is what helps.
                code, details = grpc.StatusCode.UNAVAILABLE, f"stream to {self.address} ended: {code.name}: {details}"
        except asyncio.CancelledError:
            code, details = grpc.StatusCode.CANCELLED, "the client is closed"
            raise
        except Exception as exc:            # a bug must fail the operations, not hang them
            log.exception("client.stream_read_failed", extra={"router": self.address})
            code, details = grpc.StatusCode.UNAVAILABLE, f"stream to {self.address} failed: {exc!r}"
        finally:
            if code == grpc.StatusCode.UNIMPLEMENTED:
                # An older router: one unary call per operation from now on,
                # starting with the operations this stream was carrying.
                self.unary = True
                stream.broken = True
                stream.wake.set()
                waiting, stream.waiting = stream.waiting, {}
                for future, op in waiting.values():
                    self._spawn(self._unary(op, future))
            else:
                self._fail(stream, code, details)

    def _fail(self, stream: _Stream, code: grpc.StatusCode, details: str) -> None:
        stream.broken = True
        stream.wake.set()
        waiting, stream.waiting = stream.waiting, {}
        stream.outbox = []
        for future, op in waiting.values():
            if not future.done():
                future.set_result(kv_pb2.BatchResult(id=op.id, code=code.value[0], message=details))

    # --- One unary call per operation (routers without BatchStream) -----------------------------

    async def _unary(self, op: BatchOperation, future: asyncio.Future) -> None:
        timeout = op.timeout_ms / 1000 if op.timeout_ms else None
        try:
            if op.kind == BatchOperation.GET:
                got = await self._stub.Get(kv_pb2.GetRequest(key=op.key, allow_stale=op.allow_stale), timeout=timeout)
                result = kv_pb2.BatchResult(id=op.id, code=_OK, existed=got.found, value=got.value)
            elif op.kind == BatchOperation.PUT:
                put = await self._stub.Put(kv_pb2.PutRequest(key=op.key, value=op.value, session=op.session),
                                           timeout=timeout)
                result = kv_pb2.BatchResult(id=op.id, code=_OK, existed=put.existed, value=put.old_value)
            else:
                deleted = await self._stub.Delete(kv_pb2.DeleteRequest(key=op.key, session=op.session),
                                                  timeout=timeout)
                result = kv_pb2.BatchResult(id=op.id, code=_OK, existed=deleted.existed, value=deleted.old_value)
        except grpc.aio.AioRpcError as exc:
            code, details = status_of(exc)
            result = kv_pb2.BatchResult(id=op.id, code=code.value[0], message=details)
            cause, group = cause_of_metadata(exc, details)
            if cause:
                result.cause = cause
                if group is not None:
                    result.group = group
        if not future.done():
            future.set_result(result)
