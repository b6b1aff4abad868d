"""What a group's leader checks before it proposes a membership change
(docs/membership.md, "What is refused").

The checks run where the change is made, against the configuration the
leader has applied and its own record of who answered recently, not in the
command that asked for it on a view that may be stale: two operators (or a
`leave` racing `rebalance`) cannot both pass them, since only one change is
in flight per group and each is checked against the configuration the
previous one left (etcd's strict reconfiguration check; hashicorp/raft's
prevIndex is `expected` here).

Pure functions of plain data, so that the simulation and unit tests can run
them without a worker.
"""

from __future__ import annotations

from collections.abc import Collection

from ..raft import ConfChange, ConfChangeType, ConfState

#: A group never shrinks below this many voters by a removal: it could not
#: survive the loss of one more member without losing its majority.
MIN_VOTERS = 3


def check(conf: ConfState, change: ConfChange, leader: int, recently_active: Collection[int],
          expected: tuple[Collection[int], Collection[int]] | None = None) -> str | None:
    """Why `change` must not be proposed now, or None. `recently_active`:
    the members the leader heard from within the last election timeout
    (the leader itself counts); `expected`: the (voters, learners) the
    caller decided on, if it gave them."""
    voters, learners = set(conf.voters), set(conf.learners)
    if expected is not None:
        want_voters, want_learners = set(expected[0]), set(expected[1])
        if (want_voters, want_learners) != (voters, learners):
            return (f"the configuration changed meanwhile: expected voters {sorted(want_voters)} and learners "
                    f"{sorted(want_learners)}, the group has voters {sorted(voters)} and learners {sorted(learners)}")
    node_id = change.node_id
    if change.type is ConfChangeType.REMOVE_NODE and node_id in voters:
        after = voters - {node_id}
        if len(after) < MIN_VOTERS:
            return (f"the group would drop to {len(after)} voters (at least {MIN_VOTERS} are kept); "
                    f"add a member first")
    elif change.type is ConfChangeType.ADD_NODE and node_id in learners:
        after = voters | {node_id}
    else:
        return None
    live = {n for n in after if n == leader or n in recently_active}
    if len(live) <= len(after) // 2:
        down = sorted(after - live)
        return (f"the group would lose its live majority: {len(live)} of {len(after)} voters after the change "
                f"answer (not heard from recently: {', '.join(map(str, down))})")
    return None
