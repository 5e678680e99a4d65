#!/usr/bin/env bash
# Regenerate the protobuf/gRPC stubs under fedgate/proxy/protos (committed to the tree).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
export PATH="$(dirname "$PY"):$PATH"
"$PY" -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
    fedgate/proxy/protos/osx.proto fedgate/proxy/protos/basic_meta.proto \
    fedgate/proxy/protos/proxy.proto fedgate/proxy/protos/transfer.proto
