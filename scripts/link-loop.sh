#!/usr/bin/env bash
# The loop in one command (issue 18): a camera flying over an embedded aerial image
# (examples/flyover.rs) -> flsl-onboard with the bundled tree detector -> wire frames into a
# pseudo-terminal + MAVLink over UDP to a pymavlink listener (scripts/mavlink_check.py) ->
# the pty's bytes replayed into the firmware's Cortex-M4F image in qemu-system-arm
# (scripts/firmware-qemu.sh), whose report must equal the host model's. Prints what each end saw.
#
#   bash scripts/link-loop.sh [FRAMES]         (default 80)
#
# Needs python3 with pymavlink (FLSL_PYTHON, default python3) and the cross tools that
# scripts/firmware-qemu.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flsl-target}"
PY="${FLSL_PYTHON:-python3}"
FRAMES="${1:-80}"
WORK="${FLSL_LOOP_WORK:-$(mktemp -d)}"
mkdir -p "$WORK"
"$PY" -c 'import pymavlink' 2>/dev/null || { echo "link-loop: $PY has no pymavlink: pip install pymavlink (or set FLSL_PYTHON)" >&2; exit 1; }

echo "== building flsl-onboard, the flyover camera and a bundle (score 0.15, gimbal)"
cargo build --release -q -p flsl-runtime --bin flsl-onboard --no-default-features --features onboard
cargo build --release -q -p flsl-examples --features onnx --example flyover
cargo run --release -q -p flsl-train --bin flsl -- bundle --model examples/data/tree_detector.onnx \
  --out "$WORK/bundle" --classes tree --score 0.15 --gimbal

echo "== companion computer: flyover ($FRAMES frames, 400x300) | flsl-onboard --serial PTY --mavlink udpout:..."
"$PY" scripts/mavlink_check.py --onboard "$CARGO_TARGET_DIR/release/flsl-onboard" --bundle "$WORK/bundle" \
  --frames-cmd "$CARGO_TARGET_DIR/release/examples/flyover --frames $FRAMES" --size 400x300 \
  --serial-capture "$WORK/serial.bin"

echo "== flight controller side: the pty's bytes into the firmware image (qemu mps2-an386)"
FLSL_BOARD_KEEP="$WORK/board" bash scripts/firmware-qemu.sh "$WORK/serial.bin"
echo "== what the firmware image reported (last 8 of $(wc -l <"$WORK/board/board.txt") lines; full report in $WORK/board/board.txt)"
tail -8 "$WORK/board/board.txt"
