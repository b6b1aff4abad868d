"""How many operations a router takes from each caller at once (`[limits]`).

A Batch call, or one message of a BatchStream, may hold at most
`max_batch_operations`; more is refused whole (RESOURCE_EXHAUSTED, nothing
started). Operations received and not yet answered are counted per stream
and per client connection (gRPC's peer address: one TCP connection):

- a Batch that would take its connection past `max_connection_operations`
  is refused whole;
- a BatchStream message that would take its stream past
  `max_stream_operations`, or its connection past `max_connection_operations`,
  waits: the router stops reading that stream until enough of its
  operations are answered (back-pressure through HTTP/2 flow control, as a
  TCP window does). A client that keeps its streams full slows down; the
  router's memory stays bounded and nothing is refused.

An operation stays counted until its answer has been written to the stream
(or the Batch call returned), so a caller that does not read its answers
stops its own stream, not the router.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ..config import LimitsConfig
from ..limits import refuse


@dataclass(slots=True)
class StreamBudget:
    """The operations of one BatchStream that are received and not yet answered."""

    peer: str
    in_flight: int = 0


class Admission:
    def __init__(self, limits: LimitsConfig) -> None:
        self.limits = limits
        self._connections: dict[str, int] = {}
        # Streams waiting for room: woken (all of them, each checks again) on every release.
        self._waiters: set[asyncio.Future[None]] = set()

    def in_flight(self, peer: str) -> int:
        return self._connections.get(peer, 0)

    def check_size(self, operations: int) -> None:
        """LimitExceeded if one call or message holds too many operations."""
        if operations > self.limits.max_batch_operations:
            raise refuse("max_batch_operations", self.limits.max_batch_operations, f"{operations} operations")

    def take_batch(self, peer: str, operations: int) -> None:
        """Count a Batch call's operations, or refuse it (LimitExceeded)."""
        self.check_size(operations)
        used = self.in_flight(peer)
        if used + operations > self.limits.max_connection_operations:
            raise refuse("max_connection_operations", self.limits.max_connection_operations,
                         f"{used} operations in flight on this connection and {operations} more asked")
        self._connections[peer] = used + operations

    async def take_stream(self, stream: StreamBudget, operations: int) -> None:
        """Count a stream message's operations, once there is room for them
        (LimitExceeded only if the message is larger than a Batch may be)."""
        self.check_size(operations)
        limits = self.limits
        while (stream.in_flight + operations > limits.max_stream_operations
               or self.in_flight(stream.peer) + operations > limits.max_connection_operations):
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.add(waiter)
            try:
                await waiter
            finally:
                self._waiters.discard(waiter)
        if operations:
            stream.in_flight += operations
            self._connections[stream.peer] = self.in_flight(stream.peer) + operations

    def release(self, peer: str, operations: int, stream: StreamBudget | None = None) -> None:
        """`operations` of `peer` (of `stream`) are answered."""
        if stream is not None:
            stream.in_flight -= operations
        left = self.in_flight(peer) - operations
        if left > 0:
            self._connections[peer] = left
        else:
            self._connections.pop(peer, None)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def close_stream(self, stream: StreamBudget) -> None:
        """The stream ended: whatever it still counted is released."""
        if stream.in_flight:
            self.release(stream.peer, stream.in_flight, stream)
