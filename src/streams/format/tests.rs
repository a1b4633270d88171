//! One [`Formatter`] per format, built from a parsed configuration as the daemon builds it:
//! topics, bodies, content types, batches, downlink topics and events.

use super::*;
use crate::config::Config;
use crate::model::{DownlinkEventKind, DownlinkItem};
use crate::sim::fixtures;

const DEVICES: &str = r#"
[[application]]
id = "farm"

[[device]]
application = "farm"
id = "soil-1"
dev_eui = "70b3d57ed0000001"
dev_addr = "26000001"
nwk_s_key = "000102030405060708090a0b0c0d0e0f"
app_s_key = "000102030405060708090a0b0c0d0e0f"

[[device]]
application = "farm"
id = "meter-7"
dev_eui = "70b3d57ed0000007"
join_eui = "70b3d57ed00000dc"
app_key = "000102030405060708090a0b0c0d0e0f"
class = "C"
"#;

/// A formatter for `stream` (a `[[stream]]` table's body) over [`DEVICES`].
fn formatter(stream: &str) -> Formatter {
    let src =
        format!("[gateway]\nnet_id = \"000013\"\n{DEVICES}\n[[stream]]\nname = \"s\"\n{stream}\n");
    let cfg = Config::parse(&src, "t.toml").unwrap_or_else(|e| panic!("{e}"));
    Formatter::new(&cfg.streams[0], Arc::new(Facts::new(&cfg)))
}

fn uplink(dev: &str) -> Uplink {
    let mut u = fixtures::uplink(1, 42);
    u.application = "farm".into();
    u.device = if dev == "70b3d57ed0000007" {
        "meter-7"
    } else {
        "soil-1"
    }
    .into();
    u.dev_eui = dev.parse().unwrap();
    u
}

fn json(b: &[u8]) -> serde_json::Value {
    serde_json::from_slice(b).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(b)))
}

const LIVE: Delivery = Delivery { now_us: 1 };

#[test]
fn tts_adds_join_eui_and_network_ids_and_keeps_lorastream_topics() {
    let f = formatter("server = \"mqtt://localhost\"\ntopic_prefix = \"lp\"");
    assert_eq!(f.format(), Format::Tts);
    assert_eq!(f.content_type(), "application/json");
    let otaa = Record::Uplink(uplink("70b3d57ed0000007"));
    let v = json(&f.body(&otaa, LIVE).unwrap().unwrap());
    assert_eq!(v["end_device_ids"]["join_eui"], "70B3D57ED00000DC");
    assert_eq!(v["uplink_message"]["network_ids"]["net_id"], "000013");
    assert_eq!(f.topic(&otaa), "lp/farm/devices/meter-7/up");
    let abp = Record::Uplink(uplink("70b3d57ed0000001"));
    let v = json(&f.body(&abp, LIVE).unwrap().unwrap());
    assert!(
        v["end_device_ids"].get("join_eui").is_none(),
        "ABP: no JoinEUI"
    );
    assert_eq!(
        f.downlink_filters(),
        ["lp/+/devices/+/down/push", "lp/+/devices/+/down/replace"]
    );
    let req = f
        .downlink_request(
            "lp/farm/devices/soil-1/down/replace",
            br#"{"downlinks":[{"f_port":2,"frm_payload":"AQ=="}]}"#,
        )
        .unwrap();
    assert_eq!(
        (req.device.as_str(), req.op, req.stream.as_str()),
        ("soil-1", DownlinkOp::Replace, "s")
    );
    assert!(f
        .downlink_request(
            "application/farm/device/70b3d57ed0000001/command/down",
            b"{}"
        )
        .is_none());
}

