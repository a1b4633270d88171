//! MQTT sessions and client ids against Debian's mosquitto (issue 15, first-run traps):
//! - a persistent session (the default, `clean_session = false`): a downlink published while
//!   the daemon was stopped reaches the device after the restart; with `clean_session = true`
//!   it does not (the control that shows the test can fail);
//! - the derived client id is unique per installation (the instance id in the store
//!   directory) and kept across restarts: two gateways with the same EUI and host name
//!   connect side by side;
//! - two clients with one configured client id take turns kicking each other off the broker:
//!   the daemon says so (`session_taken_over`).
//!
//! Skipped without mosquitto, mandatory with LORASTREAM_TEST_MOSQUITTO=1.

mod support;

use base64::Engine;
use lorastream::daemon::Daemon;
use lorastream::model::Eui64;
use lorastream::sim::{Forwarder, Radio, SimDevice};
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(10);

fn cfg_for(
    dir: &std::path::Path,
    d: &SimDevice,
    port: u16,
    stream_extra: &str,
) -> lorastream::config::Config {
    config(
        dir,
        &format!(
            "[[application]]\nid = \"farm\"\n\n{}[[stream]]\nname = \"cloud\"\nserver = \"mqtt://127.0.0.1:{port}\"\n{stream_extra}\n",
            device_toml(d, "farm")
        ),
    )
}

fn instance_id(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("db").join("instance-id"))
        .unwrap()
        .trim()
        .to_string()
}

/// Publish a downlink for dev-1 and wait for the broker's PUBACK.
async fn publish_downlink(port: u16, payload: &[u8]) {
    let (c, mut el) = rumqttc::AsyncClient::new(
        rumqttc::MqttOptions::new("test-publisher", "127.0.0.1", port),
        10,
    );
    let body = serde_json::json!({"downlinks": [{"f_port": 3, "frm_payload": base64::engine::general_purpose::STANDARD.encode(payload)}]});
    c.publish(
        "lorastream/farm/devices/dev-1/down/push",
        rumqttc::QoS::AtLeastOnce,
        false,
        body.to_string(),
    )
    .await
    .unwrap();
    let acked = tokio::time::timeout(T, async {
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("publisher: {e}"),
            }
        }
    })
    .await;
    assert!(acked.is_ok(), "no PUBACK for the downlink");
    let _ = c.disconnect().await;
}

/// Restart the daemon with a downlink published while it was stopped; an uplink then opens
/// the RX1 window. The downlink it gets, if any.
async fn downlink_after_restart(stream_extra: &str) -> (Option<Vec<u8>>, String) {
    install_crypto();
    let m = Mosquitto::start("").await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(1);
    let cfg = cfg_for(dir.path(), &d, m.port, stream_extra);

    let daemon = Daemon::start(&cfg).await.unwrap();
    assert!(wait_until(T, || daemon.metrics().is_stream_connected("cloud")).await);
    let id = instance_id(dir.path());
    daemon.stop().await;

    publish_downlink(m.port, b"while away").await;

    let daemon = Daemon::start(&cfg).await.unwrap();
    assert_eq!(instance_id(dir.path()), id, "the instance id is kept");
    let mut fwd = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(0xAA55_5A00_0000_0001))
        .await
        .unwrap();
    fwd.pull().await.unwrap();
    assert!(wait_until(T, || daemon.metrics().is_stream_connected("cloud")).await);
    // A persistent session's queued message comes right after CONNACK; give the scheduler
    // the moment it takes to store it before the uplink opens the window.
    let queued = wait_until(Duration::from_secs(3), || {
        daemon.metrics().downlinks("queued") >= 1
    })
    .await;
    let p = d.uplink_with(Some(1), b"u", false, false, &[]).unwrap();
    fwd.send(&[(
        &p,
        Radio {
            tmst: 1_000_000,
            ..Radio::default()
        },
    )])
    .await
    .unwrap();
    let got = match fwd.pull_resp(Duration::from_secs(2)).await {
        Some(pr) => {
            let dl = d.open(&pr.phy, 0).unwrap();
            assert!(dl.mic_ok);
            assert_eq!(dl.opened.f_port, Some(3));
            Some(dl.opened.frm_payload)
        }
        None => None,
    };
    assert_eq!(queued, got.is_some(), "queued metric and PULL_RESP agree");
    daemon.stop().await;
    (got, m.log())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downlink_published_while_the_daemon_was_stopped_is_sent_after_the_restart() {
    if !needs_mosquitto(
        "a_downlink_published_while_the_daemon_was_stopped_is_sent_after_the_restart",
    ) {
        return;
    }
    let (got, log) = downlink_after_restart("").await;
    assert_eq!(
        got.as_deref(),
        Some(&b"while away"[..]),
        "mosquitto log:\n{log}"
    );
    // mosquitto names the persistent session: "(p2, c0, k30)", c0 = clean session off. The
    // flag is matched with its separators: the client id's random suffix may hold "c0"/"c1".
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("as lorastream-aa555a00000000ff-cloud-"))
        .collect();
    assert!(
        lines.len() >= 2,
        "two connections of the derived client id:\n{log}"
    );
    assert!(lines.iter().all(|l| l.contains(", c0, ")), "{lines:?}");

    // The control: with a clean session the broker keeps nothing for a stopped daemon.
    let (got, log) = downlink_after_restart("clean_session = true").await;
    assert_eq!(got, None, "mosquitto log:\n{log}");
    assert!(log.contains(", c1, "), "{log}");
}

