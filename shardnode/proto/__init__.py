"""Generated protobuf and gRPC code (built by `make proto` from ../../proto/*.proto)."""
