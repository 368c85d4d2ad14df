#!/usr/bin/env bash
# The ViT-Ti/16 backbone training step (2 global 224x224 + 8 local 96x96 crops, forward, loss,
# backward, AdamW) on burn-flex with the fused ops (the default), on burn-flex with burn's
# composed ops (FLSL_COMPOSED_OPS=1), and in PyTorch, at 1 and 2 threads, in alternated
# rounds of one session (docs/PERFORMANCE.md, "CPU training backends"). Prints the medians.
#   cargo bench -p flsl-train --bench train_step --no-run
#   FLSL_TORCH_PYTHON=~/.cache/flsl-torch-venv/bin/python bash scripts/train_step_compare.sh 3
# (CPU torch from PyPI in a venv: outside the README's test command.)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
PY=${FLSL_TORCH_PYTHON:-python3}
T=${CARGO_TARGET_DIR:-$HOME/.cache/flsl-target}/release/deps
BENCH=$(ls -t "$T"/train_step-* 2>/dev/null | grep -v '\.d$' | head -1 || true)
[ -x "$BENCH" ] || { echo "no train_step bench binary in $T: run cargo bench -p flsl-train --bench train_step --no-run" >&2; exit 2; }
"$PY" -c 'import torch' || { echo "$PY has no torch (FLSL_TORCH_PYTHON=...)" >&2; exit 2; }
LOG=$(mktemp)
for r in $(seq 1 "$ROUNDS"); do
  for t in 1 2; do
    for mode in fused composed; do
      c=0; [ $mode = composed ] && c=1
      ms=$(FLSL_COMPOSED_OPS=$c RAYON_NUM_THREADS=$t "$BENCH" --bench vit_tiny16_backbone 2>/dev/null \
        | awk '/time:/ { v=$4; u=$5; if (u=="s") v*=1000; print v; exit }')
      echo "$r $t burn-flex-$mode $ms" | tee -a "$LOG"
    done
  done
  "$PY" scripts/torch_train_step.py --threads 1,2 | while read -r line; do
    t=$(sed -E 's/.*step, ([0-9]+) thread.*/\1/' <<<"$line")
    ms=$(sed -E 's/.*median ([0-9.]+) ms.*/\1/' <<<"$line")
    echo "$r $t pytorch $ms" | tee -a "$LOG"
  done
done
echo
echo "| ViT-Ti/16 backbone step, ms (median of $ROUNDS rounds) | 1 thread | 2 threads |"
echo "|---|---|---|"
for who in burn-flex-fused burn-flex-composed pytorch; do
  printf '| %s |' "$who"
  for t in 1 2; do
    printf ' %s |' "$(awk -v w=$who -v t=$t '$2==t && $3==w {print $4}' "$LOG" | sort -n | awk '{a[NR]=$1} END {printf "%.0f", (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}')"
  done
  echo
done
for t in 1 2; do
  f=$(awk -v t=$t '$2==t && $3=="burn-flex-fused" {print $4}' "$LOG" | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}')
  p=$(awk -v t=$t '$2==t && $3=="pytorch" {print $4}' "$LOG" | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}')
  echo "$t thread(s): burn-flex fused / PyTorch = $(awk -v f=$f -v p=$p 'BEGIN {printf "%.2fx", f/p}')"
done
echo "per-round figures: $LOG"