#[test]
fn chirpstack_topics_bodies_and_downlinks() {
    let f = formatter("server = \"mqtt://localhost\"\nformat = \"chirpstack\"");
    let u = uplink("70b3d57ed0000007");
    let r = Record::Uplink(u.clone());
    assert_eq!(
        f.topic(&r),
        "application/farm/device/70b3d57ed0000007/event/up"
    );
    let v = json(&f.body(&r, LIVE).unwrap().unwrap());
    assert_eq!(v["deviceInfo"]["deviceName"], "meter-7");
    assert_eq!(v["deviceInfo"]["deviceClassEnabled"], "CLASS_C");
    assert_eq!(v["dr"], 5, "SF7/125 kHz is DR5 in EU868");
    assert_eq!(v["regionConfigId"], "eu868");
    assert_eq!(v["fCnt"], 42);
    assert!(v.get("object").is_none(), "no codec, no object");

    // Downlinks: every application's command topic, devices found by DevEUI.
    assert_eq!(
        f.downlink_filters(),
        ["application/+/device/+/command/down"]
    );
    let req = f
        .downlink_request(
            "application/farm/device/70B3D57ED0000007/command/down",
            br#"{"devEui":"70b3d57ed0000007","fPort":10,"data":"AQID","confirmed":true,"id":"0193a5b2-0000-4000-8000-00000000abcd"}"#,
        )
        .unwrap();
    assert_eq!(
        (req.application.as_str(), req.device.as_str()),
        ("farm", "meter-7")
    );
    let items = req.items.unwrap();
    assert_eq!(items[0].payload, vec![1, 2, 3]);
    assert_eq!(items[0].f_port, 10);
    assert!(items[0].confirmed);
    assert_eq!(items[0].id, 0x0193a5b2_0000_4000_8000_00000000abcd);
    // An unknown DevEUI goes on under its EUI (the scheduler counts it as unknown).
    let req = f
        .downlink_request(
            "application/farm/device/0000000000000009/command/down",
            br#"{"fPort":1,"data":""}"#,
        )
        .unwrap();
    assert_eq!(req.device, "0000000000000009");
    // An object waits for the device's codec (encoded on the way to the scheduler).
    let req = f
        .downlink_request(
            "application/farm/device/70b3d57ed0000007/command/down",
            br#"{"fPort":1,"object":{"a":1}}"#,
        )
        .unwrap();
    let items = req.items.unwrap();
    assert_eq!(
        items[0].decoded_payload.as_ref().unwrap()["a"],
        serde_json::json!(1)
    );
    // Refusals become down/failed (a ChirpStack log event), with the reason.
    for (body, why) in [
        (
            r#"{"fPort":1,"data":"","expiresAt":"2030-01-01T00:00:00Z"}"#,
            "expiresAt",
        ),
        (r#"{"fPort":0,"data":""}"#, "fPort 0"),
        (
            r#"{"fPort":1,"data":"AA==","devEui":"0000000000000001"}"#,
            "does not match",
        ),
        ("not json", "invalid JSON"),
    ] {
        let req = f
            .downlink_request(
                "application/farm/device/70b3d57ed0000007/command/down",
                body.as_bytes(),
            )
            .unwrap();
        let e = req.items.unwrap_err().to_string();
        assert!(e.contains(why), "{body}: {e}");
    }
    let big = format!(
        r#"{{"fPort":1,"data":"{}"}}"#,
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [0u8; 243])
    );
    let req = f
        .downlink_request(
            "application/farm/device/70b3d57ed0000007/command/down",
            big.as_bytes(),
        )
        .unwrap();
    assert!(req.items.unwrap_err().to_string().contains("243 bytes"));
    // Not a device topic: ignored.
    assert!(f
        .downlink_request("application/farm/device/xyz/command/down", b"{}")
        .is_none());

    // An application-scoped stream subscribes to its application only.
    let f =
        formatter("server = \"mqtt://localhost\"\nformat = \"chirpstack\"\napplication = \"farm\"");
    assert_eq!(
        f.downlink_filters(),
        ["application/farm/device/+/command/down"]
    );
}

fn event(kind: DownlinkEventKind, detail: serde_json::Value) -> DownlinkEvent {
    DownlinkEvent {
        stream: "s".into(),
        application: "farm".into(),
        device: "soil-1".into(),
        dev_eui: "70b3d57ed0000001".parse().unwrap(),
        kind,
        item: Some(DownlinkItem {
            id: 0x0193a5b2_0000_4000_8000_00000000abcd,
            f_port: 2,
            payload: vec![1],
            confirmed: true,
            priority: "NORMAL".into(),
            correlation_ids: vec![],
            stream: "s".into(),
            decoded_payload: None,
        }),
        detail,
    }
}

