"""The one scheduler at a time that carries shape changes out
(docs/membership.md, "One scheduler").

Whoever wants the cluster's shape changed records an intent (intents.py) and
then runs a `Scheduler` until that intent is finished:

- if it can take the lease (lease.py), it raises the fencing token of every
  group in the shard map (a FENCE shard command: from then on nothing a
  deposed scheduler still sends can land), finishes the moves of key space
  left by others, and carries out the unfinished intents in the order they
  were recorded, up to and including its own, renewing the lease meanwhile;
  then it releases the lease;
- if another process holds the lease, it watches its intent (printing the
  progress lines the holder records) and tries again now and then: the
  holder may be gone, and its lease then expires.

Every router also runs a scheduler in the background (`SchedulerWatch`) that
takes over work that nobody drives: an unfinished intent, or a move, whose
record has not changed for STALL_FACTOR lease durations while the lease is
free — the
command that recorded it was killed, or its machine lost. Moves are finished
(from the freeze on they can only go forward) or, when their intent was
cancelled before the freeze, rolled back; never left half done.

A holder that loses the lease (its renewal fails) stops at once; whatever it
still sends carries its old token and is refused by the groups and the
metadata group alike.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import ClusterConfig, ConfigError
from ..errors import DeadlineExceeded, ShardnodeError
from .intents import Intent, IntentBook, IntentError, IntentKind, IntentState, ShapeRefused, unfinished
from .lease import LeaseLost, SchedulerLease

log = logging.getLogger("shardnode.placement")

#: How often a waiting command looks at its intent and at the lease.
WATCH_SECONDS = 0.25
#: How often a router's scheduler looks for work nobody drives.
BACKGROUND_POLL_SECONDS = 2.0
#: Work (an intent, a move) whose record has not changed for this many lease
#: durations ([timing] scheduler_lease_ms: 10 s by default), while the lease
#: is free, is taken over by a router.
STALL_FACTOR = 1.25

Line = Callable[[str], None]


@dataclass(slots=True)
class Execution:
    """What an executor gets: its intent, the lease's token and guards, and
    ways to report progress and to record its durable choices."""

    scheduler: "Scheduler"
    intent: Intent
    echo: Line

    @property
    def token(self) -> int:
        return self.scheduler.lease.token

    @property
    def guards(self) -> tuple[tuple[bytes, bytes | None], ...]:
        return self.scheduler.lease.guards

    @property
    def work(self) -> dict[str, Any]:
        return self.intent.work

    async def say(self, line: str) -> None:
        """One progress line: printed by whoever waits for the intent."""
        self.echo(line)
        await self._update(lambda i: i.with_progress([line], self.scheduler.book.now_ms()))

    async def save(self, **work: Any) -> None:
        """Record durable choices (`work`) before acting on them: a holder that
        takes over goes on with the same ones."""
        await self._update(lambda i: replace(i, work={**i.work, **work}))

    async def cancel_requested(self) -> bool:
        current = await self.scheduler.book.get(self.intent.intent_id)
        return current is not None and current.cancel_requested

    async def _update(self, change: Callable[[Intent], Intent]) -> None:
        updated = await self.scheduler.book.update(self.intent.intent_id, change, self.guards)
        if updated is None:
            raise LeaseLost("the scheduler's lease was taken over while it worked")
        self.intent = updated


@dataclass(slots=True, frozen=True)
class Outcome:
    """What an executor achieved: a one-line message and structured data."""

    message: str
    result: dict[str, Any] = field(default_factory=dict)


Executor = Callable[[Execution], Awaitable[Outcome]]


def holder_name(role: str) -> str:
    """A lease holder name unique to this process."""
    return f"{role}@{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Scheduler:
    """`executors`: kind → coroutine function carrying an intent out
    (executors.py); `prepare`: run once per lease, before any intent (raise
    the groups' fencing tokens, finish stalled moves)."""

    def __init__(self, cluster: ClusterConfig, directory, executors: dict[IntentKind, Executor],  # type: ignore[no-untyped-def]
                 *, holder: str, prepare: Callable[["Scheduler"], Awaitable[None]] | None = None,
                 lease: SchedulerLease | None = None) -> None:
        self.cluster = cluster
        self.directory = directory
        self.executors = executors
        self.prepare = prepare
        self.lease = lease or SchedulerLease(directory, holder)
        self.book = IntentBook(directory)

    # --- A command's way: record, then drive or watch until finished -------------------

    async def submit(self, kind: IntentKind, args: dict[str, Any]) -> tuple[Intent, bool]:
        return await self.book.submit(kind, args)

    async def run_until_finished(self, intent_id: int, *, on_line: Line = lambda line: None,
                                 timeout: float | None = None) -> Intent:
        """Drive (when the lease is free) or watch the intent until it is
        finished; its progress lines go to `on_line` once each. On
        `timeout`, DeadlineExceeded: the intent goes on without this caller."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = 0
        while True:
            intent = await self.book.get(intent_id)
            if intent is None:
                raise IntentError(f"intent {intent_id} is no longer recorded")
            lines, seen = intent.lines_after(seen)
            for line in lines:
                on_line(line)
            if intent.state.finished:
                return intent
            if await self.lease.acquire():
                echoed = await self._drive(until=intent_id, on_line=on_line)
                seen = max(seen, echoed)
                continue
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded(f"intent {intent_id} ({intent.describe()}) is still {intent.state.value}; it "
                                       f"goes on without this command: `shardnode group pending` shows it")
            await asyncio.sleep(WATCH_SECONDS)

    # --- Holding the lease -------------------------------------------------------------------

    async def _drive(self, until: int | None, on_line: Line = lambda line: None) -> int:
        """With the lease held: prepare, then carry out unfinished intents in
        order (up to `until`, or all), then release. Returns how many progress
        lines of `until` were echoed here."""
        echoed = {"count": 0}

        def echo_for(intent: Intent) -> Line:
            if intent.intent_id == until:
                def own(line: str) -> None:
                    echoed["count"] += 1
                    on_line(line)
                return own
            return lambda line: on_line(f"[intent {intent.intent_id} {intent.describe()}] {line}")

        work = asyncio.create_task(self._work(until, echo_for), name="scheduler work")
        renewer = asyncio.create_task(self._renew_until(work), name="scheduler lease renewal")
        try:
            await work
        except LeaseLost as exc:
            log.warning("placement.lease_lost", extra={"holder": self.lease.holder, "error": str(exc)})
        except asyncio.CancelledError:
            if not work.cancelled() or _being_cancelled():
                raise               # we are cancelled ourselves (the command's deadline, a shutdown)
            # The renewal found the lease taken over and stopped the work: the
            # new holder goes on with it; the caller goes back to watching.
            log.warning("placement.lease_lost", extra={"holder": self.lease.holder,
                                                       "error": "taken over while the work ran"})
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
            await self.lease.release()
        # The executor's first lines were echoed before the intent record
        # counted them: skip what the record holds of them.
        current = await self.book.get(until) if until is not None else None
        return current.progress_count if current is not None and echoed["count"] else 0

    async def _renew_until(self, work: asyncio.Task) -> None:
        while not work.done():
            await asyncio.sleep(self.lease.duration / 3)
            try:
                await self.lease.renew()
            except LeaseLost:
                work.cancel()
                return
            except ShardnodeError as exc:
                # The metadata group did not answer this time: try again at the
                # next period (the lease has two more before it runs out; if it
                # does, the work's own guarded writes are refused and tell).
                log.warning("placement.lease_renewal_failed", extra={"error": str(exc)})

    async def _work(self, until: int | None, echo_for: Callable[[Intent], Line]) -> None:
        if self.prepare is not None:
            await self.prepare(self)
        while True:
            pending = sorted(unfinished(await self.book.all()), key=lambda i: i.submitted_ms)
            if not pending:
                return
            intent = pending[0]
            await self._carry_out(intent, echo_for(intent))
            if until is not None and intent.intent_id == until:
                return

    async def _carry_out(self, intent: Intent, echo: Line) -> None:
        guards = self.lease.guards
        token = self.lease.token
        if intent.cancel_requested and intent.state is IntentState.PENDING:
            await self._finish(intent, IntentState.CANCELLED, "cancelled before it started", {}, guards)
            return
        started = await self.book.update(intent.intent_id,
                                         lambda i: replace(i, state=IntentState.RUNNING, token=token), guards)
        if started is None:
            raise LeaseLost("the scheduler's lease was taken over")
        execution = Execution(self, started, echo)
        log.info("placement.intent_started", extra={"intent": intent.intent_id, "kind": intent.kind.value,
                                                      "token": token, "resumed": intent.state.value})
        executor = self.executors.get(intent.kind)
        try:
            if executor is None:
                raise ShapeRefused(f"this version cannot carry out a {intent.kind.value} intent")
            outcome = await executor(execution)
        except LeaseLost:
            raise
        except asyncio.CancelledError:
            raise
        except (ShardnodeError, ConfigError) as exc:
            await self._finish(execution.intent, IntentState.FAILED, str(exc), {"error": type(exc).__name__},
                               guards)
            return
        except Exception as exc:
            log.exception("placement.intent_crashed", extra={"intent": intent.intent_id})
            await self._finish(execution.intent, IntentState.FAILED, f"unexpected {type(exc).__name__}: {exc}",
                               {"error": type(exc).__name__}, guards)
            return
        state = IntentState.CANCELLED if outcome.result.get("cancelled") else IntentState.DONE
        await self._finish(execution.intent, state, outcome.message, outcome.result, guards)

    async def _finish(self, intent: Intent, state: IntentState, outcome: str, result: dict[str, Any],
                      guards: tuple[tuple[bytes, bytes | None], ...]) -> None:
        finished = await self.book.update(
            intent.intent_id,
            lambda i: replace(i, state=state, outcome=outcome, result=result, updated_ms=self.book.now_ms()),
            guards)
        if finished is None:
            raise LeaseLost("the scheduler's lease was taken over")
        log.info("placement.intent_finished", extra={"intent": intent.intent_id, "kind": intent.kind.value,
                                                       "state": state.value, "outcome": outcome})

    # --- A router's way: take over work nobody drives ----------------------------------------

    async def take_over_stalled(self, stalled: Callable[[], Awaitable[bool]]) -> bool:
        """If `stalled()` says some work has been left and the lease is free,
        take the lease and carry everything out. Returns whether it did."""
        if not await stalled():
            return False
        if not await self.lease.acquire():
            return False
        log.warning("placement.taking_over", extra={"holder": self.lease.holder, "token": self.lease.token})
        await self._drive(until=None)
        return True


def _being_cancelled() -> bool:
    """Whether the running task itself has been asked to stop."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
