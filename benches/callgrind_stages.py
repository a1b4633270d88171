#!/usr/bin/env python3
"""Per-stage inclusive instructions per uplink, (traffic - idle) / count, from the two callgrind
outputs `benches/pipeline.py callgrind` leaves in /tmp (docs/benchmarks.md, issue 16).

Needs a release build that keeps its symbols, e.g.
  CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=line-tables-only cargo build --release --locked
  python3 benches/pipeline.py callgrind --rate 200 --count 2000
  python3 benches/callgrind_stages.py /tmp/callgrind.idle.out /tmp/callgrind.traffic.out 2000

Inclusive counts overlap (a stage includes the allocator calls it makes; `commit_blocking` is
part of `Backend::commit`'s callers), so the rows do not add up to the total. Function names are
those of a fat-LTO build: what is inlined into a caller counts there."""
import os, re, subprocess, sys
STAGES = [
 ("total", "PROGRAM TOTALS"),
 ("ingress: udp::run (task)", "lorastream::ingress::udp::run::{{closure}} ["),
 ("  parse_push_data", "lorastream::ingress::gwmp::parse_push_data ["),
 ("uplink stage: UplinkStage::run (task)", "lorastream::uplink::UplinkStage::run::{{closure}} ["),
 ("  decide (MIC, FCnt, decrypt, MAC)", "lorastream::uplink::UplinkStage::decide ["),
 ("  frame_view (status page)", "lorastream::uplink::UplinkStage::frame_view ["),
 ("  store_all (append)", "lorastream::uplink::UplinkStage::store_all::{{closure}} ["),
 ("store: Backend::commit (redb)", "lorastream::store::backend::Backend::commit ["),
 ("store: commit_blocking", "lorastream::store::committer::<impl lorastream::store::Store>::commit_blocking ["),
 ("store: journal_write", "lorastream::store::Store::journal_write ["),
 ("downlink: Scheduler::run (task)", "lorastream::downlink::scheduler::Scheduler::run::{{closure}} ["),
 ("stream: mqtt::feed", "lorastream::streams::mqtt::feed::{{closure}} ["),
 ("  Formatter::tts (JSON)", "lorastream::streams::format::Formatter::tts ["),
 ("  Lanes::next (queue reads)", "lorastream::streams::lanes::Lanes::next ["),
 ("stream: MqttStream::session", "<lorastream::streams::mqtt::MqttStream as lorastream::streams::connect::Session>::session::{{closure}} ["),
 ("stream: mqtt Driver (event loop task)", "lorastream::streams::mqtt::client::Driver::start::{{closure}} ["),
 ("  rumqttc EventLoop::poll", "rumqttc::eventloop::EventLoop::poll::{{closure}} ["),
 ("tokio park (idle wait)", "tokio::runtime::scheduler::multi_thread::worker::Context::park_internal ["),
 ("std hashing (SipHash hash_one, incl.)", "core::hash::BuildHasher::hash_one ["),
 ("TTS Out::display (fmt into the JSON)", "lorastream::streams::format::tts::Out::display ["),
 ("prometheus Family::get_or_create", "prometheus_client::metrics::family::Family<S,M,C>::get_or_create ["),
 ("fmt::format_inner", "alloc::fmt::format::format_inner ["),
 ("malloc (incl.)", "malloc.c:malloc ["),
 ("free (incl.)", "malloc.c:free ["),
 ("realloc (incl.)", "malloc.c:realloc ["),
 ("memcpy", "__memcpy_avx_unaligned_erms ["),
 ("memset", "__memset_avx2_unaligned_erms ["),
 ("Daemon::stop", "lorastream::daemon::Daemon::stop::{{closure}} ["),
]
def load(path):
    # From "/": run inside the source tree, callgrind_annotate shortens the file names and
    # groups the inlined parts of a function differently.
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", "--auto=no", os.path.abspath(path)],
                         capture_output=True, text=True, cwd="/").stdout
    rows = []
    for l in out.splitlines():
        m = re.match(r"\s*([\d,]+)\s+\([^)]*\)\s+(.*)", l)
        if m:
            rows.append((int(m.group(1).replace(",", "")), m.group(2)))
    return rows
def get(rows, key):
    for n, name in rows:
        if key in name:
            return n
    return 0
idle, traffic, count = load(sys.argv[1]), load(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 2000
for label, key in STAGES:
    t, i = get(traffic, key), get(idle, key)
    print(f"{label:45s} {round((t - i) / count):>9,}   (traffic {round(t / count):>9,})")
