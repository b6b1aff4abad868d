"""A replica's recent changes, for the etcd API's watches (docs/etcd.md, "Watch").

Every replica applies the same log, so every replica sees the same changes
with the same revisions (storage/store.py: ChangeEvent); the hub keeps the
last `capacity` of them in memory and hands them to watchers: first those
at or after the watcher's start revision, then each new batch as it is
applied. Nothing is written to disk: a replica that restarts starts with an
empty history, and a watch from a revision it no longer has is answered
`Compacted` (etcd's answer for a revision compacted away), with the first
revision it can serve.

A watcher that does not keep up (its queue full) is ended with `Lagging`:
the router starts it again from the revision it got to, from this history.
Single event loop: no locks.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable

import msgpack

from ..storage.etcd_ops import in_range, kv_of
from ..storage.store import ChangeEvent

#: Changes a replica remembers for watches that start in the past: at most this many, and at
#: most about this many bytes of keys and values (values reach 1 MiB).
DEFAULT_CAPACITY = 10_000
DEFAULT_CAPACITY_BYTES = 32 << 20
#: Batches of changes a watcher may have waiting before it is ended as lagging.
QUEUE_BATCHES = 1024


def _size(event: ChangeEvent) -> int:
    """About the memory a remembered change holds."""
    return (len(event.key) + (len(event.record.value) if event.record is not None else 0)
            + (len(event.previous.value) if event.previous is not None else 0) + 100)


def encode_changes(events: list[ChangeEvent]) -> bytes:
    """The changes as a worker's WatchBatch carries them (proto/worker.proto)."""
    return msgpack.packb([(e.revision, e.key, None if e.record is None else kv_of(e.key, e.record),
                           None if e.previous is None else kv_of(e.key, e.previous)) for e in events],
                         use_bin_type=True)


class Compacted(Exception):
    """The start revision is older than this replica's history; `first` is
    the oldest start revision it can serve."""

    def __init__(self, first: int) -> None:
        super().__init__(f"required revision has been compacted (the oldest one this replica has is {first})")
        self.first = first


class Lagging(Exception):
    """The watcher fell too far behind and was ended; start again from where it got to."""


class Watcher:
    def __init__(self, key: bytes, range_end: bytes, start_revision: int) -> None:
        self.key = key
        self.range_end = range_end
        # Also for the changes applied after it was created: a replica behind
        # the one a watch left may still apply changes the watch already had.
        self.start_revision = start_revision
        self.queue: asyncio.Queue[list[ChangeEvent] | None] = asyncio.Queue(QUEUE_BATCHES)
        self.lagging = False

    def matches(self, events: Iterable[ChangeEvent]) -> list[ChangeEvent]:
        return [e for e in events if e.revision >= self.start_revision and in_range(e.key, self.key, self.range_end)]

    async def next(self) -> list[ChangeEvent]:
        """The next batch of matching changes (may wait); Lagging once ended."""
        batch = await self.queue.get()
        if batch is None:
            raise Lagging("this watcher fell too far behind")
        return batch


class WatchHub:
    def __init__(self, revision: int, capacity: int = DEFAULT_CAPACITY,
                 capacity_bytes: int = DEFAULT_CAPACITY_BYTES) -> None:
        # Every change after `_first - 1` is in `_history`: nothing before this replica started.
        self._first = revision + 1
        self._history: deque[ChangeEvent] = deque()
        self._capacity = capacity
        self._capacity_bytes = capacity_bytes
        self._bytes = 0
        self._watchers: set[Watcher] = set()

    def publish(self, events: list[ChangeEvent]) -> None:
        """The changes of one applied batch (ReplicaStore.on_changes)."""
        self._history.extend(events)
        self._bytes += sum(_size(e) for e in events)
        while self._history and (len(self._history) > self._capacity or self._bytes > self._capacity_bytes):
            dropped = self._history.popleft()
            self._bytes -= _size(dropped)
            self._first = dropped.revision + 1
        for watcher in list(self._watchers):
            matching = watcher.matches(events)
            if not matching:
                continue
            try:
                watcher.queue.put_nowait(matching)
            except asyncio.QueueFull:
                self._end(watcher)

    def watch(self, key: bytes, range_end: bytes, start_revision: int) -> tuple[Watcher, list[ChangeEvent]]:
        """A new watcher and the remembered changes it must see first (those
        with a revision >= start_revision; 0: none, from now on).
        Compacted if this replica no longer has all of them."""
        watcher = Watcher(key, range_end, start_revision)
        backlog: list[ChangeEvent] = []
        if start_revision > 0:
            if start_revision < self._first:
                raise Compacted(self._first)
            backlog = watcher.matches(self._history)
        self._watchers.add(watcher)
        return watcher, backlog

    def reset(self, revision: int) -> None:
        """A snapshot replaced the state: the changes up to `revision` are
        not known here. Watchers are ended (they start again elsewhere, or
        here from a revision this replica has)."""
        self._history.clear()
        self._bytes = 0
        self._first = revision + 1
        for watcher in list(self._watchers):
            self._end(watcher)

    def cancel(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    def _end(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)
        watcher.lagging = True
        while not watcher.queue.empty():
            watcher.queue.get_nowait()
        watcher.queue.put_nowait(None)

    def first_revision(self) -> int:
        return self._first
