#!/usr/bin/env bash
# Builds the labeling page into web/dist (index.html, style.css, app.js): installs the pinned npm
# packages (package-lock.json) when missing or changed, generates the TypeScript messages and
# service descriptors from proto/ with protoc-gen-es through the venv's protoc, type-checks, and
# bundles with esbuild. Nothing is fetched at run time: the page is these three static files.
set -euo pipefail
cd "$(dirname "$0")/../web"
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
rm -rf gen dist
mkdir -p gen dist
../.venv/bin/python -m grpc_tools.protoc -I../proto \
  --plugin=protoc-gen-es=node_modules/.bin/protoc-gen-es --es_out=gen --es_opt=target=ts \
  $(cd .. && find proto -name '*.proto' | sort | sed 's|^proto/||')
node_modules/.bin/tsc --noEmit -p .
node_modules/.bin/esbuild src/main.ts --bundle --minify --sourcemap --format=esm --target=es2022 \
  --outfile=dist/app.js --log-level=warning
cp src/index.html src/style.css dist/
echo "built the labeling page in web/dist ($(du -sk dist | cut -f1) kB)"
