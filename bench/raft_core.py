"""Micro-benchmark of the Raft core alone: proposals committed per second in
a 5-node in-process cluster over a perfect, instant network (no disk, no
sockets), for several proposal batch sizes.

    .venv/bin/python bench/raft_core.py [--seconds 3] [--nodes 5] [--json]

What it measures is the protocol's own CPU cost per committed entry in this
Python implementation (also given as CPU time per entry, which holds on a
busy machine where the wall-clock rate does not), i.e. the ceiling the core puts on one group's
throughput before any I/O.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shardnode.raft import Config, ConfState, MemoryStorage, RawNode, StateRole  # noqa: E402


class Cluster:
    def __init__(self, size: int) -> None:
        voters = tuple(range(1, size + 1))
        self.storages = {i: MemoryStorage(ConfState(voters=voters)) for i in voters}
        self.nodes = {
            i: RawNode(Config(id=i, max_inflight_msgs=256, max_size_per_msg=1 << 20), self.storages[i], random.Random(i))
            for i in voters
        }
        self.inbox: list = []
        self.applied = 0

    def pump(self) -> None:
        """Run every Ready and deliver every message until the cluster is quiet."""
        nodes, storages = self.nodes, self.storages
        while True:
            moved = False
            for node_id, node in nodes.items():
                if node.has_ready():
                    ready = node.ready()
                    storage = storages[node_id]
                    if ready.entries:
                        storage.append(ready.entries)
                    if ready.hard_state is not None:
                        storage.set_hard_state(ready.hard_state)
                    self.inbox.extend(ready.messages)
                    if node_id == 1:
                        self.applied += len(ready.committed_entries)
                    node.advance(ready)
                    moved = True
            if self.inbox:
                messages, self.inbox = self.inbox, []
                for message in messages:
                    nodes[message.to].step(message)
                moved = True
            if not moved:
                return


def run(batch: int, seconds: float, size: int, value_size: int) -> dict:
    cluster = Cluster(size)
    leader = cluster.nodes[1]
    leader.campaign()
    cluster.pump()
    assert leader.status().role is StateRole.LEADER
    payloads = [b"x" * value_size] * batch
    start_applied = cluster.applied
    proposed = 0
    began = time.perf_counter()
    cpu_began = time.process_time()
    deadline = began + seconds
    while time.perf_counter() < deadline:
        # Keep several batches in flight, as a busy group would.
        for _ in range(4):
            leader.propose_batch(payloads)
            proposed += batch
        cluster.pump()
    elapsed = time.perf_counter() - began
    cpu = time.process_time() - cpu_began
    committed = cluster.applied - start_applied
    return {
        "nodes": size,
        "batch": batch,
        "value_bytes": value_size,
        "seconds": round(elapsed, 2),
        "committed": committed,
        "committed_per_second": round(committed / elapsed),
        # CPU time, not wall time: what the core costs, whatever else the machine runs.
        "cpu_us_per_entry": round(1e6 * cpu / committed, 2) if committed else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--value-size", type=int, default=100)
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = [run(int(b), args.seconds, args.nodes, args.value_size) for b in args.batches.split(",")]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'batch':>6} {'committed/s':>12} {'CPU us/entry':>13}  "
              f"({args.nodes} nodes, {args.value_size}-byte entries, {args.seconds}s each)")
        for r in results:
            print(f"{r['batch']:>6} {r['committed_per_second']:>12,} {r['cpu_us_per_entry']:>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
