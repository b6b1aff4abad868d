"""A host's HostControl service, as supervisord's rpcinterface factory starts
it (shardnode/host_agent.py): what it refuses to start on, its answers when
it cannot reach supervisord, what it relays to supervisord's XML-RPC on the
Unix socket (here a stand-in that records the calls), and random requests.
The relay to a live supervisord is tested in
tests/integration/test_supervisor.py."""

from __future__ import annotations

import socket
import socketserver
import threading
import xmlrpc.client
import xmlrpc.server
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardnode import host_agent
from shardnode.config import ClusterConfig
from shardnode.host_supervisord import FORK_SUPPORT
from shardnode.proto import host_control_pb2, host_control_pb2_grpc
from tests.fuzzing import examples
from tests.integration.ports import write_cluster_toml
from tests.integration.test_fuzz_rpcs import messages


def _supervisord(tmp_path: Path, *, nodaemon: bool = True, unix: bool = True,
                 socket_file: str = "none.sock") -> SimpleNamespace:
    servers = [{"family": socket.AF_UNIX, "file": str(tmp_path / socket_file), "username": "admin",
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


class _UnixHandler(xmlrpc.server.SimpleXMLRPCRequestHandler):
    disable_nagle_algorithm = False     # a TCP option: a Unix socket has none


class _FakeSupervisord(socketserver.ThreadingMixIn, socketserver.UnixStreamServer,
                       xmlrpc.server.SimpleXMLRPCDispatcher):
    """supervisord's XML-RPC on a Unix socket, for two programs: records
    every call, answers with supervisord's faults (BAD_NAME 10,
    ALREADY_STARTED 60, NOT_RUNNING 70)."""

    daemon_threads = True

    def __init__(self, path: Path) -> None:
        xmlrpc.server.SimpleXMLRPCDispatcher.__init__(self, allow_none=True, encoding=None)
        socketserver.UnixStreamServer.__init__(self, str(path), _UnixHandler)
        self.logRequests = False        # the handler would log the peer address, which a Unix socket lacks
        self.calls: list[tuple] = []
        self.running = {"worker-g0": True, "router": False}
        for name in ("getAllProcessInfo", "getProcessInfo", "startProcess", "stopProcess", "signalProcess"):
            self.register_function(getattr(self, f"_{name}"), f"supervisor.{name}")

    def _known(self, name: str) -> None:
        if name not in self.running:
            raise xmlrpc.client.Fault(10, f"BAD_NAME: {name}")

    def _info(self, name: str) -> dict:
        running = self.running[name]
        return {"name": name, "statename": "RUNNING" if running else "STOPPED", "pid": 4242 if running else 0,
                "exitstatus": 0, "description": "", "stdout_logfile": f"/logs/{name}.log", "start": 1.5}

    def _getAllProcessInfo(self) -> list:
        self.calls.append(("getAllProcessInfo",))
        return [self._info(name) for name in self.running]

    def _getProcessInfo(self, name: str) -> dict:
        self.calls.append(("getProcessInfo", name))
        self._known(name)
        return self._info(name)

    def _startProcess(self, name: str, wait: bool) -> bool:
        self.calls.append(("startProcess", name, wait))
        self._known(name)
        if self.running[name]:
            raise xmlrpc.client.Fault(60, f"ALREADY_STARTED: {name}")
        self.running[name] = True
        return True

    def _stopProcess(self, name: str, wait: bool) -> bool:
        self.calls.append(("stopProcess", name, wait))
        self._known(name)
        if not self.running[name]:
            raise xmlrpc.client.Fault(70, f"NOT_RUNNING: {name}")
        self.running[name] = False
        return True

    def _signalProcess(self, name: str, signal: str) -> bool:
        self.calls.append(("signalProcess", name, signal))
        self._known(name)
        if not self.running[name]:
            raise xmlrpc.client.Fault(70, f"NOT_RUNNING: {name}")
        return True


@pytest.fixture
def relayed(tmp_path: Path,
            no_service: None) -> Iterator[tuple[_FakeSupervisord, host_control_pb2_grpc.HostControlStub]]:
    fake = _FakeSupervisord(tmp_path / "s.sock")
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    config = str(write_cluster_toml(tmp_path, hosts=1))
    h1 = ClusterConfig.load(Path(config)).host("h1")
    host_agent.make_rpcinterface(_supervisord(tmp_path, socket_file="s.sock"), config=config, host="h1", token="tk")
    try:
        with grpc.insecure_channel(f"{h1.address}:{h1.supervisor_port}") as channel:
            yield fake, host_control_pb2_grpc.HostControlStub(channel)
    finally:
        fake.shutdown()
        fake.server_close()


TOKEN = (("authorization", "Bearer tk"),)


def test_relays_each_call_to_supervisords_socket(relayed) -> None:
    fake, stub = relayed
    Control = host_control_pb2.ControlRequest
    reply = stub.Processes(host_control_pb2.ProcessesRequest(), metadata=TOKEN, timeout=5)
    assert [(p.name, p.state, p.pid, p.logfile, p.started_at) for p in reply.processes] == [
        ("worker-g0", "RUNNING", 4242, "/logs/worker-g0.log", 1.5), ("router", "STOPPED", 0, "/logs/router.log", 1.5)]
    assert not reply.HasField("fault")
    assert stub.Control(Control(action=Control.SIGNAL, name="worker-g0", signal="STOP"), metadata=TOKEN,
                        timeout=5).fault.code == 0
    assert stub.Control(Control(action=Control.STOP, name="worker-g0"), metadata=TOKEN, timeout=5).fault.code == 0
    # supervisord's faults come back as answers, with their codes.
    assert stub.Control(Control(action=Control.STOP, name="worker-g0"), metadata=TOKEN, timeout=5).fault.code == 70
    assert stub.Control(Control(action=Control.START, name="router"), metadata=TOKEN, timeout=5).fault.code == 0
    assert stub.Control(Control(action=Control.START, name="router"), metadata=TOKEN, timeout=5).fault.code == 60
    missing = stub.Processes(host_control_pb2.ProcessesRequest(names=["nope"]), metadata=TOKEN, timeout=5)
    assert (missing.fault.code, list(missing.processes)) == (10, [])
    assert fake.calls == [("getAllProcessInfo",), ("signalProcess", "worker-g0", "STOP"),
                          ("stopProcess", "worker-g0", False), ("stopProcess", "worker-g0", False),
                          ("startProcess", "router", False), ("startProcess", "router", False),
                          ("getProcessInfo", "nope")]
    with pytest.raises(grpc.RpcError) as refused:
        stub.Control(Control(action=7, name="router"), metadata=TOKEN, timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


_FUZZ = settings(max_examples=examples(25), deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("method", ["Processes", "Control"])
def test_random_requests_get_an_answer_and_the_service_keeps_serving(relayed, method: str) -> None:
    fake, stub = relayed
    request_type = host_control_pb2.DESCRIPTOR.services_by_name["HostControl"].methods_by_name[method].input_type

    @_FUZZ
    @given(request=messages(request_type), with_token=st.booleans())
    def call(request, with_token: bool) -> None:
        try:
            getattr(stub, method)(request, metadata=TOKEN if with_token else (), timeout=5)
        except grpc.RpcError as exc:
            allowed = {grpc.StatusCode.INVALID_ARGUMENT} if with_token else {grpc.StatusCode.UNAUTHENTICATED}
            assert exc.code() in allowed, (exc.code(), exc.details())

    call()
    assert stub.Processes(host_control_pb2.ProcessesRequest(), metadata=TOKEN, timeout=5).processes