/// Two installations that share an EUI (copied from the example) and a host name connect to
/// one broker side by side with their derived client ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_with_one_eui_get_different_derived_client_ids() {
    if !needs_mosquitto("gateways_with_one_eui_get_different_derived_client_ids") {
        return;
    }
    install_crypto();
    let m = Mosquitto::start("").await;
    let d = device(1);
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Daemon::start(&cfg_for(a_dir.path(), &d, m.port, ""))
        .await
        .unwrap();
    let b = Daemon::start(&cfg_for(b_dir.path(), &d, m.port, ""))
        .await
        .unwrap();
    assert!(
        wait_until(T, || a.metrics().is_stream_connected("cloud")
            && b.metrics().is_stream_connected("cloud"))
        .await
    );
    let (ia, ib) = (instance_id(a_dir.path()), instance_id(b_dir.path()));
    assert_ne!(ia, ib);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = m.log();
    for id in [&ia, &ib] {
        let as_id = format!("as lorastream-aa555a00000000ff-cloud-{id} ");
        assert_eq!(
            log.matches(&as_id).count(),
            1,
            "one connection each, never kicked off and reconnected:\n{log}"
        );
    }
    assert!(!log.contains("already connected"), "{log}");
    for x in [&a, &b] {
        assert!(x.metrics().is_stream_connected("cloud"));
        assert_eq!(x.metrics().stream_errors("cloud", "session_taken_over"), 0);
    }
    a.stop().await;
    b.stop().await;
}

/// Two daemons configured with one client id: the broker closes the older connection each
/// time the other connects; within a few rounds both say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_used_twice_is_reported_as_taken_over() {
    if !needs_mosquitto("a_client_id_used_twice_is_reported_as_taken_over") {
        return;
    }
    install_crypto();
    let m = Mosquitto::start("").await;
    let d = device(1);
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let extra = "client_id = \"gateway-01\"";
    let a = Daemon::start(&cfg_for(a_dir.path(), &d, m.port, extra))
        .await
        .unwrap();
    let b = Daemon::start(&cfg_for(b_dir.path(), &d, m.port, extra))
        .await
        .unwrap();
    // Each daemon's first three sessions end within its peer's first backoff delays
    // (<= 1, 2 and 4 s): at most ~15 s until both have counted three.
    let reported = wait_until(Duration::from_secs(45), || {
        a.metrics().stream_errors("cloud", "session_taken_over") >= 1
            && b.metrics().stream_errors("cloud", "session_taken_over") >= 1
    })
    .await;
    assert!(reported, "mosquitto log:\n{}", m.log());
    a.stop().await;
    b.stop().await;
}

/// A message above the client's 1 MiB packet limit on a downlink topic ends the connection
/// (rumqttc reads packets whole), and a persistent session would have the broker send it again
/// after every reconnect, forever. The daemon starts one clean session, which drops it; the
/// connections after that are persistent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_above_the_packet_limit_cannot_poison_a_persistent_session() {
    if !needs_mosquitto("a_message_above_the_packet_limit_cannot_poison_a_persistent_session") {
        return;
    }
    install_crypto();
    let m = Mosquitto::start("").await;
    let dir = tempfile::tempdir().unwrap();
    let d = device(1);
    let cfg = cfg_for(dir.path(), &d, m.port, "");
    let daemon = Daemon::start(&cfg).await.unwrap();
    let metrics = daemon.metrics().clone();
    assert!(wait_until(T, || metrics.is_stream_connected("cloud")).await);

    let mut o = rumqttc::MqttOptions::new("big-pub", "127.0.0.1", m.port);
    o.set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 10);
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    client
        .publish(
            "lorastream/farm/devices/dev-1/down/push",
            rumqttc::QoS::AtLeastOnce,
            false,
            vec![b'x'; 1200 * 1024],
        )
        .await
        .unwrap();
    let counter = || {
        metrics
            .encode()
            .lines()
            .find(|l| {
                l.starts_with("lorastream_downlink_messages_too_large_total")
                    && l.contains("\"cloud\"")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(wait_until(T, || counter() == 1).await, "{}", m.log());
    assert!(wait_until(T, || metrics.is_stream_connected("cloud")).await);
    // Settled: no more reconnects, and a downlink published now is taken.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(counter(), 1, "the message came back:\n{}", m.log());
    publish_downlink(m.port, b"next").await;
    assert!(wait_until(T, || metrics.downlinks("queued") >= 1).await);
    daemon.stop().await;
    // The next start is persistent again.
    let daemon = Daemon::start(&cfg).await.unwrap();
    assert!(wait_until(T, || daemon.metrics().is_stream_connected("cloud")).await);
    daemon.stop().await;
    let log = m.log();
    let sessions: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("as lorastream-aa555a00000000ff-cloud-"))
        .map(|l| {
            if l.contains(", c1, ") {
                "clean"
            } else {
                "persistent"
            }
        })
        .collect();
    assert_eq!(
        sessions,
        ["persistent", "clean", "persistent"],
        "mosquitto log:\n{log}"
    );
}
