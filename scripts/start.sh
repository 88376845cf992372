#!/usr/bin/env bash
# `npm start`: install what is missing, build the browser package, make sure the default model
# exists, serve the page and the model CDN on 127.0.0.1, and print the URL. PORT=... picks
# the port (default 8080).
#
# The default model is models/tiny: a seeded tiny random-weight model (its images are noise),
# packed into several shards by `unifusion make-tiny-model`, until the trained demo model
# exists. It is committed (under 1 MB), so this script builds it only when it is missing,
# which needs the native CLI (a first native build takes a while).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/build-wasm.sh
if [ ! -f models/tiny/manifest.json ]; then
  echo "start: models/tiny is missing; making the tiny random model with the native CLI"
  rm -rf models/tiny
  bash scripts/unifusion.sh make-tiny-model --out models/tiny
fi
exec node scripts/serve.mjs "$@"
