"""A deterministic, seeded simulation of one Raft group under faults.

Everything that happens is an event on one heap ordered by (time, sequence):
node ticks, message deliveries, the end of a simulated disk write, client
requests and their timeouts, and faults (partitions, crashes, restarts,
leadership transfers). All randomness comes from the scenario's seed, so a
run is replayed exactly by running the same seed again.

A run has two phases: a fault phase, with clients writing and reading, and a
calm phase (network healed, every node restarted) in which a leader must be
elected and a new entry committed and applied everywhere within a bounded
number of ticks (liveness). Safety invariants are checked after every event
(invariants.py); at the end the clients' history is checked for
linearizability.

Some scenarios also wipe a node's disk: it comes back with an empty disk
and a new incarnation, bootstrapped with its first configuration under its
old id (what a worker without the start rules of identity.py would do). The
Raft core must never count what that new life sends under the old id (the
binding of ids to incarnations, docs/raft.md); the transport follows the
applied membership as the worker's does; a node told it is another
incarnation of a bound id leaves for good (as the worker does), and the
operator removes it when it changes the membership.

Some scenarios let the group quiesce when idle (docs/raft.md,
"Quiescence"): the leader stops heartbeats and every node its timers. The
worker's transport notices a broken link to a peer (its pings unanswered)
and reports it to the core; here a quiesced follower is told, a few ticks
after its leader crashed or its link to the leader was cut
(`_watch_leader_link`). In the "quiesce" profile a crashed leader may stay
down through the end of the run: the others must notice and elect another.
Quiesced followers must hold what their quiesced leader committed, and
once everything is calm the whole group must quiesce.

Most scenarios also change the group's membership during the fault phase,
as an operator and the worker would: add a learner (a new node, with a new
id, started from the configuration that adds it), promote a learner once
the leader reports it caught up, remove a follower, remove the leader
(directly, or after handing leadership over), replace a replica (add,
promote, remove the old one), propose two changes back to back, and try a
change the moment a new leader is elected. Refusals are expected: the core
must refuse what is unsafe, and the invariants catch what it lets through.
"""

from __future__ import annotations

import heapq
import itertools
import random
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Any

from shardnode.raft import (
    CompactedError,
    ConfChange,
    ConfState,
    EntryType,
    InvalidConfChange,
    Message,
    MessageType,
    ProposalDropped,
    NoticeReason,
    StateRole,
    UnavailableError,
    confchange,
)
from shardnode.testing.linearizability import HistoryRecorder, OpKind, check_history

from .invariants import Membership, SafetyChecker, SafetyViolation
from .network import NetworkFaults, SimNetwork
from .node import LOST, NodeParams, PendingWrite, SimNode, encode_command, transport_delivers, transport_sends

TICK_INTERVAL = 10          # time units between two ticks of a node
LIVENESS_TICKS = 300        # after healing, a leader and a commit must come within this
QUIET_TICKS = 150           # then, with quiescence on, the whole group must quiesce within this
LINK_DETECT_TICKS = 5       # a quiesced follower learns its leader's link is broken this much later
TRACE_LINES = 400           # how much of the trace a failure report shows
OPERATOR_TICKS = 4          # how often the operator promotes caught-up learners and follows its plans
# Events one run may handle: ten times the busiest seed of every profile. A
# broken core can make two nodes answer each other forever (a storm of
# appends and rejections, multiplied by duplicated messages): that is a
# failure of the seed, not a test that never ends.
MAX_EVENTS = 400_000


