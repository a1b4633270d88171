//! Downlinks end to end: MQTT `down/push` → store → RX window → PULL_RESP on a real UDP socket,
//! decrypted by the test with the device keys; TX_ACK outcomes; class C; confirmed traffic;
//! MAC answers; FCntDown across restarts.

mod support;

use base64::Engine;
use lorastream::config::Region;
use lorastream::daemon::Daemon;
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
    rig_in(kind, devices, stream_extra, Region::EU868).await
}

async fn rig_in(kind: BrokerKind, devices: &str, stream_extra: &str, region: Region) -> Rig {
    install_crypto();
    let broker = Broker::start(kind).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(
        dir.path(),
        &format!(
            "[[application]]\nid = \"farm\"\n\n[[application]]\nid = \"other\"\n\n{devices}[[stream]]\nname = \"cloud\"\nserver = \"{}\"\n{stream_extra}\n",
            broker.url()
        ),
    );
    cfg.gateway.region = region;
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

    async fn uplink_on(&mut self, d: &mut SimDevice, confirmed: bool, radio: Radio) {
        let p = d.uplink_with(Some(1), b"u", confirmed, false, &[]).unwrap();
        self.fwd.send(&[(&p, radio)]).await.unwrap();
    }

    /// An empty TX_ACK (no JSON body): success, as old forwarders send it.
    async fn empty_tx_ack(&self, token: u16) {
        let t = token.to_be_bytes();
        let mut v = vec![2, t[0], t[1], 5];
        v.extend_from_slice(&self.fwd.gateway.0);
        self.fwd.send_raw(&v).await.unwrap();
    }

    /// The next PULL_RESP, checked as the reference forwarder would read it: no `null`
    /// member, LoRa's 8-symbol preamble.
    async fn pull_resp(&self) -> PullResp {
        let pr = self.fwd.pull_resp(T).await.expect("no PULL_RESP");
        assert!(!pr.json.contains("null"), "{}", pr.json);
        assert_eq!(pr.preamble(), 8, "{}", pr.json);
        pr
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
        // The scheduler has seen that uplink and found the queue empty (it remembers that, to
        // skip the next opportunities quickly): a downlink queued now still goes out with the
        // next uplink.
        assert!(wait_until(T, || r.daemon.metrics().downlinks("opportunity") >= 3).await);
        r.push(
            "dev-1",
            "push",
            serde_json::json!({"downlinks":[{"f_port":9,"frm_payload":b64(b"third")}]}),
        )
        .await;
        r.event("dev-1", "queued", 3).await;
        r.uplink(&mut d, false, false, &[], 7_000_000).await;
        let pr = r.pull_resp().await;
        let dl = d.open(&pr.phy, 2).unwrap();
        assert!(dl.mic_ok);
        assert_eq!(dl.opened.f_port, Some(9));
        assert_eq!(dl.opened.frm_payload, b"third");
        r.daemon.stop().await;
        drop(r.broker);
    }
}

