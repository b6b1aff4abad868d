"""The cluster's configuration: one `cluster.toml`, the same on every host,
read once with tomllib into typed, validated objects.

A bad file raises ConfigError with one line that names the field, e.g.
`etc/cluster.toml: host[2].router_port: must be an integer in 1..65535`.

The initial placement is computed, not configured: group g's replicas live
on hosts g, g+1, ..., g+replicas-1 (modulo the number of hosts that are not
`standby`), which spreads replicas and hence leaders evenly. Within every
group, an initial replica on the i-th [[host]] has Raft node id i+1. This is
the shape of the cluster's first start only: afterwards each group's live
membership is what its Raft configuration says (docs/membership.md), and
members added later get ids above the number of hosts, never reused.

Groups created while the cluster runs (numbers config.groups up to
max_groups - 1) are placed by the shard map of the metadata group, not by
this file. The metadata group (`METADATA_GROUP`) lives on the first
`meta_replicas` hosts that are not standby (docs/sharding.md).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# A network namespace name as `ip netns` accepts it (a file under /run/netns:
# no '/', not '.' or '..', at most 255 bytes), narrowed to characters that
# need no quoting in a supervisord command line.
_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")


def is_namespace_name(name: str) -> bool:
    """Whether `name` is a network namespace name `[[host]] namespace` accepts:
    letters, digits, '_', '.', '-', starting with a letter or a digit, at
    most 255 characters."""
    return bool(_NAMESPACE.fullmatch(name))


#: Host names that `certs init` gives to other certificates (certs_dir/ca.crt,
#: certs_dir/client.crt and its identity): a host cannot have them.
RESERVED_HOST_NAMES = frozenset({"ca", "client"})

#: The configuration the command line uses when --config is not given.
DEFAULT_CONFIG = "etc/cluster.toml"
#: An environment variable that names it instead.
CONFIG_ENV = "SHARDNODE_CONFIG"
_CHECKOUT = Path(__file__).resolve().parents[1]


#: The group number of the metadata group (docs/sharding.md). Above every
#: data group: data groups are numbered below max_groups, which the ports
#: keep below 65536. Its worker listens on worker_port_base + max_groups.
METADATA_GROUP = 1 << 16
#: How the metadata group is named where people read it (metrics labels, logs, status).
METADATA_GROUP_LABEL = "meta"


def group_label(group: int) -> str:
    """A group's name in metrics, logs and status: its number, or "meta"."""
    return METADATA_GROUP_LABEL if group == METADATA_GROUP else str(group)


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or invalid."""


def default_config_path() -> Path:
    """The configuration to use when none is named: $SHARDNODE_CONFIG if set,
    else etc/cluster.toml in the current directory, else the one of the
    shardnode checkout this code runs from (so that `shardnode status` works
    from any directory next to a `make run` cluster). ConfigError (one line,
    naming where it looked) if there is none."""
    named = os.environ.get(CONFIG_ENV)
    if named:
        return Path(named)
    candidates = [Path(DEFAULT_CONFIG), _CHECKOUT / DEFAULT_CONFIG]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in dict.fromkeys(c.absolute() for c in candidates))
    raise ConfigError(f"no cluster configuration found (looked for {looked}); "
                      f"pass --config PATH or set {CONFIG_ENV}")


@dataclass(slots=True, frozen=True)
class HostConfig:
    name: str
    address: str
    router_port: int
    worker_port_base: int
    metrics_port: int
    supervisor_port: int
    node_id: int                   # position in the [[host]] list + 1
    standby: bool = False          # holds no replica at first; joins groups with `shardnode start --new`
    max_groups: int = 16           # [cluster] max_groups: the metadata group's worker port comes after the data groups'
    # The network namespace the host's processes run in when the whole cluster runs on this
    # machine (the namespace mode, docs/testing.md): `local_cluster_config` starts the host's
    # supervisord with `ip netns exec NAMESPACE`. None: the machine's own network.
    namespace: str | None = None
    # The router's etcd v3 API (docs/etcd.md); 0: not served (a [[host]] without etcd_port).
    etcd_port: int = 0

    def worker_port(self, group: int) -> int:
        if group == METADATA_GROUP:
            return self.worker_port_base + self.max_groups
        return self.worker_port_base + group

    def worker_address(self, group: int) -> str:
        return f"{self.address}:{self.worker_port(group)}"

    @property
    def router_address(self) -> str:
        return f"{self.address}:{self.router_port}"

    @property
    def etcd_address(self) -> str | None:
        """host:port of the router's etcd v3 API, None when it serves none."""
        return f"{self.address}:{self.etcd_port}" if self.etcd_port else None


