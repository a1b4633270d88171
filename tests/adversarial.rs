//! Findings of the adversarial probe (issue 11), each against the real daemon: real UDP from
//! simulated packet forwarders, a real MQTT broker (the embedded test broker; Debian's
//! mosquitto where the finding needs it, mandatory in CI), real files. Each test failed before
//! the fix it covers; the catalogue of what the daemon does with bad input is
//! docs/reliability.md.

mod faultkit;
mod support;

use base64::Engine;
use lorastream::daemon::Daemon;
use lorastream::model::{DownlinkItem, DownlinkOp, DownlinkRequest, Eui64, Record};
use lorastream::sim::{pull_data, push_data, Forwarder, Radio};
use std::time::{Duration, Instant};
use support::*;

const T: Duration = Duration::from_secs(20);

fn gw(n: u64) -> Eui64 {
    Eui64::from_u64(0xAA55_5A00_0000_0000 | n)
}

fn ups(b: &support::broker::TestBroker) -> Vec<serde_json::Value> {
    b.received()
        .into_iter()
        .filter(|(t, _)| t.ends_with("/up"))
        .filter_map(|(_, p)| serde_json::from_slice(&p).ok())
        .collect()
}

/// A counter of the Prometheus text (0 when absent).
fn counter(daemon: &Daemon, name: &str, label: &str) -> u64 {
    let text = daemon.metrics().encode();
    text.lines()
        .find(|l| l.starts_with(name) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

fn mqtt_stream(url: &str) -> String {
    format!("[[stream]]\nname = \"cloud\"\nserver = \"{url}\"\n")
}

// ---------------------------------------------------------------------------------------------
// 1. Poison records

/// One valid frame relayed through 1,500 gateway EUIs within the dedup window used to become
/// one uplink of 371 KB (over rumqttc's packet limit): the stream failed, reconnected and
/// retried it forever, and every later uplink waited behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_frame_relayed_by_many_gateways_stays_one_deliverable_uplink() {
    install_crypto();
    let broker = support::broker::TestBroker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(1);
    let mut cfg = config(
        dir.path(),
        &format!(
            "[[application]]\nid = \"farm\"\n\n{}{}",
            device_toml(&d, "farm"),
            mqtt_stream(&broker.url())
        ),
    );
    cfg.gateway.dedup_window_ms = 1500;
    cfg.gateway.max_gateways = 5000;
    let daemon = Daemon::start(&cfg).await.unwrap();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let phy = d.uplink(1, b"poison?", false).unwrap();
    for i in 0..1500u64 {
        let radio = Radio {
            snr: (i % 20) as f32 - 10.0,
            rssi: -120 + (i % 60) as i32,
            ..Radio::default()
        };
        let dg = push_data(gw(i), i as u16, &[(&phy, radio)]);
        sock.send_to(&dg, daemon.udp_addr()).await.unwrap();
        if i % 100 == 99 {
            // Paced, so that the kernel's receive buffer does not drop most of them.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    assert!(
        wait_until(T, || ups(&broker).len() == 1).await,
        "the relayed uplink never arrived"
    );
    // The next uplink is not stuck behind it.
    let mut f = Forwarder::connect(daemon.udp_addr(), gw(1)).await.unwrap();
    f.send(&[(&d.uplink(1, b"next", false).unwrap(), Radio::default())])
        .await
        .unwrap();
    assert!(wait_until(T, || ups(&broker).len() == 2).await);
    let first = &ups(&broker)[0];
    let rx = first["uplink_message"]["rx_metadata"].as_array().unwrap();
    assert_eq!(rx.len(), 32, "uplink::MAX_RX_METADATA");
    // The best by SNR were kept.
    assert!(
        rx.iter().all(|r| r["snr"].as_f64().unwrap() >= 8.0),
        "{rx:?}"
    );
    assert!(counter(&daemon, "lorastream_frames_total", "reception_over_cap") >= 1000);
    daemon.stop().await;
}

/// A record no destination can take (here: left in the store by an older version, with 3,000
/// receptions) is dropped as `too_large` instead of wedging the stream; the records behind it
/// are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_over_the_packet_limit_is_dropped_not_retried_forever() {
    use lorastream::store::{Entry, Store};
    install_crypto();
    let broker = support::broker::TestBroker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(1);
    let cfg = config(
        dir.path(),
        &format!(
            "[[application]]\nid = \"farm\"\n\n{}{}",
            device_toml(&d, "farm"),
            mqtt_stream(&broker.url())
        ),
    );
    {
        let streams = [("cloud".to_string(), cfg.storage.when_full)];
        let (store, _) = Store::open(&cfg.storage, &streams).unwrap();
        let mut u = lorastream::sim::fixtures::uplink(1, 0);
        (u.application, u.device) = ("farm".into(), "dev-1".into());
        u.rx = (0..3000)
            .map(|i| lorastream::sim::fixtures::rx(gw(i)))
            .collect();
        let big = Record::Uplink(u);
        let mut small = lorastream::sim::fixtures::uplink(1, 1);
        (small.application, small.device) = ("farm".into(), "dev-1".into());
        let small = Record::Uplink(small);
        for r in [&big, &small] {
            store
                .append(
                    &[Entry {
                        record: r,
                        queues: &[0],
                    }],
                    &[],
                )
                .await
                .unwrap();
        }
        store.flush().await.unwrap();
    }
    let daemon = Daemon::start(&cfg).await.unwrap();
    let q = daemon.store().queue("cloud").unwrap();
    assert!(
        wait_until(T, || q.is_empty()).await,
        "the queue is stuck: {:?}",
        q.stats()
    );
    assert_eq!(q.stats().dropped.get("too_large"), Some(&1));
    let got = ups(&broker);
    assert_eq!(got.len(), 1, "only the small record");
    assert_eq!(got[0]["uplink_message"]["f_cnt"], 1);
    // Live traffic flows.
    let mut f = Forwarder::connect(daemon.udp_addr(), gw(1)).await.unwrap();
    d.f_cnt = 2;
    f.send(&[(&d.uplink(1, b"live", false).unwrap(), Radio::default())])
        .await
        .unwrap();
    assert!(wait_until(T, || ups(&broker).len() == 2).await);
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Bounded per-gateway state

/// 20,000 PULL_DATA from distinct EUIs and PUSH_DATA with a 60 KB `stat`: the forwarder table
/// stays at `max_gateways`, an active gateway keeps its place and its downlink path, `/health`
/// lists at most 100 forwarders and the `stat` text is cut short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forwarder_table_and_health_stay_bounded() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "");
    cfg.gateway.max_gateways = 500;
    let daemon = Daemon::start(&cfg).await.unwrap();
    let mut real = Forwarder::connect(daemon.udp_addr(), gw(0xFFFF))
        .await
        .unwrap();
    real.pull().await.unwrap();
    assert!(wait_until(T, || daemon.gateways().len() == 1).await);
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..20_000u64 {
        sock.send_to(&pull_data(gw(i), i as u16), daemon.udp_addr())
            .await
            .unwrap();
        if i % 100 == 99 {
            // Let the daemon keep up (the kernel drops what its buffer cannot hold).
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // Once the flood is read (the kernel's buffer is free again).
    assert!(
        wait_until(T, || counter(
            &daemon,
            "lorastream_udp_errors_total",
            "gateway_table_full"
        ) > 1_000)
        .await
    );
    let big_time = "x".repeat(60_000);
    for i in 0..20u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let body = format!(
            r#"{{"stat":{{"time":"{big_time}","rxnb":1,"rxok":1,"rxfw":1,"ackr":100.0,"dwnb":0,"txnb":0}}}}"#
        );
        let mut dg = vec![2, 0, i as u8, 0];
        dg.extend_from_slice(&gw(0xFFFF).0);
        dg.extend_from_slice(body.as_bytes());
        real.send_raw(&dg).await.unwrap();
    }
    assert!(
        wait_until(T, || counter(
            &daemon,
            "lorastream_udp_errors_total",
            "gateway_table_full"
        ) > 0)
        .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(daemon.gateways().len(), 500);
    let g = daemon
        .gateways()
        .get(&gw(0xFFFF))
        .expect("the active gateway was evicted");
    assert!(g.pull_addr.is_some());
    let stat = g.last_stat.expect("stat kept");
    assert!(stat.time.len() <= 40, "{}", stat.time.len());
    let health = serde_json::to_string(&daemon.health()).unwrap();
    let h: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(h["gateways"].as_array().unwrap().len(), 100);
    assert_eq!(h["gateways_total"], 500);
    assert!(health.len() < 100_000, "/health is {} bytes", health.len());
    daemon.stop().await;
}

/// With `allowed_gateways`, any other gateway's datagrams are dropped before anything is done
/// with them: no PUSH_ACK, no uplink, no table entry; counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_gateways_drop_everyone_else_early() {
    install_crypto();
    let broker = support::broker::TestBroker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(1);
    let mut cfg = config(
        dir.path(),
        &format!(
            "[[application]]\nid = \"farm\"\n\n{}{}",
            device_toml(&d, "farm"),
            mqtt_stream(&broker.url())
        ),
    );
    cfg.gateway.allowed_gateways = vec![gw(1)];
    let daemon = Daemon::start(&cfg).await.unwrap();
    let mut stranger = Forwarder::connect(daemon.udp_addr(), gw(2)).await.unwrap();
    stranger
        .send(&[(&d.uplink(1, b"x", false).unwrap(), Radio::default())])
        .await
        .unwrap();
    stranger.pull().await.unwrap();
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), stranger.recv(&mut buf))
            .await
            .is_err(),
        "a gateway not allowed got an ACK"
    );
    let mut friend = Forwarder::connect(daemon.udp_addr(), gw(1)).await.unwrap();
    friend
        .send(&[(&d.uplink(1, b"y", false).unwrap(), Radio::default())])
        .await
        .unwrap();
    assert!(wait_until(T, || ups(&broker).len() == 1).await);
    assert_eq!(ups(&broker)[0]["uplink_message"]["f_cnt"], 1);
    assert_eq!(
        counter(
            &daemon,
            "lorastream_udp_errors_total",
            "gateway_not_allowed"
        ),
        2
    );
    assert_eq!(daemon.gateways().len(), 1);
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Gateway hijack

