#!/usr/bin/env bash
# Installs the system packages the non-Python parts need, with apt-get, and only those missing:
# - the Go client (clients/go): Debian's Go toolchain, its gRPC and protobuf sources (GOPATH mode,
#   see clients/go/README.md) and the two protoc plugins that generate the Go stubs;
# - the labeling page's browser tests: Chromium.
# Node and npm (the TypeScript client, the page) normally come with the machine; checked here.
# Idempotent and quiet when everything is there; `make system-deps` (and so `make test`) runs it.
set -euo pipefail

# Debian packages, each installed only when dpkg says it is not.
PACKAGES=(
  golang-go                   # go 1.19: builds and tests clients/go
  golang-google-grpc-dev      # google.golang.org/grpc sources under /usr/share/gocode
  golang-google-protobuf-dev  # google.golang.org/protobuf sources under /usr/share/gocode
  protoc-gen-go               # protoc plugin: Go messages
  protoc-gen-go-grpc          # protoc plugin: Go gRPC stubs
  chromium                    # headless browser for the labeling page's tests (web/)
  fonts-noto-color-emoji      # emoji glyphs for the page's screenshots (web/)
  fonts-droid-fallback        # CJK glyphs for the page's screenshots (web/)
)

installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

missing=()
for pkg in "${PACKAGES[@]}"; do
  installed "$pkg" || missing+=("$pkg")
done
# Node and npm normally come with the machine (Node 20); Debian's own (18) is the fallback.
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)

if ((${#missing[@]})); then
  echo "system-deps: installing ${missing[*]}"
  if ! command -v apt-get >/dev/null; then
    echo "system-deps: apt-get not found; install these packages by hand: ${missing[*]}" >&2
    exit 1
  fi
  sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null; then
      sudo=(sudo)
    else
      echo "system-deps: not root and no sudo; install these packages by hand: ${missing[*]}" >&2
      exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  # Refresh the package lists only when they are absent or a first attempt fails.
  if ! "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"; then
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
fi

# What the package names above must provide.
for cmd in go protoc-gen-go protoc-gen-go-grpc; do
  command -v "$cmd" >/dev/null || { echo "system-deps: $cmd not on PATH after install" >&2; exit 1; }
done
for dir in google.golang.org/grpc google.golang.org/protobuf; do
  [[ -d /usr/share/gocode/src/$dir ]] || { echo "system-deps: /usr/share/gocode/src/$dir missing" >&2; exit 1; }
done

# Node >= 20 is what the TypeScript client and the page are tested with; 18 (Debian's) still runs them.
node_major=$(node -p 'process.versions.node.split(".")[0]')
if ((node_major < 18)); then
  echo "system-deps: Node >= 20 needed, found $(node --version)" >&2
  exit 1
elif ((node_major < 20)); then
  echo "system-deps: warning: Node $(node --version) found; the clients are tested with Node 20" >&2
fi
