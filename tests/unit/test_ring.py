import collections
import hashlib

from shardnode.ring import ShardMap, stable_hash


def test_the_hash_is_the_specified_one() -> None:
    # Golden values (BLAKE2b-64, big-endian): changing the hash would move
    # every key to another group.
    assert stable_hash(b"") == 0xE4A6A0577479B2B4
    assert stable_hash(b"key") == int.from_bytes(hashlib.blake2b(b"key", digest_size=8).digest(), "big")


def test_the_map_is_deterministic_and_wraps_around() -> None:
    a, b = ShardMap.build(4, 64), ShardMap.build(4, 64)
    keys = [b"k%d" % i for i in range(1000)]
    assert [a.group_for(k) for k in keys] == [b.group_for(k) for k in keys]
    assert len(a.points) == 256 and list(a.points) == sorted(a.points)
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
