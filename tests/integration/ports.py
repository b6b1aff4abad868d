"""Free ports for test clusters, never the same one twice in a run."""

from __future__ import annotations

import socket
from pathlib import Path

_handed_out: set[tuple[str, int]] = set()


def _bindable(address: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((address, port))
        except OSError:
            return False
    return True


def free_port(address: str) -> int:
    """A port that is free on `address` now and was not handed out before."""
    while True:
        with socket.socket() as sock:
            sock.bind((address, 0))
            port = sock.getsockname()[1]
        if (address, port) not in _handed_out:
            _handed_out.add((address, port))
            return port


def free_port_range(address: str, count: int) -> int:
    """The first of `count` consecutive free ports (worker ports: base + group)."""
    while True:
        base = free_port(address)
        ports = range(base, base + count)
        if base + count < 65535 and all(
            (address, p) not in _handed_out or p == base for p in ports
        ) and all(_bindable(address, p) for p in ports):
            _handed_out.update((address, p) for p in ports)
            return base


def write_cluster_toml(
    tmp: Path,
    *,
    name: str = "itest",
    hosts: int = 3,
    groups: int = 1,
    replicas: int | None = None,
    tick_ms: int = 50,
    snapshot_threshold: int = 10_000,
    tls: bool = False,
    standby: tuple[str, ...] = (),
    max_groups: int | None = None,
    meta_replicas: int | None = None,
    extra_toml: str = "",
    etcd: bool = False,
) -> Path:
    """A cluster.toml for a test cluster: hosts h1… on 127.0.0.1…, every
    port free (worker ports: `max_groups` + 1 consecutive ones, the last the
    metadata group's; max_groups defaults to groups + 2), data under tmp;
    `tls` turns [security] tls on (certificates under tmp/data/certs); the
    hosts named in `standby` hold no replica at first; `extra_toml` (whole
    tables, e.g. "[limits]\n...") goes before the hosts; `etcd` gives every
    router an etcd_port (docs/etcd.md)."""
    max_groups = groups + 2 if max_groups is None else max_groups
    blocks = []
    for i in range(1, hosts + 1):
        address = f"127.0.0.{i}"
        blocks.append(
            f'[[host]]\nname = "h{i}"\naddress = "{address}"\nrouter_port = {free_port(address)}\n'
            f"worker_port_base = {free_port_range(address, max_groups + 1)}\nmetrics_port = {free_port(address)}\n"
            f"supervisor_port = {free_port(address)}\n" + ("standby = true\n" if f"h{i}" in standby else "")
            + (f"etcd_port = {free_port(address)}\n" if etcd else "")
        )
    path = tmp / "cluster.toml"
    path.write_text(
        f'[cluster]\nname = "{name}"\nreplicas = {replicas or hosts}\ngroups = {groups}\nmax_groups = {max_groups}\n'
        + (f"meta_replicas = {meta_replicas}\n" if meta_replicas else "") +
        f'data_dir = "{tmp / "data"}"\nsnapshot_threshold = {snapshot_threshold}\n\n'
        f"[timing]\ntick_ms = {tick_ms}\nelection_ticks = 10\nheartbeat_ticks = 1\nscheduler_lease_ms = 3000\n\n"
        + ("[security]\ntls = true\n\n" if tls else "") + (extra_toml + "\n\n" if extra_toml else "")
        + "\n".join(blocks)
    )
    return path
