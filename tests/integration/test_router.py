"""Routers and workers end to end (processes started directly)."""

from __future__ import annotations

import collections
import signal
import time

import grpc
import pytest

from shardnode.proto import kv_pb2 as pb
from shardnode.proto import kv_pb2_grpc as pb_grpc
from shardnode.placement.shard_map import ShardMap

from .harness import LocalCluster

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def cluster(tmp_path, request):
    """Plain by default; `parametrize("cluster", ["tls"], indirect=True)` for mutual TLS."""
    local = LocalCluster(tmp_path / "cluster", hosts=3, groups=2, replicas=3,
                         tls=getattr(request, "param", "plain") == "tls")
    with local.running():
        yield local


def _stub(cluster: LocalCluster, host: str = "h1") -> pb_grpc.KVStub:
    return pb_grpc.KVStub(cluster.client_channel(host))


@pytest.mark.parametrize("cluster", ["plain", "tls"], indirect=True)
def test_put_get_delete_through_any_router(cluster: LocalCluster) -> None:
    a, b = _stub(cluster, "h1"), _stub(cluster, "h3")
    first = a.Put(pb.PutRequest(key=b"k", value=b"v1"), timeout=5)
    assert not first.existed
    second = b.Put(pb.PutRequest(key=b"k", value=b"v2"), timeout=5)
    assert second.existed and second.old_value == b"v1"
    assert a.Get(pb.GetRequest(key=b"k"), timeout=5) == pb.GetResponse(found=True, value=b"v2")
    assert not b.Get(pb.GetRequest(key=b"absent"), timeout=5).found
    removed = a.Delete(pb.DeleteRequest(key=b"k"), timeout=5)
    assert removed.existed and removed.old_value == b"v2"
    assert not b.Get(pb.GetRequest(key=b"k"), timeout=5).found


def test_keys_spread_over_every_group(cluster: LocalCluster) -> None:
    stub = _stub(cluster)
    ring = ShardMap.build(cluster.groups, cluster.config.virtual_nodes)
    keys = [b"spread-%d" % i for i in range(60)]
    response = stub.Batch(pb.BatchRequest(operations=[
        pb.BatchOperation(kind=pb.BatchOperation.PUT, key=k, value=k) for k in keys
    ]), timeout=10)
    assert all(r.code == 0 for r in response.results), response
    assert set(collections.Counter(ring.group_for(k) for k in keys)) == set(range(cluster.groups))
    status = stub.Status(pb.StatusRequest(), timeout=5)
    assert all(g.has_quorum for g in status.groups)
    assert all(max(r.applied_index for r in g.replicas) > 1 for g in status.groups), "every group took writes"
    shard_map = stub.ShardMap(pb.ShardMapRequest(), timeout=5)
    assert shard_map.groups == cluster.groups and len(shard_map.routers) == cluster.hosts


