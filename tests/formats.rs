//! The message formats checked by independent implementations:
//! - ChirpStack JSON: golden documents (field by field against integration.proto / gw.proto and
//!   pbjson's rules), ChirpStack's own protobuf classes (the `chirpstack-api` Python package,
//!   tests/py/pbcheck.py: unknown fields, wrong types, enum names, pbjson's emission rules), and
//!   downlink commands written by protobuf's serializer parsed back here;
//! - XML: read back by roxmltree and by Python's ElementTree (tests/py/xmlcheck.py) and
//!   compared with the TTS JSON it came from, through the inverse of the documented mapping;
//! - templates: a ThingsBoard-style flat object parsed back as JSON, CSV lines parsed back by
//!   Python's csv module, the shipped examples (docs/templates/), and the failure modes.
//!
//! Python is needed for part of this: such a test is skipped with a message when it is missing,
//! and fails under CI (`LORASTREAM_TEST_PYTHON=1`, tests/support/mod.rs).

mod support;

use base64::Engine;
use lorastream::config::{Config, Region};
use lorastream::model::{DownlinkEvent, DownlinkEventKind, DownlinkItem, Eui64, Record};
use lorastream::streams::format::chirpstack::{
    self, Ack, CommandError, DevStatus, DeviceClass, DeviceRef, DownlinkPayload, DownlinkTx,
    EventMeta, Log, TxAck, TxTiming,
};
use lorastream::streams::format::template::{
    Template, TemplateError, CSV_EXAMPLE, THINGSBOARD_EXAMPLE,
};
use lorastream::streams::format::tts::{record_json, rfc3339};
use lorastream::streams::format::{xml, Decoded, Delivery, Facts, Formatter, UplinkExtras};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use support::records as rec;
use support::{needs_python, python};

const PROTOBUF: &[&str] = &["chirpstack_api.integration", "google.protobuf.json_format"];

fn meta() -> EventMeta {
    let (common, config) = chirpstack::region_names(Region::EU868, None);
    EventMeta {
        device_class: DeviceClass::A,
        tags: BTreeMap::new(),
        region_config_id: config,
        region_common_name: common,
    }
}

// ---- ChirpStack ----

#[test]
fn chirpstack_uplink_event_golden() {
    let obj = serde_json::json!({"temperature": 21.5, "counter": 42});
    let obj = obj.as_object().expect("object");
    let got = chirpstack::uplink_event(&rec::uplink(), Some(5), Some(obj), &meta());
    let want = concat!(
        r#"{"deduplicationId":"01930000-0000-0000-0000-000000000001","#,
        r#""time":"2026-11-18T11:06:40.123456+00:00","#,
        r#""deviceInfo":{"tenantId":"","tenantName":"","applicationId":"farm","applicationName":"farm","#,
        r#""deviceProfileId":"","deviceProfileName":"","deviceName":"soil-1","devEui":"70b3d57ed0000001","#,
        r#""deviceClassEnabled":"CLASS_A","tags":{}},"#,
        r#""devAddr":"26000001","adr":true,"dr":5,"fCnt":70000,"fPort":1,"confirmed":false,"data":"AQIDBA==","#,
        r#""object":{"counter":42.0,"temperature":21.5},"#,
        r#""rxInfo":[{"gatewayId":"aa555a0000000000","uplinkId":1,"nsTime":"2026-11-18T11:06:40.123456+00:00","#,
        r#""rssi":-57,"snr":9.5,"channel":2,"context":"AB6E+w==","#,
        r#""metadata":{"region_common_name":"EU868","region_config_id":"eu868"},"crcStatus":"CRC_OK"}],"#,
        r#""txInfo":{"frequency":868100000,"modulation":{"lora":{"bandwidth":125000,"spreadingFactor":7,"codeRate":"CR_4_5"}}},"#,
        r#""regionConfigId":"eu868"}"#
    );
    assert_eq!(String::from_utf8(got).expect("utf-8"), want);
    // Stable across redeliveries.
    assert_eq!(
        chirpstack::uplink_event(&rec::uplink(), Some(5), Some(obj), &meta()),
        chirpstack::uplink_event(&rec::uplink(), Some(5), Some(obj), &meta())
    );
}

