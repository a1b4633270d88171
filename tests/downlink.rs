//! Downlinks end to end: MQTT `down/push` → store → RX window → PULL_RESP on a real UDP socket,
//! decrypted by the test with the device keys; TX_ACK outcomes; class C; confirmed traffic;
//! MAC answers; FCntDown across restarts.

mod support;

use base64::Engine;
use lorastream::app::Daemon;
use lorastream::lorawan::frame::MacCmd;
use lorastream::model::Eui64;
use lorastream::sim::{Forwarder, PullResp, Radio, SimDevice};
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(10);

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

struct Rig {
    _dir: tempfile::TempDir,
    broker: Broker,
    daemon: Daemon,
    fwd: Forwarder,
    sub: Subscriber,
    pub_client: rumqttc::AsyncClient,
}

async fn rig(kind: BrokerKind, devices: &str, stream_extra: &str) -> Rig {
    install_crypto();
    let broker = Broker::start(kind).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &format!(
            "[[application]]\nid = \"farm\"\n\n[[application]]\nid = \"other\"\n\n{devices}[[stream]]\nname = \"cloud\"\nserver = \"{}\"\n{stream_extra}\n",
            broker.url()
        ),
    );
    let sub = Subscriber::connect(broker.port(), "lorastream/#").await;
    let daemon = Daemon::start(&cfg).await.unwrap();
    let mut fwd = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(0xAA55_5A00_0000_0001))
        .await
        .unwrap();
    fwd.pull().await.unwrap();
    assert!(wait_until(T, || daemon.gateways().len() == 1).await);
    assert!(wait_until(T, || daemon.metrics().is_stream_connected("cloud")).await);
    let (pub_client, mut el) = rumqttc::AsyncClient::new(
        rumqttc::MqttOptions::new(format!("pub-{}", rand_u16()), "127.0.0.1", broker.port()),
        10,
    );
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    Rig {
        _dir: dir,
        broker,
        daemon,
        fwd,
        sub,
        pub_client,
    }
}

fn rand_u16() -> u16 {
    (std::process::id() as u16).wrapping_mul(31).wrapping_add(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u16,
    )
}

impl Rig {
    async fn push(&self, device: &str, op: &str, body: serde_json::Value) {
        self.pub_client
            .publish(
                format!("lorastream/farm/devices/{device}/down/{op}"),
                rumqttc::QoS::AtLeastOnce,
                false,
                body.to_string(),
            )
            .await
            .unwrap();
    }

    async fn event(&mut self, device: &str, kind: &str, n: usize) -> Vec<serde_json::Value> {
        let suffix = format!("/devices/{device}/down/{kind}");
        self.sub.wait_for(n, T, |t, _| t.ends_with(&suffix)).await
    }

    async fn uplink(
        &mut self,
        d: &mut SimDevice,
        confirmed: bool,
        ack: bool,
        mac: &[MacCmd],
        tmst: u32,
    ) {
        let p = d.uplink_with(Some(1), b"u", confirmed, ack, mac).unwrap();
        self.fwd
            .send(&[(
                &p,
                Radio {
                    tmst,
                    freq_mhz: 868.3,
                    sf: 9,
                    ..Radio::default()
                },
            )])
            .await
            .unwrap();
    }

