"""One Ready's messages, with those that another message of the same Ready
makes redundant folded into it: what a peer receives per Ready is one append,
one acknowledgement, one heartbeat (or its response), not one per proposal.

Under load a leader proposes many times between two Readys, and each
proposal (and each commit advance) appends to every follower: a Ready holds
several APPs per follower, each of which the follower decodes, steps, and
answers with an APP_RESP. Folding them makes a follower's cost per Ready,
not per operation.

Every rule is safe because Raft is safe whatever the network does to
messages (loss, reordering, duplication), and each rule only removes a
message or delivers two as one that a reordering could have delivered back
to back:

- APP: a later append to the same peer, in the same term, that starts right
  where an earlier one ends (index == earlier.index + len(earlier.entries))
  joins the earlier one: one message carrying both runs of entries and the
  later commit index, which a follower handles exactly as the two in a row.
  Not beyond max_size bytes of entries, the limit of one append.
- APP_RESP: an acceptance is dropped when a later acceptance to the same
  peer, in the same term, acknowledges at least as far (an acknowledgement
  of index i covers every index below it).
- HEARTBEAT and HEARTBEAT_RESP: an earlier one to the same peer in the same
  term is dropped for a later one, unless the later one carries no read
  context and the earlier one does (a heartbeat acknowledged for a read
  context releases every read queued before it: read_only.py), or, for a
  response, the earlier one asks a quiesced leader to wake (reject) and the
  later does not.
"""

from __future__ import annotations

from .messages import Message, MessageType
from .storage import entries_size

MT = MessageType


def coalesce(messages: list[Message], max_size: int) -> list[Message]:
    """`messages` with redundant ones folded (see the module docstring), in
    the order of the first message of each fold (an append) or of the last
    (acknowledgements, heartbeats)."""
    if len(messages) < 2:
        return messages
    out: list[Message | None] = []
    appends: dict[int, int] = {}      # peer -> position in out of its last APP
    acks: dict[int, int] = {}         # peer -> position of its last accepting APP_RESP
    beats: dict[tuple[int, MessageType], int] = {}  # (peer, HEARTBEAT or _RESP) -> position
    folded = False
    for message in messages:
        mtype = message.type
        to = message.to
        if mtype is MT.APP:
            position = appends.get(to)
            if position is not None:
                earlier = out[position]
                if (
                    earlier is not None
                    and earlier.term == message.term
                    and message.index == earlier.index + len(earlier.entries)
                    and (not message.entries
                         or entries_size(earlier.entries) + entries_size(message.entries) <= max_size)
                ):
                    out[position] = Message(
                        MT.APP, to=to, from_=earlier.from_, term=earlier.term, log_term=earlier.log_term,
                        index=earlier.index, entries=earlier.entries + message.entries, commit=message.commit,
                    )
                    folded = True
                    continue
            appends[to] = len(out)
        elif mtype is MT.APP_RESP and not message.reject:
            position = acks.get(to)
            if position is not None:
                earlier = out[position]
                if earlier is not None and earlier.term == message.term and message.index >= earlier.index:
                    out[position] = None
                    folded = True
            acks[to] = len(out)
        elif mtype is MT.HEARTBEAT or mtype is MT.HEARTBEAT_RESP:
            key = (to, mtype)
            position = beats.get(key)
            if position is not None:
                earlier = out[position]
                if (earlier is not None and earlier.term == message.term
                        and (message.context or not earlier.context) and (message.reject or not earlier.reject)):
                    out[position] = None
                    folded = True
            beats[key] = len(out)
        out.append(message)
    if not folded:
        return messages
    return [message for message in out if message is not None]
