#!/usr/bin/env bash
# Install Debian bookworm's rustc 1.85 (our MSRV) plus the ARM standard libraries and C cross
# compilers, so that lorastream can be cross-built for 64-bit and 32-bit Raspberry Pi:
#
#   cross/install-toolchain.sh [aarch64|armv7 ...]     (default: aarch64 armv7; needs root)
#
# Afterwards `source cross/env.sh` (written by this script) sets RUSTC to the Debian compiler and
# the linker/CC variables; cross/build.sh does that for you. The rustup toolchain on PATH (cargo,
# rustc 1.95 in ~/.cargo/bin) is left alone: the Debian compiler is only used via RUSTC=...
#
# Idempotent: a second run checks versions and stamp files and does no apt work (a few seconds).
#
# Pitfalls handled here (see /work/shared/crate-notes.md, "Toolchain"):
# - `apt-get update` may exit non-zero (a foreign-arch index mid-sync on the mirror, "File has
#   unexpected size", or an unreachable third-party source): we never abort on that; we check
#   that the exact package version we need is known to apt, and retry the update once if not.
# - bookworm-security may carry a newer rustc-web (1.96, amd64 only). We pin the exact 1.85
#   version for compiler and std, and `apt-mark hold` both so `apt upgrade` cannot move the
#   compiler away from the hand-extracted ARM std (the rlibs must match the compiler exactly).
# - rustc-web "Conflicts: rustup" refers to Debian's rustup *package* only; a rustup install in
#   ~/.cargo/bin is not affected and stays first on PATH.
# - The ARM std is not installed as a multiarch package (that would drag in libc6:arm64 etc.);
#   the .deb is downloaded and only usr/lib/rustlib/<target> is copied into /usr/lib/rustlib.
set -euo pipefail

# Version verified on 2026-11 with `apt-cache policy rustc-web` / `apt-cache madison`: bookworm
# main carries 1.85.0+dfsg3-1~deb12u3 for amd64, arm64 and armhf. Override with
# RUST_DEB_VERSION=...; if the pinned version disappears from the mirror, the newest 1.85.0
# version that apt knows for all requested architectures is used instead (with a warning).
RUST_DEB_VERSION="${RUST_DEB_VERSION:-1.85.0+dfsg3-1~deb12u3}"
RUST_MINOR_PREFIX="1.85.0"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ENV_FILE="$HERE/env.sh"
RUSTLIB=/usr/lib/rustlib
export DEBIAN_FRONTEND=noninteractive

log() { printf '[install-toolchain] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# shellcheck source=cross/host.sh
. "$HERE/host.sh"
lorastream_check_host || exit 1
[ "$(id -u)" -eq 0 ] || die "must run as root (apt-get, dpkg, /usr/lib/rustlib)"

# ---- arguments -------------------------------------------------------------------------------
targets=()
[ "$#" -gt 0 ] || set -- aarch64 armv7
for a in "$@"; do
  case "$a" in
    aarch64|arm64|aarch64-unknown-linux-gnu) targets+=(aarch64) ;;
    armv7|armhf|armv7-unknown-linux-gnueabihf) targets+=(armv7) ;;
    *) die "unknown target '$a' (expected aarch64 or armv7)" ;;
  esac
done

deb_arch()  { case "$1" in aarch64) echo arm64 ;; armv7) echo armhf ;; esac; }
triple()    { case "$1" in aarch64) echo aarch64-unknown-linux-gnu ;; armv7) echo armv7-unknown-linux-gnueabihf ;; esac; }
cross_gcc() { case "$1" in aarch64) echo gcc-aarch64-linux-gnu ;; armv7) echo gcc-arm-linux-gnueabihf ;; esac; }
cross_libc() { case "$1" in aarch64) echo libc6-dev-arm64-cross ;; armv7) echo libc6-dev-armhf-cross ;; esac; }
gcc_bin()   { case "$1" in aarch64) echo aarch64-linux-gnu-gcc ;; armv7) echo arm-linux-gnueabihf-gcc ;; esac; }
# Build-host tools a target needs beyond its C compiler: rquickjs has no pregenerated bindings
# for 32-bit ARM, so they are generated at build time by bindgen, which loads libclang.
host_extra() { case "$1" in armv7) echo libclang-dev ;; esac; }

# ---- apt helpers -----------------------------------------------------------------------------
updated=0
apt_update() {
  # Tolerant: a non-zero exit is expected now and then (see header). Callers check afterwards.
  log "apt-get update"
  if ! apt-get update -q >/tmp/install-toolchain-apt-update.log 2>&1; then
    log "apt-get update exited non-zero (tolerated); tail of its output:"
    grep -E '^(E|W):' /tmp/install-toolchain-apt-update.log | tail -n 5 >&2 || true
  fi
  updated=$((updated + 1))
}

