#!/usr/bin/env bash
# Regenerate (run from the repository root) the Python stubs from protos/*.proto into OUT (default common/wire/generated).
# The virtual include path makes the stubs import each other as common.wire.generated.*.
set -euo pipefail
out=${1:-common/wire/generated}
python=${PYTHON:-python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python" -m grpc_tools.protoc -I"common/wire/generated=protos" --python_out="$tmp" --grpc_python_out="$tmp" \
  --pyi_out="$tmp" protos/potluck.proto protos/relay.proto
mkdir -p "$out"
cp "$tmp"/common/wire/generated/potluck_pb2* "$tmp"/common/wire/generated/relay_pb2* "$out"/
