"""Every router and worker RPC with random protobuf fields, against real
processes: each call gets an answer or a deliberate status (never UNKNOWN or
INTERNAL, the marks of an unhandled exception), no process dies, and the
cluster still serves afterwards. The RPCs are read from the services'
descriptors, so a new one is fuzzed without being listed here; streaming
ones get a stream of random messages. Everything runs against a cluster
without TLS and one with it (the client's certificate for the router, a
host's for the workers). Worker RPCs are fuzzed without and with the admin
credential (with it, node ids are kept away from the members', so that the
fuzz cannot remove the group from under the test).
FUZZ_EXAMPLES=N for a longer run."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardnode.client import Client
from shardnode.proto import kv_pb2, kv_pb2_grpc
from shardnode.proto import worker_pb2 as wpb
from shardnode.proto import worker_pb2_grpc as wpb_grpc
from shardnode.security import ADMIN_METHODS, admin_metadata, load_admin_credential, sync_channel

from ..fuzzing import examples
from .harness import LocalCluster

pytestmark = [pytest.mark.timeout(600), pytest.mark.xdist_group("fuzz_rpcs")]

# Deliberate answers. UNKNOWN and INTERNAL are not among them: gRPC gives
# those when a handler raised something it did not mean to.
ALLOWED = frozenset({
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
})

_INTS = {
    FieldDescriptor.TYPE_INT32: st.integers(-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_SINT32: st.integers(-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_SFIXED32: st.integers(-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_UINT32: st.integers(0, (1 << 32) - 1),
    FieldDescriptor.TYPE_FIXED32: st.integers(0, (1 << 32) - 1),
    FieldDescriptor.TYPE_INT64: st.integers(-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_SINT64: st.integers(-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_SFIXED64: st.integers(-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_UINT64: st.integers(0, (1 << 64) - 1) | st.integers(0, 5),
    FieldDescriptor.TYPE_FIXED64: st.integers(0, (1 << 64) - 1),
}


def _scalar(field: FieldDescriptor, hints: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    if field.name in hints:
        return hints[field.name]
    kind = field.type
    if kind in _INTS:
        return _INTS[kind]
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64)
    if kind == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=20)
    if kind == FieldDescriptor.TYPE_BYTES:
        # Mostly small; sometimes past the 4 KiB key limit.
        return st.binary(max_size=16) | st.binary(min_size=4090, max_size=4200)
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values]) | st.integers(-5, 100)
    raise AssertionError(f"no strategy for {field.full_name}")


def messages(descriptor: Descriptor, hints: dict[str, st.SearchStrategy] | None = None,
             depth: int = 0) -> st.SearchStrategy:
    """Any message of `descriptor`: each field absent or random, nested and
    repeated fields too (`hints` narrows fields by name)."""
    hints = hints or {}
    cls = message_factory.GetMessageClass(descriptor)
    optional: dict[str, st.SearchStrategy] = {}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 3:
                continue
            value = messages(field.message_type, hints, depth + 1)
        else:
            value = _scalar(field, hints)
        optional[field.name] = st.lists(value, max_size=5) if field.is_repeated else value

    def build(values: dict) -> object:
        message = cls()
        for name, value in values.items():
            field = descriptor.fields_by_name[name]
            target = getattr(message, name) if field.is_repeated or field.type == FieldDescriptor.TYPE_MESSAGE \
                else None
            if field.is_repeated and field.type == FieldDescriptor.TYPE_MESSAGE:
                for item in value:
                    target.add().CopyFrom(item)
            elif field.is_repeated:
                target.extend(value)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                target.CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return st.fixed_dictionaries({}, optional=optional).map(build)


@pytest.fixture(scope="module", params=[False, True], ids=["plaintext", "tls"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The same cluster without and with TLS: with it, the router is called
    with the client certificate and the workers with a host's (h1's), as a
    router calls them."""
    local = LocalCluster(tmp_path_factory.mktemp("fuzz") / "cluster", hosts=3, groups=1, replicas=3,
                         tls=request.param)
    with local.running():
        yield local


