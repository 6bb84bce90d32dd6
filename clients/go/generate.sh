#!/usr/bin/env bash
# Generates the Go stubs (protoc-gen-go messages, protoc-gen-go-grpc clients) from proto/ into
# tokenfeedbackv1/ (package tokenfeedbackv1, import path tokenfeedback.dev/clients/go/tokenfeedbackv1),
# through the protoc that grpcio-tools ships in the project's venv. Build output, never edited,
# not committed. The proto's go_package ("tokenfeedback/v1") is remapped with M options so the
# stubs live inside this module.
set -euo pipefail
cd "$(dirname "$0")"
root=../..
python=${TOKENFEEDBACK_PYTHON:-$root/.venv/bin/python}
module=tokenfeedback.dev/clients/go
if ! "$python" -c 'import grpc_tools' 2>/dev/null; then
  echo "generate: $python has no grpc_tools; run 'make setup' in the repository root first" >&2
  exit 1
fi
for plugin in protoc-gen-go protoc-gen-go-grpc; do
  command -v "$plugin" >/dev/null || { echo "generate: $plugin not found; run 'make system-deps'" >&2; exit 1; }
done
protos=$(cd "$root/proto" && find . -name '*.proto' | sed 's|^\./||' | sort)
mapping=()
for proto in $protos; do
  mapping+=("--go_opt=M$proto=$module/tokenfeedbackv1" "--go-grpc_opt=M$proto=$module/tokenfeedbackv1")
done
rm -rf tokenfeedbackv1
"$python" -m grpc_tools.protoc -I"$root/proto" \
  --plugin=protoc-gen-go="$(command -v protoc-gen-go)" \
  --plugin=protoc-gen-go-grpc="$(command -v protoc-gen-go-grpc)" \
  --go_out=. --go_opt=module=$module \
  --go-grpc_out=. --go-grpc_opt=module=$module \
  "${mapping[@]}" $protos
echo "generated $(ls tokenfeedbackv1 | wc -l) Go files in clients/go/tokenfeedbackv1"
