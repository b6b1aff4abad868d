"""etcdserverpb.Watch on a router (docs/etcd.md, "Watch").

One client stream carries many watches. A watch follows every group of the
shard map (a key's group changes when key space moves, and a range spans
every group): for each group it reads one replica's stream of changes
(worker Watch, replica/watch_hub.py), preferring the group's leader, and
passes each batch on as it comes. When that replica's stream ends (the
replica stopped, fell behind, or installed a snapshot), the watch reads
another replica from the revision after the last one it passed on for that
group, so no change is lost or repeated within a group. A group that joins
the map is followed from the lowest revision every group has reported
(its whole history: it is new); a group that leaves it is dropped.

Order: changes are passed on in revision order across every group, each
once. Each group's stream says how far it has sent everything (its closed
revision, ReplicaStore.closed_revision); a change is held back until every
group is closed at or past its revision, so that nothing with a lower
revision can still come. An idle group's closed revision moves only with
its clock: while changes are held back for it, the watch asks it for an
empty transaction (Gateway.tick) every TICK_SECONDS. A client that resumes
from its last revision + 1 therefore misses nothing. A watch whose start
revision a replica no longer has ends with etcd's compacted answer
(compact_revision: the first revision that replica has).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import msgpack

from ..proto import etcd_mvcc_pb2 as mvccpb
from ..proto import etcd_rpc_pb2 as rpc
from ..proto import etcd_rpc_pb2_grpc as rpc_grpc
from ..proto import worker_pb2 as wpb
from ..routing.access import READ
from .header import Header
from .kv import PERMISSION_DENIED
from .requests import KEY_NOT_PROVIDED, key_value

if TYPE_CHECKING:
    from ..access.rules import Grants
    from ..routing.service import KVService

log = logging.getLogger("shardnode.etcd")

#: A watch with progress_notify gets an empty response this often while nothing changes.
PROGRESS_NOTIFY_SECONDS = 5.0
#: How often a watch looks for groups added to or dropped from the shard map.
MAP_CHECK_SECONDS = 1.0
#: Pause before reading another replica after a stream ended.
RETRY_PAUSE = 0.2
#: Responses waiting for the client before the groups' streams wait for it.
OUT_QUEUE = 256
#: etcd's watch id of answers that belong to no one watch (progress requested on the stream).
NO_WATCH_ID = -1
#: While changes are held back for an idle group, it is asked to close its revisions this often.
TICK_SECONDS = 0.2
#: Changes a watch holds back at most (a group that reports no progress: no leader, no quorum);
#: past it the watch ends, and its client resumes from its last revision once the group is back.
MAX_HELD = 100_000
MAX_HELD_BYTES = 64 << 20


class EtcdWatch(rpc_grpc.WatchServicer):
    def __init__(self, core: KVService, header: Header) -> None:
        self.core = core
        self.header = header

    async def Watch(self, requests: AsyncIterator[rpc.WatchRequest], context) -> AsyncIterator[rpc.WatchResponse]:
        stream = _Stream(self.core, self.header, self.core.access.user(context))
        reader = asyncio.create_task(stream.read(requests), name="etcd-watch-requests")
        try:
            while True:
                response = await stream.out.get()
                if response is None:
                    return
                yield response
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await stream.close()


class _Stream:
    """One client's stream: its watches and what goes back to it."""

    def __init__(self, core: KVService, header: Header, user: str | None = None) -> None:
        self.core = core
        self.header = header
        self.user = user          # the stream's caller, when restricted (routing/access.py)
        self.out: asyncio.Queue[rpc.WatchResponse | None] = asyncio.Queue(OUT_QUEUE)
        self.watches: dict[int, _Watch] = {}
        self._ids = itertools.count(1)

    async def read(self, requests: AsyncIterator[rpc.WatchRequest]) -> None:
        try:
            async for request in requests:
                kind = request.WhichOneof("request_union")
                if kind == "create_request":
                    await self._create(request.create_request)
                elif kind == "cancel_request":
                    watch = self.watches.pop(request.cancel_request.watch_id, None)
                    if watch is not None:
                        await watch.stop()
                        await self.out.put(rpc.WatchResponse(header=self.header.make(watch.progress()),
                                                             watch_id=watch.id, canceled=True))
                elif kind == "progress_request":
                    revision = min((w.progress() for w in self.watches.values()), default=0)
                    await self.out.put(rpc.WatchResponse(header=self.header.make(revision), watch_id=NO_WATCH_ID))
        finally:
            await self.out.put(None)

    async def _create(self, create: rpc.WatchCreateRequest) -> None:
        watch_id = create.watch_id or next(self._ids)
        while not create.watch_id and watch_id in self.watches:
            watch_id = next(self._ids)
        problem = ""
        if not create.key:
            problem = KEY_NOT_PROVIDED
        elif watch_id in self.watches:
            problem = "etcdserver: watch id already exists"
        elif create.start_revision < 0:
            problem = "etcdserver: start revision must not be negative"
        elif not _may_read(self.core.access.grants_of(self.user), create):
            # Checked when the watch is made, as etcd does; a watch made stays.
            problem = PERMISSION_DENIED
        if problem:
            await self.out.put(rpc.WatchResponse(header=self.header.make(0), watch_id=watch_id, created=True,
                                                 canceled=True, cancel_reason=problem))
            return
        watch = _Watch(watch_id, create, self)
        self.watches[watch_id] = watch
        revision = await watch.start()
        await self.out.put(rpc.WatchResponse(header=self.header.make(revision), watch_id=watch_id, created=True))
        watch.created.set()

    async def end(self, watch: _Watch, compact_revision: int, reason: str) -> None:
        """A watch that cannot go on (compacted): canceled, with etcd's fields."""
        if self.watches.pop(watch.id, None) is None:
            return
        await self.out.put(rpc.WatchResponse(header=self.header.make(watch.progress()), watch_id=watch.id,
                                             canceled=True, compact_revision=compact_revision,
                                             cancel_reason=reason))
        asyncio.create_task(watch.stop())

    async def close(self) -> None:
        watches, self.watches = list(self.watches.values()), {}
        await asyncio.gather(*(w.stop() for w in watches), return_exceptions=True)


