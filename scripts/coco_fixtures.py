#!/usr/bin/env python3
"""Generate the COCO bbox-evaluation fixtures of runtime/tests/coco_eval.rs with pycocotools.

For every case this writes, under runtime/tests/fixtures/coco/:
  <case>.gt.json        COCO instances file (images, annotations, categories)
  <case>.dt.json        COCO results file (list of detections)
  <case>.expected.json  {"stats": {AP, AP50, ..., ARl}, "summary": [the 12 lines summarize() prints],
                         "pycocotools": version, "numpy": version}

The recorded numbers are the truth for the Rust tests; CI does not need Python.

    pip install pycocotools numpy
    python3 scripts/coco_fixtures.py            # (re)writes the fixtures
    python3 scripts/coco_fixtures.py --check    # recomputes and compares with the files

Everything is deterministic (seeded numpy Generator, no wall clock).
"""

import argparse
import contextlib
import io
import json
import os
import sys
from importlib.metadata import version

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "runtime", "tests", "fixtures", "coco")
# The repository's embedded copy of the NEON tree-crown boxes (same file as ../shared/data).
TREES = os.path.join(ROOT, "data", "neon-aerial-trees", "trees.coco.json")
NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def gt_file(images, cats, anns):
    """images: list of ids; cats: list of ids; anns: list of dicts without ids (assigned 1..)."""
    out = []
    for i, a in enumerate(anns):
        a = dict(a)
        a.setdefault("id", i + 1)
        a.setdefault("iscrowd", 0)
        a.setdefault("area", a["bbox"][2] * a["bbox"][3])
        out.append(a)
    return {
        "images": [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in images],
        "annotations": out,
        "categories": [{"id": c, "name": f"c{c}"} for c in cats],
    }


def ann(img, cat, x, y, w, h, **kw):
    return dict(image_id=img, category_id=cat, bbox=[x, y, w, h], **kw)


def det(img, cat, x, y, w, h, s):
    return dict(image_id=img, category_id=cat, bbox=[x, y, w, h], score=s)


def case_multi_category():
    """3 categories (cat 3 has no GT at all), small/medium/large objects, a crowd region,
    an `ignore` flag (no effect in pycocotools), an image without detections, score ties,
    detections of an unknown category (dropped), zero-area detection, GT whose `area` field
    differs from w*h (decides the area range)."""
    anns = [
        ann(1, 1, 10, 10, 20, 20),                 # small (400)
        ann(1, 1, 100, 100, 50, 40),               # medium (2000)
        ann(1, 2, 200, 50, 120, 110),              # large
        ann(1, 2, 0, 300, 300, 150, iscrowd=1),    # crowd region
        ann(1, 1, 400, 400, 30, 30, ignore=1),     # ignore flag (overwritten by iscrowd=0)
        ann(2, 1, 50, 50, 40, 40, area=900.0),     # bbox 1600 but area 900 -> small
        ann(2, 2, 300, 200, 100, 100),             # large
        ann(2, 2, 310, 210, 90, 95),               # overlapping large
        ann(3, 1, 5, 5, 10, 10),                   # image 3: no detections
        ann(3, 2, 20, 20, 200, 200),
    ]
    dets = [
        det(1, 1, 11, 11, 20, 19, 0.9),
        det(1, 1, 102, 98, 48, 44, 0.9),           # tie with the previous
        det(1, 1, 8, 12, 22, 20, 0.6),             # duplicate of the small one
        det(1, 1, 400, 400, 30, 30, 0.55),         # hits the ignore-flag GT
        det(1, 2, 205, 55, 118, 100, 0.8),
        det(1, 2, 10, 310, 50, 50, 0.7),           # inside the crowd region
        det(1, 2, 100, 320, 60, 60, 0.7),          # also inside the crowd region
        det(1, 2, 500, 10, 20, 20, 0.7),           # false positive, small
        det(1, 3, 10, 10, 20, 20, 0.95),           # category 3 has no GT
        det(1, 9, 10, 10, 20, 20, 0.99),           # unknown category: dropped
        det(2, 1, 52, 48, 38, 44, 0.5),
        det(2, 2, 305, 205, 95, 98, 0.85),
        det(2, 2, 300, 200, 100, 100, 0.85),       # tie, exact box of the first large GT
        det(2, 2, 320, 220, 0, 10, 0.3),           # zero width
        det(2, 1, 600, 400, 10, 10, 0.2),
    ]
    return gt_file([1, 2, 3], [1, 2, 3], anns), dets


def case_many_dets(rng):
    """Two images with 150 and 120 detections (cut to 100 per image and category), 30 GT boxes
    of mixed sizes, many exact score ties (scores rounded to 1 decimal)."""
    anns, dets = [], []
    for img, ndet in ((7, 150), (3, 120)):
        boxes = []
        for _ in range(15):
            w, h = rng.uniform(8, 140, size=2).round(1)
            x, y = rng.uniform(0, 500, size=2).round(1)
            boxes.append((x, y, w, h))
            anns.append(ann(img, 1, x, y, w, h))
        for j in range(ndet):
            if j < 40:
                x, y, w, h = boxes[j % 15]
                dx, dy = rng.normal(0, 0.12 * w), rng.normal(0, 0.12 * h)
                sw, sh = np.exp(rng.normal(0, 0.15, size=2))
                b = [x + dx, y + dy, w * sw, h * sh]
            else:
                b = [*rng.uniform(0, 500, size=2), *rng.uniform(5, 120, size=2)]
            dets.append(det(img, 1, *[round(float(v), 2) for v in b], round(float(rng.uniform(0, 1)), 1)))
    return gt_file([7, 3], [1], anns), dets


