"""Tests for the Wing–Gong/Lowe linearizability checker."""

from __future__ import annotations

import itertools
import random
import threading
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shardnode.testing.linearizability import (
    CheckResult,
    HistoryRecorder,
    Operation,
    OpKind,
    Verdict,
    check_history,
)

GET, PUT, DELETE = OpKind.GET, OpKind.PUT, OpKind.DELETE
K = b"k"


def op(
    client: int,
    kind: OpKind,
    call: float,
    ret: float | None,
    *,
    value: bytes | None = None,
    output: bytes | None = None,
    key: bytes = K,
) -> Operation:
    return Operation(client, kind, key, value, output, call, ret)


def put(c: int, v: bytes, out: bytes | None, call: float, ret: float | None, key: bytes = K) -> Operation:
    return op(c, PUT, call, ret, value=v, output=out, key=key)


def get(c: int, out: bytes | None, call: float, ret: float | None, key: bytes = K) -> Operation:
    return op(c, GET, call, ret, output=out, key=key)


def delete(c: int, out: bytes | None, call: float, ret: float | None, key: bytes = K) -> Operation:
    return op(c, DELETE, call, ret, output=out, key=key)


def assert_illegal(result: CheckResult, key: bytes = K) -> None:
    assert result.verdict is Verdict.ILLEGAL, result
    assert not result.ok
    assert result.key == key
    assert repr(key) in result.explanation
    assert "could not be placed" in result.explanation


# ---------------------------------------------------------------------------
# Hand-written histories
# ---------------------------------------------------------------------------


def test_empty_history_is_ok() -> None:
    result = check_history([])
    assert result.ok and result.verdict is Verdict.OK
    assert result.key is None and result.explanation == "" and result.checked_ops == 0


def test_sequential_history_is_ok() -> None:
    history = [
        get(1, None, 0, 1),
        put(1, b"a", None, 2, 3),
        get(2, b"a", 4, 5),
        put(2, b"b", b"a", 6, 7),
        delete(1, b"b", 8, 9),
        get(1, None, 10, 11),
        delete(2, None, 12, 13),
    ]
    result = check_history(history)
    assert result.ok
    assert result.checked_ops == len(history)


@pytest.mark.parametrize("first, second", [(b"a", b"b"), (b"b", b"a")])
def test_concurrent_writes_either_order_is_ok(first: bytes, second: bytes) -> None:
    # put(a) and put(b) overlap; readers may see them in either order.
    history = [
        put(1, b"a", None if first == b"a" else b"b", 0, 10),
        put(2, b"b", None if first == b"b" else b"a", 1, 9),
        get(3, first, 2, 3),
        get(3, second, 11, 12),
    ]
    assert check_history(history).ok


def test_touching_intervals_are_concurrent() -> None:
    # The get returns at 5, exactly when the put is called: they may be ordered
    # either way, so reading the put's value is allowed.
    history = [get(1, b"a", 0, 5), put(2, b"a", None, 5, 6)]
    assert check_history(history).ok
    # With integer times too, and a put that strictly follows is not visible.
    assert not check_history([get(1, b"a", 0, 4), put(2, b"a", None, 5, 6)]).ok


def test_stale_read_is_illegal() -> None:
    history = [
        put(1, b"a", None, 0, 1),
        put(1, b"b", b"a", 2, 3),
        get(2, b"a", 4, 5),  # b was written before this get started
    ]
    result = check_history(history)
    assert_illegal(result)
    assert "b'a'" in result.explanation and "#2" in result.explanation


def test_lost_write_is_illegal() -> None:
    history = [
        put(1, b"a", None, 0, 1),
        put(2, b"b", b"a", 2, 3),  # acknowledged...
        get(1, b"a", 4, 5),  # ...but later reads see the older value
        get(2, b"a", 6, 7),
    ]
    assert_illegal(check_history(history))


