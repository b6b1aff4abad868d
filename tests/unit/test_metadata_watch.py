"""placement/metadata_watch.py against an in-process worker that serves only
`Watch`: the streams are in place when `start` returns, a change is
reported, and a stream that ends, falls behind or goes silent is broken."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from shardnode.channel_cache import AioChannelCache
from shardnode.config import METADATA_GROUP, ClusterConfig
from shardnode.proto import worker_pb2 as wpb
from shardnode.proto import worker_pb2_grpc as wpb_grpc
from shardnode.placement.metadata_watch import MetadataWatch, WatchBroken

ROOT = Path(__file__).resolve().parents[2]
KEYS = (b"shard_map", b"auth")


class WatchOnlyWorker(wpb_grpc.WorkerServicer):
    """Each stream answers at once (its watcher registered), then sends what
    the test puts in its queue: a WatchBatch, or None to end the stream."""

    def __init__(self) -> None:
        self.requests: list[wpb.WatchRequest] = []
        self.streams: dict[bytes, asyncio.Queue[wpb.WatchBatch | None]] = {}
        self.silent = False

    async def Watch(self, request: wpb.WatchRequest, context):  # type: ignore[no-untyped-def]
        self.requests.append(request)
        queue = self.streams[request.key] = asyncio.Queue()
        if self.silent:
            await asyncio.Event().wait()
        yield wpb.WatchBatch(progress=1)
        while (batch := await queue.get()) is not None:
            yield batch


async def _serve(worker: WatchOnlyWorker) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    wpb_grpc.add_WorkerServicer_to_server(worker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def _run(scenario) -> None:  # type: ignore[no-untyped-def]
    async def run() -> None:
        cluster = ClusterConfig.load(ROOT / "etc" / "cluster.toml")
        worker = WatchOnlyWorker()
        server, address = await _serve(worker)
        channels = AioChannelCache(cluster.security, None)
        watch = MetadataWatch(cluster, channels, address, KEYS, progress=0.1, silence=0.3)
        try:
            await scenario(cluster, worker, watch)
        finally:
            await watch.close()
            await channels.close()
            await server.stop(None)

    asyncio.run(run())


def test_a_change_of_either_key_is_reported_and_nothing_else() -> None:
    async def scenario(cluster: ClusterConfig, worker: WatchOnlyWorker, watch: MetadataWatch) -> None:
        await watch.start()
        assert sorted(r.key for r in worker.requests) == sorted(KEYS)
        assert all(r.group == METADATA_GROUP and r.cluster == cluster.name and r.progress_ms == 100
                   and r.start_revision == 0 and not r.range_end for r in worker.requests)
        worker.streams[b"shard_map"].put_nowait(wpb.WatchBatch(progress=7))      # how far it got: no change
        assert not await watch.wait(0.05)
        worker.streams[b"auth"].put_nowait(wpb.WatchBatch(events=b"\x90", progress=8))
        worker.streams[b"shard_map"].put_nowait(wpb.WatchBatch(events=b"\x90", progress=9))
        await asyncio.sleep(0.1)
        # Reports that arrived together are taken together (one read for both).
        assert await watch.wait(1.0)
        assert not await watch.wait(0.05)
        assert not watch.changed()
        worker.streams[b"auth"].put_nowait(wpb.WatchBatch(events=b"\x90", progress=10))
        await asyncio.sleep(0.1)
        assert watch.changed() and not watch.changed()       # taken without waiting

    _run(scenario)


@pytest.mark.parametrize("end", ["eof", "lagging", "silence"])
def test_a_stream_that_ends_falls_behind_or_goes_silent_is_broken(end: str) -> None:
    async def scenario(cluster: ClusterConfig, worker: WatchOnlyWorker, watch: MetadataWatch) -> None:
        await watch.start()
        if end == "eof":
            worker.streams[b"auth"].put_nowait(None)
        elif end == "lagging":
            worker.streams[b"shard_map"].put_nowait(wpb.WatchBatch(lagging=True))
        with pytest.raises(WatchBroken):
            await watch.wait(1.0)       # silence: nothing for 0.3 s

    _run(scenario)


def test_a_replica_that_does_not_answer_or_is_down_refuses_the_subscription() -> None:
    async def scenario(cluster: ClusterConfig, worker: WatchOnlyWorker, watch: MetadataWatch) -> None:
        worker.silent = True
        with pytest.raises(WatchBroken, match="no answer"):
            await watch.start(timeout=0.2)

    _run(scenario)

    async def down() -> None:
        cluster = ClusterConfig.load(ROOT / "etc" / "cluster.toml")
        channels = AioChannelCache(cluster.security, None)
        server, address = await _serve(WatchOnlyWorker())
        await server.stop(None)
        watch = MetadataWatch(cluster, channels, address, KEYS)
        with pytest.raises(WatchBroken, match="UNAVAILABLE"):
            await watch.start()
        await watch.close()
        await channels.close()

    asyncio.run(down())


def test_an_interval_of_keys_is_one_stream_with_its_range_end() -> None:
    async def scenario(cluster: ClusterConfig, worker: WatchOnlyWorker, watch: MetadataWatch) -> None:
        channels = AioChannelCache(cluster.security, None)
        address = watch.address
        ranged = MetadataWatch(cluster, channels, address, ((b"etcd/lease/", b"etcd/lease0"),))
        try:
            await ranged.start()
            assert [(r.key, r.range_end) for r in worker.requests] == [(b"etcd/lease/", b"etcd/lease0")]
            worker.streams[b"etcd/lease/"].put_nowait(wpb.WatchBatch(events=b"\x90", progress=3))
            assert await ranged.wait(1.0)
        finally:
            await ranged.close()
            await channels.close()

    _run(scenario)
