"""Network faults between the hosts of a cluster in the namespace mode
(shardnode.chaos.namespaces): cut links, one way or both, and slow, lose
and reorder packets, then heal everything.

    faults = NetworkFaults(cluster)          # every host has a `namespace`
    faults.partition(["h1", "h2"], ["h3", "h4", "h5"])
    faults.block([("h1", "h3")])             # h1's packets no longer reach h3 (h3's still reach h1)
    faults.shape("h2", delay_ms=50, jitter_ms=20, loss_percent=1, reorder_percent=10)
    faults.heal()                            # every rule and qdisc removed

Cuts are nftables rules in the *receiving* host's namespace: one table of
ours, `inet shardnode_chaos`, whose input chain drops packets by source
address. A cut from a to b is a rule in b, so one-way cuts are possible, and
only the cluster's hosts' addresses are ever matched: traffic from the root
namespace (the test, clients, the CLI, the hosts' process control) is never cut,
unless asked with `isolate_from_clients`. Every change rewrites the host's
whole table in one `nft -f -` transaction, so a host is never seen half
changed.

Delay, jitter, loss and reordering are `tc netem` on the host's `eth0`
(what it sends); `netem_unavailable()` says when the kernel has no netem.
`drop_randomly` loses packets with nftables instead, on any kernel.

Each action logs one line on the `shardnode.chaos` logger (`chaos.block`,
`chaos.partition`, `chaos.shape`, `chaos.heal`, …). A failing `ip`, `nft`
or `tc` raises NetworkCommandError naming the command and its stderr.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType

from ..config import ClusterConfig, HostConfig
from .commands import NetworkCommandError, run
from .namespaces import HOST_INTERFACE, NamespaceNetwork, namespaces_unavailable, unique_name

__all__ = [
    "CHAOS_TABLE",
    "InputRules",
    "NetworkFaults",
    "netem_command",
    "netem_unavailable",
    "nft_script",
]

logger = logging.getLogger("shardnode.chaos")

#: Our nftables table (family inet) in each host's namespace.
CHAOS_TABLE = "shardnode_chaos"
# Before any filter of the host's own (priority filter = 0), so our drops win.
_CHAIN_PRIORITY = "filter - 10"
# numgen draws in 0..9999: loss percentages to two decimals.
_LOSS_SCALE = 10_000


# --- What is written: pure, unit-tested ------------------------------------------------


@dataclass(slots=True, frozen=True)
class InputRules:
    """What one host's input chain drops."""

    blocked_sources: frozenset[str] = frozenset()    # addresses whose packets are dropped
    # Set when the host is isolated from clients: packets from anyone but these
    # (the cluster's hosts) are dropped.
    only_from: frozenset[str] | None = None
    random_loss_percent: float = 0.0                 # of every packet from elsewhere

    @property
    def empty(self) -> bool:
        return not self.blocked_sources and self.only_from is None and self.random_loss_percent == 0


def nft_script(rules: InputRules, table: str = CHAOS_TABLE) -> str:
    """The `nft -f -` script that makes the host's table say exactly
    `rules`, in one transaction: the table is created (so that deleting it
    cannot fail), deleted with everything in it, and made again unless
    there is nothing to drop."""
    lines = [f"table inet {table}", f"delete table inet {table}"]
    if rules.empty:
        return "\n".join(lines) + "\n"
    chain = [
        f"\t\ttype filter hook input priority {_CHAIN_PRIORITY}; policy accept;",
        # The host talking to itself (router to its own workers) is never cut.
        '\t\tiif "lo" accept',
    ]
    if rules.blocked_sources:
        chain.append(f"\t\tip saddr {_address_set(rules.blocked_sources)} drop")
    if rules.only_from is not None:
        chain.append(f"\t\tip saddr != {_address_set(rules.only_from)} drop" if rules.only_from else "\t\tdrop")
    if rules.random_loss_percent > 0:
        threshold = round(rules.random_loss_percent * _LOSS_SCALE / 100)
        chain.append(f"\t\tnumgen random mod {_LOSS_SCALE} < {threshold} drop")
    lines += [f"table inet {table} {{", "\tchain input {", *chain, "\t}", "}"]
    return "\n".join(lines) + "\n"


