"""The Python `etcd3` client (python-etcd3) against a router's etcd port: put,
get, a prefix, a compare-and-swap transaction, a lease and a watch.

Run as a script (`python etcd3_check.py HOST PORT`), in its own process, with
PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python: etcd3's generated code
predates protobuf 4 and loads only with the pure-Python protobuf, and it
carries its own copy of etcd's messages (see aetcd_check.py). Exit 0 when
every check held; otherwise the first failed check's traceback.
"""

from __future__ import annotations

import sys

import etcd3


def check(host: str, port: int) -> None:
    client = etcd3.client(host=host, port=port, timeout=10)
    try:
        client.put("etcd3/a", "1")
        client.put("etcd3/b", "2")
        value, meta = client.get("etcd3/a")
        assert value == b"1" and meta.version == 1, (value, meta)
        assert [m.key for _, m in client.get_prefix("etcd3/")] == [b"etcd3/a", b"etcd3/b"]
        tx = client.transactions
        swapped, _ = client.transaction(compare=[tx.version("etcd3/a") == 1],
                                        success=[tx.put("etcd3/a", "swapped")], failure=[])
        lost, _ = client.transaction(compare=[tx.version("etcd3/a") == 1],
                                     success=[tx.put("etcd3/a", "lost")], failure=[])
        assert swapped and not lost and client.get("etcd3/a")[0] == b"swapped"
        # A watch from the revision of the next change sees a leased key come and go.
        since = client.put("etcd3/marker", "x").header.revision
        events, cancel = client.watch("etcd3/w", start_revision=since)
        lease = client.lease(30)
        client.put("etcd3/w", "leased", lease=lease)
        assert lease.remaining_ttl > 0
        lease.revoke()
        seen = []
        for event in events:
            seen.append((type(event).__name__, event.key))
            if len(seen) == 2:
                break
        cancel()
        assert seen == [("PutEvent", b"etcd3/w"), ("DeleteEvent", b"etcd3/w")], seen
        assert client.get("etcd3/w") == (None, None)
        assert client.delete_prefix("etcd3/").deleted == 3          # a, b and the marker
    finally:
        client.close()


if __name__ == "__main__":
    check(sys.argv[1], int(sys.argv[2]))
    print("etcd3: every check held")
