"""Leases and watches for shardnode's own client (docs/client.md, docs/etcd.md).

They are etcd's (the router serves etcdserverpb.Lease and Watch on its own
port too): `AsyncClient` mixes `LeaseWatchMixin` in, and `Client` calls it
through its event loop.

- Leases: grant, keep-alive, revoke, time to live, list; `put(..., lease=ID)`
  attaches a key (the put goes through etcd's Put: a retry through another
  router after an unknown outcome may apply it twice, with the same value).
- etcd's messages are imported on first use, not with the client: they are
  registered under etcd's own names (etcdserverpb.*), which another copy of
  them in the same process (aetcd, etcd3) registers
  too, and protobuf refuses a name twice. A program using only put/get/scan
  can import both.
- Watch: an async iterator of `WatchEvent`s of one key, or of every key with
  a prefix, from now or from a revision. When its router goes away it starts
  again at the next router from the revision after the last event it gave
  (within a group nothing is lost or repeated; across groups see
  docs/etcd.md, "Watch").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from ..errors import LeaseNotFound, ShardnodeError
from ..proto import kv_pb2
from .common import Key, prefix_end, status_of

_OK = kv_pb2.BatchResult(code=0)


def _etcd():  # type: ignore[no-untyped-def]
    """(messages, stubs) of etcd's API, imported on first use (see the module docstring)."""
    from ..proto import etcd_rpc_pb2, etcd_rpc_pb2_grpc
    return etcd_rpc_pb2, etcd_rpc_pb2_grpc
_NOT_FOUND = object()


class WatchCompacted(ShardnodeError):
    """The watch's start revision is older than the history a replica keeps;
    `first` is the oldest revision it can start from."""

    def __init__(self, message: str, first: int) -> None:
        super().__init__(message)
        self.first = first


@dataclass(slots=True, frozen=True)
class WatchEvent:
    """One change: kind "put" or "delete"; for a delete, value is b"" and
    version 0. `previous` is the value before (when asked and known)."""

    kind: str
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    previous: bytes | None = None


