"""Linearizability checker for shardnode's key-value histories.

A history is the list of operations that clients issued against the store,
each with the interval ``[call, return]`` during which the client waited for
it.  The history is *linearizable* (Herlihy & Wing 1990) if every operation
can be given a single instant inside its interval at which it took effect,
such that executing the operations one at a time in that order on an ordinary
map produces exactly the results the clients saw.

Algorithm
---------
The search is the one of Wing & Gong ("Testing and verifying concurrent
objects", J. Parallel Distrib. Comput., 1993) with the memoization of Lowe
("Testing for linearizability", Concurrency and Computation: Practice and
Experience, 2017), arranged the way Porcupine
(https://github.com/anishathalye/porcupine) arranges it:

1. **Partitioning (P-compositionality).**  A map is a product of independent
   registers, one per key, and a history is linearizable iff the sub-history of
   every key is.  Each key is checked on its own, which keeps every search
   small.

2. **Event list.**  Each operation contributes a *call* event and a *return*
   event.  All events of a key are sorted by time (a call sorts before a
   return at the same instant, so touching intervals count as concurrent) and
   threaded onto a doubly linked list.  Every call entry points at its return
   entry.

3. **Depth-first search.**  Walking the list from the head, every call entry
   met before the first return entry belongs to an operation that may take
   effect next: nothing still unplaced returned before it was called.  The
   search tries them in order; when one is legal in the current state it is
   *lifted* (its call and return entries are unlinked), pushed on a stack
   together with the state before it, and the walk restarts from the head.
   Meeting a return entry means that operation can no longer be placed:
   the search pops the stack, *unlifts* the entry (dancing-links style, so
   the list is restored exactly) and continues with the entry after it.
   The history is linearizable once every completed operation is placed
   (the walk reaches the tail, or the return entry of an operation whose
   outcome is unknown, see below), and is not when a dead end is reached
   with an empty stack.

4. **Memoization (Lowe).**  Two search nodes with the same set of placed
   operations and the same state have the same future, so a set of
   ``(placed-bitset, state)`` pairs prunes every node already explored.  The
   set of placed operations is a Python ``int`` used as a bitset.

Reductions
----------
Besides Porcupine's scheme the search prunes moves that are never needed.
Each is sound because, whenever the remaining operations can be linearized
at all, a linearization that places the fewest unknown-outcome operations
(with interchangeable ones swapped into call order) survives every rule:

* **Forced identities.**  A completed operation that is legal next and leaves
  the state unchanged (every legal ``get``; a ``put`` of the value already
  there; a ``delete`` of an absent key) is the identity wherever it is legal,
  because its output pins the state before it.  It can be moved to the front
  of any linearization, so the node it is placed from succeeds iff the node
  after it does: backtracking over it keeps backtracking, and if the node
  after it is already cached the node before it is a dead end.  This removes
  the exponential blow-up of many concurrent reads of one value.

* **Unknown outcomes.**  An operation that timed out may have taken effect
  at any time after its call, or never: it gets a return time of +infinity
  and accepts any output, and "never" is placing it last, so the search
  succeeds as soon as every *completed* operation is placed.  Unknown gets
  constrain nothing and are dropped.  An unknown write is placed only if it
  changes the state, if a completed operation reporting the value it writes
  is still unplaced, if the move before it did not place an unknown write
  (which would then be overwritten unseen), and after the earlier unknown
  writes of the same value (they are interchangeable).  Any other placement
  can be deleted from a linearization, leaving a linearization.  The "move
  before it" rule makes the previous move part of a node, so it is part of
  the cache key too.  Without these rules a few dozen timed-out writes make
  the search exponential.

Model
-----
The state of a key is its value (``bytes``) or ``None`` when absent; every key
starts absent.  ``get`` must return the state; ``put(v)`` and ``delete``
return the previous value (the state) and set the state to ``v`` or ``None``.
"""

from __future__ import annotations

import enum
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = [
    "CheckResult",
    "HistoryRecorder",
    "OpKind",
    "Operation",
    "Verdict",
    "check_history",
]


class OpKind(enum.Enum):
    """The operations of the key-value model."""

    GET = "get"
    PUT = "put"
    DELETE = "delete"