@dataclass(slots=True, frozen=True)
class TimingConfig:
    tick_ms: int = 100
    election_ticks: int = 10       # election timeout is random in [election_ticks, 2 * election_ticks)
    heartbeat_ticks: int = 1
    # An idle group quiesces after this many ticks with nothing to do (0: never;
    # docs/raft.md, "Quiescence"): no heartbeats, no election timers until woken.
    quiesce_ticks: int = 20
    # How long the scheduler's lease holds without renewal (docs/membership.md,
    # "One scheduler"): the longest a killed command's work waits to be taken over.
    scheduler_lease_ms: int = 8000

    @property
    def scheduler_lease_seconds(self) -> float:
        return self.scheduler_lease_ms / 1000.0

    @property
    def tick_seconds(self) -> float:
        return self.tick_ms / 1000.0


@dataclass(slots=True, frozen=True)
class StorageConfig:
    """How each worker's RocksDB keeps its write-ahead log (docs/worker.md,
    "Disk use"). The defaults are the original design's: obsolete WAL files
    are archived for an hour or up to 512 MB per database, for point-in-time
    recovery by an operator; nothing in shardnode reads the archive."""

    wal_ttl_seconds: int = 3600    # 0 with wal_size_limit_mb = 0: delete obsolete WAL files at once
    wal_size_limit_mb: int = 512

    @property
    def archives_wal(self) -> bool:
        return self.wal_ttl_seconds > 0 or self.wal_size_limit_mb > 0


@dataclass(slots=True, frozen=True)
class SecurityConfig:
    """`[security]`: mutual TLS on every gRPC link, and the admin credential
    (docs/security.md). Paths are absolute once loaded from a file.

    With `tls` on, each host's router and workers present `certs_dir/HOST.crt`
    (key `HOST.key`) as server and as client, verify every peer against
    `ca_file`, and accept only the identities (certificate CN) of the
    cluster's own hosts, plus `allowed_clients` on the routers. Clients
    (Client, kv739, the CLI) present `client_cert_file`. The admin credential
    (`admin_file`, created by `shardnode certs init` or the first supervisord
    configuration) guards the admin RPCs and, through a token derived from it
    per host, each host's process control, with TLS on or off.
    """

    tls: bool = False
    certs_dir: Path = Path("data/certs")
    ca_file: Path = Path("data/certs/ca.crt")
    client_cert_file: Path = Path("data/certs/client.crt")
    client_key_file: Path = Path("data/certs/client.key")
    admin_file: Path = Path("data/certs/admin.credential")
    allowed_clients: tuple[str, ...] = ("client",)

    def host_cert_file(self, host_name: str) -> Path:
        return self.certs_dir / f"{host_name}.crt"

    def host_key_file(self, host_name: str) -> Path:
        return self.certs_dir / f"{host_name}.key"

    @property
    def ca_key_file(self) -> Path:
        return self.certs_dir / "ca.key"


