"""A deterministic, seeded simulation of moving key space between groups
(shardnode/placement/moves.py, docs/sharding.md), with crashes at every
step, concurrent runs of one move and schedulers taken over.

Each group is one real ReplicaStore (in a temporary directory, on tmpfs when
there is one): a group's Raft log is a total order, so one state machine
applying the group's entries one by one models it. The metadata group is an
in-memory key-value store with compare-and-set and guards. The real Mover
drives the moves through two ports over them (GroupPort, DirectoryPort).

Every call a mover makes through the ports first awaits a `Turn`: the
mover's coroutine stops there and the simulation decides who calls next, so
several movers' calls interleave one call at a time, in an order the seed
decides. One seeded random.Random decides everything, one step at a time:
- mover steps: one phase of a move (Mover.run with stop_after), or an abort
  before the freeze, by the live scheduler's mover (token and lease: its
  commands carry the token, its metadata writes are guarded by the lease);
- client operations: several clients, each with a session (client id,
  sequence + 1 per write, one write in flight), route puts, deletes and gets
  with the map they last read (refreshed at random, so some are stale) and
  retry on wrong_group with a fresh map; some writes lose their reply and
  are retried later with the same sequence; half of them pick a key that is
  moving;
- faults: the mover dies at any call it makes to a group or to the metadata
  group (before or after that call took effect: between a step and its
  record, after the record, in the middle of a copy), or between steps; a
  NEW Mover then resumes from the records in the metadata group. A group's
  store is closed and reopened (a restart) and is unavailable for a while.
  The operator aborts moves that have not been frozen, and sometimes plans
  the same move again at once;
- rivals: a second run of one move by the same scheduler (a router finishing
  a move it thinks stalled), from the record as it reads it, slow or fast
  against the mover;
- take-overs: a new scheduler takes the lease with a larger token; its mover
  first FENCEs the groups of the recorded moves, while the old mover goes on
  as a zombie with the moves it held, its old token and its old lease.
Client operations, rivals' and zombies' calls also run in the middle of the
mover's steps (before each call it makes), so writes land behind a copy's
scan, between the freeze and the delta, pages of two runs cross, and so on.
Workloads: `group add`, `group remove`, random single moves, a race (a rival
pauses with a page it read until the mover is about to activate), a retry (a
move aborted on the way and planned again).

Invariants, checked after every client operation and every call of any
mover (invariant names start the violation message):
- single owner: no key is accepted by two groups at once (ReplicaStore.owns),
  and the ranges the state machines serve are pairwise disjoint;
- linearizability: every key accepted by a group holds there the value of
  the model (the single-threaded scheduler makes the model exact: the value
  of the last write applied), every read returns it, and every write's old
  value is the model's value just before it;
- exactly-once: a write (client, sequence) takes effect at most once, and a
  retry is answered with the original result;
- map never runs ahead: the map in the metadata group names, for each key,
  the group that serves it or the group that exports it frozen (the flip
  comes after the activation and before the source lets go);
- fencing: a group never applies a shard command whose token is smaller
  than one it applied before;
- the live mover's steps are never refused while its record is what it
  holds ("move refused"; a move planned again waits for the aborted one),
  and it is told another run went on ("superseded") only when there is one.
At the end (faults stop; every move is finished or aborted; every write in
flight is retried until answered): every key readable from its owner with
its last value (so no deleted key came back), no key's data left in a group
that does not own it, ownership covering the whole space exactly once and
equal to the map, no move left half-done in any group, no record left, and
every group's position index listing exactly the keys it holds.

    python -m tests.sim.moves --seed 12 --trace     # replay one seed with its trace
    python -m tests.sim.moves --seeds 0:500         # a range, with the totals
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from shardnode.raft import Entry
from shardnode.placement.shard_map import SPACE, KeyRange, Move, RangeSet, ShardMap, ShardMapConflict, stable_hash
from shardnode.placement.directory import GuardFailed
from shardnode.placement.moves import MoveError, MoveRecord, Mover, MoveSuperseded, Phase
from shardnode.storage import ApplyResult, Command, CommandOp, ReplicaStore, StorageError, encode_command
from shardnode.storage import position_index
from shardnode.storage.export_reads import DeltaPage
from shardnode.storage.kv_records import HEADER_BYTES
from shardnode.storage.shard_commands import ShardCommand, ShardOp, ShardResult

SHARD_MAP_KEY = b"shard_map"
TRACE_LINES = 60
#: Records per scan call: small, so that copies take several calls and
#: client writes land between them. (Each stored record carries etcd's
#: metadata header, kv_records.HEADER_BYTES: counted so that pages hold as
#: many of the simulation's short values as before it existed.)
SCAN_BYTES = 24 + 2 * HEADER_BYTES
#: Bytes per delta page: small too, so that deltas take several pages.
DELTA_BYTES = 64 + 4 * HEADER_BYTES
#: The scheduler's lease in the metadata group: every write of a mover is guarded by it.
LEASE_KEY = b"scheduler_lease"
#: How fast a rival or zombie goes against the mover: the chance, at each
#: call of the mover, of each of its next calls (at most 4 in a row). Slow
#: ones are still copying when the mover has moved on; fast ones overtake it.
OTHERS_PACE = (0.15, 0.5, 1.0)
#: add, remove: `group add` / `group remove`; random: one or two random moves;
#: race: one random move that a rival also runs from the moment the mover
#: starts copying, pausing with each page it read until the mover is about
#: to activate the target (a GC pause, a slow link: the page lands after the
#: delta); retry: one random move that the operator aborts on the way and
#: plans again.
WORKLOADS = ("add", "remove", "random", "race", "retry")


class Violation(Exception):
    """An invariant does not hold; the message starts with its name."""


class MoverDied(Exception):
    """The mover's process dies here (raised by the ports at a crash point)."""


class GroupUnavailable(Exception):
    """The group is restarting: no leader for now."""