@dataclass(slots=True, frozen=True)
class Operation:
    """One client operation on one key.

    ``output`` is what the client observed: for ``get`` the value read, for
    ``put``/``delete`` the previous value (``None`` = absent).  It is ignored
    when ``return_time`` is ``None``, i.e. when the outcome is unknown and the
    operation may or may not have taken effect at any time after ``call``.
    """

    client_id: int
    kind: OpKind
    key: bytes
    value: bytes | None
    output: bytes | None
    call: float
    return_time: float | None


class Verdict(enum.Enum):
    """Outcome of a check; ``UNKNOWN`` means the time budget ran out."""

    OK = "ok"
    ILLEGAL = "illegal"
    UNKNOWN = "unknown"


@dataclass(slots=True, frozen=True)
class CheckResult:
    """Result of :func:`check_history`.

    ``key`` is the first key found non-linearizable (or the key being checked
    when the budget ran out).  ``explanation`` is a human-readable account for
    ``ILLEGAL`` (and a one-line note for ``UNKNOWN``); it is empty for ``OK``.
    ``checked_ops`` counts the operations of every key whose check finished,
    including the offending key.
    """

    verdict: Verdict
    key: bytes | None
    explanation: str
    checked_ops: int

    @property
    def ok(self) -> bool:
        """True iff the history was found linearizable."""
        return self.verdict is Verdict.OK


# --------------------------------------------------------------------------
# Per-key preparation
# --------------------------------------------------------------------------

#: Expected output of an operation whose outcome is unknown: matches any state.
_ANY: object = object()
#: New-state marker of an operation that leaves the state as it is (``get``).
_SAME: object = object()

#: Search iterations between two looks at the clock; keeps ``time.monotonic``
#: out of the hot loop while still honouring a deadline within milliseconds.
_DEADLINE_CHECK_INTERVAL = 4096


@dataclass(slots=True)
class _KeyHistory:
    """The operations of one key, in call order, and which of them to search.

    ``ops`` holds every operation (its index is the ``#n`` shown in
    explanations); ``searched`` the indices of those the search must place:
    unknown gets and unobserved unknown writes are left out because they can
    never make a history illegal.
    """

    key: bytes
    ops: list[Operation]
    searched: list[int]


def _sort_time(t: float | None) -> float:
    """Return time used for ordering: unknown outcomes return at +infinity."""
    return math.inf if t is None else t


def _validate(op: Operation) -> None:
    """Reject operations the model cannot interpret, before any search runs."""
    if not isinstance(op.kind, OpKind):
        raise ValueError(f"operation kind must be an OpKind, got {op.kind!r}")
    if op.kind is OpKind.PUT and op.value is None:
        raise ValueError(f"put without a value: {op!r}")
    if op.return_time is not None and op.return_time < op.call:
        raise ValueError(f"operation returns before it is called: {op!r}")


def _prepare_key(key: bytes, ops: list[Operation]) -> _KeyHistory:
    """Sort a key's operations and pick the ones the search has to place.

    An unknown write that sets a value no completed operation ever reports can
    be dropped: in any linearization only unknown operations (whose outputs are
    ignored) can follow it before the next write, so removing it changes no
    checked output; conversely, a linearization without it extends to one with
    it placed last.  Dropping them keeps the search from trying to place them
    at every step.
    """
    ordered = sorted(ops, key=lambda op: (op.call, _sort_time(op.return_time)))
    observed = {op.output for op in ordered if op.return_time is not None}
    searched: list[int] = []
    for index, op in enumerate(ordered):
        if op.return_time is None:
            if op.kind is OpKind.GET:
                continue
            written = op.value if op.kind is OpKind.PUT else None
            if written not in observed:
                continue
        searched.append(index)
    return _KeyHistory(key=key, ops=ordered, searched=searched)


# --------------------------------------------------------------------------
# Event list (doubly linked, in parallel arrays)
# --------------------------------------------------------------------------

#: ``match`` of a return entry whose op has a deadline (a completed op).
_RETURN = -1
#: ``match`` of the return entry of an unknown-outcome op and of the tail:
#: reaching one means every completed op has been placed.
_OPEN_RETURN = -2


