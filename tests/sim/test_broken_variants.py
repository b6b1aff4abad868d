"""The simulator must catch a Raft that is subtly wrong.

Each test flips one switch that breaks a safety rule and asserts that the
seeded simulation reports a violation of the expected kind within a bounded
number of seeds. If the simulator were blind to that class of bug, the test
would fail.

Committing an earlier term's entry by counting (Raft's Figure 8) needs a
precise three-leader sequence that random faults reach too rarely to be a
reliable CI check; test_scripted.py plays that sequence and shows the
checker catching it.
"""

from __future__ import annotations

import pytest

from shardnode.raft import HardState, NONE
from shardnode.raft.log import RaftLog
from shardnode.raft.raft import Raft

from .cluster import run_seed

MAX_SEEDS = 3000


def _first_violation(max_seeds: int = MAX_SEEDS) -> tuple[int, str]:
    for seed in range(max_seeds):
        result = run_seed(seed)
        if not result.ok:
            return seed, result.violation or ""
    pytest.fail(f"no violation found in {max_seeds} seeds: the simulator missed a deliberately broken Raft")


def test_forgetting_the_vote_across_restarts_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def hard_state_without_vote(self: Raft) -> HardState:
        # Broken: the vote never reaches stable storage.
        return HardState(self.term, NONE, self.log.committed)

    monkeypatch.setattr(Raft, "hard_state", hard_state_without_vote)
    seed, violation = _first_violation()
    assert "vote safety" in violation or "election safety" in violation, violation


def test_granting_votes_to_out_of_date_logs_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def always_up_to_date(self: RaftLog, last_index: int, term: int) -> bool:
        # Broken: votes ignore whose log is more complete (Raft 5.4.1).
        return True

    monkeypatch.setattr(RaftLog, "is_up_to_date", always_up_to_date)
    seed, violation = _first_violation()
    assert any(kind in violation for kind in ("leader completeness", "committed entry changed", "state machine safety")), violation


def test_reads_served_without_confirming_leadership_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def read_without_heartbeat_round(self: Raft, m) -> None:
        # Broken: a deposed leader that has not noticed yet serves stale reads.
        self._respond_to_read_index(m, self.log.committed)

    monkeypatch.setattr(Raft, "_leader_read_index", read_without_heartbeat_round)
    seed, violation = _first_violation()
    assert "linearizability" in violation, violation


def test_leader_counting_its_unpersisted_entries_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    original_append = Raft._append_entries

    def append_and_count_self(self: Raft, entries) -> bool:
        # Broken: the leader counts new entries toward the quorum before its
        # own write finished (its appends may leave in parallel with it).
        appended = original_append(self, entries)
        if appended and self.id in self.tracker.progress:
            self.tracker.progress[self.id].maybe_update(self.log.last_index())
        return appended

    monkeypatch.setattr(Raft, "_append_entries", append_and_count_self)
    seed, violation = _first_violation()
    assert "durable commit" in violation, violation