@dataclass(slots=True, frozen=True)
class LimitsConfig:
    """`[limits]`: a bound on every input a router or a worker accepts, as
    etcd's --max-request-bytes and --max-concurrent-streams (docs/security.md,
    "Limits"). Each has a safe default; a refusal is RESOURCE_EXHAUSTED with a
    message naming the key (`limits.max_batch_operations (10000) exceeded:
    4000000 operations`), counted in `raft_refusals_total{reason}`, and
    changes nothing."""

    # gRPC's largest message, received or sent, on routers and workers
    # (router-facing RPCs). Above max_value_bytes + max_key_bytes: one put fits.
    max_request_bytes: int = 4 << 20
    # Operations in one Batch call or one BatchStream message.
    max_batch_operations: int = 10_000
    # Operations received on one BatchStream and not answered yet: past it the
    # router stops reading the stream until answers go out (back-pressure).
    max_stream_operations: int = 10_000
    # Operations not answered yet on one client connection (every stream and
    # Batch of it): a Batch past it is refused, a stream waits.
    max_connection_operations: int = 50_000
    # RPCs served at once by one router or worker (gRPC maximum_concurrent_rpcs;
    # a stream counts for as long as it is open); past it RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = 1000
    # Concurrent HTTP/2 streams on one connection (gRPC max_concurrent_streams):
    # the client's further calls wait for a free stream.
    max_streams_per_connection: int = 100
    # Connections one router or worker holds at once (gRPC's
    # max_allowed_incoming_connections): past it a new one is closed at once.
    max_connections: int = 4096
    # A connection must finish its TLS and HTTP/2 handshake within this, or is
    # closed (gRPC's server_handshake_timeout_ms; its own default is 120 s).
    handshake_timeout_ms: int = 10_000
    # Operations waiting in one group's forwarder at a router (queued, not yet sent).
    max_forwarder_queue: int = 100_000
    # The longest deadline a call or an operation gets (its timeout_ms, the
    # call's own deadline): longer ones are cut to this.
    max_timeout_ms: int = 60_000
    # A peer frame (a batch of Raft messages) or a snapshot chunk.
    max_frame_bytes: int = 8 << 20
    # A snapshot received from a peer: every chunk together, and the time from its header to its end.
    max_snapshot_bytes: int = 16 << 30
    max_snapshot_seconds: int = 600
    # Status calls a router serves at once (each fans out to every replica).
    max_concurrent_status: int = 4
    # Requests the host's metrics endpoint serves at once (each a thread).
    max_metrics_requests: int = 8

    @property
    def max_timeout_seconds(self) -> float:
        return self.max_timeout_ms / 1000.0


@dataclass(slots=True, frozen=True)
class Replica:
    """One member of one group."""

    group: int
    node_id: int
    host: HostConfig

    @property
    def address(self) -> str:
        return self.host.worker_address(self.group)


