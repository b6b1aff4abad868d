"""The membership rules of shardnode/raft/confchange.py, on plain ConfStates."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardnode.raft import ConfChange, ConfState, InvalidConfChange, Member, confchange
from shardnode.raft.tracker import ProgressTracker

BASE = ConfState(voters=(1, 2, 3))


def test_a_member_joins_as_a_learner_with_its_address_and_is_promoted() -> None:
    conf = confchange.apply(BASE, ConfChange.add_learner(4, "host4", "127.0.0.4:50100"))
    assert conf.learners == (4,) and conf.member(4) == Member(4, "host4", "127.0.0.4:50100")
    conf = confchange.apply(conf, ConfChange.promote(4))
    assert conf.voters == (1, 2, 3, 4) and conf.learners == ()
    assert conf.member(4) is not None, "the address stays while it is a member"


def test_removal_is_for_good() -> None:
    conf = confchange.apply(BASE, ConfChange.remove(3))
    assert conf.voters == (1, 2) and conf.removed == (3,)
    for change in (ConfChange.add_learner(3), ConfChange.promote(3), ConfChange.remove(3)):
        with pytest.raises(InvalidConfChange, match="never reused"):
            confchange.apply(conf, change)


def test_a_committed_invalid_change_leaves_the_configuration_as_it_was() -> None:
    conf, reason = confchange.apply_committed(BASE, ConfChange.promote(9))
    assert conf is BASE and "not a learner" in reason
    assert not confchange.already_applied(BASE, ConfChange.promote(9))
    assert confchange.already_applied(BASE, ConfChange.promote(2))


def test_tracker_keeps_the_progress_of_members_that_stay() -> None:
    tracker = ProgressTracker(max_inflight=4)
    tracker.apply_conf_state(BASE, next_index=10)
    tracker.progress[2].match = 7
    conf = confchange.apply(BASE, ConfChange.add_learner(4))
    confchange.switch_tracker(tracker, conf, next_index=12)
    assert tracker.progress[2].match == 7
    assert tracker.progress[4].is_learner and tracker.progress[4].recent_active
    conf = confchange.apply(conf, ConfChange.remove(2))
    confchange.switch_tracker(tracker, conf, next_index=12)
    assert 2 not in tracker.progress and tracker.removed == frozenset({2})


_changes = st.lists(
    st.tuples(st.sampled_from(["add", "promote", "remove"]), st.integers(min_value=1, max_value=7)),
    max_size=25,
)


def _build(step: tuple[str, int]) -> ConfChange:
    kind, node_id = step
    if kind == "add":
        return ConfChange.add_learner(node_id, f"h{node_id}", f"a{node_id}")
    return ConfChange.promote(node_id) if kind == "promote" else ConfChange.remove(node_id)


@settings(max_examples=300, deadline=None)
@given(_changes, st.integers(min_value=0, max_value=25))
def test_replaying_changes_over_a_newer_configuration_is_a_no_op(steps, cut: int) -> None:
    # What lets a node start from a snapshot carrying the leader's current
    # configuration (or a joining node from the configuration that adds it)
    # and replay the log from an earlier point: every change whose effect is
    # already there is a no-op, and the result is the same.
    applied = []
    conf = BASE
    for step in steps:
        change = _build(step)
        conf, refusal = confchange.apply_committed(conf, change)
        if refusal is None:
            applied.append(change)
    newer = conf
    replayed = newer
    for change in applied[min(cut, len(applied)):]:
        replayed, _ = confchange.apply_committed(replayed, change)
    assert replayed == newer
    assert newer.voters, "there is always a voter"
    assert not set(newer.removed) & (set(newer.voters) | set(newer.learners))
