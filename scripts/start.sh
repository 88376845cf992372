#!/usr/bin/env bash
# `npm start`: install what is missing, build the browser package, serve the page and the
# model CDN on 127.0.0.1, and print the URL. PORT=... picks the port (default 8080).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/build-wasm.sh
exec node scripts/serve.mjs "$@"
