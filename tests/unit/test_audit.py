"""The audit log of admin actions (shardnode/audit.py, shardnode/replica/audit_rules.py,
`shardnode audit`): real grpc.aio servers on 127.0.0.1 with the Gatekeeper and the
AuditInterceptor, as a worker and a host's process control put them."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from shardnode.audit import BULK_INTERVAL, AuditInterceptor, AuditLog, audit_file
from shardnode.cli.main import main
from shardnode.config import METADATA_GROUP, ClusterConfig
from shardnode.host_agent import AUDITED_METHODS as HOST_CONTROL_AUDITED
from shardnode.proto import host_control_pb2 as hpb
from shardnode.proto import worker_pb2 as wpb
from shardnode.replica.audit_rules import worker_rules
from shardnode.security import (AdminCredential, Gatekeeper, SecurityStats, add_port, admin_metadata, aio_channel,
                                host_token)
from shardnode.storage.shard_commands import ShardCommand, ShardOp

pytestmark = pytest.mark.timeout(60)

ADMIN = AdminCredential("admin", "the-admin-password-0123456789")
WORKER = "shardnode.worker.Worker"
SECRET_VALUE = b"value-that-must-never-be-audited"


def _config(tmp_path: Path, tls: bool = False) -> ClusterConfig:
    hosts = "".join(f"""
[[host]]
name = "h{i}"
address = "127.0.0.{i}"
router_port = 50051
worker_port_base = 50100
metrics_port = 9090
""" for i in (1, 2))
    path = tmp_path / "cluster.toml"
    path.write_text(f"""
[cluster]
name = "audit"
replicas = 1
groups = 1
data_dir = "{tmp_path / 'data'}"

