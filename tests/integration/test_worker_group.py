"""Real worker processes, real RocksDB, loopback gRPC."""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import socket
import time

import grpc
import pytest

from shardnode.proto import worker_pb2 as pb
from shardnode.testing.linearizability import HistoryRecorder, OpKind, check_history

from .harness import WorkerGroup, delete, get, put

pytestmark = pytest.mark.timeout(180)
OK = pb.ExecuteResponse.OK


def run(coro):
    return asyncio.run(coro)


async def _read_all(group: WorkerGroup, keys: list[bytes], **kwargs) -> dict[bytes, bytes | None]:
    response = await group.execute([get(k) for k in keys], **kwargs)
    assert response.status == OK, response
    return {k: (r.value if r.existed else None) for k, r in zip(keys, response.results)}


def test_three_members_elect_a_leader_and_replicate(make_group) -> None:
    group = make_group(3)
    group.start_all()

    async def scenario() -> None:
        try:
            leader = await group.wait_leader()
            first = await group.execute([put(b"k", b"v1", 1, 1)])
            assert first.status == OK and not first.results[0].existed
            second = await group.execute([put(b"k", b"v2", 1, 2)])
            assert second.results[0].existed and second.results[0].value == b"v1"
            assert (await _read_all(group, [b"k", b"missing"])) == {b"k": b"v2", b"missing": None}
            removed = await group.execute([delete(b"k", 1, 3)])
            assert removed.results[0].value == b"v2"
            # Every member applied it: read each one's local state.
            await asyncio.sleep(0.5)
            for host in group.hosts:
                status = await group.status(host)
                assert status.term >= 1 and status.applied_index >= 4, status
                local = await group.execute([get(b"k")], host=host, allow_stale=True)
                assert local.status == OK and not local.results[0].existed
            follower = next(h for h in group.hosts if h != leader)
            redirected = await group.execute([put(b"x", b"y")], host=follower)
            assert redirected.status == pb.ExecuteResponse.NOT_LEADER
            assert redirected.leader_address == group.addresses[leader]
        finally:
            await group.close_channels()

    run(scenario())


def test_retried_write_is_applied_once_and_returns_the_same_old_value(make_group) -> None:
    group = make_group(3)
    group.start_all()

    async def scenario() -> None:
        try:
            await group.wait_leader()
            await group.execute([put(b"k", b"first", 7, 1)])
            a = await group.execute([put(b"k", b"second", 7, 2)])
            b = await group.execute([put(b"k", b"second", 7, 2)])       # the retry
            assert a.results[0].value == b.results[0].value == b"first"
            assert b.results[0].duplicate and not a.results[0].duplicate
            stale = await group.execute([put(b"k", b"old", 7, 1)])
            assert stale.results[0].error
            assert (await _read_all(group, [b"k"]))[b"k"] == b"second"
        finally:
            await group.close_channels()

    run(scenario())


def test_bad_input_is_rejected_and_changes_nothing(make_group) -> None:
    group = make_group(3)
    group.start_all()

    async def scenario() -> None:
        try:
            await group.wait_leader()
            for op in (put(b"", b"v"), put(b"k" * 4097, b"v"), put(b"k", b"v" * ((1 << 20) + 1)), get(b"")):
                response = await group.execute([put(b"ok", b"1"), op])
                assert response.status == pb.ExecuteResponse.INVALID_ARGUMENT, response
                assert "operation 1" in response.message
            assert (await _read_all(group, [b"ok"]))[b"ok"] is None, "nothing of an invalid batch is written"
            wrong = await group.stub(group.hosts[0]).Execute(pb.ExecuteRequest(cluster="other", group=0, operations=[get(b"k")]))
            assert wrong.status == pb.ExecuteResponse.WRONG_GROUP
        finally:
            await group.close_channels()

    run(scenario())


async def _writer_load(group: WorkerGroup, recorder: HistoryRecorder, acked: dict[bytes, bytes], client: int,
                       keys: list[bytes], stop: asyncio.Event) -> None:
    rng = random.Random(client)
    for sequence in itertools.count(1):
        if stop.is_set():
            return
        key = rng.choice(keys)
        value = b"c%d-%d" % (client, sequence)
        handle = recorder.invoke(client, OpKind.PUT, key, value)
        try:
            response = await group.execute([put(key, value, client, sequence)], timeout=8.0)
        except (TimeoutError, grpc.aio.AioRpcError):
            recorder.unknown(handle)
            continue
        if response.status == OK and not response.results[0].error:
            result = response.results[0]
            recorder.ok(handle, result.value if result.existed else None)
            acked[key + b"#" + value] = value
        else:
            recorder.unknown(handle)


