"""ShardDirectory against fake metadata-group workers on loopback: finding
the leader, retries, compare-and-set semantics, the first write of the map."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import pytest

from shardnode.config import METADATA_GROUP, ClusterConfig
from shardnode.proto import worker_pb2 as wpb
from shardnode.proto import worker_pb2_grpc as wpb_grpc
from shardnode.placement.shard_map import ShardMapConflict
from shardnode.placement import MapConflict, MetadataUnavailable, ShardDirectory, initial_map
from shardnode.placement.directory import SHARD_MAP_KEY, GuardFailed

Op = wpb.Operation
Status = wpb.ExecuteResponse
MAX_GROUPS = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeMetaWorker(wpb_grpc.WorkerServicer):
    """One replica of the metadata group: the leader applies GET/CAS to the
    shared `store` (exactly once per session sequence); the others answer
    NOT_LEADER with the leader's address, or UNAVAILABLE when `down`."""

    def __init__(self, cluster: "FakeCluster", address: str) -> None:
        self.cluster = cluster
        self.address = address
        self.calls = 0
        self.down = False
        self.lose_answers = 0      # apply, then lose the answer (the connection breaks)

    async def Execute(self, request: wpb.ExecuteRequest, context) -> wpb.ExecuteResponse:
        self.calls += 1
        assert request.cluster == "meta-test" and request.group == METADATA_GROUP
        if self.down:
            return Status(status=Status.UNAVAILABLE, message="electing")
        if self.cluster.leader != self.address:
            return Status(status=Status.NOT_LEADER, leader_address=self.cluster.leader or "")
        results = []
        for op in request.operations:
            store = self.cluster.store
            before = store.get(op.key)
            if op.kind == Op.GET:
                results.append(wpb.OperationResult(existed=before is not None, value=before or b""))
                continue
            assert op.kind == Op.CAS and op.client_id and op.sequence
            seen = self.cluster.sessions.get(op.client_id)
            if seen is not None and seen[0] == op.sequence:
                results.append(seen[1])
                continue
            matches = before is None if op.expected_absent else before == op.expected
            matches = matches and all(store.get(g.key) == (None if g.absent else g.value) for g in op.guards)
            if matches:
                store[op.key] = op.value
            result = wpb.OperationResult(existed=before is not None, value=before or b"", swapped=matches)
            self.cluster.sessions[op.client_id] = (op.sequence, result)
            results.append(result)
        if self.lose_answers:
            self.lose_answers -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        return Status(status=Status.OK, results=results)


class FakeCluster:
    def __init__(self) -> None:
        self.store: dict[bytes, bytes] = {}
        self.sessions: dict[int, tuple[int, wpb.OperationResult]] = {}
        # Every port distinct, the data workers' (below each metadata port) included: the
        # kernel may hand out neighbours, and the configuration refuses a shared port.
        taken: set[int] = set()

        def port(below: int = 0) -> int:
            while True:
                candidate = _free_port()
                wanted = set(range(candidate - below, candidate + 1))
                if candidate - below > 1024 and not wanted & taken:
                    taken.update(wanted)
                    return candidate

        self.ports = [port(below=MAX_GROUPS) for _ in range(3)]
        self.config = ClusterConfig.from_dict({
            "cluster": {"name": "meta-test", "replicas": 3, "groups": 2, "max_groups": MAX_GROUPS,
                        "virtual_nodes": 8},
            "host": [{"name": f"h{i + 1}", "address": "127.0.0.1", "router_port": port(),
                      "worker_port_base": meta_port - MAX_GROUPS, "metrics_port": port(),
                      "supervisor_port": port()} for i, meta_port in enumerate(self.ports)],
        })
        self.addresses = [r.address for r in self.config.meta_group_replicas()]
        assert self.addresses == [f"127.0.0.1:{p}" for p in self.ports]
        self.leader: str | None = self.addresses[1]
        self.workers = [FakeMetaWorker(self, a) for a in self.addresses]
        self.servers: list[grpc.aio.Server] = []

    async def start(self) -> None:
        for worker in self.workers:
            server = grpc.aio.server()
            wpb_grpc.add_WorkerServicer_to_server(worker, server)
            server.add_insecure_port(worker.address)
            await server.start()
            self.servers.append(server)

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop(None) for s in self.servers))


async def _with_cluster(body) -> None:  # type: ignore[no-untyped-def]
    cluster = FakeCluster()
    await cluster.start()
    directory = ShardDirectory(cluster.config, "h1", timeout=3.0)
    try:
        await body(cluster, directory)
    finally:
        await directory.close()
        await cluster.stop()


def test_reads_and_compare_and_set_find_the_leader_and_keep_it() -> None:
    async def body(cluster: FakeCluster, directory: ShardDirectory) -> None:
        assert await directory.read(b"k") is None
        # h1 answered NOT_LEADER with h2's address: followed at once, then cached.
        assert [w.calls for w in cluster.workers] == [1, 1, 0]
        assert await directory.compare_and_set(b"k", None, b"v1") == (True, b"v1")
        assert await directory.compare_and_set(b"k", None, b"v2") == (False, b"v1")
        assert await directory.compare_and_set(b"k", b"v0", b"v2") == (False, b"v1")
        assert await directory.compare_and_set(b"k", b"v1", b"v2") == (True, b"v2")
        assert await directory.read(b"k") == b"v2"
        assert [w.calls for w in cluster.workers] == [1, 6, 0]
        # A new leader: the old one's hint leads there.
        cluster.leader = cluster.addresses[2]
        assert await directory.read(b"k") == b"v2"
        assert cluster.workers[2].calls == 1

    asyncio.run(_with_cluster(body))


