"""The router: maps keys to groups and forwards batched requests to leaders."""

from .forwarder import ChannelPool, GroupForwarder
from .service import KVService

__all__ = ["ChannelPool", "GroupForwarder", "KVService"]