#[test]
fn chirpstack_other_events_golden() {
    let dev = DeviceRef {
        application: "farm",
        device: "soil-1",
        dev_eui: "70b3d57ed0000001".parse().expect("eui"),
    };
    let status = chirpstack::status_event(
        &DevStatus {
            device: dev,
            uplink_id: 1,
            time_us: 0,
            battery: 254,
            margin: chirpstack::margin_from_byte(0x3e),
        },
        &EventMeta::default(),
    );
    let v: serde_json::Value = serde_json::from_slice(&status).expect("json");
    assert_eq!(v["margin"], -2);
    assert_eq!(v["batteryLevel"], 100.0);
    assert_eq!(v["externalPowerSource"], false);
    assert_eq!(v["batteryLevelUnavailable"], false);
    assert_eq!(v["time"], "1970-01-01T00:00:00+00:00");

    let txack = chirpstack::txack_event(
        &TxAck {
            device: dev,
            queue_item_id: 0xabcd_0000_0000_0000_0000_0000_1234_5678,
            time_us: 1_000,
            f_cnt_down: 3,
            gateway: "aa555a0000000000".parse().expect("eui"),
            tx: DownlinkTx {
                settings: rec::settings(),
                power_dbm: 14,
                timing: TxTiming::Delay(Duration::from_secs(1)),
                context_tmst: Some(2_000_123),
            },
        },
        &EventMeta::default(),
    );
    assert_eq!(
        String::from_utf8(txack).expect("utf-8"),
        concat!(
            r#"{"downlinkId":305419896,"time":"1970-01-01T00:00:00.001+00:00","#,
            r#""deviceInfo":{"tenantId":"","tenantName":"","applicationId":"farm","applicationName":"farm","#,
            r#""deviceProfileId":"","deviceProfileName":"","deviceName":"soil-1","devEui":"70b3d57ed0000001","#,
            r#""deviceClassEnabled":"CLASS_A","tags":{}},"#,
            r#""queueItemId":"abcd0000-0000-0000-0000-000012345678","fCntDown":3,"gatewayId":"aa555a0000000000","#,
            r#""txInfo":{"frequency":868100000,"power":14,"modulation":{"lora":{"bandwidth":125000,"spreadingFactor":7,"#,
            r#""codeRate":"CR_4_5","polarizationInversion":true}},"timing":{"delay":{"delay":"1s"}},"context":"AB6E+w=="}}"#
        )
    );
    let log = chirpstack::log_event(
        &Log {
            device: dev,
            time_us: 0,
            description: "f_port 0",
            queue_item_id: Some(1),
        },
        &EventMeta::default(),
    );
    assert_eq!(
        String::from_utf8(log).expect("utf-8"),
        concat!(
            r#"{"time":"1970-01-01T00:00:00+00:00","#,
            r#""deviceInfo":{"tenantId":"","tenantName":"","applicationId":"farm","applicationName":"farm","#,
            r#""deviceProfileId":"","deviceProfileName":"","deviceName":"soil-1","devEui":"70b3d57ed0000001","#,
            r#""deviceClassEnabled":"CLASS_A","tags":{}},"#,
            r#""level":"ERROR","code":"UNKNOWN","description":"f_port 0","#,
            r#""context":{"queue_item_id":"00000000-0000-0000-0000-000000000001"}}"#
        )
    );
}

/// A formatter as the daemon builds it, for `format = "chirpstack"` over `devices`.
fn chirpstack_formatter(devices: &str, region: &str) -> Formatter {
    let src = format!(
        "[gateway]\nregion = \"{region}\"\nsub_band = 2\n[[application]]\nid = \"farm\"\n{devices}\n\
         [[stream]]\nname = \"cs\"\nserver = \"mqtt://127.0.0.1\"\nformat = \"chirpstack\"\n"
    );
    let src = if region == "EU868" {
        src.replace("sub_band = 2\n", "")
    } else {
        src
    };
    let cfg = Config::parse(&src, "t.toml").unwrap_or_else(|e| panic!("{e}"));
    Formatter::new(&cfg.streams[0], Arc::new(Facts::new(&cfg)))
}

const CLASS_C_DEVICE: &str = "[[device]]\napplication = \"farm\"\nid = \"soil-1\"\n\
    dev_eui = \"70b3d57ed0000001\"\nclass = \"C\"\njoin_eui = \"70b3d57ed00000dc\"\n\
    app_key = \"000102030405060708090a0b0c0d0e0f\"\n";

