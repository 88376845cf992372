#!/usr/bin/env bash
# Runs the native `unifusion` command, building it first with the same package selection as
# `npm test` (`cargo test --workspace`). Another selection (`cargo run -p unifusion-cli`) can
# unify shared dependencies' features differently and recompile all of burn (~16 minutes).
# Paths in the arguments are relative to the directory you call it from.
#
#   bash scripts/unifusion.sh bench kernels
set -euo pipefail
pushd "$(dirname "$0")/.." >/dev/null
source scripts/env.sh
cargo test --workspace --no-run --quiet >&2
popd >/dev/null
exec "$CARGO_TARGET_DIR/debug/unifusion" "$@"
