"""`shardnode lease ...` and `shardnode watch`: etcd's leases and watches
under shardnode's names (docs/cli.md, docs/etcd.md). Lease ids are printed
and read in hexadecimal, as etcdctl does."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import LeaseNotFound

if TYPE_CHECKING:
    from ..client import Client

EXIT_OK = 0
EXIT_NOT_FOUND = 1


def lease_id(text: str) -> int:
    """A lease id as etcdctl prints it (hexadecimal, an optional 0x)."""
    try:
        value = int(text, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a lease id (hexadecimal, as `lease grant` prints it): {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError("a lease id is positive")
    return value


def register(commands: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser]) -> None:
    lease = commands.add_parser("lease", parents=list(parents), help="leases: keys that go when the lease ends",
                                description="Grant, keep alive, revoke and inspect leases. A key put with "
                                            "`put --lease ID` is deleted when its lease is revoked or expires "
                                            "(docs/etcd.md, \"Leases\").")
    actions = lease.add_subparsers(title="lease commands", metavar="ACTION", required=True)
    grant = actions.add_parser("grant", parents=list(parents), help="a new lease of TTL seconds")
    grant.add_argument("ttl", type=int, metavar="TTL")
    grant.set_defaults(func=_grant)
    revoke = actions.add_parser("revoke", parents=list(parents), help="end a lease: its keys are deleted")
    revoke.add_argument("lease", type=lease_id, metavar="ID")
    revoke.set_defaults(func=_revoke)
    keep = actions.add_parser("keep-alive", parents=list(parents),
                              help="renew a lease (every third of its TTL until Ctrl-C, or once)")
    keep.add_argument("lease", type=lease_id, metavar="ID")
    keep.add_argument("--once", action="store_true", help="renew once and exit")
    keep.set_defaults(func=_keep_alive)
    ttl = actions.add_parser("ttl", parents=list(parents), help="the seconds a lease has left")
    ttl.add_argument("lease", type=lease_id, metavar="ID")
    ttl.set_defaults(func=_ttl)
    listing = actions.add_parser("list", parents=list(parents), help="every lease's id")
    listing.set_defaults(func=_list)

    watch = commands.add_parser("watch", parents=list(parents), help="print the changes of a key or prefix",
                                description="Print each change of KEY (or of every key starting with it) as it "
                                            "happens, as etcdctl does: PUT or DELETE, the key, the value. Runs "
                                            "until Ctrl-C, or until --count changes were printed.")
    watch.add_argument("key", metavar="KEY")
    watch.add_argument("--prefix", action="store_true", help="every key that starts with KEY")
    watch.add_argument("--rev", type=int, default=0, metavar="REVISION",
                       help="start at this revision (the changes a replica still remembers)")
    watch.add_argument("--prev-kv", action="store_true", help="also print the value before each change")
    watch.add_argument("--count", type=int, default=0, metavar="N", help="exit after N changes")
    watch.set_defaults(func=_watch)


def _client(args: argparse.Namespace) -> Client:
    from ..client import Client     # imported by the commands that call the cluster (the CLI starts faster)

    return Client.from_config(args.config, timeout=args.timeout)


def _grant(args: argparse.Namespace) -> int:
    with _client(args) as client:
        lease, ttl = client.lease_grant(args.ttl)
    print(f"lease {lease:x} granted with TTL({ttl}s)")
    return EXIT_OK


def _revoke(args: argparse.Namespace) -> int:
    with _client(args) as client:
        try:
            client.lease_revoke(args.lease)
        except LeaseNotFound:
            print(f"lease {args.lease:x} not found", file=sys.stderr)
            return EXIT_NOT_FOUND
    print(f"lease {args.lease:x} revoked")
    return EXIT_OK


def _keep_alive(args: argparse.Namespace) -> int:
    with _client(args) as client:
        while True:
            try:
                ttl = client.lease_keep_alive(args.lease)
            except LeaseNotFound:
                print(f"lease {args.lease:x} expired or revoked", file=sys.stderr)
                return EXIT_NOT_FOUND
            print(f"lease {args.lease:x} keepalived with TTL({ttl})", flush=True)
            if args.once:
                return EXIT_OK
            time.sleep(max(0.5, ttl / 3))


def _ttl(args: argparse.Namespace) -> int:
    with _client(args) as client:
        try:
            left, granted = client.lease_time_to_live(args.lease)
        except LeaseNotFound:
            print(f"lease {args.lease:x} already expired", file=sys.stderr)
            return EXIT_NOT_FOUND
    print(f"lease {args.lease:x} granted with TTL({granted}s), remaining({left}s)")
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        leases = client.leases()
    print(f"found {len(leases)} leases")
    for lease in leases:
        print(f"{lease:x}")
    return EXIT_OK


def _watch(args: argparse.Namespace) -> int:
    printed = 0
    out = sys.stdout.buffer
    with _client(args) as client:
        for event in client.watch(os.fsencode(args.key), prefix=args.prefix, start_revision=args.rev,
                                  prev_value=args.prev_kv):
            lines = [event.kind.upper().encode(), event.key]
            if args.prev_kv and event.previous is not None:
                lines.append(event.previous)
            if event.kind == "put":
                lines.append(event.value)
            out.write(b"".join(line + b"\n" for line in lines))
            out.flush()
            printed += 1
            if args.count and printed >= args.count:
                return EXIT_OK
    return EXIT_OK
