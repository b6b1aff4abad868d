"""The plain data the Raft core exchanges with its driver and its peers.

Everything here is immutable and holds only ints, bytes and tuples, so that a
message can be encoded with msgpack by the transport and compared in tests.
The shapes follow etcd's raftpb.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# Node ids are positive; 0 means "nobody" (no vote, no known leader).
NONE = 0


class MessageType(enum.IntEnum):
    # Local messages: the driver or the core itself steps them, never sent.
    HUP = 0              # start an election (election timeout or campaign())
    BEAT = 1             # leader: time to send heartbeats
    PROPOSE = 2          # append entries to the leader's log
    CHECK_QUORUM = 3     # leader: step down unless a quorum was heard from
    UNREACHABLE = 4      # driver: a peer could not be reached
    SNAP_STATUS = 5      # driver: a snapshot send finished (reject = failed)
    # Network messages.
    APP = 10             # append entries (also probes with no entries)
    APP_RESP = 11
    VOTE = 12
    VOTE_RESP = 13
    PRE_VOTE = 14
    PRE_VOTE_RESP = 15
    SNAP = 16            # install snapshot
    HEARTBEAT = 17
    HEARTBEAT_RESP = 18
    TRANSFER_LEADER = 19
    TIMEOUT_NOW = 20     # leadership transfer: campaign now, skipping pre-vote
    READ_INDEX = 21
    READ_INDEX_RESP = 22


LOCAL_MESSAGES = frozenset(
    {
        MessageType.HUP,
        MessageType.BEAT,
        MessageType.PROPOSE,
        MessageType.CHECK_QUORUM,
        MessageType.UNREACHABLE,
        MessageType.SNAP_STATUS,
    }
)

# Responses carry the term of the request they answer, not always the sender's.
RESPONSE_MESSAGES = frozenset(
    {
        MessageType.APP_RESP,
        MessageType.VOTE_RESP,
        MessageType.PRE_VOTE_RESP,
        MessageType.HEARTBEAT_RESP,
        MessageType.READ_INDEX_RESP,
    }
)


class EntryType(enum.IntEnum):
    NORMAL = 0
    CONF_CHANGE = 1


@dataclass(slots=True, frozen=True)
class Entry:
    term: int
    index: int
    data: bytes = b""
    type: EntryType = EntryType.NORMAL

    def size(self) -> int:
        """Approximate encoded size, used to bound appends and uncommitted growth."""
        return len(self.data) + 16


@dataclass(slots=True, frozen=True)
class ConfState:
    """The membership of a group, as stored with a snapshot.

    `voters_outgoing` is non-empty only inside a joint configuration (used by
    membership changes, not built yet); the core's quorum math already
    handles it.
    """

    voters: tuple[int, ...] = ()
    learners: tuple[int, ...] = ()
    voters_outgoing: tuple[int, ...] = ()


@dataclass(slots=True, frozen=True)
class SnapshotMetadata:
    index: int = 0
    term: int = 0
    conf_state: ConfState = field(default_factory=ConfState)


@dataclass(slots=True, frozen=True)
class Snapshot:
    """A state-machine image up to `metadata.index`.

    `data` is opaque to the core. A driver whose state is large sends a small
    descriptor here and streams the image itself.
    """

    metadata: SnapshotMetadata = field(default_factory=SnapshotMetadata)
    data: bytes = b""

    def is_empty(self) -> bool:
        return self.metadata.index == 0


EMPTY_SNAPSHOT = Snapshot()


@dataclass(slots=True, frozen=True)
class HardState:
    """What must be on stable storage before any message of a Ready is sent."""

    term: int = 0
    vote: int = NONE
    commit: int = 0


EMPTY_HARD_STATE = HardState()


@dataclass(slots=True, frozen=True)
class Message:
    type: MessageType
    to: int = NONE
    from_: int = NONE
    term: int = 0
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    snapshot: Snapshot | None = None
    reject: bool = False
    reject_hint: int = 0
    context: bytes = b""


class ConfChangeType(enum.IntEnum):
    ADD_NODE = 0
    REMOVE_NODE = 1
    ADD_LEARNER_NODE = 2


@dataclass(slots=True, frozen=True)
class ConfChange:
    """A single-member change, carried in an EntryType.CONF_CHANGE entry.

    The driver applies it with RawNode.apply_conf_change when the entry is
    committed. Only one may be pending at a time (see Raft.pending_conf_index),
    which is what makes single-member changes safe.
    """

    type: ConfChangeType
    node_id: int
    context: bytes = b""

    def encode(self) -> bytes:
        return bytes([int(self.type)]) + self.node_id.to_bytes(8, "big") + self.context

    @classmethod
    def decode(cls, data: bytes) -> "ConfChange":
        if len(data) < 9:
            raise ValueError(f"conf change entry too short ({len(data)} bytes)")
        return cls(ConfChangeType(data[0]), int.from_bytes(data[1:9], "big"), bytes(data[9:]))


class StateRole(enum.IntEnum):
    """Numbered as the raft_state metric: 0 follower, 1 candidate, 2 leader."""

    FOLLOWER = 0
    CANDIDATE = 1
    LEADER = 2
    PRE_CANDIDATE = 3


@dataclass(slots=True, frozen=True)
class SoftState:
    """Volatile state a driver wants to observe (not persisted)."""

    lead: int = NONE
    role: StateRole = StateRole.FOLLOWER


@dataclass(slots=True, frozen=True)
class ReadState:
    """A ReadIndex request that is ready: once the state machine has applied
    `index`, a read for `request_context` is linearizable."""

    index: int
    request_context: bytes
