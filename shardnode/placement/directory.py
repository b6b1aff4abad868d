"""A client of the metadata group: reads and compare-and-sets its keys,
above all b"shard_map", the cluster's live shard map (docs/sharding.md).

The metadata group is an ordinary Raft group of workers (group
`METADATA_GROUP`, on the first `meta_replicas` hosts that are not standby,
each listening on worker_port_base + max_groups). `ShardDirectory` finds its
leader among those replicas, follows NOT_LEADER hints and retries
UNAVAILABLE answers and broken connections until the call's deadline; then
it raises `MetadataUnavailable`, whose message names what it tried.

Reads are linearizable (the leader's ReadIndex). Compare-and-set writes go
through one client session, one at a time, so a retry after a lost answer is
applied at most once. Until anyone wrote it, b"shard_map" is absent and the
map is the one cluster.toml describes (`initial_map`, epoch 1); the first
change writes that map (absent -> initial) before it changes it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import grpc

from ..channel_cache import AioChannelCache
from ..config import METADATA_GROUP, ClusterConfig
from ..errors import ShardnodeError, Unavailable
from ..proto import worker_pb2 as wpb
from ..proto import worker_pb2_grpc as wpb_grpc
from .shard_map import ShardMap, ShardMapConflict

log = logging.getLogger("shardnode.placement")

SHARD_MAP_KEY = b"shard_map"
MOVES_KEY = b"moves"
#: How long one call (a read, a compare-and-set) keeps trying by default.
DEFAULT_TIMEOUT = 5.0
#: Per attempt: a replica that does not answer within this is skipped.
ATTEMPT_TIMEOUT = 1.0
_BACKOFF = (0.02, 0.05, 0.1, 0.2)
#: NOT_LEADER hints followed in a row without a pause (two stale replicas may point at each other).
_MAX_HINTS = 3

Op = wpb.Operation
Status = wpb.ExecuteResponse


class MetadataUnavailable(Unavailable):
    """The metadata group did not answer before the deadline (no leader, no
    quorum, its hosts down). A compare-and-set's outcome is then unknown."""


class MapConflict(ShardMapConflict, ShardnodeError):
    """update_map found another map than the one it was asked to replace:
    someone changed the map meanwhile (read it again). `current` is the map
    now stored."""

    def __init__(self, message: str, current: ShardMap | None) -> None:
        super().__init__(message)
        self.current = current


class GuardFailed(ShardnodeError):
    """A guarded write found one of its guard keys changed (a scheduler's
    lease taken over): nothing was written, and retrying cannot help the
    writer, which no longer holds what it conditioned the write on."""


Guards = tuple[tuple[bytes, bytes | None], ...]


def initial_map(cluster: ClusterConfig) -> ShardMap:
    """The shard map before anyone wrote one: cluster.toml's ring, epoch 1."""
    return ShardMap.build(cluster.groups, cluster.virtual_nodes)


