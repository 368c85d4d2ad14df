#!/usr/bin/env bash
# GPU check for whoever has an NVIDIA machine (CUDA driver + NVRTC at run time):
# the same FLSL training steps on the CPU backend, on burn-cuda in f32 and on burn-cuda in half
# precision (use_fp16: bfloat16 backbones, f32 master weights) from the same weights and batch;
# prints the losses per step, the relative differences and each run's images/s.
# Exits non-zero if any loss term of any step differs by more than its tolerance (--tolerance for
# CPU vs CUDA, --half-tolerance for CUDA f32 vs half).
#
# Usage: scripts/gpu_check.sh [--preset tiny|vit_tiny16|vit_small16] [--steps N] [--batch N]
# With FLSL_BIN set, runs that prebuilt binary instead of building (e.g. on a machine without
# network access, with a binary built elsewhere by `cargo build --release -p flsl-train --features cuda`).
# With FLSL_SWEEP="16 32 64" set, then runs CUDA f32 vs half (no CPU run) at each batch size
# with the same other arguments, and prints a Markdown table of images/s (GPU_CHECK_TABLE=FILE
# also writes it to FILE).
#
# Several GPUs (data-parallel, gradients averaged with burn-collective; rank 0 logs/saves):
#   cargo run --release -p flsl-train --features cuda -- train --preset vit_small16 \
#       --data DIR --out runs/ddp --device cuda:0,cuda:1 --max-steps 20
# The progress bar and log.jsonl give images/s for the whole group (batch_size_per_gpu per GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${FLSL_BIN:-}" ]; then
  flsl() { "$FLSL_BIN" "$@"; }
else
  cargo build --release -p flsl-train --features cuda
  flsl() { "${CARGO_TARGET_DIR:-target}/release/flsl" "$@"; }
fi
status=0
flsl gpu-check "$@" || status=$?
[ -n "${FLSL_SWEEP:-}" ] || exit $status
# Arguments without --batch (the sweep sets it).
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --batch) shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
table="| batch | CUDA f32 images/s | CUDA half images/s | half / f32 | every step within tolerance |
|---|---|---|---|---|"
for b in $FLSL_SWEEP; do
  out=$(flsl gpu-check --no-cpu --batch "$b" "${args[@]}" 2>&1) && ok=yes || { ok=no; status=1; }
  echo "$out"
  f=$(sed -nE 's/^cuda: ([0-9.]+) images\/s.*/\1/p' <<<"$out" | head -1)
  h=$(sed -nE 's/^cuda, half precision.*: ([0-9.]+) images\/s \(([0-9.]+)x.*/\1 | \2x/p' <<<"$out" | head -1)
  table+=$'\n'"| $b | ${f:--} | ${h:-- | -} | $ok |"
done
echo "$table"
[ -z "${GPU_CHECK_TABLE:-}" ] || echo "$table" > "$GPU_CHECK_TABLE"
exit $status
