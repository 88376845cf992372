#!/usr/bin/env bash
# Builds the browser package into web/pkg: release wasm32 build, wasm-opt -Oz, then
# wasm-bindgen --target web. `--no-opt` skips wasm-opt (faster local iterations; same code).
#
# wasm-opt runs on rustc's output, before wasm-bindgen: Debian's binaryen (108) rewrites the
# externref table that wasm-bindgen adds into one the browser rejects at start-up
# ("WebAssembly.Table.set(): Argument 1 is invalid for table"). rustc's output has no such table.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
opt=1
[ "${1:-}" = "--no-opt" ] && opt=0

cargo build --release --target wasm32-unknown-unknown -p unifusion-web
wasm="$CARGO_TARGET_DIR/wasm32-unknown-unknown/release/unifusion_web.wasm"
if [ "$opt" = 1 ]; then
  # The feature flags name what rustc's wasm32 target emits by default.
  # wasm-opt takes about 1.5 minutes here; skip it when cargo left the module unchanged.
  opt_wasm="$CARGO_TARGET_DIR/wasm32-unknown-unknown/release/unifusion_web.opt.wasm"
  if [ ! "$opt_wasm" -nt "$wasm" ]; then
    wasm-opt -Oz --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext \
      --enable-mutable-globals --enable-reference-types --enable-multivalue -o "$opt_wasm.tmp" "$wasm"
    mv "$opt_wasm.tmp" "$opt_wasm"
  fi
  wasm="$opt_wasm"
fi
rm -rf web/pkg
wasm-bindgen --target web --no-typescript --out-name unifusion_web --out-dir web/pkg "$wasm"
printf 'build-wasm: web/pkg/unifusion_web_bg.wasm is %s bytes\n' "$(stat -c %s web/pkg/unifusion_web_bg.wasm)"
