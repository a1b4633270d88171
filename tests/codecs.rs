//! Payload codecs end to end: encrypted uplinks from a simulated packet forwarder (UDP) → the
//! daemon (MIC, decrypt, codec, store) → a real MQTT broker, read back by a subscriber in two
//! formats at once; downlinks with a `decoded_payload` → the device's encoder → `down/queued`
//! or `down/failed`.

mod support;

use base64::Engine;
use lorastream::daemon::Daemon;
use lorastream::model::Eui64;
use lorastream::sim::{Forwarder, Radio};
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(15);

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// dev-1 takes its application's CayenneLPP codec, dev-2 turns it off for itself. Every stream
/// shows the same decoded payload; a payload the codec refuses is still delivered, with the
/// error, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cayennelpp_uplinks_are_decoded_once_for_every_stream_and_bad_ones_still_delivered() {
    install_crypto();
    let broker = Broker::start(BrokerKind::Embedded).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut d1, mut d2) = (device(1), device(2));
    let url = broker.url();
    let cfg = config(
        dir.path(),
        &format!(
            "[[application]]\nid = \"farm\"\ncodec = \"cayennelpp\"\n\n{}{}\ncodec = \"none\"\n\n\
             [[stream]]\nname = \"cloud\"\nserver = \"{url}\"\n\n\
             [[stream]]\nname = \"cs\"\nserver = \"{url}\"\nformat = \"chirpstack\"\ndownlinks = false\n",
            device_toml(&d1, "farm"),
            device_toml(&d2, "farm").trim_end(),
        ),
    );
    let mut sub = Subscriber::connect(broker.port(), "#").await;
    let daemon = Daemon::start(&cfg).await.unwrap();
    let mut fwd = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(0xAA55_5A00_0000_0001))
        .await
        .unwrap();

    // The specification's example: two temperatures (27.2 °C on channel 3, 25.5 °C on 5).
    let good = hex::decode("03670110056700FF").unwrap();
    // Type 255 is no CayenneLPP type.
    let bad = [0x01, 0xFF, 0x00];
    for (i, (dev, payload)) in [(1, &good[..]), (1, &bad[..]), (2, &good[..])]
        .into_iter()
        .enumerate()
    {
        let d = if dev == 1 { &mut d1 } else { &mut d2 };
        let phy = d.uplink(1, payload, false).unwrap();
        fwd.send(&[(&phy, Radio::default())]).await.unwrap();
        // One at a time, so that the order below is the sending order.
        let n = sub
            .wait_for(i + 1, T, |t, _| {
                t.starts_with("lorastream/") && t.ends_with("/up")
            })
            .await
            .len();
        assert_eq!(n, i + 1, "{:?}", sub.seen);
    }
    let tts = sub
        .wait_for(3, T, |t, _| {
            t.starts_with("lorastream/") && t.ends_with("/up")
        })
        .await;
    assert_eq!(tts.len(), 3, "{:?}", sub.seen);
    let m: Vec<_> = tts.iter().map(|v| &v["uplink_message"]).collect();
    let who: Vec<_> = tts
        .iter()
        .map(|v| v["end_device_ids"]["device_id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(who, ["dev-1", "dev-1", "dev-2"]);
    assert_eq!(
        m[0]["decoded_payload"],
        serde_json::json!({"temperature_3": 27.2, "temperature_5": 25.5})
    );
    assert!(m[0].get("lorastream").is_none(), "{}", m[0]);
    // The refused payload: delivered with its bytes and the reason, without decoded_payload.
    assert!(m[1].get("decoded_payload").is_none(), "{}", m[1]);
    assert_eq!(m[1]["frm_payload"], b64(&bad));
    let err = m[1]["lorastream"]["codec_error"].as_str().unwrap_or("");
    assert!(err.contains("unknown data type 255"), "{err}");
    // dev-2's own codec = "none".
    assert!(m[2].get("decoded_payload").is_none() && m[2].get("lorastream").is_none());
    assert_eq!(m[2]["frm_payload"], b64(&good));

    // The ChirpStack stream carries the same result as `object`.
    let cs = sub.wait_for(3, T, |t, _| t.ends_with("/event/up")).await;
    assert_eq!(cs.len(), 3, "{:?}", sub.seen);
    assert_eq!(cs[0]["object"]["temperature_3"], 27.2);
    assert!(cs[1].get("object").is_none() && cs[2].get("object").is_none());

    assert_eq!(daemon.metrics().codec_errors("cayennelpp"), 1);
    assert_eq!(daemon.metrics().uplinks("accepted"), 3);
    daemon.stop().await;
}

/// `decoded_payload` downlinks: encoded by the device's codec (TTS's CayenneLPP downlink
/// encoding: `value_<channel>` in hundredths), refused with the reason when the codec cannot
/// encode them or the device has no codec.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoded_payload_downlinks_are_encoded_or_fail_with_the_reason() {
    install_crypto();
    let broker = Broker::start(BrokerKind::Embedded).await;
    let dir = tempfile::tempdir().unwrap();
    let (d1, d2) = (device(1), device(2));
    let cfg = config(
        dir.path(),
        &format!(
            "[[application]]\nid = \"farm\"\n\n{}\ncodec = \"cayennelpp\"\n\n{}[[stream]]\nname = \"cloud\"\nserver = \"{}\"\n",
            device_toml(&d1, "farm").trim_end(),
            device_toml(&d2, "farm"),
            broker.url()
        ),
    );
    let mut sub = Subscriber::connect(broker.port(), "lorastream/#").await;
    let daemon = Daemon::start(&cfg).await.unwrap();
    assert!(wait_until(T, || daemon.metrics().is_stream_connected("cloud")).await);
    let (client, mut el) = rumqttc::AsyncClient::new(
        rumqttc::MqttOptions::new("codec-test-pub", "127.0.0.1", broker.port()),
        10,
    );
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let push = |device: &'static str, body: serde_json::Value| {
        let client = client.clone();
        async move {
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
    };

    push(
        "dev-1",
        serde_json::json!({"downlinks":[{"f_port":3,"decoded_payload":{"value_1":1.5}}]}),
    )
    .await;
    let q = sub
        .wait_for(1, T, |t, _| t.ends_with("dev-1/down/queued"))
        .await;
    assert_eq!(q.len(), 1, "{:?}", sub.seen);
    assert_eq!(q[0]["downlink_queued"]["frm_payload"], b64(&[1, 0, 150]));
    assert_eq!(q[0]["downlink_queued"]["f_port"], 3);

    push(
        "dev-1",
        serde_json::json!({"downlinks":[{"f_port":3,"decoded_payload":{"led":true}}]}),
    )
    .await;
    push(
        "dev-2",
        serde_json::json!({"downlinks":[{"f_port":3,"decoded_payload":{"value_1":1}}]}),
    )
    .await;
    let f1 = sub
        .wait_for(1, T, |t, _| t.ends_with("dev-1/down/failed"))
        .await;
    let f2 = sub
        .wait_for(1, T, |t, _| t.ends_with("dev-2/down/failed"))
        .await;
    let reason = |v: &[serde_json::Value]| {
        v.first()
            .and_then(|v| v["downlink_failed"]["error"]["message"].as_str())
            .unwrap_or("")
            .to_string()
    };
    let r1 = reason(&f1);
    assert!(
        r1.contains("cayennelpp") && r1.contains("\"led\" is not value_<channel>"),
        "{r1}"
    );
    let r2 = reason(&f2);
    assert!(r2.contains("no codec that encodes downlinks"), "{r2}");
    // Only the encoded one is queued.
    assert_eq!(
        daemon
            .store()
            .downlinks(lorastream::model::Eui64::from_u64(0x70B3_D57E_D000_0001))
            .unwrap()
            .len(),
        1
    );
    daemon.stop().await;
}

