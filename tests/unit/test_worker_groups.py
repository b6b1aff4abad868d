"""WorkerGroups (the mover's way to the groups' leaders) sends the admin
credential only to the addresses of cluster.toml's hosts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shardnode.config import ClusterConfig
from shardnode.placement import worker_groups
from shardnode.placement.worker_groups import Status, WorkerGroups

ROOT = Path(__file__).resolve().parents[2]


def test_a_forged_not_leader_hint_does_not_get_the_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = ClusterConfig.load(ROOT / "etc" / "cluster.toml")
    monkeypatch.setattr(worker_groups, "load_admin_credential", lambda security: ("admin", "secret"))
    monkeypatch.setattr(worker_groups, "admin_metadata", lambda credential: (("authorization", "Bearer x"),))
    groups = WorkerGroups(cluster, timeout=0.5)
    called: list[str] = []

    class Stub:
        def __init__(self, address: str) -> None:
            self.address = address

    async def leader_address(group: int) -> str:
        return "127.0.0.1:50100"

    async def call(stub: Stub) -> Status:
        called.append(stub.address)
        return Status(status=Status.NOT_LEADER, leader_address="10.66.6.6:50100", message="not the leader")

    monkeypatch.setattr(groups, "leader_address", leader_address)
    monkeypatch.setattr(groups, "_stub", Stub)
    with pytest.raises(worker_groups.MoveError):
        asyncio.run(groups._call(0, call))
    assert called and set(called) == {"127.0.0.1:50100"}
