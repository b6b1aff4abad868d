"""The move protocol (shardnode/placement/moves.py) under seeded crashes,
restarts, aborts, stale routers and lost replies (tests/sim/moves.py), and
broken movers and state machines that the simulation must catch.

SIM_SEEDS=N runs N seeds (default 80, as `make test` does; `make sim-soak`
runs 20,000), SIM_SEED_START=S starts elsewhere. A failure prints its seed,
the scenario, a replay command and the trace.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from shardnode.placement.moves import MOVES_KEY, MoveProgress, Mover, Phase, decode_moves, encode_moves
from shardnode.storage import export_reads, fencing
from shardnode.storage.ownership import Import, ShardState
from shardnode.storage.shard_commands import ShardOp
from shardnode.storage.store import ReplicaStore

from .moves import Scenario, run_seed

SEEDS = int(os.environ.get("SIM_SEEDS", "80"))
START = int(os.environ.get("SIM_SEED_START", "0"))
CHUNK = 25
#: Seeds a broken variant gets to show itself (each is caught far sooner).
MAX_SEEDS_TO_CATCH = 60


def _chunks() -> list[range]:
    return [range(s, min(s + CHUNK, START + SEEDS)) for s in range(START, START + SEEDS, CHUNK)]


@pytest.mark.parametrize("seeds", _chunks(), ids=lambda r: f"seeds{r.start}-{r.stop - 1}")
def test_moves_under_crashes_keep_every_invariant(seeds: range) -> None:
    for seed in seeds:
        result = run_seed(seed)
        if not result.ok:
            # Replay the same seed with tracing on: the run is deterministic.
            pytest.fail(run_seed(seed, trace=True).report(), pytrace=False)


def test_replay_is_deterministic() -> None:
    first = run_seed(7, trace=True)
    second = run_seed(7, trace=True)
    assert first.trace == second.trace
    assert first.trace, "a traced run records events"


def test_the_seeds_exercise_every_phase_and_fault() -> None:
    """The default run reaches what it claims to test: crashes in every
    phase, aborts, restarts, retries answered by their session, stale
    routes, completed moves of each workload, second runs of a move and
    scheduler take-overs (runs stopped because another went on, zombies'
    commands refused by their token), moves planned again after an abort."""
    crashes: dict[str, int] = {}
    totals = {"completed": 0, "aborts": 0, "restarts": 0, "retries": 0, "wrong_group": 0, "rivals": 0,
              "takeovers": 0, "retried": 0, "superseded": 0, "fenced": 0}
    workloads: set[str] = set()
    for seed in range(START, START + min(SEEDS, 25)):
        result = run_seed(seed)
        assert result.ok, result.violation
        for phase, count in result.crashes.items():
            crashes[phase] = crashes.get(phase, 0) + count
        totals["completed"] += result.moves_completed
        totals["aborts"] += result.aborts
        totals["restarts"] += result.restarts
        totals["retries"] += result.retries_answered
        totals["wrong_group"] += result.wrong_group
        totals["rivals"] += result.rivals
        totals["takeovers"] += result.takeovers
        totals["retried"] += result.retried_moves
        totals["superseded"] += result.superseded
        totals["fenced"] += result.fenced
        workloads.update(Scenario.from_seed(seed).rounds)
    assert {phase.name for phase in Phase} | {"fence", "abort"} <= set(crashes), crashes
    assert all(totals.values()), totals
    assert workloads == {"add", "remove", "random", "race", "retry"}


# --- Broken variants: each must be caught ----------------------------------------------------


def _first_violation(mover_class: type[Mover] = Mover) -> tuple[int, str]:
    for seed in range(MAX_SEEDS_TO_CATCH):
        result = run_seed(seed, mover_class=mover_class)
        if not result.ok:
            return seed, result.violation or ""
    pytest.fail(f"no violation in {MAX_SEEDS_TO_CATCH} seeds: the simulation missed a deliberately broken move")


def _delta_read_without_freeze(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let export_delta read an export that is not frozen (it refuses to):
    what a mover that ships before freezing would get."""
    original = ReplicaStore.export_delta

    def export_delta(self: ReplicaStore, move_id: int, *args):  # type: ignore[no-untyped-def]
        shard = self.shard_state
        export = shard.exports.get(move_id)
        if export is None or export.frozen:
            return original(self, move_id, *args)
        saved = self._shard
        self._shard = replace(shard, exports={**shard.exports, move_id: replace(export, frozen=True)})
        try:
            return original(self, move_id, *args)
        finally:
            self._shard = saved

    monkeypatch.setattr(ReplicaStore, "export_delta", export_delta)


