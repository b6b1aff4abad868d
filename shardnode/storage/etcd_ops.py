"""etcd's operations as the state machine runs them (docs/etcd.md): a
transaction of compares, then puts, deletes and ranges, on keys of one group.

A transaction travels through the log as the value of a TXN command
(commands.py), msgpack::

    (1, epoch, compares, success, failure)
    compare: (key, target, result, operand)      operand: int, or bytes for VALUE
    op:      (PUT, key, value or nil, lease or nil, prev_kv)    nil: ignore_value / ignore_lease
             (DELETE, key, range_end, prev_kv)                  range_end b"": the key alone
             (RANGE, key, range_end, limit, keys_only, count_only)
             (REVOKE, lease)       delete every key of this group attached to the lease, and refuse
                                   the lease in this group's puts from then on (docs/etcd.md, "Leases")

`epoch` is the shard map epoch the router routed with: an op over a range
(range_end set) is refused unless the group's ownership has not changed
since (and no export of it is frozen), so that a range gathered from every
group sees each key in exactly one of them.

The answer is msgpack too, also stored as the session's answer so that a
retried transaction returns it again::

    (error, succeeded, revision, responses)       error "": none; else nothing was done
    response: (PUT, prev kv or nil) | (DELETE, deleted, prev kvs) | (RANGE, kvs, count, more)
              | (REVOKE, deleted)
    kv:       (key, create_revision, mod_revision, version, value, lease)

Decoding is a trust boundary (the bytes came through the log): anything
malformed is a TxnError, raised the same way on every replica.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgpack

from shardnode.errors import ShardnodeError

from .kv_records import KeyRecord

TXN_FORMAT_VERSION = 1
#: Operations (compares, success and failure together) one transaction may hold.
MAX_TXN_OPS = 128
_I64_MAX = (1 << 63) - 1


class TxnError(ShardnodeError, ValueError):
    """A transaction that is malformed."""


class CompareTarget(enum.IntEnum):
    # etcd's Compare.CompareTarget numbers.
    VERSION = 0
    CREATE = 1
    MOD = 2
    VALUE = 3
    LEASE = 4


class CompareResult(enum.IntEnum):
    # etcd's Compare.CompareResult numbers.
    EQUAL = 0
    GREATER = 1
    LESS = 2
    NOT_EQUAL = 3


class OpKind(enum.IntEnum):
    PUT = 0
    DELETE = 1
    RANGE = 2
    REVOKE = 3


@dataclass(slots=True, frozen=True)
class Compare:
    key: bytes
    target: CompareTarget
    result: CompareResult
    operand: int | bytes


@dataclass(slots=True, frozen=True)
class PutOp:
    key: bytes
    value: bytes | None          # None: ignore_value (keep the current value)
    lease: int | None            # None: ignore_lease (keep the current lease)
    prev_kv: bool = False


@dataclass(slots=True, frozen=True)
class DeleteOp:
    key: bytes
    range_end: bytes = b""       # b"": the key alone; b"\0": every key >= key; else [key, range_end)
    prev_kv: bool = False


@dataclass(slots=True, frozen=True)
class RangeOp:
    key: bytes
    range_end: bytes = b""
    limit: int = 0               # 0: no limit
    keys_only: bool = False
    count_only: bool = False


@dataclass(slots=True, frozen=True)
class RevokeOp:
    lease: int


Op = PutOp | DeleteOp | RangeOp | RevokeOp


@dataclass(slots=True, frozen=True)
class Txn:
    epoch: int
    compares: tuple[Compare, ...] = ()
    success: tuple[Op, ...] = ()
    failure: tuple[Op, ...] = ()

    def keys(self) -> list[bytes]:
        """The single keys it names (compares and ops without a range)."""
        keys = [c.key for c in self.compares]
        for op in self.success + self.failure:
            if not isinstance(op, RevokeOp) and not (isinstance(op, (DeleteOp, RangeOp)) and op.range_end):
                keys.append(op.key)
        return keys

    def has_ranges(self) -> bool:
        """Whether an op looks at every key of the group (a range, a revoke)."""
        return any(isinstance(op, RevokeOp) or (isinstance(op, (DeleteOp, RangeOp)) and op.range_end)
                   for op in self.success + self.failure)


# --- The answer -----------------------------------------------------------------------------

KV = tuple[bytes, int, int, int, bytes, int]     # (key, create, mod, version, value, lease)


@dataclass(slots=True, frozen=True)
class PutResponse:
    prev_kv: KV | None


@dataclass(slots=True, frozen=True)
class DeleteResponse:
    deleted: int
    prev_kvs: tuple[KV, ...]


@dataclass(slots=True, frozen=True)
class RangeResponse:
    kvs: tuple[KV, ...]
    count: int
    more: bool


@dataclass(slots=True, frozen=True)
class RevokeResponse:
    deleted: int


Response = PutResponse | DeleteResponse | RangeResponse | RevokeResponse


@dataclass(slots=True, frozen=True)
class TxnResult:
    error: str
    succeeded: bool
    revision: int
    responses: tuple[Response, ...] = ()


def kv_of(key: bytes, record: KeyRecord, keys_only: bool = False) -> KV:
    return (key, record.create_revision, record.mod_revision, record.version,
            b"" if keys_only else record.value, record.lease)


# --- Encoding -------------------------------------------------------------------------------

def _encode_op(op: Op) -> tuple:
    if isinstance(op, PutOp):
        return (OpKind.PUT, op.key, op.value, op.lease, op.prev_kv)
    if isinstance(op, DeleteOp):
        return (OpKind.DELETE, op.key, op.range_end, op.prev_kv)
    if isinstance(op, RevokeOp):
        return (OpKind.REVOKE, op.lease)
    return (OpKind.RANGE, op.key, op.range_end, op.limit, op.keys_only, op.count_only)


def encode_txn(txn: Txn) -> bytes:
    return msgpack.packb(
        (TXN_FORMAT_VERSION, txn.epoch,
         [(c.key, int(c.target), int(c.result), c.operand) for c in txn.compares],
         [_encode_op(op) for op in txn.success], [_encode_op(op) for op in txn.failure]),
        use_bin_type=True)


def _bytes(name: str, value: object, *, empty: bool = False) -> bytes:
    if type(value) is not bytes or (not empty and not value):
        raise TxnError(f"{name}: expected {'' if empty else 'non-empty '}bytes")
    return value


def _int(name: str, value: object) -> int:
    if type(value) is not int or not -_I64_MAX - 1 <= value <= _I64_MAX:
        raise TxnError(f"{name}: expected a 64-bit integer")
    return value


def _bool(name: str, value: object) -> bool:
    if type(value) is not bool:
        raise TxnError(f"{name}: expected a boolean")
    return value


def _decode_op(raw: object) -> Op:
    if type(raw) is not tuple or not raw or type(raw[0]) is not int:
        raise TxnError("op: expected (kind, ...)")
    kind = raw[0]
    if kind == OpKind.PUT and len(raw) == 5:
        _, key, value, lease, prev_kv = raw
        return PutOp(_bytes("put key", key), None if value is None else _bytes("put value", value, empty=True),
                     None if lease is None else _int("lease", lease), _bool("prev_kv", prev_kv))
    if kind == OpKind.DELETE and len(raw) == 4:
        _, key, range_end, prev_kv = raw
        return DeleteOp(_bytes("delete key", key), _bytes("range_end", range_end, empty=True), _bool("prev_kv", prev_kv))
    if kind == OpKind.RANGE and len(raw) == 6:
        _, key, range_end, limit, keys_only, count_only = raw
        limit = _int("limit", limit)
        if limit < 0:
            raise TxnError("limit: must not be negative")
        return RangeOp(_bytes("range key", key), _bytes("range_end", range_end, empty=True), limit,
                       _bool("keys_only", keys_only), _bool("count_only", count_only))
    if kind == OpKind.REVOKE and len(raw) == 2:
        lease = _int("lease", raw[1])
        if lease <= 0:
            raise TxnError("lease: must be positive")
        return RevokeOp(lease)
    raise TxnError(f"op: unknown kind {kind} or wrong length {len(raw)}")


def decode_txn(data: bytes) -> Txn:
    """TxnError (and nothing else) on anything that is not exactly a transaction."""
    try:
        fields = msgpack.unpackb(data, use_list=False, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise TxnError(f"not a msgpack document: {exc}") from None
    if type(fields) is not tuple or len(fields) != 5 or fields[0] != TXN_FORMAT_VERSION:
        raise TxnError("expected (version, epoch, compares, success, failure)")
    _, epoch, raw_compares, raw_success, raw_failure = fields
    if type(epoch) is not int or epoch < 0:
        raise TxnError("epoch: expected a non-negative integer")
    if not all(type(part) is tuple for part in (raw_compares, raw_success, raw_failure)):
        raise TxnError("compares, success and failure must be arrays")
    if len(raw_compares) + len(raw_success) + len(raw_failure) > MAX_TXN_OPS:
        raise TxnError(f"at most {MAX_TXN_OPS} compares and operations")
    compares = []
    for raw in raw_compares:
        if type(raw) is not tuple or len(raw) != 4:
            raise TxnError("compare: expected (key, target, result, operand)")
        key, target, result, operand = raw
        try:
            target, result = CompareTarget(target), CompareResult(result)
        except ValueError:
            raise TxnError(f"compare: unknown target {target!r} or result {result!r}") from None
        if target is CompareTarget.VALUE:
            operand = _bytes("compare value", operand, empty=True)
        else:
            operand = _int("compare operand", operand)
        compares.append(Compare(_bytes("compare key", key), target, result, operand))
    return Txn(epoch, tuple(compares), tuple(_decode_op(op) for op in raw_success),
               tuple(_decode_op(op) for op in raw_failure))


def encode_range(op: RangeOp) -> bytes:
    """A read's Range as the worker's RANGE operation carries it."""
    return msgpack.packb(_encode_op(op)[1:], use_bin_type=True)


def decode_range(data: bytes) -> RangeOp:
    try:
        fields = msgpack.unpackb(data, use_list=False, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise TxnError(f"not a msgpack document: {exc}") from None
    if type(fields) is not tuple:
        raise TxnError("expected (key, range_end, limit, keys_only, count_only)")
    op = _decode_op((int(OpKind.RANGE), *fields))
    assert isinstance(op, RangeOp)
    return op


def _encode_response(response: Response) -> tuple:
    if isinstance(response, PutResponse):
        return (OpKind.PUT, response.prev_kv)
    if isinstance(response, DeleteResponse):
        return (OpKind.DELETE, response.deleted, list(response.prev_kvs))
    if isinstance(response, RevokeResponse):
        return (OpKind.REVOKE, response.deleted)
    return (OpKind.RANGE, list(response.kvs), response.count, response.more)


def encode_result(result: TxnResult) -> bytes:
    return msgpack.packb((result.error, result.succeeded, result.revision,
                          [_encode_response(r) for r in result.responses]), use_bin_type=True)


def _kv(raw: object) -> KV:
    if type(raw) is not tuple or len(raw) != 6:
        raise TxnError("kv: expected (key, create, mod, version, value, lease)")
    return raw  # type: ignore[return-value]


def decode_result(data: bytes) -> TxnResult:
    """The answer of a transaction (from a worker: trusted, but checked for shape)."""
    try:
        error, succeeded, revision, raw_responses = msgpack.unpackb(data, use_list=False, raw=False)
        responses: list[Response] = []
        for raw in raw_responses:
            if raw[0] == OpKind.PUT:
                responses.append(PutResponse(None if raw[1] is None else _kv(raw[1])))
            elif raw[0] == OpKind.DELETE:
                responses.append(DeleteResponse(raw[1], tuple(_kv(kv) for kv in raw[2])))
            elif raw[0] == OpKind.REVOKE:
                responses.append(RevokeResponse(raw[1]))
            else:
                responses.append(RangeResponse(tuple(_kv(kv) for kv in raw[1]), raw[2], raw[3]))
    except TxnError:
        raise
    except Exception as exc:
        raise TxnError(f"not a transaction result: {exc}") from None
    return TxnResult(error, succeeded, revision, tuple(responses))


# --- Evaluation -----------------------------------------------------------------------------

def in_range(key: bytes, start: bytes, range_end: bytes) -> bool:
    """etcd's interval: range_end b"" is the key alone, b"\\0" every key >= start."""
    if not range_end:
        return key == start
    if range_end == b"\0":
        return key >= start
    return start <= key < range_end


