"""`shardnode`: the command line.

    shardnode [--config etc/cluster.toml] [--timeout 10] COMMAND ...

    put KEY VALUE      set KEY; prints OK (--prev-kv: then the previous value, if any)
    put KEY --value-file FILE   the value from FILE (`-`: standard input), for large values
    get KEY            writes the value (raw; --output FILE); nothing and exit 1 if KEY is absent
    delete KEY         remove KEY; prints 1, or 0 if it was absent (--prev-kv: then the previous value)
    status             one row per replica (--json for machine output); exits 1 if a
                       group has no quorum; --wait SECONDS waits until every group has one
    bench              YCSB-style benchmark (shardnode bench --help)
    die/start/leave/member/...  process control and cluster shape (shardnode/cli/admin.py)
    chaos              workloads, a seeded nemesis and checkers (shardnode/cli/chaos.py)
    audit              the admin actions this machine's servers recorded (shardnode/cli/audit.py)

Exit status: 0 success, 1 `get` found no value or `status` found a group
without quorum, 2 error (one line on stderr, "shardnode: ...", never a
traceback for a user error; usage errors too), 130 interrupted.

Without --config: $SHARDNODE_CONFIG, else etc/cluster.toml in the current
directory, else the one of the checkout shardnode runs from
(shardnode.config.default_config_path).

Keys and values on the command line are taken as the bytes the shell passed
(os.fsencode), so non-UTF-8 arguments round-trip. Values are written as raw
bytes, followed by a newline only when standard output is a terminal.

Admin commands: `shardnode.cli.admin.register(subparsers)` adds sub-parsers;
each sets `func` (`set_defaults(func=...)`) to a callable taking the parsed
arguments (which carry `config` and `timeout`) and returning an exit status.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from .. import __version__
from ..config import DEFAULT_CONFIG, ConfigError, default_config_path
from ..errors import ShardnodeError

# Every command starts in well under 0.2 s: the client (gRPC, protobuf,
# asyncio), rich and the control plane are imported by the commands that use
# them, not here (measured with `python -X importtime -m shardnode.cli --help`).
if TYPE_CHECKING:
    from ..client import Client
    from ..proto import kv_pb2
from . import leases_watch  # light: parses lease ids; imports the client when a command runs

PROG = "shardnode"
DEFAULT_TIMEOUT = 10.0
EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_NOT_READY = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
#: A replica this many entries behind its leader is shown as lagging.
LAGGING_ENTRIES = 100

_EPILOG = f"""\
exit status: 0 success; 1 `get` found no value (nothing is printed), or
`status` found a group without quorum; 2 error (one line on stderr);
130 interrupted.

--config: without it, $SHARDNODE_CONFIG if set, else {DEFAULT_CONFIG} in the
current directory, else the one of the shardnode checkout.
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line ("shardnode: ...", exit 2)."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see `{self.prog} --help`)"
        self.exit(EXIT_ERROR, f"{PROG}: {' '.join(message.split())}{hint}\n")


