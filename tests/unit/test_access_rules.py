"""Users, roles and permissions on key ranges (shardnode/access/rules.py),
and their changes by compare-and-set (access/admin.py)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardnode.access.admin import AccessAdmin
from shardnode.access.rules import (AccessRules, AccessRulesError, Grants, Permission, PermissionType, interval,
                                    prefix_end)

READ, WRITE, READWRITE = PermissionType.READ, PermissionType.WRITE, PermissionType.READWRITE


def _rules(*permissions: Permission) -> AccessRules:
    rules = AccessRules().add_role("r").add_user("alice").grant_role("alice", "r")
    for permission in permissions:
        rules = rules.grant_permission("r", permission)
    return rules


def test_prefix_end_follows_etcd() -> None:
    assert prefix_end(b"app/") == b"app0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"
    assert prefix_end(b"") == b"\0"


def test_a_prefix_permission_covers_its_keys_and_ranges_within_only() -> None:
    grants = _rules(Permission(READ, b"app/", prefix_end(b"app/"))).grants("alice")
    assert grants.allows(READ, b"app/x")
    assert grants.allows(READ, b"app/", prefix_end(b"app/"))
    assert grants.allows(READ, b"app/a", b"app/b")
    assert not grants.allows(READ, b"apq")
    assert not grants.allows(READ, b"app", b"app/z"), "a range that starts before the prefix"
    assert not grants.allows(READ, b"app/", b"\0"), "every key from app/ on"
    assert not grants.allows(WRITE, b"app/x"), "read only"


def test_one_key_permission_and_readwrite() -> None:
    grants = _rules(Permission(READWRITE, b"k")).grants("alice")
    assert grants.allows(READ, b"k") and grants.allows(WRITE, b"k")
    assert not grants.allows(READ, b"k2") and not grants.allows(READ, b"k", b"k2")


def test_adjacent_permissions_together_cover_a_range() -> None:
    grants = _rules(Permission(WRITE, b"a", b"m"), Permission(WRITE, b"m", b"z")).grants("alice")
    assert grants.allows(WRITE, b"b", b"y")
    assert not grants.allows(WRITE, b"b", b"z\0")
    everything = _rules(Permission(READ, b"\0", b"\0")).grants("alice")
    assert everything.allows(READ, b"\0", b"\0") and everything.allows(READ, b"\x00\x01")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=1, max_size=3), st.binary(max_size=3)), max_size=6),
       st.binary(min_size=1, max_size=3), st.binary(max_size=3))
def test_grants_agree_with_a_key_by_key_check(ranges, key, end) -> None:
    permissions = []
    for start, stop in ranges:
        try:
            permissions.append(Permission(READ, start, stop))
        except AccessRulesError:
            continue
    if end and end != b"\0" and end <= key:
        return
    grants = Grants("u", permissions)
    # Every key of up to 4 bytes in the asked range must lie in some permission.
    universe = {bytes([a]) for a in range(0, 256, 37)} | {key, key + b"\0"} | {s for s, _ in ranges} \
        | {s + b"\0" for s, _ in ranges} | {e for _, e in ranges if e and e != b"\0"}
    low, high = interval(key, end)
    wanted = [k for k in universe if low <= k and (high is None or k < high)]

    def covered(k: bytes) -> bool:
        return any(s <= k and (h is None or k < h) for s, h in (p.interval() for p in permissions))
    if not all(covered(k) for k in wanted):
        assert not grants.allows(READ, key, end)
    if grants.allows(READ, key, end):
        assert all(covered(k) for k in wanted)


def test_changes_are_stated_as_the_state_wanted() -> None:
    rules = _rules(Permission(READ, b"k"))
    assert rules.add_user("alice") is rules
    assert rules.grant_role("alice", "r") is rules
    assert rules.grant_permission("r", Permission(READ, b"k")) is rules
    assert rules.revoke_permission("r", b"other") is rules
    # The same range with another type replaces the permission (etcd's behaviour).
    changed = rules.grant_permission("r", Permission(WRITE, b"k"))
    assert changed.roles["r"] == (Permission(WRITE, b"k"),) and changed.revision == rules.revision + 1
    with pytest.raises(AccessRulesError, match="no user 'bob'"):
        rules.grant_role("bob", "r")
    with pytest.raises(AccessRulesError, match="no role 'x'"):
        rules.grant_role("alice", "x")
    with pytest.raises(AccessRulesError, match="user name"):
        rules.add_user("a b")
    gone = rules.delete_role("r")
    assert gone.users["alice"] == () and gone.grants("alice").allows(READ, b"k") is False


def test_stored_form_round_trips_and_refuses_garbage() -> None:
    rules = _rules(Permission(READ, b"\xff\x00bin", b"\xff\x01"), Permission(WRITE, b"w"))
    assert AccessRules.decode(rules.encode()) == rules
    assert AccessRules.decode(None) == AccessRules()
    for raw in (b"not json", b'{"format": 9}', b'{"format": 1, "revision": 1}'):
        with pytest.raises(AccessRulesError):
            AccessRules.decode(raw)


class _Directory:
    """The metadata group's compare-and-set, with another writer landing in between."""

    def __init__(self) -> None:
        self.value: bytes | None = None
        self.interfere: list[bytes] = []

    async def read(self, key: bytes, timeout: float | None = None) -> bytes | None:
        return self.value

    async def compare_and_set(self, key: bytes, expected: bytes | None, new: bytes, timeout: float | None = None):
        if self.interfere:
            self.value = self.interfere.pop()
        if self.value != expected:
            return False, self.value
        self.value = new
        return True, new


def test_concurrent_operators_both_land_and_a_rerun_changes_nothing() -> None:
    directory = _Directory()
    admin = AccessAdmin(directory)  # type: ignore[arg-type]

    async def scenario() -> None:
        await admin.change(lambda r: r.add_role("r"))
        # Another operator adds bob between our read and our compare-and-set.
        directory.interfere.append(AccessRules.decode(directory.value).add_user("bob").encode())
        outcome = await admin.change(lambda r: r.add_user("alice"))
        assert outcome.changed and set(outcome.rules.users) == {"alice", "bob"}
        again = await admin.change(lambda r: r.add_user("alice"))
        assert not again.changed
        assert set(AccessRules.decode(directory.value).users) == {"alice", "bob"}

    asyncio.run(scenario())
