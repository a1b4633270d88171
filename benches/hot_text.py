#!/usr/bin/env python3
"""Regenerate cross/hot-text.ld: the functions a running daemon executes, placed together at the
start of the binary's code by the linker (build.rs passes the script to release builds).

Why: the kernel maps a program's code into its RSS 64 KiB at a time around each page that runs
(fault-around). Fat LTO spreads the ~1.9 MB of code the daemon ever runs over all ~6 MB of its
.text, so nearly every 64 KiB window holds some and nearly all of .text ends up resident. Placed
together, only the windows of the code that runs are (docs/benchmarks.md, "Hot code placed
together").

    LORASTREAM_HOT_TEXT=0 cross/build.sh x86_64 --config 'profile.release.strip=false'
    LORASTREAM_BIN=target/x86_64-unknown-linux-gnu/release/lorastream python3 benches/hot_text.py

Runs the daemon under callgrind (benches/pipeline.py callgrind: a start, an idle period, a burst
of uplinks, a stop) with several formats and codecs, and through the throughput scenario, and writes one input-section pattern per
function callgrind saw run in the lorastream binary, most instructions first. A pattern leaves out
what differs between compilers, targets and builds (v0 crate disambiguators and back-references,
the legacy mangling's hash, LLVM's `.llvm.N` suffixes), so the script serves the aarch64 and
armv7 builds too, where callgrind cannot run. Every Linux build uses v0 symbol names
(.cargo/config.toml), which spell out a generic function's type arguments; a legacy name without
its hash stands for all instances of a generic function (Debian's prebuilt std has legacy names):
where a pattern matches more than twice as many functions of the profiled binary as ran, the
script names the instances that ran exactly instead. A function the script misses is only
placed with the rest of the code. Needs valgrind, mosquitto and mosquitto_sub.
"""
import collections
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIN = os.path.abspath(os.environ.get("LORASTREAM_BIN", os.path.join(ROOT, "target/release/lorastream")))
OUT = os.path.join(ROOT, "cross", "hot-text.ld")
# (format, codec, uplinks, rate) runs: what an operator's daemon does most (the default format,
# the two codecs of the device repository's devices) and the second stream format; the first one
# long and fast enough for the store's size-triggered checkpoints and record blocks.
RUNS = [("tts", "none", 8000, 1000), ("chirpstack", "cayennelpp", 1000, 200), ("tts", "javascript", 1000, 200)]


def executed(path, binary):
    """Cost (instructions) of every function of `binary` that ran, from one callgrind file."""
    cost = collections.Counter()
    # Valgrind names some of a binary's code's object "???" (seen with a binary linked with
    # this script by GNU ld); names that are not the binary's match none of its sections.
    ours = (binary, "???")
    names = {"ob": {}, "fn": {}}  # callgrind's compressed names: id -> name, per kind
    ob = cob = None
    cur = None
    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        m = re.match(r"^(c?)(ob|fn)=\((\d+)\)(?: (.*))?$", line)
        if m:
            called, kind, i, name = m.groups()
            if name:
                names[kind][i] = name
            name = names[kind].get(i)
            if kind == "ob":
                if called:
                    cob = name
                else:
                    ob = name
            elif not called:
                cur = name if ob in ours else None
                cob = None
                if cur:
                    cost[cur] += 0
            else:
                # A call from a function of the binary to one of the binary (`cob` is only
                # written when the callee's object differs from the caller's).
                if (cob or ob) in ours and name:
                    cost[name] += 0
                cob = None
            continue
        if cur and line[:1].isdigit():
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                cost[cur] += int(parts[1])
    return cost


def pattern(name):
    """A glob for `name`'s section (.text.NAME) that holds across toolchains and targets."""
    if name.startswith("0x"):
        return None  # code callgrind found no symbol for
    name = re.sub(r"\.llvm\.\d+$", "*", name)
    if name.startswith("_ZN"):
        name = re.sub(r"17h[0-9a-f]{16}E$", "17h*", name)
    elif name.startswith("_R"):
        # Crate disambiguators (Cs<base62>_) and back-references (B<base62>_, whose offsets move
        # when a disambiguator's length does).
        name = re.sub(r"Cs[0-9A-Za-z]*_", "Cs*_", name)
        name = re.sub(r"B[0-9A-Za-z]*_", "B*_", name)
        name = re.sub(r"\*(\*)+", "*", name)
    else:
        # C code (ring, QuickJS): ring's symbols carry its version.
        name = re.sub(r"^ring_core_\d+_\d+_\d+_", "ring_core_*_", name)
    if not re.fullmatch(r"[A-Za-z0-9_.$*]+", name):
        return None
    return name


def main():
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} missing (see the docstring for the build command)")
    if b".symtab" not in subprocess.run(["readelf", "-S", BIN], capture_output=True).stdout:
        sys.exit(f"{BIN} is stripped: build it with --config 'profile.release.strip=false'")
    total = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, codec, count, rate in RUNS:
            out = os.path.join(tmp, f"{fmt}-{codec}")
            os.mkdir(out)
            env = dict(os.environ, VALGRIND_OPTS="--demangle=no", LORASTREAM_BIN=BIN)
            subprocess.run([sys.executable, os.path.join(HERE, "pipeline.py"), "callgrind", "--rate", str(rate),
                            "--count", str(count), "--format", fmt, "--codec", codec, "--out-dir", out],
                           env=env, check=True, stdout=subprocess.DEVNULL)
            for f in os.listdir(out):
                total.update(executed(os.path.join(out, f), BIN))
        # The throughput scenario as benchmarked (a consumer on the broker, 1,000 devices), slower.
        out = os.path.join(tmp, "throughput")
        os.mkdir(out)
        wrap = f"valgrind --tool=callgrind --callgrind-out-file={out}/callgrind.%p.out"
        env = dict(os.environ, VALGRIND_OPTS="--demangle=no", LORASTREAM_BIN=BIN, LORASTREAM_BENCH_WRAP=wrap)
        subprocess.run([sys.executable, os.path.join(HERE, "pipeline.py"), "throughput", "--rate", "500",
                        "--seconds", "8", "--devices", "1000", "--subscriber"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        for f in os.listdir(out):
            total.update(executed(os.path.join(out, f), BIN))
    # How many of the binary's functions each pattern stands for.
    nm = subprocess.run(["nm", BIN], capture_output=True, text=True, check=True).stdout
    matches = collections.Counter()
    for line in nm.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "tTwW":
            matches[pattern(parts[2])] += 1
    ran = collections.Counter(pattern(n) for n in total)
    seen, lines = set(), []
    for name, _ in total.most_common():
        p = pattern(name)
        if p is None:
            continue
        if matches[p] > 2 * ran[p]:
            p = name  # exact: the pattern would pull in many instances that never ran
            if not re.fullmatch(r"[A-Za-z0-9_.$]+", p):
                continue
        if p not in seen:
            seen.add(p)
            lines.append(f"    *(.text.{p})")
    with open(OUT, "w") as f:
        f.write("/* Generated by benches/hot_text.py from callgrind runs of the daemon (see its docstring).\n"
                "   The functions a running daemon executes, most instructions first, placed before\n"
                "   the rest of the code (docs/benchmarks.md, \"Hot code placed together\"). build.rs\n"
                "   passes this script to release builds; INSERT keeps the linker's default layout. */\n"
                "SECTIONS\n{\n  .text.hot_lorastream :\n  {\n")
        f.write("\n".join(lines))
        f.write("\n  }\n}\nINSERT BEFORE .text;\n")
    print(f"{OUT}: {len(lines)} patterns from {len(total)} functions")


if __name__ == "__main__":
    main()