class _UsageError(Exception):
    """A command-line mistake found after parsing (one line, exit 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:               # --help, --version, usage errors (argparse printed them)
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    func = getattr(args, "func", None)
    if func is None:
        return _error("a command is required (see `shardnode --help`)")
    try:
        if args.config is None:
            args.config = str(default_config_path())
        status = func(args)
        return EXIT_OK if status is None else int(status)
    except (ShardnodeError, ConfigError, _UsageError) as exc:
        return _error(str(exc))
    except KeyboardInterrupt:
        return _error("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        # The reader went away (`shardnode status | head`): not an error worth a line.
        try:
            sys.stdout = open(os.devnull, "w")       # noqa: SIM115 - silence the flush at exit
        except OSError:
            pass
        return EXIT_ERROR


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (exposed for documentation and tests)."""
    # The global options are accepted before and after the command; after it
    # they must not reset what was given before, hence SUPPRESS defaults there.
    common = _Parser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH",
                        help=f"cluster configuration (default: {DEFAULT_CONFIG}; see `shardnode --help`)")
    common.add_argument("--timeout", type=_positive_float, default=argparse.SUPPRESS, metavar="SECONDS",
                        help=f"deadline of each request (default: {DEFAULT_TIMEOUT:g})")

    parser = _Parser(
        prog=PROG, description="Command line of a shardnode cluster.", epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, metavar="PATH",
                        help=f"cluster configuration (default: {DEFAULT_CONFIG}, see below)")
    parser.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"deadline of each request, in seconds (default: {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    put = commands.add_parser("put", parents=[common], help="set a key; prints OK",
                              description="Set KEY to VALUE, or to the bytes of --value-file. Prints OK (as etcdctl "
                                          "does); with --prev-kv, then the previous value, if there was one.")
    put.add_argument("key", metavar="KEY")
    put.add_argument("value", metavar="VALUE", nargs="?",
                     help="the value (a command-line argument is limited to 128 KiB: use --value-file beyond)")
    put.add_argument("--value-file", metavar="FILE",
                     help="read the value from FILE, or from standard input if FILE is -")
    put.add_argument("--prev-kv", action="store_true",
                     help="after OK, print the previous value (raw, as `get` prints values)")
    _wait_option(put)
    put.add_argument("--lease", type=leases_watch.lease_id, default=0, metavar="ID",
                     help="attach the key to this lease (hexadecimal, as `lease grant` prints it)")
    put.set_defaults(func=_cmd_put)

    get = commands.add_parser("get", parents=[common], help="print a key's value (raw bytes)",
                              description="Write the value of KEY (linearizable) as the bytes it is: a newline "
                                          "follows only when standard output is a terminal, so `get K > file` "
                                          "gives back exactly what `put K --value-file file` stored. If KEY is "
                                          "absent, write nothing and exit with status 1.")
    get.add_argument("key", metavar="KEY")
    get.add_argument("--stale", action="store_true",
                     help="allow a possibly stale read from any replica (faster, not linearizable)")
    get.add_argument("--output", "-o", metavar="FILE",
                     help="write the value to FILE instead of standard output (nothing is written if KEY is absent)")
    get.add_argument("--prefix", action="store_true",
                     help="every key that starts with KEY, with its value, one line each, in key order (as "
                          "etcdctl does; exit 1 if there is none; docs/etcd.md)")
    get.add_argument("--limit", type=_non_negative_int, default=0, metavar="N",
                     help="with --prefix: at most N keys (0: all)")
    get.add_argument("--keys-only", action="store_true", help="with --prefix: the keys alone")
    _wait_option(get)
    get.set_defaults(func=_cmd_get)

    scan = commands.add_parser("scan", parents=[common], help="print the keys of a range and their values",
                               description="Print every key of [START, END) and its value, one line each, in "
                                           "key order (END omitted: to the last key; START omitted: from the "
                                           "first). Gathered from every group: each group's part is "
                                           "linearizable, the whole is not one snapshot (docs/etcd.md).")
    scan.add_argument("start", metavar="START", nargs="?", default="")
    scan.add_argument("end", metavar="END", nargs="?", default="")
    scan.add_argument("--limit", type=_non_negative_int, default=0, metavar="N", help="at most N keys (0: all)")
    scan.add_argument("--keys-only", action="store_true", help="the keys alone")
    scan.add_argument("--stale", action="store_true", help="each group's local replica, without a read barrier")
    scan.add_argument("--json", action="store_true",
                      help="one JSON object: kvs (key, value as UTF-8 with backslash escapes, create_revision, "
                           "mod_revision, version), count, more, revision")
    scan.set_defaults(func=_cmd_scan)

    cas = commands.add_parser("cas", parents=[common], help="compare-and-set: set a key if it holds a value",
                              description="Set KEY to NEW if it holds --expect VALUE (or is absent, with "
                                          "--expect-absent): atomic, applied once. Exit 0 if it was set; else "
                                          "print the value KEY holds (nothing if absent) and exit 1.")
    cas.add_argument("key", metavar="KEY")
    cas.add_argument("new", metavar="NEW")
    expectation = cas.add_mutually_exclusive_group(required=True)
    expectation.add_argument("--expect", metavar="VALUE", help="the value KEY must hold")
    expectation.add_argument("--expect-absent", action="store_true", help="KEY must be absent")
    cas.set_defaults(func=_cmd_cas)

    delete = commands.add_parser("delete", parents=[common], help="remove a key; prints 1 (removed) or 0 (absent)",
                                 description="Remove KEY. Prints the number of keys removed, 1 or 0 (as etcdctl "
                                             "does); with --prev-kv, then the previous value, if there was one.")
    delete.add_argument("key", metavar="KEY")
    delete.add_argument("--prev-kv", action="store_true",
                        help="after the count, print the previous value (raw, as `get` prints values)")
    _wait_option(delete)
    delete.set_defaults(func=_cmd_delete)

    status = commands.add_parser("status", parents=[common], help="groups, replicas, leaders, lag",
                                 description="One row per replica: group, host, node, role, term, commit and "
                                             "applied index, lag and health. The leader is bold; a group "
                                             "without quorum is red.")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--wait", type=_non_negative_float, default=None, metavar="SECONDS",
                        help="wait up to SECONDS until every group has a leader and a quorum (then print "
                             "the status and exit 0; else one line and exit 1)")
    status.set_defaults(func=_cmd_status)

    from .. import bench as bench_module
    bench = commands.add_parser(
        "bench", parents=[common], help="YCSB-style benchmark",
        description="YCSB-style closed-loop benchmark. Workloads: load (insert every key once), "
                    "a (50% read / 50% update), b (95/5), c (read only). Run `load` first. "
                    "Only successful operations count; errors are reported separately. The summary says "
                    "which engine ran, how many callers and over how many connections.")
    bench.add_argument("--workload", choices=list(bench_module.WORKLOADS), default="a")
    bench.add_argument("--engine", choices=list(bench_module.ENGINES), default=None,
                       help="async (default): the callers are asyncio tasks sharing one AsyncClient, whose "
                            "concurrent operations are coalesced on one stream per router (what the system can "
                            "do); threads: threads sharing one blocking Client (what a threaded program of "
                            "blocking calls gets)")
    bench.add_argument("--clients", "--callers", dest="clients", type=_positive_int, default=None, metavar="N",
                       help="concurrent callers (default: 256 with the async engine, 16 with threads)")
    bench.add_argument("--keys", type=_positive_int, default=10_000, metavar="N",
                       help="size of the key space (default: 10000)")
    bench.add_argument("--value-size", type=_non_negative_int, default=100, metavar="BYTES",
                       help="value size (default: 100)")
    bench.add_argument("--duration", type=_positive_float, default=None, metavar="SECONDS",
                       help="how long to run (default: 10 for a, b, c; load runs until every key is in, "
                            "unless a duration is given)")
    bench.add_argument("--distribution", choices=list(bench_module.DISTRIBUTIONS), default="zipfian",
                       help="key choice (default: zipfian, scrambled, theta 0.99)")
    bench.add_argument("--key-prefix", default="ycsb/", help="prefix of the keys (default: ycsb/)")
    bench.add_argument("--seed", type=int, default=None, help="seed of the key and operation choice")
    bench.add_argument("--client-per-thread", action="store_true",
                       help="one Client per thread instead of one shared Client (the threads engine)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar (none either when stdout "
                                                                   "is not a terminal)")
    bench.add_argument("--json", action="store_true", help="print the summary as JSON")
    bench.set_defaults(func=_cmd_bench)

    leases_watch.register(commands, parents=[common])
    from . import audit       # light: reads files; nothing of gRPC or the servers
    audit.register(commands, parents=[common])
    _register_admin(commands, common)
    return parser


