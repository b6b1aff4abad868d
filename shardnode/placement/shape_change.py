"""How a command asks for a change of shape: record the intent, then drive it
(holding the lease) or watch whoever drives it, and return its outcome
(docs/membership.md, "One scheduler").

Used by the `shardnode` commands and by `kv739_leave` / `kv739_start(server,
1)`. The command's own process is the scheduler while it runs; if it is
killed, the intent stays recorded and the rerun of the command (which
attaches to it), another command, or a router carries it on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ..config import ClusterConfig, ConfigError
from .directory import ShardDirectory
from .executors import ClusterHands, make_scheduler
from .intents import Intent, IntentBook, IntentKind, IntentState, ShapeRefused
from .lease import LeaseState, SchedulerLease
from .membership import Launcher
from .moves import MoveRecord, Mover
from .scheduler import holder_name

#: How long a command's calls to the metadata group keep trying.
METADATA_TIMEOUT = 10.0
#: How long a command waits for its change by default (then it says the
#: change goes on without it, and exits non-zero).
CHANGE_TIMEOUT = 900.0


def identity(cluster: ClusterConfig) -> str | None:
    """The host certificate this machine presents with TLS (the first host
    of the cluster whose certificate is here; admin commands run on a host
    of the cluster)."""
    security = cluster.security
    if not security.tls:
        return None
    return next((h.name for h in cluster.hosts if security.host_cert_file(h.name).exists()), None)


def request_change(cluster: ClusterConfig, kind: IntentKind, args: dict[str, Any], *, control: Any = None,
                   launch: Launcher | None = None, on_line: Callable[[str], None] = lambda line: None,
                   timeout: float | None = CHANGE_TIMEOUT, admin_timeout: float = 120.0,
                   request_timeout: float = METADATA_TIMEOUT) -> Intent:
    """Record the intent (or attach to the same unfinished one) and carry it
    to its end. Returns the finished intent; ShapeRefused with its outcome if
    it failed or was cancelled; DeadlineExceeded after `timeout` (it goes on
    without us). `request_timeout`: how long each call to the metadata group
    keeps trying (the CLI's --timeout)."""
    check_arguments(cluster, args)
    hands = ClusterHands(cluster, control=control, launch=launch, timeout=admin_timeout)

    async def main() -> Intent:
        directory = ShardDirectory(cluster, identity(cluster), timeout=request_timeout)
        try:
            scheduler = make_scheduler(hands, directory, holder_name("cli"))
            intent, new = await scheduler.submit(kind, args)
            if not new:
                on_line(f"the same change is already recorded (intent {intent.intent_id}, "
                        f"{intent.state.value}): following it")
            return await scheduler.run_until_finished(intent.intent_id, on_line=on_line, timeout=timeout)
        finally:
            await directory.close()

    intent = asyncio.run(main())
    if intent.state is IntentState.FAILED:
        raise ShapeRefused(intent.outcome)
    if intent.state is IntentState.CANCELLED:
        raise ShapeRefused(f"cancelled: {intent.outcome}")
    return intent


def check_arguments(cluster: ClusterConfig, args: dict[str, Any]) -> None:
    """ConfigError, before anything is recorded, for a server or host that
    is not in cluster.toml or a group number out of range."""
    server = args.get("server")
    if server is not None:
        addresses = {h.router_address for h in cluster.hosts} | {
            h.worker_address(g) for h in cluster.hosts for g in range(cluster.max_groups)}
        if server not in addresses:
            raise ConfigError(f"{server} is neither a router nor a worker address of cluster {cluster.name!r}")
    for host in [args["host"]] if args.get("host") is not None else list(args.get("hosts") or ()):
        cluster.host(host)
    group = args.get("group")
    if group is not None and not 0 <= group < cluster.max_groups:
        raise ConfigError(f"there is no group {group} (groups are numbered 0 to {cluster.max_groups - 1})")


# --- Seeing and cancelling pending work ---------------------------------------------------------


def pending_work(cluster: ClusterConfig, request_timeout: float = METADATA_TIMEOUT
                 ) -> tuple[list[Intent], list[MoveRecord], LeaseState | None]:
    """The intents (unfinished and recent), the moves in progress, and the
    scheduler's lease, as the metadata group has them."""
    async def main() -> tuple[list[Intent], list[MoveRecord], LeaseState | None]:
        directory = ShardDirectory(cluster, identity(cluster), timeout=request_timeout)
        try:
            intents = await IntentBook(directory).all()
            moves = await Mover(None, directory).records()      # type: ignore[arg-type]
            lease = await SchedulerLease(directory, "reader").read()
            return intents, moves, lease
        finally:
            await directory.close()
    return asyncio.run(main())


def cancel(cluster: ClusterConfig, intent_id: int) -> Intent:
    """Ask the scheduler to cancel an intent (see IntentBook.cancel)."""
    async def main() -> Intent:
        directory = ShardDirectory(cluster, identity(cluster), timeout=request_timeout)
        try:
            return await IntentBook(directory).cancel(intent_id)
        finally:
            await directory.close()
    return asyncio.run(main())
