"""The audit log of admin actions: who asked a server to change the cluster,
from where, what they asked, and how it ended (docs/security.md, "Audit log").

Each server process keeps one `AuditLog`, a file of JSON lines of its own
(`cluster.audit_dir(HOST)/<component>[-g<group>].jsonl`), so that no two
processes ever rotate the same file. An `AuditInterceptor` (a gRPC server
interceptor) writes one line per audited call; which calls are audited, and
how a request is summarized, is the `AuditRule`s each server gives it
(a worker's: shardnode/replica/audit_rules.py; a host's process control:
host_agent.py). A line::

    {"time": "2026-12-07T05:14:03.512Z", "host": "h2", "component": "worker", "group": "0",
     "method": "ChangeMembership", "identity": "h1", "peer": "ipv4:127.0.0.1:40112",
     "summary": "kind=ADD_LEARNER node_id=4 host=h4 address=127.0.0.4:50100", "outcome": "OK",
     "answer": "status=OK"}

The interceptor must come *before* the Gatekeeper in the server's
`interceptors` list: gRPC aio runs the first one outermost, so the audit's
wrapper is around the Gatekeeper's check and sees the calls it refuses
(outcome UNAUTHENTICATED or PERMISSION_DENIED) as well as those it lets
through.

An audit file that cannot be written (a full disk, a directory taken away)
never fails the call it records: the line is lost, a warning says so at most
once a minute, and the next line tries the file again.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor

from .config import ClusterConfig, group_label
from .security import peer_common_name

__all__ = [
    "AUDIT_BACKUPS",
    "AUDIT_FILE_BYTES",
    "BULK_INTERVAL",
    "AuditInterceptor",
    "AuditLog",
    "AuditRule",
    "Audited",
    "audit_file",
    "describe_answer",
    "describe_fields",
    "summarize_fields",
]

log = logging.getLogger("shardnode.audit")

#: Each audit file rotates at this size and keeps this many older files
#: (data_dir/HOST/audit/worker-g0.jsonl.1 …): at most 40 MiB per process.
AUDIT_FILE_BYTES = 10 << 20
AUDIT_BACKUPS = 3
#: A request's summary and an answer's are cut to this many characters.
SUMMARY_CHARS = 300
#: Bulk calls (the pages of a key-space move) that succeed are written at most
#: once per this many seconds per kind; the line counts the calls it stands for.
BULK_INTERVAL = 10.0
#: A failing audit file is reported at most this often.
_WARN_INTERVAL = 60.0
#: A field whose name holds one of these is never summarized.
_SECRET_WORDS = ("password", "token", "secret", "credential")


def audit_file(cluster: ClusterConfig, host_name: str, component: str, group: int | None = None) -> Path:
    """The audit file of one process: `component` is router, worker or
    host_control; a worker's name carries its group (worker-g0, worker-gmeta)."""
    name = component if group is None else f"{component}-g{group_label(group)}"
    return cluster.audit_dir(host_name) / f"{name}.jsonl"


class AuditLog:
    """One process's audit file: `record` appends one JSON line."""

    def __init__(self, path: Path, *, host: str, component: str, group: int | None = None,
                 max_bytes: int = AUDIT_FILE_BYTES, backups: int = AUDIT_BACKUPS) -> None:
        self.path = path
        self._identity = {"host": host, "component": component,
                          "group": None if group is None else group_label(group)}
        self._handler = _AuditFileHandler(path, max_bytes, backups, self.report_failure)
        # A logger of its own, outside logging's tree: audit lines never reach
        # the process's normal log, and its records never reach these files.
        self._logger = logging.Logger(f"shardnode.audit.{path.name}", logging.INFO)
        self._logger.propagate = False
        self._logger.addHandler(self._handler)
        self._failures = 0
        self._last_warning = -_WARN_INTERVAL

    @classmethod
    def for_process(cls, cluster: ClusterConfig, host_name: str, component: str,
                    group: int | None = None) -> "AuditLog":
        return cls(audit_file(cluster, host_name, component, group), host=host_name, component=component,
                   group=group)

    def record(self, *, method: str, identity: str | None, peer: str, summary: str, outcome: str,
               answer: str | None = None, calls: int | None = None) -> None:
        """Append one line (never raises: a failed write is reported and dropped).

        Written and flushed from the server's event loop, not fsynced: admin
        actions are a few a minute, and one short write costs less than
        handing it to a thread."""
        entry: dict[str, Any] = {"time": _utc_now(), **self._identity, "method": method, "identity": identity,
                                 "peer": peer, "summary": _cut(summary), "outcome": outcome}
        if answer:
            entry["answer"] = _cut(answer)
        if calls is not None:
            entry["calls"] = calls
        self._logger.info(json.dumps(entry, ensure_ascii=False, separators=(", ", ": ")))

    def close(self) -> None:
        self._handler.close()

    def report_failure(self, error: BaseException | None) -> None:
        """A line was lost: say so, at most once a minute."""
        self._failures += 1
        now = time.monotonic()
        if now - self._last_warning >= _WARN_INTERVAL:
            self._last_warning = now
            log.warning("audit.write_failed", extra={"path": str(self.path), "error": str(error),
                                                     "lines_lost": self._failures})


