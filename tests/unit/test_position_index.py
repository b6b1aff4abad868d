"""The position index (storage/position_index.py): kept in step with the kv
family by every write, ingest, deletion and snapshot install, built on open
for a store that lacks it; what lets copies read a range by seeking and
range deletions skip the rest of the store, without holding up reads."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shardnode.storage.kv_records import record_value
from shardnode.keyspace import SPACE, KeyRange, RangeSet, stable_hash
from shardnode.raft import Entry, HardState
from shardnode.storage import Command, CommandOp, ReplicaStore, StoreBusy, encode_command
from shardnode.storage import engine as engine_module
from shardnode.storage.engine import new_batch
from shardnode.storage.shard_commands import ShardCommand, ShardOp, ShardResult

LOW = RangeSet([KeyRange(0, SPACE // 2)])
HIGH = RangeSet([KeyRange(SPACE // 2, SPACE)])
EVERYTHING = LOW.union(HIGH)
MOVE = 5


def keys_in(ranges: RangeSet, count: int, prefix: bytes = b"k") -> list[bytes]:
    found, i = [], 0
    while len(found) < count:
        key = prefix + b"%d" % i
        if stable_hash(key) in ranges:
            found.append(key)
        i += 1
    return found


class Group:
    def __init__(self, store: ReplicaStore) -> None:
        self.store = store
        self.index = store.applied_index

    def apply(self, *datas: bytes) -> list:
        entries = []
        for data in datas:
            self.index += 1
            entries.append(Entry(1, self.index, data))
        self.store.persist(HardState(1, 1, self.index), entries)
        return self.store.apply(entries)

    def put(self, key: bytes, value: bytes) -> None:
        self.apply(encode_command(Command(CommandOp.PUT, key, value, 0, 0, 1_000)))

    def delete(self, key: bytes) -> None:
        self.apply(encode_command(Command(CommandOp.DELETE, key, None, 0, 0, 1_000)))

    def shard(self, op: ShardOp, move_id: int = MOVE, **fields: object) -> ShardResult:
        (result,) = self.apply(ShardCommand(op, move_id, **fields).encode())  # type: ignore[arg-type]
        assert isinstance(result, ShardResult)
        return result


def indexed(store: ReplicaStore) -> set[bytes]:
    """The keys the position index lists (checking each record's position)."""
    from shardnode.storage import position_index

    found = set()
    for record in store._engine.position.view.keys():
        key = position_index.user_key(record)
        assert position_index.position_of(record) == stable_hash(key), key
        found.add(key)
    return found


def stored(store: ReplicaStore) -> set[bytes]:
    return set(store._engine.kv.view.keys())


@pytest.fixture
def groups(tmp_path: Path) -> Iterator[Callable[[str, RangeSet | None], Group]]:
    opened: list[ReplicaStore] = []

    def _open(name: str, owned: RangeSet | None) -> Group:
        store = ReplicaStore.open(tmp_path / name, initial_voters=(1,))
        store.configure_ownership(owned)
        opened.append(store)
        return Group(store)

    yield _open
    for store in opened:
        store.close()


def test_every_write_keeps_the_index_equal_to_the_keys(groups) -> None:  # type: ignore[no-untyped-def]
    group = groups("a", None)
    keys = [b"key-%d" % i for i in range(50)]
    for key in keys:
        group.put(key, b"v")
    for key in keys[:10]:
        group.put(key, b"overwritten")
    for key in keys[5:20]:
        group.delete(key)
    group.delete(b"never-written")
    # Within one batch: created, deleted, created again.
    group.apply(*(encode_command(Command(op, b"churn", value, 0, 0, 1_000))
                  for op, value in ((CommandOp.PUT, b"1"), (CommandOp.DELETE, None), (CommandOp.PUT, b"2"),
                                    (CommandOp.DELETE, None), (CommandOp.PUT, b"3"))))
    assert indexed(group.store) == stored(group.store) == set(keys[:5] + keys[20:]) | {b"churn"}


def test_ingest_range_deletion_and_abort_keep_the_index(groups) -> None:  # type: ignore[no-untyped-def]
    source, target = groups("s", EVERYTHING), groups("t", RangeSet())
    moving, staying = keys_in(HIGH, 30), keys_in(LOW, 30)
    for key in moving + staying:
        source.put(key, b"v")
    assert target.shard(ShardOp.IMPORT_BEGIN, peer=0, ranges=HIGH).ok
    assert source.shard(ShardOp.EXPORT_BEGIN, peer=1, ranges=HIGH).ok
    assert target.shard(ShardOp.INGEST, puts=tuple((k, b"v") for k in moving), deletes=(moving[0],)).ok
    assert indexed(target.store) == stored(target.store) == set(moving[1:])
    assert target.shard(ShardOp.IMPORT_ABORT).ok and source.shard(ShardOp.EXPORT_ABORT).ok
    assert indexed(target.store) == stored(target.store) == set()
    # Again, to the end: the source lets the range go.
    assert target.shard(ShardOp.IMPORT_BEGIN, 6, peer=0, ranges=HIGH).ok
    assert source.shard(ShardOp.EXPORT_BEGIN, 6, peer=1, ranges=HIGH).ok
    assert source.shard(ShardOp.EXPORT_FREEZE, 6).ok
    assert source.shard(ShardOp.EXPORT_FINISH, 6, epoch=2).ok
    assert indexed(source.store) == stored(source.store) == set(staying)


def test_a_range_reaching_the_end_of_the_space_is_deleted_whole(groups) -> None:  # type: ignore[no-untyped-def]
    from shardnode.storage import position_index

    group = groups("a", EVERYTHING)
    top = RangeSet([KeyRange(SPACE - SPACE // 64, SPACE)])
    last_position = keys_in(top, 3)
    for key in last_position + keys_in(LOW, 3):
        group.put(key, b"v")
    batch = new_batch()
    # A key exactly at the last position (no hash needed for the index itself).
    record = position_index.index_key(b"\xff\xff", SPACE - 1)
    batch.put(record, b"", group.store._engine.position.handle)
    group.store._engine.write(batch, sync=False)
    assert group.shard(ShardOp.EXPORT_BEGIN, peer=1, ranges=top).ok
    assert group.shard(ShardOp.EXPORT_FREEZE).ok
    assert group.shard(ShardOp.EXPORT_FINISH, epoch=2).ok
    assert record not in set(group.store._engine.position.view.keys())
    assert indexed(group.store) == stored(group.store) == set(keys_in(LOW, 3))


class _CountingCursor:
    """An engine cursor that counts the records it steps over."""

    visited = 0

    def __init__(self, column, upper_bound=None) -> None:  # type: ignore[no-untyped-def]
        self._inner = _original_cursor(column, upper_bound)
        for name in ("valid", "key", "value", "seek", "seek_to_first", "seek_to_last"):
            setattr(self, name, getattr(self._inner, name))

    def next(self) -> None:
        type(self).visited += 1
        self._inner.next()


_original_cursor = engine_module.Cursor


def test_deleting_a_range_reads_only_that_range(groups, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """EXPORT_FINISH deletes the moved keys inside apply, on every replica:
    it must step over those keys only, not the whole store."""
    group = groups("a", EVERYTHING)
    small = RangeSet([KeyRange(0, SPACE // 64)])
    moving = keys_in(small, 10)
    others = [k for k in keys_in(EVERYTHING, 600, prefix=b"o") if stable_hash(k) not in small]
    for key in moving + others:
        group.put(key, b"v")
    assert group.shard(ShardOp.EXPORT_BEGIN, peer=1, ranges=small).ok
    assert group.shard(ShardOp.EXPORT_FREEZE).ok
    monkeypatch.setattr(engine_module, "Cursor", _CountingCursor)
    _CountingCursor.visited = 0
    assert group.shard(ShardOp.EXPORT_FINISH, epoch=2).ok
    assert _CountingCursor.visited <= len(moving) + 5, _CountingCursor.visited
    assert stored(group.store) == set(others)


def test_a_store_without_the_index_gets_it_on_open(tmp_path: Path) -> None:
    from shardnode.storage.engine import META_POSITION_INDEX

    store = ReplicaStore.open(tmp_path / "db", initial_voters=(1,))
    store.configure_ownership(None)
    group = Group(store)
    keys = [b"old-%d" % i for i in range(5000)]
    for start in range(0, len(keys), 500):
        group.apply(*(encode_command(Command(CommandOp.PUT, k, b"v", 0, 0, 1_000)) for k in keys[start:start + 500]))
    # What a store of the previous release looks like: no index, no marker.
    engine = store._engine
    batch = new_batch()
    engine.delete_all(batch, engine.position)
    batch.delete(META_POSITION_INDEX, engine.meta.handle)
    engine.write(batch, sync=True)
    store.close()
    reopened = ReplicaStore.open(tmp_path / "db")
    try:
        assert indexed(reopened) == set(keys)
        assert reopened._engine.meta.view.get(META_POSITION_INDEX) is not None
    finally:
        reopened.close()


def test_a_snapshot_install_rebuilds_the_index(groups) -> None:  # type: ignore[no-untyped-def]
    source, receiver = groups("s", None), groups("r", None)
    for i in range(40):
        source.put(b"snap-%d" % i, b"v")
    receiver.put(b"only-at-the-receiver", b"x")
    snapshot = source.store.snapshot()
    with source.store.open_snapshot_reader(snapshot.metadata.index, snapshot.metadata.term) as reader:
        staging = receiver.store.begin_snapshot(snapshot.metadata)
        for chunk in reader.chunks(max_bytes=128):
            staging.write(chunk.data)
        staging.finish()
    receiver.store.persist(HardState(1, 0, snapshot.metadata.index), [], snapshot)
    assert indexed(receiver.store) == stored(receiver.store) == {b"snap-%d" % i for i in range(40)}


def test_a_copy_pages_by_position_and_never_holds_up_reads(groups) -> None:  # type: ignore[no-untyped-def]
    group = groups("a", EVERYTHING)
    moving, staying = keys_in(HIGH, 60), keys_in(LOW, 60)
    for key in moving + staying:
        group.put(key, b"value-of-" + key)
    store = group.store
    busy: list[bool] = []

    def read_from_another_thread() -> None:
        def read() -> None:
            try:
                store.get(staying[0])
                busy.append(False)
            except StoreBusy:
                busy.append(True)
        thread = threading.Thread(target=read)
        thread.start()
        thread.join()

    class Probed(RangeSet):
        """HIGH, reading the store from another thread whenever the scan looks at it."""

        def __iter__(self):  # type: ignore[no-untyped-def]
            read_from_another_thread()
            return super().__iter__()

        def __contains__(self, position: object) -> bool:
            read_from_another_thread()
            return super().__contains__(position)  # type: ignore[operator]

    probed = Probed(HIGH)
    pages, after = [], None
    while True:
        page, after = store.export_scan(probed, after, 300)
        pages.append(page)
        if after is None:
            break
    assert busy and not any(busy), "a read on the source was refused while the copy scanned"
    copied = [record for page in pages for record in page]
    assert len(pages) > 3
    assert sorted(k for k, _ in copied) == sorted(moving)
    assert all(record_value(v) == b"value-of-" + k for k, v in copied)
    positions = [stable_hash(k) for k, _ in copied]
    assert positions == sorted(positions)
    with pytest.raises(ValueError):
        store.export_scan(HIGH, b"short", 300)          # not a cursor this scan gave (the RPC refuses it)


def test_the_delta_never_holds_up_reads(groups, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from shardnode.storage import export_reads

    group = groups("a", EVERYTHING)
    moving, staying = keys_in(HIGH, 20), keys_in(LOW, 1)
    group.put(staying[0], b"here")
    assert group.shard(ShardOp.EXPORT_BEGIN, peer=1, ranges=HIGH).ok
    for key in moving:
        group.put(key, b"dirty")
    assert group.shard(ShardOp.EXPORT_FREEZE).ok
    store = group.store
    busy: list[bool] = []
    original = export_reads.snapshot_get

    def probed(snapshot, key):  # type: ignore[no-untyped-def]
        def read() -> None:
            try:
                busy.append(store.get(staying[0]) != b"here")
            except StoreBusy:
                busy.append(True)
        thread = threading.Thread(target=read)
        thread.start()
        thread.join()
        return original(snapshot, key)

    monkeypatch.setattr(export_reads, "snapshot_get", probed)
    page = store.export_delta(MOVE, None, 1 << 20)
    assert len(page.puts) == 20 and page.next_after is None
    assert busy and not any(busy), "a read on the source was refused while the delta was read"
