"""How an etcd lease is recorded: one key of the metadata group per lease
(docs/etcd.md, "Leases"), written through its log by the routers (grant,
revoke) and read by its leader's lease clock (replica/lease_clock.py).

    key:   b"etcd/lease/" + the lease id (8 bytes, big-endian)
    value: msgpack (ttl seconds, revoking)

`revoking` is set first when a lease is revoked or expires: keep-alives are
refused from then on, while its keys are deleted group by group; the record
is deleted last. A revocation that stopped half-way (its router died) is
found again by the next expiry round and finished.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

LEASE_PREFIX = b"etcd/lease/"
LEASE_PREFIX_END = b"etcd/lease0"          # the first key after every lease record
#: etcd's bounds: a lease of less than MIN_TTL seconds is granted MIN_TTL (a
#: leader change must not end it at once), more than MAX_TTL is refused.
MIN_TTL = 2
MAX_TTL = 9_000_000_000
#: The largest lease id (etcd's are positive int64).
MAX_ID = (1 << 63) - 1


@dataclass(slots=True, frozen=True)
class LeaseRecord:
    ttl: int
    revoking: bool = False


def lease_key(lease: int) -> bytes:
    return LEASE_PREFIX + lease.to_bytes(8, "big")


def lease_of_key(key: bytes) -> int | None:
    if len(key) != len(LEASE_PREFIX) + 8 or not key.startswith(LEASE_PREFIX):
        return None
    return int.from_bytes(key[len(LEASE_PREFIX):], "big")


def encode_lease(record: LeaseRecord) -> bytes:
    return msgpack.packb((record.ttl, record.revoking))


def decode_lease(raw: bytes) -> LeaseRecord | None:
    """None for anything that is not a lease record (never trusted blindly)."""
    try:
        ttl, revoking = msgpack.unpackb(raw)
    except Exception:  # msgpack raises several unrelated types on garbage
        return None
    if type(ttl) is not int or type(revoking) is not bool or not 0 < ttl <= MAX_TTL:
        return None
    return LeaseRecord(ttl, revoking)
