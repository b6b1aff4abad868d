"""Run or replay simulation seeds from the command line.

    python -m tests.sim.run --seed 1234 --trace     # replay one seed with its full trace
    python -m tests.sim.run --seeds 0:500           # a range, summary per failure
    python -m tests.sim.run --seed 22 --profile wipe --variant no-incarnation-check   # a broken core's failure
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from shardnode.raft import MessageType
from shardnode.raft.raft import Raft

from .cluster import PROFILES, Scenario, run_seed

#: Deliberately broken cores (tests/sim/test_broken_variants.py), to replay their failures.
VARIANTS = {
    # The core does not check incarnations: a wiped disk's new life is counted under the old id.
    "no-incarnation-check": lambda: setattr(Raft, "_other_incarnation_bound", lambda self, m: 0),
    # A quiesced follower is not woken by its leader's broken link (profile quiesce).
    "quiesced-leader-gone": lambda: setattr(
        Raft, "_wakes", lambda self, m, _wakes=Raft._wakes: m.type is not MessageType.UNREACHABLE and _wakes(self, m)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim.run", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, help="run this one seed")
    parser.add_argument("--seeds", default="0:100", help="range START:STOP of seeds (default 0:100)")
    parser.add_argument("--trace", action="store_true", help="print the whole trace of each run")
    parser.add_argument("--profile", default="default", choices=PROFILES,
                        help="scenario profile (default: what CI runs)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="run a deliberately broken core")
    args = parser.parse_args(argv)
    if args.variant:
        VARIANTS[args.variant]()
    if args.seed is not None:
        seeds = range(args.seed, args.seed + 1)
    else:
        start, stop = (int(part) for part in args.seeds.split(":"))
        seeds = range(start, stop)
    failures = 0
    conf_changes: Counter = Counter()
    membership_counts: Counter = Counter()
    began = time.perf_counter()
    for seed in seeds:
        result = run_seed(seed, trace=args.trace, profile=args.profile)
        conf_changes += result.conf_changes
        membership_counts += result.membership_counts
        if args.trace:
            print("\n".join(result.trace))
        if result.ok:
            if len(seeds) == 1:
                print(f"seed {seed} ok: {Scenario.from_seed(seed, args.profile).describe()}")
                print(f"  committed={result.committed} ops={result.operations} leaders={result.elections}")
                print(f"  configuration changes={dict(result.conf_changes)} membership={dict(result.membership_counts)}")
        else:
            failures += 1
            print(run_seed(seed, trace=True, profile=args.profile).report() if not args.trace else result.report())
    elapsed = time.perf_counter() - began
    print(f"{len(seeds)} seeds, {failures} failed, {elapsed:.1f}s", file=sys.stderr)
    changes = ", ".join(f"{kind} {count}" for kind, count in sorted(conf_changes.items())) or "none"
    refused = ", ".join(f"{kind} {count}" for kind, count in sorted(membership_counts.items())) or "none"
    print(f"committed configuration changes: {changes}; refusals and events: {refused}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