class ShardDirectory:
    """`host_name`: the host this runs on (its certificate with TLS; the
    metadata group's workers answer the cluster's hosts only). None: the
    first host whose certificate is on this machine (the CLI)."""

    def __init__(self, cluster: ClusterConfig, host_name: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.cluster = cluster
        self.timeout = timeout
        security = cluster.security
        if host_name is None and security.tls:
            host_name = next((h.name for h in cluster.hosts if security.host_cert_file(h.name).exists()), None)
        self._identity = host_name
        self._addresses = [r.address for r in cluster.meta_group_replicas()]
        self._leader: str | None = None
        self._channels = AioChannelCache(security, host_name)
        # One session for this directory's writes, one write at a time.
        self._client_id = secrets.randbits(63) | 1
        self._sequence = 0
        self._write_lock = asyncio.Lock()

    @property
    def leader_address(self) -> str | None:
        """The metadata group's leader as the last call found it (None: not known)."""
        return self._leader

    # --- Keys -------------------------------------------------------------------------

    async def read(self, key: bytes, timeout: float | None = None) -> bytes | None:
        """The key's value (None if absent), linearizable."""
        result = await self._execute(Op(kind=Op.GET, key=key), timeout)
        return result.value if result.existed else None

    async def read_many(self, keys: tuple[bytes, ...], timeout: float | None = None) -> tuple[bytes | None, ...]:
        """The keys' values (None if absent), read together: one linearizable round."""
        results = await self._execute_all([Op(kind=Op.GET, key=key) for key in keys], timeout)
        return tuple(r.value if r.existed else None for r in results)

    async def compare_and_set(self, key: bytes, expected: bytes | None, new: bytes,
                              timeout: float | None = None,
                              guards: tuple[tuple[bytes, bytes | None], ...] = ()) -> tuple[bool, bytes | None]:
        """Set `key` to `new` if its value is `expected` (None: absent) and
        every guard key holds its value (None: absent) too. Returns (swapped,
        the value of `key` now stored): a guard that failed leaves `key` as
        it was, which the caller tells apart by reading the guard."""
        operation = Op(kind=Op.CAS, key=key, value=new)
        if expected is None:
            operation.expected_absent = True
        else:
            operation.expected = expected
        for guard_key, guard_value in guards:
            operation.guards.append(wpb.Guard(key=guard_key, value=guard_value or b"", absent=guard_value is None))
        async with self._write_lock:
            self._sequence += 1
            operation.client_id, operation.sequence = self._client_id, self._sequence
            result = await self._execute(operation, timeout)
        if result.error:
            raise ShardnodeError(f"metadata group refused a compare-and-set of {key!r}: {result.error}")
        if result.swapped:
            return True, new
        return False, (result.value if result.existed else None)

    # --- The shard map ------------------------------------------------------------------

    async def load_map(self, timeout: float | None = None) -> ShardMap:
        """The live shard map (cluster.toml's initial map if none was written)."""
        raw = await self.read(SHARD_MAP_KEY, timeout)
        return initial_map(self.cluster) if raw is None else ShardMap.decode(raw)

    async def update_map(self, old: ShardMap, new: ShardMap, timeout: float | None = None, *,
                         guards: Guards = ()) -> ShardMap:
        """Replace `old` (the map the caller read) with `new`; MapConflict if
        the stored map is another one by then. With `guards` (as for
        compare_and_set), only while every guard key holds its value:
        GuardFailed, and nothing written, once one does not."""
        if new.epoch <= old.epoch:
            raise ValueError(f"a new shard map needs a higher epoch than {old.epoch} (got {new.epoch})")
        expected = old.encode()
        initial = old == initial_map(self.cluster)
        swapped, current = await self.compare_and_set(SHARD_MAP_KEY, expected, new.encode(), timeout, guards)
        if not swapped and current is None and initial:
            # Nobody wrote the map yet: store the initial one, then change it.
            await self.compare_and_set(SHARD_MAP_KEY, None, expected, timeout, guards)
            swapped, current = await self.compare_and_set(SHARD_MAP_KEY, expected, new.encode(), timeout, guards)
        if not swapped and current is not None and current != expected and ShardMap.decode(current) == old:
            # The same map in other bytes (placements in another order): compare against what is stored.
            swapped, current = await self.compare_and_set(SHARD_MAP_KEY, current, new.encode(), timeout, guards)
        if not swapped:
            stored = ShardMap.decode(current) if current is not None else None
            if guards and (stored == old or (current is None and initial)):
                # The map was the one expected: a guard refused the write.
                raise GuardFailed(f"the shard map was not changed to epoch {new.epoch}: a guard key "
                                  f"({', '.join(repr(k) for k, _ in guards)}) no longer holds its value")
            raise MapConflict(
                f"the shard map changed meanwhile: expected epoch {old.epoch}, "
                f"found {stored.epoch if stored is not None else 'none'}", stored)
        log.info("sharding.map_updated", extra={"old_epoch": old.epoch, "epoch": new.epoch})
        return new

    async def close(self) -> None:
        await self._channels.close()

    async def execute(self, operation: wpb.Operation, timeout: float | None = None) -> wpb.OperationResult:
        """Any one operation on the metadata group's leader (the etcd API's
        leases, docs/etcd.md), with this directory's retries; its session is
        the caller's."""
        return await self._execute(operation, timeout)

    # --- One operation on the leader -------------------------------------------------------

    def _stub(self, address: str) -> wpb_grpc.WorkerStub:
        return wpb_grpc.WorkerStub(self._channels.get(address))

    async def _execute(self, operation: wpb.Operation, timeout: float | None) -> wpb.OperationResult:
        return (await self._execute_all([operation], timeout))[0]

    async def _execute_all(self, operations: list[wpb.Operation], timeout: float | None) -> list[wpb.OperationResult]:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        request = wpb.ExecuteRequest(cluster=self.cluster.name, group=METADATA_GROUP, operations=operations)
        target = self._leader or self._addresses[0]
        tried = 0
        hints = 0
        last = "no attempt"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._leader = None
                raise MetadataUnavailable(f"the metadata group ({', '.join(self._addresses)}) did not answer "
                                          f"in time: {last}")
            try:
                response = await self._stub(target).Execute(request, timeout=min(remaining, ATTEMPT_TIMEOUT))
            except grpc.aio.AioRpcError as exc:
                last = f"{target}: {exc.code().name} {exc.details() or ''}".strip()
                response = None
            if response is not None:
                if response.status == Status.OK:
                    self._leader = target
                    return list(response.results)
                if response.status == Status.INVALID_ARGUMENT or response.status == Status.WRONG_GROUP:
                    raise ShardnodeError(f"the metadata group's worker at {target} refused the request: "
                                         f"{response.message}")
                last = f"{target}: {Status.Status.Name(response.status)} {response.message}".strip()
                if response.status == Status.NOT_LEADER and response.leader_address and hints < _MAX_HINTS:
                    # Follow the hint at once (a new leader, maybe a member added since).
                    hints += 1
                    target = response.leader_address
                    continue
            # Try the next replica, pausing a little more each round.
            self._leader = None
            hints = 0
            tried += 1
            target = self._addresses[tried % len(self._addresses)]
            if tried % len(self._addresses) == 0:
                await asyncio.sleep(min(_BACKOFF[min(tried // len(self._addresses), len(_BACKOFF)) - 1],
                                        max(0.0, deadline - time.monotonic())))
