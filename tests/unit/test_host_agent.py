"""A host's HostControl service, as supervisord's rpcinterface factory starts
it (shardnode/host_agent.py): what it refuses to start on, and its answers
when it cannot reach supervisord. The relay to a live supervisord is
tested in tests/integration/test_supervisor.py."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from shardnode import host_agent
from shardnode.config import ClusterConfig
from shardnode.host_supervisord import FORK_SUPPORT
from shardnode.proto import host_control_pb2, host_control_pb2_grpc
from tests.integration.ports import write_cluster_toml


def _supervisord(tmp_path: Path, *, nodaemon: bool = True, unix: bool = True) -> SimpleNamespace:
    servers = [{"family": socket.AF_UNIX, "file": str(tmp_path / "none.sock"), "username": "admin",
                "password": "p"}] if unix else [{"family": socket.AF_INET, "host": "127.0.0.1", "port": 1}]
    return SimpleNamespace(options=SimpleNamespace(nodaemon=nodaemon, server_configs=servers))


@pytest.fixture
def no_service(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(host_agent, "_service", None)
    monkeypatch.setenv(FORK_SUPPORT, "false")      # as shardnode.host_supervisord sets it
    yield
    if host_agent._service is not None:
        host_agent._service.stop()


def test_refuses_a_supervisord_it_cannot_serve_from(tmp_path: Path, no_service: None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    config = str(write_cluster_toml(tmp_path, hosts=1))
    with monkeypatch.context() as plain:
        plain.delenv(FORK_SUPPORT)                   # plain supervisord: its children would be forked unsafely
        with pytest.raises(ValueError, match="shardnode.host_supervisord"):
            host_agent.make_rpcinterface(_supervisord(tmp_path), config=config, host="h1", token="t")
    with pytest.raises(ValueError, match="in the foreground"):
        host_agent.make_rpcinterface(_supervisord(tmp_path, nodaemon=False), config=config, host="h1", token="t")
    with pytest.raises(ValueError, match=r"\[unix_http_server\]"):
        host_agent.make_rpcinterface(_supervisord(tmp_path, unix=False), config=config, host="h1", token="t")
    h1 = ClusterConfig.load(Path(config)).host("h1")
    with socket.socket() as taken:
        taken.bind((h1.address, h1.supervisor_port))
        taken.listen()
        with pytest.raises(ValueError, match=f"cannot listen on {h1.address}:{h1.supervisor_port}"):
            host_agent.make_rpcinterface(_supervisord(tmp_path), config=config, host="h1", token="t")
    assert host_agent._service is None


def test_answers_only_to_its_token_and_says_when_supervisord_is_not_there(tmp_path: Path, no_service: None) -> None:
    config = str(write_cluster_toml(tmp_path, hosts=1))
    h1 = ClusterConfig.load(Path(config)).host("h1")
    interface = host_agent.make_rpcinterface(_supervisord(tmp_path), config=config, host="h1", token="h1-token")
    address = f"{h1.address}:{h1.supervisor_port}"
    assert interface.getHostControlAddress() == address
    # A reload of supervisord makes the interfaces again: the same service, not a second one.
    assert host_agent.make_rpcinterface(_supervisord(tmp_path), config=config, host="h1",
                                        token="h1-token").getHostControlAddress() == address
    request = host_control_pb2.ProcessesRequest()
    with grpc.insecure_channel(address) as channel:
        stub = host_control_pb2_grpc.HostControlStub(channel)
        for metadata in ((), (("authorization", "Bearer another-token"),)):
            with pytest.raises(grpc.RpcError) as refused:
                stub.Processes(request, metadata=metadata, timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # The right token, but no supervisord on the socket: UNAVAILABLE, saying so.
        with pytest.raises(grpc.RpcError) as unavailable:
            stub.Processes(request, metadata=(("authorization", "Bearer h1-token"),), timeout=5)
        assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "supervisord's socket did not answer" in unavailable.value.details()
