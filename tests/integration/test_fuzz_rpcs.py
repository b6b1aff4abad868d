"""Every router and worker RPC with random protobuf fields, against real
processes: each call gets an answer or a deliberate status (never UNKNOWN or
INTERNAL, the marks of an unhandled exception), no process dies, and the
cluster still serves afterwards. FUZZ_EXAMPLES=N for a longer run."""

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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    local = LocalCluster(tmp_path_factory.mktemp("fuzz") / "cluster", hosts=3, groups=1, replicas=3)
    with local.running():
        yield local


ROUTER_RPCS = ["Put", "Get", "Delete", "Batch", "Status", "ShardMap"]
WORKER_RPCS = ["Execute", "Status", "TransferLeader", "Metrics"]


def _request_type(service, method: str) -> Descriptor:
    return service.methods_by_name[method].input_type


def _call(stub_method, request) -> grpc.StatusCode:
    try:
        stub_method(request, timeout=3)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


_FUZZ = settings(max_examples=examples(25), deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                        HealthCheck.data_too_large])


@pytest.mark.parametrize("method", ROUTER_RPCS)
def test_router_rpcs_with_random_fields(cluster: LocalCluster, method: str) -> None:
    service = kv_pb2.DESCRIPTOR.services_by_name["KV"]
    with cluster.client_channel("h1") as channel:
        stub_method = getattr(kv_pb2_grpc.KVStub(channel), method)

        @_FUZZ
        @given(messages(_request_type(service, method)))
        def run(request) -> None:
            code = _call(stub_method, request)
            assert code in ALLOWED, (method, request, code)

        run()
    _still_serving(cluster)


@pytest.mark.parametrize("method", WORKER_RPCS)
def test_worker_rpcs_with_random_fields(cluster: LocalCluster, method: str) -> None:
    service = wpb.DESCRIPTOR.services_by_name["Worker"]
    # Half the requests name this cluster and group, so that they get past the first check.
    hints = {"cluster": st.just(cluster.name) | st.text(max_size=10), "group": st.just(0) | st.integers(0, (1 << 32) - 1)}
    with grpc.insecure_channel(cluster.config.host("h2").worker_address(0)) as channel:
        stub_method = getattr(wpb_grpc.WorkerStub(channel), method)

        @_FUZZ
        @given(messages(_request_type(service, method), hints))
        def run(request) -> None:
            code = _call(stub_method, request)
            assert code in ALLOWED, (method, request, code)
            if method == "TransferLeader":
                assert code == grpc.StatusCode.UNAUTHENTICATED      # no admin credential was sent

        run()
    _still_serving(cluster)


def _still_serving(cluster: LocalCluster) -> None:
    assert all(process.poll() is None for process in cluster.processes.values()), cluster.log_tail()
    with Client.from_config(cluster.config_path, timeout=10) as client:
        client.put(b"after-fuzz", b"ok")
        assert client.get(b"after-fuzz") == b"ok"
