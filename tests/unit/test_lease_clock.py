"""The metadata group leader's clock of etcd leases (replica/lease_clock.py)
and the lease records (etcd/lease_records.py)."""

from __future__ import annotations

from shardnode.etcd.lease_records import LeaseRecord, decode_lease, encode_lease, lease_key, lease_of_key
from shardnode.replica.lease_clock import LeaseClock

TEN = LeaseRecord(10)


def test_a_lease_expires_after_its_ttl_unless_kept_alive() -> None:
    clock = LeaseClock()
    assert clock.remaining(1, 7, TEN, now=100.0) == 10
    assert clock.expired(1, {7: TEN}, now=105.0) == []
    assert clock.keep_alive(1, 7, TEN, now=105.0) == 10          # a full TTL from now
    assert clock.expired(1, {7: TEN}, now=114.0) == []
    assert clock.remaining(1, 7, TEN, now=114.5) == 1            # rounded up
    assert clock.expired(1, {7: TEN}, now=115.0) == [7]
    assert clock.keep_alive(1, 7, TEN, now=115.5) == 0            # too late: it is being revoked


def test_a_new_leader_gives_every_lease_a_full_ttl_never_less() -> None:
    clock = LeaseClock()
    clock.remaining(1, 7, TEN, now=100.0)
    assert clock.expired(1, {7: TEN}, now=109.0) == []
    # Term 2 (another leader, or this one again after an election): measured from its first look.
    assert clock.expired(2, {7: TEN}, now=112.0) == []
    assert clock.expired(2, {7: TEN}, now=121.9) == []
    assert clock.expired(2, {7: TEN}, now=122.0) == [7]


def test_revoking_and_gone_leases() -> None:
    clock = LeaseClock()
    assert clock.keep_alive(1, 7, None, now=0.0) == 0
    assert clock.remaining(1, 7, None, now=0.0) == -1
    assert clock.keep_alive(1, 7, LeaseRecord(10, revoking=True), now=0.0) == 0
    assert clock.expired(1, {7: LeaseRecord(10, revoking=True), 8: TEN}, now=0.0) == [7]


def test_records_round_trip_and_garbage_is_not_a_record() -> None:
    assert decode_lease(encode_lease(LeaseRecord(30, True))) == LeaseRecord(30, True)
    assert decode_lease(b"\xc1") is None and decode_lease(encode_lease(LeaseRecord(30))[:-1]) is None
    assert lease_of_key(lease_key(123)) == 123 and lease_of_key(b"etcd/lease/x") is None
