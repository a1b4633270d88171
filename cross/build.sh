#!/usr/bin/env bash
# Cross-build lorastream for a Raspberry Pi with Debian's rustc 1.85 (set up by
# cross/install-toolchain.sh):
#
#   cross/build.sh aarch64-unknown-linux-gnu      [extra cargo args]   # 64-bit Pi OS
#   cross/build.sh armv7-unknown-linux-gnueabihf  [extra cargo args]   # 32-bit Pi OS (Pi 2..5)
#
# Short names aarch64/arm64 and armv7/armhf are accepted too. Runs from the crate root (the
# parent of this directory, or $CRATE_DIR), prints the binary path(s) and `file` output.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CRATE_DIR="${CRATE_DIR:-$(dirname "$HERE")}"

[ "$#" -ge 1 ] || { echo "usage: $0 aarch64-unknown-linux-gnu|armv7-unknown-linux-gnueabihf [cargo args]" >&2; exit 2; }
case "$1" in
  aarch64|arm64|aarch64-unknown-linux-gnu) TARGET=aarch64-unknown-linux-gnu ;;
  armv7|armhf|armv7-unknown-linux-gnueabihf) TARGET=armv7-unknown-linux-gnueabihf ;;
  *) echo "unsupported target '$1'" >&2; exit 2 ;;
esac
shift

# shellcheck source=cross/host.sh
. "$HERE/host.sh"
lorastream_check_host || exit 1
[ -f "$HERE/env.sh" ] || { echo "$HERE/env.sh missing: run cross/install-toolchain.sh first" >&2; exit 1; }
# shellcheck source=/dev/null
. "$HERE/env.sh"

# The hand-copied ARM std must match the compiler exactly, or rustc fails with E0514/E0460.
stamp="$("$RUSTC" --print sysroot)/lib/rustlib/$TARGET/.debian-version"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$LORASTREAM_RUST_DEB_VERSION" ]; then
  echo "std for $TARGET missing or not at $LORASTREAM_RUST_DEB_VERSION ($stamp):" \
       "run cross/install-toolchain.sh ${TARGET%%-*}" >&2
  exit 1
fi

cd "$CRATE_DIR"
echo "+ RUSTC=$RUSTC ($("$RUSTC" -V)) cargo build --release --locked --target $TARGET $*" >&2
start=$(date +%s)
msgs="$(mktemp)"
trap 'rm -f "$msgs"' EXIT
cargo build --release --locked --target "$TARGET" --message-format=json-render-diagnostics "$@" >"$msgs"
echo "build took $(( $(date +%s) - start ))s" >&2

# Executables cargo reports for this target (works with CARGO_TARGET_DIR and --bin/--example).
mapfile -t bins < <(grep -o '"executable":"[^"]*"' "$msgs" | sed 's/^"executable":"//; s/"$//' | grep "/$TARGET/" | sort -u)
[ "${#bins[@]}" -gt 0 ] || { echo "no executable produced (library-only build?)" >&2; exit 0; }
for b in "${bins[@]}"; do
  echo "$b"
  echo "  size: $(stat -c %s "$b") bytes"
  echo "  $(file -b "$b")"
done
