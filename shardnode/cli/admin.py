"""Administration subcommands of the `shardnode` command line: processes and
the cluster's shape (docs/cli.md, docs/membership.md).

    shardnode die SERVER [--clean]       stop a host (router address) or one worker (worker address)
    shardnode start SERVER [--new]       start it again from its data, or join as a new member
    shardnode leave SERVER [--clean]     its replicas leave their groups, then it stops
    shardnode member list [--json]       every group's members, roles and catch-up
    shardnode member add GROUP HOST      a new replica of GROUP on HOST (learner, then voter)
    shardnode member remove GROUP HOST   HOST's replica of GROUP leaves the group
    shardnode rebalance [--dry-run]      replicas and leaders spread evenly over the hosts
    shardnode supervisor-conf --host NAME [--output FILE]

The main CLI calls `register(subparsers)`; each subcommand stores its handler
as `args.func`, which takes the parsed namespace (with the global
`args.config`) and returns the exit code: 0 ok, 2 error (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from typing import TYPE_CHECKING

from ..config import ClusterConfig, ConfigError, default_config_path
from ..errors import ShardnodeError
from ..placement.intents import IntentKind

# The control plane is imported by the commands that use it: `shardnode --help`
# and the data commands start without it.
if TYPE_CHECKING:
    from ..placement.membership import GroupState, MembershipAdmin
    from ..supervisor import ProcessControl, Target

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def register(subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add the admin commands to the main parser's subparsers;
    `parents` carry the options every command accepts (--config, --timeout)."""
    parents = list(parents)
    server_help = ("ADDRESS:PORT as in the configuration: a router address means the whole host "
                   "(router and all its workers), a worker address that worker alone")

    die = subparsers.add_parser(
        "die", parents=parents, help="stop a host or a worker (it stays down until `start`)",
        description="Stop a host or a worker through its host's supervisord; it stays down until `start`.",
    )
    die.add_argument("server", metavar="SERVER", help=server_help)
    die.add_argument("--clean", action="store_true",
                     help="graceful stop: leadership handed over, state flushed (default: SIGKILL, as a crash)")
    die.set_defaults(func=_die)

    start = subparsers.add_parser(
        "start", parents=parents, help="start a stopped host or worker again, or join with --new",
        description="Start a host or a worker again through its host's supervisord; it recovers from its data. "
                    "With --new it joins with empty state as a new member: a host joins every group short of "
                    "replicas (after a leave, the same groups), a worker its group; each new replica catches up "
                    "as a learner and is promoted to voter. Refused without --new for a server that left.",
    )
    start.add_argument("server", metavar="SERVER", help=server_help)
    start.add_argument("--new", action="store_true", help="join with empty state as a new member")
    start.set_defaults(func=_start)

    leave = subparsers.add_parser(
        "leave", parents=parents, help="remove a host's (or a worker's) replicas from their groups, then stop it",
        description="Every replica of the host (router address), or the one replica (worker address), leaves its "
                    "group by a membership change (a leader hands leadership over first); then the processes stop "
                    "and stay stopped. Refused, with nothing changed, if a group would drop below 3 voters or lose "
                    "its live majority.",
    )
    leave.add_argument("server", metavar="SERVER", help=server_help)
    leave.add_argument("--clean", action="store_true",
                       help="stop the processes gracefully afterwards (default: SIGKILL)")
    leave.set_defaults(func=_leave)

    member = subparsers.add_parser(
        "member", parents=parents, help="list, add or remove the members of groups",
        description="The live membership of every group, and single-replica changes.",
    )
    member_commands = member.add_subparsers(dest="member_command", metavar="COMMAND", required=True)
    listing = member_commands.add_parser("list", parents=parents, help="every group's members")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=_member_list)
    add = member_commands.add_parser("add", parents=parents, help="add a replica of GROUP on HOST")
    add.add_argument("group", type=int, metavar="GROUP")
    add.add_argument("host", metavar="HOST", help="a host name of the configuration")
    add.set_defaults(func=_member_add)
    remove = member_commands.add_parser("remove", parents=parents, help="remove HOST's replica of GROUP")
    remove.add_argument("group", type=int, metavar="GROUP")
    remove.add_argument("host", metavar="HOST", help="a host name of the configuration")
    remove.set_defaults(func=_member_remove)

    rebalance = subparsers.add_parser(
        "rebalance", parents=parents, help="spread replicas and leaders evenly over the hosts",
        description="Move replicas (a new one joins as a learner and is promoted once caught up, then the old "
                    "one leaves) until the hosts that run hold numbers of replicas that differ by at most one, "
                    "then transfer leaderships until no host leads more than ceil(groups / hosts). One step at "
                    "a time, the cluster read again after each. Refused, with nothing changed, if a group it "
                    "needs has no leader, a voter down, or a change in flight. Free standby hosts stay free.",
    )
    rebalance.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    rebalance.set_defaults(func=_rebalance)

    conf = subparsers.add_parser(
        "supervisor-conf", parents=parents, help="write the supervisord configuration of one host",
        description="Write the supervisord configuration of one real host: its router and one "
                    "worker per group replica it holds; its process control (HostControl) on the host's "
                    "address:supervisor_port, supervisord's XML-RPC on a Unix socket only.",
    )
    conf.add_argument("--host", required=True, metavar="NAME", help="the host's name in the configuration")
    conf.add_argument("--output", "-o", metavar="FILE", help="write to FILE (default: standard output)")
    conf.add_argument("--python", default=sys.executable, metavar="PATH",
                      help="the Python that runs the router and workers on that host (default: this one)")
    conf.add_argument("--project-root", default=str(PROJECT_ROOT), metavar="DIR",
                      help="the shardnode checkout on that host (default: this one)")
    conf.set_defaults(func=_supervisor_conf)

    from . import certs

    certs.register(subparsers)


