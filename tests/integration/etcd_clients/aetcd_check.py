"""The Python `aetcd` client against a router's etcd port: put, get, a prefix,
delete, a compare-and-swap transaction, a lease and a watch.

Run as a script (`python aetcd_check.py HOST PORT`), in its own process:
aetcd carries its own copy of etcd's messages, which protobuf refuses to
register next to shardnode's in one process. Exit 0 when every check held;
otherwise the first failed check's traceback.
"""

from __future__ import annotations

import asyncio
import sys

import aetcd


async def check(host: str, port: int) -> None:
    async with aetcd.Client(host=host, port=port, timeout=10) as client:
        await client.put(b"aetcd/a", b"1")
        await client.put(b"aetcd/b", b"2")
        got = await client.get(b"aetcd/a")
        assert got is not None and got.value == b"1" and got.version == 1, got
        listed = await client.get_prefix(b"aetcd/")
        assert [kv.key for kv in listed] == [b"aetcd/a", b"aetcd/b"], listed
        # Compare-and-swap: the version must still be 1.
        tx = client.transactions
        swapped, _ = await client.transaction(compare=[tx.version(b"aetcd/a") == 1],
                                              success=[tx.put(b"aetcd/a", b"swapped")], failure=[])
        lost, _ = await client.transaction(compare=[tx.version(b"aetcd/a") == 1],
                                           success=[tx.put(b"aetcd/a", b"lost")], failure=[])
        assert swapped and not lost and (await client.get(b"aetcd/a")).value == b"swapped"
        # A watch from the revision of the next change sees it.
        since = (await client.put(b"aetcd/marker", b"x")).header.revision
        watch = await client.watch(b"aetcd/w", start_revision=since)
        lease = await client.lease(30)
        await client.put(b"aetcd/w", b"leased", lease=lease)
        assert await lease.remaining_ttl() > 0
        await lease.revoke()
        events = []
        async for event in watch:
            events.append((event.kind, event.kv.key))
            if len(events) == 2:
                break
        await watch.cancel()
        assert [(str(getattr(kind, "value", kind)), key) for kind, key in events] == [("PUT", b"aetcd/w"), ("DELETE", b"aetcd/w")], events
        assert await client.get(b"aetcd/w") is None
        deleted = await client.delete_prefix(b"aetcd/")
        assert deleted.deleted == 3, deleted.deleted          # a, b and the marker (w went with its lease)
        assert not await client.get_prefix(b"aetcd/")


if __name__ == "__main__":
    asyncio.run(check(sys.argv[1], int(sys.argv[2])))
    print("aetcd: every check held")
