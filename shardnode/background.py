"""A long-running task owned by whoever starts it (structured concurrency:
nothing is left running on shutdown)."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod


class OwnedTask(ABC):
    """Subclasses define `_run`; the owner calls `start` inside the event loop
    and `close` on shutdown, which cancels the task and waits for it."""

    task_name = "background task"

    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.task_name)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    @abstractmethod
    async def _run(self) -> None:
        """The task's body, until cancelled."""
