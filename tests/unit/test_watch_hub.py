"""A replica's recent changes for the etcd API's watches (replica/watch_hub.py)."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from shardnode.replica.watch_hub import Compacted, Lagging, WatchHub, encode_changes
from shardnode.storage.kv_records import KeyRecord
from shardnode.storage.store import ChangeEvent


def change(revision: int, key: bytes, value: bytes | None = b"v") -> ChangeEvent:
    record = None if value is None else KeyRecord(value, revision, revision, 1)
    return ChangeEvent(revision, key, record, None)


def test_a_watch_from_a_revision_gets_the_history_then_what_follows_in_its_range() -> None:
    async def run() -> None:
        hub = WatchHub(revision=10, capacity=100)
        hub.publish([change(11, b"a/1"), change(12, b"b/1")])
        hub.publish([change(13, b"a/2", None)])
        watcher, backlog = hub.watch(b"a/", b"a0", start_revision=12)
        assert [e.revision for e in backlog] == [13]
        hub.publish([change(14, b"a/3"), change(15, b"z")])
        assert [e.key for e in await watcher.next()] == [b"a/3"]
        hub.cancel(watcher)
        hub.publish([change(16, b"a/4")])
        assert watcher.queue.empty()

    asyncio.run(run())


def test_what_the_replica_no_longer_has_is_compacted() -> None:
    hub = WatchHub(revision=10, capacity=2)
    with pytest.raises(Compacted) as compacted:
        hub.watch(b"a", b"", start_revision=5)              # before this replica started
    assert compacted.value.first == 11
    hub.publish([change(11, b"a"), change(12, b"a"), change(13, b"a")])
    with pytest.raises(Compacted) as compacted:
        hub.watch(b"a", b"", start_revision=11)             # dropped from the bounded history
    assert compacted.value.first == 12
    _, backlog = hub.watch(b"a", b"", start_revision=12)
    assert [e.revision for e in backlog] == [12, 13]
    hub.reset(revision=40)                                   # a snapshot installed
    with pytest.raises(Compacted):
        hub.watch(b"a", b"", start_revision=20)


def test_a_watcher_that_falls_behind_is_ended() -> None:
    async def run() -> None:
        hub = WatchHub(revision=0)
        watcher, _ = hub.watch(b"k", b"", start_revision=0)
        for revision in range(1, 2000):
            hub.publish([change(revision, b"k")])
        with pytest.raises(Lagging):
            while True:
                await watcher.next()

    asyncio.run(run())


def test_changes_are_encoded_for_the_wire() -> None:
    raw = encode_changes([change(7, b"k"), change(8, b"k", None)])
    assert msgpack.unpackb(raw, use_list=False) == ((7, b"k", (b"k", 7, 7, 1, b"v", 0), None), (8, b"k", None, None))


def test_a_replica_behind_the_watch_sends_nothing_before_its_start() -> None:
    """A watch resumed at a replica that has not applied what it already got:
    those changes, applied there later, are not sent again."""
    async def run() -> None:
        hub = WatchHub(revision=10)
        hub.publish([change(11, b"k")])
        watcher, backlog = hub.watch(b"k", b"", start_revision=13)     # the watch had 11 and 12 elsewhere
        assert backlog == []
        hub.publish([change(12, b"k"), change(13, b"k")])
        assert [e.revision for e in await watcher.next()] == [13]

    asyncio.run(run())


def test_the_history_is_bounded_in_bytes_too() -> None:
    hub = WatchHub(revision=0, capacity=1000, capacity_bytes=5000)
    for revision in range(1, 11):
        hub.publish([change(revision, b"k", b"v" * 1000)])
    assert hub.first_revision() > 5                       # only the last few 1 kB changes are kept
    _, backlog = hub.watch(b"k", b"", start_revision=hub.first_revision())
    assert [e.revision for e in backlog] == list(range(hub.first_revision(), 11))
