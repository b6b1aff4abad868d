"""Dynamic sharding: the metadata group that holds the shard map
(docs/sharding.md)."""

from .directory import MapConflict, MetadataUnavailable, ShardDirectory, initial_map

__all__ = ["MapConflict", "MetadataUnavailable", "ShardDirectory", "initial_map"]
