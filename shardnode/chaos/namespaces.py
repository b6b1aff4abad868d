"""The namespace mode: each host of a cluster in its own network namespace,
with its own address, on a bridge of its own (docs/testing.md, "Hosts in
network namespaces").

    with NamespaceNetwork(unique_name(), ["h1", "h2", "h3"]) as network:
        network.address("h1")        # "10.X.Y.1", reachable from this process
        network.exec_prefix("h1")    # ["ip", "netns", "exec", "snXXXXX-h1"]

What `create()` makes, all of it named after the network's name N:

- a namespace `N_bridge` holding a Linux bridge `br0`;
- per host (the i-th, from 0), a namespace `N-HOST` whose `eth0` has the
  address 10.X.Y.(i+1)/24 (and `lo` up); the other end of that veth pair,
  `p(i+1)`, is a port of the bridge;
- a veth `N-rt` from the namespace of the creating process into the bridge
  (its other end is the bridge's port `root`), with the address 10.X.Y.254/24,
  so that the test, the clients and the CLI reach every host.

Hosts talk to each other and to the root namespace over the bridge only;
faults (shardnode.chaos.network_faults) are rules inside the host
namespaces, so the root namespace's own network is never touched.

10.X.Y.0/24 is a subnet that no route or address of the root namespace
overlaps and that no other network of ours (see the records below) holds;
the choice is made under a lock, so parallel test runs never collide.

Before creating anything, a network writes its record to
/run/shardnode/netns/N.json: its creator's pid (and start time, so that a
reused pid is not mistaken for it), its subnet and everything it is going to
create. `destroy()` removes what it made and then the record;
`cleanup_leftovers()` removes the networks whose creator died without
destroying them (a test run killed by SIGKILL).
"""

from __future__ import annotations

import fcntl
import functools
import ipaddress
import json
import logging
import os
import random
import re
import shutil
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

from ..config import is_namespace_name
from .commands import NetworkCommandError, run

__all__ = [
    "DEFAULT_PREFIX",
    "HOST_INTERFACE",
    "NamespaceNetwork",
    "cleanup_leftovers",
    "namespaces_unavailable",
    "unique_name",
]

logger = logging.getLogger("shardnode.chaos")

#: Names made by `unique_name` start with this; `cleanup_leftovers` looks for it.
DEFAULT_PREFIX = "sn"
#: The host's end of its link, inside its namespace (what `tc` shapes).
HOST_INTERFACE = "eth0"
#: Where records of networks live (tmpfs: a reboot removes namespaces and records alike).
RECORDS_DIR = Path("/run/shardnode/netns")

# A network's name ends up in the root namespace's interface `NAME-rt`, and
# Linux interface names are at most 15 characters.
_NETWORK_NAME = re.compile(r"^[a-z][a-z0-9]{1,11}$")
_BRIDGE = "br0"
_ROOT_PORT = "root"
_ROOT_HOST_OCTET = 254
# Subnets are picked among the /24s of 10.128.0.0/9 (32768 of them).
_POOL = ipaddress.ip_network("10.128.0.0/9")
_POOL_SIZE = 1 << (24 - _POOL.prefixlen)
_PID_WIDTH = 5     # base 36: 36**5 > 4194304, Linux's largest pid_max

_names_made = 0


def unique_name(prefix: str = DEFAULT_PREFIX) -> str:
    """A network name no other process can make at the same time: the
    prefix, this process's pid (5 base-36 digits) and a counter."""
    global _names_made
    _names_made += 1
    name = f"{prefix}{_base36(os.getpid()).rjust(_PID_WIDTH, '0')}{_base36(_names_made)}"
    if not _NETWORK_NAME.fullmatch(name):
        raise ValueError(f"network name {name!r} from prefix {prefix!r} is not 2..12 lowercase letters and digits")
    return name


