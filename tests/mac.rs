//! The MAC layer against the real daemon, with devices played honestly: each simulated device
//! encrypts and signs its own frames, runs the device side of the MAC commands
//! (`sim::device_mac`, written from the specification) and transmits at the data rate the
//! network told it, with the SNR the test chooses. Checked: ADR moves a strong SF12 device to
//! DR5 and its state survives a restart, ADRACKReq always gets a downlink, DevStatusAns reaches
//! the uplink JSON, class C downlinks find their gateway after a restart, and ABP counter
//! restarts are accepted only with `resets_f_cnt`.

mod support;

use lorastream::config::{Config, Region};
use lorastream::daemon::Daemon;
use lorastream::lorawan::mac::{self, DownlinkMac};
use lorastream::model::Eui64;
use lorastream::sim::device_mac::DeviceMac;
use lorastream::sim::{Forwarder, PullResp, Radio, SimDevice, UplinkOpts};
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(10);
/// A PULL_RESP for an uplink leaves within the dedup window (100 ms) and scheduling: well
/// inside this. Waiting this long and seeing none means the daemon chose not to answer.
const NO_DOWNLINK: Duration = Duration::from_millis(800);
const G1: u64 = 0xAA55_5A00_0000_0001;
const G2: u64 = 0xAA55_5A00_0000_0002;

/// A device and what it knows of the network.
struct Dev {
    sim: SimDevice,
    mac: DeviceMac,
    /// FCntDown the device expects at least (the last one + 1).
    f_cnt_down: u32,
    tmst: u32,
}

impl Dev {
    fn new(n: u8) -> Dev {
        let mut sim = device(n);
        sim.adr = true;
        Dev {
            sim,
            mac: DeviceMac::new(Region::EU868, 0),
            f_cnt_down: 0,
            tmst: 1_000_000,
        }
    }

    /// The next uplink (with the MAC answers the device owes) on one of the EU868 default
    /// channels, at the device's data rate, heard with `snr`.
    fn uplink(&mut self, snr: f32, adr_ack_req: bool) -> (Vec<u8>, Radio) {
        let (cmds, req) = self.mac.next_uplink();
        let phy = self
            .sim
            .uplink_opts(&UplinkOpts {
                f_port: Some(1),
                payload: b"m",
                confirmed: false,
                ack: false,
                adr_ack_req: adr_ack_req || req,
                mac: &cmds,
            })
            .unwrap();
        let (sf, bw_khz) = self.mac.sf_bw();
        let freq_mhz = [868.1, 868.3, 868.5][(self.sim.f_cnt % 3) as usize];
        self.tmst = self.tmst.wrapping_add(5_000_000);
        let radio = Radio {
            tmst: self.tmst,
            freq_mhz,
            sf,
            bw_khz: bw_khz / 1000,
            snr,
            ..Radio::default()
        };
        (phy, radio)
    }

    /// The 32-bit FCntDown of a downlink as a LoRaWAN 1.0.x device infers it: the smallest
    /// value at or above the next expected one with these 16 low bits (the network may skip
    /// counters, e.g. after a restart; it must never reuse one).
    fn full_f_cnt_down(&self, phy: &[u8]) -> u32 {
        let low = u32::from(u16::from_le_bytes([phy[6], phy[7]]));
        let mut f = (self.f_cnt_down & !0xFFFF) | low;
        if f < self.f_cnt_down {
            f += 0x1_0000;
        }
        f
    }

    /// A downlink reached the device: check it, apply its MAC commands, return them.
    fn receive(&mut self, pr: &PullResp) -> Vec<DownlinkMac> {
        assert!(!pr.json.contains("null"), "{}", pr.json);
        let f_cnt = self.full_f_cnt_down(&pr.phy);
        let dl = self.sim.open(&pr.phy, f_cnt).unwrap();
        assert!(
            dl.mic_ok,
            "downlink MIC with FCntDown {}: {} {:?}",
            self.f_cnt_down, pr.json, dl
        );
        self.f_cnt_down = f_cnt + 1;
        let mac_bytes = if dl.opened.f_port == Some(0) {
            assert!(dl.opened.f_opts.is_empty(), "FPort 0 and FOpts together");
            dl.opened.frm_payload
        } else {
            dl.opened.f_opts
        };
        self.mac.on_downlink(&mac_bytes)
    }
}

