"""The peer transport of one Raft group member: batched msgpack frames over gRPC.

Every worker (one member of one group) serves two generic gRPC methods on its
own server, next to whatever else that server serves:

    /shardnode.raft.Transport/Messages   bidi stream: request = frame, response = ping ack
    /shardnode.raft.Transport/Snapshot   client stream: header frame, then raw chunks

Outbound, there is one long-lived `Messages` stream per peer, fed by one
sender task. `send()` only encodes each message and appends it to that peer's
bounded queue; the sender wakes up, drains everything queued (up to
`max_frame_bytes`) into one frame and writes it. Under load a frame carries
many messages (batching); at rest a heartbeat goes out alone and at once.

Liveness of a stream is checked twice. gRPC's own keepalive (HTTP/2 PINGs
every 2 s, answered within 3 s by gRPC's core on the other side, with no
Python code running on either) breaks the stream of a peer whose host or
network died, within about 5 s; a peer process that died closes its
connection at once. Our own pings, every `ping_interval` (5 s), are a frame
with no messages that the receiver answers with an empty response: a stream
whose pings go unanswered for `link_timeout` (a peer that is stopped but
whose connection stays up), or whose write stays blocked that long, is
treated as broken. Either way the core hears that the peer is unreachable:
how a quiesced group's followers learn that their leader is gone (docs/raft.md,
"Quiescence"). Idle, a link then costs one small frame each way every 5 s
(measured: a quiesced worker with two peers, 0.005 cores with 1 s pings,
0.0025 with 5 s).

Snapshots go over their own RPC on their own connection (a channel with a
local subchannel pool), so that a long transfer shares neither the stream nor
the HTTP/2 flow-control window with heartbeats.

Inbound, every frame is decoded and checked (codec validation, then cluster,
group, recipient, the cluster's id and the group's incarnation when both
sides know theirs, and the sender; with TLS, a member's frames must come
with the certificate of its host) before anything is delivered; snapshot
chunks are checked against their header (`check_chunk`) before the
receiver sees them. A rejected frame closes that stream with
INVALID_ARGUMENT (details name the reason); the sender logs it and
reconnects with backoff. Closing rather than skipping is deliberate: a
stream that carried one bad frame cannot be trusted to be in sync, and a
misconfigured peer (wrong cluster name, a stranger) sees the reason in its
own logs instead of talking into the void.

Who may send: a member of the configuration this node applied; a removed
member (its messages reach the Raft core, which answers each with a NOTICE:
that is how a removed member that missed its removal learns it); and an id
above every id this node knows (ids only grow: a member added by a change
this node has not applied yet, perhaps the leader that would bring it that
change). Anyone else is a stranger (`unknown_sender`).

Replies without a link: a message for a peer this node has no link to (a
removed member, a member not applied yet) goes back on the stream that peer
opened to this node, if there is one: the server writes it as a response
frame after the next frame that peer sends (pings come every
`ping_interval`), and the peer's sender delivers it like any frame.

A link that retires (its peer left the configuration) first sends what is
queued for it, for at most `RETIRE_DRAIN_SECONDS`: the append that commits a
member's removal is queued in the same apply that retires its link, and is
how that member learns it was removed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc

from ..raft.messages import LOCAL_MESSAGES, Message, MessageType
from ..security import peer_common_name
from ..limits import LimitExceeded
from .codec import JOIN_OVERHEAD, Frame, FrameError, decode_frame, encode_message, frame_prefix, join_frame

__all__ = [
    "CHANNEL_OPTIONS",
    "MESSAGES_METHOD",
    "SERVER_OPTIONS",
    "SERVICE_NAME",
    "SNAPSHOT_METHOD",
    "RaftTransport",
    "SnapshotHeader",
    "TransportStats",
    "TransportTiming",
]

SERVICE_NAME = "shardnode.raft.Transport"
MESSAGES_METHOD = f"/{SERVICE_NAME}/Messages"
SNAPSHOT_METHOD = f"/{SERVICE_NAME}/Snapshot"

# Options for the worker's grpc.aio.server: frames (max_frame_bytes, 8 MiB by
# default) and snapshot chunks are larger than gRPC's default 4 MiB limit.
SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", 64 << 20),
)

# Options for the channels to peers. A local subchannel pool gives each
# channel its own TCP connection (gRPC otherwise shares one between channels
# with the same target and options). gRPC's own reconnect backoff (1 s
# doubling to 120 s by default) is shortened so that it never holds a link
# down longer than our backoff does.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", 1 << 20),
    ("grpc.enable_retries", 0),     # a broken stream is redialled by the link itself
    # gRPC's keepalive: a dead peer host or network breaks the stream within about 5 s
    # (the workers' servers allow these pings: server_options.py).
    ("grpc.keepalive_time_ms", 2000),
    ("grpc.keepalive_timeout_ms", 3000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)

_PING = b""  # the empty response that answers a ping
#: A retiring link sends what is queued for its peer for at most this long.
RETIRE_DRAIN_SECONDS = 2.0
#: Frames waiting to go back on one inbound stream (the oldest are dropped beyond).
MAX_REPLY_FRAMES = 1024


@dataclass(slots=True, frozen=True)
class SnapshotHeader:
    """The first message of a snapshot stream: who sends it, and the SNAP message."""

    cluster: str
    group: int
    from_node: int
    to_node: int
    message: Message


@dataclass(slots=True, frozen=True)
class TransportTiming:
    """Timeouts and backoff of the outbound links (seconds)."""

    backoff_min: float = 0.02
    backoff_max: float = 1.0
    connect_timeout: float = 5.0  # the first ping of a new stream must be answered within this
    ping_interval: float = 5.0
    link_timeout: float = 15.0  # no ping answered (or a write blocked) this long: the stream is broken
    log_interval: float = 5.0  # at most one warning per reason per this interval
    # A peer never reached since start is only reported (WARNING) once this
    # long has passed: at start-up the members come up one after another.
    startup_grace: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.backoff_min <= self.backoff_max:
            raise ValueError("need 0 < backoff_min <= backoff_max")
        if not 0 < self.ping_interval < self.link_timeout:
            raise ValueError("need 0 < ping_interval < link_timeout")
        if self.connect_timeout <= 0 or self.log_interval < 0 or self.startup_grace < 0:
            raise ValueError("connect_timeout must be positive, log_interval and startup_grace non-negative")


def _no_depth(peer: int) -> int:
    return 0


@dataclass(slots=True)
class TransportStats:
    """Counters of one transport, for metrics and tests. Per-peer counters are keyed by node id."""

    sent_messages: Counter[int] = field(default_factory=Counter)
    sent_frames: Counter[int] = field(default_factory=Counter)
    # Messages not (known to be) sent, by destination; by_reason says why:
    # queue_full, unknown_peer, invalid, too_large, stream_broken, peer_removed, closed.
    dropped_messages: Counter[int] = field(default_factory=Counter)
    dropped_by_reason: Counter[str] = field(default_factory=Counter)
    received_messages: Counter[int] = field(default_factory=Counter)
    received_frames: Counter[int] = field(default_factory=Counter)
    # Messages sent back on a peer's inbound stream (no link to it), by peer.
    replied_messages: Counter[int] = field(default_factory=Counter)
    # Inbound frames refused: malformed, too_large, unknown_type, bad_id, bad_entries
    # (codec), wrong_cluster, wrong_group, wrong_cluster_id, wrong_group_incarnation (a
    # stranger: another cluster, or another life of the group), wrong_recipient,
    # unknown_sender, unknown_node (a TRANSFER_LEADER naming a non-member), wrong_identity
    # (a certificate not of the sender's host), bad_snapshot_header, snapshot_mismatch (a
    # chunk not of its header's snapshot, or over max_frame_bytes), closed.
    rejected_frames: Counter[str] = field(default_factory=Counter)
    reconnects: Counter[int] = field(default_factory=Counter)  # streams opened after the first, per peer
    snapshots_sent: Counter[int] = field(default_factory=Counter)
    snapshots_failed: Counter[int] = field(default_factory=Counter)
    snapshots_received: Counter[int] = field(default_factory=Counter)
    _depth: Callable[[int], int] = _no_depth

    def queue_depth(self, peer: int) -> int:
        """Messages queued for `peer` and not yet written."""
        return self._depth(peer)


class _RateLimitedLog:
    """At most one line per key per interval; the next line says how many
    were suppressed (its field `suppressed`)."""

    def __init__(self, logger: logging.Logger, interval: float) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def log(
        self, level: int, key: str, msg: str, *args: object, extra: Mapping[str, object], exc_info: bool = False
    ) -> None:
        if not self._logger.isEnabledFor(level):
            return
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] += 1
            return
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            extra = {**extra, "suppressed": suppressed}
        self._logger.log(level, msg, *args, extra=extra, exc_info=exc_info)


class _StreamEnded(Exception):
    """An outbound stream ended; the message says why."""


class _PeerLink:
    """The outbound half towards one peer: its bounded queue and the task that streams it."""

    __slots__ = (
        "peer",
        "address",
        "prefix",
        "ping",
        "queue",
        "queued_bytes",
        "wakeup",
        "task",
        "channel",
        "channel_generation",
        "last_ack",
        "streams_opened",
        "unreachable_reported",
        "warned",
    )

    def __init__(self, peer: int, address: str, prefix: bytes) -> None:
        self.peer = peer
        self.address = address
        self.prefix = prefix  # frame_prefix(cluster, group, us, peer)
        self.ping = join_frame(prefix, ())
        self.queue: deque[bytes] = deque()  # encoded messages, in send order
        self.queued_bytes = 0
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.channel: grpc.aio.Channel | None = None
        self.channel_generation = 0     # of the credentials the channel was made with
        self.last_ack = 0.0
        self.streams_opened = 0
        # True from a failure until the next stream is established: one
        # on_unreachable and at most one warning per outage, not one per retry.
        self.unreachable_reported = False
        self.warned = False


def _ignore_unreachable(peer: int) -> None:
    pass


def _no_credentials() -> int:
    return 0


def _insecure_channel(address: str, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=list(options))


class _RefusedChunk(Exception):
    """A snapshot chunk that does not belong to its stream's header."""


