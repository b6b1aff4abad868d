"""Dynamic sharding: the metadata group, routing by the live shard map, and moving key space between groups (docs/sharding.md)."""

from .directory import MapConflict, MetadataUnavailable, ShardDirectory, initial_map

__all__ = ["MapConflict", "MetadataUnavailable", "ShardDirectory", "initial_map"]
