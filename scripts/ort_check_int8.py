#!/usr/bin/env python3
"""Load an int8 ONNX file (from `flsl quantize`) and its fp32 source in onnxruntime, run
both on the same seeded input and print the feature cosine: checks that onnxruntime accepts
the file (both the tract form and --format qdq).

Usage: python3 scripts/ort_check_int8.py FP32.onnx INT8.onnx
"""
import sys

import numpy as np
import onnxruntime as ort


def run(path, x):
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0], [n.name for n in s.get_outputs()]


def main() -> int:
    fp32, int8 = sys.argv[1], sys.argv[2]
    s = ort.InferenceSession(fp32, providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) else 1 for d in s.get_inputs()[0].shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    a, _ = run(fp32, x)
    b, names = run(int8, x)
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)
    print(f"{int8}: onnxruntime {ort.__version__} ok, outputs {names}, "
          f"token cosine vs fp32 mean {cos.mean():.5f} worst {cos.min():.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
