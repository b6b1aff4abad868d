"""Errors raised by the Raft core and its storage interface."""


class RaftError(Exception):
    """Base class of every error the core raises."""


class ConfigError(RaftError, ValueError):
    """A Config that cannot work (named field, reason)."""


class ProposalDropped(RaftError):
    """The proposal (or local read) was not taken: this node is not the leader,
    a leadership transfer is in progress, or too much is uncommitted. `leader`
    is the leader this node knows of (0 if none), for a NOT_LEADER hint."""

    def __init__(self, reason: str, leader: int = 0) -> None:
        super().__init__(reason)
        self.leader = leader


class CompactedError(RaftError):
    """The requested index is older than the first entry still in the log."""


class UnavailableError(RaftError):
    """The requested index is newer than the last entry in the log."""


class SnapshotOutOfDate(RaftError):
    """A snapshot older than the one already stored was offered."""


class SnapshotTemporarilyUnavailable(RaftError):
    """Storage cannot produce a snapshot right now; the leader will retry."""


class InvalidConfChange(RaftError, ValueError):
    """A configuration change that can never be valid against the current
    configuration (unknown node, a node added twice, an id that was removed,
    the last voter removed, a non-learner promoted, ...). Raised when it is
    proposed, so it never enters the log. A change that is only refused for
    now (another change pending, a learner still catching up, a leader that
    has not yet applied an entry of its term) raises ProposalDropped instead."""
