"""The lazy power-loss filesystem (shardnode.testing.lazyfs).

The model tests run everywhere; the mount tests need FUSE and skip with the one-line
reason of ``lazyfs_unavailable()`` where it cannot run.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardnode.testing.lazyfs import LazyFS, LazyFSError, LazyModel, lazyfs_unavailable, mounted_lazyfs
from shardnode.testing.lazyfs.file_data import PAGE_SIZE

needs_fuse = pytest.mark.skipif(lazyfs_unavailable() is not None, reason=lazyfs_unavailable() or "")


# ---- the model, without FUSE ---------------------------------------------------------


def _write_file(model: LazyModel, path: str, data: bytes, *, sync: bool) -> None:
    handle = model.create(path, 0o644, os.O_WRONLY | os.O_CREAT)
    model.write(handle, data, 0)
    if sync:
        model.fsync(handle)
    model.release(handle)


def _sync_dir(model: LazyModel, path: str) -> None:
    handle = model.opendir(path)
    model.fsyncdir(handle)
    model.release(handle)


def _read_file(model: LazyModel, path: str) -> bytes:
    handle = model.open(path, os.O_RDONLY)
    try:
        return model.read(handle, 1 << 30, 0)
    finally:
        model.release(handle)


def _names(model: LazyModel, path: str) -> set[str]:
    return {name for name, _, _ in model.readdir(path)} - {".", ".."}


def test_model_rename_synced_in_both_directories_leaves_the_file_in_both() -> None:
    model = LazyModel()
    model.mkdir("/a", 0o755)
    model.mkdir("/b", 0o755)
    _sync_dir(model, "/")
    _write_file(model, "/a/f", b"data", sync=True)
    _sync_dir(model, "/a")
    model.rename("/a/f", "/b/f")
    _sync_dir(model, "/b")  # /a is not synced: its durable entry still names the file

    model.power_loss()

    assert _read_file(model, "/a/f") == b"data"
    assert _read_file(model, "/b/f") == b"data"
    assert model.getattr("/a/f")["st_ino"] == model.getattr("/b/f")["st_ino"]
    assert model.getattr("/a/f")["st_nlink"] == 2


def test_model_rename_synced_in_neither_directory_reverts() -> None:
    model = LazyModel()
    model.mkdir("/a", 0o755)
    model.mkdir("/b", 0o755)
    _sync_dir(model, "/")
    _write_file(model, "/a/f", b"data", sync=True)
    _sync_dir(model, "/a")
    model.rename("/a/f", "/b/g")
    _sync_dir(model, "/a")  # the name is durably gone from /a, and not yet durable in /b

    report = model.power_loss()

    assert _names(model, "/a") == set() and _names(model, "/b") == set()
    assert report["entries_dropped"] == 1


def test_model_unlinked_file_with_a_durable_name_comes_back() -> None:
    model = LazyModel()
    _write_file(model, "/f", b"kept", sync=True)
    _sync_dir(model, "/")
    model.unlink("/f")
    assert _names(model, "/") == set()

    model.power_loss()

    assert _read_file(model, "/f") == b"kept"


def test_model_forgets_files_that_nothing_can_reach() -> None:
    model = LazyModel()
    inodes_before = model.stats()["inodes"]
    for number in range(50):
        _write_file(model, f"/f{number}", b"x" * 100, sync=True)
        model.unlink(f"/f{number}")
    assert model.stats()["inodes"] == inodes_before


def test_model_failed_fsync_discards_dirty_pages_but_readers_still_see_them() -> None:
    model = LazyModel()
    _write_file(model, "/f", b"A" * PAGE_SIZE * 2, sync=True)
    _sync_dir(model, "/")
    handle = model.open("/f", os.O_RDWR)
    model.write(handle, b"B" * 10, PAGE_SIZE)
    model.fail_fsync(count=1)
    with pytest.raises(OSError) as failure:
        model.fsync(handle)
    assert failure.value.errno == errno.EIO
    assert model.read(handle, 10, PAGE_SIZE) == b"B" * 10  # still in the "page cache"
    model.fsync(handle)  # succeeds: nothing dirty any more
    model.release(handle)

    model.power_loss()

    assert _read_file(model, "/f") == b"A" * PAGE_SIZE * 2
    assert model.stats()["faults_injected"] == 1


def test_model_directory_fsync_fault_only_when_asked_and_entries_stay_volatile() -> None:
    model = LazyModel()
    model.mkdir("/dir", 0o755)
    _sync_dir(model, "/")
    _write_file(model, "/dir/kept", b"x", sync=True)
    model.fail_fsync(errno.EIO, path_contains="dir")
    _sync_dir(model, "/dir")  # files only: the directory fsync is not failed
    model.fail_fsync(errno.EIO, path_contains="dir", directories=True)
    _write_file(model, "/dir/lost", b"y", sync=False)
    with pytest.raises(OSError) as failure:
        _sync_dir(model, "/dir")
    assert failure.value.errno == errno.EIO

    model.power_loss()

    assert _names(model, "/dir") == {"kept"}


def test_model_handles_die_with_the_power() -> None:
    model = LazyModel()
    handle = model.create("/f", 0o644, os.O_RDWR | os.O_CREAT)
    report = model.power_loss()
    assert report["handles_invalidated"] == 1
    with pytest.raises(OSError) as failure:
        model.write(handle, b"late", 0)
    assert failure.value.errno == errno.EIO
    model.release(handle)  # releasing a dead handle is harmless


def test_model_truncate_then_grow_reads_zeros() -> None:
    model = LazyModel()
    handle = model.create("/f", 0o644, os.O_RDWR | os.O_CREAT)
    model.write(handle, b"x" * 10_000, 0)
    model.truncate(None, 5, handle)
    model.truncate(None, 9_000, handle)
    assert model.read(handle, 20_000, 0) == b"x" * 5 + bytes(8_995)


# ---- the mounted filesystem ------------------------------------------------------------


@pytest.fixture
def lazyfs(tmp_path: Path) -> Iterator[LazyFS]:
    with mounted_lazyfs(tmp_path / "mnt") as filesystem:
        yield filesystem


def _fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write(path: Path, data: bytes, *, sync: bool) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(descriptor, data)
        if sync:
            os.fsync(descriptor)
    finally:
        os.close(descriptor)


@needs_fuse
def test_unsynced_data_is_lost_and_synced_data_survives(lazyfs: LazyFS) -> None:
    root = Path(lazyfs.mountpoint)
    _write(root / "synced", b"s" * 10_000, sync=True)
    _write(root / "unsynced", b"u" * 10_000, sync=False)
    _fsync_path(root)

    report = lazyfs.power_loss()

    assert (root / "synced").read_bytes() == b"s" * 10_000
    assert (root / "unsynced").read_bytes() == b""
    assert report["file_bytes_dropped"] >= 10_000
    assert report["files_reverted"] == 1


@needs_fuse
def test_synced_prefix_survives_unsynced_suffix_and_truncate_do_not(lazyfs: LazyFS) -> None:
    root = Path(lazyfs.mountpoint)
    _fsync_path(root)
    path = root / "log"
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(descriptor, b"a" * 5_000)
    os.fsync(descriptor)
    _fsync_path(root)
    os.write(descriptor, b"b" * 3_000)
    os.close(descriptor)

    lazyfs.power_loss()
    assert path.read_bytes() == b"a" * 5_000

    os.truncate(path, 10)
    assert path.stat().st_size == 10
    lazyfs.power_loss()
    assert path.read_bytes() == b"a" * 5_000


@needs_fuse
def test_new_file_needs_its_directory_synced(lazyfs: LazyFS) -> None:
    root = Path(lazyfs.mountpoint)
    _write(root / "file", b"data", sync=True)
    lazyfs.power_loss()
    assert not (root / "file").exists()

    _write(root / "file", b"data", sync=True)
    _fsync_path(root)
    lazyfs.power_loss()
    assert (root / "file").read_bytes() == b"data"


@needs_fuse
def test_nested_directories_need_every_parent_synced(lazyfs: LazyFS) -> None:
    root = Path(lazyfs.mountpoint)
    leaf = root / "x" / "y" / "z"
    leaf.mkdir(parents=True)
    _write(leaf / "f", b"data", sync=True)
    _fsync_path(leaf)
    _fsync_path(leaf.parent)  # x/y synced, but not x nor the root
    lazyfs.power_loss()
    assert os.listdir(root) == []

    leaf.mkdir(parents=True)
    _write(leaf / "f", b"data", sync=True)
    for directory in (leaf, leaf.parent, leaf.parent.parent, root):
        _fsync_path(directory)
    lazyfs.power_loss()
    assert (leaf / "f").read_bytes() == b"data"


@needs_fuse
def test_rename_is_durable_only_after_the_directory_fsync(lazyfs: LazyFS) -> None:
    root = Path(lazyfs.mountpoint)
    _write(root / "old", b"content", sync=True)
    _fsync_path(root)
    os.rename(root / "old", root / "new")
    lazyfs.power_loss()
    assert sorted(os.listdir(root)) == ["old"]

    os.rename(root / "old", root / "new")
    _fsync_path(root)
    lazyfs.power_loss()
    assert sorted(os.listdir(root)) == ["new"]
    assert (root / "new").read_bytes() == b"content"


@needs_fuse
def test_rename_over_a_file_and_noreplace(lazyfs: LazyFS) -> None:
    root = Path(lazyfs.mountpoint)
    _write(root / "a", b"A", sync=False)
    _write(root / "b", b"B", sync=False)
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_noreplace = -100, 1
    result = libc.renameat2(at_fdcwd, bytes(root / "a"), at_fdcwd, bytes(root / "b"), rename_noreplace)
    assert (result, ctypes.get_errno()) == (-1, errno.EEXIST)
    os.replace(root / "a", root / "b")
    assert os.listdir(root) == ["b"] and (root / "b").read_bytes() == b"A"


@needs_fuse
def test_links_symlinks_and_metadata(lazyfs: LazyFS) -> None:
    root = Path(lazyfs.mountpoint)
    _write(root / "a", b"shared", sync=True)
    _fsync_path(root)
    os.link(root / "a", root / "hard")
    os.symlink("a", root / "soft")
    assert os.stat(root / "a").st_nlink == 2
    assert (root / "hard").read_bytes() == (root / "soft").read_bytes() == b"shared"
    assert os.readlink(root / "soft") == "a"
    os.chmod(root / "a", 0o600)
    os.utime(root / "a", ns=(1_000_000_000, 2_000_000_000))
    attributes = os.stat(root / "hard")
    assert (stat.S_IMODE(attributes.st_mode), attributes.st_mtime_ns) == (0o600, 2_000_000_000)
    assert os.statvfs(root).f_bavail * os.statvfs(root).f_frsize > 1 << 40

    lazyfs.power_loss()  # the new names were never made durable

    assert os.listdir(root) == ["a"] and os.stat(root / "a").st_nlink == 1


@needs_fuse
def test_unlinked_open_file_keeps_working(lazyfs: LazyFS) -> None:
    root = Path(lazyfs.mountpoint)
    descriptor = os.open(root / "doomed", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, b"before")
        os.unlink(root / "doomed")
        assert os.listdir(root) == []
        os.write(descriptor, b" after")
        os.fsync(descriptor)
        assert os.pread(descriptor, 100, 0) == b"before after"
        os.ftruncate(descriptor, 6)
        assert os.pread(descriptor, 100, 0) == b"before"
    finally:
        os.close(descriptor)
    # FUSE sends RELEASE after close() has returned: give the daemon a moment.
    deadline = time.monotonic() + 5
    while lazyfs.stats()["open_handles"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lazyfs.stats()["open_handles"] == 0


@needs_fuse
def test_sparse_writes_append_and_exclusive_create(lazyfs: LazyFS) -> None:
    root = Path(lazyfs.mountpoint)
    descriptor = os.open(root / "sparse", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.pwrite(descriptor, b"end", 1 << 20)
        assert os.fstat(descriptor).st_size == (1 << 20) + 3
        assert os.pread(descriptor, 8, (1 << 20) - 5) == bytes(5) + b"end"
    finally:
        os.close(descriptor)
    with pytest.raises(FileExistsError):
        os.open(root / "sparse", os.O_RDWR | os.O_CREAT | os.O_EXCL)
    assert stat.S_IMODE(os.stat(root / "sparse").st_mode) == 0o600
    with open(root / "appended", "ab") as first, open(root / "appended", "ab") as second:
        first.write(b"1")
        first.flush()
        second.write(b"2")
        second.flush()
    assert (root / "appended").read_bytes() == b"12"


@needs_fuse
def test_fallocate_modes_and_unsupported_ones(lazyfs: LazyFS) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    keep_size, punch_hole, insert_range = 0x01, 0x02, 0x20
    descriptor = os.open(Path(lazyfs.mountpoint, "f"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, b"x" * 100)
        assert libc.fallocate(descriptor, keep_size, 0, 1 << 20) == 0
        assert os.fstat(descriptor).st_size == 100
        assert libc.fallocate(descriptor, punch_hole | keep_size, 10, 20) == 0
        assert os.pread(descriptor, 100, 0) == b"x" * 10 + bytes(20) + b"x" * 70
        assert libc.fallocate(descriptor, 0, 0, 4096) == 0
        assert os.fstat(descriptor).st_size == 4096
        assert libc.fallocate(descriptor, insert_range, 0, 4096) == -1
        assert ctypes.get_errno() == errno.EOPNOTSUPP
        lazyfs.fail_writes(errno.ENOSPC)
        assert libc.fallocate(descriptor, keep_size, 0, 1 << 20) == -1
        assert ctypes.get_errno() == errno.ENOSPC
    finally:
        os.close(descriptor)


@needs_fuse
def test_failed_fsync_loses_the_data_even_after_a_later_successful_fsync(lazyfs: LazyFS) -> None:
    root = Path(lazyfs.mountpoint)
    _write(root / "wal", b"", sync=True)
    _fsync_path(root)
    lazyfs.fail_fsync(errno.EIO, count=1, path_contains="wal")
    descriptor = os.open(root / "wal", os.O_RDWR)
    try:
        os.write(descriptor, b"record")
        with pytest.raises(OSError) as failure:
            os.fsync(descriptor)
        assert failure.value.errno == errno.EIO
        os.fsync(descriptor)  # the fault was counted: this one succeeds, with nothing dirty
    finally:
        os.close(descriptor)

    lazyfs.power_loss()

    assert (root / "wal").read_bytes() != b"record"
    stats = lazyfs.stats()
    assert stats["faults_injected"] == 1 and stats["fsyncs"] >= 3 and stats["power_losses"] == 1


@needs_fuse
def test_fail_writes_until_cleared(lazyfs: LazyFS) -> None:
    root = Path(lazyfs.mountpoint)
    _write(root / "full", b"", sync=False)
    _write(root / "other", b"", sync=False)
    lazyfs.fail_writes(errno.ENOSPC, path_contains="full")
    with open(root / "other", "wb") as other:
        other.write(b"fine")  # another path: unaffected
    with pytest.raises(OSError) as failure:
        with open(root / "full", "wb") as full:
            full.write(b"x")
    assert failure.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as failure:
        _write(root / "full-new", b"", sync=False)
    assert failure.value.errno == errno.ENOSPC

    lazyfs.clear_faults()
    with open(root / "full", "wb") as full:
        full.write(b"x")
    assert (root / "full").read_bytes() == b"x"


# ---- RocksDB on the mount ---------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import sys, time
    from rocksdict import Options, Rdict, WriteOptions
    path, count, sync = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "sync"
    db = Rdict(path, Options(raw_mode=True))
    options = WriteOptions()
    options.sync = sync
    for number in range(count):
        db.put(b"key%06d" % number, b"v" * 100, options)
    print("written", flush=True)
    time.sleep(600)  # holds the DB (and its LOCK) open until killed
    """
)


