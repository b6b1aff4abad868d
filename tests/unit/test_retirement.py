"""Retirement is crash-atomic (storage/retirement.py): a kill at any step
leaves either a whole store or nothing where a store is looked for."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from shardnode.storage import ReplicaStore
from shardnode.storage import retirement
from shardnode.storage.retirement import finish_retirement, read_tombstone, retire, retiring_path


class Killed(BaseException):
    """The process dies here (nothing after it runs)."""


def _store(tmp_path: Path) -> Path:
    data_dir = tmp_path / "h1" / "group-0"
    with ReplicaStore.open(data_dir, initial_voters=(1, 2, 3), node_id=1):
        pass
    return data_dir


def _half_rmtree(path: str, *args, **kwargs) -> None:
    """Deletes some of the files, then the process is killed."""
    files = sorted(Path(path).rglob("*"))
    for file in files[: len(files) // 2]:
        if file.is_file():
            file.unlink()
    raise Killed()


def test_a_kill_halfway_through_the_deletion_never_leaves_a_half_deleted_store(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = _store(tmp_path)
    monkeypatch.setattr(shutil, "rmtree", _half_rmtree)
    with pytest.raises(Killed):
        retire(data_dir, 1, "removed from the group")
    monkeypatch.undo()
    # Where a store is looked for there is none (the old code left one here
    # that every later start failed to open), and the tombstone is durable.
    assert not os.path.exists(data_dir) and not ReplicaStore.exists(data_dir)
    assert read_tombstone(data_dir).node_id == 1
    assert os.path.exists(retiring_path(data_dir))
    finish_retirement(data_dir)                    # what every start does first
    assert not os.path.exists(retiring_path(data_dir))
    with ReplicaStore.open(data_dir, initial_voters=(1,), node_id=6):      # a new member can be created there
        pass


def test_a_kill_before_the_rename_leaves_the_whole_store_and_its_tombstone(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = _store(tmp_path)

    def killed(*args) -> None:
        raise Killed()

    monkeypatch.setattr(retirement, "discard", killed)
    with pytest.raises(Killed):
        retire(data_dir, 1, "removed from the group")
    monkeypatch.undo()
    assert read_tombstone(data_dir).node_id == 1
    with ReplicaStore.open(data_dir) as store:         # whole: identity.py finishes its retirement
        assert store.node_id == 1
    retire(data_dir, 1, "removed from the group")      # idempotent
    assert not os.path.exists(data_dir) and not os.path.exists(retiring_path(data_dir))


def test_leftovers_of_an_earlier_retirement_do_not_stop_the_next(tmp_path: Path) -> None:
    data_dir = _store(tmp_path)
    stale = Path(retiring_path(data_dir))
    (stale / "old").mkdir(parents=True)
    retire(data_dir, 1, "removed from the group")
    assert not stale.exists() and not data_dir.exists()
