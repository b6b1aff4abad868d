"""The FUSE side: libfuse 3 callbacks (through mfusepy) that forward to a LazyModel.

Mount configuration, and why:
- ``direct_io``: every read and write reaches the model, so the kernel's page cache can
  neither keep data across a power loss nor hide one. (Shared writable mmap is then
  refused; RocksDB does not use mmap unless asked to.)
- entry, negative and attribute timeouts 0: names and sizes are never answered from the
  kernel's caches, so a power loss is visible at once.
- ``hard_remove`` + ``nullpath_ok``: an unlinked file that is still open really loses its
  name (libfuse would otherwise rename it to ``.fuse_hidden*``, which RocksDB would see
  in its directory), and operations on open files are addressed by handle, not by path.
- no lock/flock callbacks: the kernel then keeps POSIX and BSD locks itself, which is
  all RocksDB's ``LOCK`` file needs (locks are per mount, the mount is per host).

mfusepy 3.1.1 drops the ``fuse_file_info`` of truncate/chmod/chown/utimens and the
flags of rename under libfuse 3; ``_LazyFUSE`` passes them on, since with
``nullpath_ok`` an ftruncate arrives with no path at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import mfusepy

from shardnode.testing.lazyfs.model import LazyModel

_UTIME_NOW = (1 << 30) - 1
_UTIME_OMIT = (1 << 30) - 2


def _handle_of(fip: Any) -> int | None:
    return fip.contents.fh if fip else None


def _decode(path: bytes | None) -> str | None:
    return None if path is None else path.decode("utf-8", "surrogateescape")


def _timespec_ns(timespec: Any, now_ns: int) -> int | None:
    if timespec.tv_nsec == _UTIME_OMIT:
        return None
    if timespec.tv_nsec == _UTIME_NOW:
        return now_ns
    return timespec.tv_sec * 10**9 + timespec.tv_nsec


class _LazyFUSE(mfusepy.FUSE):
    """mfusepy's libfuse 3 glue, with the file handle and rename flags passed through."""

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        return self.operations.truncate(_decode(path), length, _handle_of(fip))

    def chmod_fuse_3(self, path: bytes | None, mode: int, fip: Any) -> int:
        return self.operations.chmod(_decode(path), mode, _handle_of(fip))

    def chown_fuse_3(self, path: bytes | None, uid: int, gid: int, fip: Any) -> int:
        # uid_t/gid_t -1 ("leave as is") arrives as an unsigned 2**32-1.
        uid = -1 if uid == 0xFFFFFFFF else uid
        gid = -1 if gid == 0xFFFFFFFF else gid
        return self.operations.chown(_decode(path), uid, gid, _handle_of(fip))

    def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        now = time.time_ns()
        if buf:
            atime = _timespec_ns(buf.contents.actime, now)
            mtime = _timespec_ns(buf.contents.modtime, now)
        else:
            atime = mtime = now
        return self.operations.utimens(_decode(path), atime, mtime, _handle_of(fip))

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.operations.rename(_decode(old), _decode(new), flags)


class LazyOperations(mfusepy.Operations):
    """Each callback is one model call; the model raises OSError(errno) on failure,
    which mfusepy returns to the kernel as -errno."""

    use_ns = True  # times are integer nanoseconds

    def __init__(self, model: LazyModel, on_mounted: Callable[[], None]) -> None:
        self._model = model
        self._on_mounted = on_mounted

    def init_with_config(self, conn_info: Any, config: Any) -> None:
        config.use_ino = 1
        config.hard_remove = 1
        config.nullpath_ok = 1
        config.direct_io = 1
        config.kernel_cache = 0
        config.auto_cache = 0
        config.entry_timeout = 0.0
        config.negative_timeout = 0.0
        config.attr_timeout = 0.0
        config.ac_attr_timeout_set = 0
        self._on_mounted()

    # attributes
    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        return self._model.getattr(path, fh)

    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> int:
        self._model.chmod(path, mode, fh)
        return 0

    def chown(self, path: str | None, uid: int, gid: int, fh: int | None = None) -> int:
        self._model.chown(path, uid, gid, fh)
        return 0

    def utimens(self, path: str | None, atime_ns: int | None, mtime_ns: int | None, fh: int | None = None) -> int:
        self._model.utimens(path, atime_ns, mtime_ns, fh)
        return 0

    def access(self, path: str, amode: int) -> int:
        self._model.getattr(path)  # exists? permissions are not modelled (tests run as root)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        return self._model.statfs()

    # namespace
    def opendir(self, path: str) -> int:
        return self._model.opendir(path)

    def readdir(self, path: str | None, fh: int) -> list[tuple[str, dict[str, int], int]]:
        return [
            (name, {"st_mode": mode, "st_ino": number}, 0) for name, mode, number in self._model.readdir(path, fh)
        ]

    def releasedir(self, path: str | None, fh: int) -> int:
        self._model.release(fh)
        return 0

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        self._model.fsyncdir(fh)
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        self._model.mkdir(path, mode)
        return 0

    def mknod(self, path: str, mode: int, dev: int) -> int:
        self._model.mknod(path, mode)
        return 0

    def rmdir(self, path: str) -> int:
        self._model.rmdir(path)
        return 0

    def unlink(self, path: str) -> int:
        self._model.unlink(path)
        return 0

    def rename(self, old: str, new: str, flags: int = 0) -> int:
        self._model.rename(old, new, flags)
        return 0

    def link(self, target: str, source: str) -> int:
        # mfusepy's naming: ``target`` is the new name, ``source`` the existing file.
        self._model.link(target, source)
        return 0

    def symlink(self, target: str, source: str) -> int:
        # ``target`` is the new link's path, ``source`` what it points to.
        self._model.symlink(target, source)
        return 0

    def readlink(self, path: str) -> str:
        return self._model.readlink(path)

    # files
    def create(self, path: str, mode: int, flags: int) -> int:
        return self._model.create(path, mode, flags)

    def open(self, path: str, flags: int) -> int:
        return self._model.open(path, flags)

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        return self._model.read(fh, size, offset)

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        return self._model.write(fh, data, offset)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        self._model.truncate(path, length, fh)
        return 0

    def fallocate(self, path: str | None, mode: int, offset: int, size: int, fh: int) -> int:
        self._model.fallocate(fh, mode, offset, size)
        return 0

    def flush(self, path: str | None, fh: int) -> int:
        return 0  # close() is not a durability point

    def release(self, path: str | None, fh: int) -> int:
        self._model.release(fh)
        return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        self._model.fsync(fh)
        return 0


def serve(model: LazyModel, mountpoint: str, on_mounted: Callable[[], None]) -> None:
    """Mount and serve until unmounted or signalled (SIGTERM/SIGINT/SIGHUP)."""
    if mfusepy.fuse_version_major != 3:
        raise RuntimeError(f"lazyfs needs libfuse 3, found {mfusepy.fuse_version_major}.{mfusepy.fuse_version_minor}")
    _LazyFUSE(
        LazyOperations(model, on_mounted),
        mountpoint,
        foreground=True,
        # One thread: the model is one lock anyway, and Python callbacks share one GIL.
        nothreads=True,
        fsname="lazyfs",
        subtype="lazyfs",
        # fusermount3 unmounts by itself when this process dies, even by SIGKILL.
        auto_unmount=True,
    )