@dataclass(slots=True)
class _EventList:
    """Sorted call/return events of one key as a doubly linked list.

    Entries are indices: ``head`` (0) and ``tail`` are sentinels, so linking
    code needs no ``None`` checks.  Parallel lists are used instead of node
    objects because indexing a list is the cheapest access CPython offers in
    the hot loop.

    * ``nxt``/``prv``: the links.
    * ``match``: for a call entry the index of its return entry (> 0); for a
      return entry ``_RETURN``, or ``_OPEN_RETURN`` if the outcome is unknown.
    * ``op``: the operation (index into ``_KeyHistory.ops``) of any entry.
    * ``bit``: for a call entry, ``1 << slot``: its bit in the placed-set.
    * ``expect``: for a call entry, the state its output requires (``_ANY``
      when the outcome is unknown).
    * ``new_state``: for a call entry, the state after it (``_SAME`` for get).
    * ``prereq``: for an unknown op, the bit of the previous unknown op that
      writes the same value (0 if none): such ops are interchangeable, so
      they are only placed in call order.
    * ``observers``: for an unknown op, the bits of the completed ops whose
      output is the value it writes: once all are placed, placing it is futile.
    * ``dirty_tag``: a bit above all op bits, set in cache keys of nodes
      reached by placing an unknown op (those nodes allow fewer moves).
    """

    nxt: list[int]
    prv: list[int]
    match: list[int]
    op: list[int]
    bit: list[int]
    expect: list[object]
    new_state: list[object]
    prereq: list[int]
    observers: list[int]
    head: int
    tail: int
    dirty_tag: int


def _build_event_list(history: _KeyHistory) -> _EventList:
    """Thread the searched operations' events onto a sorted linked list.

    Sorting by ``(time, 0 for call / 1 for return)`` puts a call before a
    return at the same instant, which makes operations whose intervals merely
    touch concurrent, as the interface promises.
    """
    searched = [history.ops[index] for index in history.searched]
    events: list[tuple[float, int, int]] = []
    for slot, op in enumerate(searched):
        events.append((op.call, 0, slot))
        events.append((_sort_time(op.return_time), 1, slot))
    events.sort()

    observed_by: dict[bytes | None, int] = {}
    for slot, op in enumerate(searched):
        if op.return_time is not None:
            observed_by[op.output] = observed_by.get(op.output, 0) | (1 << slot)

    size = len(events) + 2
    head, tail = 0, size - 1
    nxt = list(range(1, size + 1))
    nxt[tail] = -1
    prv = list(range(-1, size - 1))
    match = [_RETURN] * size
    match[tail] = _OPEN_RETURN
    op_of = [-1] * size
    bit = [0] * size
    expect: list[object] = [None] * size
    new_state: list[object] = [None] * size
    prereq = [0] * size
    observers = [0] * size

    call_entry: dict[int, int] = {}
    last_of_class: dict[tuple[OpKind, bytes | None], int] = {}
    for position, (_, is_return, slot) in enumerate(events):
        entry = position + 1
        op = searched[slot]
        op_of[entry] = history.searched[slot]
        if is_return:
            match[call_entry[slot]] = entry
            if op.return_time is None:
                match[entry] = _OPEN_RETURN
            continue
        call_entry[slot] = entry
        bit[entry] = 1 << slot
        written = op.value if op.kind is OpKind.PUT else None
        new_state[entry] = _SAME if op.kind is OpKind.GET else written
        if op.return_time is not None:
            expect[entry] = op.output
            continue
        expect[entry] = _ANY
        observers[entry] = observed_by.get(written, 0)
        prereq[entry] = last_of_class.get((op.kind, written), 0)
        last_of_class[(op.kind, written)] = bit[entry]
    return _EventList(
        nxt, prv, match, op_of, bit, expect, new_state, prereq, observers,
        head, tail, dirty_tag=1 << len(searched),
    )


def _lift(nxt: list[int], prv: list[int], entry: int, ret: int) -> None:
    """Unlink a call entry and then its return entry (the op is placed)."""
    before, after = prv[entry], nxt[entry]
    nxt[before] = after
    prv[after] = before
    before, after = prv[ret], nxt[ret]
    nxt[before] = after
    prv[after] = before


