"""A cluster run exactly as `make run` runs it: a top-level supervisord whose
programs are one supervisord per host (each on its own address). Every
process it starts is killed by PID when the test ends, pass or fail."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shardnode.config import METADATA_GROUP, ClusterConfig
from shardnode.supervisor import ProcessControl, SupervisorUnavailable, local_cluster_config, worker_program

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class SupervisedCluster:
    tmp: Path
    cluster: ClusterConfig
    top: subprocess.Popen
    control: ProcessControl
    pids: set[int] = field(default_factory=set)

    def record_pids(self) -> dict[str, dict[str, int]]:
        """Remember every process of the cluster (for the finalizer and the
        shutdown check); return host → program → pid."""
        seen = {}
        for host in self.cluster.hosts:
            pidfile = self.tmp / "data" / host.name / "supervisord.pid"
            if pidfile.exists() and pidfile.read_text().strip().isdigit():
                self.pids.add(int(pidfile.read_text()))
            try:
                processes = self.control.processes(host.name)
            except SupervisorUnavailable:
                continue
            seen[host.name] = {name: info.pid for name, info in processes.items()}
            self.pids.update(pid for pid in seen[host.name].values() if pid)
        return seen

    def alive(self, pid: int) -> bool:
        """Whether `pid` is still one of this test's processes (not a zombie,
        not a reused PID)."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return str(self.tmp).encode() in cmdline

    def wait_states(self, host: str, expected: dict[str, str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] | str = {}
        while time.monotonic() < deadline:
            try:
                states = self.control.status(host)
            except SupervisorUnavailable as exc:
                states = str(exc)
            if isinstance(states, dict) and all(states.get(k) == v for k, v in expected.items()):
                return
            time.sleep(0.1)
        raise AssertionError(f"{host}: {states} never became {expected}\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for path in sorted((self.tmp / "data").rglob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.relative_to(self.tmp)} ---\n" + "\n".join(text))
        return "\n".join(out)

    def shutdown(self) -> None:
        """The finalizer: stop the top supervisord, then SIGKILL anything left."""
        if self.top.poll() is None:
            _signal_group(self.top.pid, signal.SIGTERM)
            try:
                self.top.wait(timeout=60)
            except subprocess.TimeoutExpired:
                _signal_group(self.top.pid, signal.SIGKILL)
                self.top.wait(timeout=10)
        for pid in self.pids:
            if self.alive(pid):
                _signal_group(pid, signal.SIGKILL)


def _wait_listening(addresses: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for address in addresses:
        host, port = address.rsplit(":", 1)
        while True:
            try:
                socket.create_connection((host, int(port)), timeout=1.0).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"nothing listens on {address} {timeout:g} s after its start") from None
                time.sleep(0.1)


def _signal_group(pid: int, sig: int) -> None:
    # supervisord puts each program in its own process group (pgid == pid).
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, sig)
            return
        except (ProcessLookupError, PermissionError):
            continue


@contextlib.contextmanager
def start_supervised(tmp: Path, config_path: Path, include_router: bool = True,
                     running_timeout: float = 30.0) -> Iterator[SupervisedCluster]:
    """Start the cluster of `config_path` under supervisord and wait until
    every router and worker of every host is RUNNING (`running_timeout`
    seconds per host: a benchmark of many groups on a loaded machine needs more)."""
    cluster = ClusterConfig.load(config_path)
    top_conf = local_cluster_config(cluster, python=sys.executable, config_path=config_path, project_root=ROOT,
                                    out_dir=tmp / "etc", include_router=include_router)
    command = [sys.executable, "-m", "supervisor.supervisord", "-c", str(top_conf)]
    log = open(tmp / "top.out", "wb")
    top = subprocess.Popen(command, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    env = SupervisedCluster(tmp, cluster, top, ProcessControl(cluster, include_router=include_router, rpc_timeout=5.0))
    try:
        for host in cluster.hosts:
            expected = {worker_program(g): "RUNNING" for g in cluster.groups_on_host(host.name)}
            if any(r.host.name == host.name for r in cluster.meta_group_replicas()):
                expected[worker_program(METADATA_GROUP)] = "RUNNING"
            if include_router:
                expected["router"] = "RUNNING"
            env.wait_states(host.name, expected, timeout=running_timeout)
        if include_router:
            # RUNNING is supervisord's word that the process started, not that it listens: a
            # router on a loaded machine binds its port seconds later, and a client that finds
            # every router refusing fails at once (RoutersUnreachable).
            _wait_listening([h.router_address for h in cluster.hosts], running_timeout)
        env.record_pids()
        yield env
    finally:
        env.record_pids()
        env.shutdown()
