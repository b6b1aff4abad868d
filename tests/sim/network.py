"""A simulated network between Raft cores: delays (hence reordering), drops,
duplicates and partitions, all drawn from the scenario's seeded generator."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from shardnode.raft import Message


@dataclass(slots=True)
class NetworkFaults:
    drop_rate: float = 0.0
    duplicate_rate: float = 0.0
    min_delay: int = 1
    max_delay: int = 3


@dataclass(slots=True)
class SimNetwork:
    rng: random.Random
    faults: NetworkFaults = field(default_factory=NetworkFaults)
    # Directed links that are cut: (from, to).
    cut: set[tuple[int, int]] = field(default_factory=set)

    def partition(self, *groups: set[int]) -> None:
        """Cut every link between different groups (both directions)."""
        self.cut = set()
        for a in groups:
            for b in groups:
                if a is b:
                    continue
                for x in a:
                    for y in b:
                        self.cut.add((x, y))

    def cut_one_way(self, sender: int, receiver: int) -> None:
        self.cut.add((sender, receiver))

    def heal(self) -> None:
        self.cut = set()

    def deliveries(self, message: Message) -> list[int]:
        """Delays after which copies of `message` arrive (empty: lost)."""
        if (message.from_, message.to) in self.cut:
            return []
        rng = self.rng
        faults = self.faults
        if faults.drop_rate and rng.random() < faults.drop_rate:
            return []
        delays = [rng.randint(faults.min_delay, faults.max_delay)]
        if faults.duplicate_rate and rng.random() < faults.duplicate_rate:
            delays.append(rng.randint(faults.min_delay, faults.max_delay * 2))
        return delays
