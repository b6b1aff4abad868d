"""The router's view of its own host's processes, from the host's supervisord:
each program's state and how often it was (re)started; and the keeper of
the rule that every replica this host holds runs here.

A worker that fails stop (docs/worker.md, "Failure model") exits 70 and is
restarted by supervisord; one whose disk keeps failing crash-loops with a
growing back-off (state BACKOFF). Operators see that here: the router asks
its supervisord every `interval` seconds (through the host's process
control, HostControl, on the host's address)
and counts a restart whenever a program was spawned again after it ended
without being asked to (its start time changed since a look that saw it
running or backing off); a first start, or a start after a stop or an exit
0, is not a restart. The counts feed the metrics page
(`raft_process_restarts_total`, `raft_process_state`) and `shardnode status`
(the `Processes` RPC, which every router answers for its host).

Reconciliation (docs/router.md, "Every replica a host holds runs there").
`wanted()` names the groups this host holds: those of the group's live
membership (the router's probes), of the shard map's placement, and those
with data here. At every look, a wanted worker that is down is started,
unless it was stopped on purpose:

- a program seen going to STOPPED while the router itself runs was stopped
  by an operator (`shardnode die WORKER`) or by a change of shape: it is
  *held down*, and stays down until something starts it (then the hold
  ends). The set is kept in data_dir/HOST/held_down, so that a router that
  restarts on its own keeps it. Programs that stop while the router itself
  is stopping (the whole host is stopped: `die HOST`) are not held down:
  when the host starts again, every replica it holds comes back, also the
  workers of groups created online that `shardnode start` did not name
  (it knows only cluster.toml's groups while the metadata group is down);
- a worker that exited 0 found no replica of its group here (or retired
  it): started once more after the router starts (the host may hold it
  again), then left alone.

A wanted worker that does not come up (its start is refused, it
crash-loops in BACKOFF, or supervisord gave up: FATAL) is reported: one
WARNING `router.replica_not_running`, the gauge `raft_replica_not_running`,
and its `problem` in the `Processes` RPC (hence `shardnode status`). The
router starts it again with a growing back-off (RETRY_FIRST_SECONDS doubling
to RETRY_MAX_SECONDS); when it runs, one INFO `router.replica_running`.

A router run without supervisord (tests that start processes directly)
reports nothing: `supervised` stays false.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..background import OwnedTask
from ..config import METADATA_GROUP, ClusterConfig, group_label
from ..supervisor import ROUTER_PROGRAM, ProcessControl, ProcessInfo, SupervisorError, worker_program

log = logging.getLogger("shardnode.router")

WATCH_INTERVAL = 1.0
#: A wanted worker that did not come up is started again after this long,
#: then after twice as long each time, up to RETRY_MAX_SECONDS.
RETRY_FIRST_SECONDS = 5.0
RETRY_MAX_SECONDS = 300.0

_UP = frozenset({"STARTING", "RUNNING"})
#: A program last seen in one of these states and spawned again since was
#: restarted (it ended without being asked to); from STOPPED or an exit 0 it
#: was started.
_ENDED_UNEXPECTEDLY = frozenset({"STARTING", "RUNNING", "BACKOFF", "FATAL"})


@dataclass(slots=True)
class ProgramState:
    program: str
    state: str = ""
    pid: int = 0
    started_at: float = 0.0        # supervisord's start time of the current (or last) spawn
    restarts: int = 0              # spawns after an unexpected end (crash, fail-stop), since this router started
    exit_status: int = 0
    seen_at: float = 0.0           # time.monotonic() of the last look
    held_down: bool = False        # stopped on purpose: stays down until started
    problem: str = ""              # why a replica this host holds does not run ("" if it does, or is held down)
    attempts: int = 0              # starts by the router since it last ran
    retry_at: float = 0.0          # time.monotonic() before which the router does not start it again
    exited_here: bool = False      # exited 0 (no replica) since this router started it or saw it run

    @property
    def uptime(self) -> float:
        return max(0.0, time.time() - self.started_at) if self.state == "RUNNING" and self.started_at else 0.0

    @property
    def group(self) -> int | None:
        """The group of a worker program (None for the router)."""
        if self.program == worker_program(METADATA_GROUP):
            return METADATA_GROUP
        suffix = self.program.removeprefix("worker-g")
        return int(suffix) if suffix != self.program and suffix.isdigit() else None


class HeldDown:
    """The programs held down, kept in a small JSON file (a list of names)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.names: set[str] = set()
        if path is not None:
            try:
                self.names = {str(n) for n in json.loads(path.read_text())}
            except FileNotFoundError:
                pass
            except (OSError, ValueError, TypeError) as exc:
                log.warning("router.held_down_unreadable", extra={"path": str(path), "error": str(exc)})

    def set(self, name: str, held: bool) -> None:
        if (name in self.names) == held:
            return
        (self.names.add if held else self.names.discard)(name)
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps(sorted(self.names)))
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("router.held_down_not_saved", extra={"path": str(self.path), "error": str(exc)})