fn class_c_request(payload: &[u8]) -> DownlinkRequest {
    DownlinkRequest {
        stream: "cloud".into(),
        application: "farm".into(),
        device: "dev-1".into(),
        op: DownlinkOp::Push,
        items: Ok(vec![DownlinkItem {
            id: lorastream::model::new_id(),
            f_port: 1,
            payload: payload.to_vec(),
            confirmed: false,
            priority: "NORMAL".into(),
            correlation_ids: vec![],
            stream: "cloud".into(),
            decoded_payload: None,
        }]),
        names: None,
    }
}

/// One spoofed PULL_DATA with a known gateway's EUI from another address used to redirect its
/// downlinks silently. Now the change is logged and counted; with `pin_gateway_address` it is
/// refused while the old address is active, and the downlink goes to the genuine forwarder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoofed_pull_data_is_counted_and_with_pinning_cannot_redirect_downlinks() {
    install_crypto();
    for pin in [false, true] {
        let broker = support::broker::TestBroker::start().await;
        let dir = tempfile::tempdir().unwrap();
        let d = device(1);
        let toml = device_toml(&d, "farm").replace("[[device]]\n", "[[device]]\nclass = \"C\"\n");
        let mut cfg = config(
            dir.path(),
            &format!(
                "[[application]]\nid = \"farm\"\n\n{toml}{}",
                mqtt_stream(&broker.url())
            ),
        );
        cfg.gateway.allowed_gateways = vec![gw(1)];
        cfg.gateway.pin_gateway_address = pin;
        let daemon = Daemon::start(&cfg).await.unwrap();
        let mut genuine = Forwarder::connect(daemon.udp_addr(), gw(1)).await.unwrap();
        genuine.pull().await.unwrap();
        assert!(wait_until(T, || daemon.gateways().len() == 1).await);
        // Heard once, so the scheduler knows which gateway reaches the class C device.
        let mut d = d.clone();
        genuine
            .send(&[(&d.uplink(1, b"up", false).unwrap(), Radio::default())])
            .await
            .unwrap();
        assert!(wait_until(T, || daemon.metrics().uplinks("accepted") == 1).await);
        let genuine_addr = daemon.gateways().get(&gw(1)).unwrap().pull_addr;
        let mut spoof = Forwarder::connect(daemon.udp_addr(), gw(1)).await.unwrap();
        spoof.pull().await.unwrap();
        let reason = if pin {
            "gateway_address_pinned"
        } else {
            "lorastream_gateway_address_changes_total"
        };
        assert!(
            wait_until(T, || if pin {
                counter(&daemon, "lorastream_udp_errors_total", reason) == 1
            } else {
                counter(&daemon, reason, "") == 1
            })
            .await,
            "pin = {pin}: {}",
            daemon.metrics().encode()
        );
        let now = daemon.gateways().get(&gw(1)).unwrap();
        daemon.request_downlink(class_c_request(b"hi")).await;
        if pin {
            assert_eq!(now.pull_addr, genuine_addr, "the pinned address moved");
            assert!(
                genuine.pull_resp(T).await.is_some(),
                "no downlink for the genuine forwarder"
            );
        } else {
            assert_eq!(now.address_changes, 1);
            assert!(spoof.pull_resp(T).await.is_some());
        }
        daemon.stop().await;
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Oversized downlink messages

/// A 300 KiB message on `down/push` used to end the MQTT session (over rumqttc's limit): no
/// `down/failed`, no metric, and a reconnect for every such message. Now it is refused alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_downlink_message_is_refused_alone_and_the_session_stays_up() {
    install_crypto();
    for kind in broker_kinds() {
        let broker = Broker::start(kind).await;
        let dir = tempfile::tempdir().unwrap();
        let mut d = device(1);
        let cfg = config(
            dir.path(),
            &format!(
                "[[application]]\nid = \"farm\"\n\n{}{}",
                device_toml(&d, "farm"),
                mqtt_stream(&broker.url())
            ),
        );
        let mut sub = Subscriber::connect(broker.port(), "lorastream/#").await;
        let daemon = Daemon::start(&cfg).await.unwrap();
        let m = daemon.metrics().clone();
        assert!(wait_until(T, || m.is_stream_connected("cloud")).await);
        let mut o = rumqttc::MqttOptions::new("big-pub", "127.0.0.1", broker.port());
        o.set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut el) = rumqttc::AsyncClient::new(o, 10);
        tokio::spawn(async move { while el.poll().await.is_ok() {} });
        let huge = serde_json::json!({"downlinks":[{"f_port":1,"frm_payload":
            base64::engine::general_purpose::STANDARD.encode(vec![7u8; 230 * 1024])}]})
        .to_string();
        assert!(huge.len() > 256 * 1024);
        client
            .publish(
                "lorastream/farm/devices/dev-1/down/push",
                rumqttc::QoS::AtLeastOnce,
                false,
                huge,
            )
            .await
            .unwrap();
        let f = sub
            .wait_for(1, T, |t, _| t.ends_with("/dev-1/down/failed"))
            .await;
        assert_eq!(f.len(), 1, "{kind:?}: no down/failed");
        assert!(f[0]["downlink_failed"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("downlink messages are at most"));
        assert_eq!(
            counter(
                &daemon,
                "lorastream_downlink_messages_too_large_total",
                "cloud"
            ),
            1
        );
        // The same connection goes on: an uplink right after arrives, and the embedded
        // broker saw one connection only.
        let mut fwd = Forwarder::connect(daemon.udp_addr(), gw(1)).await.unwrap();
        fwd.send(&[(&d.uplink(1, b"after", false).unwrap(), Radio::default())])
            .await
            .unwrap();
        let up = sub.wait_for(1, T, |t, _| t.ends_with("/up")).await;
        assert_eq!(up.len(), 1);
        if let Broker::Embedded(b) = &broker {
            assert_eq!(
                b.connections(),
                3,
                "daemon, subscriber, publisher: no reconnect"
            );
        }
        daemon.stop().await;
    }
}

