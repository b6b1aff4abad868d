"""etcd's v3 API on the routers of one small cluster (3 hosts, 2 groups),
through gRPC with etcd's own messages and through Debian's etcdctl when it
is installed (docs/etcd.md). One cluster for the whole module."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from shardnode.cli.main import main as cli_main
from shardnode.config import METADATA_GROUP
from shardnode.supervisor import worker_program
from shardnode.client import Client, LeaseNotFound
from shardnode.errors import InvalidArgument
from shardnode.proto import etcd_rpc_pb2 as rpc
from shardnode.proto import etcd_rpc_pb2_grpc as rpc_grpc

from .harness import LocalCluster

pytestmark = [pytest.mark.timeout(240), pytest.mark.xdist_group("etcd_api")]

ETCDCTL = shutil.which("etcdctl")
needs_etcdctl = pytest.mark.skipif(ETCDCTL is None, reason="etcdctl not installed (Debian's etcd-client)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(tmp_path_factory.mktemp("etcd") / "cluster", hosts=3, groups=2, replicas=3, etcd=True)
    try:
        with local.running():
            yield local
    except Exception:
        print(local.log_tail())
        raise


@pytest.fixture(scope="module")
def kv(cluster: LocalCluster) -> Iterator[rpc_grpc.KVStub]:
    address = cluster.config.hosts[0].etcd_address
    with grpc.insecure_channel(address) as channel:
        yield rpc_grpc.KVStub(channel)


def etcdctl(cluster: LocalCluster, *args: str, stdin: str | None = None, host: int = 0,
            endpoints: str | None = None, stderr: bool = False) -> str:
    endpoint = endpoints or cluster.config.hosts[host].etcd_address
    done = subprocess.run([ETCDCTL, "--endpoints", endpoint, "--command-timeout=10s", *args], input=stdin,
                          capture_output=True, text=True, timeout=30, env={"ETCDCTL_API": "3", "PATH": "/usr/bin"})
    assert done.returncode == 0, f"etcdctl {' '.join(args)}: {done.stderr}"
    return done.stdout + (done.stderr if stderr else "")


def prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


def test_put_get_revisions_and_prev_kv(kv: rpc_grpc.KVStub) -> None:
    first = kv.Put(rpc.PutRequest(key=b"rev/k", value=b"v1"), timeout=10)
    second = kv.Put(rpc.PutRequest(key=b"rev/k", value=b"v2", prev_kv=True), timeout=10)
    assert second.prev_kv.value == b"v1" and second.header.revision > first.header.revision
    got = kv.Range(rpc.RangeRequest(key=b"rev/k"), timeout=10)
    (record,) = got.kvs
    assert record.value == b"v2" and record.version == 2 and got.count == 1
    assert record.create_revision == first.header.revision and record.mod_revision == second.header.revision
    stale = kv.Range(rpc.RangeRequest(key=b"rev/k", serializable=True), timeout=10)
    assert stale.kvs[0].value in (b"v1", b"v2")
    assert kv.Range(rpc.RangeRequest(key=b"rev/absent"), timeout=10).count == 0


def test_a_prefix_is_gathered_from_every_group_in_key_order(kv: rpc_grpc.KVStub) -> None:
    keys = [b"scan/%02d" % i for i in range(30)]
    for key in keys:
        kv.Put(rpc.PutRequest(key=key, value=key.upper()), timeout=10)
    everything = kv.Range(rpc.RangeRequest(key=b"scan/", range_end=prefix_end(b"scan/")), timeout=10)
    assert [r.key for r in everything.kvs] == keys and everything.count == 30 and not everything.more
    limited = kv.Range(rpc.RangeRequest(key=b"scan/", range_end=prefix_end(b"scan/"), limit=5), timeout=10)
    assert [r.key for r in limited.kvs] == keys[:5] and limited.more and limited.count == 30
    down = kv.Range(rpc.RangeRequest(key=b"scan/", range_end=prefix_end(b"scan/"), limit=3,
                                     sort_order=rpc.RangeRequest.DESCEND), timeout=10)
    assert [r.key for r in down.kvs] == keys[-3:][::-1]
    counted = kv.Range(rpc.RangeRequest(key=b"scan/", range_end=prefix_end(b"scan/"), count_only=True), timeout=10)
    assert counted.count == 30 and not counted.kvs
    deleted = kv.DeleteRange(rpc.DeleteRangeRequest(key=b"scan/1", range_end=b"scan/2", prev_kv=True), timeout=10)
    assert deleted.deleted == 10 and [r.key for r in deleted.prev_kvs] == keys[10:20]
    after = kv.Range(rpc.RangeRequest(key=b"scan/", range_end=prefix_end(b"scan/"), keys_only=True), timeout=10)
    assert [r.key for r in after.kvs] == keys[:10] + keys[20:] and all(r.value == b"" for r in after.kvs)


def test_txn_compare_and_swap_in_one_group(kv: rpc_grpc.KVStub) -> None:
    key = b"cas/lock"
    claim = rpc.TxnRequest(
        compare=[rpc.Compare(key=key, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL, create_revision=0)],
        success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=b"me"))],
        failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))])
    won = kv.Txn(claim, timeout=10)
    lost = kv.Txn(claim, timeout=10)
    assert won.succeeded and not lost.succeeded
    assert lost.responses[0].response_range.kvs[0].value == b"me"
    assert won.responses[0].response_put.header.revision == won.header.revision


def test_refusals_are_clear_and_change_nothing(kv: rpc_grpc.KVStub) -> None:
    # Two keys that live in different groups (2 groups: some pair among a few keys does).
    keys = [b"spread/%d" % i for i in range(16)]
    txn = rpc.TxnRequest(success=[rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=b"x")) for k in keys])
    with pytest.raises(grpc.RpcError) as refused:
        kv.Txn(txn, timeout=10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "one group" in refused.value.details() and "group 0" in refused.value.details()
    assert kv.Range(rpc.RangeRequest(key=b"spread/", range_end=b"spread0"), timeout=10).count == 0
    for request, code in ((rpc.PutRequest(key=b"", value=b"x"), grpc.StatusCode.INVALID_ARGUMENT),
                          (rpc.PutRequest(key=b"l", value=b"x", lease=7), grpc.StatusCode.NOT_FOUND)):
        with pytest.raises(grpc.RpcError) as refused:
            kv.Put(request, timeout=10)
        assert refused.value.code() == code
    with pytest.raises(grpc.RpcError) as refused:
        kv.Range(rpc.RangeRequest(key=b"rev/k", revision=1), timeout=10)
    assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE and "compacted" in refused.value.details()
    duplicate = rpc.TxnRequest(success=[rpc.RequestOp(request_put=rpc.PutRequest(key=b"d", value=b"1")),
                                        rpc.RequestOp(request_put=rpc.PutRequest(key=b"d", value=b"2"))])
    with pytest.raises(grpc.RpcError) as refused:
        kv.Txn(duplicate, timeout=10)
    assert "duplicate key" in refused.value.details()


@needs_etcdctl
def test_etcdctl_put_get_prefix_del_txn(cluster: LocalCluster) -> None:
    assert etcdctl(cluster, "put", "ctl/a", "1").strip() == "OK"
    etcdctl(cluster, "put", "ctl/b", "2", host=1)           # another router
    assert etcdctl(cluster, "get", "ctl/a", "--print-value-only", host=2).strip() == "1"
    assert etcdctl(cluster, "get", "ctl/", "--prefix").split() == ["ctl/a", "1", "ctl/b", "2"]
    assert etcdctl(cluster, "get", "ctl/", "--prefix", "--limit", "1").split() == ["ctl/a", "1"]
    assert etcdctl(cluster, "get", "ctl/b", "--from-key", "--keys-only").split()[0] == "ctl/b"
    listed = json.loads(etcdctl(cluster, "get", "ctl/a", "-w", "json"))
    assert listed["count"] == 1 and listed["kvs"][0]["version"] == 1
    txn = 'value("ctl/a") = "1"\n\nput ctl/a swapped\n\nput ctl/a lost\n\n'
    assert etcdctl(cluster, "txn", stdin=txn).split()[:2] == ["SUCCESS", "OK"]
    assert etcdctl(cluster, "txn", stdin=txn).split()[0] == "FAILURE"
    assert etcdctl(cluster, "get", "ctl/a", "--print-value-only").strip() == "lost"
    assert etcdctl(cluster, "del", "ctl/", "--prefix").strip() == "2"
    assert etcdctl(cluster, "get", "ctl/", "--prefix") == ""


@needs_etcdctl
def test_etcdctl_endpoint_status_health_and_member_list(cluster: LocalCluster) -> None:
    endpoints = ",".join(h.etcd_address for h in cluster.config.hosts)
    health = etcdctl(cluster, "endpoint", "health", endpoints=endpoints, stderr=True)   # etcdctl 3.4 says it on stderr
    assert health.count("is healthy") == 3
    status = json.loads(etcdctl(cluster, "endpoint", "status", "-w", "json"))
    assert status[0]["Status"]["version"] and status[0]["Status"]["dbSize"] > 0      # its host's databases
    members = json.loads(etcdctl(cluster, "member", "list", "-w", "json"))
    assert sorted(m["name"] for m in members["members"]) == ["h1", "h2", "h3"]


def test_native_client_scan_and_compare_and_set(cluster: LocalCluster) -> None:
    with Client(list(cluster.router_addresses.values())) as client:
        for i in range(12):
            client.put(b"native/%02d" % i, b"%d" % i)
        assert client.scan(prefix=b"native/", limit=3) == [(b"native/00", b"0"), (b"native/01", b"1"),
                                                           (b"native/02", b"2")]
        assert [k for k, _ in client.scan(b"native/05", b"native/08")] == [b"native/05", b"native/06", b"native/07"]
        items = client.scan_items(prefix=b"native/")
        assert items.count == 12 and items.items[0].version == 1 and items.revision >= items.items[-1].mod_revision
        assert client.compare_and_set(b"native/cas", None, b"first") == (True, None)
        assert client.compare_and_set(b"native/cas", None, b"second") == (False, b"first")
        assert client.compare_and_set(b"native/cas", b"first", b"third") == (True, b"first")
        assert client.get(b"native/cas") == b"third"
        with pytest.raises(InvalidArgument):
            client.scan(b"b", b"a")


def test_cli_get_prefix_scan_and_cas(cluster: LocalCluster, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    def cli(*args: str) -> tuple[int, str]:
        """The command in this process (a subprocess costs a second of imports each)."""
        status = cli_main(["--config", str(cluster.config_path), *args])
        return status, capsysbinary.readouterr().out.decode()

    assert cli("put", "cli/a", "1")[0] == 0 and cli("put", "cli/b", "2")[0] == 0
    assert cli("get", "cli/", "--prefix")[1].split() == ["cli/a", "1", "cli/b", "2"]
    assert cli("get", "cli/", "--prefix", "--keys-only", "--limit", "1")[1].split() == ["cli/a"]
    assert cli("get", "nothing/", "--prefix")[0] == 1
    scanned = json.loads(cli("scan", "cli/", "cli0", "--json")[1])
    assert [kv["key"] for kv in scanned["kvs"]] == ["cli/a", "cli/b"] and scanned["count"] == 2
    assert cli("cas", "cli/a", "one", "--expect", "1")[0] == 0
    assert cli("cas", "cli/a", "uno", "--expect", "1") == (1, "one")     # raw, as `get` writes a value
    assert cli("cas", "cli/new", "x", "--expect-absent")[0] == 0


@pytest.fixture(scope="module")
def lease(cluster: LocalCluster) -> Iterator[rpc_grpc.LeaseStub]:
    with grpc.insecure_channel(cluster.config.hosts[1].etcd_address) as channel:
        yield rpc_grpc.LeaseStub(channel)


def test_a_lease_keeps_its_keys_while_kept_alive_and_deletes_them_on_revoke(
        kv: rpc_grpc.KVStub, lease: rpc_grpc.LeaseStub) -> None:
    granted = lease.LeaseGrant(rpc.LeaseGrantRequest(TTL=30), timeout=10)
    assert granted.ID > 0 and granted.TTL == 30
    keys = [b"leased/%d" % i for i in range(6)]          # in both groups
    for key in keys:
        kv.Put(rpc.PutRequest(key=key, value=b"v", lease=granted.ID), timeout=10)
    kv.Put(rpc.PutRequest(key=b"leased/other", value=b"v"), timeout=10)
    assert kv.Range(rpc.RangeRequest(key=keys[0]), timeout=10).kvs[0].lease == granted.ID
    (alive,) = lease.LeaseKeepAlive(iter([rpc.LeaseKeepAliveRequest(ID=granted.ID)]), timeout=10)
    assert alive.TTL == 30
    ttl = lease.LeaseTimeToLive(rpc.LeaseTimeToLiveRequest(ID=granted.ID, keys=True), timeout=10)
    assert 28 <= ttl.TTL <= 30 and ttl.grantedTTL == 30 and list(ttl.keys) == keys     # from both groups
    assert granted.ID in [s.ID for s in lease.LeaseLeases(rpc.LeaseLeasesRequest(), timeout=10).leases]
    lease.LeaseRevoke(rpc.LeaseRevokeRequest(ID=granted.ID), timeout=10)
    left = kv.Range(rpc.RangeRequest(key=b"leased/", range_end=b"leased0"), timeout=10)
    assert [r.key for r in left.kvs] == [b"leased/other"]
    with pytest.raises(grpc.RpcError) as refused:
        kv.Put(rpc.PutRequest(key=b"leased/late", value=b"v", lease=granted.ID), timeout=10)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert lease.LeaseTimeToLive(rpc.LeaseTimeToLiveRequest(ID=granted.ID), timeout=10).TTL == -1
    (gone,) = lease.LeaseKeepAlive(iter([rpc.LeaseKeepAliveRequest(ID=granted.ID)]), timeout=10)
    assert gone.TTL == 0


def test_an_expired_lease_takes_its_keys_with_it(kv: rpc_grpc.KVStub, lease: rpc_grpc.LeaseStub) -> None:
    short = lease.LeaseGrant(rpc.LeaseGrantRequest(TTL=2), timeout=10)
    for i in range(4):
        kv.Put(rpc.PutRequest(key=b"expiring/%d" % i, value=b"v", lease=short.ID), timeout=10)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if kv.Range(rpc.RangeRequest(key=b"expiring/", range_end=b"expiring0"), timeout=10).count == 0:
            break
        time.sleep(0.25)
    else:
        pytest.fail("the keys of an expired lease were not deleted within 15 s")
    assert time.monotonic() - (deadline - 15) >= 1.5        # not before the TTL (2 s) ran out, give or take


@needs_etcdctl
def test_etcdctl_lease_grant_put_keep_alive_revoke(cluster: LocalCluster) -> None:
    granted = etcdctl(cluster, "lease", "grant", "60")     # "lease 694d77aa9e38260f granted with TTL(60s)"
    lease_id = granted.split()[1]
    assert "TTL(60s)" in granted
    assert etcdctl(cluster, "put", "--lease", lease_id, "ctl-lease/k", "v").strip() == "OK"
    assert etcdctl(cluster, "lease", "keep-alive", "--once", lease_id).strip().endswith("TTL(60)")
    assert "attached keys([ctl-lease/k])" in etcdctl(cluster, "lease", "timetolive", "--keys", lease_id)
    assert lease_id in etcdctl(cluster, "lease", "list")
    assert "revoked" in etcdctl(cluster, "lease", "revoke", lease_id)
    assert etcdctl(cluster, "get", "ctl-lease/k") == ""


def test_watch_a_prefix_from_now_and_from_a_revision_with_prev_kv(cluster: LocalCluster, kv: rpc_grpc.KVStub) -> None:
    with grpc.insecure_channel(cluster.config.hosts[2].etcd_address) as channel:
        watch = rpc_grpc.WatchStub(channel)
        requests: queue.Queue = queue.Queue()
        responses = watch.Watch(iter(requests.get, None), timeout=60)
        requests.put(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=b"watched/", range_end=b"watched0", prev_kv=True)))
        created = next(responses)
        assert created.created and created.watch_id > 0
        first = kv.Put(rpc.PutRequest(key=b"watched/a", value=b"1"), timeout=10).header.revision
        keys = [b"watched/%d" % i for i in range(8)]          # in both groups
        for key in keys:
            kv.Put(rpc.PutRequest(key=key, value=b"x"), timeout=10)
        kv.Put(rpc.PutRequest(key=b"unwatched", value=b"x"), timeout=10)
        kv.Put(rpc.PutRequest(key=b"watched/a", value=b"2"), timeout=10)
        kv.DeleteRange(rpc.DeleteRangeRequest(key=b"watched/a"), timeout=10)
        seen = []
        while len(seen) < 11:
            seen.extend(next(responses).events)
        revisions = [e.kv.mod_revision for e in seen]
        assert revisions == sorted(revisions)          # one revision order across both groups
        by_key: dict[bytes, list] = {}
        for event in seen:
            by_key.setdefault(event.kv.key, []).append(event)
        assert sorted(by_key) == sorted([b"watched/a", *keys])
        a = by_key[b"watched/a"]
        assert [e.type for e in a] == [0, 0, 1] and a[1].prev_kv.value == b"1" and a[1].kv.value == b"2"
        assert [e.kv.mod_revision for e in a] == sorted(e.kv.mod_revision for e in a)
        # A second watch from the first put's revision sees its history again, then cancel.
        requests.put(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=b"watched/a", start_revision=first)))
        response = next(responses)
        while not response.created:
            response = next(responses)
        replayed = []
        while len(replayed) < 3:
            response = next(responses)
            assert response.watch_id == 2 or not response.events
            replayed.extend(e.kv.value for e in response.events if response.watch_id == 2)
        assert replayed == [b"1", b"2", b""]
        requests.put(rpc.WatchRequest(cancel_request=rpc.WatchCancelRequest(watch_id=2)))
        assert any(r.canceled and r.watch_id == 2 for r in itertools.islice(responses, 3))
        requests.put(None)
        responses.cancel()


@needs_etcdctl
def test_etcdctl_watch_prefix(cluster: LocalCluster, kv: rpc_grpc.KVStub) -> None:
    endpoint = cluster.config.hosts[0].etcd_address
    since = kv.Put(rpc.PutRequest(key=b"ctl-watch-marker", value=b"x"), timeout=10).header.revision
    watcher = subprocess.Popen([ETCDCTL, "--endpoints", endpoint, "watch", "ctl-watch/", "--prefix", "--rev",
                                str(since)], stdout=subprocess.PIPE, text=True,
                               env={"ETCDCTL_API": "3", "PATH": "/usr/bin"})
    try:
        etcdctl(cluster, "put", "ctl-watch/x", "1")
        etcdctl(cluster, "del", "ctl-watch/x")
        lines = [watcher.stdout.readline().strip() for _ in range(5)]
        assert lines == ["PUT", "ctl-watch/x", "1", "DELETE", "ctl-watch/x"]
    finally:
        watcher.kill()
        watcher.wait(timeout=10)


def test_native_client_leases_and_watch(cluster: LocalCluster, kv: rpc_grpc.KVStub) -> None:
    with Client(list(cluster.router_addresses.values())) as client:
        lease_id, ttl = client.lease_grant(30)
        assert ttl == 30 and lease_id in client.leases()
        assert client.put(b"native-lease/a", b"1", lease=lease_id) is None
        assert client.put(b"native-lease/a", b"2", lease=lease_id) == b"1"
        assert client.lease_keep_alive(lease_id) == 30
        left, granted = client.lease_time_to_live(lease_id)
        assert granted == 30 and 28 <= left <= 30
        events: list = []
        since = kv.Put(rpc.PutRequest(key=b"native-lease-marker", value=b"x"), timeout=10).header.revision
        watching = threading.Thread(target=lambda: events.extend(itertools.islice(
            client.watch(b"native-lease/", prefix=True, prev_value=True, start_revision=since), 2)))
        watching.start()
        client.lease_revoke(lease_id)                       # deletes native-lease/a
        client.put(b"native-lease/b", b"3")
        watching.join(timeout=20)
        assert [(e.kind, e.key) for e in events] == [("delete", b"native-lease/a"), ("put", b"native-lease/b")]
        assert events[0].previous == b"2" and events[1].value == b"3"
        assert client.get(b"native-lease/a") is None
        with pytest.raises(LeaseNotFound):
            client.lease_keep_alive(lease_id)
        with pytest.raises(LeaseNotFound):
            client.put(b"native-lease/c", b"x", lease=lease_id)


def test_cli_lease_and_watch(cluster: LocalCluster, kv: rpc_grpc.KVStub,
                             capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    def cli(*args: str) -> tuple[int, str]:
        status = cli_main(["--config", str(cluster.config_path), *args])
        return status, capsysbinary.readouterr().out.decode()

    status, granted = cli("lease", "grant", "40")
    assert status == 0 and granted.endswith("granted with TTL(40s)\n")
    lease_hex = granted.split()[1]
    # From a revision before the changes: the watch sees them however long it takes to start.
    since = kv.Put(rpc.PutRequest(key=b"cli-lease-marker", value=b"x"), timeout=10).header.revision
    watcher = subprocess.Popen([sys.executable, "-m", "shardnode.cli", "--config", str(cluster.config_path),
                                "watch", "cli-lease/", "--prefix", "--count", "2", "--rev", str(since)],
                               stdout=subprocess.PIPE)
    try:
        assert cli("put", "cli-lease/k", "v", "--lease", lease_hex)[0] == 0
        assert "remaining" in cli("lease", "ttl", lease_hex)[1]
        assert cli("lease", "keep-alive", "--once", lease_hex)[1].strip().endswith("TTL(40)")
        assert lease_hex in cli("lease", "list")[1].split()
        assert cli("lease", "revoke", lease_hex) == (0, f"lease {lease_hex} revoked\n")
        out, _ = watcher.communicate(timeout=20)
        assert out.split() == [b"PUT", b"cli-lease/k", b"v", b"DELETE", b"cli-lease/k"]
    finally:
        watcher.kill()
        watcher.wait(timeout=10)
    assert cli("lease", "revoke", lease_hex)[0] == 1


@pytest.mark.skipif(importlib.util.find_spec("aetcd") is None, reason="aetcd not installed (pip install '.[test]')")
def test_the_aetcd_client(cluster: LocalCluster) -> None:
    host = cluster.config.hosts[0]
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "etcd_clients" / "aetcd_check.py"),
                           host.address, str(host.etcd_port)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr



@pytest.mark.skipif(importlib.util.find_spec("etcd3") is None, reason="etcd3 not installed (pip install '.[test]')")
def test_the_etcd3_client(cluster: LocalCluster) -> None:
    host = cluster.config.hosts[1]
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "etcd_clients" / "etcd3_check.py"),
                           host.address, str(host.etcd_port)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"})
    assert done.returncode == 0, done.stdout + done.stderr

def test_a_watch_resumed_from_its_last_revision_misses_nothing_of_any_group(
        cluster: LocalCluster, kv: rpc_grpc.KVStub) -> None:
    """Changes of both groups in one revision order: a client that stops and
    resumes from its last revision + 1 gets exactly the rest."""
    since = kv.Put(rpc.PutRequest(key=b"resume-marker", value=b"x"), timeout=10).header.revision
    keys = [b"resume/%02d" % i for i in range(20)]                 # in both groups
    for key in keys:
        kv.Put(rpc.PutRequest(key=key, value=b"x"), timeout=10)

    def watch_from(revision: int, count: int) -> list:
        with grpc.insecure_channel(cluster.config.hosts[1].etcd_address) as channel:
            requests: queue.Queue = queue.Queue()
            responses = rpc_grpc.WatchStub(channel).Watch(iter(requests.get, None), timeout=30)
            requests.put(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                key=b"resume/", range_end=b"resume0", start_revision=revision)))
            events: list = []
            for response in responses:
                events.extend(response.events)
                if len(events) >= count:
                    break
            requests.put(None)
            responses.cancel()
            return events[:count]

    first = watch_from(since, 7)
    rest = watch_from(first[-1].kv.mod_revision + 1, len(keys) - 7)
    assert [e.kv.key for e in first + rest] == keys                # written one after the other


def test_a_watch_of_shardnodes_client_resumes_across_its_router_restarting(
        cluster: LocalCluster, kv: rpc_grpc.KVStub) -> None:
    """Its only router killed and started again: the watch goes on from the
    revision after its last event, none lost or repeated."""
    host = cluster.config.hosts[2]
    keys = [b"restart/%02d" % i for i in range(20)]
    events: list = []
    since = kv.Put(rpc.PutRequest(key=b"restart-marker", value=b"x"), timeout=10).header.revision
    with Client([host.router_address], timeout=20) as client:
        watching = threading.Thread(target=lambda: events.extend(
            itertools.islice(client.watch(b"restart/", prefix=True, start_revision=since), len(keys))))
        watching.start()
        for key in keys[:10]:
            kv.Put(rpc.PutRequest(key=key, value=b"x"), timeout=10)
        time.sleep(0.5)
        cluster.kill((host.name, "router"))
        try:
            for key in keys[10:]:
                kv.Put(rpc.PutRequest(key=key, value=b"x"), timeout=10)
        finally:
            cluster.start_host_router(host.name)
        watching.join(timeout=30)
    assert [e.key for e in events] == keys


def _leader_host(status, group: int | None) -> str:  # type: ignore[no-untyped-def]
    """The host of a group's leader (None: the metadata group), from a router's status."""
    view = status.metadata_group if group is None else next(g for g in status.groups if g.group == group)
    return next(r.host for r in view.replicas if r.node_id == view.leader_id)


def test_leaders_killed_lose_no_watch_event_and_end_no_kept_lease(cluster: LocalCluster, kv: rpc_grpc.KVStub,
                                                                  lease: rpc_grpc.LeaseStub) -> None:
    """Last in the module: it kills workers (and starts them again)."""
    with grpc.insecure_channel(cluster.config.hosts[0].etcd_address) as channel:
        requests: queue.Queue = queue.Queue()
        responses = rpc_grpc.WatchStub(channel).Watch(iter(requests.get, None), timeout=120)
        requests.put(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(key=b"fault/", range_end=b"fault0")))
        assert next(responses).created
        kept = lease.LeaseGrant(rpc.LeaseGrantRequest(TTL=4), timeout=10).ID
        # Kept alive from the start, every half second (a loaded machine may take longer than the
        # TTL for the writes below): the lease must outlive the metadata group's leader.
        keeping = threading.Event()
        renewals: list[int] = []

        def keep_alive() -> None:
            while not keeping.wait(0.5):
                (alive,) = lease.LeaseKeepAlive(iter([rpc.LeaseKeepAliveRequest(ID=kept)]), timeout=20)
                renewals.append(alive.TTL)

        keeper = threading.Thread(target=keep_alive, name="keep-alive")
        keeper.start()
        kv.Put(rpc.PutRequest(key=b"fault/leased", value=b"v", lease=kept), timeout=10)
        written = [b"fault/%03d" % i for i in range(40)]
        victims: set[tuple[str, str]] = set()
        try:
            for key in written[:20]:
                kv.Put(rpc.PutRequest(key=key, value=b"x"), timeout=10)
            with Client(list(cluster.router_addresses.values())) as client:
                status = client.status()
            victims = {(_leader_host(status, None), worker_program(METADATA_GROUP)),
                       (_leader_host(status, 0), worker_program(0))}
            for victim in victims:
                cluster.kill(victim)
            began = time.monotonic()
            for key in written[20:]:
                kv.Put(rpc.PutRequest(key=key, value=b"x"), timeout=20)
            # Kept alive across the metadata group's new leader, for longer than its TTL: never expired.
            while time.monotonic() - began < 6:
                time.sleep(0.5)
            keeping.set()
            keeper.join()
            assert renewals and set(renewals) == {4}
            assert kv.Range(rpc.RangeRequest(key=b"fault/leased"), timeout=10).count == 1
            seen: list[bytes] = []
            revisions: list[int] = []
            while len(seen) < len(written) + 1:
                for event in next(responses).events:
                    seen.append(event.kv.key)
                    revisions.append(event.kv.mod_revision)
            assert sorted(seen) == sorted([b"fault/leased", *written])      # each once: none lost, none twice
            assert revisions == sorted(revisions)                            # in revision order throughout
        finally:
            keeping.set()
            keeper.join()
            requests.put(None)
            responses.cancel()
            for host, program in victims:
                group = METADATA_GROUP if program == worker_program(METADATA_GROUP) else 0
                cluster.start_worker(host, group)
