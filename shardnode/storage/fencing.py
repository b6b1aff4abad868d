"""Fencing tokens: why a deposed scheduler can change nothing.

Changes of the cluster's shape are carried out by one scheduler at a time,
which holds a lease in the metadata group (shardnode/placement/lease.py). A
lease can expire while its holder is paused or cut off and still believes it
holds it; the next holder gets a larger **fencing token** (Chubby's
sequencers, TiKV's region epochs). Every shard command and every membership
change the scheduler sends carries its token, and each data group keeps the
largest token it has applied (`ShardState.fence`, replicated state: every
replica reaches the same verdict at the same log index). A command whose
token is smaller is refused when it is applied, on every replica, and
changes nothing. A new holder first raises the token of every group it will
touch (a FENCE shard command), so from then on nothing its predecessor still
sends can land.

Token 0 means "not sent by a scheduler" (a leader promoting its own caught-up
learner): it is admitted only while the group has never seen a token.
Promotions are exempt (they only ever follow an ADD_LEARNER the scheduler
made, and the leader checks the learner caught up).

A membership change carries its token in the ConfChange's context, which the
Raft core passes through untouched: `b"fence:" + 8 bytes big-endian`.
"""

from __future__ import annotations

_PREFIX = b"fence:"
_U64 = (1 << 64) - 1


def conf_change_context(fence: int) -> bytes:
    """The ConfChange context that carries `fence` (empty for 0)."""
    if not 0 <= fence <= _U64:
        raise ValueError(f"a fencing token is an unsigned 64-bit integer (got {fence})")
    return _PREFIX + fence.to_bytes(8, "big") if fence else b""


def conf_change_fence(context: bytes) -> int:
    """The token a ConfChange context carries (0 if none or unreadable: such
    a change is then judged as unfenced, the same way on every replica)."""
    if len(context) == len(_PREFIX) + 8 and context.startswith(_PREFIX):
        return int.from_bytes(context[len(_PREFIX):], "big")
    return 0


def admits(group_fence: int, fence: int) -> bool:
    """Whether a command with token `fence` may apply to a group that has
    applied `group_fence` so far."""
    return fence >= group_fence


def admits_membership_change(group_fence: int, fence: int, *, leaders_own: bool) -> bool:
    """Whether a committed membership change may take effect. The leader's
    own changes (token 0) always may: a promotion of a caught-up learner only
    follows an ADD_LEARNER that was admitted, and binding a member's
    incarnation changes no member. Anything else by its token."""
    return leaders_own or admits(group_fence, fence)
