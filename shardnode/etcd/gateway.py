"""Carrying out etcd's operations through a router's routing (its shard
map, its forwarders to each group's leader, its sessions for exactly-once
retries): what both the etcd API (kv.py) and shardnode's own scan and
compare-and-set use (docs/etcd.md).

- One key, and a transaction whose keys all live in one group, is one
  operation of that group: atomic and linearizable. A transaction whose
  keys span groups is refused, naming the groups.
- A range (range_end set) is asked of every group of the shard map at once
  and merged; each group answers only if its ownership is not newer than
  the map the router used, so every key is read in exactly one group (the
  router reads the map again and starts over otherwise). Each group's part
  is linearizable; the whole is not one snapshot.
- A delete over a range is one transaction per group: atomic per group.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc

from ..placement.shard_map import ShardMap
from ..proto import worker_pb2 as wpb
from ..storage.etcd_ops import (
    DeleteOp,
    DeleteResponse,
    RangeResponse,
    Txn,
    TxnResult,
    decode_result,
    encode_range,
    encode_txn,
)
from .requests import EtcdError, RangePlan, merge_ranges

if TYPE_CHECKING:
    from ..routing.service import KVService

WOp = wpb.Operation
#: Operations that read (no session, any replica when stale reads are allowed).
_READS = (WOp.RANGE, WOp.LEASE_KEYS)


class Gateway:
    def __init__(self, core: KVService) -> None:
        self.core = core

    async def txn(self, make, keys: list[bytes], deadline: float,  # type: ignore[no-untyped-def]
                  session: tuple[int, int] = (0, 0)) -> TxnResult:
        """Run the transaction `make(epoch)` in the one group of `keys`
        (routed again while a key moves), with the caller's `session`
        (client id, sequence: the same for every retry), else a router one."""
        core = self.core
        while True:
            shard_map = core.shard_map
            group = _one_group(shard_map, keys)
            txn = make(shard_map.epoch)
            operation = WOp(kind=WOp.TXN, key=keys[0] if keys else b"\0", value=encode_txn(txn),
                            shard_epoch=shard_map.epoch, client_id=session[0], sequence=session[1])
            result = await core._forward(core.forwarders[group], operation, deadline, False)
            if not result.wrong_group:
                return answer_of(result)
            await core._await_newer_map(shard_map, group, deadline)

    async def tick(self, group: int, deadline: float) -> None:
        """An empty transaction in `group`: it changes nothing, but moves the
        group's clock, and so its closed revision (ReplicaStore.closed_revision),
        to now. A watch asks for it to release changes of other groups held
        back for an idle group."""
        core = self.core
        operation = WOp(kind=WOp.TXN, key=b"\0", value=encode_txn(Txn(core.shard_map.epoch)),
                        shard_epoch=core.shard_map.epoch)
        await core._forward(core.forwarders[group], operation, deadline, False)

    async def per_group(self, operation_for, deadline: float, allow_stale: bool = False,  # type: ignore[no-untyped-def]
                        decode=None):
        """Send `operation_for(epoch)` to every group of the shard map at
        once; their answers (`decode(result)`, a transaction's answer by
        default) once every group answered for the same map (read again, and
        everything sent again, when a group's ownership is newer than the map)."""
        decode = decode or answer_of
        core = self.core
        while True:
            shard_map = core.shard_map
            groups = list(shard_map.groups)
            calls = []
            for group in groups:
                operation = operation_for(shard_map.epoch)
                if operation.kind in _READS:
                    calls.append(core.forwarders[group].submit(operation, deadline, allow_stale))
                else:
                    calls.append(core._forward(core.forwarders[group], operation, deadline, False))
            results = await asyncio.gather(*calls)
            stale = [g for g, r in zip(groups, results) if r.wrong_group]
            if not stale:
                return [decode(r) for r in results]
            if allow_stale:
                # A replica read locally may lag behind the map: read at the leaders instead.
                allow_stale = False
                continue
            await core._await_newer_map(shard_map, stale[0], deadline)

    async def range(self, plan: RangePlan, deadline: float) -> tuple[RangeResponse, int]:
        op = plan.op
        if not op.range_end:
            # One key: its group alone (the others cannot hold it).
            core = self.core
            allow_stale = plan.serializable
            while True:
                shard_map = core.shard_map
                group = shard_map.group_for(op.key)
                operation = WOp(kind=WOp.RANGE, key=op.key, value=encode_range(op), shard_epoch=shard_map.epoch)
                result = await core.forwarders[group].submit(operation, deadline, allow_stale)
                if not result.wrong_group:
                    answer = answer_of(result)
                    response = answer.responses[0]
                    assert isinstance(response, RangeResponse)
                    return merge_ranges(plan, [response]), answer.revision
                if allow_stale:
                    allow_stale = False     # this host's replica may lag behind the map: ask the leader
                    continue
                await core._await_newer_map(shard_map, group, deadline)
        answers = await self.per_group(
            lambda epoch: WOp(kind=WOp.RANGE, key=op.key, value=encode_range(op), shard_epoch=epoch),
            deadline, plan.serializable)
        parts = [a.responses[0] for a in answers]
        return merge_ranges(plan, parts), max(a.revision for a in answers)  # type: ignore[arg-type]

    async def delete_range(self, op: DeleteOp, deadline: float) -> tuple[DeleteResponse, int]:
        answers = await self.per_group(
            lambda epoch: WOp(kind=WOp.TXN, key=op.key, value=encode_txn(Txn(epoch, success=(op,))),
                              shard_epoch=epoch),
            deadline)
        parts = [a.responses[0] for a in answers]
        deleted = sum(p.deleted for p in parts)                                     # type: ignore[union-attr]
        prev_kvs = tuple(sorted((kv for p in parts for kv in p.prev_kvs), key=lambda kv: kv[0]))  # type: ignore[union-attr]
        return DeleteResponse(deleted, prev_kvs), max(a.revision for a in answers)


def _one_group(shard_map: ShardMap, keys: list[bytes]) -> int:
    """The group of every key, or a refusal naming each key's group."""
    if not keys:
        return shard_map.groups[0]
    groups: dict[int, list[bytes]] = {}
    for key in keys:
        groups.setdefault(shard_map.group_for(key), []).append(key)
    if len(groups) == 1:
        return next(iter(groups))
    where = "; ".join(f"group {g}: {', '.join(repr(k) for k in ks[:4])}{' …' if len(ks) > 4 else ''}"
                      for g, ks in sorted(groups.items()))
    raise EtcdError(grpc.StatusCode.FAILED_PRECONDITION,
                    f"shardnode: a transaction's keys must all live in one group, these span {len(groups)} "
                    f"({where}); docs/etcd.md, Transactions")


def answer_of(result: wpb.OperationResult) -> TxnResult:
    if result.error:
        raise EtcdError(grpc.StatusCode.INVALID_ARGUMENT, result.error)
    answer = decode_result(result.value)
    if answer.error:
        code = grpc.StatusCode.NOT_FOUND if "key not found" in answer.error else grpc.StatusCode.INVALID_ARGUMENT
        raise EtcdError(code, answer.error)
    return answer
