//! ADR benchmark: simulated devices that start at SF12 send uplinks through the real daemon
//! (in-process, real UDP, real store), each playing the device side of the MAC layer
//! (`sim::device_mac`: LinkADRReq, NewChannelReq, ADR_ACK_CNT) over a radio channel the
//! benchmark models. It reports how many devices reach the best data rate their link allows,
//! after how many uplinks, the airtime saved, and the frames lost to settings too fast for the
//! link.
//!
//!   cargo bench --bench adr -- [--devices 1000] [--uplinks 50] [--seed 1]
//!
//! The radio model: each device has a link whose mean SNR at the gateway (at TXPower 0) is drawn
//! uniformly between the SF12 demodulation floor and 30 dB above it; every uplink adds
//! Gaussian fading (σ = 2 dB); each TXPower step takes 2 dB off. A frame is heard when its SNR is
//! at or above the floor of its spreading factor (SX127x/SX130x datasheets: SF7 −7.5 dB … SF12
//! −20 dB, 2.5 dB apart); downlinks always reach the device. Airtime is the Semtech formula
//! (SX1276 datasheet §4.1.1.7) for the frame's PHYPayload, 8-symbol preamble, explicit header,
//! CRC, coding rate 4/5, low-data-rate optimisation at SF11/SF12.

use lorastream::config::{Config, Region};
use lorastream::daemon::Daemon;
use lorastream::lorawan::mac::DownlinkMac;
use lorastream::model::{AesKey, DevAddr, Eui64};
use lorastream::sim::device_mac::DeviceMac;
use lorastream::sim::{parse_pull_resp, Forwarder, PullResp, Radio, SimDevice, UplinkOpts};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Demodulation floor (dB) per spreading factor.
fn floor_db(sf: u8) -> f64 {
    -7.5 - 2.5 * f64::from(sf - 7)
}

/// Time on air (s) of a LoRa frame of `len` bytes at `sf`, 125 kHz.
fn airtime_s(sf: u8, len: usize) -> f64 {
    let t_sym = f64::from(1u32 << sf) / 125_000.0;
    let de = if sf >= 11 { 1.0 } else { 0.0 };
    let sf_f = f64::from(sf);
    let num = 8.0 * len as f64 - 4.0 * sf_f + 28.0 + 16.0;
    let n = 8.0 + ((num / (4.0 * (sf_f - 2.0 * de))).ceil() * 5.0).max(0.0);
    (8.0 + 4.25) * t_sym + n * t_sym
}

/// The fastest EU868 data rate (DR0..DR5) whose floor the link clears by `margin` dB at its
/// mean SNR (TXPower 0): what a perfect ADR would settle on.
fn best_dr(mean_snr: f64, margin: f64) -> u8 {
    (0..=5u8)
        .rev()
        .find(|dr| mean_snr - floor_db(12 - dr) >= margin)
        .unwrap_or(0)
}

/// Standard normal sample (Box–Muller).
fn gauss(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-12);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

struct Dev {
    sim: SimDevice,
    mac: DeviceMac,
    f_cnt_down: u32,
    mean_snr: f64,
    /// Each uplink sent: data rate, heard by the gateway, PHYPayload length, and its SNR had it
    /// been sent at TXPower 0 (the same fading).
    sent: Vec<(u8, bool, usize, f64)>,
    link_adr_reqs: u32,
}

struct Args {
    devices: usize,
    uplinks: usize,
    seed: u64,
}

