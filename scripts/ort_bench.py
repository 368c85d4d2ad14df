#!/usr/bin/env python3
"""Time an ONNX file in onnxruntime (CPU) at several thread counts; print JSON.

Usage: python3 scripts/ort_bench.py MODEL.onnx [--threads 1,2] [--iters 50] [--warmup 5]

Output (stdout, one JSON object):
  {"onnxruntime_version": "...", "timings": [{"threads": 1, "iters": 50, "median_ms": ..,
   "p90_ms": .., "min_ms": .., "fps": ..}, ...]}

The input is a fixed seeded normal tensor of the model's (static) input shape.
Latencies cover `session.run` only, like `flsl bench` times tract's run only.
flsl-runtime embeds this file (`bench::ORT_BENCH_PY`) and feeds it to `python3 -`.
"""
import argparse
import json
import sys
import time

import numpy as np
import onnxruntime as ort


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()

    timings = []
    for threads in [int(t) for t in args.threads.split(",") if t]:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        feed = {inp.name: x}
        for _ in range(args.warmup):
            sess.run(None, feed)
        samples = []
        for _ in range(max(args.iters, 1)):
            t0 = time.perf_counter()
            sess.run(None, feed)
            samples.append((time.perf_counter() - t0) * 1e3)
        samples.sort()
        pick = lambda q: samples[min(len(samples) - 1, round((len(samples) - 1) * q))]
        median = pick(0.5)
        timings.append({
            "threads": threads,
            "iters": len(samples),
            "median_ms": median,
            "p90_ms": pick(0.9),
            "min_ms": samples[0],
            "fps": 1000.0 / median,
        })
    json.dump({"onnxruntime_version": ort.__version__, "timings": timings}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
