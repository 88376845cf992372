#!/usr/bin/env bash
# Training-step benchmark: seconds per step of the recipe's VAE, VLM and DiT stages with the
# batch split over 1, 2 and 4 threads (`--vae-shards`, `--vlm-shards`, `--dit-shards`),
# median of REPEATS runs of STEPS steps each, and the ratio to one thread from the same run.
# The stage `dit-reuse` instead times the DiT at the recipe's 4 threads with each batch
# serving 1, 2 and 4 steps (`--dit-reuse`; ratio to 1; give STEPS a multiple of 16).
# The stage `dit-vae` times the recipe's DiT on RUN's VAE and then on the VAE of each run in
# $VAE_RUNS (space-separated; e.g. a 2× VAE: more image tokens), its compression passed as
# `--vae-downscale` / `--vae-latent-channels`; an entry `DIR:P` also packs P × P latent cells
# a DiT token (`--dit-patch-size P`; the recipe's 2 otherwise); ratio to RUN's VAE.
#
#   bash scripts/bench-train.sh RUN [STEPS] [REPEATS] [STAGES]
#
# RUN is a finished recipe run (its tokenizer/, and vae/ + vlm/ for the DiT, are copied; the
# DiT trains on them frozen). STAGES defaults to "vae vlm dit". Uses the built CLI
# ($UNIFUSION_BIN, or target/debug/unifusion). Time is the training loop's own (the stage's
# report.json `seconds`, checkpoint writes included; setup and evaluation not).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

run="${1:?usage: bench-train.sh RUN [STEPS] [REPEATS] [STAGES]}"
steps="${2:-30}"
repeats="${3:-3}"
stages="${4:-vae vlm dit}"
bin="${UNIFUSION_BIN:-$CARGO_TARGET_DIR/debug/unifusion}"
[ -x "$bin" ] || { echo "no CLI at $bin: cargo build -p unifusion-cli first" >&2; exit 1; }
[ -f "$run/tokenizer/tokenizer.json" ] || { echo "$run has no tokenizer/tokenizer.json" >&2; exit 1; }
case " $stages " in
  *" dit "* | *" dit-reuse "* | *" dit-vae "*)
    for need in vae vlm; do
      [ -f "$run/$need/report.json" ] || { echo "$run/$need is not a finished stage" >&2; exit 1; }
    done
    ;;
esac
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# `--vae-downscale PX --vae-latent-channels C` for a finished VAE stage's directory.
vae_flags() {
  python3 -c 'import json, sys
v = json.load(open(sys.argv[1]))["vae"]["vae"]
print(2 ** (len(v["decoder_block_out_channels"]) - 1), v["latent_channels"])' "$1/stage.json"
}

echo "| stage | threads (dit-reuse: steps a batch; dit-vae: VAE px, channels, DiT patch) | s/step (median of $repeats × $steps steps) | speed-up |"
echo "|---|---:|---:|---:|"
for stage in $stages; do
  base=""
  variants="1 2 4"
  if [ "$stage" = dit-vae ]; then
    variants="$run/vae"
    for other in ${VAE_RUNS:-}; do
      case "$other" in
        *:*) variants="$variants ${other%:*}/vae:${other##*:}" ;;
        *) variants="$variants $other/vae" ;;
      esac
    done
  fi
  for variant in $variants; do
    times=()
    for r in $(seq "$repeats"); do
      out="$scratch/$stage-${variant//\//_}-$r"
      mkdir -p "$out"
      cp -r "$run/tokenizer" "$out/"
      case "$stage" in
        vae) flags=(--steps "$steps" --vae-shards "$variant") ;;
        vlm) flags=(--steps "$steps" --vlm-shards "$variant") ;;
        dit)
          cp -r "$run/vae" "$run/vlm" "$out/"
          flags=(--dit-steps "$steps" --dit-shards "$variant")
          ;;
        dit-reuse)
          cp -r "$run/vae" "$run/vlm" "$out/"
          flags=(--dit-steps "$steps" --dit-shards 4 --dit-reuse "$variant")
          ;;
        dit-vae)
          vae="${variant%%:*}"
          patch=2
          [ "$vae" = "$variant" ] || patch="${variant##*:}"
          cp -r "$vae" "$run/vlm" "$out/"
          read -r px channels < <(vae_flags "$vae")
          flags=(--dit-steps "$steps" --vae-downscale "$px" --vae-latent-channels "$channels"
            --dit-patch-size "$patch")
          ;;
        *) echo "unknown stage $stage" >&2; exit 2 ;;
      esac
      name="${stage%-*}"
      "$bin" train --out "$out" --stages "$name" --quiet "${flags[@]}" >/dev/null
      secs=$(sed -n 's/^  "seconds": \([0-9.]*\).*/\1/p' "$out/$name/report.json")
      times+=("$(awk -v s="$secs" -v n="$steps" 'BEGIN {print s / n}')")
      rm -rf "$out"
    done
    m=$(printf '%s\n' "${times[@]}" | median)
    [ -n "$base" ] || base="$m"
    label="$variant"
    [ "$stage" != dit-vae ] || label="$(vae_flags "${variant%%:*}" | tr ' ' ','), patch ${patch}"
    printf '| %s | %s | %.3f | %.2f× |\n' "$stage" "$label" "$m" "$(awk -v b="$base" -v m="$m" 'BEGIN {print b / m}')"
  done
done
