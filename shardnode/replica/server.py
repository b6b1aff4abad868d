"""One worker process: a replica driver, its gRPC server (router-facing
service + Raft peer transport), and a clean shutdown on SIGTERM/SIGINT.

It ends on purpose (exit 0, which supervisord leaves stopped) when it holds
no replica, when it retires (removed from its group), and when it refuses
to run because its data was lost (identity.py); on a failure (fail-stop, or
its identity cannot be resolved) it exits non-zero, is started again, and
backs off if that happens again soon (restart_backoff.py)."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as _health_aio

from ..audit import AuditInterceptor, AuditLog
from ..config import ClusterConfig, Replica, group_label
from ..failstop import EXIT_FAIL_STOP, FailStop, describe, run_until_stop_or_fault
from ..proto import worker_pb2_grpc
from ..placement.directory import MetadataUnavailable
from ..security import (Gatekeeper, SecurityCollector, SecurityError, SecurityStats, add_port,
                        admin_credential_if_any, allowed_identities)
from ..raft import NoticeReason
from ..storage import StorageError
from ..storage.retirement import retire
from ..limits import RefusalCollector
from ..server_options import server_options
from . import restart_backoff
from .audit_rules import worker_rules
from .driver import ReplicaDriver
from .identity import Start, lost_data_reason, observe_group, resolve
from .service import WorkerService

log = logging.getLogger("shardnode.worker")
HealthServicer = _health_aio.HealthServicer

SHUTDOWN_TRANSFER_SECONDS = 3.0
#: A worker of a group created online that could not read the shard map
#: exits with this (not 0: supervisord starts it again).
EXIT_NO_SHARD_MAP = 75


async def serve(cluster: ClusterConfig, host_name: str, group: int) -> int:
    began = time.monotonic()
    host = cluster.host(host_name)
    data_dir = cluster.worker_data_dir(host_name, group)
    extra: dict[str, object] = {"group": group_label(group)}
    fail_stop = FailStop(log, extra)
    # First of all: a stop asked while the worker is still finding its place
    # (up to OBSERVE_TIMEOUT) is a clean stop, not death by an unhandled signal.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if await _back_off(data_dir, stop, extra):
        log.info("worker.stopped", extra=extra)
        return 0
    try:
        # Creates data_dir/HOST/group-G durably (parent directories fsynced)
        # when this is the group's first start or a new member joining.
        identity = await resolve(cluster, host_name, group)
    except (StorageError, OSError) as exc:
        # The disk is full or failing, or the data is not ours: say why, in
        # one line, and exit to be started again (backing off: restart_backoff.py).
        fail_stop.trip(f"cannot open the replica's storage at {data_dir}: {describe(exc)}")
        restart_backoff.record_failure(data_dir)
        return EXIT_FAIL_STOP
    except MetadataUnavailable as exc:
        # A group of cluster.toml bootstraps with the placement recorded in
        # the metadata group, one created online with the shard map's:
        # without it this worker cannot know whether it holds a replica.
        log.error("worker.metadata_unavailable", extra={**extra, "error": str(exc)})
        restart_backoff.record_failure(data_dir)
        return EXIT_NO_SHARD_MAP
    if identity.start is Start.NO_REPLICA:
        log.info("worker.no_replica", extra={**extra, "reason": identity.reason})
        await _exit_deliberately(began)
        return 0
    if identity.start is Start.REFUSED:
        # Its data was lost: the one line an operator needs, then stay down.
        log.error("worker.data_lost", extra={**extra, "node": identity.node_id, "reason": identity.reason})
        await _exit_deliberately(began)
        return 0
    store = identity.store
    assert store is not None
    if stop.is_set():
        store.close()
        log.info("worker.stopped", extra=extra)
        return 0
    replica = Replica(group, identity.node_id, host)
    extra["node"] = replica.node_id
    log.info("worker.identity", extra={**extra, "start": identity.start.value})
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
    # The audit comes first, around the gatekeeper: it records the calls the gatekeeper refuses too.
    audit_log = AuditLog.for_process(cluster, host_name, "worker", group)
    audit = AuditInterceptor(audit_log, worker_rules(group))
    server = grpc.aio.server(interceptors=[audit, gatekeeper],
                             options=[*server_options(cluster.limits, worker=True), ("grpc.so_reuseport", 0)],
                             maximum_concurrent_rpcs=cluster.limits.max_concurrent_rpcs)
    driver = ReplicaDriver(cluster, replica, store, fail_stop=fail_stop)
    labels = {"group": group_label(group), "node": str(replica.node_id), "component": "worker"}
    driver.metrics.registry.register(SecurityCollector(stats, labels))
    driver.metrics.registry.register(RefusalCollector(labels))
    # A replica that applies its own removal stops like on SIGTERM, then retires.
    removal = asyncio.create_task(_set_when(driver.removed, stop), name="removal")
    # One a member does not recognise (a NOTICE) checks a removal with its
    # group first, and stops at once if it is another life of a bound id.
    refusal: list[str] = []
    disowned = asyncio.create_task(_on_disowned(driver, cluster, refusal, stop), name="disowned")
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
    await server.start()
    # The gRPC server is essential too: a worker nobody can reach must not linger.
    fail_stop.watch(asyncio.create_task(server.wait_for_termination(), name="grpc-server"), "the gRPC server")
    await driver.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set("shardnode.worker.Worker", health_pb2.HealthCheckResponse.SERVING)
    log.info("worker.serving", extra={**extra, "address": address, "data_dir": str(data_dir)})
    await run_until_stop_or_fault(stop, fail_stop, health, ("", "shardnode.worker.Worker"),
                                  before_exit=lambda: restart_backoff.record_failure(data_dir))
    try:
        log.info("worker.stopping", extra=extra)
        await health.enter_graceful_shutdown()
        # Clean shutdown: hand leadership over so the group does not wait out
        # an election timeout, finish in-flight requests, flush, exit 0.
        if not refusal:
            await driver.transfer_leadership(SHUTDOWN_TRANSFER_SECONDS)
        await server.stop(grace=1.0)
    finally:
        removal.cancel()
        disowned.cancel()
        await driver.stop()
        store.close()
        audit_log.close()
    if refusal:
        # This store is not the life the group bound to its id: whatever it
        # holds was never counted. It goes; a tombstone says how to recover.
        retire(data_dir, replica.node_id, refusal[0])
        log.error("worker.data_lost", extra={**extra, "reason": refusal[0]})
        await _exit_deliberately(began)
        return 0
    if driver.removed.is_set():
        # Removed from the group (committed): the data goes, a tombstone
        # stays so that this place never bootstraps the old id again.
        retire(data_dir, replica.node_id, "removed from the group")
        log.info("worker.retired", extra={**extra, "data_dir": str(data_dir)})
        await _exit_deliberately(began)
        return 0
    log.info("worker.stopped", extra=extra)
    return 0


async def _set_when(event: asyncio.Event, then: asyncio.Event) -> None:
    await event.wait()
    then.set()


#: How often a replica told it was removed asks its group whether the
#: removal is committed, until it is (or the replica learns it itself).
REMOVAL_CHECK_SECONDS = 2.0


async def _on_disowned(driver: ReplicaDriver, cluster: ClusterConfig, refusal: list[str],
                       stop: asyncio.Event) -> None:
    """A member told this replica it is not recognised (RawNode.notice).
    Removed: the group's own view must confirm the removal (as for the
    Retire RPC), then the replica retires. Another incarnation bound to its
    id: it stops at once and refuses (its reason goes into `refusal`)."""
    await driver.disowned.wait()
    notice = driver.node.notice
    assert notice is not None
    replica = driver.replica
    if notice.reason is NoticeReason.REINCARNATED:
        refusal.append(lost_data_reason(replica.group, replica.node_id, replica.address, notice.bound_incarnation,
                                        driver.store.identity.incarnation))
        stop.set()
        return
    while not driver.removed.is_set():
        view = await observe_group(cluster, replica.group, replica.host.name, exclude=replica.address)
        if view is not None and replica.node_id in view.conf.removed:
            log.info("worker.removal_confirmed", extra={"group": replica.group, "node": replica.node_id,
                                                        "peer": notice.from_node})
            driver.removed.set()
            return
        await asyncio.sleep(REMOVAL_CHECK_SECONDS)


async def _back_off(data_dir, stop: asyncio.Event, extra: dict[str, object]) -> bool:  # type: ignore[no-untyped-def]
    """Wait before starting after failures in a row (restart_backoff.py);
    True if a stop was asked meanwhile."""
    wait, failures = restart_backoff.wait_before_start(data_dir)
    if wait <= 0:
        return False
    log.warning("worker.backing_off", extra={**extra, "seconds": round(wait, 1), "failures": failures})
    try:
        await asyncio.wait_for(stop.wait(), wait)
    except asyncio.TimeoutError:
        return False
    return True


#: supervisord counts an exit within `startsecs` (1 s) as a failed start and
#: retries it; a worker that exits on purpose (no replica here, retired) stays
#: up at least this long so that its exit 0 reads as deliberate.
DELIBERATE_EXIT_AFTER = 1.5


async def _exit_deliberately(began: float) -> None:
    await asyncio.sleep(max(0.0, began + DELIBERATE_EXIT_AFTER - time.monotonic()))
