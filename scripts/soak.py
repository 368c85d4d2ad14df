#!/usr/bin/env python3
"""Soak of the onboard detection loop: flsl-onboard on the bundled detector for N real frames
(the embedded aerial images, cropped to one size and repeated) followed by M frames of random
bytes, all as raw RGB24 on standard input with `--frames all` (every frame processed). The
resident memory (VmRSS) is read from flsl-onboard's stats line every `--every` frames.

Passes when, after the warm-up (the first stats line past `--warmup` frames), RSS grows by at
most `--max-growth-mb` over the whole run, garbage frames included, and the process exits 0
having processed every frame.

    python3 scripts/soak.py --onboard BIN --bundle DIR [--frames 10000] [--garbage 2000]

Needs numpy and Pillow (decoding the PNG/JPEG frames). Prints a Markdown table of the samples.
"""
import argparse
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def frames(size, n_real, n_garbage, seed=7):
    """Yields raw RGB24 frames: the embedded images cropped to `size`, repeated, then noise."""
    w, h = size
    real = []
    for p in sorted((ROOT / "data/neon-aerial-trees/images").iterdir()):
        img = np.asarray(Image.open(p).convert("RGB"))
        if img.shape[0] >= h and img.shape[1] >= w:
            real.append(np.ascontiguousarray(img[:h, :w]).tobytes())
    if not real:
        sys.exit(f"no embedded image is at least {w}x{h}")
    for i in range(n_real):
        yield real[i % len(real)]
    rng = np.random.default_rng(seed)
    for _ in range(n_garbage):
        yield rng.integers(0, 256, size=w * h * 3, dtype=np.uint8).tobytes()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onboard", required=True, help="the flsl-onboard binary")
    ap.add_argument("--bundle", required=True, help="a bundle folder (flsl bundle)")
    ap.add_argument("--frames", type=int, default=10000, help="real frames")
    ap.add_argument("--garbage", type=int, default=2000, help="random-byte frames after them")
    ap.add_argument("--size", default="400x400", help="frame size WxH")
    ap.add_argument("--every", type=int, default=500, help="stats line every this many frames")
    ap.add_argument("--warmup", type=int, default=1000, help="frames before the RSS baseline")
    ap.add_argument("--max-growth-mb", type=float, default=1.0)
    a = ap.parse_args()
    w, h = (int(v) for v in a.size.split("x"))
    total = a.frames + a.garbage
    cmd = [a.onboard, "--bundle", a.bundle, "--input", "-", "--size", f"{w}x{h}",
           "--frames", "all", "--json", "/dev/null", "--stats-every", str(a.every)]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=False)

    def feed():
        try:
            for f in frames((w, h), a.frames, a.garbage):
                p.stdin.write(f)
        except BrokenPipeError:
            pass
        finally:
            try:
                p.stdin.close()
            except BrokenPipeError:
                pass

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    samples, lines = [], []
    pat = re.compile(r"stats: (\d+) frames, ([\d.]+) frames/s.*RSS ([\d.]+) MB")
    for raw in p.stderr:
        line = raw.decode(errors="replace").rstrip()
        lines.append(line)
        m = pat.search(line)
        if m:
            samples.append((int(m.group(1)), float(m.group(2)), float(m.group(3))))
    rc = p.wait()
    t.join()
    if rc != 0:
        print("\n".join(lines[-20:]))
        sys.exit(f"flsl-onboard exited with {rc}")
    if not samples:
        print("\n".join(lines[-20:]))
        sys.exit("no stats lines with RSS seen")
    print(f"| frames | kind | frames/s | RSS MB |\n|---|---|---|---|")
    for n, fps, rss in samples:
        kind = "real" if n <= a.frames else "garbage"
        print(f"| {n} | {kind} | {fps:.1f} | {rss:.1f} |")
    processed = samples[-1][0]
    base = next((r for n, _, r in samples if n >= a.warmup), samples[0][2])
    peak = max(r for n, _, r in samples if n >= a.warmup)
    growth = peak - base
    print(f"\n{processed} of {total} frames processed; RSS after warm-up {base:.1f} MB, "
          f"highest later {peak:.1f} MB: growth {growth:.2f} MB (limit {a.max_growth_mb} MB)")
    if processed < total - total % a.every:
        sys.exit(f"only {processed} frames processed of {total}")
    if growth > a.max_growth_mb:
        sys.exit(f"FAIL: RSS grew by {growth:.2f} MB after warm-up")
    print("PASS")


if __name__ == "__main__":
    main()