# known PKG[:ARCH] VERSION -> apt knows exactly this version. (apt-cache show exits 0 with empty
# output for an unknown version, so test the output, not the exit status.)
known() { [ -n "$(apt-cache show "$1=$2" 2>/dev/null || true)" ]; }

# installed PKG VERSION -> dpkg has exactly this version installed
installed() {
  [ "$(dpkg-query -W -f='${db:Status-Status} ${Version}' "$1" 2>/dev/null || true)" = "installed $2" ]
}

# pkg_ok PKG... -> all installed (any version)
pkg_ok() {
  local p
  for p in "$@"; do
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)" = installed ] || return 1
  done
}

# ensure_known PKG[:ARCH]... : make sure apt knows $RUST_DEB_VERSION of each. Runs apt-get update
# if needed (or if none ran yet in this invocation) and retries it once.
ensure_known() {
  local p missing
  for _ in 1 2 3; do
    missing=""
    for p in "$@"; do known "$p" "$RUST_DEB_VERSION" || missing="$missing $p"; done
    [ -z "$missing" ] && return 0
    log "apt does not know $RUST_DEB_VERSION of:$missing"
    [ "$updated" -lt 2 ] || break
    apt_update
  done
  return 1
}

# retry CMD...: run an apt command; if it fails (e.g. stale index -> 404), update once and retry.
retry() {
  "$@" && return 0
  log "'$*' failed; apt-get update and retry once"
  apt_update
  "$@"
}

