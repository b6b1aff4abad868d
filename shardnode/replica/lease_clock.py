"""The leader's clock of etcd leases (docs/etcd.md, "Leases").

Lease records are replicated (the metadata group's keys, etcd/lease_records.py);
how long each one has left is not: as in etcd, only the group's leader
measures it, in memory, with its monotonic clock, and keep-alives only
touch that memory (no log write per keep-alive). A leader that has just
taken over knows nothing of its predecessor's deadlines: it gives every
lease a full TTL from the moment it first looks at it in its term (etcd
extends leases the same way on a leader change), so a lease never expires
early; at worst it lives one TTL longer.

Pure: the caller passes the term, the records and the time.
"""

from __future__ import annotations

import math

from ..etcd.lease_records import LeaseRecord


class LeaseClock:
    def __init__(self) -> None:
        self._term: int | None = None
        self._deadlines: dict[int, float] = {}

    def _deadline(self, term: int, lease: int, record: LeaseRecord, now: float) -> float:
        if term != self._term:
            # A new term: whatever was measured before is not this leader's.
            self._term, self._deadlines = term, {}
        deadline = self._deadlines.get(lease)
        if deadline is None:
            deadline = self._deadlines[lease] = now + record.ttl
        return deadline

    def keep_alive(self, term: int, lease: int, record: LeaseRecord | None, now: float) -> int:
        """Extend the lease to a full TTL from now; its TTL, 0 if it is gone,
        revoking or already expired (etcd answers TTL 0 then)."""
        if record is None or record.revoking or self._deadline(term, lease, record, now) <= now:
            return 0
        self._deadlines[lease] = now + record.ttl
        return record.ttl

    def remaining(self, term: int, lease: int, record: LeaseRecord | None, now: float) -> int:
        """Whole seconds left (rounded up, as etcd), -1 if gone or revoking."""
        if record is None or record.revoking:
            return -1
        return max(0, math.ceil(self._deadline(term, lease, record, now) - now))

    def expired(self, term: int, records: dict[int, LeaseRecord], now: float) -> list[int]:
        """The leases to revoke now: those past their deadline, and those a
        revocation left half-done (revoking). Forgets leases that are gone."""
        for lease in [lease for lease in self._deadlines if lease not in records]:
            del self._deadlines[lease]
        return sorted(lease for lease, record in records.items()
                      if record.revoking or self._deadline(term, lease, record, now) <= now)
