"""A client's BatchStream messages stay within every router's [limits]
(client/pipe.py): at most 1000 operations and 1 MiB of keys and values each,
or one operation alone when it is larger. An outbox of many callers'
operations used to leave in one message, however large: past a router's
max_batch_operations the whole stream would be refused."""

from __future__ import annotations

from shardnode.client.pipe import MESSAGE_BYTES, MESSAGE_OPERATIONS, _take_message
from shardnode.config import CLIENT_MESSAGE_OPERATIONS, LimitsConfig
from shardnode.proto import kv_pb2

Op = kv_pb2.BatchOperation


def _split(outbox: list) -> list[int]:
    sizes = []
    while outbox:
        sizes.append(len(_take_message(outbox)))
    return sizes


def test_many_small_operations_leave_in_messages_of_at_most_1000() -> None:
    assert MESSAGE_OPERATIONS == CLIENT_MESSAGE_OPERATIONS <= LimitsConfig().max_batch_operations
    assert _split([Op(kind=Op.GET, key=b"k%d" % i) for i in range(2500)]) == [1000, 1000, 500]


def test_large_values_leave_in_messages_of_about_1_mib() -> None:
    outbox = [Op(kind=Op.PUT, key=b"k%d" % i, value=b"v" * (300 << 10)) for i in range(7)]
    assert _split(outbox) == [3, 3, 1]
    # One operation larger than a message still leaves, alone.
    assert _split([Op(kind=Op.PUT, key=b"big", value=b"v" * (MESSAGE_BYTES + 1)), Op(kind=Op.GET, key=b"k")]) == [1, 1]
