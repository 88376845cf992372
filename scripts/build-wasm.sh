#!/usr/bin/env bash
# Builds the browser package into web/pkg: release wasm32 build, wasm-bindgen --target web,
# then wasm-opt -Oz. `--no-opt` skips wasm-opt (faster local iterations; same code).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
opt=1
[ "${1:-}" = "--no-opt" ] && opt=0

cargo build --release --target wasm32-unknown-unknown -p unifusion-web
wasm="$CARGO_TARGET_DIR/wasm32-unknown-unknown/release/unifusion_web.wasm"
rm -rf web/pkg
wasm-bindgen --target web --no-typescript --out-dir web/pkg "$wasm"
if [ "$opt" = 1 ]; then
  # The feature flags name what rustc's wasm32 target emits by default.
  wasm-opt -Oz --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext \
    --enable-mutable-globals --enable-reference-types --enable-multivalue \
    -o web/pkg/unifusion_web_bg.wasm.opt web/pkg/unifusion_web_bg.wasm
  mv web/pkg/unifusion_web_bg.wasm.opt web/pkg/unifusion_web_bg.wasm
fi
printf 'build-wasm: web/pkg/unifusion_web_bg.wasm is %s bytes\n' "$(stat -c %s web/pkg/unifusion_web_bg.wasm)"