@dataclass(slots=True, frozen=True)
class ClusterConfig:
    name: str
    replicas: int
    groups: int
    virtual_nodes: int
    data_dir: Path
    snapshot_threshold: int
    max_key_bytes: int
    max_value_bytes: int
    timing: TimingConfig
    hosts: tuple[HostConfig, ...]
    source: Path | None = None
    storage: StorageConfig = StorageConfig()
    security: SecurityConfig = SecurityConfig()
    limits: LimitsConfig = LimitsConfig()
    max_groups: int = 16           # data groups are numbered 0..max_groups-1 (groups created online included)
    meta_replicas: int = 3         # replicas of the metadata group

    # --- Lookups -------------------------------------------------------------

    def host(self, name: str) -> HostConfig:
        for host in self.hosts:
            if host.name == name:
                return host
        known = ", ".join(h.name for h in self.hosts)
        raise ConfigError(f"unknown host {name!r} (the configuration has: {known})")

    def host_by_node_id(self, node_id: int) -> HostConfig:
        if not 1 <= node_id <= len(self.hosts):
            raise ConfigError(f"unknown node id {node_id}")
        return self.hosts[node_id - 1]

    def group_replicas(self, group: int) -> tuple[Replica, ...]:
        """The initial members of `group`: the placement computed from this
        file for the groups of cluster.toml and the metadata group; none for
        a group created online (the shard map's placements say where those
        started: `placed_replicas`)."""
        if group == METADATA_GROUP:
            return self.meta_group_replicas()
        if self.groups <= group < self.max_groups:
            return ()
        if not 0 <= group < self.groups:
            raise ConfigError(f"unknown group {group} (groups are 0..{self.groups - 1})")
        active = [h for h in self.hosts if not h.standby]
        count = len(active)
        return tuple(Replica(group, active[(group + i) % count].node_id, active[(group + i) % count])
                     for i in range(self.replicas))

    def meta_group_replicas(self) -> tuple[Replica, ...]:
        """The metadata group's initial members: the first `meta_replicas`
        hosts that are not standby."""
        active = [h for h in self.hosts if not h.standby]
        return tuple(Replica(METADATA_GROUP, h.node_id, h) for h in active[:self.meta_replicas])

    def placed_replicas(self, group: int, host_names: tuple[str, ...]) -> tuple[Replica, ...]:
        """The initial members of a group created online on `host_names` (the
        shard map's placement): node id = the host's position + 1, as for
        the groups of cluster.toml."""
        hosts = [self.host(name) for name in host_names]
        return tuple(Replica(group, h.node_id, h) for h in hosts)

    def is_data_group(self, group: int) -> bool:
        return 0 <= group < self.max_groups

    def replica(self, group: int, host_name: str) -> Replica:
        for replica in self.group_replicas(group):
            if replica.host.name == host_name:
                return replica
        raise ConfigError(f"host {host_name!r} holds no replica of group {group}")

    def groups_on_host(self, host_name: str) -> tuple[int, ...]:
        return tuple(
            g for g in range(self.groups) if any(r.host.name == host_name for r in self.group_replicas(g))
        )

    def worker_data_dir(self, host_name: str, group: int) -> Path:
        if group == METADATA_GROUP:
            return self.data_dir / host_name / "group-meta"
        return self.data_dir / host_name / f"group-{group}"

    def shard_map_file(self, host_name: str) -> Path:
        """Where a host's router keeps the last shard map it learned."""
        return self.data_dir / host_name / "shard_map"

    def held_down_file(self, host_name: str) -> Path:
        """Where a host's router keeps the worker programs stopped on purpose
        (they stay down until started: routing/processes.py)."""
        return self.data_dir / host_name / "held_down"

    def audit_dir(self, host_name: str) -> Path:
        """Where a host's processes write their audit logs of admin actions,
        one file per process (shardnode/audit.py)."""
        return self.data_dir / host_name / "audit"

    # --- Loading ---------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> "ClusterConfig":
        path = Path(path)
        try:
            with path.open("rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        return cls.from_dict(raw, source=path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: Path | None = None) -> "ClusterConfig":
        where = f"{source}: " if source else ""
        fields = _Fields(where)
        cluster = fields.table(raw, "cluster")
        timing_raw = fields.table(raw, "timing", required=False)
        name = fields.string(cluster, "cluster.name", pattern=_NAME)
        replicas = fields.integer(cluster, "cluster.replicas", default=5, low=1, high=15)
        groups = fields.integer(cluster, "cluster.groups", default=4, low=1, high=4096)
        virtual_nodes = fields.integer(cluster, "cluster.virtual_nodes", default=64, low=1, high=4096)
        data_dir_raw = fields.string(cluster, "cluster.data_dir", default="data")
        snapshot_threshold = fields.integer(cluster, "cluster.snapshot_threshold", default=10_000, low=1, high=1 << 40)
        max_key_bytes = fields.integer(cluster, "cluster.max_key_bytes", default=4096, low=1, high=1 << 20)
        max_value_bytes = fields.integer(cluster, "cluster.max_value_bytes", default=1 << 20, low=0, high=64 << 20)
        # At least 16, and never fewer than the groups of the file.
        max_groups = fields.integer(cluster, "cluster.max_groups", default=max(16, groups), low=1, high=4096)
        if max_groups < groups:
            raise ConfigError(f"{where}cluster.max_groups: must be at least cluster.groups ({groups}), got {max_groups}")
        fields.no_extra(cluster, "cluster", {
            "name", "replicas", "groups", "virtual_nodes", "data_dir", "snapshot_threshold",
            "max_key_bytes", "max_value_bytes", "max_groups", "meta_replicas",
        })
        timing = TimingConfig(
            tick_ms=fields.integer(timing_raw, "timing.tick_ms", default=100, low=1, high=60_000),
            election_ticks=fields.integer(timing_raw, "timing.election_ticks", default=10, low=2, high=10_000),
            heartbeat_ticks=fields.integer(timing_raw, "timing.heartbeat_ticks", default=1, low=1, high=10_000),
            quiesce_ticks=fields.integer(timing_raw, "timing.quiesce_ticks", default=20, low=0, high=1_000_000),
            scheduler_lease_ms=fields.integer(timing_raw, "timing.scheduler_lease_ms", default=8000, low=500,
                                              high=600_000),
        )
        fields.no_extra(timing_raw, "timing", {"tick_ms", "election_ticks", "heartbeat_ticks", "quiesce_ticks",
                                               "scheduler_lease_ms"})
        storage_raw = fields.table(raw, "storage", required=False)
        storage = StorageConfig(
            wal_ttl_seconds=fields.integer(storage_raw, "storage.wal_ttl_seconds", default=3600, low=0, high=1 << 40),
            wal_size_limit_mb=fields.integer(storage_raw, "storage.wal_size_limit_mb", default=512, low=0,
                                             high=1 << 30),
        )
        fields.no_extra(storage_raw, "storage", {"wal_ttl_seconds", "wal_size_limit_mb"})
        if timing.heartbeat_ticks >= timing.election_ticks:
            raise ConfigError(f"{where}timing.heartbeat_ticks: must be less than timing.election_ticks")

        hosts_raw = raw.get("host")
        if not isinstance(hosts_raw, list) or not hosts_raw:
            raise ConfigError(f"{where}host: at least one [[host]] table is required")
        hosts = []
        for i, host_raw in enumerate(hosts_raw):
            label = f"host[{i}]"
            if not isinstance(host_raw, dict):
                raise ConfigError(f"{where}{label}: must be a table")
            address = fields.string(host_raw, f"{label}.address")
            try:
                ipaddress.ip_address(address)
            except ValueError:
                if not re.fullmatch(r"[A-Za-z0-9.-]+", address):
                    raise ConfigError(f"{where}{label}.address: {address!r} is not an IP address or host name") from None
            hosts.append(
                HostConfig(
                    name=fields.string(host_raw, f"{label}.name", pattern=_NAME),
                    address=address,
                    router_port=fields.port(host_raw, f"{label}.router_port"),
                    worker_port_base=fields.port(host_raw, f"{label}.worker_port_base"),
                    metrics_port=fields.port(host_raw, f"{label}.metrics_port"),
                    supervisor_port=fields.port(host_raw, f"{label}.supervisor_port", default=9001),
                    node_id=i + 1,
                    standby=fields.boolean(host_raw, f"{label}.standby", default=False),
                    max_groups=max_groups,
                    namespace=_namespace(fields, host_raw, label),
                    etcd_port=fields.port(host_raw, f"{label}.etcd_port") if "etcd_port" in host_raw else 0,
                )
            )
            fields.no_extra(host_raw, label, {
                "name", "address", "router_port", "worker_port_base", "metrics_port", "supervisor_port", "standby",
                "namespace", "etcd_port",
            })
        names = [h.name for h in hosts]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}host: host names must be unique")
        for i, host_name in enumerate(names):
            if host_name.lower() in RESERVED_HOST_NAMES:
                # certs_dir/NAME.crt would be the CA's or the client's file, and the CN the client's identity.
                raise ConfigError(f"{where}host[{i}].name: {host_name!r} is reserved (the CA's and the clients' "
                                  f"certificates are named {', '.join(sorted(RESERVED_HOST_NAMES))})")
        namespaces = [h.namespace for h in hosts if h.namespace is not None]
        if len(set(namespaces)) != len(namespaces):
            raise ConfigError(f"{where}host: two hosts share one namespace (each host has its own network)")
        active = [h for h in hosts if not h.standby]
        if replicas > len(active):
            raise ConfigError(f"{where}cluster.replicas: {replicas} replicas need at least as many hosts that are not "
                              f"standby (have {len(active)})")
        meta_replicas = _meta_replicas(fields, cluster, len(active), where, replicas)
        for host in hosts:
            # Data groups 0..max_groups-1, then the metadata group's worker.
            if host.worker_port_base + max_groups > 65535:
                raise ConfigError(f"{where}host {host.name!r}.worker_port_base: base + max_groups exceeds 65535")
            worker_ports = set(range(host.worker_port_base, host.worker_port_base + max_groups + 1))
            for other_name, port in (("router_port", host.router_port), ("metrics_port", host.metrics_port),
                                     ("supervisor_port", host.supervisor_port), ("etcd_port", host.etcd_port)):
                if port in worker_ports:
                    raise ConfigError(f"{where}host {host.name!r}.{other_name}: {port} collides with its worker ports")
        endpoints = [(h.address, p) for h in hosts for p in (h.router_port, h.metrics_port, h.supervisor_port)]
        endpoints += [(h.address, h.etcd_port) for h in hosts if h.etcd_port]
        endpoints += [(h.address, h.worker_port_base + g) for h in hosts for g in range(max_groups + 1)]
        if len(set(endpoints)) != len(endpoints):
            raise ConfigError(f"{where}host: two services share one address:port")
        data_dir = Path(data_dir_raw)
        if not data_dir.is_absolute() and source is not None:
            # Relative to the project root (the config's parent's parent for etc/cluster.toml).
            base = source.resolve().parent
            data_dir = (base.parent if base.name == "etc" else base) / data_dir
        security = _security(fields, fields.table(raw, "security", required=False), data_dir, source)
        for client in security.allowed_clients:
            if client in names:
                # A certificate with a host's name would pass as that host at every worker.
                raise ConfigError(f"{where}security.allowed_clients: {client!r} is the name of a host; a client's "
                                  "certificate name must differ from every host's")
        limits = _limits(fields, fields.table(raw, "limits", required=False), max_key_bytes, max_value_bytes)
        return cls(
            name=name,
            replicas=replicas,
            groups=groups,
            virtual_nodes=virtual_nodes,
            data_dir=data_dir,
            snapshot_threshold=snapshot_threshold,
            max_key_bytes=max_key_bytes,
            max_value_bytes=max_value_bytes,
            timing=timing,
            hosts=tuple(hosts),
            source=source,
            storage=storage,
            security=security,
            limits=limits,
            max_groups=max_groups,
            meta_replicas=meta_replicas,
        )


