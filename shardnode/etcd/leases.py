"""etcd leases on a router (docs/etcd.md, "Leases").

- A lease is a record of the metadata group (lease_records.py), granted
  and revoked through its log; how long it has left is measured by that
  group's leader alone (replica/lease_clock.py), which keep-alives reach.
- A key is attached to a lease by a put with it; the key's group keeps the
  lease with the key (storage/kv_records.py) and an index of its keys.
- Revoking (asked, or on expiry) is three steps, each safe to repeat:
  the record is marked revoking (keep-alives fail from then on), every
  data group deletes its keys of the lease and refuses the lease in later
  puts (one REVOKE transaction per group), and the record is deleted. A
  revocation that stopped half-way (the router died) is still marked
  revoking: the next expiry round, by any router, finishes it.
- Every router runs the expiry round every EXPIRY_INTERVAL seconds: it asks
  the metadata group's leader which leases ran out and revokes them.
  Several routers may revoke one lease at once: the steps are idempotent,
  and each key is deleted once (a second REVOKE finds nothing).
- While no lease exists (most clusters, most of the time) a round has
  nothing to do, and each costs the metadata group's leader a read barrier:
  the router then watches the lease records on a metadata replica
  (placement/metadata_watch.py; subscribed before the round that found none,
  so no grant is missed) and runs the next round when one changes, or after
  WATCHED_IDLE_EXPIRY_INTERVAL at the latest. Without a watch, a round every
  IDLE_EXPIRY_INTERVAL as before.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from typing import TYPE_CHECKING

import grpc
import msgpack

from ..channel_cache import AioChannelCache
from ..config import ClusterConfig
from ..placement.directory import ShardDirectory
from ..placement.metadata_watch import MetadataWatch, WatchBroken, started
from ..proto import worker_pb2 as wpb
from ..storage.etcd_ops import (
    Compare,
    CompareResult,
    CompareTarget,
    DeleteOp,
    PutOp,
    RangeOp,
    RevokeOp,
    Txn,
    TxnResult,
    decode_result,
    encode_range,
    encode_txn,
)
from .gateway import answer_of
from .lease_records import (
    LEASE_PREFIX,
    LEASE_PREFIX_END,
    MAX_ID,
    MAX_TTL,
    MIN_TTL,
    LeaseRecord,
    decode_lease,
    encode_lease,
    lease_key,
    lease_of_key,
)
from .requests import LEASE_NOT_FOUND, EtcdError

if TYPE_CHECKING:
    from ..routing.service import KVService

log = logging.getLogger("shardnode.etcd")

WOp = wpb.Operation
#: Seconds between two expiry rounds of a router (with jitter), and while no lease exists
#: without a watch on the lease records; with one, at least this often.
EXPIRY_INTERVAL = 0.5
IDLE_EXPIRY_INTERVAL = 2.0
WATCHED_IDLE_EXPIRY_INTERVAL = 20.0
#: The metadata group's ownership never changes: any epoch is recent enough for its ranges.
_ANY_EPOCH = (1 << 63) - 1
LEASE_EXISTS = "etcdserver: lease already exists"


class Leases:
    def __init__(self, cluster: ClusterConfig, host_name: str, core: KVService) -> None:
        self.cluster = cluster
        self.core = core
        self.directory = ShardDirectory(cluster, host_name)
        self._expiry: asyncio.Task[None] | None = None
        self._random = random.Random()
        self._watch_channels = AioChannelCache(cluster.security, host_name)
        self._watch_addresses = [r.address for r in cluster.meta_group_replicas()]
        self._watch_attempts = 0

    # --- The metadata group ---------------------------------------------------------------

    async def _meta_txn(self, txn: Txn, key: bytes, timeout: float) -> TxnResult:
        """A transaction of the metadata group, on a router session (applied once)."""
        session = self.core.sessions.acquire()
        try:
            operation = WOp(kind=WOp.TXN, key=key, value=encode_txn(txn), client_id=session[0], sequence=session[1])
            return answer_of(await self.directory.execute(operation, timeout))
        finally:
            self.core.sessions.release(session)

    async def _record(self, lease: int, timeout: float) -> tuple[LeaseRecord | None, bytes | None]:
        raw = await self.directory.read(lease_key(lease), timeout)
        return (None, None) if raw is None else (decode_lease(raw), raw)

    # --- The operations -------------------------------------------------------------------

    async def grant(self, ttl: int, lease: int, timeout: float) -> tuple[int, int]:
        """(lease id, TTL granted). `lease` 0: an id of our choosing."""
        if ttl > MAX_TTL:
            raise EtcdError(grpc.StatusCode.OUT_OF_RANGE, f"etcdserver: too large lease TTL (at most {MAX_TTL})")
        if lease < 0:
            raise EtcdError(grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: lease ID must be positive")
        ttl = max(ttl, MIN_TTL)
        lease = lease or secrets.randbelow(MAX_ID) + 1
        key = lease_key(lease)
        txn = Txn(0, (Compare(key, CompareTarget.CREATE, CompareResult.EQUAL, 0),),
                  success=(PutOp(key, encode_lease(LeaseRecord(ttl)), 0),))
        result = await self._meta_txn(txn, key, timeout)
        if not result.succeeded:
            raise EtcdError(grpc.StatusCode.FAILED_PRECONDITION, LEASE_EXISTS)
        log.info("etcd.lease_granted", extra={"lease": lease, "ttl": ttl})
        return lease, ttl

    async def check(self, lease: int, timeout: float) -> None:
        """NOT_FOUND unless the lease exists and is not being revoked (a put
        with it may then go on; a revocation that overtakes it deletes the key
        or refuses the put in the key's group)."""
        record, _ = await self._record(lease, timeout)
        if record is None or record.revoking:
            raise EtcdError(grpc.StatusCode.NOT_FOUND, LEASE_NOT_FOUND)

    async def revoke(self, lease: int, deadline: float, *, reason: str = "asked") -> int:
        """Revoke the lease (the steps in the module docstring); returns the
        largest revision among the groups' deletions. NOT_FOUND if there is
        no such lease."""
        key = lease_key(lease)
        while True:
            record, raw = await self._record(lease, _left(deadline))
            if record is None:
                raise EtcdError(grpc.StatusCode.NOT_FOUND, LEASE_NOT_FOUND)
            if record.revoking:
                break
            marked = Txn(0, (Compare(key, CompareTarget.VALUE, CompareResult.EQUAL, raw or b""),),
                         success=(PutOp(key, encode_lease(LeaseRecord(record.ttl, True)), 0),))
            if (await self._meta_txn(marked, key, _left(deadline))).succeeded:
                break
        answers = await self.core.gateway.per_group(
            lambda epoch: WOp(kind=WOp.TXN, key=key, value=encode_txn(Txn(epoch, success=(RevokeOp(lease),))),
                              shard_epoch=epoch), deadline)
        deleted = sum(a.responses[0].deleted for a in answers)       # type: ignore[union-attr]
        await self._meta_txn(Txn(0, success=(DeleteOp(key),)), key, _left(deadline))
        log.info("etcd.lease_revoked", extra={"lease": lease, "keys": deleted, "reason": reason})
        return max(a.revision for a in answers)

    async def keep_alive(self, lease: int, timeout: float) -> int:
        """The TTL it was extended to, 0 if it is gone (etcd's answer)."""
        if lease <= 0:
            return 0
        result = await self.directory.execute(WOp(kind=WOp.LEASE_KEEPALIVE, key=lease_key(lease)), timeout)
        return int(msgpack.unpackb(result.value))

    async def time_to_live(self, lease: int, timeout: float) -> tuple[int, int]:
        """(seconds left, granted TTL); (-1, 0) if there is no such lease."""
        if lease <= 0:
            return -1, 0
        result = await self.directory.execute(WOp(kind=WOp.LEASE_STATUS, key=lease_key(lease)), timeout)
        remaining, granted = msgpack.unpackb(result.value)
        return (remaining, granted) if remaining >= 0 else (-1, 0)

    async def keys(self, lease: int, timeout: float) -> list[bytes]:
        """The keys attached to the lease, gathered from every group, in key order."""
        def decode(result: wpb.OperationResult) -> list[bytes]:
            if result.error:
                raise EtcdError(grpc.StatusCode.INVALID_ARGUMENT, result.error)
            return list(msgpack.unpackb(result.value))

        parts = await self.core.gateway.per_group(
            lambda epoch: WOp(kind=WOp.LEASE_KEYS, key=lease_key(lease), value=lease.to_bytes(8, "big"),
                              shard_epoch=epoch), time.monotonic() + timeout, decode=decode)
        return sorted(key for part in parts for key in part)

    async def leases(self, timeout: float) -> list[int]:
        op = RangeOp(LEASE_PREFIX, LEASE_PREFIX_END, keys_only=True)
        result = await self.directory.execute(WOp(kind=WOp.RANGE, key=LEASE_PREFIX, value=encode_range(op),
                                                  shard_epoch=_ANY_EPOCH), timeout)
        kvs = decode_result(result.value).responses[0].kvs          # type: ignore[union-attr]
        return [lease for lease in (lease_of_key(kv[0]) for kv in kvs) if lease is not None]

    # --- Expiry -----------------------------------------------------------------------------

    def start(self) -> None:
        self._expiry = asyncio.create_task(self._expire_forever(), name="etcd-lease-expiry")

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            await asyncio.gather(self._expiry, return_exceptions=True)
            self._expiry = None
        await self.directory.close()
        await self._watch_channels.close()

    async def _expire_forever(self) -> None:
        interval = EXPIRY_INTERVAL
        existing = 1                    # until a round says otherwise
        watch: MetadataWatch | None = None
        try:
            while True:
                watch = await self._until_next_round(watch, interval, idle=not existing)
                if watch is None:
                    # Before the round: a grant after it is then reported.
                    watch = await self._subscribe()
                try:
                    existing = 1
                    _, existing = await self.expire_once()
                    interval = EXPIRY_INTERVAL if existing else IDLE_EXPIRY_INTERVAL
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the metadata group unreachable, a group without quorum: next round
                    log.debug("etcd.lease_expiry_failed", extra={"error": str(exc)})
        finally:
            if watch is not None:
                await watch.close()

    async def _until_next_round(self, watch: MetadataWatch | None, interval: float,
                                idle: bool) -> MetadataWatch | None:
        """Wait for the next round: `interval` (with jitter), or while no
        lease exists and the watch holds, until a lease record changes. The
        watch, or None once it broke."""
        if watch is not None and self.directory.leader_address not in (None, watch.address):
            await watch.close()         # watch the leader (a follower cut off from it sees no grant)
            watch = None
        try:
            if idle and watch is not None:
                await watch.wait(WATCHED_IDLE_EXPIRY_INTERVAL)
            else:
                await asyncio.sleep(interval * (0.5 + self._random.random()))
                if watch is not None:
                    watch.changed()     # reports taken: the next round sees their changes
            return watch
        except WatchBroken as exc:
            log.debug("etcd.lease_watch_broken", extra={"replica": watch.address, "error": str(exc)})
            await watch.close()
            return None

    async def _subscribe(self) -> MetadataWatch | None:
        address = (self.directory.leader_address
                   or self._watch_addresses[self._watch_attempts % len(self._watch_addresses)])
        watch = await started(MetadataWatch(self.cluster, self._watch_channels, address,
                                            ((LEASE_PREFIX, LEASE_PREFIX_END),)), "etcd.lease_watch_refused")
        if watch is None:
            self._watch_attempts += 1
        return watch

    async def expire_once(self) -> tuple[list[int], int]:
        """Revoke every lease the metadata group's leader says ran out; their
        ids, and how many leases there were."""
        result = await self.directory.execute(WOp(kind=WOp.LEASES_EXPIRED, key=LEASE_PREFIX), 2.0)
        raw_expired, existing = msgpack.unpackb(result.value)
        expired = [int(lease) for lease in raw_expired]
        for lease in expired:
            try:
                await self.revoke(lease, time.monotonic() + 10.0, reason="expired")
            except EtcdError:
                pass            # revoked meanwhile (by another router, or asked)
        return expired, int(existing)


def _left(deadline: float) -> float:
    return max(0.001, deadline - time.monotonic())
