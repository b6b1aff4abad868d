"""The namespace mode's pure parts: the `namespace` key of cluster.toml, the
supervisord command that runs a host in its namespace, the namespaced copy
of a cluster.toml, the names and subnets a network picks, and the nft
scripts and tc commands the network faults run (checked here as text;
tests/integration/test_partitions.py runs them for real)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import tomllib
from pathlib import Path

import pytest

from shardnode.chaos import namespaces, network_faults
from shardnode.chaos.commands import NetworkCommandError, run
from shardnode.chaos.namespaced_config import dump_toml, write_namespaced_config
from shardnode.chaos.namespaces import NamespaceNetwork, NetworkRecord, unique_name
from shardnode.chaos.network_faults import InputRules, NetworkFaults, netem_command, nft_script
from shardnode.config import ClusterConfig, ConfigError, is_namespace_name
from shardnode.supervisor import local_cluster_config

ROOT = Path(__file__).resolve().parents[2]


def _raw(hosts: int = 3, namespaces: bool = False) -> dict:
    return {
        "cluster": {"name": "netns-unit", "replicas": hosts, "groups": 1},
        "host": [
            {"name": f"h{i}", "address": f"10.1.2.{i}", "router_port": 50051, "worker_port_base": 50100,
             "metrics_port": 9090, **({"namespace": f"snunit-h{i}"} if namespaces else {})}
            for i in range(1, hosts + 1)
        ],
    }


# --- cluster.toml: [[host]] namespace ---------------------------------------------------


def test_a_host_has_no_namespace_unless_the_file_names_one() -> None:
    assert all(h.namespace is None for h in ClusterConfig.from_dict(_raw()).hosts)
    cluster = ClusterConfig.from_dict(_raw(namespaces=True))
    assert [h.namespace for h in cluster.hosts] == ["snunit-h1", "snunit-h2", "snunit-h3"]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "-leading-dash", "with space", "x" * 256, 7, "tab\there"])
def test_a_namespace_that_ip_netns_would_refuse_is_refused_in_one_line(name: object) -> None:
    raw = _raw(namespaces=True)
    raw["host"][1]["namespace"] = name
    with pytest.raises(ConfigError) as error:
        ClusterConfig.from_dict(raw)
    assert "host[1].namespace" in str(error.value) and "\n" not in str(error.value)


def test_two_hosts_cannot_share_a_namespace() -> None:
    raw = _raw(namespaces=True)
    raw["host"][2]["namespace"] = raw["host"][0]["namespace"]
    with pytest.raises(ConfigError, match="share one namespace"):
        ClusterConfig.from_dict(raw)


def test_namespace_names() -> None:
    assert is_namespace_name("sn00a1b2-host1") and is_namespace_name("a.b_c-d") and is_namespace_name("x" * 255)
    assert not is_namespace_name("x" * 256) and not is_namespace_name("..") and not is_namespace_name("a/b")


# --- supervisord: a host's supervisord runs in its namespace ---------------------------------


def _top_conf(tmp_path: Path, raw: dict) -> str:
    raw["cluster"]["data_dir"] = str(tmp_path / "data")
    config = tmp_path / "cluster.toml"
    config.write_text(dump_toml(raw))
    cluster = ClusterConfig.load(config)
    top = local_cluster_config(cluster, config_path=config, project_root=ROOT, out_dir=tmp_path / "etc")
    return top.read_text()


def test_a_host_with_a_namespace_starts_its_supervisord_with_ip_netns_exec(tmp_path: Path) -> None:
    text = _top_conf(tmp_path, _raw(namespaces=True))
    commands = [line for line in text.splitlines() if line.startswith("command=")]
    assert len(commands) == 3
    for i, command in enumerate(commands, start=1):
        words = command.removeprefix("command=").split()
        assert Path(words[0]).name == "ip" and words[1:4] == ["netns", "exec", f"snunit-h{i}"]
        assert words[5:7] == ["-m", "shardnode.host_supervisord"]
        assert words[-1].endswith(f"hosts/h{i}.conf")


def test_a_host_without_a_namespace_is_started_as_before(tmp_path: Path) -> None:
    text = _top_conf(tmp_path, _raw())
    commands = [line for line in text.splitlines() if line.startswith("command=")]
    assert len(commands) == 3 and not any("netns" in c for c in commands)


# --- The namespaced copy of a cluster.toml ------------------------------------------------------


class _Network:
    """What write_namespaced_config reads of a NamespaceNetwork, without creating one."""

    name = "snunit"
    subnet = ipaddress.ip_network("10.200.7.0/24")
    hosts = ("host1", "host2", "host3", "host4", "host5")

    def address(self, host: str) -> str:
        return f"10.200.7.{self.hosts.index(host) + 1}"

    def namespace(self, host: str) -> str:
        return f"snunit-{host}"


def test_dump_toml_reads_back_as_the_same_document() -> None:
    with (ROOT / "etc" / "cluster.toml").open("rb") as f:
        raw = tomllib.load(f)
    raw["cluster"]["odd key"] = 'quote " backslash \\ newline \n é'
    raw["limits"] = {"nested": {"a": 1, "b": [1.5, True]}, "floats": [float("inf")]}
    assert tomllib.loads(dump_toml(raw)) == raw


def test_the_namespaced_copy_moves_every_host_to_its_namespace(tmp_path: Path) -> None:
    dest = write_namespaced_config(ROOT / "etc" / "cluster.toml", tmp_path / "cluster-netns.toml",
                                   _Network(), data_dir=tmp_path / "data")  # type: ignore[arg-type]
    source = ClusterConfig.load(ROOT / "etc" / "cluster.toml")
    copy = ClusterConfig.load(dest)
    assert [(h.name, h.address, h.namespace) for h in copy.hosts] == [
        (f"host{i}", f"10.200.7.{i}", f"snunit-host{i}") for i in range(1, 6)]
    # Everything else is the source's; the ports stay (each host has an address of its own).
    assert [(h.router_port, h.worker_port_base, h.metrics_port) for h in copy.hosts] == [
        (h.router_port, h.worker_port_base, h.metrics_port) for h in source.hosts]
    assert (copy.name, copy.groups, copy.replicas, copy.timing) == (source.name, source.groups, source.replicas,
                                                                    source.timing)
    assert copy.data_dir == tmp_path / "data"
    assert dest.read_text().startswith("# Generated from ")


def test_the_copy_keeps_the_data_where_the_source_has_it_unless_told(tmp_path: Path) -> None:
    dest = write_namespaced_config(ROOT / "etc" / "cluster.toml", tmp_path / "copy.toml",
                                   _Network())  # type: ignore[arg-type]
    assert ClusterConfig.load(dest).data_dir == ROOT / "data"     # not tmp_path/data: written absolute


def test_a_host_missing_from_the_network_is_refused(tmp_path: Path) -> None:
    network = _Network()
    network.hosts = ("host1", "host2")  # type: ignore[misc]
    with pytest.raises(KeyError, match="host3, host4, host5"):
        write_namespaced_config(ROOT / "etc" / "cluster.toml", tmp_path / "copy.toml",
                                network)  # type: ignore[arg-type]


# --- Names, subnets, records ---------------------------------------------------------------------


def test_unique_names_fit_an_interface_name_and_differ() -> None:
    names = {unique_name() for _ in range(50)}
    assert len(names) == 50
    for name in names:
        assert name.startswith("sn") and len(f"{name}-rt") <= 15
        NamespaceNetwork(name, ["h1"])       # accepted


@pytest.mark.parametrize("name", ["Upper", "x", "sn-dash", "a" * 13, "1digit"])
def test_a_network_name_that_would_not_fit_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="network name"):
        NamespaceNetwork(name, ["h1"])


def test_a_network_is_named_after_its_name_and_hosts() -> None:
    network = NamespaceNetwork("snunit", ["h1", "h2"])
    assert network.namespace("h2") == "snunit-h2" and network.bridge_namespace == "snunit_bridge"
    assert network.exec_prefix("h1") == ["ip", "netns", "exec", "snunit-h1"]
    assert network.namespaces() == ("snunit-h1", "snunit-h2", "snunit_bridge")
    with pytest.raises(KeyError, match="h3"):
        network.namespace("h3")
    with pytest.raises(RuntimeError, match="not created"):
        network.address("h1")
    with pytest.raises(ValueError, match="unique"):
        NamespaceNetwork("snunit", ["h1", "h1"])
    with pytest.raises(ValueError, match="/24"):
        NamespaceNetwork("snunit", ["h1"], subnet="10.9.0.0/16")


def test_the_subnet_chosen_overlaps_nothing_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    used = [ipaddress.ip_network("10.128.0.0/10")]      # the lower half of the pool
    monkeypatch.setattr(namespaces, "_root_networks", lambda: used)
    reserved = [ipaddress.ip_network("10.192.0.0/11")]
    for i in range(100):
        subnet = namespaces._free_subnet(f"name{i}", reserved)
        assert subnet.prefixlen == 24 and subnet.subnet_of(namespaces._POOL)
        assert not any(subnet.overlaps(n) for n in used + reserved)


def test_a_record_knows_whether_its_creator_lives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(namespaces, "RECORDS_DIR", tmp_path)
    child = subprocess.Popen(["true"])
    child.wait()
    mine = NetworkRecord("snunita", os.getpid(), namespaces._start_time(os.getpid()) or 0, "10.130.0.0/24",
                         "snunita_bridge", ("snunita-h1",), "snunita-rt")
    gone = NetworkRecord("snunitb", child.pid, 12345, "10.130.1.0/24", "snunitb_bridge", ("snunitb-h1",), "snunitb-rt")
    reused = NetworkRecord("snunitc", os.getpid(), 1, "10.130.2.0/24", "snunitc_bridge", ("snunitc-h1",), "snunitc-rt")
    for record in (mine, gone, reused):
        record.write()
    assert NetworkRecord.read(tmp_path / "snunita.json") == mine
    assert mine.creator_alive() and not gone.creator_alive() and not reused.creator_alive()
    assert mine.namespaces == ("snunita-h1", "snunita_bridge")
    (tmp_path / "broken.json").write_text("{not json")
    assert NetworkRecord.read(tmp_path / "broken.json") is None


def test_a_failing_command_is_named_with_its_stderr() -> None:
    with pytest.raises(NetworkCommandError) as error:
        run(["sh", "-c", "echo 'Error: no such thing' >&2; exit 3", "arg with space"])
    message = str(error.value)
    assert message.startswith("`sh -c") and "'arg with space'" in message
    assert "exited 3: Error: no such thing" in message and "\n" not in message
    assert run(["sh", "-c", "echo gone >&2; exit 1"], ok_errors=("gone",)) == ""
    with pytest.raises(NetworkCommandError, match="command not found"):
        run(["no-such-command-anywhere"])


# --- nft scripts and tc commands ----------------------------------------------------------------


def test_nothing_to_drop_deletes_our_table_in_one_transaction() -> None:
    assert nft_script(InputRules()) == "table inet shardnode_chaos\ndelete table inet shardnode_chaos\n"


def test_blocked_sources_are_dropped_after_loopback_is_let_through() -> None:
    script = nft_script(InputRules(blocked_sources=frozenset({"10.1.2.10", "10.1.2.9"})))
    lines = [line.strip() for line in script.splitlines()]
    assert lines[:4] == ["table inet shardnode_chaos", "delete table inet shardnode_chaos",
                         "table inet shardnode_chaos {", "chain input {"]
    assert "type filter hook input priority filter - 10; policy accept;" in lines
    # Sorted as addresses, not as text.
    assert lines.index('iif "lo" accept') < lines.index("ip saddr { 10.1.2.9, 10.1.2.10 } drop")
    assert nft_script(InputRules(blocked_sources=frozenset({"10.1.2.3"}))).count("ip saddr 10.1.2.3 drop") == 1


def test_isolation_from_clients_and_random_loss() -> None:
    script = nft_script(InputRules(only_from=frozenset({"10.1.2.1", "10.1.2.2"}), random_loss_percent=12.5))
    assert "ip saddr != { 10.1.2.1, 10.1.2.2 } drop" in script
    assert "numgen random mod 10000 < 1250 drop" in script
    assert "ip saddr {" not in script.replace("ip saddr != {", "")


def test_netem_commands() -> None:
    assert netem_command(delay_ms=20, jitter_ms=10, loss_percent=2.5, reorder_percent=10) == [
        "tc", "qdisc", "replace", "dev", "eth0", "root", "netem",
        "delay", "20ms", "10ms", "loss", "2.5%", "reorder", "10%"]
    assert netem_command(loss_percent=1)[-3:] == ["netem", "loss", "1%"]
    assert netem_command(delay_ms=5)[-3:] == ["netem", "delay", "5ms"]


@pytest.mark.parametrize("settings, message", [
    ({}, "nothing to shape"),
    ({"reorder_percent": 10, "loss_percent": 1}, "need a delay"),
    ({"jitter_ms": 5}, "need a delay"),
    ({"delay_ms": 5, "jitter_ms": 10}, "must not exceed"),
    ({"loss_percent": 101}, "loss_percent"),
    ({"delay_ms": -1}, "delay_ms"),
])
def test_netem_settings_out_of_range_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        netem_command(**settings)


# --- NetworkFaults: what it runs where --------------------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], str | None]] = []

    def __call__(self, command, *, input=None, ok_errors=()):  # type: ignore[no-untyped-def]
        self.calls.append((list(command), input))
        return ""

    def scripts(self) -> dict[str, str]:
        """Namespace → the last nft script sent there."""
        return {c[3]: i for c, i in self.calls if c[4:] == ["nft", "-f", "-"]}


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> tuple[NetworkFaults, _Recorder]:
    recorder = _Recorder()
    monkeypatch.setattr(network_faults, "run", recorder)
    return NetworkFaults(ClusterConfig.from_dict(_raw(hosts=5, namespaces=True))), recorder


def test_a_partition_blocks_both_ways_between_sides_and_leaves_a_bridge_alone(
        faults) -> None:  # type: ignore[no-untyped-def]
    cut, recorder = faults
    cut.partition(["h1", "h2"], ["h4", "h5"])
    assert cut.blocked() == {(a, b) for a in ("h1", "h2") for b in ("h4", "h5")} | {
        (b, a) for a in ("h1", "h2") for b in ("h4", "h5")}
    scripts = recorder.scripts()
    assert set(scripts) == {"snunit-h1", "snunit-h2", "snunit-h4", "snunit-h5"}      # h3, the bridge: untouched
    assert "ip saddr { 10.1.2.4, 10.1.2.5 } drop" in scripts["snunit-h1"]
    assert "ip saddr { 10.1.2.1, 10.1.2.2 } drop" in scripts["snunit-h5"]


def test_blocks_are_directed_cumulative_and_undone_one_by_one(faults) -> None:  # type: ignore[no-untyped-def]
    cut, recorder = faults
    cut.block([("h1", "h2")])
    assert recorder.scripts() == {"snunit-h2": nft_script(InputRules(blocked_sources=frozenset({"10.1.2.1"})))}
    cut.block([("h3", "h2"), ("h2", "h1")])
    assert cut.blocked() == {("h1", "h2"), ("h3", "h2"), ("h2", "h1")}
    assert "ip saddr { 10.1.2.1, 10.1.2.3 } drop" in recorder.scripts()["snunit-h2"]
    recorder.calls.clear()
    cut.unblock([("h1", "h2"), ("h3", "h2")])
    assert cut.blocked() == {("h2", "h1")}
    # Only the host whose rules changed is rewritten; with nothing left, its table goes.
    assert recorder.scripts() == {"snunit-h2": nft_script(InputRules())}


def test_heal_clears_every_host_whatever_is_remembered(faults) -> None:  # type: ignore[no-untyped-def]
    cut, recorder = faults
    cut.block([("h1", "h2")])
    cut.isolate_from_clients("h3")
    recorder.calls.clear()
    cut.heal()
    assert cut.blocked() == frozenset()
    assert recorder.scripts() == {f"snunit-h{i}": nft_script(InputRules()) for i in range(1, 6)}
    shaped = [c for c, _ in recorder.calls if c[4:6] == ["tc", "qdisc"]]
    assert len(shaped) == 5 and all(c[6:] == ["show", "dev", "eth0", "root"] for c in shaped)


def test_isolation_from_clients_lets_only_the_hosts_in(faults) -> None:  # type: ignore[no-untyped-def]
    cut, recorder = faults
    cut.isolate_from_clients("h3")
    assert "ip saddr != { 10.1.2.1, 10.1.2.2, 10.1.2.3, 10.1.2.4, 10.1.2.5 } drop" in recorder.scripts()["snunit-h3"]


def test_shape_runs_netem_in_the_hosts_namespace(faults) -> None:  # type: ignore[no-untyped-def]
    cut, recorder = faults
    cut.shape("h2", delay_ms=50, jitter_ms=5, loss_percent=1, reorder_percent=25)
    assert recorder.calls[-1][0] == ["ip", "netns", "exec", "snunit-h2", *netem_command(50, 5, 1, 25)]


def test_mistakes_are_refused_before_anything_runs(faults) -> None:  # type: ignore[no-untyped-def]
    cut, recorder = faults
    with pytest.raises(ValueError, match="itself"):
        cut.block([("h1", "h1")])
    with pytest.raises(KeyError, match="h9"):
        cut.block([("h1", "h9")])
    with pytest.raises(ValueError, match="two sides"):
        cut.partition(["h1", "h2"], ["h2", "h3"])
    with pytest.raises(ValueError, match="0..100"):
        cut.drop_randomly("h1", 150)
    assert recorder.calls == [] and cut.blocked() == frozenset()
    with pytest.raises(ValueError, match="h1, h2, h3 have none"):
        NetworkFaults(ClusterConfig.from_dict(_raw()))
