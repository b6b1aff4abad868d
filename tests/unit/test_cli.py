"""The `shardnode` command line against a fake router, through main([...])."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardnode.cli.main import main
from tests.unit.test_client import FakeRouter, cluster_toml, free_port

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def router() -> Iterator[FakeRouter]:
    router = FakeRouter().start()
    yield router
    router.stop()


@pytest.fixture
def config(tmp_path: Path, router: FakeRouter) -> str:
    path = tmp_path / "cluster.toml"
    path.write_text(cluster_toml([router.port]))
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str) -> None:
    assert err.startswith("shardnode: ")
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_put_get_delete(config: str, router: FakeRouter, capsys: pytest.CaptureFixture[str]) -> None:
    # As etcdctl: `put` says OK (the previous value with --prev-kv), `delete` how many keys it removed.
    assert run(capsys, "--config", config, "put", "k", "v1") == (0, "OK\n", "")
    assert run(capsys, "--config", config, "put", "k", "v2") == (0, "OK\n", "")
    assert run(capsys, "--config", config, "put", "k", "v3", "--prev-kv") == (0, "OK\nv2", "")
    # Values are raw bytes: no newline when standard output is not a terminal.
    assert run(capsys, "--config", config, "get", "k") == (0, "v3", "")
    assert run(capsys, "get", "k", "--config", config, "--stale") == (0, "v3", "")   # options after the command
    assert run(capsys, "--config", config, "delete", "k", "--prev-kv") == (0, "1\nv3", "")
    assert run(capsys, "--config", config, "delete", "k") == (0, "0\n", "")
    # Absent: nothing printed, exit 1.
    assert run(capsys, "--config", config, "get", "k") == (1, "", "")
    assert run(capsys, "--config", config, "put", "ключ", "значение", "--prev-kv") == (0, "OK\n", "")
    assert router.store.data["ключ".encode()] == "значение".encode()


def test_status_table(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--config", config, "status")
    assert code == 1 and err == "", "group 1 has no quorum: the table, and exit 1"
    for word in ("group", "share", "host", "node", "role", "term", "commit", "applied", "lag", "health",
                 "leader", "follower", "candidate", "down", "no quorum", "2 groups, 1 with quorum",
                 "62.5%", "37.5%", "shard map epoch 1"):
        assert word in out, word


def test_status_says_which_replicas_and_groups_are_quiesced() -> None:
    from rich.console import Console

    from shardnode.cli.main import status_dict, status_table
    from tests.unit.test_client import default_status

    status = default_status()
    for replica in status.groups[0].replicas:
        replica.quiesced = True
    console = Console(record=True, width=160)
    console.print(status_table(status))
    assert "2 groups, 1 with quorum, 1 idle (quiesced)" in console.export_text()
    replicas = status_dict(status)["groups"][0]["replicas"]
    assert all(r["quiesced"] is True for r in replicas)
    assert status_dict(default_status())["groups"][0]["replicas"][0]["quiesced"] is False


def test_status_table_styles_leader_and_groups_without_quorum() -> None:
    from rich.console import Console

    from shardnode.cli.main import status_table
    from tests.unit.test_client import default_status

    table = status_table(default_status())
    styles = [str(row.style) for row in table.rows]
    assert styles[0] == "bold"                              # group 0's leader
    assert styles[1] in ("None", "")                        # a follower of a healthy group
    assert all("red" in s for s in styles[3:])              # group 1 has no quorum
    console = Console(record=True, width=120, force_terminal=True)
    console.print(table)
    assert "\x1b[1" in console.export_text(styles=True)    # bold is really rendered


def test_status_json(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--config", config, "status", "--json")
    assert code == 1 and err == ""
    status = json.loads(out)
    assert status["cluster"] == "fake"
    groups = status["groups"]
    assert [g["has_quorum"] for g in groups] == [True, False]
    assert [g["share"] for g in groups] == [0.625, 0.375] and status["shard_map_epoch"] == 1
    leader = groups[0]["replicas"][0]
    assert leader["leader"] is True and leader["role"] == "leader" and leader["health"] == "ok"
    assert groups[1]["replicas"][1]["health"] == "down"
    assert groups[0]["replicas"][2]["lag"] == 2


def test_status_json_says_which_group_is_the_metadata_group(router: FakeRouter, config: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from shardnode.config import METADATA_GROUP

    router.status_response.metadata_group.CopyFrom(pb_group(METADATA_GROUP, "meta"))
    status = json.loads(run(capsys, "--config", config, "status", "--json")[1])
    assert [g["kind"] for g in status["groups"]] == ["data", "data"]
    assert (status["metadata_group"]["kind"], status["metadata_group"]["name"]) == ("meta", "meta")


def pb_group(group: int, name: str):  # type: ignore[no-untyped-def]
    from shardnode.proto import kv_pb2

    return kv_pb2.GroupStatus(group=group, name=name, leader_id=1, has_quorum=True, replicas=[
        kv_pb2.ReplicaStatus(host="host1", node_id=1, address="127.0.0.1:50116", reachable=True, role="leader")])


def test_admin_commands_honour_timeout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 23: `--timeout 5 group add` took 10.6 s with the metadata group
    down. Nothing listens here: each command gives up after --timeout."""
    from tests.integration.ports import write_cluster_toml

    config = str(write_cluster_toml(tmp_path, name="nobody", hosts=3))
    for command in (["group", "add"], ["group", "pending"], ["member", "list"], ["member", "add", "0", "h1"]):
        began = time.monotonic()
        code, _, err = run(capsys, "--config", config, "--timeout", "1", *command)
        took = time.monotonic() - began
        assert code == 2 and err.startswith("shardnode: "), (command, err)
        assert took < 4.0, (command, took)


