#!/usr/bin/env bash
# `npm start`: install what is missing, build the browser package, make sure the default model
# exists, serve the page and the model CDN on 127.0.0.1, and print the URL. PORT=... picks
# the port (default 8080).
#
# The default model is models/demo: the demo-world UniFusion trained by `unifusion train`
# (docs/TRAINING.md) and packed by scripts/pack-demo.sh, committed (f16 shards, a few MB).
# models/tiny (random weights, used by the tests) is made here when it is missing, which needs
# the native CLI (a first native build takes a while).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/build-wasm.sh
if [ ! -f models/tiny/manifest.json ]; then
  echo "start: models/tiny is missing; making the tiny random model with the native CLI"
  rm -rf models/tiny
  bash scripts/unifusion.sh make-tiny-model --out models/tiny
fi
if [ ! -f models/demo/manifest.json ]; then
  echo "start: models/demo/manifest.json is missing: restore it (git checkout -- models/demo) or train and pack one (docs/TRAINING.md)" >&2
  exit 2
fi
exec node scripts/serve.mjs "$@"
