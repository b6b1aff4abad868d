from shardnode.raft.quorum import JointConfig, VoteResult, majority_committed_index
from shardnode.raft.tracker import Inflights, Progress, ProgressState


def test_majority_committed_index() -> None:
    acked = {1: 5, 2: 3, 3: 9, 4: 1, 5: 4}
    assert majority_committed_index(acked.keys(), acked.__getitem__) == 4
    assert majority_committed_index([1, 2, 3], acked.__getitem__) == 5


def test_joint_config_needs_both_majorities() -> None:
    joint = JointConfig(incoming=(1, 2, 3), outgoing=(3, 4, 5))
    acked = {1: 9, 2: 9, 3: 2, 4: 1, 5: 1}
    assert joint.committed_index(acked.__getitem__) == 1
    assert joint.vote_result({1: True, 2: True}) is VoteResult.PENDING
    assert joint.vote_result({1: True, 2: True, 4: True, 5: True}) is VoteResult.WON
    assert joint.vote_result({4: False, 5: False}) is VoteResult.LOST
    assert JointConfig((1, 2, 3)).vote_result({1: False, 2: False}) is VoteResult.LOST


def test_inflights_window() -> None:
    window = Inflights(3)
    for last in (5, 7, 9):
        window.add(last)
    assert window.full()
    window.free_le(7)
    assert len(window) == 1 and not window.full()
    window.free_first_one()
    assert len(window) == 0


def test_progress_replicate_sends_optimistically_and_probe_waits() -> None:
    progress = Progress(next_index=11, max_inflight=2)
    assert progress.state is ProgressState.PROBE and not progress.is_paused()
    progress.sent_entries(1, 11)
    assert progress.is_paused(), "a probe waits for its answer"
    assert progress.maybe_update(11)
    progress.become_replicate()
    progress.sent_entries(3, 14)
    progress.sent_entries(2, 16)
    assert progress.next_index == 17 and progress.is_paused()
    progress.inflights.free_le(14)
    assert not progress.is_paused()


def test_progress_rejection_handling() -> None:
    progress = Progress(next_index=11, max_inflight=4)
    progress.match = 5
    assert not progress.maybe_decrease_to(7, 3), "not the probe we are waiting for"
    assert progress.maybe_decrease_to(10, 3)
    assert progress.next_index == 6, "never below match + 1"
    progress.become_replicate()
    assert not progress.maybe_decrease_to(4, 0), "stale rejection below match"
    assert progress.maybe_decrease_to(8, 0) and progress.next_index == 6


def test_progress_after_snapshot_resumes_past_it() -> None:
    progress = Progress(next_index=3, max_inflight=4)
    progress.become_snapshot(100)
    assert progress.is_paused()
    progress.become_probe()
    assert progress.next_index == 101
