#!/usr/bin/env bash
# Release-profile choices measured for docs/benchmarks.md ("Release profile: size and speed"):
# for each variant, the stripped armv7 binary built by cross/build.sh (Debian rustc 1.85), its
# build time, and instructions per uplink of an x86_64 build of the same variant under callgrind
# (benches/pipeline.py callgrind: repeatable whatever else the machine does). One JSON line per
# variant on stdout.
#
#   sudo cross/install-toolchain.sh armv7
#   bash benches/profile_matrix.sh | tee target/profile-matrix.jsonl
#
# A variant is "name opt-level lto codegen-units panic [speed [cargo args...]]" (speed: measure
# instructions per uplink, default yes; cargo args e.g. --no-default-features or
# --config 'profile.release.package."*".opt-level="s"'); VARIANTS overrides the list. Uses
# CARGO_PROFILE_RELEASE_* variables, so Cargo.toml is not touched; builds go to
# target/profiles (each variant recompiles every dependency: about 5-10 minutes each on two
# cores). Needs valgrind and mosquitto for the speed column (SPEED=0 skips it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/profiles}"
SPEED="${SPEED:-1}"
VARIANTS="${VARIANTS:-
o3-fat-cgu1-unwind 3 fat 1 unwind yes
os-fat-cgu1-unwind s fat 1 unwind yes
oz-fat-cgu1-unwind z fat 1 unwind yes
o3-fat-cgu1-abort 3 fat 1 abort no
os-fat-cgu1-abort s fat 1 abort no}"
mkdir -p "$CARGO_TARGET_DIR/out"
while read -r name opt lto cgu panic speed extra; do
  [ -n "$name" ] || continue
  export CARGO_PROFILE_RELEASE_OPT_LEVEL="$opt" CARGO_PROFILE_RELEASE_LTO="$lto" \
    CARGO_PROFILE_RELEASE_CODEGEN_UNITS="$cgu" CARGO_PROFILE_RELEASE_PANIC="$panic" \
    CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=false
  # Built unstripped (the symbols are kept for benches/symbol_sizes.py) and stripped here with
  # binutils; the size column is the stripped file.
  eval "args=($extra)"
  t0=$(date +%s)
  bash cross/build.sh armv7-unknown-linux-gnueabihf "${args[@]}" >&2
  t1=$(date +%s)
  arm="$CARGO_TARGET_DIR/armv7-unknown-linux-gnueabihf/release/lorastream"
  cp "$arm" "$CARGO_TARGET_DIR/out/lorastream-armv7-$name.unstripped"
  arm-linux-gnueabihf-strip -o "$CARGO_TARGET_DIR/out/lorastream-armv7-$name" "$arm"
  size=$(stat -c %s "$CARGO_TARGET_DIR/out/lorastream-armv7-$name")
  ipu=null; x86_size=null; x86_build_s=null
  if [ "$SPEED" = 1 ] && [ "${speed:-yes}" = yes ]; then
    t2=$(date +%s)
    cargo build --release --locked "${args[@]}" >&2
    x86_build_s=$(( $(date +%s) - t2 ))
    x86="$CARGO_TARGET_DIR/release/lorastream"
    strip -o "$CARGO_TARGET_DIR/out/lorastream-x86_64-$name" "$x86"
    x86_size=$(stat -c %s "$CARGO_TARGET_DIR/out/lorastream-x86_64-$name")
    ipu=$(LORASTREAM_BIN="$CARGO_TARGET_DIR/out/lorastream-x86_64-$name" \
      python3 benches/pipeline.py callgrind --rate 200 --count 2000 | tail -n 1 |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["instructions_per_uplink"])')
  fi
  printf '{"variant":"%s","opt_level":"%s","lto":"%s","codegen_units":%s,"panic":"%s","armv7_stripped_bytes":%s,"armv7_build_s":%s,"x86_64_stripped_bytes":%s,"x86_64_build_s":%s,"instructions_per_uplink":%s}\n' \
    "$name" "$opt" "$lto" "$cgu" "$panic" "$size" "$((t1 - t0))" "$x86_size" "$x86_build_s" "$ipu"
done <<<"$VARIANTS"