@dataclass(slots=True)
class Scenario:
    seed: int
    node_count: int
    params: NodeParams
    faults: NetworkFaults
    fault_ticks: int
    fault_events: int
    fault_weights: tuple[int, ...]      # of every fault but "wipe" (wipe_weight)
    clients: int
    keys: int
    client_timeout_ticks: int
    membership_events: int = 0      # random configuration changes during the fault phase
    max_new_nodes: int = 0          # nodes that may join (each with a new id)
    eager_change_rate: float = 0.0  # chance a new leader tries a change at once
    fault_after_change: float = 0.0  # chance a proposed change is followed by a leader fault
    wipe_weight: int = 0            # weight of "wipe" among the faults (0: no disk is ever lost)
    profile: str = "default"
    # Clients stop after this fraction of the fault phase; faults go on (an idle group: nothing but
    # the group itself, and its transport, can notice a leader that is gone).
    clients_until: float = 1.0

    @classmethod
    def from_seed(cls, seed: int, profile: str = "default") -> "Scenario":
        """The scenario of a seed. Profiles (for the broken-variant tests):
        "default" (what CI runs), "static" (no membership change and no
        lost disk: the scenarios from before membership changes were
        simulated, with the leaders' bindings of incarnations),
        "membership" (many changes, each often followed by a leader fault),
        "wipe" (many lost disks among crashes and partitions, no change),
        "crashes" (crash storms among partitions, no change, no lost disk),
        "quiesce" (idle groups quiesce; leaders crash, some for good)."""
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r} (one of {', '.join(PROFILES)})")
        rng = random.Random(seed)
        params = NodeParams(
            election_tick=10,
            heartbeat_tick=rng.choice([1, 2, 3]),
            max_size_per_msg=rng.choice([32, 256, 4096]),
            max_inflight_msgs=rng.choice([1, 2, 4, 16]),
            compact_threshold=rng.choice([0, 5, 12, 40]),
            max_persist_delay=rng.choice([0, 0, 3, 12]),
        )
        faults = NetworkFaults(
            drop_rate=rng.choice([0.0, 0.02, 0.1, 0.25]),
            duplicate_rate=rng.choice([0.0, 0.05, 0.2]),
            min_delay=1,
            max_delay=rng.choice([2, 6, 15, 40]),
        )
        scenario = cls(
            seed=seed,
            node_count=rng.choice([3, 5, 5]),
            params=params,
            faults=faults,
            fault_ticks=rng.randint(80, 300),
            fault_events=rng.randint(2, 30),
            # Some scenarios are crash storms, some are network chaos.
            fault_weights=tuple(rng.choice([0, 1, 3]) + (1 if i == 6 else 0) for i in range(len(_FAULTS) - 1)),
            clients=rng.randint(2, 5),
            keys=rng.randint(1, 3),
            client_timeout_ticks=rng.randint(15, 40),
            # Drawn last, so the fields above are what they were before
            # membership changes were simulated.
            membership_events=rng.choice([0, rng.randint(2, 8), rng.randint(4, 16), rng.randint(4, 16)]),
            max_new_nodes=rng.randint(1, 4),
            eager_change_rate=rng.choice([0.0, 0.3, 0.8]),
            fault_after_change=rng.choice([0.0, 0.2, 0.5]),
            # Drawn after everything else, so that a scenario without wipes
            # is exactly what it was before wipes were simulated.
            wipe_weight=rng.choice([0, 0, 1, 2]),
            profile=profile,
        )
        # Drawn after everything else, so that scenarios without quiescence
        # are exactly what they were before it existed.
        quiesce_ticks = rng.choice([0, 0, 0, 3, 8])
        if quiesce_ticks:
            scenario = replace(scenario, params=replace(scenario.params, quiesce_ticks=quiesce_ticks))
        if profile == "static":
            scenario = replace(scenario, membership_events=0, wipe_weight=0)
        elif profile == "wipe":
            # Lost disks among crashes and partitions, no membership change:
            # where a Raft that counted a new life under an old id loses data.
            scenario = replace(scenario, membership_events=0, wipe_weight=4, fault_events=rng.randint(15, 40),
                               fault_weights=tuple(max(w, 1) for w in scenario.fault_weights))
        elif profile == "crashes":
            # Crash storms (of any node and of leaders) among partitions, no
            # change and no lost disk: where a node that forgets what it
            # persisted (its vote, its log) is found quickly.
            weights = list(scenario.fault_weights)
            weights[_FAULTS.index("crash")] = weights[_FAULTS.index("crash_leader")] = 4
            weights[_FAULTS.index("partition")] = max(weights[_FAULTS.index("partition")], 1)
            scenario = replace(scenario, membership_events=0, wipe_weight=0, fault_events=rng.randint(15, 40),
                               fault_weights=tuple(weights))
        elif profile == "quiesce":
            # Quiescence under crashes of leaders (some for good: the others must notice through the
            # link and elect another), isolated leaders and partitions; no change, no lost disk.
            weights = list(scenario.fault_weights)
            weights[_FAULTS.index("crash_leader")] = 4
            weights[_FAULTS.index("isolate_leader")] = max(weights[_FAULTS.index("isolate_leader")], 2)
            scenario = replace(scenario, membership_events=0, wipe_weight=0, fault_events=rng.randint(4, 12),
                               fault_weights=tuple(weights), clients_until=rng.choice([0.3, 0.6, 1.0]),
                               params=replace(scenario.params, quiesce_ticks=rng.choice([2, 3, 8])))
        elif profile == "membership":
            scenario = replace(
                scenario,
                membership_events=rng.randint(8, 20),
                eager_change_rate=0.8,
                fault_after_change=0.5,
            )
        return scenario

    def describe(self) -> str:
        p, f = self.params, self.faults
        return (
            f"seed={self.seed} nodes={self.node_count} heartbeat={p.heartbeat_tick} "
            f"msg_size={p.max_size_per_msg} inflight={p.max_inflight_msgs} compact={p.compact_threshold} "
            f"persist_delay<={p.max_persist_delay} drop={f.drop_rate} dup={f.duplicate_rate} "
            f"delay<={f.max_delay} fault_ticks={self.fault_ticks} faults={self.fault_events} "
            f"weights={dict(zip(_FAULTS, self.fault_weights))} "
            f"clients={self.clients} keys={self.keys} membership={self.membership_events} "
            f"new_nodes<={self.max_new_nodes} eager={self.eager_change_rate} "
            f"fault_after_change={self.fault_after_change} wipe={self.wipe_weight}"
        )


@dataclass
class SimResult:
    scenario: Scenario
    violation: str | None
    trace: list[str]
    committed: int
    operations: int
    elections: int
    end_time: int
    # Committed configuration changes by kind; proposals the core refused (by
    # error type) and other membership events (leaders stepping down).
    conf_changes: Counter = field(default_factory=Counter)
    membership_counts: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return self.violation is None

    def report(self) -> str:
        lines = [
            f"SIMULATION FAILED: {self.violation}",
            f"  scenario: {self.scenario.describe()}",
            f"  replay:   .venv/bin/python -m tests.sim.run --seed {self.scenario.seed} --trace"
            + (f" --profile {self.scenario.profile}" if self.scenario.profile != "default" else ""),
            "  trace (last events):",
        ]
        lines += ["    " + line for line in self.trace[-TRACE_LINES:]]
        return "\n".join(lines)


@dataclass(slots=True)
class _ClientOp:
    client: int
    kind: OpKind
    key: bytes
    node: int


@dataclass(slots=True)
class _Plan:
    """A multi-step change the operator follows: replace `old` by `new`
    (promote `new` once caught up, then remove `old`), or remove `old` after
    its leadership was handed over (new == 0)."""

    old: int
    new: int = 0
    stage: str = "promote"