class ShipsBeforeFreezing(Mover):
    """Broken: the delta is shipped and the target activated while the source
    still serves the range; the freeze comes last."""

    async def run(self, record, *, stop_after=None):  # type: ignore[no-untyped-def]
        if record.phase is Phase.COPIED and not record.aborting:
            shard_map = await self.directory.load_map()
            await self._ship_delta(record, MoveProgress())
            await self.groups.shard(record.target, self._command(ShardOp.IMPORT_ACTIVATE, record.move_id,
                                                                 epoch=shard_map.epoch + 1))
            await self.groups.shard(record.source, self._command(ShardOp.EXPORT_FREEZE, record.move_id))
            record = await self._advance(record, phase=Phase.ACTIVATED, epoch=shard_map.epoch + 1)
            if stop_after is not None and record.phase > stop_after:
                return record
        return await super().run(record, stop_after=stop_after)


def test_shipping_the_delta_before_the_freeze_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    _delta_read_without_freeze(monkeypatch)
    seed, violation = _first_violation(ShipsBeforeFreezing)
    assert violation.startswith(("single owner", "linearizability")), violation


async def _delta_pages(mover: Mover, record):  # type: ignore[no-untyped-def]
    pages, after = [], None
    while True:
        page = await mover.groups.delta(record.source, record.move_id, after, 1 << 20)
        pages.append(page)
        after = page.next_after
        if after is None:
            return pages


class ShipsOnlySessions(Mover):
    """Broken: the delta carries the sessions but not the keys changed since
    the export began."""

    async def _ship_delta(self, record, progress):  # type: ignore[no-untyped-def]
        for page in await _delta_pages(self, record):
            await self._ingest(record, sessions=page.sessions, delta=True)


def test_a_delta_without_the_dirty_keys_is_caught() -> None:
    seed, violation = _first_violation(ShipsOnlySessions)
    assert violation.startswith(("linearizability", "end:")), violation


class ShipsNoSessions(Mover):
    """Broken: the delta carries the keys but not the client sessions."""

    async def _ship_delta(self, record, progress):  # type: ignore[no-untyped-def]
        for page in await _delta_pages(self, record):
            await self._ingest(record, puts=page.puts, deletes=page.deletes, delta=True)


def test_sessions_left_behind_are_caught() -> None:
    seed, violation = _first_violation(ShipsNoSessions)
    assert violation.startswith(("exactly-once", "linearizability")), violation


class FlipsBeforeActivating(Mover):
    """Broken: the map names the target before the target serves the range."""

    async def run(self, record, *, stop_after=None):  # type: ignore[no-untyped-def]
        if record.phase is Phase.FROZEN and not record.aborting:
            await self._flip(record)
        return await super().run(record, stop_after=stop_after)


def test_flipping_the_map_before_the_activation_is_caught() -> None:
    seed, violation = _first_violation(FlipsBeforeActivating)
    assert violation.startswith("map never runs ahead"), violation


class FinishesBeforeFlipping(Mover):
    """Broken: the source lets the range go before the map names the target."""

    async def run(self, record, *, stop_after=None):  # type: ignore[no-untyped-def]
        if record.phase is Phase.ACTIVATED:
            await self.groups.shard(record.source, self._command(ShardOp.EXPORT_FINISH, record.move_id,
                                                                 epoch=record.epoch))
        return await super().run(record, stop_after=stop_after)


