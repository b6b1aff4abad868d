"""Who may talk to whom: TLS credentials for every gRPC link, the check of
the peer's certificate identity, and the admin credential.

Every server and channel of shardnode is made here, so that one switch
(`[security] tls` in cluster.toml) secures them all:

- `add_port(server, address, ...)` binds a router's or worker's server:
  plain, or TLS that requires a client certificate signed by the cluster's CA.
  Server credentials are dynamic: at every new TLS handshake the files are
  checked and re-read when they changed (rotation without restart).
- `aio_channel` / `sync_channel` open a channel to a router or worker. A new
  channel reads the files again, so new connections pick up new certificates.
- `Gatekeeper` (a gRPC server interceptor) refuses, before any handler runs:
  a TLS peer whose certificate CN is not an allowed identity (the cluster's
  hosts; on routers also `allowed_clients`), with PERMISSION_DENIED; an admin
  RPC (`ADMIN_METHODS`) without the admin token, with UNAUTHENTICATED. Data
  RPCs need no admin token. Refusals are counted in `SecurityStats`.

Peers without a certificate, or with one from another CA, never get past the
TLS handshake (gRPC refuses them before any Python code runs); what can be
counted of those is the handshake itself: `tls_handshakes` (every handshake
the server started) less `tls_connections` (connections that completed it
with an allowed identity and made a call) is the number refused at TLS, or
opened and never used.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import inspect
import logging
import os
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from .config import METADATA_GROUP, ClusterConfig, SecurityConfig
from .errors import ShardnodeError

if TYPE_CHECKING:
    from prometheus_client.core import Metric

__all__ = [
    "ADMIN_METHODS",
    "ADMIN_USER",
    "AdminCredential",
    "Gatekeeper",
    "SecurityError",
    "SecurityStats",
    "add_port",
    "admin_metadata",
    "aio_channel",
    "channel_credentials",
    "ensure_admin_credential",
    "host_token",
    "load_admin_credential",
    "server_credentials",
    "sync_channel",
    "write_private",
]

log = logging.getLogger("shardnode.security")

#: The RPCs that change the cluster rather than read or write keys: they need
#: the admin token (`authorization: Bearer TOKEN` metadata).
ADMIN_METHODS = frozenset({
    "/shardnode.worker.Worker/TransferLeader",
    "/shardnode.worker.Worker/ChangeMembership",
    "/shardnode.worker.Worker/Retire",
    "/shardnode.worker.Worker/Shard",
    "/shardnode.worker.Worker/ExportScan",
    "/shardnode.worker.Worker/ExportDelta",
})
ADMIN_USER = "admin"
_AUTHORIZATION = "authorization"
_MAX_REMEMBERED_CONNECTIONS = 4096
_LOG_INTERVAL = 5.0


class SecurityError(ShardnodeError):
    """Certificates or the admin credential are missing or unusable (one line, naming the file)."""


# --- The admin credential --------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class AdminCredential:
    """The cluster's admin secret: `password` is the bearer token of the
    admin RPCs, and each host's process-control token is derived from it
    (`host_token`)."""

    username: str
    password: str

    def __repr__(self) -> str:          # never print the secret by accident
        return f"AdminCredential(username={self.username!r}, password=<hidden>)"


def load_admin_credential(security: SecurityConfig) -> AdminCredential:
    """Read `security.admin_file` ("user:password" on one line)."""
    path = security.admin_file
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise SecurityError(f"{path}: no admin credential (run `shardnode certs init`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SecurityError(f"{path}: cannot read the admin credential: {getattr(exc, 'strerror', exc)}") from None
    username, sep, password = text.partition(":")
    if not sep or not username or len(password) < 16 or not _is_token(username) or not _is_token(password):
        raise SecurityError(f"{path}: not an admin credential (one line 'user:password', password of 16+ "
                            "letters, digits, '-' or '_')")
    return AdminCredential(username, password)


def ensure_admin_credential(security: SecurityConfig) -> AdminCredential:
    """The cluster's admin credential, created (0600) if there is none yet."""
    path = security.admin_file
    if not path.exists():
        # Created whole or not at all, and never replaced: of two processes
        # creating it at once, the first link wins and both read that one.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        write_private(tmp, f"{ADMIN_USER}:{secrets.token_urlsafe(32)}\n".encode())
        try:
            os.link(tmp, path)
            log.info("security.admin_credential_created", extra={"path": str(path)})
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return load_admin_credential(security)


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600, atomically (a reader never sees
    half a file: certificates are re-read while servers run)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)          # O_CREAT's mode does not apply to an existing file
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def admin_credential_if_any(security: SecurityConfig) -> AdminCredential | None:
    """The admin credential for a server to check, or None (every admin RPC is
    then refused) if the file does not exist yet; an unreadable one raises."""
    if not security.admin_file.exists():
        log.warning("security.no_admin_credential", extra={"path": str(security.admin_file),
                                                           "effect": "admin RPCs are refused"})
        return None
    return load_admin_credential(security)


