"""The strict exposition checker, and a host page merged from a router and its workers."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from shardnode.metrics import LATENCY_BUCKETS, merge_families
from shardnode.testing.exposition import check_exposition, parse_exposition

VALID = """\
# HELP requests_total Requests.
# TYPE requests_total counter
requests_total{op="get",code="OK"} 3
requests_total{op="put",code="OK"} 1.5e3
# HELP latency_seconds Latency.
# TYPE latency_seconds histogram
latency_seconds_bucket{op="get",le="0.1"} 1
latency_seconds_bucket{op="get",le="+Inf"} 2
latency_seconds_sum{op="get"} 0.3
latency_seconds_count{op="get"} 2
# TYPE up gauge
up{path="a\\\\b \\"quoted\\" \\n"} NaN 1700000000000
"""


def test_a_valid_page_has_no_violation() -> None:
    families, errors = parse_exposition(VALID)
    assert errors == []
    assert families["requests_total"].type == "counter"
    assert len(families["latency_seconds"].samples) == 4
    assert families["up"].samples[0][1] == (("path", 'a\\b "quoted" \n'),)


@pytest.mark.parametrize("page, expected", [
    ("# HELP a x\n# HELP a y\na 1\n", "second HELP"),
    ("# TYPE a gauge\n# TYPE a gauge\na 1\n", "second TYPE"),
    ("a 1\n# TYPE a gauge\n", "TYPE line for 'a' after its samples"),
    ("# TYPE a gauge\na{x=\"1\"} 1\n# TYPE b gauge\nb 1\na{x=\"2\"} 1\n", "one group"),
    ("# TYPE a gauge\na 1\na 2\n", "duplicate series"),
    ("# TYPE a gauge\na{__x=\"1\"} 1\n", "reserved"),
    ("# TYPE a gauge\na{x=\"1\",x=\"2\"} 1\n", "twice"),
    ("# TYPE a gauge\na{x=\"\\t\"} 1\n", "invalid escape"),
    ("# TYPE a gauge\na{x=1} 1\n", 'expected ="'),
    ("# TYPE a gauge\na one\n", "invalid value"),
    ("# TYPE a gauge\n1a 1\n", "invalid metric name"),
    ("# TYPE a wibble\na 1\n", "unknown type"),
    ("# TYPE a gauge\na 1\n# TYPE a_total counter\na_total 1\n", None),   # a_total is its own family
    ("# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n", "+Inf"),
    ("# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n", "decrease"),
    ("# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n", "differs from _count"),
    ("# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 2\n", "no _sum"),
    ("# TYPE h histogram\nh_bucket 2\nh_sum 1\nh_count 2\n", "without an le"),
    ("# TYPE h histogram\nh 2\n", "does not belong"),
    ("# TYPE a gauge\na 1", "newline"),
])
def test_each_rule_is_enforced(page: str, expected: str | None) -> None:
    errors = check_exposition(page)
    if expected is None:
        assert errors == [], errors
    else:
        assert any(expected in e for e in errors), errors


def _worker_text(group: int) -> str:
    registry = CollectorRegistry(auto_describe=False)
    latency = Histogram("raft_request_latency_seconds", "Time to answer a request, per operation.",
                        ["group", "node", "op", "component"], registry=registry, buckets=LATENCY_BUCKETS)
    latency.labels(group=str(group), node="1", op="put", component="worker").observe(0.003)
    proposals = Counter("raft_proposals", "Entries proposed.", ["group", "node"], registry=registry)
    proposals.labels(group=str(group), node="1").inc(7)
    return generate_latest(registry).decode()


def _page_of(families: list[Metric]) -> str:
    class _Fixed:
        def collect(self) -> list[Metric]:
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed())
    return generate_latest(registry).decode()


def test_a_router_and_workers_merge_into_one_block_per_family() -> None:
    router = CollectorRegistry(auto_describe=False)
    latency = Histogram("raft_request_latency_seconds", "Time to answer a request, per operation.",
                        ["group", "node", "op", "component"], registry=router, buckets=LATENCY_BUCKETS)
    latency.labels(group="0", node="1", op="put", component="router").observe(0.004)
    health = GaugeMetricFamily("raft_node_health", "1 if the worker answers.", labels=["group", "node"])
    health.add_metric(["0", "1"], 1)
    health.add_metric(["1", "1"], 1)
    sources = [[health], router.collect(), *(text_string_to_metric_families(_worker_text(g)) for g in (0, 1))]
    page = _page_of(merge_families(sources))

    assert check_exposition(page) == [], page
    assert page.count("# HELP raft_request_latency_seconds ") == 1
    assert page.count("# TYPE raft_proposals_total counter") == 1
    assert "_created" not in page
    families, _ = parse_exposition(page)
    components = {dict(labels).get("component") for _, labels, _ in families["raft_request_latency_seconds"].samples}
    assert components == {"router", "worker"}
    if shutil.which("promtool"):
        checked = subprocess.run(["promtool", "check", "metrics"], input=page, capture_output=True, text=True,
                                 timeout=30)
        assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", ""), checked


def test_the_unmerged_page_is_caught() -> None:
    # What the host page looked like before merging: the same family twice.
    page = _worker_text(0) + _worker_text(1)
    assert any("second HELP" in e or "one group" in e for e in check_exposition(page))
    if shutil.which("promtool"):
        checked = subprocess.run(["promtool", "check", "metrics"], input=page, capture_output=True, text=True,
                                 timeout=30)
        assert checked.returncode != 0 and "second HELP" in checked.stderr


def test_a_family_of_another_type_is_left_out() -> None:
    gauge = GaugeMetricFamily("raft_proposals", "wrong type", labels=["group"])
    gauge.add_metric(["9"], 1)
    merged = merge_families([text_string_to_metric_families(_worker_text(0)), [gauge]])
    family = next(f for f in merged if f.name == "raft_proposals")
    assert family.type == "counter" and all(s.labels.get("group") == "0" for s in family.samples)
