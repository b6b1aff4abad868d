"""A host's supervisord that stops its programs all at once.

    python -m shardnode.host_supervisord -n -s -c HOST.conf

supervisord, when it shuts down (SIGTERM, `supervisorctl shutdown`), stops
its program groups one at a time, in priority order, each until it has
exited (Supervisor.ordered_stop_groups_phase_1 stops the last group of its
list, phase 2 drops it once it is down): a host with a router and five
workers took 24 s to stop, and the local cluster as long. Here phase 1 asks
every group still running to stop at once — each worker hands its
leaderships over and flushes in parallel with the others — and phase 2
drops the groups that are down. Nothing else of supervisord changes; this
is supervisord's own `main` (supervisor 4, pinned in setup.cfg), run in
this process, so a host still runs one supervisord process.

It also serves the host's process control (shardnode.host_agent, a gRPC
service on a thread of this process), so gRPC's fork support is turned
off here before gRPC is first imported: supervisord forks a child for
every program it starts, and gRPC's at-fork handlers, run while its
threads serve, made children die of SIGSEGV or SIGABRT between fork and
exec. Without them a child is a plain copy that execs at once and never
uses gRPC. The routers and workers inherit the setting; they do not fork.

`make run`'s top-level supervisord runs one per host
(supervisor.local_cluster_config); `shardnode supervisor-conf` writes
configurations for it as for plain supervisord.
"""

from __future__ import annotations

import os
import sys

from supervisor import supervisord

#: gRPC's switch for its fork support (read when gRPC is first imported).
FORK_SUPPORT = "GRPC_ENABLE_FORK_SUPPORT"


def _stop_every_group_at_once(self: supervisord.Supervisor) -> None:
    for group in self.stop_groups or ():
        group.stop_all()        # a group already stopping is left as it is


def _drop_stopped_groups(self: supervisord.Supervisor) -> None:
    if self.stop_groups:
        self.stop_groups = [group for group in self.stop_groups if group.get_unstopped_processes()]


def install() -> None:
    """Make this process's supervisord stop every program at once."""
    supervisord.Supervisor.ordered_stop_groups_phase_1 = _stop_every_group_at_once   # type: ignore[method-assign]
    supervisord.Supervisor.ordered_stop_groups_phase_2 = _drop_stopped_groups        # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    os.environ[FORK_SUPPORT] = "false"
    install()
    supervisord.main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
