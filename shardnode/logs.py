"""Structured logs: one event per line, `key=value` pairs, quiet by default.

    2026-11-24T04:52:01.123Z INFO raft.became_leader host=host1 group=2 node=1 term=7

Every record carries the process's identity (host, group, node) set once by
`configure`, plus whatever `extra=` the call site adds (term, peer, index…).
"""

from __future__ import annotations

import logging
import sys
import time

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class KeyValueFormatter(logging.Formatter):
    def __init__(self, identity: dict[str, object]) -> None:
        super().__init__()
        self.identity = identity

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        fields = dict(self.identity)
        # The call site's fields win (a record about a peer names it itself).
        fields.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
        pairs = " ".join(f"{k}={_quote(v)}" for k, v in fields.items())
        line = f"{stamp} {record.levelname} {record.getMessage()}" + (f" {pairs}" if pairs else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _quote(value: object) -> str:
    """A value as one token: quoted (with \\, \" and \n escaped) if it holds
    a space, a quote, a newline, an = or nothing at all."""
    text = str(value)
    if text and not any(c in text for c in ' "\n=\\'):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def configure(level: str = "INFO", **identity: object) -> None:
    """Send shardnode's logs to stderr in key=value form. Third-party libraries
    stay at WARNING so that a healthy process is quiet."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter(identity))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("shardnode").setLevel(level.upper())
