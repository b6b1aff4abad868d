"""How the scheduler carries out each kind of intent (scheduler.py).

Each executor reads the cluster as it is, does what is still missing, and
records its durable choices in the intent's work record before acting on
them, so that the next holder of the lease, taking over an intent whose
scheduler died, goes on from there (a rerun converges on the same end
state). Every change carries the lease's fencing token; every metadata write
is guarded by the lease.

Membership changes run in a thread (MembershipAdmin is synchronous: gRPC
calls, the hosts' process control included); its progress lines and work records are
written through the event loop, which stays free meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import ClusterConfig
from ..errors import ShardnodeError
from ..storage.shard_commands import ShardCommand, ShardOp
from .balance import Rebalancer, Step, describe_counts, router_groups
from .groups import GroupAdmin
from .intents import IntentKind
from .lease import SchedulerLease
from .membership import Launcher, MembershipAdmin, WorkRecord
from .processes import Processes
from .moves import MoveError
from .scheduler import Execution, Executor, Outcome, Scheduler
from .worker_groups import WorkerGroups

log = logging.getLogger("shardnode.placement")

#: How long raising one group's fencing token may take when a lease is taken
#: (a group without a leader now is fenced by the first command sent to it).
FENCE_TIMEOUT = 3.0


@dataclass(slots=True)
class ClusterHands:
    """What executors act with: the cluster, its process control (each
    host's supervisord) or, in tests without supervisord, a launcher."""

    cluster: ClusterConfig
    control: Processes | None = None     # shardnode.supervisor.ProcessControl
    launch: Launcher | None = None
    timeout: float = 120.0


def make_executors(hands: ClusterHands) -> dict[IntentKind, Executor]:
    return {
        IntentKind.MEMBER_ADD: lambda run: _member_add(hands, run),
        IntentKind.MEMBER_REMOVE: lambda run: _member_remove(hands, run),
        IntentKind.LEAVE: lambda run: _leave(hands, run),
        IntentKind.START_NEW: lambda run: _start_new(hands, run),
        IntentKind.REBALANCE: lambda run: _rebalance(hands, run),
        IntentKind.GROUP_ADD: lambda run: _group_add(hands, run),
        IntentKind.GROUP_REMOVE: lambda run: _group_remove(hands, run),
    }


def make_scheduler(hands: ClusterHands, directory, holder: str) -> Scheduler:  # type: ignore[no-untyped-def]
    lease = SchedulerLease(directory, holder, duration=hands.cluster.timing.scheduler_lease_seconds)
    return Scheduler(hands.cluster, directory, make_executors(hands), holder=holder,
                     prepare=lambda scheduler: _prepare(hands, scheduler), lease=lease)


# --- Taking the lease ------------------------------------------------------------------------


async def _prepare(hands: ClusterHands, scheduler: Scheduler) -> None:
    """Raise every group's fencing token to ours, then finish the moves an
    earlier holder left (a group add or remove that failed or was killed:
    from the freeze on they can only go forward, and before it they would
    keep key space from its owners' moves)."""
    token, guards = scheduler.lease.token, scheduler.lease.guards
    groups = WorkerGroups(hands.cluster, timeout=FENCE_TIMEOUT)
    try:
        shard_map = await scheduler.directory.load_map()

        async def fence(group: int) -> None:
            try:
                await groups.shard(group, ShardCommand(ShardOp.FENCE, token, fence=token))
            except ShardnodeError as exc:
                log.info("placement.fence_deferred", extra={"group": group, "token": token, "error": str(exc)})

        await asyncio.gather(*(fence(g) for g in shard_map.groups))
    finally:
        await groups.close()
    admin, close = group_admin(hands, scheduler, say=_log_line)
    try:
        await admin.resume()
    except (MoveError, ShardnodeError) as exc:
        log.warning("placement.moves_not_finished", extra={"error": str(exc)})
    finally:
        await close()


async def _log_line(line: str) -> None:
    log.info("placement.progress", extra={"line": line})


def group_admin(hands: ClusterHands, scheduler: Scheduler, say, work: dict[str, Any] | None = None,  # type: ignore[no-untyped-def]
                save=None) -> tuple[GroupAdmin, Callable]:  # type: ignore[no-untyped-def]
    """A GroupAdmin acting under the scheduler's lease."""
    groups = WorkerGroups(hands.cluster)
    control = hands.control

    def start_workers(host: str, group_numbers: list[int]) -> None:
        if control is not None:
            control.ensure_workers(host, group_numbers)
        elif hands.launch is not None:
            hands.launch(hands.cluster.host(host).router_address, group_numbers)

    def retire_workers(group: int) -> None:
        """Restart the removed group's workers: each finds its group retired
        in the map, retires its data and exits 0. A host that does not answer
        retires its replica when it next starts."""
        if control is None:
            return
        for host in hands.cluster.hosts:
            address = host.worker_address(group)
            try:
                control.stop(address, clean=True)
                control.start(address)
            except ShardnodeError:
                continue

    admin = GroupAdmin(hands.cluster, scheduler.directory, groups, start_workers, retire_workers=retire_workers,
                       say=say, fence=scheduler.lease.token, guards=scheduler.lease.guards, work=work, save=save)

    async def close() -> None:
        await groups.close()

    return admin, close


# --- Membership ------------------------------------------------------------------------------


async def _with_membership(hands: ClusterHands, run: Execution, action: Callable[[MembershipAdmin], Outcome],
                           form_group: Callable[[tuple[str, ...]], Any] | None = None) -> Outcome:
    loop = asyncio.get_running_loop()

    def call(coroutine) -> Any:  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    work = WorkRecord(run.work, save=lambda values: call(run.save(**values)))
    admin = MembershipAdmin(hands.cluster, hands.control, launch=hands.launch, progress=lambda line: call(run.say(line)),
                            timeout=hands.timeout, fence=run.token, guards=run.guards, work=work,
                            form_group=(lambda hosts: call(form_group(hosts))) if form_group is not None else None)
    try:
        return await asyncio.to_thread(action, admin)
    finally:
        admin.close()


async def _member_add(hands: ClusterHands, run: Execution) -> Outcome:
    group, host = run.intent.args["group"], run.intent.args["host"]

    def act(admin: MembershipAdmin) -> Outcome:
        member = admin.add_member(group, host)
        if admin.work.get("added") is None:
            return Outcome(f"{host} holds voter {member.node_id} of group {group} already: nothing to add",
                           {"group": group, "node_id": member.node_id, "host": member.host})
        return Outcome(f"group {group}: node {member.node_id} on {member.host} is a voter",
                       {"group": group, "node_id": member.node_id, "host": member.host})

    return await _with_membership(hands, run, act)


async def _member_remove(hands: ClusterHands, run: Execution) -> Outcome:
    group, host = run.intent.args["group"], run.intent.args["host"]

    def act(admin: MembershipAdmin) -> Outcome:
        if admin.work.get("removed") or admin.remove_member(group, host):
            admin.work.save(removed=True)
            return Outcome(f"group {group}: {host}'s replica left the group", {"group": group, "host": host})
        return Outcome(f"{host} holds no replica of group {group}: nothing to remove", {"group": group, "host": host})

    return await _with_membership(hands, run, act)


async def _leave(hands: ClusterHands, run: Execution) -> Outcome:
    server, clean = run.intent.args["server"], bool(run.intent.args.get("clean"))

    def act(admin: MembershipAdmin) -> Outcome:
        removed = admin.leave(server, clean=clean)
        earlier = admin.work.get("removed", [])
        admin.work.save(removed=earlier + [[g, n] for g, n in removed])
        every = earlier + [[g, n] for g, n in removed]
        left = ", ".join(f"group {g} (node {n})" for g, n in every) or "no group (it held no replica)"
        return Outcome(f"{server} left {left} and is stopped; `shardnode start {server} --new` joins again",
                       {"removed": every})

    return await _with_membership(hands, run, act)


async def _start_new(hands: ClusterHands, run: Execution) -> Outcome:
    server = run.intent.args["server"]
    scheduler = run.scheduler

    async def form_group(hosts: tuple[str, ...]):  # type: ignore[no-untyped-def]
        admin, close = group_admin(hands, scheduler, say=run.say, work=run.work,
                                   save=lambda **values: run.save(**values))
        try:
            return await admin.add(hosts)
        finally:
            await close()

    def act(admin: MembershipAdmin) -> Outcome:
        joined = admin.start_new(server)
        if not joined:
            return Outcome(f"{server} running, free: it holds no replica yet", {"joined": []})
        where = ", ".join(f"group {group} as node {member.node_id}" for group, member in joined)
        return Outcome(f"{server} joined {where}", {"joined": [[g, m.node_id] for g, m in joined]})

    return await _with_membership(hands, run, act, form_group=form_group)


async def _rebalance(hands: ClusterHands, run: Execution) -> Outcome:
    def act(admin: MembershipAdmin) -> Outcome:
        rebalancer = Rebalancer(admin, lambda: router_groups(hands.cluster))

        def on_step(number: int, total: int, step: Step) -> None:
            admin.progress(f"step {number}/{total}: {step}")

        view = rebalancer.read()
        done = rebalancer.run(on_step, view=view)
        after = rebalancer.read()
        shape = (f"replicas per host: {describe_counts(after.replica_counts())}; leaders per host: "
                 f"{describe_counts(after.leader_counts())} (at most {after.leader_cap()} wanted)")
        if not done:
            return Outcome(f"already balanced: {shape}", {"steps": 0})
        return Outcome(f"balanced in {len(done)} steps: {shape}", {"steps": len(done)})

    return await _with_membership(hands, run, act)


# --- Groups ----------------------------------------------------------------------------------


def replica_loads(hands: ClusterHands) -> dict[str, int]:
    """Host name → replicas it holds now (membership as the groups report it)."""
    loads: dict[str, int] = {}
    with MembershipAdmin(hands.cluster, hands.control, launch=hands.launch) as admin:
        for state in admin.groups():
            for member in state.members:
                loads[member.host] = loads.get(member.host, 0) + 1
    return loads


async def _group_add(hands: ClusterHands, run: Execution) -> Outcome:
    hosts = run.intent.args.get("hosts")
    loads = {} if hosts or "group" in run.work else await asyncio.to_thread(replica_loads, hands)
    admin, close = group_admin(hands, run.scheduler, say=run.say, work=run.work,
                               save=lambda **values: run.save(**values))
    try:
        report = await admin.add(tuple(hosts) if hosts else None, loads=loads,
                                 cancelled=run.cancel_requested)
    finally:
        await close()
    return Outcome(report.summary(), report.as_dict())


async def _group_remove(hands: ClusterHands, run: Execution) -> Outcome:
    group = run.intent.args["group"]
    admin, close = group_admin(hands, run.scheduler, say=run.say, work=run.work,
                               save=lambda **values: run.save(**values))
    try:
        report = await admin.remove(group, cancelled=run.cancel_requested)
    finally:
        await close()
    return Outcome(report.summary(), report.as_dict())


