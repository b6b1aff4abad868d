"""A stand-in for placement/metadata_watch.py's MetadataWatch, driven by the
test: `refuse` fails the next subscriptions, `report` tells the watchers
that a key changed (or, with a WatchBroken, that their stream ended)."""

from __future__ import annotations

import asyncio

from shardnode.placement.metadata_watch import WatchBroken


async def until(condition, timeout: float = 2.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


class FakeWatches:
    def __init__(self) -> None:
        self.refuse = False
        self.live: list[asyncio.Queue[bool | WatchBroken]] = []
        self.opened: list[tuple[str, tuple[bytes, ...]]] = []

    def watch(self, cluster, channels, address, keys):  # type: ignore[no-untyped-def]
        watches = self
        news: asyncio.Queue[bool | WatchBroken] = asyncio.Queue()
        self.opened.append((address, keys))

        class Watch:
            def __init__(self) -> None:
                self.address = address

            async def start(self) -> None:
                if watches.refuse:
                    raise WatchBroken("refused")
                watches.live.append(news)

            async def wait(self, timeout: float) -> bool:
                try:
                    item = await asyncio.wait_for(news.get(), timeout)
                except TimeoutError:
                    return False
                if isinstance(item, WatchBroken):
                    raise item
                return True

            def changed(self) -> bool:
                taken = False
                while not news.empty():
                    item = news.get_nowait()
                    if isinstance(item, WatchBroken):
                        raise item
                    taken = True
                return taken

            async def close(self) -> None:
                if news in watches.live:
                    watches.live.remove(news)

        return Watch()

    def report(self, item: bool | WatchBroken = True) -> None:
        for news in self.live:
            news.put_nowait(item)
