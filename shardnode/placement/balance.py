"""`shardnode rebalance`: replicas and leaders spread evenly over the hosts
(docs/membership.md, "Rebalancing").

Two goals, over the *balanced hosts*: the hosts that run and are not
standby, or are standby but already hold a replica (a free standby host
stays free, for `group add` or a new group):

- **replicas**: the number of replicas per host differs by at most one
  (max - min <= 1). A replica moves as the membership admin moves it: a new
  one joins the target host as a learner and is promoted once caught up,
  then the source host's replica is removed; so a group never drops below
  its voters, and never holds two replicas on one host;
- **leaders**: no host leads more than ceil(groups / hosts) groups, by
  leadership transfer.

`plan(view)` is pure: the cluster as read (`ClusterView`) in, the list of
steps out, or `BalanceRefused` with one line when a step it needs is not
safe now (a group without a leader, one that would lose its live majority or
drop below three voters, a change already in flight). Nothing is half done
by a refusal: the whole plan is made before the first step.

`Rebalancer` runs it on a live cluster: it reads the groups the router's
Status lists (groups come and go online), each group's membership from its
replicas, and executes one step at a time, reading the cluster again after
each step and planning anew (the cluster may change meanwhile).

Replicas on hosts that are down are neither counted nor moved: they are the
business of `leave`, `member remove` or `start --new`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import grpc

from ..config import ClusterConfig, HostConfig
from ..errors import ShardnodeError
from .membership import MIN_VOTERS, GroupState, MembershipAdmin, ShapeRefused
from ..proto import kv_pb2, kv_pb2_grpc
from ..security import sync_channel

ROUTER_PROBE_TIMEOUT = 1.0


class BalanceRefused(ShapeRefused):
    """Rebalancing is not possible now; nothing was changed."""


# --- The cluster as the planner sees it ------------------------------------------------------


@dataclass(slots=True, frozen=True)
class ReplicaView:
    node_id: int
    host: str
    voter: bool
    reachable: bool


@dataclass(slots=True, frozen=True)
class GroupView:
    group: int
    leader_id: int                       # 0: no leader now
    replicas: tuple[ReplicaView, ...]

    @property
    def leader_host(self) -> str | None:
        return next((r.host for r in self.replicas if r.node_id == self.leader_id), None) if self.leader_id else None

    @property
    def hosts(self) -> frozenset[str]:
        return frozenset(r.host for r in self.replicas)

    @property
    def voters(self) -> tuple[ReplicaView, ...]:
        return tuple(r for r in self.replicas if r.voter)

    @property
    def learners(self) -> tuple[ReplicaView, ...]:
        return tuple(r for r in self.replicas if not r.voter)

    def on(self, host: str) -> ReplicaView | None:
        return next((r for r in self.replicas if r.host == host), None)


@dataclass(slots=True, frozen=True)
class HostView:
    name: str
    up: bool
    standby: bool = False


@dataclass(slots=True, frozen=True)
class ClusterView:
    hosts: tuple[HostView, ...]          # in cluster.toml order (ties are broken by it)
    groups: tuple[GroupView, ...]

    def balanced_hosts(self) -> tuple[str, ...]:
        """The hosts replicas and leaders are spread over: running, and not a
        free standby host."""
        holding = {r.host for g in self.groups for r in g.replicas}
        return tuple(h.name for h in self.hosts if h.up and (not h.standby or h.name in holding))

    def replica_counts(self) -> dict[str, int]:
        hosts = self.balanced_hosts()
        counts = dict.fromkeys(hosts, 0)
        for group in self.groups:
            for replica in group.replicas:
                if replica.host in counts:
                    counts[replica.host] += 1
        return counts

    def leader_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.balanced_hosts(), 0)
        for group in self.groups:
            host = group.leader_host
            if host in counts:
                counts[host] += 1
        return counts

    def leader_cap(self) -> int:
        hosts = len(self.balanced_hosts())
        return math.ceil(len(self.groups) / hosts) if hosts else 0


# --- Steps -------------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class MoveReplica:
    """A new replica of `group` on `target` (learner, then voter), then
    `source`'s replica leaves the group."""

    group: int
    source: str
    target: str

    def __str__(self) -> str:
        return f"group {self.group}: move a replica from {self.source} to {self.target}"


@dataclass(slots=True, frozen=True)
class TransferLeader:
    """`group`'s leadership goes from its replica on `source` to its voter on `target`."""

    group: int
    source: str
    target: str

    def __str__(self) -> str:
        return f"group {self.group}: transfer leadership from {self.source} to {self.target}"


