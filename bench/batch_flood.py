"""One huge Batch against a router, and what it costs: the attack of issue 20
("one request can exhaust a router"), measured.

    .venv/bin/python bench/batch_flood.py [--operations 4000000] [--json]

Starts a small cluster on loopback (3 hosts, 1 group of 3, the integration
harness of the source tree it runs from), then sends one Batch of
`--operations` empty operations (2 bytes each on the wire: 4 M of them are
an 8 MB request) to the first router, while another client sends plain gets
to the same router, one at a time (3 s deadline each). It samples the
router's resident memory (VmRSS in /proc/PID/status) every 20 ms and prints
the router's RSS before and at its peak, how the Batch ended and how long it
took, and how many of the other client's gets were served, failed, or took
over a second. Every process it started is killed on the way out.

To measure another tree (e.g. the commit before the limits), run a copy of
this file from a `git archive` of that commit, with its generated protobuf
code and PYTHONPATH pointing at it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from shardnode.proto import kv_pb2, kv_pb2_grpc  # noqa: E402
from tests.integration.harness import LocalCluster  # noqa: E402

BATCH_METHOD = "/shardnode.kv.KV/Batch"


def rss_bytes(pid: int) -> int:
    """The process's resident set size (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def empty_operations(count: int) -> bytes:
    """A serialized BatchRequest of `count` empty operations: field 1
    (operations), length 0, twice a byte per operation."""
    return b"\x0a\x00" * count


def run(operations: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="batch-flood-") as tmp:
        cluster = LocalCluster(Path(tmp) / "cluster", hosts=3, groups=1, replicas=3)
        with cluster.running(ready_timeout=60):
            router = cluster.processes[("h1", "router")]
            stop = threading.Event()
            peak = [rss_bytes(router.pid)]
            before = peak[0]
            gets = {"served": 0, "failed": 0, "slow": 0, "max_seconds": 0.0}

            def sample() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], rss_bytes(router.pid))
                    time.sleep(0.02)

            def other_client() -> None:
                with cluster.client_channel("h1") as channel:
                    stub = kv_pb2_grpc.KVStub(channel)
                    stub.Put(kv_pb2.PutRequest(key=b"other", value=b"v"), timeout=10)
                    while not stop.is_set():
                        began = time.monotonic()
                        try:
                            stub.Get(kv_pb2.GetRequest(key=b"other"), timeout=3)
                            gets["served"] += 1
                        except grpc.RpcError:
                            gets["failed"] += 1
                        took = time.monotonic() - began
                        gets["max_seconds"] = max(gets["max_seconds"], took)
                        gets["slow"] += took > 1.0
                        time.sleep(0.05)

            threads = [threading.Thread(target=sample), threading.Thread(target=other_client)]
            for thread in threads:
                thread.start()
            time.sleep(1.0)
            request = empty_operations(operations)
            began = time.monotonic()
            with cluster.client_channel("h1") as channel:
                call = channel.unary_unary(BATCH_METHOD)
                try:
                    reply = call(request, timeout=120)
                    outcome = f"OK, {len(reply)} bytes"
                except grpc.RpcError as exc:
                    outcome = f"{exc.code().name}: {exc.details()[:200]}"
            took = time.monotonic() - began
            time.sleep(2.0)       # the router's memory after the answer, and gets after it
            stop.set()
            for thread in threads:
                thread.join()
            alive = router.poll() is None
    return {
        "operations": operations, "request_bytes": len(request), "batch_outcome": outcome,
        "batch_seconds": round(took, 2), "router_rss_before_mb": round(before / 1e6, 1),
        "router_rss_peak_mb": round(peak[0] / 1e6, 1), "router_alive": alive,
        "other_gets_served": gets["served"], "other_gets_failed": gets["failed"],
        "other_gets_over_1s": gets["slow"], "other_get_max_seconds": round(gets["max_seconds"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--operations", type=int, default=4_000_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.operations)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:24} {value}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
