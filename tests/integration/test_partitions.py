"""Real network faults between hosts in network namespaces (issue 19; docs/testing.md
"Hosts in network namespaces").

One 5-host cluster (one group of 5 replicas, the metadata group on h1..h3) under
supervisord, each host in its own namespace, serves the recorded client load of
tests/integration/workload.py through its routers while, in turn:

- two halves: the leader of group 0 and one follower | the three others;
- the leader of group 0 isolated from every other host (clients still reach it);
- a majority "bridge": two sides of two hosts that do not see each other, and one
  host that sees both;
- a ring: each host sees only its two neighbours;
- one-way: the leader cannot send to the others; then the others cannot send to it;
- random loss on every host (nftables; on any kernel), and netem delay, jitter, loss
  and reordering on every host (where the kernel has netem).

Every fault leaves a majority of group 0 connected and every router reachable by the
clients (they are in the root namespace: partitions never cut them off), so a write
must succeed within AVAILABLE_WITHIN_SECONDS of the fault; the fault is held a few
seconds, everything is healed, and a write must succeed again within
RESUME_WITHIN_SECONDS. Both times are printed, with the writes acknowledged during
the fault. At the end of each, the history is linearizable and every acknowledged key
reads back.

Before routers abandoned calls to replicas their probe cannot reach
(routing/forwarder.py), a router whose cached leader was cut off waited for the
load's 8 s deadlines, and no write succeeded for 7 to 8 s into the halves, isolated
leader and one-way faults (tests/unit/test_forwarder_unreachable.py).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shardnode.chaos.network_faults import NetworkFaults, netem_unavailable
from shardnode.client import Client
from shardnode.errors import ShardnodeError

from .namespaced import NamespacedCluster, requires_namespaces, start_namespaced
from .ports import write_cluster_toml
from .workload import Load

pytestmark = [requires_namespaces, pytest.mark.xdist_group("netns"), pytest.mark.timeout(300)]

HOSTS = ["h1", "h2", "h3", "h4", "h5"]
FAULT_SECONDS = 4.0
# A write must succeed this soon into the fault (the fault is held until it does): about 1 s
# here (an election, and a router's probe finding the old leader unreachable); 7 to 8 s when
# routers waited out their calls to a cut-off leader ...
AVAILABLE_WITHIN_SECONDS = 5.0
# ... and this soon after the heal, or the cluster did not recover.
RESUME_WITHIN_SECONDS = 30.0

_results: list[str] = []


@pytest.fixture(scope="module")
def netns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NamespacedCluster]:
    tmp = tmp_path_factory.mktemp("partitions")
    config = write_cluster_toml(tmp, name="partitions-itest", hosts=len(HOSTS), groups=1, replicas=len(HOSTS))
    started = time.monotonic()
    with start_namespaced(tmp, config) as cluster:
        _results.append(f"cluster started in {time.monotonic() - started:.1f} s "
                        f"(subnet {cluster.network.subnet})")
        yield cluster
    print("\n[partitions] " + "\n[partitions] ".join(_results))


@dataclass(frozen=True)
class Roles:
    """Group 0's leader when the fault starts, and the other hosts in ring order after it."""

    leader: str
    others: tuple[str, ...]


