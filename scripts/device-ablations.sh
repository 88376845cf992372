#!/usr/bin/env bash
# The DiT ablations of issue 8 (docs/TRAINING.md, "Ablations"), run on a lent machine with
# more cores (or a GPU) than the 2-core workstation, as one prepared script.
#
# Payload (carried, built on the workstation by `scripts/device-ablations.sh --pack DIR`):
#   test-artifacts/device/unifusion.xz   the stripped CLI
#   test-artifacts/device/frozen/        tokenizer/tokenizer.json, vae/autoencoder.safetensors,
#                                        vae/decoder.safetensors, vlm/vlm.safetensors of one recipe run
#
# On the lent machine: probes the DiT step time on wgpu and on Flex, picks the faster, sizes
# the step count to the time left, trains the four variants side by side (default: recipe,
# verifi-off, last-layer, no-edit-data; VARIANTS picks up to four of the names below, e.g. the
# tuning runs "recipe tmean05 tmean10 lr2e3"; same seed, same frozen VLM and VAE, same steps),
# evaluates each with `unifusion eval` and writes everything under $OUT. TRAIN_SECONDS bounds
# the training. It also records what the machine offers a wgpu build (Vulkan ICDs, GPU).
set -euo pipefail

PAYLOAD=test-artifacts/device
if [ "${1:-}" = "--pack" ]; then
  run=${2:?usage: device-ablations.sh --pack RECIPE_OUT_DIR}
  bin=${UNIFUSION_BIN:-/var/cache/unifusion-target/debug/unifusion}
  rm -rf "$PAYLOAD" && mkdir -p "$PAYLOAD/frozen/tokenizer" "$PAYLOAD/frozen/vae" "$PAYLOAD/frozen/vlm"
  strip -o "$PAYLOAD/unifusion" "$bin"
  xz -T2 -3 "$PAYLOAD/unifusion"
  cp "$run/tokenizer/tokenizer.json" "$PAYLOAD/frozen/tokenizer/"
  cp "$run/vae/autoencoder.safetensors" "$run/vae/decoder.safetensors" "$PAYLOAD/frozen/vae/"
  cp "$run/vlm/vlm.safetensors" "$PAYLOAD/frozen/vlm/"
  du -sh "$PAYLOAD"
  exit 0
fi

OUT=${OUT:?set OUT}
TRAIN_SECONDS=${TRAIN_SECONDS:-240}
EVAL_FLAGS=${EVAL_FLAGS:---prompts 12 --seeds 2}
EVAL_SECONDS=${EVAL_SECONDS:-150}
EXTRA=${EXTRA:-}   # e.g. --tiny for a local dry run
work=$(mktemp -d)
xz -dc "$PAYLOAD/unifusion.xz" > "$work/unifusion" && chmod +x "$work/unifusion"
U="$work/unifusion"
nproc > "$OUT/nproc.txt"
(nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 || true) > "$OUT/gpu.txt"
{ echo "# Vulkan ICD manifests"; ls /usr/share/vulkan/icd.d /etc/vulkan/icd.d 2>&1
  echo "# loader"; ldconfig -p 2>&1 | grep -i vulkan || echo "no libvulkan in the linker cache"; } \
  > "$OUT/vulkan.txt" 2>&1 || true

seed_dir() { mkdir -p "$1" && cp -r "$PAYLOAD/frozen/." "$1/"; }

# Probe: 12 DiT steps per backend; the step time is the stage's own training seconds
# (report.json), setup and its closing quick evaluation excluded.
probe() {
  local backend=$1 dir="$work/probe-$1"
  seed_dir "$dir"
  if timeout 120 "$U" train --out "$dir" --stages dit --dit-steps 12 --backend "$backend" --quiet $EXTRA \
      > "$OUT/probe-$backend.log" 2>&1; then
    sed -n 's/.*"seconds": *\([0-9.]*\).*/\1/p' "$dir/dit/report.json" | head -1
  else
    echo 9999
  fi
}
if [ -n "${STEPS:-}" ]; then
  # Known rate (an earlier probe): no probing, all the time for training.
  backend=${BACKEND:-flex}; steps=$STEPS
else
  # wgpu needs a Vulkan ICD here; without one its probe is skipped, not waited for.
  if ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json > /dev/null 2>&1; then
    probe wgpu > "$work/t_wgpu" &
  else
    echo 9999 > "$work/t_wgpu"
  fi
  RAYON_NUM_THREADS=4 probe flex > "$work/t_flex" &
  wait
  t_wgpu=$(cat "$work/t_wgpu"); t_wgpu=${t_wgpu:-9999}
  t_flex=$(cat "$work/t_flex"); t_flex=${t_flex:-9999}
  echo "probe, seconds for 12 DiT steps: wgpu $t_wgpu, flex (4 threads) $t_flex" | tee "$OUT/probe.txt"
  read -r backend t < <(awk -v w="$t_wgpu" -v f="$t_flex" 'BEGIN { if (f < w) print "flex", f; else print "wgpu", w }')
  # Four runs share the machine (one GPU, or 16 cores at 4 threads each): plan for 2/3 of the
  # probe's rate so they finish inside the hard limit of TRAIN_SECONDS + 60.
  steps=$(awk -v T="$TRAIN_SECONDS" -v t="$t" 'BEGIN { s = int(T / (t / 12 * 1.5)); if (s > 1200) s = 1200; if (s < 20) s = 20; print s }')
fi
echo "backend $backend, $steps steps per variant" | tee -a "$OUT/probe.txt"

declare -A flags=([recipe]="" [verifi-off]="--ablation verifi-off" [last-layer]="--ablation last-layer"
  [no-edit-data]="--ablation no-edit-data" [theta10]="--dit-rope-theta 10"
  [tmean05]="--dit-t-mean 0.5" [tmean10]="--dit-t-mean 1.0" [lr2e3]="--dit-lr 2e-3")
declare -A evalflags=([verifi-off]="--no-verifi" [last-layer]="--pooling last-layer")
read -r -a variants <<< "${VARIANTS:-recipe verifi-off last-layer no-edit-data}"
for v in "${variants[@]}"; do
  [ -n "${flags[$v]+x}" ] || { echo "unknown variant $v" >&2; exit 2; }
done
for v in "${variants[@]}"; do
  seed_dir "$work/$v"
  ( RAYON_NUM_THREADS=4 timeout $((TRAIN_SECONDS + 60)) "$U" train --out "$work/$v" --stages dit \
      --dit-steps "$steps" --backend "$backend" --quiet $EXTRA ${flags[$v]} > "$OUT/train-$v.log" 2>&1 || true ) &
done
wait
# Results go back as one archive (the lent machine returns at most 8 files), without weights.
R="$work/results"
for v in "${variants[@]}"; do
  mkdir -p "$R/$v"
  cp "$work/$v/dit/loss.csv" "$work/$v/dit/report.json" "$work/$v/dit/stage.json" \
     "$work/$v/dit/samples.png" "$R/$v/" 2>/dev/null || true
done
for v in "${variants[@]}"; do
  if [ -f "$work/$v/model/config.json" ]; then
    ( RAYON_NUM_THREADS=4 timeout "$EVAL_SECONDS" "$U" eval --model "$work/$v/model" $EVAL_FLAGS ${evalflags[$v]:-} \
        --json "$R/$v/eval.json" --grid "$R/$v/grid.png" --quiet > "$R/$v/eval.txt" 2>&1 || true ) &
  fi
done
wait
mv "$OUT"/train-*.log "$OUT"/probe*.log "$R/" 2>/dev/null || true
tar czf "$OUT/ablations.tgz" -C "$work" results
ls -la "$OUT"