def case_undefined_stats():
    """Only medium GT boxes: APs, APl, ARs, ARl are -1. One category listed without any
    annotation. Detections of all sizes (small/large unmatched ones are ignored per range)."""
    anns = [ann(1, 1, 10, 10, 40, 40), ann(1, 1, 100, 10, 50, 60), ann(2, 1, 30, 30, 45, 45)]
    dets = [
        det(1, 1, 12, 10, 40, 38, 0.9),
        det(1, 1, 100, 14, 50, 60, 0.4),
        det(1, 1, 300, 300, 10, 10, 0.8),   # small false positive
        det(1, 1, 300, 10, 200, 200, 0.7),  # large false positive
        det(2, 1, 31, 29, 44, 46, 0.6),
        det(2, 2, 31, 29, 44, 46, 0.6),     # category 2 has no GT
    ]
    return gt_file([1, 2], [1, 2], anns), dets


def case_crowd_and_quirks():
    """Crowd regions absorbing several detections, a crowd region that is the best match of a
    detection that also overlaps a normal box, equal-IoU ties between two GT boxes (the later
    GT wins), a GT with id 0 (pycocotools counts a match to it as no match), detections on an
    image that has no GT, touching boxes (IoU 0), and an image with neither."""
    anns = [
        ann(1, 1, 0, 0, 100, 100, iscrowd=1, id=10),
        ann(1, 1, 90, 0, 60, 60, id=11),
        ann(1, 1, 200, 200, 40, 40, id=12),
        ann(1, 1, 240, 200, 40, 40, id=13),       # touches id 12 at x = 240
        ann(2, 1, 10, 10, 50, 50, id=0),          # id 0
        ann(2, 1, 100, 10, 50, 50, id=20),
        ann(2, 1, 300, 300, 30, 30, id=21),
        ann(2, 1, 320, 300, 30, 30, id=22),       # equal-IoU tie partner of id 21
    ]
    dets = [
        det(1, 1, 10, 10, 30, 30, 0.9),           # inside crowd
        det(1, 1, 40, 40, 30, 30, 0.85),          # inside crowd
        det(1, 1, 92, 2, 58, 56, 0.8),            # overlaps crowd and id 11
        det(1, 1, 220, 200, 40, 40, 0.7),         # straddles ids 12 and 13 equally
        det(1, 1, 240, 200, 40, 40, 0.65),        # exact id 13
        det(2, 1, 10, 10, 50, 50, 0.95),          # exact match of the id-0 GT
        det(2, 1, 102, 12, 50, 50, 0.9),
        det(2, 1, 310, 300, 30, 30, 0.8),         # IoU with 21 == IoU with 22
        det(4, 1, 10, 10, 50, 50, 0.99),          # image 4 has no GT annotations
    ]
    return gt_file([1, 2, 4, 5], [1], anns), dets


def case_neon_trees(rng):
    """Real tree-crown boxes (NEON, DeepForest package data): both images of trees.coco.json
    (61 + 279 boxes). Detections: GT boxes jittered (position and size noise), 12% dropped,
    a duplicate for 8%, false positives, scores that correlate with the jitter and are rounded
    to 2 decimals (ties)."""
    with open(TREES) as f:
        src = json.load(f)
    gt = {
        "images": src["images"],
        "annotations": src["annotations"],
        "categories": src["categories"],
    }
    dets = []
    for a in src["annotations"]:
        if rng.uniform() < 0.12:
            continue
        x, y, w, h = a["bbox"]
        for dup in range(2 if rng.uniform() < 0.08 else 1):
            noise = rng.uniform(0.0, 0.25)
            b = [x + rng.normal(0, noise * w), y + rng.normal(0, noise * h),
                 w * np.exp(rng.normal(0, noise)), h * np.exp(rng.normal(0, noise))]
            s = np.clip(1.0 - 2.0 * noise + rng.normal(0, 0.1) - 0.3 * dup, 0.01, 1.0)
            dets.append(det(a["image_id"], a["category_id"], *[round(float(v), 1) for v in b], round(float(s), 2)))
    for img in src["images"]:
        for _ in range(40):
            w, h = rng.uniform(10, 60, size=2)
            x, y = rng.uniform(0, img["width"] - w), rng.uniform(0, img["height"] - h)
            dets.append(det(img["id"], 1, round(float(x), 1), round(float(y), 1), round(float(w), 1),
                            round(float(h), 1), round(float(rng.uniform(0.01, 0.7)), 2)))
    return gt, dets


