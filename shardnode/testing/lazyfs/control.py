"""The control channel: one JSON object per line over a unix socket, one request, one
response.

Request:  {"op": "power_loss" | "fail_fsync" | "fail_writes" | "clear_faults" | "stats"
           | "ping", "args": {...}}
Response: {"ok": true, "result": ...} or {"ok": false, "error": "one line"}
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from typing import Any

from shardnode.testing.lazyfs.model import LazyModel

_log = logging.getLogger("shardnode.testing.lazyfs")


class ControlError(RuntimeError):
    """The daemon refused a control request (bad arguments) or could not be reached."""


def _dispatch(model: LazyModel, op: str, args: dict[str, Any]) -> Any:
    if op == "ping":
        return "pong"
    if op == "power_loss":
        report = model.power_loss()
        _log.info("power loss: %s", report)
        return report
    if op == "fail_fsync":
        model.fail_fsync(**args)
        return None
    if op == "fail_writes":
        model.fail_writes(**args)
        return None
    if op == "clear_faults":
        model.clear_faults()
        return None
    if op == "stats":
        return model.stats()
    raise ValueError(f"unknown op {op!r}")


class _RequestHandler(socketserver.StreamRequestHandler):
    server: _ControlServer

    def handle(self) -> None:
        for line in self.rfile:
            try:
                request = json.loads(line)
                result = _dispatch(self.server.model, request["op"], request.get("args") or {})
                response = {"ok": True, "result": result}
            except Exception as error:  # every failure goes back to the caller as one line
                response = {"ok": False, "error": f"{type(error).__name__}: {error}"}
            self.wfile.write(json.dumps(response).encode() + b"\n")
            self.wfile.flush()


class _ControlServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, model: LazyModel) -> None:
        self.model = model
        super().__init__(path, _RequestHandler)


def start_control_server(path: str, model: LazyModel) -> _ControlServer:
    """Listen on ``path`` in a daemon thread (the FUSE loop owns the main thread)."""
    if os.path.exists(path):
        os.unlink(path)  # left by an earlier daemon that was killed
    server = _ControlServer(path, model)
    threading.Thread(target=server.serve_forever, name="lazyfs-control", daemon=True).start()
    return server


def request(path: str, op: str, timeout: float = 10.0, **args: Any) -> Any:
    """Send one request to the daemon listening on ``path`` and return its result."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(timeout)
        try:
            connection.connect(path)
            connection.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
            reply = connection.makefile("rb").readline()
        except OSError as error:
            raise ControlError(f"lazyfs control {path}: {error}") from error
    if not reply:
        raise ControlError(f"lazyfs control {path}: connection closed without a response")
    response = json.loads(reply)
    if not response["ok"]:
        raise ControlError(f"lazyfs {op}: {response['error']}")
    return response["result"]
