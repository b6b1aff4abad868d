"""Who a starting worker is (replica/identity.py): the rules, each with the
group's answer and the metadata group's record played by the test."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shardnode.config import ClusterConfig
from shardnode.placement.directory import MetadataUnavailable
from shardnode.placement.initial_placement import InitialPlacement
from shardnode.raft import ConfState, Member
from shardnode.replica import identity
from shardnode.replica.identity import GroupView, Start, resolve
from shardnode.storage import ReplicaStore
from shardnode.storage.retirement import read_tombstone, retiring_path, write_tombstone


def _cluster(tmp_path: Path, hosts: int = 3) -> ClusterConfig:
    raw = {"cluster": {"name": "c", "replicas": 3, "groups": 2, "data_dir": str(tmp_path / "data")},
           "host": [{"name": f"h{i}", "address": f"127.0.0.{i}", "router_port": 50051, "worker_port_base": 50100,
                     "metrics_port": 9090} for i in range(1, hosts + 1)]}
    return ClusterConfig.from_dict(raw)


class Scene:
    """What the starting worker would find: the group's answer (None: nobody
    answers) and the metadata group's recorded placement (None: unreachable)."""

    def __init__(self, cluster: ClusterConfig, monkeypatch: pytest.MonkeyPatch) -> None:
        self.cluster = cluster
        self.view: GroupView | None = None
        self.placement: InitialPlacement | None = InitialPlacement.compute(cluster)

        async def observe(*args, **kwargs) -> GroupView | None:
            return self.view

        async def not_removed(*args) -> bool:
            return False

        async def record(directory, cluster) -> InitialPlacement:  # type: ignore[no-untyped-def]
            if self.placement is None:
                raise MetadataUnavailable("the metadata group did not answer")
            return self.placement

        monkeypatch.setattr(identity, "observe_group", observe)
        monkeypatch.setattr(identity, "_group_was_removed", not_removed)
        monkeypatch.setattr(identity, "load_or_record", record)

    def group_answers(self, conf: ConfState) -> None:
        self.view = GroupView(1, 1, 3, 10, conf, self.placement.cluster_id if self.placement else 0,
                              self.placement.group(0).incarnation if self.placement else 0)

    def start(self, host: str, group: int = 0) -> identity.Identity:
        found = asyncio.run(resolve(self.cluster, host, group))
        if found.store is not None:
            found.store.close()
        return found


def _conf(cluster: ClusterConfig, incarnations: tuple[tuple[int, int], ...] = (), learners: tuple[int, ...] = (),
          extra: tuple[Member, ...] = ()) -> ConfState:
    members = tuple(Member(i, f"h{i}", cluster.host(f"h{i}").worker_address(0)) for i in (1, 2, 3)) + extra
    return ConfState(voters=(1, 2, 3), learners=learners, members=members, incarnations=incarnations)


