"""A cluster.toml for the namespace mode: the same cluster, each host on its
namespace's address and with its `namespace` key, so that
`local_cluster_config` runs each host inside its own network namespace.

    config = write_namespaced_config(Path("etc/cluster.toml"), Path("etc/cluster-netns.toml"), network)

Ports stay as they are: every host has an address of its own. The copy is
written from the parsed file (tomllib has no writer, and the file's values
are plain scalars, lists and tables), so comments are not kept; paths are
written absolute, because the copy may live in another directory than the
source and relative ones are taken from the file's location.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from ..config import ClusterConfig
from .namespaces import NamespaceNetwork

__all__ = ["write_namespaced_config"]

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
# [security] keys that hold paths (relative ones are taken from the project root).
_SECURITY_PATHS = ("certs_dir", "ca_file", "client_cert_file", "client_key_file", "admin_file")


def write_namespaced_config(source_toml: Path, dest: Path, network: NamespaceNetwork, *,
                            data_dir: Path | None = None) -> Path:
    """Write `dest`: `source_toml` with every host's address replaced by its
    address in `network` and its `namespace` key set to its namespace there.
    `data_dir` (default: the source's) is where the copy's hosts keep their
    data: give a cluster that also runs outside namespaces another one, since
    a worker's data records its peers' addresses. Returns `dest`, checked by
    loading it."""
    source_toml = Path(source_toml)
    dest = Path(dest)
    with source_toml.open("rb") as f:
        raw = tomllib.load(f)
    source = ClusterConfig.load(source_toml)    # validated, with absolute paths
    missing = [h.name for h in source.hosts if h.name not in network.hosts]
    if missing:
        raise KeyError(f"hosts {', '.join(missing)} of {source_toml} are not in network {network.name} "
                       f"({', '.join(network.hosts)})")
    for host_raw in raw["host"]:
        host_raw["address"] = network.address(host_raw["name"])
        host_raw["namespace"] = network.namespace(host_raw["name"])
    raw["cluster"]["data_dir"] = str((data_dir or source.data_dir).absolute())
    security = raw.get("security", {})
    for key in _SECURITY_PATHS:
        if key in security:
            security[key] = str(getattr(source.security, key))
    header = (f"# Generated from {source_toml.absolute()} for the namespace mode (network {network.name}, "
              f"subnet {network.subnet}).\n# Do not edit: it is written again at every start.\n\n")
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(header + dump_toml(raw))
    os.replace(tmp, dest)
    ClusterConfig.load(dest)
    return dest


def dump_toml(document: dict[str, Any]) -> str:
    """TOML text for what tomllib read from a cluster.toml: top-level
    scalars, then tables, then arrays of tables; tables within tables are
    written inline."""
    scalars = [f"{_key(k)} = {_value(v)}" for k, v in document.items() if not _is_table(v) and not _is_tables(v)]
    blocks = ["\n".join(scalars)] if scalars else []
    for key, value in document.items():
        if _is_table(value):
            blocks.append("\n".join([f"[{_key(key)}]", *(f"{_key(k)} = {_value(v)}" for k, v in value.items())]))
    for key, value in document.items():
        if _is_tables(value):
            for table in value:
                blocks.append("\n".join([f"[[{_key(key)}]]", *(f"{_key(k)} = {_value(v)}" for k, v in table.items())]))
    return "\n\n".join(blocks) + "\n"


def _is_table(value: object) -> bool:
    return isinstance(value, dict)


def _is_tables(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string (same escapes, \uXXXX for the rest).
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML here")
