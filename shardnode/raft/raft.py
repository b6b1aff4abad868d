"""The Raft protocol as a pure state machine (after etcd-io/raft's raft.go).

Inputs are `tick()` and `step(message)`; outputs accumulate in `msgs` (to
send), `read_states` (reads that are ready) and the log (entries to persist,
committed entries to apply), and RawNode packages them as a Ready. Nothing
here touches the network, the disk, a clock or a global random generator:
the randomness comes from the `random.Random` the caller injects.

Safety-relevant choices, each checked by the simulation in tests/sim:
- Only entries of the current term are committed by counting (5.4.2).
- The leader counts itself toward a commit quorum only for entries it has
  persisted (on_persisted), so a commit always means "fsynced on a majority".
- Votes and terms reach stable storage before any message that depends on
  them leaves (Ready contract), so a restarted node never votes twice.
- Pre-vote and check-quorum: a partitioned node does not raise terms, a node
  that hears from its leader ignores campaigns, a leader that loses its
  quorum steps down.
- Membership (rules in confchange.py): one change in flight at a time, none
  before the leader has applied an entry of its own term, validated when
  proposed; a configuration takes effect when its entry is applied; a leader
  that applies its own removal steps down; a removed id can neither campaign
  nor be heard (its messages are dropped, and answered with a NOTICE).
- Quiescence: a leader with nothing to do for `quiesce_ticks` tells its
  followers (QUIESCE, carrying its last entry) and stops ticking; a follower
  that holds that entry stops ticking too, one that does not asks the leader
  for it (which wakes the leader). Any other message, a proposal, a read, a
  campaign, or (on a follower) the driver reporting its leader unreachable
  wakes a quiesced node. Quiescence only withholds ticks: no rule about
  terms, votes, commits or reads changes.
- Incarnations: a member's id is bound to the incarnation of its store (the
  first binding the group commits). A message from a bound member carrying
  another incarnation comes from a process that lost that member's disk, and
  so its vote and its log: it is dropped before anything in it is looked at
  (a forgotten vote is never counted, a wiped log never counts toward a
  commit), and answered with a NOTICE. A node told so (or told it was
  removed) never campaigns again.
"""

from __future__ import annotations

import enum
import logging
import random
from operator import attrgetter
from collections.abc import Callable, Sequence
from dataclasses import replace

from . import confchange
from .config import Config
from .errors import CompactedError, InvalidConfChange, ProposalDropped, SnapshotTemporarilyUnavailable
from .log import RaftLog
from .messages import (
    LOCAL_MESSAGES,
    NONE,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    Notice,
    NoticeReason,
    ReadState,
    Snapshot,
    SoftState,
    StateRole,
)
from .quorum import VoteResult
from .read_only import ReadOnly
from .storage import Storage
from .tracker import Progress, ProgressState, ProgressTracker

log = logging.getLogger("shardnode.raft")

MT = MessageType
_data = attrgetter("data")

# Carried in the context of a VOTE sent because of a leadership transfer: it
# must win even against nodes that still hear from the old leader.
CAMPAIGN_TRANSFER = b"CampaignTransfer"


class CampaignType(enum.Enum):
    PRE_ELECTION = 0
    ELECTION = 1
    TRANSFER = 2


def vote_response_type(vote_type: MessageType) -> MessageType:
    return MT.PRE_VOTE_RESP if vote_type is MT.PRE_VOTE else MT.VOTE_RESP


