"""Real worker processes on loopback for integration tests.

Each simulated host gets its own address (127.0.0.1, 127.0.0.2, …; Linux
answers on all of 127.0.0.0/8) and free ports; every process is started in
its own session and killed by PID when the test ends, pass or fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc as sync_grpc

from shardnode.certs import init_cluster
from shardnode.config import METADATA_GROUP, ClusterConfig
from shardnode.supervisor import worker_program
from shardnode.security import aio_channel, sync_channel
from shardnode.proto import worker_pb2 as pb
from shardnode.proto import worker_pb2_grpc as pb_grpc

from .ports import write_cluster_toml

ROOT = Path(__file__).resolve().parents[2]
Op = pb.Operation


def signal_and_wait(process: subprocess.Popen, sig: int) -> int:
    """Signal a process's whole group (it was started in its own session) and
    reap it; escalate to SIGKILL if it does not exit within 15 s."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
    try:
        return process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait(timeout=5)


@dataclass
class WorkerGroup:
    """One Raft group of `size` worker processes (group 0 of a 1-group cluster),
    and the cluster's metadata group (its workers on the first hosts, started
    with the first worker): a group's first start bootstraps with the
    placement recorded there (shardnode/replica/identity.py)."""

    tmp: Path
    size: int = 3
    replicas: int | None = None      # default: every host holds a replica
    snapshot_threshold: int = 10_000
    tick_ms: int = 50
    name: str = "itest"
    # The module run as a worker: a test may run a deliberately broken variant.
    worker_module: str = "worker"
    # The source tree the workers run (a benchmark may compare another one).
    source_tree: Path = ROOT
    tls: bool = False
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    meta_processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.config_path = write_cluster_toml(self.tmp, name=self.name, hosts=self.size, tick_ms=self.tick_ms,
                                              replicas=self.replicas, snapshot_threshold=self.snapshot_threshold,
                                              tls=self.tls)
        self.config = ClusterConfig.load(self.config_path)
        init_cluster(self.config)
        for host in self.config.hosts:
            self.addresses[host.name] = host.worker_address(0)
        self.channels: dict[str, grpc.aio.Channel] = {}

    @property
    def hosts(self) -> list[str]:
        return list(self.addresses)

    # --- Processes ---------------------------------------------------------------

    def start(self, host: str) -> None:
        self.start_metadata_group()
        self.processes[host] = self._spawn(host, "0", self.tmp / f"{host}.log")

    def _spawn(self, host: str, group: str, log_path: Path) -> subprocess.Popen:
        log = open(log_path, "ab")
        env = dict(os.environ, PYTHONPATH=str(self.source_tree))
        try:
            return subprocess.Popen(
                [sys.executable, "-m", self.worker_module if group == "0" else "worker", "--config",
                 str(self.config_path), "--host", host, "--group", group],
                cwd=self.source_tree, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
            )
        finally:
            log.close()

    def meta_hosts(self) -> list[str]:
        return [r.host.name for r in self.config.meta_group_replicas()]

    def start_metadata_group(self) -> None:
        """Every metadata group worker that does not run (on the first hosts)."""
        for host in self.meta_hosts():
            if host not in self.meta_processes:
                self.meta_processes[host] = self._spawn(host, "meta", self.tmp / f"{host}-meta.log")

    def kill_meta(self, host: str, sig: int = signal.SIGKILL) -> int | None:
        process = self.meta_processes.pop(host, None)
        return None if process is None else signal_and_wait(process, sig)

    def start_all(self) -> None:
        for host in self.hosts:
            self.start(host)

    def kill(self, host: str, sig: int = signal.SIGKILL) -> int | None:
        process = self.processes.pop(host, None)
        if process is None:
            return None
        return signal_and_wait(process, sig)

    def stop_all(self) -> None:
        for host in list(self.processes):
            self.kill(host, signal.SIGKILL)
        for host in list(self.meta_processes):
            self.kill_meta(host)

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for host in self.hosts:
            path = self.tmp / f"{host}.log"
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {host} ---\n" + "\n".join(text))
        return "\n".join(out)

    # --- RPCs (async) ----------------------------------------------------------------

    def stub(self, host: str) -> pb_grpc.WorkerStub:
        channel = self.channels.get(host)
        if channel is None:
            # With TLS, as the router of the first host would connect (workers take hosts only).
            channel = aio_channel(self.addresses[host], self.config.security, self.config.hosts[0].name)
            self.channels[host] = channel
        return pb_grpc.WorkerStub(channel)

    async def close_channels(self) -> None:
        for channel in self.channels.values():
            await channel.close()
        self.channels.clear()

    async def status(self, host: str, timeout: float = 1.0) -> pb.StatusResponse | None:
        try:
            return await self.stub(host).Status(pb.StatusRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return None

    async def wait_leader(self, timeout: float = 15.0, exclude: set[str] = frozenset()) -> str:
        """A leader, once every running member (but `exclude`) answers too: a
        test that then talks to any of them finds it serving."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = [h for h in self.hosts if h not in exclude and h in self.processes]
            # Asked at once, a second each: under load a TLS handshake alone can take longer than half a second.
            statuses = dict(zip(running, await asyncio.gather(*(self.status(h, timeout=1.0) for h in running))))
            leaders = [h for h, s in statuses.items() if s is not None and s.role == "leader"]
            if leaders and all(s is not None for s in statuses.values()):
                return leaders[0]
            await asyncio.sleep(0.05)
        raise AssertionError(f"no leader (with every running member serving) within {timeout}s\n{self.log_tail()}")

    def host_of(self, address: str) -> str | None:
        for host, addr in self.addresses.items():
            if addr == address:
                return host
        return None

    async def execute(self, operations: list[pb.Operation], *, timeout: float = 5.0, host: str | None = None,
                      allow_stale: bool = False) -> pb.ExecuteResponse:
        """Send to `host` (default: find the leader), following NOT_LEADER hints,
        retrying UNAVAILABLE until the deadline."""
        deadline = time.monotonic() + timeout
        target = host or self.hosts[0]
        last: object = None
        while time.monotonic() < deadline:
            if target not in self.processes and host is None:
                target = next((h for h in self.hosts if h in self.processes), target)
            try:
                response = await self.stub(target).Execute(
                    pb.ExecuteRequest(cluster=self.name, group=0, operations=operations, allow_stale=allow_stale),
                    timeout=max(0.05, deadline - time.monotonic()),
                )
            except grpc.aio.AioRpcError as exc:
                last = exc
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
                await asyncio.sleep(0.05)
                if host is None:
                    target = self.hosts[(self.hosts.index(target) + 1) % len(self.hosts)]
                continue
            if response.status == pb.ExecuteResponse.OK or host is not None:
                return response
            last = response
            if response.status == pb.ExecuteResponse.NOT_LEADER and response.leader_address:
                target = self.host_of(response.leader_address) or target
            elif response.status in (pb.ExecuteResponse.NOT_LEADER, pb.ExecuteResponse.UNAVAILABLE):
                await asyncio.sleep(0.05)
                if response.status == pb.ExecuteResponse.NOT_LEADER:
                    target = self.hosts[(self.hosts.index(target) + 1) % len(self.hosts)]
            else:
                return response
        raise TimeoutError(f"no answer within {timeout}s: {last}")


def put(key: bytes, value: bytes, client_id: int = 0, sequence: int = 0) -> pb.Operation:
    return Op(kind=Op.PUT, key=key, value=value, client_id=client_id, sequence=sequence)


def get(key: bytes) -> pb.Operation:
    return Op(kind=Op.GET, key=key)


def delete(key: bytes, client_id: int = 0, sequence: int = 0) -> pb.Operation:
    return Op(kind=Op.DELETE, key=key, client_id=client_id, sequence=sequence)


@dataclass
class LocalCluster:
    """A whole cluster on loopback: `hosts` hosts (127.0.0.1…), `groups`
    groups of `replicas` replicas, a router per host, processes started
    directly (the same command lines supervisord runs)."""

    tmp: Path
    hosts: int = 3
    groups: int = 2
    replicas: int = 3
    tick_ms: int = 50
    snapshot_threshold: int = 10_000
    name: str = "itest"
    tls: bool = False
    extra_toml: str = ""            # more tables for cluster.toml, e.g. [limits]
    etcd: bool = False              # every router also serves etcd's API (docs/etcd.md)
    processes: dict[tuple[str, str], subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.config_path = write_cluster_toml(self.tmp, name=self.name, hosts=self.hosts, groups=self.groups,
                                              replicas=self.replicas, tick_ms=self.tick_ms,
                                              snapshot_threshold=self.snapshot_threshold, tls=self.tls,
                                              extra_toml=self.extra_toml, etcd=self.etcd)
        self.config = ClusterConfig.load(self.config_path)
        # Certificates (with TLS) and the admin credential, as `shardnode certs init` makes them.
        init_cluster(self.config)
        self.router_addresses = {h.name: h.router_address for h in self.config.hosts}

    def client_channel(self, host: str) -> "sync_grpc.Channel":
        """A blocking channel to a router, as a client opens it (TLS with the client certificate when on)."""
        return sync_channel(self.router_addresses[host], self.config.security, None)

    def host_names(self) -> list[str]:
        return [h.name for h in self.config.hosts]

    def _spawn(self, key: tuple[str, str], args: list[str]) -> None:
        log = open(self.tmp / f"{key[0]}-{key[1]}.log", "ab")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.processes[key] = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        log.close()

    def start_worker(self, host: str, group: int) -> None:
        self._spawn((host, worker_program(group)), ["-m", "worker", "--config", str(self.config_path),
                                                    "--host", host, "--group", str(group)])

    def meta_hosts(self) -> list[str]:
        """The hosts of the metadata group's replicas."""
        return [r.host.name for r in self.config.meta_group_replicas()]

    def start_host(self, host: str) -> None:
        """Its metadata group worker (on the first hosts), its data groups'
        workers, its router: what supervisord starts on a host."""
        if host in self.meta_hosts():
            self.start_worker(host, METADATA_GROUP)
        self.start_host_router(host)
        for group in self.config.groups_on_host(host):
            self.start_worker(host, group)

    def start_host_router(self, host: str) -> None:
        self._spawn((host, "router"), ["-m", "router", "--config", str(self.config_path), "--host", host])

    def start_all(self) -> None:
        for host in self.host_names():
            self.start_host(host)

    @contextlib.contextmanager
    def running(self, ready_timeout: float = 30.0) -> Iterator["LocalCluster"]:
        """Every process started and every group serving; all of them killed
        on the way out, pass or fail (a test fixture's body)."""
        self.start_all()
        try:
            self.wait_ready(timeout=ready_timeout)
            yield self
        finally:
            self.stop_all()

    def kill(self, key: tuple[str, str], sig: int = signal.SIGKILL) -> int | None:
        process = self.processes.pop(key, None)
        if process is None:
            return None
        return signal_and_wait(process, sig)

    def kill_host(self, host: str, sig: int = signal.SIGKILL) -> None:
        for key in [k for k in self.processes if k[0] == host]:
            self.kill(key, sig)

    def stop_all(self) -> None:
        for key in list(self.processes):
            self.kill(key, signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for path in sorted(self.tmp.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name} ---\n" + "\n".join(text))
        return "\n".join(out)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every group has a leader that answers through a router."""
        import grpc as sync_grpc

        from shardnode.proto import kv_pb2, kv_pb2_grpc

        deadline = time.monotonic() + timeout
        with self.client_channel(next(iter(self.router_addresses))) as channel:
            stub = kv_pb2_grpc.KVStub(channel)
            while time.monotonic() < deadline:
                try:
                    status = stub.Status(kv_pb2.StatusRequest(), timeout=2)
                    if all(g.has_quorum for g in status.groups):
                        return
                except sync_grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise AssertionError(f"cluster not ready within {timeout}s\n{self.log_tail()}")
