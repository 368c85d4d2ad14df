#!/usr/bin/env bash
# no_std proof for the firmware and the runtime core (issue 7).
#
# 1. Builds flsl-firmware on its own (a workspace-wide build unifies features and could
#    hide a `std` that the firmware pulls in), and flsl-runtime without default features.
# 2. Resolves their dependency trees for a Cortex-M4F target and fails if any crate in them
#    has its "std" (or "alloc") feature enabled. `cargo tree --target` needs no installed
#    target. Only normal edges count (`-e features,normal`): dev-dependencies (proptest,
#    criterion, embedded-hal-mock) are host-test-only and never linked into the firmware;
#    proc-macros (defmt-macros) run on the host and are pruned with `no-proc-macro`.
# 3. Sanity check: the same grep must find "std" in flsl-runtime's default (std) build,
#    so a broken grep cannot pass silently.
# 4. Where the thumb target is installed (not on the CI machine), also cross-checks.
#
# Usage: scripts/check-nostd.sh   (honours CARGO_TARGET_DIR and CARGO_BUILD_JOBS)
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=thumbv7em-none-eabihf
fail=0

# Every line names either a feature edge (`dep feature "x"`) or a package with the list of
# its enabled features (`pkg vX [a,b]`, the root package included), so both are checked.
tree() {
    cargo tree "$@" -e features,normal,no-proc-macro --target "$TARGET" --color never -f '{p} [{f}]'
}

STD_RE='feature "(std|alloc)"|\[([^]]*,)?(std|alloc)(,[^]]*)?\]$'


check_tree() {
    local label=$1
    shift
    local out hits
    out=$(tree "$@")
    hits=$(grep -E "$STD_RE" <<<"$out" || true)
    if [[ -n $hits ]]; then
        echo "FAIL: $label enables std/alloc:"
        echo "$hits"
        fail=1
    else
        echo "ok: $label: $(grep -c . <<<"$out") tree lines, no \"std\"/\"alloc\" feature"
    fi
}

echo "== cargo build -p flsl-firmware"
cargo build -p flsl-firmware
echo "== cargo build -p flsl-runtime --no-default-features"
cargo build -p flsl-runtime --no-default-features

echo "== cargo tree ... --target $TARGET"
check_tree "flsl-firmware" -p flsl-firmware
check_tree "flsl-firmware --features defmt" -p flsl-firmware --features defmt
check_tree "flsl-runtime --no-default-features" -p flsl-runtime --no-default-features

if tree -p flsl-runtime | grep -Eq "$STD_RE"; then
    echo "ok: sanity: the check does detect \"std\" in flsl-runtime's default build"
else
    echo "FAIL: sanity: \"std\" not detected in flsl-runtime's default build; the check is broken"
    fail=1
fi

if rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
    echo "== cargo check --target $TARGET"
    cargo check -p flsl-firmware --target "$TARGET"
    cargo check -p flsl-firmware --features defmt --target "$TARGET"
    cargo check -p flsl-runtime --no-default-features --target "$TARGET"
else
    echo "note: $TARGET not installed here; skipped the cross-compile check (see firmware/README.md)"
fi

if [[ $fail -ne 0 ]]; then
    echo "check-nostd: FAILED"
    exit 1
fi
echo "check-nostd: passed"
