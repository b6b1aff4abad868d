"""The cluster's recorded initial placement (placement/initial_placement.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
import pytest

from shardnode.config import ClusterConfig
from shardnode.placement.initial_placement import INITIAL_PLACEMENT_KEY, InitialPlacement, load_or_record


def _cluster(hosts: int, replicas: int = 3, groups: int = 2) -> ClusterConfig:
    raw = {"cluster": {"name": "c", "replicas": replicas, "groups": groups},
           "host": [{"name": f"h{i}", "address": f"127.0.0.{i}", "router_port": 50051, "worker_port_base": 50100,
                     "metrics_port": 9090} for i in range(1, hosts + 1)]}
    return ClusterConfig.from_dict(raw)


class FakeDirectory:
    """The metadata group's compare-and-set, in memory."""

    def __init__(self) -> None:
        self.store: dict[bytes, bytes] = {}

    async def read(self, key: bytes) -> bytes | None:
        return self.store.get(key)

    async def compare_and_set(self, key: bytes, expected: bytes | None, new: bytes) -> tuple[bool, bytes | None]:
        if self.store.get(key) != expected:
            return False, self.store.get(key)
        self.store[key] = new
        return True, new


def test_the_placement_is_computed_once_and_every_later_reader_gets_the_recorded_one() -> None:
    directory = FakeDirectory()
    first = asyncio.run(load_or_record(directory, _cluster(3)))
    assert {g: [h for _, h in placed.members] for g, placed in first.groups.items()} == {
        0: ["h1", "h2", "h3"], 1: ["h1", "h2", "h3"]}
    assert first.cluster_id and first.meta_incarnation and first.groups[0].incarnation != first.groups[1].incarnation
    # cluster.toml gains a host: the recorded placement does not change.
    later = asyncio.run(load_or_record(directory, _cluster(4)))
    assert later == first
    assert InitialPlacement.compute(_cluster(4)).groups[1].members != first.groups[1].members, \
        "what the file alone would say now differs"
    assert directory.store[INITIAL_PLACEMENT_KEY] == first.encode()


def test_two_first_readers_racing_both_get_the_winners_record() -> None:
    directory = FakeDirectory()

    async def race() -> list[InitialPlacement]:
        return await asyncio.gather(*(load_or_record(directory, _cluster(3)) for _ in range(4)))

    records = asyncio.run(race())
    assert all(record == records[0] for record in records)


@pytest.mark.parametrize("garbage", [b"", b"\x01", msgpack.packb([2, 1, 1, {}]), msgpack.packb([1, 0, 1, {}]),
                                     msgpack.packb([1, 1, 1, {0: [1, [1]]}]), msgpack.packb([1, 1, 1, {0: [1, [1, 2]]}])])
def test_a_record_of_another_shape_is_refused(garbage: bytes) -> None:
    with pytest.raises(ValueError):
        InitialPlacement.decode(garbage)
