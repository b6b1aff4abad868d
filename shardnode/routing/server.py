"""One router process: the KV service on the host's router port, forwarding
to the workers of every group, a clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc

from ..config import ClusterConfig
from ..proto import kv_pb2_grpc
from .forwarder import ChannelPool
from .service import KVService

log = logging.getLogger("shardnode.router")


async def serve(cluster: ClusterConfig, host_name: str) -> int:
    host = cluster.host(host_name)
    channels = ChannelPool()
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.so_reuseport", 0),
        ]
    )
    kv_pb2_grpc.add_KVServicer_to_server(KVService(cluster, host_name, channels), server)
    address = host.router_address
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        log.error("router.bind_failed", extra={"address": address, "error": str(exc)})
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    log.info("router.serving", extra={"address": address, "groups": cluster.groups})
    try:
        await stop.wait()
        log.info("router.stopping")
        await server.stop(grace=2.0)
    finally:
        await channels.close()
    log.info("router.stopped")
    return 0
