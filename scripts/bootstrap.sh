#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian machine, and nothing when all is present.
# Idempotent; every check is a file or version test, so a warm run takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
say() { printf '\033[1mbootstrap:\033[0m %s\n' "$*"; }

# 1. System packages: Vulkan (lavapipe) for native wgpu, Chromium for the browser test,
#    binaryen for wasm-opt.
missing=()
for pkg in mesa-vulkan-drivers libvulkan1 chromium binaryen; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. Rust target for the browser build.
if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  say "adding the wasm32-unknown-unknown target"
  rustup target add wasm32-unknown-unknown
fi

# 3. wasm-bindgen-cli at exactly the wasm-bindgen version in Cargo.lock (the two must match).
want=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
have=$(wasm-bindgen --version 2>/dev/null | awk '{print $2}' || true)
if [ "$want" != "$have" ]; then
  say "installing wasm-bindgen-cli $want (have: ${have:-none})"
  # Not --locked: its lock file names a crate version this registry mirror lacks.
  cargo install wasm-bindgen-cli --version "$want" --force
fi

# 4. npm dependencies (playwright-core only drives /usr/bin/chromium; it downloads nothing).
if [ ! -f node_modules/playwright-core/package.json ]; then
  say "installing npm dependencies"
  npm ci --no-audit --no-fund --loglevel=error
fi
