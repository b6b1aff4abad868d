"""A "lazy" FUSE filesystem for power-loss tests (the idea of Jepsen's LazyFS).

Everything not fsynced lives only in the daemon's memory and is dropped by
``power_loss()``; fsync/fsyncdir faults and write faults are injected on command.
The model (strict POSIX durability) is in ``model.py``; the daemon is
``python -m shardnode.testing.lazyfs MOUNTPOINT --control SOCKET``; tests use
``LazyFS`` / ``mounted_lazyfs`` and skip with ``lazyfs_unavailable()``. See
docs/testing.md.

Importing this package does not import the FUSE binding: a machine without libfuse3
can still import it, ask ``lazyfs_unavailable()`` and test the model.
"""

from shardnode.testing.lazyfs.control import ControlError
from shardnode.testing.lazyfs.harness import LazyFS, LazyFSError, lazyfs_unavailable, mounted_lazyfs
from shardnode.testing.lazyfs.model import LazyModel

__all__ = ["ControlError", "LazyFS", "LazyFSError", "LazyModel", "lazyfs_unavailable", "mounted_lazyfs"]
