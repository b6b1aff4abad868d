"""python -m router --config etc/cluster.toml --host NAME"""

from __future__ import annotations

import argparse
import sys

from shardnode import logs
from shardnode.config import ClusterConfig, ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m router", description="Run a host's router.")
    parser.add_argument("--config", default="etc/cluster.toml", help="cluster configuration (default etc/cluster.toml)")
    parser.add_argument("--host", required=True, help="this host's name in the configuration")
    parser.add_argument("--log-level", default="INFO", help="shardnode log level (default INFO)")
    args = parser.parse_args(argv)
    try:
        cluster = ClusterConfig.load(args.config)
        cluster.host(args.host)
    except ConfigError as exc:
        print(f"router: {exc}", file=sys.stderr)
        return 2
    logs.configure(args.log_level, host=args.host)
    from shardnode.routing.server import serve  # after logging is set up

    import uvloop

    return uvloop.run(serve(cluster, args.host))


def _exit(code: int) -> None:
    """Exit once `serve` has closed everything (the logs are flushed here),
    without the interpreter's finalization, where gRPC's core waited seconds
    for connections that were going away too (worker/__main__.py)."""
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
