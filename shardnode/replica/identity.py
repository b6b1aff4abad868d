"""Who a worker is when it starts: which node id it has in its group, and
whether it opens its data, bootstraps the group's first configuration, joins
a running group as a new member, or holds no replica at all.

The rules, in order (docs/membership.md):

0. A data group that the live shard map lists as removed (`group remove`)
   has no replica anywhere: data found here is retired.

1. A database on disk is opened with its own id, unless the group has removed
   that id: then the data is retired (tombstone, delete), and if a learner was
   added at this worker's address meanwhile (`start --new`), the worker joins
   as that learner instead.
2. With no database: a learner at this worker's address in the group's live
   configuration means "join as that learner" (with that configuration, so
   that replaying the log over it is harmless).
3. Otherwise a tombstone (this place's replica was removed) means "no
   replica": a removed id never comes back, and a new one needs `start --new`.
4. Otherwise a host of the group's initial placement (cluster.toml)
   bootstraps with the initial members: the cluster's first start. The
   metadata group's initial placement is the first `meta_replicas` hosts
   that are not standby. For a group created online (number config.groups
   or above), the initial placement is the live shard map's
   `placements[G]`, read from the metadata group (docs/sharding.md): its
   hosts bootstrap with those members, node id = host index + 1. If the
   metadata group cannot be reached, the worker cannot know and exits
   non-zero (`MetadataUnavailable`), and supervisord tries again.
5. Otherwise this host holds no replica of the group.

Rule 4 is why one host's data directory must never be deleted by hand while
the cluster runs (as with etcd's `initial-cluster-state`): a replica that
forgets its vote could vote twice. `leave` and `start --new` are the way.

The live configuration is read from the group's other replicas (their
Status), whose addresses are known: a host's replica of group G always
listens on its `worker_port_base + G`.
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
from ..proto import worker_pb2 as pb
from ..proto import worker_pb2_grpc as pb_grpc
from ..placement.group_status import conf_from_status, freshest
from ..raft import ConfState, Member
from ..security import aio_channel
from ..placement.directory import ShardDirectory
from ..storage import ReplicaStore, StoreNotInitialized
from ..storage.retirement import clear_tombstone, discard, read_tombstone, retire

log = logging.getLogger("shardnode.replica.identity")

#: How long a starting worker asks its group about its membership.
OBSERVE_TIMEOUT = 1.5
#: How long a starting worker of a group created online asks the metadata
#: group for the shard map (then it exits non-zero and is started again).
MAP_TIMEOUT = 5.0
#: How long a starting worker asks whether its group was removed.
REMOVED_CHECK_TIMEOUT = 1.0


class Start(enum.Enum):
    OPEN = "open"              # its own database
    BOOTSTRAP = "bootstrap"    # the group's first start: initial members from cluster.toml
    JOIN = "join"              # a new member (a learner) of a running group
    NO_REPLICA = "no_replica"  # nothing to serve: not a member, or removed


@dataclass(slots=True, frozen=True)
class GroupView:
    """The group as one of its replicas (the leader when one answers) sees it."""

    reported_by: int
    leader_id: int
    term: int
    applied_index: int
    conf: ConfState

    def learner_at(self, address: str) -> int | None:
        for member in self.conf.members:
            if member.address == address and member.node_id in self.conf.learners:
                return member.node_id
        return None


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
    return GroupView(best.node_id, best.leader_id, best.term, best.applied_index, conf_from_status(best))


async def resolve(cluster: ClusterConfig, host_name: str, group: int) -> Identity:
    """Apply the rules of this module; the store (if any) is returned open."""
    host = cluster.host(host_name)
    address = host.worker_address(group)
    data_dir = cluster.worker_data_dir(host_name, group)
    storage = cluster.storage
    if group != METADATA_GROUP and await _group_was_removed(cluster, host_name, group):
        if ReplicaStore.exists(data_dir):
            retire(data_dir, 0, "its group was removed from the cluster")
        return Identity(Start.NO_REPLICA, reason=f"group {group} was removed from the cluster (`group remove`); "
                                                 f"its data here is retired")
    view = await observe_group(cluster, group, host_name, exclude=address)
    learner = view.learner_at(address) if view is not None else None

    store = _open_existing(data_dir, storage)
    if store is not None:
        node_id = store.node_id or _initial_id(cluster, host_name, group)
        removed = node_id in store.conf_state.removed or (view is not None and node_id in view.conf.removed)
        if not removed:
            return Identity(Start.OPEN, node_id, store)
        store.close()
        if learner is not None and learner != node_id:
            log.info("replica.rejoining", extra={"group": group, "node": learner, "old_node": node_id})
            discard(data_dir)
            return _join(cluster, data_dir, learner, view)
        retire(data_dir, node_id, "removed from the group")
        return Identity(Start.NO_REPLICA, node_id, reason=f"node {node_id} was removed from group {group}; "
                                                          f"its data is retired (use `shardnode start --new` to rejoin)")
    if learner is not None:
        return _join(cluster, data_dir, learner, view)
    tombstone = read_tombstone(data_dir)
    if tombstone is not None:
        return Identity(Start.NO_REPLICA, tombstone.node_id,
                        reason=f"this host's replica of group {group} (node {tombstone.node_id}) left the group; "
                               f"use `shardnode start --new` to join again")
    if group != METADATA_GROUP and group >= cluster.groups:
        return await _bootstrap_placed_online(cluster, host_name, group, data_dir)
    try:
        node_id = _initial_id(cluster, host_name, group)
    except ConfigError:
        return Identity(Start.NO_REPLICA, reason=f"host {host_name} holds no replica of group {group}")
    voters = tuple(r.node_id for r in cluster.group_replicas(group))
    store = ReplicaStore.open(data_dir, initial_voters=voters, node_id=node_id, storage=storage)
    return Identity(Start.BOOTSTRAP, node_id, store)


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


async def _bootstrap_placed_online(cluster: ClusterConfig, host_name: str, group: int, data_dir: Path) -> Identity:
    """Rule 4 for a group created online: its placement in the live shard map
    (MetadataUnavailable if the metadata group does not answer)."""
    directory = ShardDirectory(cluster, host_name, timeout=MAP_TIMEOUT)
    try:
        shard_map = await directory.load_map()
    finally:
        await directory.close()
    hosts = shard_map.placements.get(group, ()) if group in shard_map.groups else ()
    if host_name not in hosts:
        return Identity(Start.NO_REPLICA, reason=f"host {host_name} holds no replica of group {group} "
                                                 f"(shard map epoch {shard_map.epoch})")
    replicas = cluster.placed_replicas(group, hosts)
    # The members' addresses go into the first configuration: cluster.toml
    # does not place this group, so nothing else would tell where they are.
    conf = ConfState(voters=tuple(r.node_id for r in replicas),
                     members=tuple(Member(r.node_id, r.host.name, r.address) for r in replicas))
    node_id = cluster.host(host_name).node_id
    store = ReplicaStore.open(data_dir, initial_conf=conf, node_id=node_id, storage=cluster.storage)
    return Identity(Start.BOOTSTRAP, node_id, store)


def _open_existing(data_dir: Path, storage) -> ReplicaStore | None:  # type: ignore[no-untyped-def]
    if not ReplicaStore.exists(data_dir):
        return None
    try:
        return ReplicaStore.open(data_dir, storage=storage)
    except StoreNotInitialized:
        # A first start that died before its store was initialized: nothing
        # in it was ever promised to anyone.
        discard(data_dir)
        return None


def _join(cluster: ClusterConfig, data_dir: Path, node_id: int, view: GroupView | None) -> Identity:
    assert view is not None
    store = ReplicaStore.open(data_dir, initial_conf=view.conf, node_id=node_id, storage=cluster.storage)
    clear_tombstone(data_dir)
    return Identity(Start.JOIN, node_id, store)


def _initial_id(cluster: ClusterConfig, host_name: str, group: int) -> int:
    """The id of this host's replica in the group's initial placement
    (ConfigError if the placement has none)."""
    return cluster.replica(group, host_name).node_id
