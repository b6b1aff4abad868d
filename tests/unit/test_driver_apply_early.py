"""Which committed entries the worker applies while a Ready's write runs
(ReplicaDriver._applicable_before_persist): only what the write cannot
change, so that a crash during the write never leaves a stored commit index
or applied index pointing at an entry the write was replacing."""

from types import SimpleNamespace

from shardnode.raft import Entry, HardState, Snapshot, SnapshotMetadata
from shardnode.raft.rawnode import Ready
from shardnode.replica.driver import ReplicaDriver


def _ready(committed: range, entries: range = range(0), commit: int | None = None,
           snapshot: bool = False) -> Ready:
    return Ready(
        soft_state=None,
        hard_state=None if commit is None else HardState(term=2, vote=1, commit=commit),
        entries=[Entry(2, i) for i in entries],
        snapshot=Snapshot(SnapshotMetadata(5, 1)) if snapshot else None,
        committed_entries=[Entry(2, i) for i in committed],
        messages=[],
        must_sync=True,
    )


def _early(stored_last: int, ready: Ready) -> int:
    driver = SimpleNamespace(store=SimpleNamespace(last_index=lambda: stored_last))
    return ReplicaDriver._applicable_before_persist(driver, ready)  # type: ignore[arg-type]


def test_a_leader_applies_what_it_stored_while_it_writes_new_entries() -> None:
    # Entries 8..10 committed (stored in an earlier Ready), 11..12 being written.
    assert _early(10, _ready(range(8, 11), range(11, 13), commit=10)) == 3


def test_nothing_that_is_not_on_disk_yet() -> None:
    # A follower's Ready that commits part of what it writes.
    assert _early(10, _ready(range(9, 13), range(11, 14), commit=12)) == 0
    # Without a new commit index, the stored part may go.
    assert _early(10, _ready(range(9, 13), range(11, 14))) == 2


def test_nothing_at_or_after_an_entry_the_write_replaces() -> None:
    # Stored up to 12, but this Ready rewrites from 10 on: 10.. must wait,
    # and so must everything while the new commit index reaches 10.
    assert _early(12, _ready(range(8, 12), range(10, 13))) == 2
    assert _early(12, _ready(range(8, 12), range(10, 13), commit=11)) == 0
    assert _early(12, _ready(range(8, 10), range(10, 13), commit=9)) == 2


def test_nothing_during_a_snapshot_install() -> None:
    assert _early(10, _ready(range(6, 9), snapshot=True)) == 0