def case_random(rng):
    """A random case for --fuzz: 1-4 images, 1-3 categories, boxes of all sizes, crowd regions,
    `area` fields that differ from w*h, jittered and random detections with tied scores, some
    images with more than 100 detections."""
    n_img = int(rng.integers(1, 5))
    n_cat = int(rng.integers(1, 4))
    images = [int(i) for i in rng.choice(np.arange(1, 50), size=n_img, replace=False)]
    cats = list(range(1, n_cat + 1))
    anns, dets = [], []
    for img in images:
        for _ in range(int(rng.integers(0, 12))):
            w, h = np.exp(rng.uniform(np.log(3), np.log(250), size=2)).round(1)
            x, y = rng.uniform(0, 400, size=2).round(1)
            c = int(rng.choice(cats))
            extra = {}
            if rng.uniform() < 0.1:
                extra["iscrowd"] = 1
            if rng.uniform() < 0.2:
                extra["area"] = round(float(w * h * rng.uniform(0.3, 1.0)), 1)
            anns.append(ann(img, c, float(x), float(y), float(w), float(h), **extra))
        many = rng.uniform() < 0.15
        for a in [a for a in anns if a["image_id"] == img]:
            for _ in range(int(rng.integers(0, 3))):
                x, y, w, h = a["bbox"]
                b = [x + rng.normal(0, 0.1 * w), y + rng.normal(0, 0.1 * h),
                     w * np.exp(rng.normal(0, 0.1)), h * np.exp(rng.normal(0, 0.1))]
                c = a["category_id"] if rng.uniform() < 0.9 else int(rng.choice(cats + [99]))
                dets.append(det(img, c, *[round(float(v), 1) for v in b], round(float(rng.uniform()), 1)))
        for _ in range(int(rng.integers(101, 140) if many else rng.integers(0, 6))):
            w, h = np.exp(rng.uniform(np.log(2), np.log(200), size=2))
            x, y = rng.uniform(0, 400, size=2)
            dets.append(det(img, int(rng.choice(cats)), *[round(float(v), 1) for v in (x, y, w, h)],
                            round(float(rng.uniform()), 1)))
    if not dets:  # pycocotools cannot load an empty results list
        dets.append(det(images[0], 1, 0.0, 0.0, 10.0, 10.0, 0.5))
    return gt_file(images, cats, anns), dets


def run_pycocotools(gt_path, dt_path):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        gt = COCO(gt_path)
        dt = gt.loadRes(dt_path)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ev.summarize()
    lines = out.getvalue().rstrip("\n").split("\n")
    assert len(lines) == 12, lines
    return {n: float(v) for n, v in zip(NAMES, ev.stats)}, lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the recorded files instead of writing")
    ap.add_argument("--fuzz", type=int, metavar="N",
                    help="write N random cases to --out instead (for FLSL_COCO_FIXTURES=DIR cargo test ...)")
    ap.add_argument("--seed", type=int, default=20240611, help="RNG seed (change it only with --fuzz)")
    ap.add_argument("--out", default=OUT, help="output directory (default: the test fixtures)")
    args = ap.parse_args()
    out_dir = args.out

    rng = np.random.default_rng(args.seed)
    if args.fuzz:
        cases = {f"random_{i:04}": case_random(rng) for i in range(args.fuzz)}
    else:
        cases = {
            "multi_category": case_multi_category(),
            "many_dets": case_many_dets(rng),
            "undefined_stats": case_undefined_stats(),
            "crowd_and_quirks": case_crowd_and_quirks(),
            "neon_trees": case_neon_trees(rng),
        }
    os.makedirs(out_dir, exist_ok=True)
    total, failed = 0, False
    for name, (gt, dets) in cases.items():
        gt_path = os.path.join(out_dir, f"{name}.gt.json")
        dt_path = os.path.join(out_dir, f"{name}.dt.json")
        exp_path = os.path.join(out_dir, f"{name}.expected.json")
        if not args.check:
            with open(gt_path, "w") as f:
                json.dump(gt, f, separators=(",", ":"))
            with open(dt_path, "w") as f:
                json.dump(dets, f, separators=(",", ":"))
        stats, lines = run_pycocotools(gt_path, dt_path)
        expected = {"stats": stats, "summary": lines,
                    "pycocotools": version("pycocotools"), "numpy": np.__version__}
        if args.check:
            with open(exp_path) as f:
                old = json.load(f)
            bad = [n for n in NAMES if abs(old["stats"][n] - stats[n]) > 1e-12]
            print(f"{name}: {'MISMATCH ' + str(bad) if bad else 'ok'}")
            failed |= bool(bad)
        else:
            with open(exp_path, "w") as f:
                json.dump(expected, f, indent=1)
                f.write("\n")
        for p in (gt_path, dt_path, exp_path):
            total += os.path.getsize(p)
        print(f"{name}: " + " ".join(f"{n}={stats[n]:.4f}" for n in NAMES))
    print(f"fixtures: {total} bytes in {out_dir}")
    if total > 200_000 and not args.fuzz:
        sys.exit("fixtures exceed 200 KB")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
