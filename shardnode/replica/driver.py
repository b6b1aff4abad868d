"""The driver of one Raft group member: it turns the pure core into a durable,
networked replica.

One asyncio task owns the core. It follows the Ready contract
(shardnode/raft/rawnode.py): persist (one synced RocksDB batch per Ready —
group commit for every proposal and message that arrived meanwhile), send,
apply (one atomic batch with the applied index and the session table),
advance. Ticks come from a timer task; peer messages from the transport.

A write() call waits on one future, found from each of its entries' log
indexes and answered when the last of them is applied. read_barrier() calls
that arrive together share one ReadIndex round, which the ready loop starts
once for all of them; they are answered when the applied index reaches the
confirmed read point. A write whose index is taken by another leader's entry is
answered as definitely-not-applied; a write still pending when this node
loses leadership is answered Unavailable with an unknown outcome, which the
router resolves by retrying with the same session (applied at most once).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import time
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from ..config import METADATA_GROUP, ClusterConfig, Replica, group_label
from ..errors import DeadlineExceeded, NotLeader, Unavailable
from ..raft import (
    NONE,
    ConfChange,
    ConfState,
    Config,
    EntryType,
    InvalidConfChange,
    Message,
    MessageType,
    ProposalDropped,
    RaftError,
    RawNode,
    Ready,
    StateRole,
)
from ..failstop import FailStop, describe
from ..placement.initial_placement import INITIAL_PLACEMENT_KEY, InitialPlacement
from ..placement.shard_map import initial_ownership
from ..futures import settle
from ..limits import refuse
from ..storage import ApplyResult, Command, ReplicaStore, StorageFault, StoreBusy, encode_command
from ..storage.etcd_ops import RangeOp, RangeResponse
from .lease_clock import LeaseClock
from .watch_hub import WatchHub
from ..storage import fencing
from ..storage.shard_commands import ShardResult
from ..transport import RaftTransport, SnapshotHeader
from . import shape_policy
from .peer_security import transport_security
from .metrics import WorkerMetrics

log = logging.getLogger("shardnode.replica")


@dataclass(slots=True)
class _PendingWrite:
    term: int
    future: asyncio.Future


@dataclass(slots=True)
class _PendingBatch:
    """One write() call: `count` consecutive entries of `term`, answered
    with one future once the last of them is applied (one wake-up per call,
    not one per entry)."""

    term: int
    count: int
    future: asyncio.Future
    results: list = field(default_factory=list)


@dataclass
class ReplicaStats:
    elections_started: int = 0
    elections_won: int = 0
    leader_changes: int = 0
    snapshots_sent: int = 0
    snapshots_send_failed: int = 0
    snapshots_received: int = 0
    snapshots_taken: int = 0
    snapshot_send_seconds: float = 0.0       # total time spent streaming snapshots out
    snapshot_receive_seconds: float = 0.0    # total time spent receiving and staging them
    messages_rejected: int = 0


class ReplicaDriver:
    def __init__(
        self,
        cluster: ClusterConfig,
        replica: Replica,
        store: ReplicaStore,
        rng: random.Random | None = None,
        fail_stop: FailStop | None = None,
    ) -> None:
        self.cluster = cluster
        self.replica = replica
        self.group = replica.group
        self.node_id = replica.node_id
        self._log_extra = {"group": group_label(self.group), "node": self.node_id}
        self.store = store
        store.configure_ownership(initial_ownership(cluster.groups, cluster.virtual_nodes, self.group,
                                                    metadata=self.group == METADATA_GROUP))
        self.stats = ReplicaStats()
        # Every member's worker address and host name, as the applied
        # configuration says (followed as membership changes apply).
        self.addresses: dict[int, str] = {}
        self.member_hosts: dict[int, str] = {}
        self._follow_membership(store.conf_state)
        timing = cluster.timing
        identity = store.identity
        config = Config(
            id=self.node_id,
            election_tick=timing.election_ticks,
            heartbeat_tick=timing.heartbeat_ticks,
            quiesce_ticks=timing.quiesce_ticks,
            applied=store.applied_index,
            max_size_per_msg=1 << 20,
            max_inflight_msgs=256,
            incarnation=identity.incarnation,
        )
        self.node = RawNode(config, store, rng)
        self.transport = RaftTransport(
            cluster=cluster.name,
            group=self.group,
            node_id=self.node_id,
            peers={nid: addr for nid, addr in self.addresses.items() if nid != self.node_id},
            removed=store.conf_state.removed,
            cluster_id=identity.cluster_id,
            group_incarnation=identity.group_incarnation,
            incarnation=identity.incarnation,
            deliver=self._on_messages,
            on_unreachable=self._on_unreachable,
            on_snapshot=self._on_snapshot_stream,
            max_frame_bytes=cluster.limits.max_frame_bytes,
            # With TLS, frames from node N must come with N's host certificate:
            # the transport reads member_hosts, which follows the membership.
            **transport_security(cluster, replica.host.name, self.member_hosts),
        )
        self.metrics = WorkerMetrics(self.group, self.node_id)
        # The etcd leases' deadlines while this replica leads (the metadata group's only).
        self.lease_clock = LeaseClock()
        # Recent changes for the etcd API's watches.
        self.watch_hub = WatchHub(store.revision)
        store.on_changes = self.watch_hub.publish
        self.metrics.bind(self)
        self._wake = asyncio.Event()
        # Set while the core ticks; clear while the group is quiesced (the tick loop waits on it).
        self._ticking = asyncio.Event()
        self._ticking.set()
        self._persist_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"persist-g{self.group}")
        self._tasks: list[asyncio.Task] = []
        self._snapshot_tasks: set[asyncio.Task] = set()
        # Every entry index of a write() still waiting -> its batch.
        self._pending_writes: dict[int, _PendingBatch] = {}
        # read_barrier() callers waiting for the next ReadIndex round, which
        # the ready loop starts once for all of them.
        self._queued_reads: list[asyncio.Future] = []
        self._pending_reads: dict[bytes, list[asyncio.Future]] = {}
        self._ready_reads: list[tuple[int, list[asyncio.Future]]] = []
        # Read contexts are unique across restarts: a random incarnation prefix.
        self._read_prefix = self.node_id.to_bytes(8, "big") + os.urandom(8)
        self._read_ids = itertools.count(1)
        self._role = StateRole.FOLLOWER
        self._leader = NONE
        self._stopping = False
        self._pending_conf: dict[int, _PendingWrite] = {}
        # When each peer's last message arrived (monotonic): who is live, for the shape policy.
        self._last_heard: dict[int, float] = {}
        # Set once this replica applied its own removal: it serves nothing
        # more, and its process retires its data and exits.
        self.removed = asyncio.Event()
        # Set when a member told this replica it does not recognise it
        # (RawNode.notice: removed, or another incarnation is bound to its
        # id); its process decides (server.py).
        self.disowned = asyncio.Event()
        # Tripped by any fault of the essential work (persist, apply, the
        # ready and tick loops, a broken invariant): from then on this
        # replica acknowledges nothing, and its process exits.
        self.fail_stop = fail_stop if fail_stop is not None else FailStop(log, self._log_extra)

    # --- Lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        await self.transport.start()
        self._tasks.append(asyncio.create_task(self._tick_loop(), name=f"tick-g{self.group}"))
        self._tasks.append(asyncio.create_task(self._ready_loop(), name=f"ready-g{self.group}"))
        self.fail_stop.watch(self._tasks[0], "the tick loop")
        self.fail_stop.watch(self._tasks[1], "the ready loop")
        if self.group == METADATA_GROUP:
            self._learn_cluster_identity()
        self._wake.set()
        log.info(
            "replica.started",
            extra={**self._log_extra, "term": self.node.raft.term, "applied": self.store.applied_index,
                   "last_index": self.store.last_index()},
        )

    async def stop(self) -> None:
        self._stopping = True
        self.fail_stop.stopping = True
        for task in [*self._tasks, *self._snapshot_tasks]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._snapshot_tasks, return_exceptions=True)
        self._tasks.clear()
        self._fail_all(Unavailable("replica is shutting down"))
        await self.transport.close()
        self._persist_thread.shutdown(wait=True)

    async def transfer_leadership(self, timeout: float, target: int = NONE) -> bool:
        """If leader, hand leadership to `target` (default: the most
        up-to-date active follower) and wait, up to timeout, until someone
        else leads. Used by a clean shutdown and by the TransferLeader RPC."""
        status = self.node.status()
        if status.role is not StateRole.LEADER:
            return True
        if target == NONE:
            followers = [(p.match, nid) for nid, p in status.progress.items()
                         if nid != self.node_id and p.recent_active]
            if not followers:
                return False
            _, target = max(followers)
        log.info("replica.transfer_leadership", extra={**self._log_extra, "term": status.term, "peer": target})
        self.node.transfer_leader(target)
        self._wake.set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(self.cluster.timing.tick_seconds / 2)
            if self.node.raft.role is not StateRole.LEADER and self.node.raft.lead not in (NONE, self.node_id):
                return True
        return False

    # --- Client-facing operations ----------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self.node.raft.role is StateRole.LEADER and not self.fail_stop.failed

    def _check_serving(self) -> None:
        if self.fail_stop.failed:
            raise Unavailable(f"replica stopped after a fault: {self.fail_stop.reason}")
        if self.removed.is_set():
            raise Unavailable(f"node {self.node_id} was removed from group {self.group}")

    def _fault(self, exc: BaseException, what: str) -> None:
        """Trip fail-stop for a fault in essential work, and fail every
        waiting request (their outcome is unknown: nothing more is acked)."""
        self.fail_stop.trip(f"{what}: {describe(exc)}")
        self._fail_all(Unavailable("replica stopped after a fault; outcome unknown, retry"))

    def leader_hint(self) -> tuple[int, str]:
        lead = self.node.raft.lead
        return lead, self.addresses.get(lead, "")

    def _not_leader(self, leader: int | None = None) -> Unavailable:
        lead = self.node.raft.lead if leader is None else leader
        if lead in (NONE, self.node_id):
            # No leader known: an election is running, or this side of a
            # partition has no quorum. Nothing was proposed.
            return Unavailable("no leader: an election is in progress or the group has no quorum")
        return NotLeader("not the leader", lead, self.addresses.get(lead, ""))

    async def write(self, commands: Sequence[Command], timeout: float) -> list[ApplyResult]:
        """Propose commands as one batch; return their results once applied here."""
        return await self.propose([encode_command(c) for c in commands], timeout)  # type: ignore[return-value]

    async def propose(self, datas: list[bytes], timeout: float) -> list[ApplyResult | ShardResult]:
        """Propose encoded commands (client or shard commands) as one batch;
        return their results once applied here."""
        self._check_serving()
        if not self.is_leader:
            raise self._not_leader()
        loop = asyncio.get_running_loop()
        try:
            proposal = self.node.propose_batch(datas)
        except ProposalDropped as exc:
            if exc.leader == self.node_id:
                raise Unavailable(str(exc)) from None   # e.g. too much uncommitted: back off
            raise self._not_leader(exc.leader) from None
        self.metrics.proposals.inc(len(datas))
        self.metrics.proposal_batch.observe(len(datas))
        batch = _PendingBatch(proposal.term, proposal.count, loop.create_future())
        for index in range(proposal.index, proposal.index + proposal.count):
            self._pending_writes[index] = batch
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                return await batch.future
        except TimeoutError:
            raise DeadlineExceeded("the write did not commit before its deadline; its outcome is unknown") from None
        finally:
            # On a deadline, stop tracking what is still pending (the entries
            # may yet commit; the client learns the outcome by retrying).
            if not batch.future.done() or len(batch.results) < batch.count:
                for index in range(proposal.index, proposal.index + proposal.count):
                    if self._pending_writes.get(index) is batch:
                        del self._pending_writes[index]

    async def read_barrier(self, timeout: float) -> None:
        """Return once this replica's state includes every write acknowledged
        before the call (ReadIndex: confirmed by a quorum, then applied here).
        Calls that arrive together share one ReadIndex round: the ready loop
        starts it for all of them (_start_queued_reads)."""
        self._check_serving()
        if not self.is_leader:
            raise self._not_leader()
        future = asyncio.get_running_loop().create_future()
        self._queued_reads.append(future)
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            raise DeadlineExceeded("could not confirm leadership before the deadline") from None

    def _start_queued_reads(self) -> None:
        """One ReadIndex round for every read_barrier() queued since the last
        one: a read point confirmed after they all arrived serves them all.
        Started only when no round is waiting for its quorum (the ready loop
        checks): reads that arrive meanwhile leave together once it is
        confirmed, so a busy leader sends one heartbeat per follower per
        round trip, not one per batch of reads (each costs both ends a gRPC
        stream message). A round whose heartbeats are lost is confirmed by
        the next tick's heartbeats, which carry the latest read context."""
        waiting = [future for future in self._queued_reads if not future.done()]
        self._queued_reads = []
        if not waiting:
            return
        context = self._read_prefix + next(self._read_ids).to_bytes(8, "big")
        try:
            self.node.read_index(context)
        except ProposalDropped as exc:
            error = self._not_leader(exc.leader)
            for future in waiting:
                settle(future, error)
            return
        self._pending_reads[context] = waiting

    async def scan_local(self, op: RangeOp, epoch: int) -> tuple[RangeResponse, int] | None:
        """ReplicaStore.scan in a thread (a long range must not hold up the
        group's loop); None: routed with a map older than the group's ownership."""
        self._check_serving()
        try:
            return await asyncio.to_thread(self.store.scan, op, epoch)
        except StoreBusy as exc:
            raise Unavailable(str(exc)) from None
        except StorageFault as exc:
            self._fault(exc, "read")
            raise Unavailable(f"replica stopped after a fault: {self.fail_stop.reason}") from None

    def read_local(self, key: bytes) -> bytes | None:
        self._check_serving()
        try:
            return self.store.get(key)
        except StoreBusy as exc:
            raise Unavailable(str(exc)) from None
        except StorageFault as exc:
            self._fault(exc, "read")
            raise Unavailable(f"replica stopped after a fault: {self.fail_stop.reason}") from None

    # --- Membership ------------------------------------------------------------------------

    def _follow_membership(self, conf: ConfState) -> None:
        """Fill `addresses` and `member_hosts` (node id → host name) for every
        member of `conf`, in place (the transport holds `member_hosts`). A
        member that joined by a configuration change carries both; the
        group's initial members (which joined by none) have their place in
        cluster.toml."""
        initial = {r.node_id: r for r in self.cluster.group_replicas(self.group)}
        self.addresses.clear()
        self.member_hosts.clear()
        for node_id in sorted(conf.ids()):
            member = conf.member(node_id)
            if member is not None and member.address:
                self.addresses[node_id], self.member_hosts[node_id] = member.address, member.host
            elif node_id in initial:
                self.addresses[node_id] = initial[node_id].address
                self.member_hosts[node_id] = initial[node_id].host.name
            else:
                log.warning("replica.member_without_address", extra={**self._log_extra, "peer": node_id})

    def _on_conf_state(self, conf: ConfState) -> None:
        """The applied configuration changed: follow it in the transport."""
        self._follow_membership(conf)
        self.transport.update_peers({nid: a for nid, a in self.addresses.items() if nid != self.node_id},
                                    removed=conf.removed)
        if self.node.removed and not self.removed.is_set():
            log.info("replica.removed", extra={**self._log_extra, "term": self.node.raft.term})
            self.removed.set()
            self._fail_all(Unavailable(f"node {self.node_id} was removed from group {self.group}"))

    async def change_membership(self, change: ConfChange, timeout: float, *, fence: int = 0,
                                expected: tuple[Collection[int], Collection[int]] | None = None) -> ConfState:
        """Propose one single-server change as leader; return the configuration
        once the change is applied here. `fence`: the scheduler's fencing
        token (storage/fencing.py), checked now and again when the entry is
        applied; `expected`: the (voters, learners) the caller decided on.
        The shape policy (shape_policy.py) is checked here, against this
        leader's applied configuration. InvalidConfChange: refused, nothing
        entered the log (or, fenced at apply, nothing changed);
        Unavailable/NotLeader: not now or not here."""
        self._check_serving()
        if not self.is_leader:
            raise self._not_leader()
        group_fence = self.store.shard_state.fence
        if not fencing.admits(group_fence, fence):
            raise InvalidConfChange(f"superseded: a newer scheduler (fencing token {group_fence}) took over from "
                                    f"this one (token {fence})")
        if self.node.quiesced:
            # Quiesced, the members have been silent: one heartbeat round (and a
            # moment for the slower ones' answers) says who is live before the policy looks.
            await self.read_barrier(timeout)
            await asyncio.sleep(2 * self.cluster.timing.tick_seconds)
            if not self.is_leader:
                raise self._not_leader()
        problem = shape_policy.check(self.node.conf_state(), change, self.node_id, self.recently_heard(), expected)
        if problem is not None:
            raise InvalidConfChange(problem)
        if fence:
            change = replace(change, context=fencing.conf_change_context(fence))
        try:
            proposal = self.node.propose_conf_change(change)
        except ProposalDropped as exc:
            if exc.leader == self.node_id:
                raise Unavailable(str(exc)) from None
            raise self._not_leader(exc.leader) from None
        future = asyncio.get_running_loop().create_future()
        self._pending_conf[proposal.index] = _PendingWrite(proposal.term, future)
        self._wake.set()
        log.info("replica.membership_proposed", extra={**self._log_extra, "change": change.describe(),
                                                       "index": proposal.index})
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded("the membership change did not apply before the deadline; "
                                   "it may still apply") from None
        finally:
            pending = self._pending_conf.get(proposal.index)
            if pending is not None and pending.future is future:
                del self._pending_conf[proposal.index]

    def recently_heard(self) -> set[int]:
        """The members this replica heard from within the last election
        timeout (the shape policy's "live": the core's own flags are reset at
        every quorum check, which would make a member that answers every
        heartbeat look silent for a moment after each)."""
        timing = self.cluster.timing
        horizon = time.monotonic() - timing.election_ticks * timing.tick_seconds
        return {node_id for node_id, at in self._last_heard.items() if at >= horizon}

    def _bind_incarnations(self) -> None:
        """A leader binds each member's incarnation once it knows it (its own,
        and those it hears): one change at a time, as promotions (the core
        refuses a second while one is in flight). From then on whatever
        another life of that member's id sends is never counted."""
        unbound = self.node.incarnations_to_bind()
        if not unbound:
            return
        node_id, incarnation = unbound[0]
        try:
            self.node.propose_conf_change(ConfChange.bind(node_id, incarnation))
        except (ProposalDropped, InvalidConfChange):
            return  # a change is in flight: next Ready
        log.info("replica.binding", extra={**self._log_extra, "peer": node_id, "incarnation": f"{incarnation:x}"})
        self._wake.set()

    def _notice_received(self) -> None:
        notice = self.node.notice
        if notice is None or self.disowned.is_set():
            return
        log.warning("replica.not_recognised", extra={**self._log_extra, "peer": notice.from_node,
                                                     "reason": notice.reason.value})
        self.disowned.set()

    def _learn_cluster_identity(self) -> None:
        """The metadata group's replicas start before the cluster's initial
        placement is recorded (in their own state machine): once it is, they
        know the cluster's id and their group's incarnation."""
        identity = self.store.identity
        if identity.cluster_id and identity.group_incarnation:
            return
        try:
            raw = self.store.get(INITIAL_PLACEMENT_KEY)
        except StoreBusy:
            return  # a snapshot is being installed: after the next apply
        if raw is None:
            return
        try:
            placement = InitialPlacement.decode(raw)
        except ValueError as exc:
            log.warning("replica.initial_placement_unreadable", extra={**self._log_extra, "error": str(exc)})
            return
        identity = self.store.record_identity(placement.cluster_id, placement.meta_incarnation)
        self.transport.set_identity(identity.cluster_id, identity.group_incarnation)
        log.info("replica.identity_learned", extra={**self._log_extra, "cluster_id": f"{identity.cluster_id:x}",
                                                    "group_incarnation": f"{identity.group_incarnation:x}"})

    def _promote_caught_up_learners(self) -> None:
        """A leader promotes a learner as soon as it has caught up (one change
        at a time: the core refuses a second one while the first is in flight)."""
        learners = self.node.caught_up_learners()
        if not learners:
            return
        try:
            self.node.propose_conf_change(ConfChange.promote(learners[0]))
        except (ProposalDropped, InvalidConfChange):
            return  # a change is in flight, or the learner fell behind again: next Ready
        log.info("replica.promoting", extra={**self._log_extra, "peer": learners[0]})
        self._wake.set()

    # --- Inputs ----------------------------------------------------------------------------

    def _on_messages(self, messages: list[Message]) -> None:
        if self.fail_stop.failed:
            return
        node = self.node
        now = time.monotonic()
        heard = self._last_heard
        for message in messages:
            heard[message.from_] = now
            try:
                node.step(message)
            except RaftError as exc:
                self.stats.messages_rejected += 1
                log.warning("replica.bad_message", extra={**self._log_extra, "peer": message.from_, "error": str(exc)})
            except Exception as exc:
                # Storage read errors and broken invariants of the core: this
                # replica can no longer be trusted to answer correctly.
                self._fault(exc, f"stepping a {message.type.name} from {message.from_}")
                raise
        if node.notice is not None:
            self._notice_received()
        self._wake.set()

    def _on_unreachable(self, peer: int) -> None:
        self.node.report_unreachable(peer)
        self._wake.set()

    async def _tick_loop(self) -> None:
        interval = self.cluster.timing.tick_seconds
        next_tick = time.monotonic() + interval
        try:
            while True:
                if self.node.quiesced:
                    # Nothing to tick for (docs/raft.md, "Quiescence"): sleep until
                    # a message, a request or the leader's link failing wakes the core.
                    self._ticking.clear()
                    await self._ticking.wait()
                    next_tick = time.monotonic() + interval
                await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
                next_tick += interval
                if next_tick < time.monotonic():
                    next_tick = time.monotonic() + interval  # we were stalled: do not burst ticks
                self.node.tick()
                self._wake.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._fault(exc, "ticking the core")
            raise

    async def _ready_loop(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                # Let proposals and messages that are already runnable join this Ready.
                await asyncio.sleep(0)
                while True:
                    if self._queued_reads and not self._pending_reads:
                        self._start_queued_reads()
                    if not self.node.has_ready():
                        break
                    await self._handle_ready(self.node.ready())
                if not self.node.quiesced and not self._ticking.is_set():
                    self._ticking.set()     # woken: tick again
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            # Tripped here, synchronously, so that no request is answered
            # between the fault and the process's exit.
            self._fault(exc, "persisting or applying a Ready")
            raise

    # --- One Ready -------------------------------------------------------------------------

    async def _handle_ready(self, ready: Ready) -> None:
        node = self.node
        if ready.soft_state is not None:
            self._on_soft_state(ready.soft_state.role, ready.soft_state.lead)
        if ready.send_before_persist:
            # A leader's appends go out while its own write runs (it counts
            # itself toward commits only after advance()).
            self._send(ready.messages)
        # 1. Persist (fsync) before anything that may promise it. The write
        # runs on the persist thread so that, meanwhile, this loop keeps
        # taking requests and messages: they form the next Ready, and share
        # its single fsync (group commit). Only the store is touched there;
        # the core stays on this thread.
        committed = ready.committed_entries
        if ready.must_sync:
            # Committed entries already on this node's disk, below this
            # Ready's own entries, need nothing of its write: they are
            # applied, and their writers answered, while the fsync runs (as
            # etcd does) instead of one fsync later. Their commit index is
            # written first, unsynced (the WAL keeps order), so that a crash
            # never leaves an applied index above the stored commit index.
            early = self._applicable_before_persist(ready)
            if early and ready.hard_state is not None:
                self.store.persist(ready.hard_state, [], None, sync=False)
            began = time.perf_counter()
            write = asyncio.get_running_loop().run_in_executor(
                self._persist_thread, self.store.persist, ready.hard_state, ready.entries, ready.snapshot
            )
            if early:
                self._apply(committed[:early])
                committed = committed[early:]
                self._serve_reads(ready.read_states)
            await write
            elapsed = time.perf_counter() - began
            self.metrics.fsync_latency.observe(elapsed)
        elif ready.hard_state is not None:
            self.store.persist(ready.hard_state, [], None, sync=False)
        if ready.snapshot is not None:
            self.stats.snapshots_received += 1
            index = ready.snapshot.metadata.index
            for pending_index in [i for i in self._pending_writes if i <= index]:
                settle(self._pending_writes.pop(pending_index).future,
                       Unavailable("replaced by a snapshot; outcome unknown"))
            log.info("replica.snapshot_installed", extra={**self._log_extra, "index": index})
            self._on_conf_state(self.store.conf_state)
            self.watch_hub.reset(self.store.revision)
        # 2. Send (unless already sent above).
        if not ready.send_before_persist:
            self._send(ready.messages)
        # 3. Apply (what was not applied during the write).
        if committed:
            self._apply(committed)
        self._serve_reads(ready.read_states)
        # 4. Advance, then compact if the log grew past the threshold (a
        # synced write: on the persist thread, so the loop keeps ticking).
        node.advance(ready)
        if self._role is StateRole.LEADER:
            self._bind_incarnations()
            self._promote_caught_up_learners()
        if self.group == METADATA_GROUP and ready.committed_entries:
            self._learn_cluster_identity()
        store = self.store
        if ready.committed_entries and store.applied_index - store.first_index() >= self.cluster.snapshot_threshold:
            compacted = await asyncio.get_running_loop().run_in_executor(
                self._persist_thread, self.store.compact, self.cluster.snapshot_threshold
            )
            if compacted is not None:
                self.stats.snapshots_taken += 1

    def _applicable_before_persist(self, ready: Ready) -> int:
        """How many of the Ready's committed entries may be applied while its
        write runs: those on this node's disk already and below the first
        entry the Ready writes (which may replace stored ones), provided the
        Ready's commit index stays within that too (it is written ahead of
        the entries). None during a snapshot install."""
        committed = ready.committed_entries
        if not committed or ready.snapshot is not None:
            return 0
        limit = self.store.last_index()
        if ready.entries:
            limit = min(limit, ready.entries[0].index - 1)
        if ready.hard_state is not None and ready.hard_state.commit > limit:
            return 0
        return max(0, min(len(committed), limit - committed[0].index + 1))

    def _serve_reads(self, read_states) -> None:
        """Answer the reads whose confirmed read point is applied; the
        others wait for a later apply."""
        for read_state in read_states:
            futures = self._pending_reads.pop(read_state.request_context, None)
            if futures is not None:
                self._ready_reads.append((read_state.index, futures))
        if self._ready_reads:
            applied = self.store.applied_index
            waiting = []
            for index, futures in self._ready_reads:
                if index <= applied:
                    for future in futures:
                        settle(future, None)
                else:
                    waiting.append((index, futures))
            self._ready_reads = waiting

    def _send(self, messages: list[Message]) -> None:
        regular = []
        for message in messages:
            if message.type is MessageType.SNAP:
                self._start_snapshot_send(message)
            else:
                regular.append(message)
        if regular:
            self.transport.send(regular)

    def _apply(self, entries) -> None:
        results: list[ApplyResult | None] = []
        # A conf change's membership is recorded in the same (unsynced) batch
        # as its applied index: after a crash the store is exactly "applied
        # up to N" with N's membership, and the log re-applies the rest.
        start = 0
        for position, entry in enumerate(entries):
            if entry.type is EntryType.CONF_CHANGE:
                results.extend(self.store.apply(entries[start:position]))
                # Fencing (storage/fencing.py): judged against the group's
                # token as of this index, the same on every replica.
                admitted = self.store.admits_conf_change(entry.data)
                conf_state = self.node.apply_conf_change_entry(entry) if admitted else None
                results.extend(self.store.apply([entry], conf_state=conf_state))
                start = position + 1
                pending = self._pending_conf.pop(entry.index, None)
                if conf_state is None:
                    log.warning("replica.membership_change_fenced",
                                extra={**self._log_extra, "index": entry.index,
                                       "fence": self.store.shard_state.fence})
                    if pending is not None:
                        settle(pending.future, InvalidConfChange(
                            f"superseded: a newer scheduler (fencing token {self.store.shard_state.fence}) took "
                            f"over; the change was not applied") if pending.term == entry.term
                            else Unavailable("lost to a leader change; not applied"))
                    continue
                self._on_conf_state(conf_state)
                if pending is not None:
                    if pending.term == entry.term:
                        settle(pending.future, conf_state)
                    else:
                        settle(pending.future, Unavailable("lost to a leader change; not applied"))
                log.info("replica.membership_changed", extra={**self._log_extra, "voters": list(conf_state.voters),
                                                              "learners": list(conf_state.learners)})
        results.extend(self.store.apply(entries[start:]))
        for entry, result in zip(entries, results):
            conf_pending = self._pending_conf.pop(entry.index, None)
            if conf_pending is not None:  # another leader's entry took the index of our change
                settle(conf_pending.future, Unavailable("lost to a leader change; not applied"))
            batch = self._pending_writes.pop(entry.index, None)
            if batch is None:
                continue
            if batch.term != entry.term or result is None:
                # Another leader's entry took this index: ours was never committed.
                settle(batch.future, Unavailable("lost to a leader change; not applied"))
                continue
            batch.results.append(result)
            if len(batch.results) == batch.count:
                settle(batch.future, batch.results)

    def _on_soft_state(self, role: StateRole, lead: int) -> None:
        was_leader = self._role is StateRole.LEADER
        if lead != self._leader:
            self.stats.leader_changes += 1
            log.info("replica.leader_changed",
                     extra={**self._log_extra, "term": self.node.raft.term, "leader": lead, "role": role.name})
        campaigning = (StateRole.PRE_CANDIDATE, StateRole.CANDIDATE)
        if role in campaigning and self._role not in campaigning:
            self.stats.elections_started += 1
            log.info("replica.campaign", extra={**self._log_extra, "term": self.node.raft.term, "role": role.name})
        if role is StateRole.LEADER and not was_leader:
            self.stats.elections_won += 1
        self._role, self._leader = role, lead
        if was_leader and role is not StateRole.LEADER:
            # Entries we proposed may still commit under the new leader:
            # their outcome is unknown, and retries are deduplicated.
            self._fail_all(Unavailable("leadership lost; outcome unknown, retry with the same session"))

    def _fail_all(self, error: Exception) -> None:
        for pending in [*self._pending_writes.values(), *self._pending_conf.values()]:
            settle(pending.future, error)
        self._pending_writes.clear()
        self._pending_conf.clear()
        for future in self._queued_reads:
            settle(future, error)
        self._queued_reads.clear()
        for futures in self._pending_reads.values():
            for future in futures:
                settle(future, error)
        self._pending_reads.clear()
        for _, futures in self._ready_reads:
            for future in futures:
                settle(future, error)
        self._ready_reads.clear()

    # --- Snapshots over the wire -----------------------------------------------------------------

    def _start_snapshot_send(self, message: Message) -> None:
        task = asyncio.create_task(self._send_snapshot(message), name=f"snapshot-to-{message.to}")
        self._snapshot_tasks.add(task)
        task.add_done_callback(self._snapshot_tasks.discard)

    async def _send_snapshot(self, message: Message) -> None:
        metadata = message.snapshot.metadata
        ok = False
        began = time.perf_counter()
        try:
            reader = self.store.open_snapshot_reader(metadata.index, metadata.term)
        except KeyError:
            log.warning("replica.snapshot_expired", extra={**self._log_extra, "peer": message.to, "index": metadata.index})
        else:
            try:
                ok = await self.transport.send_snapshot(message.to, message, (chunk.data for chunk in reader.chunks()))
            finally:
                reader.close()
        if ok:
            self.stats.snapshots_sent += 1
        else:
            self.stats.snapshots_send_failed += 1
        self.stats.snapshot_send_seconds += time.perf_counter() - began
        log.info(
            "replica.snapshot_sent",
            extra={**self._log_extra, "peer": message.to, "index": metadata.index, "ok": ok,
                   "seconds": round(time.perf_counter() - began, 3)},
        )
        if not self._stopping:
            self.node.report_snapshot(message.to, failed=not ok)
            self._wake.set()

    async def _on_snapshot_stream(self, header: SnapshotHeader, chunks) -> None:
        """Stage an incoming snapshot, then hand it to the core.

        Store calls run in a thread: they take the staging lock, which the
        persist thread holds for a whole install, and finish() fsyncs; the
        loop must keep ticking meanwhile."""
        snapshot = header.message.snapshot
        if snapshot is None:
            raise ValueError("snapshot stream without snapshot metadata")
        self._check_serving()
        if header.message.term < self.node.raft.term:
            # A deposed leader's stream must not replace a newer staging.
            raise ValueError(f"stale snapshot stream: term {header.message.term} < {self.node.raft.term}")
        metadata = snapshot.metadata
        raft = self.node.raft
        # Staged only when Raft asked for it: a leader sends a snapshot after
        # this follower answered its appends in the same term, so the sender
        # is the leader it follows, and the snapshot is past what it committed
        # (the core would ignore it otherwise). Anything else would fill the
        # disk for nothing; a real leader's stream refused here is sent again.
        if header.message.term != raft.term or raft.lead != header.from_node:
            raise ValueError(f"unasked snapshot: node {header.from_node} in term {header.message.term} is not "
                             f"the leader this replica follows (node {raft.lead}, term {raft.term})")
        if metadata.index <= raft.log.committed:
            raise ValueError(f"unasked snapshot: index {metadata.index} is not past the commit index "
                             f"{raft.log.committed}")
        limits = self.cluster.limits
        began = time.perf_counter()
        received = 0
        try:
            staging = await asyncio.to_thread(self.store.begin_snapshot, metadata)
            try:
                async with asyncio.timeout(limits.max_snapshot_seconds):
                    async for chunk in chunks:
                        received += len(chunk)
                        if received > limits.max_snapshot_bytes:
                            # Before it is written: a stream cannot fill the disk.
                            raise refuse("max_snapshot_bytes", limits.max_snapshot_bytes,
                                         f"a snapshot stream of more than {received} bytes")
                        await asyncio.to_thread(staging.write, chunk)
            except TimeoutError:
                raise refuse("max_snapshot_seconds", limits.max_snapshot_seconds,
                             f"a snapshot stream still unfinished after {time.perf_counter() - began:.0f} s") from None
            await asyncio.to_thread(staging.finish)
            self.stats.snapshot_receive_seconds += time.perf_counter() - began
            log.info("replica.snapshot_received", extra={**self._log_extra, "peer": header.from_node,
                                                         "index": metadata.index})
            # Pin the staging, then let the core decide; persisting its Ready
            # installs the staged state. A stream that starts meanwhile cannot
            # discard it (SnapshotBusy) and is retried by its sender.
            await asyncio.to_thread(self.store.hand_over_staging, metadata)
        except StorageFault as exc:
            self._fault(exc, "staging a snapshot")
            raise
        self._on_messages([header.message])
        taken = self.node.raft.log.unstable.snapshot
        if taken is None or (taken.metadata.index, taken.metadata.term) != (metadata.index, metadata.term):
            await asyncio.to_thread(self.store.release_staging, metadata)
