"""Fail-stop: a process that can no longer keep its promises says why in one
log line and exits at once, so that its supervisor restarts it and it
recovers from what is durable. Never a process that looks healthy and does
nothing.

What trips it: a storage fault (ENOSPC, EIO on fsync, RocksDB's sticky
background error), a broken invariant, or any essential task (a worker's
ready and tick loops, the gRPC server) ending when nobody asked it to. Once
tripped, the process acknowledges nothing more: the owner of the essential
work checks `failed` before answering, the serving loop turns health
NOT_SERVING and calls `exit_now()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
import logging
import os
import traceback

from grpc_health.v1 import health_pb2

#: The exit status of a fail-stop (EX_SOFTWARE in sysexits.h): supervisord
#: restarts the program (autorestart=true) with its start-retry backoff.
EXIT_FAIL_STOP = 70


class FailStop:
    """One per process. `trip(reason)` logs one CRITICAL line (the first
    reason only) and wakes whoever waits on `tripped`."""

    def __init__(self, logger: logging.Logger, extra: dict[str, object] | None = None) -> None:
        self._log = logger
        self._extra = dict(extra or {})
        self.reason: str | None = None
        self.tripped = asyncio.Event()
        self.stopping = False  # set by a clean shutdown: ending tasks are expected then

    @property
    def failed(self) -> bool:
        return self.reason is not None

    def trip(self, reason: str) -> None:
        if self.reason is not None:
            return
        self.reason = reason
        self._log.critical("process.fail_stop", extra={**self._extra, "reason": reason})
        self.tripped.set()

    def watch(self, task: asyncio.Future, what: str) -> None:
        """Trip if `task` ends, unless the process is stopping cleanly."""

        def done(finished: asyncio.Future) -> None:
            if self.stopping:
                return
            if finished.cancelled():
                self.trip(f"{what} was cancelled")
            elif finished.exception() is not None:
                self.trip(f"{what} failed: {describe(finished.exception())}")
            else:
                self.trip(f"{what} ended unexpectedly")

        task.add_done_callback(done)


async def run_until_stop_or_fault(stop: asyncio.Event, fail_stop: FailStop, health, services: tuple[str, ...],
                                  before_exit: Callable[[], object] | None = None) -> None:
    """Return when a clean stop is asked (`stop` set). On a fault instead, turn
    every gRPC health `services` entry NOT_SERVING, call `before_exit` (it
    must not touch the failing store: the worker counts the failure in a
    small file of its own) and exit the process."""
    stopped = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(fail_stop.tripped.wait())
    await asyncio.wait([stopped, failed], return_when=asyncio.FIRST_COMPLETED)
    if fail_stop.failed:
        for service in services:
            await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if before_exit is not None:
            try:
                before_exit()
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
        exit_now(EXIT_FAIL_STOP)
    failed.cancel()
    fail_stop.stopping = True


def describe(exc: BaseException) -> str:
    """`Type: message (at file:line)`, on one line: enough to tell a full disk
    from a bug without a traceback in the log."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        text += f" (at {os.path.basename(last.filename)}:{last.lineno})"
    return text


def exit_now(code: int = EXIT_FAIL_STOP) -> None:
    """Exit without unwinding: no cleanup may write or acknowledge anything
    after a fault (closing RocksDB would flush memtables to a failing disk)."""
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    os._exit(code)
