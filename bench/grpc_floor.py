"""The floor under every shardnode process: what one gRPC call (and one
message on a stream) costs in Python's grpc.aio on this machine, with a
server that does nothing.

    .venv/bin/python bench/grpc_floor.py [--seconds 3] [--callers 64]

A trivial server (Worker.Status answering an empty message; uvloop, as
shardnode's processes run) in a child process; this process drives it:

- `unary`: `callers` tasks, each one unary call at a time (what a router
  pays for every operation of the one-RPC-per-operation load);
- `stream`: one bidirectional stream, one small message written at a time
  and answered by the server (what the peer transport pays per frame).

It prints calls (or messages) per second and the server's CPU (utime +
stime from /proc) per call. The router API of shardnode cannot cost less
per operation than the `unary` row's server CPU; etcd's whole cluster
spends 0.18-0.25 ms of CPU per operation on the same machine
(docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.versus_etcd import cpu_seconds  # noqa: E402
from shardnode.proto import worker_pb2 as pb  # noqa: E402
from shardnode.proto import worker_pb2_grpc as pb_grpc  # noqa: E402

STREAM_METHOD = "/bench.Floor/Echo"


class Idle(pb_grpc.WorkerServicer):
    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        return pb.StatusResponse()


async def echo(requests, context):  # type: ignore[no-untyped-def]
    async for message in requests:
        yield message


async def serve(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_WorkerServicer_to_server(Idle(), server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Floor", {
        "Echo": grpc.stream_stream_rpc_method_handler(echo)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def unary(port: int, callers: int, seconds: float) -> int:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_retries", 0)])
    stub = pb_grpc.WorkerStub(channel)
    await stub.Status(pb.StatusRequest(), timeout=10)
    count, stop = 0, False

    async def caller() -> None:
        nonlocal count
        while not stop:
            await stub.Status(pb.StatusRequest())
            count += 1

    tasks = [asyncio.create_task(caller()) for _ in range(callers)]
    await asyncio.sleep(seconds)
    stop = True
    await asyncio.gather(*tasks)
    await channel.close()
    return count


async def stream(port: int, seconds: float) -> int:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_retries", 0)])
    call = channel.stream_stream(STREAM_METHOD)()
    message = b"x" * 64
    count = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await call.write(message)
        await call.read()
        count += 1
    call.cancel()
    await channel.close()
    return count


def measure(kind: str, port: int, args: argparse.Namespace) -> str:
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
    try:
        time.sleep(1.5)
        before = cpu_seconds(server.pid)
        began = time.monotonic()
        count = asyncio.run(unary(port, args.callers, args.seconds) if kind == "unary" else stream(port, args.seconds))
        elapsed = time.monotonic() - began
        used = cpu_seconds(server.pid) - before
    finally:
        server.kill()
        server.wait()
    unit = "calls" if kind == "unary" else "messages"
    return (f"{kind}: {count / elapsed:,.0f} {unit}/s, server CPU {1e6 * used / max(count, 1):.0f} µs per "
            f"{unit[:-1]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--port", type=int, default=47311)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        import uvloop
        uvloop.install()
        asyncio.run(serve(args.serve))
        return 0
    print(measure("unary", args.port, args))
    print(measure("stream", args.port + 1, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