def netem_command(delay_ms: float = 0, jitter_ms: float = 0, loss_percent: float = 0.0,
                  reorder_percent: float = 0.0, interface: str = HOST_INTERFACE) -> list[str]:
    """`tc qdisc replace dev INTERFACE root netem ...` for these settings.
    ValueError for a setting out of range, for jitter or reordering without
    a delay (netem reorders by sending some packets without the delay), or
    for nothing at all (that is `unshape`)."""
    for name, value, high in (("delay_ms", delay_ms, 60_000), ("jitter_ms", jitter_ms, 60_000),
                              ("loss_percent", loss_percent, 100), ("reorder_percent", reorder_percent, 100)):
        if not 0 <= value <= high:
            raise ValueError(f"{name} must be in 0..{high} (got {value})")
    if (jitter_ms or reorder_percent) and not delay_ms:
        raise ValueError("jitter and reordering need a delay (netem reorders by not delaying some packets)")
    if jitter_ms > delay_ms:
        raise ValueError(f"jitter_ms ({jitter_ms:g}) must not exceed delay_ms ({delay_ms:g})")
    if not (delay_ms or loss_percent):
        raise ValueError("nothing to shape (no delay, no loss): use unshape")
    command = ["tc", "qdisc", "replace", "dev", interface, "root", "netem"]
    if delay_ms:
        command += ["delay", f"{delay_ms:g}ms"] + ([f"{jitter_ms:g}ms"] if jitter_ms else [])
    if loss_percent:
        command += ["loss", f"{loss_percent:g}%"]
    if reorder_percent:
        command += ["reorder", f"{reorder_percent:g}%"]
    return command


def _address_set(addresses: Iterable[str]) -> str:
    ordered = sorted(addresses, key=ipaddress.ip_address)
    return ordered[0] if len(ordered) == 1 else "{ " + ", ".join(ordered) + " }"


@functools.cache
def netem_unavailable() -> str | None:
    """One line saying why `shape` cannot work here (no namespaces, or a
    kernel without the netem qdisc), or None if it can."""
    reason = namespaces_unavailable()
    if reason is not None:
        return reason
    try:
        with NamespaceNetwork(unique_name(), ["probe"]) as probe:
            run(probe.exec_prefix("probe") + netem_command(delay_ms=1))
    except NetworkCommandError as exc:
        hint = " (this kernel has no netem qdisc: CONFIG_NET_SCH_NETEM)" if "kind is unknown" in exc.stderr else ""
        return f"tc netem cannot be used here{hint}: {exc}"
    return None


# --- Applying them ------------------------------------------------------------------------