// ---------------------------------------------------------------------------------------------
// 7. The smaller ones

/// A hung broker (mosquitto stopped with SIGSTOP) is noticed within `response_timeout_s` under
/// traffic (it used to take two keep-alives, ~55 s, with `/health` saying connected), and the
/// stream catches up once the broker runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_broker_is_noticed_within_the_response_timeout() {
    install_crypto();
    if !needs_mosquitto("a_hung_broker_is_noticed_within_the_response_timeout") {
        return;
    }
    let broker = Mosquitto::start("").await;
    let pid = broker.pid().expect("mosquitto runs") as libc::pid_t;
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(1);
    let cfg = config(
        dir.path(),
        &format!(
            "[[application]]\nid = \"farm\"\n\n{}{}response_timeout_s = 2\n",
            device_toml(&d, "farm"),
            mqtt_stream(&format!("mqtt://127.0.0.1:{}", broker.port))
        ),
    );
    let mut sub = Subscriber::connect(broker.port, "lorastream/+/devices/+/up").await;
    let daemon = Daemon::start(&cfg).await.unwrap();
    let m = daemon.metrics().clone();
    assert!(wait_until(T, || m.is_stream_connected("cloud")).await);
    let mut fwd = Forwarder::connect(daemon.udp_addr(), gw(1)).await.unwrap();
    // SAFETY: kill(2) on the test's own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let stopped = Instant::now();
    for i in 0..10u8 {
        fwd.send(&[(&d.uplink(1, &[i], false).unwrap(), Radio::default())])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let noticed = wait_until(Duration::from_secs(10), || !m.is_stream_connected("cloud")).await;
    let took = stopped.elapsed();
    let health = serde_json::to_value(daemon.health()).unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(noticed, "a stopped broker was not noticed within 10 s");
    assert_eq!(health["streams_down"][0], "cloud", "{health}");
    println!("hung broker noticed after {} ms", took.as_millis());
    let got = sub.wait_for(10, Duration::from_secs(90), |_, _| true).await;
    assert_eq!(
        got.len(),
        10,
        "uplinks sent while the broker hung arrive once it runs"
    );
    daemon.stop().await;
}

