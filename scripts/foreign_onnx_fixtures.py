#!/usr/bin/env python3
"""Small ViT ONNX files as other tools write them: the fixtures of runtime/tests/foreign_onnx.rs.

Users bring ONNX files from `torch.onnx` (TorchScript or dynamo), timm, Hugging Face
transformers, or already quantized by onnxruntime. Each spells a ViT block differently; our
engine must reach the same fused paths on all of them (issue 23). This script exports small
random-weight models (64x64 input, patch 16, width 32, 2 heads, depth 2: a 4x4 token grid)
through each exporter, no weights downloaded, and writes for each `NAME.onnx` (plus
`NAME.onnx.data` where the exporter keeps the weights outside) the reference output
`NAME.ref.npy` of the one input `input.npy` (PyTorch's for float files, onnxruntime's for int8 files),
and a `manifest.json` with the exporter, opset, output tokens and what the file exercises.

Run outside the README's test command (CPU torch, timm, transformers, onnxruntime from PyPI):

    python -m venv ~/.cache/flsl-torch-venv
    ~/.cache/flsl-torch-venv/bin/pip install torch timm transformers onnx onnxscript onnxruntime
    ~/.cache/flsl-torch-venv/bin/python scripts/foreign_onnx_fixtures.py \
        --out runtime/tests/fixtures/foreign

The committed fixtures were made with torch 2.15.0, timm 1.0.31, transformers 5.25.0,
onnxruntime 1.32.0 (the manifest records the versions).

`--size 224 --width 192 --depth 12 --heads 3` (ViT-Ti/16) or `--width 384 --heads 6` (ViT-S/16)
writes the same files at benchmark size (not committed: for docs/PERFORMANCE.md).
"""

import argparse
import json
import os
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

warnings.filterwarnings("ignore")


