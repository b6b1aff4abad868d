"""How available the cluster was, from a workload's operation log: the share
of operations that succeeded in each fault window, and how long after a
fault (or its healing) writes succeeded again.

Availability is not safety: a run can be fully correct with 0 % availability
during a partition (a minority side must refuse). These figures are
reported beside the checkers' verdicts, not as anomalies.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from .operations import Action, LoggedOperation, OperationLog, Outcome

__all__ = ["WindowAvailability", "availability", "resume_seconds"]


@dataclass(slots=True, frozen=True)
class WindowAvailability:
    """Of the `operations` that started in [start, end), `ok` ended OK
    (whenever they ended: an operation started in a fault that succeeds
    after it counts as available)."""

    start: float
    end: float
    operations: int
    ok: int

    @property
    def fraction(self) -> float | None:
        """ok / operations; None when no operation started in the window."""
        return self.ok / self.operations if self.operations else None


def _entries(log: OperationLog | Iterable[LoggedOperation]) -> tuple[LoggedOperation, ...]:
    return log.operations() if isinstance(log, OperationLog) else tuple(log)


def availability(log: OperationLog | Iterable[LoggedOperation], windows: Iterable[tuple[float, float]], *,
                 actions: Collection[Action] | None = None) -> tuple[WindowAvailability, ...]:
    """For each (start, end) window (times of the log's clock), the
    operations that started in it and how many of them ended OK; only those
    of `actions` when given (say, writes only). One result per window, in
    order."""
    entries = [op for op in _entries(log) if actions is None or op.action in actions]
    results = []
    for start, end in windows:
        if end < start:
            raise ValueError(f"window ({start}, {end}) ends before it starts")
        inside = [op for op in entries if start <= op.start < end]
        results.append(WindowAvailability(start, end, len(inside),
                                          sum(1 for op in inside if op.outcome is Outcome.OK)))
    return tuple(results)


def resume_seconds(log: OperationLog | Iterable[LoggedOperation], after: float) -> float | None:
    """Seconds from `after` until the first acknowledgement of a write (put
    or insert) that started at or after it: how long, from a fault or its
    healing, until a client that tried afterwards saw a write succeed.
    None if no such write succeeded."""
    ends = [op.end for op in _entries(log)
            if op.action.writes and op.outcome is Outcome.OK and op.start >= after and op.end is not None]
    return min(ends) - after if ends else None