def _namespace(fields: "_Fields", host_raw: dict[str, Any], label: str) -> str | None:
    """`[[host]] namespace`: unset, or a legal network namespace name."""
    if "namespace" not in host_raw:
        return None
    value = fields.string(host_raw, f"{label}.namespace")
    if not is_namespace_name(value):
        raise fields._fail(f"{label}.namespace", f"{value!r} is not a network namespace name (letters, digits, "
                                                 "'_', '.', '-', starting with a letter or a digit, at most 255)")
    return value


def _meta_replicas(fields: "_Fields", cluster: dict[str, Any], active_hosts: int, where: str,
                   replicas: int = 3) -> int:
    """`[cluster] meta_replicas`: 3 or 5, at most the hosts that are not
    standby. Unset, as many as the data groups have (`replicas`), so that
    the metadata group survives what they survive: 5 for 5 or more, else 3;
    at most the hosts that are not standby (every such host when there are
    fewer than 3: a test cluster of one or two hosts)."""
    if "meta_replicas" not in cluster:
        wanted = min(max(replicas, 3), active_hosts)
        return 5 if wanted >= 5 else 3 if wanted >= 3 else wanted
    value = fields.integer(cluster, "cluster.meta_replicas", low=3, high=5)
    if value not in (3, 5):
        raise ConfigError(f"{where}cluster.meta_replicas: must be 3 or 5 (got {value})")
    if value > active_hosts:
        raise ConfigError(f"{where}cluster.meta_replicas: {value} replicas need at least as many hosts that are "
                          f"not standby (have {active_hosts})")
    return value


