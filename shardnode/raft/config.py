"""Parameters of one Raft core, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(slots=True, frozen=True)
class Config:
    id: int
    # Ticks without hearing from a leader before campaigning; the real timeout
    # is randomized in [election_tick, 2 * election_tick).
    election_tick: int = 10
    heartbeat_tick: int = 1
    # The index the state machine had applied when this node (re)started.
    applied: int = 0
    # Bytes of entries in one append message (at least one entry is sent).
    max_size_per_msg: int = 1 << 20
    # Bytes of committed entries handed out in one Ready.
    max_committed_size_per_ready: int = 16 << 20
    # Bytes of proposed but uncommitted entries a leader accepts (0: no limit).
    max_uncommitted_entries_size: int = 64 << 20
    # Appends in flight to one follower (pipelining window).
    max_inflight_msgs: int = 256
    # A leader with nothing to replicate, no read, no change in flight and
    # every active follower caught up for this many ticks quiesces the group
    # (0: never): no heartbeats, no election timers, until a message wakes it.
    quiesce_ticks: int = 0
    check_quorum: bool = True
    pre_vote: bool = True
    # This node's incarnation: the life of its store, random, made when the
    # store was created (0: unknown, never bound). A leader proposes binding
    # its own and each member's it hears from (docs/raft.md, Incarnations).
    incarnation: int = 0

    def __post_init__(self) -> None:
        if self.id <= 0:
            raise ConfigError("id: must be a positive integer (0 means 'nobody')")
        if self.heartbeat_tick <= 0:
            raise ConfigError("heartbeat_tick: must be positive")
        if self.election_tick <= self.heartbeat_tick:
            raise ConfigError("election_tick: must be greater than heartbeat_tick")
        if self.quiesce_ticks < 0:
            raise ConfigError("quiesce_ticks: must be 0 (never) or positive")
        if self.max_inflight_msgs <= 0:
            raise ConfigError("max_inflight_msgs: must be positive")
        if self.max_size_per_msg <= 0:
            raise ConfigError("max_size_per_msg: must be positive")
        if self.applied < 0:
            raise ConfigError("applied: must not be negative")
        if self.incarnation < 0:
            raise ConfigError("incarnation: must not be negative (0 means unknown)")
