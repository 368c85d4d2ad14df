#!/usr/bin/env python3
"""Run an ONNX file on an .npy input in onnxruntime and write its outputs as .npy.

Usage:
  python3 scripts/onnx_parity.py MODEL.onnx INPUT.npy OUTPUT.npy [--compare OTHER.npy --atol 1e-4]

Writes the first output to OUTPUT.npy and any further output NAME to OUTPUT.NAME.npy.
With --compare, also checks the first output against OTHER.npy (for example what
`flsl infer --model MODEL.onnx --npy INPUT.npy --out OTHER.npy` wrote with tract), and each
further output NAME against OTHER.NAME.npy where that file exists (flsl writes
`prototype_logits` there); exits 1 when a max absolute difference exceeds --atol.

CI (outside the README test command):
  pip install onnxruntime numpy
  flsl infer --model M.onnx --npy IN.npy --out tract.npy
  python3 scripts/onnx_parity.py M.onnx IN.npy ort.npy --compare tract.npy --atol 1e-4
"""
import argparse
import os
import sys

import numpy as np
import onnxruntime as ort


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--compare", help=".npy to compare the first output against")
    ap.add_argument("--atol", type=float, default=1e-4)
    args = ap.parse_args()

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    x = np.load(args.input).astype(np.float32)
    inp = sess.get_inputs()[0]
    outs = sess.run(None, {inp.name: x})
    names = [o.name for o in sess.get_outputs()]
    np.save(args.output, outs[0])
    stem, _ = os.path.splitext(args.output)
    for name, value in zip(names[1:], outs[1:]):
        np.save(f"{stem}.{name}.npy", value)
    print(f"onnxruntime {ort.__version__}: {args.model} {inp.name}{list(x.shape)} -> "
          + ", ".join(f"{n}{list(v.shape)}" for n, v in zip(names, outs)))

    if args.compare:
        cstem, _ = os.path.splitext(args.compare)
        pairs = [(names[0], args.compare, outs[0])]
        pairs += [(n, f"{cstem}.{n}.npy", v) for n, v in zip(names[1:], outs[1:])
                  if os.path.exists(f"{cstem}.{n}.npy")]
        failed = False
        for name, path, value in pairs:
            other = np.load(path)
            if other.shape != value.shape:
                print(f"FAIL: {name}: shape {other.shape} != onnxruntime {value.shape}")
                failed = True
                continue
            diff = float(np.max(np.abs(other.astype(np.float32) - value)))
            ok = diff <= args.atol
            failed |= not ok
            print(f"{'ok' if ok else 'FAIL'}: {name}: max |{path} - onnxruntime| = {diff:.3g} (atol {args.atol})")
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
