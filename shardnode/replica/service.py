"""The gRPC service a worker offers the routers (proto/worker.proto): batched
operations for its group, status, and leadership transfer."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import msgpack

from ..errors import DeadlineExceeded, NotLeader, Unavailable
from ..limits import refuse
from ..proto import worker_pb2 as pb
from ..proto import worker_pb2_grpc as pb_grpc
from ..raft import ConfChange, ConfState, InvalidConfChange, StateRole
from ..keyspace import KeySpaceError, RangeSet
from ..storage import Command, CommandError, CommandOp, StorageError, StoreBusy
from ..storage.commands import MAX_GUARDS
from ..etcd.lease_records import LEASE_PREFIX, LEASE_PREFIX_END, LeaseRecord, decode_lease, lease_of_key
from ..storage.etcd_ops import RangeOp, TxnError, TxnResult, decode_range, encode_result
from ..storage.shard_commands import SHARD_FORMAT, ShardOp, ShardResult, shard_command_from_fields
from .driver import ReplicaDriver
from .identity import observe_group
from .watch_hub import Compacted, Lagging, encode_changes

log = logging.getLogger("shardnode.replica.service")

# Used when the caller set no deadline: a request must never hang.
DEFAULT_TIMEOUT = 10.0
Op = pb.Operation
_OP_NAMES = {Op.GET: "get", Op.PUT: "put", Op.DELETE: "delete", Op.CAS: "cas", Op.TXN: "txn", Op.RANGE: "range",
             Op.LEASE_KEYS: "lease_keys",
             Op.LEASE_KEEPALIVE: "lease_keepalive", Op.LEASE_STATUS: "lease_status",
             Op.LEASES_EXPIRED: "leases_expired"}
_WRITE_OPS = {Op.PUT: CommandOp.PUT, Op.DELETE: CommandOp.DELETE, Op.CAS: CommandOp.CAS, Op.TXN: CommandOp.TXN}
_READ_OPS = (Op.GET, Op.RANGE, Op.LEASE_KEYS)
_LEASE_OPS = (Op.LEASE_KEEPALIVE, Op.LEASE_STATUS, Op.LEASES_EXPIRED)
_VALUED_OPS = (Op.PUT, Op.CAS, Op.TXN, Op.RANGE, Op.LEASE_KEYS)
#: A transaction carries several values (the router checks each one's size).
MAX_TXN_VALUES = 4
ShardStatus = pb.ShardResponse
#: A watch stream says how far it got at least this often when nothing changes,
#: unless the watcher asks for less often (WatchRequest.progress_ms), up to the longest.
WATCH_PROGRESS_SECONDS = 0.2
LONGEST_WATCH_PROGRESS_SECONDS = 60.0
#: Largest page of an export scan or delta.
MAX_SCAN_BYTES = 4 << 20


class WorkerService(pb_grpc.WorkerServicer):
    def __init__(self, driver: ReplicaDriver) -> None:
        self.driver = driver
        self.cluster = driver.cluster

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        if remaining is None:
            return DEFAULT_TIMEOUT
        # limits.max_timeout_ms: no caller holds a request here longer.
        return max(0.0, min(remaining, self.cluster.limits.max_timeout_seconds) - 0.005)

    def _validate(self, request: pb.ExecuteRequest) -> str:
        """An explanation of the first invalid operation, or "" if all are valid."""
        limits = self.cluster
        for position, op in enumerate(request.operations):
            if not 1 <= len(op.key) <= limits.max_key_bytes:
                return f"operation {position}: key must be 1..{limits.max_key_bytes} bytes (got {len(op.key)})"
            if op.kind not in _OP_NAMES:
                return f"operation {position}: unknown kind {op.kind}"
            largest = limits.max_value_bytes * (MAX_TXN_VALUES if op.kind == Op.TXN else 1)
            if op.kind in _VALUED_OPS and len(op.value) > largest:
                return f"operation {position}: value must be at most {largest} bytes (got {len(op.value)})"
            if op.kind not in _VALUED_OPS and op.value:
                return f"operation {position}: only PUT, CAS, TXN and RANGE carry a value"
            if op.kind != Op.CAS and (op.expected or op.expected_absent or op.guards):
                return f"operation {position}: only CAS compares"
            if len(op.guards) > MAX_GUARDS:
                return f"operation {position}: at most {MAX_GUARDS} guards"
            if any(not 1 <= len(g.key) <= limits.max_key_bytes for g in op.guards):
                return f"operation {position}: a guard's key must be 1..{limits.max_key_bytes} bytes"
        return ""

    async def Execute(self, request: pb.ExecuteRequest, context: grpc.aio.ServicerContext) -> pb.ExecuteResponse:
        began = time.perf_counter()
        try:
            response = await self._execute(request, context)
        except BaseException:
            self.driver.metrics.count_error("DEADLINE_EXCEEDED")
            raise
        metrics = self.driver.metrics
        if response.status == pb.ExecuteResponse.OK:
            elapsed = time.perf_counter() - began
            for op in request.operations:
                metrics.observe_request(_OP_NAMES.get(op.kind, "unknown"), elapsed)
        else:
            metrics.count_error(pb.ExecuteResponse.Status.Name(response.status))
        return response

    async def Metrics(self, request: pb.MetricsRequest, context: grpc.aio.ServicerContext) -> pb.MetricsResponse:
        return pb.MetricsResponse(text=self.driver.metrics.exposition())

    async def _execute(self, request: pb.ExecuteRequest, context: grpc.aio.ServicerContext) -> pb.ExecuteResponse:
        driver = self.driver
        if request.cluster != self.cluster.name or request.group != driver.group:
            return pb.ExecuteResponse(
                status=pb.ExecuteResponse.WRONG_GROUP,
                message=f"this worker serves cluster {self.cluster.name!r} group {driver.group}, "
                f"not cluster {request.cluster!r} group {request.group}",
            )
        count, limit = len(request.operations), self.cluster.limits.max_batch_operations
        if count > limit:
            # Before anything is validated or proposed: a refusal changes nothing.
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                str(refuse("max_batch_operations", limit, f"{count} operations")))
        problem = self._validate(request)
        if problem:
            return pb.ExecuteResponse(status=pb.ExecuteResponse.INVALID_ARGUMENT, message=problem)
        timeout = self._timeout(context)
        results: list[pb.OperationResult | None] = [None] * len(request.operations)
        writes = [(i, op) for i, op in enumerate(request.operations) if op.kind not in _READ_OPS + _LEASE_OPS]
        reads = [(i, op) for i, op in enumerate(request.operations) if op.kind in _READ_OPS]
        leases = [(i, op) for i, op in enumerate(request.operations) if op.kind in _LEASE_OPS]
        try:
            if leases:
                await self._leases(leases, results, timeout)
            if request.allow_stale:
                for i, op in reads:
                    results[i] = await self._read_one(op)
                reads = []
            jobs = []
            if writes:
                jobs.append(self._write(writes, results, timeout))
            if reads:
                jobs.append(self._read(reads, results, timeout))
            outcomes = await asyncio.gather(*jobs, return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        except NotLeader as exc:
            return pb.ExecuteResponse(
                status=pb.ExecuteResponse.NOT_LEADER, message=str(exc),
                leader_id=exc.leader_id, leader_address=exc.leader_address,
            )
        except Unavailable as exc:
            lead, address = driver.leader_hint()
            return pb.ExecuteResponse(status=pb.ExecuteResponse.UNAVAILABLE, message=str(exc),
                                      leader_id=lead, leader_address=address)
        except DeadlineExceeded as exc:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        return pb.ExecuteResponse(status=pb.ExecuteResponse.OK, results=results,
                                  shard_epoch=driver.store.shard_state.version)

    async def _write(self, writes, results, timeout: float) -> None:
        now_ms = int(time.time() * 1000)
        commands = [
            Command(
                op=_WRITE_OPS[op.kind],
                key=op.key,
                value=None if op.kind == Op.DELETE else op.value,
                client_id=op.client_id,
                sequence=op.sequence,
                timestamp_ms=now_ms,
                expected=None if op.kind != Op.CAS or op.expected_absent else op.expected,
                guards=tuple((g.key, None if g.absent else g.value) for g in op.guards),
            )
            for _, op in writes
        ]
        applied = await self.driver.write(commands, timeout)
        for (i, _), result in zip(writes, applied):
            if result.stale:
                results[i] = pb.OperationResult(
                    duplicate=True, error="stale sequence number: a newer request of this session was already applied"
                )
            elif result.wrong_group:
                self.driver.metrics.wrong_group.inc()
                results[i] = _WRONG_GROUP
            else:
                results[i] = pb.OperationResult(
                    existed=result.existed, value=result.old_value or b"", duplicate=result.duplicate,
                    swapped=result.swapped,
                )

    async def _read(self, reads, results, timeout: float) -> None:
        await self.driver.read_barrier(timeout)
        for i, op in reads:
            results[i] = await self._read_one(op)

    async def _read_one(self, op: pb.Operation) -> pb.OperationResult:
        # Ownership as of the applied index, which the read barrier brought
        # past every change acknowledged before the read began.
        if op.kind == Op.RANGE:
            return await self._range(op)
        if op.kind == Op.LEASE_KEYS:
            return await self._lease_keys(op)
        key = op.key
        if not self.driver.store.owns(key):
            self.driver.metrics.wrong_group.inc()
            return _WRONG_GROUP
        return _read_result(self.driver.read_local(key))

    async def _leases(self, ops, results, timeout: float) -> None:
        """The lease clock's answers: on the leader only, after a read barrier
        (the records it reads are then those of every grant acknowledged)."""
        driver = self.driver
        await driver.read_barrier(timeout)          # NotLeader on any other replica
        term = driver.node.raft.term
        now = time.monotonic()
        for i, op in ops:
            if op.kind == Op.LEASES_EXPIRED:
                records = await asyncio.to_thread(_lease_records, driver.store)
                results[i] = pb.OperationResult(existed=True, value=msgpack.packb(
                    (driver.lease_clock.expired(term, records, now), len(records))))
                continue
            lease = lease_of_key(op.key)
            raw = driver.read_local(op.key)
            record = None if raw is None or lease is None else decode_lease(raw)
            if op.kind == Op.LEASE_KEEPALIVE:
                answer = driver.lease_clock.keep_alive(term, lease or 0, record, now)
            else:
                granted = 0 if record is None else record.ttl
                answer = (driver.lease_clock.remaining(term, lease or 0, record, now), granted)
            results[i] = pb.OperationResult(existed=record is not None, value=msgpack.packb(answer))

    async def _lease_keys(self, op: pb.Operation) -> pb.OperationResult:
        if len(op.value) != 8:
            return pb.OperationResult(error="malformed lease keys request: the lease id is 8 bytes")
        driver = self.driver
        try:
            keys = await asyncio.to_thread(driver.store.lease_keys, int.from_bytes(op.value, "big"), op.shard_epoch)
        except StoreBusy as exc:
            raise Unavailable(str(exc)) from None
        if keys is None:
            driver.metrics.wrong_group.inc()
            return _WRONG_GROUP
        return pb.OperationResult(existed=True, value=msgpack.packb(keys, use_bin_type=True))

    async def _range(self, op: pb.Operation) -> pb.OperationResult:
        try:
            range_op = decode_range(op.value)
        except TxnError as exc:
            return pb.OperationResult(error=f"malformed range: {exc}")
        scanned = await self.driver.scan_local(range_op, op.shard_epoch)
        if scanned is None:
            self.driver.metrics.wrong_group.inc()
            return _WRONG_GROUP
        response, revision = scanned
        return pb.OperationResult(existed=True, value=encode_result(TxnResult("", True, revision, (response,))))

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        driver = self.driver
        status = driver.node.status()
        stats = driver.stats
        conf = driver.node.conf_state()
        identity = driver.store.identity
        role = status.role.name.lower()
        if driver.node_id in conf.learners:
            role = "learner"
        return pb.StatusResponse(
            cluster=self.cluster.name,
            group=driver.group,
            node_id=driver.node_id,
            host=driver.replica.host.name,
            term=status.term,
            role=role,
            leader_id=status.lead,
            commit_index=status.commit,
            applied_index=driver.store.applied_index,
            first_index=driver.store.first_index(),
            last_index=status.last_index,
            peers=[
                pb.PeerProgress(node_id=nid, match=p.match, next=p.next_index, state=p.state.name.lower(),
                                recent_active=p.recent_active, is_learner=p.is_learner, caught_up=p.caught_up)
                for nid, p in sorted(status.progress.items())
            ],
            snapshots_sent=stats.snapshots_sent,
            snapshots_received=stats.snapshots_received,
            snapshots_taken=stats.snapshots_taken,
            snapshot_send_seconds=stats.snapshot_send_seconds,
            snapshot_receive_seconds=stats.snapshot_receive_seconds,
            members=_members(conf, driver),
            removed=list(conf.removed),
            cluster_id=identity.cluster_id,
            group_incarnation=identity.group_incarnation,
            incarnation=identity.incarnation,
            quiesced=status.quiesced,
        )

    async def TransferLeader(self, request: pb.TransferLeaderRequest, context) -> pb.TransferLeaderResponse:
        driver = self.driver
        if driver.node.raft.role is not StateRole.LEADER:
            lead, _ = driver.leader_hint()
            return pb.TransferLeaderResponse(ok=False, leader_id=lead, message="not the leader")
        ok = await driver.transfer_leadership(self._timeout(context), target=request.target_node_id)
        lead, _ = driver.leader_hint()
        return pb.TransferLeaderResponse(ok=ok, leader_id=lead, message="" if ok else "transfer did not complete")


    async def ChangeMembership(self, request: pb.ChangeMembershipRequest, context) -> pb.ChangeMembershipResponse:
        Status = pb.ChangeMembershipResponse
        Kind = pb.ChangeMembershipRequest
        driver = self.driver
        if request.kind == Kind.ADD_LEARNER:
            if not request.host or not request.address:
                return Status(status=Status.REFUSED, message="ADD_LEARNER needs the new member's host and address")
            change = ConfChange.add_learner(request.node_id, request.host, request.address)
        elif request.kind == Kind.PROMOTE:
            change = ConfChange.promote(request.node_id)
        elif request.kind == Kind.REMOVE:
            change = ConfChange.remove(request.node_id)
        else:
            return Status(status=Status.REFUSED, message=f"unknown change kind {request.kind}")
        expected = ((tuple(request.expected_voters), tuple(request.expected_learners))
                    if request.check_expected else None)
        try:
            conf = await driver.change_membership(change, self._timeout(context), fence=request.fence,
                                                  expected=expected)
        except InvalidConfChange as exc:
            return Status(status=Status.REFUSED, message=str(exc))
        except NotLeader as exc:
            return Status(status=Status.NOT_LEADER, message=str(exc), leader_id=exc.leader_id,
                          leader_address=exc.leader_address)
        except (Unavailable, DeadlineExceeded) as exc:
            lead, address = driver.leader_hint()
            return Status(status=Status.RETRY, message=str(exc), leader_id=lead, leader_address=address)
        return Status(status=Status.OK, members=_members(conf, driver), removed=list(conf.removed))

    async def Retire(self, request: pb.RetireRequest, context) -> pb.RetireResponse:
        driver = self.driver
        if request.node_id != driver.node_id:
            return pb.RetireResponse(ok=False, message=f"this is node {driver.node_id}, not {request.node_id}")
        if not driver.removed.is_set():
            # The removal may be committed without this replica having heard
            # of it: the group's leader is the authority.
            view = await observe_group(self.cluster, driver.group, driver.replica.host.name,
                                       exclude=driver.replica.address,
                                       timeout=min(2.0, self._timeout(context)))
            if view is None or driver.node_id not in view.conf.removed:
                return pb.RetireResponse(ok=False, message=f"node {driver.node_id} is still a member of group "
                                                           f"{driver.group}; remove it first")
            driver.removed.set()
        return pb.RetireResponse(ok=True, message=f"node {driver.node_id} retires: its data is deleted")


    # --- Moving key space (docs/sharding.md) ----------------------------------------------

    def _shard_leader_problem(self, cluster: str, group: int):  # type: ignore[no-untyped-def]
        """(status, message, leader id, leader address) if this replica cannot
        serve a move request now, else None."""
        driver = self.driver
        if cluster != self.cluster.name or group != driver.group:
            return (ShardStatus.REFUSED, f"this worker serves cluster {self.cluster.name!r} group {driver.group}",
                    0, "")
        if not driver.is_leader:
            lead, address = driver.leader_hint()
            return ShardStatus.NOT_LEADER, "not the leader", lead, address
        return None

    async def Shard(self, request: pb.ShardRequest, context) -> pb.ShardResponse:
        problem = self._shard_leader_problem(request.cluster, request.group)
        if problem is not None:
            status, message, lead, address = problem
            return pb.ShardResponse(status=status, message=message, leader_id=lead, leader_address=address)
        try:
            fields = msgpack.unpackb(request.command, use_list=False, raw=False)
            if type(fields) is not tuple or not fields or fields[0] != SHARD_FORMAT:
                raise CommandError("not a shard command")
            command = shard_command_from_fields(fields)    # validated here: a refusal before it enters the log
        except Exception as exc:       # msgpack's several error types, CommandError
            return pb.ShardResponse(status=ShardStatus.REFUSED, message=f"malformed shard command: {exc}")
        try:
            (result,) = await self.driver.propose([request.command], self._timeout(context))
        except NotLeader as exc:
            return pb.ShardResponse(status=ShardStatus.NOT_LEADER, message=str(exc), leader_id=exc.leader_id,
                                    leader_address=exc.leader_address)
        except (Unavailable, DeadlineExceeded) as exc:
            lead, address = self.driver.leader_hint()
            return pb.ShardResponse(status=ShardStatus.RETRY, message=str(exc), leader_id=lead,
                                    leader_address=address)
        if not isinstance(result, ShardResult):
            return pb.ShardResponse(status=ShardStatus.REFUSED, message="the command was not applied as a shard command")
        if result.ok and command.op is ShardOp.INGEST:
            self.driver.metrics.count_moved("in", list(command.puts))
        return pb.ShardResponse(status=ShardStatus.OK if result.ok else ShardStatus.REFUSED, message=result.message)

    async def _barrier_for_export(self, cluster: str, group: int, context):  # type: ignore[no-untyped-def]
        """None once this leader's state includes everything committed before
        the call, else (status, message, leader id, address)."""
        problem = self._shard_leader_problem(cluster, group)
        if problem is not None:
            return problem
        try:
            await self.driver.read_barrier(self._timeout(context))
        except NotLeader as exc:
            return ShardStatus.NOT_LEADER, str(exc), exc.leader_id, exc.leader_address
        except (Unavailable, DeadlineExceeded) as exc:
            lead, address = self.driver.leader_hint()
            return ShardStatus.RETRY, str(exc), lead, address
        return None

    async def ExportScan(self, request: pb.ExportScanRequest, context) -> pb.ExportScanResponse:
        try:
            ranges = _ranges(request.ranges)
        except KeySpaceError as exc:
            return pb.ExportScanResponse(status=ShardStatus.REFUSED, message=str(exc))
        problem = await self._barrier_for_export(request.cluster, request.group, context)
        if problem is not None:
            status, message, lead, address = problem
            return pb.ExportScanResponse(status=status, message=message, leader_id=lead, leader_address=address)
        max_bytes = max(1, min(request.max_bytes or MAX_SCAN_BYTES, MAX_SCAN_BYTES))
        after = None if request.from_start else request.after
        try:
            records, next_after = await asyncio.to_thread(self.driver.store.export_scan, ranges, after, max_bytes)
        except ValueError as exc:
            return pb.ExportScanResponse(status=ShardStatus.REFUSED, message=str(exc))
        except StorageError as exc:
            return pb.ExportScanResponse(status=ShardStatus.RETRY, message=str(exc))
        self.driver.metrics.count_moved("out", records)
        return pb.ExportScanResponse(
            status=ShardStatus.OK, records=[pb.KeyValue(key=k, value=v) for k, v in records],
            next_after=next_after or b"", done=next_after is None,
        )

    async def ExportDelta(self, request: pb.ExportDeltaRequest, context) -> pb.ExportDeltaResponse:
        problem = await self._barrier_for_export(request.cluster, request.group, context)
        if problem is not None:
            status, message, lead, address = problem
            return pb.ExportDeltaResponse(status=status, message=message, leader_id=lead, leader_address=address)
        max_bytes = max(1, min(request.max_bytes or MAX_SCAN_BYTES, MAX_SCAN_BYTES))
        try:
            page = await asyncio.to_thread(self.driver.store.export_delta, request.move_id, request.after or None,
                                           max_bytes)
        except (StorageError, ValueError) as exc:
            return pb.ExportDeltaResponse(status=ShardStatus.REFUSED, message=str(exc))
        self.driver.metrics.count_moved("out", page.puts)
        return pb.ExportDeltaResponse(
            status=ShardStatus.OK, puts=[pb.KeyValue(key=k, value=v) for k, v in page.puts], deletes=page.deletes,
            sessions=[pb.SessionData(client_id=c, record=r) for c, r in page.sessions],
            next_after=page.next_after or b"",
        )

    async def Watch(self, request: pb.WatchRequest, context):  # type: ignore[no-untyped-def]
        """The group's changes in a range (replica/watch_hub.py), as batches."""
        if request.cluster != self.cluster.name or request.group != self.driver.group:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"this worker serves cluster {self.cluster.name!r} group {self.driver.group}")
        if not 1 <= len(request.key) <= self.cluster.max_key_bytes or len(request.range_end) > self.cluster.max_key_bytes:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "watch: key must be 1..max_key_bytes bytes")
        hub = self.driver.watch_hub
        store = self.driver.store
        progress_every = min(LONGEST_WATCH_PROGRESS_SECONDS,
                             max(WATCH_PROGRESS_SECONDS, request.progress_ms / 1000.0))
        revision = store.closed_revision()
        try:
            watcher, backlog = hub.watch(request.key, request.range_end, request.start_revision)
        except Compacted as exc:
            yield pb.WatchBatch(compacted=exc.first)
            return
        try:
            if backlog:
                yield pb.WatchBatch(events=encode_changes(backlog), progress=max(revision, backlog[-1].revision))
            else:
                yield pb.WatchBatch(progress=revision)
            while True:
                try:
                    events = await asyncio.wait_for(watcher.next(), progress_every)
                except TimeoutError:
                    # Nothing waiting: everything applied here so far was sent.
                    yield pb.WatchBatch(progress=store.closed_revision())
                    continue
                except Lagging:
                    yield pb.WatchBatch(lagging=True)
                    return
                # A revision's changes are all in one applied batch: these close it.
                yield pb.WatchBatch(events=encode_changes(events), progress=events[-1].revision)
        finally:
            hub.cancel(watcher)

    async def ShardInfo(self, request: pb.ShardInfoRequest, context) -> pb.ShardInfoResponse:
        driver = self.driver
        role = driver.node.status().role.name.lower()
        return pb.ShardInfoResponse(state=driver.store.shard_state.encode(), applied_index=driver.store.applied_index,
                                    role=role)