def _durable_directory(path: Path) -> Path:
    """Create ``path`` and make its name durable. RocksDB fsyncs its DB directory but not
    that directory's parent: without this, the whole DB vanishes on power loss."""
    path.mkdir(exist_ok=True)
    _fsync_path(path)
    _fsync_path(path.parent)
    return path


def _start_writer(db_path: Path, count: int, *, sync: bool) -> subprocess.Popen[str]:
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(db_path), str(count), "sync" if sync else "nosync"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None
    assert writer.stdout.readline().strip() == "written", "the writer died; see its stderr above"
    return writer


def _kill(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def _count_keys(db_path: Path) -> int:
    from rocksdict import Options, Rdict

    db = Rdict(str(db_path), Options(raw_mode=True))
    try:
        return sum(1 for _ in db.keys())
    finally:
        db.close()


@needs_fuse
def test_rocksdb_synced_puts_survive_power_loss(lazyfs: LazyFS) -> None:
    db_path = _durable_directory(Path(lazyfs.mountpoint, "db"))
    writer = _start_writer(db_path, 1_000, sync=True)
    try:
        # The kernel keeps RocksDB's LOCK (no lock callbacks): a second opener is refused.
        from rocksdict import Options, Rdict

        with pytest.raises(Exception, match="(?i)lock"):
            Rdict(str(db_path), Options(raw_mode=True))
    finally:
        _kill(writer)
    lazyfs.power_loss()
    assert _count_keys(db_path) == 1_000


@needs_fuse
def test_rocksdb_unsynced_puts_are_lost_and_the_db_recovers(lazyfs: LazyFS) -> None:
    db_path = _durable_directory(Path(lazyfs.mountpoint, "db"))
    _kill(_start_writer(db_path, 10, sync=True))
    writer = _start_writer(db_path, 1_000, sync=False)
    _kill(writer)
    assert lazyfs.stats()["unsynced_file_bytes"] > 0

    report = lazyfs.power_loss()

    assert report["file_bytes_dropped"] > 100_000
    # The 10 synced keys of the first writer; none of the 990 more that only the unsynced
    # writer wrote.
    assert _count_keys(db_path) == 10
    _kill(_start_writer(db_path, 20, sync=True))  # recovery left a DB that takes writes
    lazyfs.power_loss()
    assert _count_keys(db_path) == 20


# ---- lifecycle ---------------------------------------------------------------------------


def _mounted(mountpoint: str) -> bool:
    escaped = mountpoint.replace(" ", "\\040")
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        return any(line.split()[1] == escaped for line in mounts)


@needs_fuse
def test_stop_leaves_no_mount_and_no_process_even_when_busy(tmp_path: Path) -> None:
    filesystem = LazyFS(tmp_path / "mnt")
    filesystem.start()
    pid = filesystem.pid
    assert pid is not None and _mounted(filesystem.mountpoint)
    busy = os.open(os.path.join(filesystem.mountpoint, "open-file"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        filesystem.stop()
        assert not _mounted(filesystem.mountpoint)
        assert not os.path.exists(f"/proc/{pid}")
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN: the daemon that served it is gone
            os.close(busy)
    filesystem.stop()  # idempotent


@needs_fuse
def test_a_killed_daemon_leaves_no_mount(tmp_path: Path) -> None:
    with mounted_lazyfs(tmp_path / "mnt") as filesystem:
        assert filesystem.pid is not None
        os.kill(filesystem.pid, signal.SIGKILL)
    assert not _mounted(filesystem.mountpoint)


@needs_fuse
def test_a_killed_test_run_leaves_no_mount(tmp_path: Path) -> None:
    mountpoint = tmp_path / "host with space"
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from shardnode.testing.lazyfs import LazyFS; "
            "LazyFS(sys.argv[1]).start(); print('mounted', flush=True); time.sleep(600)",
            str(mountpoint),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None and owner.stdout.readline().strip() == "mounted"
    assert _mounted(str(mountpoint))
    _kill(owner)  # no stop(): the daemon notices its parent is gone
    deadline = time.monotonic() + 5
    while _mounted(str(mountpoint)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _mounted(str(mountpoint))


@needs_fuse
def test_start_reports_the_daemon_log_when_it_cannot_start(tmp_path: Path) -> None:
    unbindable = tmp_path / ("c" * 120)  # longer than a unix socket path may be
    filesystem = LazyFS(tmp_path / "mnt", unbindable, start_timeout=5)
    with pytest.raises(LazyFSError, match="(?s)exited.*too long"):
        filesystem.start()
    assert not _mounted(filesystem.mountpoint)


@needs_fuse
def test_rocksdb_does_not_sync_the_parent_of_its_directory(lazyfs: LazyFS) -> None:
    """Why _durable_directory exists: a quirk the store must handle itself."""
    db_path = Path(lazyfs.mountpoint, "db")
    _kill(_start_writer(db_path, 10, sync=True))
    lazyfs.power_loss()
    assert os.listdir(lazyfs.mountpoint) == []
