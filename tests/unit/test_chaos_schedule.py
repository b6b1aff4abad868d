"""The chaos schedule (shardnode/chaos/schedule.py): a seed replays the same
faults; faults of the network and process track never overlap; changes of
shape have their own track; everything ends before the run does."""

from __future__ import annotations

import pytest

from shardnode.chaos.schedule import (ALL_KINDS, LEAD_IN_SECONDS, TAIL_SECONDS, VARIANTS, FaultKind, parse_kinds,
                                      plan)


def test_a_seed_replays_the_same_schedule_and_another_seed_does_not() -> None:
    first = plan(7, ALL_KINDS, 300, host_count=5, groups=4)
    assert first == plan(7, ALL_KINDS, 300, host_count=5, groups=4)
    assert first != plan(8, ALL_KINDS, 300, host_count=5, groups=4)


def test_one_fault_at_a_time_on_the_main_track_and_all_within_the_run() -> None:
    for seed in range(50):
        faults = plan(seed, ALL_KINDS, 200, host_count=5, groups=4)
        main = [f for f in faults if f.kind is not FaultKind.SHAPE]
        shapes = [f for f in faults if f.kind is FaultKind.SHAPE]
        assert main and shapes
        for track in (main, shapes):
            for before, after in zip(track, track[1:]):
                assert before.at + before.duration <= after.at, (seed, before, after)
        for fault in faults:
            assert LEAD_IN_SECONDS <= fault.at and fault.at + fault.duration <= 200 - TAIL_SECONDS
            assert fault.variant in VARIANTS[fault.kind]
            assert sorted(fault.hosts) == list(range(5)) and 0 <= fault.group < 4


def test_every_kind_and_variant_comes_up_in_a_long_run() -> None:
    faults = plan(3, ALL_KINDS, 3600, host_count=5, groups=4)
    seen = {(f.kind, f.variant) for f in faults}
    assert seen == {(kind, variant) for kind, variants in VARIANTS.items() for variant in variants}


def test_adding_shape_changes_keeps_the_other_track() -> None:
    without = plan(5, (FaultKind.PAUSE, FaultKind.KILL), 120, host_count=5, groups=2)
    with_shape = plan(5, (FaultKind.PAUSE, FaultKind.KILL, FaultKind.SHAPE), 120, host_count=5, groups=2)
    assert [f for f in with_shape if f.kind is not FaultKind.SHAPE] == without


def test_fault_kinds_are_parsed_in_our_order_and_unknown_ones_named() -> None:
    assert parse_kinds("shape, kill,partition") == (FaultKind.PARTITION, FaultKind.KILL, FaultKind.SHAPE)
    with pytest.raises(ValueError, match="unknown fault kind.*flood"):
        parse_kinds("kill,flood")
    with pytest.raises(ValueError, match="none given"):
        parse_kinds(" , ")


def test_without_netem_every_delay_fault_is_random_loss_and_the_rest_stays() -> None:
    kinds = (FaultKind.DELAY, FaultKind.KILL, FaultKind.SHAPE)
    with_netem = plan(11, kinds, 600, host_count=5, groups=2)
    without = plan(11, kinds, 600, host_count=5, groups=2, netem=False)
    delays = [f for f in without if f.kind is FaultKind.DELAY]
    assert delays and all(f.variant == "lossy-all" and f.loss_percent >= 1.0 for f in delays)
    assert [(f.kind, f.at, f.duration, f.hosts) for f in with_netem] == \
        [(f.kind, f.at, f.duration, f.hosts) for f in without]
