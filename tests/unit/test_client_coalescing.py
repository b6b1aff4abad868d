"""AsyncClient, put_many/get_many and the coalescing stream, against the
fake routers of test_client.py (which run every operation of a BatchStream
through the same handler as its unary call, faults included)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from shardnode.client import AsyncClient, Client, DeadlineExceeded, InvalidArgument, NoQuorum, ShardnodeError

from .test_client import FakeRouter, FakeStore, cluster_toml

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def make_router() -> Iterator[Callable[..., FakeRouter]]:
    started: list[FakeRouter] = []

    def make(store: FakeStore | None = None) -> FakeRouter:
        router = FakeRouter(store).start()
        started.append(router)
        return router

    yield make
    for router in started:
        router.stop()


@pytest.fixture
def router(make_router: Callable[..., FakeRouter]) -> FakeRouter:
    return make_router()


def run(coroutine):  # type: ignore[no-untyped-def]
    return asyncio.run(coroutine)


# --- AsyncClient: the same surface as Client ------------------------------------------------


def test_async_put_get_delete_and_many(router: FakeRouter) -> None:
    async def scenario() -> None:
        async with AsyncClient([router.address]) as kv:
            assert await kv.put(b"k", b"v1") is None
            assert await kv.put("k", "v2") == b"v1"
            assert await kv.get(b"k") == b"v2"
            assert await kv.get(b"k", allow_stale=True) == b"v2"
            assert await kv.delete(b"k") == b"v2"
            assert await kv.get(b"k") is None
            assert await kv.put_many([(b"a", b"1"), (b"b", b"2"), ("a", "3")]) in ([None, None, b"1"],
                                                                                    [b"3", None, None])
            assert await kv.get_many([b"b", b"absent"]) == [b"2", None]
            assert await kv.put_many([]) == [] and await kv.get_many([]) == []

    run(scenario())
    assert router.streams >= 1 and router.store.violations == []


def test_async_client_from_config_and_closed(tmp_path, router: FakeRouter) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "cluster.toml"
    config.write_text(cluster_toml([router.port], max_key_bytes=8))

    async def scenario() -> None:
        kv = AsyncClient.from_config(config, timeout=3)
        assert kv.routers == (router.address,) and kv.max_key_bytes == 8 and kv.timeout == 3
        with pytest.raises(InvalidArgument):
            await kv.put(b"k" * 9, b"v")
        assert await kv.put(b"k", b"v") is None
        await kv.aclose()
        with pytest.raises(ShardnodeError, match="closed"):
            await kv.get(b"k")

    run(scenario())


def test_many_validates_everything_before_sending(router: FakeRouter) -> None:
    with Client([router.address]) as kv:
        with pytest.raises(InvalidArgument):
            kv.put_many([(b"a", b"1"), (b"", b"2")])
        with pytest.raises(InvalidArgument):
            kv.put_many([(b"a", 1)])                    # type: ignore[list-item]
        with pytest.raises(InvalidArgument):
            kv.get_many(b"abc")                          # a bytes object is not a list of keys
        with pytest.raises(InvalidArgument):
            kv.put_many([b"ab"])                        # type: ignore[list-item]
    assert router.total_calls == 0 and router.streams == 0


# --- Coalescing -------------------------------------------------------------------------------


def test_many_threads_on_one_client_share_messages_and_get_their_own_results(router: FakeRouter) -> None:
    router.default_fault = "slow"       # a few ms per operation: callers pile up
    threads, rounds = 32, 20
    errors: list[str] = []
    with Client([router.address], timeout=10) as kv:
        def worker(i: int) -> None:
            key = f"t{i}".encode()
            previous = None
            for n in range(rounds):
                value = f"{i}-{n}".encode()
                old = kv.put(key, value)
                if old != previous:
                    errors.append(f"{key!r}: previous {old!r}, expected {previous!r}")
                if kv.get(key) != value:
                    errors.append(f"{key!r}: read back something else")
                previous = value

        pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        pipe = kv.engine.pipes[0]
        assert pipe.operations == threads * rounds * 2
    assert errors == []
    assert router.store.violations == []
    # Far fewer messages than operations: concurrent callers were coalesced.
    assert len(router.message_sizes) < threads * rounds, router.message_sizes[:20]
    assert max(router.message_sizes) > 4
    assert router.streams == 1, "one stream carried every operation"


def test_many_tasks_on_one_async_client_share_messages(router: FakeRouter) -> None:
    router.default_fault = "slow"
    tasks = 64

    async def scenario() -> list[bytes | None]:
        async with AsyncClient([router.address]) as kv:
            await asyncio.gather(*(kv.put(f"k{i}", f"v{i}") for i in range(tasks)))
            values = await asyncio.gather(*(kv.get(f"k{i}") for i in range(tasks)))
            assert kv.pipes[0].messages < 2 * tasks
            return values

    values = run(scenario())
    assert values == [f"v{i}".encode() for i in range(tasks)]
    assert max(router.message_sizes) >= 16, router.message_sizes


# --- Each operation keeps its own deadline, session and result --------------------------------


def test_each_operation_keeps_its_own_deadline(router: FakeRouter) -> None:
    router.key_faults[b"stuck"] = "hang"

    async def scenario() -> None:
        async with AsyncClient([router.address], timeout=5) as kv:
            began = time.monotonic()
            stuck = asyncio.ensure_future(kv.get(b"stuck", timeout=0.4))
            others = await asyncio.gather(*(kv.put(f"k{i}", b"v") for i in range(20)))
            assert others == [None] * 20
            assert time.monotonic() - began < 0.4, "the hung operation did not hold up the others"
            with pytest.raises(DeadlineExceeded):
                await stuck
            elapsed = time.monotonic() - began
            assert 0.35 < elapsed < 1.5, elapsed

    run(scenario())


def test_a_write_whose_answers_are_always_lost_is_applied_once(router: FakeRouter) -> None:
    router.key_faults[b"k"] = "drop"        # applied, then every answer is lost (UNAVAILABLE)

    async def scenario() -> None:
        async with AsyncClient([router.address], timeout=0.6) as kv:
            with pytest.raises(ShardnodeError, match="outcome is unknown"):
                await kv.put(b"k", b"v1")

    run(scenario())
    assert router.store.violations == []
    assert len(router.store.write_log) > 2, "the lost answers were retried"
    assert len(set(router.store.write_log)) == 1, "every attempt carried the same session and sequence"
    assert router.store.applied == 1 and router.store.data[b"k"] == b"v1"


def test_retry_through_another_router_returns_the_original_previous_value(
        make_router: Callable[..., FakeRouter]) -> None:
    a = make_router()
    b = make_router(a.store)
    a.store.data[b"k"] = b"old"
    a.faults.append("drop")

    async def scenario() -> bytes | None:
        async with AsyncClient([a.address, b.address], timeout=5) as kv:
            kv._preferred = 0
            return await kv.put(b"k", b"new")

    assert run(scenario()) == b"old"
    assert a.store.applied == 1 and b.calls["Put"] == 1 and a.store.violations == []


def test_put_many_raises_the_first_failure_after_every_write_is_over(router: FakeRouter) -> None:
    router.key_faults[b"bad"] = "no_quorum"
    with Client([router.address], timeout=0.5) as kv:
        with pytest.raises(NoQuorum) as info:
            kv.put_many([(b"a", b"1"), (b"bad", b"2"), (b"c", b"3")])
        assert info.value.group == 3
        assert router.store.data[b"a"] == b"1" and router.store.data[b"c"] == b"3"


def test_a_router_without_batch_stream_is_spoken_to_one_call_per_operation(router: FakeRouter) -> None:
    router.streaming = False
    with Client([router.address]) as kv:
        assert kv.put(b"k", b"v") is None
        assert kv.get_many([b"k", b"x"]) == [b"v", None]
        assert kv.put_many([(b"k", b"w")]) == [b"v"]
    assert router.calls["Put"] == 2 and router.calls["Get"] == 2 and router.streams == 0


def test_closing_fails_calls_in_flight(router: FakeRouter) -> None:
    router.default_fault = "hang"
    kv = Client([router.address], timeout=10)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            kv.get(b"k")
        except BaseException as exc:        # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.3)
    began = time.monotonic()
    kv.close()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - began < 5
    assert len(outcome) == 1 and isinstance(outcome[0], ShardnodeError) and "closed" in str(outcome[0])


def test_a_first_answer_that_came_at_the_deadline_still_says_why() -> None:
    """A blocking call's first attempt answered at its deadline (the router
    explains: no quorum) is reported as that cause, even though no time is
    left for another attempt by the time the answer is looked at."""
    from shardnode.proto import kv_pb2

    async def scenario() -> None:
        kv = AsyncClient(["127.0.0.1:1"])
        op = kv_pb2.BatchOperation(kind=kv_pb2.BatchOperation.GET, key=b"k")
        answer = kv_pb2.BatchResult(code=14, message="no quorum in group 3: 2 of 3 replicas unreachable",
                                    cause="no_quorum", group=3)
        with pytest.raises(NoQuorum, match="no quorum in group 3") as info:
            await kv._operation("get", op, 1.0, write=False, deadline=time.monotonic() - 0.01, first=(0, answer))
        assert info.value.group == 3
        await kv.aclose()

    run(scenario())