def _die(args: argparse.Namespace) -> int:
    def run() -> str:
        target = _control(args).stop(args.server, clean=args.clean)
        how = "stopped cleanly" if args.clean else "killed"
        if not target.stopped:
            how = "was not running"
        return f"{_describe(target, args.server)} {how}; it stays down until `shardnode start {args.server}`"

    return _guarded(run)


def _start(args: argparse.Namespace) -> int:
    def run() -> str:
        if args.new:
            intent = _change(args, IntentKind.START_NEW, {"server": args.server})
            return intent.outcome
        with _admin(args) as admin:
            admin.restart(args.server)
        return f"{args.server} running"

    return _guarded(run)


def _leave(args: argparse.Namespace) -> int:
    return _guarded(lambda: _change(args, IntentKind.LEAVE, {"server": args.server, "clean": args.clean}).outcome)


def _member_list(args: argparse.Namespace) -> int:
    from ..config import METADATA_GROUP

    def run() -> str | None:
        with _admin(args, progress=False) as admin:
            # The metadata group first: it answers (or not) on its own, and
            # without it the data groups cannot even be listed.
            meta = admin.group(METADATA_GROUP)
            try:
                groups, unknown = admin.groups(), None
            except ShardnodeError as exc:
                groups, unknown = [], exc
        if args.json:
            print(json.dumps({"groups": [membership_dict(g) for g in groups],
                              "metadata_group": membership_dict(meta)}, indent=2))
        else:
            print("\n".join(membership_lines([*groups, meta])), flush=True)
        if unknown is not None:
            raise unknown
        return None

    return _guarded(run)


def _member_add(args: argparse.Namespace) -> int:
    return _guarded(lambda: _change(args, IntentKind.MEMBER_ADD, {"group": args.group, "host": args.host}).outcome)


def _member_remove(args: argparse.Namespace) -> int:
    return _guarded(lambda: _change(args, IntentKind.MEMBER_REMOVE,
                                    {"group": args.group, "host": args.host}).outcome)


def _rebalance(args: argparse.Namespace) -> int:
    from ..placement.balance import ClusterView, Rebalancer, describe_counts, plan, router_groups, unbalanced
    from ..placement.membership import MembershipAdmin
    from ..supervisor import ProcessControl

    def shape(view: ClusterView) -> str:
        return (f"replicas per host: {describe_counts(view.replica_counts())}; "
                f"leaders per host: {describe_counts(view.leader_counts())} (at most {view.leader_cap()} wanted)")

    def run() -> str:
        cluster = ClusterConfig.load(_config_path(args))
        with MembershipAdmin(cluster, ProcessControl(cluster), request_timeout=_timeout(args)) as admin:
            rebalancer = Rebalancer(admin, lambda: router_groups(cluster, timeout=args.timeout))
            view = rebalancer.read()
            steps = plan(view)
        if not steps:
            problems = unbalanced(view)
            if problems:
                return f"as balanced as the live voters allow: {'; '.join(problems)}"
            return f"already balanced: {shape(view)}"
        print(f"now: {shape(view)}", flush=True)
        if args.dry_run:
            print(f"plan ({len(steps)} steps):")
            for number, step in enumerate(steps, start=1):
                print(f"  {number}. {step}")
            return "dry run: nothing was changed"
        return _change(args, IntentKind.REBALANCE, {}).outcome

    return _guarded(run)


