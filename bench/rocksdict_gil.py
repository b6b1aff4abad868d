"""Does a synced rocksdict write let other Python threads run?

    .venv/bin/python bench/rocksdict_gil.py [--seconds 2]

The worker persists each Ready on a dedicated thread so that its event loop
keeps running during the fsync (docs/worker.md, "The write path"). That only
works if the write releases the GIL. Here a thread writes in a loop while the
main thread spins and measures how long it was kept from running (gaps over
0.2 ms), for three writers:

- `sleep`: time.sleep(0.0003), which releases the GIL (the control);
- `os.fdatasync`: a 120-byte os.write + os.fdatasync on a plain file
  (releases the GIL);
- `rocksdict`: a one-key WriteBatch written with WriteOptions.sync = True,
  as shardnode/storage/engine.py does;
- `rocksdict+flush_wal`: the same batch written with sync = False, then
  `flush_wal(True)` (RocksDB's FlushWAL + SyncWAL), a candidate replacement
  (its durability must be proven by the power-loss tests first).

A writer that releases the GIL needs it back after each call and waits for
the main thread's switch interval (5 ms): few writes, no stall. A writer that
holds it keeps it across its call: many writes, and the main thread stalled
for about half the time (the two threads alternate at each switch interval).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

from rocksdict import Rdict, WriteBatch, WriteOptions


def measure(kind: str, seconds: float, db: Rdict, fd: int) -> dict:
    options = WriteOptions()
    options.sync = kind == "rocksdict"
    stop = False
    writes = 0
    busy = 0.0

    def writer() -> None:
        nonlocal writes, busy
        while not stop:
            began = time.perf_counter()
            if kind == "rocksdict":
                batch = WriteBatch()
                batch.put(b"key-%d" % writes, b"v" * 100)
                db.write(batch, options)
            elif kind == "rocksdict+flush_wal":
                batch = WriteBatch()
                batch.put(b"key-%d" % writes, b"v" * 100)
                db.write(batch, options)
                db.flush_wal(True)
            elif kind == "os.fdatasync":
                os.write(fd, b"v" * 120)
                os.fdatasync(fd)
            else:
                time.sleep(0.0003)
            busy += time.perf_counter() - began
            writes += 1

    thread = threading.Thread(target=writer)
    thread.start()
    stalled = 0.0
    last = time.perf_counter()
    end = last + seconds
    while last < end:
        now = time.perf_counter()
        if now - last > 0.0002:
            stalled += now - last
        last = now
    stop = True
    thread.join()
    return {"writer": kind, "writes": writes, "ms_per_write": round(1000 * busy / max(1, writes), 3),
            "main_thread_stalled_ms": round(1000 * stalled), "of_ms": round(1000 * seconds),
            "stall_ms_per_write": round(1000 * stalled / max(1, writes), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="rocksdict-gil-")
    db = Rdict(os.path.join(tmp, "db"))
    fd = os.open(os.path.join(tmp, "file"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for kind in ("sleep", "os.fdatasync", "rocksdict", "rocksdict+flush_wal"):
            r = measure(kind, args.seconds, db, fd)
            print(f"{r['writer']:19s} {r['writes']:6d} writes, {r['ms_per_write']:.3f} ms each; main thread "
                  f"stalled {r['main_thread_stalled_ms']} of {r['of_ms']} ms ({r['stall_ms_per_write']:.3f} ms "
                  f"per write)")
    finally:
        os.close(fd)
        db.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
