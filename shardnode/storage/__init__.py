"""Durable storage of one Raft group member, on RocksDB (rocksdict).

`ReplicaStore` is the Raft core's Storage, the replicated key-value state
machine with exactly-once client sessions, log compaction and both ends of
snapshot transfer. `commands` is the format of the replicated writes;
`engine` opens RocksDB and fixes the on-disk layout.
"""

from .commands import COMMAND_FORMAT_VERSION, Command, CommandError, CommandOp, decode_command, encode_command
from .engine import (
    CorruptionError,
    Engine,
    SessionRecord,
    SnapshotDataError,
    SnapshotNotStaged,
    StorageClosed,
    StorageError,
    open_engine,
)
from .snapshot import SnapshotChunk, SnapshotReader, SnapshotStaging
from .store import ApplyResult, ReplicaStore

__all__ = [
    "COMMAND_FORMAT_VERSION",
    "ApplyResult",
    "Command",
    "CommandError",
    "CommandOp",
    "CorruptionError",
    "Engine",
    "ReplicaStore",
    "SessionRecord",
    "SnapshotChunk",
    "SnapshotDataError",
    "SnapshotNotStaged",
    "SnapshotReader",
    "SnapshotStaging",
    "StorageClosed",
    "StorageError",
    "decode_command",
    "encode_command",
    "open_engine",
]