/// Downlinks published back to back on one connection reach the device queues in publish order
/// (MQTT 3.1.1 §4.6): a `replace` followed by two `push`es leaves exactly the replacement and
/// the pushes, in that order, for every device, whatever the scheduling of the daemon's tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downlinks_published_back_to_back_are_queued_in_publish_order() {
    for kind in broker_kinds() {
        let mut devs: Vec<SimDevice> = (1..=6).map(device).collect();
        let tomls: String = devs.iter().map(|d| device_toml(d, "farm")).collect();
        let mut r = rig(kind, &tomls, "").await;
        let body = |p: &[u8]| serde_json::json!({"downlinks":[{"f_port":1,"frm_payload":b64(p)}]});
        for d in &devs {
            r.push(&d.id, "push", body(b"X")).await;
        }
        for d in &devs {
            r.push(&d.id, "replace", body(b"A")).await;
            r.push(&d.id, "push", body(b"B")).await;
            r.push(&d.id, "push", body(b"C")).await;
        }
        let queued = r
            .sub
            .wait_for(4 * devs.len(), T, |t, _| t.ends_with("/down/queued"))
            .await;
        assert_eq!(queued.len(), 4 * devs.len(), "{kind:?}");
        let mut tmst = 1_000_000u32;
        for d in devs.iter_mut() {
            let mut got = Vec::new();
            for n in 0..3u32 {
                tmst += 3_000_000;
                r.uplink(d, false, false, &[], tmst).await;
                let pr = r.pull_resp().await;
                let dl = d.open(&pr.phy, n).unwrap();
                assert!(dl.mic_ok, "{kind:?} {}", d.id);
                got.push(String::from_utf8_lossy(&dl.opened.frm_payload).into_owned());
                r.fwd.tx_ack(pr.token, None).await.unwrap();
            }
            assert_eq!(got, ["A", "B", "C"], "{kind:?} {}", d.id);
        }
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

    // A confirmed class C downlink: sent at once; an uplink without the ACK bit makes it go out
    // again at once (new FCntDown); the next uplink's ACK completes it.
    r.push(
        "dev-1",
        "push",
        serde_json::json!({"downlinks":[{"f_port":9,"frm_payload":b64(b"conf"),"confirmed":true}]}),
    )
    .await;
    let pr = r.pull_resp().await;
    assert_eq!(pr.txpk["imme"], true);
    let dl = d.open(&pr.phy, 1).unwrap();
    assert!(dl.mic_ok && dl.confirmed);
    r.fwd.tx_ack(pr.token, None).await.unwrap();
    r.event("dev-1", "sent", 2).await;
    r.uplink(&mut d, false, false, &[], 5_000_000).await;
    let again = r.pull_resp().await;
    assert_eq!(again.txpk["imme"], true);
    let dl = d.open(&again.phy, 2).unwrap();
    assert!(dl.mic_ok, "resent with FCntDown 2");
    assert_eq!(dl.opened.frm_payload, b"conf");
    r.fwd.tx_ack(again.token, None).await.unwrap();
    r.event("dev-1", "sent", 3).await;
    r.uplink(&mut d, false, true, &[], 9_000_000).await;
    let ack = r.event("dev-1", "ack", 1).await;
    assert_eq!(ack[0]["downlink_ack"]["attempts"], 2);
    assert!(r.fwd.pull_resp(Duration::from_millis(700)).await.is_none());
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
async fn a_tts_request_naming_the_topics_device_is_sent() {
    let mut d = device(1);
    let mut r = rig(BrokerKind::Embedded, &device_toml(&d, "farm"), "").await;
    // As The Things Stack's own clients send it: ids in the body, items with extra fields.
    r.push(
        "dev-1",
        "push",
        serde_json::json!({
            "end_device_ids": {
                "device_id": "dev-1",
                "application_ids": {"application_id": "farm"},
                "dev_eui": "70b3d57ed0000001",
                "join_eui": "0000000000000000"
            },
            "downlinks": [{"f_port": 5, "frm_payload": b64(b"tts"), "priority": "NORMAL",
                           "correlation_ids": ["as:downlink:1"]}]
        }),
    )
    .await;
    let q = r.event("dev-1", "queued", 1).await;
    assert_eq!(q[0]["downlink_queued"]["f_port"], 5);
    r.uplink(&mut d, false, false, &[], 1_000_000).await;
    let pr = r.pull_resp().await;
    let dl = d.open(&pr.phy, 0).unwrap();
    assert!(dl.mic_ok);
    assert_eq!(dl.opened.frm_payload, b"tts");
    r.fwd.tx_ack(pr.token, None).await.unwrap();
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
    // An item with nothing to send is refused, not sent empty.
    r.push(
        "dev-1",
        "push",
        serde_json::json!({"downlinks":[{"f_port":1}]}),
    )
    .await;
    let f = r.event("dev-1", "failed", 3).await;
    assert!(f[2]["downlink_failed"]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("neither frm_payload nor decoded_payload"));
    // A TTS body naming another device than the topic's.
    r.push(
        "dev-1",
        "push",
        serde_json::json!({"end_device_ids":{"device_id":"dev-2","application_ids":{"application_id":"farm"}},
            "downlinks":[{"f_port":1,"frm_payload":"AQ=="}]}),
    )
    .await;
    let f = r.event("dev-1", "failed", 4).await;
    let msg = f[3]["downlink_failed"]["error"]["message"]
        .as_str()
        .unwrap();
    assert!(
        msg.contains("end_device_ids names device_id \"dev-2\""),
        "{msg}"
    );
    r.push(
        "dev-1",
        "push",
        serde_json::json!({"end_device_ids":{"dev_eui":"70B3D57ED0000002"},
            "downlinks":[{"f_port":1,"frm_payload":"AQ=="}]}),
    )
    .await;
    let f = r.event("dev-1", "failed", 5).await;
    let msg = f[4]["downlink_failed"]["error"]["message"]
        .as_str()
        .unwrap();
    assert!(msg.contains("dev_eui 70B3D57ED0000002"), "{msg}");
    // dev-2 belongs to "other": outside this stream's scope (application = "farm").
    r.pub_client
        .publish(
            "lorastream/other/devices/dev-2/down/push",
            rumqttc::QoS::AtLeastOnce,
            false,
            serde_json::json!({"downlinks":[{"f_port":1,"frm_payload":"AQ=="}]}).to_string(),
        )
        .await
        .unwrap();
    // Answered like an unknown device (counted): no event on this stream would name dev-2
    // or show its DevEUI, since the stream is not allowed to see that device.
    let m = r.daemon.metrics().clone();
    assert!(wait_until(T, || m.downlinks("out_of_scope") == 1).await);
    r.sub.drain_for(Duration::from_millis(300)).await;
    let leaked: Vec<&String> = r
        .sub
        .seen
        .iter()
        .map(|(t, _)| t)
        // (the test's own request on down/push aside)
        .filter(|t| t.contains("dev-2") && !t.ends_with("/down/push"))
        .collect();
    assert!(leaked.is_empty(), "{leaked:?}");
    // (dev-1's refused request above named that DevEUI itself, on dev-1's topics)
    assert!(!r
        .sub
        .seen
        .iter()
        .filter(|(t, _)| !t.contains("/devices/dev-1/"))
        .any(|(_, p)| String::from_utf8_lossy(p).contains("70B3D57ED0000002")));
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
        used.push(fcnt_of(&d, &pr.phy));
        daemon.stop().await;
    }
    assert_never_reused(&used);
}

