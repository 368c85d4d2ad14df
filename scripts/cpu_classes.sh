#!/usr/bin/env bash
# Per CPU class and thread count, one session, rounds alternated (docs/PERFORMANCE.md, "Per CPU
# class and thread count"): the native class, the AVX2 + AVX-VNNI class of client x86 (NUCs:
# TRACT_CPU_ISA=-avx512f,-avx512vnni, where this CPU has AVX-VNNI) and the plain AVX2 class (also
# -avxvnni). The knob caps our int8 kernel, our float ops and tract's kernels; not the gemm
# crate's f32 products, which stay on AVX-512 (so "ours fp32" of a capped class is faster than
# the class would run it: the int8 / fp32 ratio printed is a lower bound).
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
CLASSES="native avx2"
grep -qw avx_vnni /proc/cpuinfo && CLASSES="native avxvnni avx2"
mkdir -p "$OUT"
for r in $(seq 1 "$ROUNDS"); do
  for cls in $CLASSES; do
    case $cls in
      native) unset TRACT_CPU_ISA; ort=--vs-onnxruntime ;;
      avxvnni) export TRACT_CPU_ISA=-avx512f,-avx512vnni; ort= ;;
      avx2) export TRACT_CPU_ISA=-avx512f,-avx512vnni,-avxvnni; ort= ;;
    esac
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
unset TRACT_CPU_ISA

# Medians of the rounds' medians, one table per model.
python3 - "$OUT" "$ROUNDS" $CLASSES <<'PY'
import json, re, statistics, sys
from pathlib import Path
out, rounds, classes = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
def ours(cls, m, f, th, key="tract"):
    v = []
    for r in range(1, rounds + 1):
        p = out / f"{cls}.{m}.{f}.r{r}.json"
        if not p.exists():
            continue
        j = json.loads(p.read_text())
        rows = j[key] if key == "tract" else (j.get("onnxruntime") or {}).get("timings", [])
        v += [t["median_ms"] for t in rows if t["threads"] == th]
    return statistics.median(v) if v else float("nan")
def tract(cls, m, f, th):
    v = []
    for r in range(1, rounds + 1):
        p = out / f"{cls}.{m}.{f}.tract.r{r}.md"
        if not p.exists():
            continue
        for line in p.read_text().splitlines():
            # | model | runtime | threads | median ms | best block | vs onnxruntime |
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) > 3 and cells[2] == str(th) and re.fullmatch(r"[0-9.]+", cells[3]):
                v.append(float(cells[3]))
    return statistics.median(v) if v else float("nan")
for m, name in (("tiny", "ViT-Ti/16"), ("small", "ViT-S/16")):
    print(f"\n### {name}, 224x224 (median of {rounds} rounds' medians, ms per frame, 1 / 2 threads)\n")
    print("| class | ours int8 | ours fp32 | int8 speed-up over ours fp32 | tract's kernels, same int8 file | tract's fp32 | onnxruntime's best int8 (its dynamic file or our QDQ file) | onnxruntime fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for cls in classes:
        f = lambda fn, *a: " / ".join(f"{fn(cls, m, *a, th):.1f}" for th in (1, 2))
        sp = " / ".join(f"{ours(cls, m, 'ours', th) / ours(cls, m, 'ours.int8', th):.2f}x" for th in (1, 2))
        best = lambda c, mm, th: min(ours(c, mm, "ort_dynamic_int8", th, "ort"), ours(c, mm, "ours.int8", th, "ort"))
        ortq = f(best) if cls == "native" else "-"
        ortf = f(lambda c, mm, th: ours(c, mm, "ours", th, "ort")) if cls == "native" else "-"
        print(f"| {cls} | {f(ours, 'ours.int8')} | {f(ours, 'ours')} | {sp} | {f(tract, 'ours.int8')} | {f(tract, 'ours')} | {ortq} | {ortf} |")
PY
