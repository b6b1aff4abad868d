"""etcdserverpb.KV on a router (docs/etcd.md): Range, Put, DeleteRange,
Txn and Compact, checked and translated by requests.py and carried out by
gateway.py through the router's routing."""

from __future__ import annotations

import time

import grpc

from ..config import ClusterConfig
from ..errors import DeadlineExceeded, InvalidArgument, PermissionDenied, Unavailable
from ..proto import etcd_rpc_pb2 as rpc
from ..proto import etcd_rpc_pb2_grpc as rpc_grpc
from ..access.rules import Grants
from ..routing.access import READ, WRITE, check
from ..routing.service import KVService
from ..storage.etcd_ops import DeleteResponse, PutOp, Txn
from .leases import Leases
from .header import Header
from .requests import EtcdError, Limits, delete_op, plan_range, put_op, range_response, response_op, txn_of

DEFAULT_TIMEOUT = 10.0


class EtcdKV(rpc_grpc.KVServicer):
    def __init__(self, cluster: ClusterConfig, core: KVService, header: Header, leases: Leases) -> None:
        self.cluster = cluster
        self.leases = leases
        self.gateway = core.gateway
        self.access = core.access
        self.header = header
        self.limits = Limits(cluster.max_key_bytes, cluster.max_value_bytes)

    # --- The RPCs ---------------------------------------------------------------------

    async def Range(self, request: rpc.RangeRequest, context: grpc.aio.ServicerContext) -> rpc.RangeResponse:
        try:
            plan = plan_range(request, self.limits)
            check(self.access.grants(context), READ, request.key, request.range_end)
            response, revision = await self.gateway.range(plan, deadline_of(context))
        except Exception as exc:  # every refusal and routing error, answered with its gRPC code
            await abort(context, exc)
        return range_response(self.header.make(revision), response)

    async def Put(self, request: rpc.PutRequest, context: grpc.aio.ServicerContext) -> rpc.PutResponse:
        try:
            op = put_op(request, self.limits)
            grants = self.access.grants(context)
            check(grants, WRITE, request.key)
            if request.prev_kv:
                check(grants, READ, request.key)
            if op.lease:
                await self.leases.check(op.lease, DEFAULT_TIMEOUT)
            result = await self.gateway.txn(lambda epoch: Txn(epoch, success=(op,)), [op.key], deadline_of(context))
        except Exception as exc:  # every refusal and routing error, answered with its gRPC code
            await abort(context, exc)
        header = self.header.make(result.revision)
        return response_op(header, result.responses[0]).response_put

    async def DeleteRange(self, request: rpc.DeleteRangeRequest,
                          context: grpc.aio.ServicerContext) -> rpc.DeleteRangeResponse:
        try:
            op = delete_op(request, self.limits)
            grants = self.access.grants(context)
            check(grants, WRITE, request.key, request.range_end)
            if request.prev_kv:
                check(grants, READ, request.key, request.range_end)
            deadline = deadline_of(context)
            if op.range_end:
                deleted, revision = await self.gateway.delete_range(op, deadline)
            else:
                result = await self.gateway.txn(lambda epoch: Txn(epoch, success=(op,)), [op.key], deadline)
                deleted, revision = result.responses[0], result.revision
        except Exception as exc:  # every refusal and routing error, answered with its gRPC code
            await abort(context, exc)
        assert isinstance(deleted, DeleteResponse)
        return response_op(self.header.make(revision), deleted).response_delete_range

    async def Txn(self, request: rpc.TxnRequest, context: grpc.aio.ServicerContext) -> rpc.TxnResponse:
        try:
            checked = txn_of(request, self.limits, 0)      # checked once before anything is routed
            check_txn(self.access.grants(context), request)
            keys = checked.keys()
            for lease in sorted({op.lease for op in checked.success + checked.failure
                                 if isinstance(op, PutOp) and op.lease}):
                await self.leases.check(lease, DEFAULT_TIMEOUT)
            result = await self.gateway.txn(lambda epoch: txn_of(request, self.limits, epoch), keys, deadline_of(context))
        except Exception as exc:  # every refusal and routing error, answered with its gRPC code
            await abort(context, exc)
        header = self.header.make(result.revision)
        return rpc.TxnResponse(header=header, succeeded=result.succeeded,
                               responses=[response_op(header, r) for r in result.responses])

    async def Compact(self, request: rpc.CompactionRequest, context: grpc.aio.ServicerContext) -> rpc.CompactionResponse:
        # Nothing to compact: no revision but each key's latest is kept.
        await context.abort(grpc.StatusCode.OUT_OF_RANGE,
                            "etcdserver: mvcc: required revision has been compacted (shardnode keeps no history: "
                            "every revision before a key's latest is compacted already, docs/etcd.md)")

def deadline_of(context: grpc.aio.ServicerContext) -> float:
    remaining = context.time_remaining()
    timeout = DEFAULT_TIMEOUT if remaining is None else max(0.0, remaining - min(0.05, remaining / 10))
    return time.monotonic() + timeout


def check_txn(grants: Grants | None, request: rpc.TxnRequest) -> None:
    """Every compare is a read; every operation of both branches needs its
    permission, whichever branch runs (as etcd checks a transaction)."""
    if grants is None:
        return
    for compare in request.compare:
        check(grants, READ, compare.key, compare.range_end)
    for op in (*request.success, *request.failure):
        kind = op.WhichOneof("request")
        if kind == "request_range":
            check(grants, READ, op.request_range.key, op.request_range.range_end)
        elif kind == "request_put":
            check(grants, WRITE, op.request_put.key)
            if op.request_put.prev_kv:
                check(grants, READ, op.request_put.key)
        elif kind == "request_delete_range":
            check(grants, WRITE, op.request_delete_range.key, op.request_delete_range.range_end)
            if op.request_delete_range.prev_kv:
                check(grants, READ, op.request_delete_range.key, op.request_delete_range.range_end)
        elif kind == "request_txn":
            check_txn(grants, op.request_txn)


#: etcd's own message: its clients recognise the error by it.
PERMISSION_DENIED = "etcdserver: permission denied"


async def abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    if isinstance(exc, PermissionDenied):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, PERMISSION_DENIED)
    if isinstance(exc, EtcdError):
        await context.abort(exc.code, exc.message)
    if isinstance(exc, InvalidArgument):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, DeadlineExceeded):
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
    if isinstance(exc, Unavailable):
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
