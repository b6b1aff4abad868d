"""A pure, deterministic Raft core in the style of etcd-io/raft.

No I/O, no threads, no clock: a driver feeds ticks and messages into a
RawNode and carries out the Ready it gets back (see rawnode.py).
"""

from .config import Config
from .errors import (
    CompactedError,
    ConfigError,
    InvalidConfChange,
    ProposalDropped,
    RaftError,
    SnapshotOutOfDate,
    SnapshotTemporarilyUnavailable,
    UnavailableError,
)
from .messages import (
    NONE,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Member,
    Message,
    MessageType,
    Notice,
    NoticeReason,
    ReadState,
    Snapshot,
    SnapshotMetadata,
    SoftState,
    StateRole,
)
from .rawnode import PeerStatus, Proposal, RawNode, Ready, Status
from .storage import MemoryStorage, Storage

__all__ = [
    "NONE",
    "CompactedError",
    "ConfChange",
    "ConfChangeType",
    "ConfState",
    "Config",
    "ConfigError",
    "Entry",
    "EntryType",
    "HardState",
    "InvalidConfChange",
    "Member",
    "MemoryStorage",
    "Message",
    "MessageType",
    "Notice",
    "NoticeReason",
    "PeerStatus",
    "Proposal",
    "ProposalDropped",
    "RaftError",
    "RawNode",
    "ReadState",
    "Ready",
    "Snapshot",
    "SnapshotMetadata",
    "SnapshotOutOfDate",
    "SnapshotTemporarilyUnavailable",
    "SoftState",
    "StateRole",
    "Status",
    "Storage",
    "UnavailableError",
]
