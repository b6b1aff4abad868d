"""A deterministic, seeded simulation of changes of shape under concurrent
and zombie schedulers (shardnode/placement/lease.py, intents.py,
shardnode/replica/shape_policy.py, shardnode/storage/fencing.py;
docs/membership.md, "One scheduler").

Real parts: the scheduler's lease (SchedulerLease) and the intent records
(IntentBook) over an in-memory metadata group with guarded compare-and-set
(tests/sim/metadata.py); at each data group, the leader's checks (the shape
policy, the expected configuration, the fencing token) and the configuration
rules of the Raft core (confchange.check/apply); the fencing admission at
apply time.

Modelled: each data group is its leader's view — an applied configuration,
the fencing token it applied, and a log of accepted entries applied later,
one change in flight at a time; the leader promotes a caught-up learner by
itself. Members go down and come back (the policy's "live"). Schedulers are
actors that step one at a time, chosen by one random.Random: they record
intents (leave a host, add or remove a member), take the lease, fence every
group, carry intents out by planning one change on the configuration they
read and proposing it with that configuration and their token — exactly as
MembershipAdmin does — and record their choices and outcomes in the intent.
Proposals travel through a network that delays, reorders and duplicates
them. Actors pause (SIGSTOP) for longer than the lease, so their lease
expires, another actor takes over, and the paused one wakes up as a zombie
that goes on with its old token and its stale view. Some actors are "direct
admins" that change membership without the scheduler (a test's
MembershipAdmin, an operator script): only the leader's checks stand between
them and the schedulers.

Invariants, after every step:
- every group keeps at least MIN_VOTERS voters, and a host holds at most one
  member of a group;
- every change the group applies was admitted against the configuration and
  the fencing token current when it applied;
- intent records never go back: a finished intent stays finished with its
  outcome, and a durable choice (work) once recorded is never overwritten;
- no change made on behalf of an intent applies after that intent was
  recorded finished (a zombie finishing what another scheduler finished);
- at the end (pauses over, the network drained), every intent is finished
  and each DONE intent's effect holds unless a later intent undid it.

    python -m tests.sim.schedulers --seed 12 --trace    # replay one seed
    python -m tests.sim.schedulers --seeds 0:500        # a range, with totals
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from shardnode.placement.intents import Intent, IntentBook, IntentKind, IntentState
from shardnode.placement.lease import SchedulerLease
from shardnode.raft import ConfChange, ConfChangeType, ConfState, InvalidConfChange
from shardnode.raft import confchange
from shardnode.replica import shape_policy
from shardnode.storage import fencing

from .metadata import InMemoryMetadata

TRACE_LINES = 80
LEASE_SECONDS = 8.0


class Violation(Exception):
    """An invariant does not hold; the message starts with its name."""


def drive(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends (the in-memory metadata group
    answers at once) to its end, without an event loop."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    coroutine.close()
    raise RuntimeError("a simulated call suspended")


@dataclass(slots=True, frozen=True)
class Scenario:
    seed: int
    groups: int
    hosts: int
    schedulers: int
    direct_admins: int
    intents: int
    steps: int
    pause_rate: float
    down_rate: float
    delay_rate: float
    duplicate_rate: float
    skew: float

    @classmethod
    def from_seed(cls, seed: int) -> Scenario:
        rng = random.Random(seed)
        admins_only = rng.random() < 0.25      # concurrent admins with no scheduler (no token yet)
        return cls(seed=seed, groups=rng.choice([1, 2, 3]), hosts=rng.choice([5, 6, 7]),
                   schedulers=0 if admins_only else rng.choice([2, 3, 3, 4]),
                   direct_admins=rng.choice([2, 3]) if admins_only else 0,
                   intents=0 if admins_only else rng.randint(3, 9), steps=rng.randint(300, 900),
                   pause_rate=rng.choice([0.0, 0.01, 0.03]), down_rate=rng.choice([0.0, 0.01, 0.03]),
                   delay_rate=rng.choice([0.2, 0.5, 0.8]), duplicate_rate=rng.choice([0.0, 0.05, 0.2]),
                   skew=rng.choice([0.0, 1.0, 3.0]))

    def describe(self) -> str:
        return (f"seed={self.seed} groups={self.groups} hosts={self.hosts} schedulers={self.schedulers} "
                f"direct_admins={self.direct_admins} intents={self.intents} steps={self.steps} "
                f"pause={self.pause_rate} down={self.down_rate} delay={self.delay_rate} "
                f"duplicate={self.duplicate_rate} skew={self.skew}")


@dataclass
class Variant:
    """Switches that break one safety rule each (the broken variants)."""

    leader_checks_policy: bool = True       # the leader checks min voters and a live majority
    leader_checks_expected: bool = True     # the leader refuses a change planned on another configuration
    fence_at_apply: bool = True             # a change with a smaller token is refused when applied
    fence_at_proposal: bool = True          # ... and when proposed
    guarded_records: bool = True            # the scheduler's intent writes are guarded by its lease


# --- Data groups ---------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Proposal:
    group: int
    change: ConfChange | None     # None: a FENCE (raises the group's token; not a membership change)
    fence: int
    expected: tuple[tuple[int, ...], tuple[int, ...]] | None
    intent_id: int            # on whose behalf (0: a direct admin)
    sender: str


@dataclass(slots=True, frozen=True)
class RecordWrite:
    intent_id: int
    changes: dict[str, Any]


@dataclass
class SimGroup:
    number: int
    conf: ConfState
    hosts: dict[int, str]                  # node id -> host (every member ever)
    fence: int = 0
    log: list[Proposal] = field(default_factory=list)      # accepted, not applied yet
    applied: int = 0

    def member_on(self, host: str) -> int | None:
        for node_id in self.conf.ids():
            if self.hosts.get(node_id) == host:
                return node_id
        return None


@dataclass
class Actor:
    name: str
    lease: SchedulerLease
    direct: bool = False                   # a direct admin: no lease, no intents
    paused_until: float = 0.0
    holding: bool = False
    fenced: bool = False
    fences: list[Proposal] = field(default_factory=list)    # its FENCEs not applied yet
    outbox: Proposal | RecordWrite | None = None   # planned on what it read, done at its next step


@dataclass
class SchedulerSimResult:
    scenario: Scenario
    violation: str | None
    trace: list[str]
    counts: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return self.violation is None

    def report(self) -> str:
        lines = [f"SCHEDULER SIMULATION FAILED: {self.violation}",
                 f"  scenario: {self.scenario.describe()}",
                 f"  replay:   .venv/bin/python -m tests.sim.schedulers --seed {self.scenario.seed} --trace",
                 "  trace (last events):"]
        lines += ["    " + line for line in self.trace[-TRACE_LINES:]]
        return "\n".join(lines)


class SchedulerSimulation:
    def __init__(self, scenario: Scenario, variant: Variant | None = None, trace: bool = False) -> None:
        self.scenario = scenario
        self.variant = variant or Variant()
        self.rng = random.Random(scenario.seed * 7919 + 1)
        self.tracing = trace
        self.trace: list[str] = []
        self.counts: Counter = Counter()
        self.now = 1_000.0
        self.meta = InMemoryMetadata()
        ids = iter(range(1, 1 << 30))
        self.book = IntentBook(self.meta, clock=lambda: self.now, new_id=lambda: next(ids) * 1009)
        self.hosts = [f"h{i}" for i in range(1, scenario.hosts + 1)]
        self.down: set[str] = set()
        # Every group starts with a voter on each of the first five hosts.
        self.groups = {g: SimGroup(g, ConfState(voters=tuple(range(1, 6))), {n: f"h{n}" for n in range(1, 6)})
                       for g in range(scenario.groups)}
        self.network: list[tuple[int, Proposal]] = []      # (deliver at step, proposal)
        self.step_number = 0
        self.actors = [self._actor(f"s{i}") for i in range(scenario.schedulers)]
        self.actors += [Actor(f"admin{i}", self._lease(f"admin{i}"), direct=True) for i in range(scenario.direct_admins)]
        self.finished_at: dict[int, int] = {}              # intent id -> step recorded finished
        self.seen_records: dict[int, Intent] = {}
        self.submitted = 0

    # --- Plumbing ---------------------------------------------------------------------------

    def log(self, line: str) -> None:
        if self.tracing:
            self.trace.append(f"[{self.step_number:4}] {line}")

    def _lease(self, name: str) -> SchedulerLease:
        skew = self.rng.uniform(-self.scenario.skew, self.scenario.skew)
        return SchedulerLease(self.meta, name, duration=LEASE_SECONDS, clock=lambda: self.now + skew)

    def _actor(self, name: str) -> Actor:
        return Actor(name, self._lease(name))

    def intents(self) -> list[Intent]:
        return drive(self.book.all())

    # --- The run ------------------------------------------------------------------------------

    def run(self) -> SchedulerSimResult:
        try:
            for self.step_number in range(self.scenario.steps):
                self._step(calm=False)
            self._quiesce()
            self._check_end()
        except Violation as exc:
            return SchedulerSimResult(self.scenario, str(exc), self.trace, self.counts)
        return SchedulerSimResult(self.scenario, None, self.trace, self.counts)

    def _quiesce(self) -> None:
        """Faults stop: every host up, no pause; run until every intent is
        finished and the network is empty (bounded)."""
        self.down.clear()
        for actor in self.actors:
            actor.paused_until = 0.0
        for self.step_number in range(self.step_number + 1, self.step_number + 20_000):
            self._step(calm=True)
            if not self.network and all(g.log == [] for g in self.groups.values()) and \
                    all(i.state.finished for i in self.intents()) and self.submitted >= self.scenario.intents:
                return
        raise Violation(f"liveness: not every intent finished "
                        f"({[(i.intent_id, i.state.value) for i in self.intents() if not i.state.finished]})")

    def _step(self, calm: bool) -> None:
        self.now += 0.25
        rng = self.rng
        if not calm:
            self._faults()
        if self.submitted < self.scenario.intents and rng.random() < 0.05:
            self._submit()
        for at, proposal in [p for p in self.network if p[0] <= self.step_number]:
            self.network.remove((at, proposal))
            self._deliver(proposal)
        for group in self.groups.values():
            if group.log and rng.random() < 0.5:
                self._apply(group)
            elif not group.log:
                self._promote(group)
        actor = rng.choice(self.actors)
        if actor.paused_until <= self.now:
            if actor.direct:
                self._direct_admin(actor, calm)
            else:
                self._schedule(actor)
        self._check()

    def _faults(self) -> None:
        rng = self.rng
        if rng.random() < self.scenario.pause_rate:
            actor = rng.choice(self.actors)
            actor.paused_until = self.now + rng.uniform(LEASE_SECONDS, 4 * LEASE_SECONDS)
            self.counts["pauses"] += 1
            self.log(f"{actor.name} paused until {actor.paused_until:.1f}")
        if rng.random() < self.scenario.down_rate:
            host = rng.choice(self.hosts)
            if host in self.down:
                self.down.discard(host)
                self.log(f"{host} up")
            elif len(self.down) < 2:
                self.down.add(host)
                self.counts["downs"] += 1
                self.log(f"{host} down")

    def _submit(self) -> None:
        rng = self.rng
        kind = rng.choice([IntentKind.LEAVE, IntentKind.MEMBER_ADD, IntentKind.MEMBER_REMOVE, IntentKind.MEMBER_ADD])
        host = rng.choice(self.hosts)
        if kind is IntentKind.LEAVE:
            args: dict[str, Any] = {"server": host, "clean": False}
        else:
            args = {"group": rng.randrange(self.scenario.groups), "host": host}
        intent, new = drive(self.book.submit(kind, args))
        self.submitted += 1
        self.counts["intents"] += new
        if rng.random() < 0.1:
            drive(self.book.cancel(intent.intent_id))
            self.counts["cancels"] += 1
        self.log(f"intent {intent.intent_id % 1000} {intent.describe()} {'recorded' if new else 'attached'}")

    # --- Groups ---------------------------------------------------------------------------------

    def _deliver(self, proposal: Proposal) -> None:
        """At the group's leader: the checks made when a change is proposed."""
        group = self.groups[proposal.group]
        change = proposal.change
        if change is None:
            group.log.append(proposal)
            return
        if any(entry.change is not None for entry in group.log):
            self.log(f"g{group.number}: {change.describe()} from {proposal.sender}: retry (a change in flight)")
            return
        if self.variant.fence_at_proposal and not fencing.admits_membership_change(
                group.fence, proposal.fence, leaders_own=change.type is ConfChangeType.ADD_NODE):
            self.counts["fenced_at_proposal"] += 1
            self.log(f"g{group.number}: {change.describe()} from {proposal.sender}: fenced ({proposal.fence} < "
                     f"{group.fence})")
            return
        live = {n for n, h in group.hosts.items() if h not in self.down}
        expected = proposal.expected if self.variant.leader_checks_expected else None
        problem = shape_policy.check(group.conf, change, _leader(group, live), live, expected) \
            if self.variant.leader_checks_policy or expected is not None else None
        if problem is not None and not self.variant.leader_checks_policy and "changed meanwhile" not in problem:
            problem = None
        if problem is None:
            try:
                confchange.check(group.conf, change)
            except InvalidConfChange as exc:
                problem = str(exc)
        if problem is not None:
            self.counts["refused"] += 1
            self.log(f"g{group.number}: {change.describe()} from {proposal.sender}: refused ({problem[:60]})")
            return
        group.log.append(proposal)
        self.log(f"g{group.number}: {change.describe()} from {proposal.sender} (token {proposal.fence}) accepted")

    def _apply(self, group: SimGroup) -> None:
        proposal = group.log.pop(0)
        change = proposal.change
        if change is None:
            group.fence = max(group.fence, proposal.fence)
            self.log(f"g{group.number}: FENCE {proposal.fence} applied")
            return
        if self.variant.fence_at_apply and not fencing.admits_membership_change(
                group.fence, proposal.fence, leaders_own=change.type is ConfChangeType.ADD_NODE):
            self.counts["fenced_at_apply"] += 1
            self.log(f"g{group.number}: {change.describe()} fenced at apply")
            return
        if proposal.intent_id and proposal.intent_id in self.finished_at:
            raise Violation(f"finished means finished: group {group.number} applies {change.describe()} for intent "
                            f"{proposal.intent_id}, recorded finished at step {self.finished_at[proposal.intent_id]} "
                            f"(sent by {proposal.sender}, token {proposal.fence}, group token {group.fence})")
        conf, refusal = confchange.apply_committed(group.conf, change)
        if refusal is None:
            group.conf = conf
            if change.type is ConfChangeType.ADD_LEARNER_NODE:
                group.hosts[change.node_id] = change.host
            self.counts["applied"] += 1
        group.fence = max(group.fence, proposal.fence)
        self.log(f"g{group.number}: applied {change.describe()} -> voters {list(group.conf.voters)} learners "
                 f"{list(group.conf.learners)}")

    def _promote(self, group: SimGroup) -> None:
        """The leader promotes a learner once caught up (here: once it is up)."""
        for node_id in group.conf.learners:
            if group.hosts[node_id] not in self.down and self.rng.random() < 0.3:
                group.log.append(Proposal(group.number, ConfChange.promote(node_id), 0, None, 0, "leader"))
                return

    # --- Schedulers -----------------------------------------------------------------------------

    def _schedule(self, actor: Actor) -> None:
        if not actor.holding:
            if not any(not i.state.finished for i in self.intents()):
                return
            if drive(actor.lease.acquire()):
                actor.holding, actor.fenced, actor.fences, actor.outbox = True, False, [], None
                self.counts["takeovers"] += 1
                self.log(f"{actor.name} takes the lease, token {actor.lease.token}")
            return
        # A renewal now and then; a holder whose lease was taken over is a zombie
        # until it notices (it goes on with its stale view until then).
        if self.rng.random() < 0.3:
            try:
                drive(actor.lease.renew())
            except Exception:
                self.log(f"{actor.name} lost the lease (token {actor.lease.token})")
                actor.holding = False
                return
        if not actor.fenced:
            # FENCE every group (a shard command: in each log after what is there), and
            # wait until each is applied before acting (the Shard RPC answers once applied).
            if not actor.fences:
                actor.fences = [Proposal(g.number, None, actor.lease.token, None, 0, actor.name + "/fence")
                                for g in self.groups.values()]
                for fence in actor.fences:
                    self.groups[fence.group].log.append(fence)
            if any(fence in self.groups[fence.group].log for fence in actor.fences):
                return
            actor.fenced, actor.fences = True, []
            return
        if actor.outbox is not None:
            outbox, actor.outbox = actor.outbox, None
            if isinstance(outbox, RecordWrite):
                self._write(actor, outbox)
            else:
                self._transmit(outbox)
            return
        intent = self._current_intent(actor)
        if intent is None:
            drive(actor.lease.release())
            actor.holding = False
            self.log(f"{actor.name} releases the lease")
            return
        self._work_on(actor, intent)

    def _current_intent(self, actor: Actor) -> Intent | None:
        pending = sorted((i for i in self.intents() if not i.state.finished), key=lambda i: i.submitted_ms)
        return pending[0] if pending else None

    def _guards(self, actor: Actor) -> tuple[tuple[bytes, bytes | None], ...]:
        return actor.lease.guards if self.variant.guarded_records else ()

    def _update(self, actor: Actor, intent: Intent, **changes: Any) -> None:
        """Plan a write of the intent's record, computed from what was read
        now; it is made at the actor's next step (which may come after a
        pause, when the lease has moved on)."""
        actor.outbox = RecordWrite(intent.intent_id, changes)

    def _write(self, actor: Actor, write: RecordWrite) -> None:
        guards = self._guards(actor)
        updated = drive(self.book.update(write.intent_id, lambda i: replace(i, **write.changes), guards))
        if updated is None:
            self.log(f"{actor.name}: guarded write refused (the lease moved on)")
            actor.holding = False
            return
        self.log(f"{actor.name}: wrote intent {write.intent_id % 1000}: {sorted(write.changes)}")
        if updated.state.finished:
            self.finished_at.setdefault(write.intent_id, self.step_number)

    def _work_on(self, actor: Actor, intent: Intent) -> None:
        if intent.state is IntentState.PENDING:
            if intent.cancel_requested:
                self._update(actor, intent, state=IntentState.CANCELLED, outcome="cancelled")
                return
            self._update(actor, intent, state=IntentState.RUNNING, token=actor.lease.token)
            return
        change, group, done, refused = self._plan(intent)
        if refused:
            self._update(actor, intent, state=IntentState.FAILED, outcome=refused)
            self.log(f"{actor.name}: intent {intent.intent_id % 1000} failed: {refused}")
            return
        if done:
            self._update(actor, intent, state=IntentState.DONE, outcome="done")
            self.log(f"{actor.name}: intent {intent.intent_id % 1000} done")
            return
        if change is None or group is None:
            return              # waiting for the leader to promote our learner
        if change.type is ConfChangeType.ADD_LEARNER_NODE and "node" not in intent.work:
            # The durable choice first, then the change (as MembershipAdmin does).
            self._update(actor, intent, work={**intent.work, "node": change.node_id})
            return
        self._send(actor, group, change, intent.intent_id)

    def _plan(self, intent: Intent) -> tuple[ConfChange | None, SimGroup | None, bool, str]:
        """The next change the intent needs, on the configuration as read now
        (the applied one): (change, group, done, refusal)."""
        args = intent.args
        if intent.kind is IntentKind.LEAVE:
            for group in self.groups.values():
                node_id = group.member_on(args["server"])
                if node_id is not None:
                    problem = self._precheck_removal(group, node_id)
                    if problem:
                        return None, None, False, problem
                    return ConfChange.remove(node_id), group, False, ""
            return None, None, True, ""
        group = self.groups[args["group"]]
        node_id = group.member_on(args["host"])
        if intent.kind is IntentKind.MEMBER_REMOVE:
            if node_id is None:
                return None, None, True, ""
            problem = self._precheck_removal(group, node_id)
            if problem:
                return None, None, False, problem
            return ConfChange.remove(node_id), group, False, ""
        chosen = intent.work.get("node")
        if node_id is not None:
            if node_id in group.conf.voters:
                return None, None, True, ""
            if node_id != chosen:
                return None, None, False, "the host holds a replica not added by this change"
            return None, group, False, ""         # a learner of ours: the leader promotes it
        if chosen is not None and chosen in group.conf.removed:
            return None, None, False, f"node {chosen} was removed meanwhile"
        if chosen is None:
            chosen = max([len(self.hosts), *group.hosts]) + 1
        return ConfChange.add_learner(chosen, args["host"], args["host"]), group, False, ""

    def _precheck_removal(self, group: SimGroup, node_id: int) -> str:
        voters_after = set(group.conf.voters) - {node_id}
        if node_id in group.conf.voters and len(voters_after) < shape_policy.MIN_VOTERS:
            return f"group {group.number} would drop to {len(voters_after)} voters"
        return ""

    def _send(self, actor: Actor, group: SimGroup, change: ConfChange | None, intent_id: int) -> None:
        """Plan: a proposal made on the configuration as read now, sent at the
        actor's next step (it may be paused in between, and wake a zombie)."""
        if change is None:
            return
        expected = (tuple(group.conf.voters), tuple(group.conf.learners))
        proposal = Proposal(group.number, change, actor.lease.token if not actor.direct else 0, expected, intent_id,
                            actor.name)
        actor.outbox = proposal

    def _transmit(self, proposal: Proposal) -> None:
        delay = self.rng.randint(0, 12) if self.rng.random() < self.scenario.delay_rate else 0
        self.network.append((self.step_number + delay, proposal))
        if self.rng.random() < self.scenario.duplicate_rate:
            self.network.append((self.step_number + self.rng.randint(1, 20), proposal))
        self.counts["proposals"] += 1

    # --- Direct admins (no scheduler) ----------------------------------------------------------

    def _direct_admin(self, actor: Actor, calm: bool) -> None:
        """Removes and adds members on its own view, now and then (a test's
        MembershipAdmin; an operator's script): planned at one step, sent at
        its next."""
        if actor.outbox is not None:
            outbox, actor.outbox = actor.outbox, None
            assert isinstance(outbox, Proposal)
            self._transmit(outbox)
            return
        if calm or self.rng.random() > 0.2:
            return
        group = self.groups[self.rng.randrange(self.scenario.groups)]
        voters = list(group.conf.voters)
        if len(voters) > 3 and self.rng.random() < 0.6:
            node_id = self.rng.choice(voters)
            if len(set(voters) - {node_id}) >= shape_policy.MIN_VOTERS:
                self._send(actor, group, ConfChange.remove(node_id), 0)
        else:
            free = [h for h in self.hosts if group.member_on(h) is None]
            if free:
                host = self.rng.choice(free)
                self._send(actor, group, ConfChange.add_learner(max([len(self.hosts), *group.hosts]) + 1, host, host), 0)

    # --- Invariants -------------------------------------------------------------------------------

    def _check(self) -> None:
        for group in self.groups.values():
            if len(group.conf.voters) < shape_policy.MIN_VOTERS:
                raise Violation(f"min voters: group {group.number} has voters {list(group.conf.voters)}")
            hosts = [group.hosts[n] for n in group.conf.ids()]
            if len(hosts) != len(set(hosts)):
                raise Violation(f"one member per host: group {group.number} has {sorted(hosts)}")
        for intent in self.intents():
            before = self.seen_records.get(intent.intent_id)
            if before is not None:
                if before.state.finished and (intent.state != before.state or intent.outcome != before.outcome):
                    raise Violation(f"records never go back: intent {intent.intent_id} was {before.state.value} "
                                    f"({before.outcome}), now {intent.state.value}")
                for key, value in before.work.items():
                    if intent.work.get(key) != value:
                        raise Violation(f"records never go back: intent {intent.intent_id}'s choice {key}="
                                        f"{value} became {intent.work.get(key)}")
            self.seen_records[intent.intent_id] = intent

    def _check_end(self) -> None:
        for intent in self.intents():
            if intent.state is not IntentState.DONE or intent.kind is not IntentKind.MEMBER_ADD:
                continue
            later = [i for i in self.intents() if i.submitted_ms > intent.submitted_ms and i.state is IntentState.DONE
                     and i.kind in (IntentKind.LEAVE, IntentKind.MEMBER_REMOVE)]
            group = self.groups[intent.args["group"]]
            node_id = group.member_on(intent.args["host"])
            undone = later or self.scenario.direct_admins
            if not undone and (node_id is None or node_id not in group.conf.voters):
                raise Violation(f"effect: intent {intent.intent_id} (member add of {intent.args['host']} to group "
                                f"{group.number}) is done but the host holds no voter there")


def _leader(group: SimGroup, live: set[int]) -> int:
    up = [n for n in group.conf.voters if n in live]
    return up[0] if up else group.conf.voters[0]


def run_seed(seed: int, variant: Variant | None = None, trace: bool = False) -> SchedulerSimResult:
    return SchedulerSimulation(Scenario.from_seed(seed), variant, trace).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int)
    parser.add_argument("--seeds", default="0:200")
    parser.add_argument("--trace", action="store_true")
    args = parser.parse_args(argv)
    if args.seed is not None:
        result = run_seed(args.seed, trace=args.trace)
        print(result.report() if not result.ok else "\n".join(result.trace + [f"ok: {dict(result.counts)}"]))
        return 0 if result.ok else 1
    start, stop = (int(x) for x in args.seeds.split(":"))
    totals: Counter = Counter()
    for seed in range(start, stop):
        result = run_seed(seed)
        if not result.ok:
            print(run_seed(seed, trace=True).report())
            return 1
        totals.update(result.counts)
    print(f"{stop - start} seeds ok: {dict(totals)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
