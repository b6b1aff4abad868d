"""etcd's request and response messages (etcdserverpb) to and from the
state machine's operations (storage/etcd_ops.py): what is checked, refused
or translated before anything is routed. Pure: no I/O, unit-tested.

Every refusal is an EtcdError carrying the gRPC code etcd itself would give
(or the nearest one for what only shardnode refuses) and a message that
names the cause; nothing was done when one is raised.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from ..proto import etcd_mvcc_pb2 as mvccpb
from ..proto import etcd_rpc_pb2 as rpc
from ..storage.etcd_ops import (
    KV,
    MAX_TXN_OPS,
    Compare,
    CompareResult,
    CompareTarget,
    DeleteOp,
    DeleteResponse,
    PutOp,
    PutResponse,
    RangeOp,
    RangeResponse,
    Response,
    Txn,
)


class EtcdError(Exception):
    """A refusal, answered to the client as `code` with `message`."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True, frozen=True)
class Limits:
    max_key_bytes: int
    max_value_bytes: int


# etcd's own messages, which clients match on.
KEY_NOT_PROVIDED = "etcdserver: key is not provided"
DUPLICATE_KEY = "etcdserver: duplicate key given in txn request"
TOO_MANY_OPS = "etcdserver: too many operations in txn request"
LEASE_NOT_FOUND = "etcdserver: requested lease not found"
COMPACTED = "etcdserver: mvcc: required revision has been compacted"


def check_key(key: bytes, limits: Limits) -> None:
    if not key:
        raise EtcdError(grpc.StatusCode.INVALID_ARGUMENT, KEY_NOT_PROVIDED)
    if len(key) > limits.max_key_bytes:
        raise EtcdError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"etcdserver: key is too large: {len(key)} bytes (at most {limits.max_key_bytes})")


def check_value(value: bytes, limits: Limits) -> None:
    if len(value) > limits.max_value_bytes:
        raise EtcdError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"etcdserver: request is too large: value of {len(value)} bytes "
                        f"(at most {limits.max_value_bytes})")


# --- Range -------------------------------------------------------------------------------

@dataclass(slots=True, frozen=True)
class RangePlan:
    """How the router gathers a Range: the op each group runs, then what it
    does with the merged kvs itself (sorting other than by key, filters),
    and the caller's limit (applied after those)."""

    op: RangeOp
    limit: int
    sort_target: int
    descend: bool
    filters: tuple[int, int, int, int]       # min/max mod revision, min/max create revision (0: none)
    serializable: bool
    count_only: bool                          # the caller's (the groups may return kvs to filter)

    @property
    def gathers_everything(self) -> bool:
        """Whether the groups must return every match (the router sorts or
        filters before the limit)."""
        return self.sort_target != rpc.RangeRequest.KEY or self.descend or any(self.filters)


