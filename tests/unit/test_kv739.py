"""shardnode.kv739: every return convention of DESIGN.md's table, against fake routers."""

from __future__ import annotations

import logging
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardnode import kv739
from shardnode.errors import ShardnodeError, Unavailable
from tests.unit.test_client import FakeRouter, cluster_toml, free_port

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def clean_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts and ends uninitialized; calls fail fast."""
    monkeypatch.setattr(kv739, "DEFAULT_TIMEOUT", 2.0)
    if kv739._state is not None:
        kv739.kv739_shutdown()
    yield
    if kv739._state is not None:
        kv739.kv739_shutdown()


@pytest.fixture
def router() -> Iterator[FakeRouter]:
    router = FakeRouter().start()
    yield router
    router.stop()


@pytest.fixture
def address_file(tmp_path: Path, router: FakeRouter) -> Path:
    path = tmp_path / "routers.txt"
    path.write_text(f"# the routers\n\n{router.address}   # only one\n")
    return path


@pytest.fixture
def toml_file(tmp_path: Path, router: FakeRouter) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(cluster_toml([router.port]))
    return path


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "shardnode.kv739" and r.levelno == logging.WARNING]


# --- init / shutdown ---------------------------------------------------------------------------


def test_init_with_an_address_list_then_get_put(address_file: Path) -> None:
    assert kv739.kv739_init(str(address_file)) == 0
    assert kv739.kv739_get("k") == (1, "")
    assert kv739.kv739_put("k", "v1") == (1, "")
    assert kv739.kv739_put("k", "v2") == (0, "v1")
    assert kv739.kv739_get("k") == (0, "v2")
    assert kv739.kv739_shutdown() == 0


def test_init_with_a_cluster_toml(toml_file: Path, router: FakeRouter) -> None:
    assert kv739.kv739_init(toml_file) == 0
    assert kv739.kv739_put("k", "v") == (1, "")
    assert kv739.kv739_get("k") == (0, "v")
    assert router.store.data == {b"k": b"v"}
    assert kv739.kv739_shutdown() == 0


def test_second_init_without_shutdown_fails(address_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert kv739.kv739_init(str(address_file)) == 0
    assert kv739.kv739_init(str(address_file)) == -1
    assert any("already initialized" in m for m in warnings_of(caplog))
    assert kv739.kv739_get("k") == (1, "")                   # the first init still works
    assert kv739.kv739_shutdown() == 0
    assert kv739.kv739_init(str(address_file)) == 0          # init again after shutdown


def test_double_shutdown_fails(address_file: Path) -> None:
    assert kv739.kv739_shutdown() == -1
    assert kv739.kv739_init(str(address_file)) == 0
    assert kv739.kv739_shutdown() == 0
    assert kv739.kv739_shutdown() == -1


@pytest.mark.parametrize(
    "content",
    [
        None,                                   # no such file
        "",                                     # no router
        "# nothing but comments\n\n",
        "127.0.0.1\n",                          # no port
        "127.0.0.1:99999\n",
        "127.0.0.1:50051 127.0.0.2:50051\n",    # two on one line
        "[cluster]\nname = 'x'\n",              # a cluster.toml without hosts
        "[cluster]\nname = \n",                 # broken TOML that is not an address list either
    ],
)
def test_init_with_a_bad_file_fails(tmp_path: Path, content: str | None, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "config"
    if content is not None:
        path.write_text(content)
    assert kv739.kv739_init(str(path)) == -1
    assert len(warnings_of(caplog)) == 1
    assert kv739._state is None


def test_init_with_a_binary_file_or_a_directory_fails(tmp_path: Path) -> None:
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00")
    assert kv739.kv739_init(str(binary)) == -1
    assert kv739.kv739_init(str(tmp_path)) == -1
    assert kv739.kv739_init(None) == -1                      # type: ignore[arg-type]


# --- get / put -----------------------------------------------------------------------------------


def test_everything_before_init_fails(caplog: pytest.LogCaptureFixture) -> None:
    assert kv739.kv739_get("k") == (-1, "")
    assert kv739.kv739_put("k", "v") == (-1, "")
    assert kv739.kv739_die("127.0.0.1:50051", 1) == -1
    assert kv739.kv739_start("127.0.0.1:50051", 0) == -1
    assert kv739.kv739_leave("127.0.0.1:50051", 1) == -1
    messages = warnings_of(caplog)
    assert len(messages) == 5 and all("not initialized" in m for m in messages[:4])


def test_values_follow_the_type_of_the_key(address_file: Path) -> None:
    assert kv739.kv739_init(str(address_file)) == 0
    assert kv739.kv739_put(b"bin", b"\xff\x00") == (1, "")
    assert kv739.kv739_get(b"bin") == (0, b"\xff\x00")
    assert kv739.kv739_get("bin") == (0, "\udcff\x00")      # surrogateescape: nothing lost
    assert kv739.kv739_put("bin", "x") == (0, "\udcff\x00")
    assert kv739.kv739_put("ключ", "значение") == (1, "")
    assert kv739.kv739_get("ключ") == (0, "значение")
    assert kv739.kv739_get("ключ".encode()) == (0, "значение".encode())
    assert kv739.kv739_put("empty", "") == (1, "")
    assert kv739.kv739_get("empty") == (0, "")               # found, with an empty value
    assert kv739.kv739_get(b"absent") == (1, "")


def test_invalid_keys_and_values_fail_without_raising(address_file: Path, router: FakeRouter,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    assert kv739.kv739_init(str(address_file)) == 0
    assert kv739.kv739_get("") == (-1, "")
    assert kv739.kv739_get(42) == (-1, "")                   # type: ignore[arg-type]
    assert kv739.kv739_put("k" * 4097, "v") == (-1, "")
    assert kv739.kv739_put("k", "v" * ((1 << 20) + 1)) == (-1, "")
    assert kv739.kv739_put("k", None) == (-1, "")            # type: ignore[arg-type]
    assert router.total_calls == 0
    messages = warnings_of(caplog)
    assert len(messages) == 5 and all("InvalidArgument" in m for m in messages)


def test_unreachable_cluster_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(kv739, "DEFAULT_TIMEOUT", 0.4)
    path = tmp_path / "routers"
    path.write_text(f"127.0.0.1:{free_port()}\n")
    assert kv739.kv739_init(str(path)) == 0
    assert kv739.kv739_get("k") == (-1, "")
    assert kv739.kv739_put("k", "v") == (-1, "")
    messages = warnings_of(caplog)
    assert len(messages) == 2 and all("RoutersUnreachable" in m and "refused" in m for m in messages)


def test_threads_share_the_module_state(address_file: Path, router: FakeRouter) -> None:
    assert kv739.kv739_init(str(address_file)) == 0
    results: dict[int, list[tuple[int, object]]] = {}

    def worker(n: int) -> None:
        results[n] = [kv739.kv739_put(f"t{n}", str(i)) for i in range(20)]
        results[n].append(kv739.kv739_get(f"t{n}"))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    expected = [(1, "")] + [(0, str(i)) for i in range(19)] + [(0, "19")]
    assert results == {n: expected for n in range(8)}
    assert router.store.violations == []


# --- die / start / leave -------------------------------------------------------------------------


class FakeProcessControl:
    calls: list[tuple[str, str, bool]] = []
    fail_with: Exception | None = None

    def __init__(self, cluster: object) -> None:
        self.cluster = cluster

    def stop(self, server: str, clean: bool) -> None:
        self._record("stop", server, clean)

    def _record(self, action: str, server: str, flag: bool) -> None:
        if FakeProcessControl.fail_with is not None:
            raise FakeProcessControl.fail_with
        FakeProcessControl.calls.append((action, server, flag))


class FakeMembershipAdmin:
    """start and leave go through the membership admin (it knows who left)."""

    def __init__(self, cluster: object, control: FakeProcessControl) -> None:
        self.control = control

    def __enter__(self) -> "FakeMembershipAdmin":
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def restart(self, server: str) -> None:
        self.control._record("start", server, False)

    def start_new(self, server: str) -> None:
        self.control._record("start", server, True)

    def leave(self, server: str, clean: bool) -> None:
        self.control._record("leave", server, clean)


@pytest.fixture
def supervisor(monkeypatch: pytest.MonkeyPatch) -> type[FakeProcessControl]:
    module = types.ModuleType("shardnode.supervisor")
    module.ProcessControl = FakeProcessControl                # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "shardnode.supervisor", module)
    membership = types.ModuleType("shardnode.placement.membership")
    membership.MembershipAdmin = FakeMembershipAdmin          # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "shardnode.placement.membership", membership)
    shape_change = types.ModuleType("shardnode.placement.shape_change")

    def request_change(cluster, kind, args, *, control, on_line):  # type: ignore[no-untyped-def]
        """Shape changes go through the scheduler: recorded as intents."""
        if kind.value == "start_new":
            control._record("start", args["server"], True)
        else:
            control._record(kind.value, args["server"], args["clean"])

    shape_change.request_change = request_change                # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "shardnode.placement.shape_change", shape_change)
    FakeProcessControl.calls = []
    FakeProcessControl.fail_with = None
    return FakeProcessControl


def test_die_and_start_delegate_to_process_control(toml_file: Path,
                                                   supervisor: type[FakeProcessControl]) -> None:
    assert kv739.kv739_init(str(toml_file)) == 0
    assert kv739.kv739_die("127.0.0.1:40000", 1) == 0
    assert kv739.kv739_die("host1", 0) == 0
    assert kv739.kv739_start("127.0.0.1:40000", 0) == 0
    assert kv739.kv739_start("127.0.0.1:40000", True) == 0
    assert supervisor.calls == [
        ("stop", "127.0.0.1:40000", True),
        ("stop", "host1", False),
        ("start", "127.0.0.1:40000", False),
        ("start", "127.0.0.1:40000", True),
    ]


def test_die_and_start_failures_are_minus_one(toml_file: Path, supervisor: type[FakeProcessControl],
                                              caplog: pytest.LogCaptureFixture) -> None:
    assert kv739.kv739_init(str(toml_file)) == 0
    supervisor.fail_with = Unavailable("supervisord on host1 is not running")
    assert kv739.kv739_die("127.0.0.1:40000", 1) == -1
    assert kv739.kv739_start("127.0.0.1:40000", 0) == -1
    supervisor.fail_with = None
    assert kv739.kv739_die("127.0.0.1:40000", 2) == -1       # bad flag
    assert kv739.kv739_die("", 1) == -1
    assert supervisor.calls == []
    messages = warnings_of(caplog)
    assert len(messages) == 4 and "supervisord on host1 is not running" in messages[0]


def test_die_needs_a_cluster_toml(address_file: Path, supervisor: type[FakeProcessControl],
                                  caplog: pytest.LogCaptureFixture) -> None:
    assert kv739.kv739_init(str(address_file)) == 0
    assert kv739.kv739_die("127.0.0.1:40000", 1) == -1
    assert kv739.kv739_start("127.0.0.1:40000", 1) == -1
    assert supervisor.calls == []
    assert all("needs a cluster.toml" in m for m in warnings_of(caplog))


def test_die_without_the_supervisor_module_fails(toml_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "shardnode.supervisor", None)   # import fails
    assert kv739.kv739_init(str(toml_file)) == 0
    assert kv739.kv739_die("127.0.0.1:40000", 1) == -1


def test_leave_delegates_to_the_membership_admin_and_a_refusal_is_minus_one(
        toml_file: Path, supervisor: type[FakeProcessControl], caplog: pytest.LogCaptureFixture) -> None:
    assert kv739.kv739_init(str(toml_file)) == 0
    assert kv739.kv739_leave("127.0.0.1:40000", 1) == 0
    assert kv739.kv739_leave("127.0.0.1:40000", 0) == 0
    assert supervisor.calls == [("leave", "127.0.0.1:40000", True), ("leave", "127.0.0.1:40000", False)]
    supervisor.fail_with = ShardnodeError("group 0 would drop to 2 voters (at least 3 are kept)")
    assert kv739.kv739_leave("127.0.0.1:40000", 1) == -1
    assert kv739.kv739_leave("127.0.0.1:40000", 2) == -1     # bad flag
    assert any("would drop to 2 voters" in m for m in warnings_of(caplog))
