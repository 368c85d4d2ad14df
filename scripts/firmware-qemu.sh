#!/usr/bin/env bash
# The firmware as a real Cortex-M4F image in an emulator (issue 18): builds
# firmware/board (flsl-firmware on qemu's mps2-an386 board, thumbv7em-none-eabihf), writes a
# recorded link byte stream and the host model's report of it (firmware/tests/board_stream.rs),
# boots the image in qemu-system-arm with the stream on its UART0, and fails unless the
# image's report (UART1) equals the model's line for line. Prints flash, static RAM and the
# stack high-water mark the image measured (it paints its stack at boot).
#
#   scripts/firmware-qemu.sh [STREAM]
#
# STREAM: replay this recording (plain wire bytes; 0x00 bytes stand for idle line time, one
#         per 1/11.52 ms) instead of the generated scenario.
# Environment: CARGO_TARGET_DIR (host builds, default ~/.cache/flsl-target),
#   FLSL_BOARD_TARGET_DIR (the image, default ~/.cache/flsl-board-target: its own folder, so
#   the Debian toolchain never waits on the lock of the workspace's host builds),
#   FLSL_QEMU_TIMEOUT (seconds, default 120), FLSL_BOARD_KEEP=DIR (keep the files there).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flsl-target}"
BOARD_TARGET_DIR="${FLSL_BOARD_TARGET_DIR:-$HOME/.cache/flsl-board-target}"
TARGET=thumbv7em-none-eabihf
STREAM="${1:-}"
[ -z "$STREAM" ] || STREAM="$(realpath "$STREAM")"
t0=$(date +%s)
say() { printf 'firmware-qemu: %s\n' "$*"; }

# Debian's rustc-web/cargo-web 1.96, core's sources (rust-web-src), ld.lld, qemu-system-arm.
bash scripts/setup-cross.sh thumb

# 1. The image, with Debian's toolchain (rustup cannot add the thumb target here).
#    RUSTC_BOOTSTRAP=1 for this command only: it lets the stable Debian compiler take
#    -Zbuild-std=core (core is built from rust-web-src's sources; no prebuilt thumb core).
#    RUSTC: rustup's rustc is first in PATH and has no rust-src. Debian's rustc has no
#    rust-lld, so the target links with ld.lld; firmware/board/build.rs adds -Tlink.x.
say "building the image ($TARGET, mps2-an386)"
CARGO_TARGET_THUMBV7EM_NONE_EABIHF_LINKER=ld.lld RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 \
  /usr/bin/cargo build --release -Zbuild-std=core --target "$TARGET" \
  --manifest-path firmware/board/Cargo.toml --target-dir "$BOARD_TARGET_DIR"
ELF="$BOARD_TARGET_DIR/$TARGET/release/flsl-firmware-board"
t1=$(date +%s)

# 2. The stream and the expected report: the host model (rustup's cargo, shared target dir).
WORK="$(mktemp -d)"
keep() { if [ -n "${FLSL_BOARD_KEEP:-}" ]; then mkdir -p "$FLSL_BOARD_KEEP" && cp "$WORK"/* "$FLSL_BOARD_KEEP"/; fi; }
fail() { keep; echo "firmware-qemu: FAIL: $* (files in $WORK)" >&2; exit 1; }
say "generating the stream and the host model's report"
env FLSL_BOARD_OUT="$WORK" ${STREAM:+FLSL_BOARD_STREAM="$STREAM"} \
  cargo test --release -q -p flsl-firmware --test board_stream -- --exact board_files
t2=$(date +%s)

# 3. Boot. UART0 (first -serial) reads the length header and the stream from stdin, a plain
#    file, so qemu hands the bytes over as fast as the image takes them; the image paces them
#    by its byte clock, so its report does not depend on when they arrive. UART1 (second
#    -serial) is the report. The image exits through semihosting (0 = stream replayed).
n=$(stat -c %s "$WORK/stream.bin")
{ printf '%s\n' "$n"; cat "$WORK/stream.bin"; } >"$WORK/uart0.in"
say "booting qemu-system-arm -machine mps2-an386 with a $n-byte stream"
rc=0
timeout "${FLSL_QEMU_TIMEOUT:-120}" qemu-system-arm -cpu cortex-m4 -machine mps2-an386 \
  -nographic -monitor none -semihosting-config enable=on,target=native -kernel "$ELF" \
  -serial stdio -serial "file:$WORK/uart1.txt" \
  <"$WORK/uart0.in" >"$WORK/qemu.out" 2>&1 || rc=$?
t3=$(date +%s)
grep -v '^#' "$WORK/uart1.txt" >"$WORK/board.txt" || true
grep '^#' "$WORK/uart1.txt" | sed 's/^# */firmware-qemu: image: /' || true
cat "$WORK/qemu.out"
case $rc in
  0) ;;
  124) fail "qemu timed out after ${FLSL_QEMU_TIMEOUT:-120} s" ;;
  *) fail "the image exited with $rc" ;;
esac
diff -u "$WORK/expected.txt" "$WORK/board.txt" >"$WORK/report.diff" || {
  head -40 "$WORK/report.diff" >&2
  fail "the image's report differs from the host model's"
}
say "report identical to the host model: $(wc -l <"$WORK/board.txt") lines"

# 4. Figures. Berkeley format: text = vector table + code + read-only data (flash),
#    data (flash and RAM), bss (RAM).
SIZE=$(command -v llvm-size || command -v arm-none-eabi-size || command -v size)
read -r text data bss _ < <("$SIZE" "$ELF" | awk 'NR == 2')
stack=$(sed -n 's/^# stack high-water mark: \([0-9]*\) B.*/\1/p' "$WORK/uart1.txt")
say "flash $((text + data)) B (text $text, data $data); static RAM $((data + bss)) B (data $data, bss $bss); stack high-water mark ${stack:-?} B ($(basename "$SIZE"))"
say "time: image build $((t1 - t0)) s, host model $((t2 - t1)) s, qemu $((t3 - t2)) s"
keep
rm -rf "$WORK"