/// A burst of spoofed TX_ACKs (random tokens, the gateway's EUI) used to fill the channel to
/// the scheduler, so that the genuine TX_ACK was lost. Only a TX_ACK for a token we sent goes
/// on now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tx_ack_burst_cannot_crowd_out_the_genuine_one() {
    install_crypto();
    let broker = support::broker::TestBroker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = device(1);
    let toml = device_toml(&d, "farm").replace("[[device]]\n", "[[device]]\nclass = \"C\"\n");
    let cfg = config(
        dir.path(),
        &format!(
            "[[application]]\nid = \"farm\"\n\n{toml}{}",
            mqtt_stream(&broker.url())
        ),
    );
    let daemon = Daemon::start(&cfg).await.unwrap();
    let mut fwd = Forwarder::connect(daemon.udp_addr(), gw(1)).await.unwrap();
    fwd.pull().await.unwrap();
    assert!(wait_until(T, || daemon.gateways().len() == 1).await);
    // Heard once, so the scheduler knows which gateway reaches the class C device.
    let mut d = d;
    fwd.send(&[(&d.uplink(1, b"hi", false).unwrap(), Radio::default())])
        .await
        .unwrap();
    assert!(wait_until(T, || daemon.metrics().uplinks("accepted") == 1).await);
    daemon.request_downlink(class_c_request(b"hi")).await;
    let pr = fwd.pull_resp(T).await.expect("no PULL_RESP");
    let spoofer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tx_ack = |token: u16| {
        let t = token.to_be_bytes();
        let mut v = vec![2, t[0], t[1], 5];
        v.extend_from_slice(&gw(1).0);
        v.extend_from_slice(br#"{"txpk_ack":{"error":"NONE"}}"#);
        v
    };
    for i in 0..20_000u32 {
        let token = (i as u16).wrapping_mul(7919) | 1;
        if token == pr.token {
            continue;
        }
        spoofer
            .send_to(&tx_ack(token), daemon.udp_addr())
            .await
            .unwrap();
        if i % 200 == 199 {
            // Paced, so that the kernel's receive buffer (not the daemon) never drops one.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if i == 10_000 {
            // The genuine answer, in the middle of the burst: a refusal, so that only this
            // TX_ACK (not the 3 s timeout) can account for what follows.
            fwd.tx_ack(pr.token, Some("COLLISION_PACKET"))
                .await
                .unwrap();
        }
    }
    let m = daemon.metrics().clone();
    assert!(
        wait_until(T, || m.downlinks("tx_refused") == 1).await,
        "the genuine TX_ACK was lost: {}",
        m.encode()
    );
    assert_eq!(
        counter(&daemon, "lorastream_udp_errors_total", "tx_ack_dropped"),
        0
    );
    assert!(counter(&daemon, "lorastream_udp_errors_total", "tx_ack_unexpected") > 10_000);
    daemon.stop().await;
}

