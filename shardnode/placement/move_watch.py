"""Finishing moves whose mover died (docs/sharding.md, "Crashes").

From its freeze until its activation a move's ranges are served by no group,
so a mover that dies there (the `group add` command killed, its machine
lost) would leave them unavailable until someone ran the command again.
Every router therefore watches the metadata group's move records: a move
that may be frozen (recorded COPIED: the freeze may be applied and not yet
recorded, or later) and keeps its phase for STALL_SECONDS is
resumed by the first router that takes the mover lease (a compare-and-set
key in the metadata group, with an expiry). Running a move twice at once is
safe, every step being idempotent; the lease only keeps routers from doing
the same work together. Moves before their freeze keep every key served and
are left to the operator (`group add` or `group remove` finishes them).
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgpack

from ..background import OwnedTask
from ..config import ClusterConfig
from ..errors import ShardnodeError
from .directory import ShardDirectory
from .moves import MOVES_KEY, MoveError, MoveRecord, Mover, Phase, decode_moves
from .worker_groups import WorkerGroups

log = logging.getLogger("shardnode.router")

LEASE_KEY = b"mover_lease"
#: How often the records are read.
POLL_SECONDS = 2.0
#: A move that may be frozen and keeps its phase this long has lost its mover.
STALL_SECONDS = 10.0
#: How long a lease holds (renewed per move); a router that dies with it only delays the next.
LEASE_SECONDS = 60.0


class MoveWatch(OwnedTask):
    task_name = "router move watch"

    def __init__(self, cluster: ClusterConfig, host_name: str, stall_seconds: float = STALL_SECONDS) -> None:
        self.cluster = cluster
        self.host_name = host_name
        self.stall_seconds = stall_seconds
        self._seen: dict[int, tuple[Phase, float]] = {}      # move id -> (phase, since)

    async def _run(self) -> None:
        directory = ShardDirectory(self.cluster, self.host_name)
        try:
            while True:
                await asyncio.sleep(POLL_SECONDS)
                try:
                    await self._check(directory)
                except ShardnodeError as exc:
                    log.debug("router.move_watch_skipped", extra={"error": str(exc)})
                except Exception:     # a bug here must not end the watch for good
                    log.exception("router.move_watch_failed")
        finally:
            await directory.close()

    async def _check(self, directory: ShardDirectory) -> None:
        records = decode_moves(await directory.read(MOVES_KEY))
        now = time.monotonic()
        seen: dict[int, tuple[Phase, float]] = {}
        for record in records:
            phase, since = self._seen.get(record.move_id, (record.phase, now))
            seen[record.move_id] = (phase, since) if phase == record.phase else (record.phase, now)
        self._seen = seen
        stalled = [r for r in records
                   if r.phase >= Phase.COPIED and now - self._seen[r.move_id][1] >= self.stall_seconds]
        if stalled and await self._take_lease(directory):
            await self._resume(directory, stalled)

    async def _take_lease(self, directory: ShardDirectory) -> bool:
        raw = await directory.read(LEASE_KEY)
        now_ms = int(time.time() * 1000)
        if raw is not None:
            try:
                holder, expires_ms = msgpack.unpackb(raw, raw=False)
            except (ValueError, TypeError):
                holder, expires_ms = "", 0
            if holder != self.host_name and expires_ms > now_ms:
                return False
        lease = msgpack.packb([self.host_name, now_ms + int(LEASE_SECONDS * 1000)])
        swapped, _ = await directory.compare_and_set(LEASE_KEY, raw, lease)
        return swapped

    async def _resume(self, directory: ShardDirectory, stalled: list[MoveRecord]) -> None:
        try:
            groups = WorkerGroups(self.cluster, self.host_name)
        except ShardnodeError as exc:       # no admin credential on this host: another router will
            log.warning("router.move_resume_impossible", extra={"error": str(exc)})
            return
        mover = Mover(groups, directory)
        try:
            for record in stalled:
                log.warning("router.move_resumed", extra={"move": record.move_id, "source": record.source,
                                                          "target": record.target, "phase": record.phase.name})
                try:
                    await mover.run(record)
                except MoveError as exc:
                    log.error("router.move_resume_failed", extra={"move": record.move_id, "error": str(exc)})
                    return
                self._seen.pop(record.move_id, None)
        finally:
            await groups.close()
