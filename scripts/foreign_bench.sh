#!/usr/bin/env bash
# Latency of ViT-Ti/16 and ViT-S/16 as different tools write them (issue 23), one session:
# our exporter, torch.onnx TorchScript (opset 14 and 17) and dynamo (opset 17, and 20 with
# SDPA and external weights), each fp32 and int8 (`flsl quantize`), and onnxruntime's own
# dynamic and static int8 files; every file timed in our engine and in onnxruntime at one
# thread, in rounds that alternate the files. Prints a Markdown table (medians of the rounds'
# medians). Builds nothing the caller has not built:
#
#   cargo build --release -p flsl-train -p flsl-examples --features flsl-examples/onnx --example onnx_bench
#   FLSL_TORCH_PYTHON=~/.cache/flsl-torch-venv/bin/python FLSL_PYTHON=~/.cache/flsl-venv/bin/python \
#     bash scripts/foreign_bench.sh [OUT_DIR] [ROUNDS] [ITERS]
#
# FLSL_TORCH_PYTHON: CPU torch, timm, transformers, onnx, onnxscript, onnxruntime (the fixture
# script); FLSL_PYTHON: onnxruntime and numpy (the onnxruntime timings, `flsl bench
# --vs-onnxruntime`).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-out/foreign-bench}"
ROUNDS="${2:-3}"
ITERS="${3:-20}"
T="${CARGO_TARGET_DIR:-$HOME/.cache/flsl-target}/release"
TORCH_PY="${FLSL_TORCH_PYTHON:-python3}"
PY="${FLSL_PYTHON:-python3}"
export PATH="$(dirname "$PY"):$PATH"
mkdir -p "$OUT"
FOREIGN=torchscript_opset14_cls,torchscript_opset17,dynamo_opset17,dynamo_opset20_sdpa_external
ORT=ort_dynamic_int8,ort_dynamic_int8_per_channel,ort_static_qdq

for m in "tiny 192 3" "small 384 6"; do
  set -- $m
  d="$OUT/$1"
  mkdir -p "$d"
  if [ ! -f "$d/manifest.json" ]; then
    echo "== exporting ViT-$1/16 through each tool into $d"
    "$TORCH_PY" scripts/foreign_onnx_fixtures.py --out "$d" --size 224 --width "$2" --depth 12 \
      --heads "$3" --only "$FOREIGN,$ORT" | grep -E '^[a-z_0-9]+:'
  fi
  if [ ! -f "$d/ours.onnx" ]; then
    "$T/examples/onnx_bench" --out "$d" --models "$1" --threads 1 --iters 1 --warmup 0 --no-ort \
      --engines gemm >/dev/null
    mv "$d/vit_${1}16_noclass_224_random.onnx" "$d/ours.onnx"
  fi
  for f in ours ${FOREIGN//,/ }; do
    if [ ! -f "$d/$f.int8.onnx" ]; then
      "$T/flsl" quantize "$d/$f.onnx" --calib data/neon-aerial-trees/images --calib-images 16 \
        --no-latency --out "$d/$f.int8.onnx" >/dev/null 2>&1
    fi
  done
done

echo "== timing: $ROUNDS rounds, $ITERS runs per file per round, 1 thread"
for r in $(seq 1 "$ROUNDS"); do
  for m in tiny small; do
    d="$OUT/$m"
    for f in ours ours.int8 ${FOREIGN//,/ } $(for x in ${FOREIGN//,/ }; do echo "$x.int8"; done) ${ORT//,/ }; do
      "$T/flsl" bench --model "$d/$f.onnx" --threads 1 --iters "$ITERS" --warmup 3 --vs-onnxruntime \
        --json "$d/$f.round$r.json" >/dev/null 2>&1 || echo "bench failed: $d/$f.onnx"
    done
  done
  echo "round $r done"
done

"$PY" - "$OUT" "$ROUNDS" <<'EOF'
import json, statistics, sys, os
out, rounds = sys.argv[1], int(sys.argv[2])
rows = [("ours", "our exporter"), ("torchscript_opset17", "torch.onnx TorchScript, opset 17"),
        ("torchscript_opset14_cls", "torch.onnx TorchScript, opset 14, class token"),
        ("dynamo_opset17", "torch.onnx dynamo, opset 17"),
        ("dynamo_opset20_sdpa_external", "torch.onnx dynamo, opset 20, SDPA, external weights")]
def med(path_stem):
    t, o, fusion = [], [], None
    for r in range(1, rounds + 1):
        p = f"{path_stem}.round{r}.json"
        if not os.path.exists(p):
            continue
        j = json.load(open(p))
        t.append(j["tract"][0]["median_ms"])
        if j.get("onnxruntime"):
            o.append(j["onnxruntime"]["timings"][0]["median_ms"])
        fusion = j.get("fusion")
    f = lambda v: statistics.median(v) if v else float("nan")
    return f(t), f(o), fusion
for m, name in (("tiny", "ViT-Ti/16"), ("small", "ViT-S/16")):
    d = os.path.join(out, m)
    print(f"\n### {name}, 224x224, 1 thread (median of {rounds} rounds' medians, ms)\n")
    print("| file | ours fp32 | ours int8 (`flsl quantize`) | onnxruntime fp32 | onnxruntime int8 (same int8 file) | fp32 vs our export | int8 vs our export | fp32 ours / onnxruntime |")
    print("|---|---|---|---|---|---|---|---|")
    base_f, _, _ = med(os.path.join(d, "ours"))
    base_q, _, _ = med(os.path.join(d, "ours.int8"))
    for stem, label in rows:
        tf, of, _ = med(os.path.join(d, stem))
        tq, oq, _ = med(os.path.join(d, stem + ".int8"))
        print(f"| {label} | {tf:.2f} | {tq:.2f} | {of:.2f} | {oq:.2f} | {tf / base_f:.3f}x | {tq / base_q:.3f}x | {tf / of:.3f} |")
    print("\n| onnxruntime-quantized file | ours | onnxruntime | ours / onnxruntime |")
    print("|---|---|---|---|")
    for stem in ("ort_dynamic_int8", "ort_dynamic_int8_per_channel", "ort_static_qdq"):
        t, o, _ = med(os.path.join(d, stem))
        print(f"| {stem} | {t:.2f} | {o:.2f} | {t / o:.3f} |")
EOF