class ProcessWatch(OwnedTask):
    """Owned by the router's KVService: `start` in the event loop, `close` on shutdown.

    `wanted()`: the groups (data groups and METADATA_GROUP) this host holds."""

    task_name = "router process watch"

    def __init__(self, cluster: ClusterConfig, host_name: str, interval: float = WATCH_INTERVAL,
                 wanted: Callable[[], Iterable[int]] = lambda: (), control: ProcessControl | None = None,
                 held_down_file: Path | None = None) -> None:
        self.host_name = host_name
        self.interval = interval
        self.wanted = wanted
        self.control = control or ProcessControl(cluster, rpc_timeout=2.0)
        self.programs: dict[str, ProgramState] = {}
        self.supervised = False
        self.held = HeldDown(held_down_file)
        self.host_stopping = False
        self._warned = False

    async def _run(self) -> None:
        while True:
            try:
                infos = await asyncio.to_thread(self._read)
            except (SupervisorError, OSError) as exc:
                if self.supervised and not self._warned:
                    log.warning("router.supervisord_unreachable", extra={"host": self.host_name, "error": str(exc)})
                    self._warned = True
            except Exception:       # a bug here must not end the watch for good
                log.exception("router.process_watch_failed")
            else:
                self.supervised, self._warned = True, False
                now = time.monotonic()
                self.observe(infos, now)
                to_start = self.to_start(now)
                if to_start:
                    await asyncio.to_thread(self._start, to_start)
            await asyncio.sleep(self.interval)

    def _read(self) -> list[ProcessInfo]:
        return list(self.control.processes(self.host_name).values())

    def observe(self, infos: list[ProcessInfo], now: float) -> None:
        """Take one look at supervisord's process table."""
        router = next((i for i in infos if i.name == ROUTER_PROGRAM), None)
        # The whole host is being stopped (the router first): what stops now
        # is not held down, and nothing is started.
        host_stopping = self.host_stopping = router is not None and router.state not in _UP
        for info in infos:
            program = self.programs.get(info.name)
            first_look = program is None
            if program is None:
                program = self.programs[info.name] = ProgramState(
                    info.name, started_at=info.started_at, held_down=info.name in self.held.names)
            elif info.started_at and info.started_at != program.started_at:
                # A restart is a spawn after an end nobody asked for (a crash,
                # a fail-stop, a too-quick exit); not a program's first start,
                # nor a start after a stop or after an exit 0.
                if program.started_at and (program.state in _ENDED_UNEXPECTEDLY
                                           or (program.state == "EXITED" and program.exit_status != 0)):
                    program.restarts += 1
                    log.info("router.program_restarted", extra={
                        "program": info.name, "restarts": program.restarts, "state": info.state,
                        "exit_status": info.exitstatus})
                program.started_at = info.started_at
            if info.state in _UP:
                self._hold(program, False)
            if info.state == "RUNNING":
                program.exited_here = False
            elif info.state == "STOPPED" and not first_look and program.state != "STOPPED" and not host_stopping:
                self._hold(program, True)
            if info.state == "EXITED" and info.exitstatus == 0 and not first_look and program.state != "EXITED":
                program.exited_here = True
            program.state = info.state
            program.pid = info.pid
            program.exit_status = info.exitstatus
            program.seen_at = now

    def _hold(self, program: ProgramState, held: bool) -> None:
        if program.held_down != held:
            log.info("router.program_held_down" if held else "router.program_released",
                     extra={"program": program.program})
        program.held_down = held
        self.held.set(program.program, held)

    def to_start(self, now: float) -> list[str]:
        """The wanted workers to start now; sets every wanted program's
        `problem` (and logs a change of it)."""
        if self.host_stopping:
            return []
        wanted = {worker_program(g) for g in self.wanted()}
        starts = []
        for program in self.programs.values():
            if program.program not in wanted:
                self._report(program, "")
                continue
            if program.state in _UP:
                program.attempts, program.retry_at = 0, 0.0
                self._report(program, "")
                continue
            if program.held_down or program.state == "STOPPING":
                self._report(program, "")
                continue
            if program.state == "BACKOFF":
                self._report(program, "crash-looping: supervisord starts it again with a growing back-off "
                                      f"(exit status {program.exit_status}; see its log)")
                continue
            if program.state == "EXITED" and program.exit_status == 0:
                self._report(program, "")
                if program.exited_here:
                    continue            # it found no replica here
                program.exited_here = True      # its next exit 0 is its answer
            if program.state == "FATAL":
                self._report(program, "supervisord gave up starting it (FATAL); see its log", retry=now)
            elif program.state == "EXITED" and program.exit_status != 0:
                self._report(program, f"exited with status {program.exit_status}", retry=now)
            if now < program.retry_at:
                continue
            program.attempts += 1
            program.retry_at = now + min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** (program.attempts - 1))
            starts.append(program.program)
        return sorted(starts)

    def _start(self, names: list[str]) -> None:
        log.info("router.starting_workers", extra={"programs": ",".join(names)})
        for name in names:
            try:
                self.control.start_programs(self.host_name, [name])
            except (SupervisorError, OSError) as exc:
                program = self.programs[name]
                self._report(program, f"its start failed: {exc}", retry=time.monotonic())

    def _report(self, program: ProgramState, problem: str, retry: float | None = None) -> None:
        if problem and retry is not None and program.retry_at > retry:
            problem += f"; the router starts it again in {program.retry_at - retry:.0f} s"
        if problem == program.problem:
            return
        fields = {"program": program.program, "group": group_label(program.group) if program.group is not None else "",
                  "state": program.state}
        if problem and not program.problem:
            log.warning("router.replica_not_running", extra={**fields, "problem": problem})
        elif not problem:
            log.info("router.replica_running" if program.state in _UP else "router.replica_not_wanted", extra=fields)
        program.problem = problem
