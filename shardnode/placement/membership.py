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
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import msgpack

from ..config import ClusterConfig, ConfigError, HostConfig
from ..errors import ShardnodeError
from .group_status import freshest
from ..proto import worker_pb2 as pb
from .shard_map import ShardMap
from .cluster import cluster_group_admin
from .directory import ShardDirectory
from ..proto import worker_pb2_grpc as pb_grpc
from ..security import admin_metadata, load_admin_credential, sync_channel
from ..supervisor import ROUTER_PROGRAM, ProcessControl

#: A group never shrinks below this many voters by a leave (it could not
#: survive the loss of one more member without losing its majority).
MIN_VOTERS = 3
STATUS_TIMEOUT = 1.0
LIVE_GROUPS_TIMEOUT = 10.0
#: The metadata group's list of hosts started free (`start --new` with no group short).
FREE_HOSTS_KEY = b"free_hosts"
Kind = pb.ChangeMembershipRequest
Answer = pb.ChangeMembershipResponse


#: How long a learner being added may stay unreachable before its worker is
#: started again (it may have exited finding no replica: _await_promotion).
LEARNER_SILENCE_SECONDS = 5.0


class ShapeRefused(ShardnodeError):
    """A change of shape that is not allowed now; nothing was changed."""


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
    ) -> None:
        self.cluster = cluster
        self.control = control
        self.launch = launch
        self.progress = progress or (lambda line: None)
        self.timeout = timeout
        self._channels: dict[str, grpc.Channel] = {}
        security = cluster.security
        # Membership RPCs are admin RPCs: they carry the cluster's admin
        # credential. With TLS, workers answer only the cluster's hosts, so
        # these calls go out under a host certificate found on this machine
        # (run them on a host of the cluster).
        self._metadata = admin_metadata(load_admin_credential(security)) if security.admin_file.exists() else ()
        self._identity = next((h.name for h in cluster.hosts if security.host_cert_file(h.name).exists()), None) \
            if security.tls else None

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

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
            directory = ShardDirectory(self.cluster, self._identity, timeout=LIVE_GROUPS_TIMEOUT)
            try:
                return await directory.load_map()
            finally:
                await directory.close()
        try:
            return list(asyncio.run(load()).groups)
        except ShardnodeError as exc:
            raise ShapeRefused(f"the live groups are unknown: {exc}") from None

    def _groups_to_restart(self) -> list[int]:
        """The live groups; when the metadata group does not answer (it may
        be down with the hosts being restarted), cluster.toml's groups: the
        whole-host start brings the host's metadata replica back too, and its
        router then starts the workers of groups created online that have
        data there."""
        try:
            return self.live_groups()
        except ShapeRefused as exc:
            self.progress(f"{exc}; restarting the groups of cluster.toml (the router starts the others)")
            return list(range(self.cluster.groups))

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
        """Add a replica of `group` on `host_name` (started through
        supervisord when there is a `control`), and wait until it is a voter."""
        host = self.cluster.host(host_name)
        node_id = self._add_learner(group, host)
        self._start(host.worker_address(group), [group])
        return self._await_promotion(group, node_id)

    def restart(self, server: str) -> None:
        """`start` (new=0): the server starts again from its data. Refused for
        a host or replica that left its groups (it must join as a new member,
        `start --new`). Groups that do not answer now are started too: their
        workers find out for themselves."""
        host, groups = self._resolve(server)
        candidates = self._groups_to_restart() if groups is None else groups
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
        without leaving), its old replicas are removed first — their data is
        discarded, and their ids never come back — with the checks of a leave."""
        host, groups = self._resolve(server)
        states = self._states(groups)
        candidates = list(states) if groups is None else groups
        stale = [(states[g], states[g].member_at(host.worker_address(g))) for g in candidates]
        stale = [(state, member) for state, member in stale if member is not None]
        running = [state.group for state, member in stale if member.reachable]
        if running:
            raise ShapeRefused(f"{server} is running and holds replicas of group {running[0]}: "
                               f"`leave` (or `die`) first, then start it with --new")
        for state, member in stale:
            self._check_removal(state, [member])
        for state, member in stale:
            self.progress(f"group {state.group}: node {member.node_id} on {host.name} is down and starts anew: "
                          f"removing it first")
            self.progress(f"group {state.group}: removing node {member.node_id} on {member.host}")
            self._change(state.group, Kind(kind=Kind.REMOVE, node_id=member.node_id))
        if stale:
            states = self._states(groups)
        if groups is None:
            groups = [s.group for s in states.values()
                      if len(s.voters) < self.cluster.replicas and s.member_at(host.worker_address(s.group)) is None]
            if not groups:
                return self._start_free(server, host, states)
        for group in groups:
            if states[group].member_at(host.worker_address(group)) is not None:
                raise ShapeRefused(f"host {host.name} already holds a replica of group {group}")
            if not states[group].leader_id:
                raise ShapeRefused(f"group {group} has no leader now; try again when it has one")
        added = [(group, self._add_learner(group, host)) for group in groups]
        self._start(server, groups)
        return [(group, self._await_promotion(group, node_id)) for group, node_id in added]

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
            directory = ShardDirectory(self.cluster, self._identity, timeout=LIVE_GROUPS_TIMEOUT)
            try:
                while True:
                    raw = await directory.read(FREE_HOSTS_KEY)
                    names = change(set(msgpack.unpackb(raw, raw=False)) if raw is not None else set())
                    swapped, _ = await directory.compare_and_set(FREE_HOSTS_KEY, raw, msgpack.packb(sorted(names)))
                    if swapped:
                        return names
            finally:
                await directory.close()
        return asyncio.run(update())

    def _form_group(self, hosts: tuple[str, ...]):  # type: ignore[no-untyped-def]
        async def run():  # type: ignore[no-untyped-def]
            admin, close = cluster_group_admin(self.cluster, progress=self.progress)
            try:
                return await admin.add(hosts)
            finally:
                await close()
        return asyncio.run(run())

    def _add_learner(self, group: int, host: HostConfig) -> int:
        state = self.group(group)
        address = host.worker_address(group)
        if state.member_at(address) is not None:
            raise ShapeRefused(f"host {host.name} already holds a replica of group {group}")
        ever = [m.node_id for m in state.members] + list(state.removed)
        # Above every host's initial id too, so that an id never names two replicas.
        node_id = max([len(self.cluster.hosts), *ever]) + 1
        self.progress(f"group {group}: adding node {node_id} on {host.name} ({address}) as a learner")
        self._change(group, Kind(kind=Kind.ADD_LEARNER, node_id=node_id, host=host.name, address=address))
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

    def remove_member(self, group: int, host_name: str) -> None:
        """Remove `host_name`'s replica of `group` (refused if unsafe), then
        have it retire."""
        host = self.cluster.host(host_name)
        state = self.group(group)
        member = self._leaving_member(state, host)
        self._check_removal(state, [member])
        self._remove(state, member)

    def leave(self, server: str, clean: bool) -> list[tuple[int, int]]:
        """`leave`: every replica of a host (router address), or one replica
        (worker address), leaves its group; then the processes stop. Every
        group is checked first: a refusal changes nothing. Returns the
        (group, node id) pairs removed."""
        host, groups = self._resolve(server)
        states = self._states(groups)
        if groups is None:
            groups = [s.group for s in states.values() if s.member_at(host.worker_address(s.group)) is not None]
            if not groups:
                raise ShapeRefused(f"host {host.name} holds no replica of any group")
        leaving = []
        for group in groups:
            member = self._leaving_member(states[group], host)
            self._check_removal(states[group], [member])
            leaving.append((states[group], member))
        for state, member in leaving:
            self._remove(state, member)
        if self.control is not None:
            self.control.stop(server, clean=clean)
        return [(state.group, member.node_id) for state, member in leaving]

    def _leaving_member(self, state: GroupState, host: HostConfig) -> MemberState:
        member = state.member_at(host.worker_address(state.group))
        if member is None:
            if not state.members:
                raise ShapeRefused(f"group {state.group}: no replica answers; its membership is unknown")
            raise ShapeRefused(f"host {host.name} holds no replica of group {state.group}")
        return member

    def _check_removal(self, state: GroupState, leaving: list[MemberState]) -> None:
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
        group = state.group
        if member.node_id == state.leader_id:
            self._hand_over(state, member)
        self.progress(f"group {group}: removing node {member.node_id} on {member.host}")
        self._change(group, Kind(kind=Kind.REMOVE, node_id=member.node_id))
        self._retire(group, member)

    def _hand_over(self, state: GroupState, leader: MemberState) -> None:
        """The leaving replica leads: hand leadership to the most caught-up
        other voter first, so the group does not wait out an election."""
        others = [m for m in state.voters if m.node_id != leader.node_id and m.reachable]
        if not others:
            return
        target = max(others, key=lambda m: m.match)
        self.progress(f"group {state.group}: handing leadership from node {leader.node_id} to {target.node_id}")
        stub = pb_grpc.WorkerStub(self._channel(leader.address))
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
        stub = pb_grpc.WorkerStub(self._channel(leader.address))
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
        stub = pb_grpc.WorkerStub(self._channel(member.address))
        try:
            answer = stub.Retire(pb.RetireRequest(node_id=member.node_id), timeout=10, metadata=self._metadata)
        except grpc.RpcError:
            # Down or already gone: it retires itself when it next starts.
            self.progress(f"group {group}: node {member.node_id} did not answer; it retires when it next starts")
            return
        self.progress(f"group {group}: {answer.message}" if answer.ok else
                      f"group {group}: node {member.node_id} did not retire: {answer.message}")

    # --- Plumbing -----------------------------------------------------------------------------

    def _change(self, group: int, request: pb.ChangeMembershipRequest) -> Answer:
        """Through the leader, following NOT_LEADER hints and retrying what
        may be retried, until applied or the deadline."""
        deadline = time.monotonic() + self.timeout
        target = ""
        last = "no replica answered"
        while time.monotonic() < deadline:
            if not target:
                state = self.group(group)
                target = state.leader.address if state.leader is not None else ""
                if not target:
                    time.sleep(0.2)
                    continue
            stub = pb_grpc.WorkerStub(self._channel(target))
            try:
                answer = stub.ChangeMembership(request, timeout=max(1.0, min(30.0, deadline - time.monotonic())),
                                               metadata=self._metadata)
            except grpc.RpcError as exc:
                last, target = f"{target}: {exc.code().name}", ""
                time.sleep(0.2)
                continue
            if answer.status == Answer.OK:
                return answer
            if answer.status == Answer.REFUSED:
                raise ShapeRefused(f"group {group}: {answer.message}")
            last = answer.message
            target = answer.leader_address if answer.status == Answer.NOT_LEADER else ""
            if not target:
                time.sleep(0.2)
        raise ShardnodeError(f"group {group}: the membership change did not apply within {self.timeout:g} s "
                             f"({last})")

    def _status(self, address: str) -> pb.StatusResponse | None:
        try:
            status = pb_grpc.WorkerStub(self._channel(address)).Status(pb.StatusRequest(), timeout=STATUS_TIMEOUT)
        except grpc.RpcError:
            return None
        return status if status.cluster == self.cluster.name else None

    def _channel(self, address: str) -> grpc.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = sync_channel(address, self.cluster.security, self._identity)
        return channel

    def _resolve(self, server: str) -> tuple[HostConfig, list[int] | None]:
        """(host, None) for a router address; (host, [group]) for a worker's."""
        for host in self.cluster.hosts:
            if server == host.router_address:
                return host, None
            for group in range(self.cluster.max_groups):
                if server == host.worker_address(group):
                    return host, [group]
        raise ConfigError(f"{server} is neither a router nor a worker address of cluster {self.cluster.name!r}")
