"""The `shardnode` command line against a fake router, through main([...])."""

from __future__ import annotations

import json
import subprocess
import sys
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
    assert run(capsys, "--config", config, "put", "k", "v1") == (0, "", "")
    assert run(capsys, "--config", config, "put", "k", "v2") == (0, "v1\n", "")
    assert run(capsys, "--config", config, "get", "k") == (0, "v2\n", "")
    assert run(capsys, "get", "k", "--config", config, "--stale") == (0, "v2\n", "")   # options after the command
    assert run(capsys, "--config", config, "delete", "k") == (0, "v2\n", "")
    assert run(capsys, "--config", config, "delete", "k") == (0, "", "")
    # Absent: nothing printed, exit 1.
    assert run(capsys, "--config", config, "get", "k") == (1, "", "")
    assert run(capsys, "--config", config, "put", "ключ", "значение") == (0, "", "")
    assert router.store.data["ключ".encode()] == "значение".encode()


def test_status_table(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--config", config, "status")
    assert code == 0 and err == ""
    for word in ("group", "host", "node", "role", "term", "commit", "applied", "lag", "health",
                 "leader", "follower", "candidate", "down", "no quorum", "2 groups, 1 with quorum"):
        assert word in out, word


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
    assert code == 0 and err == ""
    status = json.loads(out)
    assert status["cluster"] == "fake"
    groups = status["groups"]
    assert [g["has_quorum"] for g in groups] == [True, False]
    leader = groups[0]["replicas"][0]
    assert leader["leader"] is True and leader["role"] == "leader" and leader["health"] == "ok"
    assert groups[1]["replicas"][1]["health"] == "down"
    assert groups[0]["replicas"][2]["lag"] == 2


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


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["put", "only-a-key"]) == 2
    assert main(["--timeout", "0", "get", "k"]) == 2
    assert main(["bench", "--clients", "0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert main(["--help"]) == 0
    assert "exit status" in capsys.readouterr().out


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
    code, _, err = run(capsys, "--config", str(dead), "--timeout", "0.2", "bench", "--workload", "c",
                       "--clients", "1", "--duration", "0.3", "--json")
    assert code == 2
    assert err.strip().endswith("(Unavailable 1)") or "no operation succeeded" in err


def test_python_dash_m_runs_the_cli() -> None:
    completed = subprocess.run([sys.executable, "-m", "shardnode.cli", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30,
                               env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert completed.returncode == 0, completed.stderr
    assert "status" in completed.stdout and "bench" in completed.stdout
