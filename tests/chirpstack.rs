//! `format = "chirpstack"` end to end: a real daemon, a real broker (embedded, and Debian's
//! mosquitto; CI makes it mandatory), simulated packet forwarders on real UDP. A ChirpStack
//! consumer sees its own events on its own topics (`application/{app}/device/{dev_eui}/event/
//! up`, `txack`, `ack`, `log`), checked with ChirpStack's protobuf classes when Python has them,
//! and its `command/down` messages reach the device: the PULL_RESP is decrypted here with the
//! device keys.

mod support;

use base64::Engine;
use lorastream::daemon::Daemon;
use lorastream::model::Eui64;
use lorastream::sim::{Forwarder, PullResp, Radio, SimDevice};
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(15);

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// DevEUI of `device(n)` in `device_toml` (lower case, as ChirpStack writes it).
fn eui(n: u8) -> String {
    format!("70b3d57ed00000{n:02x}")
}

struct Rig {
    _dir: tempfile::TempDir,
    _broker: Broker,
    daemon: Daemon,
    fwd: Forwarder,
    sub: Subscriber,
    client: rumqttc::AsyncClient,
}

async fn rig(kind: BrokerKind, devices: &str, stream_extra: &str) -> Rig {
    install_crypto();
    let broker = Broker::start(kind).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &format!(
            "[[application]]\nid = \"farm\"\n\n{devices}[[stream]]\nname = \"cs\"\nserver = \"{}\"\nformat = \"chirpstack\"\n{stream_extra}\n",
            broker.url()
        ),
    );
    let sub = Subscriber::connect(broker.port(), "application/#").await;
    let daemon = Daemon::start(&cfg).await.unwrap();
    let mut fwd = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(0xAA55_5A00_0000_0001))
        .await
        .unwrap();
    fwd.pull().await.unwrap();
    assert!(wait_until(T, || daemon.gateways().len() == 1).await);
    // Connected = subscribed to the command topics (SUBACK), so no command can be missed.
    assert!(wait_until(T, || daemon.metrics().is_stream_connected("cs")).await);
    let (client, mut el) = rumqttc::AsyncClient::new(
        rumqttc::MqttOptions::new(
            format!("consumer-{}", std::process::id()),
            "127.0.0.1",
            broker.port(),
        ),
        10,
    );
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    Rig {
        _dir: dir,
        _broker: broker,
        daemon,
        fwd,
        sub,
        client,
    }
}

impl Rig {
    async fn command(&self, dev_eui: &str, body: serde_json::Value) {
        self.client
            .publish(
                format!("application/farm/device/{dev_eui}/command/down"),
                rumqttc::QoS::AtLeastOnce,
                false,
                body.to_string(),
            )
            .await
            .unwrap();
    }

    async fn events(&mut self, event: &str, n: usize) -> Vec<serde_json::Value> {
        let suffix = format!("/event/{event}");
        let got = self.sub.wait_for(n, T, |t, _| t.ends_with(&suffix)).await;
        assert!(
            got.len() >= n,
            "{n} {event} events expected: {:?}",
            self.topics()
        );
        got
    }

    fn topics(&self) -> Vec<String> {
        self.sub.seen.iter().map(|(t, _)| t.clone()).collect()
    }

    async fn uplink(
        &mut self,
        d: &mut SimDevice,
        payload: &[u8],
        confirmed: bool,
        ack: bool,
        tmst: u32,
    ) {
        let p = d
            .uplink_with(Some(3), payload, confirmed, ack, &[])
            .unwrap();
        let radio = Radio {
            tmst,
            freq_mhz: 868.3,
            sf: 9,
            ..Radio::default()
        };
        self.fwd.send(&[(&p, radio)]).await.unwrap();
    }

    async fn pull_resp(&self) -> PullResp {
        self.fwd.pull_resp(T).await.expect("no PULL_RESP")
    }
}