class NetworkFaults:
    """Faults between the hosts of `cluster`, every one of which runs in its
    own namespace (`[[host]] namespace`). A context manager whose exit heals.

    Blocks are directed and cumulative: `block([("a", "b")])` drops a's
    packets at b and keeps whatever was blocked before. `partition(*sides)`
    blocks both ways between every two hosts on different sides; a host on
    no side keeps all its links (a "bridge" between the sides).
    """

    def __init__(self, cluster: ClusterConfig) -> None:
        hosts = {host.name: host for host in cluster.hosts}
        outside = [name for name, host in hosts.items() if host.namespace is None]
        if outside:
            raise ValueError(f"network faults need every host in a namespace of its own; "
                             f"{', '.join(outside)} {'has' if len(outside) == 1 else 'have'} none "
                             "(the namespace mode: docs/testing.md)")
        for host in hosts.values():
            if not isinstance(ipaddress.ip_address(host.address), ipaddress.IPv4Address):
                raise ValueError(f"host {host.name}: {host.address} is not an IPv4 address")
        self._hosts: dict[str, HostConfig] = hosts
        self._blocked: set[tuple[str, str]] = set()
        self._isolated_from_clients: set[str] = set()
        self._random_loss: dict[str, float] = {}

    def __enter__(self) -> "NetworkFaults":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.heal()

    # --- Cuts -----------------------------------------------------------------------

    def block(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Drop the packets host a sends to host b, for every (a, b)."""
        pairs = self._pairs(pairs)
        self._set_blocked(self._blocked | pairs)
        logger.info("chaos.block", extra={"pairs": _shown(pairs), "blocked": len(self._blocked)})

    def unblock(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Let these directed links through again (the others stay as they are)."""
        pairs = self._pairs(pairs)
        self._set_blocked(self._blocked - pairs)
        logger.info("chaos.unblock", extra={"pairs": _shown(pairs), "blocked": len(self._blocked)})

    def partition(self, *sides: Iterable[str]) -> None:
        """Cut every link, both ways, between hosts on different sides."""
        groups = [tuple(side) for side in sides]
        for side in groups:
            for host in side:
                self._host(host)
        placed = [host for side in groups for host in side]
        if len(set(placed)) != len(placed):
            raise ValueError(f"a host is on two sides of the partition: {groups}")
        pairs = {(a, b) for i, side in enumerate(groups) for other in groups[i + 1:]
                 for a in side for b in other}
        pairs |= {(b, a) for a, b in pairs}
        self._set_blocked(self._blocked | pairs)
        logger.info("chaos.partition", extra={"sides": "|".join(",".join(side) for side in groups),
                                              "blocked": len(self._blocked)})

    def blocked(self) -> frozenset[tuple[str, str]]:
        """The directed links cut now: (sender, receiver)."""
        return frozenset(self._blocked)

    def isolate_from_clients(self, host: str) -> None:
        """Drop every packet the host receives from outside the cluster:
        clients, the CLI, and the callers of its process control in the root
        namespace. `heal` ends it."""
        self._host(host)
        self._isolated_from_clients.add(host)
        self._apply({host})
        logger.info("chaos.isolate_from_clients", extra={"host": host})

    def drop_randomly(self, host: str, percent: float) -> None:
        """Drop this share of the packets the host receives from anywhere
        but itself (nftables; works without netem). 0 stops it."""
        self._host(host)
        if not 0 <= percent <= 100:
            raise ValueError(f"percent must be in 0..100 (got {percent})")
        if percent:
            self._random_loss[host] = percent
        else:
            self._random_loss.pop(host, None)
        self._apply({host})
        logger.info("chaos.drop_randomly", extra={"host": host, "loss_percent": f"{percent:g}"})

    # --- Shaping -----------------------------------------------------------------------

    def shape(self, host: str, delay_ms: float = 0, jitter_ms: float = 0, loss_percent: float = 0.0,
              reorder_percent: float = 0.0) -> None:
        """Delay (± jitter), lose and reorder what the host sends, with netem
        on its eth0 (replacing any shaping it had)."""
        command = netem_command(delay_ms, jitter_ms, loss_percent, reorder_percent)
        run(self._exec(host) + command)
        logger.info("chaos.shape", extra={"host": host, "delay_ms": f"{delay_ms:g}", "jitter_ms": f"{jitter_ms:g}",
                                          "loss_percent": f"{loss_percent:g}",
                                          "reorder_percent": f"{reorder_percent:g}"})

    def unshape(self, host: str) -> None:
        """Remove the host's netem (nothing if it has none)."""
        removed = self._unshape(host)
        logger.info("chaos.unshape", extra={"host": host, "removed": removed})

    # --- Healing -------------------------------------------------------------------------

    def heal(self) -> None:
        """Remove every rule and qdisc of ours from every host, whatever this
        object remembers (idempotent: also after a failed action). Every host
        is tried; the first failure is raised at the end."""
        failures: list[NetworkCommandError] = []
        shaped = []
        for name in self._hosts:
            try:
                run(self._exec(name) + ["nft", "-f", "-"], input=nft_script(InputRules()))
                if self._unshape(name):
                    shaped.append(name)
            except NetworkCommandError as exc:
                failures.append(exc)
        blocked = len(self._blocked)
        self._blocked.clear()
        self._isolated_from_clients.clear()
        self._random_loss.clear()
        logger.info("chaos.heal", extra={"blocked_before": blocked, "unshaped": ",".join(shaped) or "none",
                                         "failures": len(failures)})
        if failures:
            raise failures[0]

    # --- Internals -------------------------------------------------------------------------

    def _host(self, name: str) -> HostConfig:
        try:
            return self._hosts[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a host of the cluster ({', '.join(self._hosts)})") from None

    def _exec(self, name: str) -> list[str]:
        namespace = self._host(name).namespace
        assert namespace is not None      # checked in __init__
        return ["ip", "netns", "exec", namespace]

    def _pairs(self, pairs: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        result = set()
        for sender, receiver in pairs:
            self._host(sender)
            self._host(receiver)
            if sender == receiver:
                raise ValueError(f"a host cannot be cut from itself: ({sender!r}, {receiver!r})")
            result.add((sender, receiver))
        return result

    def _set_blocked(self, blocked: set[tuple[str, str]]) -> None:
        changed = {receiver for _, receiver in blocked ^ self._blocked}
        self._blocked = blocked
        self._apply(changed)

    def _rules(self, host: str) -> InputRules:
        return InputRules(
            blocked_sources=frozenset(self._hosts[a].address for a, b in self._blocked if b == host),
            only_from=(frozenset(h.address for h in self._hosts.values())
                       if host in self._isolated_from_clients else None),
            random_loss_percent=self._random_loss.get(host, 0.0),
        )

    def _apply(self, hosts: Iterable[str]) -> None:
        for host in sorted(hosts):
            run(self._exec(host) + ["nft", "-f", "-"], input=nft_script(self._rules(host)))

    def _unshape(self, host: str) -> bool:
        """Delete the host's netem root qdisc if it has one; whether it had."""
        shown = run(self._exec(host) + ["tc", "qdisc", "show", "dev", HOST_INTERFACE, "root"])
        if "netem" not in shown:
            return False
        run(self._exec(host) + ["tc", "qdisc", "del", "dev", HOST_INTERFACE, "root"])
        return True


def _shown(pairs: Iterable[tuple[str, str]]) -> str:
    return ",".join(f"{a}>{b}" for a, b in sorted(pairs)) or "none"