fn args() -> Args {
    let mut a = Args {
        devices: 1000,
        uplinks: 50,
        seed: 1,
    };
    let v: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < v.len() {
        let next = v.get(i + 1).and_then(|s| s.parse::<u64>().ok());
        match (v[i].as_str(), next) {
            ("--devices", Some(n)) => a.devices = n as usize,
            ("--uplinks", Some(n)) => a.uplinks = n as usize,
            ("--seed", Some(n)) => a.seed = n,
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

fn config(dir: &std::path::Path, devices: &[Dev]) -> Config {
    let mut toml = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nregion = \"EU868\"\ndedup_window_ms = 100\n\n\
         [storage]\npath = {:?}\n\n[metrics]\nlisten = \"\"\n\n[log]\nlevel = \"error\"\n\n\
         [[application]]\nid = \"bench\"\n\n[[stream]]\nname = \"out\"\nkind = \"file\"\npath = {:?}\n\n",
        dir.join("db").display().to_string(),
        dir.join("uplinks.jsonl").display().to_string(),
    );
    for (i, d) in devices.iter().enumerate() {
        toml.push_str(&format!(
            "[[device]]\napplication = \"bench\"\nid = \"d{i}\"\ndev_eui = \"{}\"\ndev_addr = \"{}\"\nnwk_s_key = \"{}\"\napp_s_key = \"{}\"\n\n",
            Eui64::from_u64(0x70B3_D57E_0000_0000 + i as u64),
            d.sim.dev_addr,
            hex::encode(d.sim.nwk_s_key.0),
            hex::encode(d.sim.app_s_key.0),
        ));
    }
    Config::parse(&toml, "<adr bench>").expect("bench config")
}

/// EU868 uplink frequency (MHz) of a channel index: the defaults, then the common plan.
fn channel_mhz(i: usize) -> f64 {
    [868.1, 868.3, 868.5, 867.1, 867.3, 867.5, 867.7, 867.9][i % 8]
}

fn main() {
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(a));
}

async fn run(a: Args) {
    lorastream::streams::tls::install_crypto_provider();
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    let mut devs: Vec<Dev> = (0..a.devices)
        .map(|i| {
            let mut k = [0u8; 16];
            rng.fill(&mut k);
            let nwk = AesKey(k);
            rng.fill(&mut k);
            let app = AesKey(k);
            Dev {
                sim: SimDevice {
                    id: format!("d{i}"),
                    dev_addr: DevAddr(0x2600_0000 + i as u32),
                    nwk_s_key: nwk,
                    app_s_key: app,
                    f_cnt: 0,
                    adr: true,
                },
                mac: DeviceMac::new(Region::EU868, 0),
                f_cnt_down: 0,
                mean_snr: floor_db(12) + rng.random_range(0.0..30.0),
                sent: Vec::new(),
                link_adr_reqs: 0,
            }
        })
        .collect();
    let by_addr: HashMap<DevAddr, usize> = devs
        .iter()
        .enumerate()
        .map(|(i, d)| (d.sim.dev_addr, i))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), &devs);
    let margin = f64::from(cfg.gateway.adr_margin_db);
    let daemon = Daemon::start(&cfg).await.expect("daemon");
    let mut fwd = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(0xAA55_5A00_0000_0001))
        .await
        .expect("forwarder");
    fwd.pull().await.expect("PULL_DATA");
    // PULL_RESPs arrive while uplinks go out.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PullResp>();
    let sock = std::sync::Arc::clone(&fwd.socket);
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf).await {
            if let Some(p) = parse_pull_resp(&buf[..n]) {
                let _ = tx.send(p);
            }
        }
    });
    let payload = [0u8; 10];
    let started = Instant::now();
    let mut downlinks = 0u64;
    let mut bad = 0u64;
    // One round = every device sends one uplink, 2 ms apart (500 uplinks/s); the daemon's
    // answers are taken in as they come, and after the round until RX2 of the last uplink.
    for round in 0..a.uplinks {
        for i in 0..devs.len() {
            let d = &mut devs[i];
            let (cmds, adr_ack_req) = d.mac.next_uplink();
            let phy = d
                .sim
                .uplink_opts(&UplinkOpts {
                    f_port: Some(1),
                    payload: &payload,
                    confirmed: false,
                    ack: false,
                    adr_ack_req,
                    mac: &cmds,
                })
                .expect("uplink");
            let (sf, _) = d.mac.sf_bw();
            let snr0 = d.mean_snr + 2.0 * gauss(&mut rng);
            let snr = snr0 - 2.0 * f64::from(d.mac.tx_power);
            let heard = snr >= floor_db(sf);
            d.sent.push((d.mac.dr, heard, phy.len(), snr0));
            if heard {
                let chans = d.mac.enabled_channels();
                let ch = chans[rng.random_range(0..chans.len())];
                let radio = Radio {
                    freq_mhz: channel_mhz(ch),
                    sf,
                    tmst: (round as u32)
                        .wrapping_mul(10_000_000)
                        .wrapping_add(i as u32 * 2_000),
                    snr: (snr * 4.0).round() as f32 / 4.0,
                    rssi: -110,
                    ..Radio::default()
                };
                fwd.send(&[(&phy, radio)]).await.expect("PUSH_DATA");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
            while let Ok(pr) = rx.try_recv() {
                take(&fwd, &mut devs, &by_addr, &pr, &mut downlinks, &mut bad).await;
            }
        }
        let quiet = tokio::time::Instant::now() + Duration::from_millis(2500);
        while let Ok(Some(pr)) = tokio::time::timeout_at(quiet, rx.recv()).await {
            take(&fwd, &mut devs, &by_addr, &pr, &mut downlinks, &mut bad).await;
        }
        eprintln!(
            "round {}/{}: {} downlinks so far",
            round + 1,
            a.uplinks,
            downlinks
        );
    }
    let elapsed = started.elapsed();
    let m = daemon.metrics();
    let too_late = m.downlinks("too_late");
    let adr_applied = m.mac_events("adr_applied");
    let adr_refused = m.mac_events("adr_refused");
    daemon.stop().await;
    reader.abort();
    report(
        &a,
        &devs,
        margin,
        downlinks,
        bad,
        too_late,
        adr_applied,
        adr_refused,
        elapsed,
    );
}