struct Net {
    _dir: tempfile::TempDir,
    cfg: Config,
    daemon: Daemon,
    fwd: Forwarder,
    broker: Broker,
    sub: Subscriber,
}

impl Net {
    async fn start(devices: &str, tune: impl FnOnce(&mut Config)) -> Net {
        install_crypto();
        if std::env::var_os("LORASTREAM_TEST_LOG").is_some() {
            use tracing_subscriber::layer::SubscriberExt;
            let only_ours = tracing_subscriber::filter::Targets::new()
                .with_target("lorastream", tracing::Level::DEBUG);
            let sub = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_test_writer()
                .finish()
                .with(only_ours);
            let _ = tracing::subscriber::set_global_default(sub);
        }
        let broker = Broker::start(BrokerKind::Embedded).await;
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(
            dir.path(),
            &format!(
                "[[application]]\nid = \"farm\"\n\n{devices}[[stream]]\nname = \"cloud\"\nserver = \"{}\"\n",
                broker.url()
            ),
        );
        // The region's channel plan, as a gateway has it by default.
        cfg.gateway.extra_channels = None;
        tune(&mut cfg);
        let sub = Subscriber::connect(broker.port(), "lorastream/#").await;
        let daemon = Daemon::start(&cfg).await.unwrap();
        assert!(wait_until(T, || daemon.metrics().is_stream_connected("cloud")).await);
        let fwd = gateway(&daemon, G1).await;
        Net {
            _dir: dir,
            cfg,
            daemon,
            fwd,
            broker,
            sub,
        }
    }

    /// Stop the daemon and start it again on the same store; the forwarder reconnects.
    async fn restart(self) -> Net {
        let Net {
            _dir,
            cfg,
            daemon,
            fwd,
            broker,
            sub,
        } = self;
        drop(fwd);
        daemon.stop().await;
        let daemon = Daemon::start(&cfg).await.unwrap();
        assert!(wait_until(T, || daemon.metrics().is_stream_connected("cloud")).await);
        let fwd = gateway(&daemon, G1).await;
        Net {
            _dir,
            cfg,
            daemon,
            fwd,
            broker,
            sub,
        }
    }

    /// Send the device's next uplink; the downlink it gets, if any, applied to the device.
    async fn exchange(
        &mut self,
        d: &mut Dev,
        snr: f32,
        adr_ack_req: bool,
    ) -> Option<Vec<DownlinkMac>> {
        let (phy, radio) = d.uplink(snr, adr_ack_req);
        self.fwd.send(&[(&phy, radio)]).await.unwrap();
        let pr = self.fwd.pull_resp(NO_DOWNLINK).await?;
        let cmds = d.receive(&pr);
        self.fwd.tx_ack(pr.token, None).await.unwrap();
        Some(cmds)
    }

    /// The published JSON of the device's uplink with this FCnt.
    async fn uplink_json(&mut self, device: &str, f_cnt: u32) -> serde_json::Value {
        let topic = format!("lorastream/farm/devices/{device}/up");
        let mut v = self
            .sub
            .wait_for(1, T, |t, v| {
                t == topic && v["uplink_message"]["f_cnt"] == f_cnt
            })
            .await;
        assert!(!v.is_empty(), "no uplink JSON for {device} FCnt {f_cnt}");
        v.remove(0)
    }
}

async fn gateway(daemon: &Daemon, eui: u64) -> Forwarder {
    let mut fwd = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(eui))
        .await
        .unwrap();
    fwd.pull().await.unwrap();
    let gw = Eui64::from_u64(eui);
    assert!(wait_until(T, || daemon.gateways().get(&gw).is_some()).await);
    fwd
}

