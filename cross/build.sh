#!/usr/bin/env bash
# Cross-build lorastream for a Raspberry Pi with Debian's rustc 1.85 (set up by
# cross/install-toolchain.sh):
#
#   cross/build.sh aarch64-unknown-linux-gnu      [extra cargo args]   # 64-bit Pi OS
#   cross/build.sh armv7-unknown-linux-gnueabihf  [extra cargo args]   # 32-bit Pi OS (Pi 2..5)
#   cross/build.sh aarch64 armv7 x86_64                                # several in one cargo run
#
# Short names aarch64/arm64, armv7/armhf and x86_64/amd64 are accepted too (x86_64: the amd64
# package's binary, built by the same compiler as the ARM ones). Runs from the crate root (the
# parent of this directory, or $CRATE_DIR), prints the binary path(s) and `file` output.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CRATE_DIR="${CRATE_DIR:-$(dirname "$HERE")}"

[ "$#" -ge 1 ] || { echo "usage: $0 TARGET [TARGET ...] [cargo args]  (aarch64, armv7, x86_64)" >&2; exit 2; }
# One or more targets first (built by one cargo run: on two cores the targets' single-threaded
# LTO steps then overlap), then any extra cargo arguments.
TARGETS=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    aarch64|arm64|aarch64-unknown-linux-gnu) TARGETS+=(aarch64-unknown-linux-gnu) ;;
    armv7|armhf|armv7-unknown-linux-gnueabihf) TARGETS+=(armv7-unknown-linux-gnueabihf) ;;
    # The amd64 package's binary, from the same compiler as the ARM ones.
    x86_64|amd64|x86_64-unknown-linux-gnu) TARGETS+=(x86_64-unknown-linux-gnu) ;;
    -*) break ;;
    *) echo "unsupported target '$1'" >&2; exit 2 ;;
  esac
  shift
done
[ "${#TARGETS[@]}" -gt 0 ] || { echo "no target given" >&2; exit 2; }

# shellcheck source=cross/host.sh
. "$HERE/host.sh"
lorastream_check_host || exit 1
[ -f "$HERE/env.sh" ] || { echo "$HERE/env.sh missing: run cross/install-toolchain.sh first" >&2; exit 1; }
# shellcheck source=/dev/null
. "$HERE/env.sh"

# The hand-copied ARM std must match the compiler exactly, or rustc fails with E0514/E0460.
target_args=()
for TARGET in "${TARGETS[@]}"; do
  target_args+=(--target "$TARGET")
  [ "$TARGET" = x86_64-unknown-linux-gnu ] && continue
  stamp="$("$RUSTC" --print sysroot)/lib/rustlib/$TARGET/.debian-version"
  if [ "$(cat "$stamp" 2>/dev/null || true)" != "$LORASTREAM_RUST_DEB_VERSION" ]; then
    echo "std for $TARGET missing or not at $LORASTREAM_RUST_DEB_VERSION ($stamp):" \
         "run cross/install-toolchain.sh ${TARGET%%-*}" >&2
    exit 1
  fi
done

# Size of the .text.hot_lorastream section of binary $1 (0 when it has none).
hot_text_bytes() {
  local hex
  hex="$(LC_ALL=C readelf -SW "$1" | sed -n 's/.*\.text\.hot_lorastream *PROGBITS *[0-9a-f]* [0-9a-f]* \([0-9a-f]*\) .*/\1/p')"
  echo $(( 16#${hex:-0} ))
}

cd "$CRATE_DIR"
echo "+ RUSTC=$RUSTC ($("$RUSTC" -V)) cargo build --release --locked ${target_args[*]} $*" >&2
start=$(date +%s)
msgs="$(mktemp)"
trap 'rm -f "$msgs"' EXIT
cargo build --release --locked "${target_args[@]}" --message-format=json-render-diagnostics "$@" >"$msgs"
echo "build took $(( $(date +%s) - start ))s" >&2

# Executables cargo reports for this target (works with CARGO_TARGET_DIR and --bin/--example).
mapfile -t bins < <(grep -o '"executable":"[^"]*"' "$msgs" | sed 's/^"executable":"//; s/"$//' | sort -u)
[ "${#bins[@]}" -gt 0 ] || { echo "no executable produced (library-only build?)" >&2; exit 0; }
for b in "${bins[@]}"; do
  echo "$b"
  echo "  size: $(stat -c %s "$b") bytes"
  echo "  $(file -b "$b")"
  # The code cross/hot-text.ld placed first (build.rs; docs/benchmarks.md "Hot code placed
  # together"): .ci/run checks that every target's build has it.
  echo "  hot code placed first: $(hot_text_bytes "$b") bytes"
done