ROUTER_SERVICE = kv_pb2.DESCRIPTOR.services_by_name["KV"]
WORKER_SERVICE = wpb.DESCRIPTOR.services_by_name["Worker"]
ROUTER_RPCS = [m.name for m in ROUTER_SERVICE.methods]
WORKER_RPCS = [m.name for m in WORKER_SERVICE.methods]


def test_every_rpc_of_both_services_is_fuzzed() -> None:
    # What the audit of issue 20 found missing, among all the others.
    assert {"BatchStream", "Processes"} <= set(ROUTER_RPCS)
    assert {"ChangeMembership", "Retire", "Shard", "ExportScan", "ExportDelta", "ShardInfo"} <= set(WORKER_RPCS)


def _request_type(service, method: str) -> Descriptor:
    return service.methods_by_name[method].input_type


def _requests(service, method: str, hints: dict | None = None) -> st.SearchStrategy:
    """One random request, or a list of them for a method that takes a stream."""
    one = messages(_request_type(service, method), hints)
    return st.lists(one, max_size=3) if service.methods_by_name[method].client_streaming else one


def _call(stub_method, request, metadata=None) -> grpc.StatusCode:
    try:
        if isinstance(request, list):
            for _ in stub_method(iter(request), timeout=3, metadata=metadata):
                pass
        else:
            stub_method(request, timeout=3, metadata=metadata)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


_FUZZ = settings(max_examples=examples(25), deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                        HealthCheck.data_too_large])


@pytest.mark.parametrize("method", ROUTER_RPCS)
def test_router_rpcs_with_random_fields(cluster: LocalCluster, method: str) -> None:
    service = ROUTER_SERVICE
    with cluster.client_channel("h1") as channel:
        stub_method = getattr(kv_pb2_grpc.KVStub(channel), method)

        @_FUZZ
        @given(_requests(service, method))
        def run(request) -> None:
            code = _call(stub_method, request)
            assert code in ALLOWED, (method, request, code)

        run()
    _still_serving(cluster)


@pytest.mark.parametrize("credential", [False, True], ids=["no-credential", "admin-credential"])
@pytest.mark.parametrize("method", WORKER_RPCS)
def test_worker_rpcs_with_random_fields(cluster: LocalCluster, method: str, credential: bool) -> None:
    service = WORKER_SERVICE
    # Half the requests name this cluster and group, so that they get past the first check.
    hints = {"cluster": st.just(cluster.name) | st.text(max_size=10), "group": st.just(0) | st.integers(0, (1 << 32) - 1)}
    metadata = None
    if credential:
        metadata = admin_metadata(load_admin_credential(cluster.config.security))
        # With the credential an admin RPC does what it says: no id of a member (1..3), so
        # that it refuses (not a member, not this node) rather than remove or retire one.
        far = st.integers(1000, (1 << 63) - 1)
        hints |= {"node_id": far, "target_node_id": far}
    admin = f"/{service.full_name}/{method}" in ADMIN_METHODS
    with sync_channel(cluster.config.host("h2").worker_address(0), cluster.config.security, "h1") as channel:
        stub_method = getattr(wpb_grpc.WorkerStub(channel), method)

        @_FUZZ
        @given(_requests(service, method, hints))
        def run(request) -> None:
            code = _call(stub_method, request, metadata)
            assert code in ALLOWED, (method, request, code)
            if admin and not credential:
                assert code == grpc.StatusCode.UNAUTHENTICATED      # no admin credential was sent
            if credential:
                assert code != grpc.StatusCode.UNAUTHENTICATED

        run()
    _still_serving(cluster)


def _still_serving(cluster: LocalCluster) -> None:
    assert all(process.poll() is None for process in cluster.processes.values()), cluster.log_tail()
    with Client.from_config(cluster.config_path, timeout=10) as client:
        client.put(b"after-fuzz", b"ok")
        assert client.get(b"after-fuzz") == b"ok"