def _security(fields: "_Fields", raw: dict[str, Any], data_dir: Path, source: Path | None) -> SecurityConfig:
    """`[security]`: relative paths are taken from the project root (as
    data_dir), files from certs_dir (data_dir/certs by default)."""
    root = data_dir.parent
    if source is not None:
        base = source.resolve().parent
        root = base.parent if base.name == "etc" else base

    def path(field: str, default: Path) -> Path:
        if field not in raw:
            return default
        value = Path(fields.string(raw, f"security.{field}"))
        return value if value.is_absolute() else root / value

    tls = fields.boolean(raw, "security.tls", default=False)
    certs_dir = path("certs_dir", data_dir / "certs")
    allowed = raw.get("allowed_clients", ["client"])
    if not isinstance(allowed, list) or not all(isinstance(c, str) and _NAME.fullmatch(c) for c in allowed):
        raise fields._fail("security.allowed_clients", "must be a list of certificate names "
                                                       "(letters, digits, '_', '.', '-')")
    fields.no_extra(raw, "security", {
        "tls", "certs_dir", "ca_file", "client_cert_file", "client_key_file", "admin_file", "allowed_clients",
    })
    return SecurityConfig(
        tls=tls,
        certs_dir=certs_dir,
        ca_file=path("ca_file", certs_dir / "ca.crt"),
        client_cert_file=path("client_cert_file", certs_dir / "client.crt"),
        client_key_file=path("client_key_file", certs_dir / "client.key"),
        admin_file=path("admin_file", certs_dir / "admin.credential"),
        allowed_clients=tuple(allowed),
    )


