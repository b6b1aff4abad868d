"""Refusing what is past a limit of `[limits]` (docs/security.md, "Limits").

Every refusal names the key, its value and what was asked, in one line:
`limits.max_batch_operations (10000) exceeded: 4000000 operations`. It is
answered as gRPC RESOURCE_EXHAUSTED, changes nothing, and is counted here,
per process, in `raft_refusals_total{reason}` (the reason is the key without
its `limits.` prefix). The router and the workers each register a
`RefusalCollector` with the labels of their own series.

Two limits are enforced by gRPC itself before any of our code runs:
`max_request_bytes` ("Received message larger than max (N vs. M)") and
`max_concurrent_rpcs` ("Concurrent RPC limit exceeded!"): both are
RESOURCE_EXHAUSTED, with gRPC's wording, and cannot be counted here.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Mapping

from prometheus_client.core import CounterMetricFamily

from .errors import ShardnodeError

#: Refusals of this process so far, by reason (the limit's key).
_REFUSALS: collections.Counter[str] = collections.Counter()


class LimitExceeded(ShardnodeError):
    """A request past a limit of `[limits]`: refused, nothing done.
    `reason` is the key (e.g. `max_batch_operations`)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def refuse(key: str, limit: int, asked: str) -> LimitExceeded:
    """Count one refusal of `limits.KEY` and return the error to raise or
    answer with; `asked` says how much was asked ("4000000 operations")."""
    _REFUSALS[key] += 1
    return LimitExceeded(f"limits.{key} ({limit}) exceeded: {asked}", key)


def refusals() -> Mapping[str, int]:
    """This process's refusals so far, by reason."""
    return dict(_REFUSALS)


class RefusalCollector:
    """`raft_refusals_total{..., reason}` for a prometheus registry, with the
    given constant labels (group, node, component)."""

    def __init__(self, labels: Mapping[str, str]) -> None:
        self._labels = dict(labels)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "raft_refusals", "Requests refused for going past a limit of [limits], by the limit's key.",
            labels=[*self._labels, "reason"])
        for reason, count in sorted(_REFUSALS.items()):
            family.add_metric([*self._labels.values(), reason], count)
        yield family
