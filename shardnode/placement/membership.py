"""Changing which hosts hold each group's replicas, while the cluster serves:
`shardnode leave / start --new / member add / member remove / member list`
and `kv739_leave` / `kv739_start(server, 1)` (docs/membership.md).

Every change is a single-server Raft configuration change, proposed through
the group's leader (Worker.ChangeMembership) and answered once applied:

- **join**: the new member gets a fresh node id (above every id the group
  ever had: removed ids are never reused), is added as a *learner*, its
  worker is started (it finds the learner at its address and joins with the
  group's configuration, shardnode/replica/identity.py), catches up (by
  snapshot when the log was compacted) and is promoted to voter by the
  leader once caught up;
- **leave**: refused, with nothing changed, if the group would drop below
  three voters or lose its live majority; a leaving leader hands leadership
  over first; once the removal is applied, the removed replica is asked to
  retire (it checks the removal is committed, deletes its data behind a
  tombstone and exits 0, and supervisord leaves it down).

The live membership is read from the groups themselves (every replica's
Status), never from cluster.toml, which only gives the first shape.

Every change is planned on the group as read and then proposed with the
configuration it was planned on and the scheduler's fencing token: the
group's leader refuses it if the configuration moved meanwhile (it is then
planned again), if a newer scheduler took over, or if its own check of the
shape policy fails (shardnode/replica/shape_policy.py). A change whose
effect is already there (a rerun, a lost answer) is done, not refused. The
commands reach this through the scheduler (scheduler.py, executors.py),
which records the choices a change makes (WorkRecord) in its intent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import msgpack

from ..channel_cache import SyncChannelCache
from ..config import ClusterConfig, ConfigError, HostConfig
from ..errors import ShardnodeError
from ..proto import worker_pb2 as pb
from ..proto import worker_pb2_grpc as pb_grpc
from ..replica.shape_policy import MIN_VOTERS
from ..security import (SecurityError, admin_destinations, admin_metadata, check_admin_destination,
                        load_admin_credential)
from ..supervisor import ROUTER_PROGRAM, ProcessControl, worker_program
from .directory import ShardDirectory
from .group_status import freshest
from .intents import ShapeRefused
from .lease import LeaseLost
from .shard_map import ShardMap

STATUS_TIMEOUT = 1.0
LIVE_GROUPS_TIMEOUT = 10.0
#: The metadata group's list of hosts started free (`start --new` with no group short).
FREE_HOSTS_KEY = b"free_hosts"
Kind = pb.ChangeMembershipRequest
Answer = pb.ChangeMembershipResponse


#: How long a learner being added may stay unreachable before its worker is
#: started again (it may have exited finding no replica: _await_promotion).
LEARNER_SILENCE_SECONDS = 5.0


class WorkRecord:
    """A change's durable choices (the node ids it added, the groups it
    chose), so that a run that stops half way is carried on with the same
    ones. In memory by default; the scheduler's saves them in the intent."""

    def __init__(self, initial: dict[str, Any] | None = None,
                 save: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._values: dict[str, Any] = dict(initial or {})
        self._save = save

    def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    def save(self, **values: Any) -> None:
        self._values.update(values)
        if self._save is not None:
            self._save(dict(values))


async def _guards_hold(directory: ShardDirectory, guards: tuple[tuple[bytes, bytes | None], ...]) -> bool:
    for key, value in guards:
        if await directory.read(key) != value:
            return False
    return True


@dataclass(slots=True, frozen=True)
class MemberState:
    node_id: int
    host: str
    address: str
    learner: bool
    reachable: bool
    role: str = ""              # as the member itself reports it ("" if unreachable)
    applied_index: int = 0
    match: int = 0              # as the leader knows it


@dataclass(slots=True)
class GroupState:
    group: int
    leader_id: int = 0
    term: int = 0
    commit_index: int = 0
    members: list[MemberState] = field(default_factory=list)
    removed: tuple[int, ...] = ()

    @property
    def voters(self) -> list[MemberState]:
        return [m for m in self.members if not m.learner]

    @property
    def learners(self) -> list[MemberState]:
        return [m for m in self.members if m.learner]

    def member_at(self, address: str) -> MemberState | None:
        return next((m for m in self.members if m.address == address), None)

    def member(self, node_id: int) -> MemberState | None:
        return next((m for m in self.members if m.node_id == node_id), None)

    @property
    def leader(self) -> MemberState | None:
        return self.member(self.leader_id)


#: Starts the workers of `groups` on a host (and its router when asked):
#: what supervisord does for the real cluster, a test's harness otherwise.
Launcher = Callable[[str, list[int]], None]


class MembershipAdmin:
    """Membership operations on a running cluster. `control` starts and
    stops processes through each host's supervisord; without one, `launch`
    (server, groups) starts new workers and the caller stops processes.
    `progress` receives one line per step."""

    def __init__(
        self,
        cluster: ClusterConfig,
        control: ProcessControl | None = None,
        *,
        launch: Launcher | None = None,
        progress: Callable[[str], None] | None = None,
        timeout: float = 120.0,
        fence: int = 0,
        guards: tuple[tuple[bytes, bytes | None], ...] = (),
        work: WorkRecord | None = None,
        form_group: Callable[[tuple[str, ...]], Any] | None = None,
        request_timeout: float = LIVE_GROUPS_TIMEOUT,
    ) -> None:
        """`fence` and `guards`: the scheduler's fencing token and lease
        guard (placement/lease.py), carried by every change; `work`: where a
        change records its durable choices (the scheduler's intent record;
        by default kept in memory); `form_group(hosts)`: creates a group on
        free hosts (the scheduler's group admin); `request_timeout`: how
        long each call to the metadata group keeps trying (the CLI's
        --timeout)."""
        self.cluster = cluster
        self.request_timeout = request_timeout
        self.control = control
        self.launch = launch
        self.progress = progress or (lambda line: None)
        self.timeout = timeout
        self.fence = fence
        self.guards = guards
        self.work = work if work is not None else WorkRecord()
        self.form_group = form_group
        security = cluster.security
        # Membership RPCs are admin RPCs: they carry the cluster's admin
        # credential. With TLS, workers answer only the cluster's hosts, so
        # these calls go out under a host certificate found on this machine
        # (run them on a host of the cluster).
        self._metadata = admin_metadata(load_admin_credential(security)) if security.admin_file.exists() else ()
        self._identity = next((h.name for h in cluster.hosts if security.host_cert_file(h.name).exists()), None) \
            if security.tls else None
        self._channels = SyncChannelCache(security, self._identity)
        self._destinations = admin_destinations(cluster)

    def close(self) -> None:
        self._channels.close()

    def __enter__(self) -> MembershipAdmin:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- Reading the live shape -------------------------------------------------------

    def group(self, group: int) -> GroupState:
        """The group as its replicas report it: the leader's configuration
        (else the most advanced replica's), and who answered."""
        addresses = [h.worker_address(group) for h in self.cluster.hosts]
        with ThreadPoolExecutor(max_workers=len(addresses)) as pool:
            statuses = dict(zip(addresses, pool.map(self._status, addresses)))
        answered = {a: s for a, s in statuses.items() if s is not None and s.members}
        state = GroupState(group)
        best = freshest(answered.values())
        if best is None:
            return state
        leader = best if best.role == "leader" else None
        state.leader_id = best.leader_id if leader is None else best.node_id
        state.term, state.commit_index = best.term, best.commit_index
        state.removed = tuple(best.removed)
        matches = {p.node_id: p.match for p in best.peers} if leader is not None else {}
        for member in best.members:
            reported = answered.get(member.address)
            alive = reported is not None and reported.node_id == member.node_id
            state.members.append(MemberState(
                node_id=member.node_id, host=member.host, address=member.address, learner=member.learner,
                reachable=alive, role=reported.role if alive else "",
                applied_index=reported.applied_index if alive else 0,
                match=best.last_index if member.node_id == best.node_id else matches.get(member.node_id, 0),
            ))
        return state

    def live_groups(self) -> list[int]:
        """The data groups of the live shard map (groups come and go online:
        docs/sharding.md). ShapeRefused if the metadata group does not answer:
        a change of shape that missed a group could leave it short."""
        async def load() -> ShardMap:
            directory = ShardDirectory(self.cluster, self._identity, timeout=self.request_timeout)
            try:
                return await directory.load_map()
            finally:
                await directory.close()
        try:
            return list(asyncio.run(load()).groups)
        except ShardnodeError as exc:
            raise ShapeRefused(f"the live groups are unknown: {exc}") from None

    def _groups_to_restart(self, host: HostConfig) -> list[int]:
        """The live groups; when the metadata group does not answer (it may
        be down with the hosts being restarted), cluster.toml's groups and
        those whose workers ran on the host before it stopped (groups created
        online): the whole-host start brings the host's metadata replica
        back too, and its router then starts any other group the host holds
        (routing/processes.py)."""
        try:
            return self.live_groups()
        except ShapeRefused as exc:
            ran = self._groups_that_ran(host)
            extra = sorted(set(ran) - set(range(self.cluster.groups)))
            also = f" and {', '.join(map(str, extra))} (created online, ran there before)" if extra else ""
            self.progress(f"{exc}; restarting the groups of cluster.toml{also}; the host's router starts any other "
                          f"group it holds")
            return sorted(set(range(self.cluster.groups)) | set(ran))

    def _groups_that_ran(self, host: HostConfig) -> list[int]:
        """The data groups whose workers ran on `host` and were stopped (its
        supervisord's state), [] if that is unknown."""
        if self.control is None:
            return []
        try:
            processes = self.control.processes(host.name)
        except (ShardnodeError, OSError):
            return []
        return [g for g in range(self.cluster.max_groups)
                if (info := processes.get(worker_program(g))) is not None and info.state == "STOPPED" and info.started_at]

    def _states(self, groups: list[int] | None) -> dict[int, GroupState]:
        """Those groups (a worker address names one), else every live group."""
        if groups is not None:
            return {g: self.group(g) for g in groups}
        return {s.group: s for s in self.groups()}

    def groups(self) -> list[GroupState]:
        return [self.group(g) for g in self.live_groups()]

    def groups_of(self, host: HostConfig) -> list[int]:
        """The groups `host` holds a replica of now."""
        return [s.group for s in self.groups() if s.member_at(host.worker_address(s.group)) is not None]

    # --- Joining ----------------------------------------------------------------------------

    def add_member(self, group: int, host_name: str) -> MemberState:
        """A voter of `group` on `host_name`: added as a learner (its worker
        started through supervisord when there is a `control`), then awaited
        until promoted. Already a voter there: nothing to do. Already a
        learner this change added (a run that stopped half way): started and
        awaited."""
        host = self.cluster.host(host_name)
        address = host.worker_address(group)
        state = self.group(group)
        existing = state.member_at(address)
        if existing is not None and not existing.learner:
            self.progress(f"{host_name} holds voter {existing.node_id} of group {group} already: nothing to add")
            return existing
        if existing is not None and existing.node_id != self._added(group, host):
            raise ShapeRefused(f"host {host_name} already holds a replica of group {group} "
                               f"(node {existing.node_id}, a learner not added by this change); "
                               f"`member remove {group} {host_name}` first")
        node_id = self._add_learner(group, host)
        self._start(address, [group])
        return self._await_promotion(group, node_id)

    def restart(self, server: str) -> None:
        """`start` (new=0): the server starts again from its data. Refused for
        a host or replica that left its groups (it must join as a new member,
        `start --new`). Groups that do not answer now are started too: their
        workers find out for themselves."""
        host, groups = self._resolve(server)
        candidates = self._groups_to_restart(host) if groups is None else groups
        held, left = [], []
        for group in candidates:
            state = self.group(group)
            if not state.members or state.member_at(host.worker_address(group)) is not None:
                held.append(group)
            elif self._ever_held(host, group, state):
                left.append(group)
        if not held:
            if left:
                where = "its groups" if groups is None else f"group {left[0]}"
                raise ShapeRefused(f"{server} left {where}; start it with --new to join as a new member")
            raise ShapeRefused(f"host {host.name} holds no replica of any group")
        self._start(server, held)

    def _ever_held(self, host: HostConfig, group: int, state: GroupState) -> bool:
        """Whether the group removed this host's replica (its initial one:
        later members are known by id only once removed)."""
        # A host's initial replica in any group has the host's node id
        # (cluster.toml's placement, or the map's for a group created online).
        return host.node_id in state.removed

    def _start(self, server: str, groups: list[int]) -> None:
        if self.control is not None:
            self.control.start(server, groups=groups)
        elif self.launch is not None:
            self.launch(server, groups)

    def start_new(self, server: str) -> list[tuple[int, MemberState]]:
        """`start --new`: the server starts with empty data and joins as a new
        member. A host (router address) joins every group that is short of
        `replicas` voters (after a leave: the same groups); a worker address
        joins its group. If the server is down but still a member (it died
        without leaving, or lost its disk), its old replicas are removed
        first — their data is discarded, and their ids never come back — with
        the checks of a leave. A run that stopped half way is carried on: the
        groups it chose and the members it added are in its work record."""
        host, groups = self._resolve(server)
        states = self._states(groups)
        stale = []
        for group, state in states.items():
            member = state.member_at(host.worker_address(group))
            if member is None or member.node_id == self._added(group, host):
                continue
            if member.reachable:
                raise ShapeRefused(f"{server} is running and holds replicas of group {group}: "
                                   f"`leave` (or `die`) first, then start it with --new")
            stale.append((state, member))
        for state, member in stale:
            self._check_removal(state, [member])
        for state, member in stale:
            self.progress(f"group {state.group}: node {member.node_id} on {host.name} is down and starts anew: "
                          f"removing it first")
            self._remove_node(state.group, member)
        if stale:
            states = self._states(groups)
        chosen = self.work.get("groups")
        if chosen is None:
            if groups is None:
                chosen = [s.group for s in states.values()
                          if len(s.voters) < self.cluster.replicas and s.member_at(host.worker_address(s.group)) is None]
            else:
                chosen = list(groups)
            self.work.save(groups=chosen)
        if not chosen:
            if groups is None:
                return self._start_free(server, host, states)
            return []
        for group in chosen:
            if group not in states:
                states[group] = self.group(group)
            if not states[group].leader_id:
                raise ShapeRefused(f"group {group} has no leader now; try again when it has one")
        joined = []
        for group in chosen:
            member = states[group].member_at(host.worker_address(group))
            if member is not None and not member.learner:
                joined.append((group, member.node_id))
                continue
            joined.append((group, self._add_learner(group, host)))
        self._start(server, chosen)
        return [(group, self._await_promotion(group, node_id)) for group, node_id in joined]

    def _start_free(self, server: str, host: HostConfig,
                    states: dict[int, GroupState]) -> list[tuple[int, MemberState]]:
        """No group is short of replicas: the host starts free (its router
        only). Once three or more hosts are free, they form a new group that
        takes a fair share of the key space (docs/sharding.md), and this
        host's replica of it is returned; until then, nothing."""
        if self.control is None:
            raise ShapeRefused(f"no group is short of {self.cluster.replicas} voters: host {host.name} "
                               f"has nothing to join")
        self.control.start(server, groups=[])
        holding = {m.host for s in states.values() for m in s.members}
        named = self._mark_free(host.name)
        free = [h for h in self.cluster.hosts if h.name in named and h.name not in holding
                and self.control.status(h.name).get(ROUTER_PROGRAM) == "RUNNING"]
        if len(free) < MIN_VOTERS:
            self.progress(f"host {host.name} is free: no group is short of replicas; {len(free)} free host(s) "
                          f"({', '.join(h.name for h in free)}), {MIN_VOTERS} form a new group")
            return []
        hosts = tuple(h.name for h in free[:self.cluster.replicas])
        self.progress(f"{len(free)} free hosts: {', '.join(hosts)} form a new group")
        report = self._form_group(hosts)
        self._unmark_free(hosts)
        member = self.group(report.group).member_at(host.worker_address(report.group))
        return [(report.group, member)] if member is not None else []

    def _mark_free(self, host_name: str) -> set[str]:
        """Record in the metadata group that `host_name` was started free;
        returns every host so recorded (a new group takes them off the list)."""
        return self._update_free_hosts(lambda names: names | {host_name})

    def _unmark_free(self, host_names: tuple[str, ...]) -> None:
        self._update_free_hosts(lambda names: names - set(host_names))

    def _update_free_hosts(self, change: Callable[[set[str]], set[str]]) -> set[str]:
        """Compare-and-set the metadata group's free-host list until `change`
        applies to the current one; returns the list written."""
        async def update() -> set[str]:
            directory = ShardDirectory(self.cluster, self._identity, timeout=self.request_timeout)
            try:
                while True:
                    raw = await directory.read(FREE_HOSTS_KEY)
                    names = change(set(msgpack.unpackb(raw, raw=False)) if raw is not None else set())
                    swapped, _ = await directory.compare_and_set(FREE_HOSTS_KEY, raw, msgpack.packb(sorted(names)),
                                                                 guards=self.guards)
                    if swapped:
                        return names
                    if self.guards and not await _guards_hold(directory, self.guards):
                        raise LeaseLost("the scheduler's lease was taken over")
            finally:
                await directory.close()
        return asyncio.run(update())

    def _form_group(self, hosts: tuple[str, ...]):  # type: ignore[no-untyped-def]
        if self.form_group is None:
            raise ShapeRefused("forming a new group moves key space: it takes the scheduler "
                               "(`shardnode start --new`, kv739_start(server, 1))")
        return self.form_group(hosts)

    def _added(self, group: int, host: HostConfig) -> int | None:
        """The id this change chose for a new member of `group` on `host`."""
        return self.work.get("added", {}).get(f"{group}@{host.name}")

    def _add_learner(self, group: int, host: HostConfig) -> int:
        """A learner of `group` at `host`'s worker address, with a fresh id
        recorded in the work record before it is proposed: a run that dies
        in between goes on with the same id."""
        address = host.worker_address(group)
        node_id = self._added(group, host)
        state = self.group(group)
        existing = state.member_at(address)
        if existing is not None:
            if existing.node_id == node_id:
                return node_id          # added by an earlier run of this change
            raise ShapeRefused(f"host {host.name} already holds a replica of group {group}")
        if node_id is None or node_id in state.removed or state.member(node_id) is not None:
            ever = [m.node_id for m in state.members] + list(state.removed)
            # Above every host's initial id too, so that an id never names two replicas.
            node_id = max([len(self.cluster.hosts), *ever]) + 1
            self.work.save(added={**self.work.get("added", {}), f"{group}@{host.name}": node_id})
        self.progress(f"group {group}: adding node {node_id} on {host.name} ({address}) as a learner")

        def plan(current: GroupState) -> pb.ChangeMembershipRequest | None:
            member = current.member_at(address)
            if member is not None:
                if member.node_id == node_id:
                    return None
                raise ShapeRefused(f"host {host.name} already holds a replica of group {group}")
            if node_id in current.removed:
                raise ShapeRefused(f"group {group}: node {node_id} was removed meanwhile")
            return Kind(kind=Kind.ADD_LEARNER, node_id=node_id, host=host.name, address=address)

        self._apply_change(group, plan)
        return node_id
    def _await_promotion(self, group: int, node_id: int) -> MemberState:
        deadline = time.monotonic() + self.timeout
        silent_since = time.monotonic()
        last = ""
        while True:
            state = self.group(group)
            member = state.member(node_id)
            if member is None:
                raise ShapeRefused(f"group {group}: node {node_id} is no longer a member")
            if not member.learner:
                self.progress(f"group {group}: node {node_id} on {member.host} is a voter")
                return member
            if member.reachable:
                silent_since = time.monotonic()
            elif time.monotonic() - silent_since > LEARNER_SILENCE_SECONDS and self.control is not None:
                # The new worker asked its group who it is before the group's
                # answering replicas had applied the ADD_LEARNER (a slow
                # leader): it found no replica and exited 0, so supervisord
                # leaves it down. It is a learner now: start it again.
                if self.control.ensure_workers(member.host, [group], wait=False):
                    self.progress(f"group {group}: node {node_id} on {member.host} was not running; started again")
                silent_since = time.monotonic()
            line = (f"group {group}: node {node_id} catching up ({member.applied_index} of "
                    f"{state.commit_index} applied)")
            if line != last:
                self.progress(line)
                last = line
            if time.monotonic() > deadline:
                raise ShardnodeError(f"group {group}: node {node_id} did not catch up within {self.timeout:g} s "
                                     f"(still a learner: {member.applied_index} of {state.commit_index} applied)")
            time.sleep(0.2)


    # --- Leaving ----------------------------------------------------------------------------

    def remove_member(self, group: int, host_name: str) -> bool:
        """`host_name`'s replica of `group` leaves (refused if unsafe) and
        retires. Holding none there already: nothing to do (False)."""
        host = self.cluster.host(host_name)
        state = self.group(group)
        if not state.members:
            raise ShapeRefused(f"group {group}: no replica answers; its membership is unknown")
        member = state.member_at(host.worker_address(group))
        if member is None:
            self.progress(f"{host_name} holds no replica of group {group}: nothing to remove")
            return False
        self._check_removal(state, [member])
        self._remove(state, member)
        return True

    def leave(self, server: str, clean: bool) -> list[tuple[int, int]]:
        """`leave`: every replica of a host (router address), or one replica
        (worker address), leaves its group; then the processes stop. Every
        group is checked first: a refusal changes nothing. A host that holds
        no replica any more (a leave that stopped half way, run again) only
        has its processes stopped. Returns the (group, node id) pairs removed
        now."""
        host, groups = self._resolve(server)
        states = self._states(groups)
        leaving = []
        for group, state in states.items():
            if not state.members:
                raise ShapeRefused(f"group {group}: no replica answers; its membership is unknown")
            member = state.member_at(host.worker_address(group))
            if member is not None:
                self._check_removal(state, [member])
                leaving.append((state, member))
        if not leaving:
            self.progress(f"{server} holds no replica (any more): stopping its processes")
        for state, member in leaving:
            self._remove(state, member)
        if self.control is not None:
            self.control.stop(server, clean=clean)
        return [(state.group, member.node_id) for state, member in leaving]

    def _check_removal(self, state: GroupState, leaving: list[MemberState]) -> None:
        """The checks a leader makes too (shardnode/replica/shape_policy.py),
        on this command's view: for a clear refusal before anything changes
        when several groups are involved. The leader's check is the one that
        counts: it sees the configuration the change applies to."""
        group = state.group
        if not state.leader_id:
            raise ShapeRefused(f"group {group} has no leader now; nothing was changed")
        gone = {m.node_id for m in leaving}
        voters_after = [m for m in state.voters if m.node_id not in gone]
        if len(voters_after) < len(state.voters) and len(voters_after) < MIN_VOTERS:
            raise ShapeRefused(f"group {group} would drop to {len(voters_after)} voters (at least {MIN_VOTERS} "
                               f"are kept); add a member first")
        live = [m for m in voters_after if m.reachable]
        if len(live) <= len(voters_after) // 2:
            down = ", ".join(f"{m.node_id} on {m.host}" for m in voters_after if not m.reachable)
            raise ShapeRefused(f"group {group} would lose its live majority: {len(live)} of {len(voters_after)} "
                               f"remaining voters answer (down: {down})")

    def _remove(self, state: GroupState, member: MemberState) -> None:
        if member.node_id == state.leader_id:
            self._hand_over(state, member)
        self._remove_node(state.group, member)
        self._retire(state.group, member)

    def _remove_node(self, group: int, member: MemberState) -> None:
        """Remove `member` (by id) from the group; done once the group lists
        the id as removed, however that came about (a self-removal whose
        answer was lost, a run before this one)."""
        self.progress(f"group {group}: removing node {member.node_id} on {member.host}")

        def plan(current: GroupState) -> pb.ChangeMembershipRequest | None:
            if member.node_id in current.removed or current.member(member.node_id) is None:
                return None
            return Kind(kind=Kind.REMOVE, node_id=member.node_id)

        self._apply_change(group, plan)

    def _hand_over(self, state: GroupState, leader: MemberState) -> None:
        """The leaving replica leads: hand leadership to the most caught-up
        other voter first, so the group does not wait out an election."""
        others = [m for m in state.voters if m.node_id != leader.node_id and m.reachable]
        if not others:
            return
        target = max(others, key=lambda m: m.match)
        self.progress(f"group {state.group}: handing leadership from node {leader.node_id} to {target.node_id}")
        stub = self._admin_stub(leader.address)
        try:
            stub.TransferLeader(pb.TransferLeaderRequest(target_node_id=target.node_id), timeout=10,
                                metadata=self._metadata)
        except grpc.RpcError:
            pass  # the removal makes it step down anyway (the core's fallback)

    # --- Leadership ---------------------------------------------------------------------------

    def transfer_leader(self, group: int, node_id: int) -> int:
        """Hand `group`'s leadership to its voter `node_id` (TransferLeader on
        the leader), then wait until the group has a leader again; returns
        that leader's id (not `node_id` if the transfer did not complete: the
        caller reads the group again and decides)."""
        state = self.group(group)
        leader, target = state.leader, state.member(node_id)
        if leader is None:
            raise ShapeRefused(f"group {group} has no leader now; nothing was changed")
        if target is None or target.learner:
            raise ShapeRefused(f"group {group}: node {node_id} is not a voter of the group")
        if leader.node_id == node_id:
            return node_id
        self.progress(f"group {group}: handing leadership from node {leader.node_id} on {leader.host} "
                      f"to node {node_id} on {target.host}")
        stub = self._admin_stub(leader.address)
        try:
            stub.TransferLeader(pb.TransferLeaderRequest(target_node_id=node_id), timeout=10, metadata=self._metadata)
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                raise ShardnodeError(f"group {group}: node {leader.node_id} did not hand its leadership over "
                                     f"({exc.code().name})") from None
            # Slow or gone: the transfer may or may not have happened; the
            # group says below who leads now, and the caller decides.
            self.progress(f"group {group}: the transfer was not confirmed ({exc.code().name}); reading the group")
        deadline = time.monotonic() + min(self.timeout, 10.0)
        while True:
            state = self.group(group)
            moved = state.leader_id not in (0, leader.node_id)   # to node_id, or to another voter
            if moved or (state.leader_id and time.monotonic() > deadline):
                return state.leader_id
            if time.monotonic() > deadline:
                raise ShardnodeError(f"group {group} has no leader {min(self.timeout, 10.0):g} s after "
                                     f"a leadership transfer")
            time.sleep(0.1)

    def _retire(self, group: int, member: MemberState) -> None:
        stub = self._admin_stub(member.address)
        try:
            answer = stub.Retire(pb.RetireRequest(node_id=member.node_id), timeout=10, metadata=self._metadata)
        except grpc.RpcError:
            # Down or already gone: it retires itself when it next starts.
            self.progress(f"group {group}: node {member.node_id} did not answer; it retires when it next starts")
            return
        self.progress(f"group {group}: {answer.message}" if answer.ok else
                      f"group {group}: node {member.node_id} did not retire: {answer.message}")

    # --- Plumbing -----------------------------------------------------------------------------

    def _apply_change(self, group: int, plan: Callable[[GroupState], pb.ChangeMembershipRequest | None]) -> None:
        """Bring the group to what `plan` wants, one change at a time: read
        the group, ask `plan` for the change still needed (None: done;
        ShapeRefused: not allowed), propose it through the leader with this
        admin's fencing token and the configuration it was decided on, and
        read again. A change refused because the configuration moved
        meanwhile (another admin, a promotion) is planned again on the new
        one; a refusal for any other reason (the leader's policy, a newer
        scheduler) is final, unless the group turns out to be where the plan
        wanted it (a self-removal whose answer was lost)."""
        deadline = time.monotonic() + self.timeout
        last = "no replica answered"
        while time.monotonic() < deadline:
            state = self.group(group)
            request = plan(state)
            if request is None:
                return
            target = state.leader.address if state.leader is not None else ""
            if not target:
                last = "no leader"
                time.sleep(0.2)
                continue
            request.fence = self.fence
            request.check_expected = True
            request.expected_voters[:] = [m.node_id for m in state.voters]
            request.expected_learners[:] = [m.node_id for m in state.learners]
            answer, last = self._propose(target, request, deadline)
            if answer is None or answer.status == Answer.OK:
                continue
            if "changed meanwhile" in answer.message:
                last = answer.message
                time.sleep(0.1)
                continue
            if plan(self.group(group)) is None:
                return
            raise ShapeRefused(f"group {group}: {answer.message}")
        raise ShardnodeError(f"group {group}: the membership change did not apply within {self.timeout:g} s "
                             f"({last})")

    def _propose(self, target: str, request: pb.ChangeMembershipRequest,
                 deadline: float) -> tuple[Answer | None, str]:
        """One change through `target`, following NOT_LEADER hints: the
        answer once OK or REFUSED, else (None, why) and the caller reads the
        group again."""
        for _ in range(3):
            try:
                stub = self._admin_stub(target)
            except SecurityError as exc:
                return None, str(exc)       # a hint to an unknown address: the caller reads the group again
            try:
                answer = stub.ChangeMembership(request, timeout=max(1.0, min(30.0, deadline - time.monotonic())),
                                               metadata=self._metadata)
            except grpc.RpcError as exc:
                time.sleep(0.2)
                return None, f"{target}: {exc.code().name}"
            if answer.status in (Answer.OK, Answer.REFUSED):
                return answer, ""
            if answer.status == Answer.NOT_LEADER and answer.leader_address:
                target = answer.leader_address
                continue
            time.sleep(0.2)
            return None, answer.message
        return None, "NOT_LEADER hints went round in circles"

    def _admin_stub(self, address: str) -> pb_grpc.WorkerStub:
        """A stub for calls that carry the admin credential: only to the
        addresses of cluster.toml's hosts (member addresses and leader hints
        come from answers that, with TLS off, anyone could forge)."""
        check_admin_destination(self._destinations, address)
        return pb_grpc.WorkerStub(self._channel(address))

    def _status(self, address: str) -> pb.StatusResponse | None:
        try:
            status = pb_grpc.WorkerStub(self._channel(address)).Status(pb.StatusRequest(), timeout=STATUS_TIMEOUT)
        except grpc.RpcError:
            return None
        return status if status.cluster == self.cluster.name else None

    def _channel(self, address: str) -> grpc.Channel:
        return self._channels.get(address)

    def _resolve(self, server: str) -> tuple[HostConfig, list[int] | None]:
        """(host, None) for a router address; (host, [group]) for a worker's."""
        for host in self.cluster.hosts:
            if server == host.router_address:
                return host, None
            for group in range(self.cluster.max_groups):
                if server == host.worker_address(group):
                    return host, [group]
        raise ConfigError(f"{server} is neither a router nor a worker address of cluster {self.cluster.name!r}")
