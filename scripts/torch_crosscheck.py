#!/usr/bin/env python3
"""Randomised PyTorch cross-check of `flsl reference-check` (issue 21, item 4).

What it does
------------
Re-implements, in PyTorch and from the definitions in ../shared/reference/README.md only
(the official FLSL code is not needed), the functions our golden checker knows:

* `flsl_head`        FLSLhead (Linear-GELU-...-Linear, F.normalize eps 1e-12, weight-normalised
                     last layer with g = 1 frozen), output and gradients of sum(out * R);
* `meanshift_`       utils.flsl_meanshift, intra and inter view, sampling masks with the README's
                     window / corner rules, gradient of sum(mode * R) w.r.t. src;
* `flsl_loss_`       FLSLLoss (ms + k-means + VMR, teacher temperature indexed by epoch);
* `vmr_`             NonEmptyPriorKL with uniform and explicit priors;
* `sincos_pos_embed` the 2-D sin-cos table (float64 and its float32 cast);
* `vit_forward`      a small no-class ViT (patch 16, pre-norm blocks, LN eps 1e-6, exact GELU)
                     with the bicubic position-table resize of DINO's interpolate_pos_encoding
                     (`scale_factor=((gh+0.1)/g, (gw+0.1)/g)`, applied whenever the token count
                     differs OR the crop is not square: e.g. 112x448 on a 14x14 table has 196
                     tokens and is still resized), square `interp` tables and a local crop that is
                     often non-square.

For every seed it draws random shapes (batch, tokens, widths, hidden / bottleneck dims, nlayers
2..4, out_dim, grid and window sizes, temperatures, crop sizes including non-square ones), computes
each case in float32 and again in float64 (the float32 inputs and weights cast to float64), and
writes two folders in exactly the flsl-golden-v1 format (`<case>.json` + `<case>.safetensors` +
`index.json`):

* `OUT/strict/`  the float32 results as the reference tensors (what the official generator
                 writes), the float64 results alongside as `<tensor>_f64` (F64) and the scalars as
                 `<scalar>_f64`; tolerances are the reference manifests' ones;
* `OUT/vs_f64/`  the same cases with the float64 results in place of the float32 ones and loose
                 tolerances, so that the checker's PASS line reports how far *we* are from exact
                 arithmetic (max_abs, max_rel); the script computes the same two numbers for
                 PyTorch's own float32 run, and prints ours / torch.

It then runs `flsl reference-check` on both folders and prints a summary. Exit status: 0 when
every strict case passes (and, with --max-ratio R, no case is more than R times further from
float64 than PyTorch's float32 is), 1 otherwise, 2 when the checker binary is missing.

Requirements: CPU PyTorch, numpy and safetensors (`pip install torch numpy safetensors`). This is
NOT part of the project's test command; it is a tool for hunting numerical deviations.

Usage
-----
    python scripts/torch_crosscheck.py [--seeds 20] [--seed0 0] [--out DIR]
        [--flsl $CARGO_TARGET_DIR/release/flsl] [--kinds head,meanshift,loss,vmr,sincos,vit]
        [--no-issue-cases] [--no-run] [--max-ratio R] [--threads 2]
    python scripts/torch_crosscheck.py --validate-golden ../shared/reference/micro
        (self-test: re-computes the official golden cases with these definitions; with the
        reference's torch version and 2 threads every value is bit-identical)

e.g. `python3 scripts/torch_crosscheck.py --seeds 20` from a venv with CPU torch; the checker
defaults to `$CARGO_TARGET_DIR/release/flsl` (`~/.cache/flsl-target`, the target folder .ci/run uses).
A failing case is kept on disk (the folder is printed) so that it can be re-run with
`flsl reference-check OUT/strict`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file

F32, F64 = torch.float32, torch.float64
DEFAULT_FLSL = os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/flsl-target")), "release", "flsl"
)
TAU_SA = 0.1 / math.sqrt(384)
TAU_CA = 0.2 / math.sqrt(384)


# ----------------------------------------------------------------------------------------------
# Case container and writer
# ----------------------------------------------------------------------------------------------


class CaseData:
    """One case: manifest pieces, tensors (f32 reference + `_f64` twins), extra files, and the
    list of comparisons the Rust checker makes (`tensor` names or `scalar` names)."""

    def __init__(self, name, call, desc):
        self.name = name
        self.call = call
        self.desc = desc
        self.tensors: dict[str, np.ndarray] = {}
        self.scalars: dict[str, object] = {}
        self.params: dict[str, object] = {}
        self.tolerances: dict[str, dict] = {}
        self.extra: dict[str, object] = {}  # extra manifest keys (weights_file, ...)
        self.files: dict[str, dict[str, np.ndarray]] = {}  # weights files
        self.compared: list[tuple[str, str]] = []  # (kind, name), kind in {"t", "s"}

    def t(self, name, value, f64=None, compared=True):
        self.tensors[name] = np_of(value)
        if f64 is not None:
            self.tensors[f"{name}_f64"] = np_of(f64, np.float64)
        if compared:
            self.compared.append(("t", name))

    def s(self, name, v32, v64, compared=True):
        self.scalars[name] = float(v32)
        self.scalars[f"{name}_f64"] = float(v64)
        if compared:
            self.compared.append(("s", name))


def np_of(x, dtype=None):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bool:
            x = x.to(torch.uint8)
        x = x.numpy()
    x = np.ascontiguousarray(x)
    if dtype is not None:
        x = x.astype(dtype)
    return x


DT_NAME = {np.float32: "F32", np.float64: "F64", np.uint8: "U8", np.int64: "I64"}


def dtype_name(a):
    for k, v in DT_NAME.items():
        if a.dtype == k:
            return v
    raise TypeError(a.dtype)


def write_case(folder, case: CaseData, vs_f64: bool):
    """Writes `<case>.json` + `<case>.safetensors` (+ weights files) into `folder`."""
    tensors = dict(case.tensors)
    scalars = dict(case.scalars)
    tol = case.tolerances
    if vs_f64:
        # The float64 results become the reference; inputs stay float32.
        for kind, name in case.compared:
            if kind == "t" and f"{name}_f64" in tensors:
                tensors[name] = tensors[f"{name}_f64"]
            elif kind == "s" and f"{name}_f64" in scalars:
                scalars[name] = scalars[f"{name}_f64"]
        # Loose: the PASS line must appear so that it reports the errors.
        tol = {k: {"atol": 1e-2, "rtol": 1e-1} for k in tol}
    manifest = {
        "case": case.name,
        "format": "flsl-golden-v1",
        "reference_call": case.call,
        "description": case.desc,
        "torch_version": torch.__version__,
        "tensor_file": f"{case.name}.safetensors",
        "tensors": {
            k: {"shape": list(v.shape), "dtype": dtype_name(v), "desc": ""} for k, v in tensors.items()
        },
        "scalars": scalars,
        "params": case.params,
        "notes": [
            "Generated by scripts/torch_crosscheck.py from the reference README's definitions "
            "(not by the official code)."
            + (" vs_f64 variant: reference tensors are the float64 results." if vs_f64 else "")
        ],
        "tolerances": tol,
    }
    manifest.update(case.extra)
    for fname, tmap in case.files.items():
        path = os.path.join(folder, fname)
        twin = os.path.join(os.path.dirname(folder), "strict", fname)
        if vs_f64 and os.path.exists(twin):
            if not os.path.lexists(path):
                os.symlink(os.path.join("..", "strict", fname), path)  # same float32 weights
        else:
            save_file({k: np.ascontiguousarray(v) for k, v in tmap.items()}, path)
    save_file(tensors, os.path.join(folder, f"{case.name}.safetensors"))
    with open(os.path.join(folder, f"{case.name}.json"), "w") as f:
        json.dump(manifest, f, indent=1)


def torch_errors(case: CaseData):
    """PyTorch's own float32-vs-float64 errors over the comparisons the checker makes, with the
    checker's definitions: max_abs = max |a-b|, max_rel = max over comparisons of
    max|a-b| / max|b|."""
    max_abs = 0.0
    max_rel = 0.0
    for kind, name in case.compared:
        if kind == "t":
            a = case.tensors[name].astype(np.float64)
            b = case.tensors.get(f"{name}_f64")
        else:
            a = np.array([case.scalars[name]], np.float64)
            b = case.scalars.get(f"{name}_f64")
            b = None if b is None else np.array([b], np.float64)
        if b is None:
            continue
        b = np.asarray(b, np.float64)
        d = float(np.abs(a - b).max()) if a.size else 0.0
        scale = float(np.abs(b).max()) if b.size else 0.0
        max_abs = max(max_abs, d)
        if scale > 0:
            max_rel = max(max_rel, d / scale)
    return max_abs, max_rel


# ----------------------------------------------------------------------------------------------
# Reference definitions (README sections 1-8)
# ----------------------------------------------------------------------------------------------


def layer_norm_like(x):
    """Post-LayerNorm-like random features: zero mean, unit variance per token."""
    x = x - x.mean(-1, keepdim=True)
    return x / x.std(-1, unbiased=False, keepdim=True)


def sampling_mask(fs, ws, random_sampling, rng):
    """DataAugmentationFLSL._sampling_mask semantics (README section 2), flat [fs*fs] bool."""
    grid = fs // ws
    s = grid * ws
    oy = ox = 0
    if fs > s:
        p = rng.random()
        if p < 0.25:
            oy, ox = 0, 0
        elif p < 0.5:
            oy, ox = 0, fs - s
        elif p < 0.75:
            oy, ox = fs - s, 0
        else:
            oy, ox = fs - s, fs - s
    m = np.zeros((fs, fs), bool)
    for gi in range(grid):
        for gj in range(grid):
            k = int(rng.integers(ws * ws)) if random_sampling else 0
            m[oy + gi * ws + k // ws, ox + gj * ws + k % ws] = True
    return m.reshape(-1)


def flsl_meanshift(src, tgt, mask, temp):
    b, _, c = src.shape
    src_sel = src[mask].view(b, -1, c)
    attn = torch.softmax((src_sel @ tgt.transpose(-2, -1)) * temp, dim=-1)
    return src_sel, attn @ tgt, attn


def head_forward(ws, v, x):
    h = x
    for i, (w, b) in enumerate(ws):
        h = F.linear(h, w, b)
        if i < len(ws) - 1:
            h = F.gelu(h)  # exact erf form
    mlp_out = h
    normed = F.normalize(mlp_out, dim=-1, p=2, eps=1e-12)
    g = torch.ones(v.shape[0], 1, dtype=v.dtype)  # weight_g filled with 1, frozen
    w_eff = torch._weight_norm(v, g, 0)
    return mlp_out, normed, F.linear(normed, w_eff), w_eff


def temp_scheduler(warmup_t, t, warmup_epochs, nepochs):
    return np.concatenate(
        (np.linspace(warmup_t, t, warmup_epochs), np.ones(nepochs - warmup_epochs) * t)
    )


def flsl_loss(x, mode, sp, tp, temp_s, temp_t, coef, vmr_on):
    ms = 2 - 2 * (F.normalize(x, dim=-1, p=2) * F.normalize(mode, dim=-1, p=2)).sum(-1).mean()
    s = torch.softmax(sp / temp_s, dim=-1)
    t = torch.softmax(tp.detach() / temp_t, dim=-1)
    km = torch.sum(-t * torch.log(s), dim=-1).mean()
    if vmr_on:
        xbar = s.mean(0)
        vmr = (xbar * torch.log(xbar)).sum() + math.log(sp.shape[-1])
    else:
        vmr = torch.zeros((), dtype=x.dtype)
    total = coef[0] * ms + coef[1] * km + coef[2] * vmr
    return total, ms, km, vmr


def sincos_1d(d, pos):
    omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(d, g):
    """get_2d_sincos_pos_embed(D, G): first half of the channels encodes the column index."""
    gh = np.arange(g, dtype=np.float32)
    gw = np.arange(g, dtype=np.float32)
    grid = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, g, g)
    return np.concatenate([sincos_1d(d // 2, grid[0]), sincos_1d(d // 2, grid[1])], axis=1)


def pos_for(pe, g, gh, gw):
    """interpolate_pos_encoding_no_class: pe [1, g*g, D] -> [1, gh*gw, D]."""
    d = pe.shape[-1]
    if gh * gw == g * g and gh == gw:
        return pe
    p = pe.reshape(1, g, g, d).permute(0, 3, 1, 2)
    p = F.interpolate(
        p, scale_factor=((gh + 0.1) / g, (gw + 0.1) / g), mode="bicubic", align_corners=False
    )
    assert tuple(p.shape[-2:]) == (gh, gw), (p.shape, gh, gw)
    return p.permute(0, 2, 3, 1).reshape(1, gh * gw, d)


def vit_forward(P, x, g, depth, heads, patch, record, suffix):
    d = P["pos_embed"].shape[-1]
    t = F.conv2d(x, P["patch_embed.proj.weight"], P["patch_embed.proj.bias"], stride=patch)
    t = t.flatten(2).transpose(1, 2)
    record(f"patch_embed{suffix}", t)
    gh, gw = x.shape[2] // patch, x.shape[3] // patch
    pe = pos_for(P["pos_embed"], g, gh, gw)
    record(f"pos_embed{suffix}", pe)
    t = t + pe
    b, n, _ = t.shape
    for i in range(depth):
        k = f"blocks.{i}."
        y = F.layer_norm(t, (d,), P[k + "norm1.weight"], P[k + "norm1.bias"], eps=1e-6)
        qkv = F.linear(y, P[k + "attn.qkv.weight"], P[k + "attn.qkv.bias"])
        qkv = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        q, kk, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ kk.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(dim=-1)
        o = (attn @ v).transpose(1, 2).reshape(b, n, d)
        t = t + F.linear(o, P[k + "attn.proj.weight"], P[k + "attn.proj.bias"])
        y = F.layer_norm(t, (d,), P[k + "norm2.weight"], P[k + "norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, P[k + "mlp.fc1.weight"], P[k + "mlp.fc1.bias"])),
                     P[k + "mlp.fc2.weight"], P[k + "mlp.fc2.bias"])
        t = t + y
        record(f"block{i}{suffix}", t)
    out = F.layer_norm(t, (d,), P["norm.weight"], P["norm.bias"], eps=1e-6)
    record(f"features{suffix}", out)
    return out


# ----------------------------------------------------------------------------------------------
# Case generators
# ----------------------------------------------------------------------------------------------


def tgen(seed):
    return torch.Generator().manual_seed(seed)


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=F32)


def pick(rng, xs):
    return xs[int(rng.integers(len(xs)))]


def gen_head(name, seed, dims=None):
    rng = np.random.default_rng(seed)
    gen = tgen(seed)
    if dims is None:
        in_dim = pick(rng, [8, 16, 32, 64, 96, 128, 192, 384])
        hidden = pick(rng, [16, 32, 64, 128, 256, 512, 1024])
        bott = pick(rng, [8, 16, 32, 64, 128, 256])
        out_dim = pick(rng, [8, 16, 64, 128, 256, 512, 1024, 2048])
        nl = int(rng.integers(2, 5))
        lead = [int(rng.integers(1, 5)), int(rng.integers(1, 9))]
        zero_bias = bool(rng.random() < 0.5)
    else:
        in_dim, out_dim, hidden, bott, nl, lead = dims
        zero_bias = True
    widths = [in_dim] + [hidden] * (nl - 1) + [bott]
    ws = []
    for a, b in zip(widths[:-1], widths[1:]):
        w = randn(gen, b, a) * 0.02  # trunc_normal(std=.02) with |a|,|b| = 2: no truncation
        bias = torch.zeros(b) if zero_bias else randn(gen, b) * 0.02
        ws.append((w, bias))
    bound = 1 / math.sqrt(bott)
    v = (torch.rand(out_dim, bott, generator=gen) * 2 - 1) * bound  # kaiming-uniform
    x = randn(gen, *lead, in_dim)
    r = randn(gen, *lead, out_dim)

    def run(dt):
        wts = [(w.to(dt).clone().requires_grad_(), b.to(dt).clone().requires_grad_()) for w, b in ws]
        vv = v.to(dt).clone().requires_grad_()
        xx = x.to(dt).clone().requires_grad_()
        mlp_out, normed, out, w_eff = head_forward(wts, vv, xx)
        (out * r.to(dt)).sum().backward()
        return dict(mlp_out=mlp_out, normed=normed, out=out, w_eff=w_eff, grad_x=xx.grad,
                    grad_v=vv.grad, grad_last_bias=wts[-1][1].grad, grad_b0=wts[0][1].grad)

    a, b = run(F32), run(F64)
    c = CaseData(
        name,
        f"FLSLhead(in_dim={in_dim}, out_dim={out_dim}, use_bn=False, norm_last_layer=True, "
        f"nlayers={nl}, hidden_dim={hidden}, bottleneck_dim={bott})(x)",
        "Projection head: MLP (GELU) -> L2 normalise -> weight-normalised linear (no bias).",
    )
    wfile = f"{name}_weights.safetensors"
    wmap = {}
    for i, (w, bias) in enumerate(ws):
        wmap[f"mlp.{2 * i}.weight"] = np_of(w)
        wmap[f"mlp.{2 * i}.bias"] = np_of(bias)
    wmap["last_layer.weight_g"] = np.ones((out_dim, 1), np.float32)
    wmap["last_layer.weight_v"] = np_of(v)
    wmap["last_layer.weight__effective"] = np_of(a["w_eff"])
    c.files[wfile] = wmap
    c.extra["weights_file"] = wfile
    c.t("x", x, compared=False)
    c.t("normed", a["normed"], b["normed"])
    c.t("mlp_out", a["mlp_out"], b["mlp_out"], compared=False)
    c.t("out", a["out"], b["out"])
    c.t("R", r, compared=False)
    c.t("grad_x", a["grad_x"], b["grad_x"])
    c.t("grad_last_layer_weight_v", a["grad_v"], b["grad_v"])
    c.t(f"grad_mlp_{2 * (nl - 1)}_bias", a["grad_last_bias"], b["grad_last_bias"])
    c.t("grad_mlp_0_bias", a["grad_b0"], b["grad_b0"])
    c.params = dict(seed=seed, in_dim=in_dim, out_dim=out_dim, hidden=hidden, bottleneck=bott,
                    nlayers=nl, input_shape=list(x.shape), zero_bias=zero_bias)
    c.tolerances = {"out": {"atol": 1e-5, "rtol": 1e-4}, "grads": {"atol": 1e-6, "rtol": 1e-3}}
    return c


def gen_meanshift(name, seed):
    rng = np.random.default_rng(seed)
    gen = tgen(seed)
    kind = pick(rng, ["intra", "inter"])
    c_dim = pick(rng, [8, 16, 32, 64, 128, 192, 384])
    fs = int(rng.integers(2, 15))
    ws = int(rng.integers(2, min(4, fs) + 1))
    random_sampling = bool(rng.random() < 0.5)
    bt = int(rng.integers(1, 4))
    views = int(rng.integers(1, 4))
    b = views * bt
    u = rng.random()
    if u < 0.3:
        temp = TAU_SA
    elif u < 0.5:
        temp = TAU_CA
    else:
        temp = float(math.exp(rng.uniform(math.log(0.003), math.log(1.0))) / math.sqrt(c_dim))
    src = layer_norm_like(randn(gen, b, fs * fs, c_dim))
    mask = torch.tensor(np.stack([sampling_mask(fs, ws, random_sampling, rng) for _ in range(b)]))
    m_sel = int(mask[0].sum())
    mask_idx = torch.nonzero(mask)[:, 1].reshape(b, m_sel)
    gt = int(rng.integers(fs, 17)) if kind == "inter" else fs
    enc_t = layer_norm_like(randn(gen, bt, gt * gt, c_dim)) if kind == "inter" else None
    r = randn(gen, b, m_sel, c_dim)

    def run(dt):
        s = src.to(dt).clone().requires_grad_()
        if kind == "intra":
            tgt = s
        else:
            e = enc_t.to(dt)
            tgt = e.unsqueeze(0).expand(views, -1, -1, -1).reshape(views * bt, gt * gt, c_dim)
        sel, mode, attn = flsl_meanshift(s, tgt, mask, temp)
        (mode * r.to(dt)).sum().backward()
        return sel, mode, attn, s.grad

    a, bb = run(F32), run(F64)
    c = CaseData(name, "utils.flsl_meanshift(src, tgt, src_mask=mask, temp=temp) -> (src_sel, mode)",
                 f"Mean-shift layer, {kind}-view.")
    c.t("src", src, compared=False)
    c.t("mask", mask.to(torch.uint8), compared=False)
    c.t("mask_idx", mask_idx.to(torch.int64), compared=False)
    if enc_t is not None:
        c.t("enc_t", enc_t, compared=False)
    c.t("src_sel", a[0], bb[0])
    c.t("mode", a[1], bb[1])
    c.t("attn_derived", a[2], bb[2], compared=False)
    c.t("R", r, compared=False)
    c.t("grad_src", a[3], bb[3])
    c.params = dict(kind=kind, B=b, b_views=views, bt=bt, C=c_dim, feature_size=fs, window_size=ws,
                    random_sampling=random_sampling, temp=temp, tokens_selected_per_row=m_sel,
                    Nt=gt * gt, seed=seed)
    c.tolerances = {"mode": {"atol": 1e-5, "rtol": 1e-4}, "grad_src": {"atol": 1e-5, "rtol": 1e-3}}
    return c


def gen_loss(name, seed):
    rng = np.random.default_rng(seed)
    gen = tgen(seed)
    m = int(rng.integers(2, 161))
    c_dim = pick(rng, [8, 16, 32, 64, 192, 384])
    k = pick(rng, [8, 16, 64, 128, 512, 1024, 2048])
    bott = pick(rng, [8, 32, 64, 256])
    x = layer_norm_like(randn(gen, m, c_dim))
    alpha = float(rng.uniform(0, 1))
    mode = alpha * x + (1 - alpha) * layer_norm_like(randn(gen, m, c_dim))
    protos = F.normalize(randn(gen, k, bott), dim=-1)
    zs = randn(gen, m, bott)
    zt = zs + float(rng.uniform(0, 2)) * randn(gen, m, bott)
    sp = F.normalize(zs, dim=-1) @ protos.T
    tp = F.normalize(zt, dim=-1) @ protos.T
    warm_t = 0.04
    t_final = float(pick(rng, [0.04, float(rng.uniform(0.04, 0.07))]))
    warm_ep = int(rng.integers(0, 31))
    nep = 100
    epoch = int(rng.integers(0, 40))
    temp_t = float(temp_scheduler(warm_t, t_final, warm_ep, nep)[epoch])
    temp_s = float(pick(rng, [0.1, 0.1, float(rng.uniform(0.05, 0.2))]))
    coef = [float(pick(rng, [0.03, float(rng.uniform(0, 0.5))])), float(pick(rng, [1.0, float(rng.uniform(0.5, 2))])),
            float(pick(rng, [5.0, float(rng.uniform(0, 10))]))]
    vmr_on = bool(rng.random() < 0.8)

    def run(dt):
        xs = [t.to(dt).clone().requires_grad_() for t in (x, mode, sp, tp)]
        total, ms, km, vmr = flsl_loss(*xs, temp_s, temp_t, coef, vmr_on)
        total.backward()
        return [float(v.detach()) for v in (total, ms, km, vmr)], [t.grad for t in xs[:3]], xs[3].grad

    (s32, g32, tg32), (s64, g64, _) = run(F32), run(F64)
    assert tg32 is None
    c = CaseData(name, "main_flsl.FLSLLoss(...)(x, mode, student_pred, teacher_pred, epoch)",
                 "FLSL objective.")
    c.t("x", x, compared=False)
    c.t("mode", mode, compared=False)
    c.t("student_pred", sp, compared=False)
    c.t("teacher_pred", tp, compared=False)
    c.scalars["teacher_pred_grad_is_none"] = True
    for key, a, b in zip(["total", "ms_loss", "kmeans_loss", "vmr"], s32, s64):
        c.s(key, a, b)
    for key, a, b in zip(["grad_x", "grad_mode", "grad_student_pred"], g32, g64):
        c.t(key, a, b)
    c.params = dict(M=m, C=c_dim, K=k, temp_s=temp_s, temp_t_schedule_args=[warm_t, t_final, warm_ep, nep],
                    epoch=epoch, temp_t=temp_t, coefficients=coef, volume_maximization=vmr_on,
                    centering=None, seed=seed)
    c.tolerances = {"total": {"rtol": 1e-5, "atol": 1e-6}, "ms_loss": {"rtol": 1e-5},
                    "kmeans_loss": {"rtol": 1e-5}, "vmr": {"atol": 2e-6},
                    "grads": {"rtol": 1e-4, "atol": 1e-8}}
    return c


def gen_vmr(name, seed):
    rng = np.random.default_rng(seed)
    gen = tgen(seed)
    m = int(rng.integers(1, 129))
    k = pick(rng, [2, 8, 16, 100, 128, 512, 2048])
    scale = float(math.exp(rng.uniform(math.log(0.1), math.log(10))))
    s = torch.softmax(randn(gen, m, k) * scale, dim=-1)
    use_prior = bool(rng.random() < 0.5)
    prior = torch.softmax(randn(gen, 1, k), dim=-1) if use_prior else None

    def run(dt):
        ss = s.to(dt).clone().requires_grad_()
        xbar = ss.mean(0)
        if use_prior:
            logp = torch.log(prior.to(dt))
            value = (xbar * torch.log(xbar)).sum() - (xbar * logp).sum()
        else:
            logp = torch.full((1, k), math.log(1.0 / k), dtype=dt)
            value = (xbar * torch.log(xbar)).sum() + math.log(k)
        value.backward()
        return float(value.detach()), ss.grad, logp

    (v32, g32, lp32), (v64, g64, _) = run(F32), run(F64)
    c = CaseData(name, "utils.NonEmptyPriorKL(K, prior=prior)(s)", "VMR KL(mean_rows(s) || prior).")
    c.t("s", s, compared=False)
    if use_prior:
        c.t("prior", prior, compared=False)
    c.t("log_prior_buffer", lp32, compared=False)
    c.t("grad_s", g32, g64)
    c.s("value", v32, v64)
    c.params = dict(M=m, K=k, prior=use_prior, seed=seed)
    c.tolerances = {"value": {"atol": 2e-6}, "grad": {"rtol": 1e-4, "atol": 1e-7}}
    return c


def gen_sincos(name, seed):
    rng = np.random.default_rng(seed)
    c = CaseData(name, "utils.get_2d_sincos_pos_embed(D, G, cls_token=False)", "2-D sin-cos table.")
    entries = []
    for _ in range(3):
        d = 4 * int(rng.integers(1, 129))
        g = int(rng.integers(1, 17))
        if any(e["embed_dim"] == d and e["grid_size"] == g for e in entries):
            continue
        pe = sincos_2d(d, g)
        c.t(f"pe_{d}_{g}", pe.astype(np.float64), compared=False)
        c.t(f"pe_{d}_{g}_f32", pe.astype(np.float32), compared=False)
        entries.append({"embed_dim": d, "grid_size": g})
    c.params = dict(entries=entries, seed=seed)
    c.tolerances = {"f64": {"atol": 1e-12}, "f32": {"atol": 1e-6}}
    return c


def factor_pairs(n):
    return [(a, n // a) for a in range(1, n + 1) if n % a == 0 and a != n // a]


def gen_vit(name, seed, fixed=None, pos_only=False):
    rng = np.random.default_rng(seed)
    gen = tgen(seed)
    patch = 16
    if fixed is None:
        heads = int(rng.integers(1, 5))
        head_dim = pick(rng, [4, 8, 16, 32])
        d = heads * head_dim
        depth = int(rng.integers(1, 3))
        mlp_ratio = int(rng.integers(1, 5))
        g = int(rng.integers(2, 15))
        batch = int(rng.integers(1, 3))
        pairs = factor_pairs(g * g)
        if pairs and rng.random() < 0.3:  # same token count, not square: still resized
            gh, gw = pick(rng, pairs)
        else:
            gh, gw = int(rng.integers(1, 2 * g + 3)), int(rng.integers(1, 2 * g + 3))
        extra_h = int(rng.integers(0, 16)) if rng.random() < 0.2 else 0
        extra_w = int(rng.integers(0, 16)) if rng.random() < 0.2 else 0
        interp_grids = sorted({int(rng.integers(1, 2 * g + 3)) for _ in range(3)} - {g})
    else:
        heads, d, depth, mlp_ratio, g, batch, (gh, gw), interp_grids = fixed
        extra_h = extra_w = 0
    img = g * patch
    hidden = d * mlp_ratio
    P = {"cls_token": randn(gen, 1, 1, d) * 0.02,
         "pos_embed": torch.tensor(sincos_2d(d, g), dtype=F32).unsqueeze(0),
         "patch_embed.proj.weight": randn(gen, d, 3, patch, patch) / math.sqrt(3 * patch * patch),
         "patch_embed.proj.bias": randn(gen, d) * 0.02}
    for i in range(depth):
        k = f"blocks.{i}."
        P[k + "norm1.weight"] = 1 + 0.1 * randn(gen, d)
        P[k + "norm1.bias"] = 0.1 * randn(gen, d)
        P[k + "attn.qkv.weight"] = 0.02 * randn(gen, 3 * d, d)
        P[k + "attn.qkv.bias"] = 0.02 * randn(gen, 3 * d)
        P[k + "attn.proj.weight"] = 0.02 * randn(gen, d, d)
        P[k + "attn.proj.bias"] = 0.02 * randn(gen, d)
        P[k + "norm2.weight"] = 1 + 0.1 * randn(gen, d)
        P[k + "norm2.bias"] = 0.1 * randn(gen, d)
        P[k + "mlp.fc1.weight"] = 0.02 * randn(gen, hidden, d)
        P[k + "mlp.fc1.bias"] = 0.02 * randn(gen, hidden)
        P[k + "mlp.fc2.weight"] = 0.02 * randn(gen, d, hidden)
        P[k + "mlp.fc2.bias"] = 0.02 * randn(gen, d)
    P["norm.weight"] = 1 + 0.1 * randn(gen, d)
    P["norm.bias"] = 0.1 * randn(gen, d)
    x = randn(gen, batch, 3, img, img)
    x_local = randn(gen, batch, 3, gh * patch + extra_h, gw * patch + extra_w)

    rec = {F32: {}, F64: {}}

    def run(dt):
        Pd = {k: v.to(dt) for k, v in P.items()}
        r = rec[dt]
        with torch.no_grad():
            vit_forward(Pd, x.to(dt), g, depth, heads, patch, lambda k, v: r.__setitem__(k, v), "")
            vit_forward(Pd, x_local.to(dt), g, depth, heads, patch,
                        lambda k, v: r.__setitem__(k, v), "_local")
            for gi in interp_grids:
                r[f"pos_embed_interp_{gi * patch}"] = pos_for(Pd["pos_embed"], g, gi, gi)

    run(F32)
    run(F64)
    a, b = rec[F32], rec[F64]
    c = CaseData(
        name,
        f"VisionTransformer(img_size=[{img}], patch_size=16, embed_dim={d}, depth={depth}, "
        f"num_heads={heads}, mlp_ratio={mlp_ratio}, qkv_bias=True) no-class; vit(x)",
        "No-class ViT forward, global and (often non-square) local crop, resized position tables.",
    )
    wfile = f"{name}_weights.safetensors"
    c.files[wfile] = {k: np_of(v) for k, v in P.items()}
    c.extra["weights_file"] = wfile
    c.extra["weights_pth"] = None
    if not pos_only:  # without x / x_local the checker compares the interp tables only
        c.t("x", x, compared=False)
        for key in ["patch_embed"] + [f"block{i}" for i in range(depth)] + ["features"]:
            c.t(key, a[key], b[key])
        c.t("x_local", x_local, compared=False)
        resized = not (gh * gw == g * g and gh == gw)
        for key in (["pos_embed_local"] if resized else []) + ["patch_embed_local"] + \
                [f"block{i}_local" for i in range(depth)] + ["features_local"]:
            c.t(key, a[key], b[key])
    interp = []
    for gi in interp_grids:
        key = f"pos_embed_interp_{gi * patch}"
        c.t(key, a[key], b[key])
        interp.append({"size": gi * patch, "grid": gi, "scale_factor": (gi + 0.1) / g})
    c.params = dict(arch="vit_xcheck", patch_size=patch, embed_dim=d, depth=depth, num_heads=heads,
                    mlp_ratio=mlp_ratio, qkv_bias=True, layernorm_eps=1e-6, seed=seed,
                    img_size=img, grid_size=g, interp=interp, blocks_saved=list(range(depth)),
                    batch=batch, local_size=[int(x_local.shape[2]), int(x_local.shape[3])],
                    local_grid=[gh, gw])
    c.tolerances = {"f32_features": {"atol": 2e-4, "rtol": 1e-3}, "pos_embed": {"atol": 2e-6},
                    "block0": {"atol": 1e-5, "rtol": 1e-4}}
    return c


KINDS = {
    "head": ("flsl_head", gen_head),
    "meanshift": ("meanshift", gen_meanshift),
    "loss": ("flsl_loss", gen_loss),
    "vmr": ("vmr", gen_vmr),
    "sincos": ("sincos_pos_embed", gen_sincos),
    "vit": ("vit_forward", gen_vit),
}


def issue_cases():
    """The two shapes of issue 21: FLSLhead(192, 1024, hidden 1024, bottleneck 128, nlayers 3) on
    x [3,4,192], and the position table of a 112-px crop (and a 112x448 one) on a 14x14 table."""
    cases = []
    for s in range(3):
        cases.append(gen_head(f"flsl_head_issue21_s{s}", 9000 + s, (192, 1024, 1024, 128, 3, [3, 4])))
    cases.append(gen_vit("vit_forward_issue21_112", 9100, (3, 192, 1, 4, 14, 1, (7, 7), [4, 6, 7])))
    cases.append(gen_vit("vit_forward_issue21_112x448", 9101, (3, 192, 1, 4, 14, 1, (7, 28), [7])))
    # Position tables only (no image input): the PASS line's max_abs is the table error alone.
    cases.append(gen_vit("vit_forward_issue21_tables", 9102,
                         (3, 192, 1, 1, 14, 1, (7, 7), [gi for gi in range(1, 29) if gi != 14]),
                         pos_only=True))
    return cases


# ----------------------------------------------------------------------------------------------
# Self-test against the official golden vectors
# ----------------------------------------------------------------------------------------------


def validate_golden(root):
    """Re-computes the golden cases of `root` (e.g. ../shared/reference or its micro/) with the
    definitions above and reports max |diff| (bit-identical with the same torch version)."""
    from safetensors.numpy import load_file

    def T(a):
        return torch.from_numpy(np.array(a))

    worst = 0.0

    def rep(case, name, a, b):
        nonlocal worst
        a = np.asarray(a.detach() if isinstance(a, torch.Tensor) else a, np.float64)
        d = float(np.abs(a - np.asarray(b, np.float64)).max())
        worst = max(worst, d)
        print(f"  {case:32s} {name:26s} max|diff| {d:.3e}")

    def load(c):
        return json.load(open(f"{root}/{c}.json")), load_file(f"{root}/{c}.safetensors")

    for c in json.load(open(f"{root}/index.json"))["cases"]:
        if c.startswith("flsl_head"):
            m, d = load(c)
            w = load_file(f"{root}/{m['weights_file']}")
            nl = m["params"]["nlayers"]
            ws = [(T(w[f"mlp.{2 * i}.weight"]).requires_grad_(), T(w[f"mlp.{2 * i}.bias"]).requires_grad_())
                  for i in range(nl)]
            v = T(w["last_layer.weight_v"]).requires_grad_()
            x = T(d["x"]).requires_grad_()
            _, normed, out, _ = head_forward(ws, v, x)
            (out * T(d["R"])).sum().backward()
            for k, a in [("normed", normed), ("out", out), ("grad_x", x.grad),
                         ("grad_last_layer_weight_v", v.grad), ("grad_mlp_0_bias", ws[0][1].grad),
                         (f"grad_mlp_{2 * (nl - 1)}_bias", ws[-1][1].grad)]:
                rep(c, k, a, d[k])
        elif c.startswith("meanshift_"):
            m, d = load(c)
            p = m["params"]
            src = T(d["src"]).requires_grad_()
            if p["kind"] == "intra":
                tgt = src
            else:
                e = T(d["enc_t"])
                tgt = e.unsqueeze(0).expand(p["b_views"], -1, -1, -1).reshape(-1, p["Nt"], p["C"])
            _, mode, _ = flsl_meanshift(src, tgt, T(d["mask"]).bool(), p["temp"])
            (mode * T(d["R"])).sum().backward()
            rep(c, "mode", mode, d["mode"])
            rep(c, "grad_src", src.grad, d["grad_src"])
        elif c.startswith("flsl_loss_"):
            m, d = load(c)
            p = m["params"]
            xs = [T(d[k]).requires_grad_() for k in ["x", "mode", "student_pred", "teacher_pred"]]
            a = p["temp_t_schedule_args"]
            tt = float(temp_scheduler(a[0], a[1], int(a[2]), int(a[3]))[p["epoch"]])
            vals = flsl_loss(*xs, p["temp_s"], tt, p["coefficients"], p["volume_maximization"])
            vals[0].backward()
            for k, v in zip(["total", "ms_loss", "kmeans_loss", "vmr"], vals):
                rep(c, k, float(v.detach()), m["scalars"][k])
            for k, t in zip(["grad_x", "grad_mode", "grad_student_pred"], xs):
                rep(c, k, t.grad, d[k])
        elif c.startswith("vmr_"):
            m, d = load(c)
            s = T(d["s"]).requires_grad_()
            xbar = s.mean(0)
            if m["params"]["prior"]:
                val = (xbar * torch.log(xbar)).sum() - (xbar * torch.log(T(d["prior"]))).sum()
            else:
                val = (xbar * torch.log(xbar)).sum() + math.log(s.shape[1])
            val.backward()
            rep(c, "value", float(val.detach()), m["scalars"]["value"])
            rep(c, "grad_s", s.grad, d["grad_s"])
        elif c.startswith("sincos_pos_embed"):
            m, d = load(c)
            for e in m["params"]["entries"]:
                dd, g = e["embed_dim"], e["grid_size"]
                pe = sincos_2d(dd, g)
                rep(c, f"pe_{dd}_{g}", pe, d[f"pe_{dd}_{g}"])
                rep(c, f"pe_{dd}_{g}_f32", pe.astype(np.float32), d[f"pe_{dd}_{g}_f32"])
        elif c.startswith("vit_forward"):
            m, d = load(c)
            p = m["params"]
            P = {k: T(v) for k, v in load_file(f"{root}/{m['weights_file']}").items()}
            g = int(round(math.sqrt(P["pos_embed"].shape[1])))
            rec = {}
            with torch.no_grad():
                for suffix, inp in [("", "x"), ("_local", "x_local")]:
                    vit_forward(P, T(d[inp]), g, p["depth"], p["num_heads"], p["patch_size"],
                                rec.__setitem__, suffix)
            for k in ["features", "features_local", "pos_embed_local"]:
                rep(c, k, rec[k], d[k])
            for e in p["interp"]:
                k = f"pos_embed_interp_{e['size']}"
                rep(c, k, pos_for(P["pos_embed"], g, e["grid"], e["grid"]), d[k])
                rep(c, k + "_f64", pos_for(P["pos_embed"].double(), g, e["grid"], e["grid"]), d[k + "_f64"])
    print(f"worst max|diff| vs the golden vectors: {worst:.3e} (0 = bit-identical)")
    return 0 if worst == 0.0 else 1


# ----------------------------------------------------------------------------------------------
# Runner
# ----------------------------------------------------------------------------------------------

LINE = re.compile(r"^(PASS|FAIL) (\S+)(?: max_abs=(\S+) max_rel=(\S+))?(.*)$")


def run_checker(flsl, folder):
    p = subprocess.run([flsl, "reference-check", folder], capture_output=True, text=True)
    out = {}
    for line in p.stdout.splitlines():
        m = LINE.match(line.strip())
        if m:
            out[m.group(2)] = (m.group(1), m.group(3), m.group(4), m.group(5).strip())
    return p.returncode, out, p.stdout + p.stderr


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=20, help="random draws per kind")
    ap.add_argument("--seed0", type=int, default=0)
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma list of " + ",".join(KINDS))
    ap.add_argument("--out", default=None, help="output folder (default: a new temp folder)")
    ap.add_argument("--flsl", default=DEFAULT_FLSL, help="the flsl binary")
    ap.add_argument("--no-run", action="store_true", help="only write the cases")
    ap.add_argument("--no-issue-cases", action="store_true")
    ap.add_argument("--max-ratio", type=float, default=0.0,
                    help="fail when ours-vs-f64 max_rel exceeds R x torch's (0: report only)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the reference used 2)")
    ap.add_argument("--validate-golden", metavar="DIR", default=None,
                    help="only re-compute the official golden cases of DIR with these definitions")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.validate_golden:
        return validate_golden(args.validate_golden)

    out = args.out or tempfile.mkdtemp(prefix="flsl-torch-xcheck-")
    folders = {v: os.path.join(out, v) for v in ("strict", "vs_f64")}
    for f in folders.values():
        os.makedirs(f, exist_ok=True)

    cases: list[CaseData] = []
    if not args.no_issue_cases:
        cases += issue_cases()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for kind in kinds:
        prefix, fn = KINDS[kind]
        for i in range(args.seed0, args.seed0 + args.seeds):
            seed = 1000 * (list(KINDS).index(kind) + 1) + i
            cases.append(fn(f"{prefix}_xc{i}", seed))

    for v, folder in folders.items():
        names = []
        for c in cases:
            if v == "vs_f64" and c.name.startswith("sincos_pos_embed"):
                continue  # already compared with float64
            write_case(folder, c, v == "vs_f64")
            names.append(c.name)
        with open(os.path.join(folder, "index.json"), "w") as f:
            json.dump({"variant": f"torch_crosscheck/{v}", "torch_version": torch.__version__,
                       "torch_num_threads": args.threads, "device": "cpu", "cases": names,
                       "weights_files": sorted({w for c in cases for w in c.files})}, f, indent=1)
    print(f"wrote {len(cases)} cases to {out}/{{strict,vs_f64}}")
    if args.no_run:
        return 0
    if not os.path.exists(args.flsl):
        print(f"checker binary not found: {args.flsl}", file=sys.stderr)
        return 2

    rc_s, strict, raw_s = run_checker(args.flsl, folders["strict"])
    rc_f, vsf, raw_f = run_checker(args.flsl, folders["vs_f64"])
    print(f"{'case':40s} {'strict':6s} {'ours-f64 max_rel':>16s} {'torch-f64 max_rel':>17s} "
          f"{'ratio':>7s} {'ours-f64 max_abs':>16s} {'torch-f64 max_abs':>17s}")
    n_fail = 0
    n_ratio = 0
    for c in cases:
        st = strict.get(c.name, ("MISSING", None, None, ""))
        t_abs, t_rel = torch_errors(c)
        o = vsf.get(c.name)
        o_abs = o_rel = float("nan")
        if o and o[0] == "PASS":
            o_abs, o_rel = float(o[1]), float(o[2])
        ratio = o_rel / t_rel if t_rel > 0 else float("nan")
        flag = ""
        if args.max_ratio > 0 and (not o or o[0] != "PASS" or ratio > args.max_ratio):
            flag = "  <-- ratio"
            n_ratio += 1
        if c.name.startswith("sincos"):
            ratio = float("nan")
        print(f"{c.name:40s} {st[0]:6s} {o_rel:16.3e} {t_rel:17.3e} {ratio:7.2f} {o_abs:16.3e} "
              f"{t_abs:17.3e}{flag}")
        if st[0] != "PASS":
            n_fail += 1
            print(f"    strict: {st[3]}")
        elif st[3]:
            print(f"    strict: {st[3]}")  # e.g. values passed only against the float64 twin
        if o and o[0] != "PASS":
            print(f"    vs_f64: {o[3]}")
    print(f"{len(cases) - n_fail} passed, {n_fail} failed (strict, float32 reference); "
          f"{n_ratio} over --max-ratio; cases in {out}")
    if not strict:
        print(raw_s[-3000:])
    return 1 if (n_fail or n_ratio) else 0


if __name__ == "__main__":
    sys.exit(main())