class Attention(nn.Module):
    """timm's attention: one qkv product; the scale on the scores, or SDPA."""

    def __init__(self, d, heads, sdpa):
        super().__init__()
        self.heads, self.scale, self.sdpa = heads, (d // heads) ** -0.5, sdpa
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.sdpa:
            q, k, v = qkv.unbind(0)
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            q, k, v = qkv[0], qkv[1], qkv[2]
            a = (q @ k.transpose(-2, -1)) * self.scale
            x = a.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, d, heads, sdpa):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(d, heads, sdpa)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """The paper's no-class ViT (as ../shared/reference defines it), optionally with a class
    token that the output drops, as DINO's code returns patch tokens."""

    def __init__(self, size, width, depth, heads, cls, sdpa):
        super().__init__()
        g = size // 16
        self.patch_embed = nn.Conv2d(3, width, 16, 16)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02) if cls else None
        self.pos_embed = nn.Parameter(torch.randn(1, g * g + int(cls), width) * 0.02)
        self.blocks = nn.ModuleList([Block(width, heads, sdpa) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.pos_embed
        for b in self.blocks:
            x = b(x)
        x = self.norm(x)
        return x[:, 1:] if self.cls_token is not None else x


def timm_vit(size, width, depth, heads):
    import timm.models.vision_transformer as vt

    return vt.VisionTransformer(
        img_size=size, patch_size=16, embed_dim=width, depth=depth, num_heads=heads,
        num_classes=0, global_pool="", class_token=True,
    )


class TimmFeatures(nn.Module):
    """`forward_features`: every token, the class token first (what a timm user exports)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m.forward_features(x)


class Dinov2Features(nn.Module):
    """transformers' DINOv2 with registers: `last_hidden_state` (class, registers, patches)."""

    def __init__(self, size, width, depth, heads, registers):
        super().__init__()
        from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

        cfg = Dinov2WithRegistersConfig(
            image_size=size, patch_size=16, hidden_size=width, num_hidden_layers=depth,
            num_attention_heads=heads, intermediate_size=4 * width, num_register_tokens=registers,
            layerscale_value=0.5,
        )
        self.m = Dinov2WithRegistersModel(cfg)
        # Layer scale away from 1 so that a dropped Mul shows in the output.
        with torch.no_grad():
            for name, p in self.m.named_parameters():
                if "lambda1" in name or "layer_scale" in name:
                    p.uniform_(0.2, 0.8)

    def forward(self, x):
        return self.m(pixel_values=x).last_hidden_state


def randomise_norms(model):
    """LayerNorm scales and shifts away from 1 and 0 (a fresh LayerNorm's affine is the
    identity, and exporters drop an identity affine: the fixtures must carry one)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


def export(model, x, path, dynamo, opset, external=False):
    kw = dict(input_names=["input"], output_names=["features"])
    if dynamo:
        torch.onnx.export(model, (x,), path, dynamo=True, opset_version=opset,
                          external_data=external, **kw)
    else:
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=opset, **kw)
    strip_metadata(path)


def strip_metadata(path):
    """Drops what the exporter records about this machine (the dynamo exporter's per-node
    stack traces name the script's and the venv's absolute paths) and keeps the graph: node,
    graph and model metadata and doc strings. External weights stay where they are."""
    import onnx

    m = onnx.load(path, load_external_data=False)
    graphs = [m.graph]
    while graphs:
        g = graphs.pop()
        g.doc_string = ""
        del g.metadata_props[:]
        for n in g.node:
            n.doc_string = ""
            del n.metadata_props[:]
            for a in n.attribute:
                if a.HasField("g"):
                    graphs.append(a.g)
                graphs.extend(a.graphs)
    del m.metadata_props[:]
    m.doc_string = ""
    for f in m.functions:
        for n in f.node:
            n.doc_string = ""
            del n.metadata_props[:]
    onnx.save(m, path)


def ort_run(path, x):
    import onnxruntime as ort

    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma list of fixture names")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    size, width, depth, heads = args.size, args.width, args.depth, args.heads
    g = size // 16
    x = torch.from_numpy(np.random.default_rng(5).standard_normal((1, 3, size, size)).astype(np.float32))

    def vit(cls, sdpa):
        torch.manual_seed(0)
        return ViT(size, width, depth, heads, cls, sdpa).eval()

    # name: (model factory, exporter dynamo?, opset, external data?, prefix tokens, note)
    fixtures = {
        "torchscript_opset14_cls": (lambda: vit(True, False), False, 14, False, 0,
                                    "TorchScript exporter, opset 14: LayerNorm decomposed "
                                    "(ReduceMean/Sub/Pow/Sqrt/Div), class token concatenated "
                                    "and sliced off, scale after the scores, Erf GELU"),
        "torchscript_opset17": (lambda: vit(False, False), False, 17, False, 0,
                                "TorchScript exporter, opset 17: LayerNormalization, Constant "
                                "nodes, bias-first Add, GELU (x*(1+erf))*0.5"),
        "dynamo_opset17": (lambda: vit(False, False), True, 17, False, 0,
                           "dynamo exporter, opset 17 (as ../shared/reference): GELU "
                           "x*(0.5*(1+erf)), shared initializers"),
        "dynamo_opset20_sdpa_external": (lambda: vit(False, True), True, 20, True, 0,
                                         "dynamo exporter, opset 20: native Gelu, "
                                         "scaled_dot_product_attention (scale on q and k), "
                                         "weights in NAME.onnx.data"),
        "timm_vit_cls": (lambda: TimmFeatures(timm_vit(size, width, depth, heads)).eval(), False, 17,
                         False, 1, "timm VisionTransformer.forward_features: class token first "
                         "in the output"),
        "dinov2_registers": (lambda: Dinov2Features(size, width, depth, heads, 4).eval(), True, 18,
                             False, 5, "transformers Dinov2WithRegistersModel: layer scale, class "
                             "token + 4 registers first in the output"),
    }
    only = [s for s in args.only.split(",") if s]
    manifest = {
        "versions": {"torch": torch.__version__},
        "input": [1, 3, size, size],
        "grid": [g, g],
        "fixtures": {},
    }
    for mod in ("timm", "transformers", "onnxruntime", "onnx"):
        try:
            manifest["versions"][mod] = __import__(mod).__version__
        except ImportError:
            pass
    for name, (make, dynamo, opset, external, prefix, note) in fixtures.items():
        if only and name not in only:
            continue
        torch.manual_seed(0)
        model = randomise_norms(make())
        path = os.path.join(args.out, f"{name}.onnx")
        for stale in (path, path + ".data"):
            if os.path.exists(stale):
                os.remove(stale)
        export(model, x, path, dynamo, opset, external)
        with torch.no_grad():
            ref = model(x).numpy().astype(np.float32)
        ort_out = ort_run(path, x.numpy())
        np.save(os.path.join(args.out, f"{name}.ref.npy"), ref)
        manifest["fixtures"][name] = {
            "exporter": "torch.onnx dynamo" if dynamo else "torch.onnx TorchScript",
            "opset": opset, "external_data": external, "prefix_tokens": prefix,
            "output": list(ref.shape), "reference": "pytorch", "note": note,
            "onnxruntime_vs_reference_max_abs": float(np.abs(ort_out - ref).max()),
        }
        print(f"{name}: {list(ref.shape)}, onnxruntime vs torch {np.abs(ort_out - ref).max():.2e}")

    # onnxruntime's own quantizers, on the TorchScript opset-17 file.
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    base = os.path.join(args.out, "torchscript_opset17.onnx")
    pre = os.path.join(args.out, "_pre.onnx")
    # Shape inference only: onnxruntime's graph optimisation would fuse MatMul + Add into Gemm,
    # which its dynamic quantizer leaves in float.
    quant_pre_process(base, pre, skip_symbolic_shape=True, skip_optimization=True)

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(11)
            self.it = iter([{"input": rng.standard_normal((1, 3, size, size)).astype(np.float32)}
                            for _ in range(8)])

        def get_next(self):
            return next(self.it, None)

    quantized = {
        "ort_dynamic_int8": (lambda p: quantize_dynamic(pre, p, weight_type=QuantType.QInt8,
                                                        op_types_to_quantize=["MatMul"]),
                             "onnxruntime quantize_dynamic (QInt8 weights, per tensor): "
                             "DynamicQuantizeLinear + MatMulInteger + Mul + Add"),
        "ort_dynamic_int8_per_channel": (lambda p: quantize_dynamic(
            pre, p, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"]),
            "onnxruntime quantize_dynamic, per-channel weight scales"),
        "ort_static_qdq": (lambda p: quantize_static(
            pre, p, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Conv"]),
            "onnxruntime quantize_static, QDQ, MatMul and Conv, per-channel weights"),
        "ort_static_qoperator": (lambda p: quantize_static(
            pre, p, Reader(), quant_format=QuantFormat.QOperator, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Conv"]),
            "onnxruntime quantize_static, QOperator (QLinearMatMul, QLinearConv), per-channel "
            "weights"),
    }
    for name, (quantize, note) in quantized.items():
        if only and name not in only:
            continue
        path = os.path.join(args.out, f"{name}.onnx")
        quantize(path)
        strip_metadata(path)
        out = ort_run(path, x.numpy())
        with torch.no_grad():
            torch.manual_seed(0)
            ref = randomise_norms(vit(False, False))(x).numpy()
        a, b = out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1])
        cos = float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())
        np.save(os.path.join(args.out, f"{name}.ref.npy"), out)
        manifest["fixtures"][name] = {
            "exporter": "onnxruntime.quantization", "source": "torchscript_opset17.onnx",
            "prefix_tokens": 0, "output": list(out.shape), "reference": "onnxruntime",
            "note": note, "worst_token_cosine_vs_fp32_torch": cos,
        }
        print(f"{name}: {list(out.shape)}, worst token cosine vs fp32 torch {cos:.5f}")
    os.remove(pre)
    np.save(os.path.join(args.out, "input.npy"), x.numpy())
    path = os.path.join(args.out, "manifest.json")
    old = {}
    if only and os.path.exists(path):
        old = json.load(open(path)).get("fixtures", {})
    old.update(manifest["fixtures"])
    manifest["fixtures"] = old
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
