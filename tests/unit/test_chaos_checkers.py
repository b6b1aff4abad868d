"""The chaos checkers on hand-made histories: each anomaly kind is caught
(the "broken variants": lost, phantom, failed-but-present, double-applied,
overwritten twice, wrong value, non-linearizable), and valid histories pass,
unknown outcomes included; availability and the time to resume writes."""

from __future__ import annotations

import random
import threading

import pytest

from shardnode.chaos.checkers import (DOUBLE_APPLIED, FAILED_BUT_PRESENT, LOST, NON_LINEARIZABLE,
                                      OVERWRITTEN_TWICE, PHANTOM, WRONG_VALUE, CheckResult, availability,
                                      check_registers, check_set, resume_seconds)
from shardnode.chaos.operations import Action, LoggedOperation, OperationLog, Outcome
from shardnode.chaos.set_elements import SetAttempt, SetReadback
from shardnode.chaos.workloads import RegisterWorkload, SetWorkload, write_outcome
from shardnode.errors import (DeadlineExceeded, InvalidArgument, NoLeader, NoQuorum, RoutersUnreachable,
                              ShardnodeError, Unavailable)
from shardnode.client import StaleSession
from shardnode.placement.shard_map import ShardMap
from shardnode.testing.linearizability import OpKind, Operation

K = b"k"


def put(value: str, output: str | None, call: float, ret: float | None, client: int = 1, key: bytes = K) -> Operation:
    return Operation(client, OpKind.PUT, key, value.encode(), None if output is None else output.encode(), call, ret)


def get(output: str | None, call: float, ret: float | None, client: int = 2, key: bytes = K) -> Operation:
    return Operation(client, OpKind.GET, key, None, None if output is None else output.encode(), call, ret)


def delete(output: str | None, call: float, ret: float, client: int = 3, key: bytes = K) -> Operation:
    return Operation(client, OpKind.DELETE, key, None, None if output is None else output.encode(), call, ret)


def kinds(result: CheckResult) -> set[str]:
    return {a.kind for a in result.anomalies}


# --- Registers: valid histories -----------------------------------------------------------


def test_a_sequential_history_is_valid() -> None:
    result = check_registers([
        put("a", None, 0, 1), get("a", 2, 3), put("b", "a", 4, 5), get("b", 6, 7),
        put("x", None, 0, 1, key=b"other"),
    ])
    assert result.valid, result.anomalies
    assert (result.operations, result.ok, result.failed, result.unknown) == (5, 5, 0, 0)
    assert result.figures["keys"] == 2
    assert "registers: valid" in result.summary()


def test_concurrent_operations_are_valid_in_any_order_that_fits() -> None:
    # b's put overlaps a's; a read during both may see either.
    result = check_registers([
        put("a", None, 0, 10, client=1), put("b", "a", 2, 8, client=2), get("b", 9, 11), get("b", 12, 13),
    ])
    assert result.valid, result.anomalies


def test_unknown_outcomes_may_have_applied_or_not() -> None:
    result = check_registers([
        put("a", None, 0, 1),
        put("b", None, 2, None, client=4),      # timed out, yet applied: seen below
        get("b", 5, 6),
        put("c", "b", 7, 8),
        put("d", None, 9, None, client=5),      # timed out, never applied
        get("c", 10, 11),
    ])
    assert result.valid, result.anomalies
    assert (result.operations, result.ok, result.unknown) == (6, 4, 2)


def test_counts_come_from_the_operation_log_when_given() -> None:
    log = [LoggedOperation(1, Action.PUT, K, 0, 1, Outcome.OK), LoggedOperation(2, Action.GET, K, 0, 1, Outcome.FAILED),
           LoggedOperation(3, Action.PUT, K, 0, 1, Outcome.UNKNOWN),
           LoggedOperation(4, Action.INSERT, b"s", 0, 1, Outcome.OK)]       # not a register operation
    result = check_registers([put("a", None, 0, 1)], log=log)
    assert (result.operations, result.ok, result.failed, result.unknown) == (3, 1, 1, 1)


def test_a_value_written_twice_is_not_judged_by_the_exactly_once_check() -> None:
    # Two puts of the same value: the second returning it is legal.
    result = check_registers([put("v", None, 0, 1), put("v", "v", 2, 3)])
    assert result.valid, result.anomalies


def test_absence_twice_is_fine_when_the_key_was_deleted_between() -> None:
    result = check_registers([put("a", None, 0, 1), delete("a", 2, 3), put("b", None, 4, 5)])
    assert result.valid, result.anomalies


# --- Registers: broken variants ------------------------------------------------------------


