"""Users, roles and their permissions on key ranges (etcd's RBAC shape),
as the metadata group stores them under b"auth" (docs/security.md, "Users
and roles").

A role holds permissions; a permission lets its holder read, write, or
both, the keys of one range [key, range_end): range_end empty is the one key,
b"\\0" every key from `key` on (etcd's conventions). A user holds roles. A
request is allowed when the union of its user's permissions of the needed
kind covers every key it touches: a range read needs the whole range
covered, as etcd checks it.

Everything here is pure: `AccessRules` is an immutable value, changed by
returning a new one, so the admin commands can compare-and-set it.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field, replace
from enum import Enum

__all__ = [
    "AccessRules",
    "AccessRulesError",
    "Grants",
    "Permission",
    "PermissionType",
    "prefix_end",
]

#: The metadata group's key of the rules.
AUTH_KEY = b"auth"
#: Names of users and roles: what a certificate's CN and a file name can carry.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_FORMAT = 1


class AccessRulesError(ValueError):
    """A name or range that cannot be stored, or stored rules that cannot be read."""


class PermissionType(Enum):
    READ = "read"
    WRITE = "write"
    READWRITE = "readwrite"

    def allows(self, need: "PermissionType") -> bool:
        return self is PermissionType.READWRITE or self is need


def prefix_end(prefix: bytes) -> bytes:
    """The end of the range of every key that starts with `prefix` (etcd's
    GetPrefixRangeEnd): the prefix with its last byte below 0xff raised by
    one; b"\\0" (no end) for an empty prefix or one of 0xff bytes only."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def interval(key: bytes, range_end: bytes = b"") -> tuple[bytes, bytes | None]:
    """The keys [key, range_end) as [start, end), end None for no end."""
    if not range_end:
        return key, key + b"\0"
    return key, None if range_end == b"\0" else range_end


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise AccessRulesError(f"{what} name {name!r}: 1 to 64 letters, digits, '.', '_' or '-', "
                               "starting with a letter or digit")
    return name


@dataclass(frozen=True, slots=True)
class Permission:
    type: PermissionType
    key: bytes
    range_end: bytes = b""

    def __post_init__(self) -> None:
        if not self.key:
            raise AccessRulesError("a permission needs a key (b'\\0' with range end b'\\0' for every key)")
        if self.range_end and self.range_end != b"\0" and self.range_end <= self.key:
            raise AccessRulesError(f"range end {self.range_end!r} must come after the key {self.key!r}")

    def interval(self) -> tuple[bytes, bytes | None]:
        return interval(self.key, self.range_end)

    def describe(self) -> str:
        if not self.range_end:
            where = f"key {_show(self.key)}"
        elif self.range_end == b"\0":
            where = f"keys from {_show(self.key)} on"
        elif prefix_end(self.key) == self.range_end:
            where = f"prefix {_show(self.key)}"
        else:
            where = f"range [{_show(self.key)}, {_show(self.range_end)})"
        return f"{self.type.value} {where}"

    def to_json(self) -> dict[str, str]:
        return {"type": self.type.value, "key": _b64(self.key), "range_end": _b64(self.range_end)}

    @classmethod
    def from_json(cls, raw: dict) -> "Permission":
        return cls(PermissionType(raw["type"]), _unb64(raw["key"]), _unb64(raw.get("range_end", "")))


class Grants:
    """What one user may do: the merged intervals of its permissions per
    kind, checked in O(log n) per request."""

    __slots__ = ("user", "_intervals")

    def __init__(self, user: str, permissions: list[Permission]) -> None:
        self.user = user
        self._intervals: dict[PermissionType, list[tuple[bytes, bytes | None]]] = {}
        for need in (PermissionType.READ, PermissionType.WRITE):
            self._intervals[need] = _merge([p.interval() for p in permissions if p.type.allows(need)])

    def allows(self, need: PermissionType, key: bytes, range_end: bytes = b"") -> bool:
        """May the user `need` (READ or WRITE) the key, or the range [key, range_end)?"""
        start, end = interval(key or b"\0", range_end)
        for low, high in self._intervals[need]:
            if low > start:
                return False
            if high is None or start < high:
                # This interval holds `start`; merged intervals do not touch, so it must hold the rest too.
                return high is None or (end is not None and end <= high)
        return False


def _merge(intervals: list[tuple[bytes, bytes | None]]) -> list[tuple[bytes, bytes | None]]:
    merged: list[tuple[bytes, bytes | None]] = []
    for start, end in sorted(intervals, key=lambda i: i[0]):
        if merged:
            last_start, last_end = merged[-1]
            if last_end is None:
                break
            if start <= last_end:
                merged[-1] = (last_start, None if end is None else max(last_end, end))
                continue
        merged.append((start, end))
    return merged


