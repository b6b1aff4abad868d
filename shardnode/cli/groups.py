"""`shardnode group add [--hosts H1,H2,...]` and `shardnode group remove GROUP`
(docs/sharding.md): change the number of groups while the cluster serves,
with a progress bar of the keys and bytes moved. Exit 0 once done; 2 with
one line on stderr when refused (nothing changed) or when it fails (a
failed run is resumed by the next `group add` or `group remove`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from ..config import ClusterConfig, ConfigError, default_config_path
from ..errors import ShardnodeError
from ..placement.groups import GroupChangeReport
from ..placement.moves import MoveProgress, MoveRecord


def register(subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    group = subparsers.add_parser(
        "group", parents=list(parents), help="add or remove a group (moves key space online)",
        description="Change the number of groups while clients read and write: key space moves between groups "
                    "online, linearizably, with nothing lost (docs/sharding.md).",
    )
    commands = group.add_subparsers(dest="group_command", metavar="COMMAND", required=True)
    add = commands.add_parser(
        "add", parents=list(parents), help="create a group and give it a fair share of the key space",
        description="Create a group on HOSTS (default: the `replicas` hosts holding the fewest replicas), then "
                    "move to it a fair share of the key space: 1/(n+1) of every other group's.",
    )
    add.add_argument("--hosts", metavar="H1,H2,...", help="host names (cluster.toml) for the new group's replicas")
    add.add_argument("--json", action="store_true", help="print the report as JSON")
    add.set_defaults(func=_add)
    remove = commands.add_parser(
        "remove", parents=list(parents), help="move a group's key space to the others and retire it",
        description="Move every range of GROUP to the group that owns the least at that point, then take GROUP "
                    "out of the shard map; its replicas retire their data.",
    )
    remove.add_argument("group", metavar="GROUP", type=int)
    remove.add_argument("--json", action="store_true", help="print the report as JSON")
    remove.set_defaults(func=_remove)


def _add(args: argparse.Namespace) -> int:
    hosts = tuple(h.strip() for h in args.hosts.split(",") if h.strip()) if args.hosts else None
    loads: dict[str, int] = {}

    def prepare(cluster: ClusterConfig) -> None:
        if hosts is None:           # placing the group by load: read the membership first (synchronous)
            loads.update(_replica_loads(cluster))

    return _run(args, lambda admin: admin.add(hosts, loads=loads), prepare)


def _remove(args: argparse.Namespace) -> int:
    return _run(args, lambda admin: admin.remove(args.group))


def _replica_loads(cluster: ClusterConfig) -> dict[str, int]:
    """Host name → replicas it holds now (membership as the groups report it)."""
    from ..placement.membership import MembershipAdmin
    from ..supervisor import ProcessControl
    admin = MembershipAdmin(cluster, ProcessControl(cluster))
    loads: dict[str, int] = {}
    for state in admin.groups():
        for member in state.members:
            loads[member.host] = loads.get(member.host, 0) + 1
    return loads


def _run(args: argparse.Namespace, change, prepare=lambda cluster: None) -> int:  # type: ignore[no-untyped-def]
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    from ..placement.cluster import cluster_group_admin

    console = Console(stderr=True)
    try:
        cluster = ClusterConfig.load(getattr(args, "config", None) or str(default_config_path()))
        prepare(cluster)
    except (ConfigError, ShardnodeError) as exc:
        print(f"shardnode: {exc}", file=sys.stderr)
        return 2
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[keys]:>8,} keys"),
               DownloadColumn(), TimeElapsedColumn())
    # Started with the first move: a refusal before any prints its one line alone.
    bar = Progress(*columns, console=console, transient=False, disable=args.json)
    tasks: dict[int, int] = {}

    def on_move(record: MoveRecord, progress: MoveProgress) -> None:
        task = tasks.get(record.move_id)
        if task is None:
            if not tasks:
                bar.start()
            task = tasks[record.move_id] = bar.add_task(f"group {record.source} → {record.target}", total=None,
                                                        keys=0)
        bar.update(task, completed=progress.bytes, keys=progress.keys + progress.delta_keys,
                   description=f"group {record.source} → {record.target} ({record.phase.name.lower()})")

    def line(text: str) -> None:
        if not args.json:
            console.print(text)

    async def main() -> GroupChangeReport:
        admin, close = cluster_group_admin(cluster, progress=line, on_move_progress=on_move)
        try:
            return await change(admin)
        finally:
            await close()

    try:
        report = asyncio.run(main())
    except (ConfigError, ShardnodeError) as exc:
        print(f"shardnode: {exc}", file=sys.stderr)
        return 2
    finally:
        if tasks:
            bar.stop()
    if args.json:
        print(json.dumps({"group": report.group, "moves": report.moves, "keys": report.keys,
                          "bytes": report.bytes, "delta_keys": report.delta_keys,
                          "seconds": round(report.seconds, 3), "shard_map_epoch": report.epoch,
                          "shares": {str(g): round(s, 4) for g, s in report.shares.items()}}))
    else:
        shares = ", ".join(f"{g}: {s:.1%}" for g, s in sorted(report.shares.items()))
        print(f"group {report.group}: {report.moves} move(s), {report.keys:,} keys "
              f"({report.bytes:,} bytes) copied and {report.delta_keys:,} caught up in {report.seconds:.1f} s; "
              f"shard map epoch {report.epoch}; shares: {shares}")
    return 0
