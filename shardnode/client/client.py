"""The Python client: talks to any router, fails over between routers and
retries safely within each call's deadline.

    from shardnode.client import Client
    with Client.from_config("etc/cluster.toml") as kv:
        old = kv.put(b"k", b"v")      # previous value or None
        val = kv.get(b"k")            # value or None (linearizable)
        old = kv.delete(b"k")         # previous value or None

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
  of 3 replicas unreachable (...)"), `NoLeader` ("no leader yet in group N").
- `DeadlineExceeded`: the deadline passed while a router was still working
  on the call ("deadline exceeded while waiting for group N").
- `StaleSession` (a ShardnodeError): the servers refused a write's session
  as stale (should not happen with a healthy cluster).
- `ShardnodeError`: anything else (the client is closed, an unexpected
  server error).

After `Unavailable` or `DeadlineExceeded` a write's outcome is unknown: it
may or may not have been applied (exactly once, if it was).

Retries. Each call has one deadline (`timeout`, 10 s by default). Within it:
UNAVAILABLE and broken connections move to the next router (round robin,
starting from the last router that answered); a DEADLINE_EXCEEDED a router
answered with time left is retried. Every router is tried once at once, then
retries back off from 20 ms, doubling to 500 ms, with jitter. A retried
write carries the same session `(client_id, sequence)` as its first attempt,
so the servers apply it once and answer every retry with the original result
(the right previous value), even through another router.
"""

from __future__ import annotations

import logging
import math
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ..config import ClusterConfig
from ..errors import (CAUSE_METADATA_KEY, GROUP_METADATA_KEY, DeadlineExceeded, InvalidArgument, NoLeader,
                      NoQuorum, RoutersUnreachable, ShardnodeError, Unavailable)
from ..ring import ShardMap
from ..proto import kv_pb2, kv_pb2_grpc
from ..security import channel_credentials, sync_channel
from .sessions import SessionPool

__all__ = ["Client", "DEFAULT_TIMEOUT", "StaleSession"]

log = logging.getLogger("shardnode.client")

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_KEY_BYTES = 4096
DEFAULT_MAX_VALUE_BYTES = 1 << 20
BACKOFF_MIN = 0.02
BACKOFF_MAX = 0.5
# A DEADLINE_EXCEEDED this close to the call's own deadline is the deadline.
_DEADLINE_SLACK = 0.005

_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    # Values may be configured up to 64 MiB; the servers enforce the real limit.
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # Retries are ours (they must reuse the write's session), not gRPC's.
    ("grpc.enable_retries", 0),
    # A router that comes back is found again within a second, and a connect
    # attempt to an unreachable (black-holed) host fails after ~1 s instead of
    # 20 s, so that the call can fail over to another router in time.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 1000),
    ("grpc.max_reconnect_backoff_ms", 1000),
)

# Codes after which another router may do better. CANCELLED is only ever
# caused by the server side here (a router stopping), or by close().
_TRY_ELSEWHERE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})

Key = bytes | str
Value = bytes | str


class StaleSession(ShardnodeError):
    """The servers refused a write because its session's sequence was already
    passed (FAILED_PRECONDITION): the servers' record of the session no longer
    matches the client's. The write was not applied by this attempt; the
    client drops the session and the next write uses a fresh one."""