fn downlink_event(kind: DownlinkEventKind, detail: serde_json::Value) -> DownlinkEvent {
    DownlinkEvent {
        stream: "cs".into(),
        application: "farm".into(),
        device: "soil-1".into(),
        dev_eui: "70b3d57ed0000001".parse().expect("eui"),
        kind,
        item: Some(DownlinkItem {
            id: 0x0193a5b2_0000_4000_8000_00000000abcd,
            f_port: 10,
            payload: vec![1, 2, 3],
            confirmed: true,
            priority: "NORMAL".into(),
            correlation_ids: Vec::new(),
            stream: "cs".into(),
            decoded_payload: None,
        }),
        detail,
    }
}

/// Every kind of event, plain and hostile, as (name, protobuf type, JSON): built by the
/// functions directly and by a formatter from the scheduler's downlink events.
fn all_events() -> Vec<(String, &'static str, Vec<u8>)> {
    let m = meta();
    let mut c = meta();
    c.device_class = DeviceClass::C;
    c.tags.insert("site".into(), "north field <&>".into());
    c.tags.insert("é".into(), "😀".into());
    let tricky = rec::tricky_uplink();
    let obj = rec::object();
    let dev = DeviceRef {
        application: rec::TRICKY_APP,
        device: rec::TRICKY_DEVICE,
        dev_eui: Eui64([0xff; 8]),
    };
    let mut out = vec![
        (
            "uplink".to_string(),
            "UplinkEvent",
            chirpstack::uplink_event(&rec::uplink(), Some(5), None, &m),
        ),
        (
            "uplink+object".into(),
            "UplinkEvent",
            chirpstack::uplink_event(&rec::uplink(), Some(0), Some(&obj), &c),
        ),
        (
            "tricky uplink".into(),
            "UplinkEvent",
            chirpstack::uplink_event(&tricky, None, Some(&obj), &c),
        ),
        (
            "no region".into(),
            "UplinkEvent",
            chirpstack::uplink_event(&tricky, None, None, &EventMeta::default()),
        ),
        (
            "join".into(),
            "JoinEvent",
            chirpstack::join_event(&rec::join(), &m),
        ),
    ];
    for (name, uplink_id, ack) in [("ack", Some(7u128), true), ("nack, no uplink", None, false)] {
        out.push((
            name.into(),
            "AckEvent",
            chirpstack::ack_event(
                &Ack {
                    device: dev,
                    uplink_id,
                    time_us: 1_795_000_000_000_001,
                    queue_item_id: u128::MAX,
                    acknowledged: ack,
                    f_cnt_down: u32::MAX,
                },
                &c,
            ),
        ));
    }
    for (name, timing, ctx) in [
        (
            "txack class A",
            TxTiming::Delay(Duration::from_millis(1500)),
            Some(0),
        ),
        ("txack class C", TxTiming::Immediately, None),
    ] {
        out.push((
            name.into(),
            "TxAckEvent",
            chirpstack::txack_event(
                &TxAck {
                    device: dev,
                    queue_item_id: 42,
                    time_us: 0,
                    f_cnt_down: 0,
                    gateway: "0016c001f153a14c".parse().expect("eui"),
                    tx: DownlinkTx {
                        settings: tricky.settings.clone(),
                        power_dbm: 0,
                        timing,
                        context_tmst: ctx,
                    },
                },
                &m,
            ),
        ));
    }
    for battery in [0u8, 1, 100, 254, 255] {
        out.push((
            format!("status battery {battery}"),
            "StatusEvent",
            chirpstack::status_event(
                &DevStatus {
                    device: dev,
                    uplink_id: 9,
                    time_us: 1_795_000_000_000_000,
                    battery,
                    margin: chirpstack::margin_from_byte(0x20),
                },
                &c,
            ),
        ));
    }
    for (name, queue_item_id) in [("log", Some(5u128)), ("log, no item", None)] {
        out.push((
            name.into(),
            "LogEvent",
            chirpstack::log_event(
                &Log {
                    device: dev,
                    time_us: 1,
                    description: "downlinks[0].f_port 0 is not an application port (1..223) <&>",
                    queue_item_id,
                },
                &c,
            ),
        ));
    }
    // What the daemon's formatter makes of records and of the scheduler's events.
    for region in ["EU868", "US915"] {
        let f = chirpstack_formatter(CLASS_C_DEVICE, region);
        let d = Delivery { now_us: 0 };
        out.push((
            format!("formatter uplink {region}"),
            "UplinkEvent",
            f.body(&Record::Uplink(rec::uplink()), d)
                .expect("body")
                .expect("sent"),
        ));
        out.push((
            format!("formatter join {region}"),
            "JoinEvent",
            f.body(&Record::Join(rec::join()), d)
                .expect("body")
                .expect("sent"),
        ));
        let sent = serde_json::json!({
            "f_cnt": 7, "gateway_ids": {"gateway_id": "eui-aa555a0000000001", "eui": "AA555A0000000001"},
            "timestamp": 3_000_123u32, "class": "A", "rx_window": 2, "frequency": "869525000",
            "data_rate_index": 0, "data_rate": {"lora": {"spreading_factor": 12, "bandwidth": 125000, "coding_rate": "4/5"}},
            "power_dbm": 27,
        });
        for (kind, detail, typ) in [
            (DownlinkEventKind::Sent, sent, "TxAckEvent"),
            (
                DownlinkEventKind::Ack,
                serde_json::json!({"attempts": 1}),
                "AckEvent",
            ),
            (
                DownlinkEventKind::Nack,
                serde_json::json!({"attempts": 3}),
                "AckEvent",
            ),
            (
                DownlinkEventKind::Failed,
                serde_json::json!({"error": "queue full"}),
                "LogEvent",
            ),
        ] {
            let (_, body) = f
                .event_message(&downlink_event(kind, detail))
                .expect("published");
            out.push((format!("formatter {kind:?} {region}"), typ, body));
        }
    }
    out
}

