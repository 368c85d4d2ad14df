#!/usr/bin/env bash
# Per CPU class and thread count, one session, rounds alternated (docs/PERFORMANCE.md, "Per CPU
# class and thread count"): the native class and the AVX2 class (TRACT_CPU_ISA=-avx512f,-avx512vnni
# caps our int8 kernel, our float ops and tract's kernels; not the gemm crate's f32 products),
# ViT-Ti/16 and ViT-S/16 fp32 + int8 files from scripts/foreign_bench.sh, 1 and 2 threads:
# ours (flsl bench), tract's own kernels (onnx_bench --engines tract) and onnxruntime on the same
# files plus on its own quantize_dynamic file (native class only; python3 with onnxruntime on PATH).
#   cargo build --release -p flsl-train --bin flsl
#   cargo build --release -p flsl-examples --features onnx --example onnx_bench
#   bash scripts/cpu_classes.sh out/foreign-bench out/cpu-classes 3 20
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:?folder of scripts/foreign_bench.sh (tiny/, small/)} OUT=${2:?output folder} ROUNDS=${3:-3} ITERS=${4:-20}
T=${CARGO_TARGET_DIR:-$HOME/.cache/flsl-target}/release
mkdir -p "$OUT"
for r in $(seq 1 "$ROUNDS"); do
  for cls in native avx2; do
    if [ $cls = avx2 ]; then export TRACT_CPU_ISA=-avx512f,-avx512vnni; ort=; else unset TRACT_CPU_ISA; ort=--vs-onnxruntime; fi
    for m in tiny small; do
      for f in ours ours.int8; do
        "$T/flsl" bench --model "$B/$m/$f.onnx" --threads 1,2 --iters "$ITERS" --warmup 3 $ort \
          --json "$OUT/$cls.$m.$f.r$r.json" >/dev/null 2>&1 || echo "failed: $cls $m $f"
        "$T/examples/onnx_bench" --models none --onnx "$B/$m/$f.onnx" --engines tract --no-ort \
          --threads 1,2 --iters "$ITERS" --warmup 3 --out "$OUT/onnx_bench" 2>/dev/null \
          | grep -E '^\| ' > "$OUT/$cls.$m.$f.tract.r$r.md" || echo "failed: tract $cls $m $f"
      done
      if [ $cls = native ]; then
        "$T/flsl" bench --model "$B/$m/ort_dynamic_int8.onnx" --threads 1,2 --iters "$ITERS" --warmup 3 \
          --vs-onnxruntime --json "$OUT/$cls.$m.ort_dynamic_int8.r$r.json" >/dev/null 2>&1 || echo "failed: ort dynamic $m"
      fi
    done
  done
  echo "round $r done ($(date -u +%T))"
done
