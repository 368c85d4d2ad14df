#!/usr/bin/env python3
"""Compares two `flsl-onboard` JSON-lines files frame by frame (no third-party modules).

Same frames, same number of detections / tracks / segments, same classes, track ids and
segment labels and cells; boxes within --box-tol pixels, scores within --score-tol. Used by
.ci/run to check that the aarch64 build (under qemu) detects what the x86 build detects.
"""
import argparse
import json
import sys


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("reference")
    p.add_argument("candidate")
    p.add_argument("--box-tol", type=float, default=0.5, help="pixels")
    p.add_argument("--score-tol", type=float, default=1e-3)
    a = p.parse_args()
    ref, cand = load(a.reference), load(a.candidate)
    problems = []
    if len(ref) != len(cand):
        problems.append(f"{len(ref)} frames vs {len(cand)}")
    worst_box = worst_score = 0.0
    boxes = 0
    for r, c in zip(ref, cand):
        where = f"frame {r.get('frame')} ({r.get('source')})"
        for key in ("frame", "source", "size", "clusters"):
            if r.get(key) != c.get(key):
                problems.append(f"{where}: {key} {r.get(key)!r} vs {c.get(key)!r}")
        for kind in ("detections", "tracks"):
            rs, cs = r.get(kind, []), c.get(kind, [])
            if len(rs) != len(cs):
                problems.append(f"{where}: {len(rs)} {kind} vs {len(cs)}")
                continue
            for x, y in zip(rs, cs):
                if x.get("class") != y.get("class") or x.get("id") != y.get("id"):
                    problems.append(f"{where}: {kind} class/id {x.get('class')}/{x.get('id')} vs {y.get('class')}/{y.get('id')}")
                d = max(abs(u - v) for u, v in zip(x["bbox"], y["bbox"]))
                s = abs(x["score"] - y["score"])
                worst_box, worst_score = max(worst_box, d), max(worst_score, s)
                boxes += 1
                if d > a.box_tol or s > a.score_tol:
                    problems.append(f"{where}: {kind} box {x['bbox']} vs {y['bbox']} (score {x['score']} vs {y['score']})")
        rseg = [(s["label"], s["cells"], s["area_patches"]) for s in r.get("segments", [])]
        cseg = [(s["label"], s["cells"], s["area_patches"]) for s in c.get("segments", [])]
        if rseg != cseg:
            problems.append(f"{where}: segments differ ({len(rseg)} vs {len(cseg)})")
    print(f"compared {len(ref)} frames, {boxes} boxes: worst box difference {worst_box:.3g} px, worst score difference {worst_score:.3g}")
    if problems:
        print(f"{len(problems)} differences (box tolerance {a.box_tol} px, score tolerance {a.score_tol}):")
        for line in problems[:20]:
            print("  " + line)
        sys.exit(1)
    print(f"same detections, tracks and segments (box tolerance {a.box_tol} px, score tolerance {a.score_tol})")


if __name__ == "__main__":
    main()
