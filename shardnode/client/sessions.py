"""Client sessions: what makes a retried write apply exactly once.

A session is a `(client_id, sequence)` pair carried by every write
(`kv.proto`, `Session`). The servers remember, per client_id, the last
sequence applied and its result: a retry of that sequence is answered with
the original result instead of being applied again, and an older sequence is
refused (FAILED_PRECONDITION).

Invariants kept here:
- a session has at most one write in flight (a retry of that write is the
  same write, with the same sequence);
- each new write on a session uses the previous sequence + 1, whether the
  previous write succeeded, failed, or ended with an unknown outcome. After
  an unknown outcome, a late arrival of the old write is then "stale" and
  refused by the servers, which is the intended semantics.

`SessionPool` hands out idle sessions so that many threads can write at once;
the pool grows to the largest number of concurrent writes and reuses the most
recently returned session first (fewer sessions for the servers to track).
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass

__all__ = ["Session", "SessionPool", "WriteSlot"]

_CLIENT_ID_BITS = 63


def _new_client_id() -> int:
    """A random non-zero 63-bit id (0 means "no session" on the wire)."""
    while True:
        client_id = secrets.randbits(_CLIENT_ID_BITS)
        if client_id:
            return client_id


@dataclass(slots=True)
class Session:
    """One session. `sequence` is the last sequence handed out (0: none yet)."""

    client_id: int
    sequence: int = 0
    in_flight: bool = False


@dataclass(slots=True, frozen=True)
class WriteSlot:
    """The session and sequence of one write, kept for all its retries."""

    session: Session
    client_id: int
    sequence: int


class SessionPool:
    """Thread-safe pool of sessions, one write in flight per session."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[Session] = []
        self._created = 0

    def acquire(self) -> WriteSlot:
        """Take an idle session (or a new one) for one new write and give it
        its next sequence. Pair with `release` (or `discard`)."""
        with self._lock:
            if self._idle:
                session = self._idle.pop()
            else:
                session = Session(_new_client_id())
                self._created += 1
            # Invariant: an idle session has no write in flight.
            assert not session.in_flight, "session pool handed out a busy session"
            session.in_flight = True
            session.sequence += 1
            return WriteSlot(session, session.client_id, session.sequence)

    def release(self, slot: WriteSlot) -> None:
        """The write is over (success, definite failure or unknown outcome):
        the session can carry the next write, with the next sequence."""
        with self._lock:
            slot.session.in_flight = False
            self._idle.append(slot.session)

    def discard(self, slot: WriteSlot) -> None:
        """Forget the session (the servers refused it as stale: its state on
        the servers no longer matches ours)."""
        with self._lock:
            slot.session.in_flight = False

    @property
    def idle(self) -> int:
        with self._lock:
            return len(self._idle)

    @property
    def created(self) -> int:
        """How many sessions this pool has created (its peak concurrency)."""
        with self._lock:
            return self._created