def _lease_records(store) -> dict[int, LeaseRecord]:  # type: ignore[no-untyped-def]
    """Every lease record of the metadata group's state (undecodable ones are skipped)."""
    scanned = store.scan(RangeOp(LEASE_PREFIX, LEASE_PREFIX_END), epoch=(1 << 63) - 1)
    records = {}
    for key, *_, value, _lease in scanned[0].kvs if scanned is not None else ():
        lease, record = lease_of_key(key), decode_lease(value)
        if lease is not None and record is not None:
            records[lease] = record
    return records


def _ranges(raw: bytes) -> RangeSet:
    try:
        return RangeSet.from_wire(msgpack.unpackb(raw, raw=False))
    except KeySpaceError:
        raise
    except Exception as exc:
        raise KeySpaceError(f"ranges: not msgpack ({exc})") from None


# No `error`: that field is a stale session's; the router routes these again.
_WRONG_GROUP = pb.OperationResult(wrong_group=True)


def _members(conf: ConfState, driver: ReplicaDriver) -> list[pb.Member]:
    return [
        pb.Member(node_id=node_id, host=driver.member_hosts.get(node_id, ""),
                  address=driver.addresses.get(node_id, ""), learner=node_id in conf.learners,
                  incarnation=conf.incarnation_of(node_id))
        for node_id in sorted(conf.ids())
    ]


def _read_result(value: bytes | None) -> pb.OperationResult:
    return pb.OperationResult(existed=value is not None, value=value or b"")