def test_put_with_wrong_previous_value_is_illegal() -> None:
    history = [put(1, b"a", None, 0, 1), put(2, b"b", b"x", 2, 3)]
    assert_illegal(check_history(history))


def test_delete_with_wrong_previous_value_is_illegal() -> None:
    history = [put(1, b"a", None, 0, 1), delete(2, None, 2, 3)]
    assert_illegal(check_history(history))
    history = [delete(2, b"a", 0, 1)]
    assert_illegal(check_history(history))


def test_read_of_value_never_written_is_illegal() -> None:
    history = [put(1, b"a", None, 0, 10), get(2, b"zzz", 1, 2)]
    result = check_history(history)
    assert_illegal(result)
    assert "b'zzz'" in result.explanation


def test_explanation_lists_ops_in_call_order_and_prefix() -> None:
    history = [
        get(3, b"b", 20, 21),
        put(1, b"a", None, 0, 1),
        put(2, b"b", b"a", 2, 3),
        delete(1, b"b", 4, 5),
    ]
    result = check_history(history)
    assert_illegal(result)
    text = result.explanation
    assert text.index("#0 client 1 put(b'a') -> None [0, 1]") < text.index("#3 client 3 get() -> b'b' [20, 21]")
    assert "Longest linearizable prefix reached (3 of 4 ops): #0, #1, #2" in text
    assert "Op #3 could not be placed" in text


def test_unknown_put_later_observed_is_ok() -> None:
    history = [
        put(1, b"a", None, 0, 1),
        put(2, b"b", None, 2, None),  # timed out
        get(3, b"a", 3, 4),
        get(3, b"b", 50, 51),
    ]
    assert check_history(history).ok


def test_unknown_put_never_observed_is_ok() -> None:
    history = [
        put(1, b"a", None, 0, 1),
        put(2, b"b", None, 2, None),
        get(3, b"a", 3, 4),
        get(3, b"a", 50, 51),
    ]
    assert check_history(history).ok


def test_unknown_put_observed_then_unobserved_is_illegal() -> None:
    history = [
        put(1, b"a", None, 0, 1),
        put(2, b"b", None, 2, None),
        get(3, b"b", 3, 4),
        get(3, b"a", 5, 6),  # no write could have restored a
    ]
    assert_illegal(check_history(history))


def test_unknown_delete_and_unknown_get() -> None:
    history = [
        put(1, b"a", None, 0, 1),
        delete(2, None, 2, None),
        get(3, None, 5, 6),  # the delete happened
        get(4, b"zzz", 7, None),  # unknown gets constrain nothing
        put(1, b"c", None, 8, 9),
    ]
    assert check_history(history).ok
    assert_illegal(check_history([*history, get(3, b"a", 10, 11)]))


def test_unknown_op_outputs_are_ignored() -> None:
    history = [put(1, b"a", b"garbage", 0, None), get(2, b"a", 1, 2)]
    assert check_history(history).ok


def test_illegal_key_among_many_legal_keys_is_named() -> None:
    history: list[Operation] = []
    for i in range(50):
        key = b"key-%d" % i
        history += [put(1, b"v%d" % i, None, 10 * i, 10 * i + 1, key), get(2, b"v%d" % i, 10 * i + 2, 10 * i + 3, key)]
    bad = b"key-37"
    history.append(get(3, b"nope", 1000, 1001, bad))
    result = check_history(history)
    assert_illegal(result, bad)
    assert "b'key-0'" not in result.explanation


def test_histories_with_float_and_int_times() -> None:
    assert check_history([put(1, b"a", None, 0.5, 1.25), get(2, b"a", 1.25, 2.0)]).ok
    assert check_history([put(1, b"a", None, 0, 1), get(2, b"a", 1, 2)]).ok


def test_invalid_operations_are_rejected() -> None:
    with pytest.raises(ValueError):
        check_history([get(1, None, 5, 4)])
    with pytest.raises(ValueError):
        check_history([op(1, PUT, 0, 1, value=None)])