/// CRC-bad, too-short, oversized, proprietary and RFU radio frames get a (rate-limited) log
/// line and a counter each, as the README promises; an oversized one is dropped. The real
/// binary, to read its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn radio_frames_with_defects_are_logged_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = faultkit::DaemonSpec::new(
        tmp.path(),
        "redb",
        "[[stream]]\nname = \"raw\"\nkind = \"stdout\"\ngateway = \"*\"\n".into(),
    );
    let daemon = faultkit::DaemonProc::start(&spec).await;
    let rxpk = |data: &[u8], stat: i32| {
        format!(
            r#"{{"tmst":1,"chan":0,"rfch":0,"freq":868.1,"stat":{stat},"modu":"LORA","datr":"SF7BW125","codr":"4/5","lsnr":5.0,"rssi":-80,"size":{},"data":"{}"}}"#,
            data.len(),
            base64::engine::general_purpose::STANDARD.encode(data)
        )
    };
    let mut good = vec![0x40u8];
    good.extend_from_slice(&[1u8; 15]);
    let mut rfu = good.clone();
    rfu[0] = 0x41;
    let mut proprietary = good.clone();
    proprietary[0] = 0xE0;
    let frames = [
        rxpk(&good, -1),
        rxpk(&[0x40, 1, 2, 3, 4], 1),
        rxpk(&[0x40; 300], 1),
        rxpk(&proprietary, 1),
        rxpk(&rfu, 1),
    ];
    let body = format!(r#"{{"rxpk":[{}]}}"#, frames.join(","));
    let mut dg = vec![2, 0, 1, 0];
    dg.extend_from_slice(&gw(1).0);
    dg.extend_from_slice(body.as_bytes());
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.send_to(&dg, spec.udp).unwrap();
    let kinds = ["crc_bad", "too_short", "oversized", "proprietary", "rfu"];
    let m = daemon
        .wait_metrics(T, |m| {
            kinds
                .iter()
                .all(|k| m.get("lorastream_radio_defects_total", &[("kind", k)]) == 1)
        })
        .await;
    for k in kinds {
        assert_eq!(
            m.get("lorastream_radio_defects_total", &[("kind", k)]),
            1,
            "{k}"
        );
    }
    // Each defect is counted just before its line is logged: wait for the lines.
    let log = || std::fs::read_to_string(&daemon.log).unwrap_or_default();
    for k in kinds {
        assert!(
            wait_until(T, || log()
                .lines()
                .any(|l| l.contains("radio frame with a defect") && l.contains(k)))
            .await,
            "no log line for {k}:\n{}",
            log()
        );
    }
    // Oversized: dropped; the others reach the raw-frame stream (CRC-bad ones never do).
    let m = daemon.wait_metrics(T, |m| m.delivered("raw") == 3).await;
    assert_eq!(m.delivered("raw"), 3);
}