/// Example bodies from the contract / docs for `command/down`: ChirpStack must accept them.
const COMMAND_EXAMPLES: &[&str] = &[
    r#"{"devEui":"70b3d57ed0000001","confirmed":false,"fPort":10,"data":"AQID"}"#,
    r#"{"devEui":"70b3d57ed0000001","confirmed":true,"fPort":2,"object":{"led":true,"level":3}}"#,
];

#[test]
fn chirpstack_events_parse_with_chirpstack_protobuf_classes() {
    if !needs_python(
        "chirpstack_events_parse_with_chirpstack_protobuf_classes",
        PROTOBUF,
    ) {
        return;
    }
    let mut lines = Vec::new();
    for (name, typ, json) in all_events() {
        let text = String::from_utf8(json).expect("utf-8");
        lines.push(serde_json::json!({"name": name, "type": typ, "json": text}).to_string());
    }
    for (i, body) in COMMAND_EXAMPLES.iter().enumerate() {
        lines.push(
            serde_json::json!({"name": format!("command example {i}"), "type": "DownlinkCommand", "json": body, "input": true})
                .to_string(),
        );
    }
    let input = lines.join("\n");
    let (ok, out, err) = python("pbcheck.py", &["check"], input.as_bytes());
    print!("{out}");
    assert!(ok, "tests/py/pbcheck.py failed:\n{err}\n{out}");
    let want = format!("{} passed, 0 failed", lines.len());
    assert!(out.contains(&want), "expected {want:?} in:\n{out}");
}

/// The checker itself must notice mistakes, or a green run means nothing.
#[test]
fn pbcheck_catches_mistakes() {
    if !needs_python("pbcheck_catches_mistakes", PROTOBUF) {
        return;
    }
    let good = String::from_utf8(chirpstack::uplink_event(
        &rec::uplink(),
        Some(5),
        None,
        &meta(),
    ))
    .expect("utf-8");
    let bad = [
        ("unknown field", good.replacen("\"adr\"", "\"adrX\"", 1)),
        ("bad enum name", good.replacen("CR_4_5", "4/5", 1)),
        (
            "missing emit_fields field",
            good.replacen("\"confirmed\":false,", "", 1),
        ),
        (
            "default written in gw.*",
            good.replacen("\"channel\":2", "\"channel\":0", 1),
        ),
        ("snake_case name", good.replacen("\"fCnt\"", "\"f_cnt\"", 1)),
        (
            "padding-less base64",
            good.replacen("AQIDBA==", "AQIDBA", 1),
        ),
    ];
    for (name, text) in bad {
        assert_ne!(text, good, "{name}: the mutation did not apply");
        let line =
            serde_json::json!({"name": name, "type": "UplinkEvent", "json": text}).to_string();
        let (ok, out, err) = python("pbcheck.py", &["check"], line.as_bytes());
        assert!(!ok, "{name}: pbcheck accepted it:\n{out}\n{err}");
        assert!(out.contains("0 passed, 1 failed"), "{name}: {out}");
    }
}

