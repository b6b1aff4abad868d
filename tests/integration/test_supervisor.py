"""supervisord configuration generation and process control through it.

The live test runs a small cluster (3 hosts on 127.0.0.1..3, one group of 3
replicas) exactly as `make run` does: a top-level supervisord whose programs
are one supervisord per host, each on its own address. Every process it
starts is killed by PID in a finalizer, pass or fail.
"""

from __future__ import annotations

import argparse
import base64
import configparser
import json
import shlex
import signal
import socket
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from shardnode.cli import admin as cli_admin
from shardnode.cli.main import main as cli_main
from shardnode.config import METADATA_GROUP, ClusterConfig
from shardnode.proto import host_control_pb2, host_control_pb2_grpc
from shardnode.security import (AdminCredential, SecurityError, ensure_admin_credential, host_token,
                                load_admin_credential, sync_channel)
from .ports import write_cluster_toml
from .supervised import SupervisedCluster, start_supervised
from shardnode.supervisor import (
    ensure_workers,
    ProcessControl,
    SupervisorError,
    SupervisorUnavailable,
    UnknownServer,
    host_config,
    local_cluster_config,
    supervisor_socket,
)

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "etc" / "cluster.toml"

pytestmark = pytest.mark.timeout(240)


def _parse(text: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser()
    parser.read_string(text)
    return parser


def _write_small_cluster(tmp: Path, hosts: int = 3) -> Path:
    return write_cluster_toml(tmp, name="sup-itest", hosts=hosts)


# --- Generation --------------------------------------------------------------------


def test_default_cluster_host_configs() -> None:
    cluster = ClusterConfig.load(DEFAULT_CONFIG)
    python = Path(sys.executable).absolute()
    admin = AdminCredential("admin", "the-admin-password-of-this-test")
    supervisor_endpoints, tokens = set(), set()
    for host in cluster.hosts:
        text = host_config(cluster, host.name, python=python, config_path=DEFAULT_CONFIG, project_root=ROOT,
                           admin=admin)
        conf = _parse(text)
        programs = sorted(s.removeprefix("program:") for s in conf.sections() if s.startswith("program:"))
        # The metadata group, and every data group up to max_groups (16).
        assert programs == sorted(["router", "worker-meta", *(f"worker-g{g}" for g in range(16))])
        # supervisord's XML-RPC only on a Unix socket in the host's data directory; the host's
        # process control (HostControl, gRPC) on its address, to this host's token alone.
        assert "inet_http_server" not in conf
        socket_file = cluster.data_dir / f"{host.name}.supervisor.sock"
        assert conf["unix_http_server"]["file"] == str(socket_file)
        assert conf["unix_http_server"]["chmod"] == "0600"
        assert conf["supervisorctl"]["serverurl"] == f"unix://{socket_file}"
        assert conf["supervisord"]["nodaemon"] == "true"
        assert conf["rpcinterface:supervisor"]["supervisor.rpcinterface_factory"] == \
            "supervisor.rpcinterface:make_main_rpcinterface"
        agent = conf["rpcinterface:shardnode"]
        assert agent["supervisor.rpcinterface_factory"] == "shardnode.host_agent:make_rpcinterface"
        assert (agent["config"], agent["host"]) == (str(DEFAULT_CONFIG), host.name)
        assert agent["token"] == host_token(admin, host.name) == conf["supervisorctl"]["password"]
        assert admin.password not in text
        tokens.add(agent["token"])
        supervisor_endpoints.add((host.address, host.supervisor_port))

        router = shlex.split(conf["program:router"]["command"])
        assert router == [str(python), "-m", "router", "--config", str(DEFAULT_CONFIG), "--host", host.name]
        for group in range(4):
            section = conf[f"program:worker-g{group}"]
            assert shlex.split(section["command"]) == [
                str(python), "-m", "worker", "--config", str(DEFAULT_CONFIG), "--host", host.name,
                "--group", str(group),
            ]
            # Restarted after a fault or a crash, never after exit 0 (stopped, no replica here, retired).
            for key, value in {"autostart": "true", "autorestart": "unexpected", "exitcodes": "0", "startsecs": "1",
                               "stopsignal": "TERM", "stopwaitsecs": "10", "stopasgroup": "true",
                               "killasgroup": "true"}.items():
                assert section[key] == value, key
            assert int(section["startretries"]) >= 100
            assert section["directory"] == str(ROOT)
            assert f'PYTHONPATH="{ROOT}"' in section["environment"]
            log = Path(section["stdout_logfile"])
            assert log.is_absolute() and log.parent == cluster.data_dir / host.name / "logs"
        # Groups created online: their programs start when needed, not with supervisord.
        for group in range(4, 16):
            section = conf[f"program:worker-g{group}"]
            assert (section["autostart"], section["autorestart"], section["exitcodes"]) == ("false", "unexpected", "0")
        meta = conf["program:worker-meta"]
        assert shlex.split(meta["command"])[-2:] == ["--group", "meta"]
        assert (meta["autostart"], meta["autorestart"], meta["exitcodes"]) == ("true", "unexpected", "0")
        assert int(meta["priority"]) < int(conf["program:worker-g0"]["priority"])
        for key in ("logfile", "pidfile", "childlogdir"):
            path = Path(conf["supervisord"][key])
            assert path.is_absolute() and path.is_relative_to(cluster.data_dir / host.name), key
    assert len(supervisor_endpoints) == len(tokens) == len(cluster.hosts)


def test_local_cluster_config_files(tmp_path: Path) -> None:
    config_path = _write_small_cluster(tmp_path)
    cluster = ClusterConfig.load(config_path)
    out = tmp_path / "etc"
    (out / "hosts").mkdir(parents=True)
    (out / "hosts" / "gone.conf").write_text("; Generated by shardnode for a host no longer configured\n")
    (out / "hosts" / "mine.conf").write_text("; written by hand\n")
    top = local_cluster_config(cluster, python=sys.executable, config_path=config_path, project_root=ROOT,
                               out_dir=out, include_router=False)
    assert top == out / "supervisord.conf"
    assert sorted(p.name for p in (out / "hosts").glob("*.conf")) == ["h1.conf", "h2.conf", "h3.conf", "mine.conf"]
    conf = _parse(top.read_text())
    assert conf["group:hosts"]["programs"] == "h1,h2,h3"
    for host in cluster.hosts:
        section = conf[f"program:{host.name}"]
        command = shlex.split(section["command"])
        # supervisord whose shutdown stops every program at once (plain supervisord: one by one).
        assert command == [sys.executable, "-m", "shardnode.host_supervisord", "-n", "-s", "-c",
                           str(out / "hosts" / f"{host.name}.conf")]
        # Long enough for the host's supervisord to stop its programs cleanly.
        assert int(section["stopwaitsecs"]) > 10 * 2
        host_conf = _parse((out / "hosts" / f"{host.name}.conf").read_text())
        assert [s for s in host_conf.sections() if s.startswith("program:")] == [
            "program:worker-meta", "program:worker-g0", "program:worker-g1", "program:worker-g2"]
        assert (tmp_path / "data" / host.name / "logs").is_dir()


def test_resolve(tmp_path: Path) -> None:
    cluster = ClusterConfig.load(_write_small_cluster(tmp_path))
    control = ProcessControl(cluster)
    h2 = cluster.host("h2")
    target = control.resolve(h2.router_address)
    workers = ("worker-meta", "worker-g0", "worker-g1", "worker-g2")
    assert target.host == h2 and target.programs == ("router", *workers) and target.whole_host
    target = control.resolve(h2.worker_address(0))
    assert target.host == h2 and target.programs == ("worker-g0",) and not target.whole_host
    assert control.resolve(h2.worker_address(METADATA_GROUP)).programs == ("worker-meta",)
    assert control.resolve(h2.worker_address(2)).programs == ("worker-g2",)
    assert ProcessControl(cluster, include_router=False).resolve(h2.router_address).programs == workers
    for bad in (f"127.0.0.2:{h2.metrics_port}", f"127.0.0.9:{h2.router_port}", "h2", "127.0.0.2:", "x:y"):
        with pytest.raises(UnknownServer) as info:
            control.resolve(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError):  # UnknownServer is a ValueError too
        control.resolve("nowhere:1")


def test_unreachable_supervisord(tmp_path: Path) -> None:
    cluster = ClusterConfig.load(_write_small_cluster(tmp_path))
    control = ProcessControl(cluster, rpc_timeout=2.0)
    h1 = cluster.host("h1")
    with pytest.raises(SecurityError, match="no admin credential"):
        control.status("h1")
    ensure_admin_credential(cluster.security)
    with pytest.raises(SupervisorUnavailable, match=f"{h1.address}:{h1.supervisor_port}"):
        control.status("h1")
    with pytest.raises(SupervisorUnavailable, match="h1"):
        control.stop(h1.worker_address(0), clean=False)


# --- A live cluster under supervisord ----------------------------------------------------


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[SupervisedCluster]:
    # The router is left out: these tests are about supervision of the workers.
    with start_supervised(tmp_path, _write_small_cluster(tmp_path), include_router=False) as env:
        yield env


def _running(states: dict[str, str]) -> set[str]:
    return {name for name, state in states.items() if state == "RUNNING"}


def _wait_log(env: SupervisedCluster, host: str, event: str, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while _log_count(env, host, event) < count:
        assert time.monotonic() < deadline, f"{host}: {event} not logged {count} times\n{env.log_tail()}"
        time.sleep(0.1)


def _log_count(env: SupervisedCluster, host: str, event: str) -> int:
    return (env.tmp / "data" / host / "logs" / "worker-g0.log").read_text(errors="replace").count(event)


def test_stop_and_start_under_supervisord(supervised: SupervisedCluster) -> None:
    env = supervised
    control = env.control
    h2 = env.cluster.host("h2")
    worker = h2.worker_address(0)

    # Unclean: SIGKILL, and supervisord does not bring it back.
    before = control.processes("h2")["worker-g0"]
    assert before.state == "RUNNING" and before.pid
    _wait_log(env, "h2", "worker.serving", 1)
    serving = _log_count(env, "h2", "worker.serving")
    clean_stops = _log_count(env, "h2", "worker.stopping")
    target = control.stop(worker, clean=False)
    assert target.programs == ("worker-g0",)
    assert control.status("h2")["worker-g0"] == "STOPPED"
    assert not env.alive(before.pid)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        info = control.processes("h2")["worker-g0"]
        assert info.state == "STOPPED" and info.pid == 0, info
        time.sleep(0.1)
    # It died without running its clean shutdown (no SIGTERM handler ran).
    assert _log_count(env, "h2", "worker.stopping") == clean_stops
    # The other hosts were not touched.
    assert _running(control.status("h1")) == {"worker-meta", "worker-g0"}

    control.start(worker)
    after = control.processes("h2")["worker-g0"]
    assert after.state == "RUNNING" and after.pid not in (0, before.pid)
    control.start(worker)  # already running: fine
    env.record_pids()
    # RUNNING means up for a second; on a loaded machine the worker may still be
    # starting (a stop then is a silent exit 0). Its clean stop is logged once it serves.
    _wait_log(env, "h2", "worker.serving", serving + 1)

    # Clean: SIGTERM through supervisord, leadership handed over, exit 0.
    control.stop(worker, clean=True)
    info = control.processes("h2")["worker-g0"]
    assert info.state == "STOPPED" and info.exitstatus == 0, info
    assert _log_count(env, "h2", "worker.stopped") >= 1
    time.sleep(1.5)
    assert control.status("h2")["worker-g0"] == "STOPPED"
    control.stop(worker, clean=True)  # already stopped: fine
    control.start(worker)
    assert control.status("h2")["worker-g0"] == "RUNNING"

    # A router address means the whole host.
    h3 = env.cluster.host("h3")
    target = control.stop(h3.router_address, clean=False)
    assert target.whole_host and target.programs == ("worker-meta", "worker-g0", "worker-g1", "worker-g2")
    time.sleep(1.5)
    assert set(control.status("h3").values()) == {"STOPPED"}
    control.start(h3.router_address)
    assert _running(control.status("h3")) == {"worker-meta", "worker-g0"}

    # A group created online: its program starts on demand (never started before, so STOPPED till then).
    assert control.status("h1")["worker-g2"] == "STOPPED"
    assert ensure_workers(env.cluster, "h1", [2]) == ("worker-g2",)
    # No shard map places group 2 on h1: the worker finds no replica of it there and exits 0.
    deadline = time.monotonic() + 30
    while (info := control.processes("h1")["worker-g2"]).state == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert info.state == "EXITED" and info.exitstatus == 0, info
    assert "no_replica" in (env.tmp / "data" / "h1" / "logs" / "worker-g2.log").read_text()
    assert ensure_workers(env.cluster, "h1", [0]) == ()     # running already

    # Issue 20: supervisord's XML-RPC (HTTP, basic auth) is no longer on the network. What listens on the host's
    # address:supervisor_port is its HostControl service (gRPC), which gives XML-RPC no answer.
    admin = load_admin_credential(env.cluster.security)
    assert _xmlrpc_answer(h2.address, h2.supervisor_port, admin) is None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", h2.supervisor_port), timeout=2).close()
    # It answers only to h2's own token: no token, h1's (seen on the wire, say), the admin password are refused,
    # and change nothing.
    running = control.processes("h2")["worker-g0"]
    assert running.state == "RUNNING"
    stop = host_control_pb2.ControlRequest(action=host_control_pb2.ControlRequest.STOP, name="worker-g0")
    with grpc.insecure_channel(f"{h2.address}:{h2.supervisor_port}") as channel:
        stub = host_control_pb2_grpc.HostControlStub(channel)
        for token in (None, host_token(admin, "h1"), admin.password):
            metadata = () if token is None else (("authorization", f"Bearer {token}"),)
            for call, request in ((stub.Control, stop), (stub.Processes, host_control_pb2.ProcessesRequest())):
                with pytest.raises(grpc.RpcError) as refused:
                    call(request, metadata=metadata, timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, token
        reply = stub.Processes(host_control_pb2.ProcessesRequest(names=["worker-g0"]), timeout=5,
                               metadata=(("authorization", f"Bearer {host_token(admin, 'h2')}"),))
        assert reply.processes[0].pid == running.pid
    time.sleep(0.5)
    after = control.processes("h2")["worker-g0"]
    assert (after.state, after.pid, after.started_at) == ("RUNNING", running.pid, running.started_at)
    # The host's own supervisorctl still works, over the Unix socket (0600, like the file that holds h2's token).
    socket_file = supervisor_socket(env.cluster, "h2", ROOT)
    host_conf = env.tmp / "etc" / "hosts" / "h2.conf"
    for path in (host_conf, env.cluster.security.admin_file, socket_file):
        assert path.stat().st_mode & 0o777 == 0o600, path
    ctl = subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", str(host_conf), "status",
                          "worker-g0"], capture_output=True, text=True, timeout=30)
    assert "RUNNING" in ctl.stdout and f"pid {running.pid}" in ctl.stdout, ctl
    wrong = ProcessControl(env.cluster)
    wrong._admin = AdminCredential("admin", "a-wrong-password-of-enough-length")
    with pytest.raises(SupervisorError, match="refused the admin credential") as error:
        wrong.status("h2")
    assert "a-wrong-password" not in str(error.value) and "\n" not in str(error.value)

    # SIGTERM to the top supervisord stops every process of the cluster.
    env.record_pids()
    assert len(env.pids) >= 2 * len(env.cluster.hosts)  # a supervisord and a worker per host
    started = time.monotonic()
    env.top.send_signal(signal.SIGTERM)
    assert env.top.wait(timeout=60) == 0
    left = [pid for pid in env.pids if env.alive(pid)]
    assert not left, f"still running after the top supervisord stopped: {left}\n{env.log_tail()}"
    assert time.monotonic() - started < 30
    # Every worker got its clean stop.
    for host in env.cluster.hosts:
        assert _log_count(env, host.name, "worker.stopped") >= 1, host.name


def test_process_control_over_mutual_tls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With TLS on, a host's process control answers only a TLS peer with a certificate of the cluster's CA,
    and still only to the host's token; ProcessControl stops and starts through it. Its Control calls are in
    the host's audit log, the one it refused without the token too (`shardnode audit`)."""
    config_path = write_cluster_toml(tmp_path, name="sup-tls", hosts=1, replicas=1, tls=True)
    with start_supervised(tmp_path, config_path, include_router=False) as env:
        h1 = env.cluster.host("h1")
        address = f"{h1.address}:{h1.supervisor_port}"
        worker = h1.worker_address(0)
        before = env.control.processes("h1")["worker-g0"]
        env.control.stop(worker, clean=False)
        assert env.control.status("h1")["worker-g0"] == "STOPPED" and not env.alive(before.pid)
        env.control.start(worker)
        assert env.control.status("h1")["worker-g0"] == "RUNNING"
        env.record_pids()
        request = host_control_pb2.ProcessesRequest()
        token = (("authorization", f"Bearer {host_token(load_admin_credential(env.cluster.security), 'h1')}"),)
        # A plain connection gets no answer from a TLS server.
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                host_control_pb2_grpc.HostControlStub(channel).Processes(request, metadata=token, timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # The clients' certificate (an admin machine's) passes TLS, and still needs the token.
        with sync_channel(address, env.cluster.security, None) as channel:
            stub = host_control_pb2_grpc.HostControlStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Processes(request, timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert {p.name for p in stub.Processes(request, metadata=token, timeout=5).processes} >= {"worker-g0"}
            stop = host_control_pb2.ControlRequest(action=host_control_pb2.ControlRequest.STOP, name="worker-g0")
            with pytest.raises(grpc.RpcError) as refused:
                stub.Control(stop, timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert cli_main(["--config", str(config_path), "audit", "--json"]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        controls = [(line["summary"], line["outcome"]) for line in lines
                    if line["method"] == "Control" and "name=worker-g0" in line["summary"]]
        assert controls[-2:] == [("action=START name=worker-g0", "OK"), ("action=STOP name=worker-g0",
                                                                         "UNAUTHENTICATED")], lines
        assert any(line["summary"].startswith(("action=SIGNAL", "action=STOP")) and line["outcome"] == "OK"
                   for line in lines), lines
        # This machine holds h1's certificate: its tools present it (the clients' one for the refused call).
        assert {line["identity"] for line in lines} == {"h1", "client"}
        assert {line["component"] for line in lines} == {"host_control"}
        assert all(line["peer"].startswith("ipv4:127.") for line in lines), lines
        assert "Processes" not in {line["method"] for line in lines}


def _xmlrpc_answer(address: str, port: int, admin: AdminCredential) -> bytes | None:
    """What an XML-RPC call (HTTP/1.1 POST /RPC2, with the admin password as supervisord's basic
    authentication) to address:port gets back as an HTTP answer, None if no HTTP answer."""
    body = xmlrpc.client.dumps((), "supervisor.getAllProcessInfo").encode()
    auth = base64.b64encode(f"{admin.username}:{admin.password}".encode())
    request = (b"POST /RPC2 HTTP/1.1\r\nHost: %s\r\nAuthorization: Basic %s\r\nContent-Type: text/xml\r\n"
               b"Content-Length: %d\r\n\r\n" % (address.encode(), auth, len(body)) + body)
    answer = b""
    with socket.create_connection((address, port), timeout=3) as conn:
        conn.sendall(request)
        try:
            while chunk := conn.recv(65536):
                answer += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    return answer if answer.startswith(b"HTTP/") else None


# --- The command line -----------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="shardnode")
    parser.add_argument("--config", default="etc/cluster.toml")
    subparsers = parser.add_subparsers(dest="command", required=True)
    cli_admin.register(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(_write_small_cluster(tmp_path))
    cases = [
        ["--config", config, "die", "127.0.0.9:1"],
        ["--config", config, "die", "not-an-address", "--clean"],
        ["--config", config, "start", "127.0.0.9:1"],
        ["--config", config, "start", ClusterConfig.load(config).host("h1").worker_address(0), "--new"],
        # Nothing listens on h1's supervisor port in this test.
        ["--config", config, "die", ClusterConfig.load(config).host("h1").worker_address(0)],
        ["--config", str(tmp_path / "missing.toml"), "die", "127.0.0.1:1"],
        ["--config", config, "supervisor-conf", "--host", "nobody"],
    ]
    for argv in cases:
        assert _cli(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("shardnode: "), (argv, captured.err)
        assert "Traceback" not in captured.err


def test_cli_supervisor_conf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["--config", str(DEFAULT_CONFIG), "supervisor-conf", "--host", "host1"]) == 0
    conf = _parse(capsys.readouterr().out)
    assert conf["rpcinterface:shardnode"]["host"] == "host1"
    assert "program:router" in conf and "program:worker-g3" in conf
    output = tmp_path / "host2.conf"
    assert _cli(["--config", str(DEFAULT_CONFIG), "supervisor-conf", "--host", "host2", "--output", str(output)]) == 0
    assert _parse(output.read_text())["rpcinterface:shardnode"]["host"] == "host2"