@pytest.fixture
def scene(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Scene:
    return Scene(_cluster(tmp_path), monkeypatch)


def test_the_first_start_bootstraps_with_the_recorded_placement_and_its_ids(scene: Scene) -> None:
    found = scene.start("h2")
    assert (found.start, found.node_id) == (Start.BOOTSTRAP, 2)
    with ReplicaStore.open(scene.cluster.worker_data_dir("h2", 0)) as store:
        assert store.conf_state.voters == (1, 2, 3)
        assert store.conf_state.member(3) == Member(3, "h3", scene.cluster.host("h3").worker_address(0))
        assert store.identity.cluster_id == scene.placement.cluster_id
        assert store.identity.group_incarnation == scene.placement.group(0).incarnation


def test_a_host_appended_to_cluster_toml_holds_no_replica_until_it_joins(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    recorded = InitialPlacement.compute(_cluster(tmp_path, hosts=3))
    appended = Scene(_cluster(tmp_path, hosts=4), monkeypatch)
    appended.placement = recorded
    # cluster.toml alone would now place group 1 on h2, h3 and h4 (node 4) ...
    assert [h for _, h in InitialPlacement.compute(appended.cluster).group(1).members] == ["h2", "h3", "h4"]
    found = appended.start("h4", group=1)
    # ... but the recorded placement does not: no phantom replica, no id taken.
    assert found.start is Start.NO_REPLICA and "recorded initial placement" in found.reason
    assert not ReplicaStore.exists(appended.cluster.worker_data_dir("h4", 1))
    assert appended.start("h1", group=1).start is Start.BOOTSTRAP, "h1 keeps its recorded replica"


def test_without_the_metadata_group_a_first_start_cannot_know_and_fails(scene: Scene) -> None:
    scene.placement = None
    with pytest.raises(MetadataUnavailable):
        scene.start("h1")
    assert not ReplicaStore.exists(scene.cluster.worker_data_dir("h1", 0))


def test_a_wiped_member_whose_incarnation_is_bound_is_refused_with_the_recovery_command(scene: Scene) -> None:
    scene.group_answers(_conf(scene.cluster, incarnations=((1, 11), (2, 22), (3, 33))))
    found = scene.start("h3")
    address = scene.cluster.host("h3").worker_address(0)
    assert (found.start, found.node_id) == (Start.REFUSED, 3)
    assert f"`shardnode start {address} --new`" in found.reason and "incarnation 21" in found.reason
    assert not ReplicaStore.exists(scene.cluster.worker_data_dir("h3", 0)), "it never runs under node 3"
    assert read_tombstone(scene.cluster.worker_data_dir("h3", 0)).reason == found.reason
    # Started again while the group does not answer: the tombstone says no, with the same way out.
    scene.view = None
    again = scene.start("h3")
    assert again.start is Start.NO_REPLICA and f"shardnode start {address} --new" in again.reason


def test_an_unbound_member_at_its_address_never_spoke_and_starts_with_the_groups_configuration(scene: Scene) -> None:
    # The cluster's first start: the peers bootstrapped a moment earlier and answer.
    conf = _conf(scene.cluster, incarnations=((1, 11), (2, 22)))
    scene.group_answers(conf)
    found = scene.start("h3")
    assert (found.start, found.node_id) == (Start.JOIN, 3)
    with ReplicaStore.open(scene.cluster.worker_data_dir("h3", 0)) as store:
        assert store.conf_state == conf and store.node_id == 3
        assert store.identity.cluster_id == scene.placement.cluster_id, "learned from the group's answer"


def test_a_worker_never_bootstraps_over_a_group_that_answers(scene: Scene) -> None:
    scene.group_answers(ConfState(voters=(1, 2, 4), members=(Member(4, "h1", "elsewhere:1"),)))
    found = scene.start("h3")
    assert found.start is Start.NO_REPLICA and "runs without a member" in found.reason
    assert not ReplicaStore.exists(scene.cluster.worker_data_dir("h3", 0))


def test_a_store_that_is_not_the_bound_life_of_its_id_is_retired_and_refused(scene: Scene) -> None:
    # It bootstrapped while its whole group was down (its disk had lost the real node 2).
    assert scene.start("h2").start is Start.BOOTSTRAP
    data_dir = scene.cluster.worker_data_dir("h2", 0)
    with ReplicaStore.open(data_dir) as store:
        mine = store.identity.incarnation
    scene.group_answers(_conf(scene.cluster, incarnations=((2, mine + 1),)))
    found = scene.start("h2")
    assert found.start is Start.REFUSED and f"incarnation {mine:x}" in found.reason
    assert not ReplicaStore.exists(data_dir) and read_tombstone(data_dir) is not None
    # The bound life itself opens its data as ever.
    scene.view = None
    assert scene.start("h1").start is Start.BOOTSTRAP
    with ReplicaStore.open(scene.cluster.worker_data_dir("h1", 0)) as store:
        scene.group_answers(_conf(scene.cluster, incarnations=((1, store.identity.incarnation),)))
    assert scene.start("h1").start is Start.OPEN


def test_a_retirement_cut_short_before_its_data_went_is_finished_at_the_next_start(scene: Scene) -> None:
    assert scene.start("h2").start is Start.BOOTSTRAP
    data_dir = scene.cluster.worker_data_dir("h2", 0)
    write_tombstone(data_dir, 2, "removed from the group")    # killed right after the tombstone
    found = scene.start("h2")
    assert found.start is Start.NO_REPLICA and not ReplicaStore.exists(data_dir)


def test_a_learner_added_by_start_new_joins_over_the_old_tombstone(scene: Scene) -> None:
    address = scene.cluster.host("h3").worker_address(0)
    write_tombstone(scene.cluster.worker_data_dir("h3", 0), 3, "its data was lost")
    conf = ConfState(voters=(1, 2), learners=(6,), removed=(3,),
                     members=(Member(6, "h3", address),), incarnations=((1, 11), (2, 22)))
    scene.group_answers(conf)
    found = scene.start("h3")
    assert (found.start, found.node_id) == (Start.JOIN, 6)
    assert read_tombstone(scene.cluster.worker_data_dir("h3", 0)) is None


def test_a_wiped_learner_is_refused_like_a_voter(scene: Scene) -> None:
    address = scene.cluster.host("h3").worker_address(0)
    conf = ConfState(voters=(1, 2), learners=(6,), removed=(3,),
                     members=(Member(6, "h3", address),), incarnations=((1, 11), (6, 66)))
    scene.group_answers(conf)
    found = scene.start("h3")
    assert (found.start, found.node_id) == (Start.REFUSED, 6)


def test_a_renamed_store_left_by_an_interrupted_retirement_is_deleted_first(scene: Scene) -> None:
    data_dir = scene.cluster.worker_data_dir("h1", 0)
    aside = Path(retiring_path(data_dir))
    (aside / "half").mkdir(parents=True)
    (aside / "half" / "000012.sst").write_bytes(b"x" * 10)
    assert scene.start("h1").start is Start.BOOTSTRAP
    assert not aside.exists()


def test_the_metadata_group_bootstraps_only_on_a_host_that_holds_nothing_yet(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """meta_replicas now defaults to the data groups' replicas (5 on the
    default cluster, 3 before). A cluster first started with 3 has them on
    h1..h3: h4's metadata worker, started with the whole cluster while
    nobody answers yet, must not bootstrap a second metadata group."""
    from shardnode.config import METADATA_GROUP

    raw = {"cluster": {"name": "c", "replicas": 5, "groups": 1, "data_dir": str(tmp_path / "data")},
           "host": [{"name": f"h{i}", "address": f"127.0.0.{i}", "router_port": 50051, "worker_port_base": 50100,
                     "metrics_port": 9090} for i in range(1, 6)]}
    cluster = ClusterConfig.from_dict(raw)
    assert cluster.meta_replicas == 5
    scene = Scene(cluster, monkeypatch)
    # h4 has run before: it holds a replica of group 0.
    conf = ConfState(voters=(4,), members=(Member(4, "h4", cluster.host("h4").worker_address(0)),))
    ReplicaStore.open(cluster.worker_data_dir("h4", 0), initial_conf=conf, node_id=4).close()
    with pytest.raises(MetadataUnavailable, match="has run in this cluster before"):
        scene.start("h4", group=METADATA_GROUP)
    assert not ReplicaStore.exists(cluster.worker_data_dir("h4", METADATA_GROUP))
    # A host that holds nothing (the cluster's first start) bootstraps it, with the five members.
    found = scene.start("h5", group=METADATA_GROUP)
    assert found.start is Start.BOOTSTRAP
    with ReplicaStore.open(cluster.worker_data_dir("h5", METADATA_GROUP)) as store:
        assert store.conf_state.voters == (1, 2, 3, 4, 5)