def _leader(cluster: NamespacedCluster, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    with Client.from_config(cluster.config, timeout=3.0) as client:
        while time.monotonic() < deadline:
            try:
                status = client.status()
            except ShardnodeError:
                time.sleep(0.2)
                continue
            leaders = [r.host for g in status.groups if g.group == 0 for r in g.replicas if r.role == "leader"]
            if leaders:
                return leaders[0]
            time.sleep(0.2)
    raise AssertionError(f"group 0 has no leader\n{cluster.env.log_tail()}")


def _roles(cluster: NamespacedCluster) -> Roles:
    leader = _leader(cluster)
    start = HOSTS.index(leader)
    return Roles(leader, tuple(HOSTS[(start + i) % len(HOSTS)] for i in range(1, len(HOSTS))))


def _halves(faults: NetworkFaults, roles: Roles) -> None:
    faults.partition([roles.leader, roles.others[0]], roles.others[1:])


def _leader_isolated(faults: NetworkFaults, roles: Roles) -> None:
    faults.partition([roles.leader], roles.others)


def _bridge(faults: NetworkFaults, roles: Roles) -> None:
    # The leader and others[0] | others[2] and others[3]; others[1] sees both sides.
    faults.partition([roles.leader, roles.others[0]], [roles.others[2], roles.others[3]])


def _ring(faults: NetworkFaults, roles: Roles) -> None:
    ring = [roles.leader, *roles.others]
    neighbours = {frozenset((ring[i], ring[(i + 1) % len(ring)])) for i in range(len(ring))}
    faults.block((a, b) for a in ring for b in ring if a != b and frozenset((a, b)) not in neighbours)


def _leader_mute(faults: NetworkFaults, roles: Roles) -> None:
    faults.block((roles.leader, other) for other in roles.others)


def _leader_deaf(faults: NetworkFaults, roles: Roles) -> None:
    faults.block((other, roles.leader) for other in roles.others)


def _random_loss(faults: NetworkFaults, roles: Roles) -> None:
    for host in HOSTS:
        faults.drop_randomly(host, 5.0)


def _netem(faults: NetworkFaults, roles: Roles) -> None:
    for host in HOSTS:
        faults.shape(host, delay_ms=20, jitter_ms=10, loss_percent=2.0, reorder_percent=10.0)


def _first_write(config: Path, since: float, until: float, key: str) -> float | None:
    """Seconds from `since` until a write of `key` succeeds (short attempts,
    one after another), or None if none did before `until`."""
    with Client.from_config(config, timeout=1.0) as client:
        attempt = 0
        while time.monotonic() < until:
            attempt += 1
            try:
                client.put(key, str(attempt))
                return time.monotonic() - since
            except ShardnodeError:
                continue
    return None


def _run_fault(cluster: NamespacedCluster, kind: str, apply: Callable[[NetworkFaults, Roles], None],
               seconds: float = FAULT_SECONDS) -> None:
    roles = _roles(cluster)
    load = Load(cluster.config, prefix=f"{kind}-")
    load.start()
    try:
        time.sleep(1.0)
        before = len(load.acked)
        applied = time.monotonic()
        apply(cluster.faults, roles)
        available = _first_write(cluster.config, applied, applied + AVAILABLE_WITHIN_SECONDS, f"{kind}-probe")
        assert available is not None, f"no write succeeded within {AVAILABLE_WITHIN_SECONDS:g} s into the fault"
        time.sleep(max(0.0, applied + seconds - time.monotonic()))
        during = len(load.acked) - before
        held = time.monotonic() - applied
        cluster.faults.heal()
        healed = time.monotonic()
        resumed = _first_write(cluster.config, healed, healed + RESUME_WITHIN_SECONDS, f"{kind}-probe")
        assert resumed is not None, f"no write succeeded within {RESUME_WITHIN_SECONDS:g} s of the heal"
        time.sleep(1.0)
    except AssertionError as exc:
        raise AssertionError(f"{kind}: {exc}\n{cluster.env.log_tail()}") from None
    finally:
        load.finish()
        cluster.faults.heal()
    checked, lost = load.verify()
    assert checked > 0 and not lost, f"{kind}: {len(lost)} acknowledged keys lost, e.g. {lost[:5]}"
    line = (f"{kind:16} leader {roles.leader}: first write {available:.2f} s into the fault ({held:.1f} s), "
            f"{during} fresh keys acknowledged during it; writes resumed {resumed:.2f} s after the heal; "
            f"{checked} keys checked")
    _results.append(line)
    print(f"\n[partitions] {line}")


def test_faults_cut_what_they_say_and_heal_removes_them(netns: NamespacedCluster) -> None:
    """A partition cuts TCP between the sides and nowhere else, never the
    clients; a one-way cut stops one direction only (UDP shows it: TCP needs
    both); isolate_from_clients cuts the clients; heal removes our table."""
    faults, network = netns.faults, netns.network
    routers = {h.name: h.router_port for h in netns.cluster.hosts}

    def connects(sender: str | None, receiver: str) -> bool:
        """Whether a TCP connection from `sender` (None: this namespace) to the receiver's router opens."""
        target = (network.address(receiver), routers[receiver])
        if sender is None:
            try:
                socket.create_connection(target, timeout=1.0).close()
                return True
            except OSError:
                return False
        code = f"import socket; socket.create_connection({target!r}, timeout=1.0).close()"
        return subprocess.run(network.exec_prefix(sender) + [sys.executable, "-c", code],
                              capture_output=True, timeout=20).returncode == 0

    def datagram_arrives(sender: str, receiver: str) -> bool:
        target = (network.address(receiver), 40999)
        listen = (f"import socket, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                  f"s.bind({target!r}); s.settimeout(3.0); print('ready', flush=True)\n"
                  "try:\n    s.recv(16)\nexcept OSError:\n    sys.exit(1)")
        listener = subprocess.Popen(network.exec_prefix(receiver) + [sys.executable, "-c", listen],
                                    stdout=subprocess.PIPE, text=True)
        try:
            assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
            send = ("import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                    f"for _ in range(5):\n    s.sendto(b'x', {target!r}); time.sleep(0.05)")
            subprocess.run(network.exec_prefix(sender) + [sys.executable, "-c", send], check=True, timeout=20)
            return listener.wait(timeout=10) == 0
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.wait()

    try:
        faults.partition(["h1"], ["h2", "h3"])
        assert faults.blocked() == {("h1", "h2"), ("h2", "h1"), ("h1", "h3"), ("h3", "h1")}
        assert not connects("h1", "h2") and not connects("h3", "h1")
        assert connects("h2", "h3") and connects("h4", "h1") and connects("h1", "h4")
        assert all(connects(None, host) for host in HOSTS), "a partition never cuts the clients"
        faults.heal()
        assert faults.blocked() == frozenset()
        assert connects("h1", "h2") and connects("h3", "h1")

        faults.block([("h1", "h2")])
        assert not datagram_arrives("h1", "h2") and datagram_arrives("h2", "h1")
        faults.unblock([("h1", "h2")])
        assert datagram_arrives("h1", "h2")

        faults.isolate_from_clients("h5")
        assert not connects(None, "h5") and connects("h4", "h5")
    finally:
        faults.heal()
    for host in HOSTS:
        tables = subprocess.run(network.exec_prefix(host) + ["nft", "list", "tables"], capture_output=True,
                                text=True, check=True).stdout
        assert "shardnode_chaos" not in tables, (host, tables)
    assert connects(None, "h5")


@pytest.mark.parametrize("kind, apply", [
    ("halves", _halves),
    ("leader_isolated", _leader_isolated),
    ("bridge", _bridge),
    ("ring", _ring),
    ("leader_mute", _leader_mute),
    ("leader_deaf", _leader_deaf),
])
def test_partition_heals_and_loses_nothing(netns: NamespacedCluster, kind: str,
                                          apply: Callable[[NetworkFaults, Roles], None]) -> None:
    _run_fault(netns, kind, apply)


def test_random_loss_on_every_host(netns: NamespacedCluster) -> None:
    _run_fault(netns, "random_loss", _random_loss, seconds=6.0)


@pytest.mark.skipif(netem_unavailable() is not None, reason=netem_unavailable() or "")
def test_netem_delay_jitter_loss_and_reordering_on_every_host(netns: NamespacedCluster) -> None:
    _run_fault(netns, "netem", _netem, seconds=6.0)