def compare_holds(compare: Compare, record: KeyRecord | None) -> bool:
    """etcd's rule: an absent key has version, create and mod revision 0 and
    lease 0, and a VALUE compare on it is false."""
    target = compare.target
    if target is CompareTarget.VALUE:
        if record is None:
            return False
        actual: int | bytes = record.value
    elif record is None:
        actual = 0
    elif target is CompareTarget.VERSION:
        actual = record.version
    elif target is CompareTarget.CREATE:
        actual = record.create_revision
    elif target is CompareTarget.MOD:
        actual = record.mod_revision
    else:
        actual = record.lease
    operand = compare.operand
    result = compare.result
    if result is CompareResult.EQUAL:
        return actual == operand
    if result is CompareResult.NOT_EQUAL:
        return actual != operand
    if result is CompareResult.GREATER:
        return actual > operand  # type: ignore[operator]
    return actual < operand  # type: ignore[operator]


class TxnState:
    """What a transaction reads and writes, as the store gives it: `get(key)`,
    `scan(start, range_end)` (key, record) in key order among the keys the
    group serves, `put(key, record or None)`; for leases, `revoked(lease)`
    (refused in this group), `attached(lease)` (key, record) of the keys the
    group serves that carry it, and `revoke(lease)` (refuse it from now on)."""

    def __init__(self, get: Callable[[bytes], KeyRecord | None],
                 scan: Callable[[bytes, bytes], Iterator[tuple[bytes, KeyRecord]]],
                 put: Callable[[bytes, KeyRecord | None], None],
                 revoked: Callable[[int], bool] = lambda lease: False,
                 attached: Callable[[int], list[tuple[bytes, KeyRecord]]] = lambda lease: [],
                 revoke: Callable[[int], None] = lambda lease: None) -> None:
        self.get, self.scan, self.put = get, scan, put
        self.revoked, self.attached, self.revoke = revoked, attached, revoke


