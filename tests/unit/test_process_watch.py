"""The router's process watch (shardnode/routing/processes.py): what it
starts, what it leaves down, what it reports, with a fake supervisord."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from shardnode.config import METADATA_GROUP, ClusterConfig
from shardnode.routing.processes import RETRY_FIRST_SECONDS, ProcessWatch
from shardnode.supervisor import ProcessInfo, SupervisorError

ROOT = Path(__file__).resolve().parents[2]


class FakeSupervisord:
    """One host's program table; `start_programs` records and applies."""

    def __init__(self) -> None:
        self.table: dict[str, ProcessInfo] = {}
        self.started: list[str] = []
        self.refuse: set[str] = set()
        self.clock = 1_000.0

    def set(self, name: str, state: str, *, started_at: float | None = None, exitstatus: int = 0) -> None:
        previous = self.table.get(name)
        if started_at is None:
            started_at = previous.started_at if previous is not None else 0.0
        self.table[name] = ProcessInfo(name=name, state=state, pid=1 if state == "RUNNING" else 0,
                                       exitstatus=exitstatus, description="", logfile="", started_at=started_at)

    def spawn(self, name: str) -> None:
        self.clock += 1
        self.set(name, "RUNNING", started_at=self.clock)

    # The part of ProcessControl the watch uses.
    def processes(self, host_name: str) -> dict[str, ProcessInfo]:
        return dict(self.table)

    def start_programs(self, host_name: str, names: list[str]) -> None:
        for name in names:
            if name in self.refuse:
                raise SupervisorError(f"spawn error for {name}")
            self.started.append(name)
            self.spawn(name)


@pytest.fixture
def cluster() -> ClusterConfig:
    return ClusterConfig.load(ROOT / "etc" / "cluster.toml")


def make_watch(cluster: ClusterConfig, supervisord: FakeSupervisord, wanted: set[int],
               held_file: Path | None = None) -> ProcessWatch:
    return ProcessWatch(cluster, "host1", wanted=lambda: wanted, control=supervisord,  # type: ignore[arg-type]
                        held_down_file=held_file)


def look(watch: ProcessWatch, supervisord: FakeSupervisord, now: float) -> list[str]:
    """One turn of the watch's loop."""
    watch.observe(list(supervisord.processes("host1").values()), now)
    starts = watch.to_start(now)
    if starts:
        watch._start(starts)
    return starts


def host_that_died_and_started(supervisord: FakeSupervisord) -> None:
    """`die` of the whole host then `start` while the metadata group did not
    answer: the start named cluster.toml's groups (0..3); group 4, created
    online, ran here before and is STOPPED."""
    for name in ("router", "worker-meta", "worker-g0", "worker-g1", "worker-g4"):
        supervisord.spawn(name)
    for name in ("worker-g4",):
        supervisord.set(name, "STOPPED")
    supervisord.set("worker-g5", "STOPPED")          # never started: no replica of group 5 here


def test_a_restarted_host_brings_back_a_group_created_online(cluster: ClusterConfig, tmp_path: Path) -> None:
    supervisord = FakeSupervisord()
    host_that_died_and_started(supervisord)
    watch = make_watch(cluster, supervisord, {METADATA_GROUP, 0, 1, 4}, tmp_path / "held_down")
    assert look(watch, supervisord, 0.0) == ["worker-g4"]
    assert supervisord.table["worker-g4"].state == "RUNNING"
    assert look(watch, supervisord, 1.0) == []
    assert "worker-g5" not in supervisord.started


def test_a_worker_stopped_while_the_router_runs_stays_down_across_router_restarts(cluster: ClusterConfig,
                                                                                  tmp_path: Path) -> None:
    supervisord = FakeSupervisord()
    for name in ("router", "worker-meta", "worker-g0", "worker-g4"):
        supervisord.spawn(name)
    held_file = tmp_path / "held_down"
    watch = make_watch(cluster, supervisord, {METADATA_GROUP, 0, 4}, held_file)
    assert look(watch, supervisord, 0.0) == []
    supervisord.set("worker-g4", "STOPPED")          # `shardnode die WORKER`
    assert look(watch, supervisord, 1.0) == []
    assert look(watch, supervisord, 10.0) == []
    assert watch.programs["worker-g4"].held_down and watch.programs["worker-g4"].problem == ""
    # The router restarts on its own: the hold is remembered.
    again = make_watch(cluster, supervisord, {METADATA_GROUP, 0, 4}, held_file)
    assert look(again, supervisord, 20.0) == []
    # Started by an operator: no longer held; stopped with the whole host, it comes back with it.
    supervisord.spawn("worker-g4")
    look(again, supervisord, 21.0)
    assert not again.programs["worker-g4"].held_down
    supervisord.set("router", "STOPPING")
    supervisord.set("worker-g4", "STOPPED")
    assert look(again, supervisord, 22.0) == []      # nothing is started while the host stops
    fresh = make_watch(cluster, supervisord, {METADATA_GROUP, 0, 4}, held_file)
    supervisord.spawn("router")
    assert look(fresh, supervisord, 30.0) == ["worker-g4"]


