"""The exceptions shardnode raises, as a small tree callers can catch at the
level they care about."""

from __future__ import annotations


class ShardnodeError(Exception):
    """Base of every shardnode error."""


class InvalidArgument(ShardnodeError):
    """The request itself is wrong (empty or oversized key, oversized value,
    wrong type). Nothing was done; retrying will not help."""


class Unavailable(ShardnodeError):
    """The group cannot serve now (no leader, no quorum, leadership lost).
    For a write, the outcome may be unknown: retry with the same session."""


class NotLeader(Unavailable):
    """This replica is not the leader; `leader_id`/`leader_address` say who
    is, when known (0 / "" otherwise)."""

    def __init__(self, message: str, leader_id: int = 0, leader_address: str = "") -> None:
        super().__init__(message)
        self.leader_id = leader_id
        self.leader_address = leader_address


class DeadlineExceeded(ShardnodeError):
    """The request's deadline passed first. For a write, the outcome is unknown."""
