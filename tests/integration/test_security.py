"""A cluster with mutual TLS on every link: who gets in, who does not, and
that refusals are counted (docs/security.md).

One cluster (3 hosts, one group of 3, a router per host) serves every test
of this module, in order; certificate rotation comes last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardnode import cert_rotation
from shardnode.certs import Authority, issue_certificate, new_authority, user_cert_files
from shardnode.channel_cache import CHECK_EVERY
from shardnode.client import Client
from shardnode.cli.main import main as cli_main
from shardnode.errors import PermissionDenied, ShardnodeError
from shardnode.proto import etcd_rpc_pb2 as etcd_rpc
from shardnode.proto import etcd_rpc_pb2_grpc as etcd_rpc_grpc
from shardnode.proto import kv_pb2, kv_pb2_grpc
from shardnode.proto import worker_pb2 as wpb
from shardnode.proto import worker_pb2_grpc as wpb_grpc
from shardnode.raft.messages import Message, MessageType
from shardnode.security import admin_metadata, channel_credentials, load_admin_credential
from shardnode.supervisor import worker_program
from shardnode.transport import MESSAGES_METHOD, Frame, encode_frame

from .harness import LocalCluster

pytestmark = [pytest.mark.timeout(240), pytest.mark.xdist_group("security")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(tmp_path_factory.mktemp("secure") / "cluster", hosts=3, groups=1, replicas=3, tls=True,
                         etcd=True)
    with local.running():
        yield local


def _credentials(cluster: LocalCluster, cert: bytes | None = None, key: bytes | None = None,
                 ca: bytes | None = None) -> grpc.ChannelCredentials:
    ca = ca if ca is not None else cluster.config.security.ca_file.read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def _cluster_authority(cluster: LocalCluster) -> Authority:
    security = cluster.config.security
    return Authority.load(security.ca_file.read_bytes(), security.ca_key_file.read_bytes())


def _get(channel: grpc.Channel) -> grpc.StatusCode:
    try:
        kv_pb2_grpc.KVStub(channel).Get(kv_pb2.GetRequest(key=b"k"), timeout=3)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _scrape(cluster: LocalCluster, host: str = "h1") -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    config = cluster.config.host(host)
    with urllib.request.urlopen(f"http://{config.address}:{config.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _value(samples: dict, name: str, **labels: str) -> float:
    return sum(value for (sample, sample_labels), value in samples.items()
               if sample == name and labels.items() <= dict(sample_labels).items())


def _status(cluster: LocalCluster, host: str) -> wpb.StatusResponse:
    security = cluster.config.security
    address = cluster.config.host(host).worker_address(0)
    with grpc.secure_channel(address, channel_credentials(security, host)) as channel:
        return wpb_grpc.WorkerStub(channel).Status(wpb.StatusRequest(), timeout=3)


def test_only_the_clusters_certificates_get_in_and_refusals_are_counted(cluster: LocalCluster) -> None:
    address = cluster.router_addresses["h1"]
    before = _scrape(cluster)
    foreign = issue_certificate(new_authority("other"), "client")
    intruder = issue_certificate(_cluster_authority(cluster), "intruder", addresses=["127.0.0.1"])

    # Refused at the TLS handshake: no TLS, TLS without a client certificate, a certificate of another CA.
    with grpc.insecure_channel(address) as channel:
        assert _get(channel) == grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(address, _credentials(cluster)) as channel:
        assert _get(channel) == grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(address, _credentials(cluster, foreign.cert_pem, foreign.key_pem)) as channel:
        assert _get(channel) == grpc.StatusCode.UNAVAILABLE
    # Refused by name: a certificate of this cluster's CA, but of no host of the cluster.
    with grpc.secure_channel(address, _credentials(cluster, intruder.cert_pem, intruder.key_pem)) as channel:
        assert _get(channel) == grpc.StatusCode.PERMISSION_DENIED
    # The clients' certificate gets in, and so does the Client of the cluster.toml.
    with cluster.client_channel("h1") as channel:
        assert _get(channel) == grpc.StatusCode.OK
    with Client.from_config(cluster.config_path, timeout=5) as client:
        client.put(b"tls-key", b"tls-value")
        assert client.get(b"tls-key") == b"tls-value"

    after = _scrape(cluster)
    router = {"component": "router"}
    refused = _value(after, "shardnode_auth_refused_total", reason="identity_not_allowed", **router) - _value(
        before, "shardnode_auth_refused_total", reason="identity_not_allowed", **router)
    assert refused >= 1
    handshakes = (_value(after, "shardnode_tls_handshakes_total", **router)
                  - _value(before, "shardnode_tls_handshakes_total", **router))
    connections = (_value(after, "shardnode_tls_connections_total", **router)
                   - _value(before, "shardnode_tls_connections_total", **router))
    # Three handshakes were refused (TLS-less, certificate-less, foreign CA): they never became connections.
    assert handshakes - connections >= 3, (handshakes, connections)


def test_the_etcd_port_has_the_same_tls_switch(cluster: LocalCluster) -> None:
    security = cluster.config.security
    address = cluster.config.host("h1").etcd_address
    client = _credentials(cluster, security.client_cert_file.read_bytes(), security.client_key_file.read_bytes())
    with grpc.secure_channel(address, client) as channel:
        kv = etcd_rpc_grpc.KVStub(channel)
        kv.Put(etcd_rpc.PutRequest(key=b"tls/k", value=b"v"), timeout=10)
        assert kv.Range(etcd_rpc.RangeRequest(key=b"tls/k"), timeout=10).kvs[0].value == b"v"
    with grpc.secure_channel(address, _credentials(cluster)) as channel:       # no client certificate
        with pytest.raises(grpc.RpcError):
            etcd_rpc_grpc.KVStub(channel).Range(etcd_rpc.RangeRequest(key=b"tls/k"), timeout=3)
    with grpc.insecure_channel(address) as channel:                             # no TLS at all
        with pytest.raises(grpc.RpcError):
            etcd_rpc_grpc.KVStub(channel).Range(etcd_rpc.RangeRequest(key=b"tls/k"), timeout=3)


def test_workers_take_no_clients_and_no_strangers(cluster: LocalCluster) -> None:
    worker = cluster.config.host("h1").worker_address(0)
    security = cluster.config.security
    request = wpb.ExecuteRequest(cluster=cluster.name, group=0, operations=[])
    with grpc.secure_channel(worker, channel_credentials(security, None)) as channel:   # the clients' certificate
        with pytest.raises(grpc.RpcError) as error:
            wpb_grpc.WorkerStub(channel).Execute(request, timeout=3)
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    intruder = issue_certificate(_cluster_authority(cluster), "intruder")
    frame = encode_frame(Frame(cluster.name, 0, 2, 1, (Message(MessageType.HEARTBEAT, to=1, from_=2, term=10**6),)))
    with grpc.secure_channel(worker, _credentials(cluster, intruder.cert_pem, intruder.key_pem)) as channel:
        with pytest.raises(grpc.RpcError) as error:
            list(channel.stream_stream(MESSAGES_METHOD)(iter([frame]), timeout=3))
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_plaintext_client_is_told_that_the_routers_require_tls(cluster: LocalCluster) -> None:
    """Issue 23: a plaintext client against a TLS cluster waited its whole
    deadline, then said `failed to connect to all addresses ... Socket closed`."""
    from shardnode.client import TLSMismatch

    routers = [h.router_address for h in cluster.config.hosts]
    began = time.monotonic()
    with Client(routers, timeout=10.0) as plaintext, pytest.raises(TLSMismatch) as info:
        plaintext.put("k", "v")
    assert time.monotonic() - began < 3.0
    assert "requires TLS and this client connects in plaintext" in str(info.value)
    assert "Client.from_config" in str(info.value) and "Nothing was sent" in str(info.value)


def test_a_host_cannot_speak_for_another_node(cluster: LocalCluster) -> None:
    """h3's own certificate, frames claiming to come from node 2 (h2) with a
    huge term: refused (wrong_identity); h1's term and leader do not move."""
    security = cluster.config.security
    status = _status(cluster, "h1")
    frame = encode_frame(Frame(cluster.name, 0, 2, 1,
                               (Message(MessageType.HEARTBEAT, to=1, from_=2, term=status.term + 1000),)))
    worker = cluster.config.host("h1").worker_address(0)
    with grpc.secure_channel(worker, channel_credentials(security, "h3")) as channel:
        with pytest.raises(grpc.RpcError) as error:
            list(channel.stream_stream(MESSAGES_METHOD)(iter([frame]), timeout=3))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith("wrong_identity")
    time.sleep(0.5)
    again = _status(cluster, "h1")
    assert (again.term, again.leader_id) == (status.term, status.leader_id)
    rejected = _value(_scrape(cluster), "raft_peer_rejected_frames_total", reason="wrong_identity")
    assert rejected >= 1