class RaftTransport:
    """Carries Raft messages between the members of one group.

    Use, inside the worker's event loop::

        transport = RaftTransport(cluster="c", group=7, node_id=1, peers={2: "h2:7002", 3: "h3:7002"},
                                  deliver=on_messages, on_unreachable=node.report_unreachable)
        server = grpc.aio.server(options=SERVER_OPTIONS)
        transport.register(server)
        ... server.add_insecure_port(...); await server.start()
        await transport.start()
        transport.send(ready.messages)          # after the Ready is durable
        ...
        await transport.close(); await server.stop(grace)

    `deliver` gets each received batch (one frame, in order) in the event
    loop; messages from one peer arrive in the order that peer sent them.
    Nothing here blocks the event loop, and every task the transport starts
    is cancelled and awaited by `close()`.
    """

    def __init__(
        self,
        *,
        cluster: str,
        group: int,
        node_id: int,
        peers: Mapping[int, str],
        deliver: Callable[[list[Message]], None],
        on_unreachable: Callable[[int], None] = _ignore_unreachable,
        on_snapshot: Callable[[SnapshotHeader, AsyncIterator[bytes]], Awaitable[None]] | None = None,
        check_chunk: Callable[[SnapshotHeader, bytes], str | None] | None = None,
        connect: Callable[[str, Sequence[tuple[str, Any]]], grpc.aio.Channel] = _insecure_channel,
        credentials_generation: Callable[[], int] = _no_credentials,
        peer_names: Mapping[int, str] | None = None,
        removed: Iterable[int] = (),
        cluster_id: int = 0,
        group_incarnation: int = 0,
        incarnation: int = 0,
        max_queue_messages: int = 10_000,
        max_queue_bytes: int = 64 << 20,
        max_frame_bytes: int = 8 << 20,
        timing: TransportTiming = TransportTiming(),
        rng: random.Random | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        if node_id <= 0:
            raise ValueError(f"node_id must be positive, not {node_id}")
        if max_queue_messages <= 0 or max_queue_bytes <= 0:
            raise ValueError("max_queue_messages and max_queue_bytes must be positive")
        if max_frame_bytes < 1024:
            raise ValueError(f"max_frame_bytes of {max_frame_bytes} is too small for a frame")
        self.cluster = cluster
        self.group = group
        self.node_id = node_id
        # Who this node is (frame version 2): 0 is unknown, and unknown ids are not checked.
        self.cluster_id = cluster_id
        self.group_incarnation = group_incarnation
        self.incarnation = incarnation
        self._removed: frozenset[int] = frozenset(removed)
        self._max_known = node_id
        # Peer id -> frames to write back on the stream it opened to us (see the module docstring).
        self._replies: dict[int, deque[bytes]] = {}
        self._deliver = deliver
        self._on_unreachable = on_unreachable
        self._on_snapshot = on_snapshot
        # Why a chunk does not belong to its header's snapshot, or None.
        self._check_chunk = check_chunk
        # Opens a channel to a peer (TLS when the cluster says so).
        self._connect = connect
        # The generation of the certificate files `connect` reads (shardnode.channel_cache): a
        # link whose stream broke reconnects on a new channel once they changed, since a channel
        # would reconnect with the credentials it was made with.
        self._credentials_generation = credentials_generation
        # With TLS: node id -> the certificate name (host) its frames must come with.
        self._peer_names = peer_names
        self._max_queue_messages = max_queue_messages
        self._max_queue_bytes = max_queue_bytes
        self._max_frame_bytes = max_frame_bytes
        self._timing = timing
        self._rng = rng if rng is not None else random.Random()
        self._logger = logger if logger is not None else logging.getLogger("shardnode.transport")
        self._limited = _RateLimitedLog(self._logger, timing.log_interval)
        self._links: dict[int, _PeerLink] = {}
        self._background: set[asyncio.Task[None]] = set()  # retiring links
        self._snapshot_calls: set[grpc.aio.Call] = set()
        self._started = False
        self._started_at = time.monotonic()
        self._closing = False
        self._closed: asyncio.Event | None = None
        self.stats = TransportStats(_depth=self._queue_depth)
        self._set_links(peers)

    # ------------------------------------------------------------ lifecycle

    def register(self, server: grpc.aio.Server) -> None:
        """Add the transport's handlers to the worker's server (before `server.start()`).

        Create the server with `SERVER_OPTIONS` (or a larger receive limit)
        so that frames up to `max_frame_bytes` are accepted.
        """
        handler = grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Messages": grpc.stream_stream_rpc_method_handler(self._serve_messages),
                "Snapshot": grpc.stream_unary_rpc_method_handler(self._serve_snapshot),
            },
        )
        server.add_generic_rpc_handlers((handler,))

    async def start(self) -> None:
        """Start one sender task per peer. Messages sent before this wait in the queues."""
        if self._closing:
            raise RuntimeError("transport is closed")
        self._started = True
        self._started_at = time.monotonic()
        for link in self._links.values():
            self._start_link(link)

    async def close(self) -> None:
        """Stop every sender and snapshot transfer, close the channels. Idempotent.

        Inbound streams end when the server stops; frames that arrive on them
        after this are refused (reason `closed`).
        """
        if self._closed is not None:
            await self._closed.wait()
            return
        self._closed = asyncio.Event()
        self._closing = True
        try:
            for call in list(self._snapshot_calls):
                call.cancel()
            links = list(self._links.values())
            self._links.clear()
            tasks = [link.task for link in links if link.task is not None] + list(self._background)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(
                *(link.channel.close() for link in links if link.channel is not None), return_exceptions=True
            )
            for link in links:
                self._drop_queue(link, "closed")
        finally:
            self._closed.set()

    def update_peers(self, peers: Mapping[int, str], removed: Iterable[int] | None = None) -> None:
        """Membership changed: start senders for new peers, retire those of
        removed ones (after sending what is queued for them).

        `removed`: the ids the group removed; their frames are still handed
        over (the core answers each with a NOTICE), any other id that is no
        peer and not above every known id is a stranger. A peer whose address
        changed gets a new link (its queue is dropped).
        """
        if self._closing:
            return
        if removed is not None:
            self._removed = frozenset(removed)
        self._set_links(peers)

    def set_identity(self, cluster_id: int, group_incarnation: int) -> None:
        """This node learned its cluster's id or its group's incarnation (the
        metadata group's replicas learn them after they start): frames carry
        them from now on, and frames that name others are refused."""
        if (cluster_id, group_incarnation) == (self.cluster_id, self.group_incarnation):
            return
        self.cluster_id, self.group_incarnation = cluster_id, group_incarnation
        for link in self._links.values():
            link.prefix = self._prefix(link.peer)
            link.ping = join_frame(link.prefix, ())

    def _prefix(self, peer: int) -> bytes:
        return frame_prefix(self.cluster, self.group, self.node_id, peer, cluster_id=self.cluster_id,
                            group_incarnation=self.group_incarnation, incarnation=self.incarnation)

    # ------------------------------------------------------------ sending

    def send(self, messages: Iterable[Message]) -> None:
        """Queue messages for their destinations (`m.to`); never blocks.

        Dropped and counted (Raft retransmits what matters): messages to a
        node that is not a peer, local message types, messages not from
        this node (except a forwarded TRANSFER_LEADER, whose `from_` is the
        transferee), messages larger than a frame, and any message that
        finds its peer's queue full (the new message is the one dropped).
        """
        links = self._links
        max_messages = self._max_queue_messages
        budget = self._max_frame_bytes - JOIN_OVERHEAD
        for message in messages:
            link = links.get(message.to)
            if link is None or self._closing:
                if not self._closing and self._reply(message):
                    continue
                self._drop(message.to, "closed" if self._closing else "unknown_peer", message)
                continue
            if message.type in LOCAL_MESSAGES or (
                message.from_ != self.node_id and message.type is not MessageType.TRANSFER_LEADER
            ):
                self._drop(message.to, "invalid", message)
                continue
            if len(link.queue) >= max_messages:
                self._drop(message.to, "queue_full", message)
                continue
            try:
                encoded = encode_message(message)
            except (TypeError, ValueError, OverflowError):
                self._drop(message.to, "invalid", message)
                continue
            size = len(encoded)
            if size > budget - len(link.prefix):
                self._drop(message.to, "too_large", message)
                continue
            if link.queued_bytes + size > self._max_queue_bytes:
                self._drop(message.to, "queue_full", message)
                continue
            link.queue.append(encoded)
            link.queued_bytes += size
            link.wakeup.set()

    def _reply(self, message: Message) -> bool:
        """Queue `message` on the stream its recipient opened to us (we have no
        link to it); False if there is none."""
        replies = self._replies.get(message.to)
        if replies is None or message.from_ != self.node_id or message.type in LOCAL_MESSAGES:
            return False
        try:
            frame = join_frame(self._prefix(message.to), [encode_message(message)])
        except (TypeError, ValueError, OverflowError):
            return False
        if len(frame) > self._max_frame_bytes:
            return False
        if len(replies) >= MAX_REPLY_FRAMES:
            replies.popleft()
            self._drop(message.to, "queue_full")
        replies.append(frame)
        self.stats.replied_messages[message.to] += 1
        return True

    async def send_snapshot(
        self,
        to: int,
        message: Message,
        chunks: AsyncIterator[bytes] | Iterator[bytes] | Iterable[bytes],
        *,
        timeout: float | None = None,
    ) -> bool:
        """Stream a snapshot to `to`: a header frame holding the SNAP `message`, then `chunks`.

        Runs on its own RPC and connection, so heartbeats keep flowing on
        the message stream during a long transfer. Returns True when the
        receiver's `on_snapshot` accepted it, False on any transport
        failure, a refusal, a timeout or `close()`; the caller reports the
        outcome to Raft (`report_snapshot`). Exceptions raised by `chunks`
        itself propagate (after the RPC is cancelled).
        """
        if message.type is not MessageType.SNAP or message.snapshot is None:
            raise ValueError("send_snapshot needs a SNAP message with a snapshot")
        if message.to != to or message.from_ != self.node_id:
            raise ValueError(
                f"SNAP message from {message.from_} to {message.to} cannot be sent by {self.node_id} to {to}"
            )
        link = self._links.get(to)
        if link is None or self._closing:
            self.stats.snapshots_failed[to] += 1
            return False
        extra = self._extra(to)
        header = join_frame(link.prefix, [encode_message(message)])
        if len(header) > self._max_frame_bytes:
            raise ValueError(f"SNAP message of {len(header)} bytes exceeds max_frame_bytes; stream the data as chunks")
        channel = self._connect(link.address, CHANNEL_OPTIONS)
        call = channel.stream_unary(SNAPSHOT_METHOD)(timeout=timeout)
        self._snapshot_calls.add(call)
        ok = False
        try:
            await call.write(header)
            if hasattr(chunks, "__aiter__"):
                async for chunk in chunks:  # type: ignore[union-attr]
                    await call.write(chunk)
            else:
                for chunk in chunks:  # type: ignore[union-attr]
                    await call.write(chunk)
            await call.done_writing()
            await call
            ok = True
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            reason = "cancelled (transport closed)"  # our call.cancel() in close()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            reason = _describe(exc)
        finally:
            self._snapshot_calls.discard(call)
            call.cancel()
            await channel.close()
        if ok:
            self.stats.snapshots_sent[to] += 1
            self._logger.info("transport.snapshot_sent", extra={**extra, "index": message.snapshot.metadata.index})
        else:
            self.stats.snapshots_failed[to] += 1
            self._logger.warning("transport.snapshot_failed", extra={**extra, "reason": reason})
        return ok

    # ------------------------------------------------------------ links

    def _set_links(self, peers: Mapping[int, str]) -> None:
        wanted = dict(peers)
        for peer in wanted:
            if peer <= 0 or peer == self.node_id:
                raise ValueError(f"invalid peer id {peer} (must be positive and not this node, {self.node_id})")
        for peer, link in list(self._links.items()):
            if wanted.get(peer) != link.address:
                self._retire_link(link)
        for peer, address in wanted.items():
            if peer not in self._links:
                link = _PeerLink(peer, address, self._prefix(peer))
                self._links[peer] = link
                if self._started:
                    self._start_link(link)
        self._max_known = max((self.node_id, *self._links, *self._removed))

    def _start_link(self, link: _PeerLink) -> None:
        if link.task is None:
            link.task = asyncio.get_running_loop().create_task(
                self._run_link(link), name=f"raft-transport g{self.group} {self.node_id}->{link.peer}"
            )

    def _retire_link(self, link: _PeerLink) -> None:
        del self._links[link.peer]
        if link.task is None:
            self._drop_queue(link, "peer_removed")
            return

        async def retire() -> None:
            # What is queued still goes (the commit of the peer's own removal
            # may be in it), then the link stops.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + RETIRE_DRAIN_SECONDS
            try:
                while link.queue and loop.time() < deadline and not link.task.done():  # type: ignore[union-attr]
                    await asyncio.sleep(0.01)
            finally:
                link.task.cancel()  # type: ignore[union-attr]
                await asyncio.gather(link.task, return_exceptions=True)  # type: ignore[arg-type]
                self._drop_queue(link, "peer_removed")
                if link.channel is not None:
                    await link.channel.close()

        task = asyncio.get_running_loop().create_task(retire(), name=f"raft-transport retire {link.peer}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _queue_depth(self, peer: int) -> int:
        link = self._links.get(peer)
        return 0 if link is None else len(link.queue)

    def _drop(self, peer: int, reason: str, message: Message | None = None, count: int = 1) -> None:
        self.stats.dropped_messages[peer] += count
        self.stats.dropped_by_reason[reason] += count
        if reason in ("invalid", "too_large", "unknown_peer"):  # a driver bug or a race with membership
            self._limited.log(
                logging.WARNING,
                f"drop {reason}",
                "transport.message_dropped",
                extra={**self._extra(peer), "reason": reason,
                       "what": "-" if message is None else f"{message.type.name}:{message.from_}->{message.to}"},
            )

    def _drop_queue(self, link: _PeerLink, reason: str) -> None:
        if link.queue:
            self._drop(link.peer, reason, count=len(link.queue))
            link.queue.clear()
            link.queued_bytes = 0

    def _extra(self, peer: object) -> dict[str, object]:
        return {"group": self.group, "node": self.node_id, "peer": peer}

    async def _run_link(self, link: _PeerLink) -> None:
        """Keep one stream to the peer open; reconnect with backoff and jitter."""
        timing = self._timing
        loop = asyncio.get_running_loop()
        backoff = timing.backoff_min
        while True:
            generation = self._credentials_generation()
            if link.channel is not None and link.channel_generation != generation:
                await link.channel.close()
                link.channel = None
            if link.channel is None:
                link.channel = self._connect(link.address, CHANNEL_OPTIONS)
                link.channel_generation = generation
            started = loop.time()
            try:
                await self._stream(link)
                reason = "stream ended"
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                reason = "call cancelled"  # by gRPC, not by us: treat as a failure
            except _StreamEnded as exc:
                reason = str(exc)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError) as exc:
                reason = _describe(exc)
            except Exception as exc:  # a bug here must not kill the link for good
                reason = f"unexpected {exc!r}"
                self._limited.log(
                    logging.ERROR, f"bug {link.peer}", "transport.link_error", extra=self._extra(link.peer),
                    exc_info=True,
                )
            self._link_failed(link, reason)
            if loop.time() - started >= timing.backoff_max:
                backoff = timing.backoff_min  # the stream was healthy for a while: retry quickly
            delay = backoff * (0.5 + 0.5 * self._rng.random())
            backoff = min(backoff * 2, timing.backoff_max)
            await asyncio.sleep(delay)

    def _link_failed(self, link: _PeerLink, reason: str) -> None:
        extra = {**self._extra(link.peer), "address": link.address, "reason": reason}
        if not link.unreachable_reported:
            link.unreachable_reported = True
            try:
                self._on_unreachable(link.peer)
            except Exception:
                self._logger.exception("transport.on_unreachable_failed", extra=extra)
        if link.warned:
            self._logger.debug("transport.peer_still_unreachable", extra=extra)
            return
        if link.streams_opened == 0 and time.monotonic() - self._started_at < self._timing.startup_grace:
            # Not up yet, most likely: the members of a group start one after another.
            self._logger.debug("transport.peer_not_up_yet", extra=extra)
            return
        link.warned = True
        self._logger.warning("transport.peer_unreachable", extra=extra)

    def _link_established(self, link: _PeerLink) -> None:
        if link.streams_opened:
            self.stats.reconnects[link.peer] += 1
        link.streams_opened += 1
        link.unreachable_reported = False
        if link.warned:
            link.warned = False
            self._logger.info("transport.peer_reachable", extra={**self._extra(link.peer), "address": link.address})

    async def _stream(self, link: _PeerLink) -> None:
        """One stream's life: handshake (a ping answered), then write frames until it breaks."""
        timing = self._timing
        loop = asyncio.get_running_loop()
        assert link.channel is not None
        call = link.channel.stream_stream(MESSAGES_METHOD)()
        reader: asyncio.Task[str] | None = None
        taken = 0  # messages of a frame being written, lost if the write fails
        try:
            async with asyncio.timeout(timing.connect_timeout):
                await call.write(link.ping)
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise _StreamEnded("closed by the peer during the handshake")
                self._on_response(link, response)
            self._link_established(link)
            link.last_ack = loop.time()
            reader = loop.create_task(self._read_acks(link, call), name=f"raft-transport acks {link.peer}")
            reader.add_done_callback(lambda _: link.wakeup.set())
            next_ping = loop.time() + timing.ping_interval
            while True:
                if not link.queue:
                    link.wakeup.clear()
                    delay = next_ping - loop.time()
                    if delay > 0:
                        try:
                            async with asyncio.timeout(delay):
                                await link.wakeup.wait()
                        except TimeoutError:
                            pass
                if reader.done():
                    raise _StreamEnded(_outcome(reader))
                now = loop.time()
                if now - link.last_ack > timing.link_timeout:
                    raise _StreamEnded(f"no answer to pings for {now - link.last_ack:.1f}s")
                if now >= next_ping:
                    frame, taken = link.ping, 0
                    next_ping = now + timing.ping_interval
                elif link.queue:
                    frame, taken = self._take_frame(link)
                else:
                    continue
                async with asyncio.timeout(timing.link_timeout):
                    await call.write(frame)
                if taken:
                    self.stats.sent_frames[link.peer] += 1
                    self.stats.sent_messages[link.peer] += taken
                    taken = 0
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            # A failed write hides the peer's status (gRPC reports INTERNAL);
            # the reader usually has the real one a moment later.
            if reader is not None:
                await asyncio.wait((reader,), timeout=0.2)
                if reader.done() and not reader.cancelled() and reader.exception() is not None:
                    raise _StreamEnded(_describe(reader.exception())) from None
            raise _StreamEnded(_describe(exc)) from None
        finally:
            if taken:
                self._drop(link.peer, "stream_broken", count=taken)
            call.cancel()
            if reader is not None:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)

    async def _read_acks(self, link: _PeerLink, call: grpc.aio.StreamStreamCall) -> str:
        loop = asyncio.get_running_loop()
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                return "closed by the peer"
            link.last_ack = loop.time()
            self._on_response(link, response)

    def _on_response(self, link: _PeerLink, response: bytes) -> None:
        """An answer on our stream to `link.peer`: a ping's ack, or frames the
        peer sent back this way (it has no link to us: we are not, or no
        longer, a member in its configuration). Checked as any frame, and
        from that peer only."""
        if response == _PING:
            return
        checked = self._check(response, link.address, None, reply_from=link.peer)
        if isinstance(checked, Frame) and checked.messages:
            self.stats.received_frames[checked.from_node] += 1
            self.stats.received_messages[checked.from_node] += len(checked.messages)
            try:
                self._deliver(list(checked.messages))
            except Exception:
                self._limited.log(logging.ERROR, "deliver", "transport.deliver_failed",
                                  extra=self._extra(checked.from_node), exc_info=True)

    def _take_frame(self, link: _PeerLink) -> tuple[bytes, int]:
        """Everything queued for the peer, up to max_frame_bytes, as one frame."""
        queue = link.queue
        budget = self._max_frame_bytes - len(link.prefix) - JOIN_OVERHEAD
        batch: list[bytes] = []
        size = 0
        # Every queued message fits a frame alone (checked in send), so a frame is never empty.
        while queue and size + len(queue[0]) <= budget:
            encoded = queue.popleft()
            batch.append(encoded)
            size += len(encoded)
        link.queued_bytes -= size
        return join_frame(link.prefix, batch), len(batch)

    # ------------------------------------------------------------ receiving

    def _check(self, data: bytes, peer_address: str, peer_name: str | None = None,
               reply_from: int | None = None) -> Frame | tuple[str, str]:
        """The frame if it may be delivered, else (reason, details); counts and logs a refusal.
        `peer_name` is the CN of the caller's certificate (TLS only); `reply_from`: the frame
        came back on our own stream to that peer (it must be from it; the channel checked
        its certificate)."""
        if self._closing:
            reason, details = "closed", "transport closed"
        else:
            try:
                # The header is checked before the body is decoded (codec.decode_frame):
                # whoever is refused here costs a few dozen bytes of decoding.
                frame = decode_frame(data, max_bytes=self._max_frame_bytes,
                                     admit=lambda header: self._admit(header, peer_name, reply_from))
            except FrameError as exc:
                reason, details = exc.reason, str(exc)
            else:
                sender = frame.from_node
                if any(m.from_ != sender and m.from_ != self.node_id and m.from_ not in self._links
                       for m in frame.messages):
                    # Only a forwarded TRANSFER_LEADER may name another sender (codec), and only a member.
                    reason, details = "unknown_node", f"a message names a node that is not in group {self.group}"
                else:
                    return frame
        self._reject(reason, details, peer_address)
        return reason, details

    def _admit(self, frame: Frame, peer_name: str | None, reply_from: int | None) -> None:
        """Raise FrameError (with its reason) if a frame with this header may
        not be delivered: another cluster, group or recipient, a stranger, a
        sender that is not a member, or (TLS) not with its host's certificate."""
        sender = frame.from_node
        if frame.cluster != self.cluster:
            raise FrameError(f"cluster {frame.cluster!r}, this is {self.cluster!r}", "wrong_cluster")
        if frame.group != self.group:
            raise FrameError(f"group {frame.group}, this is group {self.group}", "wrong_group")
        if frame.cluster_id and self.cluster_id and frame.cluster_id != self.cluster_id:
            raise FrameError(f"a stranger: cluster id {frame.cluster_id:x}, this cluster's is {self.cluster_id:x}",
                             "wrong_cluster_id")
        if frame.group_incarnation and self.group_incarnation and frame.group_incarnation != self.group_incarnation:
            raise FrameError(f"a stranger: group {self.group} incarnation {frame.group_incarnation:x}, this group's "
                             f"is {self.group_incarnation:x} (another life of the group)", "wrong_group_incarnation")
        if frame.to_node != self.node_id:
            raise FrameError(f"frame for node {frame.to_node}, this is node {self.node_id}", "wrong_recipient")
        if reply_from is not None and sender != reply_from:
            raise FrameError(f"node {sender} answered on the stream to node {reply_from}", "wrong_identity")
        if not self._may_send(sender):
            raise FrameError(f"node {sender} is not a member of group {self.group}", "unknown_sender")
        if (reply_from is None and self._peer_names is not None and sender in self._links
                and self._peer_names.get(sender) != peer_name):
            # A member's frames come with its host's certificate; a removed id
            # or one not applied yet has none known here (the gatekeeper took
            # a host of the cluster only).
            raise FrameError(f"frames from node {sender} need the certificate of "
                             f"{self._peer_names.get(sender)!r}, not {peer_name!r}", "wrong_identity")

    def _may_send(self, sender: int) -> bool:
        """A member, a removed one (the core tells it so), or an id above every
        id we know (a member added by a change not applied here yet)."""
        return sender in self._links or sender in self._removed or sender > self._max_known

    def _reject(self, reason: str, details: str, peer_address: str) -> None:
        self.stats.rejected_frames[reason] += 1
        self._limited.log(
            logging.WARNING,
            f"reject {reason}",
            "transport.frame_rejected",
            extra={**self._extra(peer_address), "reason": reason, "details": details},
        )

    async def _serve_messages(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        peer_address = context.peer()
        peer_name = peer_common_name(context) if self._peer_names is not None else None
        sender: int | None = None
        replies: deque[bytes] = deque()
        try:
            async for data in requests:
                checked = self._check(data, peer_address, peer_name)
                if not isinstance(checked, Frame):
                    await _abort(context, checked)
                if sender is None:
                    # Messages for this peer that have no link go back on this stream.
                    sender = checked.from_node
                    self._replies[sender] = replies
                if sender in self._removed:
                    # Never applied (the core drops it and answers with a notice), but seen.
                    self._limited.log(logging.INFO, f"removed {sender}", "transport.removed_member_heard",
                                      extra=self._extra(sender))
                if checked.messages:
                    self.stats.received_frames[checked.from_node] += 1
                    self.stats.received_messages[checked.from_node] += len(checked.messages)
                    try:
                        self._deliver(list(checked.messages))
                    except Exception:
                        # The driver's problem, not the peer's: keep the stream.
                        self._limited.log(
                            logging.ERROR,
                            "deliver",
                            "transport.deliver_failed",
                            extra=self._extra(checked.from_node),
                            exc_info=True,
                        )
                while replies:
                    await context.write(replies.popleft())
                if not checked.messages:
                    await context.write(_PING)
        finally:
            if sender is not None and self._replies.get(sender) is replies:
                del self._replies[sender]

    async def _serve_snapshot(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        peer_address = context.peer()
        on_snapshot = self._on_snapshot
        if on_snapshot is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node does not accept snapshots")
        iterator = requests.__aiter__()
        try:
            first = await iterator.__anext__()
        except StopAsyncIteration:
            first = b""
        peer_name = peer_common_name(context) if self._peer_names is not None else None
        checked = self._check(first, peer_address, peer_name)
        if not isinstance(checked, Frame):
            await _abort(context, checked)
        assert isinstance(checked, Frame)
        if len(checked.messages) != 1 or checked.messages[0].type is not MessageType.SNAP:
            details = f"a snapshot header holds one SNAP message, not {[m.type.name for m in checked.messages]}"
            self._reject("bad_snapshot_header", details, peer_address)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad_snapshot_header: {details}")
        header = SnapshotHeader(checked.cluster, checked.group, checked.from_node, checked.to_node, checked.messages[0])
        extra = self._extra(header.from_node)

        check_chunk = self._check_chunk
        max_chunk = self._max_frame_bytes

        async def chunks() -> AsyncIterator[bytes]:
            # Checked before the receiver sees it: a chunk that is not of
            # this header's snapshot never reaches storage.
            async for chunk in iterator:
                if type(chunk) is not bytes or len(chunk) > max_chunk:
                    raise _RefusedChunk(f"a chunk of {len(chunk)} bytes exceeds max_frame_bytes ({max_chunk})")
                if check_chunk is not None:
                    problem = check_chunk(header, chunk)
                    if problem is not None:
                        raise _RefusedChunk(problem)
                yield chunk

        stream = chunks()
        try:
            await on_snapshot(header, stream)  # type: ignore[misc]
        except asyncio.CancelledError:
            raise
        except _RefusedChunk as exc:
            self._reject("snapshot_mismatch", str(exc), peer_address)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"snapshot_mismatch: {exc}")
        except LimitExceeded as exc:
            # Past limits.max_snapshot_bytes or max_snapshot_seconds: what was staged stays unused.
            self._logger.warning("transport.snapshot_refused", extra={**extra, "error": str(exc)})
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"snapshot refused: {exc}")
        except Exception as exc:
            self._logger.warning("transport.snapshot_refused", extra={**extra, "error": repr(exc)})
            await context.abort(grpc.StatusCode.ABORTED, f"snapshot refused: {exc!r}")
        finally:
            await stream.aclose()
        # Read what on_snapshot left, so that the sender's writes complete and it sees OK.
        async for _ in iterator:
            pass
        self.stats.snapshots_received[header.from_node] += 1
        return b""


async def _abort(context: grpc.aio.ServicerContext, refusal: tuple[str, str]) -> NoReturn:
    """End an inbound stream whose frame was refused; the details start with the reason."""
    reason, details = refusal
    code = grpc.StatusCode.UNAVAILABLE if reason == "closed" else grpc.StatusCode.INVALID_ARGUMENT
    await context.abort(code, f"{reason}: {details}")
    raise AssertionError("not reached: abort raises")


def _outcome(reader: asyncio.Task[str]) -> str:
    if reader.cancelled():
        return "ack reader cancelled"
    exc = reader.exception()
    return reader.result() if exc is None else _describe(exc)


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return repr(exc)
