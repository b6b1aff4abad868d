"""One router process: the KV service on the host's router port, forwarding
to the workers of every group, a clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc

from ..config import ClusterConfig
from ..limits import RefusalCollector
from ..server_options import server_options
from ..failstop import FailStop, run_until_stop_or_fault
from ..proto import kv_pb2_grpc
from ..security import (Gatekeeper, SecurityCollector, SecurityError, SecurityStats, add_port,
                        admin_credential_if_any)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as _health_aio

from ..etcd.server import add_etcd_services
from .access import RouterAccess
from .forwarder import ChannelPool
from .metrics import RouterMetrics
from .service import KVService

log = logging.getLogger("shardnode.router")
HealthServicer = _health_aio.HealthServicer


async def serve(cluster: ClusterConfig, host_name: str) -> int:
    host = cluster.host(host_name)
    security = cluster.security
    stats = SecurityStats()
    try:
        admin = admin_credential_if_any(security)
    except SecurityError as exc:
        log.error("router.security_failed", extra={"error": str(exc)})
        return 1
    # Certificates the router lets in: its hosts, allowed_clients and the users of the access rules.
    access = RouterAccess(cluster)
    gatekeeper = Gatekeeper(tls=security.tls, allowed=access, admin=admin, stats=stats)
    channels = ChannelPool(security, host_name)
    server = grpc.aio.server(
        interceptors=[gatekeeper],
        options=[*server_options(cluster.limits, worker=False), ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=cluster.limits.max_concurrent_rpcs,
    )
    metrics = RouterMetrics(cluster, host_name)
    labels = {"group": "", "node": str(host.node_id), "component": "router"}
    metrics.own.register(SecurityCollector(stats, labels))
    metrics.own.register(RefusalCollector(labels))
    service = KVService(cluster, host_name, channels, metrics, access)
    kv_pb2_grpc.add_KVServicer_to_server(service, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = host.router_address
    # etcd's v3 API (docs/etcd.md): on the router's port (shardnode's client uses its leases and
    # watches there) and, with etcd_port, on a port of its own for etcd's clients.
    leases = add_etcd_services(server, cluster, host_name, service)
    try:
        add_port(server, address, security, host_name, stats)
        if host.etcd_address is not None:
            address = host.etcd_address
            add_port(server, address, security, host_name, stats)
            address = host.router_address
    except SecurityError as exc:
        log.error("router.security_failed", extra={"address": address, "error": str(exc)})
        return 1
    except RuntimeError as exc:
        log.error("router.bind_failed", extra={"address": address, "error": str(exc)})
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        metrics.serve()
    except OSError as exc:
        log.error("router.metrics_bind_failed",
                  extra={"address": f"{host.address}:{host.metrics_port}", "error": str(exc)})
        return 1
    await server.start()
    service.start()
    leases.start()
    # Essential: the gRPC server and the metrics endpoint. If either ends
    # without being asked to, the router says why and exits (fail-stop).
    fail_stop = FailStop(log)
    fail_stop.watch(asyncio.create_task(server.wait_for_termination(), name="grpc-server"), "the gRPC server")
    fail_stop.watch(asyncio.create_task(asyncio.to_thread(metrics.thread.join), name="metrics-server"),
                    "the metrics endpoint")
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set("shardnode.kv.KV", health_pb2.HealthCheckResponse.SERVING)
    log.info("router.serving", extra={"address": address, "groups": cluster.groups,
                                      "etcd_address": host.etcd_address or ""})
    await run_until_stop_or_fault(stop, fail_stop, health, ("", "shardnode.kv.KV"))
    try:
        log.info("router.stopping")
        await health.enter_graceful_shutdown()
        service.drain()         # clients' streams: answer what came, then end
        await server.stop(grace=2.0)
    finally:
        await leases.close()
        await service.close()
        metrics.close()
        await channels.close()
    log.info("router.stopped")
    return 0
