"""The plain data the Raft core exchanges with its driver and its peers.

Everything here is immutable and holds only ints, bytes and tuples, so that a
message can be encoded with msgpack by the transport and compared in tests.
The shapes follow etcd's raftpb.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import msgpack

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
    # "I do not recognise you": the answer to a message from a removed id, or
    # from a member whose incarnation is not the one the group bound to its
    # id. `context` names the reason (NoticeReason), `index` the incarnation
    # bound to the recipient's id (REINCARNATED). Term 0: it is no part of
    # any election or replication round.
    NOTICE = 23
    # Leader -> follower: the group has nothing to do; stop ticking until any
    # other message (or a proposal, a read, the leader's link failing) wakes
    # you. `index`/`log_term`: the leader's last entry, `commit` its commit
    # index. A follower that does not hold that entry answers with a
    # HEARTBEAT_RESP with reject set, which wakes the leader (docs/raft.md, Quiescence).
    QUIESCE = 24


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


# Bytes an entry counts for beyond its data (term, index, type) when appends
# and uncommitted growth are bounded: Entry.size() = len(data) + ENTRY_OVERHEAD.
ENTRY_OVERHEAD = 16


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
        return len(self.data) + ENTRY_OVERHEAD


@dataclass(slots=True, frozen=True)
class Member:
    """How to reach one member: what a configuration change carries so that
    every replica (and, through snapshots, every later one) can address it."""

    node_id: int
    host: str = ""
    address: str = ""


@dataclass(slots=True, frozen=True)
class ConfState:
    """The membership of a group, as stored with a snapshot and as of the
    applied index.

    - `voters`, `learners`: the current members. A learner receives the log
      but neither votes nor counts toward a quorum.
    - `removed`: every id ever removed from the group. Ids are never reused
      (a rejoining host's replicas get new ids), so a removed id stays out
      for good: the core refuses to add it again and drops its messages.
    - `members`: addresses of the members that joined through a
      configuration change (the initial members come from the cluster file).
    - `voters_outgoing`: non-empty only inside a joint configuration. This
      core never enters one (single-server changes only); if a snapshot
      carries one, decisions need a majority of both halves, which is safe
      (see confchange.py).
    - `incarnations`: (node_id, incarnation) pairs, sorted by node id: the
      life of a member's store that the group bound to its id
      (BIND_INCARNATION). A message from a bound member that carries another
      incarnation comes from a process that lost that member's disk (its
      votes and acknowledgements are forgotten) and is never counted.
      Members not bound yet are absent (incarnation unknown: not checked).

    A node's ConfState only moves forward along each id's life cycle
    (absent -> learner -> voter -> removed), which is what makes replaying
    configuration changes over a newer ConfState a no-op (confchange.py).
    """

    voters: tuple[int, ...] = ()
    learners: tuple[int, ...] = ()
    voters_outgoing: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()
    members: tuple[Member, ...] = ()
    incarnations: tuple[tuple[int, int], ...] = ()

    def ids(self) -> frozenset[int]:
        """Every current member: voters (both halves) and learners."""
        return frozenset(self.voters) | frozenset(self.learners) | frozenset(self.voters_outgoing)

    def member(self, node_id: int) -> Member | None:
        for member in self.members:
            if member.node_id == node_id:
                return member
        return None

    def incarnation_of(self, node_id: int) -> int:
        """The incarnation bound to `node_id`, 0 if none is bound."""
        for bound_id, incarnation in self.incarnations:
            if bound_id == node_id:
                return incarnation
        return 0


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
    # The sender's incarnation (the life of its store), 0 if unknown. The
    # transport stamps it on receipt from the frame that carried the message
    # (the core does not set it on what it sends: one per frame, not per
    # message); a message whose `from_` is not the frame's sender (a
    # forwarded TRANSFER_LEADER) carries 0.
    incarnation: int = 0


class NoticeReason(enum.Enum):
    """Why a node does not recognise a sender (the context of a NOTICE)."""

    REMOVED = "removed"              # the sender's id was removed from the group
    REINCARNATED = "reincarnated"    # the group bound another incarnation to the sender's id

    @classmethod
    def parse(cls, context: bytes) -> "NoticeReason | None":
        try:
            return cls(context.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return None


@dataclass(slots=True, frozen=True)
class Notice:
    """A member told this node that it is not recognised: its id was
    removed, or another incarnation is bound to it (`bound_incarnation`).
    Either way this node never campaigns again; its driver decides what to
    do (docs/membership.md: retire, or refuse to serve a lost disk)."""

    from_node: int
    reason: NoticeReason
    bound_incarnation: int = 0


class ConfChangeType(enum.IntEnum):
    ADD_NODE = 0            # promote a learner to voter (new members join as learners)
    REMOVE_NODE = 1         # remove a voter or a learner, for good
    ADD_LEARNER_NODE = 2    # add a new member as a learner
    BIND_INCARNATION = 3    # bind a member's id to the incarnation of its store (the first binding wins)


# First byte of the current ConfChange encoding. The first encoding began with
# the change type (0..2), so the two never collide and old entries still decode.
_CONF_CHANGE_V2 = 0x81


@dataclass(slots=True, frozen=True)
class ConfChange:
    """A single-server change, carried in an EntryType.CONF_CHANGE entry.

    `host` and `address` say how to reach an added member (every replica
    records them in its ConfState); `incarnation` is what BIND_INCARNATION
    binds. Build one with `add_learner`, `promote`, `remove` or `bind`;
    propose it with RawNode.propose_conf_change, and apply it with
    RawNode.apply_conf_change when its entry is committed (see docs/raft.md,
    Membership).
    """

    type: ConfChangeType
    node_id: int
    context: bytes = b""
    host: str = ""
    address: str = ""
    incarnation: int = 0

    @classmethod
    def add_learner(cls, node_id: int, host: str = "", address: str = "") -> "ConfChange":
        return cls(ConfChangeType.ADD_LEARNER_NODE, node_id, host=host, address=address)

    @classmethod
    def promote(cls, node_id: int) -> "ConfChange":
        return cls(ConfChangeType.ADD_NODE, node_id)

    @classmethod
    def remove(cls, node_id: int) -> "ConfChange":
        return cls(ConfChangeType.REMOVE_NODE, node_id)

    @classmethod
    def bind(cls, node_id: int, incarnation: int) -> "ConfChange":
        return cls(ConfChangeType.BIND_INCARNATION, node_id, incarnation=incarnation)

    def encode(self) -> bytes:
        fields: tuple = (int(self.type), self.node_id, self.host, self.address, self.context)
        if self.incarnation:
            # A sixth field only when there is one: the other changes keep the
            # five-field form that earlier versions decode.
            fields += (self.incarnation,)
        return bytes([_CONF_CHANGE_V2]) + msgpack.packb(fields, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> "ConfChange":
        """Decode either encoding; ValueError for anything else."""
        if not data:
            raise ValueError("empty conf change entry")
        if data[0] == _CONF_CHANGE_V2:
            try:
                fields = msgpack.unpackb(data[1:], use_list=False, raw=False)
            except Exception as exc:
                raise ValueError(f"conf change entry undecodable ({exc})") from None
            if type(fields) is not tuple or len(fields) not in (5, 6):
                raise ValueError("conf change entry: expected (type, node_id, host, address, context[, incarnation])")
            change_type, node_id, host, address, context = fields[:5]
            incarnation = fields[5] if len(fields) == 6 else 0
            if type(change_type) is not int or type(node_id) is not int or node_id < 0:
                raise ValueError("conf change entry: type and node id must be integers")
            if type(host) is not str or type(address) is not str or type(context) is not bytes:
                raise ValueError("conf change entry: host and address must be strings, context bytes")
            if type(incarnation) is not int or incarnation < 0:
                raise ValueError("conf change entry: the incarnation must be a non-negative integer")
            try:
                kind = ConfChangeType(change_type)
            except ValueError:
                raise ValueError(f"conf change entry: unknown change type {change_type}") from None
            return cls(kind, node_id, context, host, address, incarnation)
        # The first encoding: type byte, 8-byte big-endian node id, context.
        if len(data) < 9:
            raise ValueError(f"conf change entry too short ({len(data)} bytes)")
        try:
            kind = ConfChangeType(data[0])
        except ValueError:
            raise ValueError(f"conf change entry: unknown change type {data[0]}") from None
        return cls(kind, int.from_bytes(data[1:9], "big"), bytes(data[9:]))

    def describe(self) -> str:
        where = f" ({self.host} {self.address})" if self.host or self.address else ""
        if self.type is ConfChangeType.BIND_INCARNATION:
            where = f" to incarnation {self.incarnation:x}"
        return f"{self.type.name} {self.node_id}{where}"


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