def plan_range(request: rpc.RangeRequest, limits: Limits) -> RangePlan:
    check_key(request.key, limits)
    if request.revision > 0:
        raise EtcdError(grpc.StatusCode.OUT_OF_RANGE,
                        f"{COMPACTED} (shardnode keeps no history: only the latest revision of each key can be "
                        "read, docs/etcd.md)")
    if request.limit < 0:
        raise EtcdError(grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: limit must not be negative")
    descend = request.sort_order == rpc.RangeRequest.DESCEND
    filters = (request.min_mod_revision, request.max_mod_revision, request.min_create_revision,
               request.max_create_revision)
    gathers_everything = request.sort_target != rpc.RangeRequest.KEY or descend or any(filters)
    # Each group returns at most `limit` (and counts the rest) when the merge needs no more; it
    # returns kvs even for count_only when filters must look at them.
    group_limit = 0 if gathers_everything else request.limit
    group_count_only = request.count_only and not any(filters)
    op = RangeOp(request.key, request.range_end, group_limit, request.keys_only, group_count_only)
    return RangePlan(op, request.limit, request.sort_target, descend, filters, request.serializable,
                     request.count_only)


_SORT_KEYS = {
    rpc.RangeRequest.KEY: lambda kv: kv[0],
    rpc.RangeRequest.VERSION: lambda kv: (kv[3], kv[0]),
    rpc.RangeRequest.CREATE: lambda kv: (kv[1], kv[0]),
    rpc.RangeRequest.MOD: lambda kv: (kv[2], kv[0]),
    rpc.RangeRequest.VALUE: lambda kv: (kv[4], kv[0]),
}


def merge_ranges(plan: RangePlan, parts: Iterable[RangeResponse]) -> RangeResponse:
    """The groups' answers as one: kvs in the asked order, the caller's limit,
    the total count, and `more` when some match was left out."""
    kvs: list[KV] = []
    count = 0
    more = False
    for part in parts:
        kvs.extend(part.kvs)
        count += part.count
        more = more or part.more
    min_mod, max_mod, min_create, max_create = plan.filters
    if any(plan.filters):
        kvs = [kv for kv in kvs
               if (not min_mod or kv[2] >= min_mod) and (not max_mod or kv[2] <= max_mod)
               and (not min_create or kv[1] >= min_create) and (not max_create or kv[1] <= max_create)]
    kvs.sort(key=_SORT_KEYS.get(plan.sort_target, _SORT_KEYS[rpc.RangeRequest.KEY]), reverse=plan.descend)
    if plan.limit and len(kvs) > plan.limit:
        kvs = kvs[:plan.limit]
        more = True
    if plan.count_only:
        kvs = []
    return RangeResponse(tuple(kvs), count, more)


# --- Put, DeleteRange, Txn -------------------------------------------------------------

def put_op(request: rpc.PutRequest, limits: Limits) -> PutOp:
    check_key(request.key, limits)
    check_value(request.value, limits)
    if request.lease < 0:
        raise EtcdError(grpc.StatusCode.NOT_FOUND, LEASE_NOT_FOUND)
    if request.ignore_value and request.value:
        raise EtcdError(grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: value is provided")
    if request.ignore_lease and request.lease:
        raise EtcdError(grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: lease is provided")
    return PutOp(request.key, None if request.ignore_value else request.value,
                 None if request.ignore_lease else request.lease, request.prev_kv)


def delete_op(request: rpc.DeleteRangeRequest, limits: Limits) -> DeleteOp:
    check_key(request.key, limits)
    return DeleteOp(request.key, request.range_end, request.prev_kv)


def _compare(compare: rpc.Compare, limits: Limits) -> Compare:
    check_key(compare.key, limits)
    if compare.range_end:
        raise EtcdError(grpc.StatusCode.UNIMPLEMENTED,
                        "shardnode: a compare over a range of keys is not supported (docs/etcd.md, Transactions)")
    target = CompareTarget(compare.target)
    field = {CompareTarget.VERSION: "version", CompareTarget.CREATE: "create_revision",
             CompareTarget.MOD: "mod_revision", CompareTarget.VALUE: "value", CompareTarget.LEASE: "lease"}[target]
    operand = getattr(compare, field)
    return Compare(compare.key, target, CompareResult(compare.result), operand)


def _request_op(request: rpc.RequestOp, limits: Limits):  # type: ignore[no-untyped-def]
    kind = request.WhichOneof("request")
    if kind == "request_put":
        return put_op(request.request_put, limits)
    if kind == "request_delete_range":
        op = delete_op(request.request_delete_range, limits)
        if op.range_end:
            raise EtcdError(grpc.StatusCode.FAILED_PRECONDITION,
                            "shardnode: a delete over a range of keys inside a transaction is not supported: "
                            "a range spans every group (docs/etcd.md, Transactions)")
        return op
    if kind == "request_range":
        plan = plan_range(request.request_range, limits)
        if plan.op.range_end:
            raise EtcdError(grpc.StatusCode.FAILED_PRECONDITION,
                            "shardnode: a range of keys inside a transaction is not supported: a range spans "
                            "every group (docs/etcd.md, Transactions)")
        if plan.gathers_everything:
            raise EtcdError(grpc.StatusCode.UNIMPLEMENTED,
                            "shardnode: sorting or revision filters inside a transaction are not supported")
        return plan.op
    if kind == "request_txn":
        raise EtcdError(grpc.StatusCode.UNIMPLEMENTED,
                        "shardnode: a transaction inside a transaction is not supported (docs/etcd.md)")
    raise EtcdError(grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: a request op must hold a request")


def txn_of(request: rpc.TxnRequest, limits: Limits, epoch: int) -> Txn:
    """The transaction to run; refused if it is too large, writes a key
    twice in one branch (etcd refuses that too) or uses what is not
    supported. Whether its keys share a group is the router's check."""
    if len(request.compare) + len(request.success) + len(request.failure) > MAX_TXN_OPS:
        raise EtcdError(grpc.StatusCode.INVALID_ARGUMENT, f"{TOO_MANY_OPS} (at most {MAX_TXN_OPS})")
    compares = tuple(_compare(c, limits) for c in request.compare)
    success = tuple(_request_op(op, limits) for op in request.success)
    failure = tuple(_request_op(op, limits) for op in request.failure)
    for branch in (success, failure):
        written = [op.key for op in branch if isinstance(op, (PutOp, DeleteOp))]
        if len(written) != len(set(written)):
            raise EtcdError(grpc.StatusCode.INVALID_ARGUMENT, DUPLICATE_KEY)
    return Txn(epoch, compares, success, failure)


# --- Responses ---------------------------------------------------------------------------

def key_value(kv: KV) -> mvccpb.KeyValue:
    key, create, mod, version, value, lease = kv
    return mvccpb.KeyValue(key=key, create_revision=create, mod_revision=mod, version=version, value=value,
                           lease=lease)


def range_response(header: rpc.ResponseHeader, response: RangeResponse) -> rpc.RangeResponse:
    return rpc.RangeResponse(header=header, kvs=[key_value(kv) for kv in response.kvs], more=response.more,
                             count=response.count)


def response_op(header: rpc.ResponseHeader, response: Response) -> rpc.ResponseOp:
    if isinstance(response, PutResponse):
        put = rpc.PutResponse(header=header)
        if response.prev_kv is not None:
            put.prev_kv.CopyFrom(key_value(response.prev_kv))
        return rpc.ResponseOp(response_put=put)
    if isinstance(response, DeleteResponse):
        return rpc.ResponseOp(response_delete_range=rpc.DeleteRangeResponse(
            header=header, deleted=response.deleted, prev_kvs=[key_value(kv) for kv in response.prev_kvs]))
    return rpc.ResponseOp(response_range=range_response(header, response))
