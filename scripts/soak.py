#!/usr/bin/env python3
"""Soak of the onboard detection loop: flsl-onboard on the bundled detector for N real frames
(the embedded aerial images, cropped to one size and repeated) followed by M frames of random
bytes, all as raw RGB24 on standard input with `--frames all` (every frame processed). Resident
memory (VmRSS), the live heap and allocations per frame are read from flsl-onboard's stats line
every `--every` frames.

Passes when the process exits 0 having processed every frame and, after the warm-up (the first
stats line past `--warmup` frames), over the whole run, garbage frames included:
- the live heap (flsl-onboard's counting allocator: exact, no allocator or kernel caching in
  it) grows by at most `--max-heap-growth-kb`: the leak check;
- RSS grows by at most `--max-growth-mb` (default 4): a bound for memory outside the Rust heap.
  RSS is not an exact leak measure: glibc keeps freed blocks in per-thread arenas and moves its
  mmap threshold after large frees, and where transparent huge pages are `always` the kernel maps
  the heap in 2 MB pages, so RSS can step up by ~2 MB once with a flat heap (seen once in CI:
  +1.9 MB on random-byte frames, before the heap was counted).

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
    ap.add_argument("--max-growth-mb", type=float, default=4.0, help="RSS growth limit (MB)")
    ap.add_argument("--max-heap-growth-kb", type=int, default=64, help="live heap growth limit")
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
    pat = re.compile(r"stats: (\d+) frames, ([\d.]+) frames/s.*RSS ([\d.]+) MB; heap (\d+) kB live, "
                     r"([\d.]+) allocations/frame")
    for raw in p.stderr:
        line = raw.decode(errors="replace").rstrip()
        lines.append(line)
        m = pat.search(line)
        if m:
            samples.append((int(m.group(1)), float(m.group(2)), float(m.group(3)),
                            int(m.group(4)), float(m.group(5))))
    rc = p.wait()
    t.join()
    if rc != 0:
        print("\n".join(lines[-20:]))
        sys.exit(f"flsl-onboard exited with {rc}")
    if not samples:
        print("\n".join(lines[-20:]))
        sys.exit("no stats lines with RSS and heap seen")
    print("| frames | kind | frames/s | RSS MB | heap live kB | allocations/frame |\n"
          "|---|---|---|---|---|---|")
    for n, fps, rss, heap, per in samples:
        kind = "real" if n <= a.frames else "garbage"
        print(f"| {n} | {kind} | {fps:.1f} | {rss:.1f} | {heap} | {per:.1f} |")
    processed = samples[-1][0]
    after = [s for s in samples if s[0] >= a.warmup] or samples
    rss_growth = max(s[2] for s in after) - after[0][2]
    heap_growth = max(s[3] for s in after) - after[0][3]
    print(f"\n{processed} of {total} frames processed; after warm-up: live heap {after[0][3]} kB, "
          f"growth {heap_growth} kB (limit {a.max_heap_growth_kb} kB); RSS {after[0][2]:.1f} MB, "
          f"growth {rss_growth:.2f} MB (limit {a.max_growth_mb} MB; transparent huge pages: {thp_mode()})")
    if processed < total - total % a.every:
        sys.exit(f"only {processed} frames processed of {total}")
    if heap_growth > a.max_heap_growth_kb:
        sys.exit(f"FAIL: the live heap grew by {heap_growth} kB after warm-up: a leak")
    if rss_growth > a.max_growth_mb:
        sys.exit(f"FAIL: RSS grew by {rss_growth:.2f} MB after warm-up")
    print("PASS")


def thp_mode():
    """The kernel's transparent huge page mode (`always`, `madvise`, `never`), for the report."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    m = re.search(r"\[(\w+)\]", mode)
    return m.group(1) if m else "unknown"


if __name__ == "__main__":
    main()
