#!/usr/bin/env bash
# Regenerate (run from the repository root) the Python stubs from protos/*.proto into OUT (default node/rpc/generated).
# The virtual include path makes the stubs import each other as node.rpc.generated.*.
set -euo pipefail
out=${1:-node/rpc/generated}
python=${PYTHON:-python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python" -m grpc_tools.protoc -I"node/rpc/generated=protos" --python_out="$tmp" --grpc_python_out="$tmp" \
  --pyi_out="$tmp" protos/potluck.proto protos/relay.proto
mkdir -p "$out"
cp "$tmp"/node/rpc/generated/potluck_pb2* "$tmp"/node/rpc/generated/relay_pb2* "$out"/