def test_timeout_gives_unknown() -> None:
    result = check_history([put(1, b"a", None, 0, 1)], timeout=-1.0)
    assert result.verdict is Verdict.UNKNOWN
    assert result.key == K and not result.ok


def test_many_concurrent_reads_do_not_blow_up() -> None:
    # 60 overlapping reads of one value followed by a stale read: a search
    # without partial-order reduction would try all subsets of the reads.
    history = [put(1, b"a", None, 0, 1)]
    history += [get(100 + i, b"a", 2, 100) for i in range(60)]
    history += [put(2, b"b", b"a", 2, 100), get(3, b"a", 101, 102)]
    result = check_history(history, timeout=20)
    assert_illegal(result)


# ---------------------------------------------------------------------------
# Generated histories
# ---------------------------------------------------------------------------


@dataclass
class _Gen:
    """One generated op and when it really took effect (None: never)."""

    client: int
    kind: OpKind
    key: bytes
    value: bytes | None
    call: float
    lin: float | None
    ret: float | None
    output: bytes | None = None


def generate_history(
    rng: random.Random,
    *,
    clients: int,
    ops: int,
    keys: int,
    unknown_rate: float = 0.05,
    int_times: bool = False,
) -> list[_Gen]:
    """Run ops on a real atomic dict at a random point inside each interval."""

    def span(scale: float) -> float:
        return rng.randint(0, int(scale)) if int_times else rng.uniform(0, scale)

    clock = [0.0] * clients
    seq = itertools.count()
    gens: list[_Gen] = []
    for _ in range(ops):
        c = rng.randrange(clients)
        kind = rng.choices([GET, PUT, DELETE], weights=[45, 40, 15])[0]
        key = b"k%d" % rng.randrange(keys)
        value = b"c%d-%d" % (c, next(seq)) if kind is PUT else None
        call = clock[c] + span(3)
        lin: float | None = call + span(3)
        ret: float | None = lin + span(3)
        clock[c] = ret
        if rng.random() < unknown_rate:
            # Lost answer: it applied at any later time, or never.
            lin = call + span(40) if rng.random() < 0.5 else None
            ret = None
        gens.append(_Gen(c, kind, key, value, call, lin, ret))

    applied = [g for g in gens if g.lin is not None]
    rng.shuffle(applied)  # random order among equal instants
    applied.sort(key=lambda g: g.lin)
    store: dict[bytes, bytes] = {}
    for g in applied:
        if g.kind is GET:
            g.output = store.get(g.key)
        elif g.kind is PUT:
            g.output = store.get(g.key)
            store[g.key] = g.value  # type: ignore[assignment]
        else:
            g.output = store.pop(g.key, None)
    return gens


def to_operations(gens: list[_Gen]) -> list[Operation]:
    return [
        Operation(g.client, g.kind, g.key, g.value, g.output if g.ret is not None else None, g.call, g.ret)
        for g in gens
    ]


def impossible_read(rng: random.Random, gens: list[_Gen]) -> tuple[int, bytes] | None:
    """Pick a completed get and a value it can never have read (values are unique).

    Either a value whose put was called after the get returned, or the value
    of a completed put overwritten by a completed write that lies strictly
    between that put and the get.
    """
    choices: list[tuple[int, bytes]] = []
    for i, g in enumerate(gens):
        if g.kind is not GET or g.ret is None:
            continue
        writes = [w for w in gens if w.key == g.key and w.kind is not GET]
        for p in writes:
            if p.kind is not PUT:
                continue
            if p.call > g.ret:
                choices.append((i, p.value))  # type: ignore[arg-type]
            elif p.ret is not None and any(
                x.ret is not None and x.call > p.ret and x.ret < g.call for x in writes
            ):
                choices.append((i, p.value))  # type: ignore[arg-type]
    return rng.choice(choices) if choices else None


history_params = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**32 - 1),
        "clients": st.integers(1, 8),
        "ops": st.integers(1, 60),
        "keys": st.integers(1, 3),
        "int_times": st.booleans(),
        "unknown_rate": st.sampled_from([0.0, 0.1, 0.3]),
    }
)