class Simulation:
    def __init__(self, scenario: Scenario, trace: bool = False) -> None:
        self.scenario = scenario
        self.rng = random.Random(scenario.seed ^ 0x5EED)
        voters = tuple(range(1, scenario.node_count + 1))
        initial = ConfState(voters=voters)
        self.nodes = {i: SimNode(i, initial, scenario.params, scenario.seed) for i in voters}
        # Ids whose disk was wiped: the life running under them now is not the
        # one the group bound, and never will be (the operator removes them).
        self.lost: set[int] = set()
        # Nodes that left for good: told they are another incarnation of a bound id.
        self.retired: set[int] = set()
        self.network = SimNetwork(self.rng, NetworkFaults(**_fields(scenario.faults)))
        self.checker = SafetyChecker(self.nodes, Membership.of(initial))
        self.next_node_id = scenario.node_count + 1
        self.plans: list[_Plan] = []
        self.membership_active = scenario.membership_events > 0
        self.eager_terms: set[int] = set()
        self.membership_counts: Counter = Counter()
        self.now = 0
        self._heap: list[tuple[int, int, str, Any]] = []
        self._seq = itertools.count()
        self._clock = itertools.count(1)
        self.history = HistoryRecorder(clock=lambda: next(self._clock))
        self.client_ops: dict[int, _ClientOp] = {}
        self.client_busy: dict[int, int | None] = {c: None for c in range(1, scenario.clients + 1)}
        self.leader_hint: dict[int, int] = {}
        self.clients_active = True
        self.tracing = trace
        self.trace: deque[str] | list[str] = [] if trace else deque(maxlen=0)
        self._read_ids = itertools.count(1)
        self._values = itertools.count(1)
        self.quiescence = scenario.params.quiesce_ticks > 0
        # Quiesced followers whose link to their leader is broken, and since when.
        self._link_down_since: dict[int, int] = {}
        # A leader crashed for good ("quiesce" profile): restarted only once the
        # others have elected a leader and applied the liveness probe.
        self.held_down: set[int] = set()
        self._quiet_since: int | None = None

    # --- Scheduling ------------------------------------------------------------------------

    def _at(self, time: int, kind: str, payload: Any = None) -> None:
        heapq.heappush(self._heap, (time, next(self._seq), kind, payload))

    def _log(self, text: str) -> None:
        if self.tracing:
            self.trace.append(f"t={self.now:<6} {text}")

    # --- Running -------------------------------------------------------------------------------

    def run(self) -> SimResult:
        violation = None
        try:
            self._run()
        except SafetyViolation as exc:
            violation = str(exc)
        except Exception as exc:  # noqa: BLE001 - a crash of any node is a failure of the seed
            # A replica must never crash (not on a committed entry, not on a
            # message): report it with the seed and the trace like a violation.
            where = traceback.extract_tb(exc.__traceback__)[-1]
            violation = f"crash: {type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})"
        if violation is None:
            result = check_history(self.history.operations(), timeout=60)
            if not result.ok:
                violation = f"linearizability: {result.verdict.name} on key {result.key!r}\n{result.explanation}"
        elections = len(self.checker.leaders_by_term)
        conf_changes: Counter = Counter()
        previous = self.checker.configurations[0][1]
        for _, conf in self.checker.configurations[1:]:
            conf_changes[_change_kind(previous, conf)] += 1
            previous = conf
        if self.checker.noop_conf_changes:
            conf_changes["no-op"] = self.checker.noop_conf_changes
        return SimResult(
            self.scenario,
            violation,
            list(self.trace),
            len(self.checker.committed),
            len(self.client_ops),
            elections,
            self.now,
            conf_changes,
            self.membership_counts,
        )

    def _run(self) -> None:
        scenario = self.scenario
        for node in self.nodes.values():
            node.start()
            self._log(f"n{node.id} start")
            # Stagger ticks so that nodes are not in lock step.
            self._at(self.rng.randrange(TICK_INTERVAL), "tick", node.id)
        for client in self.client_busy:
            self._at(self.rng.randrange(TICK_INTERVAL * 3), "client", client)
        fault_end = scenario.fault_ticks * TICK_INTERVAL
        for _ in range(scenario.fault_events):
            self._at(self.rng.randrange(fault_end), "fault", None)
        for _ in range(scenario.membership_events):
            self._at(self.rng.randrange(fault_end), "membership", None)
        if self.membership_active:
            self._at(OPERATOR_TICKS * TICK_INTERVAL, "operator", None)
        self._at(fault_end, "heal", None)
        deadline = fault_end + LIVENESS_TICKS * TICK_INTERVAL
        handled = 0
        while self._heap:
            time, _, kind, payload = heapq.heappop(self._heap)
            handled += 1
            if handled > MAX_EVENTS:
                raise SafetyViolation(f"livelock: {MAX_EVENTS} events by time {time} without an end (a message storm)")
            if time > deadline:
                raise SafetyViolation(f"liveness: no leader committed a new entry within {LIVENESS_TICKS} ticks of healing")
            self.now = time
            if self._handle(kind, payload):
                return

    def _handle(self, kind: str, payload: Any) -> bool:
        if kind == "deliver":
            self._deliver(payload)
        elif kind == "tick":
            node = self.nodes[payload]
            if node.alive:
                node.rawnode.tick()
                self._after_input(node)
                if self.quiescence:
                    self._watch_leader_link(node)
            self._at(self.now + TICK_INTERVAL, "tick", payload)
        elif kind == "persisted":
            node_id, ready = payload
            self._complete_ready(self.nodes[node_id], ready)
        elif kind == "snap_status":
            sender_id, target, failed = payload
            sender = self.nodes[sender_id]
            if sender.alive:
                sender.rawnode.report_snapshot(target, failed)
                self._after_input(sender)
        elif kind == "client":
            self._client_request(payload)
        elif kind == "timeout":
            self._client_timeout(payload)
        elif kind == "fault":
            if self.clients_active:  # no fault once the network is healed
                self._inject_fault(payload)
        elif kind == "membership":
            self._membership_event(payload)
        elif kind == "operator":
            self._operator()
        elif kind == "restart":
            self._restart(self.nodes[payload])
        elif kind == "heal":
            self._heal()
        elif kind == "liveness":
            return self._check_liveness(payload)
        return False

    # --- Nodes -----------------------------------------------------------------------------------

    def _deliver(self, message: Message) -> None:
        node = self.nodes.get(message.to)
        if node is None or not node.alive:
            return
        if not transport_delivers(node, message):
            if self.tracing:
                self._log(f"n{message.from_}->n{message.to} refused (a stranger) {_fmt_message(message)}")
            return
        if self.tracing:
            self._log(f"n{message.from_}->n{message.to} {_fmt_message(message)}")
        before = node.rawnode.raft.role
        node.rawnode.step(message)
        self._note_role(node, before)
        self._after_input(node)

    def _note_role(self, node: SimNode, before: StateRole) -> None:
        raft = node.rawnode.raft
        if self.tracing and raft.role is not before:
            self._log(f"n{node.id} {before.name} -> {raft.role.name} term={raft.term} last={raft.log.last_index()}")

    def _after_input(self, node: SimNode) -> None:
        self.checker.after_step(node)
        if self.quiescence:
            self._check_quiesced(node)
        notice = node.rawnode.notice
        if notice is not None and notice.reason is NoticeReason.REINCARNATED and node.alive:
            # What the worker does: its store is not the one the group bound
            # to its id; it leaves a tombstone and stays down.
            self._log(f"n{node.id} told by n{notice.from_node} it is not the bound incarnation: it leaves for good")
            self.retired.add(node.id)
            self._crash(node)
            return
        raft = node.rawnode.raft
        if self.membership_active and raft.role is StateRole.LEADER and raft.term not in self.eager_terms:
            # A new leader: sometimes try a change at once, before it has
            # committed an entry of its term (the core must refuse it).
            self.eager_terms.add(raft.term)
            if self.rng.random() < self.scenario.eager_change_rate:
                self._at(self.now, "membership", "eager")
        self._drive(node)

    def _drive(self, node: SimNode) -> None:
        if not node.alive or node.in_flight_ready is not None or not node.rawnode.has_ready():
            return
        ready = node.rawnode.ready()
        node.in_flight_ready = ready
        # A leader's appends may leave before its own write (in parallel with
        # it); do that most of the time, so both orders are exercised.
        node.sent_early = ready.send_before_persist and self.rng.random() < 0.7
        if node.sent_early:
            self._send_messages(node, ready.messages)
        delay = self.rng.randint(0, node.params.max_persist_delay) if ready.must_sync else 0
        node.applied_early = 0
        if delay:
            # As the worker does (ReplicaDriver._applicable_before_persist):
            # committed entries already on disk, below the Ready's own
            # entries, are applied (and answered) while the write runs, the
            # Ready's commit index written to disk first.
            early = self._applicable_before_persist(node, ready)
            if early and self.rng.random() < 0.8:
                if ready.hard_state is not None:
                    node.disk.set_hard_state(ready.hard_state)
                self._apply_entries(node, ready.committed_entries[:early])
                node.applied_early = early
                self._serve_reads(node)
            self._at(self.now + delay, "persisted", (node.id, ready))
        else:
            self._complete_ready(node, ready)

    @staticmethod
    def _applicable_before_persist(node: SimNode, ready) -> int:
        committed = ready.committed_entries
        if not committed or ready.snapshot is not None:
            return 0
        limit = node.disk.last_index()
        if ready.entries:
            limit = min(limit, ready.entries[0].index - 1)
        if ready.hard_state is not None and ready.hard_state.commit > limit:
            return 0
        return max(0, min(len(committed), limit - committed[0].index + 1))

    def _complete_ready(self, node: SimNode, ready) -> None:
        if node.in_flight_ready is not ready:
            return  # the node crashed while "writing"
        node.persist(ready)
        self.checker.on_persist(node, ready.entries)
        if ready.snapshot is not None:
            self._log(f"n{node.id} install snapshot at {ready.snapshot.metadata.index}")
            for handle in node.install_snapshot(ready.snapshot):
                self._finish_unknown(handle)
        if not node.sent_early:
            self._send_messages(node, ready.messages)
        self._apply_entries(node, ready.committed_entries[node.applied_early:])
        for read_state in ready.read_states:
            handle = node.pending_reads.pop(read_state.request_context, None)
            if handle is not None:
                node.ready_reads.append((read_state.index, handle))
        self._serve_reads(node)
        node.rawnode.advance(ready)
        node.in_flight_ready = None
        node.maybe_compact()
        self._bind_incarnations(node)
        self.checker.after_step(node)
        self._drive(node)

    def _bind_incarnations(self, node: SimNode) -> None:
        """What the worker's driver does after each Ready: a leader proposes
        binding one member's incarnation it knows (the core refuses while
        another change is in flight; that is checked here too, so that a
        broken core without the rule does not make a leader propose the same
        binding after every Ready)."""
        unbound = node.rawnode.incarnations_to_bind()
        raft = node.rawnode.raft
        if not unbound or raft.pending_conf_index > raft.log.applied:
            return
        node_id, incarnation = unbound[0]
        try:
            node.rawnode.propose_conf_change(ConfChange.bind(node_id, incarnation))
        except (ProposalDropped, InvalidConfChange):
            return
        self._log(f"n{node.id} proposes to bind n{node_id} to incarnation {incarnation:x}")

    def _apply_entries(self, node: SimNode, entries) -> None:
        for entry in entries:
            self.checker.on_apply(node, entry, node.applied_index + 1)
            was_leader = node.rawnode.raft.role is StateRole.LEADER
            answered = node.apply(entry)
            if was_leader and node.rawnode.removed and node.rawnode.raft.role is not StateRole.LEADER:
                self.membership_counts["leader stepped down on its removal"] += 1
                self._log(f"n{node.id} stepped down: it applied its own removal")
            if entry.type is EntryType.CONF_CHANGE and self.tracing:
                conf = node.rawnode.conf_state()
                self._log(
                    f"n{node.id} applied conf change at {entry.index}: voters={list(conf.voters)} "
                    f"learners={list(conf.learners)} removed={list(conf.removed)}"
                    + (" (this node is removed)" if node.rawnode.removed else "")
                )
            if answered is not None:
                handle, output = answered
                if output is LOST:
                    self._finish_failed(handle)
                else:
                    self._finish_ok(handle, output)

    def _send_messages(self, node: SimNode, messages) -> None:
        for message in messages:
            if not transport_sends(node, message, self.nodes):
                continue  # no link to a node that is not a member (as the worker's transport)
            message = node.stamp(message)
            self.checker.on_message_sent(message)
            delays = self.network.deliveries(message)
            for delay in delays:
                self._at(self.now + delay, "deliver", message)
            if message.type is MessageType.SNAP:
                # The transport reports how a snapshot stream ended.
                failed = not delays
                self._at(self.now + (max(delays) if delays else 1), "snap_status", (node.id, message.to, failed))

    def _serve_reads(self, node: SimNode) -> None:
        if not node.ready_reads:
            return
        waiting = []
        for index, handle in node.ready_reads:
            if index <= node.applied_index:
                op = self.client_ops[handle]
                self._finish_ok(handle, node.kv.get(op.key))
            else:
                waiting.append((index, handle))
        node.ready_reads = waiting

    def _crash(self, node: SimNode) -> None:
        self._log(f"n{node.id} CRASH")
        for handle in node.crash():
            self._finish_unknown(handle)

    def _restart(self, node: SimNode) -> None:
        if node.alive or node.id in self.retired:
            return
        node.start()
        self.checker.on_restart(node)
        hs = node.disk.hard_state
        self._log(f"n{node.id} RESTART term={hs.term} vote={hs.vote} commit={hs.commit} last={node.disk.last_index()}")
        self._after_input(node)

    # --- Clients -----------------------------------------------------------------------------------

    def _client_request(self, client: int) -> None:
        if not self.clients_active or self.client_busy[client] is not None:
            return
        if self.now > self.scenario.clients_until * self.scenario.fault_ticks * TICK_INTERVAL:
            return
        rng = self.rng
        roll = rng.random()
        kind = OpKind.GET if roll < 0.4 else OpKind.PUT if roll < 0.85 else OpKind.DELETE
        key = b"k%d" % rng.randrange(self.scenario.keys)
        target = self.leader_hint.get(client) or rng.randint(1, len(self.nodes))
        node = self.nodes[target]
        value = b"v%d" % next(self._values) if kind is OpKind.PUT else None
        handle = self.history.invoke(client, kind, key, value)
        self.client_ops[handle] = _ClientOp(client, kind, key, target)
        self.client_busy[client] = handle
        self._log(f"client {client} -> n{target} {kind.value} {key!r} {value!r} (#{handle})")
        if not node.alive:
            self._finish_failed(handle)  # connection refused: definitely not applied
            self.leader_hint.pop(client, None)
            return
        try:
            if kind is OpKind.GET:
                context = b"read-%d" % next(self._read_ids)
                node.rawnode.read_index(context)
                node.pending_reads[context] = handle
            else:
                proposal = node.rawnode.propose(encode_command(client, handle, kind.value, key, value))
                node.pending_writes[proposal.index] = PendingWrite(handle, proposal)
        except ProposalDropped as exc:
            self._finish_failed(handle)
            if exc.leader:
                self.leader_hint[client] = exc.leader
            else:
                self.leader_hint.pop(client, None)
            return
        self._at(self.now + self.scenario.client_timeout_ticks * TICK_INTERVAL, "timeout", handle)
        self._after_input(node)

    def _client_timeout(self, handle: int) -> None:
        op = self.client_ops[handle]
        if self.client_busy.get(op.client) != handle:
            return
        self.nodes[op.node].forget(handle)
        self.leader_hint.pop(op.client, None)
        self._finish_unknown(handle)

    def _finish(self, handle: int) -> _ClientOp | None:
        op = self.client_ops[handle]
        if self.client_busy.get(op.client) != handle:
            return None  # already answered or given up
        self.client_busy[op.client] = None
        self._at(self.now + self.rng.randint(1, TICK_INTERVAL), "client", op.client)
        return op

    def _finish_ok(self, handle: int, output: bytes | None) -> None:
        if self._finish(handle) is not None:
            self._log(f"client #{handle} ok {output!r}")
            self.history.ok(handle, output)

    def _finish_failed(self, handle: int) -> None:
        if self._finish(handle) is not None:
            self._log(f"client #{handle} failed (not applied)")
            self.history.failed(handle)

    def _finish_unknown(self, handle: int) -> None:
        op = self._finish(handle)
        if op is not None:
            self._log(f"client #{handle} outcome unknown")
            self.history.unknown(handle)
            self.leader_hint.pop(op.client, None)

    # --- Faults ----------------------------------------------------------------------------------

    def _leader(self) -> SimNode | None:
        leaders = [
            n
            for n in self.nodes.values()
            if n.alive and n.rawnode.raft.role is StateRole.LEADER and not n.rawnode.removed
        ]
        return max(leaders, key=lambda n: n.rawnode.raft.term) if leaders else None

    def _inject_fault(self, choice: str | None = None) -> None:
        rng = self.rng
        ids = list(self.nodes)
        if choice is None:
            # "wipe" (the last fault) has a weight of its own, drawn last (Scenario.from_seed).
            choice = rng.choices(_FAULTS, weights=(*self.scenario.fault_weights, self.scenario.wipe_weight))[0]
        if choice == "partition":
            rng.shuffle(ids)
            cut = rng.randint(1, len(ids) - 1)
            self.network.partition(set(ids[:cut]), set(ids[cut:]))
            self._log(f"FAULT partition {sorted(ids[:cut])} | {sorted(ids[cut:])}")
        elif choice == "isolate_leader":
            leader = self._leader()
            if leader is not None:
                self.network.partition({leader.id}, set(ids) - {leader.id})
                self._log(f"FAULT isolate leader n{leader.id}")
        elif choice == "bridge":
            # The bridge node sees both halves; the halves do not see each other.
            rng.shuffle(ids)
            bridge, rest = ids[0], ids[1:]
            half = max(1, len(rest) // 2)
            left, right = set(rest[:half]), set(rest[half:])
            self.network.heal()
            for a in left:
                for b in right:
                    self.network.cut.add((a, b))
                    self.network.cut.add((b, a))
            self._log(f"FAULT bridge n{bridge} between {sorted(left)} and {sorted(right)}")
        elif choice == "one_way":
            sender, receiver = rng.sample(ids, 2)
            self.network.cut_one_way(sender, receiver)
            self._log(f"FAULT one-way cut n{sender} -> n{receiver}")
        elif choice == "heal_net":
            self.network.heal()
            self._log("FAULT heal network")
        elif choice in ("crash", "crash_leader"):
            node = self._leader() if choice == "crash_leader" else self.nodes[rng.choice(ids)]
            if node is not None and node.alive:
                self._crash(node)
                if (choice == "crash_leader" and self.scenario.profile == "quiesce" and not self.held_down
                        and rng.random() < 0.5):
                    self.held_down.add(node.id)
                    self._log(f"n{node.id} stays down until the others have a leader again")
                    return
                # Half the time the process is back at once (a supervisor
                # restarting it), so messages sent before the crash still arrive.
                if rng.random() < 0.5:
                    downtime = rng.randint(1, 3 * TICK_INTERVAL)
                else:
                    downtime = rng.randint(1, 40) * TICK_INTERVAL
                self._at(self.now + downtime, "restart", node.id)
        elif choice == "wipe":
            candidates = self._wipe_candidates()
            if candidates:
                node = rng.choice(candidates)
                if node.alive:
                    self._crash(node)
                node.wipe()
                self.lost.add(node.id)
                self._log(f"FAULT n{node.id} loses its disk: it comes back empty, incarnation {node.incarnation:x}")
                self._at(self.now + rng.randint(1, 3 * TICK_INTERVAL), "restart", node.id)
        elif choice == "transfer":
            leader = self._leader()
            if leader is not None:
                target = rng.choice([i for i in ids if i != leader.id])
                self._log(f"FAULT transfer leadership n{leader.id} -> n{target}")
                leader.rawnode.transfer_leader(target)
                self._after_input(leader)

    def _wipe_candidates(self) -> list[SimNode]:
        """Nodes whose disk may be lost now with the group still safe and live
        (docs/raft.md, Incarnations: what the binding protects and what it
        cannot):

        - every other node (not retired) has applied the binding of the
          node's incarnation: before that, a node that never heard of it would
          count the new life's vote (the worker's start rules keep a wiped
          disk from running then; the simulation plays the unprotected worker);
        - everything on its disk is committed: a lost disk whose
          acknowledgement was still to be counted loses that entry's copy
          before the commit (Raft cannot tell);
        - the voters that remain, without the lost ones, are still a majority,
          and no membership change is in flight (one that removes a voter
          could leave the lost one in a smaller majority).
        """
        if self._change_in_flight():
            return []
        membership = self.checker.membership
        lost_voters = len(membership.voters & self.lost)
        spare = len(membership.voters) - membership.quorum()
        candidates = []
        for node in self.nodes.values():
            if node.id in self.lost or node.id not in membership.members():
                continue
            if node.id in membership.voters and lost_voters + 1 > spare:
                continue
            if node.disk.last_index() > len(self.checker.committed):
                continue
            others = [n for n in self.nodes.values() if n is not node and n.id not in self.retired]
            if all(self._applied_conf(other).incarnation_of(node.id) == node.incarnation for other in others):
                candidates.append(node)
        return candidates

    def _change_in_flight(self) -> bool:
        """Whether some node holds a configuration change beyond the committed log."""
        committed = len(self.checker.committed)
        for node in self.nodes.values():
            log = node.rawnode.raft.log if node.alive else node.disk
            last = log.last_index()
            if last <= committed:
                continue
            lo = max(committed + 1, log.first_index())
            try:
                entries = log.slice(lo, last + 1) if node.alive else log.entries(lo, last + 1)
            except (CompactedError, UnavailableError):
                return True
            if any(entry.type is EntryType.CONF_CHANGE for entry in entries):
                return True
        return False

    @staticmethod
    def _applied_conf(node: SimNode) -> ConfState:
        return node.rawnode.conf_state() if node.alive else node.disk.initial_state()[1]

    def _keeps_live_majority(self, conf: ConfState, removed: int) -> bool:
        """Whether removing `removed` leaves a configuration whose voters,
        without those that lost their disk, are still a majority of it."""
        voters = set(conf.voters) - {removed}
        return len(voters - self.lost) >= len(voters) // 2 + 1

    # --- Membership ------------------------------------------------------------------------------

    def _membership_event(self, reason: str | None) -> None:
        if not self.membership_active:
            return
        leader = self._leader()
        if leader is None:
            return
        kinds = ("add_learner", "promote", "remove_follower", "remove_leader", "replace", "double", "invalid")
        kind = self.rng.choices(kinds, weights=(3, 2, 2, 1, 2, 1, 1))[0]
        if reason == "eager":
            kind = self.rng.choice(("add_learner", "promote", "remove_follower"))
            self._log(f"MEMBERSHIP new leader n{leader.id} tries a change at once")
        if kind == "double":
            # Two changes back to back: the second must be refused while the
            # first is in flight.
            for second in self.rng.sample(("add_learner", "promote", "remove_follower"), 2):
                self._simple_change(leader, second)
        elif kind == "remove_leader":
            conf = leader.rawnode.conf_state()
            if len(conf.voters) <= 2 or not self._keeps_live_majority(conf, leader.id):
                return
            if self.rng.random() < 0.5:
                self._propose_change(leader, ConfChange.remove(leader.id), "remove the leader itself")
            else:
                target = self._best_follower(leader)
                if target is not None:
                    self._log(f"MEMBERSHIP hand leadership n{leader.id} -> n{target} before removing n{leader.id}")
                    leader.rawnode.transfer_leader(target)
                    self._after_input(leader)
                    self.plans.append(_Plan(old=leader.id, stage="remove"))
        elif kind == "invalid":
            self._invalid_change(leader)
        elif kind == "replace":
            voters = leader.rawnode.conf_state().voters
            old = self.rng.choice(voters)
            if old in self.lost:
                return  # the operator removes a lost one first (_operator)
            new = self._add_learner(leader)
            if new is not None:
                self._log(f"MEMBERSHIP plan: replace n{old} by n{new}")
                self.plans.append(_Plan(old=old, new=new))
        else:
            self._simple_change(leader, kind)

    def _simple_change(self, leader: SimNode, kind: str) -> None:
        conf = leader.rawnode.conf_state()
        if kind == "add_learner":
            self._add_learner(leader)
        elif kind == "promote":
            if conf.learners:
                node_id = self.rng.choice(conf.learners)
                self._propose_change(leader, ConfChange.promote(node_id), f"promote n{node_id}")
        elif kind == "remove_follower":
            followers = [v for v in conf.voters if v != leader.id] if len(conf.voters) > 2 else []
            followers = [v for v in followers if self._keeps_live_majority(conf, v)]
            # Sometimes a learner: a join abandoned before promotion.
            candidates = followers + list(conf.learners)
            if candidates:
                node_id = self.rng.choice(candidates)
                self._propose_change(leader, ConfChange.remove(node_id), f"remove n{node_id}")

    def _invalid_change(self, leader: SimNode) -> None:
        """A change that can never apply: the core must refuse it before it
        reaches the log."""
        conf = leader.rawnode.conf_state()
        options = [
            (ConfChange.promote(self.rng.choice(conf.voters)), "promote a voter"),
            (ConfChange.remove(self.next_node_id + 50), "remove a node that never joined"),
            (ConfChange.promote(self.next_node_id + 50), "promote a node that never joined"),
            (ConfChange.add_learner(self.rng.choice(conf.voters)), "add a voter as a learner"),
        ]
        if conf.removed:
            removed = self.rng.choice(conf.removed)
            options.append((ConfChange.add_learner(removed), f"re-add removed n{removed}"))
        if len(conf.voters) == 1:
            options.append((ConfChange.remove(conf.voters[0]), "remove the last voter"))
        change, what = self.rng.choice(options)
        last = leader.rawnode.raft.log.last_index()
        if self._propose_change(leader, change, what):
            raise SafetyViolation(f"validation: n{leader.id} accepted an invalid change ({what}: {change.describe()})")
        if leader.rawnode.raft.log.last_index() != last:
            raise SafetyViolation(f"validation: a refused change ({what}) reached n{leader.id}'s log")

    def _add_learner(self, leader: SimNode) -> int | None:
        """Propose a new node as a learner; if the leader takes it, start the
        node from the configuration that adds it (a new id, never reused)."""
        if self.next_node_id > self.scenario.node_count + self.scenario.max_new_nodes:
            return None
        node_id = self.next_node_id
        change = ConfChange.add_learner(node_id, f"host{node_id}", f"10.0.0.{node_id}:50100")
        try:
            bootstrap = confchange.apply(leader.rawnode.conf_state(), change)
        except InvalidConfChange:
            return None
        if not self._propose_change(leader, change, f"add learner n{node_id}"):
            return None
        self.next_node_id += 1
        node = SimNode(node_id, bootstrap, self.scenario.params, self.scenario.seed)
        self.nodes[node_id] = node
        node.start()
        self._log(f"n{node_id} start (joining as a learner)")
        self._at(self.now + self.rng.randrange(1, TICK_INTERVAL), "tick", node_id)
        return node_id

    def _propose_change(self, leader: SimNode, change: ConfChange, what: str) -> bool:
        try:
            leader.rawnode.propose_conf_change(change)
        except (ProposalDropped, InvalidConfChange) as exc:
            self.membership_counts[type(exc).__name__] += 1
            self._log(f"MEMBERSHIP n{leader.id} refuses to {what}: {exc}")
            return False
        self._log(f"MEMBERSHIP n{leader.id} proposes to {what}")
        if self.rng.random() < self.scenario.fault_after_change:
            # A fault while the change is in flight: the next leader may
            # inherit it uncommitted.
            fault = self.rng.choice(("crash_leader", "isolate_leader", "partition"))
            self._at(self.now + self.rng.randint(1, 3 * TICK_INTERVAL), "fault", fault)
        self._after_input(leader)
        return True

    def _best_follower(self, leader: SimNode) -> int | None:
        status = leader.rawnode.status()
        voters = [
            (p.match, node_id)
            for node_id, p in status.progress.items()
            if node_id != leader.id and not p.is_learner and p.recent_active
        ]
        return max(voters)[1] if voters else None

    def _operator(self) -> None:
        """What the driver above the core does on its own: promote learners
        the leader reports caught up, and follow the plans."""
        if not self.membership_active:
            return
        self._at(self.now + OPERATOR_TICKS * TICK_INTERVAL, "operator", None)
        leader = self._leader()
        if leader is None:
            return
        conf = leader.rawnode.conf_state()
        lost = sorted(self.lost & conf.ids())
        if lost and (len(conf.voters) > 2 or lost[0] in conf.learners):
            # `shardnode start --new` for a lost disk: the old id goes first.
            self._propose_change(leader, ConfChange.remove(lost[0]), f"remove n{lost[0]} (its disk was lost)")
            return
        for plan in list(self.plans):
            if plan.stage == "promote":
                if plan.new in conf.removed:
                    self.plans.remove(plan)
                elif plan.new in conf.voters:
                    plan.stage = "remove"
                elif plan.new in leader.rawnode.caught_up_learners():
                    if self._propose_change(leader, ConfChange.promote(plan.new), f"promote n{plan.new} (replacing n{plan.old})"):
                        plan.stage = "remove"
                    return
            if plan.stage == "remove":
                if plan.old not in conf.voters and plan.old not in conf.learners:
                    self.plans.remove(plan)
                    continue
                if plan.old == leader.id:
                    # Hand leadership over first; the next leader removes it.
                    target = self._best_follower(leader)
                    if target is not None:
                        leader.rawnode.transfer_leader(target)
                        self._after_input(leader)
                    return
                if (len(conf.voters) > 2 and self._keeps_live_majority(conf, plan.old)) or plan.old in conf.learners:
                    if self._propose_change(leader, ConfChange.remove(plan.old), f"remove n{plan.old} (plan)"):
                        self.plans.remove(plan)
                return
        ready = leader.rawnode.caught_up_learners()
        if ready:
            self._propose_change(leader, ConfChange.promote(ready[0]), f"promote caught-up learner n{ready[0]}")

    def _heal(self) -> None:
        self._log("HEAL: network healed, every node restarted, clients stop")
        self.network.heal()
        self.network.faults = NetworkFaults(min_delay=1, max_delay=3)
        self.clients_active = False
        self.membership_active = False
        for node in self.nodes.values():
            if not node.alive and node.id not in self.held_down:
                self._restart(node)
        self._at(self.now + TICK_INTERVAL, "liveness", None)

    def _check_liveness(self, probe: tuple[int, int, int] | None) -> bool:
        """Once a leader exists, propose an entry; done when every node applied it
        (and, with quiescence on, once the whole group then quiesces)."""
        if self._quiet_since is not None:
            return self._check_quiet()
        if probe is None:
            leader = self._leader()
            if leader is not None:
                try:
                    proposal = leader.rawnode.propose(b"")
                    self._after_input(leader)
                    probe = (leader.id, proposal.index, proposal.term)
                    self._log(f"LIVENESS probe proposed at n{leader.id} index {proposal.index}")
                except ProposalDropped:
                    probe = None
        else:
            leader_id, index, term = probe
            # Every member of the final configuration (voters and learners)
            # must apply it; removed nodes, nodes that never joined and ids
            # whose disk was lost (a life the group does not count) need not.
            members = [self.nodes[i] for i in self.checker.membership.members() - self.lost - self.held_down
                       if i in self.nodes]
            if all(n.applied_index >= index for n in members):
                if self.checker.committed[index - 1].term == term:
                    if self.held_down:
                        # The others elected a leader without it: now it comes back, and must catch up.
                        self._log(f"LIVENESS ok without n{sorted(self.held_down)}: restart them, probe again")
                        for node_id in sorted(self.held_down):
                            self.held_down.discard(node_id)
                            self._restart(self.nodes[node_id])
                        probe = None
                    elif self.quiescence:
                        return self._check_quiet()
                    else:
                        self._log("LIVENESS ok: probe applied on every node")
                        return True
                else:
                    probe = None  # the probe was lost to an election: try again
            else:
                raft = self.nodes[leader_id].rawnode.raft
                if raft.role is not StateRole.LEADER or raft.term != term:
                    probe = None  # proposed to a leader that was already deposed
        self._at(self.now + TICK_INTERVAL, "liveness", probe)
        return False


    # --- Quiescence -------------------------------------------------------------------------------

    def _watch_leader_link(self, node: SimNode) -> None:
        """What the worker's transport does for a quiesced follower: a link to
        its leader that stays broken (the leader down, or cut off either
        way) is reported to the core a few ticks later (pings unanswered)."""
        raft = node.rawnode.raft
        lead = raft.lead
        if not raft.quiesced or raft.role is not StateRole.FOLLOWER or lead == 0:
            self._link_down_since.pop(node.id, None)
            return
        leader = self.nodes.get(lead)
        cut = self.network.cut
        if leader is not None and leader.alive and (node.id, lead) not in cut and (lead, node.id) not in cut:
            self._link_down_since.pop(node.id, None)
            return
        since = self._link_down_since.setdefault(node.id, self.now)
        if self.now - since >= LINK_DETECT_TICKS * TICK_INTERVAL:
            del self._link_down_since[node.id]
            self._log(f"n{node.id} link to its leader n{lead} broken: reported unreachable")
            node.rawnode.report_unreachable(lead)
            self._after_input(node)

    def _check_quiesced(self, node: SimNode) -> None:
        """A quiesced follower holds what its quiesced leader (same term) committed:
        a group at rest has every caught-up member at rest with the whole log."""
        raft = node.rawnode.raft
        if not node.alive or not raft.quiesced:
            return
        if raft.role is StateRole.LEADER:
            leader, followers = node, [n for n in self.nodes.values() if n is not node]
        else:
            leader = self.nodes.get(raft.lead)
            if leader is None:
                return
            followers = [node]
        if not leader.alive:
            return
        lraft = leader.rawnode.raft
        if not lraft.quiesced or lraft.role is not StateRole.LEADER:
            return
        committed = lraft.log.committed
        for follower in followers:
            if not follower.alive:
                continue
            fraft = follower.rawnode.raft
            if not fraft.quiesced or fraft.lead != leader.id or fraft.term != lraft.term:
                continue
            if not fraft.log.match_term(committed, lraft.log.term_or_zero(committed)):
                raise SafetyViolation(
                    f"quiescence: n{follower.id} is quiesced without entry {committed} that its quiesced leader "
                    f"n{leader.id} committed (its last index {fraft.log.last_index()})")

    def _check_quiet(self) -> bool:
        """Calm, with quiescence on: the whole group must quiesce within QUIET_TICKS."""
        if self._quiet_since is None:
            self._quiet_since = self.now
            self._log("LIVENESS ok: probe applied on every node; now the group must quiesce")
        leader = self._leader()
        if leader is not None and leader.rawnode.caught_up_learners():
            # What the worker's driver does at any time (the operator is off now): a group
            # does not quiesce while it has a learner to promote.
            self._propose_change(leader, ConfChange.promote(leader.rawnode.caught_up_learners()[0]),
                                 "promote a caught-up learner (calm)")
        members = [self.nodes[i] for i in self.checker.membership.members() - self.lost if i in self.nodes]
        if all(n.alive and n.rawnode.quiesced for n in members):
            self._log("QUIET ok: every member quiesced")
            return True
        if self.now - self._quiet_since > QUIET_TICKS * TICK_INTERVAL:
            awake = sorted(n.id for n in members if not n.rawnode.quiesced)
            raise SafetyViolation(f"quiescence: the group did not quiesce within {QUIET_TICKS} calm ticks "
                                  f"(awake: {', '.join(f'n{i}' for i in awake)})")
        self._at(self.now + TICK_INTERVAL, "liveness", None)
        return False


_FAULTS = ("partition", "isolate_leader", "bridge", "one_way", "heal_net", "crash", "crash_leader", "transfer", "wipe")


def _change_kind(before: Membership, after: Membership) -> str:
    if after.removed - before.removed:
        gone = next(iter(after.removed - before.removed))
        return "remove_voter" if gone in before.voters else "remove_learner"
    if after.learners - before.learners:
        return "add_learner"
    if after.voters - before.voters:
        return "promote"
    return "no-op"


def _fields(faults: NetworkFaults) -> dict[str, Any]:
    return {name: getattr(faults, name) for name in NetworkFaults.__slots__}


def _fmt_message(m: Message) -> str:
    t = m.type
    text = f"{t.name} term={m.term}"
    if t in (MessageType.APP, MessageType.SNAP):
        if m.snapshot is not None:
            text += f" snapshot@{m.snapshot.metadata.index}/{m.snapshot.metadata.term}"
        else:
            ents = f" ents={m.entries[0].index}..{m.entries[-1].index}" if m.entries else ""
            text += f" prev={m.index}/{m.log_term}{ents} commit={m.commit}"
    elif t is MessageType.APP_RESP:
        text += f" index={m.index}" + (f" REJECT hint={m.reject_hint}/{m.log_term}" if m.reject else "")
    elif t in (MessageType.VOTE, MessageType.PRE_VOTE):
        text += f" last={m.index}/{m.log_term}"
    elif t in (MessageType.VOTE_RESP, MessageType.PRE_VOTE_RESP):
        text += " REJECT" if m.reject else " granted"
    elif t in (MessageType.HEARTBEAT,):
        text += f" commit={m.commit}"
    elif t is MessageType.QUIESCE:
        text += f" last={m.index}/{m.log_term} commit={m.commit}"
    elif t is MessageType.HEARTBEAT_RESP and m.reject:
        text += " WAKE"
    elif t in (MessageType.READ_INDEX_RESP,):
        text += f" index={m.index}"
    elif t is MessageType.NOTICE:
        text += f" {m.context.decode(errors='replace')}" + (f" bound={m.index:x}" if m.index else "")
    return text


PROFILES = ("default", "static", "membership", "wipe", "crashes", "quiesce")


def run_seed(seed: int, trace: bool = False, profile: str = "default") -> SimResult:
    return Simulation(Scenario.from_seed(seed, profile), trace=trace).run()
