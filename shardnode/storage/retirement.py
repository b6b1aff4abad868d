"""The end of a replica's data: what is left on disk when a replica is removed
from its group, and how a later start recognises it.

A removed replica deletes its database only after its removal is committed.
Before the deletion it leaves a *tombstone* next to the database directory
(`group-G.removed`, durable), so that a later start of the same program does
not mistake the empty directory for a first start and bootstrap a replica
with its old, removed id. A new member on that host (`shardnode start --new`,
`member add`) gets a new id and clears the tombstone once its own database
exists.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

from .engine import fsync_directory, make_dirs_durable


@dataclass(slots=True, frozen=True)
class Tombstone:
    node_id: int
    reason: str


def tombstone_path(data_dir: str | os.PathLike[str]) -> str:
    path = os.path.abspath(os.fspath(data_dir))
    return path + ".removed"


def read_tombstone(data_dir: str | os.PathLike[str]) -> Tombstone | None:
    try:
        with open(tombstone_path(data_dir), encoding="utf-8") as f:
            raw = json.load(f)
        return Tombstone(int(raw["node_id"]), str(raw.get("reason", "")))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, OSError):
        # Unreadable (torn by a crash while written): it still says "removed".
        return Tombstone(0, "unreadable tombstone")


def retire(data_dir: str | os.PathLike[str], node_id: int, reason: str) -> None:
    """Leave a durable tombstone, then delete the database directory (and
    make the deletion durable). Idempotent; the caller has closed the store."""
    path = os.path.abspath(os.fspath(data_dir))
    parent = os.path.dirname(path)
    make_dirs_durable(parent, ancestors=0)
    temporary = tombstone_path(path) + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump({"node_id": node_id, "reason": reason}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, tombstone_path(path))
    fsync_directory(parent)
    shutil.rmtree(path, ignore_errors=True)
    fsync_directory(parent)


def clear_tombstone(data_dir: str | os.PathLike[str]) -> None:
    """A new member's database exists: the old replica's tombstone goes."""
    try:
        os.unlink(tombstone_path(data_dir))
    except FileNotFoundError:
        return
    fsync_directory(os.path.dirname(os.path.abspath(os.fspath(data_dir))))


def discard(data_dir: str | os.PathLike[str]) -> None:
    """Delete a database that belongs to a removed id, before a new member
    is created in its place (the new member's own store marks the place)."""
    path = os.path.abspath(os.fspath(data_dir))
    shutil.rmtree(path, ignore_errors=True)
    fsync_directory(os.path.dirname(path))