def test_invalid_input_is_rejected_with_a_message(cluster: LocalCluster) -> None:
    stub = _stub(cluster)
    for request in (pb.PutRequest(key=b"", value=b"v"), pb.PutRequest(key=b"k" * 4097, value=b"v"),
                    pb.PutRequest(key=b"k", value=b"v" * ((1 << 20) + 1))):
        with pytest.raises(grpc.RpcError) as info:
            stub.Put(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "key" in info.value.details() or "value" in info.value.details()
    assert not stub.Get(pb.GetRequest(key=b"k"), timeout=5).found


def test_session_retries_are_applied_once(cluster: LocalCluster) -> None:
    stub = _stub(cluster)
    session = pb.Session(client_id=42, sequence=1)
    stub.Put(pb.PutRequest(key=b"s", value=b"a", session=session), timeout=5)
    again = _stub(cluster, "h2").Put(pb.PutRequest(key=b"s", value=b"a", session=session), timeout=5)
    assert not again.existed, "the retry returns the original answer (no previous value)"
    nxt = stub.Put(pb.PutRequest(key=b"s", value=b"b", session=pb.Session(client_id=42, sequence=2)), timeout=5)
    assert nxt.old_value == b"a"
    with pytest.raises(grpc.RpcError) as info:
        stub.Put(pb.PutRequest(key=b"s", value=b"late", session=session), timeout=5)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_group_without_quorum_fails_within_the_deadline_then_recovers(cluster: LocalCluster) -> None:
    stub = _stub(cluster, "h1")
    ring = ShardMap.build(cluster.groups, cluster.config.virtual_nodes)
    key = next(b"q%d" % i for i in range(1000) if ring.group_for(b"q%d" % i) == 0)
    stub.Put(pb.PutRequest(key=key, value=b"1"), timeout=5)
    # Two of group 0's three replicas go away (their hosts keep the routers).
    victims = [r.host.name for r in cluster.config.group_replicas(0)][1:]
    for host in victims:
        cluster.kill((host, "worker-g0"), signal.SIGKILL)
    began = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.Put(pb.PutRequest(key=key, value=b"2"), timeout=3)
    assert time.monotonic() - began < 4
    # The router answers before the caller's deadline, naming the cause (its group monitor saw it).
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
    assert info.value.details().startswith("no quorum in group 0: 2 of 3 replicas unreachable"), info.value.details()
    metadata = dict(info.value.trailing_metadata())
    assert metadata == {"shardnode-cause": "no_quorum", "shardnode-group": "0"}
    status = stub.Status(pb.StatusRequest(), timeout=5)
    assert not status.groups[0].has_quorum and status.groups[1].has_quorum
    for host in victims:
        cluster.start_worker(host, 0)
    cluster.wait_ready()
    stub.Put(pb.PutRequest(key=key, value=b"3"), timeout=10)
    assert stub.Get(pb.GetRequest(key=key), timeout=5).value == b"3"


def test_a_request_to_a_group_without_quorum_is_answered_at_once_unless_the_caller_waits(
        cluster: LocalCluster) -> None:
    """Issue 23: a request to a group without quorum waited out its whole
    deadline (10.6 s) although the router knew the majority was gone."""
    import threading

    from shardnode.client import Client, NoQuorum

    ring = ShardMap.build(cluster.groups, cluster.config.virtual_nodes)
    key = next(b"f%d" % i for i in range(1000) if ring.group_for(b"f%d" % i) == 0)
    other = next(b"f%d" % i for i in range(1000) if ring.group_for(b"f%d" % i) == 1)
    config = cluster.config
    # Every router has seen the group served (a router that never has waits instead of failing fast:
    # at start-up its connections to the workers come up after a back-off).
    for host in cluster.host_names():
        deadline = time.monotonic() + 20
        while not _stub(cluster, host).Status(pb.StatusRequest(), timeout=5).groups[0].has_quorum:
            assert time.monotonic() < deadline, f"{host}'s router never saw group 0 with a quorum"
            time.sleep(0.2)
    with Client.from_config(cluster.config_path, timeout=10.0) as client:
        client.put(key, b"1")
        victims = [r.host.name for r in config.group_replicas(0)][1:]
        for host in victims:
            cluster.kill((host, "worker-g0"), signal.SIGKILL)
        # Once the routers have seen it (two probes, a second apart): NoQuorum at once.
        deadline = time.monotonic() + 15
        while True:
            began = time.monotonic()
            try:
                client.get(key)
            except NoQuorum as exc:
                took = time.monotonic() - began
                if took < 1.0:
                    assert "answered at once" in str(exc) and exc.group == 0, exc
                    break
            assert time.monotonic() < deadline, "the routers never answered at once"
        client.put(other, b"x")                          # the other group still serves
    # A caller that waits for the quorum gets its answer once the group is back.
    with Client.from_config(cluster.config_path, timeout=20.0, wait_for_quorum=True) as waiting:
        threading.Timer(1.5, cluster.start_worker, args=(victims[0], 0)).start()
        began = time.monotonic()
        assert waiting.get(key) == b"1"
        assert time.monotonic() - began >= 1.0