/// Every event lorastream published, checked by ChirpStack's protobuf classes (when Python has
/// them; CI makes that mandatory). The test's own commands (some invalid on purpose) are left
/// out.
fn protobuf_check(test: &str, seen: &[(String, Vec<u8>)]) {
    if !needs_python(test, &["chirpstack_api.integration"]) {
        return;
    }
    let typ = |t: &str| match t.rsplit('/').next() {
        Some("up") => "UplinkEvent",
        Some("join") => "JoinEvent",
        Some("ack") => "AckEvent",
        Some("txack") => "TxAckEvent",
        Some("log") => "LogEvent",
        Some("status") => "StatusEvent",
        other => panic!("unexpected topic {t} ({other:?})"),
    };
    let lines: Vec<String> = seen
        .iter()
        .filter(|(t, _)| t.contains("/event/"))
        .map(|(t, b)| {
            serde_json::json!({"name": t, "type": typ(t), "json": String::from_utf8_lossy(b)})
                .to_string()
        })
        .collect();
    assert!(lines.len() >= 10, "{} events", lines.len());
    let (ok, out, err) = python("pbcheck.py", &["check"], lines.join("\n").as_bytes());
    assert!(ok, "pbcheck failed:\n{err}\n{out}");
    assert!(
        out.contains(&format!("{} passed, 0 failed", lines.len())),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chirpstack_consumer_gets_uplinks_and_its_downlinks_reach_the_device() {
    for kind in broker_kinds() {
        let mut d = device(1);
        let mut r = rig(kind, &device_toml(&d, "farm"), "").await;

        // Uplink → event/up, as ChirpStack's MQTT integration publishes it.
        r.uplink(&mut d, &[0x01, 0x02], false, false, 1_000_000)
            .await;
        let up = r.events("up", 1).await;
        let v = &up[0];
        assert!(r
            .topics()
            .contains(&format!("application/farm/device/{}/event/up", eui(1))));
        assert_eq!(v["deviceInfo"]["applicationId"], "farm");
        assert_eq!(v["deviceInfo"]["deviceName"], "dev-1");
        assert_eq!(v["deviceInfo"]["devEui"], eui(1));
        assert_eq!(v["devAddr"], "26000001");
        assert_eq!(v["fCnt"], 0);
        assert_eq!(v["fPort"], 3);
        assert_eq!(v["data"], b64(&[1, 2]));
        assert_eq!(v["dr"], 3, "SF9/125 kHz is DR3 in EU868");
        assert_eq!(v["txInfo"]["frequency"], 868_300_000);
        assert_eq!(v["rxInfo"][0]["gatewayId"], "aa555a0000000001");
        assert_eq!(v["regionConfigId"], "eu868");
        let dedup = v["deduplicationId"].as_str().unwrap().to_string();
        assert_eq!(dedup.len(), 36, "a UUID: {dedup}");
        // No lorastream topics on a chirpstack stream.
        assert!(r.topics().iter().all(|t| t.starts_with("application/")));

        // command/down → the device's next uplink gets it in RX1; txack follows TX_ACK.
        let id = "0193a5b2-0000-4000-8000-00000000abcd";
        r.command(
            &eui(1),
            serde_json::json!({"id": id, "devEui": eui(1), "confirmed": false, "fPort": 10, "data": b64(b"hi")}),
        )
        .await;
        // Stored before the broker got its PUBACK; give the scheduler the uplink only after.
        assert!(
            wait_until(T, || r.daemon.metrics().downlinks("queued") == 1).await,
            "the command was not queued"
        );
        r.uplink(&mut d, &[9], false, false, 3_000_000).await;
        let pr = r.pull_resp().await;
        let dl = d.open(&pr.phy, 0).unwrap();
        assert!(dl.mic_ok);
        assert_eq!(dl.opened.f_port, Some(10));
        assert_eq!(dl.opened.frm_payload, b"hi");
        r.fwd.tx_ack(pr.token, None).await.unwrap();
        let tx = r.events("txack", 1).await;
        let v = &tx[0];
        assert_eq!(v["queueItemId"], id, "the consumer's id comes back");
        assert_eq!(v["fCntDown"], 0);
        assert_eq!(v["gatewayId"], "aa555a0000000001");
        assert_eq!(v["txInfo"]["frequency"], 868_300_000);
        assert_eq!(v["txInfo"]["timing"]["delay"]["delay"], "1s");
        assert_eq!(v["txInfo"]["modulation"]["lora"]["spreadingFactor"], 9);
        let ctx = base64::engine::general_purpose::STANDARD
            .decode(v["txInfo"]["context"].as_str().unwrap())
            .unwrap();
        assert_eq!(ctx, 3_000_000u32.to_be_bytes(), "the uplink's tmst");

        // A confirmed command, acknowledged by the device: event/ack.
        r.command(
            &eui(1),
            serde_json::json!({"devEui": eui(1), "confirmed": true, "fPort": 11, "data": b64(b"c")}),
        )
        .await;
        assert!(wait_until(T, || r.daemon.metrics().downlinks("queued") == 2).await);
        r.uplink(&mut d, &[9], false, false, 5_000_000).await;
        let pr = r.pull_resp().await;
        let dl = d.open(&pr.phy, 1).unwrap();
        assert!(dl.confirmed && dl.mic_ok);
        r.fwd.tx_ack(pr.token, None).await.unwrap();
        r.events("txack", 2).await;
        r.uplink(&mut d, &[9], false, true, 7_000_000).await;
        let ack = r.events("ack", 1).await;
        assert_eq!(ack[0]["acknowledged"], true);
        let tx = r.events("txack", 2).await;
        assert_eq!(ack[0]["queueItemId"], tx[1]["queueItemId"]);

        // A command lorastream refuses: a log event with the reason; the stream goes on.
        r.command(&eui(1), serde_json::json!({"fPort": 0, "data": "AA=="}))
            .await;
        let log = r.events("log", 1).await;
        assert_eq!(log[0]["level"], "ERROR");
        assert!(
            log[0]["description"].as_str().unwrap().contains("fPort 0"),
            "{}",
            log[0]
        );
        r.command(
            &eui(1),
            serde_json::json!({"fPort": 1, "data": "not base64!"}),
        )
        .await;
        r.events("log", 2).await;
        // A DevEUI lorastream does not know, and a topic that is no DevEUI: ignored, counted.
        r.command(
            "0000000000000099",
            serde_json::json!({"fPort": 1, "data": ""}),
        )
        .await;
        r.command("nonsense", serde_json::json!({"fPort": 1, "data": ""}))
            .await;
        assert!(wait_until(T, || r.daemon.metrics().downlinks("unknown_device") == 1).await);
        assert!(wait_until(T, || r.daemon.metrics().downlinks("unroutable") == 1).await);
        r.uplink(&mut d, &[4], false, false, 9_000_000).await;
        r.events("up", 5).await;

        // Everything left the queue, and every message is ChirpStack's protobuf JSON.
        let q = r.daemon.store().queue("cs").unwrap();
        assert!(wait_until(T, || q.is_empty()).await);
        protobuf_check(
            "chirpstack_consumer_gets_uplinks_and_its_downlinks_reach_the_device",
            &r.sub.seen,
        );
        r.daemon.stop().await;
    }
}

/// A class C device: a command is sent at once (timing `immediately`), and an OTAA-free
/// application-scoped stream only takes its own application's commands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class_c_commands_go_out_at_once_and_scope_limits_the_subscription() {
    let mut d = device(2);
    let devices = device_toml(&d, "farm").replace("[[device]]\n", "[[device]]\nclass = \"C\"\n");
    let mut r = rig(BrokerKind::Embedded, &devices, "application = \"farm\"").await;
    // Heard once, so lorastream knows the gateway to send through.
    r.uplink(&mut d, &[1], false, false, 1_000).await;
    let up = r.events("up", 1).await;
    assert_eq!(up[0]["deviceInfo"]["deviceClassEnabled"], "CLASS_C");
    // Another application's topic is not subscribed: nothing is queued.
    r.client
        .publish(
            format!("application/other/device/{}/command/down", eui(2)),
            rumqttc::QoS::AtLeastOnce,
            false,
            serde_json::json!({"fPort": 1, "data": b64(b"x")}).to_string(),
        )
        .await
        .unwrap();
    r.command(
        &eui(2),
        serde_json::json!({"fPort": 5, "data": b64(b"now")}),
    )
    .await;
    let pr = r.pull_resp().await;
    assert_eq!(pr.txpk["imme"], true);
    let dl = d.open(&pr.phy, 0).unwrap();
    assert_eq!(dl.opened.frm_payload, b"now");
    r.fwd.tx_ack(pr.token, None).await.unwrap();
    let tx = r.events("txack", 1).await;
    assert_eq!(
        tx[0]["txInfo"]["timing"],
        serde_json::json!({"immediately": {}})
    );
    assert!(r.fwd.pull_resp(Duration::from_millis(500)).await.is_none());
    assert_eq!(r.daemon.metrics().downlinks("queued"), 1);
    r.daemon.stop().await;
}
