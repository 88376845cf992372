# Shared environment for the project's scripts (sourced, not run).
# One cargo target dir for every build. CI keeps it outside the clone (under /var/cache) when
# that is writable, so a second run on the same machine reuses the compiled burn.
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
  if mkdir -p /var/cache/unifusion-target 2>/dev/null && [ -w /var/cache/unifusion-target ]; then
    export CARGO_TARGET_DIR=/var/cache/unifusion-target
  else
    export CARGO_TARGET_DIR="$PWD/target"
  fi
fi
export PATH="$HOME/.cargo/bin:$PATH"
# Never let a tool download a browser of its own: we use Debian's Chromium.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
export CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
# Mesa's Vulkan loader complains on every start without a runtime dir; give it a private one.
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  export XDG_RUNTIME_DIR="/tmp/xdg-runtime-$(id -u)"
  mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
fi