# Newest 1.85.0 version apt knows for every given PKG[:ARCH] (fallback when the pin is gone).
fallback_version() {
  local p v best=""
  for v in $(apt-cache madison rustc-web | awk -v pre="$RUST_MINOR_PREFIX" 'index($3, pre)==1 {print $3}' | sort -u); do
    local ok=1
    for p in "$@"; do known "$p" "$v" || { ok=0; break; }; done
    if [ "$ok" = 1 ] && { [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best"; }; then best="$v"; fi
  done
  printf '%s' "$best"
}

start=$(date +%s)

# ---- foreign architectures (needed only to *download* the ARM std .deb) --------------------
for t in "${targets[@]}"; do
  arch="$(deb_arch "$t")"
  if ! dpkg --print-foreign-architectures | grep -qx "$arch"; then
    log "dpkg --add-architecture $arch"
    dpkg --add-architecture "$arch"
    need_update=1
  fi
done

# ---- decide whether anything needs apt at all -------------------------------------------------
stamp_ok() { [ "$(cat "$RUSTLIB/$(triple "$1")/.debian-version" 2>/dev/null || true)" = "$RUST_DEB_VERSION" ]; }
all_done=1
installed rustc-web "$RUST_DEB_VERSION" && installed libstd-rust-web-dev "$RUST_DEB_VERSION" || all_done=0
for t in "${targets[@]}"; do
  stamp_ok "$t" || all_done=0
  # shellcheck disable=SC2046  # host_extra prints zero or more package names
  pkg_ok "$(cross_gcc "$t")" "$(cross_libc "$t")" $(host_extra "$t") || all_done=0
done
[ "${need_update:-0}" = 1 ] && all_done=0

if [ "$all_done" = 1 ]; then
  log "rustc-web $RUST_DEB_VERSION and std for: ${targets[*]} already installed"
else
  # -- resolve the version -----------------------------------------------------------------
  pkgs=(rustc-web libstd-rust-web-dev)
  for t in "${targets[@]}"; do pkgs+=("libstd-rust-web-dev:$(deb_arch "$t")"); done
  [ "${need_update:-0}" = 1 ] && apt_update
  if ! ensure_known "${pkgs[@]}"; then
    fb="$(fallback_version "${pkgs[@]}")"
    [ -n "$fb" ] || die "no $RUST_MINOR_PREFIX version of rustc-web/libstd-rust-web-dev for all of: ${pkgs[*]} (see apt-cache madison rustc-web)"
    log "WARNING: $RUST_DEB_VERSION not available; using $fb instead"
    RUST_DEB_VERSION="$fb"
  fi
  log "using rustc-web $RUST_DEB_VERSION"

  # -- host compiler + host std (amd64) ----------------------------------------------------
  if installed rustc-web "$RUST_DEB_VERSION" && installed libstd-rust-web-dev "$RUST_DEB_VERSION"; then
    log "rustc-web $RUST_DEB_VERSION already installed"
  else
    apt-mark unhold rustc-web libstd-rust-web-dev >/dev/null 2>&1 || true
    retry apt-get install -y -q --no-install-recommends --allow-downgrades \
      "rustc-web=$RUST_DEB_VERSION" "libstd-rust-web-dev=$RUST_DEB_VERSION"
  fi
  apt-mark hold rustc-web libstd-rust-web-dev >/dev/null

  # -- per target: C cross compiler + libc, and the matching Rust std ------------------------
  for t in "${targets[@]}"; do
    arch="$(deb_arch "$t")"; tr="$(triple "$t")"
    # shellcheck disable=SC2046  # host_extra prints zero or more package names
    if pkg_ok "$(cross_gcc "$t")" "$(cross_libc "$t")" $(host_extra "$t"); then
      log "$(cross_gcc "$t") already installed"
    else
      # shellcheck disable=SC2046
      retry apt-get install -y -q --no-install-recommends "$(cross_gcc "$t")" "$(cross_libc "$t")" $(host_extra "$t")
    fi

    if stamp_ok "$t"; then
      log "$RUSTLIB/$tr already at $RUST_DEB_VERSION"
      continue
    fi
    tmp="$(mktemp -d)"
    # apt-get download runs as _apt where possible; give it a directory it may write to.
    chmod 0755 "$tmp"; chown _apt "$tmp" 2>/dev/null || true
    log "downloading libstd-rust-web-dev:$arch=$RUST_DEB_VERSION"
    (cd "$tmp" && retry apt-get download -q "libstd-rust-web-dev:$arch=$RUST_DEB_VERSION")
    dpkg -x "$tmp"/libstd-rust-web-dev_*.deb "$tmp/x"
    [ -d "$tmp/x/usr/lib/rustlib/$tr/lib" ] || die "the $arch package has no usr/lib/rustlib/$tr"
    rm -rf "${RUSTLIB:?}/$tr.new"
    cp -a "$tmp/x/usr/lib/rustlib/$tr" "$RUSTLIB/$tr.new"
    echo "$RUST_DEB_VERSION" >"$RUSTLIB/$tr.new/.debian-version"
    rm -rf "${RUSTLIB:?}/$tr"
    mv "$RUSTLIB/$tr.new" "$RUSTLIB/$tr"
    rm -rf "$tmp"
    log "installed $RUSTLIB/$tr"
  done
fi

# ---- locate the Debian compiler and write env.sh ---------------------------------------------
# rustc-web 1.85 ships its driver as /usr/bin/rustc (dpkg -L rustc-web); do not trust PATH, where
# the rustup proxy comes first.
DEB_RUSTC="$(dpkg -L rustc-web | grep -E '/bin/rustc$' | head -n 1)"
[ -x "$DEB_RUSTC" ] || die "rustc-web installed but no rustc binary found in dpkg -L rustc-web"
got="$("$DEB_RUSTC" -V)"
case "$got" in "rustc $RUST_MINOR_PREFIX"*) ;; *) die "$DEB_RUSTC reports '$got', expected $RUST_MINOR_PREFIX" ;; esac
DEB_RUSTDOC="$(dirname "$DEB_RUSTC")/rustdoc"

cat >"$ENV_FILE.tmp" <<EOF
# shellcheck shell=bash
# Generated by cross/install-toolchain.sh -- source it before cross-building:
#   . cross/env.sh && cargo build --release --locked --target aarch64-unknown-linux-gnu
# Debian rustc-web $RUST_DEB_VERSION ($got)
export LORASTREAM_RUST_DEB_VERSION='$RUST_DEB_VERSION'
export RUSTC='$DEB_RUSTC'
export RUSTDOC='$DEB_RUSTDOC'
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_LINKER=arm-linux-gnueabihf-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CC_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export AR_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-ar
EOF
if cmp -s "$ENV_FILE.tmp" "$ENV_FILE" 2>/dev/null; then rm -f "$ENV_FILE.tmp"; else mv "$ENV_FILE.tmp" "$ENV_FILE"; fi

for t in "${targets[@]}"; do
  command -v "$(gcc_bin "$t")" >/dev/null || die "$(gcc_bin "$t") missing after install"
  stamp_ok "$t" || die "$RUSTLIB/$(triple "$t") is not at $RUST_DEB_VERSION"
done

log "done in $(( $(date +%s) - start ))s: RUSTC=$DEB_RUSTC ($got), targets: ${targets[*]}"
log "next: . $ENV_FILE   (or: cross/build.sh <target>)"
echo "$DEB_RUSTC"