@dataclass(frozen=True, slots=True)
class AccessRules:
    """Every user and role. `revision` grows with each change (for the
    routers, which adopt only newer rules)."""

    revision: int = 0
    users: dict[str, tuple[str, ...]] = field(default_factory=dict)           # user -> its roles
    roles: dict[str, tuple[Permission, ...]] = field(default_factory=dict)    # role -> its permissions

    # --- Reading --------------------------------------------------------------------------

    def grants(self, user: str) -> Grants | None:
        """The user's grants; None if there is no such user."""
        roles = self.users.get(user)
        if roles is None:
            return None
        return Grants(user, [p for role in roles for p in self.roles.get(role, ())])

    # --- Changing (each returns new rules, or these when nothing changes) -----------------

    def add_user(self, user: str) -> "AccessRules":
        check_name(user, "user")
        if user in self.users:
            return self
        return self._changed(users={**self.users, user: ()})

    def delete_user(self, user: str) -> "AccessRules":
        if user not in self.users:
            return self
        return self._changed(users={u: r for u, r in self.users.items() if u != user})

    def add_role(self, role: str) -> "AccessRules":
        check_name(role, "role")
        if role in self.roles:
            return self
        return self._changed(roles={**self.roles, role: ()})

    def delete_role(self, role: str) -> "AccessRules":
        """The role goes, and with it every user's grant of it."""
        if role not in self.roles:
            return self
        return self._changed(roles={r: p for r, p in self.roles.items() if r != role},
                             users={u: tuple(r for r in roles if r != role) for u, roles in self.users.items()})

    def grant_role(self, user: str, role: str) -> "AccessRules":
        self._need(user=user, role=role)
        if role in self.users[user]:
            return self
        return self._changed(users={**self.users, user: (*self.users[user], role)})

    def revoke_role(self, user: str, role: str) -> "AccessRules":
        self._need(user=user)
        if role not in self.users[user]:
            return self
        return self._changed(users={**self.users, user: tuple(r for r in self.users[user] if r != role)})

    def grant_permission(self, role: str, permission: Permission) -> "AccessRules":
        """Adds the permission; one on the same range of another type is replaced (etcd's behaviour)."""
        self._need(role=role)
        kept = tuple(p for p in self.roles[role] if (p.key, p.range_end) != (permission.key, permission.range_end))
        if permission in self.roles[role]:
            return self
        return self._changed(roles={**self.roles, role: (*kept, permission)})

    def revoke_permission(self, role: str, key: bytes, range_end: bytes = b"") -> "AccessRules":
        self._need(role=role)
        kept = tuple(p for p in self.roles[role] if (p.key, p.range_end) != (key, range_end))
        if len(kept) == len(self.roles[role]):
            return self
        return self._changed(roles={**self.roles, role: kept})

    def _need(self, *, user: str | None = None, role: str | None = None) -> None:
        if user is not None and user not in self.users:
            raise AccessRulesError(f"no user {user!r}")
        if role is not None and role not in self.roles:
            raise AccessRulesError(f"no role {role!r}")

    def _changed(self, **fields) -> "AccessRules":
        return replace(self, revision=self.revision + 1, **fields)

    # --- Stored form ----------------------------------------------------------------------

    def encode(self) -> bytes:
        return json.dumps({
            "format": _FORMAT, "revision": self.revision,
            "users": {u: {"roles": list(r)} for u, r in sorted(self.users.items())},
            "roles": {r: {"permissions": [p.to_json() for p in ps]} for r, ps in sorted(self.roles.items())},
        }, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> "AccessRules":
        if raw is None:
            return cls()
        try:
            data = json.loads(raw)
            if data.get("format") != _FORMAT:
                raise AccessRulesError(f"stored access rules have format {data.get('format')!r}, "
                                       f"this version reads {_FORMAT}")
            return cls(
                revision=int(data["revision"]),
                users={u: tuple(v["roles"]) for u, v in data["users"].items()},
                roles={r: tuple(Permission.from_json(p) for p in v["permissions"])
                       for r, v in data["roles"].items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            if isinstance(exc, AccessRulesError):
                raise
            raise AccessRulesError(f"stored access rules cannot be read: {exc}") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


def _show(data: bytes) -> str:
    try:
        text = data.decode()
        if text.isprintable():
            return repr(text)
    except UnicodeDecodeError:
        pass
    return repr(data)