#: Operations a client puts in one BatchStream message at most
#: (shardnode/client/pipe.py): `limits.max_batch_operations` may not be lower.
CLIENT_MESSAGE_OPERATIONS = 1000


def _limits(fields: "_Fields", raw: dict[str, Any], max_key_bytes: int, max_value_bytes: int) -> LimitsConfig:
    """`[limits]`: each key an integer in its range, defaults from LimitsConfig."""
    default = LimitsConfig()
    # One put of the largest key and value, with its protobuf framing, must fit in a request.
    smallest_request = max_key_bytes + max_value_bytes + 1024

    def integer(key: str, low: int, high: int, at_least: int = 0) -> int:
        return fields.integer(raw, f"limits.{key}", default=max(getattr(default, key), at_least), low=low, high=high)

    limits = LimitsConfig(
        # A client's BatchStream message is up to 1 MiB (or one operation alone).
        max_request_bytes=integer("max_request_bytes", max(smallest_request, 2 << 20), 1 << 30, smallest_request),
        max_batch_operations=integer("max_batch_operations", CLIENT_MESSAGE_OPERATIONS, 10_000_000),
        max_stream_operations=integer("max_stream_operations", 1, 10_000_000),
        max_connection_operations=integer("max_connection_operations", 1, 100_000_000),
        max_concurrent_rpcs=integer("max_concurrent_rpcs", 16, 1_000_000),
        max_streams_per_connection=integer("max_streams_per_connection", 1, 1_000_000),
        max_connections=integer("max_connections", 16, 1_000_000),
        handshake_timeout_ms=integer("handshake_timeout_ms", 100, 600_000),
        max_forwarder_queue=integer("max_forwarder_queue", 1, 100_000_000),
        max_timeout_ms=integer("max_timeout_ms", 1000, 24 * 3600 * 1000),
        # A frame carries at least one entry of the largest put.
        max_frame_bytes=integer("max_frame_bytes", max(smallest_request, 64 << 10), 1 << 30, smallest_request),
        max_snapshot_bytes=integer("max_snapshot_bytes", 1 << 20, 1 << 50),
        max_snapshot_seconds=integer("max_snapshot_seconds", 1, 7 * 24 * 3600),
        max_concurrent_status=integer("max_concurrent_status", 1, 10_000),
        max_metrics_requests=integer("max_metrics_requests", 1, 10_000),
    )
    fields.no_extra(raw, "limits", set(LimitsConfig.__dataclass_fields__))
    for smaller, larger in (("max_batch_operations", "max_stream_operations"),
                            ("max_stream_operations", "max_connection_operations")):
        if getattr(limits, smaller) > getattr(limits, larger):
            # A message (a stream) that may never fit would wait for ever.
            raise fields._fail(f"limits.{smaller}", f"must be at most limits.{larger} ({getattr(limits, larger)}), "
                                                    f"got {getattr(limits, smaller)}")
    return limits