class Client:
    """A thread-safe client of a shardnode cluster.

    `routers` are router addresses (`host:port`); a single string is taken as
    a list of one. One gRPC channel per router is opened on first use and
    shared by every thread. `timeout` is the default deadline of each call, in
    seconds. `cluster`, when given, supplies the key and value size limits
    (otherwise 4096 and 1 MiB, the defaults of cluster.toml).

    Keys and values must be `bytes` or `str` (encoded as UTF-8); anything
    else raises InvalidArgument, not TypeError, before any network traffic.
    Results are always `bytes` (or None).
    """

    def __init__(self, routers: Sequence[str] | str, *, timeout: float = DEFAULT_TIMEOUT,
                 cluster: ClusterConfig | None = None) -> None:
        if isinstance(routers, str):
            routers = [routers]
        addresses: list[str] = []
        for router in routers:
            _check_address(router)
            if router not in addresses:
                addresses.append(router)
        if not addresses:
            raise InvalidArgument("a client needs at least one router address")
        self._routers: tuple[str, ...] = tuple(addresses)
        self._timeout = _check_timeout(timeout)
        self._cluster = cluster
        if cluster is not None and cluster.security.tls:
            channel_credentials(cluster.security, None)     # missing certificates: one clear error now
        self._max_key_bytes = cluster.max_key_bytes if cluster else DEFAULT_MAX_KEY_BYTES
        self._max_value_bytes = cluster.max_value_bytes if cluster else DEFAULT_MAX_VALUE_BYTES
        self._lock = threading.Lock()
        self._channels: list[grpc.Channel | None] = [None] * len(self._routers)
        self._stubs: list[kv_pb2_grpc.KVStub | None] = [None] * len(self._routers)
        self._closed = False
        self._sessions = SessionPool()
        self._shard_map: ShardMap | None = None     # built on first need (error messages)
        self._random = random.Random()      # private: jitter and the first router
        # The router the next call starts with: the last one that answered.
        # Clients start at a random one so that they spread over the routers.
        self._preferred = self._random.randrange(len(self._routers))

    @classmethod
    def from_config(cls, path: str | Path = "etc/cluster.toml", **kwargs: Any) -> "Client":
        """A client of the cluster described by a cluster.toml: every host's
        router, the configured size limits. Raises `ConfigError` (a
        ValueError) if the file is missing or invalid."""
        cluster = ClusterConfig.load(path)
        return cls([h.router_address for h in cluster.hosts], cluster=cluster, **kwargs)

    # --- Properties --------------------------------------------------------------------

    @property
    def routers(self) -> tuple[str, ...]:
        return self._routers

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def cluster(self) -> ClusterConfig | None:
        return self._cluster

    @property
    def max_key_bytes(self) -> int:
        return self._max_key_bytes

    @property
    def max_value_bytes(self) -> int:
        return self._max_value_bytes

    # --- Key-value operations ----------------------------------------------------------

    def put(self, key: Key, value: Value, *, timeout: float | None = None) -> bytes | None:
        """Set `key` to `value`; returns the previous value, or None if the key
        was absent. Applied exactly once, however often it is retried."""
        key_bytes = self._key(key)
        value_bytes = self._value(value)
        budget = self._budget(timeout)
        response = self._write("put", "Put", budget, lambda session: kv_pb2.PutRequest(
            key=key_bytes, value=value_bytes, session=session))
        return response.old_value if response.existed else None

    def get(self, key: Key, *, timeout: float | None = None, allow_stale: bool = False) -> bytes | None:
        """The value of `key`, or None if it is absent. Linearizable unless
        `allow_stale` (then any replica's possibly older value may be read)."""
        key_bytes = self._key(key)
        budget = self._budget(timeout)
        request = kv_pb2.GetRequest(key=key_bytes, allow_stale=bool(allow_stale))
        response = self._call("get", "Get", request, budget, write=False)
        return response.value if response.found else None

    def delete(self, key: Key, *, timeout: float | None = None) -> bytes | None:
        """Remove `key`; returns the value it had, or None if it was absent."""
        key_bytes = self._key(key)
        budget = self._budget(timeout)
        response = self._write("delete", "Delete", budget, lambda session: kv_pb2.DeleteRequest(
            key=key_bytes, session=session))
        return response.old_value if response.existed else None

    def status(self, *, timeout: float | None = None) -> kv_pb2.StatusResponse:
        """The cluster's status as one router sees it: every group, its leader
        and quorum, and every replica's role, term, indexes and lag."""
        return self._call("status", "Status", kv_pb2.StatusRequest(), self._budget(timeout), write=False)

    # --- Life cycle --------------------------------------------------------------------

    def close(self) -> None:
        """Close every channel. Calls in flight fail with ShardnodeError;
        later calls too. Closing twice is harmless."""
        with self._lock:
            self._closed = True
            channels = [c for c in self._channels if c is not None]
            self._channels = [None] * len(self._routers)
            self._stubs = [None] * len(self._routers)
        for channel in channels:
            channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(routers={list(self._routers)!r}, timeout={self._timeout!r})"

    # --- Validation --------------------------------------------------------------------

    def _key(self, key: object) -> bytes:
        data = _to_bytes("key", key)
        if not 1 <= len(data) <= self._max_key_bytes:
            raise InvalidArgument(f"key must be 1 to {self._max_key_bytes} bytes (got {len(data)})")
        return data

    def _value(self, value: object) -> bytes:
        data = _to_bytes("value", value)
        if len(data) > self._max_value_bytes:
            raise InvalidArgument(f"value must be at most {self._max_value_bytes} bytes (got {len(data)})")
        return data

    def _budget(self, timeout: float | None) -> float:
        return self._timeout if timeout is None else _check_timeout(timeout)

    # --- Calls, retries and fail-over ---------------------------------------------------

    def _write(self, op: str, method: str, budget: float,
               build: Callable[[kv_pb2.Session], Any]) -> Any:
        """One write on one session: the same (client_id, sequence) for every
        retry; the session goes back to the pool when the call is over, its
        sequence already advanced (see sessions.py)."""
        slot = self._sessions.acquire()
        stale = False
        try:
            request = build(kv_pb2.Session(client_id=slot.client_id, sequence=slot.sequence))
            return self._call(op, method, request, budget, write=True)
        except StaleSession:
            stale = True
            raise
        finally:
            if stale:
                self._sessions.discard(slot)
            else:
                self._sessions.release(slot)

    def _stub(self, index: int) -> kv_pb2_grpc.KVStub:
        stub = self._stubs[index]
        if stub is not None:
            return stub
        with self._lock:
            if self._closed:
                raise ShardnodeError("the client is closed")
            stub = self._stubs[index]
            if stub is None:
                # TLS with the clients' certificate when the cluster says so.
                security = self._cluster.security if self._cluster is not None else None
                channel = sync_channel(self._routers[index], security, None, _CHANNEL_OPTIONS)
                self._channels[index] = channel
                stub = self._stubs[index] = kv_pb2_grpc.KVStub(channel)
            return stub

    def _call(self, op: str, method: str, request: Any, budget: float, *, write: bool) -> Any:
        if self._closed:
            raise ShardnodeError("the client is closed")
        deadline = time.monotonic() + budget
        count = len(self._routers)
        index = self._preferred
        tried_since_backoff: set[int] = set()
        refused: set[int] = set()  # routers whose last attempt found nothing listening
        backoff = BACKOFF_MIN
        last_error = ""
        cause: _Cause | None = None   # the last failure a router explained (no quorum in group N…)
        timed_out = False          # was the last failure a timeout (vs. unavailable)?
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            router = self._routers[index]
            tried_since_backoff.add(index)
            try:
                response = getattr(self._stub(index), method)(request, timeout=remaining)
            except grpc.RpcError as exc:
                code, details = _status(exc)
                if self._closed:
                    raise ShardnodeError("the client is closed") from None
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidArgument(details or f"{op}: invalid argument") from None
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    raise StaleSession(f"{op}: refused by {router}: {details}") from None
                last_error = f"{router}: {code.name}: {details}"
                cause = _cause_of(exc, details) or cause
                if code == grpc.StatusCode.UNAVAILABLE and _REFUSED in details.lower():
                    refused.add(index)
                    # gRPC reports a refusal from its last connection attempt (it waits
                    # up to a second before the next one): a router that has just been
                    # started again would look refused. A fresh TCP connection decides.
                    if len(refused) == count and _all_refuse(self._routers, deadline):
                        # Nothing listens anywhere: waiting out the deadline would not help.
                        raise RoutersUnreachable(
                            f"{op}: every router refused the connection ({', '.join(self._routers)}); "
                            "is the cluster running? (`make run` starts the local one)"
                            + ("; nothing was written" if write else ""), routers=self._routers) from None
                else:
                    refused.discard(index)
                if code in _TRY_ELSEWHERE:
                    timed_out = False
                    index = (index + 1) % count
                elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    timed_out = True
                    if deadline - time.monotonic() <= _DEADLINE_SLACK:
                        break
                    # The router gave up before our deadline: ask again.
                else:
                    unknown = " (the write's outcome is unknown)" if write else ""
                    raise ShardnodeError(f"{op}: {router} answered {code.name}: {details}{unknown}") from None
                log.debug("client.retry", extra={"op": op, "router": router, "code": code.name})
                if index in tried_since_backoff:
                    # Every router had its chance since the last pause: back off.
                    pause = min(backoff * (0.5 + 0.5 * self._random.random()), deadline - time.monotonic())
                    if pause > 0:
                        time.sleep(pause)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    tried_since_backoff.clear()
                continue
            except ValueError:
                # grpc raises ValueError on a channel closed under our feet.
                if self._closed:
                    raise ShardnodeError("the client is closed") from None
                raise
            self._preferred = index
            return response

        unknown = "; the write's outcome is unknown (it may or may not have been applied)" if write else ""
        if cause is not None:
            # A router said why (no quorum in group N, no leader yet, deadline while waiting for group N).
            raise cause.error(f"{op}: {cause.message}; gave up after {budget:g} s{unknown}",
                              group=cause.group) from None
        detail = f" (last error: {last_error})" if last_error else ""
        group = self._group_of(request)
        if timed_out or not last_error:
            waiting = f" while waiting for group {group}" if group is not None else ""
            raise DeadlineExceeded(f"{op}: deadline of {budget:g} s exceeded{waiting}{unknown}{detail}", group=group)
        raise Unavailable(f"{op}: no router could serve it within {budget:g} s{unknown}{detail}")

    def _group_of(self, request: Any) -> int | None:
        """The group of the request's key, when the cluster's shape is known."""
        key = getattr(request, "key", None)
        if not key or self._cluster is None:
            return None
        if self._shard_map is None:
            self._shard_map = ShardMap.build(self._cluster.groups, self._cluster.virtual_nodes)
        return self._shard_map.group_for(key)


