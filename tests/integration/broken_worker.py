"""A worker with one durability promise deliberately broken, to show that the
power-loss tests catch it (they must report lost acknowledged writes).

    python -m tests.integration.broken_worker --config … --host … --group 0

SHARDNODE_BROKEN names the variant:
- `unsynced-log`: every RocksDB write skips its fsync (the log batch of a
  Ready included), so writes are acknowledged from the page cache;
- `no-directory-fsync`: new data directories are never fsynced into their
  parents, so a power loss soon after the first start can take a whole
  replica's directory (its log, term and vote) with it.

Never used outside tests/integration/test_power_loss.py.
"""

from __future__ import annotations

import os
import sys

from shardnode.storage import engine


def _break(variant: str) -> None:
    if variant == "unsynced-log":
        write = engine.Engine.write

        def unsynced_write(self: engine.Engine, batch, *, sync: bool) -> None:  # type: ignore[no-untyped-def]
            write(self, batch, sync=False)

        engine.Engine.write = unsynced_write  # type: ignore[method-assign]
    elif variant == "no-directory-fsync":
        engine.fsync_directory = lambda path: None
    else:
        raise SystemExit(f"broken_worker: unknown SHARDNODE_BROKEN variant {variant!r}")


if __name__ == "__main__":
    _break(os.environ.get("SHARDNODE_BROKEN", ""))
    from worker.__main__ import main

    sys.exit(main())
