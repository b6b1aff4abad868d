"""The group admin wired to a real cluster: the metadata group, the groups'
leaders, and each host's supervisord (for the workers of a new group)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..config import ClusterConfig
from ..errors import ShardnodeError
from ..supervisor import ProcessControl
from .directory import ShardDirectory
from .groups import GroupAdmin, MoveProgressCallback, Progress
from .worker_groups import WorkerGroups


def cluster_group_admin(cluster: ClusterConfig, progress: Progress = lambda line: None,
                        on_move_progress: MoveProgressCallback | None = None,
                        ) -> tuple[GroupAdmin, Callable[[], Awaitable[None]]]:
    """A GroupAdmin for `cluster`, and the coroutine function that closes its channels."""
    directory = ShardDirectory(cluster)
    groups = WorkerGroups(cluster)
    control = ProcessControl(cluster)

    def retire_workers(group: int) -> None:
        """Restart the removed group's workers: each finds its group retired
        in the map, retires its data and exits 0. A host that does not answer
        retires its replica when it next starts."""
        for host in cluster.hosts:
            address = host.worker_address(group)
            try:
                control.stop(address, clean=True)
                control.start(address)
            except ShardnodeError as exc:
                progress(f"group {group}: {host.name} did not answer ({exc}); it retires its replica when it "
                         f"next starts")

    admin = GroupAdmin(cluster, directory, groups, lambda host, gs: control.ensure_workers(host, gs),
                       retire_workers=retire_workers, progress=progress, on_move_progress=on_move_progress)

    async def close() -> None:
        await groups.close()
        await directory.close()

    return admin, close
