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
