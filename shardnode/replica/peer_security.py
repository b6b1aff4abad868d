"""How a replica's peer transport is secured: the channel it opens to peers,
whose certificate each peer's frames must come with, and the check of every
incoming snapshot chunk against its stream's header (docs/security.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import grpc

from ..channel_cache import CredentialWatch
from ..config import ClusterConfig, SecurityConfig
from ..security import aio_channel
from ..storage.snapshot import chunk_mismatch
from ..transport import SnapshotHeader


def transport_security(cluster: ClusterConfig, host_name: str, member_hosts: Mapping[int, str]) -> dict[str, Any]:
    """Keyword arguments of `RaftTransport` for a replica on `host_name`.
    `member_hosts` (node id → host name, kept current by the driver as the
    membership changes) names the certificate each peer's frames must carry."""
    security = cluster.security
    return {
        "connect": partial(_connect, security, host_name),
        "credentials_generation": CredentialWatch(security, host_name).generation,
        # A host's certificate's CN is the host's name.
        "peer_names": member_hosts if security.tls else None,
        "check_chunk": _check_chunk,
    }


def _connect(security: SecurityConfig, host_name: str, address: str,
             options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
    return aio_channel(address, security, host_name, options)


def _check_chunk(header: SnapshotHeader, chunk: bytes) -> str | None:
    snapshot = header.message.snapshot
    if snapshot is None:
        return "the stream's header carries no snapshot"
    return chunk_mismatch(snapshot.metadata, chunk)
