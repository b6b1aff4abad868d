"""The pure helpers of bench/versus_etcd.py (the bench itself is not part of make test)."""

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "versus_etcd", Path(__file__).resolve().parents[2] / "bench" / "versus_etcd.py")
versus_etcd = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("versus_etcd", versus_etcd)   # dataclasses look their module up
_spec.loader.exec_module(versus_etcd)


def test_lists_and_callers():
    assert versus_etcd.parse_list(" put, get ", ("put", "get")) == ["put", "get"]
    assert versus_etcd.parse_callers("1,16,64") == [1, 16, 64]
    with pytest.raises(ValueError):
        versus_etcd.parse_list("put,scan", ("put", "get"))
    with pytest.raises(ValueError):
        versus_etcd.parse_callers("0")


def test_cpu_seconds_from_stat_counts_fields_after_the_command_name():
    fields = ["S"] + ["0"] * 10 + ["250", "50"] + ["0"] * 30   # utime, stime: fields 14, 15
    stat = "123 (py (x) y) " + " ".join(fields)
    assert versus_etcd.cpu_seconds_from_stat(stat) == 300 / versus_etcd.CLOCK_TICKS


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert versus_etcd.percentile(values, 0.50) == 50.0
    assert versus_etcd.percentile(values, 0.99) == 99.0
    assert versus_etcd.percentile([], 0.5) == 0.0


def test_collapsed_stacks_give_own_and_inclusive_time():
    lines = ["thread (1): MainThread;main (a.py:1);put (b.py:2) 3",
             "thread (1): MainThread;main (a.py:1);put (b.py:9);encode (c.py:4) 1"]
    summary = versus_etcd.summarize_collapsed(lines)
    assert summary["samples"] == 4
    assert summary["own"][0] == ("put (b.py)", 3, 75.0)
    assert ("main (a.py)", 4, 100.0) in summary["inclusive"]
    assert summary["threads"] == {"thread (1): MainThread": 4}


def test_table_has_a_row_per_way_of_driving_shardnode_with_its_ratio_to_etcd():
    def round_(system, ops, cpu, callers=64):
        return {"system": system, "op": "put", "callers": callers, "ops_per_second": ops, "p50_ms": 1.0,
                "p99_ms": 2.0, "cpu_ms_per_op": cpu, "errors": {}}
    etcd = round_("etcd", 4000.0, 0.2)
    table = versus_etcd.format_table([(etcd, round_("shardnode", 1000.0, 0.8), "rpc"),
                                      (etcd, round_("shardnode", 6000.0, 0.3), "async")])
    rows = table.splitlines()[2:]
    assert "router API, 1 RPC per op" in rows[0] and "| 0.25 | 4.0 |" in rows[0]
    assert "AsyncClient, 64 tasks" in rows[1] and "| 1.50 | 1.5 |" in rows[1]


def test_a_range_round_reads_the_next_keys_and_stops_at_the_last() -> None:
    assert versus_etcd.range_end(versus_etcd.bench_key(5)) == versus_etcd.bench_key(5 + versus_etcd.RANGE_KEYS)
    last = versus_etcd.bench_key(versus_etcd.KEYS - 1)
    assert last < versus_etcd.range_end(last) == versus_etcd.bench_key(versus_etcd.KEYS)
