"""The simulator must catch a Raft that is subtly wrong.

Each test flips one switch that breaks a safety rule and asserts that the
seeded simulation reports a violation of the expected kind within a bounded
number of seeds. If the simulator were blind to that class of bug, the test
would fail. The membership variants (two changes in flight, a change before
the leader applied an entry of its term, promotion of a learner that has not
caught up) are at the end.

Committing an earlier term's entry by counting (Raft's Figure 8) needs a
precise three-leader sequence that random faults reach too rarely to be a
reliable CI check; test_scripted.py plays that sequence and shows the
checker catching it.
"""

from __future__ import annotations

import os

import pytest

from shardnode.raft import NONE, ConfChange, ConfChangeType, HardState, MessageType, StateRole
from shardnode.raft.log import RaftLog
from shardnode.raft.raft import Raft

from .cluster import run_seed
from .invariants import SafetyChecker

MAX_SEEDS = 3000


def _first_violation(max_seeds: int = MAX_SEEDS, profile: str = "static", kinds: tuple[str, ...] = (),
                     variant: str = "") -> tuple[int, str]:
    """The first seed that fails (with a violation of one of `kinds`, if
    given: a broken core may also stall before it loses data). Variants of
    the protocol's basics run the scenarios without membership changes
    ("static", as they were before those existed); membership variants run
    the "membership" profile. The seed and a replay command are printed."""
    for seed in range(max_seeds):
        result = run_seed(seed, profile=profile)
        if not result.ok and (not kinds or any(kind in (result.violation or "") for kind in kinds)):
            replay = f".venv/bin/python -m tests.sim.run --seed {seed} --trace --profile {profile}"
            print(f"caught at seed {seed}: {result.violation}\n  replay: {replay}"
                  + (f" --variant {variant}" if variant else ""))
            return seed, result.violation or ""
    pytest.fail(f"no violation found in {max_seeds} seeds: the simulator missed a deliberately broken Raft")


def test_forgetting_the_vote_across_restarts_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def hard_state_without_vote(self: Raft) -> HardState:
        # Broken: the vote never reaches stable storage.
        return HardState(self.term, NONE, self.log.committed)

    monkeypatch.setattr(Raft, "hard_state", hard_state_without_vote)
    # Crash storms find it within a hundred seeds (the static profile took nine hundred).
    seed, violation = _first_violation(profile="crashes")
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


# --- Membership ------------------------------------------------------------------------
#
# The simulation changes the membership of most scenarios (see cluster.py).
# Each test below removes one of the core's membership rules; the invariants,
# measured against the configuration in force, must notice.


def test_two_membership_changes_in_flight_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # Broken: a leader takes a second change while its first is unapplied.
    # Two changes committed together move the group two servers at once, and
    # a node still on the old configuration can commit with a majority that
    # does not intersect the new one.
    monkeypatch.setattr(Raft, "_conf_change_pending", lambda self: False)
    seed, violation = _first_violation(profile="membership")
    assert "durable commit" in violation or any(kind in violation for kind in _LOSS), violation


def test_membership_change_before_the_leader_applied_an_entry_of_its_term_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Broken: a new leader proposes a change at once, while a change it
    # inherited from the previous term may still be uncommitted (the bug in
    # single-server changes that Ongaro's 2015 fix closes).
    monkeypatch.setattr(Raft, "_applied_entry_of_current_term", lambda self: True)
    seed, violation = _first_violation(profile="membership")
    assert "durable commit" in violation or any(kind in violation for kind in _LOSS), violation