@dataclass(slots=True, frozen=True)
class _Cause:
    error: type[NoQuorum] | type[NoLeader] | type[DeadlineExceeded]
    message: str
    group: int | None


#: How gRPC describes a connection attempt that found nothing listening.
_REFUSED = "connection refused"
_PROBE_TIMEOUT = 0.2


def _all_refuse(routers: Sequence[str], deadline: float) -> bool:
    """Whether a TCP connection to every router is refused right now (a
    timeout or any other failure does not count: that router may be slow)."""
    for router in routers:
        host, _, port = router.rpartition(":")
        timeout = min(_PROBE_TIMEOUT, deadline - time.monotonic())
        if timeout <= 0:
            return False
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                return False
        except ConnectionRefusedError:
            continue
        except OSError:
            return False
    return True
_CAUSES: dict[str, type[NoQuorum] | type[NoLeader] | type[DeadlineExceeded]] = {
    "no_quorum": NoQuorum, "no_leader": NoLeader, "deadline": DeadlineExceeded,
}


def _cause_of(exc: grpc.RpcError, details: str) -> _Cause | None:
    """The cause a router attached to its error answer (trailing metadata), if any."""
    try:
        metadata = exc.trailing_metadata() or ()  # type: ignore[attr-defined]
    except Exception:       # not a call's error (a channel-level failure)
        return None
    fields = {item.key if hasattr(item, "key") else item[0]: item.value if hasattr(item, "value") else item[1]
              for item in metadata}
    error = _CAUSES.get(str(fields.get(CAUSE_METADATA_KEY, "")))
    if error is None:
        return None
    group_text = str(fields.get(GROUP_METADATA_KEY, ""))
    return _Cause(error, details, int(group_text) if group_text.isdigit() else None)


def _status(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return code or grpc.StatusCode.UNKNOWN, details or ""


def _to_bytes(what: str, data: object) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        try:
            return data.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidArgument(f"{what} is a str that cannot be encoded as UTF-8: {exc.reason}") from None
    raise InvalidArgument(f"{what} must be bytes or str, not {type(data).__name__}")


def _check_timeout(timeout: object) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not math.isfinite(timeout) or timeout <= 0:
        raise InvalidArgument(f"timeout must be a positive number of seconds (got {timeout!r})")
    return float(timeout)


def _check_address(router: object) -> None:
    if not isinstance(router, str):
        raise InvalidArgument(f"a router address must be a 'host:port' string, not {type(router).__name__}")
    host, sep, port = router.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidArgument(f"router address {router!r} is not 'host:port'")