/// A start reserves the first FCntDown block of every known session in one commit, so the first
/// downlink of each device needs no commit of its own (issue 16: the network's MAC commands go
/// to every device early, and those per-device fsyncs dominated the cost of an uplink); a stop
/// gives back what was not used, so clean restarts continue the counters without a gap, and
/// none is ever reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_reserves_every_sessions_fcnt_down_in_one_commit() {
    install_crypto();
    let broker = support::broker::TestBroker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut devices: Vec<SimDevice> = (1..=4).map(device).collect();
    let cfg =
        config(
            dir.path(),
            &format!(
            "[[application]]\nid = \"farm\"\n\n{}[[stream]]\nname = \"cloud\"\nserver = \"{}\"\n",
            devices.iter().map(|d| device_toml(d, "farm")).collect::<String>(),
            broker.url()
        ),
        );
    let mut used: Vec<Vec<u32>> = vec![Vec::new(); devices.len()];
    for round in 0..3u32 {
        let daemon = Daemon::start(&cfg).await.unwrap();
        let mut f = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(1))
            .await
            .unwrap();
        f.pull().await.unwrap();
        assert!(wait_until(T, || daemon.gateways().len() == 1).await);
        for (i, d) in devices.iter_mut().enumerate() {
            // A confirmed uplink forces a downlink (the ACK).
            let p = d.uplink_with(Some(1), b"c", true, false, &[]).unwrap();
            let tmst = 10_000_000 * round + 2_000_000 * i as u32;
            f.send(&[(
                &p,
                Radio {
                    tmst,
                    ..Radio::default()
                },
            )])
            .await
            .unwrap();
            let pr = f.pull_resp(T).await.expect("ACK downlink");
            let c = fcnt_of(d, &pr.phy);
            assert!(d.open(&pr.phy, c).unwrap().ack);
            used[i].push(c);
            f.tx_ack(pr.token, None).await.unwrap();
        }
        let m = daemon.metrics();
        assert_eq!(
            m.downlinks("f_cnt_down_reserved_at_start"),
            1,
            "round {round}: one commit for every device"
        );
        assert_eq!(
            m.downlinks("f_cnt_down_saved"),
            0,
            "round {round}: the first downlinks needed no commit of their own"
        );
        daemon.stop().await;
    }
    for u in &used {
        assert_never_reused(u);
        assert_eq!(
            u,
            &[0, 1, 2],
            "a clean stop gives back the unused reservation"
        );
    }
}

/// FCntDowns of successive runs: each above the last (never reused), and at most 16 above it
/// (the counter is persisted 16 ahead: a restart skips what the last run had not used).
fn assert_never_reused(used: &[u32]) {
    assert_eq!(used[0], 0);
    assert!(
        used.windows(2).all(|w| w[1] > w[0] && w[1] - w[0] <= 16),
        "FCntDowns across restarts: {used:?}"
    );
}

/// The FCntDown a downlink was built with (the device knows it is small here).
fn fcnt_of(d: &SimDevice, phy: &[u8]) -> u32 {
    (0..64u32)
        .find(|c| d.open(phy, *c).map(|o| o.mic_ok).unwrap_or(false))
        .expect("a downlink for this device with a small FCntDown")
}