def _promote_learners_before_they_caught_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken: the leader promotes a learner without measuring its catch-up
    (every learner is reported ready, so the simulation's operator promotes
    it as soon as it joined) and trusts the promotion instead of the
    learner's acknowledgements: the new voter counts toward commits as if it
    held the leader's log. In this core a too-early promotion would otherwise
    cost availability only (a promoted voter counts only what it
    acknowledged); this is the shortcut that turns it into data loss."""
    monkeypatch.setattr(Raft, "_learner_caught_up", lambda self, node_id: node_id in self.tracker.learners)
    original_apply = Raft.apply_conf_change

    def apply_and_trust(self: Raft, change: ConfChange):
        conf = original_apply(self, change)
        if change.type is ConfChangeType.ADD_NODE and self.role is StateRole.LEADER:
            self.__dict__.setdefault("trusted_promotions", set()).add(change.node_id)
        return conf

    def commit_counting_trusted(self: Raft) -> bool:
        trusted = self.__dict__.get("trusted_promotions", set())
        progress = self.tracker.progress
        last = self.log.last_index()

        def acked(node_id: int) -> int:
            if node_id not in progress:
                return 0
            return max(progress[node_id].match, last) if node_id in trusted else progress[node_id].match

        return self.log.maybe_commit(self.tracker.voters.committed_index(acked), self.term)

    monkeypatch.setattr(Raft, "apply_conf_change", apply_and_trust)
    monkeypatch.setattr(Raft, "_maybe_commit", commit_counting_trusted)


def test_promoting_a_learner_that_has_not_caught_up_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    _promote_learners_before_they_caught_up(monkeypatch)
    seed, violation = _first_violation(profile="membership")
    assert "durable commit" in violation, violation


def test_promoting_a_learner_that_has_not_caught_up_loses_committed_data(monkeypatch: pytest.MonkeyPatch) -> None:
    # With the early warning (durable commit) off, the same bug runs on until
    # a leader is elected without entries that were committed.
    # It may also stall a group first (a promoted voter that holds nothing
    # counts toward every quorum): those seeds are passed over.
    _promote_learners_before_they_caught_up(monkeypatch)
    monkeypatch.setattr(SafetyChecker, "check_durable_commit", False)
    seed, violation = _first_violation(profile="membership", kinds=_LOSS)
    assert any(kind in violation for kind in _LOSS), violation


# What lost committed data looks like to the checker.
_LOSS = ("leader completeness", "committed entry changed", "state machine safety", "linearizability")


# --- Incarnations ----------------------------------------------------------------------


def test_counting_a_wiped_disk_under_its_old_id_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # Broken: the core does not check a sender's incarnation against the one
    # the group bound to its id. A node whose disk was wiped comes back empty
    # under its old id (as a worker without the start rules would): its
    # forgotten vote and its lost log are counted again, so a node that
    # lacks a committed entry wins an election with its vote, or two nodes
    # lead one term. The "wipe" profile loses disks among crashes and
    # partitions (cluster.py, Simulation._wipe_candidates).
    monkeypatch.setattr(Raft, "_other_incarnation_bound", lambda self, m: 0)
    seed, violation = _first_violation(profile="wipe", kinds=(*_LOSS, "election safety"),
                                       variant="no-incarnation-check")
    assert any(kind in violation for kind in (*_LOSS, "election safety")), violation


def test_the_wipe_profile_is_safe_with_the_incarnation_checks() -> None:
    # The same scenarios with the core as it is: every lost disk is refused.
    for seed in range(60):
        result = run_seed(seed, profile="wipe")
        if not result.ok:
            pytest.fail(run_seed(seed, trace=True, profile="wipe").report(), pytrace=False)


def test_the_crashes_profile_is_safe_with_the_core_as_it_is() -> None:
    # The crash storms that catch a forgotten vote find nothing wrong with the real core.
    for seed in range(100):
        result = run_seed(seed, profile="crashes")
        if not result.ok:
            pytest.fail(run_seed(seed, trace=True, profile="crashes").report(), pytrace=False)


# --- Quiescence (docs/raft.md, "Quiescence"): the "quiesce" profile --------------------------------


def test_a_quiesced_follower_that_never_wakes_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Raft._wakes

    def followers_sleep_on(self: Raft, m) -> bool:
        # Broken: a quiesced follower wakes for nothing but its leader's link failing.
        if self.role is StateRole.LEADER:
            return original(self, m)
        return m.type is MessageType.UNREACHABLE and original(self, m)

    monkeypatch.setattr(Raft, "_wakes", followers_sleep_on)
    seed, violation = _first_violation(profile="quiesce", kinds=("liveness", "quiescence"))
    assert "liveness" in violation or "quiescence" in violation, violation


def test_a_quiesced_leader_that_is_gone_unnoticed_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Raft._wakes
    # Broken: a quiesced follower is not woken by its leader's broken link.
    monkeypatch.setattr(Raft, "_wakes", lambda self, m: m.type is not MessageType.UNREACHABLE and original(self, m))
    seed, violation = _first_violation(profile="quiesce", kinds=("liveness",))
    assert "liveness" in violation, violation


def test_quiescing_while_a_follower_lags_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def quiesce_whatever_the_log(self: Raft, m) -> None:
        # Broken: a follower quiesces whether or not it holds the leader's last entry...
        if self.log.match_term(m.index, m.log_term):
            self.log.commit_to(m.commit)
        self.quiesced = True

    # ... and a leader quiesces whether or not its followers caught up.
    monkeypatch.setattr(Raft, "_followers_caught_up", lambda self: True)
    monkeypatch.setattr(Raft, "_handle_quiesce", quiesce_whatever_the_log)
    seed, violation = _first_violation(profile="quiesce", kinds=("quiescence",))
    assert "quiescence" in violation, violation


def test_the_quiesce_profile_is_safe_live_and_quiet_with_the_core_as_it_is() -> None:
    # SIM_QUIESCE_SEEDS=N for a longer run.
    for seed in range(int(os.environ.get("SIM_QUIESCE_SEEDS", "150"))):
        result = run_seed(seed, profile="quiesce")
        if not result.ok:
            pytest.fail(run_seed(seed, trace=True, profile="quiesce").report(), pytrace=False)