fn link_adr(cmds: &[DownlinkMac]) -> Vec<mac::LinkAdrReq> {
    cmds.iter()
        .filter_map(|c| match c {
            DownlinkMac::LinkAdrReq(r) => Some(*r),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adr_moves_a_strong_sf12_device_to_dr5_and_its_state_survives_a_restart() {
    let mut d = Dev::new(1);
    let mut net = Net::start(&device_toml(&d.sim, "farm"), |_| {}).await;
    // An ABP device knows the 3 default channels: the first downlink defines the other five
    // of the EU868 plan (867.1 .. 867.9 MHz), and the device answers in its next uplink.
    let first = net
        .exchange(&mut d, 10.0, false)
        .await
        .expect("NewChannelReq");
    let new: Vec<u32> = first
        .iter()
        .filter_map(|c| match c {
            DownlinkMac::NewChannelReq(r) => Some(r.freq_hz),
            _ => None,
        })
        .collect();
    assert_eq!(
        new,
        vec![
            867_100_000,
            867_300_000,
            867_500_000,
            867_700_000,
            867_900_000
        ]
    );
    assert_eq!(d.mac.defined.iter().filter(|&&c| c).count(), 8);
    // SF12 heard at +10 dB: 10 − (−20) − 10 (margin) = 20 dB to spare, 6 steps of 3 dB: DR5 and
    // one TXPower step. ADR decides once 10 uplinks are in its history.
    let mut adr = None;
    for i in 1..=12 {
        assert_eq!(d.mac.dr, 0);
        if let Some(cmds) = net.exchange(&mut d, 10.0, false).await {
            let reqs = link_adr(&cmds);
            assert!(
                !reqs.is_empty(),
                "uplink {i}: a downlink without LinkADRReq: {cmds:?}"
            );
            adr = Some((i, reqs));
            break;
        }
    }
    let (at, reqs) = adr.expect("no LinkADRReq within 12 uplinks");
    assert_eq!(at, 9, "10 uplinks in the history: FCnt 0..9");
    assert_eq!(reqs.len(), 1);
    assert_eq!((reqs[0].dr, reqs[0].tx_power, reqs[0].nb_trans), (5, 1, 1));
    assert_eq!(reqs[0].ch_mask, 0x00FF, "the 8 channels the device now has");
    assert_eq!((d.mac.dr, d.mac.tx_power), (5, 1), "the device applied it");
    assert_eq!(d.mac.enabled_channels(), (0..8).collect::<Vec<_>>());
    // The next uplink (SF7 now) carries LinkADRAns; the network records the new settings
    // and needs no further downlink.
    assert!(net.exchange(&mut d, 8.0, false).await.is_none());
    assert!(wait_until(T, || net.daemon.metrics().mac_events("adr_applied") == 1).await);
    let up = net.uplink_json("dev-1", 10).await;
    assert_eq!(
        up["uplink_message"]["settings"]["data_rate"]["lora"]["spreading_factor"],
        7
    );
    // Four more at SF7, +8 dB: 8 − (−7.5) − 10 = 5.5 dB, one step (power) once the history
    // holds 10 uplinks at the new settings; it holds 5 when the daemon restarts.
    for _ in 0..4 {
        assert!(net.exchange(&mut d, 8.0, false).await.is_none());
    }
    net = net.restart().await;
    for i in 0..4 {
        assert!(
            net.exchange(&mut d, 8.0, false).await.is_none(),
            "uplink {i} after the restart: the history (5) survived, 10 are needed"
        );
    }
    let cmds = net
        .exchange(&mut d, 8.0, false)
        .await
        .expect("the 10th uplink at DR5 (5 before the restart, 5 after) brings a LinkADRReq");
    let reqs = link_adr(&cmds);
    assert_eq!(reqs.len(), 1);
    // DR5 kept, TXPower 1 → 2: the acknowledged power survived the restart.
    assert_eq!(
        (reqs[0].dr, reqs[0].tx_power, reqs[0].ch_mask),
        (5, 2, 0x00FF)
    );
    assert!(net.exchange(&mut d, 6.0, false).await.is_none());
    assert!(wait_until(T, || net.daemon.metrics().mac_events("adr_applied") == 1).await);
    assert_eq!(d.mac.tx_power, 2);
    net.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adr_ack_req_always_gets_a_downlink_even_with_adr_off() {
    let mut d1 = Dev::new(1);
    let mut d2 = Dev::new(2);
    let devices = format!(
        "{}adr = false\n\n{}",
        device_toml(&d2.sim, "farm"),
        device_toml(&d1.sim, "farm")
    );
    let mut net = Net::start(&devices, |_| {}).await;
    for d in [&mut d1, &mut d2] {
        // Settle the channel plan first (NewChannelReq, then the answers).
        assert!(net.exchange(d, 0.0, false).await.is_some());
        assert!(net.exchange(d, 0.0, false).await.is_none());
        // Nothing queued, no command pending: ADRACKReq alone gets an empty downlink.
        let cmds = net
            .exchange(d, 0.0, true)
            .await
            .unwrap_or_else(|| panic!("{}: no downlink for ADRACKReq", d.sim.id));
        assert!(cmds.is_empty(), "{cmds:?}");
        assert!(net.exchange(d, 0.0, false).await.is_none());
    }
    net.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_status_ans_shows_in_the_uplink_json() {
    let mut d = Dev::new(1);
    d.mac.battery = 128;
    d.mac.margin = 7;
    let mut net = Net::start(&device_toml(&d.sim, "farm"), |c| {
        c.gateway.dev_status_interval = Duration::from_secs(1);
    })
    .await;
    let mut asked_at = None;
    for f in 0..8 {
        let cmds = net.exchange(&mut d, 5.0, false).await.unwrap_or_default();
        if cmds.contains(&DownlinkMac::DevStatusReq) {
            asked_at = Some(f);
            break;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let asked_at = asked_at.expect("no DevStatusReq about a second after the first uplink");
    assert!(asked_at >= 1, "not at the first uplink");
    let before = net.uplink_json("dev-1", asked_at).await;
    assert!(before["uplink_message"]
        .get("last_battery_percentage")
        .is_none());
    // The answer rides the next uplink, and its JSON shows it, TTS-style.
    net.exchange(&mut d, 5.0, false).await;
    let up = net.uplink_json("dev-1", asked_at + 1).await;
    let m = &up["uplink_message"];
    // Battery 128 of 1..254: (128 − 1) / 253 = 50.2 %.
    assert_eq!(m["last_battery_percentage"]["f_value"], 50.2, "{m}");
    assert_eq!(m["last_margin"]["value"], 7, "{m}");
    assert!(m["last_margin"]["received_at"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    assert!(wait_until(T, || net.daemon.metrics().mac_events("dev_status") == 1).await);
    net.daemon.stop().await;
}

/// A class C device's downlink, published to MQTT.
async fn push(net: &Net, device: &str, payload: &[u8]) {
    use base64::Engine;
    let (client, mut el) = rumqttc::AsyncClient::new(
        rumqttc::MqttOptions::new(format!("push-{device}"), "127.0.0.1", net.broker.port()),
        10,
    );
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let body = serde_json::json!({"downlinks":[{"f_port":3,
        "frm_payload": base64::engine::general_purpose::STANDARD.encode(payload)}]});
    client
        .publish(
            format!("lorastream/farm/devices/{device}/down/push"),
            rumqttc::QoS::AtLeastOnce,
            false,
            body.to_string(),
        )
        .await
        .unwrap();
}

fn class_c(d: &SimDevice) -> String {
    format!("{}\nclass = \"C\"\n\n", device_toml(d, "farm").trim_end())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_class_c_downlink_right_after_a_restart_goes_through_the_gateway_that_heard_the_device() {
    let mut d = Dev::new(1);
    let mut net = Net::start(&class_c(&d.sim), |_| {}).await;
    let mut g2 = gateway(&net.daemon, G2).await;
    // Heard through G2 only; its class A answer (NewChannelReq) goes back through G2.
    let (phy, radio) = d.uplink(5.0, false);
    g2.send(&[(&phy, radio)]).await.unwrap();
    let pr = g2.pull_resp(T).await.expect("downlink through G2");
    d.receive(&pr);
    g2.tx_ack(pr.token, None).await.unwrap();
    net.uplink_json("dev-1", 0).await;

    net = net.restart().await;
    let g2 = gateway(&net.daemon, G2).await;
    push(&net, "dev-1", b"lamp on").await;
    let pr = g2.pull_resp(T).await.expect("class C downlink through G2");
    assert_eq!(pr.txpk["imme"], true, "{}", pr.json);
    // EU868 RX2: 869.525 MHz, DR0 (SF12).
    assert_eq!(pr.txpk["freq"], 869.525);
    assert_eq!(pr.txpk["datr"], "SF12BW125");
    assert!(!pr.json.contains("null"), "{}", pr.json);
    let dl = d.sim.open(&pr.phy, d.full_f_cnt_down(&pr.phy)).unwrap();
    assert!(dl.mic_ok);
    assert_eq!(dl.opened.frm_payload, b"lamp on");
    assert!(
        net.fwd.pull_resp(NO_DOWNLINK).await.is_none(),
        "G1 never heard the device"
    );
    net.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_never_heard_class_c_device_is_reached_through_the_only_gateway_or_class_c_gateway() {
    let d1 = Dev::new(1);
    let d2 = Dev::new(2);
    let devices = format!("{}{}", class_c(&d1.sim), class_c(&d2.sim));
    let mut net = Net::start(&devices, |_| {}).await;
    // One forwarder: the only way to the device.
    push(&net, "dev-1", b"one").await;
    let pr = net
        .fwd
        .pull_resp(T)
        .await
        .expect("through the only gateway");
    assert_eq!(pr.txpk["imme"], true);
    assert_eq!(d1.sim.open(&pr.phy, 0).unwrap().opened.frm_payload, b"one");
    net.fwd.tx_ack(pr.token, None).await.unwrap();
    // Two forwarders, neither ever heard dev-2: it waits (reported once).
    let g2 = gateway(&net.daemon, G2).await;
    push(&net, "dev-2", b"two").await;
    assert!(
        wait_until(T, || net.daemon.metrics().downlinks("class_c_no_gateway")
            == 1)
        .await
    );
    assert!(net.fwd.pull_resp(NO_DOWNLINK).await.is_none());
    assert!(g2.pull_resp(Duration::from_millis(100)).await.is_none());
    // `[gateway] class_c_gateway` names the way: after a restart the stored downlink goes out
    // as soon as that forwarder connects, without an uplink or a new request.
    net.cfg.gateway.class_c_gateway = Some(Eui64::from_u64(G2));
    net = net.restart().await;
    let g2 = gateway(&net.daemon, G2).await;
    let pr = g2.pull_resp(T).await.expect("through class_c_gateway");
    assert_eq!(d2.sim.open(&pr.phy, 0).unwrap().opened.frm_payload, b"two");
    assert!(net.fwd.pull_resp(NO_DOWNLINK).await.is_none());
    net.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abp_counter_restart_is_accepted_only_with_resets_f_cnt() {
    let mut plain = device(1);
    let mut resets = device(2);
    let devices = format!(
        "{}{}resets_f_cnt = true\n\n",
        device_toml(&plain, "farm"),
        device_toml(&resets, "farm")
    );
    let mut net = Net::start(&devices, |_| {}).await;
    let radio = || Radio {
        freq_mhz: 868.1,
        sf: 9,
        ..Radio::default()
    };
    for d in [&mut plain, &mut resets] {
        d.f_cnt = 40;
        for _ in 0..2 {
            let p = d.uplink(1, b"before", false).unwrap();
            net.fwd.send(&[(&p, radio())]).await.unwrap();
        }
        // A battery change: the counter starts from 0 again.
        d.f_cnt = 0;
        let p = d.uplink(1, b"after", false).unwrap();
        net.fwd.send(&[(&p, radio())]).await.unwrap();
    }
    let up = net.uplink_json("dev-2", 0).await;
    assert_eq!(up["uplink_message"]["frm_payload"], "YWZ0ZXI=");
    assert!(wait_until(T, || net.daemon.metrics().uplinks("f_cnt_reset") == 1).await);
    assert!(wait_until(T, || net.daemon.metrics().uplinks("replay") == 1).await);
    net.uplink_json("dev-1", 41).await;
    net.sub.drain_for(Duration::from_millis(300)).await;
    let dev1_after = net.sub.seen.iter().any(|(t, p)| {
        t.ends_with("/dev-1/up")
            && serde_json::from_slice::<serde_json::Value>(p).unwrap()["uplink_message"]["f_cnt"]
                == 0
    });
    assert!(
        !dev1_after,
        "without resets_f_cnt the restarted counter is a replay"
    );
    net.daemon.stop().await;
}

/// `[[alert]] kind = "battery_low"` against the real daemon: a DevStatusAns below the threshold
/// fires the alert once (MQTT `{prefix}/gateways/{eui}/alerts`), a full battery resolves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn battery_low_fires_on_a_low_dev_status_and_resolves_on_a_full_one() {
    use lorastream::config::{AlertConfig, AlertKind, AlertScope};
    let mut d = Dev::new(1);
    d.mac.battery = 128; // 50 %
    let mut net = Net::start(&device_toml(&d.sim, "farm"), |c| {
        c.gateway.dev_status_interval = Duration::from_secs(1);
        c.alerts.push(AlertConfig {
            kind: AlertKind::BatteryLow,
            after: Duration::ZERO,
            hold: Duration::ZERO,
            scope: AlertScope::Device("dev-1".into()),
            threshold: 60,
            streams: vec!["cloud".into()],
        });
    })
    .await;
    let topic = "lorastream/gateways/aa555a00000000ff/alerts";
    let is = |state: &'static str| {
        move |t: &str, v: &serde_json::Value| t == topic && v["alert"]["state"] == state
    };
    let mut fired = Vec::new();
    for _ in 0..20 {
        net.exchange(&mut d, 5.0, false).await;
        fired = net
            .sub
            .wait_for(1, Duration::from_millis(1500), is("firing"))
            .await;
        if !fired.is_empty() {
            break;
        }
    }
    assert_eq!(fired.len(), 1, "no battery_low alert");
    let a = &fired[0]["alert"];
    assert_eq!(a["kind"], "battery_low");
    assert_eq!(a["subject"], "dev-1");
    assert!(
        a["message"]
            .as_str()
            .unwrap()
            .contains("50% battery, below 60%"),
        "{a}"
    );
    // The gauge is counted after the tick that queued the message: wait for it.
    let m = net.daemon.metrics().clone();
    assert!(wait_until(T, || m.alerts_open("battery_low") == 1).await);

    d.mac.battery = 254; // full
    let mut resolved = Vec::new();
    for _ in 0..20 {
        net.exchange(&mut d, 5.0, false).await;
        resolved = net
            .sub
            .wait_for(1, Duration::from_millis(1500), is("resolved"))
            .await;
        if !resolved.is_empty() {
            break;
        }
    }
    assert_eq!(resolved.len(), 1, "not resolved");
    assert_eq!(resolved[0]["alert"]["id"], a["id"]);
    assert_eq!(
        net.sub
            .wait_for(2, Duration::ZERO, is("firing"))
            .await
            .len(),
        1
    );
    net.daemon.stop().await;
}
