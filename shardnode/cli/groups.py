"""`shardnode group add [--hosts H1,H2,...]`, `shardnode group remove GROUP`,
`shardnode group pending` and `shardnode group cancel INTENT` (docs/sharding.md,
docs/membership.md): change the number of groups while the cluster serves,
and see or cancel the changes of shape that are recorded and not finished.

add and remove record an intent and carry it out through the scheduler
(shardnode/placement/scheduler.py), printing its progress. Exit 0 once done;
2 with one line on stderr when refused (nothing changed) or when it failed
(the moves it started are finished by the next scheduler)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from ..config import ClusterConfig, ConfigError, default_config_path
from ..errors import ShardnodeError
from ..placement.intents import IntentKind


def register(subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    group = subparsers.add_parser(
        "group", parents=list(parents), help="add or remove a group (moves key space online); pending work",
        description="Change the number of groups while clients read and write: key space moves between groups "
                    "online, linearizably, with nothing lost (docs/sharding.md). Every change of shape is "
                    "recorded first and carried out by one scheduler at a time: `pending` shows what is "
                    "recorded and not finished, `cancel` drops a change not started, and rolls back a group "
                    "change's moves not yet frozen.",
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
    pending = commands.add_parser(
        "pending", parents=list(parents), help="changes of shape recorded and not finished, moves in progress",
        description="Every change of shape recorded in the metadata group (unfinished ones, and the last "
                    "finished ones with their outcome), the moves of key space in progress with their phase, "
                    "and who holds the scheduler's lease.",
    )
    pending.add_argument("--json", action="store_true", help="print JSON")
    pending.set_defaults(func=_pending)
    cancel_parser = commands.add_parser(
        "cancel", parents=list(parents), help="cancel a recorded change of shape",
        description="A change not started yet is dropped; a group add or remove under way rolls back the moves "
                    "not yet frozen (a frozen move can only finish). A membership change or rebalance already "
                    "under way completes.",
    )
    cancel_parser.add_argument("intent", metavar="INTENT", type=int, help="the intent's id (`group pending`)")
    cancel_parser.set_defaults(func=_cancel)


def _cluster(args: argparse.Namespace) -> ClusterConfig:
    return ClusterConfig.load(getattr(args, "config", None) or str(default_config_path()))


def _add(args: argparse.Namespace) -> int:
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()] if args.hosts else None
    return _run(args, IntentKind.GROUP_ADD, {"hosts": hosts})


def _remove(args: argparse.Namespace) -> int:
    return _run(args, IntentKind.GROUP_REMOVE, {"group": args.group})


def _run(args: argparse.Namespace, kind: IntentKind, change_args: dict) -> int:
    from ..placement.groups import GroupChangeReport
    from ..placement.shape_change import request_change
    from ..supervisor import ProcessControl

    def line(text: str) -> None:
        print(text, file=sys.stderr if args.json else sys.stdout, flush=True)

    try:
        cluster = _cluster(args)
        intent = request_change(cluster, kind, change_args, control=ProcessControl(cluster), on_line=line,
                                request_timeout=_timeout(args))
    except (ConfigError, ShardnodeError) as exc:
        print(f"shardnode: {exc}", file=sys.stderr)
        return 2
    report = GroupChangeReport.from_dict(intent.result)
    if args.json:
        print(json.dumps({**report.as_dict(), "intent": intent.intent_id}))
    else:
        print(intent.outcome)
    return 0


def _pending(args: argparse.Namespace) -> int:
    from ..placement.shape_change import pending_work

    try:
        intents, moves, lease = pending_work(_cluster(args), _timeout(args))
    except (ConfigError, ShardnodeError) as exc:
        print(f"shardnode: {exc}", file=sys.stderr)
        return 2
    now_ms = int(time.time() * 1000)
    if args.json:
        print(json.dumps({
            "intents": [{"intent": i.intent_id, "kind": i.kind.value, "args": i.args, "state": i.state.value,
                         "submitted_ms": i.submitted_ms, "updated_ms": i.updated_ms, "outcome": i.outcome,
                         "cancel_requested": i.cancel_requested, "progress": list(i.progress)} for i in intents],
            "moves": [{"move": m.move_id, "source": m.source, "target": m.target, "phase": m.phase.name.lower(),
                       "aborting": m.aborting} for m in moves],
            "lease": None if lease is None else {"holder": lease.holder, "token": lease.token,
                                                 "live": not lease.expired(now_ms)},
        }, indent=2))
        return 0
    if lease is not None and not lease.expired(now_ms):
        print(f"scheduler: {lease.holder} (token {lease.token}), lease for {(lease.expires_ms - now_ms) / 1000:.0f} s")
    else:
        print("scheduler: none running" + (f" (last token {lease.token})" if lease is not None else ""))
    unfinished = [i for i in intents if not i.state.finished]
    finished = [i for i in intents if i.state.finished]
    print(f"{len(unfinished)} unfinished change(s)" + (":" if unfinished else ""))
    for intent in sorted(unfinished, key=lambda i: i.submitted_ms):
        age = (now_ms - intent.submitted_ms) / 1000
        cancel_note = ", cancel requested" if intent.cancel_requested else ""
        last = f": {intent.progress[-1]}" if intent.progress else ""
        print(f"  {intent.intent_id}  {intent.describe()}  {intent.state.value}{cancel_note}, recorded {age:.0f} s "
              f"ago{last}")
    if moves:
        print(f"{len(moves)} move(s) in progress:")
        for move in moves:
            note = " (rolling back)" if move.aborting else ""
            print(f"  move {move.move_id}: group {move.source} -> {move.target}, {move.phase.name.lower()}{note}")
    if finished:
        print("recently finished:")
        for intent in sorted(finished, key=lambda i: i.updated_ms)[-5:]:
            print(f"  {intent.intent_id}  {intent.describe()}  {intent.state.value}: {intent.outcome}")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from ..placement.shape_change import cancel

    try:
        intent = cancel(_cluster(args), args.intent, _timeout(args))
    except (ConfigError, ShardnodeError) as exc:
        print(f"shardnode: {exc}", file=sys.stderr)
        return 2
    if intent.state.finished:
        print(f"intent {intent.intent_id} ({intent.describe()}) is {intent.state.value} already: {intent.outcome}")
    else:
        print(f"intent {intent.intent_id} ({intent.describe()}): cancel requested; the scheduler stops it where it "
              f"safely can (`shardnode group pending` shows the outcome)")
    return 0


def _timeout(args: argparse.Namespace) -> float:
    """The deadline of each request (--timeout): the metadata group's calls included."""
    return float(getattr(args, "timeout", None) or 10.0)
