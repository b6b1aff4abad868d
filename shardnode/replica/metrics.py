"""A worker's Prometheus metrics, in a registry of its own.

Events (requests, fsyncs, proposals, errors) update counters and histograms
as they happen; the state of the replica (term, role, indexes, lag, queue
depths, snapshot counts) is read at scrape time, so it is never stale. The
host's router scrapes every local worker through the Worker.Metrics RPC and
serves them all on the host's metrics port (shardnode/routing/metrics.py).

Every series carries `group` and `node`; names are listed in docs/observability.md. No
`*_created` series (turned off by importing shardnode.metrics).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..config import group_label
from ..metrics import LATENCY_BUCKETS
from ..raft import StateRole
from ..storage import wal_archive_bytes

if TYPE_CHECKING:
    from .driver import ReplicaDriver

FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STATE_VALUE = {StateRole.FOLLOWER: 0, StateRole.CANDIDATE: 1, StateRole.PRE_CANDIDATE: 1, StateRole.LEADER: 2}


class WorkerMetrics:
    def __init__(self, group: int, node: int) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.labels = {"group": group_label(group), "node": str(node)}
        base = ["group", "node"]
        self.request_latency = Histogram(
            "raft_request_latency_seconds", "Time to answer a request, per operation.",
            [*base, "op", "component"], registry=self.registry, buckets=LATENCY_BUCKETS,
        )
        self.fsync_latency = Histogram(
            "raft_fsync_latency_seconds", "Time of one synced write of a Ready (group commit).",
            base, registry=self.registry, buckets=FSYNC_BUCKETS,
        ).labels(**self.labels)
        self.proposal_batch = Histogram(
            "raft_proposal_batch_size", "Entries proposed together.",
            base, registry=self.registry, buckets=BATCH_BUCKETS,
        ).labels(**self.labels)
        self.proposals = Counter(
            "raft_proposals", "Entries proposed by this replica as leader.", base, registry=self.registry,
        ).labels(**self.labels)
        self.rpc_errors = Counter(
            "raft_rpc_errors", "Worker answers that were not OK, by status.",
            [*base, "code"], registry=self.registry,
        )
        moved = [*base, "direction"]
        self.keys_moved = Counter(
            "raft_shard_keys_moved", "Keys shipped by moves of key space: out (scanned and delta, on the source "
            "leader) and in (ingested, on the target leader).", moved, registry=self.registry,
        )
        self.bytes_moved = Counter(
            "raft_shard_bytes_moved", "Key and value bytes shipped by moves of key space, as raft_shard_keys_moved.",
            moved, registry=self.registry,
        )
        self.wrong_group = Counter(
            "raft_shard_wrong_group", "Operations refused because this group does not serve their key now "
            "(moved or moving): the router routes them again.", base, registry=self.registry,
        ).labels(**self.labels)

    def count_moved(self, direction: str, records: list[tuple[bytes, bytes]]) -> None:
        if records:
            self.keys_moved.labels(**self.labels, direction=direction).inc(len(records))
            self.bytes_moved.labels(**self.labels, direction=direction).inc(sum(len(k) + len(v) for k, v in records))

    def observe_request(self, op: str, seconds: float) -> None:
        self.request_latency.labels(**self.labels, op=op, component="worker").observe(seconds)

    def count_error(self, code: str) -> None:
        self.rpc_errors.labels(**self.labels, code=code).inc()

    def bind(self, driver: "ReplicaDriver") -> None:
        """Expose the driver's state, read at each scrape."""
        self.registry.register(_ReplicaCollector(driver, self.labels))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _ReplicaCollector:
    def __init__(self, driver: "ReplicaDriver", labels: dict[str, str]) -> None:
        self.driver = driver
        self.labels = labels

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), value)
        return family

    def collect(self) -> Iterator[Metric]:
        driver = self.driver
        status = driver.node.status()
        store = driver.store
        stats = driver.stats
        yield self._gauge("raft_term", "Current Raft term.", status.term)
        yield self._gauge("raft_state", "Role: 0 follower, 1 candidate, 2 leader.", STATE_VALUE[status.role])
        yield self._gauge("raft_quiesced", "1 while the group is quiesced (idle: no heartbeats, no election timer).",
                          1 if status.quiesced else 0)
        yield self._gauge("raft_committed_index", "Highest log index known committed.", status.commit)
        yield self._gauge("raft_applied_index", "Highest log index applied to the state machine.", store.applied_index)
        yield self._gauge("raft_log_size", "Entries in the uncompacted log.",
                          max(0, store.last_index() - store.first_index() + 1))
        yield self._gauge("raft_apply_lag", "Committed entries not yet applied.",
                          max(0, status.commit - store.applied_index))
        lag = GaugeMetricFamily("raft_replication_lag", "Entries a peer is behind the leader's log (on the leader).",
                                labels=[*self.labels, "peer"])
        for peer, progress in sorted(status.progress.items()):
            if peer != driver.node_id:
                lag.add_metric([*self.labels.values(), str(peer)], max(0, status.last_index - progress.match))
        yield lag
        yield self._gauge("raft_wal_archive_bytes",
                          "Bytes of obsolete write-ahead log kept in archive/ ([storage] wal_ttl_seconds, "
                          "wal_size_limit_mb).", wal_archive_bytes(store.path))
        for name, doc, value in (
            ("raft_elections_started", "Campaigns this replica started (pre-vote included).", stats.elections_started),
            ("raft_elections_won", "Elections this replica won.", stats.elections_won),
            ("raft_leader_changes", "Changes of the known leader.", stats.leader_changes),
            ("raft_snapshots_sent", "Snapshots streamed to followers.", stats.snapshots_sent),
            ("raft_snapshots_send_failed", "Snapshot streams that failed.", stats.snapshots_send_failed),
            ("raft_snapshots_received", "Snapshots received and installed.", stats.snapshots_received),
            ("raft_snapshots_taken", "Log compactions (snapshot points recorded).", stats.snapshots_taken),
            ("raft_snapshot_send_seconds", "Seconds spent streaming snapshots.", stats.snapshot_send_seconds),
            ("raft_snapshot_receive_seconds", "Seconds spent receiving snapshots.", stats.snapshot_receive_seconds),
            ("raft_messages_rejected", "Peer messages the core refused.", stats.messages_rejected),
        ):
            yield self._counter(name, doc, value)
        shard = store.shard_state
        moves = GaugeMetricFamily("raft_shard_moves_in_progress", "Moves of key space this group takes part in, "
                                  "by direction (out: exporting, in: importing).", labels=[*self.labels, "direction"])
        moves.add_metric([*self.labels.values(), "out"], len(shard.exports))
        moves.add_metric([*self.labels.values(), "in"], len(shard.imports))
        yield moves
        yield self._gauge("raft_shard_epoch", "The shard map epoch of this group's last ownership change.",
                          shard.version)
        transport = driver.transport.stats
        depth = GaugeMetricFamily("raft_peer_queue_depth", "Messages queued for a peer.", labels=[*self.labels, "peer"])
        dropped = CounterMetricFamily("raft_peer_dropped_messages", "Messages to a peer that were dropped.",
                                      labels=[*self.labels, "peer"])
        for peer in sorted(driver.addresses):
            if peer == driver.node_id:
                continue
            depth.add_metric([*self.labels.values(), str(peer)], transport.queue_depth(peer))
            dropped.add_metric([*self.labels.values(), str(peer)], transport.dropped_messages.get(peer, 0))
        yield depth
        yield dropped
        rejected = CounterMetricFamily("raft_peer_rejected_frames", "Inbound peer frames refused, by reason.",
                                       labels=[*self.labels, "reason"])
        for reason, count in sorted(transport.rejected_frames.items()):
            rejected.add_metric([*self.labels.values(), reason], count)
        yield rejected