def test_a_put_that_returns_its_own_value_was_applied_twice() -> None:
    result = check_registers([put("a", None, 0, 1), put("b", "b", 2, 3, client=7)])
    assert DOUBLE_APPLIED in kinds(result)
    double = result.anomalies_of(DOUBLE_APPLIED)[0]
    assert double.keys == (K,) and double.operations[0].value == b"b"
    assert "applied twice" in double.detail
    assert NON_LINEARIZABLE in kinds(result)
    assert not result.valid and "INVALID" in result.summary()


def test_a_value_replaced_twice_was_written_twice_or_came_back() -> None:
    # "a" written once, but two later puts each found it.
    result = check_registers([put("a", None, 0, 1), put("b", "a", 2, 3), put("c", "a", 4, 5)])
    anomalies = result.anomalies_of(OVERWRITTEN_TWICE)
    assert len(anomalies) == 1 and len(anomalies[0].operations) == 2
    assert DOUBLE_APPLIED not in kinds(result)


def test_two_writes_finding_a_never_deleted_key_absent_lost_a_write() -> None:
    result = check_registers([put("a", None, 0, 1), put("b", None, 2, 3)])
    (anomaly,) = result.anomalies_of(OVERWRITTEN_TWICE)
    assert "lost" in anomaly.detail
    assert NON_LINEARIZABLE in kinds(result)


def test_concurrent_writes_finding_the_key_absent_are_caught_too() -> None:
    # Even overlapping, only one of them can be first.
    result = check_registers([put("a", None, 0, 5, client=1), put("b", None, 1, 6, client=2)])
    assert OVERWRITTEN_TWICE in kinds(result)


def test_a_value_no_put_wrote_is_a_phantom() -> None:
    result = check_registers([put("a", None, 0, 1), get("zzz", 2, 3)])
    (phantom,) = result.anomalies_of(PHANTOM)
    assert "zzz" in phantom.detail


def test_a_stale_read_is_not_linearizable() -> None:
    # No exactly-once rule is broken: only the order is impossible.
    result = check_registers([put("a", None, 0, 1), put("b", "a", 2, 3), get("a", 4, 5)])
    assert kinds(result) == {NON_LINEARIZABLE}
    (anomaly,) = result.anomalies
    assert anomaly.keys == (K,) and len(anomaly.operations) == 3
    assert "not linearizable" in anomaly.explanation


def test_a_lost_acknowledged_write_is_not_linearizable() -> None:
    # The read-back after the run finds the key absent.
    result = check_registers([put("a", None, 0, 1), get(None, 10, 11, client=0)])
    assert kinds(result) == {NON_LINEARIZABLE}


def test_every_non_linearizable_key_is_reported_not_only_the_first() -> None:
    history = [put("a", None, 0, 1, key=b"k1"), get(None, 2, 3, key=b"k1"),
               put("a", None, 0, 1, key=b"k2"), get("a", 2, 3, key=b"k2"),
               put("a", None, 0, 1, key=b"k3"), get(None, 2, 3, key=b"k3")]
    result = check_registers(history)
    assert [a.keys for a in result.anomalies_of(NON_LINEARIZABLE)] == [(b"k1",), (b"k3",)]


def test_a_check_out_of_time_is_undecided_not_an_anomaly() -> None:
    result = check_registers([put("a", None, 0, 1)], timeout=0.0)
    assert not result.valid and not result.anomalies
    assert "budget" in result.undecided and "undecided" in result.summary()


# --- Set -------------------------------------------------------------------------------------


def attempt(n: int, outcome: Outcome, previous: str | None = None) -> SetAttempt:
    return SetAttempt(1001, f"set/r/{n}".encode(), f"r/element/{n}".encode(), outcome,
                      None if previous is None else previous.encode(), float(n), n + 0.5)


def element(n: int) -> bytes:
    return f"set/r/{n}".encode()


def value(n: int) -> bytes:
    return f"r/element/{n}".encode()


def test_a_set_with_every_acknowledged_insert_present_is_valid() -> None:
    attempts = [attempt(0, Outcome.OK), attempt(1, Outcome.OK), attempt(2, Outcome.UNKNOWN),
                attempt(3, Outcome.UNKNOWN), attempt(4, Outcome.FAILED)]
    readback = SetReadback({element(0): value(0), element(1): value(1), element(2): value(2), element(3): None,
                            element(4): None, element(5): None, element(6): None})
    result = check_set(attempts, readback)
    assert result.valid, result.anomalies
    assert (result.operations, result.ok, result.failed, result.unknown) == (5, 2, 1, 2)
    assert result.figures == {"acknowledged": 2, "recovered": 1, "unknown-absent": 1, "failed-absent": 1,
                              "probes": 2, "unreadable": 0}


