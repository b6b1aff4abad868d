#!/usr/bin/env python3
"""`make run`: the default local cluster in the foreground, with one line
when it is ready.

    python scripts/run_cluster.py [--config etc/cluster.toml] [--ready-timeout 120] [--namespaces]

Generates etc/supervisord.conf and etc/hosts/HOST.conf (as
scripts/gen_supervisor_conf.py does), runs `supervisord -c
etc/supervisord.conf` as a child in the foreground, and watches the cluster
through its routers: once every group has a leader and a quorum it prints
one line saying so, with where the logs are, how to see the status and how
to stop. If that takes longer than --ready-timeout it prints one line
saying what is missing (the cluster keeps running, and the ready line still
comes if it gets there).

supervisord's own console lines are shown only when they matter (warnings,
errors, a program that gave up); all of them are in data/supervisord.log.
Ctrl-C reaches supervisord (same process group) and stops every host
cleanly; SIGTERM to this script is passed on to supervisord. The exit status
is supervisord's.

`--namespaces` (`make run-netns`) runs each host in its own network
namespace (docs/testing.md, "Hosts in network namespaces"; root, ip, nft and
tc): it creates the namespaces and their bridge, writes CONFIG's namespaced
copy to etc/cluster-netns.toml (data in DATA_DIR/netns, supervisord files in
OUT/netns), runs that cluster as above, and removes the network when it
exits, however it exits (Ctrl-C, SIGTERM, a failure); a network left by a
run that was killed is removed at the next start.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from shardnode.cli.ready import NotReady, wait_ready  # noqa: E402
from shardnode.client import Client  # noqa: E402
from shardnode.config import ClusterConfig, ConfigError  # noqa: E402
from shardnode.certs import CertsRefused  # noqa: E402
from shardnode.errors import ShardnodeError  # noqa: E402
from shardnode.placement.shard_map import ShardMap  # noqa: E402
from shardnode.supervisor import listeners, local_cluster_config  # noqa: E402

PROG = "make run"
PROG_NAMESPACES = "make run-netns"
#: Where --namespaces writes the namespaced copy of the configuration (gitignored).
NAMESPACED_CONFIG = "cluster-netns.toml"
DEFAULT_READY_TIMEOUT = 120.0
# supervisord console lines worth showing: anything but INFO, and programs that died or gave up.
_WORTH_SHOWING = re.compile(r" (WARN|ERRO|CRIT) |gave up|FATAL|exited: ")
_NOISE = ("indicating exit request", "Supervisor is running as root")
# The top supervisord's line when a host's runner has exited.
_HOST_STOPPED = re.compile(r" INFO stopped: (\S+) \(exit status (-?\d+)\)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run_cluster.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="etc/cluster.toml", help="cluster configuration (default etc/cluster.toml)")
    parser.add_argument("--out", default="etc", help="where the supervisord files go (default etc)")
    parser.add_argument("--ready-timeout", type=float, default=DEFAULT_READY_TIMEOUT, metavar="SECONDS",
                        help=f"say the cluster is not ready after this long (default {DEFAULT_READY_TIMEOUT:g})")
    parser.add_argument("--namespaces", action="store_true",
                        help="each host in its own network namespace (needs root, ip, nft and tc); the namespaced "
                             f"configuration goes to OUT/{NAMESPACED_CONFIG}")
    args = parser.parse_args(argv)
    if args.namespaces:
        return _run_in_namespaces(args)
    return _run(args, Path(args.config).absolute(), Path(args.out).absolute(), PROG)


def _run_in_namespaces(args: argparse.Namespace) -> int:
    """`_run` on the namespaced copy of the configuration, inside a network
    that exists exactly as long as this function runs."""
    from shardnode.chaos.commands import NetworkCommandError
    from shardnode.chaos.namespaced_config import write_namespaced_config
    from shardnode.chaos.namespaces import NamespaceNetwork, cleanup_leftovers, namespaces_unavailable, unique_name

    reason = namespaces_unavailable()
    if reason is not None:
        print(f"{PROG_NAMESPACES}: {reason}", file=sys.stderr)
        return 2
    source_path = Path(args.config).absolute()
    out = Path(args.out).absolute()
    try:
        source = ClusterConfig.load(source_path)
        # A worker's data records its peers' addresses: the namespaced cluster keeps data of its
        # own, and starts again on the subnet that data was made on.
        data_dir = source.data_dir / "netns"
        subnet_file = data_dir / "subnet"
        subnet = subnet_file.read_text().strip() if subnet_file.is_file() else None
        for name in cleanup_leftovers():
            print(f"{PROG_NAMESPACES}: removed network {name}, left by a run that was killed", flush=True)
        network = NamespaceNetwork(unique_name(), [h.name for h in source.hosts], subnet=subnet)
    except (ConfigError, ValueError, NetworkCommandError) as exc:
        print(f"{PROG_NAMESPACES}: {exc}", file=sys.stderr)
        return 2
    try:
        try:
            network.create()
        except ValueError as exc:
            raise ValueError(f"{exc}: the data in {_shown(data_dir)} was made there "
                             "(`make reset` deletes it)") from None
        data_dir.mkdir(parents=True, exist_ok=True)
        subnet_file.write_text(f"{network.subnet}\n")
        config_path = write_namespaced_config(source_path, out / NAMESPACED_CONFIG, network, data_dir=data_dir)
        print(f"{PROG_NAMESPACES}: network {network.name}: hosts on {network.subnet} "
              f"({', '.join(f'{h} {network.address(h)}' for h in network.hosts)}), this namespace on "
              f"{network.root_address}", flush=True)
        return _run(args, config_path, out / "netns", PROG_NAMESPACES)
    except (ConfigError, ValueError, NetworkCommandError) as exc:
        print(f"{PROG_NAMESPACES}: {exc}", file=sys.stderr)
        return 2
    finally:
        # Ctrl-C, SIGTERM (forwarded, then supervisord's exit), a failure: the network goes.
        try:
            network.destroy()
        except NetworkCommandError as exc:
            print(f"{PROG_NAMESPACES}: network {network.name} not fully removed ({exc}); the next "
                  f"`{PROG_NAMESPACES}` removes what is left", file=sys.stderr, flush=True)
        else:
            print(f"{PROG_NAMESPACES}: network {network.name} removed", flush=True)


def _run(args: argparse.Namespace, config_path: Path, out: Path, prog: str) -> int:
    try:
        cluster = ClusterConfig.load(config_path)
        top = local_cluster_config(cluster, python=sys.executable, config_path=config_path,
                                   project_root=PROJECT_ROOT, out_dir=out)
    except (ConfigError, CertsRefused) as exc:
        # CertsRefused: with TLS on, a certificate is missing and no CA key is here to issue it.
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{prog}: cannot write {exc.filename or out}: {exc.strerror}", file=sys.stderr)
        return 2

    taken = listeners(cluster)
    if taken:
        # Another cluster (or anything) holds our addresses: starting would only
        # make our hosts fail, and the watcher might report the other cluster ready.
        more = f" (and {len(taken) - 1} more of its addresses)" if len(taken) > 1 else ""
        print(f"{prog}: {taken[0].describe()}{more}: is another cluster running? Stop it first (Ctrl-C where it "
              f"runs), or give this one other ports in {_shown(config_path)}", file=sys.stderr, flush=True)
        return 2

    data = _shown(cluster.data_dir)
    shape = describe_shape(cluster)
    print(f"{prog}: starting {cluster.name} ({shape}) under supervisord -c {_shown(top)}; "
          f"logs in {data}/HOST/logs/", flush=True)

    supervisord = subprocess.Popen(
        [sys.executable, "-m", "supervisor.supervisord", "-c", str(top)], cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
    )
    stopping = threading.Event()
    stop_began: list[float] = []

    def forward(signum: int, frame: object) -> None:
        # Ctrl-C already reached supervisord (same process group); a SIGTERM or
        # SIGINT sent to this process alone must reach it too.
        if not stopping.is_set():
            stop_began.append(time.monotonic())
            print(f"{prog}: stopping {cluster.name}: every host at once, each stopping its router and workers "
                  "in parallel", flush=True)
        stopping.set()
        if supervisord.poll() is None:
            supervisord.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)

    started = time.monotonic()
    watcher = threading.Thread(target=_watch, args=(cluster, config_path, args.ready_timeout, started, stopping,
                                                    supervisord, prog), daemon=True, name="ready")
    watcher.start()
    assert supervisord.stdout is not None
    hosts = {host.name for host in cluster.hosts}
    for line in supervisord.stdout:
        stopped = _HOST_STOPPED.search(line)
        if stopped and stopped.group(1) in hosts:
            # One line per host as it stops (its runner stopped its programs in parallel).
            after = f" after {time.monotonic() - stop_began[0]:.1f} s" if stop_began else ""
            status = "" if stopped.group(2) == "0" else f", exit status {stopped.group(2)}"
            print(f"{prog}: {stopped.group(1)} stopped{after}{status}", flush=True)
        elif _WORTH_SHOWING.search(line) and not any(noise in line for noise in _NOISE):
            print(f"supervisord: {line.rstrip()}", flush=True)
    code = supervisord.wait()
    stopping.set()
    if code == 0:
        took = f" in {time.monotonic() - stop_began[0]:.1f} s" if stop_began else ""
        print(f"{prog}: {cluster.name} stopped{took} (data kept in {data}/; `make reset` deletes it)", flush=True)
    else:
        print(f"{prog}: supervisord exited with status {code}; see {data}/supervisord.log", file=sys.stderr,
              flush=True)
    return code


def _watch(cluster: ClusterConfig, config_path: Path, ready_timeout: float, started: float,
           stopping: threading.Event, supervisord: subprocess.Popen, prog: str = PROG) -> None:
    """Print the ready line once every group has a leader and a quorum (and
    the not-ready line if that takes longer than `ready_timeout`)."""
    data = _shown(cluster.data_dir)
    status_command = _shown(PROJECT_ROOT / ".venv" / "bin" / "shardnode") + " status"
    if _shown(config_path) != "etc/cluster.toml":
        status_command += f" --config {_shown(config_path)}"
    hints = f"logs: {data}/HOST/logs/; status: {status_command}; stop: Ctrl-C"
    warned = False
    with Client.from_config(config_path, timeout=2.0) as client:
        while not stopping.is_set() and supervisord.poll() is None:
            budget = ready_timeout - (time.monotonic() - started) if not warned else 5.0
            try:
                status = wait_ready(client, max(1.0, budget))
            except NotReady as exc:
                if stopping.is_set():
                    return
                if not warned:
                    warned = True
                    reason = str(exc).split(": ", 1)[1] if ": " in str(exc) else str(exc)
                    print(f"{prog}: {cluster.name} is not ready after {time.monotonic() - started:.0f} s: {reason}. "
                          f"It keeps running and trying; {hints}", flush=True)
                continue
            except ShardnodeError as exc:      # should not happen: wait_ready absorbs these
                print(f"{prog}: cannot watch the cluster: {exc}", file=sys.stderr, flush=True)
                return
            if stopping.is_set():
                return
            groups = len(status.groups)
            print(f"{prog}: {cluster.name} is ready ({time.monotonic() - started:.1f} s): all {groups} data "
                  f"group{'s' if groups != 1 else ''} and the metadata group have a leader. "
                  f"{hints[0].upper()}{hints[1:]}", flush=True)
            return


def describe_shape(cluster: ClusterConfig) -> str:
    """The start line's shape, counted as the ready line counts: the data
    groups of the live shard map (the newest one a router saved, with the
    groups created online; cluster.toml's before the first start) and the
    metadata group."""
    saved = _saved_map(cluster)
    groups = len(saved.groups) if saved is not None else cluster.groups
    online = f" ({groups - cluster.groups:+d} since cluster.toml's {cluster.groups})" if groups != cluster.groups else ""
    return (f"{len(cluster.hosts)} hosts; {groups} data group{'s' if groups != 1 else ''}{online} of "
            f"{cluster.replicas} replicas and the metadata group of {cluster.meta_replicas}")


def _saved_map(cluster: ClusterConfig) -> ShardMap | None:
    """The newest shard map the hosts' routers saved (data_dir/HOST/shard_map), if any."""
    newest = None
    for host in cluster.hosts:
        try:
            candidate = ShardMap.decode(cluster.shard_map_file(host.name).read_bytes())
        except (OSError, ShardnodeError, ValueError):
            continue
        if newest is None or candidate.epoch > newest.epoch:
            newest = candidate
    return newest


def _shown(path: Path) -> str:
    """A path as the user will type it: relative to the current directory when below it."""
    try:
        return os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd()) else str(path)
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
