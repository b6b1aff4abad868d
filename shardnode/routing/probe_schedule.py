"""When the group monitor probes a group next (routing/monitor.py).

A probe asks every host's replica of the group for its Status: with 5
routers, 4 data groups and 5 hosts, probing every second is 100 RPCs a
second, half of what an idle cluster's routers did, and a fifth of what its
data groups' workers did (docs/performance.md, "Idle cost"). What the
probes are for needs them every second only while something happens:

- calls in flight to a replica the probe finds unreachable are abandoned
  (forwarder.observe), and a group seen without a majority in two probes
  a second apart is answered "no quorum" at once (fail fast): both only
  matter while the group has requests;
- a group that lost a replica, a leader or its quorum, or changed members,
  is followed closely until it is steady again.

So a group is probed every `base` seconds (1 s) while it has operations
waiting or in flight, sent a call since the last probe, or its last probe
found anything else than the previous one, or anything unhealthy (a member
that did not answer, no leader). Each probe that finds the same healthy
group again, with no call since, doubles the interval, up to
`longest` (IDLE_PROBE_INTERVAL); any other probe brings it back to `base`. The monitor
ticks every `base` seconds and probes only the groups due, so a request for
an idle group brings its probes back within a tick.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The longest interval between probes of an idle, healthy group. A host
#: killed while nothing happens is seen this late at most (status and
#: requests probe, or fail over, at once).
IDLE_PROBE_INTERVAL = 8.0


@dataclass(slots=True)
class ProbeSchedule:
    base: float
    longest: float = IDLE_PROBE_INTERVAL
    interval: float = 0.0
    next_at: float = 0.0
    calls: int = -1          # the forwarder's calls sent, as of the last probe

    def due(self, now: float, calls: int, busy: bool) -> bool:
        """Whether to probe now: the time has come, the group has operations
        waiting or in flight, or it sent calls since the last probe."""
        return busy or calls != self.calls or now >= self.next_at

    def probed(self, at: float, *, steady: bool, calls: int) -> None:
        """A probe at `at`; `steady`: it found the same healthy group as the one before."""
        if steady and calls == self.calls:
            self.interval = min(self.longest, max(self.base, self.interval * 2))
        else:
            self.interval = self.base
        self.calls = calls
        # A little early: the monitor ticks every `base`, and a probe due a moment
        # after a tick would otherwise wait for the next one.
        self.next_at = at + self.interval - self.base / 2