def admin_metadata(credential: AdminCredential) -> tuple[tuple[str, str], ...]:
    """The call metadata of an admin RPC."""
    return ((_AUTHORIZATION, f"Bearer {credential.password}"),)


def host_token(credential: AdminCredential, host_name: str) -> str:
    """The bearer token of host `host_name`'s process control (its
    HostControl service, shardnode.host_agent): HMAC-SHA256 of the host's
    name under the admin password. A host's supervisord configuration holds
    its own token only, and a token seen on the wire opens that host alone:
    neither another host's token nor the admin password can be computed
    from it. Whoever holds the admin credential derives every host's."""
    digest = hmac.new(credential.password.encode(), b"shardnode host control\0" + host_name.encode(),
                      hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _is_token(text: str) -> bool:
    return all(c.isascii() and (c.isalnum() or c in "-_") for c in text)


# --- Certificates -------------------------------------------------------------------------


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SecurityError(f"{path}: no {what} (security.tls is on; run `shardnode certs init`)") from None
    except OSError as exc:
        raise SecurityError(f"{path}: cannot read the {what}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise SecurityError(f"{path}: the {what} is not PEM")
    return data


def _signature(paths: Sequence[Path]) -> tuple[tuple[int, int, int], ...]:
    out = []
    for path in paths:
        try:
            st = path.stat()
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append((0, 0, 0))
    return tuple(out)


def identity_files(security: SecurityConfig, identity: str | None) -> tuple[Path, Path]:
    """(certificate, key) of a host name, or of the clients when `identity` is None."""
    if identity is None:
        return security.client_cert_file, security.client_key_file
    return security.host_cert_file(identity), security.host_key_file(identity)


def server_credentials(security: SecurityConfig, host_name: str, stats: "SecurityStats | None" = None
                       ) -> grpc.ServerCredentials:
    """TLS that requires a client certificate signed by the cluster's CA; the
    host's certificate, its key and the CA are re-read at the next handshake
    whenever one of the files changed (a bad new set is logged and the old
    one kept)."""
    cert_file, key_file = identity_files(security, host_name)
    paths = (cert_file, key_file, security.ca_file)

    def load() -> grpc.ServerCertificateConfiguration:
        cert, key, ca = _read(cert_file, "certificate"), _read(key_file, "private key"), _read(security.ca_file,
                                                                                          "CA certificate")
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    # The signature is taken before the files are read: a change while they
    # are read is seen (and loaded) at the next handshake.
    state = {"signature": _signature(paths)}
    initial = load()
    lock = threading.Lock()

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC at the start of every TLS handshake, in its own thread.
        if stats is not None:
            stats.count_handshake()
        signature = _signature(paths)
        with lock:
            if signature == state["signature"]:
                return None
            state["signature"] = signature
        try:
            config = load()
        except SecurityError as exc:
            log.error("security.reload_failed", extra={"error": str(exc)})
            return None
        log.info("security.certificates_reloaded", extra={"host": host_name})
        return config

    return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=True)


def channel_credentials(security: SecurityConfig, identity: str | None) -> grpc.ChannelCredentials:
    """TLS credentials of a channel: the cluster's CA, and the certificate of
    host `identity` (None: the clients' certificate). Read now, so a new
    channel uses the files as they are."""
    cert_file, key_file = identity_files(security, identity)
    return grpc.ssl_channel_credentials(
        root_certificates=_read(security.ca_file, "CA certificate"),
        private_key=_read(key_file, "private key"),
        certificate_chain=_read(cert_file, "certificate"),
    )


def aio_channel(target: str, security: SecurityConfig, identity: str | None,
                options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """An asyncio channel to a router or worker, TLS when the cluster says so."""
    if security.tls:
        return grpc.aio.secure_channel(target, channel_credentials(security, identity), options=list(options))
    return grpc.aio.insecure_channel(target, options=list(options))


def sync_channel(target: str, security: SecurityConfig | None, identity: str | None,
                 options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A blocking channel to a router or worker, TLS when the cluster says so."""
    if security is not None and security.tls:
        return grpc.secure_channel(target, channel_credentials(security, identity), options=list(options))
    return grpc.insecure_channel(target, options=list(options))


def add_port(server: grpc.aio.Server, address: str, security: SecurityConfig, host_name: str,
             stats: "SecurityStats | None" = None) -> int:
    """Bind `server` to `address`, with TLS when the cluster says so."""
    if security.tls:
        return server.add_secure_port(address, server_credentials(security, host_name, stats))
    return server.add_insecure_port(address)


def admin_destinations(cluster: ClusterConfig) -> frozenset[str]:
    """The addresses an admin credential may be sent to: the routers and
    worker ports (every data group's and the metadata group's) of the hosts
    in cluster.toml. A leader hint or a member address comes from an answer
    that, with TLS off, anyone could have forged."""
    return frozenset(
        address
        for host in cluster.hosts
        for address in (host.router_address, host.worker_address(METADATA_GROUP),
                        *(host.worker_address(group) for group in range(cluster.max_groups)))
    )


def check_admin_destination(destinations: frozenset[str], address: str) -> None:
    """Raise SecurityError unless `address` is one of `destinations`."""
    if address not in destinations:
        raise SecurityError(f"refused to send the admin credential to {address}: not an address of a host in "
                            "cluster.toml (an answer pointed there)")


# --- Checking callers --------------------------------------------------------------------


@dataclass(slots=True)
class SecurityStats:
    """What the gatekeeper refused, by reason: `identity_not_allowed` (a
    certificate of the cluster's CA whose CN is not allowed here),
    `no_identity` (a TLS connection without a verified certificate),
    `admin_token_missing`, `admin_token_wrong`."""

    refused: Counter[str] = field(default_factory=Counter)
    tls_handshakes: int = 0
    tls_connections: int = 0
    _connections: OrderedDict[str, None] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count_handshake(self) -> None:
        with self._lock:
            self.tls_handshakes += 1

    def count_connection(self, peer: str) -> None:
        """A call on an authenticated connection (`peer` is its ip:port)."""
        connections = self._connections
        if peer in connections:
            connections.move_to_end(peer)
            return
        with self._lock:
            self.tls_connections += 1
        connections[peer] = None
        if len(connections) > _MAX_REMEMBERED_CONNECTIONS:
            connections.popitem(last=False)


class SecurityCollector:
    """Prometheus families of one process's SecurityStats."""

    def __init__(self, stats: SecurityStats, labels: dict[str, str]) -> None:
        self.stats = stats
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily     # servers only: the CLI starts faster without it

        names = [*self.labels, "reason"]
        refused = CounterMetricFamily("shardnode_auth_refused", "Calls refused before any handler ran, by reason.",
                                      labels=names)
        for reason, count in sorted(self.stats.refused.items()):
            refused.add_metric([*self.labels.values(), reason], count)
        yield refused
        handshakes = CounterMetricFamily("shardnode_tls_handshakes", "TLS handshakes started by this server.",
                                         labels=list(self.labels))
        handshakes.add_metric(list(self.labels.values()), self.stats.tls_handshakes)
        yield handshakes
        connections = CounterMetricFamily(
            "shardnode_tls_connections", "TLS connections that carried a call with an allowed certificate.",
            labels=list(self.labels))
        connections.add_metric(list(self.labels.values()), self.stats.tls_connections)
        yield connections


def allowed_identities(cluster: ClusterConfig, *, clients: bool) -> frozenset[str]:
    """The certificate names a server accepts: every host of the cluster, and
    on routers (`clients`) the configured client names too."""
    names = {host.name for host in cluster.hosts}
    if clients:
        names.update(cluster.security.allowed_clients)
    return frozenset(names)


def peer_common_name(context: grpc.aio.ServicerContext) -> str | None:
    """The CN of the caller's verified certificate, None on a plain connection."""
    names = context.auth_context().get("x509_common_name")
    if not names:
        return None
    try:
        return names[0].decode()
    except UnicodeDecodeError:
        return None


class Gatekeeper(grpc.aio.ServerInterceptor):
    """Refuses callers before any handler runs: with TLS, anyone whose
    certificate CN is not in `allowed`; always, an admin RPC without the
    admin token. With TLS off, data RPCs pass untouched (no per-call cost).
    `allowed` may change as it is used (a router's users, routing/access.py)."""

    def __init__(self, *, tls: bool, allowed: Container[str], admin: AdminCredential | None,
                 stats: SecurityStats, admin_methods: frozenset[str] = ADMIN_METHODS) -> None:
        self._tls = tls
        self._allowed = allowed
        self._token = None if admin is None else f"Bearer {admin.password}".encode()
        self._admin_methods = admin_methods
        self.stats = stats
        self._last_logged: dict[str, float] = {}

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        admin = method in self._admin_methods
        if handler is None or not (self._tls or admin):
            return handler
        metadata = handler_call_details.invocation_metadata if admin else None
        return _guarded(handler, lambda context: self._check(context, method, admin, metadata))

    async def _check(self, context: grpc.aio.ServicerContext, method: str, admin: bool, metadata) -> None:
        if self._tls:
            name = peer_common_name(context)
            if name is None:
                await self._refuse(context, method, "no_identity", grpc.StatusCode.UNAUTHENTICATED,
                                   "a client certificate of this cluster is required")
            if name not in self._allowed:
                await self._refuse(context, method, "identity_not_allowed", grpc.StatusCode.PERMISSION_DENIED,
                                   f"certificate {name!r} is not allowed here")
            self.stats.count_connection(context.peer())
        if admin:
            presented = None
            for key, value in metadata or ():
                if key == _AUTHORIZATION:
                    presented = value.encode() if isinstance(value, str) else value
            if presented is None:
                await self._refuse(context, method, "admin_token_missing", grpc.StatusCode.UNAUTHENTICATED,
                                   "this admin RPC needs the admin credential (authorization: Bearer TOKEN)")
            if self._token is None or not hmac.compare_digest(presented, self._token):
                await self._refuse(context, method, "admin_token_wrong", grpc.StatusCode.UNAUTHENTICATED,
                                   "wrong admin credential")

    async def _refuse(self, context, method: str, reason: str, code: grpc.StatusCode, details: str) -> None:
        self.stats.refused[reason] += 1
        # At most one line per reason every few seconds: a stranger must not flood the log.
        now = time.monotonic()
        if now - self._last_logged.get(reason, -_LOG_INTERVAL) >= _LOG_INTERVAL:
            self._last_logged[reason] = now
            log.warning("security.refused", extra={"peer": context.peer(), "method": method, "reason": reason,
                                                   "refused_so_far": self.stats.refused[reason]})
        await context.abort(code, details)


def _guarded(handler: grpc.RpcMethodHandler, check) -> grpc.RpcMethodHandler:
    """`handler` with `await check(context)` before its behaviour."""
    if handler.request_streaming and handler.response_streaming:
        behavior, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        behavior, make = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        behavior, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        behavior, make = handler.unary_unary, grpc.unary_unary_rpc_method_handler

    if inspect.isasyncgenfunction(behavior):
        async def guarded(request, context):
            await check(context)
            async for item in behavior(request, context):
                yield item
    else:
        async def guarded(request, context):
            await check(context)
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result

    return make(guarded, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
