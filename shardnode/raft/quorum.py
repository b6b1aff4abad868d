"""Majority math, for a simple and for a joint configuration.

A joint configuration (old and new voter sets both having a say) is how the
membership protocol moves between arbitrary configurations; with an empty
outgoing set it is a plain majority.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Mapping


class VoteResult(enum.Enum):
    PENDING = 0
    LOST = 1
    WON = 2


def majority(voter_count: int) -> int:
    return voter_count // 2 + 1


def majority_committed_index(voters: Collection[int], acked_index: Callable[[int], int]) -> int:
    """The largest index that a majority of `voters` has acknowledged.

    An empty voter set places no constraint (returns a huge index), so that a
    joint configuration with no outgoing half reduces to its incoming half.
    """
    if not voters:
        return 1 << 63
    indexes = sorted((acked_index(voter) for voter in voters), reverse=True)
    return indexes[majority(len(indexes)) - 1]


def majority_vote_result(voters: Collection[int], votes: Mapping[int, bool]) -> VoteResult:
    if not voters:
        return VoteResult.WON
    granted = rejected = 0
    for voter in voters:
        vote = votes.get(voter)
        if vote is True:
            granted += 1
        elif vote is False:
            rejected += 1
    needed = majority(len(voters))
    if granted >= needed:
        return VoteResult.WON
    if len(voters) - rejected >= needed:
        return VoteResult.PENDING
    return VoteResult.LOST


class JointConfig:
    """Voters as (incoming, outgoing). Decisions need a majority of each."""

    __slots__ = ("incoming", "outgoing")

    def __init__(self, incoming: Collection[int] = (), outgoing: Collection[int] = ()) -> None:
        self.incoming: frozenset[int] = frozenset(incoming)
        self.outgoing: frozenset[int] = frozenset(outgoing)

    def __repr__(self) -> str:
        if self.outgoing:
            return f"JointConfig({sorted(self.incoming)} && {sorted(self.outgoing)})"
        return f"JointConfig({sorted(self.incoming)})"

    def ids(self) -> frozenset[int]:
        return self.incoming | self.outgoing

    def committed_index(self, acked_index: Callable[[int], int]) -> int:
        return min(
            majority_committed_index(self.incoming, acked_index),
            majority_committed_index(self.outgoing, acked_index),
        )

    def vote_result(self, votes: Mapping[int, bool]) -> VoteResult:
        incoming = majority_vote_result(self.incoming, votes)
        outgoing = majority_vote_result(self.outgoing, votes)
        if incoming is outgoing:
            return incoming
        if VoteResult.LOST in (incoming, outgoing):
            return VoteResult.LOST
        return VoteResult.PENDING
