"""`shardnode user ...` and `shardnode role ...` (docs/security.md, "Users
and roles"): etcd's RBAC shape. A role holds permissions to read and/or write
key ranges; a user holds roles, and is the CN of a client certificate that
`user add` issues when the CA's key is here. Routers enforce the rules when
TLS is on.

Every command states the state wanted, so running it twice, or again after
it was killed, is safe: what is already so is reported ("already"), exit 0.
Exit 2 with one line on stderr when refused (no such user, a reserved name,
the metadata group unreachable): nothing changed then, or, for an
unreachable metadata group, the outcome is unknown and the command can be
run again."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..config import ClusterConfig, ConfigError, default_config_path
from ..errors import ShardnodeError

PROG = "shardnode"


def register(subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    _register_users(subparsers, parents)
    _register_roles(subparsers, parents)


def _register_users(subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser]) -> None:
    user = subparsers.add_parser(
        "user", parents=list(parents), help="users: client certificates limited to their roles' key ranges",
        description="A user is the name (CN) of a client certificate. With TLS on, a router lets a user's "
                    "certificate in and allows it exactly what its roles allow; the hosts' certificates and "
                    "allowed_clients keep every permission.")
    commands = user.add_subparsers(dest="user_command", metavar="COMMAND", required=True)
    add = commands.add_parser("add", parents=list(parents), help="add a user and issue its certificate",
                              description="Add USER and, where the CA's key is (certs_dir/ca.key), issue its "
                                          "client certificate and key (certs_dir/users/USER.crt, .key; an "
                                          "existing pair is kept).")
    add.add_argument("name", metavar="USER")
    add.add_argument("--no-cert", action="store_true", help="only record the user; issue no certificate")
    add.add_argument("--cert-dir", type=Path, help="write the certificate there (default: certs_dir/users)")
    add.set_defaults(func=_user_add)
    delete = commands.add_parser("delete", parents=list(parents), help="remove a user (its certificate is refused "
                                                                       "from the next poll of each router)")
    delete.add_argument("name", metavar="USER")
    delete.set_defaults(func=_user_delete)
    grant = commands.add_parser("grant-role", parents=list(parents), help="give a user a role")
    grant.add_argument("name", metavar="USER")
    grant.add_argument("role", metavar="ROLE")
    grant.set_defaults(func=_user_grant)
    revoke = commands.add_parser("revoke-role", parents=list(parents), help="take a role from a user")
    revoke.add_argument("name", metavar="USER")
    revoke.add_argument("role", metavar="ROLE")
    revoke.set_defaults(func=_user_revoke)
    get = commands.add_parser("get", parents=list(parents), help="a user's roles and what they allow")
    get.add_argument("name", metavar="USER")
    get.add_argument("--json", action="store_true")
    get.set_defaults(func=_user_get)
    listing = commands.add_parser("list", parents=list(parents), help="every user")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_user_list)


def _register_roles(subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser]) -> None:
    role = subparsers.add_parser("role", parents=list(parents), help="roles: permissions on key ranges",
                                 description="A role holds permissions: read, write or readwrite on one key, a "
                                             "prefix, a range [KEY, END) or every key from KEY on (END '\\0').")
    commands = role.add_subparsers(dest="role_command", metavar="COMMAND", required=True)
    add = commands.add_parser("add", parents=list(parents), help="add a role (no permission yet)")
    add.add_argument("name", metavar="ROLE")
    add.set_defaults(func=_role_add)
    delete = commands.add_parser("delete", parents=list(parents), help="remove a role (and every user's grant of it)")
    delete.add_argument("name", metavar="ROLE")
    delete.set_defaults(func=_role_delete)
    for name, func, helptext in (("grant-permission", _role_grant, "allow a role to read and/or write keys"),
                                 ("revoke-permission", _role_revoke, "take a permission from a role")):
        parser = commands.add_parser(name, parents=list(parents), help=helptext,
                                     description=f"{helptext[0].upper()}{helptext[1:]}: KEY alone is that key; "
                                                 "with --prefix every key that starts with KEY; with END the "
                                                 "range [KEY, END), END '\\0' meaning every key from KEY on "
                                                 "(etcdctl's conventions).")
        parser.add_argument("name", metavar="ROLE")
        if name == "grant-permission":
            parser.add_argument("type", choices=("read", "write", "readwrite"))
        parser.add_argument("key", metavar="KEY")
        parser.add_argument("range_end", metavar="END", nargs="?", default="")
        parser.add_argument("--prefix", action="store_true", help="every key that starts with KEY")
        parser.set_defaults(func=func)
    get = commands.add_parser("get", parents=list(parents), help="a role's permissions")
    get.add_argument("name", metavar="ROLE")
    get.add_argument("--json", action="store_true")
    get.set_defaults(func=_role_get)
    listing = commands.add_parser("list", parents=list(parents), help="every role")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_role_list)


# --- Running a change ---------------------------------------------------------------------


def _cluster(args: argparse.Namespace) -> ClusterConfig:
    return ClusterConfig.load(getattr(args, "config", None) or str(default_config_path()))


def _timeout(args: argparse.Namespace) -> float:
    return float(getattr(args, "timeout", None) or 10.0)


def _with_rules(args: argparse.Namespace, action: Callable) -> int:
    """Run `action(admin)` against the metadata group; one line and exit 2 on refusal."""
    from ..access.admin import AccessAdmin
    from ..access.rules import AccessRulesError
    from ..placement.directory import ShardDirectory

    import asyncio

    async def run() -> int:
        directory = ShardDirectory(cluster, timeout=_timeout(args))
        try:
            return await action(AccessAdmin(directory))
        finally:
            await directory.close()

    try:
        cluster = _cluster(args)
        return asyncio.run(run())
    except (ConfigError, ShardnodeError, AccessRulesError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2


def _change(args: argparse.Namespace, how: Callable, done: str, already: str) -> int:
    async def action(admin) -> int:  # type: ignore[no-untyped-def]
        outcome = await admin.change(how)
        print(done if outcome.changed else already)
        return 0
    return _with_rules(args, action)


def _reserved_names(cluster: ClusterConfig) -> set[str]:
    from ..security import ADMIN_USER
    return {h.name for h in cluster.hosts} | set(cluster.security.allowed_clients) | {"ca", ADMIN_USER}


# --- Users ----------------------------------------------------------------------------------


def _user_add(args: argparse.Namespace) -> int:
    from ..access.rules import check_name

    try:
        cluster = _cluster(args)
        check_name(args.name, "user")
    except (ConfigError, ValueError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    if args.name in _reserved_names(cluster):
        print(f"{PROG}: user name {args.name!r} is taken: the cluster's hosts, allowed_clients, 'ca' and 'admin' "
              "keep every permission and cannot be users", file=sys.stderr)
        return 2
    status = _change(args, lambda rules: rules.add_user(args.name), f"user {args.name} added",
                     f"user {args.name} exists already")
    if status != 0 or args.no_cert:
        return status
    if not cluster.security.tls and not cluster.security.ca_key_file.exists():
        print("note: [security] tls is off and the cluster has no CA here: no certificate issued; routers know no "
              "caller's identity and enforce the rules once TLS is on (docs/security.md)", file=sys.stderr)
        return 0
    from ..certs import CertsRefused, issue_user_certificate
    try:
        cert_file, key_file = issue_user_certificate(cluster, args.name, args.cert_dir)
    except (CertsRefused, OSError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    print(f"certificate {cert_file}, key {key_file} (client_cert_file and client_key_file in the user's "
          "cluster.toml; etcdctl --cert/--key)")
    if not cluster.security.tls:
        print("note: [security] tls is off: routers know no caller's identity, and the rules are not enforced "
              "until it is on", file=sys.stderr)
    return 0


def _user_delete(args: argparse.Namespace) -> int:
    return _change(args, lambda rules: rules.delete_user(args.name), f"user {args.name} deleted",
                   f"no user {args.name}: deleted already")


def _user_grant(args: argparse.Namespace) -> int:
    return _change(args, lambda rules: rules.grant_role(args.name, args.role),
                   f"role {args.role} granted to user {args.name}", f"user {args.name} holds role {args.role} already")


def _user_revoke(args: argparse.Namespace) -> int:
    return _change(args, lambda rules: rules.revoke_role(args.name, args.role),
                   f"role {args.role} revoked from user {args.name}",
                   f"user {args.name} does not hold role {args.role}: revoked already")


def _user_get(args: argparse.Namespace) -> int:
    async def action(admin) -> int:  # type: ignore[no-untyped-def]
        rules = await admin.load()
        if args.name not in rules.users:
            print(f"{PROG}: no user {args.name!r}", file=sys.stderr)
            return 2
        roles = rules.users[args.name]
        if args.json:
            print(json.dumps({"user": args.name, "roles": list(roles),
                              "permissions": {r: [p.describe() for p in rules.roles.get(r, ())] for r in roles}}))
            return 0
        print(f"user {args.name}: roles {', '.join(roles) or '(none)'}")
        for role in roles:
            for permission in rules.roles.get(role, ()):
                print(f"  {role}: {permission.describe()}")
        return 0
    return _with_rules(args, action)


def _user_list(args: argparse.Namespace) -> int:
    async def action(admin) -> int:  # type: ignore[no-untyped-def]
        rules = await admin.load()
        if args.json:
            print(json.dumps({u: list(r) for u, r in sorted(rules.users.items())}))
        else:
            for user, roles in sorted(rules.users.items()):
                print(f"{user}\t{', '.join(roles)}")
        return 0
    return _with_rules(args, action)


# --- Roles ----------------------------------------------------------------------------------


def _role_add(args: argparse.Namespace) -> int:
    return _change(args, lambda rules: rules.add_role(args.name), f"role {args.name} added",
                   f"role {args.name} exists already")


def _role_delete(args: argparse.Namespace) -> int:
    return _change(args, lambda rules: rules.delete_role(args.name), f"role {args.name} deleted",
                   f"no role {args.name}: deleted already")


def _range(args: argparse.Namespace) -> tuple[bytes, bytes]:
    from ..access.rules import AccessRulesError, prefix_end

    key = args.key.encode()
    if args.prefix and args.range_end:
        raise AccessRulesError("give END or --prefix, not both")
    if args.prefix:
        return key, prefix_end(key)
    end = args.range_end.encode()
    return key, (b"\0" if end in (b"\\0", b"\0") else end)


def _role_grant(args: argparse.Namespace) -> int:
    from ..access.rules import AccessRulesError, Permission, PermissionType

    try:
        permission = Permission(PermissionType(args.type), *_range(args))
    except AccessRulesError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    return _change(args, lambda rules: rules.grant_permission(args.name, permission),
                   f"role {args.name}: {permission.describe()} granted",
                   f"role {args.name} has {permission.describe()} already")


def _role_revoke(args: argparse.Namespace) -> int:
    from ..access.rules import AccessRulesError

    try:
        key, end = _range(args)
    except AccessRulesError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    return _change(args, lambda rules: rules.revoke_permission(args.name, key, end),
                   f"role {args.name}: permission on {args.key!r} revoked",
                   f"role {args.name} has no permission on exactly that range: revoked already")


def _role_get(args: argparse.Namespace) -> int:
    async def action(admin) -> int:  # type: ignore[no-untyped-def]
        rules = await admin.load()
        if args.name not in rules.roles:
            print(f"{PROG}: no role {args.name!r}", file=sys.stderr)
            return 2
        permissions = rules.roles[args.name]
        if args.json:
            print(json.dumps({"role": args.name, "permissions": [p.to_json() for p in permissions]}))
            return 0
        print(f"role {args.name}:" + ("" if permissions else " no permission"))
        for permission in permissions:
            print(f"  {permission.describe()}")
        return 0
    return _with_rules(args, action)


def _role_list(args: argparse.Namespace) -> int:
    async def action(admin) -> int:  # type: ignore[no-untyped-def]
        rules = await admin.load()
        if args.json:
            print(json.dumps(sorted(rules.roles)))
        else:
            for role in sorted(rules.roles):
                print(role)
        return 0
    return _with_rules(args, action)
