"""One worker process: a replica driver, its gRPC server (router-facing
service + Raft peer transport), and a clean shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as _health_aio

from ..config import ClusterConfig
from ..failstop import EXIT_FAIL_STOP, FailStop, describe, run_until_stop_or_fault
from ..proto import worker_pb2_grpc
from ..security import (Gatekeeper, SecurityCollector, SecurityError, SecurityStats, add_port,
                        admin_credential_if_any, allowed_identities)
from ..storage import ReplicaStore, StorageError
from ..transport import SERVER_OPTIONS
from .driver import ReplicaDriver
from .service import WorkerService

log = logging.getLogger("shardnode.worker")
HealthServicer = _health_aio.HealthServicer

SHUTDOWN_TRANSFER_SECONDS = 3.0


async def serve(cluster: ClusterConfig, host_name: str, group: int) -> int:
    replica = cluster.replica(group, host_name)
    data_dir = cluster.worker_data_dir(host_name, group)
    extra = {"group": group, "node": replica.node_id}
    fail_stop = FailStop(log, extra)
    voters = tuple(r.node_id for r in cluster.group_replicas(group))
    try:
        # Creates data_dir/HOST/group-G durably (parent directories fsynced).
        store = ReplicaStore.open(data_dir, initial_voters=voters, storage=cluster.storage)
    except (StorageError, OSError) as exc:
        # The disk is full or failing, or the data is not ours: say why, in
        # one line, and let supervisord retry with its backoff.
        fail_stop.trip(f"cannot open the replica's storage at {data_dir}: {describe(exc)}")
        return EXIT_FAIL_STOP
    # The transport's options raise gRPC's message limits to fit its frames
    # (and snapshot chunks); a port held by another process must fail to bind.
    security = cluster.security
    stats = SecurityStats()
    try:
        admin = admin_credential_if_any(security)
    except SecurityError as exc:
        log.error("worker.security_failed", extra={**extra, "error": str(exc)})
        store.close()
        return 1
    # Workers serve the hosts of the cluster only (routers and peers), never clients.
    gatekeeper = Gatekeeper(tls=security.tls, allowed=allowed_identities(cluster, clients=False), admin=admin,
                            stats=stats)
    server = grpc.aio.server(interceptors=[gatekeeper], options=[*SERVER_OPTIONS, ("grpc.so_reuseport", 0)])
    driver = ReplicaDriver(cluster, replica, store, fail_stop=fail_stop)
    driver.metrics.registry.register(
        SecurityCollector(stats, {"group": str(group), "node": str(replica.node_id), "component": "worker"}))
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerService(driver), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    driver.transport.register(server)
    address = replica.address
    try:
        add_port(server, address, security, host_name, stats)
    except SecurityError as exc:
        log.error("worker.security_failed", extra={**extra, "address": address, "error": str(exc)})
        store.close()
        return 1
    except RuntimeError as exc:
        log.error("worker.bind_failed", extra={**extra, "address": address, "error": str(exc)})
        store.close()
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    # The gRPC server is essential too: a worker nobody can reach must not linger.
    fail_stop.watch(asyncio.create_task(server.wait_for_termination(), name="grpc-server"), "the gRPC server")
    await driver.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set("shardnode.worker.Worker", health_pb2.HealthCheckResponse.SERVING)
    log.info("worker.serving", extra={**extra, "address": address, "data_dir": str(data_dir)})
    await run_until_stop_or_fault(stop, fail_stop, health, ("", "shardnode.worker.Worker"))
    try:
        log.info("worker.stopping", extra=extra)
        await health.enter_graceful_shutdown()
        # Clean shutdown: hand leadership over so the group does not wait out
        # an election timeout, finish in-flight requests, flush, exit 0.
        await driver.transfer_leadership(SHUTDOWN_TRANSFER_SECONDS)
        await server.stop(grace=1.0)
    finally:
        await driver.stop()
        store.close()
    log.info("worker.stopped", extra=extra)
    return 0