def test_admin_rpcs_need_the_admin_credential(cluster: LocalCluster) -> None:
    security = cluster.config.security
    worker = cluster.config.host("h1").worker_address(0)
    request = wpb.TransferLeaderRequest()
    with grpc.secure_channel(worker, channel_credentials(security, "h1")) as channel:
        stub = wpb_grpc.WorkerStub(channel)
        for metadata in ((), (("authorization", "Bearer not-the-token-at-all"),)):
            with pytest.raises(grpc.RpcError) as error:
                stub.TransferLeader(request, metadata=metadata, timeout=3)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Data and status RPCs need no admin credential; the admin RPC runs with it.
        assert stub.Status(wpb.StatusRequest(), timeout=3).cluster == cluster.name
        stub.TransferLeader(request, metadata=admin_metadata(load_admin_credential(security)), timeout=10)
    samples = _scrape(cluster)
    assert _value(samples, "shardnode_auth_refused_total", component="worker", reason="admin_token_missing") >= 1
    assert _value(samples, "shardnode_auth_refused_total", component="worker", reason="admin_token_wrong") >= 1


def _shardnode(cluster: LocalCluster, *argv: str) -> tuple[int, str]:
    """One CLI command in this process (the CLI's own entry; faster than a new interpreter)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = cli_main([*argv, "--config", str(cluster.config_path), "--timeout", "10"])
    return status, out.getvalue()


def _user_client(cluster: LocalCluster, user: str) -> Client:
    security = cluster.config.security
    cert, key = user_cert_files(cluster.config, user)
    config = dataclasses.replace(cluster.config, security=dataclasses.replace(
        security, client_cert_file=cert, client_key_file=key))
    return Client([cluster.router_addresses["h1"]], timeout=5, cluster=config)


def _denied(call: Callable[[], object]) -> bool:
    try:
        call()
    except PermissionDenied:
        return True
    return False


def test_users_get_exactly_what_their_roles_allow(cluster: LocalCluster) -> None:
    """A user's certificate (issued by `user add`) may read and write what its
    roles allow, on the native API and etcd's alike, and nothing else; a
    revoked role or a deleted user stops working within a poll of the routers."""
    for argv in (("role", "add", "app"), ("role", "grant-permission", "app", "readwrite", "app/", "--prefix"),
                 ("role", "add", "config-reader"), ("role", "grant-permission", "config-reader", "read", "cfg/",
                                                     "--prefix"),
                 ("user", "add", "alice"), ("user", "grant-role", "alice", "app"),
                 ("user", "grant-role", "alice", "config-reader")):
        status, out = _shardnode(cluster, *argv)
        assert status == 0, (argv, out)
    # Run again (a rerun after a kill): the state wanted is there, nothing is refused.
    status, out = _shardnode(cluster, "user", "grant-role", "alice", "app")
    assert status == 0 and "already" in out, out
    status, out = _shardnode(cluster, "user", "add", "h2")
    assert status == 2 and "taken" in out, out
    with Client.from_config(cluster.config_path, timeout=5) as root:
        root.put(b"cfg/x", b"1")
        root.put(b"secret", b"s")
    with _user_client(cluster, "alice") as alice:
        # Her last role (the routers adopt the rules within a poll).
        _until("the router knows alice's roles", lambda: not _denied(lambda: alice.get(b"cfg/x")), timeout=10)
        alice.put(b"app/a", b"1")
        assert alice.get(b"cfg/x") == b"1"
        assert [k for k, _ in alice.scan(prefix=b"app/")] == [b"app/a"]
        for refused in (lambda: alice.put(b"cfg/x", b"2"), lambda: alice.get(b"secret"),
                        lambda: alice.delete(b"secret"), lambda: alice.scan()):
            assert _denied(refused)
        # A batch: only the operation it may not do is refused.
        assert _denied(lambda: alice.put_many([(b"app/b", b"1"), (b"secret", b"x")]))
        assert alice.get(b"app/b") == b"1"
    with Client.from_config(cluster.config_path, timeout=5) as root:
        assert root.get(b"secret") == b"s" and root.get(b"cfg/x") == b"1"

    # etcd's API, with alice's certificate.
    cert, key = user_cert_files(cluster.config, "alice")
    with grpc.secure_channel(cluster.config.host("h1").etcd_address,
                             _credentials(cluster, cert.read_bytes(), key.read_bytes())) as channel:
        kv = etcd_rpc_grpc.KVStub(channel)
        kv.Put(etcd_rpc.PutRequest(key=b"app/etcd", value=b"v"), timeout=10)
        assert kv.Range(etcd_rpc.RangeRequest(key=b"app/", range_end=b"app0"), timeout=10).count >= 1
        for call in (lambda: kv.Range(etcd_rpc.RangeRequest(key=b"secret"), timeout=10),
                     lambda: kv.Range(etcd_rpc.RangeRequest(key=b"\0", range_end=b"\0"), timeout=10),
                     lambda: kv.Txn(etcd_rpc.TxnRequest(success=[etcd_rpc.RequestOp(
                         request_put=etcd_rpc.PutRequest(key=b"secret", value=b"x"))]), timeout=10)):
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert error.value.details() == "etcdserver: permission denied"
        # A watch she may not read is created and canceled at once, as etcd answers it.
        create = etcd_rpc.WatchRequest(create_request=etcd_rpc.WatchCreateRequest(key=b"secret"))
        first = next(iter(etcd_rpc_grpc.WatchStub(channel).Watch(iter([create]), timeout=10)))
        assert first.canceled and first.cancel_reason == "etcdserver: permission denied", first

    # Revoked, then deleted: refused within a poll (0.5 s), never served from an old rule.
    assert _shardnode(cluster, "user", "revoke-role", "alice", "app")[0] == 0
    with _user_client(cluster, "alice") as alice:
        _until("the role is revoked", lambda: _denied(lambda: alice.put(b"app/a", b"2")), timeout=10)
        assert alice.get(b"cfg/x") == b"1"
    assert _shardnode(cluster, "user", "delete", "alice")[0] == 0
    with _user_client(cluster, "alice") as alice:
        _until("the user is gone", lambda: _denied(lambda: alice.get(b"cfg/x")), timeout=10)
    status, out = _shardnode(cluster, "user", "list")
    assert status == 0 and "alice" not in out


def _until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.25)


def _put_succeeds(client: Client, key: bytes) -> bool:
    try:
        client.put(key, b"v", timeout=3)
    except ShardnodeError:
        return False
    return True


def test_a_ca_rotation_keeps_the_cluster_up_and_every_reconnect_uses_the_new_ca(cluster: LocalCluster) -> None:
    """`certs rotate begin|issue|finish` while a client writes, with no
    process restarted: no write fails. Then processes restart, which forces
    every kind of link to reconnect under the new CA only: Raft links to a
    restarted worker (it catches up), a router's metrics scrape and
    forwarding to it, a client made before the rotation whose router
    restarted. Channels made before the rotation would present the old CA's
    certificates, which nobody accepts any more."""
    security = cluster.config.security
    old_client = (security.client_cert_file.read_bytes(), security.client_key_file.read_bytes())
    early = Client([cluster.router_addresses["h2"]], cluster=cluster.config, timeout=5)
    failures: list[str] = []
    written = [0]
    stop = threading.Event()

    def write() -> None:
        with Client.from_config(cluster.config_path, timeout=5) as client:
            while not stop.is_set():
                try:
                    client.put(f"rotating-{written[0]}".encode(), b"v")
                    written[0] += 1
                except ShardnodeError as exc:
                    failures.append(str(exc))

    try:
        early.put(b"before-rotation", b"v")
        writer = threading.Thread(target=write, name="writer")
        writer.start()
        try:
            for step in (cert_rotation.begin, cert_rotation.issue, cert_rotation.finish):
                assert step(cluster.config), step.__name__
                # Channels look at the files every second, servers at each handshake.
                time.sleep(2 * CHECK_EVERY + 0.5)
            assert cert_rotation.finish(cluster.config) == []       # a rerun is harmless
        finally:
            stop.set()
            writer.join()
        assert written[0] > 0 and failures == [], failures[:3]

        # The old CA's client certificate is refused by the server: the
        # caller trusts the new CA, so only the server can be refusing.
        address = cluster.router_addresses["h2"]
        with grpc.secure_channel(address, _credentials(cluster, *old_client)) as channel:
            assert _get(channel) == grpc.StatusCode.UNAVAILABLE
        with grpc.secure_channel(address, _credentials(cluster, security.client_cert_file.read_bytes(),
                                                        security.client_key_file.read_bytes())) as channel:
            assert _get(channel) == grpc.StatusCode.OK

        # Restarts force reconnects on every kind of link.
        for key in (("h3", worker_program(0)), ("h2", "router")):
            cluster.kill(key)
        cluster.start_worker("h3", 0)
        cluster.start_host_router("h2")
        _until("the client made before the rotation writes through its restarted router",
               lambda: _put_succeeds(early, b"after-rotation"))
        with Client([cluster.router_addresses["h1"]], cluster=cluster.config, timeout=5) as client:
            client.put(b"after-restart", b"v")
            target = _status(cluster, "h1").commit_index
        _until("the restarted worker catches up over Raft links reconnected under the new CA",
               lambda: _status(cluster, "h3").applied_index >= target)
        with Client([cluster.router_addresses["h3"]], cluster=cluster.config, timeout=5) as client:
            client.put(b"through-h3", b"v")
            # A stale read is served by h3's own (restarted) replica, once it applied the put.
            _until("h3's router reads at its restarted worker",
                   lambda: client.get(b"through-h3", allow_stale=True) == b"v")
        _until("h3's router scrapes its restarted worker",
               lambda: _value(_scrape(cluster, "h3"), "raft_node_health", group="0") == 1)
    finally:
        early.close()
    assert all(process.poll() is None for process in cluster.processes.values())