#[test]
fn chirpstack_commands_written_by_protobuf_parse_here() {
    if !needs_python(
        "chirpstack_commands_written_by_protobuf_parse_here",
        PROTOBUF,
    ) {
        return;
    }
    let (ok, out, err) = python("pbcheck.py", &["commands"], b"");
    assert!(ok, "tests/py/pbcheck.py commands failed:\n{err}");
    let eui: Eui64 = "70b3d57ed0000001".parse().expect("eui");
    let cmds: Vec<_> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| chirpstack::parse_downlink_command(l.as_bytes(), eui))
        .collect();
    assert_eq!(cmds.len(), 3, "{out}");
    for c in &cmds[..2] {
        let c = c.as_ref().expect("parses");
        assert_eq!(c.id, Some(0x0193a5b2_0000_4000_8000_00000000abcd));
        assert_eq!(c.dev_eui, eui);
        assert!(c.confirmed);
        assert_eq!(c.f_port, 10);
        assert_eq!(c.payload, DownlinkPayload::Data(vec![0x01, 0xfb, 0xff]));
    }
    let c = cmds[2].as_ref().expect("parses");
    assert!(!c.confirmed);
    match &c.payload {
        DownlinkPayload::Object(o) => {
            assert_eq!(o["led"], true);
            assert_eq!(o["level"], 3.0);
        }
        other => panic!("expected an object, got {other:?}"),
    }
}