/// The `downlink_sent` detail as the scheduler writes it.
fn sent_detail(class: &str, rx_window: u64) -> serde_json::Value {
    serde_json::json!({
        "f_cnt": 7,
        "gateway_ids": {"gateway_id": "eui-aa555a0000000001", "eui": "AA555A0000000001"},
        "timestamp": 3_000_123u32,
        "class": class,
        "rx_window": rx_window,
        "frequency": "868300000",
        "data_rate_index": 3,
        "data_rate": {"lora": {"spreading_factor": 9, "bandwidth": 125000, "coding_rate": "4/5"}},
        "power_dbm": 16,
    })
}

#[test]
fn chirpstack_downlink_events() {
    let f = formatter("server = \"mqtt://localhost\"\nformat = \"chirpstack\"");
    let base = "application/farm/device/70b3d57ed0000001/event/";
    assert!(f
        .event_message(&event(DownlinkEventKind::Queued, serde_json::json!({})))
        .is_none());

    let (t, body) = f
        .event_message(&event(DownlinkEventKind::Sent, sent_detail("A", 1)))
        .unwrap();
    assert_eq!(t, format!("{base}txack"));
    let v = json(&body);
    assert_eq!(v["queueItemId"], "0193a5b2-0000-4000-8000-00000000abcd");
    assert_eq!(v["fCntDown"], 7);
    assert_eq!(v["gatewayId"], "aa555a0000000001");
    let tx = &v["txInfo"];
    assert_eq!(tx["frequency"], 868_300_000);
    assert_eq!(tx["power"], 16);
    assert_eq!(tx["modulation"]["lora"]["spreadingFactor"], 9);
    assert_eq!(tx["modulation"]["lora"]["polarizationInversion"], true);
    assert_eq!(tx["timing"]["delay"]["delay"], "1s");
    // The uplink's tmst: the transmission's less RX1's delay, 4 bytes big-endian.
    let ctx = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        tx["context"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(ctx, 2_000_123u32.to_be_bytes());

    let (_, body) = f
        .event_message(&event(DownlinkEventKind::Sent, sent_detail("A", 2)))
        .unwrap();
    assert_eq!(json(&body)["txInfo"]["timing"]["delay"]["delay"], "2s");
    let (_, body) = f
        .event_message(&event(DownlinkEventKind::Sent, sent_detail("C", 0)))
        .unwrap();
    let v = json(&body);
    assert_eq!(
        v["txInfo"]["timing"],
        serde_json::json!({"immediately": {}})
    );
    assert!(v["txInfo"].get("context").is_none());

    let (t, body) = f
        .event_message(&event(
            DownlinkEventKind::Nack,
            serde_json::json!({"attempts": 3}),
        ))
        .unwrap();
    assert_eq!(t, format!("{base}ack"));
    assert_eq!(json(&body)["acknowledged"], false);
    let (_, body) = f
        .event_message(&event(DownlinkEventKind::Ack, serde_json::json!({})))
        .unwrap();
    assert_eq!(json(&body)["acknowledged"], true);

    let (t, body) = f
        .event_message(&event(
            DownlinkEventKind::Failed,
            serde_json::json!({"error": "payload too large"}),
        ))
        .unwrap();
    assert_eq!(t, format!("{base}log"));
    let v = json(&body);
    assert_eq!(v["level"], "ERROR");
    assert_eq!(v["description"], "payload too large");
    assert_eq!(
        v["context"]["queue_item_id"],
        "0193a5b2-0000-4000-8000-00000000abcd"
    );
}

#[test]
fn xml_documents_events_and_batches() {
    let f = formatter("kind = \"http\"\nurl = \"http://localhost/x\"\nformat = \"xml\"");
    assert_eq!(f.content_type(), "application/xml");
    let r = Record::Uplink(uplink("70b3d57ed0000007"));
    let doc = f.body(&r, LIVE).unwrap().unwrap();
    let text = String::from_utf8(doc.clone()).unwrap();
    let parsed = roxmltree::Document::parse(&text).unwrap();
    assert_eq!(parsed.root_element().tag_name().name(), "application_up");
    let join_eui = parsed
        .descendants()
        .find(|n| n.has_tag_name("join_eui"))
        .and_then(|n| n.text());
    assert_eq!(join_eui, Some("70B3D57ED00000DC"));
    assert!(!text.contains('\n'), "one line");

    // Several documents in one request: one <messages> document.
    let two = f.batch(vec![doc.clone(), doc.clone()]);
    let two = String::from_utf8(two).unwrap();
    let parsed = roxmltree::Document::parse(&two).unwrap();
    let root = parsed.root_element();
    assert_eq!(root.tag_name().name(), "messages");
    let kids: Vec<_> = root.children().filter(|n| n.is_element()).collect();
    assert_eq!(kids.len(), 2);
    assert!(kids.iter().all(|k| k.has_tag_name("application_up")));

    // Events are XML too.
    let ev = f
        .event_body(&event(DownlinkEventKind::Queued, serde_json::json!({})))
        .unwrap();
    let text = String::from_utf8(ev).unwrap();
    let parsed = roxmltree::Document::parse(&text).unwrap();
    assert!(parsed
        .descendants()
        .any(|n| n.has_tag_name("downlink_queued")));
    assert_eq!(f.events_content_type(), "application/xml");

    // batch_max = 1: the document itself.
    let f =
        formatter("kind = \"http\"\nurl = \"http://localhost/x\"\nformat = \"xml\"\nbatch_max = 1");
    assert_eq!(f.batch(vec![doc.clone()]), doc);
}

#[test]
fn json_batches_are_arrays_unless_batch_max_is_one() {
    let f = formatter("kind = \"http\"\nurl = \"http://localhost/x\"");
    assert_eq!(f.batch(vec![]), b"[]");
    assert_eq!(
        f.batch(vec![b"{}".to_vec(), b"{\"a\":1}".to_vec()]),
        b"[{},{\"a\":1}]"
    );
    assert_eq!(f.batch(vec![b"{}".to_vec()]), b"[{}]", "a batch of one");
    let f = formatter("kind = \"http\"\nurl = \"http://localhost/x\"\nbatch_max = 1");
    assert_eq!(f.batch(vec![b"{\"a\":1}".to_vec()]), b"{\"a\":1}");
    assert_eq!(f.batch_events(vec![b"{}".to_vec()]), b"{}");
}

#[test]
fn templates_render_and_batch_by_content_type() {
    let dir = tempfile::tempdir().unwrap();
    let tb = dir.path().join("tb.j2");
    std::fs::write(
        &tb,
        r#"{"ts": {{ received_at | timestamp_ms }}, "values": {"f_cnt": {{ uplink_message.f_cnt }}, "device": {{ end_device_ids.device_id | tojson }}}}"#,
    )
    .unwrap();
    let csv = dir.path().join("line.csv.j2");
    std::fs::write(
        &csv,
        "{{ end_device_ids.device_id | csv }},{{ uplink_message.f_cnt }}\n",
    )
    .unwrap();
    let f = formatter(&format!(
        "kind = \"http\"\nurl = \"http://localhost/x\"\nformat = \"template\"\ntemplate_file = {:?}\ncontent_type = \"application/json\"",
        tb.display().to_string()
    ));
    assert_eq!(f.content_type(), "application/json");
    let r = Record::Uplink(uplink("70b3d57ed0000001"));
    let body = f.body(&r, LIVE).unwrap().unwrap();
    let v = json(&body);
    assert_eq!(v["values"]["f_cnt"], 42);
    assert_eq!(v["values"]["device"], "soil-1");
    assert_eq!(v["ts"], 0, "received_at 1 µs after the epoch");
    let arr = json(&f.batch(vec![body.clone(), body.clone()]));
    // Joins are not rendered (an uplink template would only fail on them).
    let join = Record::Join(crate::model::Join {
        id: 1,
        received_at_us: 1,
        application: "farm".into(),
        device: "soil-1".into(),
        dev_eui: "70b3d57ed0000001".parse().unwrap(),
        join_eui: Eui64::default(),
        dev_addr: crate::model::DevAddr(1),
        settings: fixtures::settings(),
        rx: vec![],
    });
    assert!(f.body(&join, LIVE).unwrap().is_none());
    assert_eq!(arr.as_array().map(Vec::len), Some(2));
    // Events stay TTS JSON.
    let ev = f
        .event_body(&event(DownlinkEventKind::Queued, serde_json::json!({})))
        .unwrap();
    assert!(json(&ev).get("downlink_queued").is_some());
    assert_eq!(f.events_content_type(), "application/json");

    let f = formatter(&format!(
        "kind = \"file\"\npath = \"/tmp/x\"\nformat = \"template\"\ntemplate_file = {:?}",
        csv.display().to_string()
    ));
    assert_eq!(f.content_type(), "text/plain; charset=utf-8");
    let line = f.body(&r, LIVE).unwrap().unwrap();
    assert_eq!(line, b"soil-1,42\n");
    assert_eq!(Formatter::line(line.clone()), line, "no second newline");
    assert_eq!(
        f.batch(vec![line.clone(), line.clone()]),
        b"soil-1,42\nsoil-1,42\n"
    );
    assert_eq!(Formatter::line(b"{}".to_vec()), b"{}\n");
}

#[test]
fn json_media_types() {
    assert!(is_json("application/json"));
    assert!(is_json("Application/JSON; charset=utf-8"));
    assert!(is_json("application/vnd.thingsboard+json"));
    assert!(!is_json("text/csv"));
    assert!(!is_json("application/jsonl"));
}

/// A codec's result as every format shows it: TTS `decoded_payload` (+ warnings) or
/// `lorastream.codec_error`, ChirpStack `object`, the same in XML and in a template's context.
#[test]
fn decoded_payloads_in_every_format() {
    use crate::model::{CodecOutput, JsonObject};
    let mut u = uplink("70b3d57ed0000001");
    let data = serde_json::json!({"temperature_3": 27.2, "gps_1": {"latitude": 52.3655}});
    u.codec = Some(CodecOutput::Decoded {
        data: JsonObject(data.as_object().unwrap().clone()),
        warnings: vec!["battery low".into()],
    });
    let decoded = Record::Uplink(u.clone());
    u.codec = Some(CodecOutput::Error(
        "CayenneLPP: unknown data type 255".into(),
    ));
    let failed = Record::Uplink(u);

    let f = formatter("server = \"mqtt://localhost\"");
    let v = json(&f.body(&decoded, LIVE).unwrap().unwrap());
    assert_eq!(v["uplink_message"]["decoded_payload"], data);
    assert_eq!(
        v["uplink_message"]["decoded_payload_warnings"],
        serde_json::json!(["battery low"])
    );
    assert!(v["uplink_message"].get("lorastream").is_none());
    let v = json(&f.body(&failed, LIVE).unwrap().unwrap());
    assert!(v["uplink_message"].get("decoded_payload").is_none());
    assert_eq!(
        v["uplink_message"]["lorastream"]["codec_error"],
        "CayenneLPP: unknown data type 255"
    );
    assert_eq!(
        v["uplink_message"]["frm_payload"],
        "q6urq6urq6urq6urq6urq6urq6s="
    );

    let f = formatter("server = \"mqtt://localhost\"\nformat = \"chirpstack\"");
    let v = json(&f.body(&decoded, LIVE).unwrap().unwrap());
    assert_eq!(v["object"]["temperature_3"], 27.2);
    assert_eq!(v["object"]["gps_1"]["latitude"], 52.3655);
    let v = json(&f.body(&failed, LIVE).unwrap().unwrap());
    assert!(v.get("object").is_none());

    let f = formatter("kind = \"http\"\nurl = \"http://localhost/x\"\nformat = \"xml\"");
    let text = String::from_utf8(f.body(&decoded, LIVE).unwrap().unwrap()).unwrap();
    let doc = roxmltree::Document::parse(&text).unwrap();
    let t = doc
        .descendants()
        .find(|n| n.has_tag_name("temperature_3"))
        .and_then(|n| n.text());
    assert_eq!(t, Some("27.2"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let tb = dir.path().join("tb.j2");
    std::fs::write(
        &tb,
        r#"{"t": {{ uplink_message.decoded_payload.temperature_3 }}, "e": {{ (uplink_message.lorastream or {}).codec_error | default("") | tojson }}}"#,
    )
    .unwrap();
    let f = formatter(&format!(
        "kind = \"http\"\nurl = \"http://localhost/x\"\nformat = \"template\"\ntemplate_file = {:?}",
        tb.display().to_string()
    ));
    let v = json(&f.body(&decoded, LIVE).unwrap().unwrap());
    assert_eq!(v, serde_json::json!({"t": 27.2, "e": ""}));
}
