"""The monitoring configuration: etc/prometheus.yml and the Grafana dashboard.

Checked statically: no Prometheus or Grafana is needed, and no YAML library (the
scrape configuration is read line by line).
"""
import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "etc" / "grafana" / "shardnode.json"
PROMETHEUS = ROOT / "etc" / "prometheus.yml"
CLUSTER = ROOT / "etc" / "cluster.toml"

GAUGES = {
    "raft_term", "raft_state", "raft_committed_index", "raft_applied_index", "raft_log_size",
    "raft_node_health", "raft_replication_lag", "raft_peer_queue_depth",
}
COUNTERS = {
    "raft_proposals_total", "raft_elections_won_total", "raft_leader_changes_total",
    "raft_snapshots_sent_total", "raft_snapshots_received_total", "raft_snapshots_taken_total",
    "raft_snapshot_send_seconds_total", "raft_snapshot_receive_seconds_total",
    "raft_peer_dropped_messages_total", "raft_rpc_errors_total",
    "raft_router_retries_total", "raft_router_redirects_total",
}
HISTOGRAMS = {"raft_request_latency_seconds", "raft_fsync_latency_seconds", "raft_proposal_batch_size"}
METRICS = GAUGES | COUNTERS | {h + s for h in HISTOGRAMS for s in ("_bucket", "_count", "_sum")}

# PromQL words that are not metric names: functions, aggregations, keywords, set operators.
PROMQL_FUNCTIONS = {
    "sum", "min", "max", "avg", "count", "topk", "bottomk", "quantile", "stddev", "stdvar",
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "vector",
    "scalar", "abs", "clamp_min", "clamp_max", "max_over_time", "min_over_time", "avg_over_time",
    "absent", "changes", "resets", "time", "label_replace",
}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                   "and", "or", "unless", "offset"}

_IDENT = re.compile(r"(?<![\w.$])([a-zA-Z_:][\w:]*)(\s*\()?")
_SELECTOR = re.compile(r"\b(raft_[a-z_]+)\s*(\{[^}]*\})?")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict) -> list[dict]:
    """All panels, including those nested in collapsed rows."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The metric names of a PromQL expression: strings, label matchers, grouping
    clauses and range selectors removed, then every identifier that is not a
    function or keyword."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    names = set()
    for name, call in _IDENT.findall(expr):
        if name in PROMQL_KEYWORDS:
            continue
        if call:
            assert name in PROMQL_FUNCTIONS, f"unknown function {name!r} in {expr!r}"
        else:
            names.add(name)
    return names


def test_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, op) (rate(raft_request_latency_seconds_bucket'
            '{group=~"$group", component="router"}[1m]))) and on (group, node) (raft_state == bool 2)')
    assert metric_names(expr) == {"raft_request_latency_seconds_bucket", "raft_state"}
    assert metric_names('count(sum by (group) (raft_node_health{node="raft_term"}) < 3) or vector(0)') \
        == {"raft_node_health"}


def test_dashboard_is_an_importable_dashboard(dashboard: dict) -> None:
    assert dashboard["title"] and dashboard["uid"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    group = variables["group"]
    query = group["query"]["query"] if isinstance(group["query"], dict) else group["query"]
    assert query == "label_values(raft_term, group)"
    assert group["multi"] and group["includeAll"]


def test_panels_have_unique_ids_and_a_grid_without_overlaps(dashboard: dict) -> None:
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: dict[tuple[int, int], str] = {}
    for p in dashboard["panels"]:  # top level: nested row panels have their own layout
        pos = p["gridPos"]
        assert all(isinstance(pos[k], int) for k in ("x", "y", "w", "h")), p["title"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["h"] > 0 and pos["x"] + pos["w"] <= 24, p["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
    for p in panels:
        assert "gridPos" in p, p["title"]


def test_panels_query_the_chosen_datasource_with_units(dashboard: dict) -> None:
    for p in _panels(dashboard):
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
        assert p["fieldConfig"]["defaults"].get("unit"), p["title"]
        if "latency" in p["title"].lower():
            assert p["fieldConfig"]["defaults"]["unit"] == "s", p["title"]


def test_expressions_use_only_known_metrics(dashboard: dict) -> None:
    seen = set()
    for expr in _exprs(dashboard):
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        unknown = names - METRICS
        assert not unknown, f"unknown metrics {sorted(unknown)} in {expr!r}"
        seen |= names
    histograms_used = {n.rsplit("_", 1)[0] for n in seen if n.endswith(("_bucket", "_count", "_sum"))}
    assert histograms_used == HISTOGRAMS
    assert GAUGES | COUNTERS <= seen, f"not on the dashboard: {sorted((GAUGES | COUNTERS) - seen)}"


def test_every_selector_is_filtered_by_the_group_variable(dashboard: dict) -> None:
    for expr in _exprs(dashboard):
        for name, matchers in _SELECTOR.findall(expr):
            assert 'group=~"$group"' in matchers, f"{name} without the $group filter in {expr!r}"


def test_prometheus_scrapes_every_host_of_the_cluster() -> None:
    hosts = tomllib.loads(CLUSTER.read_text())["host"]
    expected = {f"{h['address']}:{h['metrics_port']}": h["name"] for h in hosts}
    assert expected == {f"127.0.0.{i}:9090": f"host{i}" for i in range(1, 6)}

    text = PROMETHEUS.read_text()
    assert re.search(r"^global:\n(?:  .*\n)*?  scrape_interval: 5s$", text, re.M)
    assert re.findall(r"^\s*- job_name:\s*(\S+)", text, re.M) == ["shardnode"]
    scraped: dict[str, str | None] = {}
    last: list[str] = []
    for line in text.splitlines():
        if m := re.match(r"\s*-?\s*targets:\s*\[(.*)\]", line):
            last = [t.strip().strip("'\"") for t in m.group(1).split(",")]
            scraped.update(dict.fromkeys(last))
        elif m := re.match(r"\s*host:\s*(\S+)", line):
            scraped.update(dict.fromkeys(last, m.group(1).strip("'\"")))
    assert scraped == expected
