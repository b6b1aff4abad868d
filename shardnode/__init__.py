"""shardnode: a distributed key-value store built from many Raft groups."""

__version__ = "0.1.0"