/// Store files and directories are owner-only whatever the umask (they hold session keys).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_files_are_owner_only_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(1);
    let mut cfg = config(
        dir.path(),
        &format!(
            "[[application]]\nid = \"farm\"\n\n{}[[stream]]\nname = \"out\"\nkind = \"file\"\npath = {:?}\n",
            device_toml(&d, "farm"),
            dir.path().join("out.jsonl").display().to_string()
        ),
    );
    cfg.storage.flush_every_ms = 100;
    for backend in support::backends() {
        let backend = support::storage_backend(backend);
        cfg.storage.backend = backend;
        cfg.storage.path = dir.path().join(format!("db-{}", backend.name()));
        // SAFETY: umask(2) only changes this process's file-creation mask.
        let old = unsafe { libc::umask(0) };
        let daemon = Daemon::start(&cfg).await.unwrap();
        let mut f = Forwarder::connect(daemon.udp_addr(), gw(1)).await.unwrap();
        f.send(&[(&d.uplink(1, b"k", false).unwrap(), Radio::default())])
            .await
            .unwrap();
        assert!(wait_until(T, || daemon.metrics().uplinks("accepted") >= 1).await);
        let mut bad = Vec::new();
        let mut seen = 0;
        let mut stack = vec![cfg.storage.path.clone()];
        while let Some(p) = stack.pop() {
            let meta = std::fs::metadata(&p).unwrap();
            let mode = meta.permissions().mode() & 0o777;
            seen += 1;
            if meta.is_dir() {
                if mode != 0o700 {
                    bad.push(format!("{} {mode:o}", p.display()));
                }
                for e in std::fs::read_dir(&p).unwrap() {
                    stack.push(e.unwrap().path());
                }
            } else if mode != 0o600 {
                bad.push(format!("{} {mode:o}", p.display()));
            }
        }
        daemon.stop().await;
        unsafe { libc::umask(old) };
        assert!(seen > 2);
        assert!(bad.is_empty(), "{backend:?}: readable by others: {bad:?}");
    }
}