class _Fields:
    """Typed access to raw TOML values, with errors that name the field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def _fail(self, field: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where}{field}: {message}")

    def table(self, raw: dict[str, Any], key: str, required: bool = True) -> dict[str, Any]:
        value = raw.get(key)
        if value is None:
            if required:
                raise self._fail(key, f"the [{key}] table is required")
            return {}
        if not isinstance(value, dict):
            raise self._fail(key, "must be a table")
        return value

    def string(self, raw: dict[str, Any], field: str, default: str | None = None,
               pattern: re.Pattern[str] | None = None) -> str:
        key = field.rsplit(".", 1)[-1]
        value = raw.get(key, default)
        if value is None:
            raise self._fail(field, "is required")
        if not isinstance(value, str) or not value:
            raise self._fail(field, "must be a non-empty string")
        if pattern is not None and not pattern.fullmatch(value):
            raise self._fail(field, f"{value!r} may only hold letters, digits, '_', '.', '-' (at most 63)")
        return value

    def integer(self, raw: dict[str, Any], field: str, default: int | None = None,
                low: int = 0, high: int = 1 << 62) -> int:
        key = field.rsplit(".", 1)[-1]
        value = raw.get(key, default)
        if value is None:
            raise self._fail(field, "is required")
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self._fail(field, f"must be an integer in {low}..{high} (got {value!r})")
        return value

    def boolean(self, raw: dict[str, Any], field: str, default: bool) -> bool:
        key = field.rsplit(".", 1)[-1]
        value = raw.get(key, default)
        if not isinstance(value, bool):
            raise self._fail(field, f"must be true or false (got {value!r})")
        return value

    def port(self, raw: dict[str, Any], field: str, default: int | None = None) -> int:
        return self.integer(raw, field, default=default, low=1, high=65535)

    def no_extra(self, raw: dict[str, Any], table: str, known: set[str]) -> None:
        extra = sorted(set(raw) - known)
        if extra:
            # A key of any other shape (newlines, quotes) is shown quoted, so the error stays one line.
            name = extra[0] if re.fullmatch(r"[A-Za-z0-9_-]+", extra[0]) else repr(extra[0])
            raise self._fail(f"{table}.{name}", f"unknown setting (known: {', '.join(sorted(known))})")