/// JavaScript codecs through the daemon: a device-repository-style script decodes, a script
/// that loops forever costs only its own uplink (delivered with the error, counted), and
/// `encodeDownlink` turns a `decoded_payload` into bytes on the port the codec chose.
#[cfg(feature = "js")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_codecs_decode_and_a_looping_script_costs_only_its_uplink() {
    install_crypto();
    let broker = Broker::start(BrokerKind::Embedded).await;
    let dir = tempfile::tempdir().unwrap();
    let th = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/codecs/th-sensor.js"
    );
    let hostile = dir.path().join("hostile.js");
    std::fs::write(
        &hostile,
        "function decodeUplink(input) {\n  if (input.bytes[0] === 0xFF) { while (true) {} }\n  return { data: { first: input.bytes[0] } };\n}\n",
    )
    .unwrap();
    let (mut d1, mut d2) = (device(1), device(2));
    let cfg = config(
        dir.path(),
        &format!(
            "[[application]]\nid = \"farm\"\ncodec = \"javascript\"\ncodec_script = {th:?}\n\n{}{}\ncodec = \"javascript\"\ncodec_script = {:?}\n\n[[stream]]\nname = \"cloud\"\nserver = \"{}\"\n",
            device_toml(&d1, "farm"),
            device_toml(&d2, "farm").trim_end(),
            hostile.display().to_string(),
            broker.url()
        ),
    );
    let mut sub = Subscriber::connect(broker.port(), "lorastream/#").await;
    let daemon = Daemon::start(&cfg).await.unwrap();
    assert!(wait_until(T, || daemon.metrics().is_stream_connected("cloud")).await);
    let mut fwd = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(0xAA55_5A00_0000_0001))
        .await
        .unwrap();
    let th_payload = hex::decode("CBF809C40258010A28002A").unwrap();
    let sends: [(u8, u8, &[u8]); 3] = [(2, 2, &[0xFF, 1]), (2, 2, &[7]), (1, 2, &th_payload)];
    let up = |t: &str, _: &serde_json::Value| t.ends_with("/up");
    for (i, (dev, f_port, payload)) in sends.into_iter().enumerate() {
        let d = if dev == 1 { &mut d1 } else { &mut d2 };
        let phy = d.uplink(f_port, payload, false).unwrap();
        fwd.send(&[(&phy, Radio::default())]).await.unwrap();
        let n = sub.wait_for(i + 1, T, up).await.len();
        assert_eq!(n, i + 1, "{:?}", sub.seen);
    }
    let got = sub.wait_for(3, T, up).await;
    let m: Vec<_> = got.iter().map(|v| &v["uplink_message"]).collect();
    let err = m[0]["lorastream"]["codec_error"].as_str().unwrap_or("");
    assert!(err.contains("stopped after 100ms"), "{}", m[0]);
    assert_eq!(m[0]["frm_payload"], b64(&[0xFF, 1]));
    assert_eq!(m[1]["decoded_payload"], serde_json::json!({"first": 7}));
    assert_eq!(m[2]["decoded_payload"]["temperature"], 25);
    assert_eq!(m[2]["decoded_payload"]["sequence"], 42);
    assert_eq!(daemon.metrics().codec_errors("javascript"), 1);

    // encodeDownlink: {interval_s: 600} → 01 00 02 58 on FPort 3 (the codec's choice).
    let (client, mut el) = rumqttc::AsyncClient::new(
        rumqttc::MqttOptions::new("codec-js-pub", "127.0.0.1", broker.port()),
        10,
    );
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    client
        .publish(
            "lorastream/farm/devices/dev-1/down/push",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"downlinks":[{"f_port":1,"decoded_payload":{"interval_s":600}}]}"#,
        )
        .await
        .unwrap();
    let q = sub
        .wait_for(1, T, |t, _| t.ends_with("dev-1/down/queued"))
        .await;
    assert_eq!(q.len(), 1, "{:?}", sub.seen);
    assert_eq!(
        q[0]["downlink_queued"]["frm_payload"],
        b64(&[1, 0, 2, 0x58])
    );
    assert_eq!(q[0]["downlink_queued"]["f_port"], 3);
    daemon.stop().await;
}

