"""Every router's background scheduler: it takes over work nobody drives
(docs/membership.md, "One scheduler").

A change of shape is driven by the command that recorded it. If that command
is killed (or its machine lost) the intent stays recorded, and moves of key
space may be left half way — from a move's freeze to its activation its
ranges are served by no group. Every router therefore looks every
BACKGROUND_POLL_SECONDS at the intents, the move records and the lease: if
some intent is unfinished, or some move is recorded, and nothing about it has
changed for STALL_FACTOR lease durations while nobody holds a live lease, the router takes
the lease and carries everything out (scheduler.py): intents in the order
they were recorded, then the moves that remain.

While nothing is recorded (the cluster's normal state) there is nothing to
time, and reading the records every 2 s from every router was a good part of
an idle metadata group's work: the router then watches the two records on a
metadata replica (metadata_watch.py, subscribed before the read that found
them empty, so no change is missed) and looks again when they change, or
after IDLE_CHECK_SECONDS at the latest; without a watch it polls as before.

Only a router that can act competes for the lease: one with the admin
credential (shard commands and membership changes need it) and with its
host's supervisord (starting workers of new members and groups). A router
that cannot act never takes the lease, so it can never keep others from
finishing the work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..background import OwnedTask
from ..channel_cache import AioChannelCache
from ..config import ClusterConfig
from ..errors import ShardnodeError
from ..security import SecurityError, load_admin_credential
from ..supervisor import ProcessControl
from .directory import ShardDirectory
from .executors import ClusterHands, make_scheduler
from .intents import INTENTS_KEY, IntentBook, unfinished
from .lease import SchedulerLease
from .metadata_watch import MetadataWatch, WatchBroken, started
from .moves import MOVES_KEY
from .scheduler import BACKGROUND_POLL_SECONDS, STALL_FACTOR, holder_name

log = logging.getLogger("shardnode.router")

#: While nothing is recorded and the watch holds, the records are read this often anyway.
IDLE_CHECK_SECONDS = 20.0


class SchedulerWatch(OwnedTask):
    task_name = "router scheduler watch"

    def __init__(self, cluster: ClusterConfig, host_name: str, supervised: Callable[[], bool] = lambda: True,
                 stall_seconds: float | None = None, poll_seconds: float = BACKGROUND_POLL_SECONDS,
                 idle_check_seconds: float = IDLE_CHECK_SECONDS) -> None:
        """`supervised()`: whether this host's supervisord answers now (the
        router's process watch knows). Work is stalled once nothing about it
        changed for STALL_FACTOR leases."""
        self.cluster = cluster
        self.host_name = host_name
        self.supervised = supervised
        if stall_seconds is None:
            stall_seconds = STALL_FACTOR * cluster.timing.scheduler_lease_seconds
        self.control = ProcessControl(cluster)
        self.stall_seconds = stall_seconds
        self.poll_seconds = poll_seconds
        self.idle_check_seconds = idle_check_seconds
        self._has_work = True          # until a read says otherwise
        self._watch_attempts = 0
        # What was seen of the work last time, and since when (monotonic).
        self._seen: tuple[bytes | None, bytes | None] | None = None
        self._since = 0.0

    def missing_credential(self) -> str:
        """Why this router may never carry work out ("" if it may)."""
        try:
            load_admin_credential(self.cluster.security)
        except (SecurityError, ShardnodeError, OSError) as exc:
            return f"no admin credential on this host ({exc})"
        return ""

    async def _run(self) -> None:
        reason = self.missing_credential()
        if reason:
            log.info("router.scheduler_watch_off", extra={"host": self.host_name, "reason": reason})
            return
        directory = ShardDirectory(self.cluster, self.host_name)
        hands = ClusterHands(self.cluster, control=self.control)
        scheduler = make_scheduler(hands, directory, holder_name(f"router-{self.host_name}"))
        channels = AioChannelCache(self.cluster.security, self.host_name)
        watch: MetadataWatch | None = None
        try:
            while True:
                if watch is not None and directory.leader_address not in (None, watch.address):
                    await watch.close()     # watch the leader (a follower cut off from it sees no change)
                    watch = None
                watch = await self._next_look(watch)
                if not self.supervised():
                    continue        # it could not start or stop a process: leave the work to a router that can
                if watch is None:
                    # Before the read: a change after it is then reported.
                    watch = await self._subscribe(channels, directory)
                try:
                    await scheduler.take_over_stalled(lambda: self._stalled(directory, scheduler.lease))
                except ShardnodeError as exc:
                    log.debug("router.scheduler_watch_skipped", extra={"error": str(exc)})
                except Exception:     # a bug here must not end the watch for good
                    log.exception("router.scheduler_watch_failed")
        finally:
            if watch is not None:
                await watch.close()
            await directory.close()
            await channels.close()

    async def _next_look(self, watch: MetadataWatch | None) -> MetadataWatch | None:
        """Wait for the next look at the records: poll_seconds while there
        is work (or no watch), else until the watch reports a change or
        idle_check_seconds. The watch, or None once it broke."""
        try:
            if watch is not None and not self._has_work:
                await watch.wait(self.idle_check_seconds)
            else:
                await asyncio.sleep(self.poll_seconds)
                if watch is not None:
                    watch.changed()     # reports taken: the next read sees their changes
            return watch
        except WatchBroken as exc:
            log.debug("router.scheduler_watch_broken", extra={"replica": watch.address, "error": str(exc)})
            await watch.close()
            self._has_work = True       # read at the next poll, and subscribe again before it
            return None

    async def _subscribe(self, channels: AioChannelCache, directory: ShardDirectory) -> MetadataWatch | None:
        addresses = [r.address for r in self.cluster.meta_group_replicas()]
        address = directory.leader_address or addresses[self._watch_attempts % len(addresses)]
        watch = await started(MetadataWatch(self.cluster, channels, address, (INTENTS_KEY, MOVES_KEY)),
                              "router.scheduler_watch_refused")
        if watch is None:
            self._watch_attempts += 1
        return watch

    async def _stalled(self, directory: ShardDirectory, lease: SchedulerLease) -> bool:
        """Whether there is work that nobody has driven for stall_seconds."""
        self._has_work = True           # a read that fails is tried again at the next poll
        intents_raw, moves_raw = await directory.read_many((INTENTS_KEY, MOVES_KEY))
        has_work = bool(unfinished(IntentBook.decode(intents_raw))) or moves_raw not in (None, b"") and \
            _has_moves(moves_raw)
        self._has_work = has_work
        now = time.monotonic()
        seen = (intents_raw, moves_raw)
        if not has_work:
            self._seen = None
            return False
        if seen != self._seen:
            self._seen, self._since = seen, now
            return False
        if now - self._since < self.stall_seconds:
            return False
        current = await lease.read()
        return current is None or current.expired(int(time.time() * 1000))


def _has_moves(raw: bytes) -> bool:
    from .moves import decode_moves
    try:
        return bool(decode_moves(raw))
    except ShardnodeError:
        return False
