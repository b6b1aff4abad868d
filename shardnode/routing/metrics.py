"""A host's metrics endpoint, served by its router on `address:metrics_port`.

The page covers the router itself and every worker of the host: at each
scrape the router asks each local worker for its exposition (Worker.Metrics,
short timeout, in parallel), merges the families, and adds
`raft_node_health{group, node}` for every worker the configuration places on
this host — 1 if it answered, 0 if not. A dead worker's other series are
simply absent (never stale values from a dead process); a restarted worker's
counters start again from zero, which Prometheus reads as a counter reset.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from ..channel_cache import SyncChannelCache
from ..config import ClusterConfig, group_label
from ..proto import worker_pb2 as wpb
from ..proto import worker_pb2_grpc as wpb_grpc
from ..metrics import LATENCY_BUCKETS, merge_families
from ..supervisor import worker_program
from .metrics_server import serve_metrics

if TYPE_CHECKING:
    from .forwarder import GroupForwarder
    from .processes import ProcessWatch

log = logging.getLogger("shardnode.router.metrics")

SCRAPE_TIMEOUT = 1.0


class RouterMetrics:
    def __init__(self, cluster: ClusterConfig, host_name: str) -> None:
        self.cluster = cluster
        self.host = cluster.host(host_name)
        self.node = str(self.host.node_id)
        # The router's own series live in `own`; the served registry holds one
        # collector that merges them with the workers' (a family such as
        # raft_request_latency_seconds has samples from both and must appear once).
        self.own = CollectorRegistry(auto_describe=False)
        self.registry = CollectorRegistry(auto_describe=False)
        self.request_latency = Histogram(
            "raft_request_latency_seconds", "Time to answer a request, per operation.",
            ["group", "node", "op", "component"], registry=self.own, buckets=LATENCY_BUCKETS,
        )
        self.requests = Counter(
            "raft_router_requests", "Requests answered by the router, by operation and gRPC code.",
            ["group", "node", "op", "code", "component"], registry=self.own,
        )
        self.stale_epoch_redirects = Counter(
            "raft_shard_stale_epoch_redirects", "Operations a worker refused because their key had moved (or was "
            "moving) away from the group the router's shard map named; the router routed them again.",
            ["group", "node", "component"], registry=self.own,
        )
        self._children: dict[tuple[int | None, str, str], tuple[Any, Any]] = {}
        self._forwarders: Mapping[int, GroupForwarder] = {}
        self._shard_map_epoch: Callable[[], int] = lambda: 0
        self._server = None

    def observe(self, group: int | None, op: str, code: str, seconds: float) -> None:
        """One answered request; `group` is None for one refused before routing."""
        children = self._children.get((group, op, code))
        if children is None:
            children = self._child(group, op, code)
        counter, latency = children
        counter.inc()
        if latency is not None:
            latency.observe(seconds)

    def _child(self, group: int | None, op: str, code: str) -> tuple[Any, Any]:
        """The labelled series of one (group, op, code), looked up once: a
        `labels()` lookup per request was 5 % of a busy router's time."""
        labels = {"group": "" if group is None else group_label(group), "node": self.node}
        counter = self.requests.labels(**labels, op=op, code=code, component="router")
        latency = self.request_latency.labels(**labels, op=op, component="router") if code == "OK" else None
        children = self._children[(group, op, code)] = (counter, latency)
        return children

    def count_stale_epoch_redirect(self, group: int) -> None:
        self.stale_epoch_redirects.labels(group=group_label(group), node=self.node, component="router").inc()

    def watch(self, forwarders: Mapping[int, "GroupForwarder"], processes: "ProcessWatch | None" = None,
              shard_map_epoch: Callable[[], int] | None = None) -> None:
        """Report on the router's live forwarders (group → forwarder), its
        host's processes and the epoch of the shard map it routes with."""
        self._forwarders = forwarders
        if shard_map_epoch is not None:
            self._shard_map_epoch = shard_map_epoch
        self.own.register(_RouterCollector(self))
        if processes is not None:
            self.own.register(_ProcessCollector(processes))
        # The host's metadata group replica (initial placement) is scraped like its data groups' workers.
        meta = [(r.group, r.node_id) for r in self.cluster.meta_group_replicas() if r.host.name == self.host.name]
        self.registry.register(_HostCollector(
            self.cluster, self.host.name, self.own,
            lambda: [(f.group, f.local) for f in list(forwarders.values()) if f.local is not None] + meta))

    def serve(self) -> None:
        """Serve /metrics on the host's metrics port (a daemon thread)."""
        self._server, self.thread = serve_metrics(self.host.address, self.host.metrics_port, self.registry,
                                                  self.cluster.limits.max_metrics_requests)
        log.info("router.metrics_serving", extra={"address": f"{self.host.address}:{self.host.metrics_port}"})

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _RouterCollector:
    def __init__(self, metrics: RouterMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        node = self.metrics.node
        retries = CounterMetricFamily("raft_router_retries", "Forwarded calls retried after an error.",
                                      labels=["group", "node", "component"])
        redirects = CounterMetricFamily("raft_router_redirects", "NOT_LEADER answers followed.",
                                        labels=["group", "node", "component"])
        for forwarder in list(self.metrics._forwarders.values()):
            labels = [group_label(forwarder.group), node, "router"]
            retries.add_metric(labels, forwarder.stats.retries)
            redirects.add_metric(labels, forwarder.stats.redirects)
        yield retries
        yield redirects
        epoch = GaugeMetricFamily("raft_shard_map_epoch", "Epoch of the shard map this router routes with.",
                                  labels=["node", "component"])
        epoch.add_metric([node, "router"], self.metrics._shard_map_epoch())
        yield epoch


class _ProcessCollector:
    """The host's supervisord programs, as the router's process watch sees
    them (nothing when the router is not under supervisord)."""

    STATES = ("RUNNING", "STARTING", "BACKOFF", "STOPPING", "STOPPED", "EXITED", "FATAL")

    def __init__(self, processes: "ProcessWatch") -> None:
        self.processes = processes

    def collect(self) -> Iterator[Metric]:
        restarts = CounterMetricFamily("raft_process_restarts", "Times a program of this host was started again "
                                       "after it ended unexpectedly (fail-stop, crash), since the router started.",
                                       labels=["program"])
        state = GaugeMetricFamily("raft_process_state", "1 for the supervisord state each program of this host is "
                                  "in (BACKOFF: crash-looping).", labels=["program", "state"])
        not_running = GaugeMetricFamily(
            "raft_replica_not_running", "1 when this host holds a replica of the group whose worker does not run "
            "and could not be started (the router retries with a back-off; `shardnode status` says why).",
            labels=["group"])
        wanted = {worker_program(g) for g in self.processes.wanted()}
        for program in sorted(self.processes.programs.values(), key=lambda p: p.program):
            restarts.add_metric([program.program], program.restarts)
            for name in self.STATES:
                state.add_metric([program.program, name], 1 if program.state == name else 0)
            if program.program in wanted and program.group is not None:
                not_running.add_metric([group_label(program.group)], 1 if program.problem else 0)
        yield restarts
        yield state
        yield not_running


class _HostCollector:
    """The router's own families merged with its host's workers', plus health."""

    def __init__(self, cluster: ClusterConfig, host_name: str, own: CollectorRegistry,
                 local_members: Callable[[], list[tuple[int, int]]]) -> None:
        self.own = own
        self.cluster = cluster
        self.host = cluster.host(host_name)
        # (group, node id) of this host's replicas in the groups' live membership.
        self.local_members = local_members
        self._channels = SyncChannelCache(cluster.security, self.host.name)
        self._pool = ThreadPoolExecutor(max_workers=max(1, cluster.groups), thread_name_prefix="scrape")
        # The last round of worker pages: (when it ended, members, texts). One round at a time.
        self._last_round: tuple[float, list[tuple[int, int]], list[str | None]] | None = None
        self._round = threading.Lock()

    def _worker_pages(self) -> tuple[list[tuple[int, int]], list[str | None]]:
        """Every local worker's page. Requests that arrive while a round of
        worker queries runs share its pages (at most SCRAPE_TIMEOUT old): however
        many come at once, each worker is asked one request at a time."""
        asked = time.monotonic()
        with self._round:
            last = self._last_round
            if last is not None and last[0] >= asked:
                return last[1], last[2]
            members = self.local_members()
            texts = list(self._pool.map(self._scrape, [group for group, _ in members]))
            self._last_round = (time.monotonic(), members, texts)
            return members, texts

    def _scrape(self, group: int) -> str | None:
        channel = self._channels.get(self.host.worker_address(group))
        try:
            return wpb_grpc.WorkerStub(channel).Metrics(wpb.MetricsRequest(), timeout=SCRAPE_TIMEOUT).text.decode()
        except grpc.RpcError:
            return None

    def collect(self) -> Iterator[Metric]:
        members, texts = self._worker_pages()
        health = GaugeMetricFamily("raft_node_health", "1 if the worker answers, 0 if it is down.",
                                   labels=["group", "node"])
        for (group, node_id), text in zip(members, texts):
            health.add_metric([group_label(group), str(node_id)], 0 if text is None else 1)
        sources: list[Iterable[Metric]] = [[health], self.own.collect()]
        sources += [text_string_to_metric_families(text) for text in texts if text is not None]
        # One block per family: the router's raft_request_latency_seconds and
        # its workers' are one family with series of both components.
        yield from merge_families(sources)