def run_txn(txn: Txn, state: TxnState, last_revision: int,
            revision_for: Callable[[int], int]) -> TxnResult:
    """Evaluate the compares, then run one branch's ops in order (each sees
    the writes of the ones before it). Every write of the transaction gets
    one revision, `revision_for(floor)` with `floor` the largest mod revision
    among the keys it changes plus one, asked only when something changes;
    the result's revision is that one, else `last_revision`. A put with
    ignore_value on an absent key fails the whole transaction (nothing done),
    as etcd's does."""
    succeeded = all(compare_holds(c, state.get(c.key)) for c in txn.compares)
    ops = txn.success if succeeded else txn.failure
    # First the keys that will change, for the revision's floor.
    floor = 0
    changes = False
    for op in ops:
        if isinstance(op, PutOp):
            record = state.get(op.key)
            if record is None and (op.value is None or op.lease is None):
                what = "ignore_value" if op.value is None else "ignore_lease"
                return TxnResult(f"etcdserver: key not found ({what} on an absent key)", succeeded, last_revision)
            if op.lease and state.revoked(op.lease):
                return TxnResult(f"etcdserver: requested lease not found (lease {op.lease} was revoked)",
                                 succeeded, last_revision)
            changes = True
            if record is not None:
                floor = max(floor, record.mod_revision + 1)
        elif isinstance(op, RevokeOp):
            for _, record in state.attached(op.lease):
                changes = True
                floor = max(floor, record.mod_revision + 1)
        elif isinstance(op, DeleteOp):
            for _, record in _matches(state, op.key, op.range_end):
                changes = True
                floor = max(floor, record.mod_revision + 1)
    revision = revision_for(floor) if changes else last_revision
    responses: list[Response] = []
    for op in ops:
        if isinstance(op, PutOp):
            old = state.get(op.key)
            value = op.value if op.value is not None else old.value      # type: ignore[union-attr]
            lease = op.lease if op.lease is not None else old.lease      # type: ignore[union-attr]
            if old is None:
                new = KeyRecord(value, revision, revision, 1, lease)
            else:
                new = KeyRecord(value, old.create_revision, revision, old.version + 1, lease)
            state.put(op.key, new)
            responses.append(PutResponse(kv_of(op.key, old) if op.prev_kv and old is not None else None))
        elif isinstance(op, DeleteOp):
            gone = list(_matches(state, op.key, op.range_end))
            for key, _ in gone:
                state.put(key, None)
            responses.append(DeleteResponse(len(gone), tuple(kv_of(k, r) for k, r in gone) if op.prev_kv else ()))
        elif isinstance(op, RevokeOp):
            gone = state.attached(op.lease)
            for key, _ in gone:
                state.put(key, None)
            state.revoke(op.lease)
            responses.append(RevokeResponse(len(gone)))
        else:
            responses.append(run_range(op, _matches(state, op.key, op.range_end)))
    return TxnResult("", succeeded, revision, tuple(responses))


def _matches(state: TxnState, key: bytes, range_end: bytes) -> Iterator[tuple[bytes, KeyRecord]]:
    if not range_end:
        record = state.get(key)
        if record is not None:
            yield key, record
        return
    yield from state.scan(key, range_end)


def run_range(op: RangeOp, matches: Iterator[tuple[bytes, KeyRecord]]) -> RangeResponse:
    """The first `limit` matches (all for 0), their count, and whether more
    matched than were returned. count_only returns no kvs but still counts."""
    kvs: list[KV] = []
    count = 0
    for key, record in matches:
        count += 1
        if not op.count_only and (not op.limit or len(kvs) < op.limit):
            kvs.append(kv_of(key, record, op.keys_only))
    more = bool(op.limit) and count > op.limit
    return RangeResponse(tuple(kvs), count, more)
