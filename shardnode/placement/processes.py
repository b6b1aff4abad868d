"""What the control plane needs of a host's processes: start and stop a
server (a host's router and workers, or one worker), make sure some workers
run, and read a host's program states. `shardnode.supervisor.ProcessControl`
provides it through each host's supervisord; tests without supervisord pass
a launcher instead (membership.Launcher). Keeping this an interface lets the
scheduler and its executors be tested without supervisord."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol


class Processes(Protocol):
    def start(self, server: str, groups: Iterable[int] | None = None) -> Any:
        """Start a router address's host (its router and the workers of
        `groups`), or a worker address's worker."""

    def stop(self, server: str, clean: bool) -> Any:
        """Stop a host or a worker (clean: SIGTERM, else SIGKILL)."""

    def ensure_workers(self, host_name: str, groups: Iterable[int], wait: bool = True) -> tuple[str, ...]:
        """Start the workers of `groups` on a host where they do not run;
        returns the programs started."""

    def status(self, host_name: str) -> dict[str, str]:
        """Program name -> supervisord state, on one host."""
