#!/usr/bin/env bash
# Does a wgpu build run on the lent machine's GPU? That machine ships NVIDIA's Vulkan ICD
# manifest but no Vulkan loader, so the payload carries this machine's libvulkan.so.1
# (`--pack`) and points the loader at the driver's EGL library. Then, as one prepared script:
# `bench kernels` and `bench quant` on the GPU, the recipe's DiT step on wgpu and on Flex (12
# threads) side by side, and, with TRAIN_SECONDS > 0 and wgpu the faster, the recipe's DiT
# stage on the GPU for as many steps as fit, evaluated like the recipe's runs.
# With CONTINUE=1 instead: no benches; the payload's finished DiT (init/transformer.safetensors)
# is fine-tuned on the GPU (`train --dit-init`, batch BATCH, peak LR, seed SEED) for as many
# steps as fit in TRAIN_SECONDS, sized by two short probes; its weights come back in $OUT.
#
# Payload (carried): test-artifacts/device/ from `scripts/device-ablations.sh --pack RUN`
# plus test-artifacts/device/lib/libvulkan.so.1 (`scripts/device-gpu.sh --pack [DIT_WEIGHTS]`,
# which also copies a finished `dit/transformer.safetensors` for CONTINUE=1).
set -euo pipefail
PAYLOAD=test-artifacts/device
if [ "${1:-}" = "--pack" ]; then
  mkdir -p "$PAYLOAD/lib"
  cp "$(readlink -f /usr/lib/x86_64-linux-gnu/libvulkan.so.1)" "$PAYLOAD/lib/libvulkan.so.1"
  if [ -n "${2:-}" ]; then mkdir -p "$PAYLOAD/init" && cp "$2" "$PAYLOAD/init/transformer.safetensors"; fi
  exit 0
fi
OUT=${OUT:?set OUT}
TRAIN_SECONDS=${TRAIN_SECONDS:-0}   # > 0: then train the recipe DiT on wgpu that long
EVAL_FLAGS=${EVAL_FLAGS:---prompts 16 --seeds 2}
export LD_LIBRARY_PATH="$PWD/$PAYLOAD/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
work=$(mktemp -d)
# The machine's own manifest names libGLX_nvidia.so.0, which fails headless ("Could not get
# 'vkCreateInstance'"); the same driver's EGL library is a working Vulkan ICD without X.
printf '{"file_format_version":"1.0.1","ICD":{"library_path":"libEGL_nvidia.so.0","api_version":"1.4.312"}}' \
  > "$work/nvidia_egl_icd.json"
export VK_DRIVER_FILES="$work/nvidia_egl_icd.json" VK_ICD_FILENAMES="$work/nvidia_egl_icd.json"
xz -dc "$PAYLOAD/unifusion.xz" > "$work/unifusion" && chmod +x "$work/unifusion"
U="$work/unifusion"
seed_dir() { mkdir -p "$1" && cp -r "$PAYLOAD/frozen/." "$1/"; }
log() { echo "$*" | tee -a "$OUT/summary.txt"; }