class LeaseWatchMixin:
    """Methods of AsyncClient (which provides _call, _pipe, _channels, _routers, _key, _budget)."""

    # --- Leases ---------------------------------------------------------------------------

    async def lease_grant(self, ttl: int, *, lease_id: int = 0, timeout: float | None = None) -> tuple[int, int]:
        """A new lease of `ttl` seconds (at least 2): (its id, the TTL granted).
        `lease_id` 0: an id chosen by the cluster."""
        rpc, rpc_grpc = _etcd()
        response = await self._etcd_call("lease grant", rpc_grpc.LeaseStub, "LeaseGrant",
                                    rpc.LeaseGrantRequest(TTL=int(ttl), ID=int(lease_id)), timeout)
        return response.ID, response.TTL

    async def lease_keep_alive(self, lease_id: int, *, timeout: float | None = None) -> int:
        """Renew the lease for a full TTL; its TTL (LeaseNotFound if it is gone)."""
        rpc, rpc_grpc = _etcd()
        budget = self._budget(timeout)

        async def attempt(index: int, remaining: float) -> tuple[kv_pb2.BatchResult, Any]:
            self._pipe(index)
            stub = rpc_grpc.LeaseStub(self._channels[index])
            try:
                call = stub.LeaseKeepAlive(iter([rpc.LeaseKeepAliveRequest(ID=int(lease_id))]), timeout=remaining)
                async for response in call:
                    return _OK, response
                return kv_pb2.BatchResult(code=grpc.StatusCode.UNAVAILABLE.value[0], message="no answer"), None
            except grpc.aio.AioRpcError as exc:
                code, details = status_of(exc)
                return kv_pb2.BatchResult(code=code.value[0], message=details), None

        response = await self._call("lease keep-alive", attempt, budget, write=False, key=b"")
        if response.TTL <= 0:
            raise LeaseNotFound(f"lease {lease_id:x} not found (revoked or expired)")
        return response.TTL

    async def lease_revoke(self, lease_id: int, *, timeout: float | None = None) -> None:
        """Revoke the lease: every key attached to it is deleted."""
        rpc, rpc_grpc = _etcd()
        await self._etcd_call("lease revoke", rpc_grpc.LeaseStub, "LeaseRevoke", rpc.LeaseRevokeRequest(ID=int(lease_id)),
                         timeout, not_found=f"lease {lease_id:x} not found")

    async def lease_time_to_live(self, lease_id: int, *, timeout: float | None = None) -> tuple[int, int]:
        """(seconds left, TTL granted); LeaseNotFound if it is gone."""
        rpc, rpc_grpc = _etcd()
        response = await self._etcd_call("lease time-to-live", rpc_grpc.LeaseStub, "LeaseTimeToLive",
                                    rpc.LeaseTimeToLiveRequest(ID=int(lease_id)), timeout)
        if response.TTL < 0:
            raise LeaseNotFound(f"lease {lease_id:x} not found (revoked or expired)")
        return response.TTL, response.grantedTTL

    async def leases(self, *, timeout: float | None = None) -> list[int]:
        """The ids of every lease."""
        rpc, rpc_grpc = _etcd()
        response = await self._etcd_call("lease list", rpc_grpc.LeaseStub, "LeaseLeases", rpc.LeaseLeasesRequest(),
                                    timeout)
        return [status.ID for status in response.leases]

    async def _put_leased(self, key: bytes, value: bytes, lease: int, timeout: float | None) -> bytes | None:
        rpc, rpc_grpc = _etcd()
        response = await self._etcd_call("put", rpc_grpc.KVStub, "Put",
                                    rpc.PutRequest(key=key, value=value, lease=int(lease), prev_kv=True), timeout,
                                    not_found=f"lease {lease:x} not found", write=True)
        return response.prev_kv.value if response.HasField("prev_kv") else None

    async def _etcd_call(self, op: str, stub_class: Any, method: str, request: Any, timeout: float | None, *,
                    not_found: str | None = None, write: bool = False) -> Any:
        """One etcd call with the client's fail-over and deadline (NOT_FOUND: LeaseNotFound)."""

        async def attempt(index: int, remaining: float) -> tuple[kv_pb2.BatchResult, Any]:
            self._pipe(index)       # opens the channel
            stub = stub_class(self._channels[index])
            try:
                return _OK, await getattr(stub, method)(request, timeout=remaining)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return _OK, _NOT_FOUND
                code, details = status_of(exc)
                return kv_pb2.BatchResult(code=code.value[0], message=details), None

        response = await self._call(op, attempt, self._budget(timeout), write=write, key=b"")
        if response is _NOT_FOUND:
            raise LeaseNotFound(f"{op}: {not_found or 'lease not found'}")
        return response

    # --- Watch ---------------------------------------------------------------------------

    async def watch(self, key: Key, *, prefix: bool = False, start_revision: int = 0,
                    prev_value: bool = False) -> AsyncIterator[WatchEvent]:
        """The changes of `key` (or of every key starting with it, `prefix`)
        from now on, or from `start_revision`; an endless async iterator
        (break out of it to stop). WatchCompacted if the revision is older
        than the history the cluster keeps; ShardnodeError when no router
        answered for the client's timeout."""
        rpc, rpc_grpc = _etcd()
        key = self._key(key)
        range_end = (prefix_end(key) or b"\0") if prefix else b""
        next_revision = start_revision
        index = self._preferred
        failures = 0
        answered = time.monotonic()        # the last answer of any router
        while True:
            self._pipe(index)
            stub = rpc_grpc.WatchStub(self._channels[index])
            requests: asyncio.Queue[rpc.WatchRequest | None] = asyncio.Queue()
            await requests.put(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                key=key, range_end=range_end, start_revision=next_revision, prev_kv=prev_value)))
            call = stub.Watch(_drain(requests))
            try:
                async for response in call:
                    failures = 0
                    answered = time.monotonic()
                    revision = response.header.revision
                    if response.created:
                        if not next_revision and revision:
                            # Watching from now: every later change is above the created revision.
                            next_revision = revision + 1
                    elif not response.events and not response.canceled and revision:
                        # A progress answer: every change up to it was passed on.
                        next_revision = max(next_revision, revision + 1)
                    if response.canceled:
                        if response.compact_revision:
                            raise WatchCompacted(f"watch: revision {next_revision} is compacted; the oldest "
                                                 f"available is {response.compact_revision}",
                                                 response.compact_revision)
                        raise ShardnodeError(f"watch: canceled by {self._routers[index]}: "
                                             f"{response.cancel_reason}")
                    for event in response.events:
                        next_revision = event.kv.mod_revision + 1
                        yield _event(event)
            except grpc.aio.AioRpcError:
                failures += 1
            finally:
                call.cancel()
                await requests.put(None)
            # That router is gone: the next one, from the revision after the last event.
            index = (index + 1) % len(self._routers)
            await asyncio.sleep(min(0.05 * (2 ** min(failures, 4)), 1.0))
            if time.monotonic() - answered > self._timeout:
                raise ShardnodeError(f"watch: no router answered for {self._timeout:g} s "
                                     f"({', '.join(self._routers)})")


async def _drain(requests: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    while True:
        request = await requests.get()
        if request is None:
            return
        yield request


def _event(event: Any) -> WatchEvent:
    kind = "delete" if event.type == 1 else "put"
    previous = event.prev_kv.value if event.HasField("prev_kv") else None
    return WatchEvent(kind, event.kv.key, event.kv.value, event.kv.mod_revision, event.kv.create_revision,
                      event.kv.version, previous)


def lease_id_text(lease: int) -> str:
    """A lease id as etcdctl prints it (hexadecimal)."""
    return f"{lease:x}"

