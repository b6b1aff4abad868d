"""Configuration changes: what a single-server change does to a ConfState,
when it is valid, and how a leader's progress tracker follows it (after
etcd-io/raft's confchange/).

Rules (every replica applies the same committed entries to the same
configuration, so each rule gives the same answer everywhere):

- Every id moves forward along one life cycle: absent -> learner -> voter ->
  removed, or absent -> learner -> removed. New members join as learners
  (ADD_LEARNER_NODE), are promoted (ADD_NODE) once caught up, and a removed
  id never comes back (ids are never reused: a rejoining host gets new ones).
- A member's binding moves forward too: unbound -> bound to one incarnation
  (BIND_INCARNATION), for the rest of its life. The first binding wins; a
  later one (for the same or another incarnation) is a no-op. A removed id
  loses its binding with its membership.
- Because the life cycle only moves forward, applying a change whose effect
  is already in the configuration is a no-op. That is what lets a node start
  from a configuration newer than its log (a snapshot carrying the leader's
  current configuration, or a joining node bootstrapped with the
  configuration that added it) and replay older changes harmlessly.
- A change that is invalid against the applied configuration is refused when
  proposed (InvalidConfChange). One that is nevertheless committed (written
  by an older version, or replayed over a newer configuration) is applied as
  a logged no-op, never a crash.

Joint consensus is not built: no change enters a joint configuration. If a
configuration with an outgoing half arrives (a snapshot written by something
else), it is honoured as it is: every decision needs a majority of both
halves, which is always safe, and single-server changes act on the incoming
half only. Nothing here leaves a joint configuration.
"""

from __future__ import annotations

from .errors import InvalidConfChange
from .messages import ConfChange, ConfChangeType, ConfState, Member
from .tracker import Progress, ProgressState, ProgressTracker

# A learner is ready for promotion when it lags the leader's commit index by
# at most min(LEARNER_CATCH_UP_ENTRIES, commit // 10) entries (at least
# LEARNER_MIN_LAG): a threshold, never equality, which under a steady write
# load would never hold (redisraft#125). etcd's server uses 90% of the
# leader's match; the cap keeps "90%" meaningful for long logs.
LEARNER_CATCH_UP_ENTRIES = 1000
LEARNER_MIN_LAG = 4


def check(conf: ConfState, change: ConfChange) -> None:
    """Raise InvalidConfChange unless `change` is valid against `conf`."""
    node_id = change.node_id
    if node_id <= 0:
        raise InvalidConfChange(f"node id must be positive, got {node_id}")
    if node_id in conf.removed:
        raise InvalidConfChange(f"node {node_id} was removed from the group; removed ids are never reused")
    voters = set(conf.voters)
    if change.type is ConfChangeType.ADD_LEARNER_NODE:
        if node_id in voters or node_id in conf.voters_outgoing:
            raise InvalidConfChange(f"node {node_id} is already a voter")
        if node_id in conf.learners:
            raise InvalidConfChange(f"node {node_id} is already a learner")
    elif change.type is ConfChangeType.ADD_NODE:
        if node_id in voters:
            raise InvalidConfChange(f"node {node_id} is already a voter")
        if node_id not in conf.learners:
            raise InvalidConfChange(
                f"node {node_id} is not a learner: new members join as learners and are promoted once caught up"
            )
    elif change.type is ConfChangeType.REMOVE_NODE:
        if node_id not in voters and node_id not in conf.learners:
            if node_id in conf.voters_outgoing:
                raise InvalidConfChange(f"node {node_id} is only in the outgoing half of a joint configuration")
            raise InvalidConfChange(f"node {node_id} is not a member of the group")
        if voters == {node_id}:
            raise InvalidConfChange(f"node {node_id} is the last voter; a group cannot remove it")
    elif change.type is ConfChangeType.BIND_INCARNATION:
        if node_id not in conf.ids():
            raise InvalidConfChange(f"node {node_id} is not a member of the group")
        if change.incarnation <= 0:
            raise InvalidConfChange(f"node {node_id}: an incarnation must be positive, got {change.incarnation}")
        bound = conf.incarnation_of(node_id)
        if bound:
            raise InvalidConfChange(f"node {node_id} is already bound to incarnation {bound:x}; the first binding wins")
    else:  # pragma: no cover - ConfChangeType has four members
        raise InvalidConfChange(f"unknown change type {change.type!r}")


