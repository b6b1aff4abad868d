"""`make` generates the protobuf/gRPC modules from proto/; they must import as a package."""


def test_generated_kv_modules_import_as_a_package() -> None:
    from shardnode.proto import kv_pb2, kv_pb2_grpc

    request = kv_pb2.PutRequest(key=b"k", value=b"v", session=kv_pb2.Session(client_id=1, sequence=2))
    assert kv_pb2.PutRequest.FromString(request.SerializeToString()) == request
    assert hasattr(kv_pb2_grpc, "KVStub")
