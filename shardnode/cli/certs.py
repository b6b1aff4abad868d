"""`shardnode certs init`: the cluster's CA, host and client certificates and
its admin credential (docs/security.md).

    shardnode [--config etc/cluster.toml] certs init [--force]
    shardnode [--config etc/cluster.toml] certs rotate begin|issue|finish

Creates what is missing under `[security] certs_dir` (every file 0600) and
prints each file written; `--force` issues everything again under a new CA
(the admin credential is kept). Servers pick the new files up at their next
TLS handshake, channels within a second (they are made again).

`certs rotate` moves a running cluster to a new CA in three steps with
overlapping trust (shardnode.cert_rotation), so that no link ever breaks.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ..config import ClusterConfig

DEFAULT_CONFIG = "etc/cluster.toml"


def register(subparsers: argparse._SubParsersAction) -> None:
    certs = subparsers.add_parser("certs", help="the cluster's certificates and admin credential",
                                  description="Manage the cluster's certificates and admin credential.")
    commands = certs.add_subparsers(title="commands", metavar="COMMAND", required=True)
    init = commands.add_parser(
        "init", help="create the CA, a certificate per host, a client certificate, the admin credential",
        description="Create what is missing of the cluster's CA, host certificates (CN and DNS SAN the host's "
                    "name, IP SAN its address), client certificate and admin credential, in [security] "
                    "certs_dir (files 0600).")
    init.add_argument("--force", action="store_true",
                      help="issue every certificate again under a new CA (rotation; the admin credential is kept)")
    init.set_defaults(func=_init)
    rotate = commands.add_parser(
        "rotate", help="move the running cluster to a new CA without a moment of broken trust",
        description="Move the cluster to a new CA in three steps, each idempotent: `begin` makes the new CA and "
                    "trusts both, `issue` issues every host and client certificate again under the new one, "
                    "`finish` trusts the new CA only. Run the next step once every process has read the files "
                    "(a few seconds; on several machines, after copying certs_dir to every host).")
    rotate.add_argument("step", choices=("begin", "issue", "finish"))
    rotate.set_defaults(func=_rotate)


def _init(args: argparse.Namespace) -> int:
    from ..certs import init_cluster   # cryptography is loaded only for this command

    return _write_files(args, lambda cluster: [str(p) for p in init_cluster(cluster, force=args.force)],
                        "every file exists in {certs_dir} (--force issues new ones)", refused=())


def _rotate(args: argparse.Namespace) -> int:
    from .. import cert_rotation   # cryptography is loaded only for this command

    step = {"begin": cert_rotation.begin, "issue": cert_rotation.issue, "finish": cert_rotation.finish}[args.step]
    return _write_files(args, step, f"`certs rotate {args.step}` was done already",
                        refused=(cert_rotation.RotationRefused,), prefix=f"certs rotate {args.step}: ")


def _write_files(args: argparse.Namespace, step: Callable[[ClusterConfig], list[str]], nothing: str, *,
                 refused: tuple[type[Exception], ...], prefix: str = "") -> int:
    """Run a step that writes certificate files and print what it wrote: one
    line per file, `nothing to do: …` when it wrote none, one error line
    (exit 1 refused, 2 cannot write) otherwise."""
    cluster = ClusterConfig.load(getattr(args, "config", None) or DEFAULT_CONFIG)
    try:
        done = step(cluster)
    except refused as exc:
        print(f"shardnode: {prefix}{exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"shardnode: cannot write {exc.filename or cluster.security.certs_dir}: {exc.strerror}",
              file=sys.stderr)
        return 2
    for line in done:
        print(line)
    if not done:
        print(f"nothing to do: {nothing.format(certs_dir=cluster.security.certs_dir)}")
    return 0
