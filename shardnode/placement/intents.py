"""What operators asked for: changes of the cluster's shape, recorded in the
metadata group before anything is done (docs/membership.md, "One
scheduler").

Every shape command (`leave`, `start --new`, `member add/remove`, `group
add/remove`, `rebalance`, and their kv739 counterparts) records an
**intent** and waits for its outcome; the scheduler that holds the lease
(scheduler.py) carries intents out, one at a time, in the order they were
recorded. Because the intent is recorded first:

- a command killed anywhere leaves its intent behind, and the next holder of
  the lease (the rerun of the command, another command, or a router) carries
  it on from where it stopped: `work` holds the executor's durable choices
  (the group number it picked, the node ids it added, ...);
- running the same command again while its intent is unfinished attaches to
  that intent instead of recording a second one: two operators, or a
  killed command and its rerun, converge on one change;
- anyone can see what is pending (`shardnode group pending`) and cancel what
  has not started (`shardnode group cancel`).

The records live under one key, `placement/intents`, changed by
compare-and-set; the holder's writes are guarded by its lease. Finished
intents are kept for a while (HISTORY) so that a command that lost its
connection can still read its outcome.
"""

from __future__ import annotations

import enum
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from ..errors import ShardnodeError

INTENTS_KEY = b"placement/intents"
INTENTS_FORMAT = 1
#: Finished intents kept for their outcome.
HISTORY = 16
#: Progress lines kept per intent (a watcher that falls further behind skips some).
PROGRESS_LINES = 40


class ShapeRefused(ShardnodeError):
    """A change of shape that is not allowed now; the message says why."""


class IntentError(ShardnodeError):
    """The intent records are unreadable, or an intent is unknown."""


class IntentState(str, enum.Enum):
    PENDING = "pending"        # recorded, not started
    RUNNING = "running"        # a scheduler works on it (or did, and died: the next one goes on)
    DONE = "done"
    FAILED = "failed"          # refused or failed: `outcome` says why; what it changed is described
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (IntentState.DONE, IntentState.FAILED, IntentState.CANCELLED)


class IntentKind(str, enum.Enum):
    MEMBER_ADD = "member_add"          # args: group, host
    MEMBER_REMOVE = "member_remove"    # args: group, host
    LEAVE = "leave"                    # args: server, clean
    START_NEW = "start_new"            # args: server
    GROUP_ADD = "group_add"            # args: hosts (list, or None: chosen by load)
    GROUP_REMOVE = "group_remove"      # args: group
    REBALANCE = "rebalance"            # args: none


@dataclass(slots=True, frozen=True)
class Intent:
    intent_id: int
    kind: IntentKind
    args: dict[str, Any]
    state: IntentState = IntentState.PENDING
    submitted_ms: int = 0
    updated_ms: int = 0
    progress: tuple[str, ...] = ()
    progress_count: int = 0            # lines ever added (progress keeps the last PROGRESS_LINES)
    outcome: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    work: dict[str, Any] = field(default_factory=dict)
    cancel_requested: bool = False
    token: int = 0                     # the fencing token of the scheduler that last worked on it

    def same_request(self, kind: IntentKind, args: dict[str, Any]) -> bool:
        return self.kind is kind and self.args == args

    def describe(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(self.args.items()) if v not in (None, "", False))
        return f"{self.kind.value}({shown})" if shown else self.kind.value

    def with_progress(self, lines: list[str], now_ms: int) -> Intent:
        kept = (self.progress + tuple(lines))[-PROGRESS_LINES:]
        return replace(self, progress=kept, progress_count=self.progress_count + len(lines), updated_ms=now_ms)

    def lines_after(self, seen: int) -> tuple[list[str], int]:
        """Progress lines a watcher that saw `seen` of them has not seen yet,
        and the new count."""
        missing = self.progress_count - seen
        if missing <= 0:
            return [], self.progress_count
        return list(self.progress[-min(missing, len(self.progress)):]), self.progress_count

    def to_wire(self) -> list:
        return [self.intent_id, self.kind.value, self.args, self.state.value, self.submitted_ms, self.updated_ms,
                list(self.progress), self.progress_count, self.outcome, self.result, self.work,
                self.cancel_requested, self.token]

    @classmethod
    def from_wire(cls, raw: list) -> Intent:
        (intent_id, kind, args, state, submitted_ms, updated_ms, progress, progress_count, outcome, result, work,
         cancel_requested, token) = raw
        return cls(int(intent_id), IntentKind(kind), dict(args), IntentState(state), int(submitted_ms),
                   int(updated_ms), tuple(progress), int(progress_count), str(outcome), dict(result), dict(work),
                   bool(cancel_requested), int(token))


def encode_intents(intents: list[Intent]) -> bytes:
    return msgpack.packb([INTENTS_FORMAT, [i.to_wire() for i in intents]], use_bin_type=True)


