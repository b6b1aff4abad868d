"""Free ports for test clusters, never the same one twice in a run."""

from __future__ import annotations

import socket

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
