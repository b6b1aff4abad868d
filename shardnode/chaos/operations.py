"""The log of every client operation a chaos workload made: what it was, on
which key, when it started and ended, and how it ended. Availability during
each fault window is computed from it (checkers.py).

Outcomes follow the client's error tree (shardnode/errors.py):

- `OK`: the client got an answer;
- `FAILED`: the operation definitely did not take effect (the client checked
  the argument and sent nothing, or every router refused the connection; any
  read that got no answer, since a read changes nothing);
- `UNKNOWN`: a write that got no answer (deadline, no quorum, no leader, …):
  it may or may not have been applied, exactly once if it was.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Action", "LoggedOperation", "OperationLog", "Outcome"]


class Action(enum.Enum):
    """What a workload's client did."""

    PUT = "put"          # register workload: a write, returns the previous value
    GET = "get"          # register workload: a linearizable read
    INSERT = "insert"    # set workload: a write of a new element
    READ = "read"        # set workload: the final read of an element

    @property
    def writes(self) -> bool:
        return self in (Action.PUT, Action.INSERT)


class Outcome(enum.Enum):
    """How an operation ended (module docstring)."""

    OK = "ok"
    FAILED = "failed"
    UNKNOWN = "unknown"


@dataclass(slots=True, frozen=True)
class LoggedOperation:
    """One client operation. `end` is when the client got its answer or gave
    up; None while it is still in flight (its outcome is then UNKNOWN)."""

    client_id: int
    action: Action
    key: bytes
    start: float
    end: float | None
    outcome: Outcome


@dataclass(slots=True)
class _Open:
    """An operation begun and not yet finished."""

    client_id: int
    action: Action
    key: bytes
    start: float


class OperationLog:
    """Thread-safe log of client operations, in the order they began.

    Times come from one clock (time.monotonic by default) stamped inside the
    log, so that the times of every client and of the nemesis' fault windows
    can be compared. `begin` is called before the request is sent and
    `finish` after the answer came, so every logged interval covers the real
    one.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[int, _Open] = {}
        self._done: dict[int, LoggedOperation] = {}
        self._next_handle = 0

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock

    def begin(self, client_id: int, action: Action, key: bytes) -> int:
        """Record the start of an operation; returns the handle to finish it with."""
        with self._lock:
            handle = self._next_handle
            self._next_handle += 1
            self._open[handle] = _Open(client_id, action, key, self._clock())
            return handle

    def finish(self, handle: int, outcome: Outcome) -> None:
        """Record how the operation of `handle` ended, now."""
        with self._lock:
            begun = self._open.pop(handle, None)
            if begun is None:
                raise KeyError(f"operation handle {handle} is unknown or already finished")
            self._done[handle] = LoggedOperation(begun.client_id, begun.action, begun.key, begun.start,
                                                 self._clock(), outcome)

    def operations(self) -> tuple[LoggedOperation, ...]:
        """Every operation so far, in the order they began; those still in
        flight have no end and an UNKNOWN outcome."""
        with self._lock:
            handles = sorted((*self._open, *self._done))
            return tuple(self._done[h] if h in self._done else _in_flight(self._open[h]) for h in handles)

    def __len__(self) -> int:
        with self._lock:
            return len(self._open) + len(self._done)


def _in_flight(begun: _Open) -> LoggedOperation:
    return LoggedOperation(begun.client_id, begun.action, begun.key, begun.start, None, Outcome.UNKNOWN)