def test_finishing_the_export_before_the_flip_is_caught() -> None:
    seed, violation = _first_violation(FinishesBeforeFlipping)
    assert violation.startswith("map never runs ahead"), violation


class _AcceptsEverything:
    """A group's ownership with the check at apply removed (everything else,
    dirty tracking included, as it was)."""

    def __init__(self, shard: ShardState) -> None:
        self._shard = shard

    def accepts(self, key: bytes) -> bool:
        return True

    def accepts_position(self, position: int) -> bool:
        return True

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._shard, name)


def test_skipping_the_ownership_check_at_apply_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    original = ReplicaStore._apply_command

    def apply_without_check(self, index, command, clock_ms, pending, shard):  # type: ignore[no-untyped-def]
        return original(self, index, command, clock_ms, pending, _AcceptsEverything(shard))

    monkeypatch.setattr(ReplicaStore, "_apply_command", apply_without_check)
    seed, violation = _first_violation()
    assert violation.startswith(("linearizability", "end:", "exactly-once")), violation


def test_serving_a_frozen_range_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # Broken: a group serves what it owns or exports, frozen or not.
    monkeypatch.setattr(ShardState, "accepts", lambda self, key: self.owned is None or self.owned.contains_key(key))
    monkeypatch.setattr(ShardState, "accepts_position",
                        lambda self, position: self.owned is None or position in self.owned)
    seed, violation = _first_violation()
    assert violation.startswith(("single owner", "linearizability")), violation


# --- Broken fencing, ordering and bookkeeping of concurrent movers ---------------------------


def test_a_fencing_token_not_checked_at_apply_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken: groups apply a deposed scheduler's commands (a zombie's)."""
    monkeypatch.setattr(fencing, "admits", lambda group_fence, fence: True)
    seed, violation = _first_violation()
    assert violation.startswith("fencing"), violation


def test_a_copy_chunk_admitted_after_the_delta_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken: a page another run scanned before a change lands after the
    delta that carried the change (the lost write, the resurrected key)."""
    monkeypatch.setattr(Import, "admits", lambda self, delta: True)
    seed, violation = _first_violation()
    assert violation.startswith(("linearizability", "end:")), violation


class RewritesRecordsBlindly(Mover):
    """Broken: a mover that writes its record without checking it is still
    the one it holds (the old `_record`/`_forget`): a stale run re-adds a
    finished move, moves an advanced one back, or flips a map it should not."""

    async def _expect(self, record):  # type: ignore[no-untyped-def]
        return await self.directory.read(MOVES_KEY)

    async def _replace(self, record, new):  # type: ignore[no-untyped-def]
        while True:
            raw = await self.directory.read(MOVES_KEY)
            records = [r for r in decode_moves(raw) if r.move_id != record.move_id]
            if new is not None:
                records.append(new)
            swapped, _ = await self.directory.compare_and_set(MOVES_KEY, raw, encode_moves(records),
                                                              guards=self.guards)
            if swapped:
                return new


def test_a_mover_rewriting_its_record_unchecked_is_caught() -> None:
    # Caught when the stale run goes on: a step of its recorded move is
    # refused, its finished move comes back in the records, or its flip
    # names a group that does not serve the range.
    seed, violation = _first_violation(RewritesRecordsBlindly)
    assert violation.startswith(("move refused", "end:", "map never runs ahead", "linearizability",
                                 "single owner")), violation


def test_two_imports_of_one_range_admitted_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken: a move planned again after an abort imports the range while
    the aborted one's import is still there."""
    monkeypatch.setattr(ShardState, "imported_elsewhere", lambda self, move_id, ranges: [])
    seed, violation = _first_violation()
    assert violation.startswith(("linearizability", "end:")), violation


def test_a_delta_without_the_sessions_its_keys_need_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken: the delta picks sessions by the wrong key (those whose last
    write stays behind), so a retry of a write to a moved key is applied
    again at the target."""
    monkeypatch.setattr(export_reads, "session_needed",
                        lambda record, ranges: record.position is not None and record.position not in ranges)
    seed, violation = _first_violation()
    assert violation.startswith("exactly-once"), violation
