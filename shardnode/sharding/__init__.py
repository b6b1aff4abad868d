"""Dynamic sharding: the metadata group, routing by the live shard map, and moving key space between groups (docs/sharding.md)."""
