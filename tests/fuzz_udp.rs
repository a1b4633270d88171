//! Black-box UDP fuzzing of the real `lorastream run` binary: a million datagrams, random and
//! mutated (PUSH_DATA with real frames, PULL_DATA and TX_ACK with random EUIs and tokens,
//! broken headers, oversized bodies, giant `stat` objects), while a genuine forwarder keeps
//! sending valid uplinks. The daemon must stay up, its RSS bounded, `/health` small, and every
//! valid uplink must still reach the broker. Seeded (`LORASTREAM_FAULT_SEED` repeats a run).
//!
//! Pacing: every batch ends with a PULL_DATA from a probe socket whose PULL_ACK says that the
//! daemon has read everything before it (one socket, one reader, in order), so the kernel's
//! receive buffer never silently drops the fuzz, and the datagrams counted are ones the daemon
//! handled. `LORASTREAM_FUZZ_DATAGRAMS` changes the count (default 1,000,000).

mod faultkit;
mod support;

use faultkit::*;
use lorastream::model::Eui64;
use lorastream::sim::{pull_data, push_data, Radio, SimDevice};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};
use support::broker::TestBroker;

/// Datagrams between two probes (well within a default 208 KiB socket buffer).
const BATCH: usize = 128;
/// Batches in flight (each followed by its probe).
const DEPTH: usize = 2;
/// Distinct fuzz datagrams built up front.
const POOL: usize = 20_000;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn mutate(rng: &mut StdRng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..rng.random_range(1..4) {
        match rng.random_range(0..6) {
            0 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v[i] ^= 1 << rng.random_range(0..8);
            }
            1 if !v.is_empty() => {
                let n = rng.random_range(0..v.len());
                v.truncate(n);
            }
            2 => {
                let i = rng.random_range(0..=v.len());
                v.insert(i, rng.random());
            }
            3 if v.len() > 13 => {
                let i = rng.random_range(12..v.len());
                v.remove(i);
            }
            4 if v.len() >= 12 => {
                // A random gateway EUI: the forwarder table must stay bounded.
                let e: [u8; 8] = rng.random();
                v[4..12].copy_from_slice(&e);
            }
            _ => {
                let i = rng.random_range(0..=v.len());
                let junk: Vec<u8> = (0..rng.random_range(1..32)).map(|_| rng.random()).collect();
                v.splice(i..i, junk);
            }
        }
    }
    v
}

