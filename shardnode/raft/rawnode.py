"""The small public API a driver uses: tick, step, propose, read_index,
ready/advance (after etcd-io/raft's rawnode.go).

The Ready contract, which every driver (the worker, the simulator) follows:

1. rd = node.ready()
2. Persist rd.snapshot (if any), rd.entries and rd.hard_state (if any), in
   that order, durably (one synced write batch in the worker).
3. Send rd.messages (redundant ones already folded: coalesce.py). (Only now: they may promise what step 2 made durable,
   such as a vote or an acknowledged append. Exception: when
   rd.send_before_persist is set — all of them are a leader's appends and
   heartbeats — they may be sent before step 2, in parallel with the write.)
4. Apply rd.committed_entries to the state machine, in order; serve
   rd.read_states once the applied index reaches their index.
5. node.advance(rd).

Between ready() and advance() the driver may keep stepping messages and
ticking; it may not call ready() again.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import confchange
from .coalesce import coalesce
from .config import Config
from .errors import RaftError
from .messages import (
    LOCAL_MESSAGES,
    RESPONSE_MESSAGES,
    ConfChange,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    Notice,
    ReadState,
    Snapshot,
    SoftState,
    StateRole,
)
from .raft import Raft
from .storage import Storage
from .tracker import ProgressState

log = logging.getLogger("shardnode.raft")


@dataclass(slots=True, frozen=True)
class Ready:
    soft_state: SoftState | None           # set when leader or role changed
    hard_state: HardState | None           # set when it must be persisted
    entries: list[Entry]                   # to append to stable storage
    snapshot: Snapshot | None              # to install and persist
    committed_entries: list[Entry]         # to apply, in order
    messages: list[Message]                # to send after persisting
    read_states: list[ReadState] = field(default_factory=list)
    # Whether step 2 must be fsynced: entries, a snapshot, or a new term or
    # vote. A hard state that only moves the commit index may be written
    # without a sync: a lost commit index is learned again from the leader
    # (as in etcd's MustSync).
    must_sync: bool = False
    # Whether `messages` may be sent before step 2 instead of after it. True
    # only when every message was produced by this node as leader: a leader's
    # appends and heartbeats promise nothing about its own disk, and it counts
    # itself toward a commit only once advance() reports its entries
    # persisted (Raft thesis 10.2.1: the leader writes to its disk in
    # parallel with replicating). Votes and acknowledgements always wait.
    send_before_persist: bool = False


@dataclass(slots=True, frozen=True)
class Proposal:
    """Where a proposal landed: entries index .. index+count-1, all of `term`.
    If the entry found at `index` when applying has another term, the proposal
    was lost to a leader change and must be answered as failed."""

    index: int
    term: int
    count: int = 1


@dataclass(slots=True, frozen=True)
class PeerStatus:
    match: int
    next_index: int
    state: ProgressState
    recent_active: bool
    is_learner: bool = False
    # A learner the leader would promote now (confchange.learner_caught_up).
    caught_up: bool = False


@dataclass(slots=True, frozen=True)
class Status:
    id: int
    term: int
    vote: int
    commit: int
    applied: int
    lead: int
    role: StateRole
    last_index: int
    first_index: int
    progress: dict[int, PeerStatus]        # filled on the leader only
    conf_state: ConfState = ConfState()    # the applied configuration
    removed: bool = False                  # this node applied its own removal
    notice: Notice | None = None           # a member does not recognise this node (RawNode.notice)
    quiesced: bool = False                 # the group had nothing to do: this node does not tick


class RawNode:
    def __init__(self, config: Config, storage: Storage, rng: random.Random | None = None) -> None:
        # A driver in production passes nothing and gets an OS-seeded generator
        # of its own; the simulator passes a seeded one.
        self.raft = Raft(config, storage, rng if rng is not None else random.Random())
        self._prev_soft_state = self.raft.soft_state()
        self._prev_hard_state = self.raft.hard_state()
        self._outstanding: Ready | None = None

    # --- Inputs --------------------------------------------------------------------

    def tick(self) -> None:
        self.raft.tick()

    def campaign(self) -> None:
        """Start an election now (subject to pre-vote)."""
        self.raft.step(Message(MessageType.HUP))

    def step(self, message: Message) -> None:
        """A message from a peer. Local message types are refused: only this
        process may produce them."""
        if message.type in LOCAL_MESSAGES:
            raise RaftError(f"{message.type.name} is a local message and cannot come from a peer")
        tracker = self.raft.tracker
        if (message.type in RESPONSE_MESSAGES and message.from_ not in tracker.progress
                and message.from_ not in tracker.removed):
            return  # a response from a node that never was a member (a removed one is told: Raft.step)
        self.raft.step(message)

    def propose(self, data: bytes) -> Proposal:
        return self.propose_batch((data,))

    def propose_batch(self, datas: Sequence[bytes]) -> Proposal:
        """Append many entries in one go (one append message per follower).
        Raises ProposalDropped if this node cannot take them."""
        if not datas:
            raise ValueError("propose_batch needs at least one entry")
        entries = tuple(Entry(0, 0, data) for data in datas)
        return self._propose(entries)

    def propose_conf_change(self, change: ConfChange) -> Proposal:
        """Propose one single-server change (ConfChange.add_learner / promote
        / remove). Raises InvalidConfChange if it can never apply to the
        current configuration (nothing enters the log), ProposalDropped if it
        cannot be taken now: not the leader, another change still in flight,
        no entry of this leader's term applied yet, a learner to promote that
        has not caught up. Apply it with apply_conf_change once committed."""
        return self._propose((Entry(0, 0, change.encode(), EntryType.CONF_CHANGE),))

    def _propose(self, entries: tuple[Entry, ...]) -> Proposal:
        raft = self.raft
        raft.step(Message(MessageType.PROPOSE, from_=raft.id, entries=entries))
        # A successful proposal was appended at the end of the leader's log.
        return Proposal(raft.log.last_index() - len(entries) + 1, raft.term, len(entries))

    def read_index(self, context: bytes) -> None:
        """Ask for a linearizable read point. `context` must be unique; the
        answer comes back as a ReadState in a later Ready."""
        self.raft.step(Message(MessageType.READ_INDEX, context=context))

    def transfer_leader(self, transferee: int) -> None:
        self.raft.step(Message(MessageType.TRANSFER_LEADER, from_=transferee))

    def apply_conf_change(self, change: ConfChange) -> ConfState:
        """Apply a committed change; returns the configuration now in force
        (to record with the applied index). Never raises for a change that is
        invalid against the configuration: that is a logged no-op."""
        return self.raft.apply_conf_change(change)

    def apply_conf_change_entry(self, entry: Entry) -> ConfState:
        """Decode and apply a committed CONF_CHANGE entry. Undecodable data is
        a no-op like an invalid change: a committed entry never crashes a
        replica."""
        try:
            change = ConfChange.decode(entry.data)
        except ValueError as exc:
            log.warning("raft.conf_change_undecodable", extra={"node": self.raft.id, "index": entry.index, "error": str(exc)})
            return self.raft.tracker.conf_state()
        return self.raft.apply_conf_change(change)

    def conf_state(self) -> ConfState:
        """The configuration this node has applied."""
        return self.raft.tracker.conf_state()

    def caught_up_learners(self) -> tuple[int, ...]:
        """On the leader: learners close enough to its commit index to be
        promoted now (the driver proposes ConfChange.promote for them).
        Empty on any other node."""
        return self.raft.caught_up_learners()

    @property
    def quiesced(self) -> bool:
        """Whether the group had nothing to do and this node stopped ticking
        (Raft.tick does nothing): its driver may stop calling tick until a
        message, a proposal or a read arrives (any of them wakes it)."""
        return self.raft.quiesced

    @property
    def removed(self) -> bool:
        """Whether this node applied its own removal (it will never campaign
        again; its driver may stop it and delete its data)."""
        return self.raft.is_removed()

    @property
    def notice(self) -> Notice | None:
        """Set once a member told this node it does not recognise it: its id
        was removed (it may have missed the commit of its removal), or the
        group bound another incarnation to its id (this node's store is not
        the one whose votes and log the group counted). The node never
        campaigns again; its driver decides the rest (a worker checks a
        removal with the group and retires; a reincarnation refuses to serve)."""
        return self.raft.notice

    def incarnations_to_bind(self) -> tuple[tuple[int, int], ...]:
        """On the leader: (node id, incarnation) of members whose incarnation
        it knows and the group has not bound; the driver proposes
        ConfChange.bind for the first (one change in flight at a time, as for
        promotions). Empty on any other node."""
        return self.raft.incarnations_to_bind()

    def report_unreachable(self, node_id: int) -> None:
        self.raft.step(Message(MessageType.UNREACHABLE, from_=node_id))

    def report_snapshot(self, node_id: int, failed: bool) -> None:
        self.raft.step(Message(MessageType.SNAP_STATUS, from_=node_id, reject=failed))

    # --- Outputs -------------------------------------------------------------------

    def has_ready(self) -> bool:
        if self._outstanding is not None:
            return False
        raft = self.raft
        return bool(
            raft.msgs
            or raft.read_states
            or raft.log.unstable.entries
            or raft.log.unstable.snapshot is not None
            or raft.log.has_next_committed_entries()
            or raft.soft_state() != self._prev_soft_state
            or raft.hard_state() != self._prev_hard_state
        )

    def ready(self) -> Ready:
        if self._outstanding is not None:
            raise RaftError("ready() called again before advance()")
        raft = self.raft
        soft_state = raft.soft_state()
        hard_state = raft.hard_state()
        previous = self._prev_hard_state
        entries = raft.log.unstable_entries()
        snapshot = raft.log.unstable.snapshot
        ready = Ready(
            soft_state=soft_state if soft_state != self._prev_soft_state else None,
            hard_state=hard_state if hard_state != previous else None,
            entries=entries,
            snapshot=snapshot,
            committed_entries=raft.log.next_committed_entries(),
            messages=coalesce(raft.msgs, raft.max_msg_size),
            read_states=raft.read_states,
            must_sync=bool(entries)
            or snapshot is not None
            or hard_state.term != previous.term
            or hard_state.vote != previous.vote,
            send_before_persist=raft.role is StateRole.LEADER
            and not raft.msgs_need_persist
            and snapshot is None
            and (hard_state.term, hard_state.vote) == (previous.term, previous.vote),
        )
        raft.msgs = []
        raft.msgs_need_persist = False
        raft.read_states = []
        self._prev_soft_state = soft_state
        self._prev_hard_state = hard_state
        self._outstanding = ready
        return ready

    def advance(self, ready: Ready) -> None:
        """The driver persisted, sent and applied `ready` as the contract says."""
        if ready is not self._outstanding:
            raise RaftError("advance() must be given the Ready returned by the last ready()")
        raft = self.raft
        if ready.snapshot is not None:
            index = ready.snapshot.metadata.index
            raft.log.stable_snap_to(index)
            if index > raft.log.applied:
                raft.log.applied = index
        if ready.entries:
            last = ready.entries[-1]
            raft.on_persisted(last.index, last.term)
        if ready.committed_entries:
            raft.log.applied_to(ready.committed_entries[-1].index)
            raft.reduce_uncommitted_size(ready.committed_entries)
        self._outstanding = None

    def status(self) -> Status:
        raft = self.raft
        progress: dict[int, PeerStatus] = {}
        if raft.role is StateRole.LEADER:
            commit = raft.log.committed
            progress = {
                node_id: PeerStatus(
                    pr.match, pr.next_index, pr.state, pr.recent_active, pr.is_learner,
                    confchange.learner_caught_up(pr, commit),
                )
                for node_id, pr in raft.tracker.progress.items()
            }
        return Status(
            id=raft.id,
            term=raft.term,
            vote=raft.vote,
            commit=raft.log.committed,
            applied=raft.log.applied,
            lead=raft.lead,
            role=raft.role,
            last_index=raft.log.last_index(),
            first_index=raft.log.first_index(),
            progress=progress,
            conf_state=raft.tracker.conf_state(),
            removed=raft.is_removed(),
            notice=raft.notice,
            quiesced=raft.quiesced,
        )
