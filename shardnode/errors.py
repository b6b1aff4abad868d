"""The exceptions shardnode raises, as a small tree callers can catch at the
level they care about:

    ShardnodeError
    ├── InvalidArgument          the request is wrong; nothing was done
    ├── Unavailable              the cluster cannot serve it now
    │   ├── NotLeader            (worker level) this replica is not the leader
    │   ├── NoQuorum             the key's group has no majority of its replicas up
    │   ├── NoLeader             the key's group has a majority up but no leader yet
    │   └── RoutersUnreachable   every router refused the connection (is the cluster running?)
    ├── DeadlineExceeded         the deadline passed first
    ├── TLSMismatch              the client and the routers disagree about TLS; nothing was sent
    └── StaleSession             (shardnode.client) a write's session was refused as stale

`NoQuorum`, `NoLeader` and `DeadlineExceeded` carry `group` (the Raft group
of the key, or None when unknown). After any `Unavailable` other than
`RoutersUnreachable`, or after `DeadlineExceeded`, a write's outcome is
unknown: it may or may not have been applied (exactly once if it was).
"""

from __future__ import annotations

#: gRPC trailing metadata of a router's error answer: the cause
#: ("no_quorum", "no_leader", "deadline") and the key's group, so that the
#: client raises NoQuorum / NoLeader / DeadlineExceeded with `group` set.
CAUSE_METADATA_KEY = "shardnode-cause"
GROUP_METADATA_KEY = "shardnode-group"


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


class NoQuorum(Unavailable):
    """The key's group has fewer than a majority of its replicas up (or its
    leader cannot reach a majority): it cannot commit or read until enough
    of them are back. The message names the unreachable replicas."""

    def __init__(self, message: str, group: int | None = None) -> None:
        super().__init__(message)
        self.group = group


class NoLeader(Unavailable):
    """The key's group has a majority of its replicas up but no leader yet
    (an election is in progress); usually resolved within seconds."""

    def __init__(self, message: str, group: int | None = None) -> None:
        super().__init__(message)
        self.group = group


class RoutersUnreachable(Unavailable):
    """Every router refused the connection: nothing listens on any router
    address (the cluster is not running, or the configuration names the
    wrong addresses). Nothing was sent, so a write was not applied."""

    def __init__(self, message: str, routers: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.routers = routers


class DeadlineExceeded(ShardnodeError):
    """The request's deadline passed first. For a write, the outcome is unknown.
    `group` is the key's group when known (None otherwise)."""

    def __init__(self, message: str, group: int | None = None) -> None:
        super().__init__(message)
        self.group = group


class TLSMismatch(ShardnodeError):
    """The client speaks plaintext to routers that require TLS, or TLS to
    routers that do not (a bare router list for a cluster with
    [security] tls = true, or another cluster's configuration). Raised at
    once; nothing was sent, and retrying will not help."""

    def __init__(self, message: str, routers: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.routers = routers


class LeaseNotFound(ShardnodeError):
    """No such lease (never granted, revoked, or expired)."""


class PermissionDenied(ShardnodeError):
    """The caller's certificate names a user whose roles do not allow this
    read or write (docs/security.md, "Users and roles"), or one the cluster
    does not accept at all. Nothing was done; retrying will not help."""