@settings(max_examples=300, deadline=None)
@given(history_params)
def test_generated_linearizable_histories_are_ok(params: dict) -> None:
    rng = random.Random(params.pop("seed"))
    gens = generate_history(rng, **params)
    result = check_history(to_operations(gens))
    assert result.ok, result.explanation


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(history_params)
def test_generated_history_with_impossible_read_is_illegal(params: dict) -> None:
    rng = random.Random(params.pop("seed"))
    gens = generate_history(rng, **params)
    mutation = impossible_read(rng, gens)
    assume(mutation is not None)
    index, value = mutation  # type: ignore[misc]
    gens[index].output = value
    result = check_history(to_operations(gens))
    assert_illegal(result, gens[index].key)


def brute_force_linearizable(ops: list[Operation]) -> bool:
    """Independent reference: plain exhaustive search, no memo, no reduction.

    Completed ops must all be placed; unknown ops may be placed (any output)
    or left out.
    """
    n = len(ops)
    inf = float("inf")
    ends = [inf if o.return_time is None else o.return_time for o in ops]
    must_precede = [[j for j in range(n) if ends[j] < ops[i].call] for i in range(n)]

    def step(o: Operation, state: bytes | None) -> tuple[bool, bytes | None]:
        legal = o.return_time is None or o.output == state
        if o.kind is GET:
            return legal, state
        return legal, (o.value if o.kind is PUT else None)

    def search(placed: frozenset[int], skipped: frozenset[int], state: bytes | None) -> bool:
        if all(i in placed or i in skipped for i in range(n)):
            return True
        for i in range(n):
            if i in placed or i in skipped:
                continue
            if any(j not in placed and j not in skipped for j in must_precede[i]):
                continue
            legal, new = step(ops[i], state)
            if legal and search(placed | {i}, skipped, new):
                return True
        return False

    unknown = [i for i in range(n) if ops[i].return_time is None]
    for r in range(len(unknown) + 1):
        for dropped in itertools.combinations(unknown, r):
            if search(frozenset(), frozenset(dropped), None):
                return True
    return False


small_values = st.sampled_from([None, b"a", b"b"])


@st.composite
def random_small_history(draw: st.DrawFn) -> list[Operation]:
    n = draw(st.integers(1, 6))
    ops = []
    for i in range(n):
        kind = draw(st.sampled_from([GET, PUT, DELETE]))
        value = draw(st.sampled_from([b"a", b"b"])) if kind is PUT else None
        call = draw(st.integers(0, 6))
        unknown = draw(st.integers(0, 4)) == 0
        ret = None if unknown else call + draw(st.integers(0, 4))
        ops.append(Operation(i, kind, K, value, draw(small_values), call, ret))
    return ops


@settings(max_examples=400, deadline=None)
@given(random_small_history())
def test_agrees_with_brute_force(ops: list[Operation]) -> None:
    expected = brute_force_linearizable(ops)
    result = check_history(ops)
    assert result.ok == expected, (ops, result.explanation)
    if not expected:
        assert_illegal(result)


def random_unknown_heavy_history(rng: random.Random) -> list[Operation]:
    """Up to 8 crowded ops on one key, many with unknown outcomes, few values."""
    values = rng.choice([[b"a"], [b"a", b"b"], [b"a", b"b", b"c"]])
    unknown_rate = rng.choice([0.2, 0.4, 0.6])
    ops = []
    for i in range(rng.randint(1, 8)):
        kind = rng.choice([GET, PUT, PUT, DELETE])
        value = rng.choice(values) if kind is PUT else None
        call = rng.randint(0, 8)
        ret = None if rng.random() < unknown_rate else call + rng.randint(0, 5)
        ops.append(Operation(i, kind, K, value, rng.choice([None, *values]), call, ret))
    return ops


