"""A host's HostControl service (proto/host_control.proto), run inside that
host's own supervisord.

supervisord's XML-RPC is plain HTTP with a password: on the network, one
sniffed call would give process control of the host. So a host's
supervisord answers XML-RPC only on a Unix socket (``[unix_http_server]``,
0600, in the host's data directory), and other machines reach it through
this gRPC service on ``host.address:supervisor_port``: with TLS on, under
mutual TLS (the host's certificate; callers must present one of the
cluster's hosts or ``allowed_clients``), and always with the host's own
bearer token (security.host_token), checked by the same Gatekeeper as the
admin RPCs.

The service is a supervisord RPC interface plugin, so it lives exactly as
long as the host's supervisord: ``shardnode die`` of a host (its router and
workers, not supervisord) and a later ``start`` go through it. The host's
configuration (shardnode.supervisor.host_config) declares it::

    [rpcinterface:shardnode]
    supervisor.rpcinterface_factory = shardnode.host_agent:make_rpcinterface
    config = /path/to/cluster.toml
    host = host1
    token = <host1's token>

supervisord calls the factory while it opens its servers; the factory binds
the gRPC port there and then (a port taken stops supervisord at once, with
the reason, as a taken ``inet_http_server`` port did) and serves it from a
thread with its own asyncio loop. supervisord itself is single-threaded and
its RPC interface is not thread-safe, so the service does not call it
in-process: it makes the same XML-RPC calls over the Unix socket, which
supervisord's own loop answers. Under the ``shardnode`` namespace, XML-RPC
gets one method, ``getHostControlAddress``.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import socket
import threading
import xmlrpc.client
from pathlib import Path
from typing import Any

import grpc

from .audit import AuditInterceptor, AuditLog, AuditRule, summarize_fields
from .config import ClusterConfig
from .host_supervisord import FORK_SUPPORT
from .proto import host_control_pb2 as pb
from .proto import host_control_pb2_grpc as pb_grpc
from .server_options import server_options
from .security import ADMIN_USER, AdminCredential, Gatekeeper, SecurityStats, add_port, allowed_identities

__all__ = ["HOST_CONTROL_METHODS", "HostControlInterface", "make_rpcinterface"]

log = logging.getLogger("shardnode.host_agent")

#: Every method of the service needs the host's token.
HOST_CONTROL_METHODS = frozenset({
    "/shardnode.host_control.HostControl/Processes",
    "/shardnode.host_control.HostControl/Control",
})
#: What the audit log records (shardnode/audit.py): Control starts, stops and
#: signals programs; Processes only reads, and routers poll it.
AUDITED_METHODS = {"/shardnode.host_control.HostControl/Control": AuditRule(summarize_fields)}
_BIND_TIMEOUT = 30.0
_STOP_GRACE = 1.0

# One service per supervisord process: a reload (SIGHUP) makes the RPC
# interfaces again, and finds it running.
_service: "_HostControlService | None" = None


class HostControlInterface:
    """What the plugin adds to supervisord's own XML-RPC (namespace ``shardnode``)."""

    def __init__(self, address: str) -> None:
        self._address = address

    def getHostControlAddress(self) -> str:   # noqa: N802 (supervisord's naming)
        """Where this host's HostControl service listens (address:port)."""
        return self._address


def make_rpcinterface(supervisord: Any, *, config: str, host: str, token: str) -> HostControlInterface:
    """supervisord's rpcinterface factory: start this host's HostControl
    service (once per process) and return the small XML-RPC interface.
    A ValueError makes supervisord exit with its message."""
    global _service
    options = supervisord.options
    if os.environ.get(FORK_SUPPORT) != "false":
        raise ValueError("shardnode's host control runs in `python -m shardnode.host_supervisord` only (gRPC's "
                         f"fork support must be off in supervisord: {FORK_SUPPORT}=false)")
    if not options.nodaemon:
        # daemonize() forks after the servers are open: the service's thread would stay behind.
        raise ValueError("shardnode's host control needs supervisord in the foreground (nodaemon=true or -n)")
    sockets = [c for c in options.server_configs if c["family"] == socket.AF_UNIX]
    if not sockets:
        raise ValueError("shardnode's host control needs supervisord's [unix_http_server]")
    if _service is None:
        cluster = ClusterConfig.load(Path(config))
        unix = sockets[0]
        service = _HostControlService(cluster, host, token,
                                      _Supervisord(unix["file"], unix["username"], unix["password"]))
        service.start()
        atexit.register(service.stop)
        _service = service
    return HostControlInterface(_service.address)


class _Supervisord:
    """XML-RPC calls to this process's supervisord over its Unix socket: one
    connection per call, so that any thread may make one."""

    def __init__(self, socket_file: str, username: str | None, password: str | None) -> None:
        self._socket_file = socket_file
        self._username = username
        self._password = password

    def call(self, method: str, *args: object) -> Any:
        from supervisor.xmlrpc import SupervisorTransport   # supervisord's own Unix-socket client

        transport = SupervisorTransport(self._username, self._password, f"unix://{self._socket_file}")
        proxy = xmlrpc.client.ServerProxy("http://localhost", transport=transport, allow_none=True)
        try:
            return getattr(proxy.supervisor, method)(*args)
        finally:
            transport.close()