Step = MoveReplica | TransferLeader


def describe_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{host} {count}" for host, count in counts.items()) or "no host"


# --- Planning --------------------------------------------------------------------------------


def plan(view: ClusterView) -> list[Step]:
    """The steps that balance `view`'s replicas, then its leaders; [] if it is
    balanced. Raises BalanceRefused (nothing to be changed) when a step it
    needs is not safe now."""
    hosts = view.balanced_hosts()
    if not view.groups:
        return []
    if not hosts:
        raise BalanceRefused("no host to balance over: every host that holds replicas is down")
    leaderless = [g.group for g in view.groups if not g.leader_id or g.leader_host is None]
    if leaderless:
        raise BalanceRefused(f"group {leaderless[0]} has no leader now (no quorum, or an election): "
                             f"nothing was changed; try again when `shardnode status` shows every leader")
    groups = {g.group: g for g in view.groups}
    steps: list[Step] = []
    _plan_replicas(hosts, groups, steps)
    _plan_leaders(hosts, groups, view.leader_cap(), steps)
    return steps


def _plan_replicas(hosts: Sequence[str], groups: dict[int, GroupView], steps: list[Step]) -> None:
    """Greedy: from the fullest host to the emptiest, while they differ by 2
    or more. Each such move lowers the sum of squared counts, so this ends;
    and one exists in principle (a host with more replicas than another holds
    a group the other does not): when every such move is unsafe now, refuse."""
    order = {h: i for i, h in enumerate(hosts)}
    while True:
        counts = _replica_counts(hosts, groups)
        if max(counts.values()) - min(counts.values()) <= 1:
            return
        fullest = sorted(hosts, key=lambda h: (-counts[h], order[h]))
        emptiest = sorted(hosts, key=lambda h: (counts[h], order[h]))
        refusals: list[str] = []
        pairs = [(s, t) for s in fullest for t in emptiest if counts[s] - counts[t] >= 2]
        move = next((m for s, t in pairs if (m := _choose_move(hosts, groups, s, t, refusals)) is not None), None)
        if move is None:
            reason = refusals[0] if refusals else "no group may move"
            raise BalanceRefused(f"replicas cannot be balanced now ({describe_counts(counts)}): {reason}; "
                                 f"nothing was changed")
        handover, step = move
        if handover is not None:
            steps.append(handover)
            groups[handover.group] = _with_leader(groups[handover.group], handover.target)
        steps.append(step)
        groups[step.group] = _moved(groups[step.group], step.source, step.target, new_id=-len(steps))


def _choose_move(hosts: Sequence[str], groups: dict[int, GroupView], source: str, target: str,
                 refusals: list[str]) -> tuple[TransferLeader | None, MoveReplica] | None:
    """A group that may move a replica from `source` to `target` now (one
    that `source` does not lead first, so no leadership moves), with the
    leadership transfer it needs first; None, with the reasons, if none may."""
    candidates = [g for g in groups.values() if g.on(source) is not None and g.on(target) is None]
    candidates.sort(key=lambda g: (g.leader_host == source, g.group))
    for group in candidates:
        reason = _unsafe_move(group, source)
        if reason is not None:
            refusals.append(reason)
            continue
        handover = None
        if group.leader_host == source:
            leaders = _leader_counts(hosts, groups)
            others = [r.host for r in group.voters if r.host != source and r.reachable and r.host in leaders]
            if not others:
                refusals.append(f"group {group.group}: no other live voter can take the leadership from {source}")
                continue
            order = {h: i for i, h in enumerate(hosts)}
            handover = TransferLeader(group.group, source, min(others, key=lambda h: (leaders[h], order[h])))
        return handover, MoveReplica(group.group, source, target)
    return None


