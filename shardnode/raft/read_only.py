"""ReadIndex: linearizable reads without writing to the log (Raft thesis 6.4).

The leader records its commit index when a read arrives, then confirms it is
still the leader by a round of heartbeats carrying the read's context. Once a
quorum acknowledges, every read queued up to that context may be served as
soon as the state machine has applied the recorded index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .messages import Message


@dataclass(slots=True)
class ReadIndexStatus:
    request: Message
    index: int
    acks: dict[int, bool] = field(default_factory=dict)


class ReadOnly:
    """Invariant: `queue` holds the contexts of `pending` in arrival order.
    Contexts must be unique (the driver makes them so)."""

    __slots__ = ("pending", "queue")

    def __init__(self) -> None:
        self.pending: dict[bytes, ReadIndexStatus] = {}
        self.queue: list[bytes] = []

    def add_request(self, index: int, request: Message) -> None:
        context = request.context
        if context in self.pending:
            return
        self.pending[context] = ReadIndexStatus(request, index)
        self.queue.append(context)

    def recv_ack(self, node_id: int, context: bytes) -> dict[int, bool] | None:
        status = self.pending.get(context)
        if status is None:
            return None
        status.acks[node_id] = True
        return status.acks

    def advance(self, context: bytes) -> list[ReadIndexStatus]:
        """Release every read queued up to and including `context`: a quorum
        confirmed leadership after all of them arrived."""
        try:
            position = self.queue.index(context)
        except ValueError:
            return []
        released = [self.pending.pop(ctx) for ctx in self.queue[: position + 1]]
        del self.queue[: position + 1]
        return released

    def last_pending_context(self) -> bytes:
        return self.queue[-1] if self.queue else b""
