"""python -m worker --config etc/cluster.toml --host NAME --group G"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from shardnode import logs
from shardnode.config import METADATA_GROUP, ClusterConfig, ConfigError


def _stopped_while_starting(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _group(text: str) -> int:
    return METADATA_GROUP if text == "meta" else int(text)


def main(argv: list[str] | None = None) -> int:
    # Until the event loop takes the signals over, a stop asked during
    # start-up (imports, finding its place) is a clean exit, not a kill.
    signal.signal(signal.SIGTERM, _stopped_while_starting)
    parser = argparse.ArgumentParser(prog="python -m worker", description="Run one member of one Raft group.")
    parser.add_argument("--config", default="etc/cluster.toml", help="cluster configuration (default etc/cluster.toml)")
    parser.add_argument("--host", required=True, help="this host's name in the configuration")
    parser.add_argument("--group", required=True, type=_group,
                        help="the group this worker serves: a data group's number, or 'meta' (the metadata group)")
    parser.add_argument("--log-level", default="INFO", help="shardnode log level (default INFO)")
    args = parser.parse_args(argv)
    try:
        cluster = ClusterConfig.load(args.config)
        cluster.host(args.host)
        if not (args.group == METADATA_GROUP or cluster.is_data_group(args.group)):
            raise ConfigError(f"unknown group {args.group} (groups are 0..{cluster.max_groups - 1} and 'meta')")
    except ConfigError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return 2
    # The node id is known once the worker has found its place in the group
    # (shardnode/replica/identity.py); records that concern a replica carry it.
    logs.configure(args.log_level, host=args.host, group=args.group)
    from shardnode.replica.server import serve  # after logging is set up

    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency
        runner = asyncio.run
    return runner(serve(cluster, args.host, args.group))


def _exit(code: int) -> None:
    """Exit now that everything durable is closed (the worker's store was
    closed before `serve` returned; the logs are flushed here), without the
    interpreter's finalization: there gRPC's core waits for connections to
    peers that are going away too, 4-6 s per worker when a whole cluster
    stops at once (measured), which made stopping the local cluster slow."""
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