    async fn pull_resp(&self) -> PullResp {
        self.fwd.pull_resp(T).await.expect("no PULL_RESP")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_is_sent_in_rx1_and_decrypts_with_the_device_keys() {
    for kind in broker_kinds() {
        let mut d = device(1);
        let mut r = rig(kind, &device_toml(&d, "farm"), "").await;
        r.push("dev-1", "push", serde_json::json!({"downlinks":[{"f_port":7,"frm_payload":b64(b"hello"),"priority":"HIGH"},{"f_port":8,"frm_payload":b64(b"second")}]})).await;
        let q = r.event("dev-1", "queued", 2).await;
        assert_eq!(q.len(), 2, "{kind:?}");
        assert_eq!(q[0]["downlink_queued"]["f_port"], 7);

        r.uplink(&mut d, false, false, &[], 4_294_000_000).await;
        let pr = r.pull_resp().await;
        let t = &pr.txpk;
        // RX1: uplink tmst + 1 s (u32 wrap), same frequency and data rate (EU868, offset 0).
        assert_eq!(t["tmst"], 4_294_000_000u32.wrapping_add(1_000_000));
        assert_eq!(t["freq"], 868.3);
        assert_eq!(t["datr"], "SF9BW125");
        assert_eq!(t["codr"], "4/5");
        assert_eq!(t["ipol"], true);
        assert_eq!(t["powe"], 16, "EU868 MaxEIRP (RP002)");
        assert_eq!(t["modu"], "LORA");
        let dl = d.open(&pr.phy, 0).unwrap();
        assert!(dl.mic_ok);
        assert_eq!(dl.f_cnt16, 0);
        assert_eq!(dl.opened.f_port, Some(7));
        assert_eq!(dl.opened.frm_payload, b"hello");
        assert!(dl.f_pending, "a second downlink is queued");
        r.fwd.tx_ack(pr.token, None).await.unwrap();
        // Arrival → PULL_RESP (dedup window of 100 ms included) is far inside RX1's 1 s.
        let (last_us, _) = r.daemon.metrics().schedule_latency_us();
        assert!(
            (100_000..600_000).contains(&last_us),
            "scheduling latency {last_us} µs"
        );
        let sent = r.event("dev-1", "sent", 1).await;
        assert_eq!(sent[0]["downlink_sent"]["rx_window"], 1);
        assert_eq!(sent[0]["downlink_sent"]["f_cnt"], 0);

        // The next uplink takes the second one, with FCntDown 1.
        r.uplink(&mut d, false, false, &[], 5_000_000).await;
        let pr = r.pull_resp().await;
        let dl = d.open(&pr.phy, 1).unwrap();
        assert!(dl.mic_ok);
        assert_eq!(dl.opened.frm_payload, b"second");
        assert!(!dl.f_pending);
        r.fwd.tx_ack(pr.token, None).await.unwrap();
        r.event("dev-1", "sent", 2).await;
        // Nothing left: the next uplink gets no downlink.
        r.uplink(&mut d, false, false, &[], 6_000_000).await;
        assert!(r.fwd.pull_resp(Duration::from_millis(700)).await.is_none());
        r.daemon.stop().await;
        drop(r.broker);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_rx1_is_retried_in_rx2_then_kept_for_the_next_uplink() {
    let mut d = device(1);
    let mut r = rig(BrokerKind::Embedded, &device_toml(&d, "farm"), "").await;
    r.push(
        "dev-1",
        "push",
        serde_json::json!({"downlinks":[{"f_port":3,"frm_payload":b64(b"x")}]}),
    )
    .await;
    r.event("dev-1", "queued", 1).await;
    r.uplink(&mut d, false, false, &[], 1_000_000).await;
    let rx1 = r.pull_resp().await;
    assert_eq!(rx1.txpk["tmst"], 2_000_000);
    r.fwd.tx_ack(rx1.token, Some("TOO_LATE")).await.unwrap();
    let rx2 = r.pull_resp().await;
    assert_eq!(rx2.txpk["tmst"], 3_000_000);
    assert_eq!(rx2.txpk["freq"], 869.525);
    assert_eq!(rx2.txpk["datr"], "SF12BW125");
    assert_eq!(rx2.phy, rx1.phy, "same frame, same FCntDown");
    r.fwd
        .tx_ack(rx2.token, Some("COLLISION_PACKET"))
        .await
        .unwrap();
    // Kept: the next uplink carries it again, with a new FCntDown.
    r.uplink(&mut d, false, false, &[], 9_000_000).await;
    let again = r.pull_resp().await;
    let dl = d.open(&again.phy, 1).unwrap();
    assert!(dl.mic_ok);
    assert_eq!(dl.opened.frm_payload, b"x");
    r.fwd.tx_ack(again.token, None).await.unwrap();
    r.event("dev-1", "sent", 1).await;
    r.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class_c_is_sent_at_once_in_rx2() {
    let mut d = device(1);
    let toml = device_toml(&d, "farm").replace("[[device]]\n", "[[device]]\nclass = \"C\"\n");
    let mut r = rig(BrokerKind::Embedded, &toml, "").await;
    // Heard once, so the scheduler knows which gateway reaches it.
    r.uplink(&mut d, false, false, &[], 1_000).await;
    assert!(wait_until(T, || r.daemon.metrics().uplinks("accepted") == 1).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    r.push(
        "dev-1",
        "push",
        serde_json::json!({"downlinks":[{"f_port":9,"frm_payload":b64(b"now")}]}),
    )
    .await;
    let pr = r.pull_resp().await;
    assert_eq!(pr.txpk["imme"], true);
    assert_eq!(pr.txpk["freq"], 869.525);
    assert_eq!(pr.txpk["datr"], "SF12BW125");
    assert_eq!(d.open(&pr.phy, 0).unwrap().opened.frm_payload, b"now");
    r.fwd.tx_ack(pr.token, None).await.unwrap();
    let s = r.event("dev-1", "sent", 1).await;
    assert_eq!(s[0]["downlink_sent"]["class"], "C");
    r.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_uplink_acked_and_confirmed_downlink_ack_and_nack() {
    let mut d = device(1);
    let mut r = rig(BrokerKind::Embedded, &device_toml(&d, "farm"), "").await;
    // A confirmed uplink with nothing queued: an empty frame with ACK, no FPort.
    r.uplink(&mut d, true, false, &[], 1_000_000).await;
    let pr = r.pull_resp().await;
    let dl = d.open(&pr.phy, 0).unwrap();
    assert!(dl.mic_ok && dl.ack);
    assert_eq!(dl.opened.f_port, None);
    r.fwd.tx_ack(pr.token, None).await.unwrap();

    // A confirmed downlink, acknowledged by the device's next uplink.
    r.push(
        "dev-1",
        "push",
        serde_json::json!({"downlinks":[{"f_port":2,"frm_payload":b64(b"c1"),"confirmed":true}]}),
    )
    .await;
    r.event("dev-1", "queued", 1).await;
    r.uplink(&mut d, false, false, &[], 3_000_000).await;
    let pr = r.pull_resp().await;
    let dl = d.open(&pr.phy, 1).unwrap();
    assert!(dl.confirmed);
    r.fwd.tx_ack(pr.token, None).await.unwrap();
    r.event("dev-1", "sent", 1).await;
    r.uplink(&mut d, false, true, &[], 5_000_000).await;
    let ack = r.event("dev-1", "ack", 1).await;
    assert_eq!(ack[0]["downlink_ack"]["f_port"], 2);
    assert!(
        r.fwd.pull_resp(Duration::from_millis(700)).await.is_none(),
        "acknowledged: not sent again"
    );

    // Another one the device never acknowledges: sent 3 times, then nack.
    r.push(
        "dev-1",
        "push",
        serde_json::json!({"downlinks":[{"f_port":2,"frm_payload":b64(b"c2"),"confirmed":true}]}),
    )
    .await;
    r.event("dev-1", "queued", 2).await;
    let mut tmst = 7_000_000;
    for attempt in 0..3u32 {
        r.uplink(&mut d, false, false, &[], tmst).await;
        let pr = r.pull_resp().await;
        let dl = d.open(&pr.phy, 2 + attempt).unwrap();
        assert!(dl.mic_ok, "attempt {attempt} uses FCntDown {}", 2 + attempt);
        assert_eq!(dl.opened.frm_payload, b"c2");
        r.fwd.tx_ack(pr.token, None).await.unwrap();
        r.event("dev-1", "sent", 2 + attempt as usize).await;
        tmst += 2_000_000;
    }
    r.uplink(&mut d, false, false, &[], tmst).await;
    let nack = r.event("dev-1", "nack", 1).await;
    assert_eq!(nack[0]["downlink_nack"]["attempts"], 3);
    r.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_fail_with_reasons_and_scope_is_enforced() {
    let d1 = device(1);
    let mut d2 = device(2);
    let devices = format!("{}{}", device_toml(&d1, "farm"), device_toml(&d2, "other"));
    let mut r = rig(BrokerKind::Embedded, &devices, "application = \"farm\"").await;
    r.pub_client
        .publish(
            "lorastream/farm/devices/dev-1/down/push",
            rumqttc::QoS::AtLeastOnce,
            false,
            "{not json",
        )
        .await
        .unwrap();
    let f = r.event("dev-1", "failed", 1).await;
    assert!(f[0]["downlink_failed"]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("invalid downlink JSON"));
    r.push(
        "dev-1",
        "push",
        serde_json::json!({"downlinks":[{"f_port":0,"frm_payload":"AA=="}]}),
    )
    .await;
    let f = r.event("dev-1", "failed", 2).await;
    assert!(f[1]["downlink_failed"]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("f_port 0"));
    // dev-2 belongs to "other": outside this stream's scope (application = "farm").
    r.pub_client
        .publish(
            "lorastream/other/devices/dev-2/down/push",
            rumqttc::QoS::AtLeastOnce,
            false,
            serde_json::json!({"downlinks":[{"f_port":1}]}).to_string(),
        )
        .await
        .unwrap();
    let f = r
        .sub
        .wait_for(1, T, |t, _| {
            t == "lorastream/other/devices/dev-2/down/failed"
        })
        .await;
    assert!(f[0]["downlink_failed"]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("outside the scope"));
    // Nothing was queued for dev-2.
    r.uplink(&mut d2, false, false, &[], 1_000_000).await;
    assert!(r.fwd.pull_resp(Duration::from_millis(700)).await.is_none());
    r.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_check_and_device_time_are_answered() {
    let mut d = device(1);
    let mut r = rig(BrokerKind::Embedded, &device_toml(&d, "farm"), "").await;
    let req = [
        MacCmd {
            cid: 0x02,
            payload: vec![],
        },
        MacCmd {
            cid: 0x0D,
            payload: vec![],
        },
    ];
    r.uplink(&mut d, false, false, &req, 1_000_000).await;
    let pr = r.pull_resp().await;
    let dl = d.open(&pr.phy, 0).unwrap();
    assert!(dl.mic_ok);
    let fopts = &dl.opened.f_opts;
    assert_eq!(fopts[0], 0x02, "LinkCheckAns first: {fopts:?}");
    assert_eq!(
        fopts[1],
        (9.5f32 + 12.5) as u8,
        "margin = SNR 9.5 - (-12.5) for SF9"
    );
    assert_eq!(fopts[2], 1, "one gateway");
    assert_eq!(fopts[3], 0x0D);
    let gps = u32::from_le_bytes([fopts[4], fopts[5], fopts[6], fopts[7]]) as i64;
    let now_gps = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        - 315_964_800
        + 18;
    assert!(
        (now_gps - gps).abs() < 5,
        "DeviceTimeAns is GPS time: {gps} vs {now_gps}"
    );
    r.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcnt_down_is_never_reused_across_restarts() {
    install_crypto();
    let broker = support::broker::TestBroker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(1);
    let cfg = config(
        dir.path(),
        &format!(
            "[[application]]\nid = \"farm\"\n\n{}[[stream]]\nname = \"cloud\"\nserver = \"{}\"\n",
            device_toml(&d, "farm"),
            broker.url()
        ),
    );
    let mut used = Vec::new();
    for round in 0..3u32 {
        let daemon = Daemon::start(&cfg).await.unwrap();
        let mut f = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(1))
            .await
            .unwrap();
        f.pull().await.unwrap();
        assert!(wait_until(T, || daemon.gateways().len() == 1).await);
        // Confirmed uplinks force a downlink (the ACK) each time.
        let p = d.uplink_with(Some(1), b"c", true, false, &[]).unwrap();
        f.send(&[(
            &p,
            Radio {
                tmst: 1_000 * round,
                ..Radio::default()
            },
        )])
        .await
        .unwrap();
        let pr = f.pull_resp(T).await.expect("ACK downlink");
        // Never answer the TX_ACK and stop at once: the "crash between PULL_RESP and the rest".
        let fcnt16 = (0..16u32)
            .find(|c| d.open(&pr.phy, *c).map(|o| o.mic_ok).unwrap_or(false))
            .expect("a small FCntDown");
        used.push(fcnt16);
        daemon.stop().await;
    }
    assert_eq!(
        used,
        vec![0, 1, 2],
        "each run continues after the last FCntDown used"
    );
}
