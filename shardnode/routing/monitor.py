"""The router's view of every group's health: which replicas answer, who
leads, whether a majority is up.

`probe_group` asks every host's replica of a group for its Status (in
parallel, short timeout): a host's replica of group G always listens on its
`worker_port_base + G`, so this finds every member, including members added
after the router started. The group's live membership is the one its leader
(else its most advanced replica) reports; `GroupView` is what it learns. `GroupMonitor` probes every
group for the router's lifetime (how often: routing/probe_schedule.py — every
second while anything happens, less often while the group is idle and
healthy), so that:

- the forwarders know a group's leader before the first request, and can
  say why a request failed (no quorum in group N, no leader yet in group N)
  instead of a bare deadline;
- the router logs a group ready for the first time (INFO
  `router.group_ready`), losing its quorum (WARNING `router.quorum_lost`)
  and regaining it (INFO `router.quorum_regained`); a group that has not
  had a quorum since start-up is only reported once it is late
  (WARNING `router.no_quorum_yet`), so a clean start has no WARNING.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from ..background import OwnedTask
from ..config import ClusterConfig, Replica
from ..placement.group_status import freshest
from ..proto import worker_pb2 as wpb
from .probe_schedule import IDLE_PROBE_INTERVAL, ProbeSchedule

if TYPE_CHECKING:
    from .forwarder import ChannelPool, GroupForwarder

log = logging.getLogger("shardnode.router")

#: How often a group is probed while anything happens in it (the monitor's tick).
PROBE_INTERVAL = 1.0
PROBE_TIMEOUT = 0.5
#: A group without quorum this long after the router started is reported.
STARTUP_GRACE = 30.0


@dataclass(slots=True, frozen=True)
class GroupView:
    """One probe of one group. `leader_id` is 0 when no replica that answered
    is the leader (the highest term's leader wins if two claim it)."""

    group: int
    replicas: tuple[Replica, ...]           # the members: voters and learners
    answers: tuple[wpb.StatusResponse | None, ...]
    at: float                      # time.monotonic() of the probe
    learners: frozenset[int] = frozenset()
    unprobed: bool = False         # not a probe: where the map places a group no probe has reached yet

    @property
    def voters(self) -> tuple[Replica, ...]:
        return tuple(r for r in self.replicas if r.node_id not in self.learners)

    @property
    def reachable(self) -> tuple[str, ...]:
        return tuple(r.address for r, a in zip(self.replicas, self.answers) if a is not None)

    @property
    def unreachable(self) -> tuple[str, ...]:
        return tuple(r.address for r, a in zip(self.replicas, self.answers) if a is None)

    @property
    def reachable_voters(self) -> int:
        return sum(1 for r, a in zip(self.replicas, self.answers) if a is not None and r.node_id not in self.learners)

    @property
    def majority(self) -> int:
        return len(self.voters) // 2 + 1

    @property
    def leader(self) -> wpb.StatusResponse | None:
        leaders = [a for a in self.answers if a is not None and a.role == "leader"]
        return max(leaders, key=lambda a: a.term) if leaders else None

    @property
    def leader_id(self) -> int:
        leader = self.leader
        return leader.node_id if leader is not None else 0

    @property
    def has_quorum(self) -> bool:
        """A leader, and a majority of the replicas answering (what `status` shows)."""
        return self.leader is not None and self.reachable_voters >= self.majority

    def explain(self) -> str:
        """Why the group cannot serve, in the words of the error messages."""
        unreachable = self.unreachable
        if self.reachable_voters < self.majority:
            return (f"no quorum in group {self.group}: {len(unreachable)} of {len(self.replicas)} replicas "
                    f"unreachable ({', '.join(unreachable)})")
        if self.leader is None:
            return (f"no leader yet in group {self.group}: {len(self.reachable)} of {len(self.replicas)} "
                    "replicas up, electing a leader")
        return f"group {self.group} has a quorum (leader node {self.leader_id})"


async def probe_group(cluster: ClusterConfig, channels: "ChannelPool", group: int,
                      timeout: float = PROBE_TIMEOUT, known: tuple[Replica, ...] | None = None) -> GroupView:
    """Probe every host's replica of `group`. The membership is the one the
    answers report; if none reports one, `known` (the last one learned, else
    the initial placement)."""
    addresses = [h.worker_address(group) for h in cluster.hosts]

    async def ask(address: str) -> wpb.StatusResponse | None:
        try:
            answer = await channels.stub(address).Status(wpb.StatusRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return None
        return answer if answer.cluster == cluster.name and answer.group == group else None

    by_address = dict(zip(addresses, await asyncio.gather(*(ask(a) for a in addresses))))
    replicas, learners = _membership(cluster, group, by_address, known)
    answers = []
    for replica in replicas:
        answer = by_address.get(replica.address)
        # The replica at that address now may be a newer member than the one listed.
        answers.append(answer if answer is not None and answer.node_id == replica.node_id else None)
    return GroupView(group, replicas, tuple(answers), time.monotonic(), learners)


def _membership(cluster: ClusterConfig, group: int, answers: dict[str, wpb.StatusResponse | None],
                known: tuple[Replica, ...] | None) -> tuple[tuple[Replica, ...], frozenset[int]]:
    best = freshest(answers.values())
    if best is None:
        return (known if known is not None else cluster.group_replicas(group)), frozenset()
    hosts = {h.worker_address(group): h for h in cluster.hosts}
    replicas = tuple(Replica(group, m.node_id, hosts[m.address]) for m in best.members if m.address in hosts)
    return replicas, frozenset(m.node_id for m in best.members if m.learner)


class GroupMonitor(OwnedTask):
    """Probes every group periodically; owned by the router's KVService
    (`start` in the event loop, `close` cancels and awaits the task).
    `forwarders` (group → forwarder) is the router's live table: groups the
    shard map adds are probed from the next round, those it drops no more."""

    def __init__(self, cluster: ClusterConfig, channels: "ChannelPool",
                 forwarders: Mapping[int, "GroupForwarder"], interval: float = PROBE_INTERVAL,
                 idle_interval: float = IDLE_PROBE_INTERVAL) -> None:
        self.cluster = cluster
        self.channels = channels
        self.forwarders = forwarders
        self.interval = interval
        self.idle_interval = idle_interval
        self._started = time.monotonic()
        # Per group: None until it first had a quorum, then whether it has one now.
        self._had_quorum: dict[int, bool | None] = {}
        self._lost_at: dict[int, float] = {}
        self._late_reported: set[int] = set()
        self._schedules: dict[int, ProbeSchedule] = {}

    task_name = "router group monitor"

    def start(self) -> None:
        if self._task is None:
            self._started = time.monotonic()
        super().start()

    def _due(self, forwarder: "GroupForwarder", now: float) -> bool:
        schedule = self._schedules.get(forwarder.group)
        return schedule is None or schedule.due(now, forwarder.stats.calls, forwarder.busy)

    async def _run(self) -> None:
        while True:
            began = time.monotonic()
            try:
                # Every tick looks at every group; only those due are probed.
                due = [f for f in list(self.forwarders.values()) if self._due(f, began)]
                views = await asyncio.gather(*(probe_group(self.cluster, self.channels, f.group, known=f.members)
                                               for f in due))
                for view in views:
                    self.observe(view)
            except Exception:       # a bug here must not stop the monitoring for good
                log.exception("router.monitor_failed")
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - began)))

    def observe(self, view: GroupView) -> None:
        """Take one probe's result: hand it to the group's forwarder, log a change of quorum."""
        forwarder = self.forwarders.get(view.group)
        if forwarder is None:           # dropped from the shard map meanwhile
            return
        changed = forwarder.view is None or not same_picture(forwarder.view, view)
        forwarder.observe(view)
        group = view.group
        now = view.at
        schedule = self._schedules.setdefault(group, ProbeSchedule(self.interval, self.idle_interval))
        schedule.probed(now, steady=not changed and healthy(view), calls=forwarder.stats.calls)
        had = self._had_quorum.get(group)
        fields = {"group": group, "leader": view.leader_id, "reachable": len(view.reachable),
                  "replicas": len(view.replicas)}
        if forwarder.membership_changed:
            log.info("router.membership_changed", extra={"group": group, "voters": [r.node_id for r in view.voters],
                                                         "learners": sorted(view.learners)})
        if view.has_quorum:
            if had is False:
                log.info("router.quorum_regained",
                         extra={**fields, "term": view.leader.term if view.leader else 0,
                                "after_s": round(now - self._lost_at.get(group, now), 1)})
            elif had is None:
                # Once per group and router: when this router first sees the group ready.
                log.info("router.group_ready", extra={**fields, "term": view.leader.term if view.leader else 0,
                                                      "after_s": round(now - self._started, 1)})
            self._had_quorum[group] = True
            return
        if had:
            self._had_quorum[group] = False
            self._lost_at[group] = now
            log.warning("router.quorum_lost", extra={**fields, "unreachable": ",".join(view.unreachable) or "none",
                                                     "reason": _reason(view)})
        elif had is None and group not in self._late_reported and now - self._started >= STARTUP_GRACE:
            self._late_reported.add(group)
            log.warning("router.no_quorum_yet", extra={**fields, "since_start_s": round(now - self._started, 1),
                                                       "unreachable": ",".join(view.unreachable) or "none",
                                                       "reason": _reason(view)})


def healthy(view: GroupView) -> bool:
    """Led, and every member answered the probe."""
    return not view.unprobed and view.leader is not None and all(a is not None for a in view.answers)


def same_picture(before: GroupView, after: GroupView) -> bool:
    """Whether two probes found the same group: members, who answered, who leads in which term."""
    leader_before, leader_after = before.leader, after.leader
    return (before.replicas == after.replicas and before.learners == after.learners
            and before.unprobed == after.unprobed
            and [a is None for a in before.answers] == [a is None for a in after.answers]
            and (leader_before is None) == (leader_after is None)
            and (leader_before is None or (leader_before.node_id, leader_before.term)
                 == (leader_after.node_id, leader_after.term)))


def _reason(view: GroupView) -> str:
    return "no_majority" if view.reachable_voters < view.majority else "no_leader"
