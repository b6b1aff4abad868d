"""Dynamic sharding: the metadata group, routing by the live shard map, and moving key space between groups (docs/sharding.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["MapConflict", "MetadataUnavailable", "ShardDirectory", "initial_map"]

if TYPE_CHECKING:
    from .directory import MapConflict, MetadataUnavailable, ShardDirectory, initial_map


def __getattr__(name: str) -> Any:
    # Imported on first use: a client needs only shard_map, not the directory's gRPC and storage.
    if name in __all__:
        from . import directory

        return getattr(directory, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