def _may_read(grants: "Grants | None", create: rpc.WatchCreateRequest) -> bool:
    return grants is None or grants.allows(READ, create.key, create.range_end)


class _Watch:
    def __init__(self, watch_id: int, create: rpc.WatchCreateRequest, stream: _Stream) -> None:
        self.id = watch_id
        self.create = create
        self.stream = stream
        self.no_put = rpc.WatchCreateRequest.NOPUT in create.filters
        self.no_delete = rpc.WatchCreateRequest.NODELETE in create.filters
        # Per group: the next revision to ask for (0: from now), and how far it reported.
        self.next_revision: dict[int, int] = {}
        self.progress_of: dict[int, int] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.created = asyncio.Event()
        self._ready: dict[int, asyncio.Event] = {}
        self._others: list[asyncio.Task[None]] = []
        # Changes received but not passed on yet: (revision, arrival, event), the lowest first.
        self._held: list[tuple[int, int, mvccpb.Event]] = []
        self._held_bytes = 0
        self._arrivals = itertools.count()
        self._released = asyncio.Lock()

    def progress(self) -> int:
        """A revision up to which every followed group has passed everything on."""
        return min(self.progress_of.values(), default=0)

    async def start(self) -> int:
        """Follow every group; returns once each one's stream is open (a
        change applied after this is seen), with the revision every group
        was closed at then: a client that watches again from the one after
        it misses nothing this watch would have given."""
        for group in self.stream.core.shard_map.groups:
            self._follow(group, self.create.start_revision)
        await asyncio.wait([asyncio.create_task(e.wait()) for e in self._ready.values()], timeout=10.0)
        self._others.append(asyncio.create_task(self._follow_map(), name=f"etcd-watch-{self.id}-map"))
        self._others.append(asyncio.create_task(self._close_idle_groups(), name=f"etcd-watch-{self.id}-ticks"))
        if self.create.progress_notify:
            self._others.append(asyncio.create_task(self._notify_progress(), name=f"etcd-watch-{self.id}-progress"))
        return self.progress()

    def _follow(self, group: int, start_revision: int) -> None:
        self.next_revision[group] = start_revision
        self._ready[group] = asyncio.Event()
        self.tasks[group] = asyncio.create_task(self._group(group), name=f"etcd-watch-{self.id}-g{group}")

    async def stop(self) -> None:
        tasks = list(self.tasks.values()) + self._others
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow_map(self) -> None:
        while True:
            await asyncio.sleep(MAP_CHECK_SECONDS)
            groups = set(self.stream.core.shard_map.groups)
            for group in groups - set(self.tasks):
                # A new group: everything it ever applied after the others' progress (it is new).
                self._follow(group, max(1, self.progress()))
            for group in set(self.tasks) - groups:
                self.tasks.pop(group).cancel()
                self.progress_of.pop(group, None)

    async def _close_idle_groups(self) -> None:
        """Ask the groups that hold changes back for an empty transaction."""
        gateway = self.stream.core.gateway
        while True:
            await asyncio.sleep(TICK_SECONDS)
            if not self._held:
                continue
            oldest = self._held[0][0]
            behind = [g for g in self.tasks if self.progress_of.get(g, 0) < oldest]
            results = await asyncio.gather(*(gateway.tick(g, time.monotonic() + 2.0) for g in behind),
                                           return_exceptions=True)
            for group, result in zip(behind, results):
                if isinstance(result, Exception):
                    log.debug("etcd.watch_tick_failed", extra={"group": group, "error": str(result)})

    async def _notify_progress(self) -> None:
        await self.created.wait()
        while True:
            await asyncio.sleep(PROGRESS_NOTIFY_SECONDS)
            await self._release(notify=True)

    async def _group(self, group: int) -> None:
        """Read the group's changes from one replica after another, forever."""
        core = self.stream.core
        attempt = 0
        while True:
            forwarder = core.forwarders.get(group)
            if forwarder is None:
                return
            addresses = list(forwarder.replicas.items())
            if not addresses:
                await asyncio.sleep(RETRY_PAUSE)
                continue
            leader = forwarder.leader
            ordered = sorted(addresses, key=lambda item: item[0] != leader)
            address = ordered[attempt % len(ordered)][1]
            attempt += 1
            request = wpb.WatchRequest(cluster=core.cluster.name, group=group, key=self.create.key,
                                       range_end=self.create.range_end,
                                       start_revision=self.next_revision[group])
            try:
                async for batch in core.channels.stub(address).Watch(request):
                    if batch.compacted:
                        await self.stream.end(self, batch.compacted,
                                              "etcdserver: mvcc: required revision has been compacted")
                        return
                    if batch.lagging:
                        break
                    if batch.progress and not self.next_revision[group]:
                        # Watching from now: a new stream starts after what this one reported first.
                        self.next_revision[group] = batch.progress + 1
                    self._ready[group].set()
                    if batch.events:
                        self._hold(group, batch.events)
                        if len(self._held) > MAX_HELD or self._held_bytes > MAX_HELD_BYTES:
                            stuck = [g for g in self.tasks if self.progress_of.get(g, 0) < self._held[0][0]]
                            await self.stream.end(self, 0, f"shardnode: too many changes held back "
                                                           f"waiting for group(s) {stuck}; watch again from the "
                                                           f"last revision received")
                            return
                    if batch.progress:
                        self.progress_of[group] = max(self.progress_of.get(group, 0), batch.progress)
                    await self._release()
                    attempt = 0
            except grpc.aio.AioRpcError as exc:
                log.debug("etcd.watch_stream_ended", extra={"group": group, "address": address,
                                                            "error": exc.code().name})
            await asyncio.sleep(RETRY_PAUSE)

    def _hold(self, group: int, raw: bytes) -> None:
        last = 0
        for revision, key, kv, previous in msgpack.unpackb(raw, use_list=False, raw=False):
            last = revision
            if kv is None:
                if self.no_delete:
                    continue
                event = mvccpb.Event(type=mvccpb.Event.DELETE, kv=mvccpb.KeyValue(key=key, mod_revision=revision))
            else:
                if self.no_put:
                    continue
                event = mvccpb.Event(type=mvccpb.Event.PUT, kv=key_value(kv))
            if self.create.prev_kv and previous is not None:
                event.prev_kv.CopyFrom(key_value(previous))
            heapq.heappush(self._held, (revision, next(self._arrivals), event))
            self._held_bytes += event.ByteSize()
        if last:
            self.next_revision[group] = last + 1

    async def _release(self, notify: bool = False) -> None:
        """Pass on, in revision order, the held changes no group can still
        undercut: those at or below every followed group's closed revision;
        then, with `notify`, that revision (a progress answer: everything up
        to it was passed on)."""
        async with self._released:
            if len(self.progress_of) < len(self.tasks):
                return
            closed = self.progress()
            await self._pass_on_closed(closed)
            if notify:
                await self.stream.out.put(rpc.WatchResponse(header=self.stream.header.make(closed),
                                                            watch_id=self.id))

    async def _pass_on_closed(self, closed: int) -> None:
        """Caller holds _released."""
        if self._held:
            events = []
            while self._held and self._held[0][0] <= closed:
                events.append(heapq.heappop(self._held)[2])
                self._held_bytes -= events[-1].ByteSize()
            if events:
                await self.created.wait()           # the created answer goes first
                await self.stream.out.put(rpc.WatchResponse(
                    header=self.stream.header.make(events[-1].kv.mod_revision), watch_id=self.id, events=events))