@functools.cache
def namespaces_unavailable() -> str | None:
    """One line saying why hosts cannot be put in network namespaces here
    (and cut apart with nft, slowed with tc), or None if they can. Found out
    once per process by building and removing a one-host network."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add, veth, nft and tc inside them)"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"network namespaces need `{tool}` (Debian package {package}; see scripts/install-test-deps.sh)"
    try:
        with NamespaceNetwork(unique_name(), ["probe"]) as probe:
            # A table of our own added and removed at once: nftables works in a host namespace.
            run(probe.exec_prefix("probe") + ["nft", "-f", "-"],
                input="table inet shardnode_probe\ndelete table inet shardnode_probe\n")
    except (NetworkCommandError, OSError) as exc:
        return f"network namespaces cannot be used here: {exc}"
    return None


# --- Records: who made which network ---------------------------------------------


@dataclass(slots=True, frozen=True)
class NetworkRecord:
    """What a network is made of and who made it (RECORDS_DIR/NAME.json)."""

    name: str
    creator_pid: int
    creator_start: int          # /proc/PID/stat's start time: a reused pid is another process
    subnet: str
    bridge_namespace: str
    host_namespaces: tuple[str, ...]
    root_interface: str

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (*self.host_namespaces, self.bridge_namespace)

    def creator_alive(self) -> bool:
        return _start_time(self.creator_pid) == self.creator_start

    def write(self) -> None:
        RECORDS_DIR.mkdir(parents=True, exist_ok=True)
        path = RECORDS_DIR / f"{self.name}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> "NetworkRecord | None":
        try:
            raw = json.loads(path.read_text())
            return cls(name=raw["name"], creator_pid=int(raw["creator_pid"]),
                       creator_start=int(raw["creator_start"]), subnet=raw["subnet"],
                       bridge_namespace=raw["bridge_namespace"], host_namespaces=tuple(raw["host_namespaces"]),
                       root_interface=raw["root_interface"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


def _all_records() -> list[NetworkRecord]:
    if not RECORDS_DIR.is_dir():
        return []
    return [r for p in sorted(RECORDS_DIR.glob("*.json")) if (r := NetworkRecord.read(p)) is not None]


@contextmanager
def _records_locked() -> Iterator[None]:
    """Hold the lock under which subnets are chosen and records written or removed."""
    RECORDS_DIR.mkdir(parents=True, exist_ok=True)
    with open(RECORDS_DIR / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --- The network ---------------------------------------------------------------------


class NamespaceNetwork:
    """Hosts in network namespaces of their own, on one bridge, reachable
    from the creating process's namespace (module docstring). A context
    manager: `create()` on entry, `destroy()` on exit, whatever happened.

    `destroy()` is idempotent and safe after a partial or failed `create()`:
    it removes exactly what this object made (SIGKILLing, by pid, any
    process still inside one of its namespaces: they were started for this
    network), never anything else. Stop the cluster's processes first; this
    is the last resort."""

    def __init__(self, name: str, hosts: Sequence[str], subnet: str | None = None) -> None:
        if not _NETWORK_NAME.fullmatch(name):
            raise ValueError(f"network name {name!r}: 2..12 lowercase letters and digits, starting with a letter "
                             "(it names the interface NAME-rt, and interface names are at most 15 characters)")
        hosts = tuple(hosts)
        if not hosts or len(hosts) >= _ROOT_HOST_OCTET:
            raise ValueError(f"a network holds 1..{_ROOT_HOST_OCTET - 1} hosts (got {len(hosts)})")
        if len(set(hosts)) != len(hosts):
            raise ValueError(f"host names must be unique: {hosts}")
        for host in hosts:
            if not is_namespace_name(f"{name}-{host}"):
                raise ValueError(f"host name {host!r} cannot be part of a namespace name "
                                 "(letters, digits, '_', '.', '-')")
        # A subnet asked for (a cluster whose data records its hosts' addresses starts again on
        # the same ones); None: any free one.
        self._wanted: ipaddress.IPv4Network | None = None
        if subnet is not None:
            wanted = ipaddress.ip_network(subnet)
            if not isinstance(wanted, ipaddress.IPv4Network) or wanted.prefixlen != 24:
                raise ValueError(f"subnet {subnet}: an IPv4 /24 is needed (hosts .1 up, this namespace .254)")
            self._wanted = wanted
        self.name = name
        self.hosts = hosts
        self.bridge_namespace = f"{name}_bridge"
        self.root_interface = f"{name}-rt"
        self._subnet: ipaddress.IPv4Network | None = None
        self._created_namespaces: list[str] = []
        self._root_interface_created = False
        self._recorded = False

    # --- What it is ---------------------------------------------------------------

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        if self._subnet is None:
            raise RuntimeError(f"network {self.name} is not created")
        return self._subnet

    @property
    def root_address(self) -> str:
        """The address of the root namespace's end (where clients come from)."""
        return str(self.subnet.network_address + _ROOT_HOST_OCTET)

    def address(self, host: str) -> str:
        """The host's address: 10.X.Y.(i+1) for the i-th host."""
        return str(self.subnet.network_address + self._index(host) + 1)

    def namespace(self, host: str) -> str:
        self._index(host)
        return f"{self.name}-{host}"

    def exec_prefix(self, host: str) -> list[str]:
        """The command prefix that runs a program inside the host's namespace."""
        return ["ip", "netns", "exec", self.namespace(host)]

    def namespaces(self) -> tuple[str, ...]:
        """Every namespace of this network: the hosts', then the bridge's."""
        return (*(self.namespace(h) for h in self.hosts), self.bridge_namespace)

    def _index(self, host: str) -> int:
        try:
            return self.hosts.index(host)
        except ValueError:
            raise KeyError(f"{host!r} is not a host of network {self.name} ({', '.join(self.hosts)})") from None

    # --- Life ---------------------------------------------------------------------

    def __enter__(self) -> "NamespaceNetwork":
        return self.create()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.destroy()

    def create(self) -> "NamespaceNetwork":
        """Make the namespaces, the bridge and the links (module docstring).
        On any failure, what was made is removed and the error raised."""
        if self._recorded:
            raise RuntimeError(f"network {self.name} is already created")
        try:
            self._reserve()
            self._build()
        except BaseException:
            try:
                self.destroy()
            except NetworkCommandError as cleanup_error:
                # The first error is the one to see; what is left has a record, for cleanup_leftovers.
                logger.warning("chaos.network_cleanup_failed", extra={"network": self.name,
                                                                      "error": str(cleanup_error)})
            raise
        logger.info("chaos.network_created", extra={
            "network": self.name, "subnet": str(self.subnet), "hosts": ",".join(self.hosts)})
        return self

    def destroy(self) -> None:
        """Remove everything this network made (idempotent). Every step is
        tried even if one fails; then the first failure is raised, and the
        record stays for cleanup_leftovers."""
        failures: list[NetworkCommandError] = []
        if self._root_interface_created:
            try:
                run(["ip", "link", "del", self.root_interface], ok_errors=("Cannot find device",))
                self._root_interface_created = False
            except NetworkCommandError as exc:
                failures.append(exc)
        destroyed = bool(self._created_namespaces)
        for namespace in reversed(tuple(self._created_namespaces)):
            try:
                _kill_processes_in(namespace)
                run(["ip", "netns", "del", namespace], ok_errors=("No such file",))
                self._created_namespaces.remove(namespace)
            except NetworkCommandError as exc:
                failures.append(exc)
        if failures:
            raise failures[0]
        if self._recorded:
            with _records_locked():
                (RECORDS_DIR / f"{self.name}.json").unlink(missing_ok=True)
            self._recorded = False
        if destroyed:
            logger.info("chaos.network_destroyed", extra={"network": self.name})

    def _reserve(self) -> None:
        """Choose the subnet and write the record, under the lock: from here
        on, nobody else picks this subnet or these names."""
        with _records_locked():
            existing = set(_list_namespaces())
            taken = [n for n in self.namespaces() if n in existing]
            if taken or (RECORDS_DIR / f"{self.name}.json").exists():
                raise ValueError(f"network name {self.name!r} is in use (namespaces {taken or 'recorded'})")
            if _link_exists(self.root_interface):
                raise ValueError(f"network name {self.name!r} is in use (interface {self.root_interface} exists)")
            reserved = [ipaddress.ip_network(r.subnet) for r in _all_records()]
            if self._wanted is None:
                self._subnet = _free_subnet(self.name, reserved)
            else:
                clash = next((n for n in reserved + _root_networks() if n.overlaps(self._wanted)), None)
                if clash is not None:
                    raise ValueError(f"subnet {self._wanted} is in use here ({clash} overlaps it)")
                self._subnet = self._wanted
            NetworkRecord(
                name=self.name, creator_pid=os.getpid(), creator_start=_start_time(os.getpid()) or 0,
                subnet=str(self._subnet), bridge_namespace=self.bridge_namespace,
                host_namespaces=tuple(self.namespace(h) for h in self.hosts), root_interface=self.root_interface,
            ).write()
            self._recorded = True

    def _build(self) -> None:
        prefix = self.subnet.prefixlen
        bridge = ["ip", "-n", self.bridge_namespace]
        self._add_namespace(self.bridge_namespace)
        run(bridge + ["link", "add", _BRIDGE, "type", "bridge"])
        run(bridge + ["link", "set", _BRIDGE, "up"])
        for i, host in enumerate(self.hosts):
            namespace = self.namespace(host)
            inside = ["ip", "-n", namespace]
            port = f"p{i + 1}"
            self._add_namespace(namespace)
            # Made in the bridge's namespace, the peer goes straight into the host's: no end ever
            # exists in the root namespace.
            run(bridge + ["link", "add", port, "type", "veth", "peer", "name", HOST_INTERFACE, "netns", namespace])
            run(bridge + ["link", "set", port, "master", _BRIDGE])
            run(bridge + ["link", "set", port, "up"])
            run(inside + ["addr", "add", f"{self.address(host)}/{prefix}", "dev", HOST_INTERFACE])
            run(inside + ["link", "set", HOST_INTERFACE, "up"])
            run(inside + ["link", "set", "lo", "up"])
        self._root_interface_created = True   # from the next command on, it may exist: destroy() tries
        run(["ip", "link", "add", self.root_interface, "type", "veth", "peer", "name", _ROOT_PORT,
             "netns", self.bridge_namespace])
        run(bridge + ["link", "set", _ROOT_PORT, "master", _BRIDGE])
        run(bridge + ["link", "set", _ROOT_PORT, "up"])
        run(["ip", "addr", "add", f"{self.root_address}/{prefix}", "dev", self.root_interface])
        run(["ip", "link", "set", self.root_interface, "up"])

    def _add_namespace(self, namespace: str) -> None:
        run(["ip", "netns", "add", namespace])
        self._created_namespaces.append(namespace)


