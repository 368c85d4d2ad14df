#!/usr/bin/env bash
# The onboard runtime on x86-64, then cross-built for aarch64 and run under qemu-user.
#
#   bash scripts/ci-onboard.sh [x86|aarch64|all]      (default: all)
#
# x86:     the onboard build's dependency tree has no burn, no plotters, no python; builds
#          flsl-onboard (release, --no-default-features --features onboard) and prints its size;
#          `flsl bundle` of the bundled detector; flsl-onboard on the embedded images.
# aarch64: installs Debian's cross toolchain (scripts/setup-cross.sh), builds flsl-onboard and
#          the runtime's test targets for aarch64-unknown-linux-gnu with /usr/bin/cargo (1.96),
#          runs the tests under `qemu-aarch64 -cpu cortex-a76` (dot-product: Pi 5, Orin class) and
#          `-cpu cortex-a57` (NEON only: Jetson Nano, Pi 4), then runs flsl-onboard under both and
#          compares its JSON lines with the x86 build's (scripts/compare_jsonl.py).
# Target folders live outside the clone ($CARGO_TARGET_DIR for x86, $FLSL_A64_TARGET_DIR for
# aarch64) so warm runs reuse them.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flsl-target}"
A64_DIR="${FLSL_A64_TARGET_DIR:-$HOME/.cache/flsl-target-aarch64}"
WORK="${FLSL_ONBOARD_WORK:-$(mktemp -d)}"
mkdir -p "$WORK"
ONBOARD_FLAGS=(-p flsl-runtime --bin flsl-onboard --no-default-features --features onboard)
FRAMES=data/neon-aerial-trees/images

x86() {
  echo "== onboard dependency tree (no burn, no plotters, no python)"
  tree=$(cargo tree "${ONBOARD_FLAGS[@]:0:2}" --no-default-features --features onboard -e normal,build --prefix none --format '{p}')
  if grep -Eiq '^(burn|plotters|pyo3|cubecl|flsl-train)[- ]' <<<"$tree"; then
    grep -Ei '^(burn|plotters|pyo3|cubecl|flsl-train)[- ]' <<<"$tree" | sort -u
    echo "FAIL: the onboard build pulls host or training crates"; exit 1
  fi
  # The same grep must see burn in the host CLI's tree, or it proves nothing.
  cargo tree -p flsl-train -e normal --prefix none --format '{p}' | grep -Eq '^burn ' || { echo "FAIL: sanity: burn not seen in flsl-train's tree"; exit 1; }
  echo "ok: $(sort -u <<<"$tree" | wc -l) crates, none of burn/plotters/pyo3/cubecl/flsl-train"
  echo "== cargo build --release ${ONBOARD_FLAGS[*]}"
  cargo build --release "${ONBOARD_FLAGS[@]}"
  local bin="$CARGO_TARGET_DIR/release/flsl-onboard"
  echo "flsl-onboard x86-64 release binary: $(stat -c %s "$bin") bytes"
  echo "== flsl bundle + flsl-onboard on $FRAMES (x86-64)"
  cargo run --release -q -p flsl-train --bin flsl -- bundle --model examples/data/tree_detector.onnx --out "$WORK/bundle" --classes tree --score 0.15  # 0.15: boxes to compare (at 0.3 the weak detector finds none here)
  "$bin" --bundle "$WORK/bundle" --input "$FRAMES" --json "$WORK/x86.jsonl" --link-file "$WORK/x86.link"
}

aarch64() {
  # shellcheck source=setup-cross.sh
  source scripts/setup-cross.sh aarch64
  local target=aarch64-unknown-linux-gnu
  # Debian's cargo with Debian's rustc (rustup's, first in PATH, has no aarch64 std).
  a64() { RUSTC=/usr/bin/rustc CARGO_TARGET_DIR="$A64_DIR" /usr/bin/cargo "$@"; }
  echo "== $(/usr/bin/cargo --version) --target $target: flsl-onboard + the runtime's tests (target folder $A64_DIR)"
  a64 build --release --target $target "${ONBOARD_FLAGS[@]}"
  local bin="$A64_DIR/$target/release/flsl-onboard"
  echo "flsl-onboard aarch64 release binary: $(stat -c %s "$bin") bytes"
  # The runtime's tests with the host-tooling feature (they export their models), one profile.
  # serial_pty is left to the x86-64 run: qemu-user does not emulate the termios2 ioctls
  # (TCGETS2/TCSETS2) serialport sets the baud rate with (ENOSYS, measured), a limit of the
  # emulator, not of the code.
  # onboard_e2e spawns the flsl-onboard binary, which qemu-user cannot exec without binfmt_misc;
  # the binary itself is run under qemu below instead.
  local tests=(--lib --test onnx_parity --test quantize --test alloc_audit --test detect_e2e --test coco_eval --test cluster_miou --test perception_props --test perception_alloc --test wire_props)
  a64 test --release --target $target -p flsl-runtime --features tools "${tests[@]}" --no-run
  for cpu in cortex-a76 cortex-a57; do
    echo "== runtime tests under qemu-aarch64 -cpu $cpu"
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L / -cpu $cpu" \
      a64 test --release --target $target -p flsl-runtime --features tools "${tests[@]}"
  done
  [ -f "$WORK/x86.jsonl" ] || x86
  for cpu in cortex-a76 cortex-a57; do
    echo "== flsl-onboard (aarch64, qemu -cpu $cpu) vs the x86-64 build on $FRAMES"
    qemu-aarch64 -L / -cpu $cpu "$bin" --bundle "$WORK/bundle" --input "$FRAMES" --json "$WORK/a64-$cpu.jsonl" --link-file "$WORK/a64-$cpu.link"
    python3 scripts/compare_jsonl.py "$WORK/x86.jsonl" "$WORK/a64-$cpu.jsonl"
  done
}

case "$what" in
  x86) x86 ;;
  aarch64) aarch64 ;;
  all) x86; aarch64 ;;
  *) echo "usage: $0 [x86|aarch64|all]" >&2; exit 2 ;;
esac
