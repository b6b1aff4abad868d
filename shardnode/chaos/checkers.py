"""The checks of a chaos run's records: what went wrong, as anomalies with
the keys and operations involved (docs/testing.md, "Workloads and
checkers").

- `check_registers`: the register workload's history is linearizable, key by
  key (shardnode.testing.linearizability), and every write was applied at
  most once;
- `check_set`: the set workload's final read holds every acknowledged insert
  and nothing that was never inserted.

Every anomaly reported is a fact no correct execution can produce; an
operation whose outcome is unknown is never held against the store. When a
checker cannot decide (its time budget ran out, an element could not be
read back) the result says so in `undecided` and is not valid, but reports
no anomaly for it.

Availability (availability.py) is re-exported here so that a run's report
needs one import.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ..testing.linearizability import OpKind, Operation, Verdict, check_history
from .availability import WindowAvailability, availability, resume_seconds
from .operations import Action, LoggedOperation, OperationLog, Outcome
from .set_elements import SetAttempt, SetReadback

__all__ = [
    "DOUBLE_APPLIED",
    "FAILED_BUT_PRESENT",
    "LOST",
    "NON_LINEARIZABLE",
    "OVERWRITTEN_TWICE",
    "PHANTOM",
    "WRONG_VALUE",
    "Anomaly",
    "CheckResult",
    "WindowAvailability",
    "availability",
    "check_registers",
    "check_set",
    "resume_seconds",
]

# --- Anomaly kinds ----------------------------------------------------------------------

#: A key's history has no linearization (registers).
NON_LINEARIZABLE = "non-linearizable"
#: A write was applied twice: a put returned its own value as the previous
#: one (registers), or an acknowledged insert found its element already
#: there (set).
DOUBLE_APPLIED = "double-applied"
#: A value written once was the previous value of two writes: it was current
#: twice, so it was written twice or came back after being overwritten; for
#: the initial absence of a key never deleted, the first write was lost
#: (registers).
OVERWRITTEN_TWICE = "overwritten-twice"
#: A value no write ever wrote to that key was read (registers), or an
#: element never inserted is present (set).
PHANTOM = "phantom"
#: An acknowledged insert's element is absent at the end (set).
LOST = "lost"
#: An insert that definitely failed is present at the end (set).
FAILED_BUT_PRESENT = "failed-but-present"
#: An element is present with a value its insert did not write (set).
WRONG_VALUE = "wrong-value"

#: Operation types an anomaly can point at.
Involved = Operation | SetAttempt


@dataclass(slots=True, frozen=True)
class Anomaly:
    """One thing that went wrong: its kind (one of the constants above), the
    keys and operations involved, a one-line account, and for
    non-linearizable keys the checker's full explanation (the key's
    operations and the longest linearizable prefix)."""

    kind: str
    keys: tuple[bytes, ...]
    operations: tuple[Involved, ...]
    detail: str
    explanation: str = ""


@dataclass(slots=True, frozen=True)
class CheckResult:
    """What one checker found. `operations` = `ok` + `failed` + `unknown`
    (by outcome); `figures` are the checker's own counts (for the set: how
    many unknown inserts were recovered, …); `undecided` says why the
    checker could not decide, when it could not ("" when it did)."""

    checker: str
    operations: int
    ok: int
    failed: int
    unknown: int
    anomalies: tuple[Anomaly, ...]
    figures: Mapping[str, int] = field(default_factory=dict)
    undecided: str = ""

    @property
    def valid(self) -> bool:
        """No anomaly, and the checker could decide."""
        return not self.anomalies and not self.undecided

    def anomalies_of(self, kind: str) -> tuple[Anomaly, ...]:
        return tuple(a for a in self.anomalies if a.kind == kind)

    def summary(self) -> str:
        """One line: the verdict, the counts, the anomalies by kind."""
        verdict = "valid" if self.valid else ("undecided" if not self.anomalies else "INVALID")
        line = (f"{self.checker}: {verdict}; {self.operations} operations "
                f"({self.ok} ok, {self.failed} failed, {self.unknown} unknown)")
        if self.anomalies:
            kinds = Counter(a.kind for a in self.anomalies)
            line += "; anomalies: " + ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
        if self.undecided:
            line += f"; {self.undecided}"
        return line


def _show(key: bytes | None) -> str:
    if key is None:
        return "absent"
    return repr(key.decode("utf-8", "backslashreplace"))


# --- Registers --------------------------------------------------------------------------


def check_registers(history: Iterable[Operation], *,
                    log: OperationLog | Sequence[LoggedOperation] | None = None,
                    timeout: float | None = 120.0) -> CheckResult:
    """Check the register workload's history.

    Exactly once, on every key whose written values are unique (the
    workload's are; a value written by two puts is not judged): a put whose
    previous value is its own value (DOUBLE_APPLIED); a value, or the
    initial absence of a key with no delete, that is the previous value of
    two completed writes (OVERWRITTEN_TWICE); a value read that no put
    wrote to that key (PHANTOM). Then linearizability, key by key, within
    `timeout` seconds in all (NON_LINEARIZABLE, one anomaly per key).

    Counts come from `log` when given (its puts and gets, failed reads
    included; the history leaves failed operations out), else from the
    history.
    """
    operations = list(history)
    by_key: dict[bytes, list[Operation]] = defaultdict(list)
    for op in operations:
        by_key[op.key].append(op)

    anomalies: list[Anomaly] = []
    for key, ops in by_key.items():
        anomalies.extend(_exactly_once(key, ops))

    undecided = ""
    # One budget for the whole check, spent key by key.
    deadline = None if timeout is None else time.monotonic() + timeout
    for key, ops in by_key.items():
        remaining = None if deadline is None else deadline - time.monotonic()
        verdict = None if remaining is not None and remaining <= 0 else check_history(ops, timeout=remaining)
        if verdict is None or verdict.verdict is Verdict.UNKNOWN:
            undecided = f"the linearizability check ran out of its {timeout:g} s budget at key {_show(key)}"
            break
        if not verdict.ok:
            anomalies.append(Anomaly(
                NON_LINEARIZABLE, (key,), tuple(ops),
                f"key {_show(key)}: no order of its {len(ops)} operations explains what clients saw",
                verdict.explanation))

    if log is not None:
        entries = log.operations() if isinstance(log, OperationLog) else tuple(log)
        counted = Counter(e.outcome for e in entries if e.action in (Action.PUT, Action.GET))
    else:
        counted = Counter(Outcome.OK if op.return_time is not None else Outcome.UNKNOWN for op in operations)
    return CheckResult(
        checker="registers",
        operations=sum(counted.values()),
        ok=counted[Outcome.OK],
        failed=counted[Outcome.FAILED],
        unknown=counted[Outcome.UNKNOWN],
        anomalies=tuple(anomalies),
        figures={"keys": len(by_key)},
        undecided=undecided,
    )


def _exactly_once(key: bytes, ops: list[Operation]) -> list[Anomaly]:
    """The exactly-once anomalies of one key (check_registers' docstring).

    Why each is sound, for a value v written by one put W only: the state
    is v only after W took effect; each put or delete that reports v as the
    previous value replaces it (with another value, or none), so a second
    one needs v written again, by W again, or a state come back from the
    dead. W reporting v itself needs W applied before W. Gets change
    nothing. A key never deleted is absent only before its first write, so
    absence is a value "written once" too.
    """
    writers: Counter[bytes | None] = Counter(op.value for op in ops if op.kind is OpKind.PUT)
    deleted = any(op.kind is OpKind.DELETE for op in ops)
    completed = [op for op in ops if op.return_time is not None]
    anomalies: list[Anomaly] = []

    for op in completed:
        if op.kind is OpKind.PUT and op.output == op.value and writers[op.value] == 1:
            anomalies.append(Anomaly(
                DOUBLE_APPLIED, (key,), (op,),
                f"key {_show(key)}: a put of {_show(op.value)} (client {op.client_id}) returned its own value "
                "as the previous one: it was applied twice"))

    replaced: dict[bytes | None, list[Operation]] = defaultdict(list)
    for op in completed:
        if op.kind is OpKind.GET or (op.kind is OpKind.PUT and op.output == op.value):
            continue            # reads replace nothing; a put of its own value is reported above
        replaced[op.output].append(op)
    for value, replacers in replaced.items():
        written_once = writers[value] == 1 if value is not None else not deleted
        if written_once and len(replacers) >= 2:
            what = ("found the key absent: a write to it was lost" if value is None
                    else f"replaced {_show(value)}, written once: it was applied twice or came back")
            anomalies.append(Anomaly(
                OVERWRITTEN_TWICE, (key,), tuple(replacers),
                f"key {_show(key)}: {len(replacers)} writes {what}"))

    for op in completed:
        if op.output is not None and writers[op.output] == 0:
            anomalies.append(Anomaly(
                PHANTOM, (key,), (op,),
                f"key {_show(key)}: a {op.kind.value} (client {op.client_id}) saw {_show(op.output)}, "
                "which no put wrote to this key"))
    return anomalies


# --- Set --------------------------------------------------------------------------------


def check_set(attempts: Iterable[SetAttempt], readback: SetReadback) -> CheckResult:
    """Check the set workload: each element's insert outcome against the
    final read.

    - acknowledged insert, absent: LOST; present with another value:
      WRONG_VALUE; its put found the element already there: DOUBLE_APPLIED;
    - unknown insert: present ("recovered") or absent, both fine;
    - failed insert (definitely not applied), present: FAILED_BUT_PRESENT;
    - a key read that no insert attempted, present: PHANTOM.

    `figures`: acknowledged, recovered (unknown and present), unknown-absent,
    failed-absent, probes (keys read that were never attempted), unreadable.
    Any element that could not be read back makes the check undecided.
    """
    by_key: dict[bytes, SetAttempt] = {}
    for attempt in attempts:
        if attempt.key in by_key:
            raise ValueError(f"element {_show(attempt.key)} was attempted twice: the set workload "
                             "inserts each element once")
        by_key[attempt.key] = attempt

    anomalies: list[Anomaly] = []
    figures: Counter[str] = Counter()
    for key, attempt in by_key.items():
        if attempt.outcome is Outcome.OK:
            figures["acknowledged"] += 1
            if attempt.previous is not None:
                anomalies.append(Anomaly(
                    DOUBLE_APPLIED, (key,), (attempt,),
                    f"element {_show(key)}: its acknowledged insert found it already there "
                    f"(previous value {_show(attempt.previous)}): applied twice, or written before"))
        if key not in readback.values:
            continue            # unreadable: counted below
        present = readback.values[key]
        if present is not None and present != attempt.value:
            anomalies.append(Anomaly(
                WRONG_VALUE, (key,), (attempt,),
                f"element {_show(key)} holds {_show(present)}, not the {_show(attempt.value)} its insert wrote"))
            continue
        if attempt.outcome is Outcome.OK and present is None:
            anomalies.append(Anomaly(
                LOST, (key,), (attempt,),
                f"element {_show(key)}: acknowledged (client {attempt.client_id}) but absent at the end"))
        elif attempt.outcome is Outcome.UNKNOWN:
            figures["recovered" if present is not None else "unknown-absent"] += 1
        elif attempt.outcome is Outcome.FAILED:
            if present is not None:
                anomalies.append(Anomaly(
                    FAILED_BUT_PRESENT, (key,), (attempt,),
                    f"element {_show(key)}: its insert failed (definitely not applied, client "
                    f"{attempt.client_id}) but it is present at the end"))
            else:
                figures["failed-absent"] += 1

    for key, present in readback.values.items():
        if key in by_key:
            continue
        figures["probes"] += 1
        if present is not None:
            anomalies.append(Anomaly(
                PHANTOM, (key,), (),
                f"element {_show(key)} is present ({_show(present)}) but was never inserted"))

    figures["unreadable"] = len(readback.unreadable)
    undecided = (f"{len(readback.unreadable)} element(s) could not be read back" if readback.unreadable else "")
    outcomes = Counter(a.outcome for a in by_key.values())
    for name in ("acknowledged", "recovered", "unknown-absent", "failed-absent", "probes"):
        figures.setdefault(name, 0)
    return CheckResult(
        checker="set",
        operations=len(by_key),
        ok=outcomes[Outcome.OK],
        failed=outcomes[Outcome.FAILED],
        unknown=outcomes[Outcome.UNKNOWN],
        anomalies=tuple(anomalies),
        figures=dict(figures),
        undecided=undecided,
    )