if [ "${CONTINUE:-0}" = 1 ]; then
  BATCH=${BATCH:-64} LR=${LR:-5e-4} SEED=${SEED:-1} TRAIN_SECONDS=${TRAIN_SECONDS:-330}
  (nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 || true) | tee -a "$OUT/summary.txt"
  ft() { # dir log steps [flags]: the continuation, timed from the process's start
    local dir=$1 logf=$2 steps=$3; shift 3; seed_dir "$dir"
    local t0; t0=$(date +%s.%N)
    RAYON_NUM_THREADS=8 timeout $((TRAIN_SECONDS + 120)) "$U" train --out "$dir" --seed "$SEED" --stages dit \
      --dit-init "$PWD/$PAYLOAD/init/transformer.safetensors" --dit-batch "$BATCH" --dit-lr "$LR" \
      --dit-steps "$steps" --backend wgpu --quiet "$@" > "$OUT/$logf" 2>&1 || log "$logf: exit $?" >&2
    awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN { printf "%.1f", a - b }'
  }
  rows() { if [ -f "$1/dit/loss.csv" ]; then echo $(( $(wc -l < "$1/dit/loss.csv") - 1 )); else echo 0; fi; }
  # Probes: one step (start-up, pipelines and autotune, cached for the later processes),
  # then as many as fit in 36 s; the step time is the second one's training loop's own
  # seconds over its steps (the CLI prints both on a time-limited stop).
  w1=$(ft "$work/pa" probe-a.log 100000 --time-limit-min 0)
  ft "$work/pb" probe-b.log 100000 --time-limit-min 0.6 > /dev/null
  step=$(sed -n 's/.*steps \([0-9]*\)-\([0-9]*\) of [0-9]* in \([0-9.]*\) s this call.*/\1 \2 \3/p' "$OUT/probe-b.log" \
    | awk '{ printf "%.3f", $3 / ($2 - $1 + 1) }')
  step=${step:-1.0}
  steps=$(awk -v T="$TRAIN_SECONDS" -v s="$step" -v w="$w1" 'BEGIN { n = int((T - w) / (s * 1.08)); if (n < 50) n = 50; print n }')
  log "batch $BATCH: first process $w1 s for 1 step; $(grep 'this call' "$OUT/probe-b.log") -> $step s a step; continuing for $steps steps"
  d="$work/ft"
  wall=$(ft "$d" train.log "$steps" --time-limit-min "$(awk -v T="$TRAIN_SECONDS" 'BEGIN { print (T + 60) / 60 }')")
  log "continuation: $wall s wall, $(rows "$d") of $steps steps; $(tail -2 "$OUT/train.log" | tr '\n' ' ')"
  if [ -f "$d/dit/transformer.safetensors" ]; then
    cp "$d/dit/transformer.safetensors" "$d/dit/report.json" "$d/dit/loss.csv" "$d/dit/samples.png" "$OUT/"
  else
    cp "$d/dit/checkpoint/weights.safetensors" "$d/dit/loss.csv" "$OUT/" || true
  fi
  log "done"
  exit 0
fi

log "== bench kernels, bench quant"
timeout 90 "$U" bench kernels --iters 10 > "$OUT/bench-kernels.md" 2>&1 || log "bench kernels failed"
timeout 90 "$U" bench quant > "$OUT/bench-quant.md" 2>&1 || log "bench quant failed"

# The recipe's DiT step on each backend, side by side: 12 steps (pipeline and shader
# compilation included) and 100 steps; the stage's own training seconds (report.json).
probe() { # backend threads steps
  local dir="$work/probe-$1-$3"; seed_dir "$dir"
  if RAYON_NUM_THREADS=$2 timeout 120 "$U" train --out "$dir" --stages dit --dit-steps "$3" --backend "$1" --quiet \
      > "$OUT/probe-$1-$3.log" 2>&1; then
    sed -n 's/.*"seconds": *\([0-9.]*\).*/\1/p' "$dir/dit/report.json" | head -1
  else echo 9999; fi
}
for n in 12 100; do
  probe wgpu 4 $n > "$work/t_wgpu" & probe flex 12 $n > "$work/t_flex" & wait
  t_wgpu=$(cat "$work/t_wgpu"); t_flex=$(cat "$work/t_flex")
  log "$n DiT steps side by side: wgpu $t_wgpu s, flex (12 threads) $t_flex s"
done
[ "${TRAIN_SECONDS}" -gt 0 ] || { log "done"; exit 0; }
if awk -v w="$t_wgpu" -v f="$t_flex" 'BEGIN { exit !(w < f) }'; then
  steps=$(awk -v T="$TRAIN_SECONDS" -v t="$t_wgpu" 'BEGIN { s = int(T / (t / 100 * 1.15)); if (s > 20000) s = 20000; print s }')
  log "training the recipe DiT on wgpu for $steps steps"
  d="$work/gpu"; seed_dir "$d"
  timeout $((TRAIN_SECONDS + 30)) "$U" train --out "$d" --stages dit --dit-steps "$steps" --backend wgpu --quiet \
    > "$OUT/train.log" 2>&1 || log "training failed or timed out: $(tail -3 "$OUT/train.log")"
  cp "$d/dit/loss.csv" "$d/dit/report.json" "$d/dit/samples.png" "$OUT/" 2>/dev/null || true
  if [ -f "$d/model/config.json" ]; then
    timeout 80 "$U" eval --model "$d/model" $EVAL_FLAGS --backend wgpu --json "$OUT/eval.json" \
      --grid "$OUT/grid.png" --quiet > "$OUT/eval.txt" 2>&1 || log "eval failed: $(tail -3 "$OUT/eval.txt")"
  fi
fi
log "done"