def _wait_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", dest="wait_for_quorum", action="store_true",
                        help="if the key's group has no quorum, wait for it until --timeout (default: fail at once "
                             "with 'no quorum in group N', as Redis Cluster answers CLUSTERDOWN)")


def _register_admin(commands: Any, common: argparse.ArgumentParser) -> None:
    try:
        from . import admin
    except ImportError as exc:
        # The admin commands need supervisor; say so, keep the data commands working.
        print(f"{PROG}: admin commands unavailable: {exc}", file=sys.stderr)
        return
    admin.register(commands, parents=[common])
    from . import groups
    groups.register(commands, parents=[common])
    from . import chaos
    chaos.register(commands, parents=[common])
    from . import access
    access.register(commands, parents=[common])


# --- Commands ----------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    from ..client import Client

    return Client.from_config(args.config, timeout=args.timeout,
                              wait_for_quorum=getattr(args, "wait_for_quorum", False))


def _cmd_put(args: argparse.Namespace) -> int:
    value = _value_argument(args)
    with _client(args) as client:
        old = client.put(os.fsencode(args.key), value, lease=args.lease)
    _print_line("OK")
    if args.prev_kv and old is not None:
        _write_value(old)
    return EXIT_OK


def _cmd_get(args: argparse.Namespace) -> int:
    if args.prefix:
        with _client(args) as client:
            pairs = client.scan(prefix=os.fsencode(args.key), limit=args.limit, keys_only=args.keys_only,
                                allow_stale=args.stale)
        _write_pairs(pairs, args.keys_only)
        return EXIT_OK if pairs else EXIT_NOT_FOUND
    if args.limit or args.keys_only:
        raise _UsageError("get: --limit and --keys-only go with --prefix")
    with _client(args) as client:
        value = client.get(os.fsencode(args.key), allow_stale=args.stale)
    if value is None:
        return EXIT_NOT_FOUND
    if args.output is None:
        _write_value(value)
        return EXIT_OK
    try:
        with open(args.output, "wb") as f:
            f.write(value)
    except OSError as exc:
        raise _UsageError(f"get: cannot write {args.output}: {exc.strerror}") from None
    return EXIT_OK


