"""The Python client of a shardnode cluster.

    from shardnode.client import Client
    with Client.from_config("etc/cluster.toml") as kv:
        kv.put(b"k", b"v")

    from shardnode.client import AsyncClient
    async with AsyncClient.from_config("etc/cluster.toml") as kv:
        await kv.put(b"k", b"v")

The error classes are re-exported so that callers need one import.
"""

from ..errors import (DeadlineExceeded, InvalidArgument, NoLeader, NoQuorum, NotLeader, PermissionDenied,
                      RoutersUnreachable, ShardnodeError, TLSMismatch, Unavailable)
from .aio import AsyncClient
from .client import DEFAULT_TIMEOUT, Client, StaleSession
from .leases_watch import LeaseNotFound, WatchCompacted, WatchEvent

__all__ = [
    "AsyncClient",
    "Client",
    "DEFAULT_TIMEOUT",
    "DeadlineExceeded",
    "InvalidArgument",
    "LeaseNotFound",
    "NoLeader",
    "NoQuorum",
    "NotLeader",
    "PermissionDenied",
    "RoutersUnreachable",
    "ShardnodeError",
    "StaleSession",
    "TLSMismatch",
    "Unavailable",
    "WatchCompacted",
    "WatchEvent",
]
