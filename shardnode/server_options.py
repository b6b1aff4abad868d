"""The gRPC server options that carry `[limits]` (docs/security.md, "Limits"):
the same for a router and a worker, except what a worker must also accept
from its peers."""

from __future__ import annotations

from typing import Any

from .config import LimitsConfig

#: Room for gRPC's and protobuf's framing around the largest payload.
_FRAMING = 64 << 10


def server_options(limits: LimitsConfig, *, worker: bool) -> list[tuple[str, Any]]:
    """Message sizes and streams per connection for a router (`worker` False)
    or a worker. A router takes and sends client messages of at most
    limits.max_request_bytes. A worker also takes peer frames and snapshot
    chunks of up to limits.max_frame_bytes, on the same server; what it sends
    a router (the answers of one Execute call) is bounded by the router's
    batches, not here."""
    receive = max(limits.max_request_bytes, limits.max_frame_bytes + _FRAMING) if worker else limits.max_request_bytes
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", receive),
        # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: a connection's further calls wait for a free stream.
        ("grpc.max_concurrent_streams", limits.max_streams_per_connection),
        # Connections, whoever opens them: a peer opening many (or never finishing
        # their handshake) holds sockets and memory until these close them.
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.server_handshake_timeout_ms", limits.handshake_timeout_ms),
    ]
    if worker:
        # The peers' channels send keepalive pings every 2 s on their long-lived
        # streams (transport/peer.py); gRPC's default policy would answer them
        # with GOAWAY ("too_many_pings") and break every link.
        options += [("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
                    ("grpc.http2.max_ping_strikes", 0),
                    ("grpc.keepalive_permit_without_calls", 1)]
    else:
        options.append(("grpc.max_send_message_length", limits.max_request_bytes))
    return options
