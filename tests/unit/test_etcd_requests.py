"""etcd's requests to the state machine's operations and back
(shardnode/etcd/requests.py): what is planned, merged and refused."""

from __future__ import annotations

import grpc
import pytest

from shardnode.etcd.requests import EtcdError, Limits, merge_ranges, plan_range, put_op, txn_of
from shardnode.proto import etcd_rpc_pb2 as rpc
from shardnode.storage.etcd_ops import CompareTarget, DeleteOp, PutOp, RangeOp, RangeResponse

LIMITS = Limits(max_key_bytes=16, max_value_bytes=8)


def kv(key: bytes, mod: int = 1, create: int = 1, version: int = 1, value: bytes = b"v"):  # type: ignore[no-untyped-def]
    return (key, create, mod, version, value, 0)


def test_a_limit_in_key_order_is_asked_of_each_group_and_applied_once_merged() -> None:
    plan = plan_range(rpc.RangeRequest(key=b"a", range_end=b"z", limit=2), LIMITS)
    assert plan.op == RangeOp(b"a", b"z", 2)
    merged = merge_ranges(plan, [RangeResponse((kv(b"b"), kv(b"d")), 5, True),
                                 RangeResponse((kv(b"a"), kv(b"c")), 2, False)])
    assert [k[0] for k in merged.kvs] == [b"a", b"b"] and merged.count == 7 and merged.more


def test_other_orders_and_filters_gather_everything_first() -> None:
    plan = plan_range(rpc.RangeRequest(key=b"a", range_end=b"z", limit=1, sort_target=rpc.RangeRequest.MOD,
                                       sort_order=rpc.RangeRequest.DESCEND), LIMITS)
    assert plan.op.limit == 0
    merged = merge_ranges(plan, [RangeResponse((kv(b"a", mod=5), kv(b"b", mod=9)), 2, False),
                                 RangeResponse((kv(b"c", mod=7),), 1, False)])
    assert [k[0] for k in merged.kvs] == [b"b"] and merged.more
    filtered = plan_range(rpc.RangeRequest(key=b"a", range_end=b"z", min_mod_revision=6, count_only=True), LIMITS)
    assert not filtered.op.count_only                     # the groups must return kvs for the filter
    merged = merge_ranges(filtered, [RangeResponse((kv(b"a", mod=5), kv(b"b", mod=9)), 2, False)])
    assert merged.kvs == () and merged.count == 2


def test_a_past_revision_is_refused_as_compacted() -> None:
    with pytest.raises(EtcdError) as refused:
        plan_range(rpc.RangeRequest(key=b"a", revision=3), LIMITS)
    assert refused.value.code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in refused.value.message


@pytest.mark.parametrize("request_, code", [
    (rpc.PutRequest(key=b"", value=b"v"), grpc.StatusCode.INVALID_ARGUMENT),
    (rpc.PutRequest(key=b"k" * 17, value=b"v"), grpc.StatusCode.INVALID_ARGUMENT),
    (rpc.PutRequest(key=b"k", value=b"v" * 9), grpc.StatusCode.INVALID_ARGUMENT),
    (rpc.PutRequest(key=b"k", value=b"v", lease=-5), grpc.StatusCode.NOT_FOUND),
    (rpc.PutRequest(key=b"k", value=b"v", ignore_value=True), grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_puts_are_refused(request_: rpc.PutRequest, code: grpc.StatusCode) -> None:
    with pytest.raises(EtcdError) as refused:
        put_op(request_, LIMITS)
    assert refused.value.code == code


def test_put_ignore_flags_keep_the_current_value_and_lease() -> None:
    assert put_op(rpc.PutRequest(key=b"k", ignore_value=True, ignore_lease=True), LIMITS) == PutOp(b"k", None, None)


def test_a_transaction_is_translated_with_its_compares_and_branches() -> None:
    request = rpc.TxnRequest(
        compare=[rpc.Compare(key=b"k", target=rpc.Compare.MOD, result=rpc.Compare.GREATER, mod_revision=4),
                 rpc.Compare(key=b"k", target=rpc.Compare.VALUE, result=rpc.Compare.EQUAL, value=b"x")],
        success=[rpc.RequestOp(request_put=rpc.PutRequest(key=b"k", value=b"y", prev_kv=True)),
                 rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=b"j"))],
        failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=b"k"))])
    txn = txn_of(request, LIMITS, epoch=3)
    assert txn.epoch == 3 and [c.target for c in txn.compares] == [CompareTarget.MOD, CompareTarget.VALUE]
    assert txn.compares[0].operand == 4 and txn.compares[1].operand == b"x"
    assert txn.success == (PutOp(b"k", b"y", 0, True), DeleteOp(b"j")) and txn.failure == (RangeOp(b"k"),)
    assert sorted(set(txn.keys())) == [b"j", b"k"]


@pytest.mark.parametrize("request_, code", [
    (rpc.TxnRequest(success=[rpc.RequestOp(request_range=rpc.RangeRequest(key=b"a", range_end=b"b"))]),
     grpc.StatusCode.FAILED_PRECONDITION),
    (rpc.TxnRequest(success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=b"a", range_end=b"\0"))]),
     grpc.StatusCode.FAILED_PRECONDITION),
    (rpc.TxnRequest(success=[rpc.RequestOp(request_txn=rpc.TxnRequest())]), grpc.StatusCode.UNIMPLEMENTED),
    (rpc.TxnRequest(compare=[rpc.Compare(key=b"a", range_end=b"b")]), grpc.StatusCode.UNIMPLEMENTED),
    (rpc.TxnRequest(success=[rpc.RequestOp(request_put=rpc.PutRequest(key=b"a")),
                             rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=b"a"))]),
     grpc.StatusCode.INVALID_ARGUMENT),
    (rpc.TxnRequest(success=[rpc.RequestOp(request_put=rpc.PutRequest(key=b"k%d" % i)) for i in range(129)]),
     grpc.StatusCode.INVALID_ARGUMENT),
])
def test_unsupported_or_invalid_transactions_are_refused(request_: rpc.TxnRequest, code: grpc.StatusCode) -> None:
    with pytest.raises(EtcdError) as refused:
        txn_of(request_, LIMITS, epoch=1)
    assert refused.value.code == code
