"""`shardnode audit`: the admin actions the servers of this machine recorded
(shardnode/audit.py; docs/security.md, "Audit log"; docs/cli.md).

    shardnode audit [--host NAME] [--since ISO|DURATION] [--limit N] [--json]

Reads the audit files (rotated ones included) of every host of cluster.toml
whose data directory is on this machine (or of --host alone), merges their
lines by time, and prints one line per action, or the JSON lines as they
are with --json. It reads files only: it works with the cluster down.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..config import ClusterConfig

EXIT_OK = 0
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def register(commands: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser]) -> None:
    audit = commands.add_parser(
        "audit", parents=list(parents), help="the admin actions recorded by the servers of this machine",
        description="Print the audit log of admin actions (membership changes, leadership transfers, key-space "
                    "moves, process control, shard map writes) that the workers and the process control of the "
                    "hosts whose data directories are on this machine recorded, merged by time: time, host, "
                    "process, caller (certificate name or -, then its address), method, what was asked, and how "
                    "it ended (docs/security.md, \"Audit log\").")
    audit.add_argument("--host", metavar="NAME", help="this host's files only (default: every host of the "
                                                      "configuration whose files are here)")
    audit.add_argument("--since", type=since, metavar="ISO|DURATION",
                       help="only what happened since then: a time (2026-12-07T05:00:00Z; without a zone, UTC) "
                            "or a duration back from now (90s, 15m, 2h, 1d)")
    audit.add_argument("--limit", type=_non_negative_int, default=0, metavar="N",
                       help="the last N actions only (0: all)")
    audit.add_argument("--json", action="store_true", help="the JSON lines as the servers wrote them")
    audit.set_defaults(func=_run)


def since(text: str) -> str:
    """--since as the audit lines write time (UTC, milliseconds, Z), so that
    it compares with them as text."""
    from datetime import datetime, timedelta, timezone   # here: `shardnode --help` starts without it

    duration = _DURATION.match(text.strip())
    if duration:
        moment = datetime.now(timezone.utc) - timedelta(seconds=float(duration[1]) * _UNITS[duration[2]])
    else:
        try:
            moment = datetime.fromisoformat(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a time (2026-12-07T05:00:00Z) nor a duration (15m, 2h): "
                                             f"{text!r}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {value}")
    return value


def _run(args: argparse.Namespace) -> int:
    cluster = ClusterConfig.load(args.config)
    hosts = [cluster.host(args.host).name] if args.host else [host.name for host in cluster.hosts]
    directories = [cluster.audit_dir(name) for name in hosts]
    files = [path for directory in directories if directory.is_dir() for path in _audit_files(directory)]
    if not files:
        where = ", ".join(str(d) for d in directories)
        print(f"shardnode: no audit log here ({where}): the servers write one at their first admin action",
              file=sys.stderr)
        return EXIT_OK
    entries, unreadable = read_entries(files, since=args.since)
    if args.limit:
        entries = entries[-args.limit:]
    for entry, raw in entries:
        sys.stdout.write((raw if args.json else format_entry(entry)) + "\n")
    sys.stdout.flush()
    if unreadable:
        print(f"shardnode: skipped {unreadable} unreadable audit line(s) (a line cut by a crash, or not JSON)",
              file=sys.stderr)
    return EXIT_OK


def _audit_files(directory: Path) -> Iterator[Path]:
    """A directory's audit files, rotated ones (.jsonl.1, .jsonl.2 …) included."""
    for path in sorted(directory.iterdir()):
        if path.is_file() and (path.name.endswith(".jsonl") or ".jsonl." in path.name):
            yield path


def read_entries(files: Sequence[Path], since: str | None = None) -> tuple[list[tuple[dict[str, Any], str]], int]:
    """Every line of `files` at or after `since`, oldest first, as (entry,
    raw line); and how many lines were unreadable."""
    entries: list[tuple[dict[str, Any], str]] = []
    unreadable = 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            print(f"shardnode: cannot read {path}: {exc.strerror}", file=sys.stderr)
            continue
        for raw in text.splitlines():
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw)
            except ValueError:
                unreadable += 1
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("time"), str):
                unreadable += 1
                continue
            if since is None or entry["time"] >= since:
                entries.append((entry, raw))
    # Every server writes the time the same way (UTC, milliseconds, Z): as text it sorts by time.
    # The sort is stable: lines of one file within a millisecond keep their order.
    entries.sort(key=lambda item: item[0]["time"])
    return entries, unreadable


def format_entry(entry: dict[str, Any]) -> str:
    """One action on one line: time, host, process, caller, method, what, outcome."""
    process = entry.get("component") or "?"
    if entry.get("group") is not None:
        process += f"/g{entry['group']}"
    caller = f"{entry.get('identity') or '-'}@{entry.get('peer') or '?'}"
    outcome = str(entry.get("outcome"))
    if entry.get("answer"):
        outcome += f" ({entry['answer']})"
    if entry.get("calls", 1) != 1:
        outcome += f" [{entry['calls']} calls]"
    return "  ".join((entry["time"], str(entry.get("host")), process, caller, str(entry.get("method")),
                      str(entry.get("summary") or "-"), outcome))