/// One fuzz datagram.
fn datagram(rng: &mut StdRng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let eui = Eui64(rng.random());
    match rng.random_range(0..10) {
        0 => (0..rng.random_range(0..600))
            .map(|_| rng.random())
            .collect(),
        1..=3 => {
            let i = rng.random_range(0..seeds.len());
            mutate(rng, &seeds[i])
        }
        4 => pull_data(eui, rng.random()),
        5 => {
            let t: [u8; 2] = rng.random();
            let mut v = vec![2, t[0], t[1], 5];
            v.extend_from_slice(&eui.0);
            if rng.random_bool(0.5) {
                v.extend_from_slice(br#"{"txpk_ack":{"error":"NONE"}}"#);
            }
            v
        }
        6 => {
            // A giant stat and odd rxpk fields.
            let time = "t".repeat(if rng.random_bool(0.05) {
                rng.random_range(0..60_000)
            } else {
                rng.random_range(0..64)
            });
            let body = format!(
                r#"{{"stat":{{"time":"{time}","rxnb":{},"rxok":1,"rxfw":1,"ackr":null,"dwnb":0,"txnb":0}},"rxpk":[{{"tmst":"x"}},{{}}]}}"#,
                rng.random::<u32>()
            );
            let mut v = vec![2, 0, 0, 0];
            v.extend_from_slice(&eui.0);
            v.extend_from_slice(body.as_bytes());
            v
        }
        7 => {
            // A valid header, anything after it, any identifier.
            let mut v = vec![
                rng.random_range(0..4),
                rng.random(),
                rng.random(),
                rng.random_range(0..8),
            ];
            v.extend_from_slice(&eui.0);
            v.extend((0..rng.random_range(0..200)).map(|_| rng.random::<u8>()));
            v
        }
        8 => {
            // A frame of any size and content in a well-formed PUSH_DATA.
            let phy: Vec<u8> = (0..rng.random_range(0..400))
                .map(|_| rng.random())
                .collect();
            push_data(eui, rng.random(), &[(&phy, Radio::default())])
        }
        _ => mutate(rng, &seeds[0]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_million_bad_datagrams_leave_the_daemon_alive_bounded_and_delivering() {
    let total: usize = std::env::var("LORASTREAM_FUZZ_DATAGRAMS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let seed = seed();
    println!("fuzz: seed {seed} (LORASTREAM_FAULT_SEED={seed} repeats it)");
    let mut rng = StdRng::seed_from_u64(seed);
    let broker = TestBroker::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut devs = devices(2);
    let body = devices_toml(&devs) + &mqtt_stream("cloud", &broker.url(), "lorastream");
    let spec = DaemonSpec::new(tmp.path(), "redb", body);
    let daemon = DaemonProc::start(&spec).await;
    let pid = daemon.pid().unwrap();

    // Seeds for mutation: real uplinks of a device the daemon knows, a PULL_DATA, a TX_ACK.
    let mut other = SimDevice {
        f_cnt: 1000,
        ..devs[1].clone()
    };
    let mut seeds = Vec::new();
    for i in 0..8u8 {
        let phy = other.uplink(1, &[i; 12], i % 2 == 0).unwrap();
        seeds.push(push_data(
            Eui64::from_u64(0xF00D),
            i as u16,
            &[(&phy, Radio::default())],
        ));
    }
    seeds.push(pull_data(Eui64::from_u64(0xF00D), 1));

    // A pool of fuzz datagrams made once (building them costs more than sending them in a
    // debug build); each one sent is a pool entry with a few bytes flipped and, for most, a
    // random gateway EUI, so no two are alike.
    let pool: Vec<Vec<u8>> = (0..POOL).map(|_| datagram(&mut rng, &seeds)).collect();
    let fuzz = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    probe
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let genuine = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    // The genuine forwarder: its PULL_DATA are the probes (its keep-alives, as a real one
    // sends every few seconds), its PUSH_DATA the valid uplinks.
    let real_gw = Eui64::from_u64(0xAA55_5A00_0000_0002);
    let probe_eui = real_gw;
    let delivered = |b: &TestBroker| {
        b.received()
            .iter()
            .filter(|(t, _)| t.ends_with("/devices/dev-1/up"))
            .count()
    };

    let start = Instant::now();
    let rss_start = rss_kib(pid);
    let mut rss_max = rss_start;
    let (mut sent, mut token, mut valid) = (0usize, 0u16, 0usize);
    let mut buf = [0u8; 64];
    let mut first = true;
    let mut first_done = false;
    let mut outstanding = std::collections::VecDeque::new();
    while sent < total {
        for _ in 0..if first { 0 } else { BATCH } {
            let mut d = pool[rng.random_range(0..POOL)].clone();
            if d.len() >= 12 && rng.random_bool(0.8) {
                let e: [u8; 8] = rng.random();
                d[4..12].copy_from_slice(&e);
            }
            for _ in 0..rng.random_range(0..3) {
                if !d.is_empty() {
                    let i = rng.random_range(0..d.len());
                    d[i] ^= 1 << rng.random_range(0..8);
                }
            }
            let _ = fuzz.send_to(&d, spec.udp);
        }
        if !first {
            sent += BATCH;
        }
        first = false;
        // The probe: answered only once the daemon has read the batch. Up to DEPTH batches
        // are in flight, so the daemon is never idle while the next one is made.
        token = token.wrapping_add(1);
        probe
            .send_to(&pull_data(probe_eui, token), spec.udp)
            .unwrap();
        outstanding.push_back(token);
        while outstanding.len() > if first_done { DEPTH } else { 0 } {
            let want = outstanding.pop_front().unwrap();
            loop {
                match probe.recv_from(&mut buf) {
                    Ok((4, _)) if buf[3] == 4 && u16::from_be_bytes([buf[1], buf[2]]) == want => {
                        break
                    }
                    Ok(_) => {}
                    Err(e) => panic!(
                        "fuzz: the daemon stopped answering after {sent} datagrams ({e})\n{}",
                        daemon.log_text()
                    ),
                }
            }
        }
        first_done = true;
        if sent % 50_000 < BATCH {
            rss_max = rss_max.max(rss_kib(pid));
            // Valid traffic still flows end to end.
            let phy = devs[0].uplink(1, &sent.to_be_bytes(), false).unwrap();
            genuine
                .send_to(
                    &push_data(real_gw, 7, &[(&phy, Radio::default())]),
                    spec.udp,
                )
                .unwrap();
            valid += 1;
            let ok =
                support::wait_until(Duration::from_secs(10), || delivered(&broker) >= valid).await;
            assert!(
                ok,
                "fuzz: a valid uplink was not delivered after {sent} datagrams\n{}",
                daemon.log_text()
            );
        }
    }
    // The last probes.
    while let Some(want) = outstanding.pop_front() {
        loop {
            match probe.recv_from(&mut buf) {
                Ok((4, _)) if buf[3] == 4 && u16::from_be_bytes([buf[1], buf[2]]) == want => break,
                Ok(_) => {}
                Err(e) => panic!("fuzz: no answer to the last probes ({e})"),
            }
        }
    }
    let took = start.elapsed();
    let m = daemon.metrics().await.expect("/metrics answers");
    let handled = m.sum("lorastream_udp_datagrams_total")
        + m.get("lorastream_udp_errors_total", &[("reason", "too_short")])
        + m.get("lorastream_udp_errors_total", &[("reason", "bad_version")])
        + m.get(
            "lorastream_udp_errors_total",
            &[("reason", "bad_identifier")],
        )
        + m.get(
            "lorastream_udp_errors_total",
            &[("reason", "gateway_not_allowed")],
        );
    let health = daemon.health().await.expect("/health answers");
    let health_bytes = health.to_string().len();
    let rss_end = rss_kib(pid);
    rss_max = rss_max.max(rss_end);
    println!(
        "fuzz: {sent} datagrams in {:.1} s ({:.0}/s), {handled} handled by the daemon; {valid} valid uplinks delivered meanwhile; RSS {} KiB at start, {} KiB max, {} KiB at the end; /health {} bytes, {} gateways known",
        took.as_secs_f64(),
        sent as f64 / took.as_secs_f64(),
        rss_start,
        rss_max,
        rss_end,
        health_bytes,
        health["gateways_total"]
    );
    assert!(
        handled >= sent as u64,
        "the daemon handled {handled} of {sent}"
    );
    assert!(
        rss_max < 96 * 1024,
        "RSS grew to {rss_max} KiB (start {rss_start} KiB)"
    );
    assert!(health_bytes < 200_000, "/health is {health_bytes} bytes");
    assert!(health["gateways_total"].as_u64().unwrap() <= 1000);
}
