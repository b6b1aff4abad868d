"""Changes of shape under concurrent and zombie schedulers and concurrent
admins (tests/sim/schedulers.py), and broken variants the simulation must
catch.

SIM_SEEDS=N runs N seeds (default 300, as `make test` does), SIM_SEED_START=S
starts elsewhere. A failure prints its seed, the scenario, a replay command
and the trace.
"""

from __future__ import annotations

import os

import pytest

from .schedulers import Scenario, Variant, run_seed

SEEDS = int(os.environ.get("SIM_SEEDS", "300"))
START = int(os.environ.get("SIM_SEED_START", "0"))
CHUNK = 100
MAX_SEEDS_TO_CATCH = 100


def _chunks() -> list[range]:
    return [range(s, min(s + CHUNK, START + SEEDS)) for s in range(START, START + SEEDS, CHUNK)]


@pytest.mark.parametrize("seeds", _chunks(), ids=lambda r: f"seeds{r.start}-{r.stop - 1}")
def test_changes_of_shape_keep_every_invariant(seeds: range) -> None:
    for seed in seeds:
        result = run_seed(seed)
        if not result.ok:
            pytest.fail(run_seed(seed, trace=True).report(), pytrace=False)


def test_replay_is_deterministic() -> None:
    first, second = run_seed(11, trace=True), run_seed(11, trace=True)
    assert first.trace == second.trace and first.trace


def test_the_seeds_exercise_what_they_claim() -> None:
    """Take-overs, zombies (paused holders whose lease moved on) refused by
    the fencing token, concurrent admins refused by the leader's checks."""
    totals: dict[str, int] = {}
    admins_only = 0
    for seed in range(START, START + 100):
        result = run_seed(seed)
        assert result.ok, result.violation
        for key, value in result.counts.items():
            totals[key] = totals.get(key, 0) + value
        admins_only += Scenario.from_seed(seed).schedulers == 0
    assert totals["takeovers"] > 100 and totals["pauses"] > 100 and totals["cancels"] > 10, totals
    assert totals["fenced_at_proposal"] > 0 and totals["refused"] > 100 and totals["applied"] > 500, totals
    assert admins_only > 5


def _caught(variant: Variant) -> str:
    for seed in range(MAX_SEEDS_TO_CATCH):
        result = run_seed(seed, variant)
        if not result.ok:
            return result.violation or ""
    return ""


def test_a_leader_that_checks_nothing_is_caught() -> None:
    """Without the leader's checks (the shape policy and the expected
    configuration), two admins that each checked the policy on their own
    view remove voters from the same group."""
    violation = _caught(Variant(leader_checks_policy=False, leader_checks_expected=False))
    assert violation.startswith("min voters"), violation


def test_unguarded_scheduler_writes_are_caught() -> None:
    """A scheduler paused past its lease wakes and writes what it had
    decided: without the lease guard, it overwrites the new holder's
    records (a finished intent running again, a choice replaced)."""
    violation = _caught(Variant(guarded_records=False))
    assert violation.startswith("records never go back"), violation
