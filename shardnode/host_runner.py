"""One host of a local cluster: its supervisord, stopped in parallel.

    python -m shardnode.host_runner --host NAME -- SUPERVISORD -n -s -c HOST.conf

`make run`'s top-level supervisord runs one of these per host
(supervisor.local_cluster_config) instead of the host's supervisord itself.
It runs that supervisord as its child. supervisord, when it shuts down,
stops its programs one at a time, in priority order, each until it has
exited: a host with a router and five workers took 24 s to stop. So on
SIGTERM (or SIGINT, SIGHUP) this runner first asks the host's supervisord
(XML-RPC, with the address and credential of HOST.conf) to stop every
program that runs, all at once — each worker hands its leaderships over and
flushes in parallel with the others — waits until they are down, prints
one line, then stops the supervisord, which has nothing left to stop, and
exits with its status. If the supervisord does not answer, it is stopped as
before.

Only the standard library: a loaded machine starts (and stops) every host at
once, and this runner must not add imports to either.
"""

from __future__ import annotations

import argparse
import configparser
import signal
import subprocess
import sys
import threading
import time
import xmlrpc.client

#: supervisord's states of a program that is (or may soon be) running.
_UP = frozenset({"STARTING", "RUNNING", "BACKOFF", "STOPPING"})
#: How long the programs may take to stop: supervisord SIGKILLs each after
#: its stopwaitsecs (shardnode.supervisor.STOP_WAIT_SECONDS, 10).
_PROGRAMS_STOP_SECONDS = 15.0
#: How long the runner waits for its supervisord once its programs are down.
_SUPERVISORD_STOP_SECONDS = 30.0
_RPC_TIMEOUT = 2.0


class _Transport(xmlrpc.client.Transport):
    def make_connection(self, host):  # type: ignore[no-untyped-def]
        connection = super().make_connection(host)
        connection.timeout = _RPC_TIMEOUT
        return connection


def supervisord_proxy(conf_path: str) -> xmlrpc.client.ServerProxy:
    """An XML-RPC proxy to the supervisord of HOST.conf (its [inet_http_server])."""
    parser = configparser.RawConfigParser()
    if not parser.read(conf_path):
        raise OSError(f"cannot read {conf_path}")
    server = parser["inet_http_server"]
    # The file doubles a literal %: undo it (shardnode.supervisor._value).
    user, password = (server[k].replace("%%", "%") for k in ("username", "password"))
    return xmlrpc.client.ServerProxy(f"http://{user}:{password}@{server['port']}/RPC2", transport=_Transport())


def stop_programs(proxy: xmlrpc.client.ServerProxy) -> int:
    """Stop every program that runs, all at once, and wait until they are
    down; returns how many there were."""
    running = [info["name"] for info in proxy.supervisor.getAllProcessInfo() if info["statename"] in _UP]
    for name in running:
        try:
            proxy.supervisor.stopProcess(name, False)
        except xmlrpc.client.Fault:
            pass            # it stopped meanwhile
    deadline = time.monotonic() + _PROGRAMS_STOP_SECONDS
    while time.monotonic() < deadline:
        if not any(info["statename"] in _UP for info in proxy.supervisor.getAllProcessInfo()
                   if info["name"] in running):
            break
        time.sleep(0.05)
    return len(running)


def _conf_path(command: list[str]) -> str | None:
    for flag, value in zip(command, command[1:]):
        if flag in ("-c", "--configuration"):
            return value
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shardnode.host_runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", required=True, help="this host's name (for the line it prints)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the host's supervisord command line, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    conf = _conf_path(command)
    if not command or conf is None:
        parser.error("the supervisord command (with -c HOST.conf) is missing after --")

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
        stopped = stop_programs(supervisord_proxy(conf))
        note = f"{stopped} programs stopped in parallel"
    except (OSError, KeyError, xmlrpc.client.Error) as exc:
        note = f"its programs are stopped one by one ({type(exc).__name__}: {exc})"
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
