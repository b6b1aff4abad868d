import collections
import hashlib

import bisect

import pytest

from shardnode.placement.shard_map import SPACE, KeyRange, Move, RangeSet, ShardMap, ShardMapError, stable_hash


def test_the_hash_is_the_specified_one() -> None:
    # Golden values (BLAKE2b-64, big-endian): changing the hash would move
    # every key to another group.
    assert stable_hash(b"") == 0xE4A6A0577479B2B4
    assert stable_hash(b"key") == int.from_bytes(hashlib.blake2b(b"key", digest_size=8).digest(), "big")


def test_the_map_is_deterministic_and_wraps_around() -> None:
    a, b = ShardMap.build(4, 64), ShardMap.build(4, 64)
    keys = [b"k%d" % i for i in range(1000)]
    assert [a.group_for(k) for k in keys] == [b.group_for(k) for k in keys]
    assert list(a.starts) == sorted(set(a.starts)) and a.starts[0] == 0
    assert a.group_for(b"") in range(4)


def test_keys_spread_over_every_group() -> None:
    ring = ShardMap.build(4, 64)
    counts = collections.Counter(ring.group_for(b"user:%d" % i) for i in range(20_000))
    assert set(counts) == {0, 1, 2, 3}
    assert min(counts.values()) > 0.15 * 20_000, counts


def test_adding_a_group_moves_only_a_fraction_of_the_keys() -> None:
    before, after = ShardMap.build(4, 64), ShardMap.build(5, 64, epoch=2)
    keys = [b"k%d" % i for i in range(10_000)]
    moved = sum(before.group_for(k) != after.group_for(k) for k in keys)
    assert moved < 0.35 * len(keys)
    assert all(after.group_for(k) == 4 for k in keys if before.group_for(k) != after.group_for(k))


def _ring_owner(groups: int, vnodes: int, key: bytes) -> int:
    """The consistent-hash ring as the first release computed it."""
    ring = sorted((stable_hash(b"group-%d/vnode-%d" % (g, v)), g) for g in range(groups) for v in range(vnodes))
    points = [p for p, _ in ring]
    return ring[bisect.bisect_left(points, stable_hash(key)) % len(ring)][1]


def test_the_ranges_route_exactly_as_the_ring_did() -> None:
    # Data written before the shard map had ranges must stay where it is.
    shard_map = ShardMap.build(4, 64)
    keys = [b"k%d" % i for i in range(5000)]
    assert [shard_map.group_for(k) for k in keys] == [_ring_owner(4, 64, k) for k in keys]
    assert abs(sum(shard_map.share(g) for g in range(4)) - 1.0) < 1e-12


def test_a_planned_add_gives_the_new_group_a_fair_share_and_moves_nothing_else() -> None:
    before = ShardMap.build(4, 64).with_group(4, ("host1", "host2", "host3"))
    after = before
    for move in before.plan_add(4):
        after = after.with_move(move)
    assert after.epoch == before.epoch + 4
    assert abs(after.share(4) - 0.2) < 0.01
    keys = [b"u%d" % i for i in range(20_000)]
    moved = [k for k in keys if before.group_for(k) != after.group_for(k)]
    assert all(after.group_for(k) == 4 for k in moved)
    assert 0.17 < len(moved) / len(keys) < 0.23


def test_a_planned_remove_leaves_the_group_empty_and_spreads_its_ranges() -> None:
    before = ShardMap.build(4, 64)
    after = before
    for move in before.plan_remove(2):
        assert move.source == 2
        after = after.with_move(move)
    assert not after.owned_by(2)
    assert {after.group_for(b"x%d" % i) for i in range(2000)} == {0, 1, 3}
    after = after.without_group(2)
    assert after.groups == (0, 1, 3) and after.retired == (2,) and after.next_group == 4
    assert ShardMap.decode(after.encode()) == after
    with pytest.raises(ShardMapError):
        after.with_group(2, ("h1", "h2", "h3"))      # a removed group's number never comes back
    with pytest.raises(ShardMapError):
        before.without_group(2)        # still owns key space


def test_a_move_of_ranges_the_source_does_not_own_is_refused() -> None:
    shard_map = ShardMap.build(2, 8)
    with pytest.raises(ShardMapError):
        shard_map.with_move(Move(0, 1, shard_map.owned_by(1)))


def test_range_sets() -> None:
    a = RangeSet([KeyRange(0, 10), KeyRange(10, 20), KeyRange(30, 40)])
    assert list(a) == [KeyRange(0, 20), KeyRange(30, 40)]
    assert 19 in a and 20 not in a and 30 in a and 40 not in a
    assert list(a.difference([KeyRange(5, 35)])) == [KeyRange(0, 5), KeyRange(35, 40)]
    assert a.covers([KeyRange(1, 3), KeyRange(31, 40)]) and not a.covers([KeyRange(19, 21)])
    assert RangeSet.from_wire(a.to_wire()) == a
    full = RangeSet([KeyRange(0, SPACE)])
    assert full.size == SPACE and (SPACE - 1) in full


def test_the_map_round_trips_and_garbage_is_refused() -> None:
    shard_map = ShardMap.build(3, 16).with_group(7, ("h1", "h2", "h3"))
    assert ShardMap.decode(shard_map.encode()) == shard_map
    for garbage in (b"", b"\x01", b"\x96\x01\x01\x90\x90\x90\x80", msgpack_bad()):
        with pytest.raises(ShardMapError):
            ShardMap.decode(garbage)


def test_a_group_created_online_gets_an_incarnation_that_travels_with_the_map() -> None:
    import msgpack

    base = ShardMap.build(3, 16)
    named = base.with_group(7, ("h1", "h2", "h3"), incarnation=0x6A)
    assert named.incarnations == {7: 0x6A}
    drawn = base.with_group(7, ("h1", "h2", "h3"))                 # the call as it was: a random one
    assert 0 < drawn.incarnations[7] < 1 << 63 and drawn.incarnations[7] != base.with_group(7, ("h1",)).incarnations[7]
    assert ShardMap.decode(named.encode()) == named
    moved = named.with_move(base.plan_add(7)[0])
    assert moved.incarnations == {7: 0x6A}
    assert named.without_group(7).incarnations == {}, "a removed group's incarnation goes with it"
    # A map written before incarnations (seven fields) still decodes, with none.
    seven = msgpack.packb(msgpack.unpackb(named.encode(), strict_map_key=False)[:7])
    assert ShardMap.decode(seven).incarnations == {}
    assert len(msgpack.unpackb(base.encode(), strict_map_key=False)) == 7, "no incarnation: the old bytes"
    with pytest.raises(ShardMapError):
        base.with_group(7, ("h1",), incarnation=0)


def msgpack_bad() -> bytes:
    import msgpack
    return msgpack.packb([1, 1, [5], [0], [0], {}])     # ranges do not start at 0
