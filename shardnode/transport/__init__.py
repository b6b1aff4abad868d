"""The peer transport: Raft messages between the members of one group.

`codec` turns batches of Raft messages into msgpack frames and back (and is
the validation boundary for everything a peer sends); `peer` carries them
over gRPC streams, one per peer, plus a separate RPC for snapshots.
"""

from .codec import (
    FRAME_VERSION,
    Frame,
    FrameError,
    decode_frame,
    encode_frame,
    encode_message,
    frame_prefix,
    join_frame,
)
from .peer import (
    CHANNEL_OPTIONS,
    MESSAGES_METHOD,
    SERVER_OPTIONS,
    SERVICE_NAME,
    SNAPSHOT_METHOD,
    RaftTransport,
    SnapshotHeader,
    TransportStats,
    TransportTiming,
)

__all__ = [
    "CHANNEL_OPTIONS",
    "FRAME_VERSION",
    "MESSAGES_METHOD",
    "SERVER_OPTIONS",
    "SERVICE_NAME",
    "SNAPSHOT_METHOD",
    "Frame",
    "FrameError",
    "RaftTransport",
    "SnapshotHeader",
    "TransportStats",
    "TransportTiming",
    "decode_frame",
    "encode_frame",
    "encode_message",
    "frame_prefix",
    "join_frame",
]
