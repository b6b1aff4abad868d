from pathlib import Path

import pytest

from shardnode.config import ClusterConfig, ConfigError

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
