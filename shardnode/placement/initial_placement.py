"""The cluster's initial placement, as recorded at its first start.

cluster.toml gives the cluster's first shape, but the file changes: a host
appended to it later must not find a replica of its own in a group that
never had one (it would bootstrap a phantom with an id that `member add`
hands out later). What the workers bootstrap with is therefore the shape
*recorded* in the metadata group the first time anyone needed it (key
`INITIAL_PLACEMENT_KEY`, written by compare-and-set-if-absent, so that
every worker and router reads the same one), computed from cluster.toml at
that moment:

- the cluster's id, random (frames of another cluster are refused:
  docs/security.md);
- for each group of cluster.toml, its members (node id and host) and a
  random group incarnation (frames of another life of the group are refused);
- the metadata group's incarnation. Its replicas are placed by cluster.toml
  (they run before anything can be recorded) and learn both ids once their
  state machine holds the record.

Groups created online are placed by the shard map (`ShardMap.placements`
and `ShardMap.incarnations`). docs/membership.md, "How a worker knows who
it is".
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from ..config import ClusterConfig
from ..storage.incarnation import random_id

INITIAL_PLACEMENT_KEY = b"initial_placement"
_FORMAT = 1


@dataclass(slots=True, frozen=True)
class PlacedGroup:
    """A group of cluster.toml as the cluster first placed it."""

    members: tuple[tuple[int, str], ...]     # (node id, host name), by node id
    incarnation: int


@dataclass(slots=True, frozen=True)
class InitialPlacement:
    cluster_id: int
    meta_incarnation: int
    groups: dict[int, PlacedGroup]

    @classmethod
    def compute(cls, cluster: ClusterConfig) -> InitialPlacement:
        """The placement cluster.toml gives now, with new random ids."""
        groups = {
            group: PlacedGroup(tuple(sorted((r.node_id, r.host.name) for r in cluster.group_replicas(group))),
                               random_id())
            for group in range(cluster.groups)
        }
        return cls(random_id(), random_id(), groups)

    def group(self, group: int) -> PlacedGroup | None:
        return self.groups.get(group)

    def encode(self) -> bytes:
        groups = {g: [placed.incarnation, [v for member in placed.members for v in member]]
                  for g, placed in sorted(self.groups.items())}
        return msgpack.packb((_FORMAT, self.cluster_id, self.meta_incarnation, groups), use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> InitialPlacement:
        """ValueError for anything but a record of this format."""
        try:
            fields = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises several unrelated types on garbage
            raise ValueError(f"initial placement: not msgpack: {exc}") from None
        if not isinstance(fields, list) or len(fields) != 4 or fields[0] != _FORMAT:
            raise ValueError("initial placement: unknown format")
        _, cluster_id, meta_incarnation, raw_groups = fields
        if not _is_id(cluster_id) or not _is_id(meta_incarnation) or not isinstance(raw_groups, dict):
            raise ValueError("initial placement: ids must be positive integers, groups a map")
        groups = {}
        for group, value in raw_groups.items():
            if type(group) is not int or not isinstance(value, list) or len(value) != 2:
                raise ValueError("initial placement: a group is [incarnation, members]")
            incarnation, flat = value
            if not _is_id(incarnation) or not isinstance(flat, list) or len(flat) % 2:
                raise ValueError(f"initial placement: group {group}: bad incarnation or members")
            members = tuple(zip(flat[0::2], flat[1::2]))
            if not all(_is_id(node) and isinstance(host, str) for node, host in members):
                raise ValueError(f"initial placement: group {group}: a member is (node id, host name)")
            groups[group] = PlacedGroup(tuple(sorted(members)), incarnation)
        return cls(cluster_id, meta_incarnation, groups)


def _is_id(value: object) -> bool:
    return type(value) is int and 0 < value < 1 << 63  # type: ignore[operator]


async def load_or_record(directory, cluster: ClusterConfig) -> InitialPlacement:  # type: ignore[no-untyped-def]
    """The recorded placement; the first to ask records it (compare-and-set
    if absent: whoever loses reads the winner's). `directory` is a
    ShardDirectory; MetadataUnavailable if the metadata group does not answer."""
    raw = await directory.read(INITIAL_PLACEMENT_KEY)
    if raw is None:
        proposal = InitialPlacement.compute(cluster).encode()
        swapped, stored = await directory.compare_and_set(INITIAL_PLACEMENT_KEY, None, proposal)
        raw = proposal if swapped else stored
    if raw is None:
        raise ValueError("the metadata group holds no initial placement after recording one")
    return InitialPlacement.decode(raw)
