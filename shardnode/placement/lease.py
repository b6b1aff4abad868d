"""The scheduler's lease: who may change the cluster's shape now, and the
fencing token that makes a deposed holder harmless (docs/membership.md,
"One scheduler").

Two keys of the metadata group:

- `placement/lease` = [holder, token, expires_ms]: renewed by its holder
  (compare-and-set on its exact bytes), taken over by anyone once it has
  expired (wall-clock milliseconds: clocks only decide *when* a take-over may
  happen, never whether two holders can both act);
- `placement/fence` = [token]: the token of the latest take-over. It changes
  only when the lease changes hands, so the holder's metadata writes are
  guarded by it (`guards`): a write of a holder that has been deposed (paused
  past its expiry, cut off) fails, whatever it believes.

A take-over is two steps: compare-and-set the lease to [me, token + 1, ...],
then the fence key to the new token, guarded by that lease. The second step
is the take-over's linearization point: metadata writes before it were the
predecessor's to make; after it, only the new holder's succeed. Data groups
are fenced the same way by the token carried in every shard command and
membership change (shardnode/storage/fencing.py), and the new holder raises
it in every group before it acts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

import msgpack

from ..errors import ShardnodeError

log = logging.getLogger("shardnode.placement")

LEASE_KEY = b"placement/lease"
FENCE_KEY = b"placement/fence"
#: How long a lease holds without renewal. A holder renews every third of it;
#: a holder that dies delays the next one by at most this much.
LEASE_SECONDS = 8.0


class LeaseLost(ShardnodeError):
    """This process no longer holds the scheduler's lease: it must stop
    changing the cluster (its later writes would be refused anyway)."""


class LeaseDirectory(Protocol):
    """What the lease needs of the metadata group (ShardDirectory)."""

    async def read(self, key: bytes) -> bytes | None: ...

    async def compare_and_set(self, key: bytes, expected: bytes | None, new: bytes, timeout: float | None = None,
                              guards: tuple[tuple[bytes, bytes | None], ...] = ()) -> tuple[bool, bytes | None]: ...


@dataclass(slots=True, frozen=True)
class LeaseState:
    """The lease as stored."""

    holder: str
    token: int
    expires_ms: int

    def encode(self) -> bytes:
        return msgpack.packb([self.holder, self.token, self.expires_ms])

    @classmethod
    def decode(cls, raw: bytes | None) -> LeaseState | None:
        if raw is None:
            return None
        try:
            holder, token, expires_ms = msgpack.unpackb(raw, raw=False)
            if not isinstance(holder, str) or type(token) is not int or type(expires_ms) is not int:
                raise TypeError("field types")
        except (ValueError, TypeError, msgpack.exceptions.ExtraData):
            # Unreadable: treated as an expired lease with token 0; the fence
            # key still keeps tokens increasing.
            return cls("", 0, 0)
        return cls(holder, token, expires_ms)

    def expired(self, now_ms: int) -> bool:
        return self.expires_ms <= now_ms


def encode_fence(token: int) -> bytes:
    return msgpack.packb([token])


def decode_fence(raw: bytes | None) -> int:
    if raw is None:
        return 0
    try:
        (token,) = msgpack.unpackb(raw, raw=False)
    except (ValueError, TypeError, msgpack.exceptions.ExtraData):
        return 0
    return token if type(token) is int and token >= 0 else 0


class SchedulerLease:
    """One process's claim on the lease. `holder` must be unique per process
    (host, pid and a random suffix); `clock` returns wall-clock seconds."""

    def __init__(self, directory: LeaseDirectory, holder: str, duration: float = LEASE_SECONDS,
                 clock=time.time) -> None:  # type: ignore[no-untyped-def]
        self.directory = directory
        self.holder = holder
        self.duration = duration
        self.clock = clock
        self._stored: bytes | None = None       # the lease bytes we wrote last
        self.token = 0

    @property
    def held(self) -> bool:
        return self._stored is not None

    @property
    def guards(self) -> tuple[tuple[bytes, bytes | None], ...]:
        """What every metadata write of the holder is conditioned on."""
        if not self.held:
            raise LeaseLost("the scheduler's lease is not held")
        return ((FENCE_KEY, encode_fence(self.token)),)

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def read(self) -> LeaseState | None:
        return LeaseState.decode(await self.directory.read(LEASE_KEY))

    async def acquire(self) -> bool:
        """Take the lease if it is free, expired or ours; False if another
        holder's lease is live (or another process won a race for it)."""
        raw = await self.directory.read(LEASE_KEY)
        current = LeaseState.decode(raw)
        now_ms = self._now_ms()
        if current is not None and current.holder == self.holder and current.token == self.token and self.held:
            return await self._renew(raw)
        if current is not None and current.holder and current.holder != self.holder and not current.expired(now_ms):
            return False
        fence = decode_fence(await self.directory.read(FENCE_KEY))
        token = max(fence, current.token if current is not None else 0) + 1
        claim = LeaseState(self.holder, token, now_ms + int(self.duration * 1000)).encode()
        swapped, _ = await self.directory.compare_and_set(LEASE_KEY, raw, claim)
        if not swapped:
            return False
        # The linearization point: from here on only our guarded writes land.
        while True:
            fence_raw = await self.directory.read(FENCE_KEY)
            if decode_fence(fence_raw) >= token:
                # Someone with a newer token already: our claim was overtaken.
                return False
            swapped, _ = await self.directory.compare_and_set(FENCE_KEY, fence_raw, encode_fence(token),
                                                              guards=((LEASE_KEY, claim),))
            if swapped:
                break
            if await self.directory.read(LEASE_KEY) != claim:
                return False
        self._stored, self.token = claim, token
        log.info("placement.lease_acquired", extra={"holder": self.holder, "token": token,
                                                     "previous": current.holder if current else ""})
        return True

    async def renew(self) -> None:
        """Extend the lease; LeaseLost if it is no longer ours."""
        if not self.held:
            raise LeaseLost("the scheduler's lease is not held")
        if await self._renew(self._stored):
            return
        # Our last renewal may have landed without our hearing it (its answer
        # lost to a timeout): the stored lease is then still ours, with our
        # holder and token, only newer than what we remember.
        raw = await self.directory.read(LEASE_KEY)
        current = LeaseState.decode(raw)
        if current is not None and current.holder == self.holder and current.token == self.token \
                and await self._renew(raw):
            return
        self._stored = None
        raise LeaseLost(f"the scheduler's lease (token {self.token}) was taken over")

    async def _renew(self, raw: bytes | None) -> bool:
        renewed = LeaseState(self.holder, self.token, self._now_ms() + int(self.duration * 1000)).encode()
        swapped, _ = await self.directory.compare_and_set(LEASE_KEY, raw, renewed)
        if swapped:
            self._stored = renewed
        return swapped

    async def release(self) -> None:
        """Give the lease up at once (expired now, same token): the next
        holder need not wait out the expiry. Harmless if it was lost."""
        if not self.held:
            return
        stored, self._stored = self._stored, None
        released = LeaseState(self.holder, self.token, 0).encode()
        try:
            await self.directory.compare_and_set(LEASE_KEY, stored, released)
        except ShardnodeError:
            pass            # it expires by itself
        log.info("placement.lease_released", extra={"holder": self.holder, "token": self.token})
