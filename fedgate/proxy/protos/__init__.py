"""Generated protobuf and gRPC stubs (scripts/gen-protos.sh); do not edit the *_pb2 files."""
