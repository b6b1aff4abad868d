"""Who a worker is when it starts: which node id it has in its group, and
whether it opens its data, bootstraps the group's first configuration, joins
a running group, holds no replica at all, or must refuse to run because its
data was lost.

The rules, in order (docs/membership.md, "How a worker knows who it is"):

0. A data group that the live shard map lists as removed (`group remove`)
   has no replica anywhere: data found here is retired. A data directory
   left renamed aside by a retirement that was cut short is deleted first
   (storage/retirement.py).

1. A database on disk is opened with its own id, unless
   - a tombstone names that id: its retirement was decided and cut short
     (it is finished now);
   - the group removed that id: the data is retired (tombstone, delete),
     and if a learner was added at this worker's address meanwhile
     (`start --new`), the worker joins as that learner instead;
   - the group bound that id to another incarnation than this store's: this
     store is not the life whose votes and log the group counted (it was
     created while the group could not be asked, on a disk that had lost
     the real one): it is retired and the worker refuses to run (rule 2).
2. With no database, the group answers and lists a member at this worker's
   address:
   - its incarnation is bound: that member's data was lost (its vote and
     its log with it). It must never run under that id again: the worker
     leaves a tombstone whose reason names the recovery command
     (`shardnode start HOST:PORT --new`: it removes the old id and adds this
     worker as a new member) and refuses (Start.REFUSED, one log line);
   - not bound: that member never spoke (a learner just added by
     `start --new` or `member add`, or the race of the cluster's first
     start, where the peers bootstrapped a moment earlier): the worker
     starts under that id with the group's configuration.
3. Otherwise a tombstone (this place's replica was removed, or refused)
   means "no replica": a removed id never comes back, a new one needs
   `start --new`.
4. Otherwise, if the group answers, this host holds no replica of it: a
   worker never bootstraps over a group that answers.
5. Nobody answers: a host of the group's initial placement bootstraps with
   the initial members: the cluster's first start. The initial placement is
   the one *recorded* in the metadata group at the cluster's first start
   (placement/initial_placement.py), not what cluster.toml says now: a host
   appended to the file later holds no replica at first (it joins like a
   standby host, with `start --new`). The metadata group's own placement is
   the first `meta_replicas` hosts of cluster.toml that are not standby (it
   runs before anything can be recorded); that of a group created online is
   the live shard map's `placements[G]`. If the metadata group cannot be
   reached, the worker cannot know and exits non-zero (`MetadataUnavailable`);
   it is started again, and backs off (restart_backoff.py).
6. Otherwise this host holds no replica of the group.

A worker that nevertheless runs as another life of a bound id (it
bootstrapped while its whole group was down) is told so by the first peer
it contacts (a NOTICE, docs/raft.md) and refuses the same way (server.py).

The live configuration is read from the group's other replicas (their
Status), whose addresses are known: a host's replica of group G always
listens on its `worker_port_base + G`. Their answers also carry the
cluster's id and the group's incarnation, which a store records where it
does not know them yet (storage/incarnation.py).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from ..config import METADATA_GROUP, ClusterConfig, ConfigError
from ..errors import ShardnodeError
from ..placement.directory import MetadataUnavailable, ShardDirectory
from ..placement.group_status import conf_from_status, freshest
from ..placement.initial_placement import InitialPlacement, load_or_record
from ..proto import worker_pb2 as pb
from ..proto import worker_pb2_grpc as pb_grpc
from ..raft import ConfState, Member
from ..security import aio_channel
from ..storage import ReplicaStore, StoreNotInitialized
from ..storage.retirement import (
    clear_tombstone,
    discard,
    finish_retirement,
    read_tombstone,
    retire,
    write_tombstone,
)

log = logging.getLogger("shardnode.replica.identity")

#: How long a starting worker asks its group about its membership.
OBSERVE_TIMEOUT = 1.5
#: How long a starting worker of a group created online asks the metadata
#: group for the shard map (then it exits non-zero and is started again).
MAP_TIMEOUT = 5.0
#: How long a first start asks the metadata group for the recorded initial
#: placement: at the cluster's first start the metadata group starts at the
#: same moment and may need a while to elect (a loaded machine: ten seconds),
#: and waiting costs less than exiting and being started again.
RECORD_TIMEOUT = 30.0
#: How long a starting worker asks whether its group was removed.
REMOVED_CHECK_TIMEOUT = 1.0
#: How long a worker with a store that does not know its cluster's id asks
#: the metadata group for it (best effort: an unknown id is not checked).
IDENTITY_TIMEOUT = 1.0


class Start(enum.Enum):
    OPEN = "open"              # its own database
    BOOTSTRAP = "bootstrap"    # the group's first start: the recorded initial members
    JOIN = "join"              # a member of a running group that never spoke: with the group's configuration
    NO_REPLICA = "no_replica"  # nothing to serve: not a member, or removed
    REFUSED = "refused"        # its data was lost: it must not run under its old id (see `reason`)


@dataclass(slots=True, frozen=True)
class GroupView:
    """The group as one of its replicas (the leader when one answers) sees it."""

    reported_by: int
    leader_id: int
    term: int
    applied_index: int
    conf: ConfState
    cluster_id: int = 0
    group_incarnation: int = 0

    def member_at(self, address: str) -> int | None:
        """The member (voter or learner) whose worker address is `address`."""
        for member in self.conf.members:
            if member.address == address and member.node_id in self.conf.ids():
                return member.node_id
        return None

    def learner_at(self, address: str) -> int | None:
        node_id = self.member_at(address)
        return node_id if node_id is not None and node_id in self.conf.learners else None


@dataclass(slots=True)
class Identity:
    start: Start
    node_id: int = 0
    store: ReplicaStore | None = None
    reason: str = ""


async def observe_group(cluster: ClusterConfig, group: int, host_name: str, exclude: str = "",
                        timeout: float = OBSERVE_TIMEOUT) -> GroupView | None:
    """Ask every host's replica of `group` (but `exclude`) for its status, as
    host `host_name`; the leader's answer (highest term) wins, else the most
    applied one. None if nobody answers."""
    addresses = [h.worker_address(group) for h in cluster.hosts if h.worker_address(group) != exclude]

    async def ask(address: str) -> pb.StatusResponse | None:
        channel = aio_channel(address, cluster.security, host_name)
        try:
            status = await pb_grpc.WorkerStub(channel).Status(pb.StatusRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return None
        finally:
            await channel.close()
        return status if status.cluster == cluster.name and status.group == group else None

    best = freshest(await asyncio.gather(*(ask(a) for a in addresses)))
    if best is None:
        return None
    return GroupView(best.node_id, best.leader_id, best.term, best.applied_index, conf_from_status(best),
                     best.cluster_id, best.group_incarnation)


def recovery_line(address: str) -> str:
    """What an operator runs to bring back a worker whose data was lost."""
    return (f"`shardnode start {address} --new` removes the old id and adds this worker as a new member "
            f"that catches up from the group")


def lost_data_reason(group: int, node_id: int, address: str, bound: int, mine: int = 0) -> str:
    """The tombstone's reason (and the worker's one log line) for a lost disk."""
    this = f"this worker's store is incarnation {mine:x}" if mine else "this worker has no data"
    return (f"group {group}: the data of node {node_id} at {address} was lost (the group bound node {node_id} "
            f"to incarnation {bound:x}; {this}): it does not run under node {node_id} again; {recovery_line(address)}")


async def resolve(cluster: ClusterConfig, host_name: str, group: int) -> Identity:
    """Apply the rules of this module; the store (if any) is returned open."""
    host = cluster.host(host_name)
    address = host.worker_address(group)
    data_dir = cluster.worker_data_dir(host_name, group)
    finish_retirement(data_dir)
    if group != METADATA_GROUP and await _group_was_removed(cluster, host_name, group):
        if ReplicaStore.exists(data_dir):
            retire(data_dir, 0, "its group was removed from the cluster")
        return Identity(Start.NO_REPLICA, reason=f"group {group} was removed from the cluster (`group remove`); "
                                                 f"its data here is retired")
    view = await observe_group(cluster, group, host_name, exclude=address)
    tombstone = read_tombstone(data_dir)

    store = _open_existing(data_dir, cluster)
    if store is not None:
        node_id = store.node_id or _initial_id(cluster, host_name, group)
        if tombstone is not None and tombstone.node_id == node_id:
            # Its retirement was decided (durably) and cut short: finish it.
            store.close()
            retire(data_dir, node_id, tombstone.reason)
            return Identity(Start.NO_REPLICA, node_id, reason=tombstone.reason)
        removed = node_id in store.conf_state.removed or (view is not None and node_id in view.conf.removed)
        bound = view.conf.incarnation_of(node_id) if view is not None and not removed else 0
        if not removed and (not bound or bound == store.identity.incarnation):
            await _learn_ids(cluster, host_name, group, store, view)
            return Identity(Start.OPEN, node_id, store)
        mine = store.identity.incarnation
        store.close()
        if not removed:
            reason = lost_data_reason(group, node_id, address, bound, mine)
            retire(data_dir, node_id, reason)
            return Identity(Start.REFUSED, node_id, reason=reason)
        learner = view.learner_at(address) if view is not None else None
        if learner is not None and learner != node_id and not view.conf.incarnation_of(learner):  # type: ignore[union-attr]
            log.info("replica.rejoining", extra={"group": group, "node": learner, "old_node": node_id})
            discard(data_dir)
            return await _join(cluster, host_name, group, data_dir, learner, view)  # type: ignore[arg-type]
        retire(data_dir, node_id, "removed from the group")
        return Identity(Start.NO_REPLICA, node_id, reason=f"node {node_id} was removed from group {group}; "
                                                          f"its data is retired (use `shardnode start --new` to rejoin)")

    member = view.member_at(address) if view is not None else None
    if view is not None and member is not None:
        bound = view.conf.incarnation_of(member)
        if bound:
            reason = lost_data_reason(group, member, address, bound)
            write_tombstone(data_dir, member, reason)
            return Identity(Start.REFUSED, member, reason=reason)
        return await _join(cluster, host_name, group, data_dir, member, view)
    if tombstone is not None:
        return Identity(Start.NO_REPLICA, tombstone.node_id,
                        reason=f"this host's replica of group {group} (node {tombstone.node_id}) does not run here "
                               f"any more ({tombstone.reason}); `shardnode start {address} --new` joins again "
                               f"as a new member")
    if view is not None:
        return Identity(Start.NO_REPLICA, reason=f"group {group} runs without a member at {address}: "
                                                 f"host {host_name} holds no replica of it")
    if group == METADATA_GROUP:
        return _bootstrap_metadata_group(cluster, host_name, data_dir)
    if group >= cluster.groups:
        return await _bootstrap_placed_online(cluster, host_name, group, data_dir)
    return await _bootstrap_recorded(cluster, host_name, group, data_dir)


async def _group_was_removed(cluster: ClusterConfig, host_name: str, group: int) -> bool:
    """Rule 0: the live shard map lists the group as retired. A metadata
    group that does not answer soon says nothing (the worker starts as
    before: a removed group owns no key space, so serving it is harmless)."""
    directory = ShardDirectory(cluster, host_name, timeout=REMOVED_CHECK_TIMEOUT)
    try:
        shard_map = await directory.load_map()
    except ShardnodeError:
        return False
    finally:
        await directory.close()
    return group in shard_map.retired


def _bootstrap_metadata_group(cluster: ClusterConfig, host_name: str, data_dir: Path) -> Identity:
    """Rule 5 for the metadata group: placed by cluster.toml; its ids are
    learned once its state machine holds the recorded placement (driver).

    Only at the cluster's first start, on a host that holds nothing yet: a
    host with data of other groups (or a shard map its router saved) has run
    in this cluster, so the metadata group exists somewhere, perhaps with
    another membership than cluster.toml gives now (a cluster first started
    when `meta_replicas` defaulted to 3 has 3 members; the default is now as
    many as the data groups' replicas). Bootstrapping there would make a
    second metadata group: the worker waits for the real one to answer
    (MetadataUnavailable: it exits and is started again)."""
    replicas = cluster.meta_group_replicas()
    mine = [r for r in replicas if r.host.name == host_name]
    if not mine:
        return Identity(Start.NO_REPLICA, reason=f"host {host_name} holds no replica of the metadata group")
    ran_before = [path.name for path in sorted(data_dir.parent.glob("group-*"))
                  if path != data_dir and ReplicaStore.exists(path)]
    if cluster.shard_map_file(host_name).exists():
        ran_before.append("shard_map")
    if ran_before:
        raise MetadataUnavailable(
            f"the metadata group does not answer, and host {host_name} has run in this cluster before (it has "
            f"{', '.join(ran_before)}): it joins the metadata group that exists, it never starts a new one")
    conf = ConfState(voters=tuple(r.node_id for r in replicas),
                     members=tuple(Member(r.node_id, r.host.name, r.address) for r in replicas))
    store = ReplicaStore.open(data_dir, initial_conf=conf, node_id=mine[0].node_id, storage=cluster.storage)
    return Identity(Start.BOOTSTRAP, mine[0].node_id, store)


async def _bootstrap_recorded(cluster: ClusterConfig, host_name: str, group: int, data_dir: Path) -> Identity:
    """Rule 5 for a group of cluster.toml: the placement recorded at the
    cluster's first start (MetadataUnavailable if the metadata group does
    not answer)."""
    directory = ShardDirectory(cluster, host_name, timeout=RECORD_TIMEOUT)
    try:
        placement = await load_or_record(directory, cluster)
    finally:
        await directory.close()
    placed = placement.group(group)
    if placed is None or host_name not in {host for _, host in placed.members}:
        return Identity(Start.NO_REPLICA, reason=f"host {host_name} holds no replica of group {group} in the "
                                                 f"cluster's recorded initial placement")
    members = tuple(Member(node_id, host, cluster.host(host).worker_address(group))
                    for node_id, host in placed.members)
    conf = ConfState(voters=tuple(m.node_id for m in members), members=members)
    node_id = next(node_id for node_id, host in placed.members if host == host_name)
    store = ReplicaStore.open(data_dir, initial_conf=conf, node_id=node_id, storage=cluster.storage)
    store.record_identity(placement.cluster_id, placed.incarnation)
    return Identity(Start.BOOTSTRAP, node_id, store)


async def _bootstrap_placed_online(cluster: ClusterConfig, host_name: str, group: int, data_dir: Path) -> Identity:
    """Rule 5 for a group created online: its placement and incarnation in
    the live shard map (MetadataUnavailable if the metadata group does not
    answer)."""
    directory = ShardDirectory(cluster, host_name, timeout=MAP_TIMEOUT)
    try:
        shard_map = await directory.load_map()
        hosts = shard_map.placements.get(group, ()) if group in shard_map.groups else ()
        if host_name not in hosts:
            return Identity(Start.NO_REPLICA, reason=f"host {host_name} holds no replica of group {group} "
                                                     f"(shard map epoch {shard_map.epoch})")
        placement = await load_or_record(directory, cluster)
    finally:
        await directory.close()
    replicas = cluster.placed_replicas(group, hosts)
    # The members' addresses go into the first configuration: cluster.toml
    # does not place this group, so nothing else would tell where they are.
    conf = ConfState(voters=tuple(r.node_id for r in replicas),
                     members=tuple(Member(r.node_id, r.host.name, r.address) for r in replicas))
    node_id = cluster.host(host_name).node_id
    store = ReplicaStore.open(data_dir, initial_conf=conf, node_id=node_id, storage=cluster.storage)
    store.record_identity(placement.cluster_id, shard_map.incarnations.get(group, 0))
    return Identity(Start.BOOTSTRAP, node_id, store)


def _open_existing(data_dir: Path, cluster: ClusterConfig) -> ReplicaStore | None:
    if not ReplicaStore.exists(data_dir):
        return None
    try:
        return ReplicaStore.open(data_dir, storage=cluster.storage)
    except StoreNotInitialized:
        # A first start that died before its store was initialized: nothing
        # in it was ever promised to anyone.
        discard(data_dir)
        return None


async def _join(cluster: ClusterConfig, host_name: str, group: int, data_dir: Path, node_id: int,
                view: GroupView) -> Identity:
    """Rule 2 (not bound): start under `node_id` with the group's
    configuration (older changes replay over it as no-ops)."""
    store = ReplicaStore.open(data_dir, initial_conf=view.conf, node_id=node_id, storage=cluster.storage)
    clear_tombstone(data_dir)
    await _learn_ids(cluster, host_name, group, store, view)
    return Identity(Start.JOIN, node_id, store)


async def _learn_ids(cluster: ClusterConfig, host_name: str, group: int, store: ReplicaStore,
                     view: GroupView | None) -> None:
    """Record the cluster id and group incarnation a store does not know yet:
    from the group's answer, else (a data group of cluster.toml) from the
    recorded initial placement, briefly. Unknown ids are not checked, so
    this is best effort; the metadata group's replicas learn theirs from
    their own state machine (driver)."""
    identity = store.identity
    if identity.cluster_id and identity.group_incarnation:
        return
    # What the store knows stays (a known id never changes); the rest from the group.
    cluster_id = identity.cluster_id or (view.cluster_id if view is not None else 0)
    group_incarnation = identity.group_incarnation or (view.group_incarnation if view is not None else 0)
    if (not cluster_id or not group_incarnation) and group != METADATA_GROUP and group < cluster.groups:
        placement = await _recorded_placement(cluster, host_name)
        if placement is not None:
            placed = placement.group(group)
            cluster_id = cluster_id or placement.cluster_id
            group_incarnation = group_incarnation or (placed.incarnation if placed is not None else 0)
    if cluster_id or group_incarnation:
        store.record_identity(cluster_id, group_incarnation)


async def _recorded_placement(cluster: ClusterConfig, host_name: str) -> InitialPlacement | None:
    directory = ShardDirectory(cluster, host_name, timeout=IDENTITY_TIMEOUT)
    try:
        return await load_or_record(directory, cluster)
    except (ShardnodeError, ValueError):
        return None
    finally:
        await directory.close()


def _initial_id(cluster: ClusterConfig, host_name: str, group: int) -> int:
    """The id of this host's replica in the group's placement by cluster.toml
    (stores of the first format did not record their own id)."""
    try:
        return cluster.replica(group, host_name).node_id
    except ConfigError:
        return cluster.host(host_name).node_id