def _unlift(nxt: list[int], prv: list[int], entry: int, ret: int) -> None:
    """Relink a lifted operation; reverse order of :func:`_lift`.

    Unlinked entries keep their own links, so relinking them in the reverse
    order restores the list exactly (Knuth's dancing links).
    """
    nxt[prv[ret]] = ret
    prv[nxt[ret]] = ret
    nxt[prv[entry]] = entry
    prv[nxt[entry]] = entry


# --------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------


class _Status(enum.Enum):
    LINEARIZABLE = "linearizable"
    ILLEGAL = "illegal"
    TIMED_OUT = "timed out"
    CAPTURED = "captured"


@dataclass(slots=True)
class _SearchOutcome:
    """What a search ended with.

    ``max_depth`` is the length of the longest linearizable prefix reached.
    For ``CAPTURED`` (see ``capture_depth`` of :func:`_search`), ``prefix`` is
    the call entries of that prefix in order, ``state`` the state after it,
    and the event list is left as it was at that moment.
    """

    status: _Status
    max_depth: int
    prefix: list[int]
    state: bytes | None


def _search(
    events: _EventList, deadline: float | None, capture_depth: int = -1
) -> _SearchOutcome:
    """Wing–Gong/Lowe depth-first search over one key's event list.

    With ``capture_depth >= 0`` the search stops as soon as it first places
    that many operations and reports the prefix; running it again with the
    ``max_depth`` of a failed search (the search is deterministic) yields the
    longest linearizable prefix without recording prefixes on the fast path.

    The loop is one function with local aliases on purpose: it runs millions
    of iterations and attribute look-ups would dominate its cost.
    """
    nxt, prv, match, bit = events.nxt, events.prv, events.match, events.bit
    expect, new_state = events.expect, events.new_state
    prereq, observers, dirty_tag = events.prereq, events.observers, events.dirty_tag
    head = events.head

    state: object = None
    linearized = 0
    # Whether the last move placed an unknown write: then the next move must
    # observe its value, so it may not be another unknown write.
    dirty = False
    # (call entry, state before it, forced: a completed op that kept the
    #  state, dirty before it)
    stack: list[tuple[int, object, bool, bool]] = []
    cache: set[tuple[int, object]] = set()
    max_depth = 0
    countdown = _DEADLINE_CHECK_INTERVAL

    if capture_depth == 0:
        return _SearchOutcome(_Status.CAPTURED, 0, [], None)

    entry = nxt[head]
    while True:
        countdown -= 1
        if not countdown:
            countdown = _DEADLINE_CHECK_INTERVAL
            if deadline is not None and time.monotonic() > deadline:
                return _SearchOutcome(_Status.TIMED_OUT, max_depth, [], None)

        ret = match[entry]
        if ret == _OPEN_RETURN:
            # Every completed op is placed; unknown ones left can go last.
            return _SearchOutcome(_Status.LINEARIZABLE, max_depth, [], None)
        if ret > 0:
            # A call entry: its operation may take effect next.
            wanted = expect[entry]
            if wanted is _ANY:
                # An unknown write is only worth placing (module docstring)
                # right after a move that was not an unknown write, if it
                # changes the state, after the earlier unknown writes of its
                # value, and while an op reporting its value is unplaced.
                after = new_state[entry]
                need = prereq[entry]
                seen_by = observers[entry]
                if (
                    dirty
                    or after == state
                    or (linearized & need) != need
                    or (linearized & seen_by) == seen_by
                ):
                    entry = nxt[entry]
                    continue
                forced = False
                node = (linearized | bit[entry] | dirty_tag, after)
            elif wanted == state:
                after = new_state[entry]
                if after is _SAME:
                    after = state
                forced = after == state
                node = (linearized | bit[entry], after)
            else:
                entry = nxt[entry]
                continue

            if node not in cache:
                cache.add(node)
                stack.append((entry, state, forced, dirty))
                dirty = wanted is _ANY
                state = after
                linearized |= bit[entry]
                _lift(nxt, prv, entry, ret)
                if len(stack) > max_depth:
                    max_depth = len(stack)
                    if max_depth == capture_depth:
                        prefix = [e for e, _, _, _ in stack]
                        return _SearchOutcome(
                            _Status.CAPTURED, max_depth, prefix, state  # type: ignore[arg-type]
                        )
                entry = nxt[head]
                continue
            if not forced:
                entry = nxt[entry]
                continue
            # A forced op whose successor node already failed: this node
            # fails too; fall through to backtrack.

        # Dead end: undo placements until one with alternatives left to try.
        while True:
            if not stack:
                return _SearchOutcome(_Status.ILLEGAL, max_depth, [], None)
            entry, state, forced, dirty = stack.pop()
            linearized ^= bit[entry]
            _unlift(nxt, prv, entry, match[entry])
            if not forced:
                break
        entry = nxt[entry]