def _change(args: argparse.Namespace, kind: IntentKind, change_args: dict):  # type: ignore[no-untyped-def]
    """Record the change as an intent and carry it out (or follow whoever
    does), printing its progress; the finished intent (ShapeRefused if it
    failed or was cancelled)."""
    from ..placement.shape_change import request_change
    from ..supervisor import ProcessControl

    cluster = ClusterConfig.load(_config_path(args))
    return request_change(cluster, kind, change_args, control=ProcessControl(cluster),
                          on_line=lambda line: print(line, flush=True), request_timeout=_timeout(args))


def membership_dict(state: GroupState) -> dict:
    from ..config import METADATA_GROUP, group_label

    return {
        "group": state.group,
        "name": group_label(state.group),
        "kind": "meta" if state.group == METADATA_GROUP else "data",
        "leader_id": state.leader_id,
        "term": state.term,
        "commit_index": state.commit_index,
        "members": [
            {"node_id": m.node_id, "host": m.host, "address": m.address,
             "role": "learner" if m.learner else "voter", "reachable": m.reachable,
             "leader": m.node_id == state.leader_id, "applied_index": m.applied_index,
             "lag": max(0, state.commit_index - m.applied_index) if m.reachable else None}
            for m in state.members
        ],
        "removed": list(state.removed),
    }


def membership_lines(groups: list[GroupState]) -> list[str]:
    from ..config import METADATA_GROUP, group_label

    lines = []
    for state in groups:
        name = "metadata group (meta)" if state.group == METADATA_GROUP else f"group {group_label(state.group)}"
        if not state.members:
            lines.append(f"{name}: no replica answers")
            continue
        voters, learners = len(state.voters), len(state.learners)
        lines.append(f"{name}: {voters} voters, {learners} learners, leader node {state.leader_id or '-'}"
                     f", term {state.term}")
        for m in state.members:
            role = "learner" if m.learner else "voter"
            lead = " (leader)" if m.node_id == state.leader_id else ""
            health = (f"applied {m.applied_index} of {state.commit_index}" if m.reachable else "unreachable")
            lines.append(f"  node {m.node_id:<4} {m.host:<12} {m.address:<22} {role}{lead}, {health}")
    return lines


def _supervisor_conf(args: argparse.Namespace) -> int:
    from ..supervisor import host_config

    def run() -> str | None:
        config_path = Path(_config_path(args)).absolute()
        cluster = ClusterConfig.load(config_path)
        text = host_config(cluster, args.host, python=Path(args.python).absolute(), config_path=config_path,
                           project_root=Path(args.project_root).absolute())
        if args.output in (None, "-"):
            sys.stdout.write(text)
            return None
        try:
            # 0600: the file holds the admin password.
            fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                os.fchmod(fd, 0o600)
                f.write(text)
        except OSError as exc:
            raise ShardnodeError(f"cannot write {args.output}: {exc.strerror}") from None
        return f"wrote {args.output}"

    return _guarded(run)


def _config_path(args: argparse.Namespace) -> str:
    return getattr(args, "config", None) or str(default_config_path())


def _control(args: argparse.Namespace) -> ProcessControl:
    from ..supervisor import ProcessControl

    return ProcessControl(ClusterConfig.load(_config_path(args)))


def _admin(args: argparse.Namespace, progress: bool = True) -> MembershipAdmin:
    from ..placement.membership import MembershipAdmin
    from ..supervisor import ProcessControl

    cluster = ClusterConfig.load(_config_path(args))
    return MembershipAdmin(cluster, ProcessControl(cluster),
                           progress=(lambda line: print(line, flush=True)) if progress else None,
                           request_timeout=_timeout(args))


def _timeout(args: argparse.Namespace) -> float:
    """The deadline of each request (--timeout): the metadata group's calls included."""
    return float(getattr(args, "timeout", None) or 10.0)


def _describe(target: Target, server: str) -> str:
    if target.whole_host:
        return f"host {target.host.name} ({server}" + (f": {', '.join(target.stopped)})" if target.stopped else ")")
    return f"{target.programs[0]} on {target.host.name} ({server})"


def _guarded(run: Callable[[], str | None]) -> int:
    """Run a command: its message on stdout and 0, or one error line on stderr
    and 2 (the exit code of every shardnode command's errors)."""
    try:
        message = run()
    except (ConfigError, ShardnodeError) as exc:
        print(f"shardnode: {exc}", file=sys.stderr)
        return 2
    if message:
        print(message)
    return 0