# --- Leftovers of runs that died ---------------------------------------------------


def cleanup_leftovers(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove the networks whose name starts with `prefix` and whose creator
    is dead (their record says who it was): their processes (by pid), their
    root interface, their namespaces, their record. Returns their names.
    Networks of live processes, and namespaces without a record of ours,
    are left alone."""
    removed = []
    with _records_locked():
        existing = set(_list_namespaces())
        for record in _all_records():
            if not record.name.startswith(prefix) or record.creator_alive():
                continue
            run(["ip", "link", "del", record.root_interface], ok_errors=("Cannot find device",))
            for namespace in record.namespaces:
                if namespace in existing:
                    _kill_processes_in(namespace)
                    run(["ip", "netns", "del", namespace], ok_errors=("No such file",))
            (RECORDS_DIR / f"{record.name}.json").unlink(missing_ok=True)
            logger.info("chaos.leftover_removed", extra={"network": record.name, "creator": record.creator_pid})
            removed.append(record.name)
    return removed


# --- Helpers ---------------------------------------------------------------------------


def _list_namespaces() -> list[str]:
    # `ip netns list` prints "NAME" or "NAME (id: N)".
    return [line.split()[0] for line in run(["ip", "netns", "list"]).splitlines() if line.strip()]


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _kill_processes_in(namespace: str) -> None:
    """SIGKILL, by pid, whatever still runs inside one of our namespaces."""
    pids = [int(p) for p in run(["ip", "netns", "pids", namespace], ok_errors=("No such file",)).split()
            if p.isdigit()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    if pids:
        logger.warning("chaos.namespace_processes_killed", extra={"namespace": namespace,
                                                                  "pids": ",".join(map(str, pids))})


def _free_subnet(name: str, reserved: list[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """A /24 of the pool that overlaps no route or address of this namespace
    and none of `reserved`, starting from a place that depends on the name
    (so two runs rarely even try the same one)."""
    used = reserved + _root_networks()
    start = random.Random(name).randrange(_POOL_SIZE)
    for step in range(_POOL_SIZE):
        index = (start + step) % _POOL_SIZE
        candidate = ipaddress.ip_network((int(_POOL.network_address) + (index << 8), 24))
        if not any(candidate.overlaps(network) for network in used):
            return candidate
    raise RuntimeError(f"no free /24 left in {_POOL}")


def _root_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 route destination (but the default route) and address
    network of this namespace."""
    networks: list[ipaddress.IPv4Network] = []
    for route in json.loads(run(["ip", "-4", "-j", "route", "show", "table", "all"]) or "[]"):
        destination = route.get("dst", "default")
        if destination != "default":
            networks.append(ipaddress.ip_network(destination, strict=False))
    for link in json.loads(run(["ip", "-4", "-j", "addr", "show"]) or "[]"):
        for info in link.get("addr_info", []):
            networks.append(ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False))
    return networks


def _start_time(pid: int) -> int | None:
    """A process's start time (clock ticks since boot), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while True:
        number, digit = divmod(number, 36)
        text = digits[digit] + text
        if number == 0:
            return text