def test_a_worker_that_found_no_replica_is_tried_once_per_router_life(cluster: ClusterConfig) -> None:
    supervisord = FakeSupervisord()
    supervisord.spawn("router")
    supervisord.spawn("worker-g4")
    supervisord.set("worker-g4", "EXITED", exitstatus=0)
    watch = make_watch(cluster, supervisord, {4})
    assert look(watch, supervisord, 0.0) == ["worker-g4"]
    supervisord.set("worker-g4", "EXITED", exitstatus=0)     # no replica here after all
    assert look(watch, supervisord, 100.0) == []
    assert watch.programs["worker-g4"].problem == ""


def test_a_worker_that_cannot_start_is_reported_and_retried_with_backoff(
        cluster: ClusterConfig, caplog: pytest.LogCaptureFixture) -> None:
    supervisord = FakeSupervisord()
    supervisord.spawn("router")
    supervisord.set("worker-g4", "STOPPED")
    supervisord.refuse.add("worker-g4")
    watch = make_watch(cluster, supervisord, {4})
    caplog.set_level(logging.INFO, logger="shardnode.router")
    look(watch, supervisord, 0.0)
    program = watch.programs["worker-g4"]
    assert "its start failed: spawn error for worker-g4" in program.problem
    attempts = [0.0]
    for second in range(1, 200):
        if look(watch, supervisord, float(second)) or program.attempts > len(attempts):
            attempts.append(float(second))
    # Attempts at 0, 5, 15, 35, 75, 155 s: each wait twice the last.
    assert attempts[:6] == [0.0, RETRY_FIRST_SECONDS, 15.0, 35.0, 75.0, 155.0], attempts
    # The gauge says so.
    from shardnode.routing.metrics import _ProcessCollector
    gauges = {m.name: m for m in _ProcessCollector(watch).collect()}
    assert [(s.labels, s.value) for s in gauges["raft_replica_not_running"].samples] == [({"group": "4"}, 1)]
    warnings = [r for r in caplog.records if r.getMessage() == "router.replica_not_running"]
    assert len(warnings) == 1 and warnings[0].program == "worker-g4" and warnings[0].group == "4"
    # supervisord gave up on it (FATAL) after a start: reported, then started again once it may.
    supervisord.refuse.clear()
    supervisord.set("worker-g4", "FATAL")
    program.retry_at = 0.0
    assert look(watch, supervisord, 300.0) == ["worker-g4"]
    assert look(watch, supervisord, 301.0) == []
    assert program.problem == "" and program.attempts == 0
    assert [r.getMessage() for r in caplog.records].count("router.replica_running") == 1


def test_a_crash_looping_worker_is_reported_and_left_to_supervisord(cluster: ClusterConfig) -> None:
    supervisord = FakeSupervisord()
    supervisord.spawn("router")
    supervisord.spawn("worker-g0")
    watch = make_watch(cluster, supervisord, {0})
    look(watch, supervisord, 0.0)
    supervisord.set("worker-g0", "BACKOFF", exitstatus=70)
    assert look(watch, supervisord, 1.0) == []
    assert watch.programs["worker-g0"].problem.startswith("crash-looping")


def test_restarts_count_unexpected_ends_not_starts(cluster: ClusterConfig) -> None:
    """Issue 23: every replica of a new group showed `RUNNING (1 restarts)`
    after its one spawn."""
    supervisord = FakeSupervisord()
    supervisord.spawn("router")
    supervisord.set("worker-g4", "STOPPED")              # a group created online: never started
    watch = make_watch(cluster, supervisord, set())
    look(watch, supervisord, 0.0)
    supervisord.spawn("worker-g4")                       # its first start
    look(watch, supervisord, 1.0)
    assert watch.programs["worker-g4"].restarts == 0
    supervisord.set("worker-g4", "STOPPED")              # `die`, then `start`: started, not restarted
    look(watch, supervisord, 2.0)
    supervisord.spawn("worker-g4")
    look(watch, supervisord, 3.0)
    assert watch.programs["worker-g4"].restarts == 0
    supervisord.spawn("worker-g4")                       # it crashed and supervisord spawned it again
    look(watch, supervisord, 4.0)
    supervisord.set("worker-g4", "BACKOFF", exitstatus=70)
    look(watch, supervisord, 5.0)
    supervisord.spawn("worker-g4")                       # out of the back-off
    look(watch, supervisord, 6.0)
    assert watch.programs["worker-g4"].restarts == 2
    supervisord.set("worker-g4", "EXITED", exitstatus=0)  # exit 0, then started by someone
    look(watch, supervisord, 7.0)
    supervisord.spawn("worker-g4")
    look(watch, supervisord, 8.0)
    assert watch.programs["worker-g4"].restarts == 2


def test_the_status_table_names_program_states() -> None:
    from shardnode.cli.main import process_label

    assert [process_label(s, 0) for s in ("RUNNING", "STOPPED", "BACKOFF", "FATAL", "EXITED", "")] == \
        ["running", "stopped", "backing off", "fatal", "exited", "unknown"]
    assert process_label("RUNNING", 1) == "running (1 restart)"
    assert process_label("BACKOFF", 3) == "backing off (3 restarts)"