class _AuditFileHandler(logging.handlers.RotatingFileHandler):
    """logging's size-bounded rotating file, opened at the first line (so an
    unwritable directory costs a warning, not the server's start), which
    makes its directory when it is missing and reports a failed write to
    `on_error` instead of printing a traceback on stderr."""

    def __init__(self, path: Path, max_bytes: int, backups: int,
                 on_error: Callable[[BaseException | None], None]) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True)
        self._on_error = on_error

    def _open(self):  # type: ignore[no-untyped-def]
        os.makedirs(os.path.dirname(self.baseFilename), mode=0o700, exist_ok=True)
        return super()._open()

    def handleError(self, record: logging.LogRecord) -> None:   # noqa: N802 (logging's naming)
        self._on_error(sys.exc_info()[1])


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _cut(text: str) -> str:
    return text if len(text) <= SUMMARY_CHARS else text[:SUMMARY_CHARS - 1] + "…"


# --- What is audited ------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Audited:
    """What a rule makes of one request: its `summary` (never keys' values,
    bulk data or credentials); `bulk`, for the pages of a key-space move, the
    kind under which successful calls are written at most once per
    BULK_INTERVAL; `answer`, how to summarize the response (default:
    `describe_answer`)."""

    summary: str
    bulk: str | None = None
    answer: Callable[[Any], str] | None = None


@dataclass(slots=True, frozen=True)
class AuditRule:
    """How one method is audited: `summarize(request)` gives an Audited, or
    None when this request is not worth a line (a metadata Execute that
    writes no audited key)."""

    summarize: Callable[[Any], Audited | None]


def summarize_fields(request: Any) -> Audited:
    """The generic rule's summary: `describe_fields` of the request (its
    cluster name left out: every server checks it)."""
    return Audited(describe_fields(request, skip=("cluster",)))


def describe_answer(response: Any) -> str:
    """The gist of an answer: its `status`, `ok`, supervisord `fault` and
    `message` fields, those it has (an admin RPC refused by the application
    still ends with gRPC's OK)."""
    fields = getattr(getattr(response, "DESCRIPTOR", None), "fields_by_name", None)
    if fields is None:
        return ""
    parts = []
    if "status" in fields and fields["status"].enum_type is not None:
        parts.append(f"status={fields['status'].enum_type.values_by_number[response.status].name}")
    if "ok" in fields:
        parts.append(f"ok={str(response.ok).lower()}")
    if "fault" in fields and response.fault.code:
        parts.append(f"fault={response.fault.code} {response.fault.text}")
    if "message" in fields and response.message:
        parts.append(f"message={response.message}")
    return " ".join(parts)


def describe_fields(message: Any, skip: Iterable[str] = (), always: Iterable[str] = ("group",)) -> str:
    """`name=value` for a message's scalar fields: enums by name (their
    default too: ADD_LEARNER, START), the fields of `always` (group 0 is a
    group), others only when set; never bytes, nested messages, or a field
    whose name says it holds a secret."""
    skipped, shown = set(skip), set(always)
    parts = []
    for field in message.DESCRIPTOR.fields:
        name = field.name
        if (name in skipped or field.type in (FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE,
                                             FieldDescriptor.TYPE_GROUP)
                or any(word in name.lower() for word in _SECRET_WORDS)):
            continue
        value = getattr(message, name)
        if field.is_repeated:
            if value:
                parts.append(f"{name}={','.join(_scalar(field, v) for v in value)}")
        elif field.type == FieldDescriptor.TYPE_ENUM or value or name in shown:
            parts.append(f"{name}={_scalar(field, value)}")
    return " ".join(parts)


