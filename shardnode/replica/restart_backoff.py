"""Repeated failures back off inside the worker.

supervisord restarts a worker that exits with a failure status (fail-stop,
70; its identity could not be resolved, 75) at once, and backs off only for
exits within `startsecs` of a start; a worker that fails a few seconds after
each start would be restarted at once for ever, a storm on a sick disk or on
a metadata group that is down. So the worker keeps its own count, in a small
file next to its data (`group-G.failures`: the number of failures in a row
and when the last happened): a failure within `STREAK_SECONDS` of the
previous one continues the streak, and the worker then waits before it
starts, `FIRST_DELAY` seconds doubling up to `MAX_DELAY`, counted from the
last failure (the first failure of a streak does not wait). It says so in
one log line. The file is best effort: a disk too sick to write it only
costs the backoff.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

FIRST_DELAY = 1.0
MAX_DELAY = 60.0
#: A failure this long after the previous one starts a new streak.
STREAK_SECONDS = 2 * MAX_DELAY + 30.0


@dataclass(slots=True, frozen=True)
class FailureStreak:
    failures: int       # in a row, each within STREAK_SECONDS of the one before
    last: float         # wall-clock time of the last one (seconds since the epoch)

    def delay(self) -> float:
        """How long after the last failure the next start waits."""
        if self.failures < 2:
            return 0.0
        return min(MAX_DELAY, FIRST_DELAY * 2 ** (self.failures - 2))


def state_path(data_dir: str | os.PathLike[str]) -> Path:
    path = Path(os.path.abspath(os.fspath(data_dir)))
    return path.with_name(path.name + ".failures")


def read(data_dir: str | os.PathLike[str]) -> FailureStreak | None:
    try:
        raw = json.loads(state_path(data_dir).read_text(encoding="utf-8"))
        return FailureStreak(int(raw["failures"]), float(raw["last"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_failure(data_dir: str | os.PathLike[str], now: float | None = None) -> FailureStreak:
    """Count a failure (the worker is about to exit with a failure status)."""
    now = time.time() if now is None else now
    previous = read(data_dir)
    continued = previous is not None and 0 <= now - previous.last <= STREAK_SECONDS
    streak = FailureStreak(previous.failures + 1 if continued else 1, now)  # type: ignore[union-attr]
    path = state_path(data_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps({"failures": streak.failures, "last": streak.last}), encoding="utf-8")
        os.replace(temporary, path)
    except OSError:
        pass
    return streak


def wait_before_start(data_dir: str | os.PathLike[str], now: float | None = None) -> tuple[float, int]:
    """(seconds to wait now, failures in the streak): 0 unless the last
    failure was recent and not the first of its streak."""
    streak = read(data_dir)
    if streak is None:
        return 0.0, 0
    now = time.time() if now is None else now
    since = now - streak.last
    if not 0 <= since <= STREAK_SECONDS:
        return 0.0, streak.failures
    return max(0.0, streak.delay() - since), streak.failures