class Raft:
    def __init__(self, config: Config, storage: Storage, rng: random.Random) -> None:
        self.id = config.id
        self.incarnation = config.incarnation
        self.log = RaftLog(storage, config.max_committed_size_per_ready)
        self.rng = rng
        self.election_timeout = config.election_tick
        self.heartbeat_timeout = config.heartbeat_tick
        self.check_quorum = config.check_quorum
        self.pre_vote = config.pre_vote
        self.max_msg_size = config.max_size_per_msg
        self.max_uncommitted_size = config.max_uncommitted_entries_size

        self.term = 0
        self.vote = NONE
        self.lead = NONE
        self.role = StateRole.FOLLOWER
        self.msgs: list[Message] = []
        # Whether some message in `msgs` was produced outside leadership
        # (see Ready.send_before_persist).
        self.msgs_need_persist = False
        self.read_states: list[ReadState] = []
        self.tracker = ProgressTracker(config.max_inflight_msgs)
        self.read_only = ReadOnly()
        # READ_INDEX requests that arrived before this leader committed an
        # entry of its own term: its commit index may still be stale.
        self.pending_read_index_messages: list[Message] = []
        # Index of the last conf change this leader proposed; another may be
        # proposed only once this one is applied (one change in flight).
        self.pending_conf_index = 0
        # Index of this leader's first entry of its term (its empty entry).
        # No conf change until it is applied: by then every change inherited
        # from earlier terms is committed and applied (Ongaro's 2015 fix).
        self.term_start_index = 0
        self.uncommitted_size = 0
        self.lead_transferee = NONE
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = self.election_timeout
        self.quiesce_ticks = config.quiesce_ticks
        # Quiesced: the group has nothing to do; ticks do nothing until a message wakes this node.
        self.quiesced = False
        self._idle_ticks = 0        # leader: ticks in a row with nothing to do
        # Leader: followers not heard from during the whole last check-quorum window (down, or cut off).
        self._silent: frozenset[int] = frozenset()
        # Member id -> the incarnation its last message carried, for members
        # the group has not bound yet (a leader proposes the bindings).
        self.heard_incarnations: dict[int, int] = {}
        # Set when a member told us we are not recognised: removed, or
        # another incarnation is bound to our id. Then we never campaign.
        self.notice: Notice | None = None

        hard_state, conf_state = storage.initial_state()
        self.tracker.apply_conf_state(conf_state, self.log.last_index() + 1)
        if hard_state != HardState():
            self._load_state(hard_state)
        if config.applied > 0:
            self.log.applied_to(config.applied)
        self._tick: Callable[[], None] = self._tick_election
        self._step_role: Callable[[Message], None] = self._step_follower
        self.become_follower(self.term, NONE)

    def __repr__(self) -> str:
        return f"Raft(id={self.id} {self.role.name} term={self.term} lead={self.lead} {self.log!r})"

    # --- Observed state ---------------------------------------------------------

    def soft_state(self) -> SoftState:
        return SoftState(self.lead, self.role)

    def hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.committed)

    def _load_state(self, hard_state: HardState) -> None:
        if not self.log.committed <= hard_state.commit <= self.log.last_index():
            raise AssertionError(
                f"hard state commit {hard_state.commit} outside [{self.log.committed}, {self.log.last_index()}]"
            )
        self.log.committed = hard_state.commit
        self.term = hard_state.term
        self.vote = hard_state.vote

    def promotable(self) -> bool:
        """Whether this node may campaign: a voter, not in the middle of
        installing a snapshot, and not told by a member that it is removed or
        not the incarnation bound to its id."""
        progress = self.tracker.progress.get(self.id)
        return (progress is not None and not progress.is_learner and self.log.unstable.snapshot is None
                and self.notice is None)

    # --- Sending ----------------------------------------------------------------

    def _send(self, message: Message) -> None:
        if self.role is not StateRole.LEADER:
            # A vote, a vote request or an acknowledgement: it promises
            # something that must be on disk before it leaves.
            self.msgs_need_persist = True
        self.msgs.append(message)

    def _send_append(self, to: int) -> None:
        self._maybe_send_append(to, send_if_empty=True)

    def _maybe_send_append(self, to: int, send_if_empty: bool) -> bool:
        """Send the entries `to` lacks (or an empty append carrying our commit
        index when send_if_empty). Returns whether a message was sent."""
        progress = self.tracker.progress[to]
        if progress.is_paused():
            return False
        prev_index = progress.next_index - 1
        raft_log = self.log
        try:
            prev_term = raft_log.term(prev_index)
            if progress.next_index <= raft_log.last_index():
                entries = raft_log.entries(progress.next_index, self.max_msg_size)
            else:
                entries = []
        except CompactedError:
            return self._maybe_send_snapshot(to, progress)
        if not entries and not send_if_empty:
            return False
        self._send(
            Message(
                MT.APP,
                to=to,
                from_=self.id,
                term=self.term,
                log_term=prev_term,
                index=prev_index,
                entries=tuple(entries),
                commit=raft_log.committed,
            )
        )
        progress.sent_entries(len(entries), entries[-1].index if entries else prev_index)
        return True

    def _maybe_send_snapshot(self, to: int, progress: Progress) -> bool:
        if not progress.recent_active:
            # Do not ship a (possibly large) snapshot to a node that may be down.
            return False
        try:
            snapshot = self.log.snapshot()
        except SnapshotTemporarilyUnavailable:
            return False
        if snapshot.is_empty():
            raise AssertionError("entries were compacted but there is no snapshot")
        # Send the configuration we have applied, not the one stored with the
        # snapshot: a member added after the snapshot was taken must find
        # itself in it, or it would refuse it and never join (as etcd's
        # server merges its current ConfState into the snapshot it sends).
        # Entries after the snapshot replay over it as no-ops (confchange.py).
        conf_state = self.tracker.conf_state()
        if conf_state != snapshot.metadata.conf_state:
            snapshot = replace(snapshot, metadata=replace(snapshot.metadata, conf_state=conf_state))
        progress.become_snapshot(snapshot.metadata.index)
        log.debug(
            "raft.send_snapshot", extra={"node": self.id, "peer": to, "term": self.term, "index": snapshot.metadata.index}
        )
        self._send(Message(MT.SNAP, to=to, from_=self.id, term=self.term, snapshot=snapshot))
        return True

    def _send_heartbeat(self, to: int, context: bytes) -> None:
        # A follower may not have our log up to our commit index; it may only
        # commit what it is known to hold.
        commit = min(self.tracker.progress[to].match, self.log.committed)
        self._send(Message(MT.HEARTBEAT, to=to, from_=self.id, term=self.term, commit=commit, context=context))

    def _bcast_append(self) -> None:
        for node_id in self.tracker.progress:
            if node_id != self.id:
                self._send_append(node_id)

    def _bcast_commit(self, before: int) -> None:
        """The commit index moved up from `before`: send each follower what
        it lacks. An append that would carry only the new commit index is
        sent when a follower must learn it at once: the newly committed
        entries include a membership change (a removed member learns its
        removal only from the leader, which stops talking to it once the
        change applies) or this term's first entry. Otherwise the next
        append or heartbeat carries it (Raft needs followers to learn the
        commit index for liveness only): one message and one reply less
        per commit, half of a follower's work under load. etcd's raft
        sends it every time."""
        committed = self.log.committed
        urgent = before < self.pending_conf_index <= committed or before < self.term_start_index <= committed
        for node_id in self.tracker.progress:
            if node_id != self.id:
                self._maybe_send_append(node_id, send_if_empty=urgent)

    def _bcast_heartbeat(self, context: bytes | None = None) -> None:
        if context is None:
            context = self.read_only.last_pending_context()
        for node_id in self.tracker.progress:
            if node_id != self.id:
                self._send_heartbeat(node_id, context)

    # --- Commit -----------------------------------------------------------------

    def _maybe_commit(self) -> bool:
        return self.log.maybe_commit(self.tracker.committed(), self.term)

    def _committed_entry_in_current_term(self) -> bool:
        return self.log.term_or_zero(self.log.committed) == self.term

    def on_persisted(self, index: int, term: int) -> None:
        """The driver made entries up to (index, term) durable."""
        self.log.stable_to(index, term)
        if self.role is not StateRole.LEADER or not self.log.match_term(index, term):
            return
        progress = self.tracker.progress.get(self.id)
        if progress is None or not progress.maybe_update(index):
            return
        before = self.log.committed
        if self._maybe_commit():
            self._release_pending_read_index_messages()
            self._bcast_commit(before)

    # --- Role changes -------------------------------------------------------------

    def _reset(self, term: int) -> None:
        if self.term != term:
            self.term = term
            self.vote = NONE
        self.lead = NONE
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = self.election_timeout + self.rng.randrange(self.election_timeout)
        self.quiesced = False
        self._idle_ticks = 0
        self._silent = frozenset()
        self.lead_transferee = NONE
        self.tracker.reset_votes()
        next_index = self.log.last_index() + 1
        max_inflight = self.tracker.max_inflight
        for node_id, old in list(self.tracker.progress.items()):
            progress = Progress(next_index, max_inflight, old.is_learner)
            if node_id == self.id:
                progress.match = self.log.persisted_last_index()
            self.tracker.progress[node_id] = progress
        self.pending_conf_index = 0
        self.term_start_index = 0
        self.uncommitted_size = 0
        self.read_only = ReadOnly()
        self.pending_read_index_messages = []

    def become_follower(self, term: int, lead: int) -> None:
        self._step_role = self._step_follower
        self._reset(term)
        self._tick = self._tick_election
        self.lead = lead
        self.role = StateRole.FOLLOWER

    def become_candidate(self) -> None:
        if self.role is StateRole.LEADER:
            raise AssertionError("leader cannot become candidate")
        self._step_role = self._step_candidate
        self._reset(self.term + 1)
        self._tick = self._tick_election
        self.vote = self.id
        self.role = StateRole.CANDIDATE

    def become_pre_candidate(self) -> None:
        if self.role is StateRole.LEADER:
            raise AssertionError("leader cannot become pre-candidate")
        # Pre-vote changes neither term nor vote: a node that cannot win does
        # not disturb anyone.
        self._step_role = self._step_candidate
        self.tracker.reset_votes()
        self._tick = self._tick_election
        self.lead = NONE
        self.role = StateRole.PRE_CANDIDATE

    def become_leader(self) -> None:
        if self.role is StateRole.FOLLOWER:
            raise AssertionError("follower cannot become leader without an election")
        self._step_role = self._step_leader
        self._reset(self.term)
        self._tick = self._tick_heartbeat
        self.lead = self.id
        self.role = StateRole.LEADER
        own = self.tracker.progress[self.id]
        own.become_replicate()
        own.recent_active = True
        # A conf change may be pending somewhere in the log we inherit: none
        # may be proposed until our own first entry is applied.
        self.term_start_index = self.log.last_index() + 1
        # An empty entry of our term: committing it commits everything before
        # it, and lets ReadIndex trust our commit index.
        if not self._append_entries([Entry(0, 0)]):
            raise AssertionError("empty entry was refused")
        log.info("raft.became_leader", extra={"node": self.id, "term": self.term})

    # --- Campaigns ------------------------------------------------------------------

    def _hup(self, campaign_type: CampaignType) -> None:
        if self.role is StateRole.LEADER or not self.promotable():
            return
        if self._has_unapplied_conf_change():
            # Campaigning could let a node with a stale membership win.
            return
        self._campaign(campaign_type)

    def _has_unapplied_conf_change(self) -> bool:
        if self.log.applied >= self.log.committed:
            return False
        try:
            entries = self.log.slice(max(self.log.applied + 1, self.log.first_index()), self.log.committed + 1)
        except CompactedError:
            return False
        return any(entry.type is EntryType.CONF_CHANGE for entry in entries)

    def _campaign(self, campaign_type: CampaignType) -> None:
        if campaign_type is CampaignType.PRE_ELECTION:
            self.become_pre_candidate()
            vote_type = MT.PRE_VOTE
            # Ask with the term we would have, without taking it.
            term = self.term + 1
        else:
            self.become_candidate()
            vote_type = MT.VOTE
            term = self.term
        result = self._poll(self.id, True)
        if result is VoteResult.WON:
            # A group of one wins at once.
            if campaign_type is CampaignType.PRE_ELECTION:
                self._campaign(CampaignType.ELECTION)
            else:
                self.become_leader()
            return
        last_index = self.log.last_index()
        last_term = self.log.last_term()
        context = CAMPAIGN_TRANSFER if campaign_type is CampaignType.TRANSFER else b""
        for node_id in sorted(self.tracker.voters.ids()):
            if node_id == self.id:
                continue
            self._send(
                Message(
                    vote_type,
                    to=node_id,
                    from_=self.id,
                    term=term,
                    index=last_index,
                    log_term=last_term,
                    context=context,
                )
            )

    def _poll(self, node_id: int, granted: bool) -> VoteResult:
        self.tracker.record_vote(node_id, granted)
        return self.tracker.tally_votes()[2]

    # --- Ticks ---------------------------------------------------------------------------

    def tick(self) -> None:
        if self.quiesced:
            return
        self._tick()

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if self.election_elapsed >= self.randomized_election_timeout and self.promotable():
            self.election_elapsed = 0
            self.step(Message(MT.HUP, from_=self.id))

    def _tick_heartbeat(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.election_timeout:
            self.election_elapsed = 0
            if self.check_quorum:
                self.step(Message(MT.CHECK_QUORUM, from_=self.id))
            if self.role is StateRole.LEADER and self.lead_transferee != NONE:
                # The transfer did not finish within an election timeout.
                self.lead_transferee = NONE
        if self.role is not StateRole.LEADER:
            return
        if self.quiesce_ticks:
            self._idle_ticks = self._idle_ticks + 1 if self._nothing_to_do() else 0
            if self._idle_ticks >= self.quiesce_ticks and self._followers_caught_up():
                self._quiesce()     # instead of this tick's heartbeat
                return
        if self.heartbeat_elapsed >= self.heartbeat_timeout:
            self.heartbeat_elapsed = 0
            self.step(Message(MT.BEAT, from_=self.id))

    # --- Quiescence ----------------------------------------------------------------------------

    def _nothing_to_do(self) -> bool:
        """A leader with nothing to do: every entry committed and applied, no
        change, transfer or read in flight, nothing the driver would propose
        (bindings, promotions)."""
        if self.role is not StateRole.LEADER or self.lead_transferee != NONE:
            return False
        raft_log = self.log
        last = raft_log.last_index()
        if raft_log.committed != last or raft_log.applied < last or self.pending_conf_index > raft_log.applied:
            return False
        if self.pending_read_index_messages or self.read_only.queue:
            return False
        return not (self.incarnations_to_bind() or self.caught_up_learners())

    def _followers_caught_up(self) -> bool:
        """Every follower holds the whole log, except those silent for a whole
        check-quorum window and since (down: when they come back, what they
        send wakes the group); and a majority of voters is not silent."""
        last = self.log.last_index()
        up = 0
        for node_id, progress in self.tracker.progress.items():
            down = node_id in self._silent and not progress.recent_active
            if node_id != self.id and not down and (
                    progress.match != last or progress.state is not ProgressState.REPLICATE):
                return False
            if not down and not progress.is_learner:
                up += 1
        return up >= len(self.tracker.voters.ids()) // 2 + 1

    def _quiesce(self) -> None:
        self.quiesced = True
        self._idle_ticks = 0
        last, last_term = self.log.last_index(), self.log.last_term()
        log.debug("raft.quiesced", extra={"node": self.id, "term": self.term, "index": last})
        for node_id in self.tracker.progress:
            if node_id != self.id:
                self._send(Message(MT.QUIESCE, to=node_id, from_=self.id, term=self.term, index=last,
                                   log_term=last_term, commit=self.log.committed))

    def _wakes(self, m: Message) -> bool:
        """Whether `m` wakes this quiesced node: anything that brings news.
        Not the QUIESCE itself, nor what was sent before it and arrives after
        it (the network reorders and duplicates): on a leader, acknowledgements
        of what a follower already acknowledged (a follower that wants the
        leader awake says so: a HEARTBEAT_RESP with reject); on a follower,
        its leader's heartbeats and appends that carry nothing it lacks. A
        follower wakes for a link failure only if it is its leader's."""
        mtype = m.type
        if mtype is MT.QUIESCE:
            return False
        if self.role is StateRole.LEADER:
            if mtype is MT.HEARTBEAT_RESP:
                return m.reject
            if mtype is MT.APP_RESP and m.term == self.term and not m.reject:
                progress = self.tracker.progress.get(m.from_)
                return progress is None or m.index > progress.match
            return True
        if mtype is MT.UNREACHABLE:
            return m.from_ == self.lead
        if m.from_ == self.lead and m.term == self.term and m.commit <= self.log.committed:
            if mtype is MT.HEARTBEAT:
                return bool(m.context)
            if mtype is MT.APP:
                last = m.entries[-1] if m.entries else None
                held = self.log.match_term(last.index, last.term) if last else self.log.match_term(m.index, m.log_term)
                return not held
        return True

    def _wake(self, m: Message) -> None:
        """Something happened in a quiesced group: tick again. A leader tells
        its followers at once (a heartbeat); a follower woken by anything but
        its leader tells the leader, so that the leader's heartbeats keep
        the group's other followers from campaigning."""
        self.quiesced = False
        self._idle_ticks = 0
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        # Who was silent before we quiesced says nothing now: quiescing again
        # waits for every follower, or for a whole window of silence.
        self._silent = frozenset()
        if self.role is StateRole.LEADER:
            self._bcast_heartbeat()
        elif self.lead not in (NONE, m.from_) and m.type is not MT.UNREACHABLE:
            self._send(Message(MT.HEARTBEAT_RESP, to=self.lead, from_=self.id, term=self.term, reject=True))

    def _handle_quiesce(self, m: Message) -> None:
        """The leader says the group has nothing to do. Quiesce if we hold its
        last entry (then its commit index is ours too); otherwise ask it for
        what we lack."""
        if self.log.match_term(m.index, m.log_term) and m.commit <= m.index:
            self.log.commit_to(m.commit)
            self.quiesced = True
            self._idle_ticks = 0
        else:
            self._send(Message(MT.HEARTBEAT_RESP, to=m.from_, from_=self.id, term=self.term, reject=True))

    # --- Step ------------------------------------------------------------------------------

    def step(self, m: Message) -> None:
        """Process one message. Raises ProposalDropped for a PROPOSE (or a local
        READ_INDEX) this node cannot take."""
        if m.type not in LOCAL_MESSAGES and not self._recognises(m):
            return
        if m.type is MT.NOTICE:
            self._handle_notice(m)
            return
        if self.quiesced and self._wakes(m):
            self._wake(m)
        if m.term == 0:
            pass  # local message, or a forwarded READ_INDEX
        elif m.term > self.term:
            if m.type is MT.VOTE or m.type is MT.PRE_VOTE:
                force = m.context == CAMPAIGN_TRANSFER
                in_lease = (
                    self.check_quorum and self.lead != NONE and self.election_elapsed < self.election_timeout
                )
                if not force and in_lease:
                    # We heard from a leader within the election timeout: this
                    # campaign comes from a node that is cut off, ignore it.
                    return
            if m.type is MT.PRE_VOTE:
                pass  # never change term for a pre-vote
            elif m.type is MT.PRE_VOTE_RESP and not m.reject:
                pass  # the term in a granted pre-vote is the one we will campaign in
            elif m.type is MT.APP or m.type is MT.HEARTBEAT or m.type is MT.SNAP or m.type is MT.QUIESCE:
                self.become_follower(m.term, m.from_)
            else:
                self.become_follower(m.term, NONE)
        elif m.term < self.term:
            if (self.check_quorum or self.pre_vote) and m.type in (MT.HEARTBEAT, MT.APP, MT.QUIESCE):
                # A stale leader (cut off, then back) learns our term from this
                # and steps down; without it, it could keep our pre-votes failing.
                self._send(Message(MT.APP_RESP, to=m.from_, from_=self.id, term=self.term))
            elif m.type is MT.PRE_VOTE:
                self._send(Message(MT.PRE_VOTE_RESP, to=m.from_, from_=self.id, term=self.term, reject=True))
            return

        if m.type is MT.HUP:
            self._hup(CampaignType.PRE_ELECTION if self.pre_vote else CampaignType.ELECTION)
        elif m.type is MT.VOTE or m.type is MT.PRE_VOTE:
            self._handle_vote_request(m)
        else:
            self._step_role(m)

    def _recognises(self, m: Message) -> bool:
        """Whether a peer's message may be looked at; if not, it is dropped
        before its term can touch ours, and the sender is told why.

        - A node that applied its own removal is out of the group: it hears
          nothing (a process that lost another member's disk must not find a
          voter here).
        - A removed member never disrupts the group again: whatever it sends
          (a campaign at a higher term, a stale leader's appends) is dropped
          and answered with a NOTICE, so that it learns its removal even if
          it missed the commit. The one exception is the TIMEOUT_NOW a leader
          sends as it steps down after its own removal (we may have applied
          the removal first), at a term we already have: it only starts an
          ordinary election, which needs our log to win votes.
        - A bound member whose message carries another incarnation lost its
          disk: its vote and its acknowledgements were forgotten with it, so
          nothing it sends counts; it is told (NOTICE), and what a leader
          knew of its log is forgotten too (Progress.forget). An unknown
          incarnation (0) is not checked.

        Invariant: no message from a removed id, nor from an incarnation other
        than the one bound to its id, ever reaches the role step functions.
        """
        sender = m.from_
        if self.is_removed():
            return False
        tracker = self.tracker
        if sender in tracker.removed:
            if m.type is MT.TIMEOUT_NOW and m.term <= self.term:
                return True
            self._send_notice(m, NoticeReason.REMOVED, 0)
            return False
        if not m.incarnation:
            return True
        bound = self._other_incarnation_bound(m)
        if bound:
            self._send_notice(m, NoticeReason.REINCARNATED, bound)
            progress = tracker.progress.get(sender)
            if self.role is StateRole.LEADER and progress is not None and sender != self.id:
                progress.forget()
            return False
        if sender in tracker.progress and sender not in tracker.incarnations:
            self.heard_incarnations[sender] = m.incarnation
        return True

    def _other_incarnation_bound(self, m: Message) -> int:
        """The incarnation bound to the sender's id if it is not the one the
        message carries, else 0."""
        bound = self.tracker.incarnations.get(m.from_, 0)
        return bound if bound and bound != m.incarnation else 0

    def _send_notice(self, m: Message, reason: NoticeReason, bound: int) -> None:
        if m.type is MT.NOTICE:
            return  # never answer a notice with a notice
        log.debug("raft.notice_sent", extra={"node": self.id, "peer": m.from_, "reason": reason.value})
        self._send(Message(MT.NOTICE, to=m.from_, from_=self.id, index=bound, context=reason.value.encode()))

    def _handle_notice(self, m: Message) -> None:
        """A member does not recognise us. Kept (the first one) for the
        driver, and from now on we never campaign: our id is removed, or the
        group counts another incarnation's promises under it. A notice meant
        for another incarnation of our id (the one bound is ours, or we never
        said which we are) changes nothing."""
        reason = NoticeReason.parse(m.context)
        if reason is None or self.notice is not None:
            return
        if reason is NoticeReason.REINCARNATED and (not self.incarnation or m.index == self.incarnation):
            return
        self.notice = Notice(m.from_, reason, m.index)
        log.warning("raft.not_recognised", extra={"node": self.id, "term": self.term, "peer": m.from_,
                                                   "reason": reason.value})
        if self.role is not StateRole.FOLLOWER:
            self.become_follower(self.term, NONE)

    def incarnations_to_bind(self) -> tuple[tuple[int, int], ...]:
        """On the leader: (node id, incarnation) of members the group has not
        bound yet whose incarnation is known (its own, and those it heard
        from), in id order; the driver proposes ConfChange.bind for them one
        at a time (as it does promotions). Empty on any other node."""
        if self.role is not StateRole.LEADER:
            return ()
        heard = dict(self.heard_incarnations)
        if self.incarnation:
            heard[self.id] = self.incarnation
        bound = self.tracker.incarnations
        members = self.tracker.progress
        return tuple(sorted((node_id, incarnation) for node_id, incarnation in heard.items()
                            if node_id in members and node_id not in bound))

    def _handle_vote_request(self, m: Message) -> None:
        can_vote = (
            self.vote == m.from_
            or (self.vote == NONE and self.lead == NONE)
            or (m.type is MT.PRE_VOTE and m.term > self.term)
        )
        response_type = vote_response_type(m.type)
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            # The response carries the request's term so the candidate counts it.
            self._send(Message(response_type, to=m.from_, from_=self.id, term=m.term))
            if m.type is MT.VOTE:
                self.election_elapsed = 0
                self.vote = m.from_
        else:
            self._send(Message(response_type, to=m.from_, from_=self.id, term=self.term, reject=True))

    # --- Leader -----------------------------------------------------------------------------

    def _step_leader(self, m: Message) -> None:
        mtype = m.type
        if mtype is MT.BEAT:
            self._bcast_heartbeat()
            return
        if mtype is MT.CHECK_QUORUM:
            if not self.tracker.quorum_active():
                # The leader cannot reach a majority: it steps down; the group stops serving.
                log.warning("raft.lost_quorum", extra={"node": self.id, "term": self.term})
                self.become_follower(self.term, NONE)
            self._silent = frozenset(node_id for node_id, progress in self.tracker.progress.items()
                                     if node_id != self.id and not progress.recent_active)
            for node_id, progress in self.tracker.progress.items():
                if node_id != self.id:
                    progress.recent_active = False
            return
        if mtype is MT.PROPOSE:
            self._idle_ticks = 0
            self._propose(m.entries)
            return
        if mtype is MT.READ_INDEX:
            self._idle_ticks = 0
            self._leader_read_index(m)
            return

        progress = self.tracker.progress.get(m.from_)
        if progress is None:
            return
        if mtype is MT.APP_RESP:
            self._handle_append_response(m, progress)
        elif mtype is MT.HEARTBEAT_RESP:
            self._handle_heartbeat_response(m, progress)
        elif mtype is MT.SNAP_STATUS:
            if progress.state is not ProgressState.SNAPSHOT:
                return
            if m.reject:
                progress.pending_snapshot = 0
            progress.become_probe()
            # Wait for a heartbeat response before probing again.
            progress.probe_sent = True
        elif mtype is MT.UNREACHABLE:
            if progress.state is ProgressState.REPLICATE:
                progress.become_probe()
        elif mtype is MT.TRANSFER_LEADER:
            self._handle_transfer_leader(m, progress)

    def _propose(self, entries: Sequence[Entry]) -> None:
        if not entries:
            raise AssertionError("empty proposal")
        if self.id not in self.tracker.progress:
            raise ProposalDropped("this node was removed from the group", leader=NONE)
        if self.lead_transferee != NONE:
            raise ProposalDropped("leadership transfer in progress", leader=NONE)
        conf_change_at = None
        for offset, entry in enumerate(entries):
            if entry.type is EntryType.CONF_CHANGE:
                if conf_change_at is not None:
                    raise ProposalDropped("one membership change per proposal", leader=self.id)
                self._check_conf_change_proposal(entry)
                conf_change_at = self.log.last_index() + 1 + offset
        if not self._append_entries(entries):
            raise ProposalDropped("too many uncommitted bytes; retry later", leader=self.id)
        if conf_change_at is not None:
            self.pending_conf_index = conf_change_at
        self._bcast_append()

    def _check_conf_change_proposal(self, entry: Entry) -> None:
        """Refuse a change now rather than commit one that cannot apply:
        ProposalDropped when it may be retried later, InvalidConfChange when
        it can never apply to the current configuration."""
        try:
            change = ConfChange.decode(entry.data)
        except ValueError as exc:
            raise InvalidConfChange(f"undecodable configuration change: {exc}") from None
        if self._conf_change_pending():
            raise ProposalDropped(
                f"another membership change (index {self.pending_conf_index}) is still in progress", leader=self.id
            )
        if not self._applied_entry_of_current_term():
            raise ProposalDropped(
                "no membership change before this leader has committed and applied an entry of its term",
                leader=self.id,
            )
        # Nothing is in flight, so the applied configuration is the one this
        # change will apply to.
        confchange.check(self.tracker.conf_state(), change)
        if change.type is ConfChangeType.ADD_NODE and not self._learner_caught_up(change.node_id):
            progress = self.tracker.progress[change.node_id]
            raise ProposalDropped(
                f"learner {change.node_id} has not caught up (match {progress.match}, commit {self.log.committed})",
                leader=self.id,
            )

    def _conf_change_pending(self) -> bool:
        """Whether a change this leader proposed is not yet applied here."""
        return self.pending_conf_index > self.log.applied

    def _applied_entry_of_current_term(self) -> bool:
        return self.term_start_index > 0 and self.log.applied >= self.term_start_index

    def _learner_caught_up(self, node_id: int) -> bool:
        progress = self.tracker.progress.get(node_id)
        return progress is not None and confchange.learner_caught_up(progress, self.log.committed)

    def caught_up_learners(self) -> tuple[int, ...]:
        """Learners a leader would promote now (empty unless leader)."""
        if self.role is not StateRole.LEADER:
            return ()
        return tuple(sorted(node_id for node_id in self.tracker.learners if self._learner_caught_up(node_id)))

    def is_removed(self) -> bool:
        return self.id in self.tracker.removed

    def _append_entries(self, entries: Sequence[Entry]) -> bool:
        last_index = self.log.last_index()
        term = self.term
        stamped = [Entry(term, last_index + 1 + i, e.data, e.type) for i, e in enumerate(entries)]
        size = sum(map(len, map(_data, stamped)))
        if (
            self.max_uncommitted_size
            and self.uncommitted_size > 0
            and size > 0
            and self.uncommitted_size + size > self.max_uncommitted_size
        ):
            return False
        self.uncommitted_size += size
        self.log.append(stamped)
        return True

    def reduce_uncommitted_size(self, entries: Sequence[Entry]) -> None:
        if self.role is not StateRole.LEADER:
            return
        size = sum(map(len, map(_data, entries)))
        self.uncommitted_size = max(0, self.uncommitted_size - size)

    def _leader_read_index(self, m: Message) -> None:
        if self.tracker.is_singleton():
            self._respond_to_read_index(m, self.log.committed)
            return
        if not self._committed_entry_in_current_term():
            self.pending_read_index_messages.append(m)
            return
        self._start_read_index(m)

    def _start_read_index(self, m: Message) -> None:
        self.read_only.add_request(self.log.committed, m)
        self.read_only.recv_ack(self.id, m.context)
        self._bcast_heartbeat(m.context)

    def _release_pending_read_index_messages(self) -> None:
        if not self.pending_read_index_messages or not self._committed_entry_in_current_term():
            return
        pending, self.pending_read_index_messages = self.pending_read_index_messages, []
        for m in pending:
            self._start_read_index(m)

    def _respond_to_read_index(self, request: Message, index: int) -> None:
        if request.from_ == NONE or request.from_ == self.id:
            self.read_states.append(ReadState(index, request.context))
        else:
            self._send(
                Message(MT.READ_INDEX_RESP, to=request.from_, from_=self.id, term=self.term, index=index, context=request.context)
            )

    def _handle_append_response(self, m: Message, progress: Progress) -> None:
        progress.recent_active = True
        if m.reject:
            next_probe = m.reject_hint
            if m.log_term > 0:
                # Skip every entry of ours whose term is above the follower's
                # term at the hint: they cannot match (fast backtracking).
                next_probe, _ = self.log.find_conflict_by_term(m.reject_hint, m.log_term)
            if progress.maybe_decrease_to(m.index, next_probe):
                if progress.state is ProgressState.REPLICATE:
                    progress.become_probe()
                self._send_append(m.from_)
            return
        if not (progress.maybe_update(m.index) or (progress.match == m.index and progress.state is ProgressState.PROBE)):
            return
        if progress.state is ProgressState.PROBE:
            progress.become_replicate()
        elif progress.state is ProgressState.SNAPSHOT and progress.match + 1 >= self.log.first_index():
            progress.become_probe()
            progress.become_replicate()
        elif progress.state is ProgressState.REPLICATE:
            progress.inflights.free_le(m.index)
        before = self.log.committed
        if self._maybe_commit():
            self._release_pending_read_index_messages()
            self._bcast_commit(before)
        # Flow control may have opened: send what fits.
        while self._maybe_send_append(m.from_, send_if_empty=False):
            pass
        if m.from_ == self.lead_transferee and progress.match == self.log.last_index():
            self._send(Message(MT.TIMEOUT_NOW, to=m.from_, from_=self.id, term=self.term))

    def _handle_heartbeat_response(self, m: Message, progress: Progress) -> None:
        progress.recent_active = True
        progress.probe_sent = False
        if progress.state is ProgressState.REPLICATE and progress.inflights.full():
            # An ack may have been lost; free a slot so replication cannot stall.
            progress.inflights.free_first_one()
        if progress.match < self.log.last_index():
            self._send_append(m.from_)
        if not m.context:
            return
        acks = self.read_only.recv_ack(m.from_, m.context)
        if acks is None or self.tracker.voters.vote_result(acks) is not VoteResult.WON:
            return
        for status in self.read_only.advance(m.context):
            self._respond_to_read_index(status.request, status.index)

    def _handle_transfer_leader(self, m: Message, progress: Progress) -> None:
        if progress.is_learner:
            return
        transferee = m.from_
        if self.lead_transferee != NONE:
            if self.lead_transferee == transferee:
                return
            self.lead_transferee = NONE
        if transferee == self.id:
            return
        # The transfer must finish within an election timeout.
        self.election_elapsed = 0
        self.lead_transferee = transferee
        log.info("raft.transfer_leader", extra={"node": self.id, "term": self.term, "peer": transferee})
        if progress.match == self.log.last_index():
            self._send(Message(MT.TIMEOUT_NOW, to=transferee, from_=self.id, term=self.term))
        else:
            self._send_append(transferee)

    # --- Candidate ------------------------------------------------------------------------------

    def _step_candidate(self, m: Message) -> None:
        mtype = m.type
        if mtype is MT.PROPOSE:
            raise ProposalDropped("no leader (election in progress)", leader=NONE)
        if mtype is MT.READ_INDEX:
            if m.from_ == NONE:
                raise ProposalDropped("no leader (election in progress)", leader=NONE)
            return
        if mtype is MT.APP:
            self.become_follower(m.term, m.from_)
            self._handle_append_entries(m)
        elif mtype is MT.HEARTBEAT:
            self.become_follower(m.term, m.from_)
            self._handle_heartbeat(m)
        elif mtype is MT.QUIESCE:
            self.become_follower(m.term, m.from_)
            self._handle_quiesce(m)
        elif mtype is MT.SNAP:
            self.become_follower(m.term, m.from_)
            self._handle_snapshot(m)
        elif mtype is (MT.PRE_VOTE_RESP if self.role is StateRole.PRE_CANDIDATE else MT.VOTE_RESP):
            result = self._poll(m.from_, not m.reject)
            if result is VoteResult.WON:
                if self.role is StateRole.PRE_CANDIDATE:
                    self._campaign(CampaignType.ELECTION)
                else:
                    self.become_leader()
                    self._bcast_append()
            elif result is VoteResult.LOST:
                # A pre-vote loss changes no term; a vote loss keeps the new one.
                self.become_follower(self.term, NONE)

    # --- Follower -------------------------------------------------------------------------------

    def _step_follower(self, m: Message) -> None:
        mtype = m.type
        if mtype is MT.PROPOSE:
            raise ProposalDropped("not the leader", leader=self.lead)
        if mtype is MT.APP:
            self.election_elapsed = 0
            self.lead = m.from_
            self._handle_append_entries(m)
        elif mtype is MT.HEARTBEAT:
            self.election_elapsed = 0
            self.lead = m.from_
            self._handle_heartbeat(m)
        elif mtype is MT.QUIESCE:
            self.election_elapsed = 0
            self.lead = m.from_
            self._handle_quiesce(m)
        elif mtype is MT.SNAP:
            self.election_elapsed = 0
            self.lead = m.from_
            self._handle_snapshot(m)
        elif mtype is MT.TRANSFER_LEADER:
            if self.lead != NONE:
                self._send(replace(m, to=self.lead, term=self.term))
        elif mtype is MT.TIMEOUT_NOW:
            # Asked by the leader to take over: skip pre-vote and campaign now.
            self._hup(CampaignType.TRANSFER)
        elif mtype is MT.READ_INDEX:
            if self.lead == NONE:
                if m.from_ == NONE:
                    raise ProposalDropped("no leader known", leader=NONE)
                return
            # The leader confirms the index; we serve the read once applied.
            self._send(replace(m, to=self.lead, from_=m.from_ or self.id))
        elif mtype is MT.READ_INDEX_RESP:
            self.read_states.append(ReadState(m.index, m.context))

    def _handle_append_entries(self, m: Message) -> None:
        raft_log = self.log
        if m.index < raft_log.committed:
            self._send(Message(MT.APP_RESP, to=m.from_, from_=self.id, term=self.term, index=raft_log.committed))
            return
        last_new_index = raft_log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if last_new_index is not None:
            self._send(Message(MT.APP_RESP, to=m.from_, from_=self.id, term=self.term, index=last_new_index))
            return
        # Tell the leader where our logs may agree: the last index <= its probe
        # whose term is <= its term there.
        hint_index, hint_term = raft_log.find_conflict_by_term(min(m.index, raft_log.last_index()), m.log_term)
        self._send(
            Message(
                MT.APP_RESP,
                to=m.from_,
                from_=self.id,
                term=self.term,
                index=m.index,
                reject=True,
                reject_hint=hint_index,
                log_term=hint_term,
            )
        )

    def _handle_heartbeat(self, m: Message) -> None:
        if m.commit <= self.log.last_index():
            self.log.commit_to(m.commit)
        elif m.commit > self.log.committed:
            # The leader believes we hold its log up to m.commit, and we hold
            # less: our log was lost (a wiped disk under our id; etcd panics
            # here). Committing what we do hold could commit entries that are
            # not the leader's, so only an append (which checks that logs
            # match) moves our commit index now.
            log.warning("raft.commit_beyond_log", extra={"node": self.id, "term": self.term, "peer": m.from_,
                                                         "commit": m.commit, "last_index": self.log.last_index()})
        self._send(Message(MT.HEARTBEAT_RESP, to=m.from_, from_=self.id, term=self.term, context=m.context))

    def _handle_snapshot(self, m: Message) -> None:
        snapshot = m.snapshot
        if snapshot is not None and self._restore(snapshot):
            log.info(
                "raft.restore_snapshot",
                extra={"node": self.id, "term": self.term, "index": snapshot.metadata.index},
            )
            index = self.log.last_index()
        else:
            index = self.log.committed
        self._send(Message(MT.APP_RESP, to=m.from_, from_=self.id, term=self.term, index=index))

    def _restore(self, snapshot: Snapshot) -> bool:
        meta = snapshot.metadata
        if meta.index <= self.log.committed:
            return False
        conf = meta.conf_state
        if self.id not in conf.ids() or self.id in conf.removed:
            # A snapshot of a membership we are not in: not ours to install.
            return False
        if self.log.match_term(meta.index, meta.term):
            # We already hold that entry: just move the commit index forward.
            self.log.commit_to(meta.index)
            return False
        self.log.restore(snapshot)
        self.tracker.apply_conf_state(conf, self.log.last_index() + 1)
        return True

    # --- Membership -----------------------------------------------------------------------------

    def apply_conf_change(self, change: ConfChange) -> ConfState:
        """Apply a committed change (the driver calls this when its entry is
        applied). Never raises: an invalid committed change is a logged no-op,
        the same on every replica (confchange.apply_committed)."""
        conf, refusal = confchange.apply_committed(self.tracker.conf_state(), change)
        if refusal is not None:
            # A replay over a newer configuration (after a snapshot, or on a
            # node that joined) is routine; anything else is worth a warning.
            level = logging.DEBUG if confchange.already_applied(conf, change) else logging.WARNING
            log.log(
                level,
                "raft.conf_change_ignored",
                extra={"node": self.id, "term": self.term, "change": change.describe(), "reason": refusal},
            )
            return conf
        confchange.switch_tracker(self.tracker, conf, max(self.log.last_index(), 1))
        log.info("raft.conf_change_applied", extra={"node": self.id, "term": self.term, "change": change.describe()})
        if self.id not in self.tracker.progress:
            self._on_removed()
        if self.role is StateRole.LEADER:
            if self.lead_transferee != NONE and not self.tracker.is_voter(self.lead_transferee):
                self.lead_transferee = NONE
            before = self.log.committed
            if self._maybe_commit():
                self._release_pending_read_index_messages()
                self._bcast_commit(before)
            else:
                for node_id in self.tracker.progress:
                    if node_id != self.id:
                        self._maybe_send_append(node_id, send_if_empty=False)
        return conf

    def _on_removed(self) -> None:
        """This node applied its own removal. A leader steps down (etcd's
        StepDownOnRemoval), first telling the most up-to-date remaining voter
        to campaign at once so the group does not wait out an election
        timeout (the driver should have transferred leadership before
        proposing the removal; this is the fallback). A removed node is no
        longer promotable: it never campaigns again."""
        log.info("raft.removed", extra={"node": self.id, "term": self.term})
        if self.role is StateRole.LEADER:
            last = self.log.last_index()
            ready = [
                (progress.match, node_id)
                for node_id, progress in self.tracker.progress.items()
                if self.tracker.is_voter(node_id) and progress.match == last and progress.recent_active
            ]
            if ready:
                self._send(Message(MT.TIMEOUT_NOW, to=max(ready)[1], from_=self.id, term=self.term))
            self.become_follower(self.term, NONE)
        elif self.role is not StateRole.FOLLOWER:
            self.become_follower(self.term, NONE)
