"""What a worker audits, and how it summarizes it (shardnode/audit.py
writes the lines; docs/security.md, "Audit log"; a host's process control
audits its Control calls, host_agent.py).

- Every admin RPC (`security.ADMIN_METHODS`; one added there later
  is audited with the generic summary of its fields). ExportScan,
  ExportDelta and Shard's INGEST are the pages of a key-space move: the
  mover (placement/moves.py) sends one per 256 KiB of the moved ranges, as
  fast as they are answered, so a move of a gigabyte would be thousands of
  lines. Those are written at most once per 10 s per kind when they
  succeed (a line counts the calls it stands for); a failed one always is.
  The move's own steps (IMPORT_BEGIN, EXPORT_BEGIN, EXPORT_FREEZE, …) are
  Shard commands of other kinds, each written.
- The metadata group's workers, besides: an Execute that writes (PUT,
  DELETE, CAS) the shard map (group add and remove, the map flip of a move
  or a rebalance) or b"auth" (users and roles), with the key and the kind of
  write. Its other keys (moves, intents, the scheduler's lease and fence) are
  written by the routers' schedulers every few seconds: not audited.

A summary never holds a key's value, bulk data, or call metadata (where the
credentials travel): `describe_fields` leaves out bytes fields and those
whose name says they hold a secret.
"""

from __future__ import annotations

from typing import Any

import msgpack

from ..access.rules import AUTH_KEY
from ..audit import Audited, AuditRule, describe_answer, describe_fields, summarize_fields
from ..config import METADATA_GROUP
from ..placement.directory import SHARD_MAP_KEY
from ..proto import worker_pb2 as wpb
from ..security import ADMIN_METHODS
from ..storage.shard_commands import ShardOp

__all__ = ["AUDITED_METADATA_KEYS", "worker_rules"]

#: The metadata group's keys whose writes are audited.
AUDITED_METADATA_KEYS = frozenset({SHARD_MAP_KEY, AUTH_KEY})
_METADATA_WRITES = frozenset({wpb.Operation.PUT, wpb.Operation.DELETE, wpb.Operation.CAS})
_WORKER = "/shardnode.worker.Worker/"


def _transfer_leader(request: wpb.TransferLeaderRequest) -> Audited:
    target = request.target_node_id
    return Audited(f"target_node_id={target}" if target else "target_node_id=0 (the most up-to-date follower)")


def _export_page(request: Any) -> Audited:
    return Audited(describe_fields(request, skip=("cluster",)), bulk="page")


def _shard(request: wpb.ShardRequest) -> Audited:
    """The command's kind and move, its group, peer, epoch and fence; for an
    INGEST the number of keys it carries, not the keys. Read without
    building the command's data (a chunk is up to 256 KiB)."""
    unpacker = msgpack.Unpacker(raw=True, max_buffer_size=max(len(request.command), 1))
    unpacker.feed(request.command)
    length = unpacker.read_array_header()
    unpacker.skip()                                 # the format
    op = ShardOp(unpacker.unpack())
    parts = [f"group={request.group}", f"{op.name}", f"move={unpacker.unpack()}"]
    if op in (ShardOp.IMPORT_BEGIN, ShardOp.EXPORT_BEGIN):
        unpacker.read_array_header()
        parts.append(f"{'source' if op is ShardOp.IMPORT_BEGIN else 'target'}={unpacker.unpack()}")
        unpacker.skip()                             # the ranges
    elif op is ShardOp.INGEST:
        chunk = unpacker.read_array_header()
        for what in ("puts", "deletes", "sessions"):
            count = unpacker.read_array_header()
            for _ in range(count):
                unpacker.skip()
            parts.append(f"{what}={count}")
        parts.append("delta" if chunk == 4 and unpacker.unpack() is True else "copy")
    elif op in (ShardOp.IMPORT_ACTIVATE, ShardOp.EXPORT_FINISH):
        parts.append(f"epoch={unpacker.unpack()}")
    else:
        unpacker.skip()
    if length == 5:
        parts.append(f"fence={unpacker.unpack()}")
    return Audited(" ".join(parts), bulk="INGEST" if op is ShardOp.INGEST else None)


def _metadata_write(request: wpb.ExecuteRequest) -> Audited | None:
    """The operations that write an audited key (kind and key, not the
    value), None when there is none."""
    writes = [(position, operation) for position, operation in enumerate(request.operations)
              if operation.kind in _METADATA_WRITES and operation.key in AUDITED_METADATA_KEYS]
    if not writes:
        return None
    described = ", ".join(f"{wpb.Operation.Kind.Name(op.kind)} {op.key.decode()}" for _, op in writes)
    others = len(request.operations) - len(writes)
    summary = described + (f" (+{others} other operations)" if others else "")

    def answer(response: wpb.ExecuteResponse) -> str:
        # Whether each audited write took effect: a CAS may find the key changed.
        text = describe_answer(response)
        results = response.results
        for position, operation in writes:
            if position < len(results):
                result = results[position]
                if result.error:
                    done = result.error
                elif operation.kind == wpb.Operation.CAS:
                    done = "swapped" if result.swapped else "not swapped"
                else:
                    done = "done"
                text += f"; {operation.key.decode()}: {done}"
        return text

    return Audited(summary, answer=answer)


_WORKER_SUMMARIES = {
    "TransferLeader": _transfer_leader,
    "ChangeMembership": summarize_fields,
    "Retire": summarize_fields,
    "Shard": _shard,
    "ExportScan": _export_page,
    "ExportDelta": _export_page,
}


def worker_rules(group: int) -> dict[str, AuditRule]:
    """What a worker of `group` audits: every admin RPC, and on the metadata
    group the writes of the shard map and of b"auth"."""
    rules = {method: AuditRule(_WORKER_SUMMARIES.get(method.rsplit("/", 1)[-1], summarize_fields))
             for method in ADMIN_METHODS}
    if group == METADATA_GROUP:
        rules[_WORKER + "Execute"] = AuditRule(_metadata_write)
    return rules