fn error_message(v: &serde_json::Value) -> String {
    v["downlink_failed"]["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_queue_limit_and_payload_size_per_data_rate() {
    use lorastream::downlink::MAX_QUEUE;
    let mut d = device(1);
    let mut r = rig(BrokerKind::Embedded, &device_toml(&d, "farm"), "").await;
    // `replace` drops what was queued.
    r.push(
        "dev-1",
        "push",
        serde_json::json!({"downlinks":[{"f_port":1,"frm_payload":b64(b"a")},{"f_port":1,"frm_payload":b64(b"b")}]}),
    )
    .await;
    r.event("dev-1", "queued", 2).await;
    r.push(
        "dev-1",
        "replace",
        serde_json::json!({"downlinks":[{"f_port":4,"frm_payload":b64(b"c")}]}),
    )
    .await;
    r.event("dev-1", "queued", 3).await;
    r.uplink(&mut d, false, false, &[], 1_000_000).await;
    let pr = r.pull_resp().await;
    let dl = d.open(&pr.phy, 0).unwrap();
    assert_eq!(dl.opened.frm_payload, b"c");
    assert_eq!(dl.opened.f_port, Some(4));
    assert!(!dl.f_pending, "a and b were replaced");
    r.fwd.tx_ack(pr.token, None).await.unwrap();
    r.event("dev-1", "sent", 1).await;

    // The queue holds MAX_QUEUE downlinks; one more fails.
    let many: Vec<serde_json::Value> = (0..MAX_QUEUE)
        .map(|i| serde_json::json!({"f_port":1,"frm_payload":b64(&[i as u8])}))
        .collect();
    r.push("dev-1", "push", serde_json::json!({ "downlinks": many }))
        .await;
    r.event("dev-1", "queued", 3 + MAX_QUEUE).await;
    r.push(
        "dev-1",
        "push",
        serde_json::json!({"downlinks":[{"f_port":1,"frm_payload":b64(b"one too many")}]}),
    )
    .await;
    let f = r.event("dev-1", "failed", 1).await;
    assert!(
        error_message(&f[0]).contains(&format!("queue full ({MAX_QUEUE} queued")),
        "{}",
        f[0]
    );

    // 60 bytes for a device at SF12: DR0 carries 51 in RX1 and RX2 (EU868) → failed.
    r.push(
        "dev-1",
        "replace",
        serde_json::json!({"downlinks":[{"f_port":1,"frm_payload":b64(&[7u8; 60])}]}),
    )
    .await;
    r.event("dev-1", "queued", 4 + MAX_QUEUE).await;
    r.uplink_on(
        &mut d,
        false,
        Radio {
            tmst: 3_000_000,
            sf: 12,
            ..Radio::default()
        },
    )
    .await;
    let f = r.event("dev-1", "failed", 2).await;
    let msg = error_message(&f[1]);
    assert!(
        msg.contains("60 bytes") && msg.contains("at most 51"),
        "{msg}"
    );
    assert!(r.fwd.pull_resp(Duration::from_millis(700)).await.is_none());

    // 100 bytes at SF9: RX1 (DR3) carries 115, RX2 (DR0) only 51: sent in RX1 without a
    // fallback; refused there, it waits for the next uplink.
    r.push(
        "dev-1",
        "push",
        serde_json::json!({"downlinks":[{"f_port":1,"frm_payload":b64(&[9u8; 100])}]}),
    )
    .await;
    r.event("dev-1", "queued", 5 + MAX_QUEUE).await;
    r.uplink(&mut d, false, false, &[], 5_000_000).await;
    let rx1 = r.pull_resp().await;
    assert_eq!(rx1.txpk["tmst"], 6_000_000);
    assert_eq!(rx1.txpk["datr"], "SF9BW125");
    let first = fcnt_of(&d, &rx1.phy);
    r.fwd.tx_ack(rx1.token, Some("TOO_LATE")).await.unwrap();
    assert!(
        r.fwd.pull_resp(Duration::from_millis(700)).await.is_none(),
        "RX2 (DR0) cannot carry 100 bytes"
    );
    r.uplink(&mut d, false, false, &[], 9_000_000).await;
    let again = r.pull_resp().await;
    let dl = d.open(&again.phy, first + 1).unwrap();
    assert!(dl.mic_ok, "a new FCntDown");
    assert_eq!(dl.opened.frm_payload, vec![9u8; 100]);
    r.fwd.tx_ack(again.token, None).await.unwrap();
    let sent = r.event("dev-1", "sent", 2).await;
    assert_eq!(sent[1]["downlink_sent"]["rx_window"], 1);
    r.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tx_ack_refusal_retries_in_rx2_and_an_empty_tx_ack_is_success() {
    let mut d = device(1);
    let mut r = rig(BrokerKind::Embedded, &device_toml(&d, "farm"), "").await;
    let mut tmst = 1_000_000u32;
    let errors = [
        "TOO_EARLY",
        "COLLISION_BEACON",
        "COLLISION_PACKET",
        "TX_FREQ",
        "TX_POWER",
        "GPS_UNLOCKED",
    ];
    let mut last_token = 0;
    for (i, err) in errors.iter().enumerate() {
        r.push(
            "dev-1",
            "push",
            serde_json::json!({"downlinks":[{"f_port":3,"frm_payload":b64(err.as_bytes())}]}),
        )
        .await;
        r.event("dev-1", "queued", i + 1).await;
        r.uplink(&mut d, false, false, &[], tmst).await;
        let rx1 = r.pull_resp().await;
        assert_eq!(rx1.txpk["tmst"], tmst + 1_000_000);
        r.fwd.tx_ack(rx1.token, Some(err)).await.unwrap();
        let rx2 = r.pull_resp().await;
        assert_eq!(rx2.txpk["tmst"], tmst + 2_000_000, "{err}: RX2");
        assert_eq!(rx2.txpk["freq"], 869.525);
        assert_eq!(rx2.txpk["datr"], "SF12BW125");
        assert_eq!(rx2.txpk["powe"], 27, "869.4-869.65 MHz allows 500 mW");
        assert_eq!(rx2.phy, rx1.phy, "the same frame and FCntDown");
        // An empty TX_ACK (no JSON) means sent.
        r.empty_tx_ack(rx2.token).await;
        let sent = r.event("dev-1", "sent", i + 1).await;
        assert_eq!(sent[i]["downlink_sent"]["rx_window"], 2, "{err}");
        assert_eq!(sent[i]["downlink_sent"]["frm_payload"], b64(err.as_bytes()));
        tmst += 3_000_000;
        last_token = rx2.token;
    }

    // A TX_ACK nobody waits for is counted and otherwise ignored (at the socket: only the
    // answer to a PULL_RESP we sent reaches the scheduler).
    r.fwd
        .tx_ack(last_token.wrapping_add(1000), Some("TOO_LATE"))
        .await
        .unwrap();
    assert!(
        wait_until(T, || r.daemon.metrics().encode().contains(
            "lorastream_udp_errors_total{reason=\"tx_ack_unexpected\"} 1"
        ))
        .await
    );

    // A TX_ACK with the right token from another gateway is not the answer either.
    r.push(
        "dev-1",
        "push",
        serde_json::json!({"downlinks":[{"f_port":3,"frm_payload":b64(b"mine")}]}),
    )
    .await;
    r.event("dev-1", "queued", errors.len() + 1).await;
    r.uplink(&mut d, false, false, &[], tmst).await;
    let rx1 = r.pull_resp().await;
    let stranger = Forwarder::connect(r.daemon.udp_addr(), Eui64::from_u64(0xD))
        .await
        .unwrap();
    stranger.tx_ack(rx1.token, Some("TOO_LATE")).await.unwrap();
    // Dropped at the socket (it answers no PULL_RESP sent to that forwarder): it never
    // reaches the scheduler.
    assert!(
        wait_until(T, || r.daemon.metrics().encode().contains(
            "lorastream_udp_errors_total{reason=\"tx_ack_unexpected\"} 2"
        ))
        .await
    );
    assert_eq!(r.daemon.metrics().downlinks("tx_ack_unknown_token"), 0);
    assert!(r.fwd.pull_resp(Duration::from_millis(300)).await.is_none());
    r.fwd.tx_ack(rx1.token, None).await.unwrap();
    let sent = r.event("dev-1", "sent", errors.len() + 1).await;
    assert_eq!(sent[errors.len()]["downlink_sent"]["rx_window"], 1);
    tmst += 3_000_000;

    // RX1 refused when RX2 is too close to reach the concentrator in time: no RX2 attempt,
    // the downlink waits for the next uplink. (The wait is the point of this check.)
    r.push(
        "dev-1",
        "push",
        serde_json::json!({"downlinks":[{"f_port":3,"frm_payload":b64(b"late")}]}),
    )
    .await;
    r.event("dev-1", "queued", errors.len() + 2).await;
    let sent_at = tokio::time::Instant::now();
    r.uplink(&mut d, false, false, &[], tmst).await;
    let rx1 = r.pull_resp().await;
    tokio::time::sleep_until(sent_at + Duration::from_millis(1_960)).await;
    r.fwd.tx_ack(rx1.token, Some("TOO_LATE")).await.unwrap();
    assert!(r.fwd.pull_resp(Duration::from_millis(500)).await.is_none());
    r.uplink(&mut d, false, false, &[], tmst + 5_000_000).await;
    let again = r.pull_resp().await;
    assert_eq!(again.txpk["tmst"], tmst + 6_000_000);
    let dl = d.open(&again.phy, fcnt_of(&d, &again.phy)).unwrap();
    assert_eq!(dl.opened.frm_payload, b"late");
    r.fwd.tx_ack(again.token, None).await.unwrap();
    r.event("dev-1", "sent", errors.len() + 2).await;
    r.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_through_the_best_gateway_that_has_a_downlink_path() {
    let mut d = device(1);
    let mut r = rig(BrokerKind::Embedded, &device_toml(&d, "farm"), "").await;
    let mut b = Forwarder::connect(r.daemon.udp_addr(), Eui64::from_u64(0xB))
        .await
        .unwrap();
    b.pull().await.unwrap();
    assert!(wait_until(T, || r.daemon.gateways().len() == 2).await);
    // Hears the device best, but has never sent PULL_DATA: no way to reach it.
    let mut c = Forwarder::connect(r.daemon.udp_addr(), Eui64::from_u64(0xC))
        .await
        .unwrap();
    r.push(
        "dev-1",
        "push",
        serde_json::json!({"downlinks":[{"f_port":5,"frm_payload":b64(b"via b")}]}),
    )
    .await;
    r.event("dev-1", "queued", 1).await;
    let phy = d.uplink_with(Some(1), b"u", false, false, &[]).unwrap();
    let radio = |tmst, snr| Radio {
        tmst,
        snr,
        ..Radio::default()
    };
    r.fwd.send(&[(&phy, radio(1_000_000, 2.0))]).await.unwrap();
    b.send(&[(&phy, radio(7_000_000, 8.0))]).await.unwrap();
    c.send(&[(&phy, radio(9_000_000, 12.0))]).await.unwrap();
    let pr = b.pull_resp(T).await.expect("PULL_RESP through gateway B");
    assert_eq!(pr.txpk["tmst"], 8_000_000, "B's own counter + 1 s");
    assert_eq!(d.open(&pr.phy, 0).unwrap().opened.frm_payload, b"via b");
    assert!(r.fwd.pull_resp(Duration::from_millis(500)).await.is_none());
    b.tx_ack(pr.token, None).await.unwrap();
    let sent = r.event("dev-1", "sent", 1).await;
    assert_eq!(
        sent[0]["downlink_sent"]["gateway_ids"]["eui"],
        "000000000000000B"
    );
    r.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn us915_rx1_channel_mapping_rx2_and_500khz_uplinks() {
    let mut d = device(1);
    let mut r = rig_in(
        BrokerKind::Embedded,
        &device_toml(&d, "farm"),
        "",
        Region::US915,
    )
    .await;
    r.push(
        "dev-1",
        "push",
        serde_json::json!({"downlinks":[{"f_port":1,"frm_payload":b64(b"us1")}]}),
    )
    .await;
    r.event("dev-1", "queued", 1).await;
    // Channel 9 (904.1 MHz) at DR0 (SF10/125 kHz) → downlink channel 1: 923.9 MHz, DR10.
    r.uplink_on(
        &mut d,
        false,
        Radio {
            freq_mhz: 904.1,
            sf: 10,
            tmst: 1_000_000,
            ..Radio::default()
        },
    )
    .await;
    let rx1 = r.pull_resp().await;
    assert_eq!(rx1.txpk["tmst"], 2_000_000);
    assert_eq!(rx1.txpk["freq"], 923.9);
    assert_eq!(rx1.txpk["datr"], "SF10BW500");
    assert_eq!(rx1.txpk["powe"], 26);
    assert_eq!(rx1.txpk["ipol"], true);
    let dl = d.open(&rx1.phy, 0).unwrap();
    assert!(dl.mic_ok);
    assert_eq!(dl.opened.frm_payload, b"us1");
    r.fwd.tx_ack(rx1.token, Some("TOO_LATE")).await.unwrap();
    // RX2: 923.3 MHz, DR8 (SF12/500 kHz).
    let rx2 = r.pull_resp().await;
    assert_eq!(rx2.txpk["tmst"], 3_000_000);
    assert_eq!(rx2.txpk["freq"], 923.3);
    assert_eq!(rx2.txpk["datr"], "SF12BW500");
    assert_eq!(rx2.phy, rx1.phy);
    r.fwd.tx_ack(rx2.token, None).await.unwrap();
    let sent = r.event("dev-1", "sent", 1).await;
    let s = &sent[0]["downlink_sent"];
    assert_eq!(s["frequency"], "923300000");
    assert_eq!(s["data_rate_index"], 8);
    assert_eq!(s["data_rate"]["lora"]["bandwidth"], 500_000);

    // Channel 64 (903.0 MHz, SF8/500 kHz = DR4) → 923.3 MHz, DR13 (SF7/500 kHz).
    r.push(
        "dev-1",
        "push",
        serde_json::json!({"downlinks":[{"f_port":1,"frm_payload":b64(b"us2")}]}),
    )
    .await;
    r.event("dev-1", "queued", 2).await;
    r.uplink_on(
        &mut d,
        false,
        Radio {
            freq_mhz: 903.0,
            sf: 8,
            bw_khz: 500,
            tmst: 5_000_000,
            ..Radio::default()
        },
    )
    .await;
    let rx1 = r.pull_resp().await;
    assert_eq!(rx1.txpk["freq"], 923.3);
    assert_eq!(rx1.txpk["datr"], "SF7BW500");
    assert_eq!(d.open(&rx1.phy, 1).unwrap().opened.frm_payload, b"us2");
    r.fwd.tx_ack(rx1.token, None).await.unwrap();
    r.event("dev-1", "sent", 2).await;

    // A frequency off the channel grid has no RX1: straight to RX2.
    r.push(
        "dev-1",
        "push",
        serde_json::json!({"downlinks":[{"f_port":1,"frm_payload":b64(b"us3")}]}),
    )
    .await;
    r.event("dev-1", "queued", 3).await;
    r.uplink_on(
        &mut d,
        false,
        Radio {
            freq_mhz: 902.35,
            sf: 10,
            tmst: 9_000_000,
            ..Radio::default()
        },
    )
    .await;
    let pr = r.pull_resp().await;
    assert_eq!(pr.txpk["tmst"], 11_000_000);
    assert_eq!(pr.txpk["datr"], "SF12BW500");
    r.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_mac_commands_devices_and_bad_base64_never_break_anything() {
    let mut d = device(1);
    let mut r = rig(BrokerKind::Embedded, &device_toml(&d, "farm"), "").await;
    // FOpts with a CID nobody knows, then LinkCheckReq: the uplink is still delivered; the
    // MAC commands after the unknown one cannot be read, so nothing is answered.
    let weird = [
        MacCmd {
            cid: 0x80,
            payload: vec![1, 2],
        },
        MacCmd {
            cid: 0x02,
            payload: vec![],
        },
    ];
    r.uplink(&mut d, false, false, &weird, 1_000_000).await;
    let up = r
        .sub
        .wait_for(1, T, |t, _| t == "lorastream/farm/devices/dev-1/up")
        .await;
    assert_eq!(up.len(), 1);
    assert!(r.fwd.pull_resp(Duration::from_millis(700)).await.is_none());
    // LinkCheckReq in an FPort 0 payload is answered (in FOpts).
    let link_check = [MacCmd {
        cid: 0x02,
        payload: vec![],
    }];
    let p = d
        .uplink_with(Some(0), &[], false, false, &link_check)
        .unwrap();
    r.fwd.send(&[(&p, Radio::default())]).await.unwrap();
    let pr = r.pull_resp().await;
    let dl = d.open(&pr.phy, 0).unwrap();
    assert!(dl.mic_ok);
    assert_eq!(dl.opened.f_opts.first(), Some(&0x02));
    // A downlink for a device nobody configured: counted, nothing else happens.
    r.pub_client
        .publish(
            "lorastream/farm/devices/ghost/down/push",
            rumqttc::QoS::AtLeastOnce,
            false,
            serde_json::json!({"downlinks":[{"f_port":1,"frm_payload":"AA=="}]}).to_string(),
        )
        .await
        .unwrap();
    assert!(wait_until(T, || r.daemon.metrics().downlinks("unknown_device") == 1).await);
    // Bad base64: failed with the reason; the next good one is queued.
    r.push(
        "dev-1",
        "push",
        serde_json::json!({"downlinks":[{"f_port":1,"frm_payload":"not base64!"}]}),
    )
    .await;
    let f = r.event("dev-1", "failed", 1).await;
    assert!(error_message(&f[0]).contains("not base64"), "{}", f[0]);
    r.push(
        "dev-1",
        "push",
        serde_json::json!({"downlinks":[{"f_port":1,"frm_payload":b64(b"ok")}]}),
    )
    .await;
    r.event("dev-1", "queued", 1).await;
    r.daemon.stop().await;
}

/// A real crash: the `lorastream` binary is killed with SIGKILL right after each PULL_RESP and
/// restarted; every downlink it sent must carry a new FCntDown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_right_after_a_pull_resp_never_reuses_an_fcnt_down() {
    let dir = tempfile::tempdir().unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let metrics_port = free_port();
    let closed_port = free_port();
    let mut d = device(1);
    let cfg = dir.path().join("lorastream.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nlisten = \"{udp}\"\ndedup_window_ms = 50\n\n[storage]\npath = {:?}\nflush_every_ms = 0\n\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n[[application]]\nid = \"farm\"\n\n{}[[stream]]\nname = \"cloud\"\nserver = \"mqtt://127.0.0.1:{closed_port}\"\n",
            dir.path().join("db").display().to_string(),
            device_toml(&d, "farm")
        ),
    )
    .unwrap();
    let mut used = Vec::new();
    for round in 0..3u32 {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lorastream"))
            .args(["run", "-c"])
            .arg(&cfg)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        assert!(
            wait_until(T, || std::net::TcpStream::connect((
                "127.0.0.1",
                metrics_port
            ))
            .is_ok())
            .await,
            "daemon did not start"
        );
        let mut f = Forwarder::connect(udp, Eui64::from_u64(1)).await.unwrap();
        // PULL_DATA until PULL_ACK: the downlink path is open.
        let mut buf = [0u8; 64];
        let mut open = false;
        for _ in 0..50 {
            f.pull().await.unwrap();
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(200), f.recv(&mut buf)).await
            {
                if n >= 4 && buf[3] == 4 {
                    open = true;
                    break;
                }
            }
        }
        assert!(open, "no PULL_ACK");
        // A confirmed uplink forces a downlink (its ACK).
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
        child.kill().unwrap(); // SIGKILL, no chance to flush anything
        child.wait().unwrap();
        let c = fcnt_of(&d, &pr.phy);
        assert!(d.open(&pr.phy, c).unwrap().ack);
        used.push(c);
    }
    assert_never_reused(&used);
}

/// Uplink arrival → PULL_RESP. RX1 opens 1 s after the uplink: processing (the dedup window
/// included) must stay far below. `cargo test --release --test downlink rx1_latency --
/// --nocapture` prints the numbers for docs/benchmarks.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rx1_latency_single_and_burst() {
    const DEVICES: u8 = 20;
    const ROUNDS: u32 = 10;
    let mut devs: Vec<SimDevice> = (1..=DEVICES).map(device).collect();
    let toml: String = devs.iter().map(|d| device_toml(d, "farm")).collect();
    let mut r = rig(BrokerKind::Embedded, &toml, "").await;
    let dedup = Duration::from_millis(100); // support::config
    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        v[((v.len() - 1) as f64 * p).round() as usize]
    };

    // One confirmed uplink at a time: its ACK is a downlink.
    let mut single = Vec::new();
    for round in 0..ROUNDS {
        for d in devs.iter_mut() {
            let p = d.uplink_with(Some(1), b"lat", true, false, &[]).unwrap();
            let t0 = tokio::time::Instant::now();
            r.fwd
                .send(&[(
                    &p,
                    Radio {
                        tmst: round * 10_000_000,
                        ..Radio::default()
                    },
                )])
                .await
                .unwrap();
            let pr = r.pull_resp().await;
            single.push(t0.elapsed());
            r.fwd.tx_ack(pr.token, None).await.unwrap();
        }
    }
    // Bursts: every device's confirmed uplink in one PUSH_DATA; the last PULL_RESP counts.
    let mut burst = Vec::new();
    for round in 0..ROUNDS {
        let frames: Vec<Vec<u8>> = devs
            .iter_mut()
            .map(|d| d.uplink_with(Some(1), b"lat", true, false, &[]).unwrap())
            .collect();
        let batch: Vec<(&[u8], Radio)> = frames
            .iter()
            .map(|f| {
                (
                    f.as_slice(),
                    Radio {
                        tmst: 200_000_000 + round * 10_000_000,
                        ..Radio::default()
                    },
                )
            })
            .collect();
        let t0 = tokio::time::Instant::now();
        r.fwd.send(&batch).await.unwrap();
        for _ in 0..DEVICES {
            let pr = r.pull_resp().await;
            r.fwd.tx_ack(pr.token, None).await.unwrap();
        }
        burst.push(t0.elapsed());
    }
    let (_, max_metric_us) = r.daemon.metrics().schedule_latency_us();
    let (p50, p99, max) = (
        pct(&mut single, 0.5),
        pct(&mut single, 0.99),
        pct(&mut single, 1.0),
    );
    let (b50, bmax) = (pct(&mut burst, 0.5), pct(&mut burst, 1.0));
    println!(
        "rx1 latency, uplink sent → PULL_RESP received (dedup window {} ms included): \
         single: n={} p50={:.1} ms p99={:.1} ms max={:.1} ms; \
         burst of {DEVICES} uplinks, last PULL_RESP: p50={:.1} ms max={:.1} ms; \
         daemon metric max={:.1} ms",
        dedup.as_millis(),
        single.len(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3,
        b50.as_secs_f64() * 1e3,
        bmax.as_secs_f64() * 1e3,
        max_metric_us as f64 / 1e3,
    );
    // RX1 is at 1 s, and the PULL_RESP must reach the concentrator before the 100 ms margin.
    assert!(p99 < Duration::from_millis(600), "p99 {p99:?}");
    assert!(bmax < Duration::from_millis(850), "burst {bmax:?}");
    r.daemon.stop().await;
}