/// Idle connections to the metrics listener used to be unbounded: each held a file descriptor
/// (and a task) for as long as the client kept it open, so a flood of them could take the
/// descriptors the store and the streams need. At most `MAX_CONNECTIONS` are served at once;
/// the rest are closed at once and counted, and a scrape works again once the idle ones time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_to_the_metrics_listener_are_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "");
    cfg.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    let daemon = Daemon::start(&cfg).await.unwrap();
    let addr = daemon.metrics_addr().expect("metrics listener");
    const FLOOD: usize = 300;
    let mut idle = Vec::new();
    for _ in 0..FLOOD {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // Every connection over the cap is closed by the daemon at once (EOF), none of the others
    // (within a second: well inside the daemon's 5 s request timeout).
    let checks: Vec<_> = idle
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                let r = tokio::time::timeout(Duration::from_secs(1), s.read(&mut b)).await;
                (s, matches!(r, Ok(Ok(0))))
            })
        })
        .collect();
    let mut idle = Vec::new();
    let mut closed = 0;
    for c in checks {
        let (s, eof) = c.await.unwrap();
        closed += usize::from(eof);
        idle.push(s);
    }
    let max = lorastream::metrics::MAX_CONNECTIONS;
    assert_eq!(closed, FLOOD - max, "connections closed at once");
    assert_eq!(
        daemon.metrics().metrics_connections_refused(),
        (FLOOD - max) as u64
    );
    // The idle ones that were let in are dropped after the request timeout; then a scrape
    // is answered while the test still holds its ends open.
    let started = Instant::now();
    let body = loop {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut out)).await;
        if out.starts_with("HTTP/1.1 200") {
            break out;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no scrape answered while idle connections were held"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(body.contains("lorastream_metrics_connections_refused_total"));
    drop(idle);
    daemon.stop().await;
}
