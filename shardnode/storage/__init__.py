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
    SnapshotBusy,
    SnapshotDataError,
    SnapshotNotStaged,
    StorageClosed,
    StorageError,
    StorageFault,
    make_dirs_durable,
    open_engine,
    wal_archive_bytes,
)
from .snapshot import SnapshotChunk, SnapshotReader, SnapshotStaging
from .store import ApplyResult, ReplicaStore, StoreBusy, StoreNotInitialized

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
    "SnapshotBusy",
    "SnapshotDataError",
    "SnapshotNotStaged",
    "SnapshotReader",
    "SnapshotStaging",
    "StorageClosed",
    "StorageError",
    "StorageFault",
    "StoreBusy",
    "StoreNotInitialized",
    "decode_command",
    "encode_command",
    "make_dirs_durable",
    "open_engine",
    "wal_archive_bytes",
]
