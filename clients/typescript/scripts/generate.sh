#!/usr/bin/env bash
# Generates the TypeScript message types and service descriptors from proto/ into gen/ with
# protoc-gen-es (the same generator the labeling page uses), through the protoc that grpcio-tools
# ships in the project's venv. gen/ is build output: never edit it, rerun `npm run build`.
set -euo pipefail
cd "$(dirname "$0")/.."
root=../..
python=${TOKENFEEDBACK_PYTHON:-$root/.venv/bin/python}
if ! "$python" -c 'import grpc_tools' 2>/dev/null; then
  echo "generate: $python has no grpc_tools; run 'make setup' in the repository root first" >&2
  exit 1
fi
rm -rf gen
mkdir -p gen
"$python" -m grpc_tools.protoc -I"$root/proto" \
  --plugin=protoc-gen-es=node_modules/.bin/protoc-gen-es \
  --es_out=gen --es_opt=target=ts,import_extension=js \
  $(cd "$root/proto" && find . -name '*.proto' | sed 's|^\./||' | sort)
echo "generated $(find gen -name '*.ts' | wc -l) TypeScript files in clients/typescript/gen"
