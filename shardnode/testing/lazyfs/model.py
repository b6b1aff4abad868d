"""An in-memory filesystem with strict POSIX durability, and power loss.

Every inode has a volatile state (what readers see now) and a durable state (what a
power loss leaves):

- a regular file's data and size become durable on fsync/fdatasync of that file
  (``FileData``);
- a directory's entries become durable on fsync of that directory (FUSE ``fsyncdir``),
  and only then: fsync of a file does not make its name durable, and a rename is durable
  in each of its two directories only once that directory is fsynced;
- a symlink's target is fixed at creation, so it is durable whenever its name is;
- metadata (mode, owner, times) is not modelled: it survives as it is.

``power_loss()`` turns every inode's durable state into its volatile state, drops the
inodes that are no longer reachable from the root through (durable) entries, and
invalidates every open handle: later operations on it fail with EIO.

Paths are absolute, "/"-separated, as libfuse's high-level API passes them. Errors are
raised as ``OSError(errno)``. Every public method takes the model's lock, so the FUSE
threads and the control server can share one model.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ParamSpec, TypeVar

from shardnode.testing.lazyfs.faults import FaultPlan, FsyncFault, WriteFault
from shardnode.testing.lazyfs.file_data import PAGE_SIZE, FileData

ROOT_INODE = 1
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_Params = ParamSpec("_Params")
_Result = TypeVar("_Result")


def _error(code: int, detail: str = "") -> OSError:
    return OSError(code, os.strerror(code) + (f": {detail}" if detail else ""))


def _synchronized(method: Callable[_Params, _Result]) -> Callable[_Params, _Result]:
    @functools.wraps(method)
    def locked(*args: _Params.args, **kwargs: _Params.kwargs) -> _Result:
        with args[0]._lock:  # type: ignore[attr-defined]
            return method(*args, **kwargs)

    return locked


@dataclass(slots=True, eq=False)
class Inode:
    number: int
    mode: int
    uid: int = 0
    gid: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    # Volatile names (directory entries) pointing at this inode.
    links: int = 0
    # Durable names pointing at this inode, from any directory's durable entries.
    durable_links: int = 0
    open_handles: int = 0

    def touch(self, now_ns: int) -> None:
        self.mtime_ns = self.ctime_ns = now_ns


@dataclass(slots=True, eq=False)
class RegularFile(Inode):
    data: FileData = field(default_factory=FileData)


@dataclass(slots=True, eq=False)
class Directory(Inode):
    entries: dict[str, int] = field(default_factory=dict)
    durable_entries: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class Symlink(Inode):
    target: str = ""


@dataclass(slots=True)
class Handle:
    inode: Inode
    path: str
    flags: int


@dataclass(slots=True)
class Counters:
    fsyncs: int = 0
    fsyncdirs: int = 0
    bytes_written: int = 0
    bytes_synced: int = 0
    faults_injected: int = 0
    power_losses: int = 0


@dataclass(slots=True, frozen=True)
class PowerLossReport:
    file_bytes_dropped: int
    files_reverted: int
    files_vanished: int
    entries_dropped: int
    handles_invalidated: int


class LazyModel:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        now = time.time_ns()
        root = Directory(ROOT_INODE, stat.S_IFDIR | 0o755, atime_ns=now, mtime_ns=now, ctime_ns=now)
        # The root is always reachable: count it as linked so it is never forgotten.
        root.links = root.durable_links = 1
        self._inodes: dict[int, Inode] = {ROOT_INODE: root}
        self._next_inode = ROOT_INODE + 1
        self._handles: dict[int, Handle] = {}
        self._next_handle = 1
        self._faults = FaultPlan()
        self._counters = Counters()

    # ---- lookup -------------------------------------------------------------------

    def _resolve(self, path: str) -> Inode:
        inode: Inode = self._inodes[ROOT_INODE]
        for name in path.split("/"):
            if not name:
                continue
            if not isinstance(inode, Directory):
                raise _error(errno.ENOTDIR, path)
            number = inode.entries.get(name)
            if number is None:
                raise _error(errno.ENOENT, path)
            inode = self._inodes[number]
        return inode

    def _resolve_parent(self, path: str) -> tuple[Directory, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        if not name:
            raise _error(errno.EBUSY, "the root has no parent")
        parent = self._resolve(head)
        if not isinstance(parent, Directory):
            raise _error(errno.ENOTDIR, head)
        return parent, name

    def _handle(self, handle_id: int) -> Handle:
        handle = self._handles.get(handle_id)
        if handle is None:
            # Handles do not survive a power loss: the process that held one "crashed".
            raise _error(errno.EIO, "stale handle (power loss)")
        return handle

    def _target(self, path: str | None, handle_id: int | None) -> tuple[Inode, str]:
        if handle_id is not None:
            handle = self._handle(handle_id)
            return handle.inode, handle.path
        if path is None:
            raise _error(errno.EINVAL, "neither path nor handle")
        return self._resolve(path), path

    # ---- inode lifetime -------------------------------------------------------------

    def _new_inode(self, kind: type[Inode], mode: int, **fields: Any) -> Inode:
        now = time.time_ns()
        inode = kind(self._next_inode, mode, atime_ns=now, mtime_ns=now, ctime_ns=now, **fields)
        self._next_inode += 1
        self._inodes[inode.number] = inode
        return inode

    def _forget_if_unused(self, inode: Inode) -> None:
        """Drop an inode nobody can reach: no volatile name, no durable name, not open.

        An inode with a durable name must stay even when its volatile names are gone:
        a power loss brings that name, and the inode's durable contents, back.
        """
        pending = [inode]
        while pending:
            current = pending.pop()
            if current.links or current.durable_links or current.open_handles:
                continue
            if self._inodes.pop(current.number, None) is None:
                continue
            if isinstance(current, Directory):
                for number in current.durable_entries.values():
                    child = self._inodes.get(number)
                    if child is not None:
                        child.durable_links -= 1
                        pending.append(child)

    def _link(self, parent: Directory, name: str, inode: Inode) -> None:
        parent.entries[name] = inode.number
        inode.links += 1
        parent.touch(time.time_ns())

    def _unlink_entry(self, parent: Directory, name: str) -> Inode:
        inode = self._inodes[parent.entries.pop(name)]
        inode.links -= 1
        now = time.time_ns()
        parent.touch(now)
        inode.ctime_ns = now
        self._forget_if_unused(inode)
        return inode

    # ---- faults ---------------------------------------------------------------------

    def _check_write_fault(self, path: str) -> None:
        code = self._faults.write_error(path)
        if code is not None:
            self._counters.faults_injected += 1
            raise _error(code, f"injected write fault on {path}")

    @_synchronized
    def fail_fsync(
        self,
        error: int = errno.EIO,
        count: int | None = None,
        path_contains: str | None = None,
        directories: bool = False,
    ) -> None:
        if count is not None and count < 1:
            raise ValueError("count must be at least 1 (or None: until cleared)")
        self._faults.fsync = FsyncFault(error, count, path_contains, directories)

    @_synchronized
    def fail_writes(self, error: int = errno.ENOSPC, path_contains: str | None = None) -> None:
        self._faults.write = WriteFault(error, path_contains)

    @_synchronized
    def clear_faults(self) -> None:
        self._faults.clear()

    @_synchronized
    def stats(self) -> dict[str, int]:
        counters = asdict(self._counters)
        counters["inodes"] = len(self._inodes)
        counters["open_handles"] = len(self._handles)
        counters["unsynced_file_bytes"] = sum(
            inode.data.unsynced_bytes() for inode in self._inodes.values() if isinstance(inode, RegularFile)
        )
        return counters

    # ---- attributes -----------------------------------------------------------------

    @_synchronized
    def getattr(self, path: str | None, handle_id: int | None = None) -> dict[str, int]:
        inode, _ = self._target(path, handle_id)
        attributes = {
            "st_ino": inode.number,
            "st_mode": inode.mode,
            # 1 for directories: "unknown", as btrfs reports, so no tool counts subdirectories
            # from it. Files: their names; 0 for an unlinked file that is still open.
            "st_nlink": 1 if isinstance(inode, Directory) else inode.links,
            "st_uid": inode.uid,
            "st_gid": inode.gid,
            "st_atime": inode.atime_ns,
            "st_mtime": inode.mtime_ns,
            "st_ctime": inode.ctime_ns,
            "st_blksize": PAGE_SIZE,
        }
        if isinstance(inode, RegularFile):
            attributes["st_size"] = inode.data.size
            attributes["st_blocks"] = inode.data.allocated_bytes // 512
        elif isinstance(inode, Symlink):
            attributes["st_size"] = len(inode.target.encode())
        else:
            attributes["st_size"] = PAGE_SIZE
        return attributes

    @_synchronized
    def chmod(self, path: str | None, mode: int, handle_id: int | None = None) -> None:
        inode, _ = self._target(path, handle_id)
        inode.mode = stat.S_IFMT(inode.mode) | stat.S_IMODE(mode)
        inode.ctime_ns = time.time_ns()

    @_synchronized
    def chown(self, path: str | None, uid: int, gid: int, handle_id: int | None = None) -> None:
        inode, _ = self._target(path, handle_id)
        if uid != -1:
            inode.uid = uid
        if gid != -1:
            inode.gid = gid
        inode.ctime_ns = time.time_ns()

    @_synchronized
    def utimens(
        self, path: str | None, atime_ns: int | None, mtime_ns: int | None, handle_id: int | None = None
    ) -> None:
        """Set the times; None leaves that time as it is (UTIME_OMIT)."""
        inode, _ = self._target(path, handle_id)
        if atime_ns is not None:
            inode.atime_ns = atime_ns
        if mtime_ns is not None:
            inode.mtime_ns = mtime_ns
        inode.ctime_ns = time.time_ns()

    @_synchronized
    def statfs(self) -> dict[str, int]:
        # A large fake disk: the store must never think it is short of space unless a
        # write fault says so.
        total_blocks = 1 << 32  # 16 TiB of 4 KiB blocks
        used_blocks = sum(
            inode.data.allocated_bytes // PAGE_SIZE for inode in self._inodes.values() if isinstance(inode, RegularFile)
        )
        return {
            "f_bsize": PAGE_SIZE,
            "f_frsize": PAGE_SIZE,
            "f_blocks": total_blocks,
            "f_bfree": total_blocks - used_blocks,
            "f_bavail": total_blocks - used_blocks,
            "f_files": 1 << 32,
            "f_ffree": (1 << 32) - len(self._inodes),
            "f_favail": (1 << 32) - len(self._inodes),
            "f_namemax": 255,
        }

    # ---- namespace ------------------------------------------------------------------

    @_synchronized
    def readdir(self, path: str | None, handle_id: int | None = None) -> list[tuple[str, int, int]]:
        """(name, mode, inode number) of every entry, "." and ".." first."""
        directory, _ = self._target(path, handle_id)
        if not isinstance(directory, Directory):
            raise _error(errno.ENOTDIR)
        listing = [(".", directory.mode, directory.number), ("..", stat.S_IFDIR, 0)]
        for name, number in directory.entries.items():
            listing.append((name, self._inodes[number].mode, number))
        return listing

    @_synchronized
    def mkdir(self, path: str, mode: int) -> None:
        parent, name = self._resolve_parent(path)
        if name in parent.entries:
            raise _error(errno.EEXIST, path)
        self._check_write_fault(path)
        self._link(parent, name, self._new_inode(Directory, stat.S_IFDIR | stat.S_IMODE(mode)))

    @_synchronized
    def mknod(self, path: str, mode: int) -> None:
        if not stat.S_ISREG(mode):
            raise _error(errno.EPERM, "only regular files can be created with mknod")
        parent, name = self._resolve_parent(path)
        if name in parent.entries:
            raise _error(errno.EEXIST, path)
        self._check_write_fault(path)
        self._link(parent, name, self._new_inode(RegularFile, stat.S_IFREG | stat.S_IMODE(mode)))

    @_synchronized
    def symlink(self, path: str, target: str) -> None:
        parent, name = self._resolve_parent(path)
        if name in parent.entries:
            raise _error(errno.EEXIST, path)
        self._check_write_fault(path)
        self._link(parent, name, self._new_inode(Symlink, stat.S_IFLNK | 0o777, target=target))

    @_synchronized
    def readlink(self, path: str) -> str:
        inode = self._resolve(path)
        if not isinstance(inode, Symlink):
            raise _error(errno.EINVAL, path)
        return inode.target

    @_synchronized
    def link(self, path: str, existing_path: str) -> None:
        inode = self._resolve(existing_path)
        if isinstance(inode, Directory):
            raise _error(errno.EPERM, "hard links to directories")
        parent, name = self._resolve_parent(path)
        if name in parent.entries:
            raise _error(errno.EEXIST, path)
        self._check_write_fault(path)
        self._link(parent, name, inode)
        inode.ctime_ns = time.time_ns()

    @_synchronized
    def unlink(self, path: str) -> None:
        parent, name = self._resolve_parent(path)
        number = parent.entries.get(name)
        if number is None:
            raise _error(errno.ENOENT, path)
        if isinstance(self._inodes[number], Directory):
            raise _error(errno.EISDIR, path)
        self._unlink_entry(parent, name)

    @_synchronized
    def rmdir(self, path: str) -> None:
        parent, name = self._resolve_parent(path)
        number = parent.entries.get(name)
        if number is None:
            raise _error(errno.ENOENT, path)
        directory = self._inodes[number]
        if not isinstance(directory, Directory):
            raise _error(errno.ENOTDIR, path)
        if directory.entries:
            raise _error(errno.ENOTEMPTY, path)
        self._unlink_entry(parent, name)

    @_synchronized
    def rename(self, old_path: str, new_path: str, flags: int = 0) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise _error(errno.EINVAL, f"rename flags {flags:#x}")
        old_parent, old_name = self._resolve_parent(old_path)
        new_parent, new_name = self._resolve_parent(new_path)
        if old_name not in old_parent.entries:
            raise _error(errno.ENOENT, old_path)
        moving = self._inodes[old_parent.entries[old_name]]
        if isinstance(moving, Directory) and new_path.startswith(old_path.rstrip("/") + "/"):
            raise _error(errno.EINVAL, "a directory cannot move into itself")
        replaced_number = new_parent.entries.get(new_name)
        if replaced_number == moving.number:
            return  # both names are links to one inode: POSIX says do nothing
        now = time.time_ns()
        if flags & RENAME_EXCHANGE:
            if replaced_number is None:
                raise _error(errno.ENOENT, new_path)
            old_parent.entries[old_name], new_parent.entries[new_name] = replaced_number, moving.number
            old_parent.touch(now)
            new_parent.touch(now)
            return
        if replaced_number is not None:
            if flags & RENAME_NOREPLACE:
                raise _error(errno.EEXIST, new_path)
            replaced = self._inodes[replaced_number]
            if isinstance(moving, Directory) != isinstance(replaced, Directory):
                raise _error(errno.EISDIR if isinstance(replaced, Directory) else errno.ENOTDIR, new_path)
            if isinstance(replaced, Directory) and replaced.entries:
                raise _error(errno.ENOTEMPTY, new_path)
            self._unlink_entry(new_parent, new_name)
        del old_parent.entries[old_name]
        new_parent.entries[new_name] = moving.number
        old_parent.touch(now)
        new_parent.touch(now)
        moving.ctime_ns = now

    # ---- open files -----------------------------------------------------------------

    def _open_handle(self, inode: Inode, path: str, flags: int) -> int:
        handle_id = self._next_handle
        self._next_handle += 1
        self._handles[handle_id] = Handle(inode, path, flags)
        inode.open_handles += 1
        return handle_id

    @_synchronized
    def create(self, path: str, mode: int, flags: int) -> int:
        parent, name = self._resolve_parent(path)
        number = parent.entries.get(name)
        if number is not None:
            if flags & os.O_EXCL:
                raise _error(errno.EEXIST, path)
            inode = self._inodes[number]
        else:
            self._check_write_fault(path)
            inode = self._new_inode(RegularFile, stat.S_IFREG | stat.S_IMODE(mode))
            self._link(parent, name, inode)
        return self._open_existing(inode, path, flags)

    @_synchronized
    def open(self, path: str, flags: int) -> int:
        return self._open_existing(self._resolve(path), path, flags)

    def _open_existing(self, inode: Inode, path: str, flags: int) -> int:
        if isinstance(inode, Directory) and flags & os.O_ACCMODE != os.O_RDONLY:
            raise _error(errno.EISDIR, path)
        if isinstance(inode, RegularFile) and flags & os.O_TRUNC and inode.data.size:
            inode.data.truncate(0)
            inode.touch(time.time_ns())
        return self._open_handle(inode, path, flags)

    @_synchronized
    def opendir(self, path: str) -> int:
        directory = self._resolve(path)
        if not isinstance(directory, Directory):
            raise _error(errno.ENOTDIR, path)
        return self._open_handle(directory, path, os.O_RDONLY)

    @_synchronized
    def release(self, handle_id: int) -> None:
        handle = self._handles.pop(handle_id, None)
        if handle is None:
            return  # opened before a power loss: nothing left to release
        handle.inode.open_handles -= 1
        self._forget_if_unused(handle.inode)

    def _regular_file(self, handle_id: int) -> tuple[RegularFile, Handle]:
        handle = self._handle(handle_id)
        if not isinstance(handle.inode, RegularFile):
            raise _error(errno.EISDIR)
        return handle.inode, handle

    @_synchronized
    def read(self, handle_id: int, size: int, offset: int) -> bytes:
        inode, _ = self._regular_file(handle_id)
        return inode.data.read(offset, size)

    @_synchronized
    def write(self, handle_id: int, data: bytes, offset: int) -> int:
        inode, handle = self._regular_file(handle_id)
        self._check_write_fault(handle.path)
        if handle.flags & os.O_APPEND:
            # Without writeback caching the kernel leaves O_APPEND to the filesystem.
            offset = inode.data.size
        inode.data.write(offset, data)
        inode.touch(time.time_ns())
        self._counters.bytes_written += len(data)
        return len(data)

    @_synchronized
    def truncate(self, path: str | None, length: int, handle_id: int | None = None) -> None:
        inode, where = self._target(path, handle_id)
        if isinstance(inode, Directory):
            raise _error(errno.EISDIR, where)
        if not isinstance(inode, RegularFile):
            raise _error(errno.EINVAL, where)
        if length > inode.data.size:
            self._check_write_fault(where)
        inode.data.truncate(length)
        inode.touch(time.time_ns())

    @_synchronized
    def fallocate(self, handle_id: int, mode: int, offset: int, length: int) -> None:
        inode, handle = self._regular_file(handle_id)
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise _error(errno.EOPNOTSUPP, f"fallocate mode {mode:#x}")
        if mode & FALLOC_FL_PUNCH_HOLE:
            if not mode & FALLOC_FL_KEEP_SIZE:
                raise _error(errno.EOPNOTSUPP, "punch hole needs FALLOC_FL_KEEP_SIZE")
            inode.data.zero_range(offset, length)
        else:
            # Preallocation: the model has no blocks to reserve, but a full disk refuses.
            self._check_write_fault(handle.path)
            if mode & FALLOC_FL_ZERO_RANGE:
                inode.data.zero_range(offset, length)
            if not mode & FALLOC_FL_KEEP_SIZE and offset + length > inode.data.size:
                inode.data.truncate(offset + length)
        inode.touch(time.time_ns())

    # ---- durability -----------------------------------------------------------------

    @_synchronized
    def fsync(self, handle_id: int) -> None:
        inode, handle = self._regular_file(handle_id)
        self._counters.fsyncs += 1
        code = self._faults.fsync_error(handle.path, is_directory=False)
        if code is not None:
            self._counters.faults_injected += 1
            inode.data.discard_dirty()
            raise _error(code, f"injected fsync fault on {handle.path}")
        self._counters.bytes_synced += inode.data.sync()

    @_synchronized
    def fsyncdir(self, handle_id: int) -> None:
        handle = self._handle(handle_id)
        directory = handle.inode
        if not isinstance(directory, Directory):
            raise _error(errno.ENOTDIR, handle.path)
        self._counters.fsyncdirs += 1
        code = self._faults.fsync_error(handle.path, is_directory=True)
        if code is not None:
            self._counters.faults_injected += 1
            raise _error(code, f"injected fsyncdir fault on {handle.path}")
        self._sync_entries(directory)

    def _sync_entries(self, directory: Directory) -> None:
        old, new = directory.durable_entries, directory.entries
        if old == new:
            return
        released: list[Inode] = []
        for name, number in old.items():
            if new.get(name) != number:
                inode = self._inodes.get(number)
                if inode is not None:
                    inode.durable_links -= 1
                    released.append(inode)
        for name, number in new.items():
            if old.get(name) != number:
                self._inodes[number].durable_links += 1
        directory.durable_entries = dict(new)
        for inode in released:
            self._forget_if_unused(inode)

    @_synchronized
    def power_loss(self) -> dict[str, int]:
        """Everything not synced is gone; returns what was dropped (PowerLossReport)."""
        handles_invalidated = len(self._handles)
        self._handles.clear()
        entries_dropped = 0
        file_bytes_dropped = 0
        files_reverted = 0
        for inode in self._inodes.values():
            inode.open_handles = 0
            if isinstance(inode, Directory):
                durable = inode.durable_entries
                entries_dropped += sum(1 for name, number in inode.entries.items() if durable.get(name) != number)
                inode.entries = dict(durable)

        reachable = self._reachable_from_root()
        files_vanished = 0
        for number, inode in list(self._inodes.items()):
            if number not in reachable:
                if isinstance(inode, RegularFile) and inode.links:
                    files_vanished += 1
                    file_bytes_dropped += inode.data.size
                del self._inodes[number]
            elif isinstance(inode, RegularFile) and inode.data.has_unsynced_changes:
                files_reverted += 1
                file_bytes_dropped += inode.data.unsynced_bytes()
                inode.data.revert_to_durable()

        # Link counts from scratch: volatile and durable entries are now the same.
        for inode in self._inodes.values():
            inode.links = inode.durable_links = 0
        root = self._inodes[ROOT_INODE]
        root.links = root.durable_links = 1
        for inode in self._inodes.values():
            if isinstance(inode, Directory):
                for number in inode.entries.values():
                    child = self._inodes[number]
                    child.links += 1
                    child.durable_links += 1

        self._counters.power_losses += 1
        report = PowerLossReport(
            file_bytes_dropped=file_bytes_dropped,
            files_reverted=files_reverted,
            files_vanished=files_vanished,
            entries_dropped=entries_dropped,
            handles_invalidated=handles_invalidated,
        )
        return asdict(report)

    def _reachable_from_root(self) -> set[int]:
        reachable = {ROOT_INODE}
        pending = [ROOT_INODE]
        while pending:
            inode = self._inodes[pending.pop()]
            if isinstance(inode, Directory):
                for number in inode.entries.values():
                    if number not in reachable and number in self._inodes:
                        reachable.add(number)
                        pending.append(number)
        return reachable
