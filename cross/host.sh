# shellcheck shell=bash
# Sourced by install-toolchain.sh and build.sh: the one build host this recipe supports.
#
# Supported: Debian 12 "bookworm" on amd64 (x86_64). The recipe pins bookworm's rustc-web
# 1.85.0+dfsg3-1~deb12u3 and extracts the ARM standard library of the same Debian version;
# another release (Debian 13, Ubuntu) has other rustc versions or none, and an ARM or i386 host
# has no such cross compiler packages. Anywhere else use cross-rs (Cross.toml, cross/README.md),
# or set LORASTREAM_CROSS_ANY_HOST=1 to try anyway at your own risk.
lorastream_check_host() {
  [ "${LORASTREAM_CROSS_ANY_HOST:-0}" = 1 ] && return 0
  local id="" version="" arch=""
  if [ -r /etc/os-release ]; then
    id="$(. /etc/os-release && echo "${ID:-}")"
    version="$(. /etc/os-release && echo "${VERSION_ID:-}")"
  fi
  arch="$(dpkg --print-architecture 2>/dev/null || uname -m)"
  if [ "$id" != debian ] || [ "$version" != 12 ] || [ "$arch" != amd64 ]; then
    cat >&2 <<MSG
cross/: unsupported build host: ${id:-unknown} ${version:-?} on ${arch:-?}.
This recipe supports exactly one host: Debian 12 (bookworm) on amd64, where it installs
bookworm's rustc 1.85 and its ARM standard libraries (see cross/README.md). On any other host
use cross-rs with Docker or Podman (cross/README.md, "Option 2"), or set
LORASTREAM_CROSS_ANY_HOST=1 to try this recipe anyway.
MSG
    return 1
  fi
}
