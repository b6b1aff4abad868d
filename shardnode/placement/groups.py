"""Adding and removing groups while the cluster serves: `shardnode group add`,
`group remove`, and the new group that three free standby hosts form
(docs/sharding.md).

- add: the new group is recorded in the shard map with its hosts (epoch + 1),
  its workers are started there (they bootstrap from that placement), and
  once it has a leader every other group moves the tail 1/(n+1) of each of
  its ranges to it (ShardMap.plan_add), the moves running side by side;
- remove: the group's ranges go to the others, each to the one that owns the
  least (plan_remove); once it owns nothing it leaves the map and its
  workers, restarted, find their group gone and retire their data.

Moves left unfinished by an earlier run (a crashed command) are resumed
first: a change of shape never starts over an unfinished one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import ClusterConfig
from ..errors import ShardnodeError
from .shard_map import ShardMap
from .moves import MoveProgress, MoveRecord, Mover

#: How long a new group may take to elect its first leader.
LEADER_TIMEOUT = 30.0


class GroupChangeRefused(ShardnodeError):
    """A group change that is not allowed now; nothing was changed."""


@dataclass(slots=True)
class GroupChangeReport:
    group: int
    moves: int = 0
    keys: int = 0
    bytes: int = 0
    delta_keys: int = 0
    seconds: float = 0.0
    epoch: int = 0
    shares: dict[int, float] = field(default_factory=dict)


Progress = Callable[[str], None]
MoveProgressCallback = Callable[[MoveRecord, MoveProgress], None]


class GroupAdmin:
    def __init__(self, cluster: ClusterConfig, directory, groups, start_workers,  # type: ignore[no-untyped-def]
                 retire_workers=lambda group: None,
                 progress: Progress = lambda line: None,
                 on_move_progress: MoveProgressCallback | None = None) -> None:
        """`directory`: the metadata group (DirectoryPort); `groups`: the
        groups' leaders (GroupPort, with `leader_address(group)`);
        `start_workers(host_name, groups)`: starts those worker programs on
        that host (its supervisord); `retire_workers(group)`: restarts a
        removed group's workers, which then retire their data."""
        self.cluster = cluster
        self.directory = directory
        self.groups = groups
        self.start_workers = start_workers
        self.retire_workers = retire_workers
        self.progress = progress
        self.mover = Mover(groups, directory, on_move_progress)

    async def resume(self) -> int:
        """Finish the moves an earlier run left; how many there were."""
        records = await self.mover.records()
        if records:
            self.progress(f"resuming {len(records)} unfinished move(s)")
            await asyncio.gather(*(self.mover.run(r) for r in records))
        return len(records)

    # --- Adding ---------------------------------------------------------------------

    def choose_hosts(self, shard_map: ShardMap, loads: dict[str, int]) -> tuple[str, ...]:
        """`replicas` hosts for a new group: the non-standby hosts holding the
        fewest replicas now (`loads`: host → replicas), in cluster order on ties."""
        candidates = [h.name for h in self.cluster.hosts if not h.standby]
        count = min(self.cluster.replicas, len(candidates))
        order = {name: i for i, name in enumerate(candidates)}
        return tuple(sorted(sorted(candidates, key=lambda n: (loads.get(n, 0), order[n]))[:count],
                            key=order.__getitem__))

    async def add(self, hosts: tuple[str, ...] | None = None, loads: dict[str, int] | None = None) -> GroupChangeReport:
        """Add a group and give it its share. An earlier run that stopped
        part way is finished instead: its unfinished moves are resumed, or a
        group it created but had not yet given key space gets its share."""
        began = time.monotonic()
        unfinished = await self.mover.records()
        if unfinished:
            self.progress(f"finishing {len(unfinished)} move(s) an earlier run left; "
                          f"run `group add` again to add another group")
            report = GroupChangeReport(unfinished[0].target, moves=len(unfinished))
            await self._run_all(unfinished, report)
            return await self._finish(report, began)
        shard_map = await self.directory.load_map()
        idle = [g for g in shard_map.groups if not shard_map.owned_by(g)]
        if idle:
            group = idle[0]
            hosts = shard_map.placements.get(group, ())
            self.progress(f"group {group} owns no key space (an earlier run stopped early): giving it its share")
        else:
            group = self._next_group(shard_map)
            if hosts is None:
                hosts = self.choose_hosts(shard_map, loads or {})
            self._check_hosts(hosts)
            self.progress(f"group {group}: placing {len(hosts)} replicas on {', '.join(hosts)}")
            shard_map = await self.directory.update_map(shard_map, shard_map.with_group(group, hosts))
        for host in hosts:
            await asyncio.to_thread(self.start_workers, host, [group])
        await self._wait_for_leader(group)
        moves = shard_map.plan_add(group)
        self.progress(f"group {group}: moving a fair share of the key space from {len(moves)} group(s)")
        records = await self.mover.plan(moves)
        report = GroupChangeReport(group, moves=len(records))
        await self._run_all(records, report)
        return await self._finish(report, began)

    async def _finish(self, report: GroupChangeReport, began: float) -> GroupChangeReport:
        final = await self.directory.load_map()
        report.seconds = time.monotonic() - began
        report.epoch = final.epoch
        report.shares = {g: final.share(g) for g in final.groups}
        return report

    def _next_group(self, shard_map: ShardMap) -> int:
        group = shard_map.next_group
        if group >= self.cluster.max_groups:
            raise GroupChangeRefused(f"the cluster has room for {self.cluster.max_groups} groups "
                                     f"([cluster] max_groups in {self.cluster.source or 'cluster.toml'}); "
                                     f"the next would be group {group}")
        return group

    def _check_hosts(self, hosts: tuple[str, ...]) -> None:
        names = {h.name for h in self.cluster.hosts}
        unknown = [h for h in hosts if h not in names]
        if unknown:
            raise GroupChangeRefused(f"unknown host(s): {', '.join(unknown)}")
        if len(set(hosts)) != len(hosts):
            raise GroupChangeRefused("a group cannot hold two replicas on one host")
        if len(hosts) < 3:
            raise GroupChangeRefused(f"a group needs at least 3 replicas (got {len(hosts)} host(s))")

    async def _wait_for_leader(self, group: int) -> None:
        deadline = time.monotonic() + LEADER_TIMEOUT
        while time.monotonic() < deadline:
            if await self.groups.leader_address(group):
                return
            await asyncio.sleep(0.2)
        raise ShardnodeError(f"group {group} elected no leader within {LEADER_TIMEOUT:g} s; its replicas' logs "
                             f"say why (the group stays in the map, owning nothing: `group remove {group}` "
                             f"takes it out)")

    # --- Removing ---------------------------------------------------------------------

    async def remove(self, group: int) -> GroupChangeReport:
        began = time.monotonic()
        await self.resume()
        shard_map = await self.directory.load_map()
        if group not in shard_map.groups:
            raise GroupChangeRefused(f"there is no group {group} (groups: "
                                     f"{', '.join(map(str, shard_map.groups))})")
        if len(shard_map.groups) == 1:
            raise GroupChangeRefused(f"group {group} is the last group: it cannot be removed")
        moves = shard_map.plan_remove(group)
        self.progress(f"group {group}: moving its key space to {len(moves)} group(s)")
        records = await self.mover.plan(moves)
        report = GroupChangeReport(group, moves=len(records))
        await self._run_all(records, report)
        shard_map = await self.directory.load_map()
        final = await self.directory.update_map(shard_map, shard_map.without_group(group))
        self.progress(f"group {group}: owns nothing now; removed from the shard map (epoch {final.epoch})")
        await asyncio.to_thread(self.retire_workers, group)
        return await self._finish(report, began)

    async def _run_all(self, records: list[MoveRecord], report: GroupChangeReport) -> None:
        totals: dict[int, MoveProgress] = {}
        original = self.mover.on_progress

        def track(record: MoveRecord, progress: MoveProgress) -> None:
            totals[record.move_id] = progress
            original(record, progress)

        self.mover.on_progress = track
        try:
            await asyncio.gather(*(self.mover.run(r) for r in records))
        finally:
            self.mover.on_progress = original
        report.keys = sum(p.keys for p in totals.values())
        report.bytes = sum(p.bytes for p in totals.values())
        report.delta_keys = sum(p.delta_keys for p in totals.values())
