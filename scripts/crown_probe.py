#!/usr/bin/env python3
"""How much tree-crown information is in a backbone's patch features? (docs/DEMO.md)

Runs exported backbones (`flsl export --checkpoint RUN --out M.onnx --size 256 [--with-head]`)
on the held-out OSBS_029.png at 256 x 256 and scores their patch features against the image's
crown boxes, next to plain patch colour:

  J raw      crown separation (Youden's J, as `flsl_train::cluster::crown_separation`) of
             farthest-point cosine k-means, k = 4, on the raw features (what `flsl demo` draws,
             with 30 iterations instead of 20)
  J white8   the same score for Euclidean k-means on the top 8 principal components, whitened
  probe AUC  a ridge classifier (crown core vs ground) trained on one half of the image and
             tested on the other, both ways, mean ROC AUC: how linearly decodable "crown" is,
             whatever the clustering

Crown patches: centre in the central 60 % (per side) of a box; ground: outside every box; the
rest is not scored. Needs numpy, pillow, onnxruntime (PyPI); not part of the test command.

    python3 scripts/crown_probe.py out/a.onnx out/b.onnx
"""

import os
import re
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "neon-aerial-trees")
SIDE, PATCH, CORE_SHARE, K = 256, 8, 0.6, 4
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def boxes(stem):
    xml = open(os.path.join(ROOT, "annotations_voc", stem + ".xml")).read()
    return [[float(re.search(f"<{t}>(.*?)</{t}>", b).group(1)) for t in ("xmin", "ymin", "xmax", "ymax")]
            for b in re.findall("<bndbox>(.*?)</bndbox>", xml, re.S)]


def in_boxes(bxs, g, w, h, share):
    m = np.zeros((g, g), bool)
    for gy in range(g):
        for gx in range(g):
            cx, cy = (gx + 0.5) / g * w, (gy + 0.5) / g * h
            m[gy, gx] = any(abs(cx - (b[0] + b[2]) / 2) <= (b[2] - b[0]) * share / 2
                            and abs(cy - (b[1] + b[3]) / 2) <= (b[3] - b[1]) * share / 2 for b in bxs)
    return m.ravel()


def kmeans_cos(f, k, iters=30):
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    c = [f[0]]
    while len(c) < k:
        c.append(f[np.argmin(np.max(np.stack([f @ ci for ci in c]), 0))])
    c = np.stack(c)
    for _ in range(iters):
        lab = np.argmax(f @ c.T, 1)
        for j in range(k):
            if (lab == j).any():
                v = f[lab == j].sum(0)
                c[j] = v / max(np.linalg.norm(v), 1e-12)
    return lab


def kmeans_euc(x, k, iters=50, seed=0):
    c = x[np.random.RandomState(seed).choice(len(x), k, replace=False)]
    for _ in range(iters):
        lab = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        c = np.stack([x[lab == j].mean(0) if (lab == j).any() else c[j] for j in range(k)])
    return lab


def main(models):
    img = Image.open(os.path.join(ROOT, "images", "OSBS_029.png")).convert("RGB")
    w, h = img.size
    g = SIDE // PATCH
    bxs = boxes("OSBS_029")
    core, ground = in_boxes(bxs, g, w, h, CORE_SHARE), ~in_boxes(bxs, g, w, h, 1.0)
    rgb = np.asarray(img.resize((SIDE, SIDE), Image.BICUBIC), dtype=np.float32) / 255
    x = ((rgb - MEAN) / STD).transpose(2, 0, 1)[None].astype(np.float32)

    def j(lab):
        return sum(max(0.0, (core & (lab == c)).sum() / core.sum() - (ground & (lab == c)).sum() / ground.sum())
                   for c in range(lab.max() + 1))

    def white8(f):
        u = np.linalg.svd(f - f.mean(0), full_matrices=False)[0]
        return kmeans_euc(u[:, :8], K)

    def auc(s, y):
        r = np.empty(len(s))
        r[np.argsort(s)] = np.arange(len(s))
        p = y.sum()
        return (r[y].sum() - p * (p - 1) / 2) / (p * (len(y) - p))

    def probe(f):
        f = (f - f.mean(0)) / (f.std(0) + 1e-6)
        scored, gx = core | ground, np.tile(np.arange(g), g)
        out = []
        for train, test in ((gx < g // 2, gx >= g // 2), (gx >= g // 2, gx < g // 2)):
            a, b = train & scored, test & scored
            design = np.c_[f[a], np.ones(a.sum())]
            wts = np.linalg.solve(design.T @ design + 10 * np.eye(design.shape[1]), design.T @ np.where(core[a], 1.0, -1.0))
            out.append(auc(np.c_[f[b], np.ones(b.sum())] @ wts, core[b]))
        return float(np.mean(out))

    patches = rgb.reshape(g, PATCH, g, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, PATCH * PATCH, 3)
    colour = np.concatenate([patches.mean(1), patches.std(1)], 1)
    colour = (colour - colour.mean(0)) / colour.std(0)
    print(f"OSBS_029 at {SIDE}: {core.sum()} crown-core and {ground.sum()} ground patches of {g * g}")
    print(f"{'features':<40} {'J raw':>7} {'J white8':>9} {'probe AUC':>10}")
    print(f"{'colour (mean, std RGB; Euclidean k-means)':<40} {j(kmeans_euc(colour, K)):7.3f} {j(white8(colour)):9.3f} {probe(colour):10.3f}")
    for m in models:
        s = ort.InferenceSession(m)
        f = s.run(None, {s.get_inputs()[0].name: x})[0][0]
        print(f"{os.path.basename(m):<40} {j(kmeans_cos(f, K)):7.3f} {j(white8(f)):9.3f} {probe(f):10.3f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
