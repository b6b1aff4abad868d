"""The end of a replica's data: what is left on disk when a replica is removed
from its group (or refuses to run because its data was lost), and how a
later start recognises it.

A removed replica deletes its database only after its removal is committed.
Before the deletion it leaves a *tombstone* next to the database directory
(`group-G.removed`, durable), so that a later start of the same program does
not mistake the empty directory for a first start and bootstrap a replica
with its old id. A new member on that host (`shardnode start --new`,
`member add`) gets a new id and clears the tombstone once its own database
exists.

Retirement is crash-atomic, in three durable steps:

1. the tombstone (written to a temporary file, fsynced, renamed, the
   directory fsynced);
2. the database directory renamed aside (`group-G.retiring`), the parent
   fsynced: from now on `group-G` either is a whole store or does not exist;
3. the renamed directory deleted, the parent fsynced.

A kill at any point leaves something a later start handles: a whole store
with a tombstone naming its id (its retirement is finished then:
replica/identity.py), or a `group-G.retiring` directory, perhaps half
deleted, which `finish_retirement` deletes at every start. A half-deleted
store is never found where a store is looked for.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass

from .engine import fsync_directory, make_dirs_durable

log = logging.getLogger("shardnode.storage")


@dataclass(slots=True, frozen=True)
class Tombstone:
    node_id: int
    reason: str


def tombstone_path(data_dir: str | os.PathLike[str]) -> str:
    path = os.path.abspath(os.fspath(data_dir))
    return path + ".removed"


def retiring_path(data_dir: str | os.PathLike[str]) -> str:
    """Where a database directory is renamed before it is deleted."""
    return os.path.abspath(os.fspath(data_dir)) + ".retiring"


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


def write_tombstone(data_dir: str | os.PathLike[str], node_id: int, reason: str) -> None:
    """Leave a durable tombstone (step 1); the database, if any, stays."""
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


def retire(data_dir: str | os.PathLike[str], node_id: int, reason: str) -> None:
    """Leave a durable tombstone, then delete the database directory, in the
    crash-atomic steps of the module docstring. Idempotent; the caller has
    closed the store."""
    write_tombstone(data_dir, node_id, reason)
    discard(data_dir)


def discard(data_dir: str | os.PathLike[str]) -> None:
    """Delete a database directory: renamed aside (durably), then deleted.
    A kill in between leaves `group-G.retiring`, which the next start
    deletes (`finish_retirement`), never a half-deleted store."""
    path = os.path.abspath(os.fspath(data_dir))
    parent = os.path.dirname(path)
    aside = retiring_path(path)
    if os.path.lexists(path):
        if os.path.lexists(aside):
            _delete(aside)          # an earlier retirement's leftovers
        os.replace(path, aside)
        fsync_directory(parent)
    finish_retirement(path)


def finish_retirement(data_dir: str | os.PathLike[str]) -> None:
    """Delete what a retirement renamed aside (step 3), if anything."""
    aside = retiring_path(data_dir)
    if not os.path.lexists(aside):
        return
    _delete(aside)
    fsync_directory(os.path.dirname(aside))


def _delete(path: str) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        # Renamed aside, it harms nothing: the next start tries again.
        log.warning("storage.retirement_incomplete", extra={"path": path, "error": str(exc)})


def clear_tombstone(data_dir: str | os.PathLike[str]) -> None:
    """A new member's database exists: the old replica's tombstone goes."""
    try:
        os.unlink(tombstone_path(data_dir))
    except FileNotFoundError:
        return
    fsync_directory(os.path.dirname(os.path.abspath(os.fspath(data_dir))))