def test_status_names_a_replica_whose_worker_does_not_run(router: FakeRouter, config: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    problem = "supervisord gave up starting it (FATAL); see its log"
    router.status_response.groups[1].replicas[1].process_state = "FATAL"
    router.status_response.groups[1].replicas[1].process_problem = problem
    code, out, _ = run(capsys, "--config", config, "status", "--json")
    assert json.loads(out)["groups"][1]["replicas"][1]["process_problem"] == problem
    code, out, _ = run(capsys, "--config", config, "status")
    host = router.status_response.groups[1].replicas[1].host
    assert f"NOT RUNNING: {host} group 1: {problem}" in " ".join(out.split())


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--config", "/nonexistent/cluster.toml", "get", "k"], "no such file"),
        (["get", ""], "key must be 1 to"),
        (["put", "k" * 5000, "v"], "key must be 1 to"),
    ],
)
def test_user_errors_are_one_line(argv: list[str], expected: str, config: str, router: FakeRouter,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    if "--config" not in argv:
        argv = ["--config", config, *argv]
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert_one_line_error(err)
    assert expected in err
    assert router.total_calls == 0


def test_invalid_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text("[cluster]\nname = 'x'\nreplicas = 'five'\n")
    code, _, err = run(capsys, "--config", str(path), "status")
    assert code == 2
    assert_one_line_error(err)
    assert "cluster.replicas" in err


def test_unreachable_cluster_is_one_line_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(cluster_toml([free_port()]))
    began = time.monotonic()
    code, out, err = run(capsys, "--config", str(path), "put", "k", "v")     # the default 10 s deadline
    assert time.monotonic() - began < 2.0, "nothing listens: no waiting out the deadline"
    assert code == 2 and out == ""
    assert_one_line_error(err)
    assert "every router refused the connection" in err and "make run" in err


def test_usage_errors_exit_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["put", "only-a-key"], ["put"], ["--timeout", "0", "get", "k"], ["bench", "--clients", "0"],
                 ["frobnicate"], ["status", "--wait", "-1"], ["put", "k", "v", "--value-file", "f"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert_one_line_error(err)
    assert main(["--help"]) == 0
    assert "exit status" in capsys.readouterr().out
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "50% read" in out and "%%" not in out


def test_status_exit_code_follows_quorum_and_wait(config: str, router: FakeRouter,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from tests.unit.test_client import default_status

    healthy = default_status()
    healthy.groups[1].has_quorum = True
    healthy.groups[1].leader_id = 2
    router.status_response = healthy
    assert run(capsys, "--config", config, "status")[0] == 0
    assert run(capsys, "--config", config, "status", "--wait", "1")[0] == 0
    router.status_response = default_status()
    began = time.monotonic()
    code, out, err = run(capsys, "--config", config, "status", "--wait", "0.6")
    assert code == 1 and out == ""
    assert_one_line_error(err)
    assert "not ready after 0.6 s: group 1 has no quorum (1 of 3 replicas up)" in err
    assert 0.4 < time.monotonic() - began < 3


def test_status_wait_outlasts_a_cluster_that_is_starting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    router = FakeRouter()
    router.port = free_port()
    path = tmp_path / "cluster.toml"
    path.write_text(cluster_toml([router.port]))
    healthy = default_status_with_quorum()
    router.status_response = healthy
    timer = threading.Timer(0.7, router.start)     # nothing listens at first: refused, then it answers
    timer.start()
    try:
        code, out, err = run(capsys, "--config", str(path), "status", "--wait", "20", "--json")
    finally:
        timer.join()
        router.stop()
    assert code == 0, err
    assert json.loads(out)["groups"][1]["has_quorum"] is True


def default_status_with_quorum() -> object:
    from tests.unit.test_client import default_status

    status = default_status()
    status.groups[1].has_quorum = True
    status.groups[1].leader_id = 2
    return status


def test_put_value_file_and_stdin(config: str, router: FakeRouter, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    big = bytes(range(256)) * 2048              # 512 KiB: more than one command-line argument may hold
    path = tmp_path / "value.bin"
    path.write_bytes(big)
    assert run(capsys, "--config", config, "put", "big", "--value-file", str(path)) == (0, "OK\n", "")
    assert router.store.data[b"big"] == big
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"from stdin\n")))
    assert run(capsys, "--config", config, "put", "small", "--value-file", "-") == (0, "OK\n", "")
    assert router.store.data[b"small"] == b"from stdin\n"
    code, _, err = run(capsys, "--config", config, "put", "k", "--value-file", str(tmp_path / "missing"))
    assert code == 2 and "cannot read" in err


def test_data_commands_fail_at_once_without_quorum_unless_told_to_wait(
        config: str, router: FakeRouter, capsys: pytest.CaptureFixture[str]) -> None:
    router.default_fault = "no_quorum"
    for command in (["get", "k"], ["put", "k", "v"], ["delete", "k"]):
        code, out, err = run(capsys, "--config", config, "--timeout", "30", *command)
        assert code == 2 and out == "" and err.startswith(f"shardnode: {command[0]}: no quorum in group 3"), err
        assert "gave up" not in err
    assert set(router.waited_for_quorum) == {False}
    code, out, err = run(capsys, "--config", config, "--timeout", "0.5", "get", "k", "--wait")
    assert code == 2 and "gave up after 0.5 s" in err
    assert router.waited_for_quorum[-1] is True


def _shardnode(config: str, *args: str, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    return subprocess.run([sys.executable, "-m", "shardnode.cli", "--config", config, *args], cwd=ROOT,
                          stdout=stdout, stderr=subprocess.PIPE, timeout=60)


def test_binary_values_round_trip_through_the_cli(config: str, router: FakeRouter, tmp_path: Path) -> None:
    """Issue 23: `put blob --value-file big.bin` (300,000 bytes) then
    `get blob > out` gave 300,001 bytes; overwriting printed the old value."""
    blob = (bytes(range(256)) * 1172)[:299_996] + b"\n\x00\xff\n"      # 300,000 bytes, ending in a newline
    assert len(blob) == 300_000
    source = tmp_path / "big.bin"
    source.write_bytes(blob)
    put = _shardnode(config, "put", "blob", "--value-file", str(source))
    assert (put.returncode, put.stdout) == (0, b"OK\n"), put.stderr
    again = _shardnode(config, "put", "blob", "--value-file", str(source))
    assert again.stdout == b"OK\n"                                   # not the old 300 KB
    out = tmp_path / "out"
    with out.open("wb") as f:
        assert _shardnode(config, "get", "blob", stdout=f).returncode == 0
    assert out.read_bytes() == blob
    piped = _shardnode(config, "get", "blob")
    assert piped.stdout == blob
    written = tmp_path / "written"
    got = _shardnode(config, "get", "blob", "--output", str(written))
    assert (got.returncode, got.stdout) == (0, b"") and written.read_bytes() == blob
    absent = _shardnode(config, "get", "nothing", "--output", str(tmp_path / "none"))
    assert absent.returncode == 1 and not (tmp_path / "none").exists()


def test_a_value_on_a_terminal_ends_with_a_newline(config: str, router: FakeRouter) -> None:
    import os
    import pty

    router.store.data[b"k"] = b"on a terminal"
    leader, follower = pty.openpty()
    try:
        completed = _shardnode(config, "get", "k", stdout=follower)
        os.close(follower)
        follower = -1
        output = b""
        while True:
            try:
                chunk = os.read(leader, 1024)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(leader)
        if follower != -1:
            os.close(follower)
    assert completed.returncode == 0
    assert output.replace(b"\r\n", b"\n") == b"on a terminal\n"


def test_every_command_accepts_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "missing.toml")
    for argv in (["die", "127.0.0.1:1", "--config", missing], ["start", "127.0.0.1:1", "--config", missing],
                 ["status", "--config", missing], ["supervisor-conf", "--host", "h", "--config", missing]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "missing.toml: no such file" in err, (argv, err)


def test_default_config_is_found_from_another_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shardnode.config import default_config_path

    monkeypatch.delenv("SHARDNODE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_config_path() == ROOT / "etc" / "cluster.toml"
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "cluster.toml").write_text("")
    assert default_config_path() == Path("etc/cluster.toml")
    monkeypatch.setenv("SHARDNODE_CONFIG", "/somewhere/else.toml")
    assert default_config_path() == Path("/somewhere/else.toml")


def test_bench_json(config: str, router: FakeRouter, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--config", config, "bench", "--workload", "load", "--keys", "200",
                         "--clients", "4", "--duration", "5", "--json")
    assert code == 0, err
    load = json.loads(out)
    assert load["operations"]["insert"]["ops"] == 200              # every key once, then it stops
    assert load["duration_s"] < 5
    assert len([k for k in router.store.data if k.startswith(b"ycsb/")]) == 200

    code, out, err = run(capsys, "--config", config, "bench", "--workload", "a", "--keys", "200",
                         "--clients", "4", "--duration", "1", "--json", "--distribution", "uniform")
    assert code == 0, err
    result = json.loads(out)
    assert result["workload"] == "a" and 0.9 <= result["duration_s"] < 2.5
    read, update = result["operations"]["read"], result["operations"]["update"]
    assert read["ops"] > 0 and update["ops"] > 0
    assert result["total"]["ops"] == read["ops"] + update["ops"]
    assert result["total"]["errors"] == 0 and result["read_misses"] == 0
    latency = read["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["p99.9"] <= latency["max"]


def test_bench_uses_the_coalescing_client_by_default_and_says_how(config: str, router: FakeRouter,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 23: `shardnode bench` understated the system 5-14x (32 threads
    of blocking calls): by default its callers are asyncio tasks sharing one
    AsyncClient, coalesced on one stream per router; the summary says so."""
    code, out, err = run(capsys, "--config", config, "bench", "--workload", "c", "--keys", "50",
                         "--duration", "1", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert (result["engine"], result["callers"], result["connections"]) == ("async", 256, 1)
    assert result["total"]["ops"] > 0 and router.streams == 1
    # Concurrent callers' operations share messages.
    assert len(router.message_sizes) < result["total"]["ops"], (router.message_sizes, result["total"])
    code, out, err = run(capsys, "--config", config, "bench", "--workload", "c", "--keys", "50",
                         "--duration", "0.3", "--engine", "threads", "--json")
    result = json.loads(out)
    assert (result["engine"], result["callers"], result["connections"]) == ("threads", 16, 1)
    code, out, _ = run(capsys, "--config", config, "bench", "--workload", "c", "--keys", "50",
                       "--duration", "0.3", "--callers", "8")
    assert "8 callers (asyncio tasks, one AsyncClient) over 1 connection" in " ".join(out.split())
    code, _, err = run(capsys, "--config", config, "bench", "--engine", "async", "--client-per-thread")
    assert code == 2 and "needs the threads engine" in err


def test_bench_load_inserts_every_key_despite_failures_and_no_default_duration(
        config: str, router: FakeRouter, capsys: pytest.CaptureFixture[str]) -> None:
    from shardnode.bench import BenchConfig

    assert BenchConfig(workload="load").time_limit is None           # not cut short by a default
    assert BenchConfig(workload="a").time_limit == 10.0
    router.faults.extend(["invalid"] * 4)          # failed inserts are retried (fewer than LOAD_ATTEMPTS)
    code, out, err = run(capsys, "--config", config, "bench", "--workload", "load", "--keys", "300",
                         "--clients", "3", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["loaded"] == 300 and result["complete"] is True
    assert result["operations"]["insert"]["errors"] == 4
    assert len([k for k in router.store.data if k.startswith(b"ycsb/")]) == 300


def test_bench_load_cut_short_says_how_many_keys_it_loaded(
        config: str, router: FakeRouter, capsys: pytest.CaptureFixture[str]) -> None:
    router.default_fault = "slow"
    code, out, err = run(capsys, "--config", config, "bench", "--workload", "load", "--keys", "100000",
                         "--clients", "2", "--duration", "0.3")
    assert code == 2
    assert_one_line_error(err)
    loaded = len([k for k in router.store.data if k.startswith(b"ycsb/")])
    assert f"loaded only {loaded:,} of 100,000 keys" in err and "--duration 0.3 s ran out" in err
    assert f"loaded {loaded:,} of 100,000 keys" in out                # the summary says it too


def test_bench_counts_errors_separately(config: str, router: FakeRouter,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    router.faults.extend(["invalid"] * 5)
    code, out, err = run(capsys, "--config", config, "bench", "--workload", "c", "--keys", "10",
                         "--clients", "2", "--duration", "0.5", "--json", "--no-progress")
    assert code == 0, err
    result = json.loads(out)
    assert result["operations"]["read"]["errors"] == 5
    assert result["errors_by_type"] == {"InvalidArgument": 5}
    assert result["total"]["ops"] > 0


def test_bench_table_and_all_failing(tmp_path: Path, config: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--config", config, "bench", "--workload", "b", "--keys", "50",
                       "--clients", "2", "--duration", "0.3")
    assert code == 0
    for word in ("read", "update", "total", "ops/s", "p50", "p95", "p99", "p99.9", "latencies"):
        assert word in out
    dead = tmp_path / "dead.toml"
    dead.write_text(cluster_toml([free_port()]))
    began = time.monotonic()
    code, _, err = run(capsys, "--config", str(dead), "bench", "--workload", "c",
                       "--clients", "4", "--duration", "30", "--json")
    assert time.monotonic() - began < 5, "no router listening: the bench stops at once"
    assert code == 2
    assert_one_line_error(err)
    assert "bench: stopped after 0 operations: get: every router refused the connection" in err


def test_python_dash_m_runs_the_cli() -> None:
    completed = subprocess.run([sys.executable, "-m", "shardnode.cli", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30,
                               env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert completed.returncode == 0, completed.stderr
    assert "status" in completed.stdout and "bench" in completed.stdout


def _modules_after(code: str) -> set[str]:
    completed = subprocess.run([sys.executable, "-c", f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"],
                               cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    return set(completed.stdout.split())


def test_the_command_line_starts_without_what_its_command_does_not_need() -> None:
    """Issue 23: every CLI call cost 0.65 s (`--help` 0.68 s). The parser of
    every command, and the data commands' client, import only what they use
    (docs/cli.md has the figures)."""
    heavy_for_all = {"grpc", "rich", "prometheus_client", "rocksdict", "cryptography", "asyncio", "uvloop",
                     "shardnode.client", "shardnode.supervisor", "shardnode.placement.membership",
                     "shardnode.placement.directory", "shardnode.storage", "shardnode.chaos.runner"}
    parser = _modules_after("from shardnode.cli.main import build_parser\nbuild_parser().parse_args(['status'])")
    assert not parser & heavy_for_all, sorted(parser & heavy_for_all)
    client = _modules_after("from shardnode.cli.main import build_parser\nbuild_parser()\n"
                            "from shardnode.client import Client")
    heavy_for_data = {"rich", "prometheus_client", "rocksdict", "cryptography", "shardnode.supervisor",
                      "shardnode.placement.membership", "shardnode.placement.directory", "shardnode.storage"}
    assert not client & heavy_for_data, sorted(client & heavy_for_data)
