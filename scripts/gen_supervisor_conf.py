#!/usr/bin/env python3
"""Generate the local cluster's supervisord configuration.

    python scripts/gen_supervisor_conf.py --config etc/cluster.toml --out etc

writes etc/hosts/HOST.conf for every host of the configuration (each host's own
supervisord, with its process control on host.address:supervisor_port) and
etc/supervisord.conf, which runs all of them on this machine:
`supervisord -c etc/supervisord.conf`.
`make run` does both. The files hold absolute paths (this checkout, this
Python), so they are generated, not committed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from shardnode.config import ClusterConfig, ConfigError  # noqa: E402
from shardnode.security import SecurityError  # noqa: E402
from shardnode.supervisor import local_cluster_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate supervisord configuration for the local cluster.")
    parser.add_argument("--config", default="etc/cluster.toml", help="cluster configuration (default etc/cluster.toml)")
    parser.add_argument("--out", default="etc", help="output directory (default etc): supervisord.conf and hosts/")
    parser.add_argument("--python", default=sys.executable,
                        help="the Python that runs the router and workers (default: this one)")
    parser.add_argument("--no-router", action="store_true", help="leave the router programs out")
    args = parser.parse_args(argv)
    try:
        config_path = Path(args.config).absolute()
        cluster = ClusterConfig.load(config_path)
        top = local_cluster_config(
            cluster,
            python=Path(args.python).absolute(),
            config_path=config_path,
            project_root=PROJECT_ROOT,
            out_dir=Path(args.out).absolute(),
            include_router=not args.no_router,
        )
    except (ConfigError, SecurityError) as exc:
        print(f"gen_supervisor_conf: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"gen_supervisor_conf: cannot write {exc.filename or args.out}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"gen_supervisor_conf: wrote {top} and {top.parent / 'hosts'}/*.conf ({len(cluster.hosts)} hosts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
