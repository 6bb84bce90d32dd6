#!/usr/bin/env bash
# Builds the Go client: stubs (when proto/ changed), vet, the package, its tests (compiled, not
# run: they need servers, see tests/clients/test_other_languages.py), and cmd/example into
# gopath/bin/example. `make clients-go` runs this.
set -euo pipefail
cd "$(dirname "$0")"
if [[ ! -f tokenfeedbackv1/trainer_grpc.pb.go ]] || [[ -n $(find ../../proto -name '*.proto' -newer tokenfeedbackv1/trainer_grpc.pb.go) ]]; then
  bash generate.sh
fi
pkgs=(tokenfeedback.dev/clients/go tokenfeedback.dev/clients/go/cmd/example)
bash go.sh vet "${pkgs[@]}"
bash go.sh build -o gopath/bin/example tokenfeedback.dev/clients/go/cmd/example
bash go.sh test -count=1 -run '^$' "${pkgs[@]}" >/dev/null
echo "built clients/go (package, tests, gopath/bin/example)"
