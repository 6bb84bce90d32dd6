#!/usr/bin/env bash
# Runs the go command on this package in GOPATH mode, against Debian's Go sources: the project's
# machines have no Go module proxy, and Debian ships google.golang.org/grpc and /protobuf as
# sources under /usr/share/gocode. gopath/ (not committed) holds a link
# src/tokenfeedback.dev/clients/go -> clients/go, so the package has its import path.
#   bash clients/go/go.sh test -v tokenfeedback.dev/clients/go
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
gopath=$here/gopath
link=$gopath/src/tokenfeedback.dev/clients/go
if [[ ! -L $link ]]; then
  mkdir -p "$(dirname "$link")"
  ln -sfn "$here" "$link"
fi
export GOPATH=$gopath:/usr/share/gocode
export GO111MODULE=off
export GOFLAGS=
export GOBIN=$gopath/bin
# A writable build cache even where $HOME is not.
export GOCACHE=${GOCACHE:-$(go env GOCACHE 2>/dev/null || true)}
[[ -n $GOCACHE && $GOCACHE != off ]] || export GOCACHE=$gopath/cache
# Run inside the package's GOPATH path so relative patterns resolve to its import path.
cd "$link"
export PWD=$link
exec go "$@"
