#!/usr/bin/env python3
"""Where the bytes of a lorastream binary go: code and data symbols summed per crate.

  python3 benches/symbol_sizes.py target/profiles/out/lorastream-armv7-os-fat-cgu1-unwind.unstripped \
      [--nm arm-linux-gnueabihf-nm] [--top 25] [--symbols 0]

Needs an unstripped binary (benches/profile_matrix.sh keeps one per variant). Like cargo-bloat,
a Rust symbol counts for the crate of its first path segment (`<T as Trait>::f` for T's crate);
generic code instantiated from std (drop_in_place, Vec, ...) counts for std/core/alloc. The C
of QuickJS (rquickjs-sys) and of ring have no paths and are recognised by their prefixes.
Section totals (`.text`, `.rodata`, ...) come from `size -A`: strings and tables with no symbol
of their own show up there, not per crate.
"""
import argparse
import collections
import re
import subprocess

# QuickJS's exported and most of its static functions; ring's C and assembly. Anything else
# without a Rust path (libc start files, other static C functions) is "other C".
C_PREFIXES = [
    ("rquickjs-sys (QuickJS, C)", re.compile(r"^(JS_|js_|__JS_|lre_|cr_|unicode_|dbuf_|bf_|mp_)")),
    ("ring (C/asm)", re.compile(r"^(ring_core_|GFp_|LIMBS_|p256_|p384_|x25519_|aes_|bn_|"
                                r"ecp_nistz256|sha256_block|sha512_block|gcm_|chacha20_|"
                                r"poly1305_|CRYPTO_|fiat_|vpaes_|bsaes_)")),
]
STD = {"std", "core", "alloc", "hashbrown", "std_detect", "panic_unwind", "compiler_builtins",
       "gimli", "addr2line", "miniz_oxide", "rustc_demangle", "object"}


def crate_of(name: str) -> str:
    n = re.sub(r"^[<&*]*(?:(?:mut|const|dyn|impl) )*", "", name)
    m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)::", n)
    if m:
        return "std/core/alloc" if m.group(1) in STD else m.group(1)
    for label, rx in C_PREFIXES:
        if rx.match(name):
            return label
    return "other C (static functions, libc start files)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--nm", default="nm")
    ap.add_argument("--size", default=None, help="size(1) of the binutils (default: from --nm)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--symbols", type=int, default=0, help="also list the N largest symbols")
    ap.add_argument("--modules", default=None, metavar="CRATE",
                    help="also sum by module of CRATE (two levels, three under streams::): every "
                         "symbol naming CRATE:: anywhere, std's generic code instantiated for it too")
    a = ap.parse_args()
    out = subprocess.run([a.nm, "-S", "--size-sort", "-C", a.binary], check=True,
                         capture_output=True, text=True).stdout
    by_crate = collections.Counter()
    by_module = collections.Counter()
    mod_rx = re.compile(rf"\b{a.modules}::((?:streams::)?[a-z_0-9]+(?:::[a-z_0-9]+)?)") if a.modules else None
    syms = []
    total = 0
    for line in out.splitlines():
        parts = line.split(" ", 3)
        if len(parts) < 4:
            continue
        size, kind, name = int(parts[1], 16), parts[2], parts[3]
        if kind.lower() not in "tdrbvw":
            continue
        if kind.lower() == "b":  # .bss: not in the file
            continue
        by_crate[crate_of(name)] += size
        if mod_rx:
            m = mod_rx.search(name)
            if m:
                by_module["::".join(m.group(1).split("::")[: 3 if m.group(1).startswith("streams::") else 2])] += size
        syms.append((size, name))
        total += size
    size_tool = a.size or (a.nm[:-2] + "size" if a.nm.endswith("nm") else "size")
    sec = subprocess.run([size_tool, "-A", a.binary], check=True, capture_output=True,
                         text=True).stdout
    print("sections (bytes):")
    for line in sec.splitlines():
        p = line.split()
        if len(p) >= 2 and p[0] in (".text", ".rodata", ".data.rel.ro", ".eh_frame",
                                    ".eh_frame_hdr", ".gcc_except_table", ".ARM.exidx",
                                    ".ARM.extab", ".data", ".rel.dyn", ".rela.dyn"):
            print(f"  {p[0]:<20} {int(p[1]):>10,}")
    print(f"symbols with a size: {total:,} bytes")
    print(f"{'crate':<36} {'bytes':>10} {'share':>6}")
    for c, n in by_crate.most_common(a.top):
        print(f"{c:<36} {n:>10,} {100 * n / total:>5.1f}%")
    if mod_rx:
        print(f"{a.modules} by module (own code and the generic code instantiated for it):")
        for c, n in by_module.most_common(a.top):
            print(f"  {c:<40} {n:>10,}")
    for size, name in sorted(syms, reverse=True)[: a.symbols]:
        print(f"{size:>8,} {name[:120]}")


if __name__ == "__main__":
    main()
