from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import WorkerGroup


@pytest.fixture
def make_group(tmp_path: Path) -> Iterator:
    """Build worker groups; every process they start is killed at the end."""
    groups: list[WorkerGroup] = []

    def factory(size: int = 3, **kwargs) -> WorkerGroup:
        group = WorkerGroup(tmp_path / f"g{len(groups)}", size=size, **kwargs)
        groups.append(group)
        return group

    yield factory
    for group in groups:
        group.stop_all()
