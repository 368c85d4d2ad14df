#!/usr/bin/env bash
# Installs the cross toolchains from Debian's packages (rustup cannot add targets here) and,
# when sourced, sets the environment for building and running aarch64 binaries.
#
#   bash scripts/setup-cross.sh [aarch64] [thumb]   # install (idempotent)
#   source scripts/setup-cross.sh aarch64           # install + export the aarch64 env
#
# aarch64-unknown-linux-gnu: Debian's rustc-web/cargo-web 1.96 (bookworm-security) at
# /usr/bin/cargo, the arm64 standard library (libstd-rust-web-dev:arm64), the cross gcc and the
# multiarch libc6:arm64 that qemu-user runs the binaries with (`-L /`: the cross sysroot's libc
# hangs in pthread_create under qemu-user). thumbv7em-none-eabihf: rust-web-src (core's
# sources, for -Zbuild-std=core), lld and qemu-system-arm.
# rustup's toolchain stays first in PATH; callers name /usr/bin/cargo explicitly.
set -eo pipefail
_flsl_want_a64=0 _flsl_want_thumb=0
for _a in "${@:-aarch64}"; do
  case "$_a" in
    aarch64) _flsl_want_a64=1 ;;
    thumb) _flsl_want_thumb=1 ;;
    *) echo "setup-cross: unknown target '$_a' (aarch64 | thumb)" >&2; return 2 2>/dev/null || exit 2 ;;
  esac
done
_flsl_pkgs=()
if [ $_flsl_want_a64 = 1 ]; then
  dpkg --print-foreign-architectures | grep -qx arm64 || { dpkg --add-architecture arm64; _flsl_update=1; }
  for p in rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross libc6:arm64 qemu-user; do
    dpkg -s "$p" >/dev/null 2>&1 || _flsl_pkgs+=("$p")
  done
fi
if [ $_flsl_want_thumb = 1 ]; then
  for p in rustc-web cargo-web rust-web-src lld qemu-system-arm; do
    dpkg -s "$p" >/dev/null 2>&1 || _flsl_pkgs+=("$p")
  done
fi
if [ ${#_flsl_pkgs[@]} -gt 0 ]; then
  echo "setup-cross: installing ${_flsl_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${_flsl_pkgs[@]}" >/dev/null
fi
if [ $_flsl_want_a64 = 1 ]; then
  export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
  export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /"
  export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
  export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
fi
unset _flsl_pkgs _flsl_want_a64 _flsl_want_thumb _a
