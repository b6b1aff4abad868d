"""The router's copy of the shard map, following the metadata group.

At start the router routes with the last map it saved (data_dir/HOST/shard_map),
else cluster.toml's initial map: workers refuse keys they do not own, so a
stale map costs a retry, never a wrong answer. `MapFollower` then follows
b"shard_map" in the metadata group: it watches the key on one of the group's
replicas (placement/metadata_watch.py) and reads it from the group's leader (a
linearizable read) when the watch says it changed; when the stored bytes
change and carry a higher epoch, it hands the new map to the router
(`adopt`) and saves it.

No change is missed: the key is read again after every subscription (a
change made before it is in that read, one made after it comes through the
watch), and once more every SAFETY_POLL_INTERVAL while the watch holds (a
watched replica cut off from its group would see no change). While no watch
can be had (the metadata group down, its replicas restarting), the key is
read every POLL_INTERVAL, and a watch tried again at each read. A router
that was down while the map changed learns it with its first read; one cut
off from the metadata group keeps routing with the map it has.

The same read brings the access rules (b"auth", routing/access.py), watched
the same way: users and roles reach the routers as the map does.

`refresh()` reads at once and returns the map then known: the forwarders
call it when a worker answers that a key is not its group's any more.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable

from ..background import OwnedTask
from ..channel_cache import AioChannelCache
from ..config import ClusterConfig
from ..errors import ShardnodeError
from ..placement.shard_map import ShardMap, ShardMapError
from ..access.rules import AUTH_KEY
from ..placement.directory import SHARD_MAP_KEY, ShardDirectory, initial_map
from ..placement.metadata_watch import MetadataWatch, WatchBroken, started

log = logging.getLogger("shardnode.router")

#: Without a watch, a stale router must still learn a new map within a
#: second. Each poll is a linearizable read (a ReadIndex round in the
#: metadata group): polled every 250 ms by the three routers of an idle
#: 3-host cluster, the metadata group's workers used more CPU than the data
#: group's (0.105 against 0.066 cores); every 500 ms, 0.078. With the watch,
#: a read is made only when the keys change (docs/performance.md, "Idle cost").
POLL_INTERVAL = 0.5
#: While the watch holds, the keys are read this often anyway.
SAFETY_POLL_INTERVAL = 20.0
#: One poll gives up after this (the next one tries again).
POLL_TIMEOUT = 1.0
#: Not reaching the metadata group this long after start is reported.
STARTUP_GRACE = 30.0


class MapFollower(OwnedTask):
    """Owned by the router's KVService: `start` in the event loop, `close` on shutdown."""

    task_name = "router shard map follower"

    def __init__(self, cluster: ClusterConfig, host_name: str,
                 adopt: Callable[[ShardMap], Awaitable[None]], interval: float = POLL_INTERVAL,
                 adopt_access: Callable[[bytes | None], None] | None = None,
                 safety_interval: float = SAFETY_POLL_INTERVAL) -> None:
        self.cluster = cluster
        self.safety_interval = safety_interval
        self._adopt_access = adopt_access
        self._access_raw: bytes | None = None
        self.host_name = host_name
        self.interval = interval
        self._adopt = adopt
        self.path = cluster.shard_map_file(host_name)
        self.shard_map = self._saved_or_initial()
        self.loaded = False            # true once a map came from the metadata group
        self._raw: bytes | None = None
        self._directory = ShardDirectory(cluster, host_name, timeout=POLL_TIMEOUT)
        self._poll_lock = asyncio.Lock()
        self._next: asyncio.Future[ShardMap] | None = None
        self._refreshes: set[asyncio.Task[None]] = set()
        self._unreachable_since: float | None = None
        self._started = time.monotonic()
        self._last_read_failed = False
        self._watch_channels = AioChannelCache(cluster.security, host_name)
        self._watch_addresses = [r.address for r in cluster.meta_group_replicas()]
        self._watch_attempts = 0
        self.watching: str | None = None      # the replica watched now, if any

    # --- The map at start ---------------------------------------------------------------

    def _saved_or_initial(self) -> ShardMap:
        try:
            saved = ShardMap.decode(self.path.read_bytes())
        except FileNotFoundError:
            return initial_map(self.cluster)
        except (OSError, ShardMapError) as exc:
            log.warning("router.shard_map_unreadable", extra={"path": str(self.path), "error": str(exc)})
            return initial_map(self.cluster)
        log.info("router.shard_map_saved", extra={"epoch": saved.epoch, "path": str(self.path)})
        return saved

    def _save(self, raw: bytes) -> None:
        # Whole or not at all: a crash mid-write leaves the previous map.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)

    # --- Following ------------------------------------------------------------------------

    async def _run(self) -> None:
        self._started = time.monotonic()
        while True:
            began = time.monotonic()
            watch = await self._subscribe()
            try:
                # After subscribing: what changed before it is in this read.
                await self._read_logged()
                if watch is not None:
                    await self._follow(watch)
            except WatchBroken as exc:
                log.info("router.map_watch_broken", extra={"replica": watch.address if watch else None,
                                                            "error": str(exc)})
            except Exception:       # a bug here must not stop following the map for good
                log.exception("router.map_follow_failed")
            finally:
                self.watching = None
                if watch is not None:
                    await watch.close()
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - began)))

    def _open_watch(self, address: str) -> MetadataWatch:
        return MetadataWatch(self.cluster, self._watch_channels, address, (SHARD_MAP_KEY, AUTH_KEY))

    async def _subscribe(self) -> MetadataWatch | None:
        """A watch in place on the metadata group's leader as last seen, else
        on its replicas in turn; None if this one did not answer."""
        address = self._directory.leader_address
        if address is None:
            address = self._watch_addresses[self._watch_attempts % len(self._watch_addresses)]
        watch = await started(self._open_watch(address), "router.map_watch_refused")
        if watch is None:
            self._watch_attempts += 1
            return None
        self.watching = address
        return watch

    async def _follow(self, watch: MetadataWatch) -> None:
        """Read whenever the watch reports a change, every safety interval,
        and every poll interval while reads fail; until the watch breaks."""
        last_read = time.monotonic()
        while True:
            if self._directory.leader_address not in (None, watch.address):
                # The leader is known (or moved) and not watched: watch it, whose applied
                # state is the newest (a follower cut off from it would see no change).
                return
            wait = self.interval if self._last_read_failed else self.safety_interval - (time.monotonic() - last_read)
            if await watch.wait(max(0.0, wait)) or self._last_read_failed \
                    or time.monotonic() - last_read >= self.safety_interval:
                last_read = time.monotonic()
                await self._read_logged()

    async def _read_logged(self) -> None:
        try:
            await self.refresh()
        except Exception:       # a bug here must not stop following the map for good
            log.exception("router.map_follow_failed")

    async def refresh(self) -> ShardMap:
        """Read the map from the metadata group now and adopt it if it is
        newer; the map known afterwards (unreachable: the map it has). The
        read starts after the call: callers that arrive while one runs share
        the next one (a burst of stale answers costs one read)."""
        if self._next is None:
            future = self._next = asyncio.get_running_loop().create_future()
            task = asyncio.ensure_future(self._poll_into(future))
            self._refreshes.add(task)
            task.add_done_callback(self._refreshes.discard)
        return await asyncio.shield(self._next)

    async def _poll_into(self, future: asyncio.Future[ShardMap]) -> None:
        async with self._poll_lock:
            if self._next is future:
                self._next = None           # callers from now on need a later read
            try:
                future.set_result(await self._poll())
            except asyncio.CancelledError:
                future.cancel()
                raise
            except Exception as exc:
                future.set_exception(exc)

    async def _poll(self) -> ShardMap:
        try:
            raw, access = await self._directory.read_many((SHARD_MAP_KEY, AUTH_KEY))
        except ShardnodeError as exc:
            self._last_read_failed = True
            self._unreachable(exc)
            return self.shard_map
        self._last_read_failed = False
        if self._adopt_access is not None and (access != self._access_raw or not self.loaded):
            self._access_raw = access
            self._adopt_access(access)
        if self._unreachable_since is not None:
            log.info("router.metadata_reachable", extra={"after_s": round(time.monotonic()
                                                                            - self._unreachable_since, 1)})
            self._unreachable_since = None
        self.loaded = True
        if raw is None or raw == self._raw:
            return self.shard_map
        try:
            new = ShardMap.decode(raw)
        except ShardMapError as exc:
            log.error("router.shard_map_undecodable", extra={"error": str(exc)})
            return self.shard_map
        self._raw = raw
        if new.epoch <= self.shard_map.epoch:
            return self.shard_map
        old = self.shard_map
        await self._adopt(new)
        self.shard_map = new
        log.info("router.shard_map_changed", extra={"old_epoch": old.epoch, "epoch": new.epoch,
                                                    "groups": list(new.groups)})
        try:
            await asyncio.to_thread(self._save, raw)
        except OSError as exc:
            log.warning("router.shard_map_not_saved", extra={"path": str(self.path), "error": str(exc)})
        return new

    def _unreachable(self, exc: Exception) -> None:
        now = time.monotonic()
        # While the cluster starts (the metadata group electing), silence.
        if self._unreachable_since is None and (self.loaded or now - self._started >= STARTUP_GRACE):
            self._unreachable_since = now
            log.warning("router.metadata_unreachable", extra={"epoch": self.shard_map.epoch, "error": str(exc)})

    async def close(self) -> None:
        await super().close()
        for task in list(self._refreshes):
            task.cancel()
        await asyncio.gather(*self._refreshes, return_exceptions=True)
        await self._directory.close()
        await self._watch_channels.close()
