"""The lazyfs daemon: ``python -m shardnode.testing.lazyfs MOUNTPOINT --control SOCKET``.

Runs in the foreground until unmounted (``fusermount3 -u``) or signalled; logs one
"ready" line on stderr once the kernel has mounted it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shardnode.testing.lazyfs", description=__doc__)
    parser.add_argument("mountpoint")
    parser.add_argument("--control", required=True, help="unix socket path for the control API")
    parser.add_argument("--debug", action="store_true", help="log every FUSE operation")
    parser.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="unmount and exit when the process that started this one dies (a killed test run)",
    )
    options = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if options.debug else logging.INFO,
        format="%(asctime)s lazyfs %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    # mfusepy looks for libfuse 2 first; the mount options here are libfuse 3's.
    if "FUSE_LIBRARY_PATH" not in os.environ:
        os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")

    from shardnode.testing.lazyfs.control import start_control_server
    from shardnode.testing.lazyfs.fuse_operations import serve
    from shardnode.testing.lazyfs.model import LazyModel

    log = logging.getLogger("shardnode.testing.lazyfs")
    mountpoint = os.path.abspath(options.mountpoint)
    model = LazyModel()
    control = start_control_server(options.control, model)

    def on_mounted() -> None:
        log.info("ready pid=%d mountpoint=%s control=%s", os.getpid(), mountpoint, options.control)

    if options.exit_with_parent:
        _exit_when_orphaned(log)
    try:
        serve(model, mountpoint, on_mounted)
    finally:
        control.server_close()
        if os.path.exists(options.control):
            os.unlink(options.control)
    log.info("unmounted %s", mountpoint)
    return 0


def _exit_when_orphaned(log: logging.Logger) -> None:
    """SIGTERM ourselves once our parent is gone: libfuse's handler then ends the loop
    and unmounts, so a test run killed with SIGKILL leaves no mount behind."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        log.info("parent %d is gone: unmounting", parent)
        # Process-directed, so the kernel delivers it to the main thread, which is the
        # one blocked reading /dev/fuse.
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="lazyfs-parent-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
