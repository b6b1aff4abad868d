"""Faults injected on command: failing fsyncs and failing writes.

At most one fsync rule and one write rule are active at a time; setting a rule replaces
the previous one of its kind. A rule matches a path when ``path_contains`` is None or is
a substring of the path (for operations on an open file: the path it was opened under).
"""

from __future__ import annotations

import errno as errno_codes
from dataclasses import dataclass


@dataclass(slots=True)
class FsyncFault:
    error: int = errno_codes.EIO
    # None: every matching fsync fails until the faults are cleared.
    remaining: int | None = None
    path_contains: str | None = None
    # Also fail fsyncdir (the entries then simply stay volatile).
    directories: bool = False


@dataclass(slots=True)
class WriteFault:
    error: int = errno_codes.ENOSPC
    path_contains: str | None = None


def _matches(path_contains: str | None, path: str) -> bool:
    return path_contains is None or path_contains in path


@dataclass(slots=True)
class FaultPlan:
    fsync: FsyncFault | None = None
    write: WriteFault | None = None

    def fsync_error(self, path: str, is_directory: bool) -> int | None:
        """The errno this fsync must fail with, or None; consumes one of a counted rule."""
        rule = self.fsync
        if rule is None or (is_directory and not rule.directories) or not _matches(rule.path_contains, path):
            return None
        if rule.remaining is not None:
            rule.remaining -= 1
            if rule.remaining <= 0:
                self.fsync = None
        return rule.error

    def write_error(self, path: str) -> int | None:
        rule = self.write
        if rule is None or not _matches(rule.path_contains, path):
            return None
        return rule.error

    def clear(self) -> None:
        self.fsync = None
        self.write = None
