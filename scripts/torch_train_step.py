#!/usr/bin/env python3
"""PyTorch's CPU time for the training step our criterion bench measures (the peer for
`cargo bench -p flsl-train --bench train_step -- vit_tiny16`): the ViT-Ti/16 (or ViT-S/16)
backbone of the reference (no class token, fixed 2-D sin-cos table resized bicubically for
other grids, pre-norm blocks, exact GELU, qkv bias, LayerNorm eps 1e-6) on 2 global 224x224
and 8 local 96x96 crops: forward, loss = mean(y^2) per view summed, backward, AdamW.

Needs CPU torch from PyPI (outside the README's test command), e.g.
    python3 -m venv ~/.cache/flsl-torch-venv && ~/.cache/flsl-torch-venv/bin/pip install torch numpy
    ~/.cache/flsl-torch-venv/bin/python scripts/torch_train_step.py --threads 1,2

Prints one line per thread count: median, min and max ms per step over --steps timed steps
(after --warmup untimed ones), and images/s (10 crops per step).
"""

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def sincos_2d(d, g):
    """The reference's get_2d_sincos_pos_embed(d, g) without a class token: [g*g, d]."""
    gy, gx = np.meshgrid(np.arange(g, dtype=np.float64), np.arange(g, dtype=np.float64))

    def one(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(d // 2, gy), one(d // 2, gx)], axis=1).astype(np.float32)


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        b, n, d = x.shape
        h = self.heads
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * (d // h) ** -0.5
        attn = attn.softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Vit(nn.Module):
    def __init__(self, d, depth, heads, patch=16, img=224):
        super().__init__()
        self.patch = patch
        self.g = img // patch
        self.patch_embed = nn.Conv2d(3, d, patch, patch)
        self.register_buffer("pos_embed", torch.from_numpy(sincos_2d(d, self.g))[None])
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)

    def pos_for(self, gh, gw):
        if gh == self.g and gw == self.g:
            return self.pos_embed
        d = self.pos_embed.shape[-1]
        pe = self.pos_embed.reshape(1, self.g, self.g, d).permute(0, 3, 1, 2)
        # The reference's +0.1 trick: scale factors slightly above the exact ratio.
        pe = F.interpolate(
            pe,
            scale_factor=((gh + 0.1) / self.g, (gw + 0.1) / self.g),
            mode="bicubic",
        )
        return pe.permute(0, 2, 3, 1).reshape(1, gh * gw, d)

    def forward(self, x):
        gh, gw = x.shape[2] // self.patch, x.shape[3] // self.patch
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_for(gh, gw)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    d, heads = (192, 3) if args.model == "tiny" else (384, 6)
    torch.manual_seed(0)
    model = Vit(d, 12, heads)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.04)
    g = torch.randn(2, 3, 224, 224)
    loc = torch.randn(8, 3, 96, 96)
    for t in [int(s) for s in args.threads.split(",")]:
        torch.set_num_threads(t)
        times = []
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            loss = model(g).pow(2).mean() + model(loc).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times.append(dt * 1e3)
        med = statistics.median(times)
        print(
            f"pytorch {torch.__version__} vit_{args.model}16 backbone step, {t} thread(s): "
            f"median {med:.1f} ms (min {min(times):.1f}, max {max(times):.1f}, {args.steps} steps) "
            f"= {10 / med * 1e3:.1f} images/s"
        )


if __name__ == "__main__":
    main()
