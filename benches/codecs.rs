//! Payload codecs: the cost of one call and the memory of the JavaScript engine
//! (docs/benchmarks.md, "Payload codecs").
//!
//! `cargo bench --bench codecs`: CayenneLPP and a TTN-device-repository-style JavaScript codec
//! (tests/data/codecs/th-sensor.js), each called N times on one payload; prints µs per call and
//! the process's resident memory before and after the script's engine is loaded.

use lorastream::codec::{cayenne, js::Script, UplinkInput};
use std::time::{Duration, Instant};

const N: u32 = 20_000;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let lpp =
        hex::decode("03670110056700FF0171FE58000F068201880676 5FF2960A0003E8".replace(' ', ""))
            .expect("hex");
    let t = Instant::now();
    for _ in 0..N {
        std::hint::black_box(cayenne::decode_uplink(std::hint::black_box(&lpp)).expect("lpp"));
    }
    let lpp_us = t.elapsed().as_secs_f64() * 1e6 / f64::from(N);

    let before = rss_kib();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/codecs/th-sensor.js"
    );
    let s = Script::start(std::path::Path::new(script), Duration::from_millis(100)).expect("load");
    let bytes = hex::decode("CBF809C40258010A28002A").expect("hex");
    let input = UplinkInput {
        bytes: &bytes,
        f_port: 2,
        recv_time_us: 1_795_341_600_000_000,
    };
    let after_load = rss_kib();
    let js_us = rt.block_on(async {
        // Warm-up, then the measured calls (each a round trip to the script's thread).
        for _ in 0..100 {
            s.decode_uplink(input).await.expect("decode");
        }
        let t = Instant::now();
        for _ in 0..N {
            std::hint::black_box(s.decode_uplink(input).await.expect("decode"));
        }
        t.elapsed().as_secs_f64() * 1e6 / f64::from(N)
    });
    let after_calls = rss_kib();
    println!("cayennelpp decode (3 values): {lpp_us:.2} us/call");
    println!("javascript decodeUplink (th-sensor.js, 11 bytes): {js_us:.1} us/call");
    println!(
        "RSS: {before} KiB before the engine, {after_load} KiB loaded (+{} KiB), {after_calls} KiB after {N} calls (+{} KiB)",
        after_load.saturating_sub(before),
        after_calls.saturating_sub(before)
    );
}
