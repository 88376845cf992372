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