class _Servicer(pb_grpc.HostControlServicer):
    def __init__(self, supervisord: _Supervisord) -> None:
        self._supervisord = supervisord

    async def Processes(self, request: pb.ProcessesRequest, context: grpc.aio.ServicerContext) -> pb.ProcessesResponse:
        try:
            if request.names:
                infos = [await self._call(context, "getProcessInfo", name) for name in request.names]
            else:
                infos = await self._call(context, "getAllProcessInfo")
        except xmlrpc.client.Fault as fault:
            return pb.ProcessesResponse(fault=pb.Fault(code=fault.faultCode, text=fault.faultString))
        return pb.ProcessesResponse(processes=[_process(info) for info in infos])

    async def Control(self, request: pb.ControlRequest, context: grpc.aio.ServicerContext) -> pb.ControlResponse:
        if request.action == pb.ControlRequest.START:
            method, args = "startProcess", (request.name, False)
        elif request.action == pb.ControlRequest.STOP:
            method, args = "stopProcess", (request.name, False)
        elif request.action == pb.ControlRequest.SIGNAL:
            method, args = "signalProcess", (request.name, request.signal)
        else:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown action {request.action}")
        try:
            await self._call(context, method, *args)
        except xmlrpc.client.Fault as fault:
            return pb.ControlResponse(fault=pb.Fault(code=fault.faultCode, text=fault.faultString))
        return pb.ControlResponse()

    async def _call(self, context: grpc.aio.ServicerContext, method: str, *args: object) -> Any:
        try:
            return await asyncio.to_thread(self._supervisord.call, method, *args)
        except (OSError, xmlrpc.client.ProtocolError) as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"supervisord's socket did not answer: {exc}")


def _process(info: dict[str, Any]) -> pb.Process:
    return pb.Process(name=info["name"], state=info["statename"], pid=int(info.get("pid", 0)),
                      exit_status=int(info.get("exitstatus", 0)), description=info.get("description", ""),
                      logfile=info.get("stdout_logfile", ""), started_at=float(info.get("start", 0) or 0))


class _HostControlService:
    """The gRPC server, on its own thread and asyncio loop."""

    def __init__(self, cluster: ClusterConfig, host_name: str, token: str, supervisord: _Supervisord) -> None:
        self.cluster = cluster
        self.host = cluster.host(host_name)
        self.address = f"{self.host.address}:{self.host.supervisor_port}"
        self._token = token
        self._supervisord = supervisord
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._bound = threading.Event()
        self._error: str | None = None
        self._thread = threading.Thread(target=self._run, name="host-control", daemon=True)

    def start(self) -> None:
        """Bind and serve; raise ValueError (with the reason) if it cannot."""
        self._thread.start()
        if not self._bound.wait(_BIND_TIMEOUT):
            raise ValueError(f"shardnode's host control did not bind {self.address} within {_BIND_TIMEOUT:g} s")
        if self._error is not None:
            raise ValueError(self._error)

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None or loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(server.stop(_STOP_GRACE), loop).result(_STOP_GRACE + 2)
        except Exception:        # exiting anyway: the thread is a daemon
            pass

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except Exception as exc:   # an unexpected end: say so in supervisord's own log
            self._error = self._error or f"shardnode's host control on {self.address} failed: {exc}"
            self._bound.set()
            log.exception("host_control.failed")

    async def _serve(self) -> None:
        security = self.cluster.security
        gatekeeper = Gatekeeper(tls=security.tls, allowed=allowed_identities(self.cluster, clients=True),
                                admin=AdminCredential(ADMIN_USER, self._token), stats=SecurityStats(),
                                admin_methods=HOST_CONTROL_METHODS)
        # The audit comes first, around the gatekeeper: it records the calls the gatekeeper refuses too.
        audit = AuditInterceptor(AuditLog.for_process(self.cluster, self.host.name, "host_control"),
                                 AUDITED_METHODS)
        server = grpc.aio.server(interceptors=[audit, gatekeeper], maximum_concurrent_rpcs=64,
                                 options=server_options(self.cluster.limits, worker=False))
        pb_grpc.add_HostControlServicer_to_server(_Servicer(self._supervisord), server)
        try:
            port = add_port(server, self.address, security, self.host.name)
        except Exception as exc:        # gRPC raises RuntimeError for a port taken; certificates: SecurityError
            port, reason = 0, str(exc)
        else:
            reason = "the address is taken or not this machine's"
        if not port:
            self._error = f"shardnode's host control cannot listen on {self.address}: {reason}"
            self._bound.set()
            return
        await server.start()
        self._loop, self._server = asyncio.get_running_loop(), server
        self._bound.set()
        await server.wait_for_termination()
