#!/usr/bin/env bash
# The README's two commands share one build: every crate that `cargo run --release -p flsl-train`
# compiles gets the same features in `cargo test --release --workspace`, so the second command
# compiles only the test targets (a crate whose feature set differs is rebuilt, with everything
# above it: burn and tract). Resolves both feature graphs with `cargo tree` (no compiling) and
# lists each crate whose features differ. Fix a difference by naming the crate in
# train/Cargo.toml's feature-unification block.
set -euo pipefail
cd "$(dirname "$0")/.."
fmt='{p} [{f}]'
run=$(cargo tree -p flsl-train -e normal,build --prefix none --target all -f "$fmt")
test=$(cargo tree --workspace -e normal,build,dev --prefix none --target all -f "$fmt")
python3 - "$run" "$test" <<'PY'
import sys
def load(text):
    # A crate can be built twice (for the host as a build dependency, and for the target):
    # keep every feature set of each.
    d = {}
    for line in text.splitlines():
        line = line.strip().replace(" (*)", "")
        if " [" in line:
            d.setdefault(line.split(" [")[0], set()).add(line[line.index(" [") + 2 : line.rindex("]")])
    return d
run, test = load(sys.argv[1]), load(sys.argv[2])
diff = [(k, run[k], test[k]) for k in sorted(run) if k in test and run[k] != test[k]]
for k, a, b in diff:
    print(f"  {k}: run {sorted(a)} vs test {sorted(b)}")
if diff:
    sys.exit(f"FAIL: {len(diff)} crates differ in features between the README's two commands")
print(f"ok: the {len(run)} crates of `cargo run -p flsl-train` have the same features in `cargo test --workspace`")
PY
