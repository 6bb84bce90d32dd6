#!/usr/bin/env bash
# Generates the Python stubs (messages, .pyi types, grpc.aio services, Connect services) from
# proto/ into clients/python/tokenfeedback/v1. Never edit the output; rerun `make proto`.
set -euo pipefail
cd "$(dirname "$0")/.."
out=clients/python
gen=$out/tokenfeedback/v1
rm -rf "$gen"
mkdir -p "$gen"
.venv/bin/python -m grpc_tools.protoc -Iproto \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  --plugin=protoc-gen-connectrpc=.venv/bin/protoc-gen-connectrpc \
  --connectrpc_out="$out" --connectrpc_opt=protobuf=google \
  $(find proto -name '*.proto' | sort)
touch "$gen/__init__.py"
echo "generated $(ls "$gen" | grep -c '\.py$') Python files in $gen"