def _scalar(field: Any, value: Any) -> str:
    if field.enum_type is not None:
        known = field.enum_type.values_by_number.get(value)
        return known.name if known is not None else str(value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


# --- The interceptor ------------------------------------------------------------------------


class AuditInterceptor(grpc.aio.ServerInterceptor):
    """Writes a line to `audit_log` for every call of a method in `rules`
    (full names, "/package.Service/Method"). List it before the Gatekeeper."""

    def __init__(self, audit_log: AuditLog, rules: Mapping[str, AuditRule],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.audit_log = audit_log
        self._rules = dict(rules)
        self._clock = clock
        self._bulk: dict[tuple[str, str], _BulkWindow] = {}      # by (method, bulk kind)

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        rule = self._rules.get(handler_call_details.method)
        # Every admin RPC is unary; a streaming method would need a wrapper of
        # its kind, and none is audited.
        if handler is None or rule is None or handler.request_streaming or handler.response_streaming:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        behavior = handler.unary_unary

        async def audited(request, context):
            entry = _summarize(rule, request)
            if entry is None:
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result
            try:
                result = behavior(request, context)
                if inspect.isawaitable(result):
                    result = await result
            except BaseException as exc:
                self._write(method, context, entry, _outcome_of_failure(exc, context), None)
                raise
            self._write(method, context, entry, _outcome_of_return(context), result)
            return result

        return grpc.unary_unary_rpc_method_handler(audited, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)

    def _write(self, method: str, context: grpc.aio.ServicerContext, entry: Audited, outcome: str,
               response: Any) -> None:
        try:
            self._write_line(method, context, entry, outcome, response)
        except Exception as exc:        # the audit must never change how the call it records ends
            self.audit_log.report_failure(exc)

    def _write_line(self, method: str, context: grpc.aio.ServicerContext, entry: Audited, outcome: str,
                    response: Any) -> None:
        calls = None
        if entry.bulk is not None:
            if outcome == "OK":
                calls = self._count_bulk(method, entry.bulk)
                if calls is None:
                    return
            else:
                calls = 1
        try:
            answer = (entry.answer or describe_answer)(response) if response is not None else None
        except Exception as exc:        # a summary must never fail the call it describes
            answer = f"(answer not summarized: {type(exc).__name__})"
        self.audit_log.record(method=method, identity=peer_common_name(context), peer=context.peer(),
                              summary=entry.summary, outcome=outcome, answer=answer, calls=calls)

    def _count_bulk(self, method: str, kind: str) -> int | None:
        """The number of calls a line written now stands for, None when this
        call is only counted (a line of its kind was written in the last
        BULK_INTERVAL). The calls of a window no later call closes are not
        written: the move's own steps (Shard commands other than INGEST) are."""
        now = self._clock()
        window = self._bulk.get((method, kind))
        if window is not None and now - window.last_line < BULK_INTERVAL:
            window.unwritten += 1
            return None
        calls = 1 if window is None else window.unwritten + 1
        self._bulk[(method, kind)] = _BulkWindow(last_line=now)
        return calls


@dataclass(slots=True)
class _BulkWindow:
    """One kind of bulk call: when its last line was written, and how many
    successful calls came since without a line of their own."""

    last_line: float
    unwritten: int = 0


def _summarize(rule: AuditRule, request: Any) -> Audited | None:
    try:
        return rule.summarize(request)
    except Exception as exc:        # a malformed request is still audited, and still reaches its handler
        return Audited(f"(request not summarized: {type(exc).__name__})")


def _outcome_of_failure(exc: BaseException, context: grpc.aio.ServicerContext) -> str:
    """The status a call that raised ends with: the code it aborted with,
    CANCELLED when the caller went away, else the exception's type (gRPC
    answers those UNKNOWN)."""
    if isinstance(exc, grpc.aio.AbortError):
        code = context.code()
        if isinstance(code, grpc.StatusCode):
            return code.name
        return "ABORTED_WITHOUT_CODE"
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    return type(exc).__name__


def _outcome_of_return(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "OK"
