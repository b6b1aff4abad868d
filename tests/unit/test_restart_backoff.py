"""A worker that fails again soon after its last failure waits before it
starts (replica/restart_backoff.py)."""

from __future__ import annotations

from pathlib import Path

from shardnode.replica import restart_backoff
from shardnode.replica.restart_backoff import MAX_DELAY, STREAK_SECONDS, record_failure, wait_before_start


def test_failures_in_a_row_wait_one_second_doubling_to_a_minute(tmp_path: Path) -> None:
    data_dir = tmp_path / "h1" / "group-0"
    now = 1_000.0
    assert wait_before_start(data_dir, now) == (0.0, 0)
    record_failure(data_dir, now)
    assert wait_before_start(data_dir, now) == (0.0, 1), "the first failure of a streak is restarted at once"
    waits = []
    for failure in range(2, 12):
        now += 5
        record_failure(data_dir, now)
        waits.append(wait_before_start(data_dir, now)[0])
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]
    assert wait_before_start(data_dir, now + 20) == (MAX_DELAY - 20, 11), "counted from the last failure"
    assert wait_before_start(data_dir, now + MAX_DELAY)[0] == 0
    assert restart_backoff.state_path(data_dir) == tmp_path / "h1" / "group-0.failures"


def test_a_failure_long_after_the_last_starts_a_new_streak(tmp_path: Path) -> None:
    data_dir = tmp_path / "group-0"
    for t in (0.0, 1.0, 2.0):
        record_failure(data_dir, t)
    assert record_failure(data_dir, 2.0 + STREAK_SECONDS + 1).failures == 1


def test_an_unreadable_state_file_means_no_wait(tmp_path: Path) -> None:
    data_dir = tmp_path / "group-0"
    restart_backoff.state_path(data_dir).write_text("{torn")
    assert wait_before_start(data_dir, 10.0) == (0.0, 0)
    assert record_failure(data_dir, 10.0).failures == 1
