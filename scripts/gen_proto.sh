#!/usr/bin/env bash
# Generates the Python stubs (messages, .pyi types, grpc.aio services, Connect services) from
# proto/ into clients/python/tokenfeedback/v1 (scripts/gen_proto.py, which the wheel build uses
# too). Never edit the output; rerun `make proto`.
set -euo pipefail
cd "$(dirname "$0")/.."
gen=clients/python/tokenfeedback/v1
rm -rf "$gen"
.venv/bin/python scripts/gen_proto.py clients/python
echo "generated $(ls "$gen" | grep -c '\.py$') Python files in $gen"