def test_an_acknowledged_insert_absent_at_the_end_is_lost() -> None:
    result = check_set([attempt(0, Outcome.OK), attempt(1, Outcome.OK)],
                       SetReadback({element(0): value(0), element(1): None}))
    (lost,) = result.anomalies
    assert lost.kind == LOST and lost.keys == (element(1),) and lost.operations == (attempt(1, Outcome.OK),)


def test_an_element_never_inserted_is_a_phantom() -> None:
    result = check_set([attempt(0, Outcome.OK)], SetReadback({element(0): value(0), element(1): b"boo"}))
    (phantom,) = result.anomalies
    assert phantom.kind == PHANTOM and phantom.keys == (element(1),)


def test_a_failed_insert_that_is_present_is_an_anomaly() -> None:
    result = check_set([attempt(0, Outcome.FAILED)], SetReadback({element(0): value(0)}))
    assert kinds(result) == {FAILED_BUT_PRESENT}


def test_an_acknowledged_insert_that_found_its_element_there_was_applied_twice() -> None:
    result = check_set([attempt(0, Outcome.OK, previous="r/element/0")], SetReadback({element(0): value(0)}))
    assert kinds(result) == {DOUBLE_APPLIED}


def test_an_element_with_a_value_its_insert_did_not_write_is_wrong() -> None:
    result = check_set([attempt(0, Outcome.UNKNOWN)], SetReadback({element(0): b"other"}))
    assert kinds(result) == {WRONG_VALUE}


def test_an_element_that_could_not_be_read_back_leaves_the_check_undecided() -> None:
    result = check_set([attempt(0, Outcome.OK)], SetReadback({}, unreadable=frozenset({element(0)})))
    assert not result.anomalies and not result.valid
    assert result.figures["unreadable"] == 1 and "could not be read back" in result.undecided


def test_an_element_attempted_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="attempted twice"):
        check_set([attempt(0, Outcome.OK), attempt(0, Outcome.FAILED)], SetReadback({}))


# --- Availability ------------------------------------------------------------------------------


def logged(action: Action, start: float, end: float | None, outcome: Outcome) -> LoggedOperation:
    return LoggedOperation(1, action, K, start, end, outcome)


def test_availability_is_the_share_of_operations_started_in_a_window_that_succeeded() -> None:
    log = [logged(Action.PUT, 0.5, 0.6, Outcome.OK), logged(Action.GET, 1.0, 1.1, Outcome.OK),
           logged(Action.PUT, 2.0, 5.0, Outcome.UNKNOWN), logged(Action.GET, 2.5, 3.0, Outcome.FAILED),
           logged(Action.INSERT, 3.0, 6.5, Outcome.OK),     # started in the fault, succeeded after it
           logged(Action.PUT, 4.0, None, Outcome.UNKNOWN)]  # still in flight
    before, fault, after, empty = availability(log, [(0, 2), (2, 5), (5, 9), (9, 10)])
    assert (before.operations, before.ok, before.fraction) == (2, 2, 1.0)
    assert (fault.operations, fault.ok, fault.fraction) == (4, 1, 0.25)
    assert (after.operations, after.fraction) == (0, None)
    assert empty.fraction is None
    (writes,) = availability(log, [(2, 5)], actions={Action.PUT, Action.INSERT})
    assert (writes.operations, writes.ok) == (3, 1)
    with pytest.raises(ValueError):
        availability(log, [(3, 2)])


def test_resume_seconds_is_the_wait_for_the_first_write_acknowledged_after_a_moment() -> None:
    log = [logged(Action.PUT, 0.0, 4.0, Outcome.OK),          # started before: does not count
           logged(Action.GET, 1.5, 1.6, Outcome.OK),          # a read: does not count
           logged(Action.PUT, 1.2, 3.0, Outcome.UNKNOWN),
           logged(Action.INSERT, 2.0, 3.5, Outcome.OK),
           logged(Action.PUT, 2.5, 3.2, Outcome.OK)]
    assert resume_seconds(log, 1.0) == pytest.approx(2.2)
    assert resume_seconds(log, 3.0) is None


def test_the_operation_log_is_thread_safe_and_keeps_start_order() -> None:
    ticks = iter(range(10_000))
    log = OperationLog(clock=lambda: float(next(ticks)))
    first = log.begin(1, Action.PUT, b"a")
    second = log.begin(2, Action.GET, b"b")
    log.finish(second, Outcome.OK)
    assert [(op.key, op.end, op.outcome) for op in log.operations()] == [(b"a", None, Outcome.UNKNOWN),
                                                                        (b"b", 2.0, Outcome.OK)]
    log.finish(first, Outcome.FAILED)
    with pytest.raises(KeyError):
        log.finish(first, Outcome.OK)

    shared = OperationLog()

    def client(client_id: int) -> None:
        for _ in range(500):
            shared.finish(shared.begin(client_id, Action.INSERT, b"x"), Outcome.OK)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(shared) == 2000 and all(op.outcome is Outcome.OK for op in shared.operations())