[security]
tls = {str(tls).lower()}
{hosts}""")
    return ClusterConfig.load(path)


class _Server:
    """A grpc.aio server with the interceptors in a worker's order (audit,
    then gatekeeper) and handlers that answer, abort or raise as told."""

    def __init__(self, interceptors: list[grpc.aio.ServerInterceptor],
                 handlers: dict[str, tuple[Callable[..., Any], Any, Any]], service: str = WORKER) -> None:
        self.server = grpc.aio.server(interceptors=interceptors)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {
            name: grpc.unary_unary_rpc_method_handler(behavior, request_deserializer=request.FromString,
                                                      response_serializer=response.SerializeToString)
            for name, (behavior, request, response) in handlers.items()
        }),))

    async def start(self, cluster: ClusterConfig | None = None, host: str = "h1") -> str:
        if cluster is None:
            port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            port = add_port(self.server, "127.0.0.1:0", cluster.security, host)
        await self.server.start()
        return f"127.0.0.1:{port}"

    async def stop(self) -> None:
        await self.server.stop(None)


async def _call(channel: grpc.aio.Channel, method: str, request: Any, response: Any, metadata=(),
                service: str = WORKER) -> grpc.StatusCode:
    try:
        await channel.unary_unary(f"/{service}/{method}", request_serializer=type(request).SerializeToString,
                                  response_deserializer=response.FromString)(request, metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def _transfer(request: wpb.TransferLeaderRequest, context) -> wpb.TransferLeaderResponse:
    return wpb.TransferLeaderResponse(ok=True, leader_id=request.target_node_id)


async def _membership_refused(request, context) -> wpb.ChangeMembershipResponse:
    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not now")


async def _retire_fails(request, context) -> wpb.RetireResponse:
    raise RuntimeError("the disk went away")


async def _status(request, context) -> wpb.StatusResponse:
    return wpb.StatusResponse(term=3)


WORKER_HANDLERS = {
    "TransferLeader": (_transfer, wpb.TransferLeaderRequest, wpb.TransferLeaderResponse),
    "ChangeMembership": (_membership_refused, wpb.ChangeMembershipRequest, wpb.ChangeMembershipResponse),
    "Retire": (_retire_fails, wpb.RetireRequest, wpb.RetireResponse),
    "Status": (_status, wpb.StatusRequest, wpb.StatusResponse),
}


def _worker_interceptors(audit_log: AuditLog, group: int = 0, tls: bool = False,
                         allowed: frozenset[str] = frozenset()) -> list[grpc.aio.ServerInterceptor]:
    gatekeeper = Gatekeeper(tls=tls, allowed=allowed, admin=ADMIN, stats=SecurityStats())
    return [AuditInterceptor(audit_log, worker_rules(group)), gatekeeper]


def test_admin_calls_are_recorded_with_their_outcome_refusals_included(tmp_path: Path) -> None:
    cluster = _config(tmp_path)
    audit_log = AuditLog.for_process(cluster, "h1", "worker", 0)
    token = admin_metadata(ADMIN)

    async def main_() -> None:
        server = _Server(_worker_interceptors(audit_log), WORKER_HANDLERS)
        address = await server.start()
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                assert await _call(channel, "TransferLeader", wpb.TransferLeaderRequest(target_node_id=2),
                                   wpb.TransferLeaderResponse, token) is grpc.StatusCode.OK
                assert await _call(channel, "TransferLeader", wpb.TransferLeaderRequest(),
                                   wpb.TransferLeaderResponse) is grpc.StatusCode.UNAUTHENTICATED
                wrong = (("authorization", "Bearer a-guess-at-the-password"),)
                add = wpb.ChangeMembershipRequest(kind=wpb.ChangeMembershipRequest.ADD_LEARNER, node_id=4, host="h4",
                                                  address="127.0.0.4:50100", fence=7)
                assert await _call(channel, "ChangeMembership", add, wpb.ChangeMembershipResponse,
                                   wrong) is grpc.StatusCode.UNAUTHENTICATED
                assert await _call(channel, "ChangeMembership", add, wpb.ChangeMembershipResponse,
                                   token) is grpc.StatusCode.FAILED_PRECONDITION
                assert await _call(channel, "Retire", wpb.RetireRequest(node_id=2), wpb.RetireResponse,
                                   token) is grpc.StatusCode.UNKNOWN
                # A data or status RPC is not an admin action: no line.
                assert await _call(channel, "Status", wpb.StatusRequest(), wpb.StatusResponse) is grpc.StatusCode.OK
        finally:
            await server.stop()

    asyncio.run(main_())
    audit_log.close()
    path = cluster.data_dir / "h1" / "audit" / "worker-g0.jsonl"
    assert audit_file(cluster, "h1", "worker", 0) == path
    lines = _lines(path)
    assert [(line["method"], line["outcome"]) for line in lines] == [
        ("TransferLeader", "OK"), ("TransferLeader", "UNAUTHENTICATED"), ("ChangeMembership", "UNAUTHENTICATED"),
        ("ChangeMembership", "FAILED_PRECONDITION"), ("Retire", "RuntimeError")]
    first = lines[0]
    assert first["host"] == "h1" and first["component"] == "worker" and first["group"] == "0"
    assert first["identity"] is None and first["peer"].startswith("ipv4:127.0.0.1:")
    assert first["summary"] == "target_node_id=2" and first["answer"] == "ok=true"
    assert first["time"].endswith("Z") and len(first["time"]) == len("2026-12-07T05:14:03.512Z")
    assert lines[1]["summary"] == "target_node_id=0 (the most up-to-date follower)" and "answer" not in lines[1]
    assert lines[3]["summary"] == "kind=ADD_LEARNER node_id=4 host=h4 address=127.0.0.4:50100 fence=7"
    assert lines[4]["summary"] == "node_id=2"
    # The admin password (the refused guess neither) never reaches the file.
    text = path.read_text()
    assert ADMIN.password not in text and "a-guess" not in text and "authorization" not in text


def test_the_audit_must_come_before_the_gatekeeper_to_see_its_refusals(tmp_path: Path) -> None:
    """gRPC aio runs the first interceptor outermost: listed after the
    Gatekeeper, the audit would never see the calls it refuses."""
    cluster = _config(tmp_path)
    audit_log = AuditLog.for_process(cluster, "h1", "worker", 0)

    async def main_() -> None:
        gatekeeper = Gatekeeper(tls=False, allowed=frozenset(), admin=ADMIN, stats=SecurityStats())
        server = _Server([gatekeeper, AuditInterceptor(audit_log, worker_rules(0))], WORKER_HANDLERS)
        address = await server.start()
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                assert await _call(channel, "TransferLeader", wpb.TransferLeaderRequest(),
                                   wpb.TransferLeaderResponse) is grpc.StatusCode.UNAUTHENTICATED
                assert await _call(channel, "TransferLeader", wpb.TransferLeaderRequest(),
                                   wpb.TransferLeaderResponse, admin_metadata(ADMIN)) is grpc.StatusCode.OK
        finally:
            await server.stop()

    asyncio.run(main_())
    audit_log.close()
    assert [line["outcome"] for line in _lines(audit_log.path)] == ["OK"]


def test_with_tls_the_callers_certificate_name_is_recorded_and_a_disallowed_one_too(tmp_path: Path) -> None:
    from shardnode.certs import init_cluster

    cluster = _config(tmp_path, tls=True)
    init_cluster(cluster)
    audit_log = AuditLog.for_process(cluster, "h1", "worker", 0)
    token = admin_metadata(ADMIN)

    async def main_() -> None:
        # Workers take the cluster's hosts only; here h2 alone.
        server = _Server(_worker_interceptors(audit_log, tls=True, allowed=frozenset({"h2"})), WORKER_HANDLERS)
        address = await server.start(cluster, "h1")
        try:
            for identity, expected in ((None, grpc.StatusCode.PERMISSION_DENIED), ("h2", grpc.StatusCode.OK)):
                async with aio_channel(address, cluster.security, identity) as channel:
                    assert await _call(channel, "TransferLeader", wpb.TransferLeaderRequest(target_node_id=1),
                                       wpb.TransferLeaderResponse, token) is expected
        finally:
            await server.stop()

    asyncio.run(main_())
    audit_log.close()
    assert [(line["identity"], line["outcome"]) for line in _lines(audit_log.path)] == [
        ("client", "PERMISSION_DENIED"), ("h2", "OK")]


def _execute(*operations: wpb.Operation) -> wpb.ExecuteRequest:
    return wpb.ExecuteRequest(cluster="audit", group=METADATA_GROUP, operations=list(operations))


def _ingest(move_id: int) -> wpb.ShardRequest:
    command = ShardCommand(ShardOp.INGEST, move_id, puts=((b"k1", SECRET_VALUE), (b"k2", SECRET_VALUE)),
                           deletes=(b"k3",), delta=True, fence=5)
    return wpb.ShardRequest(cluster="audit", group=0, command=command.encode())


def test_summaries_hold_no_values_and_move_pages_are_written_at_most_once_per_interval(tmp_path: Path) -> None:
    cluster = _config(tmp_path)
    meta_log = AuditLog.for_process(cluster, "h1", "worker", METADATA_GROUP)
    worker_log = AuditLog.for_process(cluster, "h1", "worker", 0)
    now = [1000.0]
    token = admin_metadata(ADMIN)

    async def execute(request: wpb.ExecuteRequest, context) -> wpb.ExecuteResponse:
        return wpb.ExecuteResponse(results=[wpb.OperationResult(swapped=op.kind == wpb.Operation.CAS)
                                            for op in request.operations])

    async def shard(request, context) -> wpb.ShardResponse:
        return wpb.ShardResponse(status=wpb.ShardResponse.OK)

    async def scan(request, context) -> wpb.ExportScanResponse:
        return wpb.ExportScanResponse(records=[wpb.KeyValue(key=b"k", value=SECRET_VALUE)], done=True)

    handlers = {"Execute": (execute, wpb.ExecuteRequest, wpb.ExecuteResponse),
                "Shard": (shard, wpb.ShardRequest, wpb.ShardResponse),
                "ExportScan": (scan, wpb.ExportScanRequest, wpb.ExportScanResponse)}

    async def main_() -> None:
        gatekeeper = Gatekeeper(tls=False, allowed=frozenset(), admin=ADMIN, stats=SecurityStats())
        meta = _Server([AuditInterceptor(meta_log, worker_rules(METADATA_GROUP)), gatekeeper], handlers)
        data = _Server([AuditInterceptor(worker_log, worker_rules(0), clock=lambda: now[0]), gatekeeper], handlers)
        meta_address, data_address = await meta.start(), await data.start()
        try:
            async with grpc.aio.insecure_channel(meta_address) as channel:
                # The scheduler's own keys: not audited.
                lease = wpb.Operation(kind=wpb.Operation.CAS, key=b"placement/lease", value=SECRET_VALUE)
                assert await _call(channel, "Execute", _execute(lease), wpb.ExecuteResponse) is grpc.StatusCode.OK
                assert await _call(channel, "Execute", _execute(wpb.Operation(kind=wpb.Operation.GET,
                                                                              key=b"shard_map")),
                                   wpb.ExecuteResponse) is grpc.StatusCode.OK
                flip = wpb.Operation(kind=wpb.Operation.CAS, key=b"shard_map", value=SECRET_VALUE,
                                     expected=SECRET_VALUE, guards=[wpb.Guard(key=b"placement/lease",
                                                                              value=SECRET_VALUE)])
                user = wpb.Operation(kind=wpb.Operation.PUT, key=b"auth", value=SECRET_VALUE)
                assert await _call(channel, "Execute", _execute(flip, lease, user),
                                   wpb.ExecuteResponse) is grpc.StatusCode.OK
            async with grpc.aio.insecure_channel(data_address) as channel:
                scan_request = wpb.ExportScanRequest(group=0, ranges=SECRET_VALUE, after=SECRET_VALUE,
                                                     max_bytes=262144)
                for move_id, advance in ((11, 0.0), (11, 1.0), (11, 1.0), (11, BULK_INTERVAL)):
                    now[0] += advance
                    assert await _call(channel, "Shard", _ingest(move_id), wpb.ShardResponse,
                                       token) is grpc.StatusCode.OK
                    assert await _call(channel, "ExportScan", scan_request, wpb.ExportScanResponse,
                                       token) is grpc.StatusCode.OK
                # A failed page is always written; the move's own steps every time.
                assert await _call(channel, "Shard", _ingest(11), wpb.ShardResponse) is \
                    grpc.StatusCode.UNAUTHENTICATED
                freeze = ShardCommand(ShardOp.EXPORT_FREEZE, 11, fence=5).encode()
                for _ in range(2):
                    assert await _call(channel, "Shard", wpb.ShardRequest(group=0, command=freeze), wpb.ShardResponse,
                                       token) is grpc.StatusCode.OK
        finally:
            await meta.stop()
            await data.stop()

    asyncio.run(main_())
    meta_log.close()
    worker_log.close()
    assert meta_log.path.name == "worker-gmeta.jsonl"
    (write,) = _lines(meta_log.path)
    assert write["group"] == "meta" and write["method"] == "Execute"
    assert write["summary"] == "CAS shard_map, PUT auth (+1 other operations)"
    assert write["answer"] == "status=OK; shard_map: swapped; auth: done"
    lines = _lines(worker_log.path)
    assert [(line["method"], line["outcome"], line.get("calls")) for line in lines] == [
        ("Shard", "OK", 1), ("ExportScan", "OK", 1), ("Shard", "OK", 3), ("ExportScan", "OK", 3),
        ("Shard", "UNAUTHENTICATED", 1), ("Shard", "OK", None), ("Shard", "OK", None)]
    assert lines[0]["summary"] == "group=0 INGEST move=11 puts=2 deletes=1 sessions=0 delta fence=5"
    assert lines[1]["summary"] == "group=0 max_bytes=262144"
    assert lines[-1]["summary"] == "group=0 EXPORT_FREEZE move=11 fence=5"
    for path in (meta_log.path, worker_log.path):
        text = path.read_text()
        assert SECRET_VALUE.decode() not in text and "k1" not in text and "placement/lease" not in text


def test_host_control_audits_control_only_with_its_program_and_action(tmp_path: Path) -> None:
    cluster = _config(tmp_path)
    audit_log = AuditLog.for_process(cluster, "h2", "host_control")
    service = "shardnode.host_control.HostControl"
    token = (("authorization", f"Bearer {host_token(ADMIN, 'h2')}"),)

    async def control(request, context) -> hpb.ControlResponse:
        return hpb.ControlResponse(fault=hpb.Fault(code=70, text="NOT_RUNNING: worker-g0"))

    async def processes(request, context) -> hpb.ProcessesResponse:
        return hpb.ProcessesResponse()

    async def main_() -> None:
        gatekeeper = Gatekeeper(tls=False, allowed=frozenset(), admin=AdminCredential("admin", host_token(ADMIN, "h2")),
                                stats=SecurityStats(), admin_methods=frozenset({f"/{service}/Control",
                                                                                f"/{service}/Processes"}))
        server = _Server([AuditInterceptor(audit_log, HOST_CONTROL_AUDITED), gatekeeper],
                         {"Control": (control, hpb.ControlRequest, hpb.ControlResponse),
                          "Processes": (processes, hpb.ProcessesRequest, hpb.ProcessesResponse)}, service)
        address = await server.start()
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stop = hpb.ControlRequest(action=hpb.ControlRequest.STOP, name="worker-g0")
                signal = hpb.ControlRequest(action=hpb.ControlRequest.SIGNAL, name="router", signal="KILL")
                assert await _call(channel, "Processes", hpb.ProcessesRequest(), hpb.ProcessesResponse, token,
                                   service) is grpc.StatusCode.OK
                assert await _call(channel, "Control", stop, hpb.ControlResponse, token, service) is grpc.StatusCode.OK
                assert await _call(channel, "Control", signal, hpb.ControlResponse, admin_metadata(ADMIN),
                                   service) is grpc.StatusCode.UNAUTHENTICATED
        finally:
            await server.stop()

    asyncio.run(main_())
    audit_log.close()
    lines = _lines(cluster.data_dir / "h2" / "audit" / "host_control.jsonl")
    assert [(line["method"], line["summary"], line["outcome"], line.get("answer")) for line in lines] == [
        ("Control", "action=STOP name=worker-g0", "OK", "fault=70 NOT_RUNNING: worker-g0"),
        ("Control", "action=SIGNAL name=router signal=KILL", "UNAUTHENTICATED", None)]
    assert lines[0]["group"] is None and lines[0]["component"] == "host_control"


def test_the_file_rotates_within_its_bound(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "worker-g0.jsonl"
    audit_log = AuditLog(path, host="h1", component="worker", group=0, max_bytes=2000, backups=2)
    for i in range(200):
        audit_log.record(method="TransferLeader", identity="h2", peer="ipv4:127.0.0.1:1", summary=f"call {i}",
                         outcome="OK")
    audit_log.close()
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["worker-g0.jsonl", "worker-g0.jsonl.1", "worker-g0.jsonl.2"]
    kept = []
    for name in reversed(files):
        assert (path.parent / name).stat().st_size <= 2000
        kept += [line["summary"] for line in _lines(path.parent / name)]
    # The newest lines are kept, in order; the oldest went with the rotation.
    assert kept[-1] == "call 199" and "call 0" not in kept
    assert kept == [f"call {i}" for i in range(200 - len(kept), 200)]


def test_an_unwritable_audit_file_does_not_fail_the_call(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("a file where the audit directory's parent should be")
    audit_log = AuditLog(blocker / "h1" / "audit" / "worker-g0.jsonl", host="h1", component="worker", group=0)

    async def main_() -> None:
        server = _Server(_worker_interceptors(audit_log), WORKER_HANDLERS)
        address = await server.start()
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                for _ in range(3):
                    assert await _call(channel, "TransferLeader", wpb.TransferLeaderRequest(target_node_id=2),
                                       wpb.TransferLeaderResponse, admin_metadata(ADMIN)) is grpc.StatusCode.OK
                # Once the directory can be made, the next line is written.
                blocker.unlink()
                assert await _call(channel, "TransferLeader", wpb.TransferLeaderRequest(target_node_id=3),
                                   wpb.TransferLeaderResponse, admin_metadata(ADMIN)) is grpc.StatusCode.OK
        finally:
            await server.stop()

    with caplog.at_level(logging.WARNING, logger="shardnode.audit"):
        asyncio.run(main_())
    audit_log.close()
    warnings = [r for r in caplog.records if r.getMessage() == "audit.write_failed"]
    assert len(warnings) == 1 and warnings[0].lines_lost == 1     # rate-limited: one line for three failures
    assert [line["summary"] for line in _lines(audit_log.path)] == ["target_node_id=3"]


def test_cli_merges_the_hosts_files_by_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cluster = _config(tmp_path)
    config = str(cluster.source)

    def write(host: str, name: str, *entries: tuple[str, str, str]) -> None:
        path = cluster.audit_dir(host) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as out:
            for time_, method, outcome in entries:
                out.write(json.dumps({"time": time_, "host": host, "component": "worker", "group": "0",
                                      "method": method, "identity": "h1", "peer": "ipv4:127.0.0.1:5",
                                      "summary": "node_id=2", "outcome": outcome}) + "\n")

    write("h1", "worker-g0.jsonl", ("2025-01-02T05:00:01.000Z", "TransferLeader", "OK"),
          ("2025-01-02T05:00:03.000Z", "Retire", "OK"))
    write("h1", "worker-g0.jsonl.1", ("2025-01-02T04:59:59.000Z", "Shard", "OK"))
    write("h2", "host_control.jsonl", ("2025-01-02T05:00:02.000Z", "Control", "UNAUTHENTICATED"))
    with (cluster.audit_dir("h2") / "host_control.jsonl").open("a") as out:
        out.write('{"time": "2025-01-02T05:00:04')           # a line cut by a crash

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(["--config", config, "audit", *argv])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = run("--json")
    assert code == 0 and "skipped 1 unreadable" in err
    assert [json.loads(line)["method"] for line in out.splitlines()] == ["Shard", "TransferLeader", "Control",
                                                                         "Retire"]
    code, out, _ = run("--since", "2025-01-02T05:00:02Z", "--limit", "1")
    assert out == ("2025-01-02T05:00:03.000Z  h1  worker/g0  h1@ipv4:127.0.0.1:5  Retire  node_id=2  OK\n")
    code, out, _ = run("--host", "h2", "--since", "2025-01-02 04:00:00")
    assert [line.split("  ")[4] for line in out.splitlines()] == ["Control"]
    code, out, _ = run("--since", "1h")         # these lines are from another day: none is that recent
    assert (code, out) == (0, "")
    code, out, err = run("--since", "yesterday")
    assert code == 2 and "not a time" in err and err.count("\n") == 1