async def _reader_load(group: WorkerGroup, recorder: HistoryRecorder, client: int, keys: list[bytes],
                       stop: asyncio.Event) -> None:
    rng = random.Random(client)
    while not stop.is_set():
        key = rng.choice(keys)
        handle = recorder.invoke(client, OpKind.GET, key)
        try:
            response = await group.execute([get(key)], timeout=8.0)
        except (TimeoutError, grpc.aio.AioRpcError):
            recorder.failed(handle)   # a read that got no answer had no effect
            continue
        if response.status == OK:
            result = response.results[0]
            recorder.ok(handle, result.value if result.existed else None)
        else:
            recorder.failed(handle)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_sigkill_of_the_leader_under_load_loses_no_acknowledged_write(make_group, tls: bool) -> None:
    group = make_group(5, tls=tls)
    group.start_all()
    keys = [b"key-%d" % i for i in range(8)]

    async def scenario() -> None:
        try:
            old_leader = await group.wait_leader()
            recorder = HistoryRecorder()
            acked: dict[bytes, bytes] = {}
            stop = asyncio.Event()
            tasks = [asyncio.create_task(_writer_load(group, recorder, acked, c, keys, stop)) for c in range(1, 9)]
            tasks += [asyncio.create_task(_reader_load(group, recorder, c, keys, stop)) for c in range(100, 104)]
            await asyncio.sleep(2.0)
            before_kill = len(acked)
            killed_at = time.monotonic()
            group.kill(old_leader, signal.SIGKILL)
            new_leader = await group.wait_leader(timeout=10.0, exclude={old_leader})
            failover = time.monotonic() - killed_at
            await asyncio.sleep(2.0)
            stop.set()
            await asyncio.gather(*tasks)
            assert before_kill > 0 and len(acked) > before_kill, "writes continued after the failover"
            # (An election takes 0.5 to 1 s at 50 ms ticks; the bound leaves room for a loaded CI machine.)
            assert failover < 8.0, f"new leader {new_leader} took {failover:.1f}s"
            operations = recorder.operations()
            result = check_history(operations, timeout=120)
            assert result.ok, result.explanation
            # Every acknowledged write is still there: the last acknowledged
            # value of each key is what a linearizable read returns, unless a
            # later write of unknown outcome replaced it (allowed by the check above).
            final = await _read_all(group, keys, timeout=10.0)
            assert all(value is not None for value in final.values())
        finally:
            await group.close_channels()

    run(scenario())


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_member_behind_the_compacted_log_catches_up_through_a_snapshot(make_group, tls: bool) -> None:
    """With TLS, the snapshot stream too is mutual TLS, checked against the sender's host."""
    group = make_group(3, snapshot_threshold=50, tls=tls)
    group.start_all()

    async def scenario() -> None:
        try:
            await group.wait_leader()
            await group.execute([put(b"before", b"1")])
            await asyncio.sleep(0.3)
            leader = await group.wait_leader()
            lagging = next(h for h in group.hosts if h != leader)
            group.kill(lagging, signal.SIGKILL)
            expected = {}
            for batch in range(40):
                ops = [put(b"k%03d" % (batch * 10 + i), b"v%d" % batch) for i in range(10)]
                response = await group.execute(ops, timeout=10.0)
                assert response.status == OK
                expected.update({op.key: op.value for op in ops})
            leader = await group.wait_leader()
            leader_status = await group.status(leader)
            assert leader_status.first_index > 2, "the leader compacted its log"
            group.start(lagging)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                status = await group.status(lagging)
                if status is not None and status.applied_index >= leader_status.commit_index:
                    break
                await asyncio.sleep(0.1)
            status = await group.status(lagging)
            assert status is not None and status.applied_index >= leader_status.commit_index, group.log_tail()
            assert status.snapshots_received >= 1 and status.snapshot_receive_seconds > 0
            keys = sorted(expected) + [b"before"]
            local = await group.execute([get(k) for k in keys], host=lagging, allow_stale=True)
            got = {k: r.value for k, r in zip(keys, local.results)}
            assert got == {**expected, b"before": b"1"}
        finally:
            await group.close_channels()

    run(scenario())


def test_restarting_every_member_from_disk_preserves_everything(make_group) -> None:
    group = make_group(3)
    group.start_all()
    keys = [b"r%d" % i for i in range(50)]

    async def write_then_kill() -> None:
        try:
            await group.wait_leader()
            for i in range(0, 50, 10):
                response = await group.execute([put(k, b"val-" + k, 3, n + 1) for n, k in enumerate(keys[i:i + 10], start=i)])
                assert response.status == OK
        finally:
            await group.close_channels()

    run(write_then_kill())
    for host in group.hosts:
        group.kill(host, signal.SIGKILL)
    group.start_all()

    async def read_back() -> None:
        try:
            await group.wait_leader()
            values = await _read_all(group, keys, timeout=10.0)
            assert values == {k: b"val-" + k for k in keys}
            retry = await group.execute([put(keys[0], b"again", 3, 1)])
            assert retry.results[0].duplicate, "sessions survived the restart"
        finally:
            await group.close_channels()

    run(read_back())


