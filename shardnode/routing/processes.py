"""The router's view of its own host's processes, from the host's supervisord:
each program's state and how often it was (re)started.

A worker that fails stop (docs/worker.md, "Failure model") exits 70 and is
restarted by supervisord; one whose disk keeps failing crash-loops with a
growing back-off (state BACKOFF). Operators see that here: the router asks
its supervisord every `interval` seconds (XML-RPC on the host's address)
and counts a restart whenever a program was spawned again since the last
look (its start time changed). The counts feed the metrics page
(`raft_process_restarts_total`, `raft_process_state`) and `shardnode status`
(the `Processes` RPC, which every router answers for its host).

The watch also starts the worker programs of groups created online that
this host holds or that the shard map places here (`want`): supervisord does
not start those by itself (autostart=false, docs/sharding.md). It starts
only programs that supervisord never started: one an operator stopped, or
that exited on its own, stays as it is, and supervisord's restart rules
(autorestart=unexpected) apply as to every worker.

A router run without supervisord (tests that start processes directly)
reports nothing: `supervised` stays false.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from ..background import OwnedTask
from ..config import ClusterConfig
from ..supervisor import ProcessControl, ProcessInfo, SupervisorError, worker_program

log = logging.getLogger("shardnode.router")

WATCH_INTERVAL = 1.0


@dataclass(slots=True)
class ProgramState:
    program: str
    state: str = ""
    pid: int = 0
    started_at: float = 0.0        # supervisord's start time of the current (or last) spawn
    restarts: int = 0              # spawns seen after the first one, since this router started
    exit_status: int = 0
    seen_at: float = 0.0           # time.monotonic() of the last look

    @property
    def uptime(self) -> float:
        return max(0.0, time.time() - self.started_at) if self.state == "RUNNING" and self.started_at else 0.0


class ProcessWatch(OwnedTask):
    """Owned by the router's KVService: `start` in the event loop, `close` on shutdown."""

    task_name = "router process watch"

    def __init__(self, cluster: ClusterConfig, host_name: str, interval: float = WATCH_INTERVAL) -> None:
        self.host_name = host_name
        self.interval = interval
        self.control = ProcessControl(cluster, rpc_timeout=2.0)
        self.programs: dict[str, ProgramState] = {}
        self.supervised = False
        self._warned = False
        self._wanted: frozenset[str] = frozenset()

    def want(self, groups: set[int]) -> None:
        """The data groups whose workers should run on this host (started at
        the next look if supervisord never started them)."""
        self._wanted = frozenset(worker_program(g) for g in groups)

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
                self.observe(infos, time.monotonic())
                await self._start_wanted(infos)
            await asyncio.sleep(self.interval)

    async def _start_wanted(self, infos: list[ProcessInfo]) -> None:
        never_started = [i.name for i in infos if i.name in self._wanted and i.state == "STOPPED" and not i.started_at]
        if not never_started:
            return
        log.info("router.starting_workers", extra={"programs": ",".join(sorted(never_started))})
        try:
            await asyncio.to_thread(self.control.start_programs, self.host_name, never_started)
        except (SupervisorError, OSError) as exc:
            log.warning("router.start_workers_failed", extra={"programs": ",".join(never_started), "error": str(exc)})

    def _read(self) -> list[ProcessInfo]:
        return list(self.control.processes(self.host_name).values())

    def observe(self, infos: list[ProcessInfo], now: float) -> None:
        """Take one look at supervisord's process table."""
        for info in infos:
            program = self.programs.get(info.name)
            if program is None:
                program = self.programs[info.name] = ProgramState(info.name, started_at=info.started_at)
            elif info.started_at and info.started_at != program.started_at:
                program.restarts += 1
                program.started_at = info.started_at
                log.info("router.program_restarted", extra={"program": info.name, "restarts": program.restarts,
                                                            "state": info.state, "exit_status": info.exitstatus})
            program.state = info.state
            program.pid = info.pid
            program.exit_status = info.exitstatus
            program.seen_at = now