def test_unavailable_replicas_are_retried_until_the_deadline() -> None:
    async def body(cluster: FakeCluster, directory: ShardDirectory) -> None:
        for worker in cluster.workers:
            worker.down = True
        began = time.monotonic()
        # The message names the last failure (UNAVAILABLE electing; on a loaded machine maybe a slow attempt).
        with pytest.raises(MetadataUnavailable, match="did not answer in time: 127.0.0.1:") as info:
            await directory.read(b"k", timeout=1.0)
        assert 1.0 <= time.monotonic() - began < 5.0 and "\n" not in str(info.value)
        assert all(w.calls >= 1 for w in cluster.workers)

        async def elected() -> None:
            await asyncio.sleep(0.3)
            for worker in cluster.workers:
                worker.down = False

        task = asyncio.create_task(elected())
        assert await directory.compare_and_set(b"k", None, b"v") == (True, b"v")
        await task
        await cluster.servers[1].stop(None)          # the leader's process dies
        cluster.leader = cluster.addresses[0]
        assert await directory.read(b"k") == b"v"

    asyncio.run(_with_cluster(body))


def test_a_metadata_group_nobody_runs_is_unavailable() -> None:
    cluster = FakeCluster()                        # never started: connections refused

    async def body() -> None:
        directory = ShardDirectory(cluster.config, "h1")
        try:
            with pytest.raises(MetadataUnavailable, match="UNAVAILABLE"):
                await directory.load_map(timeout=0.3)
        finally:
            await directory.close()

    asyncio.run(body())


def test_the_map_starts_as_cluster_tomls_and_changes_by_compare_and_set() -> None:
    async def body(cluster: FakeCluster, directory: ShardDirectory) -> None:
        initial = initial_map(cluster.config)
        assert await directory.load_map() == initial and initial.epoch == 1
        # The first change writes the initial map, then replaces it.
        added = initial.with_group(2, ("h1", "h2", "h3"))
        assert await directory.update_map(initial, added) == added
        assert cluster.store[SHARD_MAP_KEY] == added.encode()
        assert await directory.load_map() == added
        # Someone else's change meanwhile: a conflict that names the stored map, nothing written.
        with pytest.raises(MapConflict) as conflict:
            await directory.update_map(initial, initial.with_group(3, ("h1",)))
        assert isinstance(conflict.value, ShardMapConflict) and conflict.value.current == added
        assert cluster.store[SHARD_MAP_KEY] == added.encode()
        with pytest.raises(ValueError, match="higher epoch"):
            await directory.update_map(added, added)
        # One map, one encoding: placements built in another order give the same bytes.
        two = added.with_group(3, ("h2",))
        reordered = type(two)(two.epoch, two.starts, two.owners, two.groups,
                              dict(reversed(list(two.placements.items()))), two.retired,
                              dict(reversed(list(two.incarnations.items()))))
        assert reordered == two and reordered.encode() == two.encode()
        await directory.update_map(added, two)
        three = reordered.without_group(3)
        assert await directory.update_map(reordered, three) == three
        assert await directory.load_map() == three

    asyncio.run(_with_cluster(body))


def test_a_guarded_map_change_happens_only_while_its_guards_hold() -> None:
    async def body(cluster: FakeCluster, directory: ShardDirectory) -> None:
        initial = initial_map(cluster.config)
        cluster.store[b"lease"] = b"A/1"
        added = initial.with_group(2, ("h1", "h2", "h3"))
        assert await directory.update_map(initial, added, guards=((b"lease", b"A/1"),)) == added
        cluster.store[b"lease"] = b"B/2"                         # the lease is taken over
        with pytest.raises(GuardFailed):
            await directory.update_map(added, added.with_group(3, ("h1",)), guards=((b"lease", b"A/1"),))
        assert cluster.store[SHARD_MAP_KEY] == added.encode()
        # A guard that fails before the first map is written: still GuardFailed, nothing written.
        del cluster.store[SHARD_MAP_KEY]
        with pytest.raises(GuardFailed):
            await directory.update_map(initial, added, guards=((b"lease", b"A/1"),))
        assert SHARD_MAP_KEY not in cluster.store

    asyncio.run(_with_cluster(body))


def test_a_retried_compare_and_set_is_applied_once() -> None:
    async def body(cluster: FakeCluster, directory: ShardDirectory) -> None:
        # Every compare-and-set carries this directory's session and a new sequence.
        await directory.compare_and_set(b"k", None, b"a")
        await directory.compare_and_set(b"k", b"a", b"b")
        (client_id, (sequence, _)), = cluster.sessions.items()
        assert sequence == 2 and client_id > 0
        # Applied, answer lost, sent again with the same sequence: answered from the session, not applied twice.
        cluster.workers[1].lose_answers = 1
        assert await directory.compare_and_set(b"k", b"b", b"c") == (True, b"c")
        assert cluster.sessions[client_id][0] == 3 and cluster.store[b"k"] == b"c"
        assert await directory.compare_and_set(b"k", b"b", b"c") == (False, b"c")
        other = ShardDirectory(cluster.config, "h2")
        try:
            assert await other.compare_and_set(b"k", b"c", b"d") == (True, b"d")
            assert len(cluster.sessions) == 2
        finally:
            await other.close()

    asyncio.run(_with_cluster(body))
