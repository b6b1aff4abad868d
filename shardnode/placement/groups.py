"""Adding and removing groups while the cluster serves: the work behind the
`group add` and `group remove` intents, and the new group that three free
standby hosts form (docs/sharding.md).

- add: the new group's number and hosts are recorded in the intent's work
  first, then in the shard map (epoch + 1); its workers are started there
  (they bootstrap from that placement), and once it has a leader every other
  group moves the tail 1/(n+1) of each of its ranges to it
  (ShardMap.plan_add), the moves running side by side;
- remove: the group's ranges go to the others, each to the one that owns the
  least (plan_remove); once it owns nothing it leaves the map and its
  workers, restarted, find their group gone and retire their data.

Only the scheduler that holds the lease runs this (scheduler.py): its
fencing token goes with every shard command, its lease guards every write to
the metadata group, and two group changes never run at once. A run that
stopped anywhere is carried on by the next holder from the intent's work and
the move records: the group it chose, the moves it recorded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import ClusterConfig
from ..errors import ShardnodeError
from .intents import ShapeRefused
from .moves import MoveError, MoveProgress, MoveRecord, MoveSuperseded, Mover, Phase
from .shard_map import ShardMap

#: How long a new group may take to elect its first leader.
LEADER_TIMEOUT = 30.0


class GroupChangeRefused(ShapeRefused):
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
    cancelled: bool = False
    removed: bool = False

    def summary(self) -> str:
        if self.cancelled:
            return (f"group {self.group}: cancelled; {self.moves} move(s) rolled back or finished "
                    f"(shard map epoch {self.epoch})")
        shares = ", ".join(f"{g}: {s:.1%}" for g, s in sorted(self.shares.items()))
        return (f"group {self.group}: {self.moves} move(s), {self.keys:,} keys ({self.bytes:,} bytes) copied and "
                f"{self.delta_keys:,} caught up in {self.seconds:.1f} s; shard map epoch {self.epoch}; "
                f"shares: {shares}")

    def as_dict(self) -> dict[str, Any]:
        return {"group": self.group, "moves": self.moves, "keys": self.keys, "bytes": self.bytes,
                "delta_keys": self.delta_keys, "seconds": round(self.seconds, 3), "shard_map_epoch": self.epoch,
                "shares": {str(g): round(s, 4) for g, s in self.shares.items()}, "cancelled": self.cancelled}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GroupChangeReport:
        return cls(int(data.get("group", 0)), int(data.get("moves", 0)), int(data.get("keys", 0)),
                   int(data.get("bytes", 0)), int(data.get("delta_keys", 0)), float(data.get("seconds", 0.0)),
                   int(data.get("shard_map_epoch", 0)),
                   {int(g): float(s) for g, s in (data.get("shares") or {}).items()},
                   bool(data.get("cancelled", False)))


Say = Callable[[str], Awaitable[None]]
MoveProgressCallback = Callable[[MoveRecord, MoveProgress], None]


async def _quiet(line: str) -> None:
    return None


async def _never() -> bool:
    return False


class GroupAdmin:
    def __init__(self, cluster: ClusterConfig, directory, groups, start_workers,  # type: ignore[no-untyped-def]
                 retire_workers=lambda group: None, say: Say = _quiet,
                 on_move_progress: MoveProgressCallback | None = None, *, fence: int = 0,
                 guards: tuple[tuple[bytes, bytes | None], ...] = (), work: dict[str, Any] | None = None,
                 save: Callable[..., Awaitable[None]] | None = None) -> None:
        """`directory`: the metadata group (DirectoryPort); `groups`: the
        groups' leaders (GroupPort, with `leader_address(group)`);
        `start_workers(host_name, groups)`: starts those worker programs on
        that host (its supervisord); `retire_workers(group)`: restarts a
        removed group's workers, which then retire their data; `fence`,
        `guards`: the scheduler's token and lease guard; `work`, `save`: the
        intent's durable choices and how to record more."""
        self.cluster = cluster
        self.directory = directory
        self.groups = groups
        self.start_workers = start_workers
        self.retire_workers = retire_workers
        self.say = say
        self.guards = guards
        self.work: dict[str, Any] = dict(work or {})
        self._save = save
        self.mover = Mover(groups, directory, on_move_progress, fence=fence, guards=guards)

    async def _record(self, **values: Any) -> None:
        self.work.update(values)
        if self._save is not None:
            await self._save(**values)

    async def resume(self) -> int:
        """Finish the moves an earlier run left, side by side; one that
        cannot go on now (its group has no leader) does not hold the others
        up. Returns how many there were; MoveError naming the ones that
        failed (they are resumed by the next scheduler)."""
        records = await self.mover.records()
        if not records:
            return 0
        await self.say(f"finishing {len(records)} unfinished move(s) an earlier run left")
        outcomes = await asyncio.gather(*(self._run_move(r) for r in records), return_exceptions=True)
        failed = [(r, o) for r, o in zip(records, outcomes) if isinstance(o, BaseException)]
        for _, outcome in failed:
            if not isinstance(outcome, (MoveError, ShardnodeError)):
                raise outcome
        if failed:
            raise MoveError("; ".join(f"move {r.move_id} (group {r.source} -> {r.target}): {o}" for r, o in failed))
        return len(records)

    async def _run_move(self, record: MoveRecord, cancelled: Callable[[], Awaitable[bool]] = _never) -> bool:
        """Run a move to its end one phase at a time, saying each phase (the
        progress an operator follows, and where a killed command stopped).
        Cancelled before its freeze, it is rolled back instead (False); from
        the freeze on it can only finish."""
        name = f"move {record.move_id % 10000:04d} (group {record.source} -> {record.target})"
        try:
            return await self._run_move_phases(record, name, cancelled)
        except MoveSuperseded as exc:
            if not exc.finished:
                raise
            await self.say(f"{name}: finished by another run")
            return True

    async def _run_move_phases(self, record: MoveRecord, name: str,
                               cancelled: Callable[[], Awaitable[bool]]) -> bool:
        if record.aborting:
            # A rollback an earlier run began: finished now, or (frozen meanwhile) the move goes forward.
            record = await self.mover.run(record)
            await self.say(f"{name}: {'rolled back' if record.aborting else 'done'}")
            return not record.aborting
        while True:
            if record.phase < Phase.FROZEN and await cancelled():
                try:
                    await self.mover.abort(record)
                    await self.say(f"{name}: rolled back")
                    return False
                except MoveError:
                    pass            # frozen meanwhile: it can only go forward
            phase = record.phase
            record = await self.mover.run(record, stop_after=phase)
            if record.phase == phase:
                await self.say(f"{name}: done")
                return True
            await self.say(f"{name}: {record.phase.name.lower()}")

    # --- Adding ---------------------------------------------------------------------

    def choose_hosts(self, shard_map: ShardMap, loads: dict[str, int]) -> tuple[str, ...]:
        """`replicas` hosts for a new group: the non-standby hosts holding the
        fewest replicas now (`loads`: host → replicas), in cluster order on ties."""
        candidates = [h.name for h in self.cluster.hosts if not h.standby]
        count = min(self.cluster.replicas, len(candidates))
        order = {name: i for i, name in enumerate(candidates)}
        return tuple(sorted(sorted(candidates, key=lambda n: (loads.get(n, 0), order[n]))[:count],
                            key=order.__getitem__))

    async def add(self, hosts: tuple[str, ...] | None = None, loads: dict[str, int] | None = None,
                  cancelled: Callable[[], Awaitable[bool]] = _never) -> GroupChangeReport:
        """Add a group and give it its share. The group's number and hosts
        are recorded in the work record before the map names them, so a run
        carried on after a crash finishes the same group."""
        began = time.monotonic()
        shard_map = await self.directory.load_map()
        group = self.work.get("group")
        if group is None:
            group = self._next_group(shard_map)
            if hosts is None:
                hosts = self.choose_hosts(shard_map, loads or {})
            self._check_hosts(tuple(hosts))
            await self._record(group=group, hosts=list(hosts))
        hosts = tuple(self.work.get("hosts") or shard_map.placements.get(group, ()))
        if group in shard_map.retired:
            raise GroupChangeRefused(f"group {group} was removed meanwhile")
        if group not in shard_map.groups:
            await self.say(f"group {group}: placing {len(hosts)} replicas on {', '.join(hosts)}")
            shard_map = await self.directory.update_map(shard_map, shard_map.with_group(group, hosts),
                                                        guards=self.guards)
        for host in hosts:
            await asyncio.to_thread(self.start_workers, host, [group])
        await self._wait_for_leader(group)
        records = [r for r in await self.mover.records() if r.target == group]
        shard_map = await self.directory.load_map()
        if not records and not shard_map.owned_by(group):
            if await cancelled():
                return await self._cancel([], GroupChangeReport(group), began)
            moves = shard_map.plan_add(group)
            await self.say(f"group {group}: moving a fair share of the key space from {len(moves)} group(s)")
            records = await self.mover.plan(moves)
        elif records:
            await self.say(f"group {group}: carrying on {len(records)} move(s) an earlier run recorded")
        report = GroupChangeReport(group, moves=len(records))
        await self._run_all(records, report, cancelled)
        if report.cancelled:
            return await self._cancel(records, report, began)
        return await self._finish(report, began)

    async def _finish(self, report: GroupChangeReport, began: float) -> GroupChangeReport:
        final = await self.directory.load_map()
        report.seconds = time.monotonic() - began
        report.epoch = final.epoch
        report.shares = {g: final.share(g) for g in final.groups}
        return report

    async def _cancel(self, records: list[MoveRecord], report: GroupChangeReport, began: float) -> GroupChangeReport:
        report.cancelled = True
        await self.say(f"group {report.group}: cancelled")
        return await self._finish(report, began)

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

    async def remove(self, group: int, cancelled: Callable[[], Awaitable[bool]] = _never) -> GroupChangeReport:
        began = time.monotonic()
        shard_map = await self.directory.load_map()
        if group in shard_map.retired:
            await self.say(f"group {group} was removed already")
            report = GroupChangeReport(group, removed=True)
            return await self._finish(report, began)
        if group not in shard_map.groups:
            raise GroupChangeRefused(f"there is no group {group} (groups: "
                                     f"{', '.join(map(str, shard_map.groups))})")
        if len(shard_map.groups) == 1:
            raise GroupChangeRefused(f"group {group} is the last group: it cannot be removed")
        records = [r for r in await self.mover.records() if r.source == group]
        if not records and shard_map.owned_by(group):
            if await cancelled():
                return await self._cancel([], GroupChangeReport(group), began)
            moves = shard_map.plan_remove(group)
            await self.say(f"group {group}: moving its key space to {len(moves)} group(s)")
            records = await self.mover.plan(moves)
        elif records:
            await self.say(f"group {group}: carrying on {len(records)} move(s) an earlier run recorded")
        report = GroupChangeReport(group, moves=len(records))
        await self._run_all(records, report, cancelled)
        if report.cancelled:
            return await self._cancel(records, report, began)
        shard_map = await self.directory.load_map()
        if shard_map.owned_by(group):
            raise ShardnodeError(f"group {group} still owns key space after its moves; run `group remove {group}` "
                                 f"again")
        if group in shard_map.groups:
            final = await self.directory.update_map(shard_map, shard_map.without_group(group), guards=self.guards)
            await self.say(f"group {group}: owns nothing now; removed from the shard map (epoch {final.epoch})")
        await asyncio.to_thread(self.retire_workers, group)
        report.removed = True
        return await self._finish(report, began)

    async def _run_all(self, records: list[MoveRecord], report: GroupChangeReport,
                       cancelled: Callable[[], Awaitable[bool]]) -> None:
        """Run the moves side by side. On a cancel before a move's freeze it
        is rolled back; from its freeze on it can only finish."""
        # Every phase of a move is its own Mover.run, with its own progress
        # (the copy's keys in one, the delta's in another): all are summed.
        # Held here, each progress keeps its id for the whole change.
        totals: dict[int, MoveProgress] = {}
        original = self.mover.on_progress

        def track(record: MoveRecord, progress: MoveProgress) -> None:
            totals[id(progress)] = progress
            original(record, progress)

        async def run(record: MoveRecord) -> None:
            if not await self._run_move(record, cancelled):
                report.cancelled = True

        self.mover.on_progress = track
        try:
            await asyncio.gather(*(run(r) for r in records))
        finally:
            self.mover.on_progress = original
        report.keys = sum(p.keys for p in totals.values())
        report.bytes = sum(p.bytes for p in totals.values())
        report.delta_keys = sum(p.delta_keys for p in totals.values())
