"""A chaos run's schedule of faults, drawn from its seed.

The schedule is pure data: the same seed, fault kinds and duration give the
same faults, in the same order, at the same offsets, against the same hosts
(by their place in cluster.toml). What only the running cluster can say —
which host leads a group at that moment — is named by the fault ("the
leader of group 2") and looked up when it starts, so a replay aims at the
same role, not necessarily the same host.

Two tracks run side by side: one fault at a time of the network and process
kinds (so that no more than one host is down or cut off by them at once, and
a majority of every group is always meant to be reachable), and, when asked
for, changes of shape on their own track, each followed by its inverse, so
that the cluster ends as it began.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

#: Bounds of one fault and of the quiet time after it (seconds).
FAULT_SECONDS = (3.0, 8.0)
QUIET_SECONDS = (2.0, 5.0)
#: Bounds of a change of shape's stay before its inverse, and of the time between changes.
SHAPE_HOLD_SECONDS = (5.0, 15.0)
SHAPE_GAP_SECONDS = (3.0, 10.0)
#: Quiet time at the start (the workload warms up) and before the end (the last fault heals).
LEAD_IN_SECONDS = 3.0
TAIL_SECONDS = 3.0


class FaultKind(enum.Enum):
    PARTITION = "partition"
    DELAY = "delay"
    PAUSE = "pause"
    KILL = "kill"
    POWERLOSS = "powerloss"
    SHAPE = "shape"


#: What `--faults` accepts, in the order verdicts are printed.
ALL_KINDS = tuple(FaultKind)
#: The kinds that need each host in its own network namespace.
NETWORK_KINDS = frozenset({FaultKind.PARTITION, FaultKind.DELAY})

#: The variants of each kind (docs/testing.md, "Chaos", describes each).
VARIANTS: dict[FaultKind, tuple[str, ...]] = {
    FaultKind.PARTITION: ("halves", "isolate-leader", "bridge", "ring", "one-way-from-leader",
                          "one-way-to-leader"),
    FaultKind.DELAY: ("delay-all", "delay-one", "lossy-all", "reorder-all"),
    FaultKind.PAUSE: ("host", "leader"),
    FaultKind.KILL: ("host", "leader"),
    FaultKind.POWERLOSS: ("host",),
    FaultKind.SHAPE: ("member", "leave", "group", "rebalance"),
}


@dataclass(slots=True, frozen=True)
class PlannedFault:
    """One fault of the schedule. `hosts`: the hosts it acts on, in the
    order the variant uses them (a partition's sides, a ring's order), as
    places in the host list; `group`: the group whose leader it aims at
    (variants naming a leader) or changes (shape)."""

    kind: FaultKind
    variant: str
    at: float               # seconds after the run's start
    duration: float
    hosts: tuple[int, ...] = ()
    group: int = 0
    delay_ms: int = 0
    jitter_ms: int = 0
    loss_percent: float = 0.0
    reorder_percent: float = 0.0

    def describe(self) -> str:
        return f"{self.kind.value}/{self.variant}"


def parse_kinds(text: str) -> tuple[FaultKind, ...]:
    """`--faults` ("partition,kill,shape"): the kinds, in our order; a
    ValueError naming the unknown ones."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    known = {kind.value: kind for kind in FaultKind}
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ValueError(f"unknown fault kind(s) {', '.join(unknown) or '(none given)'}: "
                         f"choose from {','.join(k.value for k in FaultKind)}")
    chosen = {known[name] for name in names}
    return tuple(kind for kind in ALL_KINDS if kind in chosen)


#: The delay variant that needs no netem (random loss with nftables): the
#: only one drawn where the kernel has no netem qdisc.
LOSS_ONLY = "lossy-all"


def plan(seed: int, kinds: tuple[FaultKind, ...], duration: float, host_count: int,
         groups: int, netem: bool = True) -> list[PlannedFault]:
    """The schedule of a run of `duration` seconds, sorted by start.
    `netem`: whether delay, jitter and reordering can be made here (else
    every delay fault is random loss)."""
    rng = random.Random(seed)
    faults: list[PlannedFault] = []
    track = [kind for kind in kinds if kind is not FaultKind.SHAPE]
    end = duration - TAIL_SECONDS
    at = LEAD_IN_SECONDS
    while track:
        length = round(rng.uniform(*FAULT_SECONDS), 2)
        if at + length > end:
            break
        kind = rng.choice(track)
        faults.append(_draw(rng, kind, at, length, host_count, groups, netem))
        at += length + round(rng.uniform(*QUIET_SECONDS), 2)
    if FaultKind.SHAPE in kinds:
        shape_rng = random.Random(seed * 7919 + 1)   # its own stream: adding a kind keeps the other track
        at = LEAD_IN_SECONDS + 2.0
        while True:
            hold = round(shape_rng.uniform(*SHAPE_HOLD_SECONDS), 2)
            if at + hold > end:
                break
            faults.append(_draw(shape_rng, FaultKind.SHAPE, at, hold, host_count, groups, netem))
            at += hold + round(shape_rng.uniform(*SHAPE_GAP_SECONDS), 2)
    return sorted(faults, key=lambda f: f.at)


def _draw(rng: random.Random, kind: FaultKind, at: float, length: float, host_count: int,
          groups: int, netem: bool) -> PlannedFault:
    variant = rng.choice(VARIANTS[kind])
    if kind is FaultKind.DELAY and not netem:
        variant = LOSS_ONLY         # (drawn all the same: the rest of the schedule stays as it is)
    order = list(range(host_count))
    rng.shuffle(order)
    group = rng.randrange(groups)
    fault = PlannedFault(kind, variant, round(at, 2), length, tuple(order), group)
    if kind is FaultKind.DELAY:
        # Every figure is drawn whatever the variant, so that the stream (and
        # the rest of the schedule) does not depend on it.
        delay_ms, jitter_ms = rng.choice((20, 50, 100, 200)), rng.choice((0, 10, 50))
        loss_percent, reorder_percent = rng.choice((1.0, 5.0, 10.0)), rng.choice((10.0, 25.0))
        fault = PlannedFault(kind, variant, fault.at, length, fault.hosts, group,
                             delay_ms=0 if variant == LOSS_ONLY else delay_ms,
                             jitter_ms=0 if variant == LOSS_ONLY else jitter_ms,
                             loss_percent=loss_percent if variant in (LOSS_ONLY, "delay-all") else 0.0,
                             reorder_percent=reorder_percent if variant == "reorder-all" else 0.0)
    return fault
