#!/usr/bin/env bash
# `npm test`: everything, from a fresh machine. Native tests (wgpu on lavapipe, Flex on the
# CPU), the wasm build, then the JavaScript and headless-Chromium tests against the served page.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
source scripts/env.sh
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "native tests (cargo test --workspace)"
cargo test --workspace

step "wasm build"
bash scripts/build-wasm.sh

step "web and browser tests (node --test)"
node --test --test-reporter=spec tests/
