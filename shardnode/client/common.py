"""What the blocking `Client` and the `AsyncClient` share: argument checks,
limits, the channel options, and how a router's error answer is read.

Errors are the `shardnode.errors` tree, never a raw gRPC error or a
TypeError (see client.py for the full list and the retry rules).
"""

from __future__ import annotations

import math
import random
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from ..config import ClusterConfig
from ..errors import (CAUSE_METADATA_KEY, GROUP_METADATA_KEY, DeadlineExceeded, InvalidArgument, NoLeader,
                      NoQuorum, ShardnodeError)
from ..proto import kv_pb2
from ..security import channel_credentials

__all__ = ["DEFAULT_TIMEOUT", "ClientSettings", "StaleSession"]

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_KEY_BYTES = 4096
DEFAULT_MAX_VALUE_BYTES = 1 << 20
BACKOFF_MIN = 0.02
BACKOFF_MAX = 0.5
# A DEADLINE_EXCEEDED this close to the call's own deadline is the deadline.
DEADLINE_SLACK = 0.005

CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
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
TRY_ELSEWHERE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
CODES: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}

Key = bytes | str
Value = bytes | str


class StaleSession(ShardnodeError):
    """The servers refused a write because its session's sequence was already
    passed (FAILED_PRECONDITION): the servers' record of the session no longer
    matches the client's. The write was not applied by this attempt; the
    client drops the session and the next write uses a fresh one."""


Settings = TypeVar("Settings", bound="ClientSettings")


