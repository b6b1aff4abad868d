"""How long a change of membership takes with data in the group.

    .venv/bin/python bench/membership.py [--keys 10000] [--value-size 1024] [--snapshot-threshold 2000]

One group of 3 replicas on hosts h1-h3 (real worker processes, fsync on,
loopback), plus an empty host h4. It loads KEYS keys of VALUE_SIZE bytes,
then measures: the time for h4 to join (learner added, started empty,
caught up — by snapshot when the log was compacted — and promoted to
voter), and the time for h1's replica to leave (removal committed, the
replica retired). Prints one JSON line. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardnode.config import ClusterConfig  # noqa: E402
from shardnode.placement.membership import MembershipAdmin  # noqa: E402
from shardnode.proto import worker_pb2 as pb  # noqa: E402
from tests.integration.harness import WorkerGroup, put  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--value-size", type=int, default=1024)
    parser.add_argument("--snapshot-threshold", type=int, default=2_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        group = WorkerGroup(Path(tmp), size=4, replicas=3, snapshot_threshold=args.snapshot_threshold, tick_ms=50)
        try:
            for host in ("h1", "h2", "h3"):
                group.start(host)
            result = asyncio.run(_measure(group, args))
        finally:
            group.stop_all()
    print(json.dumps(result))
    return 0


async def _measure(group: WorkerGroup, args: argparse.Namespace) -> dict:
    cluster = ClusterConfig.load(group.config_path)
    admin = MembershipAdmin(cluster, launch=lambda server, groups: group.start("h4"), timeout=300)
    try:
        await group.wait_leader(timeout=30)
        value = b"v" * args.value_size
        began = time.monotonic()
        for start in range(0, args.keys, 100):
            response = await group.execute([put(b"key-%07d" % i, value) for i in range(start, min(start + 100, args.keys))],
                                           timeout=30)
            assert response.status == pb.ExecuteResponse.OK, response
        load_seconds = time.monotonic() - began
        began = time.monotonic()
        member = await asyncio.to_thread(admin.add_member, 0, "h4")
        join_seconds = time.monotonic() - began
        status = await group.status("h4")
        began = time.monotonic()
        await asyncio.to_thread(admin.remove_member, 0, "h1")
        leave_seconds = time.monotonic() - began
        return {
            "keys": args.keys, "value_size": args.value_size, "snapshot_threshold": args.snapshot_threshold,
            "load_seconds": round(load_seconds, 2), "join_seconds": round(join_seconds, 2),
            "joined_node": member.node_id, "snapshots_received": status.snapshots_received if status else None,
            "leave_seconds": round(leave_seconds, 2),
        }
    finally:
        admin.close()
        await group.close_channels()


if __name__ == "__main__":
    sys.exit(main())
