"""A received snapshot is staged only when Raft asked for it, and is bounded
in bytes and seconds (limits.max_snapshot_bytes, max_snapshot_seconds;
ReplicaDriver._on_snapshot_stream): a stream could otherwise fill the disk,
and the write error fail-stop every replica on it (issue 20)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from shardnode.config import ClusterConfig
from shardnode.limits import LimitExceeded, refusals
from shardnode.raft import Message, MessageType, Snapshot, SnapshotMetadata
from shardnode.replica.driver import ReplicaDriver
from shardnode.transport import SnapshotHeader


class _Staging:
    def __init__(self) -> None:
        self.written = 0
        self.finished = False

    def write(self, chunk: bytes) -> None:
        self.written += len(chunk)

    def finish(self) -> None:
        self.finished = True


class _Store:
    def __init__(self) -> None:
        self.staging: _Staging | None = None
        self.handed_over = False

    def begin_snapshot(self, metadata: SnapshotMetadata) -> _Staging:
        self.staging = _Staging()
        return self.staging

    def hand_over_staging(self, metadata: SnapshotMetadata) -> None:
        self.handed_over = True

    def release_staging(self, metadata: SnapshotMetadata) -> None:
        pass


def _driver(limits: dict, *, term: int = 5, lead: int = 2, committed: int = 10) -> SimpleNamespace:
    cluster = ClusterConfig.from_dict({
        "cluster": {"name": "snap", "replicas": 1, "groups": 1},
        "host": [{"name": "h1", "address": "127.0.0.1", "router_port": 50051, "worker_port_base": 50100,
                  "metrics_port": 9090}],
        "limits": limits,
    })
    raft = SimpleNamespace(term=term, lead=lead, log=SimpleNamespace(committed=committed,
                                                                    unstable=SimpleNamespace(snapshot=None)))
    return SimpleNamespace(
        cluster=cluster, node=SimpleNamespace(raft=raft), store=_Store(), _check_serving=lambda: None,
        stats=SimpleNamespace(snapshot_receive_seconds=0.0), _log_extra={}, delivered=[],
        _on_messages=lambda messages: None, _fault=lambda exc, what: None)


def _header(*, sender: int = 2, term: int = 5, index: int = 20) -> SnapshotHeader:
    snapshot = Snapshot(SnapshotMetadata(index=index, term=term))
    return SnapshotHeader("snap", 0, sender, 1, Message(type=MessageType.SNAP, to=1, from_=sender, term=term,
                                                        snapshot=snapshot))


async def _chunks(count: int, size: int, pause: float = 0.0):  # type: ignore[no-untyped-def]
    for _ in range(count):
        if pause:
            await asyncio.sleep(pause)
        yield b"x" * size


def _receive(driver: SimpleNamespace, header: SnapshotHeader, chunks) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(ReplicaDriver._on_snapshot_stream(driver, header, chunks))  # type: ignore[arg-type]


def test_a_snapshot_from_the_leader_it_follows_is_staged() -> None:
    driver = _driver({})
    _receive(driver, _header(), _chunks(4, 1000))
    assert driver.store.staging.written == 4000 and driver.store.handed_over


@pytest.mark.parametrize("header, why", [
    (_header(sender=3), "node 3 in term 5 is not the leader this replica follows"),
    (_header(term=6), "node 2 in term 6 is not the leader"),
    (_header(index=10), "index 10 is not past the commit index 10"),
])
def test_an_unasked_snapshot_is_refused_before_anything_is_staged(header: SnapshotHeader, why: str) -> None:
    driver = _driver({})
    with pytest.raises(ValueError, match=why):
        _receive(driver, header, _chunks(1, 10))
    assert driver.store.staging is None


def test_a_snapshot_past_max_snapshot_bytes_is_refused_before_the_chunk_is_written() -> None:
    driver = _driver({"max_snapshot_bytes": 1 << 20})
    before = refusals().get("max_snapshot_bytes", 0)
    with pytest.raises(LimitExceeded, match=r"limits.max_snapshot_bytes \(1048576\) exceeded"):
        _receive(driver, _header(), _chunks(100, 64 << 10))
    assert driver.store.staging.written == 1 << 20          # 16 chunks, the 17th refused
    assert not driver.store.handed_over
    assert refusals()["max_snapshot_bytes"] == before + 1


def test_a_snapshot_past_max_snapshot_seconds_is_refused() -> None:
    driver = _driver({"max_snapshot_seconds": 1})
    with pytest.raises(LimitExceeded, match=r"limits.max_snapshot_seconds \(1\) exceeded"):
        _receive(driver, _header(), _chunks(100, 10, pause=0.1))
    assert not driver.store.handed_over
