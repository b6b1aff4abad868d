"""RaftTransport on 127.0.0.1: batching, order, validation, failures, snapshots, shutdown.

Each test runs its own event loop (asyncio.run) and owns every server and
transport it starts through an AsyncExitStack, so they are stopped on
failure too.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from shardnode.limits import refuse as limit_refusal
from shardnode.raft.messages import ConfState, Entry, Message, MessageType, Snapshot, SnapshotMetadata
from shardnode.transport import (
    MESSAGES_METHOD,
    SERVER_OPTIONS,
    SNAPSHOT_METHOD,
    Frame,
    RaftTransport,
    SnapshotHeader,
    TransportTiming,
    encode_frame,
)

CLUSTER = "test-cluster"
GROUP = 7
FAST = TransportTiming(backoff_min=0.01, backoff_max=0.1, connect_timeout=2.0, ping_interval=0.2, link_timeout=2.0)

pytestmark = pytest.mark.timeout(30)


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def heartbeat(from_: int, to: int, seq: int) -> Message:
    return Message(MessageType.HEARTBEAT, to=to, from_=from_, term=3, commit=seq)


@dataclass
class Member:
    node_id: int
    address: str
    transport: RaftTransport
    server: grpc.aio.Server
    batches: list[list[Message]] = field(default_factory=list)
    unreachable: list[int] = field(default_factory=list)

    @property
    def received(self) -> list[Message]:
        return [m for batch in self.batches for m in batch]

    def from_(self, sender: int) -> list[Message]:
        return [m for m in self.received if m.from_ == sender]


async def start_server(stack: AsyncExitStack, port: int = 0, register: Callable[[grpc.aio.Server], None] | None = None):
    server = grpc.aio.server(options=SERVER_OPTIONS)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if register is not None:
        register(server)
    await server.start()
    stack.push_async_callback(server.stop, None)
    return server, bound


async def start_members(
    stack: AsyncExitStack,
    ids: list[int],
    *,
    ports: dict[int, int] | None = None,
    skip: tuple[int, ...] = (),
    **kwargs: Any,
) -> dict[int, Member]:
    """Members `ids` of one group, each with its own server; those in `skip` get an address but no process."""
    ports = dict(ports or {})
    for node_id in ids:
        ports.setdefault(node_id, free_port())
    members: dict[int, Member] = {}
    for node_id in ids:
        if node_id not in skip:
            members[node_id] = await start_member(stack, node_id, ports, start=False, **kwargs)
    # Every server is up before any sender starts: no spurious "unreachable" at start-up.
    for member in members.values():
        await member.transport.start()
    return members


async def start_member(
    stack: AsyncExitStack, node_id: int, ports: dict[int, int], *, start: bool = True, **kwargs: Any
) -> Member:
    member: Member | None = None

    def deliver(batch: list[Message]) -> None:
        assert member is not None
        member.batches.append(batch)

    def on_unreachable(peer: int) -> None:
        assert member is not None
        member.unreachable.append(peer)

    kwargs.setdefault("timing", FAST)
    transport = RaftTransport(
        cluster=CLUSTER,
        group=GROUP,
        node_id=node_id,
        peers={p: f"127.0.0.1:{port}" for p, port in ports.items() if p != node_id},
        deliver=deliver,
        on_unreachable=on_unreachable,
        rng=random.Random(node_id),
        **kwargs,
    )
    server, _ = await start_server(stack, ports[node_id], transport.register)
    member = Member(node_id, f"127.0.0.1:{ports[node_id]}", transport, server)
    stack.push_async_callback(transport.close)
    if start:
        await transport.start()
    return member


def leftover_tasks() -> set[asyncio.Task[Any]]:
    return {task for task in asyncio.all_tasks() if task is not asyncio.current_task()}


# ------------------------------------------------------------------ exchange and batching


def test_two_transports_exchange_batches_in_order() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            a, b = (await start_members(stack, [1, 2])).values()
            a.transport.send([heartbeat(1, 2, i) for i in range(2000)])
            b.transport.send([heartbeat(2, 1, i) for i in range(2000)])
            await until(lambda: len(b.received) == 2000 and len(a.received) == 2000, what="2000 messages each way")
            assert [m.commit for m in b.received] == list(range(2000))
            assert [m.commit for m in a.received] == list(range(2000))
            # One send() of 2000 messages: the sender drains the queue into one frame.
            assert len(b.batches) <= 3, len(b.batches)
            assert a.transport.stats.sent_messages[2] == 2000
            assert a.transport.stats.sent_frames[2] == len(b.batches)
            assert b.transport.stats.received_messages[1] == 2000
            assert a.transport.stats.queue_depth(2) == 0
            # Messages sent one by one while the stream is busy are batched too.
            for i in range(3000):
                a.transport.send([heartbeat(1, 2, 10_000 + i)])
                if i % 100 == 0:
                    await asyncio.sleep(0)
            await until(lambda: len(b.received) == 5000, what="3000 more")
            assert [m.commit for m in b.received[2000:]] == list(range(10_000, 13_000))
            assert len(b.batches) < 2 + 3000 / 10
            assert not a.unreachable and not b.unreachable

    run(main())


def test_three_transports_each_peer_stream_is_ordered() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            members = await start_members(stack, [1, 2, 3])
            for round_ in range(20):
                for sender in members.values():
                    sender.transport.send(
                        heartbeat(sender.node_id, peer, round_ * 50 + i)
                        for peer in members
                        if peer != sender.node_id
                        for i in range(50)
                    )
                await asyncio.sleep(0)
            await until(lambda: all(len(m.received) == 2000 for m in members.values()), what="all messages")
            for member in members.values():
                for sender in members:
                    if sender != member.node_id:
                        assert [m.commit for m in member.from_(sender)] == list(range(1000))
                assert all(m.to == member.node_id for m in member.received)
                assert len(member.batches) < 2000 / 10

    run(main())


def test_frames_are_split_at_max_frame_bytes() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            a, b = (await start_members(stack, [1, 2], max_frame_bytes=64 << 10)).values()
            messages = [
                Message(MessageType.APP, to=2, from_=1, term=3, index=i,
                        entries=tuple(Entry(3, i + j, b"e" * 4000) for j in range(1, 4)))
                for i in range(100)
            ]
            a.transport.send(messages)
            await until(lambda: len(b.received) == 100)
            assert b.received == messages
            assert 100 * 12_000 / (64 << 10) <= len(b.batches) <= 40
            # A message that cannot fit any frame is dropped at send().
            huge = Message(MessageType.APP, to=2, from_=1, entries=(Entry(3, 1, b"x" * (70 << 10)),))
            a.transport.send([huge])
            assert a.transport.stats.dropped_by_reason["too_large"] == 1

    run(main())


def test_send_drops_what_cannot_travel() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            members = await start_members(stack, [1, 2, 3])
            a, b = members[1], members[2]
            a.transport.send(
                [
                    heartbeat(1, 9, 0),  # not a peer
                    Message(MessageType.HUP, to=2, from_=1),  # local type
                    heartbeat(3, 2, 0),  # not from us
                    Message(MessageType.TRANSFER_LEADER, to=2, from_=3),  # forwarded: from_ is the transferee
                    heartbeat(1, 2, 42),
                ]
            )
            await until(lambda: len(b.received) == 2)
            assert [m.type for m in b.received] == [MessageType.TRANSFER_LEADER, MessageType.HEARTBEAT]
            stats = a.transport.stats
            assert stats.dropped_by_reason == {"unknown_peer": 1, "invalid": 2}
            assert stats.dropped_messages[9] == 1 and stats.dropped_messages[2] == 2

    run(main())


def test_deliver_raising_does_not_break_the_stream() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            members = await start_members(stack, [1, 2])
            a, b = members[1], members[2]
            calls = []

            def flaky(batch: list[Message]) -> None:
                calls.append(batch)
                if len(calls) == 1:
                    raise RuntimeError("driver bug")

            b.transport._deliver = flaky
            a.transport.send([heartbeat(1, 2, 0)])
            await until(lambda: len(calls) == 1)
            a.transport.send([heartbeat(1, 2, 1)])
            await until(lambda: len(calls) == 2)
            assert not a.unreachable

    run(main())


# ------------------------------------------------------------------ inbound validation


def _frame_bytes(cluster: str = CLUSTER, group: int = GROUP, from_node: int = 1, to_node: int = 2, **message) -> bytes:
    fields = {"to": to_node, "from_": from_node, "term": 1, "commit": 5} | message
    return encode_frame(Frame(cluster, group, from_node, to_node, (Message(MessageType.HEARTBEAT, **fields),)))


BAD_FRAMES = {
    "wrong_cluster": _frame_bytes(cluster="other-cluster"),
    "wrong_group": _frame_bytes(group=GROUP + 1),
    # Below the highest id the receiver knows, and neither a member nor removed.
    "unknown_sender": _frame_bytes(from_node=3),
    "wrong_recipient": _frame_bytes(to_node=3),
    "malformed": b"\x00garbage\xff\xfe" * 10,
}


async def _raw_stream(address: str, frames: list[bytes], acks: int = 0) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """Write raw frames on one Messages stream, read `acks` answers, close; return the status and answers.

    A rejected stream is not written to after the bad frame: a write racing
    the server's abort fails locally with INTERNAL and hides the real status.
    """
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(MESSAGES_METHOD, request_serializer=None, response_deserializer=None)()
        responses = []
        try:
            for frame in frames:
                await call.write(frame)
            for _ in range(acks):
                responses.append(await call.read())
            await call.done_writing()
            while (response := await call.read()) is not grpc.aio.EOF:
                responses.append(response)
        except grpc.aio.AioRpcError:
            pass
        return await call.code(), await call.details(), responses


def test_bad_frames_are_rejected_counted_and_the_server_keeps_serving(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            members = await start_members(stack, [1, 2, 4])
            a, b = members[1], members[2]
            for reason, data in BAD_FRAMES.items():
                for _ in range(3):
                    code, details, _ = await _raw_stream(b.address, [data])
                    assert code is grpc.StatusCode.INVALID_ARGUMENT
                    assert details.startswith(reason)
            assert b.received == []
            assert dict(b.transport.stats.rejected_frames) == {reason: 3 for reason in BAD_FRAMES}
            # A good frame on a raw stream is delivered, and an empty frame (a ping) is answered.
            empty = encode_frame(Frame(CLUSTER, GROUP, 1, 2, ()))
            code, _, responses = await _raw_stream(b.address, [_frame_bytes(commit=77), empty], acks=1)
            assert code is grpc.StatusCode.OK and responses == [b""]
            assert [m.commit for m in b.received] == [77]
            # And the real transports still talk.
            a.transport.send([heartbeat(1, 2, 78)])
            members[4].transport.send([heartbeat(4, 2, 79)])
            await until(lambda: len(b.received) == 3)
            # Rate-limited: one warning per reason, however many frames.
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                        and r.getMessage() == "transport.frame_rejected"]
            assert sorted(r.reason for r in warnings) == sorted(BAD_FRAMES)
            assert all(r.node == 2 and r.group == GROUP for r in warnings)

    with caplog.at_level(logging.WARNING, logger="shardnode.transport"):
        run(main())


def test_frames_from_a_removed_member_are_refused() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            members = await start_members(stack, [1, 2, 3])
            a, b, c = members.values()
            a.transport.send([heartbeat(1, 2, 1)])
            await until(lambda: len(b.received) == 1)
            b.transport.update_peers({3: c.address})  # node 1 left the group
            a.transport.send([heartbeat(1, 2, 2)])
            await until(lambda: b.transport.stats.rejected_frames["unknown_sender"] >= 1)
            assert len(b.received) == 1
            await until(lambda: a.unreachable == [2], what="node 1 sees its stream refused")
            # Sending to a removed peer is dropped, not queued.
            b.transport.send([heartbeat(2, 1, 3)])
            assert b.transport.stats.dropped_by_reason["unknown_peer"] == 1
            # Adding it back: both directions work again.
            b.transport.update_peers({1: a.address, 3: c.address})
            b.transport.send([heartbeat(2, 1, 4)])
            await until(lambda: [m.commit for m in a.received] == [4])
            # Node 1's refused message was lost with its stream (Raft retransmits); new ones flow.
            a.transport.send([heartbeat(1, 2, 5)])
            await until(lambda: [m.commit for m in b.received] == [1, 5], what="node 1 reconnects")
            assert a.unreachable == [2], "one report for the whole refusal"
            assert a.transport.stats.reconnects[2] == 1

    run(main())


def test_a_removed_member_is_heard_and_answered_on_its_own_stream() -> None:
    """Node 1 was removed (node 2 applied it; node 1 did not): its frames
    reach node 2's core, and what the core answers (a NOTICE) goes back on the
    stream node 1 opened, though node 2 has no link to it any more."""
    async def main() -> None:
        async with AsyncExitStack() as stack:
            members = await start_members(stack, [1, 2, 3])
            a, b, c = members.values()
            b.transport.update_peers({3: c.address}, removed=[1])
            a.transport.send([heartbeat(1, 2, 1)])
            await until(lambda: [m.commit for m in b.received] == [1], what="a removed member's frame delivered")
            notice = Message(MessageType.NOTICE, to=1, from_=2, context=b"removed")
            b.transport.send([notice])
            assert b.transport.stats.replied_messages[1] == 1
            await until(lambda: a.from_(2) == [notice], what="the answer on node 1's own stream")
            assert not b.transport.stats.rejected_frames
            # Without an open stream from it there is nowhere to answer: dropped.
            b.transport.send([Message(MessageType.NOTICE, to=9, from_=2, context=b"removed")])
            assert b.transport.stats.dropped_by_reason["unknown_peer"] == 1

    run(main())


def test_an_id_above_every_known_one_is_a_member_not_applied_yet() -> None:
    """Node 4 joined by a change node 2 has not applied (ids only grow): its
    frames are delivered, and node 2 answers on node 4's stream. An unknown
    id below the highest known one is a stranger."""
    async def main() -> None:
        async with AsyncExitStack() as stack:
            ports = {n: free_port() for n in (1, 2, 4)}
            members = await start_members(stack, [1, 2, 4], ports=ports)
            b, d = members[2], members[4]
            b.transport.update_peers({1: members[1].address})     # node 2 knows nodes 1 and 2 only
            d.transport.send([heartbeat(4, 2, 7)])
            await until(lambda: [m.commit for m in b.received] == [7])
            b.transport.send([Message(MessageType.HEARTBEAT_RESP, to=4, from_=2, term=3)])
            await until(lambda: [m.type for m in d.from_(2)] == [MessageType.HEARTBEAT_RESP])
            code, details, _ = await _raw_stream(b.address, [_frame_bytes(from_node=1, to_node=2)])
            assert code is grpc.StatusCode.OK
            b.transport.update_peers({4: d.address})               # node 1 is neither member nor removed now
            code, details, _ = await _raw_stream(b.address, [_frame_bytes(from_node=1, to_node=2)])
            assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("unknown_sender")

    run(main())


def test_strangers_of_another_cluster_or_group_life_are_refused_and_incarnations_stamped() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            members = await start_members(stack, [1, 2], cluster_id=0xC1, group_incarnation=0x61, incarnation=0x11)
            a, b = members[1], members[2]
            a.transport.send([heartbeat(1, 2, 1)])
            await until(lambda: len(b.received) == 1)
            assert b.received[0].incarnation == 0x11
            for reason, overrides in (("wrong_cluster_id", {"cluster_id": 0xC2, "group_incarnation": 0x61}),
                                      ("wrong_group_incarnation", {"cluster_id": 0xC1, "group_incarnation": 0x62})):
                frame = encode_frame(Frame(CLUSTER, GROUP, 1, 2, (heartbeat(1, 2, 9),), **overrides))
                code, details, _ = await _raw_stream(b.address, [frame])
                assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith(reason), details
                assert "a stranger" in details
            # Unknown ids (0, a version-1 frame) are not checked.
            unknown = encode_frame(Frame(CLUSTER, GROUP, 1, 2, (heartbeat(1, 2, 10),)))
            code, _, _ = await _raw_stream(b.address, [unknown])
            assert code is grpc.StatusCode.OK
            await until(lambda: [m.commit for m in b.received] == [1, 10])
            assert b.received[1].incarnation == 0
            # A node that learns its ids later (the metadata group's replicas) says them from then on.
            a.transport.set_identity(0xC3, 0x61)
            a.transport.send([heartbeat(1, 2, 11)])
            await until(lambda: b.transport.stats.rejected_frames["wrong_cluster_id"] >= 2)
            assert [m.commit for m in b.received] == [1, 10]

    run(main())


def test_a_retiring_link_first_sends_what_is_queued_for_its_peer() -> None:
    """The append that commits a member's removal is queued in the same apply
    that retires its link: it still goes."""
    async def main() -> None:
        async with AsyncExitStack() as stack:
            members = await start_members(stack, [1, 2, 3])
            a, c = members[1], members[3]
            a.transport.send([heartbeat(1, 3, i) for i in range(50)])
            a.transport.update_peers({2: members[2].address}, removed=[3])
            await until(lambda: len(c.from_(1)) == 50, what="the queue drained to the removed peer")
            assert a.transport.stats.dropped_by_reason["peer_removed"] == 0

    run(main())


# ------------------------------------------------------------------ failures


def test_peer_down_is_bounded_then_reconnects() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            ports = {1: free_port(), 2: free_port()}
            members = await start_members(stack, [1, 2], ports=ports, skip=(2,), max_queue_messages=100)
            a = members[1]
            await until(lambda: a.unreachable == [2], what="on_unreachable")
            for i in range(1000):
                a.transport.send([heartbeat(1, 2, i)])
            stats = a.transport.stats
            assert stats.queue_depth(2) == 100
            assert stats.dropped_messages[2] == 900 and stats.dropped_by_reason["queue_full"] == 900
            await asyncio.sleep(0.5)  # several retries while down: still one report for the outage
            assert a.unreachable == [2]
            assert stats.sent_messages[2] == 0

            b_stack = AsyncExitStack()
            stack.push_async_callback(b_stack.aclose)
            b = await start_member(b_stack, 2, ports)
            await until(lambda: len(b.received) == 100, what="queued messages delivered after reconnect")
            assert [m.commit for m in b.received] == list(range(100))
            a.transport.send([heartbeat(1, 2, 5000)])
            await until(lambda: len(b.received) == 101)
            assert stats.queue_depth(2) == 0 and stats.reconnects[2] == 0

            # The peer dies (process gone) and comes back on the same address.
            await b_stack.aclose()
            await until(lambda: a.unreachable == [2, 2], what="second outage reported")
            b = await start_member(b_stack, 2, ports)
            a.transport.send([heartbeat(1, 2, 6000)])
            await until(lambda: [m.commit for m in b.received] == [6000])
            assert stats.reconnects[2] == 1

    run(main())


def test_peer_reports_are_events_quiet_at_start_up(caplog: pytest.LogCaptureFixture) -> None:
    """A peer not up yet at start is not a WARNING (members start one after
    another); once the start-up grace is over it is, once per outage, as a
    `transport.peer_unreachable` event; `transport.peer_reachable` when it is back."""

    def events(level: int) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "shardnode.transport" and r.levelno == level]

    async def main() -> None:
        caplog.set_level(logging.DEBUG, logger="shardnode.transport")
        async with AsyncExitStack() as stack:
            ports = {1: free_port(), 2: free_port()}
            quiet = TransportTiming(backoff_min=0.01, backoff_max=0.05, connect_timeout=2.0, ping_interval=0.2,
                                    link_timeout=2.0, startup_grace=0.6)
            a = (await start_members(stack, [1, 2], ports=ports, skip=(2,), timing=quiet))[1]
            await until(lambda: a.unreachable == [2], what="on_unreachable at once")
            await asyncio.sleep(0.3)
            assert events(logging.WARNING) == [], "no WARNING within the start-up grace"
            assert "transport.peer_not_up_yet" in events(logging.DEBUG)
            await until(lambda: events(logging.WARNING) == ["transport.peer_unreachable"], what="warning after grace")
            await asyncio.sleep(0.3)                      # many more retries: still one warning
            assert events(logging.WARNING) == ["transport.peer_unreachable"]
            record = next(r for r in caplog.records if r.getMessage() == "transport.peer_unreachable")
            assert record.peer == 2 and record.address == f"127.0.0.1:{ports[2]}" and record.reason
            await start_member(stack, 2, ports)
            await until(lambda: "transport.peer_reachable" in events(logging.INFO), what="back")

    run(main())


def test_a_peer_that_stops_answering_pings_is_reported() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            accepted: list[int] = []

            async def mute(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
                # Answers the handshake ping, then reads on but never answers again (a wedged process).
                accepted.append(1)
                await context.write(b"")
                async for _ in requests:
                    pass

            handler = grpc.method_handlers_generic_handler(
                "shardnode.raft.Transport", {"Messages": grpc.stream_stream_rpc_method_handler(mute)}
            )
            _, port = await start_server(stack, register=lambda s: s.add_generic_rpc_handlers((handler,)))
            timing = TransportTiming(backoff_min=0.01, backoff_max=0.05, ping_interval=0.05, link_timeout=0.3)
            members = await start_members(stack, [1, 2], ports={2: port}, skip=(2,), timing=timing)
            a = members[1]
            started = time.monotonic()
            await until(lambda: a.unreachable == [2], what="link timeout")
            assert time.monotonic() - started > 0.25, "not reported before the link timeout"
            await until(lambda: len(accepted) >= 2, what="a new stream after the timeout")
            # The server sees the stream before the sender has read the
            # handshake answer that makes it count as a reconnect.
            await until(lambda: a.transport.stats.reconnects[2] >= 1, what="the new stream counted as a reconnect")

    run(main())


# ------------------------------------------------------------------ snapshots


SNAP_MESSAGE = Message(
    MessageType.SNAP,
    to=2,
    from_=1,
    term=4,
    snapshot=Snapshot(SnapshotMetadata(index=500, term=4, conf_state=ConfState(voters=(1, 2, 3))), b"descriptor"),
)


def test_snapshot_streams_while_messages_keep_flowing() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            received: list[bytes] = []
            headers: list[SnapshotHeader] = []
            during: list[int] = []
            member: dict[int, Member] = {}

            async def on_snapshot(header: SnapshotHeader, chunks: AsyncIterator[bytes]) -> None:
                headers.append(header)
                before = len(member[2].received)
                async for chunk in chunks:
                    received.append(chunk)
                    await asyncio.sleep(0.01)  # a slow disk: the transfer takes ~0.5 s
                during.append(len(member[2].received) - before)

            ports = {1: free_port(), 2: free_port()}
            member[1] = await start_member(stack, 1, ports)
            member[2] = await start_member(stack, 2, ports, on_snapshot=on_snapshot)
            a = member[1].transport
            chunks = [bytes([i]) * 100_000 for i in range(50)]

            async def heartbeats() -> None:
                for i in range(10_000):
                    a.send([heartbeat(1, 2, i)])
                    await asyncio.sleep(0.01)

            ticker = asyncio.create_task(heartbeats())
            try:
                assert await a.send_snapshot(2, SNAP_MESSAGE, iter(chunks))
            finally:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
            assert received == chunks
            assert headers == [SnapshotHeader(CLUSTER, GROUP, 1, 2, SNAP_MESSAGE)]
            assert during[0] >= 10, f"only {during[0]} heartbeats during the transfer"
            assert a.stats.snapshots_sent[2] == 1
            assert member[2].transport.stats.snapshots_received[1] == 1

            async def async_chunks() -> AsyncIterator[bytes]:
                for chunk in chunks[:3]:
                    yield chunk

            received.clear()
            assert await a.send_snapshot(2, SNAP_MESSAGE, async_chunks())
            assert received == chunks[:3]

    run(main())


def test_snapshot_refusals_return_false() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            seen: list[bytes] = []

            async def refuse(header: SnapshotHeader, chunks: AsyncIterator[bytes]) -> None:
                async for chunk in chunks:
                    seen.append(chunk)
                    if len(seen) == 2:
                        raise OSError("disk full")

            async def take_first(header: SnapshotHeader, chunks: AsyncIterator[bytes]) -> None:
                async for _ in chunks:
                    return  # accepts without reading the rest: the transport drains it

            ports = {1: free_port(), 2: free_port(), 3: free_port(), 4: free_port()}
            a = (await start_member(stack, 1, ports)).transport
            await start_member(stack, 2, ports, on_snapshot=refuse)
            await start_member(stack, 3, ports)  # no on_snapshot
            await start_member(stack, 4, ports, on_snapshot=take_first)
            chunks = [b"c" * 1000] * 20
            assert not await a.send_snapshot(2, SNAP_MESSAGE, chunks)
            assert len(seen) == 2
            assert not await a.send_snapshot(3, Message(MessageType.SNAP, to=3, from_=1, snapshot=Snapshot()), chunks)
            assert await a.send_snapshot(4, Message(MessageType.SNAP, to=4, from_=1, snapshot=Snapshot()), chunks)
            assert a.stats.snapshots_failed == {2: 1, 3: 1} and a.stats.snapshots_sent == {4: 1}
            with pytest.raises(ValueError):
                await a.send_snapshot(2, heartbeat(1, 2, 0), chunks)

    run(main())


def test_snapshot_with_a_bad_header_is_refused() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            got: list[SnapshotHeader] = []

            async def accept(header: SnapshotHeader, chunks: AsyncIterator[bytes]) -> None:
                got.append(header)

            ports = {1: free_port(), 2: free_port()}
            b = await start_member(stack, 2, ports, on_snapshot=accept)
            async with grpc.aio.insecure_channel(b.address) as channel:
                for header in (_frame_bytes(), _frame_bytes(cluster="x"), b"junk"):
                    call = channel.stream_unary(SNAPSHOT_METHOD)()
                    with pytest.raises(grpc.aio.AioRpcError) as error:
                        await call.write(header)
                        await call.write(b"chunk")
                        await call.done_writing()
                        await call
                    assert error.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL)
                    assert await call.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL)
            assert got == []
            rejected = b.transport.stats.rejected_frames
            assert rejected == {"bad_snapshot_header": 1, "wrong_cluster": 1, "malformed": 1}

    run(main())


def test_a_snapshot_past_a_limit_is_refused_with_resource_exhausted() -> None:
    """The receiver's limits (max_snapshot_bytes, max_snapshot_seconds) end
    the stream with RESOURCE_EXHAUSTED naming the limit, not a bare ABORTED."""
    async def main() -> None:
        async with AsyncExitStack() as stack:
            async def bounded(header: SnapshotHeader, chunks: AsyncIterator[bytes]) -> None:
                async for _ in chunks:
                    raise limit_refusal("max_snapshot_bytes", 1000, "a snapshot stream of more than 1024 bytes")

            ports = {1: free_port(), 2: free_port()}
            b = await start_member(stack, 2, ports, on_snapshot=bounded)
            header = encode_frame(Frame(CLUSTER, GROUP, 1, 2, (SNAP_MESSAGE,)))
            async with grpc.aio.insecure_channel(b.address) as channel:
                call = channel.stream_unary(SNAPSHOT_METHOD)()
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await call.write(header)
                    await call.write(b"c" * 1024)
                    await call.done_writing()
                    await call
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.value.details() == ("snapshot refused: limits.max_snapshot_bytes (1000) exceeded: "
                                             "a snapshot stream of more than 1024 bytes")

    run(main())


# ------------------------------------------------------------------ shutdown


def test_close_leaves_no_tasks_and_is_idempotent() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            async def consume(header: SnapshotHeader, chunks: AsyncIterator[bytes]) -> None:
                async for _ in chunks:
                    pass

            ports = {n: free_port() for n in (1, 2, 3, 4)}
            members = await start_members(stack, [1, 2, 3, 4], ports=ports, skip=(4,), on_snapshot=consume)
            a = members[1]
            a.transport.send([heartbeat(1, p, 0) for p in (2, 3, 4)])
            await until(lambda: len(members[2].received) == 1 and len(members[3].received) == 1)
            a.transport.update_peers({2: members[2].address, 5: f"127.0.0.1:{free_port()}"})  # retire 3 and 4, add 5
            slow = asyncio.create_task(a.transport.send_snapshot(2, SNAP_MESSAGE, _endless()))
            await asyncio.sleep(0.1)
            assert not slow.done()
            await asyncio.gather(*(m.transport.close() for m in members.values()))
            await a.transport.close()
            assert await slow is False  # close() ended the transfer
            for member in members.values():
                await member.server.stop(None)
            await asyncio.sleep(0)
            assert leftover_tasks() == set()
            a.transport.send([heartbeat(1, 2, 1)])  # after close: dropped, no error
            assert a.transport.stats.dropped_by_reason["closed"] >= 1

    run(main())


async def _endless() -> AsyncIterator[bytes]:
    while True:
        yield b"x" * 1000
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------ throughput


def test_throughput_of_one_stream(capsys: pytest.CaptureFixture[str]) -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            a, b = (await start_members(stack, [1, 2])).values()
            batch = [Message(MessageType.APP, to=2, from_=1, term=3, entries=(Entry(3, i + 1, b"v" * 100),), index=i)
                     for i in range(64)]
            total = 64 * 400
            start = time.perf_counter()
            for _ in range(total // 64):
                a.transport.send(batch)
                await asyncio.sleep(0)  # let the sender and the receiver run, as the worker's loop would
                while a.transport.stats.queue_depth(2) > 64 * 8:
                    await asyncio.sleep(0.0005)
            await until(lambda: len(b.received) == total)
            elapsed = time.perf_counter() - start
            with capsys.disabled():
                print(
                    f"\ntransport: {total / elapsed:,.0f} messages/s over one stream (both ends in one process), "
                    f"{total / len(b.batches):.0f} messages per frame"
                )
            assert total / elapsed > 2000

    run(main())
