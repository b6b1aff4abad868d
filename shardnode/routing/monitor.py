"""The router's view of every group's health: which replicas answer, who
leads, whether a majority is up.

`probe_group` asks every replica of a group for its Status (in parallel,
short timeout); `GroupView` is what it learns. `GroupMonitor` probes every
group once per `interval` for the router's lifetime, so that:

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from ..config import ClusterConfig, Replica
from ..proto import worker_pb2 as wpb

if TYPE_CHECKING:
    from .forwarder import ChannelPool, GroupForwarder

log = logging.getLogger("shardnode.router")

PROBE_INTERVAL = 1.0
PROBE_TIMEOUT = 0.5
#: A group without quorum this long after the router started is reported.
STARTUP_GRACE = 30.0


@dataclass(slots=True, frozen=True)
class GroupView:
    """One probe of one group. `leader_id` is 0 when no replica that answered
    is the leader (the highest term's leader wins if two claim it)."""

    group: int
    replicas: tuple[Replica, ...]
    answers: tuple[wpb.StatusResponse | None, ...]
    at: float                      # time.monotonic() of the probe

    @property
    def reachable(self) -> tuple[str, ...]:
        return tuple(r.address for r, a in zip(self.replicas, self.answers) if a is not None)

    @property
    def unreachable(self) -> tuple[str, ...]:
        return tuple(r.address for r, a in zip(self.replicas, self.answers) if a is None)

    @property
    def majority(self) -> int:
        return len(self.replicas) // 2 + 1

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
        return self.leader is not None and len(self.reachable) >= self.majority

    def explain(self) -> str:
        """Why the group cannot serve, in the words of the error messages."""
        unreachable = self.unreachable
        if len(self.reachable) < self.majority:
            return (f"no quorum in group {self.group}: {len(unreachable)} of {len(self.replicas)} replicas "
                    f"unreachable ({', '.join(unreachable)})")
        if self.leader is None:
            return (f"no leader yet in group {self.group}: {len(self.reachable)} of {len(self.replicas)} "
                    "replicas up, electing a leader")
        return f"group {self.group} has a quorum (leader node {self.leader_id})"


async def probe_group(cluster: ClusterConfig, channels: "ChannelPool", group: int,
                      timeout: float = PROBE_TIMEOUT) -> GroupView:
    replicas = cluster.group_replicas(group)

    async def ask(address: str) -> wpb.StatusResponse | None:
        try:
            return await channels.stub(address).Status(wpb.StatusRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return None

    answers = await asyncio.gather(*(ask(r.address) for r in replicas))
    return GroupView(group, replicas, tuple(answers), time.monotonic())


class GroupMonitor:
    """Probes every group periodically; owned by the router's KVService
    (`start` in the event loop, `close` cancels and awaits the task)."""

    def __init__(self, cluster: ClusterConfig, channels: "ChannelPool",
                 forwarders: Sequence["GroupForwarder"], interval: float = PROBE_INTERVAL) -> None:
        self.cluster = cluster
        self.channels = channels
        self.forwarders = forwarders
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._started = time.monotonic()
        # Per group: None until it first had a quorum, then whether it has one now.
        self._had_quorum: list[bool | None] = [None] * len(forwarders)
        self._lost_at: list[float] = [0.0] * len(forwarders)
        self._late_reported = [False] * len(forwarders)

    def start(self) -> None:
        if self._task is None:
            self._started = time.monotonic()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="router group monitor")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            began = time.monotonic()
            try:
                views = await asyncio.gather(*(probe_group(self.cluster, self.channels, f.group)
                                               for f in self.forwarders))
                for view in views:
                    self.observe(view)
            except Exception:       # a bug here must not stop the monitoring for good
                log.exception("router.monitor_failed")
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - began)))

    def observe(self, view: GroupView) -> None:
        """Take one probe's result: hand it to the group's forwarder, log a change of quorum."""
        forwarder = self.forwarders[view.group]
        forwarder.observe(view)
        group = view.group
        now = view.at
        had = self._had_quorum[group]
        fields = {"group": group, "leader": view.leader_id, "reachable": len(view.reachable),
                  "replicas": len(view.replicas)}
        if view.has_quorum:
            if had is False:
                log.info("router.quorum_regained",
                         extra={**fields, "term": view.leader.term if view.leader else 0,
                                "after_s": round(now - self._lost_at[group], 1)})
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
        elif had is None and not self._late_reported[group] and now - self._started >= STARTUP_GRACE:
            self._late_reported[group] = True
            log.warning("router.no_quorum_yet", extra={**fields, "since_start_s": round(now - self._started, 1),
                                                       "unreachable": ",".join(view.unreachable) or "none",
                                                       "reason": _reason(view)})


def _reason(view: GroupView) -> str:
    return "no_majority" if len(view.reachable) < view.majority else "no_leader"
