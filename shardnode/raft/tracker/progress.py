"""A leader's view of one follower's log.

States (as in etcd/raft):
- PROBE: we do not know where the follower's log matches ours; send one
  append at a time and wait for its answer (or a heartbeat response).
- REPLICATE: the follower is in sync; stream appends optimistically, up to
  the in-flight window.
- SNAPSHOT: the follower needs entries we compacted; a snapshot is on its way,
  send nothing else until it is reported done.

Invariant: match < next_index.
"""

from __future__ import annotations

import enum

from .inflights import Inflights


class ProgressState(enum.IntEnum):
    PROBE = 0
    REPLICATE = 1
    SNAPSHOT = 2


class Progress:
    __slots__ = (
        "match",
        "next_index",
        "state",
        "pending_snapshot",
        "recent_active",
        "probe_sent",
        "inflights",
        "is_learner",
    )

    def __init__(self, next_index: int, max_inflight: int, is_learner: bool = False) -> None:
        self.match = 0
        self.next_index = next_index
        self.state = ProgressState.PROBE
        self.pending_snapshot = 0
        # Heard from since the last check-quorum round.
        self.recent_active = False
        # PROBE: an append is outstanding; wait before sending another.
        self.probe_sent = False
        self.inflights = Inflights(max_inflight)
        self.is_learner = is_learner

    def __repr__(self) -> str:
        return (
            f"Progress({self.state.name} match={self.match} next={self.next_index}"
            f" inflight={len(self.inflights)}{' learner' if self.is_learner else ''})"
        )

    def _reset_state(self, state: ProgressState) -> None:
        self.probe_sent = False
        self.pending_snapshot = 0
        self.state = state
        self.inflights.reset()

    def become_probe(self) -> None:
        if self.state is ProgressState.SNAPSHOT:
            # Resume right after the snapshot if it got there.
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next_index = max(self.match + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next_index = self.match + 1

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.REPLICATE)
        self.next_index = self.match + 1

    def forget(self) -> None:
        """The follower lost its disk (another incarnation answers for its
        id): nothing it acknowledged can be counted on, and it is not heard.
        Lowering `match` never lowers a commit index (commits only move up)."""
        self._reset_state(ProgressState.PROBE)
        self.match = 0
        self.next_index = 1
        self.recent_active = False

    def become_snapshot(self, snapshot_index: int) -> None:
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot_index

    def sent_entries(self, count: int, last_index: int) -> None:
        """Account for an append just sent with `count` entries ending at last_index."""
        if self.state is ProgressState.REPLICATE:
            if count:
                self.next_index = last_index + 1
                self.inflights.add(last_index)
        elif self.state is ProgressState.PROBE:
            self.probe_sent = True

    def maybe_update(self, index: int) -> bool:
        """The follower acknowledged up to index. Returns whether match moved."""
        updated = False
        if self.match < index:
            self.match = index
            updated = True
            self.probe_sent = False
        self.next_index = max(self.next_index, index + 1)
        return updated

    def maybe_decrease_to(self, rejected: int, match_hint: int) -> bool:
        """The follower rejected an append at `rejected`; `match_hint` is where
        it says our logs may agree. Returns False for a stale rejection."""
        if self.state is ProgressState.REPLICATE:
            if rejected <= self.match:
                return False  # stale: we already know it matches there
            self.next_index = self.match + 1
            return True
        if self.next_index - 1 != rejected:
            return False  # not the probe we are waiting for
        self.next_index = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def is_paused(self) -> bool:
        """Whether sending another append now would be wasted or unbounded."""
        if self.state is ProgressState.PROBE:
            return self.probe_sent
        if self.state is ProgressState.REPLICATE:
            return self.inflights.full()
        return True
