"""One host of a local cluster: its supervisord, stopped in parallel.

    python -m shardnode.host_runner --config CLUSTER.toml --host NAME -- SUPERVISORD ARGS...

`make run`'s top-level supervisord runs one of these per host
(supervisor.local_cluster_config) instead of the host's supervisord itself.
It runs that supervisord as its child. supervisord, when it shuts down,
stops its programs one at a time, in priority order, each until it has
exited: a host with a router and five workers took 24 s to stop. So on
SIGTERM (or SIGINT, SIGHUP) this runner first asks the host's supervisord
(XML-RPC, the cluster's admin credential) to stop every program that runs,
all at once — each worker hands its leaderships over and flushes in
parallel with the others — waits until they are down, prints one line,
then stops the supervisord, which has nothing left to stop, and exits with
its status. If the supervisord does not answer, it is stopped as before.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time

from typing import TYPE_CHECKING

# Only what starting the supervisord needs is imported before it starts (a
# loaded machine starts many hosts at once); the rest when it is time to stop.
if TYPE_CHECKING:
    from .supervisor import ProcessControl

#: supervisord's states of a program that is (or may soon be) running.
_UP = ("STARTING", "RUNNING", "BACKOFF")
#: How long the runner waits for its supervisord once its programs are down.
_SUPERVISORD_STOP_SECONDS = 30.0


def stop_host_programs(control: ProcessControl, host: str) -> int:
    """Stop every program of `host` that runs, all at once, and wait until
    they are down; returns how many there were."""
    running = [name for name, info in control.processes(host).items() if info.state in _UP]
    if running:
        control.stop_programs(host, running)
    return len(running)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shardnode.host_runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the cluster's configuration")
    parser.add_argument("--host", required=True, help="this host's name in it")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the host's supervisord command line, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("the supervisord command is missing (after --)")

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    # In this runner's process group: the top-level supervisord signals the
    # runner alone to stop (stopasgroup=false), and the whole group only to
    # kill (killasgroup=true).
    child = subprocess.Popen(command)
    while child.poll() is None and not stop.wait(0.2):
        pass
    if child.poll() is not None:
        return child.returncode
    began = time.monotonic()
    try:
        from .config import ClusterConfig, ConfigError
        from .errors import ShardnodeError
        from .supervisor import STOP_WAIT_SECONDS, ProcessControl

        try:
            cluster = ClusterConfig.load(args.config)
            control = ProcessControl(cluster, rpc_timeout=2.0, stop_timeout=STOP_WAIT_SECONDS + 5.0)
            stopped = stop_host_programs(control, args.host)
            note = f"{stopped} programs stopped in parallel"
        except (ShardnodeError, ConfigError, OSError) as exc:
            note = f"its programs are stopped one by one ({exc})"
    finally:
        child.send_signal(signal.SIGTERM)
    try:
        code = child.wait(timeout=_SUPERVISORD_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        code = child.wait()
    print(f"host {args.host} stopped in {time.monotonic() - began:.1f} s ({note})", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
