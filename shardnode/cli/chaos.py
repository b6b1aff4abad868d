"""`shardnode chaos --duration SECONDS --faults LIST --seed N [--json]`:
workloads, a seeded nemesis and the checkers against a running cluster
(shardnode/chaos/runner.py; docs/testing.md, "Chaos").

Exit 0 when no anomaly was found and the cluster was healed and serves
again; 1 when the checkers found anomalies (listed); 2 when the run could
not be made (one line on stderr: the cluster is not ready, a fault kind
this cluster cannot take) or the cluster did not recover after the heal."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ..config import ConfigError, default_config_path
from ..errors import ShardnodeError
from ..logs import KeyValueFormatter


def register(subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    chaos = subparsers.add_parser(
        "chaos", parents=list(parents), help="faults against a running cluster, and a verdict (docs/testing.md)",
        description="Run a workload (registers checked for linearizability, a set checked for lost and "
                    "duplicated inserts) while a seeded nemesis injects faults; heal everything, wait until "
                    "every group serves, check, and print a verdict per fault kind. The same seed replays the "
                    "same schedule. partition and delay need each host in its own network namespace "
                    "(`make run-netns`); powerloss needs each host's data on a lazyfs mount.",
    )
    chaos.add_argument("--duration", type=float, default=60.0, metavar="SECONDS",
                       help="how long faults are injected (default 60)")
    chaos.add_argument("--faults", default="pause,kill,shape", metavar="LIST",
                       help="comma-separated: partition,delay,pause,kill,powerloss,shape (default pause,kill,shape)")
    chaos.add_argument("--seed", type=int, default=1, help="the schedule's seed (default 1)")
    chaos.add_argument("--clients", type=int, default=8, help="register clients (the set gets half as many)")
    chaos.add_argument("--json", action="store_true", help="the report as JSON on stdout")
    chaos.set_defaults(func=_chaos)


def _chaos(args: argparse.Namespace) -> int:
    from ..chaos.runner import ChaosError, ChaosSettings, format_report, run_chaos
    from ..chaos.schedule import parse_kinds

    try:
        kinds = parse_kinds(args.faults)
    except ValueError as exc:
        print(f"shardnode: chaos: {exc}", file=sys.stderr)
        return 2
    if args.duration < 10:
        print("shardnode: chaos: --duration must be at least 10 seconds", file=sys.stderr)
        return 2
    if args.clients < 1:
        print("shardnode: chaos: --clients must be at least 1", file=sys.stderr)
        return 2
    config = args.config or str(default_config_path())
    settings = ChaosSettings(config_path=Path(config), duration=args.duration, kinds=kinds, seed=args.seed,
                             clients=args.clients)
    # Each fault's start and end, as structured log lines on stderr.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter({}))
    chaos_log = logging.getLogger("shardnode.chaos")
    chaos_log.addHandler(handler)
    chaos_log.setLevel(logging.INFO)
    say = (lambda line: print(line, file=sys.stderr)) if args.json else print
    try:
        report = run_chaos(settings, on_line=say)
    except (ChaosError, ConfigError, ShardnodeError) as exc:
        print(f"shardnode: chaos: {exc}", file=sys.stderr)
        return 2
    finally:
        chaos_log.removeHandler(handler)
    print(report.to_json() if args.json else format_report(report))
    return report.exit_code

