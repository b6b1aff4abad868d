"""The group admin wired to a real cluster: the metadata group, the groups'
leaders, and each host's supervisord (for the workers of a new group)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..config import ClusterConfig
from ..supervisor import ProcessControl
from .directory import ShardDirectory
from .groups import GroupAdmin, MoveProgressCallback, Progress
from .workers import WorkerGroups


def cluster_group_admin(cluster: ClusterConfig, progress: Progress = lambda line: None,
                        on_move_progress: MoveProgressCallback | None = None,
                        ) -> tuple[GroupAdmin, Callable[[], Awaitable[None]]]:
    """A GroupAdmin for `cluster`, and the coroutine function that closes its channels."""
    directory = ShardDirectory(cluster)
    groups = WorkerGroups(cluster)
    control = ProcessControl(cluster)
    admin = GroupAdmin(cluster, directory, groups, lambda host, gs: control.ensure_workers(host, gs),
                       progress=progress, on_move_progress=on_move_progress)

    async def close() -> None:
        await groups.close()
        await directory.close()

    return admin, close
