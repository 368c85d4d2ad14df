#!/usr/bin/env python3
"""onnxruntime's own dynamic int8 quantization of an fp32 ONNX file (the baseline that
`examples/quantize_bench.rs --ort-dynamic` times in tract and onnxruntime).

Usage: python3 scripts/ort_quantize_dynamic.py MODEL.onnx OUT.onnx

u8 activations (quantized at run time), per-channel s8 weights, MatMul only.
"""
import sys

from onnxruntime.quantization import QuantType, quantize_dynamic


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    quantize_dynamic(sys.argv[1], sys.argv[2], weight_type=QuantType.QInt8,
                     per_channel=True, op_types_to_quantize=["MatMul"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
