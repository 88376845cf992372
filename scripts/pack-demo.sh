#!/usr/bin/env bash
# Packs a finished training run (`unifusion train --out RUN`, docs/TRAINING.md) as the embedded
# default model: f16 shards of at most 1 MiB (so the page really streams several), the
# tokenizer beside them, every tensor checked against the run's config. The model version is the
# run directory's name and seed (`r27-seed-0`), so the page and `inspect` tell models apart.
#
#   bash scripts/pack-demo.sh /work/train-out/r2 [models/demo]
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:?usage: pack-demo.sh RUN_DIR [OUT_DIR]}
out=${2:-models/demo}
model="$run/model"
for f in config.json tokenizer.json vlm.safetensors transformer.safetensors vae.safetensors; do
  [ -f "$model/$f" ] || { echo "pack-demo: $model/$f is missing (has the recipe finished?)" >&2; exit 2; }
done
seed=$(sed -n 's/^ *"seed": *\([0-9]*\).*/\1/p' "$run/recipe.json" | head -1)
rm -rf "$out"
bash scripts/unifusion.sh pack \
  --from "internvl-hf=$model/vlm.safetensors" \
  --from "krea2-diffusers=$model/transformer.safetensors" \
  --from "vae-diffusers=$model/vae.safetensors" \
  --config "$model/config.json" --tokenizer "$model/tokenizer.json" \
  --dtype f16 --shard-size-mib 1 \
  --model-id unifusion-demo-world --model-version "$(basename "$(cd "$run" && pwd)")-seed-${seed:-0}" \
  --out "$out"
du -sh "$out"
