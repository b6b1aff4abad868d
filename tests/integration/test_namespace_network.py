"""NamespaceNetwork for real: what it creates is reachable as documented, and
everything it made goes away (after a failure half-way, with a process left
inside, after its creator was SIGKILLed), while networks of live processes
and parallel runs do not collide or get touched."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardnode.chaos import namespaces
from shardnode.chaos.commands import NetworkCommandError
from shardnode.chaos.namespaces import RECORDS_DIR, NamespaceNetwork, cleanup_leftovers, unique_name

from .namespaced import requires_namespaces

pytestmark = [requires_namespaces, pytest.mark.xdist_group("netns"), pytest.mark.timeout(120)]
ROOT = Path(__file__).resolve().parents[2]


def _namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


def _gone(network: NamespaceNetwork) -> bool:
    return (not any(n.startswith(network.name) for n in _namespaces())
            and not Path("/sys/class/net", network.root_interface).exists()
            and not (RECORDS_DIR / f"{network.name}.json").exists())


def _serve_once(network: NamespaceNetwork, host: str, port: int) -> subprocess.Popen:
    code = (f"import socket\ns = socket.socket(); s.bind(({network.address(host)!r}, {port})); s.listen()\n"
            "print('ready', flush=True)\nconnection, _ = s.accept(); connection.sendall(b'hello')")
    server = subprocess.Popen(network.exec_prefix(host) + [sys.executable, "-c", code], stdout=subprocess.PIPE,
                              text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    return server


def test_every_host_has_its_address_and_is_reachable_from_here_and_from_the_others() -> None:
    network = NamespaceNetwork(unique_name(), ["h1", "h2", "h3"])
    with network:
        assert set(network.namespaces()) <= _namespaces()
        assert network.subnet.prefixlen == 24 and network.root_address.endswith(".254")
        assert [network.address(h) for h in network.hosts] == [str(network.subnet.network_address + i)
                                                                for i in (1, 2, 3)]
        record = json.loads((RECORDS_DIR / f"{network.name}.json").read_text())
        assert record["creator_pid"] == os.getpid() and record["subnet"] == str(network.subnet)
        # From this (the root) namespace.
        server = _serve_once(network, "h2", 7000)
        with socket.create_connection((network.address("h2"), 7000), timeout=5) as connection:
            assert connection.recv(5) == b"hello"
        server.wait(timeout=10)
        # From another host's namespace, whose only link is its eth0 on the bridge.
        server = _serve_once(network, "h3", 7001)
        client = subprocess.run(network.exec_prefix("h1") + [sys.executable, "-c",
                                f"import socket; print(socket.create_connection(({network.address('h3')!r}, 7001), "
                                "timeout=5).recv(5))"], capture_output=True, text=True, timeout=20)
        assert client.stdout.strip() == "b'hello'", client.stderr
        server.wait(timeout=10)
        links = subprocess.run(network.exec_prefix("h1") + ["ip", "-br", "addr"], capture_output=True, text=True,
                               check=True).stdout
        assert f"{network.address('h1')}/24" in links and "lo " in links
    assert _gone(network)
    network.destroy()          # idempotent
    assert _gone(network)


def test_a_failure_half_way_removes_what_was_made(monkeypatch: pytest.MonkeyPatch) -> None:
    real_run = namespaces.run

    def failing(command, **kwargs):  # type: ignore[no-untyped-def]
        if "p2" in command and "add" in command:
            raise NetworkCommandError(command, 2, "Error: injected")
        return real_run(command, **kwargs)

    monkeypatch.setattr(namespaces, "run", failing)
    network = NamespaceNetwork(unique_name(), ["h1", "h2", "h3"])
    with pytest.raises(NetworkCommandError, match="injected"):
        network.create()
    assert _gone(network)


def test_a_process_left_inside_is_killed_when_the_network_goes() -> None:
    with NamespaceNetwork(unique_name(), ["h1"]) as network:
        straggler = subprocess.Popen(network.exec_prefix("h1") + ["sleep", "300"])
        time.sleep(0.2)
    assert straggler.wait(timeout=10) == -signal.SIGKILL
    assert _gone(network)


_CREATE_AND_WAIT = """
import sys, time
from shardnode.chaos.namespaces import NamespaceNetwork
network = NamespaceNetwork(sys.argv[1], ["h1", "h2"]).create()
print(network.subnet, flush=True)
time.sleep(300)
"""


def test_parallel_networks_get_their_own_subnets_and_a_dead_creators_network_is_cleaned_up() -> None:
    names = [unique_name(), unique_name()]
    creators = [subprocess.Popen([sys.executable, "-c", _CREATE_AND_WAIT, name], cwd=ROOT, stdout=subprocess.PIPE,
                                 text=True) for name in names]
    try:
        subnets = [creator.stdout.readline().strip() for creator in creators]   # type: ignore[union-attr]
        assert all(subnets) and subnets[0] != subnets[1], subnets
        # One creator dies without destroying anything; a process of it stays in a namespace.
        straggler = subprocess.Popen(["ip", "netns", "exec", f"{names[0]}-h1", "sleep", "300"])
        time.sleep(0.2)
        creators[0].kill()
        creators[0].wait()
        removed = cleanup_leftovers()
        assert names[0] in removed and names[1] not in removed
        assert straggler.wait(timeout=10) == -signal.SIGKILL
        left = _namespaces()
        assert not any(n.startswith(names[0]) for n in left)
        assert {f"{names[1]}-h1", f"{names[1]}-h2", f"{names[1]}_bridge"} <= left, "a live creator's network stays"
    finally:
        for creator in creators:
            if creator.poll() is None:
                creator.send_signal(signal.SIGKILL)
                creator.wait()
        cleanup_leftovers()
    assert not any(n.startswith(tuple(names)) for n in _namespaces())