# --------------------------------------------------------------------------
# Explanations
# --------------------------------------------------------------------------

_MAX_SHOWN_BYTES = 40


def _fmt_value(value: bytes | None) -> str:
    """Short repr of a value; long values are cut so explanations stay readable."""
    if value is None:
        return "None"
    if len(value) <= _MAX_SHOWN_BYTES:
        return repr(value)
    return f"{value[:_MAX_SHOWN_BYTES]!r}...({len(value)} bytes)"


def _fmt_time(t: float | None) -> str:
    """Times as the caller gave them (any unit); ``?`` for an unknown return."""
    return "?" if t is None else str(t)


def _fmt_op(index: int, op: Operation) -> str:
    """``#n client c kind(value) -> output [call, return]``."""
    arg = _fmt_value(op.value) if op.kind is OpKind.PUT else ""
    out = "?" if op.return_time is None else _fmt_value(op.output)
    return (
        f"#{index} client {op.client_id} {op.kind.value}({arg}) -> {out} "
        f"[{_fmt_time(op.call)}, {_fmt_time(op.return_time)}]"
    )


def _explain_illegal(
    history: _KeyHistory, events: _EventList, outcome: _SearchOutcome
) -> str:
    """Describe why a key failed, from the captured longest prefix.

    At the first node of maximal depth no placement is possible (any would be
    deeper), so every completed op of the frontier is inconsistent with the
    state, and the first return entry is the completed op whose deadline
    passed with nothing able to take effect.
    """
    ops = history.ops
    searched = set(history.searched)
    lines = [
        f"key {history.key!r} is not linearizable.",
        f"Operations on key {history.key!r} in call order "
        "(client, kind(value) -> output, [call, return]):",
    ]
    for index, op in enumerate(ops):
        note = ""
        if op.return_time is None:
            note = "  (outcome unknown" + ("" if index in searched else "; cannot matter, ignored") + ")"
        lines.append("  " + _fmt_op(index, op) + note)

    prefix = [events.op[e] for e in outcome.prefix]
    total = len(history.searched)
    shown = ", ".join(f"#{i}" for i in prefix) if prefix else "(empty)"
    lines.append(
        f"Longest linearizable prefix reached ({len(prefix)} of {total} ops): {shown}"
    )
    lines.append(f"Value of the key after that prefix: {_fmt_value(outcome.state)}")

    nxt, match = events.nxt, events.match
    entry = nxt[events.head]
    candidates: list[int] = []
    while match[entry] > 0:
        candidates.append(entry)
        entry = nxt[entry]
    blocked = ops[events.op[entry]]
    lines.append(
        f"Op #{events.op[entry]} could not be placed: it must take effect by its "
        f"return at {_fmt_time(blocked.return_time)}, but none of the ops that may "
        "take effect before then is consistent with that value:"
    )
    for call in candidates:
        index = events.op[call]
        op = ops[index]
        wanted = events.expect[call]
        if wanted is _ANY:
            reason = "outcome unknown; taking effect here cannot help"
        elif wanted == outcome.state:
            reason = "could take effect, but no continuation after it linearizes"
        elif op.kind is OpKind.GET:
            reason = f"read {_fmt_value(op.output)}"
        else:
            reason = f"reported previous value {_fmt_value(op.output)}"
        lines.append(f"  {_fmt_op(index, op)}: {reason}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def _partition(operations: Iterable[Operation]) -> dict[bytes, list[Operation]]:
    """Group operations by key, keys in order of first appearance."""
    by_key: dict[bytes, list[Operation]] = {}
    for op in operations:
        _validate(op)
        by_key.setdefault(op.key, []).append(op)
    return by_key


def check_history(
    operations: Iterable[Operation], *, timeout: float | None = None
) -> CheckResult:
    """Check that a key-value history is linearizable.

    Keys are checked one by one (in order of first appearance) and checking
    stops at the first illegal key.  ``timeout`` (seconds, wall clock) bounds
    the whole check; when it runs out the verdict is ``UNKNOWN``.  Operation
    times may be in any unit, ints or floats; at equal times a call and a
    return are treated as concurrent.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    checked = 0
    for key, ops in _partition(operations).items():
        if deadline is not None and time.monotonic() > deadline:
            return _timed_out(key, checked, timeout)
        history = _prepare_key(key, ops)
        events = _build_event_list(history)
        outcome = _search(events, deadline)
        if outcome.status is _Status.TIMED_OUT:
            return _timed_out(key, checked, timeout)
        checked += len(ops)
        if outcome.status is _Status.ILLEGAL:
            longest = _search(events, None, capture_depth=outcome.max_depth)
            explanation = _explain_illegal(history, events, longest)
            return CheckResult(Verdict.ILLEGAL, key, explanation, checked)
    return CheckResult(Verdict.OK, None, "", checked)


def _timed_out(key: bytes, checked: int, timeout: float | None) -> CheckResult:
    """UNKNOWN result naming the key whose check the budget cut short."""
    return CheckResult(
        Verdict.UNKNOWN,
        key,
        f"time budget of {timeout}s ran out while checking key {key!r}",
        checked,
    )


# --------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    """An invoked operation, completed in place by ok()/unknown()."""

    client_id: int
    kind: OpKind
    key: bytes
    value: bytes | None
    call: float
    output: bytes | None = None
    return_time: float | None = None
    finished: bool = False


class HistoryRecorder:
    """Thread-safe (a threading.Lock) and asyncio-friendly recorder of a client history.

    Every method only takes a short lock and never blocks on I/O, so it can be
    called from threads and from coroutines alike.  Stamping times inside the
    recorder (rather than by callers) keeps one clock for the whole history;
    ``invoke`` must be called before the request is sent and ``ok`` after the
    answer arrived, which makes every recorded interval cover the real one.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._next_handle = 0
        self._records: dict[int, _Pending] = {}

    def invoke(
        self, client_id: int, kind: OpKind, key: bytes, value: bytes | None = None
    ) -> int:
        """Record the start of an operation; returns a handle for its outcome."""
        if kind is OpKind.PUT and value is None:
            raise ValueError("put needs a value")
        if kind is not OpKind.PUT and value is not None:
            raise ValueError(f"{kind.value} takes no value")
        with self._lock:
            handle = self._next_handle
            self._next_handle += 1
            self._records[handle] = _Pending(client_id, kind, key, value, self._clock())
            return handle

    def ok(self, handle: int, output: bytes | None) -> None:
        """Record a definite answer: the value read, or the previous value."""
        with self._lock:
            record = self._unfinished(handle)
            record.return_time = self._clock()
            record.output = output
            record.finished = True

    def unknown(self, handle: int) -> None:
        """Record that the outcome is unknown (it may or may not have applied)."""
        with self._lock:
            self._unfinished(handle).finished = True

    def failed(self, handle: int) -> None:
        """Drop an operation that definitely did not take effect."""
        with self._lock:
            self._unfinished(handle)
            del self._records[handle]

    def operations(self) -> list[Operation]:
        """Completed and unknown ops in invocation order; pending ones count as unknown."""
        with self._lock:
            return [
                Operation(
                    client_id=r.client_id,
                    kind=r.kind,
                    key=r.key,
                    value=r.value,
                    output=r.output,
                    call=r.call,
                    return_time=r.return_time,
                )
                for r in self._records.values()
            ]

    def _unfinished(self, handle: int) -> _Pending:
        """The record of a handle that has not been finished yet (caller holds the lock)."""
        record = self._records.get(handle)
        if record is None:
            raise KeyError(f"unknown operation handle {handle}")
        if record.finished:
            raise ValueError(f"operation handle {handle} already finished")
        return record
