"""The set of members with their progress, and the votes of an election."""

from __future__ import annotations

from collections.abc import Iterator

from ..messages import ConfState, Member
from ..quorum import JointConfig, VoteResult
from .progress import Progress


class ProgressTracker:
    __slots__ = ("voters", "learners", "removed", "members", "incarnations", "progress", "votes", "max_inflight")

    def __init__(self, max_inflight: int) -> None:
        self.voters = JointConfig()
        self.learners: frozenset[int] = frozenset()
        # Ids removed for good, and the addresses of members (see ConfState).
        self.removed: frozenset[int] = frozenset()
        self.members: tuple[Member, ...] = ()
        # Member id -> the incarnation the group bound to it (see ConfState).
        self.incarnations: dict[int, int] = {}
        self.progress: dict[int, Progress] = {}
        self.votes: dict[int, bool] = {}
        self.max_inflight = max_inflight

    def conf_state(self) -> ConfState:
        return ConfState(
            voters=tuple(sorted(self.voters.incoming)),
            learners=tuple(sorted(self.learners)),
            voters_outgoing=tuple(sorted(self.voters.outgoing)),
            removed=tuple(sorted(self.removed)),
            members=self.members,
            incarnations=tuple(sorted(self.incarnations.items())),
        )

    def apply_conf_state(self, conf_state: ConfState, next_index: int) -> None:
        """Replace the membership (on start or snapshot restore), fresh progress for all."""
        self.voters = JointConfig(conf_state.voters, conf_state.voters_outgoing)
        self.learners = frozenset(conf_state.learners)
        self.removed = frozenset(conf_state.removed)
        self.members = tuple(conf_state.members)
        self.incarnations = dict(conf_state.incarnations)
        self.progress = {}
        for node_id in self.voters.ids() | self.learners:
            self.progress[node_id] = Progress(next_index, self.max_inflight, node_id in self.learners)

    def is_voter(self, node_id: int) -> bool:
        return node_id in self.voters.incoming or node_id in self.voters.outgoing

    def is_singleton(self) -> bool:
        return len(self.voters.incoming) == 1 and not self.voters.outgoing

    def peers(self) -> Iterator[tuple[int, Progress]]:
        return iter(self.progress.items())

    def committed(self) -> int:
        progress = self.progress
        return self.voters.committed_index(lambda node_id: progress[node_id].match if node_id in progress else 0)

    def quorum_active(self) -> bool:
        """Whether a quorum of voters was heard from recently (check-quorum)."""
        votes = {node_id: pr.recent_active for node_id, pr in self.progress.items() if not pr.is_learner}
        return self.voters.vote_result(votes) is VoteResult.WON

    def reset_votes(self) -> None:
        self.votes = {}

    def record_vote(self, node_id: int, granted: bool) -> None:
        self.votes.setdefault(node_id, granted)

    def tally_votes(self) -> tuple[int, int, VoteResult]:
        granted = sum(1 for node_id, vote in self.votes.items() if vote and self.is_voter(node_id))
        rejected = sum(1 for node_id, vote in self.votes.items() if not vote and self.is_voter(node_id))
        return granted, rejected, self.voters.vote_result(self.votes)