def _cmd_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        old = client.delete(os.fsencode(args.key))
    _print_line("0" if old is None else "1")
    if args.prev_kv and old is not None:
        _write_value(old)
    return EXIT_OK


def _cmd_scan(args: argparse.Namespace) -> int:
    with _client(args) as client:
        response = client.scan_items(os.fsencode(args.start), os.fsencode(args.end), limit=args.limit,
                                     keys_only=args.keys_only, allow_stale=args.stale)
    if args.json:
        print(json.dumps({
            "kvs": [{"key": _text(i.key), "value": _text(i.value), "create_revision": i.create_revision,
                     "mod_revision": i.mod_revision, "version": i.version} for i in response.items],
            "count": response.count, "more": response.more, "revision": response.revision}))
        return EXIT_OK
    _write_pairs([(i.key, i.value) for i in response.items], args.keys_only)
    return EXIT_OK


def _cmd_cas(args: argparse.Namespace) -> int:
    expected = None if args.expect_absent else os.fsencode(args.expect)
    with _client(args) as client:
        swapped, current = client.compare_and_set(os.fsencode(args.key), expected, os.fsencode(args.new))
    if swapped:
        return EXIT_OK
    if current is not None:
        _write_value(current)
    return EXIT_NOT_FOUND


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="backslashreplace")


def _write_pairs(pairs: list[tuple[bytes, bytes]], keys_only: bool) -> None:
    """Each key, then its value, one line each, as etcdctl prints a range
    (a listing is lines, on a terminal or not; `get KEY` writes one raw value)."""
    for key, value in pairs:
        _write_line(key)
        if not keys_only:
            _write_line(value)


def _write_line(data: bytes) -> None:
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:                  # a text-only stdout (tests capturing it)
        sys.stdout.write(data.decode("utf-8", errors="backslashreplace") + "\n")
        return
    sys.stdout.flush()
    buffer.write(data + b"\n")
    buffer.flush()


def _value_argument(args: argparse.Namespace) -> bytes:
    if (args.value is None) == (args.value_file is None):
        raise _UsageError("put: give either VALUE or --value-file FILE")
    if args.value is not None:
        return os.fsencode(args.value)
    if args.value_file == "-":
        return sys.stdin.buffer.read()
    try:
        with open(args.value_file, "rb") as f:
            return f.read()
    except OSError as exc:
        raise _UsageError(f"put: cannot read {args.value_file}: {exc.strerror}") from None


def _cmd_status(args: argparse.Namespace) -> int:
    from .ready import NotReady, every_group, wait_ready

    with _client(args) as client:
        if args.wait is None:
            status = client.status()
        else:
            try:
                status = wait_ready(client, args.wait)
            except NotReady as exc:
                return _error(str(exc), EXIT_NOT_READY)
    if args.json:
        print(json.dumps(status_dict(status), indent=2))
    else:
        print_table(status_table(status))
    return EXIT_OK if all(g.has_quorum for g in every_group(status)) else EXIT_NOT_READY