# --- Workload pieces that need no cluster ----------------------------------------------------------


def test_errors_that_mean_not_applied_and_those_that_mean_unknown() -> None:
    assert write_outcome(InvalidArgument("bad key")) is Outcome.FAILED
    assert write_outcome(RoutersUnreachable("nobody home")) is Outcome.FAILED
    for error in (DeadlineExceeded("late"), NoQuorum("2 of 3 down"), NoLeader("electing"), Unavailable("?"),
                  StaleSession("stale"), ShardnodeError("the client is closed")):
        assert write_outcome(error) is Outcome.UNKNOWN, error


def test_hot_keys_cover_every_group_of_the_shard_map_and_runs_do_not_share_keys() -> None:
    shard_map = ShardMap.build(4, 16)
    first = RegisterWorkload(["127.0.0.1:1"], shard_map=shard_map, hot_keys_per_group=3)
    second = RegisterWorkload(["127.0.0.1:1"], shard_map=shard_map, hot_keys_per_group=3)
    assert sorted(shard_map.group_for(k) for k in first.hot_keys) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert first.run_id != second.run_id and not set(first.hot_keys) & set(second.hot_keys)
    assert len(RegisterWorkload(["127.0.0.1:1"], hot_keys_per_group=2).hot_keys) == 16
    sets = SetWorkload(["127.0.0.1:1"], run_id="r1")
    assert sets.element_key(7) == b"set/r1/7"
    with pytest.raises(ValueError):
        SetWorkload([], clients=1)
    with pytest.raises(ValueError):
        SetWorkload(["127.0.0.1:1"], clients=0)


class _FakeClient:
    """Answers puts and gets from a dict, or raises the error it is given;
    `hold` blocks puts until set."""

    def __init__(self, error: ShardnodeError | None = None) -> None:
        self.data: dict[bytes, bytes] = {}
        self.error = error
        self.hold = threading.Event()
        self.hold.set()

    def put(self, key: bytes, value: bytes) -> bytes | None:
        self.hold.wait(5)
        if self.error is not None:
            raise self.error
        previous = self.data.get(key)
        self.data[key] = value
        return previous

    def get(self, key: bytes) -> bytes | None:
        if self.error is not None:
            raise self.error
        return self.data.get(key)


def test_the_register_workload_records_each_outcome_as_the_checkers_expect() -> None:
    load = RegisterWorkload(["127.0.0.1:1"], run_id="r", read_fraction=0.5, fresh_fraction=0.5)
    rng = random.Random(3)
    fine = _FakeClient()
    for sequence in range(1, 41):
        load._one_operation(fine, 1, sequence, rng)      # type: ignore[arg-type]
    for error, sequence in ((DeadlineExceeded("late"), 41), (RoutersUnreachable("nobody"), 42)):
        failing = _FakeClient(error)
        while True:     # until the RNG picks a put
            before = len(load.log)
            load._one_operation(failing, 1, sequence, rng)  # type: ignore[arg-type]
            if load.log.operations()[before].action is Action.PUT:
                break
    history = load.history()
    outcomes = [op.outcome for op in load.log.operations()]
    # The unknown put stays in the history without an end; the failed put and failed gets are left out.
    assert sum(op.return_time is None for op in history) == 1
    assert outcomes.count(Outcome.UNKNOWN) == 1 and outcomes.count(Outcome.FAILED) >= 1
    assert len({op.value for op in history if op.value is not None}) == sum(op.value is not None for op in history)
    assert check_registers(history, log=load.log).valid


def test_an_insert_still_in_flight_counts_as_unknown_not_as_a_probe() -> None:
    elements = SetWorkload(["127.0.0.1:1"], run_id="r")
    stuck = _FakeClient()
    stuck.hold.clear()
    thread = threading.Thread(target=elements._one_operation, args=(stuck, 1001, 1, random.Random(0)))
    thread.start()
    while not elements.attempts():
        threading.Event().wait(0.01)
    (pending,) = elements.attempts()
    assert (pending.key, pending.outcome, pending.end) == (b"set/r/0", Outcome.UNKNOWN, None)
    # Applied meanwhile and read back present: recovered, not a phantom.
    assert check_set(elements.attempts(), SetReadback({b"set/r/0": b"r/element/0"})).figures["recovered"] == 1
    stuck.hold.set()
    thread.join()
    (done,) = elements.attempts()
    assert done.outcome is Outcome.OK and done.end is not None
