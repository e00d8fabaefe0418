#!/usr/bin/env bash
# Regenerates the committed stubs from proto/byzfed/v1/*.proto.
# Usage: proto/generate.sh [--check]   (--check: fail if the committed stubs drift)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
out=$root/proto
if [ "${1:-}" = "--check" ]; then
  out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
  mkdir -p "$out/proto"; out=$out/proto
fi
(cd "$root" && "$py" -m grpc_tools.protoc -I . --python_out="$out/.." --pyi_out="$out/.." --grpc_python_out="$out/.." proto/byzfed/v1/federation.proto proto/byzfed/v1/adversary.proto)
if [ "${1:-}" = "--check" ]; then
  for f in {federation,adversary}_pb2.py {federation,adversary}_pb2.pyi {federation,adversary}_pb2_grpc.py; do
    if ! diff -q "$out/byzfed/v1/$f" "$root/proto/byzfed/v1/$f" >/dev/null; then
      echo "proto stubs drift: proto/byzfed/v1/$f differs from what proto/generate.sh produces" >&2
      exit 1
    fi
  done
  echo "proto stubs match the .proto"
fi