def drive(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never waits (the simulated ports answer at once)
    to its end, without an event loop: deterministic and cheap."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    coroutine.close()
    raise RuntimeError("a simulated call suspended")


# --- The scenario a seed draws -------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Scenario:
    seed: int
    groups: int
    virtual_nodes: int
    keys: int
    clients: int
    rounds: tuple[str, ...]
    round_steps: int
    crash_rate: float            # per call of the mover
    kill_rate: float             # the mover dies between steps
    restart_rate: float
    abort_rate: float
    lost_reply_rate: float
    refresh_rate: float          # a client reloads its map before an operation
    interleave_rate: float       # client operations before a call of the mover
    rival_rate: float            # a second run of a move starts (same scheduler: a router finishing it)
    takeover_rate: float         # a new scheduler takes over; the old mover goes on as a zombie
    retry_rate: float            # an aborted move is planned again at once (same source, target, ranges)

    @classmethod
    def from_seed(cls, seed: int) -> Scenario:
        rng = random.Random(seed)
        return cls(
            seed=seed,
            groups=rng.choice([2, 3, 3, 4]),
            virtual_nodes=rng.choice([1, 2, 4]),
            keys=rng.choice([16, 32, 48]),
            clients=rng.randint(2, 5),
            rounds=tuple(rng.choice(WORKLOADS) for _ in range(rng.randint(1, 3))),
            round_steps=rng.randint(40, 160),
            crash_rate=rng.choice([0.0, 0.05, 0.15, 0.3]),
            kill_rate=rng.choice([0.0, 0.05, 0.2]),
            restart_rate=rng.choice([0.0, 0.02, 0.06]),
            abort_rate=rng.choice([0.0, 0.0, 0.03, 0.1]),
            lost_reply_rate=rng.choice([0.05, 0.15, 0.3]),
            refresh_rate=rng.choice([0.05, 0.3, 0.8]),
            interleave_rate=rng.choice([0.2, 0.5, 0.8]),
            rival_rate=rng.choice([0.0, 0.03, 0.08, 0.15]),
            takeover_rate=rng.choice([0.0, 0.0, 0.01, 0.03]),
            retry_rate=rng.choice([0.0, 0.5, 1.0]),
        )

    def describe(self) -> str:
        return (f"seed={self.seed} groups={self.groups} vnodes={self.virtual_nodes} keys={self.keys} "
                f"clients={self.clients} rounds={','.join(self.rounds)} steps/round={self.round_steps} "
                f"crash={self.crash_rate} kill={self.kill_rate} restart={self.restart_rate} "
                f"abort={self.abort_rate} lost_reply={self.lost_reply_rate} refresh={self.refresh_rate} "
                f"interleave={self.interleave_rate} rival={self.rival_rate} takeover={self.takeover_rate} "
                f"retry={self.retry_rate}")


@dataclass
class MoveSimResult:
    scenario: Scenario
    violation: str | None
    trace: list[str]
    moves_planned: int = 0
    moves_completed: int = 0
    aborts: int = 0
    abort_refused: int = 0
    crashes: Counter = field(default_factory=Counter)      # by phase (or "abort")
    restarts: int = 0
    writes: int = 0
    reads: int = 0
    retries_answered: int = 0                             # lost replies answered by their session
    wrong_group: int = 0
    rivals: int = 0                                       # second runs of a move started
    takeovers: int = 0                                    # schedulers taken over (their movers: zombies)
    retried_moves: int = 0                                # aborted moves planned again at once
    superseded: int = 0                                   # runs stopped: another run went on without them
    fenced: int = 0                                       # zombie commands refused by a fencing token

    @property
    def ok(self) -> bool:
        return self.violation is None

    def report(self) -> str:
        lines = [
            f"MOVE SIMULATION FAILED: {self.violation}",
            f"  scenario: {self.scenario.describe()}",
            f"  replay:   .venv/bin/python -m tests.sim.moves --seed {self.scenario.seed} --trace",
            "  trace (last events):",
        ]
        lines += ["    " + line for line in self.trace[-TRACE_LINES:]]
        return "\n".join(lines)


# --- The groups and the metadata group -------------------------------------------------


class SimGroup:
    """One group: its state machine (a ReplicaStore) fed one entry at a time."""

    def __init__(self, number: int, path: str, default_owned: RangeSet) -> None:
        self.number = number
        self.path = path
        self.default_owned = default_owned
        self.down_steps = 0
        self.restarts = 0
        self.store = self._open()

    def _open(self) -> ReplicaStore:
        store = ReplicaStore.open(self.path, initial_voters=(1,), node_id=1)
        store.configure_ownership(self.default_owned)
        return store

    def propose(self, data: bytes) -> ApplyResult | ShardResult | None:
        """Append `data` to the group's log and apply it (committed at once)."""
        if self.down_steps:
            raise GroupUnavailable(f"group {self.number} is restarting")
        entry = Entry(1, self.store.last_index() + 1, data)
        self.store.persist(None, [entry])
        (result,) = self.store.apply([entry])
        return result

    def restart(self, down_steps: int) -> None:
        self.store.close()
        self.store = self._open()
        self.down_steps = down_steps
        self.restarts += 1

    def served(self) -> RangeSet:
        """The positions this state machine serves (owned, minus frozen exports)."""
        shard = self.store.shard_state
        owned = shard.owned if shard.owned is not None else RangeSet([KeyRange(0, SPACE)])
        frozen = [r for e in shard.exports.values() if e.frozen for r in e.ranges]
        return owned.difference(frozen) if frozen else owned

    def exports_frozen(self, position: int) -> bool:
        return any(e.frozen and position in e.ranges for e in self.store.shard_state.exports.values())


class Turn:
    """What a simulated port awaits before each call of a mover: the mover's
    coroutine stops there, and the simulation decides who calls next (the
    main mover, a rival, a zombie, or clients in between)."""

    __slots__ = ("label",)

    def __init__(self, label: str) -> None:
        self.label = label

    def __await__(self):  # type: ignore[no-untyped-def]
        yield self


@dataclass(slots=True)
class Actor:
    """Who makes a call: the live scheduler's mover ("mover"), a second run
    of the same scheduler ("rival": a router finishing a move the mover also
    runs), or the mover of a scheduler that was taken over ("zombie"): its
    token and lease are the old ones. Only the live mover has crash points
    (the others simply stop, at an error or when the simulation drops them)."""

    name: str
    fence: int
    lease: bytes
    main: bool = False

    @property
    def guards(self) -> tuple[tuple[bytes, bytes | None], ...]:
        return ((LEASE_KEY, self.lease),)


class Calls:
    """Every call of a mover goes through here, after its Turn: the live
    mover's may crash before or after taking effect; the invariants are
    checked after each."""

    def __init__(self, sim: MoveSimulation, actor: Actor) -> None:
        self.sim = sim
        self.actor = actor

    async def call(self, label: str, action: Callable[[], Any]) -> Any:
        await Turn(label)
        sim = self.sim
        if self.actor.main and sim.crashes_armed and sim.rng.random() < sim.scenario.crash_rate:
            if sim.rng.random() < 0.5:
                sim.mover_died(f"before {label}")
            action()
            sim.check_invariants()
            sim.mover_died(f"after {label}")
        result = action()
        sim.check_invariants()
        if not self.actor.main:
            sim.others_calls += 1
        return result


class MetadataGroup:
    """The metadata group's state: keys and values, and a count of changes."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.changes = 0


class SimDirectory:
    """DirectoryPort over the metadata group: a mover's (`calls`: through its
    turns and crash points), or without them (the operator's and the
    clients' view, for `drive`)."""

    def __init__(self, metadata: MetadataGroup, initial: ShardMap, calls: Calls | None) -> None:
        self.metadata = metadata
        self.data = metadata.data
        self.initial = initial
        self.calls = calls

    async def _call(self, label: str, action: Callable[[], Any]) -> Any:
        return await self.calls.call(label, action) if self.calls else action()

    def current_map(self) -> ShardMap:
        raw = self.data.get(SHARD_MAP_KEY)
        return ShardMap.decode(raw) if raw is not None else self.initial

    def _guards_hold(self, guards: tuple[tuple[bytes, bytes | None], ...]) -> bool:
        return all(self.data.get(key) == value for key, value in guards)

    def _cas(self, key: bytes, expected: bytes | None, new: bytes,
             guards: tuple[tuple[bytes, bytes | None], ...] = ()) -> tuple[bool, bytes | None]:
        current = self.data.get(key)
        if current != expected or not self._guards_hold(guards):
            return False, current
        self.data[key] = new
        self.metadata.changes += 1
        return True, new

    async def read(self, key: bytes) -> bytes | None:
        return await self._call(f"read {key.decode()}", lambda: self.data.get(key))

    async def compare_and_set(self, key: bytes, expected: bytes | None, new: bytes, *,
                              guards: tuple[tuple[bytes, bytes | None], ...] = ()) -> tuple[bool, bytes | None]:
        return await self._call(f"cas {key.decode()}", lambda: self._cas(key, expected, new, guards))

    async def load_map(self) -> ShardMap:
        return await self._call("load map", self.current_map)

    async def update_map(self, old: ShardMap, new: ShardMap, *,
                         guards: tuple[tuple[bytes, bytes | None], ...] = ()) -> ShardMap:
        def update() -> ShardMap:
            raw = self.data.get(SHARD_MAP_KEY)
            if self.current_map().encode() != old.encode():
                raise ShardMapConflict(f"the map is at epoch {self.current_map().epoch}, not {old.epoch}")
            swapped, _ = self._cas(SHARD_MAP_KEY, raw, new.encode(), guards)
            if not swapped:
                raise GuardFailed(f"map not changed to epoch {new.epoch}: a guard no longer holds")
            return new

        return await self._call(f"update map to epoch {new.epoch}", update)


class SimGroups:
    """GroupPort over the simulated groups, for one actor."""

    def __init__(self, sim: MoveSimulation, calls: Calls) -> None:
        self.sim = sim
        self.calls = calls

    def _group(self, number: int) -> SimGroup:
        group = self.sim.groups[number]
        if group.down_steps:
            raise GroupUnavailable(f"group {number} is restarting")
        return group

    async def shard(self, group: int, command: ShardCommand) -> None:
        sim = self.sim
        actor = self.calls.actor

        def apply() -> None:
            target = self._group(group)
            group_fence = target.store.shard_state.fence
            result = target.propose(command.encode())
            assert isinstance(result, ShardResult), result
            sim.log(f"  {actor.name}: group {group}: {command.op.name} move={sim.label(command.move_id)}"
                    + (" delta" if command.delta else "")
                    + (f" puts={len(command.puts)} deletes={len(command.deletes)} "
                       f"sessions={len(command.sessions)}" if command.puts or command.deletes
                       or command.sessions else "")
                    + ("" if result.ok else f" REFUSED: {result.message}"))
            if result.ok and command.fence < group_fence:
                raise Violation(f"fencing: group {group} applied {command.op.name} of move "
                                f"{sim.label(command.move_id)} with token {command.fence} after token {group_fence}")
            if not result.ok:
                if actor.main:
                    sim.last_refusal = (actor, command)
                raise MoveError(f"group {group} refused {command.op.name}: {result.message}")

        await self.calls.call(f"{command.op.name}{' (delta)' if command.delta else ''} at group {group}", apply)

    async def scan(self, group: int, ranges: RangeSet, after: bytes | None,
                   max_bytes: int) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
        return await self.calls.call(
            f"scan of group {group}",
            lambda: self._group(group).store.export_scan(ranges, after, min(max_bytes, SCAN_BYTES)))

    async def delta(self, group: int, move_id: int, after: bytes | None, max_bytes: int) -> DeltaPage:
        def read() -> DeltaPage:
            try:
                return self._group(group).store.export_delta(move_id, after, min(max_bytes, DELTA_BYTES))
            except StorageError as exc:         # the worker answers REFUSED
                self.sim.log(f"  {self.calls.actor.name}: group {group}: delta REFUSED: {exc}")
                raise MoveError(f"group {group} refused the export delta: {exc}") from None

        return await self.calls.call(f"delta of group {group}", read)


class OperatorGroups:
    """The operator plans moves and reads records; it never calls a group."""

    async def shard(self, group: int, command: ShardCommand) -> None:
        raise AssertionError("the operator does not send shard commands")

    async def scan(self, group, ranges, after, max_bytes):  # type: ignore[no-untyped-def]
        raise AssertionError("the operator does not scan")

    async def delta(self, group, move_id, after, max_bytes):  # type: ignore[no-untyped-def]
        raise AssertionError("the operator does not read deltas")


# --- Clients -------------------------------------------------------------------------------


@dataclass(slots=True)
class PendingWrite:
    sequence: int
    op: CommandOp
    key: bytes
    value: bytes | None
    lost: bool = False           # applied, its reply lost: the retry must get the original answer


@dataclass(slots=True)
class SimClient:
    client_id: int
    shard_map: ShardMap
    sequence: int = 0
    pending: PendingWrite | None = None
    sleep: int = 0


@dataclass(slots=True)
class MoveIntent:
    """What the operator wants of a planned move: finish it, or abort it.
    `retries`: the aborted move this one plans again (it waits for that
    one's rollback, and is aborted too if that one went forward instead)."""

    move_id: int
    record: MoveRecord
    abort: bool = False
    retries: int | None = None


@dataclass(slots=True)
class OtherRun:
    """A run of a move by a rival or a zombie, one call at a time."""

    actor: Actor
    move_id: int
    coroutine: Coroutine[Any, Any, Any]
    pace: float           # the chance it makes a call whenever the mover makes one (slow or fast)
    stalls: bool = False  # pauses before each copy chunk until the mover is about to activate
    next_call: str = ""   # the label of the call it makes next ("" before its first)


# --- The simulation --------------------------------------------------------------------------


class MoveSimulation:
    def __init__(self, scenario: Scenario, *, trace: bool = False, mover_class: type[Mover] = Mover) -> None:
        self.scenario = scenario
        self.rng = random.Random(scenario.seed ^ 0x5EED)
        self.tracing = trace
        self.trace: list[str] = []
        self.mover_class = mover_class
        self.result = MoveSimResult(scenario, None, self.trace)
        self.crashes_armed = False
        self.faults_on = True
        self.in_client_op = False
        self.step = 0
        self.phase_running: str = ""
        initial = ShardMap.build(scenario.groups, scenario.virtual_nodes)
        self.initial_map = initial
        self.metadata = MetadataGroup()
        self.operator_directory = SimDirectory(self.metadata, initial, None)
        self.operator = Mover(OperatorGroups(), self.operator_directory)
        self.checked_version: tuple | None = None
        # The live scheduler: its token, its lease (held in the metadata group), its mover.
        self.token = 1
        self.actor = Actor("mover", self.token, b"scheduler-1", main=True)
        self.metadata.data[LEASE_KEY] = self.actor.lease
        self.must_fence = False              # a new scheduler fences the groups before anything else
        self.mover: Mover | None = None
        self.held: dict[int, MoveRecord] = {}                   # the live mover's records
        self.others: list[OtherRun] = []                        # rivals' and zombies' runs
        self.others_spawned = 0
        self.others_calls = 0
        self.last_refusal: tuple[Actor, ShardCommand] | None = None
        self.intents: dict[int, MoveIntent] = {}         # in plan order: runs do not depend on move ids
        self.labels: dict[int, str] = {}
        self.root = tempfile.mkdtemp(prefix="movesim-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        self.groups: dict[int, SimGroup] = {}
        for g in range(scenario.groups):
            self._new_group(g, initial.owned_by(g))
        self.keys = [b"key-%03d" % i for i in range(scenario.keys)]
        self.positions = {key: stable_hash(key) for key in self.keys}
        self.model: dict[bytes, bytes | None] = {}
        self.effects: dict[tuple[int, int], tuple[bool, bytes | None]] = {}
        self.clients = [SimClient(client_id, initial) for client_id in range(1, scenario.clients + 1)]
        self.values = 0
        self.retry_pending: set[int] = set()
        self.race_pending: set[int] = set()

    def _new_group(self, number: int, owned: RangeSet) -> None:
        self.groups[number] = SimGroup(number, os.path.join(self.root, f"group-{number}"), owned)

    @property
    def version(self) -> tuple:
        """Changes whenever any state the invariants read may have changed."""
        return (self.metadata.changes, len(self.model),
                tuple((g.number, g.restarts, g.store.applied_index) for g in self.groups.values()))

    def label(self, move_id: int) -> str:
        """A move's name in the trace: move ids are random (secrets), labels
        follow the plan order, so that a replayed seed prints the same trace."""
        return self.labels.get(move_id, "?")

    def log(self, line: str) -> None:
        if self.tracing:
            for move_id, label in self.labels.items():       # messages name moves by their random ids
                line = line.replace(str(move_id), label)
            self.trace.append(f"[{self.step}] {line}")

    def close(self) -> None:
        for run in self.others:
            run.coroutine.close()
        for group in self.groups.values():
            group.store.close()
        shutil.rmtree(self.root, ignore_errors=True)

    # --- Running -------------------------------------------------------------------------

    def run(self) -> MoveSimResult:
        try:
            for workload in self.scenario.rounds:
                self._round(workload)
            self._calm()
            self._final_checks()
        except Violation as violation:
            self.result.violation = str(violation)
            self.log(f"VIOLATION: {violation}")
        finally:
            self.close()
        return self.result

    def _round(self, workload: str) -> None:
        moves = self._plan(workload)
        self.log(f"round {workload}: {len(moves)} moves planned")
        records = self._plan_moves(moves)
        self.retry_pending = {r.move_id for r in records} if workload == "retry" else set()
        self.race_pending = {r.move_id for r in records} if workload == "race" else set()
        for _ in range(self.scenario.round_steps):
            if not self.intents:
                break
            self.step += 1
            self._random_step()
            if self.retry_pending and self.rng.random() < 0.15:
                self._abort_and_retry()
            if self.race_pending:
                self._race()
        self.faults_on = False
        self._finish_moves()
        self._drop_others("the round is over")
        self.faults_on = True
        if workload == "remove":
            self._drop_empty_groups()

    def _plan(self, workload: str) -> list[Move]:
        rng = self.rng
        directory = self.operator_directory
        shard_map = directory.current_map()
        if workload == "add":
            group = max(self.groups) + 1
            self._new_group(group, RangeSet())
            new_map = shard_map.with_group(group, ("sim",))
            drive(directory.update_map(shard_map, new_map))
            return new_map.plan_add(group)
        owning = [g for g in shard_map.groups if shard_map.owned_by(g)]
        if workload == "remove" and len(owning) > 1:
            return shard_map.plan_remove(rng.choice(owning))
        # Random single moves: a piece of one range to another live group;
        # two at once sometimes (disjoint pieces: either source).
        moves: list[Move] = []
        taken = RangeSet()
        for _ in range(rng.choice([1, 1, 2]) if workload == "random" else 1):
            source = rng.choice(owning)
            targets = [g for g in shard_map.groups if g != source]
            if not targets:
                break
            candidates = list(shard_map.owned_by(source).difference(taken))
            if not candidates:
                continue
            r = rng.choice(candidates)
            if workload != "random":
                # race, retry: the range holding the most keys, whole (the races need keys).
                r = max(candidates, key=lambda c: sum(c.start <= p < c.end for p in self.positions.values()))
            elif r.size > 2 and rng.random() < 0.6:
                a, b = sorted(rng.sample(range(r.start, r.end), 2)) if r.size < 1 << 20 else sorted(
                    rng.randrange(r.start, r.end) for _ in range(2))
                if a < b:
                    r = KeyRange(a, b)
            piece = RangeSet([r])
            taken = taken.union(piece)
            moves.append(Move(source, rng.choice(targets), piece))
        return moves

    def _plan_moves(self, moves: list[Move], retries: int | None = None) -> list[MoveRecord]:
        records = drive(self.operator.plan(moves))
        self.result.moves_planned += len(records)
        if self.mover is not None:
            self.held.update((r.move_id, r) for r in records)     # the operator hands them to the live mover
        for record in records:
            self.intents[record.move_id] = MoveIntent(record.move_id, record, retries=retries)
            self.labels[record.move_id] = f"m{len(self.labels) + 1}"
            self.log(f"  move {self.label(record.move_id)}: {record.source} -> {record.target} "
                     f"({record.ranges.size / SPACE:.3f} of the space)"
                     + (f", again after {self.label(retries)}" if retries is not None else ""))
        return records

    def _drop_empty_groups(self) -> None:
        shard_map = self.operator_directory.current_map()
        for group in shard_map.groups:
            if not shard_map.owned_by(group) and len(shard_map.groups) > 1:
                new_map = shard_map.without_group(group)
                drive(self.operator_directory.update_map(shard_map, new_map))
                self.log(f"group {group} removed from the map (epoch {new_map.epoch})")
                shard_map = new_map

    def _random_step(self) -> None:
        rng = self.rng
        s = self.scenario
        for group in self.groups.values():
            if group.down_steps:
                group.down_steps -= 1
        roll = rng.random()
        if roll < 0.35:
            self._mover_step()
        elif roll < 0.42:
            self._other_step()
        elif roll < 0.42 + s.rival_rate:
            self._start_rival()
        elif roll < 0.42 + s.rival_rate + s.takeover_rate:
            self._take_over()
        elif roll < 0.42 + s.rival_rate + s.takeover_rate + s.kill_rate * 0.3:
            if self.mover is not None:
                self.log("mover killed between steps")
                self.result.crashes["between steps"] += 1
                self.mover = None
        elif roll < 0.42 + s.rival_rate + s.takeover_rate + s.kill_rate * 0.3 + s.restart_rate:
            group = rng.choice(list(self.groups.values()))
            down = rng.randint(0, 6)
            self.log(f"group {group.number} restarts (down for {down} steps)")
            self.result.restarts += 1
            group.restart(down)
            self.check_invariants()
        elif roll < 0.42 + s.rival_rate + s.takeover_rate + s.kill_rate * 0.3 + s.restart_rate + s.abort_rate:
            held = [self.held.get(i) for i in self.intents]
            candidates = [r for r in held if r is not None and r.phase < Phase.FROZEN
                          and not self.intents[r.move_id].abort]
            if candidates:
                self._abort(rng.choice(candidates), retry=rng.random() < s.retry_rate)
        else:
            self._client_op(rng.choice(self.clients))

    def _abort(self, record: MoveRecord, retry: bool) -> None:
        self.log(f"operator aborts move {self.label(record.move_id)} (recorded {record.phase.name})")
        self.intents[record.move_id].abort = True
        if retry:
            # ... and plans it again at once: the new move must wait until
            # the old one's import and export are gone.
            self.result.retried_moves += 1
            self._plan_moves([Move(record.source, record.target, record.ranges)], retries=record.move_id)
            if self.rng.random() < 0.5:
                # Someone else (a router, another run) rolls the old one back, slowly or not.
                self._start_rival(record.move_id)

    def _race(self) -> None:
        """The race workload: once the mover copies, a slow rival copies too."""
        for move_id in list(self.race_pending):
            record = self.held.get(move_id)
            if move_id not in self.intents:
                self.race_pending.discard(move_id)
            elif record is not None and record.phase is Phase.EXPORTING:
                self.race_pending.discard(move_id)
                self._start_rival(move_id, pace=OTHERS_PACE[1], stalls=True)
                run = self.others[-1] if self.others else None
                for _ in range(8):          # it reads its first page now, then pauses
                    if run is None or run not in self.others or self._stalled(run):
                        break
                    self._other_step(run)

    def _abort_and_retry(self) -> None:
        """The retry workload: the operator aborts its move once it began."""
        for move_id in list(self.retry_pending):
            record = self.held.get(move_id)
            if move_id not in self.intents:
                self.retry_pending.discard(move_id)
            elif record is not None and Phase.PLANNED < record.phase < Phase.FROZEN:
                self.retry_pending.discard(move_id)
                self._abort(record, retry=True)

    def _calm(self) -> None:
        """No more faults: every client's write in flight is retried until answered."""
        self.faults_on = False
        for group in self.groups.values():
            group.down_steps = 0
        for _ in range(1000):
            waiting = [c for c in self.clients if c.pending is not None]
            if not waiting:
                return
            self.step += 1
            client = self.rng.choice(waiting)
            client.sleep = 0
            self._client_op(client, new=False)
        raise Violation("liveness: writes still unanswered after 1000 retries: "
                        + ", ".join(f"client {c.client_id} seq {c.pending.sequence}"
                                    for c in self.clients if c.pending))

    def _finish_moves(self) -> None:
        """Faults stop; the operator finishes or aborts every move (clients go on)."""
        for group in self.groups.values():
            group.down_steps = 0
        for _ in range(300):
            if not self.intents:
                return
            self.step += 1
            if self.rng.random() < 0.5:
                self._client_op(self.rng.choice(self.clients))
            self._mover_step()
        raise Violation(f"liveness: moves not finished without faults: {[self.label(i) for i in self.intents]}")

    # --- The mover ------------------------------------------------------------------------

    def mover_died(self, where: str) -> None:
        self.result.crashes[self.phase_running] += 1
        self.log(f"MOVER DIES {where}")
        raise MoverDied(where)

    def _new_mover(self) -> Mover:
        actor = self.actor
        calls = Calls(self, actor)
        return self.mover_class(SimGroups(self, calls), SimDirectory(self.metadata, self.initial_map, calls),
                                fence=actor.fence, guards=actor.guards)

    def drive_mover(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        """Run a call of the live mover to its end: at each of its turns,
        clients, rivals and zombies may go first."""
        try:
            while True:
                try:
                    turn = coroutine.send(None)
                except StopIteration as stop:
                    return stop.value
                self.between_mover_calls(turn.label)
        finally:
            coroutine.close()

    def _mover_step(self) -> None:
        if not self.intents:
            return
        self.crashes_armed = self.faults_on
        self.last_refusal = None
        try:
            if self.mover is None:
                self.mover = self._new_mover()
                if self.must_fence:
                    # A new scheduler: every group its moves touch refuses
                    # the old one's commands from now on.
                    self.phase_running = "fence"
                    records = self.drive_mover(self.mover.records())
                    touched = {g for r in records for g in (r.source, r.target)}
                    self.log(f"new scheduler (token {self.actor.fence}) fences groups {sorted(touched)}")
                    self.drive_mover(self.mover.fence_groups(touched))
                    self.must_fence = False
                self.phase_running = "resume (records)"
                self.held = {r.move_id: r for r in self.drive_mover(self.mover.records())}
                self.log(f"new mover resumes: {[f'{self.label(i)}:{r.phase.name}' for i, r in self.held.items()]}")
                for move_id in list(self.intents):
                    if move_id not in self.held:
                        self._move_over(move_id, "gone from the records")
                return
            move_id = self.rng.choice(list(self.intents))
            record = self.held.get(move_id)
            if record is None:
                self._move_over(move_id, "gone from the records")
                return
            intent = self.intents[move_id]
            if intent.abort and record.phase < Phase.FROZEN:
                self.phase_running = "abort"
                self.log(f"mover aborts move {self.label(move_id)} (recorded {record.phase.name})")
                try:
                    self.drive_mover(self.mover.abort(record))
                except MoveSuperseded:
                    raise
                except MoveError as exc:
                    # Frozen already (the record lags behind): it can only go forward.
                    self.log(f"  abort refused: {exc}")
                    self.result.abort_refused += 1
                    intent.abort = False
                    self._abort_retries_of(move_id)
                    self.mover = None          # it un-recorded the abort: it reads the records again
                    return
                self.result.aborts += 1
                self._move_over(move_id, "aborted")
                return
            self.phase_running = record.phase.name
            self.log(f"mover runs move {self.label(move_id)} from {record.phase.name}")
            before = record.phase
            new = self.drive_mover(self.mover.run(record, stop_after=record.phase))
            if before is Phase.FLIPPED:
                self.result.moves_completed += 1
                self._move_over(move_id, "done")
            else:
                self.held[move_id] = new
        except MoverDied:
            self.mover = None
            self.held = {}
        except GroupUnavailable as exc:
            # A real mover retries until its deadline, then gives up; the
            # operator starts it again later.
            self.log(f"mover gives up: {exc}")
            self.mover = None
            self.held = {}
        except MoveSuperseded as exc:
            if not self.others_spawned:
                raise Violation(f"superseded: the mover was told another run went on, and there is none ({exc})") \
                    from None
            self.result.superseded += 1
            self.log(f"mover stops: {exc}")
            self.mover = None          # it reads the records again
            self.held = {}
        except MoveError as exc:
            if self.last_refusal is not None and self._waits(self.last_refusal[1].move_id):
                return
            raise Violation(f"move refused: a step of a recorded move was refused ({exc})") from None
        finally:
            self.crashes_armed = False

    def _waits(self, move_id: int) -> bool:
        """A move planned again after an abort begins only once the aborted
        one's import and export are gone: until then the groups refuse its
        first steps (one import, one export per range), and it waits."""
        intent = self.intents.get(move_id)
        refusal = self.last_refusal
        if intent is None or refusal is None or refusal[1].op not in (ShardOp.IMPORT_BEGIN, ShardOp.EXPORT_BEGIN):
            return False
        ranges = intent.record.ranges
        ahead = [i for i, other in self.intents.items()
                 if i != move_id and other.record.ranges.difference(ranges) != other.record.ranges]
        if not ahead:
            return False
        self.log(f"  move {self.label(move_id)} waits for {', '.join(self.label(i) for i in ahead)}")
        return True

    def _abort_retries_of(self, move_id: int) -> None:
        """`move_id` goes forward after all: the moves planned again over its
        ranges (retries of it, or of its retries) can never run."""
        ranges = self.intents[move_id].record.ranges
        for intent in self.intents.values():
            overlaps = intent.record.ranges.difference(ranges) != intent.record.ranges
            if intent.move_id != move_id and overlaps and not intent.abort:
                self.log(f"operator aborts move {self.label(intent.move_id)}: {self.label(move_id)} went forward")
                intent.abort = True

    def _move_over(self, move_id: int, why: str) -> None:
        self.log(f"move {self.label(move_id)} over: {why}")
        intent = self.intents.get(move_id)
        if why == "gone from the records" and intent is not None:
            # Its mover died right after forgetting it, or another run
            # finished it: done, or aborted (what the map says).
            shard_map = self.operator_directory.current_map()
            if shard_map.owned_by(intent.record.target).covers(intent.record.ranges):
                self.result.moves_completed += 1
                why = "done"
            else:
                self.result.aborts += 1
                why = "aborted"
        if why == "done" and intent is not None:
            self._abort_retries_of(move_id)
        self.intents.pop(move_id, None)
        self.held.pop(move_id, None)

    # --- Rivals and zombies ---------------------------------------------------------------

    def _start_rival(self, move_id: int | None = None, pace: float | None = None, stalls: bool = False) -> None:
        """A second run of one move (`move_id`, else one at random) by the same
        scheduler (a router finishing a move that looks stalled): it reads
        the record and runs it, or aborts it if the operator asked for that,
        one call at a time."""
        if not self.intents or not self.faults_on:
            return
        if move_id is None:
            move_id = self.rng.choice(list(self.intents))
        record = next((r for r in drive(self.operator.records()) if r.move_id == move_id), None)
        if record is None:
            return
        self.others_spawned += 1
        self.result.rivals += 1
        actor = Actor(f"rival r{self.result.rivals}", self.actor.fence, self.actor.lease)
        calls = Calls(self, actor)
        mover = self.mover_class(SimGroups(self, calls), SimDirectory(self.metadata, self.initial_map, calls),
                                 fence=actor.fence, guards=actor.guards)
        if self.intents[move_id].abort and record.phase < Phase.FROZEN and self.rng.random() < 0.5:
            coroutine = mover.abort(record)
        else:
            coroutine = mover.run(record)
        pace = self.rng.choice(OTHERS_PACE) if pace is None else pace
        self.log(f"{actor.name} starts on move {self.label(move_id)} (recorded {record.phase.name}, pace {pace}"
                 + (", stalls)" if stalls else ")"))
        self.others.append(OtherRun(actor, move_id, coroutine, pace, stalls))

    def _take_over(self) -> None:
        """A new scheduler takes the lease (a larger token); the old one does
        not know yet: its mover goes on with the moves it holds, as a zombie."""
        if self.mover is None or not self.faults_on:
            return
        old, old_mover = self.actor, self.mover
        self.token += 1
        self.result.takeovers += 1
        self.others_spawned += 1
        self.actor = Actor("mover", self.token, b"scheduler-%d" % self.token, main=True)
        self.metadata.data[LEASE_KEY] = self.actor.lease
        self.metadata.changes += 1
        self.log(f"scheduler take-over: token {old.fence} -> {self.token}; the old mover goes on as a zombie")
        zombie = Actor(f"zombie z{self.result.takeovers}", old.fence, old.lease)
        calls = Calls(self, zombie)
        zombie_mover = self.mover_class(SimGroups(self, calls), SimDirectory(self.metadata, self.initial_map, calls),
                                        fence=old.fence, guards=old.guards)
        for move_id, record in self.held.items():
            intent = self.intents.get(move_id)
            if intent is None:
                continue
            if intent.abort and record.phase < Phase.FROZEN:
                coroutine = zombie_mover.abort(record)
            else:
                coroutine = zombie_mover.run(record)
            self.others.append(OtherRun(zombie, move_id, coroutine, self.rng.choice(OTHERS_PACE)))
        del old_mover
        self.mover = None
        self.held = {}
        self.must_fence = True

    def _other_step(self, run: OtherRun | None = None) -> None:
        """One call of a rival's or a zombie's run (`run`, else one at random)."""
        if run is None:
            ready = [r for r in self.others if not self._stalled(r)]
            if not ready:
                return
            run = self.rng.choice(ready)
        try:
            run.next_call = run.coroutine.send(None).label
            return
        except StopIteration:
            self.log(f"{run.actor.name}: its run of move {self.label(run.move_id)} is over")
        except MoveSuperseded as exc:
            self.result.superseded += 1
            self.log(f"{run.actor.name} stops: {exc}")
        except MoveError as exc:
            if "superseded: a newer scheduler" in str(exc):
                self.result.fenced += 1
            self.log(f"{run.actor.name} stops: {exc}")
        except GroupUnavailable as exc:
            self.log(f"{run.actor.name} gives up: {exc}")
        self.others.remove(run)

    @staticmethod
    def _stalled(run: OtherRun) -> bool:
        """A stalling run about to send a copy chunk."""
        return run.stalls and run.next_call.startswith("INGEST at")

    def _drop_others(self, why: str) -> None:
        for run in self.others:
            run.coroutine.close()
            self.log(f"{run.actor.name} dropped ({why})")
        self.others = []

    def between_mover_calls(self, mover_call: str) -> None:
        """Client operations, and the calls of rivals and zombies, in the
        middle of the mover's step (before its call `mover_call`)."""
        if self.in_client_op:
            return
        while self.rng.random() < self.scenario.interleave_rate * 0.7:
            self._client_op(self.rng.choice(self.clients))
        for run in list(self.others):
            if self._stalled(run):
                # Paused with a page in hand; it wakes up just as the mover
                # is about to activate the target (now and then sooner).
                if mover_call.startswith("IMPORT_ACTIVATE") or self.rng.random() < 0.02:
                    self.log(f"{run.actor.name} wakes up with a page it read before")
                    self._other_step(run)
                continue
            calls = 0
            while run in self.others and calls < 4 and self.rng.random() < run.pace:
                self._other_step(run)
                calls += 1

    # --- Clients ------------------------------------------------------------------------------

    def _client_op(self, client: SimClient, new: bool = True) -> None:
        if self.in_client_op:
            return
        self.in_client_op = True
        try:
            if client.sleep:
                client.sleep -= 1
                if new:
                    self._read(client, self._pick_key())
                return
            if client.pending is None:
                if self.rng.random() < 0.35:
                    self._read(client, self._pick_key())
                    return
                client.sequence += 1
                key = self._pick_key()
                if self.rng.random() < 0.25:
                    client.pending = PendingWrite(client.sequence, CommandOp.DELETE, key, None)
                else:
                    self.values += 1
                    client.pending = PendingWrite(client.sequence, CommandOp.PUT, key,
                                                  b"v%d-c%d" % (self.values, client.client_id))
            self._write(client)
        finally:
            self.in_client_op = False
        self.check_invariants()

    def _pick_key(self) -> bytes:
        """Half the time a key that is moving (where the races are), else any."""
        if self.intents and self.rng.random() < 0.5:
            ranges = self.intents[self.rng.choice(list(self.intents))].record.ranges
            moving = [key for key in self.keys if self.positions[key] in ranges]
            if moving:
                return self.rng.choice(moving)
        return self.rng.choice(self.keys)

    def _refresh(self, client: SimClient) -> None:
        client.shard_map = self.operator_directory.current_map()

    def _read(self, client: SimClient, key: bytes) -> None:
        if self.rng.random() < self.scenario.refresh_rate:
            self._refresh(client)
        for _ in range(3):
            group = self.groups[client.shard_map.group_for(key)]
            if group.down_steps:
                return
            if not group.store.owns(key):
                self.result.wrong_group += 1
                self._refresh(client)
                continue
            value = group.store.get(key)
            self.result.reads += 1
            self.log(f"client {client.client_id}: get {key.decode()} at group {group.number} -> {_show(value)}")
            if value != self.model.get(key):
                raise Violation(f"linearizability: client {client.client_id} read {key.decode()} = {_show(value)} "
                                f"at group {group.number}, expected {_show(self.model.get(key))}")
            return

    def _write(self, client: SimClient) -> None:
        write = client.pending
        assert write is not None
        if self.rng.random() < self.scenario.refresh_rate:
            self._refresh(client)
        command = Command(write.op, write.key, write.value, client.client_id, write.sequence, 1_000 + self.step)
        for _ in range(3):
            group = self.groups[client.shard_map.group_for(write.key)]
            try:
                result = group.propose(encode_command(command))
            except GroupUnavailable:
                return
            assert isinstance(result, ApplyResult), result
            if result.wrong_group:
                self.result.wrong_group += 1
                self.log(f"client {client.client_id}: seq {write.sequence} {write.op.name} {write.key.decode()} "
                         f"at group {group.number}: wrong group (map epoch {client.shard_map.epoch})")
                self._refresh(client)
                continue
            self._check_write(client, group, write, result)
            if self.faults_on and self.rng.random() < self.scenario.lost_reply_rate:
                # The reply is lost: the client retries later, perhaps after
                # reconnecting (a fresh map), perhaps with its old one.
                write.lost = True
                client.sleep = self.rng.randint(0, 40)
                if self.rng.random() < 0.7:
                    self._refresh(client)
                self.log(f"  reply lost (client sleeps {client.sleep})")
                return
            client.pending = None
            return

    def _check_write(self, client: SimClient, group: SimGroup, write: PendingWrite, result: ApplyResult) -> None:
        ident = (client.client_id, write.sequence)
        name = (f"client {client.client_id} seq {write.sequence} {write.op.name} {write.key.decode()} "
                f"at group {group.number}")
        outcome = (result.existed, result.old_value)
        if result.duplicate:
            original = self.effects.get(ident)
            self.log(f"client {client.client_id}: {name}: duplicate -> existed={result.existed} "
                     f"old={_show(result.old_value)}")
            if result.stale:
                raise Violation(f"exactly-once: {name} answered as stale (one write in flight per client)")
            if original is None:
                raise Violation(f"exactly-once: {name} answered as a retry of a write that never took effect")
            if outcome != original:
                raise Violation(f"exactly-once: retried {name} answered existed={result.existed} "
                                f"old={_show(result.old_value)}, originally existed={original[0]} "
                                f"old={_show(original[1])}")
            if write.lost:
                self.result.retries_answered += 1
            return
        self.log(f"client {client.client_id}: {name} -> existed={result.existed} old={_show(result.old_value)}"
                 + (f" value={_show(write.value)}" if write.value is not None else ""))
        if ident in self.effects:
            raise Violation(f"exactly-once: {name} took effect twice (first answer existed={self.effects[ident][0]} "
                            f"old={_show(self.effects[ident][1])})")
        expected_old = self.model.get(write.key)
        if result.old_value != expected_old:
            raise Violation(f"linearizability: {name} found {_show(result.old_value)}, "
                            f"expected {_show(expected_old)}")
        self.effects[ident] = outcome
        self.model[write.key] = write.value
        self.result.writes += 1

    # --- Invariants -------------------------------------------------------------------------

    def check_invariants(self) -> None:
        if self.version == self.checked_version:
            return                  # nothing changed since the last check
        self.checked_version = self.version
        groups = list(self.groups.values())
        served = [(g, g.served()) for g in groups]
        for i, (a, ra) in enumerate(served):
            for b, rb in served[i + 1:]:
                if ra and rb and ra.difference(rb) != ra:
                    both = ra.difference(ra.difference(rb))
                    raise Violation(f"single owner: groups {a.number} and {b.number} both serve {both}")
        shard_map = self.operator_directory.current_map()
        for key in self.keys:
            position = self.positions[key]
            serving = [g for g, ranges in served if position in ranges]
            if serving:
                group = serving[0]
                if not group.store.owns(key):
                    raise Violation(f"single owner: group {group.number} serves {key.decode()} by its ranges "
                                    f"but does not accept it")
                value = group.store.get(key)
                if value != self.model.get(key):
                    raise Violation(f"linearizability: group {group.number} serves {key.decode()} = "
                                    f"{_show(value)}, expected {_show(self.model.get(key))}")
            named = shard_map.group_for(key)
            owner = self.groups.get(named)
            if owner is None or not (owner.store.owns(key) or owner.exports_frozen(position)):
                raise Violation(f"map never runs ahead: the map (epoch {shard_map.epoch}) names group {named} "
                                f"for {key.decode()}, which neither serves it nor exports it frozen")
            for group in groups:
                if group is not owner and (not serving or group is not serving[0]) and group.store.owns(key):
                    raise Violation(f"single owner: {key.decode()} is accepted by group {group.number} too")

    def _final_checks(self) -> None:
        records = drive(self.operator.records())
        if records:
            raise Violation(f"end: move records left in the metadata group: {records}")
        shard_map = self.operator_directory.current_map()
        covered = RangeSet()
        for group in self.groups.values():
            shard = group.store.shard_state
            if shard.exports or shard.imports:
                raise Violation(f"end: group {group.number} still has exports {list(shard.exports)} "
                                f"or imports {list(shard.imports)}")
            owned = shard.owned or RangeSet()
            if owned.difference(covered) != owned:
                raise Violation(f"end: group {group.number} owns positions another group owns too")
            covered = covered.union(owned)
            expected = shard_map.owned_by(group.number)
            if owned != expected:
                raise Violation(f"end: group {group.number} owns {owned}, the map (epoch {shard_map.epoch}) "
                                f"says {expected}")
        if covered != RangeSet([KeyRange(0, SPACE)]):
            raise Violation(f"end: ownership does not cover the whole space: {covered}")
        for group in self.groups.values():
            engine = group.store._engine
            indexed = {position_index.user_key(r) for r in engine.position.view.keys()}
            stored = set(engine.kv.view.keys())
            if indexed != stored:
                raise Violation(f"end: group {group.number}'s position index lists {sorted(indexed - stored)[:3]} "
                                f"that it does not hold, misses {sorted(stored - indexed)[:3]}")
        for key in self.keys:
            owner = self.groups[shard_map.group_for(key)]
            value = owner.store.get(key)
            if value != self.model.get(key):
                raise Violation(f"end: {key.decode()} = {_show(value)} at its owner {owner.number}, "
                                f"expected {_show(self.model.get(key))}")
            for group in self.groups.values():
                if group is not owner and group.store.get(key) is not None:
                    raise Violation(f"end: {key.decode()} left in group {group.number}, which does not own it")


def _show(value: bytes | None) -> str:
    return "absent" if value is None else value.decode(errors="replace")


def run_seed(seed: int, *, trace: bool = False, mover_class: type[Mover] = Mover) -> MoveSimResult:
    return MoveSimulation(Scenario.from_seed(seed), trace=trace, mover_class=mover_class).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim.moves", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, help="run this one seed")
    parser.add_argument("--seeds", default="0:100", help="range START:STOP of seeds (default 0:100)")
    parser.add_argument("--trace", action="store_true", help="print the whole trace of each run")
    args = parser.parse_args(argv)
    # Refused shard commands are part of the game (an abort after a freeze
    # the record does not show yet): the trace says what happened.
    logging.getLogger("shardnode").setLevel(logging.ERROR)
    if args.seed is not None:
        seeds = range(args.seed, args.seed + 1)
    else:
        start, stop = (int(part) for part in args.seeds.split(":"))
        seeds = range(start, stop)
    totals: Counter = Counter()
    crashes: Counter = Counter()
    failures = 0
    began = time.perf_counter()
    for seed in seeds:
        result = run_seed(seed, trace=args.trace)
        if args.trace:
            print("\n".join(result.trace))
        if not result.ok:
            failures += 1
            print(result.report() if args.trace else run_seed(seed, trace=True).report())
        crashes += result.crashes
        for name in ("moves_planned", "moves_completed", "aborts", "abort_refused", "restarts", "writes", "reads",
                     "retries_answered", "wrong_group", "rivals", "takeovers", "retried_moves", "superseded",
                     "fenced"):
            totals[name] += getattr(result, name)
    elapsed = time.perf_counter() - began
    print(f"{len(seeds)} seeds, {failures} failed, {elapsed:.1f}s", file=sys.stderr)
    print("totals: " + ", ".join(f"{k} {v}" for k, v in totals.items()), file=sys.stderr)
    print("mover crashes by phase: " + (", ".join(f"{k} {v}" for k, v in sorted(crashes.items())) or "none"),
          file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
