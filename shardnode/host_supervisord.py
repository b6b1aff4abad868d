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

`make run`'s top-level supervisord runs one per host
(supervisor.local_cluster_config); `shardnode supervisor-conf` writes
configurations for it as for plain supervisord.
"""

from __future__ import annotations

import sys

from supervisor import supervisord


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
    install()
    supervisord.main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
