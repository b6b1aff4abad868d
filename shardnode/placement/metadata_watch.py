"""Word from one metadata replica that some of its keys changed.

The metadata group's writes (compare-and-set of b"shard_map", b"auth", the
scheduler's records) are changes like any other group's (storage/store.py:
ChangeEvent), so every replica of it serves the worker's `Watch` RPC for
them (replica/watch_hub.py). `MetadataWatch` holds one such stream per key
(or interval of keys: the etcd API's lease records) on one replica: `start`
returns once every stream is in place — from then on, every change that
replica applies to those keys comes as a later `wait()` that returns True.
It carries no values: the watcher (the router's map follower, its scheduler
watch, its etcd lease expiry) reads the keys again, from the group's leader
(a linearizable read), when told that they changed.

A stream that ends, fails, reports that its watcher fell behind (a snapshot
replaced the replica's state) or stays silent longer than `silence` (the
replica asked to say how far it got every `progress`) is broken: `wait`
raises `WatchBroken`, and the watcher reads and subscribes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from ..channel_cache import AioChannelCache
from ..config import METADATA_GROUP, ClusterConfig
from ..proto import worker_pb2 as wpb
from ..proto import worker_pb2_grpc as wpb_grpc

#: How often an idle stream says it still lives (the replica's progress messages).
PROGRESS_SECONDS = 5.0
#: A stream with nothing for this long is taken as broken (its replica cut off or stopped).
SILENCE_SECONDS = 3 * PROGRESS_SECONDS
#: Streams not in place within this are a failed subscription.
START_TIMEOUT = 0.5

#: What one stream watches: a key, or etcd's interval [key, range_end).
Watched = bytes | tuple[bytes, bytes]

log = logging.getLogger("shardnode.placement")


class WatchBroken(Exception):
    """A stream ended or failed: changes from now on may not be reported."""


async def started(watch: "MetadataWatch", refused_event: str) -> "MetadataWatch | None":
    """`watch` once its streams are in place; None (closed, and one debug line
    `refused_event`) if its replica did not take it. Whatever else happens
    closes it too."""
    try:
        await watch.start()
    except WatchBroken as exc:
        await watch.close()
        log.debug(refused_event, extra={"replica": watch.address, "error": str(exc)})
        return None
    except BaseException:
        await watch.close()
        raise
    return watch


class MetadataWatch:
    """One stream per key on the metadata replica at `address`. Owned by its
    watcher: `start`, then `wait` as long as it returns, `close` always."""

    def __init__(self, cluster: ClusterConfig, channels: AioChannelCache, address: str, keys: tuple[Watched, ...],
                 progress: float = PROGRESS_SECONDS, silence: float = SILENCE_SECONDS) -> None:
        self.address = address
        self._worker = wpb_grpc.WorkerStub(channels.get(address))
        intervals = [(key, b"") if isinstance(key, bytes) else key for key in keys]
        self._requests = [wpb.WatchRequest(cluster=cluster.name, group=METADATA_GROUP, key=key, range_end=range_end,
                                           progress_ms=int(progress * 1000)) for key, range_end in intervals]
        self._silence = silence
        self._calls: list[grpc.aio.UnaryStreamCall] = []
        self._readers: list[asyncio.Task[None]] = []
        # What the streams report: True a change, an exception the stream's end.
        self._news: asyncio.Queue[bool | WatchBroken] = asyncio.Queue()

    async def start(self, timeout: float = START_TIMEOUT) -> None:
        """Open the streams and wait for each one's first message (the
        replica answers it once its watcher is registered)."""
        self._calls = [self._worker.Watch(request) for request in self._requests]
        try:
            firsts = await asyncio.wait_for(asyncio.gather(*(call.read() for call in self._calls)), timeout)
        except TimeoutError:
            raise WatchBroken(f"{self.address}: no answer to a watch within {timeout:g} s") from None
        except grpc.aio.AioRpcError as exc:
            raise WatchBroken(f"{self.address}: {exc.code().name} {exc.details() or ''}".strip()) from None
        for first in firsts:
            if first is grpc.aio.EOF or first.compacted or first.lagging:
                raise WatchBroken(f"{self.address}: the watch ended at once")
        self._readers = [asyncio.create_task(self._read(call), name="metadata watch")
                         for call in self._calls]

    async def _read(self, call: grpc.aio.UnaryStreamCall) -> None:
        try:
            while True:
                batch = await asyncio.wait_for(call.read(), self._silence)
                if batch is grpc.aio.EOF:
                    raise WatchBroken(f"{self.address}: the watch stream ended")
                if batch.compacted or batch.lagging:
                    raise WatchBroken(f"{self.address}: the watch fell behind and was ended")
                if batch.events:
                    self._news.put_nowait(True)
        except TimeoutError:
            self._news.put_nowait(WatchBroken(f"{self.address}: the watch was silent for {self._silence:g} s"))
        except grpc.aio.AioRpcError as exc:
            self._news.put_nowait(WatchBroken(f"{self.address}: {exc.code().name} {exc.details() or ''}".strip()))
        except WatchBroken as exc:
            self._news.put_nowait(exc)

    async def wait(self, timeout: float) -> bool:
        """True once a key changed (every report waiting is taken), False
        after `timeout` without one; WatchBroken when a stream ended."""
        if self._news.empty():
            try:
                news = await asyncio.wait_for(self._news.get(), timeout)
            except TimeoutError:
                return False
            if isinstance(news, WatchBroken):
                raise news
        self.changed()
        return True

    def changed(self) -> bool:
        """Whether a key changed since the last look, without waiting
        (every report waiting is taken); WatchBroken when a stream ended."""
        changed = False
        while not self._news.empty():
            news = self._news.get_nowait()
            if isinstance(news, WatchBroken):
                raise news
            changed = True
        return changed

    async def close(self) -> None:
        for call in self._calls:
            call.cancel()
        for reader in self._readers:
            reader.cancel()
        for reader in self._readers:
            with contextlib.suppress(asyncio.CancelledError):
                await reader
