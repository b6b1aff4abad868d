from pathlib import Path

import pytest

from shardnode.config import METADATA_GROUP, ClusterConfig, ConfigError, LimitsConfig

ROOT = Path(__file__).resolve().parents[2]


def test_default_cluster_has_the_documented_shape() -> None:
    cluster = ClusterConfig.load(ROOT / "etc" / "cluster.toml")
    assert cluster.name and cluster.replicas == 5 and cluster.groups == 4
    assert [h.address for h in cluster.hosts] == [f"127.0.0.{i}" for i in range(1, 6)]
    assert {h.router_port for h in cluster.hosts} == {50051}
    assert {h.metrics_port for h in cluster.hosts} == {9090}
    assert cluster.snapshot_threshold == 10_000
    assert cluster.data_dir == ROOT / "data"


def test_placement_is_deterministic_and_even() -> None:
    raw = _raw(hosts=6, replicas=3, groups=6)
    cluster = ClusterConfig.from_dict(raw)
    per_host = {h.name: len(cluster.groups_on_host(h.name)) for h in cluster.hosts}
    assert set(per_host.values()) == {3}
    assert [r.host.name for r in cluster.group_replicas(5)] == ["h6", "h1", "h2"]
    assert cluster.replica(5, "h1").node_id == 1
    with pytest.raises(ConfigError, match="holds no replica"):
        cluster.replica(0, "h5")