def test_agrees_with_brute_force_on_seeded_unknown_heavy_histories() -> None:
    # The pruning rules for unknown writes are subtle; a few thousand dense
    # cases against the exhaustive reference catch rare unsoundness.
    rng = random.Random(20240601)
    verdicts = set()
    for _ in range(2500):
        ops = random_unknown_heavy_history(rng)
        expected = brute_force_linearizable(ops)
        assert check_history(ops).ok == expected, ops
        verdicts.add(expected)
    assert verdicts == {True, False}


def test_seeded_high_concurrency_histories_are_ok() -> None:
    for seed in range(10):
        rng = random.Random(seed)
        gens = generate_history(rng, clients=20, ops=300, keys=1, unknown_rate=0.15)
        result = check_history(to_operations(gens), timeout=30)
        assert result.ok, (seed, result.explanation)


@pytest.mark.timeout(60)
def test_five_thousand_ops_over_fifty_keys() -> None:
    rng = random.Random(1234)
    gens = generate_history(rng, clients=10, ops=5000, keys=50, unknown_rate=0.02)
    ops = to_operations(gens)
    result = check_history(ops)
    assert result.ok, result.explanation
    assert result.checked_ops == 5000


# ---------------------------------------------------------------------------
# HistoryRecorder
# ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_recorder_stamps_times_from_clock() -> None:
    rec = HistoryRecorder(clock=FakeClock())
    h1 = rec.invoke(1, PUT, b"x", b"v")  # t=1
    h2 = rec.invoke(2, GET, b"x")  # t=2
    rec.ok(h1, None)  # t=3
    rec.ok(h2, b"v")  # t=4
    assert rec.operations() == [
        Operation(1, PUT, b"x", b"v", None, 1.0, 3.0),
        Operation(2, GET, b"x", None, b"v", 2.0, 4.0),
    ]
    assert check_history(rec.operations()).ok


def test_recorder_pending_become_unknown_and_failed_disappear() -> None:
    rec = HistoryRecorder(clock=FakeClock())
    pending = rec.invoke(1, PUT, b"x", b"a")
    lost = rec.invoke(2, DELETE, b"x")
    rejected = rec.invoke(3, PUT, b"x", b"b")
    rec.unknown(lost)
    rec.failed(rejected)
    ops = rec.operations()
    assert [o.client_id for o in ops] == [1, 2]
    assert all(o.return_time is None for o in ops)
    assert ops[0] == Operation(1, PUT, b"x", b"a", None, 1.0, None)
    with pytest.raises(ValueError):
        rec.ok(lost, None)
    with pytest.raises(KeyError):
        rec.ok(rejected, None)
    rec.ok(pending, None)
    assert rec.operations()[0].return_time is not None


def test_recorder_rejects_bad_values() -> None:
    rec = HistoryRecorder()
    with pytest.raises(ValueError):
        rec.invoke(1, PUT, b"x")
    with pytest.raises(ValueError):
        rec.invoke(1, GET, b"x", b"v")


def test_recorder_is_thread_safe() -> None:
    rec = HistoryRecorder()
    lock = threading.Lock()
    store: dict[bytes, bytes] = {}

    def client(cid: int) -> None:
        r = random.Random(cid)
        for i in range(200):
            key = b"k%d" % r.randrange(3)
            if r.random() < 0.5:
                h = rec.invoke(cid, GET, key)
                with lock:
                    out = store.get(key)
                rec.ok(h, out)
            else:
                v = b"%d-%d" % (cid, i)
                h = rec.invoke(cid, PUT, key, v)
                with lock:
                    out = store.get(key)
                    store[key] = v
                rec.ok(h, out)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ops = rec.operations()
    assert len(ops) == 1600
    assert check_history(ops).ok


def test_operation_is_frozen() -> None:
    o = get(1, None, 0, 1)
    with pytest.raises(AttributeError):
        o.call = 5  # type: ignore[misc]
    assert replace(o, call=0.5).call == 0.5
