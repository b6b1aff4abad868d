"""A cluster with mutual TLS on every link: who gets in, who does not, and
that refusals are counted (docs/security.md).

One cluster (3 hosts, one group of 3, a router per host) serves every test
of this module, in order; certificate rotation comes last.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardnode.certs import Authority, init_cluster, issue_certificate, new_authority
from shardnode.client import Client
from shardnode.proto import etcd_rpc_pb2 as etcd_rpc
from shardnode.proto import etcd_rpc_pb2_grpc as etcd_rpc_grpc
from shardnode.proto import kv_pb2, kv_pb2_grpc
from shardnode.proto import worker_pb2 as wpb
from shardnode.proto import worker_pb2_grpc as wpb_grpc
from shardnode.raft.messages import Message, MessageType
from shardnode.security import admin_metadata, channel_credentials, load_admin_credential
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


def test_certificates_rotate_without_a_restart(cluster: LocalCluster) -> None:
    """Everything reissued under a new CA while the cluster runs: new
    connections use the new files, the old client certificate is refused."""
    security = cluster.config.security
    old = (security.client_cert_file.read_bytes(), security.client_key_file.read_bytes(),
           security.ca_file.read_bytes())
    pids = {key: process.pid for key, process in cluster.processes.items()}
    init_cluster(cluster.config, force=True)
    address = cluster.router_addresses["h2"]
    with grpc.secure_channel(address, _credentials(cluster, old[0], old[1], ca=old[2])) as channel:
        assert _get(channel) == grpc.StatusCode.UNAVAILABLE
    deadline = time.monotonic() + 30
    with Client.from_config(cluster.config_path, timeout=5) as client:
        while True:
            try:
                client.put(b"after-rotation", b"v")
                break
            except Exception:
                # Router-to-worker links reconnect with the new certificates as they need to.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert client.get(b"after-rotation") == b"v"
    assert {key: process.pid for key, process in cluster.processes.items()} == pids
    assert all(process.poll() is None for process in cluster.processes.values())
