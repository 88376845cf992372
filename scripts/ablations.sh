#!/usr/bin/env bash
# The DiT ablations of docs/TRAINING.md on this machine, one after another: each variant
# trains the recipe's DiT stage (same seed, same steps) on the frozen tokenizer, VAE and VLM
# of a finished recipe run, then `unifusion eval` scores it with its own inference switch,
# and the recipe's own model is scored under the same eval settings.
#
#   bash scripts/ablations.sh RUN_DIR OUT_DIR [VARIANT...]
#   EVAL_FLAGS="--prompts 16 --seeds 2" bash scripts/ablations.sh /work/train-out/r4 /work/train-out/abl
#
# Writes OUT_DIR/<variant>/ (a run directory: dit/, model/), OUT_DIR/<variant>.json and
# OUT_DIR/<variant>.txt (eval), OUT_DIR/recipe.json (the run's own model). Variants default
# to verifi-off last-layer no-edit-data (the issue's table); plain-loss (no foreground
# weighting) is a fourth, asked for by name. A finished variant (its eval JSON exists) is skipped.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 RUN_DIR OUT_DIR [VARIANT...]" >&2
  exit 2
fi
run=$1
out=$2
shift 2
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(verifi-off last-layer no-edit-data)
U=${UNIFUSION:-"bash $(dirname "$0")/unifusion.sh"}
EVAL_FLAGS=${EVAL_FLAGS:-"--prompts 16 --seeds 2"}
for f in recipe.json tokenizer/report.json vae/report.json vlm/report.json model/config.json; do
  [ -f "$run/$f" ] || { echo "ablations: $run/$f missing (a finished recipe run is needed)" >&2; exit 2; }
done
mkdir -p "$out"

eval_flags() {
  case $1 in
    verifi-off) echo "--no-verifi" ;;
    last-layer) echo "--pooling last-layer" ;;
    *) echo "" ;;
  esac
}

if [ ! -f "$out/recipe.json" ]; then
  echo "ablations: eval of the recipe's own model ($run/model)"
  # shellcheck disable=SC2086
  $U eval --model "$run/model" $EVAL_FLAGS --json "$out/recipe.json.tmp" --quiet > "$out/recipe.txt"
  mv "$out/recipe.json.tmp" "$out/recipe.json"
fi
for v in "${variants[@]}"; do
  case $v in
    verifi-off | last-layer | no-edit-data | plain-loss) ;;
    *) echo "ablations: unknown variant $v (verifi-off, last-layer, no-edit-data, plain-loss)" >&2; exit 2 ;;
  esac
  [ -f "$out/$v.json" ] && { echo "ablations: $v done, skipped"; continue; }
  dir="$out/$v"
  mkdir -p "$dir"
  for s in tokenizer vae vlm; do
    [ -d "$dir/$s" ] || cp -r "$run/$s" "$dir/"
  done
  echo "ablations: $v, DiT stage ($(date +%T))"
  $U train --out "$dir" --seed 0 --stages dit --ablation "$v" --quiet
  echo "ablations: $v, eval ($(date +%T))"
  # shellcheck disable=SC2086
  $U eval --model "$dir/model" $EVAL_FLAGS $(eval_flags "$v") --json "$out/$v.json.tmp" --quiet > "$out/$v.txt"
  mv "$out/$v.json.tmp" "$out/$v.json"
done
echo "ablations: done ($(date +%T))"
