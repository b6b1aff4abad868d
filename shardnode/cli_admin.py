"""Process administration subcommands of the `shardnode` command line:

    shardnode die SERVER [--clean]       stop a host (router address) or one worker (worker address)
    shardnode start SERVER [--new]       start it again from its data
    shardnode supervisor-conf --host NAME [--output FILE]

The main CLI calls `register(subparsers)`; each subcommand stores its handler
as `args.func`, which takes the parsed namespace (with the global
`args.config`) and returns the exit code: 0 ok, 2 error (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .config import ClusterConfig, ConfigError
from .errors import ShardnodeError
from .supervisor import ProcessControl, Target, host_config

DEFAULT_CONFIG = "etc/cluster.toml"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `die`, `start` and `supervisor-conf` to the main parser's subparsers."""
    server_help = ("ADDRESS:PORT as in the configuration: a router address means the whole host "
                   "(router and all its workers), a worker address that worker alone")

    die = subparsers.add_parser(
        "die", help="stop a host or a worker (it stays down until `start`)",
        description="Stop a host or a worker through its host's supervisord; it stays down until `start`.",
    )
    die.add_argument("server", metavar="SERVER", help=server_help)
    die.add_argument("--clean", action="store_true",
                     help="graceful stop: leadership handed over, state flushed (default: SIGKILL, as a crash)")
    die.set_defaults(func=_die)

    start = subparsers.add_parser(
        "start", help="start a stopped host or worker again",
        description="Start a host or a worker again through its host's supervisord; it recovers from its data.",
    )
    start.add_argument("server", metavar="SERVER", help=server_help)
    start.add_argument("--new", action="store_true",
                       help="join with empty state (not supported yet: needs the membership protocol)")
    start.set_defaults(func=_start)

    conf = subparsers.add_parser(
        "supervisor-conf", help="write the supervisord configuration of one host",
        description="Write the supervisord configuration of one real host: its router and one "
                    "worker per group replica it holds, XML-RPC on the host's address:supervisor_port.",
    )
    conf.add_argument("--host", required=True, metavar="NAME", help="the host's name in the configuration")
    conf.add_argument("--output", "-o", metavar="FILE", help="write to FILE (default: standard output)")
    conf.add_argument("--python", default=sys.executable, metavar="PATH",
                      help="the Python that runs the router and workers on that host (default: this one)")
    conf.add_argument("--project-root", default=str(PROJECT_ROOT), metavar="DIR",
                      help="the shardnode checkout on that host (default: this one)")
    conf.set_defaults(func=_supervisor_conf)

    from .cli import certs

    certs.register(subparsers)


def _die(args: argparse.Namespace) -> int:
    def run() -> str:
        target = _control(args).stop(args.server, clean=args.clean)
        how = "stopped cleanly" if args.clean else "killed"
        return f"{_describe(target, args.server)} {how}; it stays down until `shardnode start {args.server}`"

    return _guarded(run)


def _start(args: argparse.Namespace) -> int:
    def run() -> str:
        target = _control(args).start(args.server, new=args.new)
        return f"{_describe(target, args.server)} running"

    return _guarded(run)


def _supervisor_conf(args: argparse.Namespace) -> int:
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
    return getattr(args, "config", None) or DEFAULT_CONFIG


def _control(args: argparse.Namespace) -> ProcessControl:
    return ProcessControl(ClusterConfig.load(_config_path(args)))


def _describe(target: Target, server: str) -> str:
    if target.whole_host:
        return f"host {target.host.name} ({server}: {', '.join(target.programs)})"
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