/// A build without the `js` feature (`--no-default-features`) refuses a JavaScript codec at
/// `check` and `run`, naming the entry and the feature; the same file with CayenneLPP passes.
#[cfg(not(feature = "js"))]
#[test]
fn a_build_without_javascript_refuses_javascript_codecs_and_keeps_cayennelpp() {
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/codecs/th-sensor.js"
    );
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");
    let src = std::fs::read_to_string(example).unwrap();
    assert!(src.contains("codec = \"none\"\n"));
    let js = dir.path().join("js.toml");
    std::fs::write(
        &js,
        src.replacen(
            "codec = \"none\"\n",
            &format!("codec = \"javascript\"\ncodec_script = {script:?}\n"),
            1,
        ),
    )
    .unwrap();
    let lpp = dir.path().join("lpp.toml");
    std::fs::write(
        &lpp,
        src.replacen("codec = \"none\"\n", "codec = \"cayennelpp\"\n", 1),
    )
    .unwrap();
    let bin = || std::process::Command::new(env!("CARGO_BIN_EXE_lorastream"));
    for cmd in ["check", "run"] {
        let out = bin().args([cmd, "-c"]).arg(&js).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{cmd}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("key `codec`"), "{err}");
        assert!(
            err.contains("this build has no JavaScript codecs: rebuild with --features js"),
            "{err}"
        );
    }
    let out = bin().args(["check", "-c"]).arg(&lpp).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
