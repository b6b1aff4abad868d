"""Who may read and write which keys through this router (docs/security.md,
"Users and roles").

With TLS on, a caller is the CN of its client certificate:
- the cluster's hosts and `allowed_clients` have every permission (the
  cluster's own processes, operators' tools, applications trusted whole);
- a user of the access rules (stored in the metadata group, followed with
  the shard map) has its roles' permissions, and nothing else;
- anyone else is refused by the Gatekeeper before any handler runs.
With TLS off no caller has an identity, and no request is restricted.

Rules change within one poll of the shard map follower (0.5 s). A router
that has not read them yet knows no user: users are refused until it does
(closed, not open, while it cannot tell).
"""

from __future__ import annotations

import logging

import grpc

from ..access.rules import AccessRules, AccessRulesError, Grants, PermissionType
from ..config import ClusterConfig
from ..errors import PermissionDenied
from ..security import allowed_identities, peer_common_name

log = logging.getLogger("shardnode.router")

READ = PermissionType.READ
WRITE = PermissionType.WRITE


class RouterAccess:
    """The router's view of the access rules. `in` tells the Gatekeeper which
    certificate names it may let in; `grants(context)` says what the
    caller may do now (None: everything). A stream looks up its caller once
    (`user`) and the caller's grants at each message (`grants_of`), so a
    change of the rules applies to streams already open."""

    def __init__(self, cluster: ClusterConfig) -> None:
        self._tls = cluster.security.tls
        self._trusted = allowed_identities(cluster, clients=True)
        self.rules = AccessRules()
        self._grants: dict[str, Grants] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._trusted or name in self._grants

    def adopt(self, raw: bytes | None) -> None:
        """The rules as the metadata group stores them now (None: none yet)."""
        try:
            rules = AccessRules.decode(raw)
        except AccessRulesError as exc:
            log.error("router.access_rules_unreadable", extra={"error": str(exc)})
            return
        if rules.revision < self.rules.revision:
            return
        grants = {}
        for user in rules.users:
            if user in self._trusted:
                # A host's or an allowed client's name: its certificate keeps every permission.
                log.warning("router.access_user_shadowed", extra={"user": user})
                continue
            grants[user] = rules.grants(user)
        self.rules, self._grants = rules, grants
        log.info("router.access_rules", extra={"revision": rules.revision, "users": len(rules.users),
                                               "roles": len(rules.roles)})

    def grants(self, context: grpc.aio.ServicerContext) -> Grants | None:
        """What the caller may do: None for every permission."""
        return self.grants_of(self.user(context))

    def user(self, context: grpc.aio.ServicerContext) -> str | None:
        """The caller's user name; None when it is not restricted (TLS off,
        a host, an allowed client)."""
        if not self._tls:
            return None
        name = peer_common_name(context)
        if name is None or name in self._trusted:
            return None
        return name

    def grants_of(self, user: str | None) -> Grants | None:
        if user is None:
            return None
        grants = self._grants.get(user)
        if grants is None:
            # Let in by an older rule set, gone since: nothing is allowed.
            return Grants(user, [])
        return grants


def check(grants: Grants | None, need: PermissionType, key: bytes, range_end: bytes = b"") -> None:
    """PermissionDenied unless `grants` allow `need` on the key or range."""
    if grants is None or grants.allows(need, key, range_end):
        return
    what = f"the key {key!r}" if not range_end else f"the range [{key!r}, {range_end!r})"
    raise PermissionDenied(f"user {grants.user!r} may not {need.value} {what}; nothing was done")
