"""Running a lazyfs daemon from a test: start, control, stop, and never leave a mount.

    with mounted_lazyfs(tmp_path / "host1") as fs:
        ...  # use fs.mountpoint like a disk
        fs.power_loss()

Each simulated host gets its own mount (and so its own "disk" and its own power loss).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from shardnode.testing.lazyfs import control


class LazyFSError(RuntimeError):
    """The daemon did not mount, or could not be stopped cleanly."""


@functools.cache
def lazyfs_unavailable() -> str | None:
    """One line saying why a lazyfs cannot be mounted here, or None if it can."""
    if os.geteuid() != 0:
        return "lazyfs needs root (to mount FUSE and to unmount it whatever happens)"
    if not os.path.exists("/dev/fuse"):
        return "lazyfs needs /dev/fuse (not present: no FUSE in this kernel/container)"
    if shutil.which("fusermount3") is None:
        return "lazyfs needs fusermount3 (Debian package fuse3; see scripts/install-test-deps.sh)"
    library = ctypes.util.find_library("fuse3")
    if library is None:
        return "lazyfs needs libfuse3 (Debian package fuse3): not found"
    try:
        ctypes.CDLL(library)
    except OSError as error:
        return f"lazyfs needs libfuse3: {library} does not load ({error})"
    if importlib.util.find_spec("mfusepy") is None:
        return "lazyfs needs the mfusepy binding (pip install -e '.[test]')"
    return None


def _mounted(mountpoint: str) -> bool:
    """Whether ``mountpoint`` appears in /proc/mounts (does not touch the mount itself,
    which would hang or fail if the daemon is stuck or dead)."""
    # /proc/mounts escapes space, tab, newline and backslash as octal.
    escaped = "".join(f"\\{ord(char):03o}" if char in " \t\n\\" else char for char in mountpoint)
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as mounts:
        return any(line.split()[1] == escaped for line in mounts if line.strip())


class LazyFS:
    """One lazyfs daemon, mounted at ``mountpoint`` and controlled through
    ``control_socket`` (default: ``<mountpoint>.control``). Its log goes to
    ``<control_socket>.log``."""

    def __init__(
        self,
        mountpoint: str | os.PathLike[str],
        control_socket: str | os.PathLike[str] | None = None,
        *,
        start_timeout: float = 10.0,
    ) -> None:
        self.mountpoint = os.path.abspath(mountpoint)
        self.control_socket = os.path.abspath(control_socket or self.mountpoint + ".control")
        self.log_path = self.control_socket + ".log"
        self.start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def __enter__(self) -> LazyFS:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._process is not None:
            raise LazyFSError(f"lazyfs at {self.mountpoint} is already started")
        reason = lazyfs_unavailable()
        if reason is not None:
            raise LazyFSError(reason)
        if _mounted(self.mountpoint):
            raise LazyFSError(f"{self.mountpoint} is already a mount point")
        os.makedirs(self.mountpoint, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "shardnode.testing.lazyfs",
                    self.mountpoint,
                    "--control",
                    self.control_socket,
                    "--exit-with-parent",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a Ctrl-C meant for pytest does not reach it first
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._process.poll() is not None:
                raise LazyFSError(
                    f"lazyfs daemon exited with {self._process.returncode} before mounting "
                    f"{self.mountpoint}; its log:\n{self._log_tail()}"
                )
            if _mounted(self.mountpoint) and os.path.exists(self.control_socket):
                try:
                    control.request(self.control_socket, "ping", timeout=1.0)
                    return
                except control.ControlError:
                    pass
            if time.monotonic() > deadline:
                raise LazyFSError(
                    f"lazyfs did not mount {self.mountpoint} within {self.start_timeout:.0f} s; "
                    f"its log:\n{self._log_tail()}"
                )
            time.sleep(0.02)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                return "".join(log.readlines()[-lines:])
        except OSError as error:
            return f"(no log: {error})"

    def stop(self) -> None:
        """Unmount and end the daemon. Safe to call twice; never leaves a mount behind
        (a busy mount is detached lazily and goes once its last file is closed)."""
        # A clean unmount ends the daemon by itself; after a lazy one (busy: files still
        # open) it would serve those files until they close, so it is signalled at once.
        exit_wait = 2.0
        if _mounted(self.mountpoint):
            unmount = subprocess.run(["fusermount3", "-u", self.mountpoint], capture_output=True)
            if unmount.returncode != 0 and _mounted(self.mountpoint):
                subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], capture_output=True)
                exit_wait = 0.0
        process, self._process = self._process, None
        if process is not None:
            try:
                process.wait(timeout=exit_wait)
            except subprocess.TimeoutExpired:
                self._signal(process, signal.SIGTERM)
                try:
                    process.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    self._signal(process, signal.SIGKILL)
                    process.wait()
        if _mounted(self.mountpoint):
            # The daemon is gone, so only a dead mount can be left ("transport endpoint
            # is not connected"): detach it.
            subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], capture_output=True)
        if _mounted(self.mountpoint):
            raise LazyFSError(f"{self.mountpoint} is still mounted after stopping lazyfs")

    @staticmethod
    def _signal(process: subprocess.Popen[bytes], signal_number: int) -> None:
        try:
            os.kill(process.pid, signal_number)  # our own child, by PID only
        except ProcessLookupError:
            pass

    # ---- control ------------------------------------------------------------------

    def _request(self, op: str, **args: Any) -> Any:
        if self._process is None:
            raise LazyFSError(f"lazyfs at {self.mountpoint} is not running")
        return control.request(self.control_socket, op, **args)

    def power_loss(self) -> dict[str, int]:
        """Drop everything not fsynced; open files on the mount then fail with EIO.
        Returns what was dropped: file_bytes_dropped, files_reverted, files_vanished,
        entries_dropped, handles_invalidated."""
        return self._request("power_loss")

    def fail_fsync(
        self,
        errno: int = errno.EIO,
        count: int | None = None,
        path_contains: str | None = None,
        directories: bool = False,
    ) -> None:
        """The next ``count`` fsyncs (None: all, until cleared) of files whose path
        contains ``path_contains`` fail with ``errno``, and their dirty data is discarded
        without becoming durable (Linux after a writeback error). With ``directories``,
        fsyncs of matching directories fail too (their entries stay volatile)."""
        self._request("fail_fsync", error=errno, count=count, path_contains=path_contains, directories=directories)

    def fail_writes(self, errno: int = errno.ENOSPC, path_contains: str | None = None) -> None:
        """Writes, creates, mkdirs, links, fallocates and growing truncates of matching
        paths fail with ``errno`` until cleared."""
        self._request("fail_writes", error=errno, path_contains=path_contains)

    def clear_faults(self) -> None:
        self._request("clear_faults")

    def stats(self) -> dict[str, int]:
        """Counters: fsyncs, fsyncdirs, bytes_written, bytes_synced, faults_injected,
        power_losses; and now: inodes, open_handles, unsynced_file_bytes."""
        return self._request("stats")


@contextmanager
def mounted_lazyfs(
    mountpoint: str | os.PathLike[str], control_socket: str | os.PathLike[str] | None = None
) -> Iterator[LazyFS]:
    """A started LazyFS for the duration of the block; stopped (unmounted, daemon
    reaped) however the block ends."""
    filesystem = LazyFS(mountpoint, control_socket)
    filesystem.start()
    try:
        yield filesystem
    finally:
        filesystem.stop()