#[test]
fn chirpstack_command_bodies() {
    let topic = chirpstack::command_down_topic("farm", "70b3d57ed0000001".parse().expect("eui"));
    for body in COMMAND_EXAMPLES {
        chirpstack::parse_command(&topic, body.as_bytes()).expect("example parses");
    }
    let eui: Eui64 = "70b3d57ed0000001".parse().expect("eui");
    let p = |b: &str| chirpstack::parse_downlink_command(b.as_bytes(), eui);
    // What ChirpStack also accepts.
    let c = p(
        r#"{"dev_eui":"70B3D57ED0000001","f_port":"10","data":"-_8","unknown":1,"confirmed":null}"#,
    )
    .expect("proto names, string number, URL-safe base64, unknown field, null");
    assert_eq!(c.payload, DownlinkPayload::Data(vec![0xfb, 0xff]));
    assert_eq!(c.f_port, 10);
    let c = p(r#"{"fPort":1,"data":"","object":{"a":1},"expiresAt":"2026-11-22T10:00:00+00:00"}"#)
        .expect("object wins, devEui from the topic");
    assert!(matches!(c.payload, DownlinkPayload::Object(_)));
    assert!(c.expires_at.is_some());
    assert_eq!(
        p(r#"{"fPort":1,"data":""}"#).expect("empty").payload,
        DownlinkPayload::Data(vec![])
    );
    // Refusals, typed.
    assert!(matches!(p("nope"), Err(CommandError::Json(_))));
    assert!(matches!(p("[1]"), Err(CommandError::NotAnObject)));
    assert!(matches!(
        p(r#"{"fPort":0,"data":"AA=="}"#),
        Err(CommandError::FPort(0))
    ));
    assert!(matches!(
        p(r#"{"fPort":224,"data":"AA=="}"#),
        Err(CommandError::FPort(224))
    ));
    assert!(matches!(p(r#"{"fPort":1}"#), Err(CommandError::NoPayload)));
    assert!(matches!(
        p(r#"{"fPort":1,"data":"!!"}"#),
        Err(CommandError::Base64(_))
    ));
    assert!(matches!(
        p(r#"{"devEui":"70b3d57ed0000002","fPort":1,"data":""}"#),
        Err(CommandError::DevEuiMismatch { .. })
    ));
    assert!(matches!(
        p(r#"{"devEui":"zz","fPort":1,"data":""}"#),
        Err(CommandError::DevEui { .. })
    ));
    assert!(matches!(
        p(r#"{"devEui":"70b3d57ed0000001","dev_eui":"70b3d57ed0000001","fPort":1,"data":""}"#),
        Err(CommandError::Duplicate { .. })
    ));
    assert!(matches!(
        p(r#"{"fPort":1.5,"data":""}"#),
        Err(CommandError::Type { field: "fPort", .. })
    ));
    assert!(matches!(
        p(r#"{"fPort":1,"data":"","id":"x"}"#),
        Err(CommandError::Id(_))
    ));
    assert!(matches!(
        p(r#"{"fPort":1,"data":"","expiresAt":"tomorrow"}"#),
        Err(CommandError::ExpiresAt { .. })
    ));
    assert!(matches!(
        p(r#"{"fPort":1,"object":[1]}"#),
        Err(CommandError::Type {
            field: "object",
            ..
        })
    ));
}

// ---- XML ----

const XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";

/// One canonical form for both sides: element name (or `name` of `<field>`) → value, children
/// sorted by name (stable, so repeated elements keep the array order). An empty string and an
/// empty object are the same (`<k/>`); arrays are repeated members.
#[derive(Debug, PartialEq, Clone)]
enum Canon {
    Text(String),
    Nil,
    Node(Vec<(String, Canon)>),
}

fn node(mut kids: Vec<(String, Canon)>) -> Canon {
    kids.sort_by(|a, b| a.0.cmp(&b.0));
    Canon::Node(kids)
}

fn text(s: String) -> Canon {
    if s.is_empty() {
        Canon::Node(vec![])
    } else {
        Canon::Text(s)
    }
}

fn from_json(v: &serde_json::Value) -> Canon {
    use serde_json::Value as V;
    match v {
        V::Null => Canon::Nil,
        V::Bool(b) => text(b.to_string()),
        V::Number(n) => text(n.to_string()),
        V::String(s) => text(s.clone()),
        V::Object(o) => {
            let mut kids = Vec::new();
            for (k, v) in o {
                push_member(&mut kids, k, v);
            }
            node(kids)
        }
        V::Array(_) => unreachable!("arrays are expanded by push_member"),
    }
}

fn push_member(kids: &mut Vec<(String, Canon)>, k: &str, v: &serde_json::Value) {
    match v {
        serde_json::Value::Array(items) => {
            for it in items {
                match it {
                    serde_json::Value::Array(_) => {
                        let mut inner = Vec::new();
                        push_member(&mut inner, "item", it);
                        kids.push((k.to_string(), node(inner)));
                    }
                    other => kids.push((k.to_string(), from_json(other))),
                }
            }
        }
        other => kids.push((k.to_string(), from_json(other))),
    }
}

fn b64d(s: &str) -> String {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64 in the document");
    String::from_utf8(bytes).expect("utf-8")
}

fn from_xml(e: roxmltree::Node<'_, '_>) -> Canon {
    if e.attribute((XSI, "nil")) == Some("true") {
        return Canon::Nil;
    }
    let kids: Vec<_> = e.children().filter(|c| c.is_element()).collect();
    if kids.is_empty() {
        let t: String = e.children().filter_map(|c| c.text()).collect();
        return text(if e.attribute("encoding") == Some("base64") {
            b64d(&t)
        } else {
            t
        });
    }
    node(kids.into_iter().map(|c| (key_of(c), from_xml(c))).collect())
}

fn key_of(e: roxmltree::Node<'_, '_>) -> String {
    match (e.tag_name().name(), e.attribute("name")) {
        ("field", Some(n)) if e.attribute("name_encoding") == Some("base64") => b64d(n),
        ("field", Some(n)) => n.to_string(),
        (name, _) => name.to_string(),
    }
}

/// Records with their TTS JSON, two of them with a codec's output (hostile keys and values
/// included) and the TTS extras.
fn xml_cases() -> Vec<(Record, Vec<u8>)> {
    let live = Delivery {
        now_us: 1_795_000_000_123_456,
    };
    let late = Delivery {
        now_us: 1_796_000_000_000_000,
    };
    let none = UplinkExtras::default();
    let mut out = Vec::new();
    for (r, d) in [
        (Record::Uplink(rec::uplink()), live),
        (Record::Uplink(rec::tricky_uplink()), late),
        (Record::Join(rec::join()), live),
        (Record::GatewayFrame(rec::gateway_frame()), live),
    ] {
        let json = record_json(&r, &none, d);
        out.push((r, json));
    }
    let mut obj = rec::object();
    obj.insert("k\u{1}ey <&>".into(), "v\u{0}\u{FFFF}".into());
    let warnings = vec!["w1 ]]>".to_string(), "w2\r".to_string()];
    let x = UplinkExtras {
        join_eui: Some("70B3D57ED00000DC".parse().expect("eui")),
        net_id: Some(lorastream::model::NetId(0x13)),
        decoded: Decoded {
            payload: Some(&obj),
            warnings: &warnings,
            error: None,
        },
    };
    let r = Record::Uplink(rec::tricky_uplink());
    let json = record_json(&r, &x, live);
    out.push((r, json));
    let x = UplinkExtras {
        decoded: Decoded {
            error: Some("decodeUplink threw: <boom> & \"bang\"\n"),
            ..Decoded::default()
        },
        ..UplinkExtras::default()
    };
    let r = Record::Uplink(rec::uplink());
    let json = record_json(&r, &x, live);
    out.push((r, json));
    out
}

#[test]
fn xml_read_back_by_roxmltree_equals_the_json() {
    for (r, json) in xml_cases() {
        let doc = xml::record_xml(&r, &json).expect("xml");
        let text = std::str::from_utf8(&doc).expect("utf-8");
        assert!(!text.contains('\n'), "one line: {text}");
        let parsed = roxmltree::Document::parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let root = parsed.root_element();
        assert_eq!(root.tag_name().name(), xml::root_element(&r));
        let v: serde_json::Value = serde_json::from_slice(&json).expect("json");
        assert_eq!(from_xml(root), from_json(&v), "{text}");
        // Deterministic.
        assert_eq!(xml::record_xml(&r, &json).expect("xml"), doc);
    }
}

#[test]
fn xml_keeps_tricky_ids() {
    let r = Record::Uplink(rec::tricky_uplink());
    let json = record_json(&r, &UplinkExtras::default(), Delivery { now_us: 0 });
    let doc = xml::record_xml(&r, &json).expect("xml");
    let text = std::str::from_utf8(&doc).expect("utf-8");
    let parsed = roxmltree::Document::parse(text).expect("parses");
    let ids = parsed
        .descendants()
        .find(|n| n.has_tag_name("end_device_ids"))
        .expect("end_device_ids");
    let child = |name: &str| {
        ids.descendants()
            .find(|n| n.has_tag_name(name))
            .unwrap_or_else(|| panic!("{name}"))
    };
    // The device id holds U+0001, which XML 1.0 cannot carry: base64, lossless.
    let dev = child("device_id");
    assert_eq!(dev.attribute("encoding"), Some("base64"));
    assert_eq!(b64d(dev.text().expect("text")), rec::TRICKY_DEVICE);
    // The application id only needs escaping.
    let app = child("application_id");
    assert_eq!(app.attribute("encoding"), None);
    assert_eq!(app.text(), Some(rec::TRICKY_APP));
    assert!(text.contains("app &lt;&amp;&gt; \"x\" 'y'"), "{text}");
}

#[test]
fn xml_read_back_by_python_elementtree_equals_the_json() {
    if !needs_python(
        "xml_read_back_by_python_elementtree_equals_the_json",
        &["xml.etree.ElementTree"],
    ) {
        return;
    }
    let mut lines = Vec::new();
    for (r, json) in xml_cases() {
        let doc = xml::record_xml(&r, &json).expect("xml");
        lines.push(
            serde_json::json!({
                "xml": String::from_utf8(doc).expect("utf-8"),
                "json": String::from_utf8(json).expect("utf-8"),
                "root": xml::root_element(&r),
            })
            .to_string(),
        );
    }
    let (ok, out, err) = python("xmlcheck.py", &[], lines.join("\n").as_bytes());
    print!("{out}");
    assert!(ok, "tests/py/xmlcheck.py failed:\n{err}\n{out}");
    assert!(
        out.contains(&format!("{} passed, 0 failed", lines.len())),
        "{out}"
    );
}

// ---- templates ----

fn with_decoded(r: &Record) -> serde_json::Value {
    let obj = rec::object();
    let x = UplinkExtras {
        decoded: Decoded {
            payload: Some(&obj),
            ..Decoded::default()
        },
        ..UplinkExtras::default()
    };
    serde_json::from_slice(&record_json(r, &x, Delivery { now_us: 0 })).expect("json")
}

fn plain(r: &Record) -> serde_json::Value {
    serde_json::from_slice(&record_json(
        r,
        &UplinkExtras::default(),
        Delivery { now_us: 0 },
    ))
    .expect("json")
}

#[test]
fn template_thingsboard_flat_object() {
    let t = Template::compile("thingsboard.j2", THINGSBOARD_EXAMPLE).expect("compiles");
    for u in [rec::uplink(), rec::tricky_uplink()] {
        let r = Record::Uplink(u.clone());
        let body = t.render(&with_decoded(&r)).expect("renders");
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(v["ts"], u.received_at_us / 1000, "{body}");
        assert_eq!(v["values"]["temperature"], 21.5);
        assert_eq!(v["values"]["rssi"], u.rx[0].rssi);
        // `tojson` keeps even a hostile device id valid JSON.
        assert_eq!(v["values"]["device"], &*u.device);
    }
    // Without a decoded payload (codec error): a typed error, not a broken body.
    assert!(matches!(
        t.render(&plain(&Record::Uplink(rec::uplink()))),
        Err(TemplateError::Render { .. })
    ));
}

/// The template shipped in docs/templates/ (and shown in README): optional values are null.
#[test]
fn template_shipped_thingsboard_example() {
    let src = include_str!("../docs/templates/thingsboard.j2");
    let t = Template::compile("thingsboard.j2", src).expect("compiles");
    let r = Record::Uplink(rec::uplink());
    let v: serde_json::Value =
        serde_json::from_str(&t.render(&plain(&r)).expect("renders")).expect("json");
    assert_eq!(v["ts"], 1_795_000_000_123i64);
    assert_eq!(v["values"]["temperature"], serde_json::Value::Null);
    assert_eq!(v["values"]["f_cnt"], 70_000);
    assert_eq!(v["values"]["rssi"], -57);
    assert_eq!(v["values"]["snr"], 9.5);
    assert_eq!(v["values"]["device"], "soil-1");
    let v: serde_json::Value =
        serde_json::from_str(&t.render(&with_decoded(&r)).expect("renders")).expect("json");
    assert_eq!(v["values"]["temperature"], 21.5);
    assert_eq!(v["values"]["humidity"], serde_json::Value::Null);
}

#[test]
fn template_csv_lines_parse_back() {
    if !needs_python("template_csv_lines_parse_back", &["csv"]) {
        return;
    }
    for (name, src) in [
        ("CSV_EXAMPLE", CSV_EXAMPLE),
        (
            "docs/templates/uplinks.csv.j2",
            include_str!("../docs/templates/uplinks.csv.j2"),
        ),
    ] {
        let t = Template::compile(name, src).expect("compiles");
        let mut body = String::new();
        let mut want = Vec::new();
        for u in [rec::uplink(), rec::tricky_uplink()] {
            let r = Record::Uplink(u.clone());
            let json = record_json(&r, &UplinkExtras::default(), Delivery { now_us: 0 });
            body.push_str(&t.render_json(&json).expect("renders"));
            want.push(vec![
                rfc3339(u.received_at_us),
                u.device.to_string(),
                u.f_cnt.to_string(),
                u.f_port.map(|p| p.to_string()).unwrap_or_default(),
                hex::encode(&u.payload),
                u.rx[0].rssi.to_string(),
                u.rx[0].snr.to_string(),
            ]);
        }
        let (ok, out, err) = python("csvparse.py", &[], body.as_bytes());
        assert!(ok, "{err}");
        let rows: Vec<Vec<String>> = serde_json::from_str(&out).expect("rows");
        assert_eq!(rows, want, "{name}: {body}");
    }
}

#[test]
fn template_errors_at_check_time_name_the_line() {
    for (src, want_line) in [
        ("{\"a\": {{ uplink_message.f_cnt }\n", 1),
        ("ok\n{% for x in uplink_message.rx_metadata %}\n", 2),
        (
            "{{ end_device_ids.device_id }}\n{{ uplink_mesage.f_cnt }}",
            2,
        ),
        ("{{ received_at | timestamp }}", 1),
    ] {
        let e = Template::compile("bad.j2", src).expect_err(src);
        let line = match &e {
            TemplateError::Syntax { line, .. }
            | TemplateError::UnknownVariable { line, .. }
            | TemplateError::Unknown { line, .. } => *line,
            other => panic!("{src:?}: unexpected {other:?}"),
        };
        assert_eq!(line, want_line, "{src:?}: {e}");
        assert!(
            e.to_string().starts_with(&format!("bad.j2:{want_line}: ")),
            "{e}"
        );
    }
}
