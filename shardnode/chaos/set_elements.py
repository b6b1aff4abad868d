"""What the set workload (Jepsen's "set") records and what its final read
saw: the two inputs of `checkers.check_set`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .operations import Outcome

__all__ = ["SetAttempt", "SetReadback"]


@dataclass(slots=True, frozen=True)
class SetAttempt:
    """One insert of a new element: a put of `value` to a key no one wrote
    before (`set/<run-id>/<n>`). `previous` is the value the put returned
    (meaningful only when `outcome` is OK): for a new element it must be
    None. `end` is None for an insert still in flight (outcome UNKNOWN)."""

    client_id: int
    key: bytes
    value: bytes
    outcome: Outcome
    previous: bytes | None
    start: float
    end: float | None


@dataclass(slots=True, frozen=True)
class SetReadback:
    """The final read, after the cluster healed: `values` maps each key read
    to its value (None: absent); `unreadable` are keys whose every read
    failed before the read-back's deadline. The keys read are every element
    ever attempted plus a few never attempted (probes for phantoms)."""

    values: Mapping[bytes, bytes | None]
    unreadable: frozenset[bytes] = field(default_factory=frozenset)
