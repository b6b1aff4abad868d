"""One simulated group member: a RawNode, its "disk", and a tiny key-value
state machine, driven exactly as the Ready contract says.

The disk is a MemoryStorage that only ever receives what a Ready asked to
persist; a crash throws away everything else (the core, the unstable log, a
Ready whose persistence had not finished, the state machine), and a restart
rebuilds from the disk alone, replaying committed entries after the last
snapshot.

Configuration changes are applied to the core when their entry is applied
(RawNode.apply_conf_change_entry), as the worker does, and the configuration
applied is kept on the disk (as the worker's store keeps it with its applied
index): a restarted node knows at once which members and bindings it had
applied. A node that joins the group starts from the configuration that adds
it (its `initial_conf`), with an empty log: older changes replay over it as
no-ops.

Each life of a node's disk has its own incarnation, drawn from the seed. A
wiped disk (`wipe`) is a new life: an empty disk bootstrapped with the
node's `initial_conf` under its old id, which is what a worker without the
start rules of shardnode/replica/identity.py would do. Messages leave a node
stamped with its incarnation (as the worker's transport stamps each frame),
and travel only where the worker's transport lets them (`transport_sends`,
`transport_delivers`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import msgpack

from shardnode.raft import (
    Config,
    ConfState,
    Entry,
    EntryType,
    HardState,
    MemoryStorage,
    Message,
    MessageType,
    Proposal,
    RawNode,
    Ready,
    Snapshot,
)


def encode_command(client_id: int, handle: int, kind: str, key: bytes, value: bytes | None) -> bytes:
    return msgpack.packb((client_id, handle, kind, key, value))


def decode_command(data: bytes) -> tuple[int, int, str, bytes, bytes | None]:
    client_id, handle, kind, key, value = msgpack.unpackb(data)
    return client_id, handle, kind, key, value


@dataclass(slots=True)
class NodeParams:
    election_tick: int = 10
    heartbeat_tick: int = 2
    max_size_per_msg: int = 256
    max_inflight_msgs: int = 4
    compact_threshold: int = 0           # 0: never compact
    max_persist_delay: int = 0           # simulated fsync latency, in time units
    pre_vote: bool = True
    check_quorum: bool = True
    quiesce_ticks: int = 0               # 0: the group never quiesces


class SimDisk(MemoryStorage):
    """A node's disk: the log, hard state and snapshot, and the configuration
    the node applied (the worker's store records it with its applied index,
    so a restart starts from it, not from the snapshot's older one)."""

    def __init__(self, conf_state: ConfState) -> None:
        super().__init__(conf_state)
        self.applied_conf: ConfState | None = None

    def initial_state(self) -> tuple[HardState, ConfState]:
        hard_state, conf_state = super().initial_state()
        return hard_state, self.applied_conf if self.applied_conf is not None else conf_state

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        super().apply_snapshot(snapshot)
        self.applied_conf = snapshot.metadata.conf_state


def transport_sends(node: "SimNode", message: Message, nodes: dict[int, "SimNode"]) -> bool:
    """Whether the worker's transport would send `message`: over its link to
    each member of the configuration the node applied, or back on the stream
    the recipient opened to this node (it has this node among its members and
    runs): how a removed member gets its NOTICE, and how a node answers a
    member it has not applied yet."""
    if message.to in node.rawnode.raft.tracker.progress:    # the members: voters and learners
        return True
    peer = nodes.get(message.to)
    return peer is not None and peer.alive and node.id in peer.rawnode.raft.tracker.progress


def transport_delivers(node: "SimNode", message: Message) -> bool:
    """Whether the worker's transport would hand `message` to the core: it
    comes from a member of the configuration the node applied, from a
    removed one (the core tells it so), or from an id above every id the
    node knows (ids only grow: a member added by a change it has not applied
    yet, perhaps the leader that would bring it). Anyone else is a stranger."""
    tracker = node.rawnode.raft.tracker
    sender = message.from_
    if sender in tracker.progress or sender in tracker.removed:
        return True
    return sender > max(node.id, max(tracker.progress, default=0), max(tracker.removed, default=0))


@dataclass(slots=True)
class PendingWrite:
    handle: int
    proposal: Proposal


@dataclass
class SimNode:
    id: int
    initial_conf: ConfState
    params: NodeParams
    seed: int
    disk: SimDisk = field(init=False)
    alive: bool = field(default=False, init=False)
    rawnode: RawNode | None = field(default=None, init=False)
    kv: dict[bytes, bytes] = field(default_factory=dict, init=False)
    applied_index: int = field(default=0, init=False)
    # The Ready being "written to disk", and when that write completes.
    in_flight_ready: Ready | None = field(default=None, init=False)
    # How many of in_flight_ready's committed entries were applied while it was "written".
    applied_early: int = field(default=0, init=False)
    sent_early: bool = field(default=False, init=False)      # its messages left before the write
    # Client requests this node accepted and has not answered.
    pending_writes: dict[int, PendingWrite] = field(default_factory=dict, init=False)
    pending_reads: dict[bytes, int] = field(default_factory=dict, init=False)
    ready_reads: list[tuple[int, int]] = field(default_factory=list, init=False)   # (index, handle)
    restarts: int = field(default=0, init=False)
    # The life of the disk: 0 for the first, +1 for each wipe; each has its own incarnation.
    lives: int = field(default=0, init=False)
    incarnation: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.disk = SimDisk(self.initial_conf)
        self.incarnation = self._draw_incarnation()

    def _draw_incarnation(self) -> int:
        return random.Random((self.seed * 7_919 + self.id) * 104_729 + self.lives).getrandbits(63) | 1

    def wipe(self) -> None:
        """The disk is lost (the node is down): the next start is a new life,
        bootstrapped with `initial_conf` under the same id, a new incarnation."""
        assert not self.alive, "wipe a node that is down"
        self.lives += 1
        self.disk = SimDisk(self.initial_conf)
        self.incarnation = self._draw_incarnation()

    def stamp(self, message: Message) -> Message:
        """`message` as it leaves this node: with this node's incarnation when
        it is the sender (a forwarded message carries none: the transport
        stamps only the frame's sender's)."""
        incarnation = self.incarnation if message.from_ == self.id else 0
        if message.incarnation == incarnation:
            return message
        m = message
        return Message(m.type, m.to, m.from_, m.term, m.log_term, m.index, m.entries, m.commit, m.snapshot,
                       m.reject, m.reject_hint, m.context, incarnation)

    # --- Lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        snapshot = self.disk.snapshot()
        config = Config(
            id=self.id,
            election_tick=self.params.election_tick,
            heartbeat_tick=self.params.heartbeat_tick,
            applied=snapshot.metadata.index,
            max_size_per_msg=self.params.max_size_per_msg,
            max_inflight_msgs=self.params.max_inflight_msgs,
            pre_vote=self.params.pre_vote,
            check_quorum=self.params.check_quorum,
            quiesce_ticks=self.params.quiesce_ticks,
            incarnation=self.incarnation,
        )
        # Each incarnation gets its own deterministic stream of randomness.
        rng = random.Random(self.seed * 1_000_003 + self.id * 101 + self.restarts)
        self.rawnode = RawNode(config, self.disk, rng)
        self._load_state_machine(snapshot)
        self.alive = True

    def crash(self) -> list[int]:
        """Lose all volatile state. Returns the handles of client requests that
        will now never be answered by this node."""
        self.alive = False
        self.rawnode = None
        self.in_flight_ready = None
        self.kv = {}
        self.restarts += 1
        lost = [w.handle for w in self.pending_writes.values()]
        lost += list(self.pending_reads.values())
        lost += [handle for _, handle in self.ready_reads]
        self.pending_writes.clear()
        self.pending_reads.clear()
        self.ready_reads.clear()
        return lost

    def forget(self, handle: int) -> None:
        """The client gave up on this request."""
        for index, write in list(self.pending_writes.items()):
            if write.handle == handle:
                del self.pending_writes[index]
        for context, read_handle in list(self.pending_reads.items()):
            if read_handle == handle:
                del self.pending_reads[context]
        self.ready_reads = [(i, h) for i, h in self.ready_reads if h != handle]

    def _load_state_machine(self, snapshot: Snapshot) -> None:
        if snapshot.data:
            self.kv = dict(msgpack.unpackb(snapshot.data))
        else:
            self.kv = {}
        self.applied_index = snapshot.metadata.index

    # --- Persisting a Ready (step 2 of the contract) ---------------------------------

    def persist(self, ready: Ready) -> None:
        if ready.snapshot is not None:
            self.disk.apply_snapshot(ready.snapshot)
        if ready.entries:
            self.disk.append(ready.entries)
        if ready.hard_state is not None:
            self.disk.set_hard_state(ready.hard_state)

    # --- Applying (step 4) --------------------------------------------------------------

    def install_snapshot(self, snapshot: Snapshot) -> list[int]:
        """Replace the state machine; returns handles of writes whose fate the
        snapshot hides (they may or may not be in it)."""
        self._load_state_machine(snapshot)
        unknown = [w.handle for index, w in self.pending_writes.items() if index <= snapshot.metadata.index]
        for index in [i for i in self.pending_writes if i <= snapshot.metadata.index]:
            del self.pending_writes[index]
        return unknown

    def apply(self, entry: Entry) -> tuple[int, bytes | None] | None:
        """Apply one committed entry. Returns (handle, output) if it answers a
        write this node accepted; output is the previous value."""
        self.applied_index = entry.index
        pending = self.pending_writes.pop(entry.index, None)
        if entry.type is EntryType.CONF_CHANGE:
            self.disk.applied_conf = self.rawnode.apply_conf_change_entry(entry)
            return None if pending is None else (pending.handle, _LOST)
        if not entry.data:
            return None if pending is None else (pending.handle, _LOST)
        _, handle, kind, key, value = decode_command(entry.data)
        previous = self.kv.get(key)
        if kind == "put":
            self.kv[key] = value
        else:
            self.kv.pop(key, None)
        if pending is None:
            return None
        if pending.proposal.term != entry.term or pending.handle != handle:
            # Another leader's entry took this index: ours was never committed.
            return pending.handle, _LOST
        return handle, previous

    def maybe_compact(self) -> None:
        threshold = self.params.compact_threshold
        if not threshold or self.rawnode is None:
            return
        if self.applied_index - self.disk.first_index() + 1 <= threshold:
            return
        conf_state = self.rawnode.raft.tracker.conf_state()
        data = msgpack.packb(self.kv)
        self.disk.create_snapshot(self.applied_index, conf_state, data)
        self.disk.compact(self.applied_index)


class _Lost:
    """Marker output: the write was definitely not applied."""

    def __repr__(self) -> str:
        return "LOST"


_LOST = _Lost()
LOST = _LOST
