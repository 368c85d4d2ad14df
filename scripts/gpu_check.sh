#!/usr/bin/env bash
# GPU check for whoever has an NVIDIA machine (CUDA driver + NVRTC at run time):
# the same FLSL training steps on the CPU backend and on burn-cuda from the same weights and
# batch; prints both losses per step, the relative difference and each backend's images/s.
# Exits non-zero if any loss term of any step differs by more than the tolerance (--tolerance).
#
# Usage: scripts/gpu_check.sh [--preset tiny|vit_tiny16|vit_small16] [--steps N] [--batch N]
# With FLSL_BIN set, runs that prebuilt binary instead of building (e.g. on a machine without
# network access, with a binary built elsewhere by `cargo build --release -p flsl-train --features cuda`).
#
# Several GPUs (data-parallel, gradients averaged with burn-collective; rank 0 logs/saves):
#   cargo run --release -p flsl-train --features cuda -- train --preset vit_small16 \
#       --data DIR --out runs/ddp --device cuda:0,cuda:1 --max-steps 20
# The progress bar and log.jsonl give images/s for the whole group (batch_size_per_gpu per GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${FLSL_BIN:-}" ]; then
  exec "$FLSL_BIN" gpu-check "$@"
fi
exec cargo run --release -p flsl-train --features cuda -- gpu-check "$@"
