"""`shardnode bench` on the default cluster's shape, in a temporary directory.

    .venv/bin/python bench/default_cluster.py [--clients 32] [--workload a] [--duration 10]

Starts 5 hosts on 127.0.0.1-5 under supervisord with 4 groups of 5
replicas (etc/cluster.toml's shape, fsync on, 100 ms ticks), loads the key
space (`shardnode bench --workload load`), runs the workload, prints the
bench's JSON summary, and stops everything. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.ports import write_cluster_toml  # noqa: E402
from tests.integration.supervised import start_supervised  # noqa: E402


def _bench(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardnode.cli", "--config", str(config), "bench", "--json",
                           "--no-progress", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="32")
    parser.add_argument("--workload", default="a")
    parser.add_argument("--duration", default="10")
    parser.add_argument("--keys", default="10000")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config = write_cluster_toml(tmp, name="bench-default", hosts=5, groups=4, replicas=5, tick_ms=100)
        with start_supervised(tmp, config):
            ready = subprocess.run([sys.executable, "-m", "shardnode.cli", "--config", str(config), "status",
                                    "--wait", "180"], cwd=ROOT, capture_output=True, text=True, timeout=300)
            if ready.returncode != 0:
                print(ready.stderr, file=sys.stderr)
                return 1
            time.sleep(2)
            loaded = _bench(config, "--workload", "load", "--keys", args.keys, "--clients", "32")
            if loaded.returncode != 0:
                print(loaded.stderr, file=sys.stderr)
                return 1
            run = _bench(config, "--workload", args.workload, "--clients", args.clients, "--keys", args.keys,
                         "--duration", args.duration)
            print(run.stdout.strip())
            if run.returncode != 0:
                print(run.stderr, file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