def test_garbage_on_the_worker_port_leaves_it_serving(make_group) -> None:
    group = make_group(3)
    group.start_all()

    async def scenario() -> None:
        try:
            leader = await group.wait_leader()
            host, port = group.addresses[leader].rsplit(":", 1)
            for payload in (b"\x00" * 64, b"GET / HTTP/1.1\r\n\r\n", bytes(range(256)) * 8):
                with socket.create_connection((host, int(port)), timeout=2) as sock:
                    sock.sendall(payload)
            channel = grpc.aio.insecure_channel(group.addresses[leader])
            garbage = channel.stream_stream("/shardnode.raft.Transport/Messages")
            try:
                async def frames():
                    yield b"\x93not msgpack at all"
                    yield b"\xc1"
                await garbage(frames(), timeout=2).read()
            except grpc.aio.AioRpcError:
                pass
            await channel.close()
            await asyncio.sleep(0.2)
            response = await group.execute([put(b"still", b"alive")])
            assert response.status == OK
            assert (await group.status(leader)).role == "leader"
        finally:
            await group.close_channels()

    run(scenario())


def test_sigterm_on_the_leader_hands_leadership_over_and_exits_zero(make_group) -> None:
    group = make_group(3)
    group.start_all()

    async def scenario() -> None:
        try:
            leader = await group.wait_leader()
            await group.execute([put(b"k", b"v")])
            began = time.monotonic()
            code = group.kill(leader, signal.SIGTERM)
            assert code == 0
            new_leader = await group.wait_leader(timeout=5.0, exclude={leader})
            assert time.monotonic() - began < 4.0, "a clean stop does not wait for an election timeout"
            assert (await _read_all(group, [b"k"]))[b"k"] == b"v"
            assert new_leader != leader
        finally:
            await group.close_channels()

    run(scenario())


def test_a_group_without_quorum_answers_unavailable_within_the_deadline(make_group) -> None:
    group = make_group(3)
    group.start_all()

    async def scenario() -> None:
        try:
            leader = await group.wait_leader()
            await group.execute([put(b"k", b"v")])
            survivor = leader
            for host in group.hosts:
                if host != survivor:
                    group.kill(host, signal.SIGKILL)
            # The lone leader keeps accepting proposals until check-quorum
            # deposes it; the request must come back (not hang) either way.
            began = time.monotonic()
            try:
                response = await group.stub(survivor).Execute(
                    pb.ExecuteRequest(cluster=group.name, group=0, operations=[put(b"k", b"lost?")]), timeout=3.0
                )
                status = response.status
            except grpc.aio.AioRpcError as exc:
                status = exc.code()
            assert time.monotonic() - began < 3.5
            assert status in (pb.ExecuteResponse.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), status
            # Once it has stepped down, it answers at once: no leader, no quorum.
            await asyncio.sleep(1.5)
            began = time.monotonic()
            response = await group.stub(survivor).Execute(
                pb.ExecuteRequest(cluster=group.name, group=0, operations=[put(b"k", b"v2"), get(b"k")]), timeout=3.0
            )
            assert response.status == pb.ExecuteResponse.UNAVAILABLE, response
            assert "quorum" in response.message
            assert time.monotonic() - began < 1.0
            # Quorum back: service resumes and the first write was applied at most once.
            for host in group.hosts:
                if host != survivor:
                    group.start(host)
            await group.wait_leader()
            values = await _read_all(group, [b"k"], timeout=10.0)
            assert values[b"k"] in (b"v", b"lost?")
        finally:
            await group.close_channels()

    run(scenario())


def test_an_idle_group_quiesces_wakes_for_a_write_and_a_dead_leader_is_replaced(make_group) -> None:
    """docs/raft.md, "Quiescence": real workers stop ticking once idle, a write
    wakes them, and a quiesced group whose leader is SIGKILLed elects another
    within a few election timeouts (the followers learn it from the broken link)."""
    group = make_group(3)
    group.start_all()

    async def quiesced() -> dict[str, bool]:
        return {h: bool((s := await group.status(h)) and s.quiesced) for h in group.hosts}

    async def until_quiesced(timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not all((await quiesced()).values()):
            assert time.monotonic() < deadline, await quiesced()
            await asyncio.sleep(0.1)

    async def scenario() -> None:
        try:
            leader = await group.wait_leader()
            assert (await group.execute([put(b"q", b"1", 1, 1)])).status == OK
            await until_quiesced()
            status = await group.status(leader)
            term, applied = status.term, status.applied_index
            await asyncio.sleep(1.0)            # 20 ticks: nothing happens while quiesced
            after = await group.status(leader)
            assert (after.term, after.applied_index, after.quiesced) == (term, applied, True)
            # A write wakes the group, and is served at once.
            began = time.monotonic()
            assert (await group.execute([put(b"q", b"2", 1, 2)])).status == OK
            assert time.monotonic() - began < 1.0
            await until_quiesced()
            leader = await group.wait_leader()
            killed_at = time.monotonic()
            group.kill(leader, signal.SIGKILL)
            new_leader = await group.wait_leader(timeout=10.0, exclude={leader})
            failover = time.monotonic() - killed_at
            assert failover < 8.0, f"a quiesced group took {failover:.1f} s to replace its leader"
            assert (await _read_all(group, [b"q"])) == {b"q": b"2"}
            print(f"\n[quiescence] failover of a quiesced group: {failover:.2f} s (new leader {new_leader})")
        finally:
            await group.close_channels()

    run(scenario())