def _cmd_bench(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .. import bench as bench_module

    engine = args.engine or ("threads" if args.client_per_thread else "async")
    try:
        config = bench_module.BenchConfig(
            workload=args.workload, clients=args.clients or bench_module.DEFAULT_CALLERS[engine], keys=args.keys,
            value_size=args.value_size, duration=args.duration, distribution=args.distribution,
            key_prefix=args.key_prefix, seed=args.seed, client_per_thread=args.client_per_thread, engine=engine)
    except ValueError as exc:
        raise _UsageError(f"bench: {exc}") from None
    _client(args).close()      # a bad configuration is one error line, not N
    console = Console(file=sys.stdout)
    progress = not args.no_progress and sys.stdout.isatty()

    def async_client():  # type: ignore[no-untyped-def]
        from ..client import AsyncClient

        return AsyncClient.from_config(args.config, timeout=args.timeout)

    result = bench_module.run_bench(lambda: _client(args), config, progress=progress, console=console,
                                    make_async_client=async_client)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_table(bench_module.render_summary(result))
    kinds = ", ".join(f"{name} {count}" for name, count in result.errors_by_type.most_common())
    if result.stopped_by:
        return _error(f"bench: stopped after {result.ops:,} operations: {result.stopped_by}")
    if result.ops == 0 and result.errors:
        return _error(f"bench: no operation succeeded ({kinds})")
    if not result.complete:
        if result.interrupted:
            why = "interrupted"
        elif args.duration is not None and result.elapsed >= args.duration:
            why = f"--duration {args.duration:g} s ran out"
        else:
            why = f"keys that failed {bench_module.LOAD_ATTEMPTS} times were left out ({kinds})"
        missing = config.keys - result.loaded
        _error(f"bench: loaded only {result.loaded:,} of {config.keys:,} keys ({missing:,} missing: {why}); "
               "reads of the missing keys will find no value")
        return EXIT_INTERRUPTED if result.interrupted else EXIT_ERROR
    return EXIT_INTERRUPTED if result.interrupted else EXIT_OK


# --- Status rendering ---------------------------------------------------------------------------


def replica_health(replica: kv_pb2.ReplicaStatus) -> str:
    if not replica.reachable:
        return "down"
    if replica.lag > LAGGING_ENTRIES:
        return "lagging"
    return "ok"


def status_dict(status: kv_pb2.StatusResponse) -> dict[str, Any]:
    """The status as plain JSON-able data (stable field names, integers as numbers)."""
    result = {
        "cluster": status.cluster,
        "router_host": status.router_host,
        "shard_map_epoch": status.shard_map_epoch,
        "groups": [group_dict(group) for group in status.groups],
    }
    if status.HasField("metadata_group"):
        result["metadata_group"] = group_dict(status.metadata_group)
    return result


def group_dict(group: kv_pb2.GroupStatus) -> dict[str, Any]:
    """One group of the status as JSON-able data ("name": "meta" and "kind":
    "meta" for the metadata group; "kind": "data" for the others)."""
    from ..config import METADATA_GROUP

    return {
        "group": group.group,
        "name": group.name or str(group.group),
        "kind": "meta" if group.group == METADATA_GROUP else "data",
        "leader_id": group.leader_id,
        "has_quorum": group.has_quorum,
        "share": group.share,
        "replicas": [
            {
                "host": r.host,
                "node_id": r.node_id,
                "address": r.address,
                "reachable": r.reachable,
                "role": r.role,
                "leader": group.leader_id != 0 and r.node_id == group.leader_id,
                "term": r.term,
                "commit_index": r.commit_index,
                "applied_index": r.applied_index,
                "last_index": r.last_index,
                "lag": r.lag,
                "quiesced": r.quiesced,
                "health": replica_health(r),
                "process_state": r.process_state,
                "restarts": r.restarts,
                "process_problem": r.process_problem,
            }
            for r in group.replicas
        ],
    }


def status_table(status: kv_pb2.StatusResponse) -> Any:
    """A rich Table: one row per replica; the leader bold, a group without quorum red."""
    from rich.table import Table

    from .ready import every_group

    with_quorum = sum(1 for g in status.groups if g.has_quorum)
    caption = f"{len(status.groups)} groups, {with_quorum} with quorum"
    idle = sum(1 for g in status.groups if g.replicas and all(r.quiesced for r in g.replicas if r.reachable))
    if idle:
        caption += f", {idle} idle (quiesced)"
    if status.HasField("metadata_group"):
        caption += "; metadata group: " + ("quorum" if status.metadata_group.has_quorum else "NO QUORUM (no change "
                                                                                              "of shape possible)")
    problems = [f"{r.host} group {g.name or g.group}: {r.process_problem}"
                for g in every_group(status) for r in g.replicas if r.process_problem]
    if problems:
        caption += "\nNOT RUNNING: " + "\nNOT RUNNING: ".join(problems)
    table = Table(title=f"{status.cluster} (router {status.router_host}, shard map epoch {status.shard_map_epoch})",
                  caption=caption)
    for column, justify in (("group", "right"), ("share", "right"), ("host", "left"), ("node", "right"), ("role", "left"),
                            ("term", "right"), ("commit", "right"), ("applied", "right"), ("lag", "right"),
                            ("health", "left"), ("process", "left")):
        table.add_column(column, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for group in every_group(status):
        group_label = (group.name or str(group.group)) + ("" if group.has_quorum else " (no quorum)")
        for i, r in enumerate(group.replicas):
            leader = group.leader_id != 0 and r.node_id == group.leader_id
            style = " ".join(s for s in ("bold" if leader else "", "" if group.has_quorum else "red") if s)
            if r.reachable:
                cells = [r.role or "?", str(r.term), str(r.commit_index), str(r.applied_index), str(r.lag)]
            else:
                cells = ["-", "-", "-", "-", "-"]
            process = process_label(r.process_state, r.restarts)
            share = "-" if group.name == "meta" else _share(group.share)
            table.add_row(group_label if i == 0 else "", share if i == 0 else "", r.host, str(r.node_id), *cells, replica_health(r), process,
                          style=style or None, end_section=i == len(group.replicas) - 1)
    return table


# --- Helpers ----------------------------------------------------------------------------------------


#: supervisord's state of a replica's program, as the status table says it.
PROCESS_WORDS = {"RUNNING": "running", "STARTING": "starting", "BACKOFF": "backing off", "FATAL": "fatal",
                 "STOPPED": "stopped", "STOPPING": "stopping", "EXITED": "exited", "": "unknown"}


def process_label(state: str, restarts: int) -> str:
    """The status table's process column: the program's state (from its
    host's router, else its supervisord; "unknown" when neither answers) and
    how often it was restarted after an unexpected end."""
    label = PROCESS_WORDS.get(state, state.lower())
    if restarts:
        label += f" ({restarts} restart{'s' if restarts != 1 else ''})"
    return label


def _share(fraction: float) -> str:
    """A group's share of the key space, as a percentage."""
    return f"{fraction * 100:.1f}%"


def print_table(table: Any) -> None:
    """Print a rich table on stdout; piped or redirected, never cut to 80 columns."""
    from rich.console import Console

    console = Console(file=sys.stdout)
    if not console.is_terminal:
        natural = console.measure(table, options=console.options.update_width(1000)).maximum
        console = Console(file=sys.stdout, width=max(console.width, natural))
    console.print(table)


def _print_line(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _write_value(value: bytes) -> None:
    """Write a value as the bytes it is; a newline after it only when
    standard output is a terminal (for the prompt), never into a pipe or a
    file, so that binary values round-trip."""
    sys.stdout.flush()
    buffer = getattr(sys.stdout, "buffer", None)
    terminal = sys.stdout.isatty()
    if buffer is None:                  # a text-only stdout (tests capturing it)
        sys.stdout.write(value.decode("utf-8", errors="backslashreplace") + ("\n" if terminal else ""))
        sys.stdout.flush()
        return
    buffer.write(value + b"\n" if terminal else value)
    buffer.flush()


def _error(message: str, status: int = EXIT_ERROR) -> int:
    # One line, always: server messages could carry newlines.
    print(f"{PROG}: {' '.join(message.split())}", file=sys.stderr)
    return status


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number of seconds, at least 0 (got {text})")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number (got {text})")
    return value


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {text})")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0 (got {text})")
    return value


def _int(text: str) -> int:
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