def _raw(hosts: int = 3, replicas: int = 3, groups: int = 2) -> dict:
    return {
        "cluster": {"name": "test", "replicas": replicas, "groups": groups},
        "host": [
            {"name": f"h{i}", "address": f"127.0.0.{i}", "router_port": 50051, "worker_port_base": 50100,
             "metrics_port": 9090}
            for i in range(1, hosts + 1)
        ],
    }


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda r: r["cluster"].pop("name"), "cluster.name"),
        (lambda r: r["cluster"].update(replicas=0), "cluster.replicas"),
        (lambda r: r["cluster"].update(replicas=4), "cluster.replicas"),
        (lambda r: r["cluster"].update(groups="four"), "cluster.groups"),
        (lambda r: r["cluster"].update(colour="red"), "cluster.colour"),
        (lambda r: r["host"][1].update(router_port=70000), "host[1].router_port"),
        (lambda r: r["host"][2].update(address="not an address!"), "host[2].address"),
        (lambda r: r["host"][0].update(metrics_port=50101), "metrics_port"),
        (lambda r: r["host"][1].update(name="h1"), "host names must be unique"),
        (lambda r: r.update(timing={"heartbeat_ticks": 10, "election_ticks": 10}), "timing.heartbeat_ticks"),
        (lambda r: r.pop("host"), "host"),
    ],
)
def test_a_bad_file_gets_one_clear_error_naming_the_field(mutate, field: str) -> None:
    raw = _raw()
    mutate(raw)
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        ClusterConfig.from_dict(raw)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        ClusterConfig.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[cluster\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        ClusterConfig.load(bad)


def test_storage_settings_default_to_the_original_wal_archive_and_can_be_set() -> None:
    cluster = ClusterConfig.from_dict(_raw())
    assert (cluster.storage.wal_ttl_seconds, cluster.storage.wal_size_limit_mb) == (3600, 512)
    raw = _raw()
    raw["storage"] = {"wal_ttl_seconds": 0, "wal_size_limit_mb": 0}
    assert not ClusterConfig.from_dict(raw).storage.archives_wal
    for bad, field in (({"wal_ttl_seconds": -1}, "storage.wal_ttl_seconds"),
                       ({"wal_size_limit_mb": "big"}, "storage.wal_size_limit_mb"),
                       ({"wal_dir": "/x"}, "storage.wal_dir")):
        raw["storage"] = bad
        with pytest.raises(ConfigError, match=field):
            ClusterConfig.from_dict(raw)


def test_standby_hosts_hold_no_initial_replica() -> None:
    raw = _raw(hosts=4, replicas=3, groups=3)
    raw["host"][3]["standby"] = True
    cluster = ClusterConfig.from_dict(raw)
    assert all(r.host.name != "h4" for g in range(3) for r in cluster.group_replicas(g))
    assert cluster.groups_on_host("h4") == ()
    assert cluster.host("h4").standby and cluster.host("h4").node_id == 4
    raw["host"][2]["standby"] = True
    with pytest.raises(ConfigError, match="cluster.replicas"):
        ClusterConfig.from_dict(raw)
    raw["host"][2]["standby"] = "yes"
    with pytest.raises(ConfigError, match=r"host\[2\].standby"):
        ClusterConfig.from_dict(raw)


def test_metadata_group_and_groups_created_online() -> None:
    raw = _raw(hosts=5, replicas=3, groups=4)
    raw["host"][0]["standby"] = True
    cluster = ClusterConfig.from_dict(raw)
    assert (cluster.max_groups, cluster.meta_replicas) == (16, 3)
    # The first meta_replicas hosts that are not standby, node id = position + 1.
    meta = cluster.group_replicas(METADATA_GROUP)
    assert [(r.host.name, r.node_id) for r in meta] == [("h2", 2), ("h3", 3), ("h4", 4)]
    assert meta[0].address == "127.0.0.2:50116"           # worker_port_base + max_groups
    assert cluster.host("h2").worker_port(3) == 50103       # data groups as before
    assert cluster.worker_data_dir("h2", METADATA_GROUP).name == "group-meta"
    assert cluster.worker_data_dir("h2", 3).name == "group-3"
    # A group created online is placed by the shard map, not by this file.
    assert cluster.group_replicas(7) == ()
    assert [(r.host.name, r.node_id, r.address) for r in cluster.placed_replicas(7, ("h5", "h1"))] == [
        ("h5", 5, "127.0.0.5:50107"), ("h1", 1, "127.0.0.1:50107")]
    with pytest.raises(ConfigError, match="unknown group"):
        cluster.group_replicas(16)
    raw["cluster"].update(max_groups=6, meta_replicas=5)
    raw["host"][0]["standby"] = False
    cluster = ClusterConfig.from_dict(raw)
    assert cluster.host("h1").worker_port(METADATA_GROUP) == 50106 and len(cluster.meta_group_replicas()) == 5


def test_the_metadata_group_has_as_many_replicas_as_the_data_groups_by_default() -> None:
    """Issue 23: it had 3 where data groups have 5, so losing 2 of 5 hosts
    stopped every admin command."""
    assert ClusterConfig.load(ROOT / "etc" / "cluster.toml").meta_replicas == 5
    assert ClusterConfig.from_dict(_raw(hosts=5, replicas=3, groups=2)).meta_replicas == 3
    assert ClusterConfig.from_dict(_raw(hosts=7, replicas=7, groups=2)).meta_replicas == 5     # 3 or 5
    assert ClusterConfig.from_dict(_raw(hosts=4, replicas=4, groups=2)).meta_replicas == 3
    standby = _raw(hosts=5, replicas=4, groups=2)
    standby["host"][4]["standby"] = True
    assert ClusterConfig.from_dict(standby).meta_replicas == 3     # 4 hosts may hold it: an odd 3
    pinned = _raw(hosts=5, replicas=5, groups=2)
    pinned["cluster"]["meta_replicas"] = 3
    assert ClusterConfig.from_dict(pinned).meta_replicas == 3


def test_tiny_clusters_default_to_fewer_metadata_replicas() -> None:
    assert ClusterConfig.from_dict(_raw(hosts=1, replicas=1, groups=1)).meta_replicas == 1
    assert ClusterConfig.from_dict(_raw(hosts=2, replicas=1, groups=1)).meta_replicas == 2
    assert ClusterConfig.from_dict(_raw(hosts=2, replicas=1, groups=20)).max_groups == 20


@pytest.mark.parametrize(
    "settings, field, message",
    [
        ({"max_groups": 1}, "cluster.max_groups", "at least cluster.groups"),
        ({"max_groups": "many"}, "cluster.max_groups", "integer"),
        ({"meta_replicas": 4}, "cluster.meta_replicas", "3 or 5"),
        ({"meta_replicas": 1}, "cluster.meta_replicas", "integer in 3..5"),
        ({"meta_replicas": 5}, "cluster.meta_replicas", "at least as many hosts"),
    ],
)
def test_bad_metadata_settings_are_refused_in_one_line(settings: dict, field: str, message: str) -> None:
    raw = _raw(hosts=4, replicas=3, groups=2)
    raw["cluster"].update(settings)
    with pytest.raises(ConfigError, match=field) as info:
        ClusterConfig.from_dict(raw)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_metadata_worker_port_is_checked_like_the_others() -> None:
    raw = _raw(hosts=3, replicas=3, groups=2)
    raw["cluster"]["max_groups"] = 4
    raw["host"][0]["metrics_port"] = 50104                 # the metadata group's worker port
    with pytest.raises(ConfigError, match="metrics_port: 50104 collides with its worker ports"):
        ClusterConfig.from_dict(raw)
    raw["host"][0]["metrics_port"] = 50105
    ClusterConfig.from_dict(raw)
    raw["host"][0]["worker_port_base"] = 65533
    with pytest.raises(ConfigError, match="base \\+ max_groups exceeds 65535"):
        ClusterConfig.from_dict(raw)


# --- [limits] -------------------------------------------------------------------------------------


def test_limits_have_safe_defaults() -> None:
    limits = ClusterConfig.from_dict(_raw()).limits
    assert limits == LimitsConfig()
    assert limits.max_request_bytes == 4 << 20
    assert limits.max_batch_operations == 10_000
    assert limits.max_timeout_seconds == 60.0
    assert limits.max_frame_bytes == 8 << 20


def test_limits_can_be_set() -> None:
    raw = _raw()
    raw["limits"] = {"max_batch_operations": 2000, "max_timeout_ms": 5000, "max_snapshot_bytes": 1 << 30,
                     "max_concurrent_rpcs": 64}
    limits = ClusterConfig.from_dict(raw).limits
    assert (limits.max_batch_operations, limits.max_timeout_ms, limits.max_snapshot_bytes,
            limits.max_concurrent_rpcs) == (2000, 5000, 1 << 30, 64)


def test_request_and_frame_limits_grow_with_the_largest_put() -> None:
    raw = _raw()
    raw["cluster"]["max_value_bytes"] = 16 << 20
    limits = ClusterConfig.from_dict(raw).limits
    assert limits.max_request_bytes > 16 << 20
    assert limits.max_frame_bytes > 16 << 20


@pytest.mark.parametrize(
    "limits, field",
    [
        ({"max_batch_operations": 0}, "limits.max_batch_operations"),
        ({"max_batch_operations": 999}, "limits.max_batch_operations"),   # below a client's message
        ({"max_batch_operations": "many"}, "limits.max_batch_operations"),
        ({"max_request_bytes": 1000}, "limits.max_request_bytes"),        # a 1 MiB value would not fit
        ({"max_timeout_ms": -1}, "limits.max_timeout_ms"),
        ({"max_concurrent_rpcs": True}, "limits.max_concurrent_rpcs"),
        ({"max_snapshot_bytes": 1.5}, "limits.max_snapshot_bytes"),
        ({"max_stream_operations": 5000}, "limits.max_batch_operations"),  # a whole message could never fit
        ({"max_connection_operations": 5000}, "limits.max_stream_operations"),
        ({"max_requests": 5}, "limits.max_requests"),
    ],
)
def test_bad_limits_get_one_clear_error_naming_the_key(limits: dict, field: str) -> None:
    raw = _raw()
    raw["limits"] = limits
    with pytest.raises(ConfigError, match=field) as error:
        ClusterConfig.from_dict(raw)
    assert "\n" not in str(error.value)


def test_limits_must_be_a_table() -> None:
    raw = _raw()
    raw["limits"] = 5
    with pytest.raises(ConfigError, match="limits: must be a table"):
        ClusterConfig.from_dict(raw)


# --- Names that collide with the CA's or the clients' certificates -----------------------------------


@pytest.mark.parametrize("name", ["ca", "client", "CA"])
def test_reserved_host_names_are_refused(name: str) -> None:
    raw = _raw()
    raw["host"][1]["name"] = name
    with pytest.raises(ConfigError, match=rf"host\[1\].name: '{name}' is reserved"):
        ClusterConfig.from_dict(raw)


def test_an_allowed_client_named_like_a_host_is_refused() -> None:
    raw = _raw()
    raw["security"] = {"allowed_clients": ["client", "h2"]}
    with pytest.raises(ConfigError, match="security.allowed_clients: 'h2' is the name of a host"):
        ClusterConfig.from_dict(raw)
