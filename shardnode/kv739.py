"""The seed-compatible functions of the original project's lib739kv.

    from shardnode.kv739 import kv739_init, kv739_get, kv739_put, kv739_shutdown
    assert kv739_init("etc/cluster.toml") == 0
    kv739_put("k", "v")        # (1, "")   new key
    kv739_put("k", "w")        # (0, "v")  key existed: its old value
    kv739_get("k")             # (0, "w")
    kv739_get("nope")          # (1, "")
    kv739_shutdown()           # 0

Conventions (the table is in docs/client.md), decided where the original was silent:

- These functions never raise. A failure returns -1 (or `(-1, "")`) and logs
  one WARNING line with the reason on the logger "shardnode.kv739".
- Module-level state: one Client, shared by every thread; all functions are
  thread-safe. `kv739_init` while already initialized returns -1 (call
  `kv739_shutdown` first); `kv739_shutdown` when not initialized (a second
  shutdown) returns -1; every other function returns -1 before init.
- `kv739_init(config_file)`: the file is either a cluster.toml (anything that
  parses as TOML with content) or one `host:port` router address per line
  (blank lines and `#` comments ignored). -1 if it is unreadable, invalid or
  lists no router.
- Keys and values may be `str` (UTF-8) or `bytes`. A found value, or an old
  value, is returned as `str` when the key was passed as `str` (decoded as
  UTF-8 with errors="surrogateescape", so nothing is lost) and as `bytes`
  when the key was `bytes`. The value returned for "absent"/"failure" is always
  `""`, exactly as the table in docs/client.md shows.
- Reads are linearizable; each call has a deadline of `DEFAULT_TIMEOUT`
  seconds (a put's outcome is unknown when it fails that way).
- `kv739_die` / `kv739_start` act on processes through
  `shardnode.supervisor.ProcessControl`, which needs the cluster's
  configuration: they work only after `kv739_init` was given a cluster.toml
  (with a plain address list they return -1).
- `kv739_leave` returns -1: membership changes are not implemented yet.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .client import Client
from .config import ClusterConfig, ConfigError
from .errors import ShardnodeError

__all__ = [
    "DEFAULT_TIMEOUT",
    "kv739_die",
    "kv739_get",
    "kv739_init",
    "kv739_leave",
    "kv739_put",
    "kv739_shutdown",
    "kv739_start",
]

log = logging.getLogger("shardnode.kv739")

#: Deadline of each kv739_get / kv739_put, in seconds.
DEFAULT_TIMEOUT = 10.0


@dataclass(slots=True, frozen=True)
class _State:
    client: Client
    cluster: ClusterConfig | None      # None when initialized from a plain address list
    source: str


_lock = threading.Lock()
_state: _State | None = None


# --- Set-up ----------------------------------------------------------------------------------


def kv739_init(config_file: str | os.PathLike[str]) -> int:
    """Connect to the cluster described by `config_file`: 0 ok, -1 error."""
    global _state
    with _lock:
        if _state is not None:
            return _fail("kv739_init", f"already initialized from {_state.source} (call kv739_shutdown first)")
        try:
            routers, cluster = _read_config(config_file)
            client = Client(routers, timeout=DEFAULT_TIMEOUT, cluster=cluster)
        except (ConfigError, ShardnodeError) as exc:
            return _fail("kv739_init", str(exc))
        _state = _State(client, cluster, os.fspath(config_file))
        return 0


def kv739_shutdown() -> int:
    """Close the connections: 0 ok, -1 if not initialized."""
    global _state
    with _lock:
        state, _state = _state, None
    if state is None:
        return _fail("kv739_shutdown", "not initialized")
    try:
        state.client.close()
    except Exception as exc:        # never raise; the state is dropped anyway
        return _fail("kv739_shutdown", f"{type(exc).__name__}: {exc}")
    return 0


# --- Data ------------------------------------------------------------------------------------


def kv739_get(key: str | bytes) -> tuple[int, Any]:
    """`(0, value)` found, `(1, "")` absent, `(-1, "")` failure."""
    state = _current("kv739_get")
    if state is None:
        return -1, ""
    try:
        value = state.client.get(key)
    except Exception as exc:
        return _fail("kv739_get", _reason(exc)), ""
    if value is None:
        return 1, ""
    return 0, _like(key, value)


def kv739_put(key: str | bytes, value: str | bytes) -> tuple[int, Any]:
    """`(0, old_value)` key existed, `(1, "")` new key, `(-1, "")` failure."""
    state = _current("kv739_put")
    if state is None:
        return -1, ""
    try:
        old = state.client.put(key, value)
    except Exception as exc:
        return _fail("kv739_put", _reason(exc)), ""
    if old is None:
        return 1, ""
    return 0, _like(key, old)


# --- Processes -------------------------------------------------------------------------------


def kv739_die(server: str, clean: int) -> int:
    """Stop `server` (a router address: the whole host; a worker address: that
    worker): clean=1 gracefully, clean=0 with SIGKILL. 0 ok, -1 error."""
    return _process_control("kv739_die", server, clean,
                            lambda cluster, control, admin: control.stop(server, clean=bool(clean)))


def kv739_start(server: str, new: int) -> int:
    """Start `server` again: new=0 recovers from its data (refused for a
    server that left); new=1 joins with empty state as a new member of the
    groups short of replicas (after a leave, the same groups), catches up
    and is promoted to voter. 0 ok, -1 error."""
    return _process_control("kv739_start", server, new,
                            lambda cluster, control, admin: _shape_change(cluster, control, "start_new",
                                                                          {"server": server})
                            if new else admin.restart(server))


def kv739_leave(server: str, clean: int) -> int:
    """Remove `server`'s replicas (a router address: every replica of that
    host; a worker address: that replica) from their groups by membership
    changes, then stop it (clean=1 gracefully, clean=0 SIGKILL). Refused
    (-1, nothing changed) if a group would drop below 3 voters or lose its
    live majority. 0 ok, -1 error."""
    return _process_control("kv739_leave", server, clean,
                            lambda cluster, control, admin: _shape_change(cluster, control, "leave",
                                                                          {"server": server, "clean": bool(clean)}))


# --- Helpers ---------------------------------------------------------------------------------


def _process_control(function: str, server: object, flag: object, action) -> int:  # type: ignore[no-untyped-def]
    state = _current(function)
    if state is None:
        return -1
    if state.cluster is None:
        return _fail(function, f"needs a cluster.toml; kv739_init was given a list of router addresses "
                               f"({state.source})")
    if not isinstance(server, str) or not server:
        return _fail(function, f"server must be a 'host:port' string (got {server!r})")
    if flag not in (0, 1):            # True and False are 1 and 0
        return _fail(function, f"the flag must be 0 or 1 (got {flag!r})")
    try:
        # Imported here: process control is optional for data-only users.
        supervisor = importlib.import_module("shardnode.supervisor")
        membership = importlib.import_module("shardnode.placement.membership")
        control = supervisor.ProcessControl(state.cluster)
        with membership.MembershipAdmin(state.cluster, control) as admin:
            action(state.cluster, control, admin)
    except Exception as exc:
        return _fail(function, f"{server}: {_reason(exc)}")
    return 0


def _shape_change(cluster: ClusterConfig, control: object, kind: str, args: dict) -> None:
    """A change of shape, recorded as an intent and carried out by the
    scheduler (shardnode/placement/shape_change.py): a call killed half way
    is carried on by the next one, or by a router."""
    shape_change = importlib.import_module("shardnode.placement.shape_change")
    intents = importlib.import_module("shardnode.placement.intents")
    shape_change.request_change(cluster, intents.IntentKind(kind), args, control=control,
                                on_line=lambda line: log.info("%s", line))


def _current(function: str) -> _State | None:
    with _lock:
        state = _state
    if state is None:
        _fail(function, "not initialized (call kv739_init first)")
    return state


def _fail(function: str, reason: str) -> int:
    log.warning("%s failed: %s", function, reason)
    return -1


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (ShardnodeError, ConfigError)):
        return f"{type(exc).__name__}: {exc}"
    return f"unexpected {type(exc).__name__}: {exc}"


def _like(key: object, value: bytes) -> str | bytes:
    """A value in the caller's type: str for a str key, bytes otherwise."""
    return value.decode("utf-8", errors="surrogateescape") if isinstance(key, str) else value


def _read_config(config_file: object) -> tuple[list[str], ClusterConfig | None]:
    """Router addresses (and the cluster, for a cluster.toml) from the file."""
    if not isinstance(config_file, (str, os.PathLike)):
        raise ConfigError(f"config_file must be a path, not {type(config_file).__name__}")
    path = Path(config_file)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        raw = {}        # "host:port" lines are not TOML
    if raw:
        cluster = ClusterConfig.from_dict(raw, source=path)
        return [h.router_address for h in cluster.hosts], cluster
    routers = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        host, sep, port = line.rpartition(":")
        if len(line.split()) != 1 or not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(f"{path}: line {number}: {line!r} is not a 'host:port' router address")
        routers.append(line)
    if not routers:
        raise ConfigError(f"{path}: lists no router address (expected a cluster.toml or 'host:port' lines)")
    return routers, None