/// A PULL_RESP for one of the devices: check it, let the device apply its MAC commands, and
/// acknowledge it as the forwarder would.
async fn take(
    fwd: &Forwarder,
    devs: &mut [Dev],
    by_addr: &HashMap<DevAddr, usize>,
    pr: &PullResp,
    downlinks: &mut u64,
    bad: &mut u64,
) {
    let _ = fwd.tx_ack(pr.token, None).await;
    *downlinks += 1;
    let addr = pr
        .phy
        .get(1..5)
        .map(|b| DevAddr(u32::from_le_bytes([b[0], b[1], b[2], b[3]])));
    let Some(&i) = addr.and_then(|a| by_addr.get(&a)) else {
        *bad += 1;
        return;
    };
    let d = &mut devs[i];
    let Ok(dl) = d.sim.open(&pr.phy, d.f_cnt_down) else {
        *bad += 1;
        return;
    };
    if !dl.mic_ok {
        *bad += 1;
        return;
    }
    d.f_cnt_down += 1;
    let mac = if dl.opened.f_port == Some(0) {
        dl.opened.frm_payload
    } else {
        dl.opened.f_opts
    };
    let cmds = d.mac.on_downlink(&mac);
    d.link_adr_reqs += cmds
        .iter()
        .filter(|c| matches!(c, DownlinkMac::LinkAdrReq(_)))
        .count() as u32;
}

#[allow(clippy::too_many_arguments)]
fn report(
    a: &Args,
    devs: &[Dev],
    margin: f64,
    downlinks: u64,
    bad: u64,
    too_late: u64,
    adr_applied: u64,
    adr_refused: u64,
    elapsed: Duration,
) {
    let n = devs.len() as f64;
    let mut reached = 0usize;
    let mut above_best = 0usize;
    let mut uplinks_to_final: Vec<usize> = Vec::new();
    let mut below_margin = 0usize;
    let (mut air_adr, mut air_sf12) = (0.0, 0.0);
    let (mut last10_adr, mut last10_sf12) = (0.0, 0.0);
    let (mut sent, mut lost, mut lost_last10, mut sent_last10) = (0usize, 0usize, 0usize, 0usize);
    let mut lost_at_sf12 = 0usize;
    let mut by_best = [0usize; 6];
    for d in devs {
        let best = best_dr(d.mean_snr, margin);
        by_best[usize::from(best)] += 1;
        let final_dr = d.mac.dr;
        if final_dr >= best {
            reached += 1;
        }
        if final_dr > best {
            above_best += 1;
        }
        // The first uplink from which the device stayed at its final data rate.
        let first = d
            .sent
            .iter()
            .rposition(|(dr, ..)| *dr != final_dr)
            .map_or(0, |p| p + 1);
        if final_dr > 0 {
            uplinks_to_final.push(first);
        }
        // Mean margin left at the final settings.
        let left = d.mean_snr - 2.0 * f64::from(d.mac.tx_power) - floor_db(12 - final_dr.min(5));
        if left < 0.0 {
            below_margin += 1;
        }
        let k = d.sent.len();
        for (j, (dr, heard, len, snr0)) in d.sent.iter().enumerate() {
            lost_at_sf12 += usize::from(*snr0 < floor_db(12));
            let t = airtime_s(12 - dr.min(&5), *len);
            let t12 = airtime_s(12, *len);
            air_adr += t;
            air_sf12 += t12;
            sent += 1;
            lost += usize::from(!heard);
            if j + 10 >= k {
                last10_adr += t;
                last10_sf12 += t12;
                sent_last10 += 1;
                lost_last10 += usize::from(!heard);
            }
        }
    }
    uplinks_to_final.sort_unstable();
    let pct = |v: &[usize], p: f64| {
        if v.is_empty() {
            0
        } else {
            v[((v.len() - 1) as f64 * p).round() as usize]
        }
    };
    let final_hist: Vec<usize> = (0..=5u8)
        .map(|dr| devs.iter().filter(|d| d.mac.dr == dr).count())
        .collect();
    let out = serde_json::json!({
        "devices": devs.len(),
        "uplinks_per_device": a.uplinks,
        "seed": a.seed,
        "adr_margin_db": margin,
        "best_dr_histogram": by_best,
        "final_dr_histogram": final_hist,
        "reached_best_dr": reached,
        "reached_best_dr_pct": (reached as f64 / n * 1000.0).round() / 10.0,
        "above_best_dr": above_best,
        "uplinks_to_final_dr": {"p50": pct(&uplinks_to_final, 0.5), "p90": pct(&uplinks_to_final, 0.9), "max": pct(&uplinks_to_final, 1.0)},
        "airtime_s": {"adr": (air_adr * 10.0).round() / 10.0, "all_sf12": (air_sf12 * 10.0).round() / 10.0,
                      "saved_pct": ((1.0 - air_adr / air_sf12) * 1000.0).round() / 10.0},
        "airtime_last10_saved_pct": ((1.0 - last10_adr / last10_sf12) * 1000.0).round() / 10.0,
        "frames": {"sent": sent, "lost": lost, "lost_pct": (lost as f64 / sent as f64 * 1000.0).round() / 10.0,
                   "last10_lost_pct": (lost_last10 as f64 / sent_last10.max(1) as f64 * 1000.0).round() / 10.0,
                   "lost_if_all_sf12": lost_at_sf12},
        "devices_below_their_margin": below_margin,
        "downlinks": downlinks,
        "downlinks_unreadable": bad,
        "downlinks_too_late": too_late,
        "adr_applied": adr_applied,
        "adr_refused": adr_refused,
        "wall_s": elapsed.as_secs(),
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
}
