"""What one write costs the state machine: ReplicaStore.apply of client
puts and deletes, in batches as the worker applies them, with the log
entries persisted first (unsynced here: the fsync is the same before and
after any change to apply, and would drown the difference).

    .venv/bin/python bench/store_apply.py [--writes 40000] [--batch 64] [--rounds 5] [--json]
    PYTHONPATH=/path/to/another/checkout .venv/bin/python bench/store_apply.py   # the same, on other code

It reports the CPU time of apply() per write, the best of `--rounds` runs
(the one least disturbed by other processes on the machine), for new keys (each creates a record in the position index), for
overwrites of existing keys (the common write: no index change), and for
deletes (each drops an index record), with and without client sessions.
This is how the position index's cost on the write path was measured
(docs/sharding.md, "The position index").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shardnode.keyspace import SPACE, KeyRange, RangeSet  # noqa: E402
from shardnode.raft import Entry, HardState  # noqa: E402
from shardnode.storage import Command, CommandOp, ReplicaStore, encode_command  # noqa: E402


def _entries(op: CommandOp, keys: list[bytes], first_index: int, sequence_base: int | None) -> list[Entry]:
    """One command per key; with sessions (`sequence_base` not None), 64
    clients taking turns, their sequences above `sequence_base`."""
    value = None if op is CommandOp.DELETE else b"v" * 100
    entries = []
    for offset, key in enumerate(keys):
        client, sequence = (0, 0) if sequence_base is None else (offset % 64 + 1, sequence_base + offset // 64 + 1)
        command = Command(op, key, value, client, sequence, 1_000 + offset)
        entries.append(Entry(1, first_index + offset, encode_command(command)))
    return entries


def run(writes: int, batch: int, sessions: bool, root: str | None) -> dict[str, float]:
    """CPU microseconds of apply() per write, by kind of write."""
    path = tempfile.mkdtemp(dir=root)
    store = ReplicaStore.open(path, initial_voters=(1,))
    # A data group (its ownership checked at apply), owning the whole space.
    store.configure_ownership(RangeSet([KeyRange(0, SPACE)]))
    keys = [b"bench-key-%08d" % i for i in range(writes)]
    index = 1
    result: dict[str, float] = {}
    try:
        phases = (("new", CommandOp.PUT), ("overwrite", CommandOp.PUT), ("delete", CommandOp.DELETE))
        for number, (name, op) in enumerate(phases):
            entries = _entries(op, keys, index, number * writes if sessions else None)
            spent = 0.0
            for start in range(0, len(entries), batch):
                chunk = entries[start:start + batch]
                store.persist(HardState(1, 1, chunk[-1].index), chunk)
                began = time.process_time()
                store.apply(chunk)
                spent += time.process_time() - began
            index += len(entries)
            result[name] = spent / len(entries) * 1e6
    finally:
        store.close()
        shutil.rmtree(path, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=40_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    figures: dict[str, dict[str, float]] = {}
    for sessions in (False, True):
        runs = [run(args.writes, args.batch, sessions, root) for _ in range(args.rounds)]
        label = "with sessions" if sessions else "no sessions"
        figures[label] = {kind: min(r[kind] for r in runs) for kind in runs[0]}
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        import shardnode
        print(f"code: {Path(shardnode.__file__).parent.parent}; {args.writes} writes per kind, batches of "
              f"{args.batch}, best of {args.rounds} rounds; CPU µs of apply() per write")
        for label, kinds in figures.items():
            print(f"  {label:14} " + "  ".join(f"{kind} {value:5.2f}" for kind, value in kinds.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
