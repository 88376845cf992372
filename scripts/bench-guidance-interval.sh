#!/usr/bin/env bash
# End-to-end `generate` on the default model (models/demo: 64 px, 20 steps, guidance 3), with
# guidance at every step against guidance only at σ in (0.22, 0.84] (13 of the 20 steps: 33
# DiT forwards instead of 40), interleaved, RUNS seeds each; prints each setting's median
# wall time (the whole command: process start, model load, the VLM's rewrite, sampling,
# decode, PNG) and the ratio. docs/BENCHMARKS.md "Guidance in a limited interval".
#
#   bash scripts/bench-guidance-interval.sh [RUNS]
set -euo pipefail
runs=${1:-7}
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo test --workspace --no-run --quiet >&2
bin="$CARGO_TARGET_DIR/debug/unifusion"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
prompt="a big red circle in the top left and a small blue square in the bottom right, on a white background"
for seed in $(seq 1 "$runs"); do
  for interval in 0,1 0.22,0.84; do
    start=$(date +%s.%N)
    "$bin" generate --prompt "$prompt" --guidance-interval "$interval" --seed "$seed" \
      --backend flex --quiet --out "$out/x.png" >/dev/null
    end=$(date +%s.%N)
    awk -v i="$interval" -v s="$start" -v e="$end" 'BEGIN {printf "%s %.3f\n", i, e - s}' >>"$out/times"
  done
done
median() { grep "^$1 " "$out/times" | cut -d' ' -f2 | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
every=$(median 0,1)
inside=$(median 0.22,0.84)
echo "every step:    median ${every} s over ${runs} seeds"
echo "(0.22, 0.84]:  median ${inside} s over ${runs} seeds"
awk -v a="$every" -v b="$inside" 'BEGIN {printf "ratio (every step ÷ interval): %.2f\n", a / b}'
