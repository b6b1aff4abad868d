"""A client load for tests that change the cluster's shape: 8 writers and 2
readers on their own Clients, recorded for the linearizability checker, and
the check that every acknowledged write survived."""

from __future__ import annotations

import itertools
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

from shardnode.client import Client
from shardnode.errors import InvalidArgument, ShardnodeError
from shardnode.testing.linearizability import HistoryRecorder, OpKind, check_history

HOT_KEYS = [f"hot-{i}" for i in range(8)]


@dataclass
class Load:
    """8 writers (a fresh key every other write, else a hot key) and 2 hot-key
    readers, on their own Clients, recorded for the checker."""

    config: Path
    # Keys of this load start with it: loads run one after another on one
    # cluster must not meet each other's keys (the checker sees one history).
    prefix: str = ""
    recorder: HistoryRecorder = field(default_factory=HistoryRecorder)
    acked: dict[str, str] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._writer, args=(c,), daemon=True) for c in range(1, 9)]
        self.threads += [threading.Thread(target=self._reader, args=(c,), daemon=True) for c in (100, 101)]
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def _writer(self, client_id: int) -> None:
        rng = random.Random(client_id)
        with Client.from_config(self.config, timeout=8.0) as client:
            for n in itertools.count(1):
                if self.stop.is_set():
                    return
                fresh = n % 2 == 1
                key = f"{self.prefix}w{client_id}-{n}" if fresh else self.prefix + rng.choice(HOT_KEYS)
                value = f"c{client_id}-{n}"
                handle = self.recorder.invoke(client_id, OpKind.PUT, key.encode(), value.encode())
                try:
                    old = client.put(key, value)
                except InvalidArgument:
                    self.recorder.failed(handle)
                    raise
                except ShardnodeError:
                    self.recorder.unknown(handle)
                    continue
                self.recorder.ok(handle, old)
                if fresh:
                    self.acked[key] = value

    def _reader(self, client_id: int) -> None:
        rng = random.Random(client_id)
        with Client.from_config(self.config, timeout=8.0) as client:
            while not self.stop.is_set():
                key = self.prefix + rng.choice(HOT_KEYS)
                handle = self.recorder.invoke(client_id, OpKind.GET, key.encode())
                try:
                    value = client.get(key)
                except ShardnodeError:
                    self.recorder.failed(handle)
                    continue
                self.recorder.ok(handle, value)

    def verify(self) -> tuple[int, list[str]]:
        """(keys checked, keys lost); asserts the history is linearizable."""
        with Client.from_config(self.config, timeout=20.0) as client:
            keys = sorted(self.acked)
            lost = [k for k in keys if client.get(k) != self.acked[k].encode()]
            for key in (self.prefix + k for k in HOT_KEYS):
                handle = self.recorder.invoke(999, OpKind.GET, key.encode())
                self.recorder.ok(handle, client.get(key))
        result = check_history(self.recorder.operations(), timeout=180)
        assert result.ok, result.explanation
        return len(keys), lost