def decode_intents(raw: bytes | None) -> list[Intent]:
    if raw is None:
        return []
    try:
        version, items = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        if version != INTENTS_FORMAT:
            raise ValueError(f"format {version}")
        return [Intent.from_wire(item) for item in items]
    except (ValueError, TypeError, KeyError, msgpack.exceptions.ExtraData) as exc:
        raise IntentError(f"the metadata group's intent records are unreadable: {exc}") from None


def unfinished(intents: list[Intent]) -> list[Intent]:
    return [i for i in intents if not i.state.finished]


def trimmed(intents: list[Intent]) -> list[Intent]:
    """Unfinished intents, and the last HISTORY finished ones."""
    finished = [i for i in intents if i.state.finished]
    keep = {i.intent_id for i in sorted(finished, key=lambda i: i.updated_ms)[-HISTORY:]}
    return [i for i in intents if not i.state.finished or i.intent_id in keep]


class IntentBook:
    """The intent records in the metadata group. `guards` (a callable, so
    that it follows the lease) conditions the scheduler's writes; commands
    that only record or cancel write unguarded."""

    def __init__(self, directory, clock: Callable[[], float] = time.time,  # type: ignore[no-untyped-def]
                 new_id: Callable[[], int] = lambda: secrets.randbits(62) + 1) -> None:
        """`clock` (wall-clock seconds) and `new_id` are the simulation's to set."""
        self.directory = directory
        self.clock = clock
        self.new_id = new_id

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    decode = staticmethod(decode_intents)

    async def all(self) -> list[Intent]:
        return decode_intents(await self.directory.read(INTENTS_KEY))

    async def get(self, intent_id: int) -> Intent | None:
        return next((i for i in await self.all() if i.intent_id == intent_id), None)

    async def _change(self, change: Callable[[list[Intent]], list[Intent] | None],
                      guards: tuple[tuple[bytes, bytes | None], ...] = ()) -> list[Intent] | None:
        """Compare-and-set the records until `change` applies (it returns the
        new list, or None to write nothing). None if a guard failed."""
        while True:
            raw = await self.directory.read(INTENTS_KEY)
            new = change(decode_intents(raw))
            if new is None:
                return decode_intents(raw)
            swapped, _ = await self.directory.compare_and_set(INTENTS_KEY, raw, encode_intents(trimmed(new)),
                                                              guards=guards)
            if swapped:
                return new
            if guards and not await self._guards_hold(guards):
                return None

    async def _guards_hold(self, guards: tuple[tuple[bytes, bytes | None], ...]) -> bool:
        for key, value in guards:
            if await self.directory.read(key) != value:
                return False
        return True

    async def submit(self, kind: IntentKind, args: dict[str, Any]) -> tuple[Intent, bool]:
        """Record an intent, or find the unfinished one that asks the same;
        returns (intent, whether it was new)."""
        args = msgpack.unpackb(msgpack.packb(args), raw=False)     # as stored: compared with stored ones
        created: list[Intent] = []
        found: list[Intent] = []

        def change(intents: list[Intent]) -> list[Intent] | None:
            created.clear()
            found.clear()
            same = next((i for i in unfinished(intents) if i.same_request(kind, args)), None)
            if same is not None:
                found.append(same)
                return None
            now = self.now_ms()
            intent = Intent(self.new_id(), kind, dict(args), submitted_ms=now, updated_ms=now)
            created.append(intent)
            return intents + [intent]

        await self._change(change)
        if found:
            return found[0], False
        return created[0], True

    async def cancel(self, intent_id: int) -> Intent:
        """Ask to cancel: a pending intent is cancelled by the next scheduler
        (at once if none is working); a running one stops where it safely can."""
        result: list[Intent] = []

        def change(intents: list[Intent]) -> list[Intent] | None:
            result.clear()
            target = next((i for i in intents if i.intent_id == intent_id), None)
            if target is None:
                raise IntentError(f"there is no intent {intent_id} (`shardnode group pending` lists them)")
            result.append(target)
            if target.state.finished or target.cancel_requested:
                return None
            updated = replace(target, cancel_requested=True, updated_ms=self.now_ms())
            result[0] = updated
            return [updated if i.intent_id == intent_id else i for i in intents]

        await self._change(change)
        return result[0]

    async def update(self, intent_id: int, change: Callable[[Intent], Intent],
                     guards: tuple[tuple[bytes, bytes | None], ...]) -> Intent | None:
        """Apply `change` to one intent (guarded by the lease); None if the
        guard failed (the lease was lost). IntentError if it is gone."""
        result: list[Intent] = []

        def apply(intents: list[Intent]) -> list[Intent]:
            result.clear()
            target = next((i for i in intents if i.intent_id == intent_id), None)
            if target is None:
                raise IntentError(f"intent {intent_id} is no longer recorded")
            updated = change(target)
            result.append(updated)
            return [updated if i.intent_id == intent_id else i for i in intents]

        if await self._change(apply, guards) is None:
            return None
        return result[0]
