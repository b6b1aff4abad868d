"""Reading a group's state from its replicas' Worker.Status answers, the same
way for everyone who needs it (a starting worker, the routers, the
membership admin)."""

from __future__ import annotations

from collections.abc import Iterable

from ..proto import worker_pb2 as pb
from ..raft import ConfState, Member


def freshest(answers: Iterable[pb.StatusResponse | None]) -> pb.StatusResponse | None:
    """The answer to trust for the group's configuration: the leader's (the
    highest term's, if two claim it), else the most advanced replica's;
    None if no answer reports a membership."""
    reported = [a for a in answers if a is not None and a.members]
    if not reported:
        return None
    return max(reported, key=lambda a: (a.role == "leader", a.term, a.applied_index))


def conf_from_status(status: pb.StatusResponse) -> ConfState:
    """The applied configuration a worker's Status reports."""
    voters = tuple(sorted(m.node_id for m in status.members if not m.learner))
    learners = tuple(sorted(m.node_id for m in status.members if m.learner))
    members = tuple(Member(m.node_id, m.host, m.address) for m in sorted(status.members, key=lambda m: m.node_id))
    incarnations = tuple(sorted((m.node_id, m.incarnation) for m in status.members if m.incarnation))
    return ConfState(voters=voters, learners=learners, removed=tuple(sorted(status.removed)), members=members,
                     incarnations=incarnations)