def _unsafe_move(group: GroupView, source: str) -> str | None:
    """Why `source`'s replica may not be replaced now (the checks of
    MembershipAdmin: one change at a time, three voters, a live majority)."""
    if group.learners:
        learner = group.learners[0]
        return (f"group {group.group} has a membership change in flight (learner node {learner.node_id} on "
                f"{learner.host}); try again when it is a voter")
    voters = len(group.voters)
    if voters < MIN_VOTERS:
        return f"group {group.group} has {voters} voters (a replica moves only in groups of at least {MIN_VOTERS})"
    # While the new replica catches up and is promoted, the group has one
    # voter more and a quorum as large or larger: only a group whose voters
    # all answer moves, so that it keeps a spare for one failure meanwhile.
    down = [r for r in group.voters if not r.reachable]
    if down:
        return (f"group {group.group} has node {down[0].node_id} on {down[0].host} down, and a replica moves only "
                f"while every voter of its group answers")
    # After the move: the voters but the source's, and the new one (live).
    remaining = [r for r in group.voters if r.host != source]
    live = sum(1 for r in remaining if r.reachable) + 1
    if live <= (len(remaining) + 1) // 2:
        down = ", ".join(f"node {r.node_id} on {r.host}" for r in remaining if not r.reachable)
        return (f"group {group.group} would lose its live majority if {source}'s replica left: {live} of "
                f"{len(remaining) + 1} voters would answer (down: {down})")
    return None


def _plan_leaders(hosts: Sequence[str], groups: dict[int, GroupView], cap: int, steps: list[Step]) -> None:
    """While a host leads more than `cap` groups, move one of its leaderships
    along the shortest chain of transfers (X's group to its voter on Y, Y's
    to Z, ...) that ends on a host leading fewer than `cap`: augmenting paths,
    so a spread is found whenever the voters allow one. A host whose
    excess no chain can take keeps it (best effort: `unbalanced` says so)."""
    stuck: set[str] = set()
    order = {h: i for i, h in enumerate(hosts)}
    while True:
        counts = _leader_counts(hosts, groups)
        over = sorted((h for h in hosts if counts[h] > cap and h not in stuck), key=lambda h: (-counts[h], order[h]))
        if not over:
            return
        chain = _transfer_chain(over[0], hosts, groups, counts, cap)
        if chain is None:
            stuck.add(over[0])
            continue
        # From the far end back, so that no host ever leads more than `cap` on the way.
        for transfer in reversed(chain):
            steps.append(transfer)
            groups[transfer.group] = _with_leader(groups[transfer.group], transfer.target)


def _transfer_chain(start: str, hosts: Sequence[str], groups: dict[int, GroupView], counts: dict[str, int],
                    cap: int) -> list[TransferLeader] | None:
    order = {h: i for i, h in enumerate(hosts)}
    came_from: dict[str, TransferLeader] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        host = queue.popleft()
        options = sorted(
            ((g.group, r.host) for g in groups.values() if g.leader_host == host
             for r in g.voters if r.reachable and r.host != host and r.host in counts),
            key=lambda option: (counts[option[1]], order[option[1]], option[0]))
        for group, other in options:
            if other in seen:
                continue
            seen.add(other)
            came_from[other] = TransferLeader(group, host, other)
            if counts[other] < cap:
                chain = []
                while other != start:
                    chain.append(came_from[other])
                    other = came_from[other].source
                return chain[::-1]
            queue.append(other)
    return None


def unbalanced(view: ClusterView) -> list[str]:
    """What is not balanced in `view` (empty when it is)."""
    problems = []
    replicas = view.replica_counts()
    if replicas and max(replicas.values()) - min(replicas.values()) > 1:
        problems.append(f"replicas per host differ by more than one ({describe_counts(replicas)})")
    cap = view.leader_cap()
    over = [f"{h} leads {n}" for h, n in view.leader_counts().items() if n > cap]
    if over:
        problems.append(f"{', '.join(over)} groups (at most {cap} wanted): no live voter elsewhere can take more")
    return problems


def _replica_counts(hosts: Iterable[str], groups: dict[int, GroupView]) -> dict[str, int]:
    counts = dict.fromkeys(hosts, 0)
    for group in groups.values():
        for replica in group.replicas:
            if replica.host in counts:
                counts[replica.host] += 1
    return counts


def _leader_counts(hosts: Iterable[str], groups: dict[int, GroupView]) -> dict[str, int]:
    counts = dict.fromkeys(hosts, 0)
    for group in groups.values():
        host = group.leader_host
        if host in counts:
            counts[host] += 1
    return counts


def _with_leader(group: GroupView, host: str) -> GroupView:
    replica = group.on(host)
    assert replica is not None and replica.voter, (group, host)
    return replace(group, leader_id=replica.node_id)


def _moved(group: GroupView, source: str, target: str, new_id: int) -> GroupView:
    """The group once the move is done: the new replica (an id the planner
    makes up, below zero, never a real one) is a live voter."""
    kept = tuple(r for r in group.replicas if r.host != source)
    return replace(group, replicas=kept + (ReplicaView(new_id, target, voter=True, reachable=True),))