class ClientSettings:
    """The routers, default deadline and limits of a client, checked once;
    the argument checks every call makes before any network traffic."""

    def __init__(self, routers: Sequence[str] | str, *, timeout: float = DEFAULT_TIMEOUT,
                 cluster: ClusterConfig | None = None, wait_for_quorum: bool = False) -> None:
        if isinstance(routers, str):
            routers = [routers]
        addresses: list[str] = []
        for router in routers:
            check_address(router)
            if router not in addresses:
                addresses.append(router)
        if not addresses:
            raise InvalidArgument("a client needs at least one router address")
        self._routers: tuple[str, ...] = tuple(addresses)
        self._timeout = check_timeout(timeout)
        self._cluster = cluster
        self._wait_for_quorum = bool(wait_for_quorum)
        if cluster is not None and cluster.security.tls:
            channel_credentials(cluster.security, None)     # missing certificates: one clear error now
        self._max_key_bytes = cluster.max_key_bytes if cluster else DEFAULT_MAX_KEY_BYTES
        self._max_value_bytes = cluster.max_value_bytes if cluster else DEFAULT_MAX_VALUE_BYTES

    @classmethod
    def from_config(cls: type[Settings], path: str | Path = "etc/cluster.toml", **kwargs: Any) -> Settings:
        """A client of the cluster described by a cluster.toml: every host's
        router, the configured size limits. Raises `ConfigError` (a
        ValueError) if the file is missing or invalid."""
        cluster = ClusterConfig.load(path)
        return cls([h.router_address for h in cluster.hosts], cluster=cluster, **kwargs)

    @property
    def routers(self) -> tuple[str, ...]:
        return self._routers

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def wait_for_quorum(self) -> bool:
        """False (the default): an operation on a group that has no majority of
        its replicas up fails at once with NoQuorum (every router is asked
        once); True: it waits for the group, until its deadline."""
        return self._wait_for_quorum

    @property
    def cluster(self) -> ClusterConfig | None:
        return self._cluster

    @property
    def max_key_bytes(self) -> int:
        return self._max_key_bytes

    @property
    def max_value_bytes(self) -> int:
        return self._max_value_bytes

    def _key(self, key: object) -> bytes:
        data = to_bytes("key", key)
        if not 1 <= len(data) <= self._max_key_bytes:
            raise InvalidArgument(f"key must be 1 to {self._max_key_bytes} bytes (got {len(data)})")
        return data

    def _value(self, value: object) -> bytes:
        data = to_bytes("value", value)
        if len(data) > self._max_value_bytes:
            raise InvalidArgument(f"value must be at most {self._max_value_bytes} bytes (got {len(data)})")
        return data

    def _pairs(self, pairs: object) -> list[tuple[bytes, bytes]]:
        """put_many's argument: (key, value) pairs, every one checked first."""
        checked = []
        for pair in _items("put_many", pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise InvalidArgument(f"put_many takes (key, value) pairs, not {type(pair).__name__}")
            checked.append((self._key(pair[0]), self._value(pair[1])))
        return checked

    def _keys(self, keys: object) -> list[bytes]:
        return [self._key(key) for key in _items("get_many", keys)]

    def _budget(self, timeout: float | None) -> float:
        return self._timeout if timeout is None else check_timeout(timeout)


def _items(what: str, items: object) -> list[Any]:
    if isinstance(items, (bytes, str)) or not hasattr(items, "__iter__"):
        raise InvalidArgument(f"{what} takes a sequence, not {type(items).__name__}")
    return list(items)      # type: ignore[call-overload]


@dataclass(slots=True, frozen=True)
class Cause:
    """The failure a router explained (no quorum in group N, ...)."""

    error: type[NoQuorum] | type[NoLeader] | type[DeadlineExceeded]
    message: str
    group: int | None


CAUSES: dict[str, type[NoQuorum] | type[NoLeader] | type[DeadlineExceeded]] = {
    "no_quorum": NoQuorum, "no_leader": NoLeader, "deadline": DeadlineExceeded,
}


def cause_of_metadata(exc: grpc.RpcError, details: str) -> tuple[str, int | None]:
    """The cause and group a router attached to its error answer (trailing metadata), if any."""
    try:
        metadata = exc.trailing_metadata() or ()  # type: ignore[attr-defined]
    except Exception:       # not a call's error (a channel-level failure)
        return "", None
    fields = {item.key if hasattr(item, "key") else item[0]: item.value if hasattr(item, "value") else item[1]
              for item in metadata}
    group_text = str(fields.get(GROUP_METADATA_KEY, ""))
    return str(fields.get(CAUSE_METADATA_KEY, "")), int(group_text) if group_text.isdigit() else None


#: How gRPC describes a connection attempt that found nothing listening.
REFUSED = "connection refused"
#: How gRPC describes a channel that could not connect (for whatever reason).
CONNECTION_FAILED = "failed to connect to all addresses"
_PROBE_TIMEOUT = 0.2


def all_refuse(routers: Sequence[str], deadline: float) -> bool:
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


def status_of(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return code or grpc.StatusCode.UNKNOWN, details or ""


def to_bytes(what: str, data: object) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        try:
            return data.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidArgument(f"{what} is a str that cannot be encoded as UTF-8: {exc.reason}") from None
    raise InvalidArgument(f"{what} must be bytes or str, not {type(data).__name__}")


def check_timeout(timeout: object) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not math.isfinite(timeout) or timeout <= 0:
        raise InvalidArgument(f"timeout must be a positive number of seconds (got {timeout!r})")
    return float(timeout)


def check_address(router: object) -> None:
    if not isinstance(router, str):
        raise InvalidArgument(f"a router address must be a 'host:port' string, not {type(router).__name__}")
    host, sep, port = router.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidArgument(f"router address {router!r} is not 'host:port'")


def jitter(rng: random.Random, backoff: float) -> float:
    return backoff * (0.5 + 0.5 * rng.random())


def speaks_tls(router: str, timeout: float) -> bool | None:
    """Whether the server at `router` answers a TLS handshake (True), speaks
    something else (False: a plaintext gRPC server), or cannot tell (None:
    nothing answered in time). The client asks when a router's connection
    fails without a reason, so that a TLS mismatch is named as such."""
    import ssl

    host, _, port = router.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE        # only the protocol matters here, not who it is
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw:
            with context.wrap_socket(raw, do_handshake_on_connect=False) as tls:
                tls.settimeout(timeout)
                tls.do_handshake()
        return True
    except ssl.SSLError as exc:
        # A TLS alert (no client certificate, an unknown CA) is a TLS server talking;
        # a malformed record is a server that does not speak TLS.
        return "ALERT" in (exc.reason or "").upper() or "HANDSHAKE_FAILURE" in (exc.reason or "").upper()
    except (ConnectionResetError, BrokenPipeError):
        return False
    except OSError:
        return None


def scan_request(start: bytes, end: bytes, prefix: bytes | None, limit: object, keys_only: bool,
                 allow_stale: bool) -> kv_pb2.ScanRequest:
    """The request of a scan; InvalidArgument for a bad combination."""
    if type(limit) is not int or not 0 <= limit < 1 << 32:
        raise InvalidArgument(f"limit: expected a count >= 0, got {limit!r}")
    if prefix is not None:
        if start or end:
            raise InvalidArgument("scan: give a prefix or start/end, not both")
        start, end = prefix, prefix_end(prefix)
    if end and end <= (start or b"\0"):
        raise InvalidArgument("scan: end must come after start")
    return kv_pb2.ScanRequest(start=start, end=end, limit=limit, keys_only=bool(keys_only),
                              allow_stale=bool(allow_stale))


def prefix_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with `prefix` (etcd's rule):
    the prefix with its last byte that is not 0xff increased, b"" (to the last
    key) if every byte is 0xff."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b""
    return stripped[:-1] + bytes([stripped[-1] + 1])