def apply(conf: ConfState, change: ConfChange) -> ConfState:
    """The configuration after `change`; InvalidConfChange if it is not valid."""
    check(conf, change)
    node_id = change.node_id
    voters = set(conf.voters)
    learners = set(conf.learners)
    removed = set(conf.removed)
    members = {m.node_id: m for m in conf.members}
    incarnations = dict(conf.incarnations)
    if change.type is ConfChangeType.ADD_LEARNER_NODE:
        learners.add(node_id)
        if change.host or change.address:
            members[node_id] = Member(node_id, change.host, change.address)
    elif change.type is ConfChangeType.ADD_NODE:
        learners.discard(node_id)
        voters.add(node_id)
    elif change.type is ConfChangeType.BIND_INCARNATION:
        incarnations[node_id] = change.incarnation
    else:
        voters.discard(node_id)
        learners.discard(node_id)
        removed.add(node_id)
        members.pop(node_id, None)
        incarnations.pop(node_id, None)
    return ConfState(
        voters=tuple(sorted(voters)),
        learners=tuple(sorted(learners)),
        voters_outgoing=conf.voters_outgoing,
        removed=tuple(sorted(removed)),
        members=tuple(members[i] for i in sorted(members)),
        incarnations=tuple(sorted(incarnations.items())),
    )


def already_applied(conf: ConfState, change: ConfChange) -> bool:
    """Whether the effect of `change` is already in `conf`: the id is at or
    past the stage the change moves it to (a replay over a newer
    configuration), as opposed to a change that never made sense."""
    node_id = change.node_id
    if node_id in conf.removed:
        return True
    if change.type is ConfChangeType.ADD_LEARNER_NODE:
        return node_id in conf.ids()
    if change.type is ConfChangeType.ADD_NODE:
        return node_id in conf.voters
    if change.type is ConfChangeType.BIND_INCARNATION:
        # The same binding again is a replay; another incarnation for a bound
        # id is a race the first binding won (worth a warning).
        return conf.incarnation_of(node_id) == change.incarnation
    return False


def apply_committed(conf: ConfState, change: ConfChange) -> tuple[ConfState, str | None]:
    """Apply a committed change: (new configuration, None), or (the same
    configuration, why it was ignored). Never raises: a committed entry must
    not crash a replica, and every replica reaches the same verdict."""
    try:
        return apply(conf, change), None
    except InvalidConfChange as exc:
        return conf, str(exc)


def switch_tracker(tracker: ProgressTracker, conf: ConfState, next_index: int) -> None:
    """Make the tracker follow a configuration change, keeping what the
    leader knows about members that stay (their match, state, window).
    A new member is probed from `next_index` and counts as recently active,
    so a snapshot may be sent to it at once."""
    old_progress = tracker.progress
    tracker.apply_conf_state(conf, next_index)
    learners = tracker.learners
    for node_id in tracker.progress:
        kept = old_progress.get(node_id)
        if kept is not None:
            kept.is_learner = node_id in learners
            tracker.progress[node_id] = kept
        else:
            tracker.progress[node_id].recent_active = True


def learner_lag_allowance(commit: int) -> int:
    return max(LEARNER_MIN_LAG, min(LEARNER_CATCH_UP_ENTRIES, commit // 10))


def learner_caught_up(progress: Progress, commit: int) -> bool:
    """Whether a learner may be promoted: the leader streams to it (not
    probing, not waiting on a snapshot), heard from it recently, and its
    acknowledged (persisted) log is within the allowance of the commit index."""
    return (
        progress.is_learner
        and progress.recent_active
        and progress.state is ProgressState.REPLICATE
        and progress.match + learner_lag_allowance(commit) >= commit
    )