# --- Running it on a live cluster --------------------------------------------------------------


#: Called before each step: (its number, the steps planned so far in all, the step).
StepListener = Callable[[int, int, Step], None]


def router_groups(cluster: ClusterConfig, timeout: float = 10.0) -> list[int]:
    """The groups the routers serve now, from their Status (groups are added
    and removed online: never assume 0..groups-1)."""
    from ..client import Client

    with Client([h.router_address for h in cluster.hosts], cluster=cluster, timeout=timeout) as client:
        return sorted(g.group for g in client.status().groups)


class Rebalancer:
    """Reads a running cluster into a ClusterView and executes a plan one
    step at a time through the membership admin, planning anew from a fresh
    reading after each step."""

    def __init__(self, admin: MembershipAdmin, list_groups: Callable[[], list[int]] | None = None) -> None:
        self.admin = admin
        self.cluster = admin.cluster
        self.list_groups = list_groups or (lambda: router_groups(self.cluster))
        security = self.cluster.security
        self._identity = next((h.name for h in self.cluster.hosts if security.host_cert_file(h.name).exists()),
                              None) if security.tls else None

    # --- Reading ---------------------------------------------------------------------------

    def read(self) -> ClusterView:
        groups = self.list_groups()
        with ThreadPoolExecutor(max_workers=max(1, len(groups))) as pool:
            states = list(pool.map(self.admin.group, groups))
        views = tuple(_group_view(state) for state in states)
        holding: dict[str, bool] = {}               # host -> one of its replicas answers
        for view in views:
            for replica in view.replicas:
                holding[replica.host] = holding.get(replica.host, False) or replica.reachable
        # A host without replicas is up if its router answers (only asked of
        # the hosts that could take replicas: a free standby host stays free).
        empty = [h for h in self.cluster.hosts if h.name not in holding and not h.standby]
        with ThreadPoolExecutor(max_workers=max(1, len(empty))) as pool:
            answering = dict(zip((h.name for h in empty), pool.map(self._router_answers, empty)))
        hosts = tuple(HostView(h.name, up=holding.get(h.name, answering.get(h.name, False)), standby=h.standby)
                      for h in self.cluster.hosts)
        return ClusterView(hosts, views)

    def _router_answers(self, host: HostConfig) -> bool:
        channel = sync_channel(host.router_address, self.cluster.security, self._identity)
        try:
            answer = kv_pb2_grpc.KVStub(channel).Processes(kv_pb2.ProcessesRequest(), timeout=ROUTER_PROBE_TIMEOUT)
        except grpc.RpcError:
            return False
        finally:
            channel.close()
        return answer.host == host.name

    # --- Executing -----------------------------------------------------------------------------

    def run(self, on_step: StepListener | None = None, view: ClusterView | None = None) -> list[Step]:
        """Balance the cluster; returns the steps done ([] if it was balanced).
        Raises BalanceRefused before the first step if it cannot be done now."""
        view = self.read() if view is None else view
        steps = plan(view)
        # A cluster that keeps changing under us could keep it busy forever.
        budget = 2 * len(steps) + 4
        done: list[Step] = []
        while steps:
            if len(done) >= budget:
                raise ShardnodeError(f"the cluster kept changing while it was rebalanced ({len(done)} steps "
                                     f"done); run `shardnode rebalance` again")
            step = steps[0]
            if on_step is not None:
                on_step(len(done) + 1, len(done) + len(steps), step)
            self.execute(step, view)
            done.append(step)
            view = self.read()
            try:
                steps = plan(view)
            except BalanceRefused as exc:
                raise BalanceRefused(f"stopped after {len(done)} of the steps: {exc}") from None
        return done

    def execute(self, step: Step, view: ClusterView) -> None:
        if isinstance(step, TransferLeader):
            group = next(g for g in view.groups if g.group == step.group)
            target = group.on(step.target)
            assert target is not None, (step, group)
            self.admin.transfer_leader(step.group, target.node_id)
        else:
            self.admin.add_member(step.group, step.target)
            self.admin.remove_member(step.group, step.source)


def _group_view(state: GroupState) -> GroupView:
    replicas = tuple(ReplicaView(m.node_id, m.host, voter=not m.learner, reachable=m.reachable)
                     for m in state.members)
    return GroupView(state.group, state.leader_id if state.leader is not None else 0, replicas)
