use super::*;
use crate::activity::{DataRateLabel, SignalPoint, UplinkNote};
use crate::config::Config;
use crate::ingress::udp::{GatewayStat, Gateways};
use crate::model::Eui64;
use crate::store::Store;

#[test]
fn esc_escapes_every_markup_character() {
    assert_eq!(
        esc(r#"<script>alert("x")</script> & 'y'"#),
        "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
    );
    assert_eq!(esc("plain-id_1.2"), "plain-id_1.2");
}

#[test]
fn origin_drops_credentials_path_and_query() {
    let u = url::Url::parse("https://user:pa55@iot.example.com:8443/api/v1/TOKEN/x?code=abc#f")
        .unwrap();
    assert_eq!(origin(&u), "https://iot.example.com:8443");
    let u = url::Url::parse("mqtts://u:p@broker.example.com").unwrap();
    assert_eq!(origin(&u), "mqtts://broker.example.com");
}

#[test]
fn sparkline_scales_into_the_box() {
    assert_eq!(
        points(&[0.0, 10.0], (0.0, 10.0), 24, 14),
        "2.0,12.0 22.0,2.0"
    );
    // Out of range: clamped to the edge.
    assert_eq!(
        points(&[-5.0, 50.0], (0.0, 10.0), 24, 14),
        "2.0,12.0 22.0,2.0"
    );
    // One value: a flat line across; an empty range does not divide by zero.
    assert_eq!(points(&[5.0], (0.0, 10.0), 24, 14), "2.0,7.0 22.0,7.0");
    assert_eq!(
        points(&[5.0, 5.0], (5.0, 5.0), 24, 14),
        "2.0,12.0 22.0,12.0"
    );
}

/// Secrets of every kind a config can hold; none may show on the page or in the JSON.
const SECRETS: [&str; 9] = [
    "0102030405060708090a0b0c0d0e0f10",
    "a1a2a3a4a5a6a7a8a9aaabacadaeafb0",
    "MqTtPaSsWoRd",
    "UrLpAsS",
    "DEVICETOKEN123",
    "QuErYcOdE",
    "BeArErToKeN",
    "SmTpPaSsWoRd",
    "WsUsEr",
];

fn secret_config(dir: &std::path::Path, device_id: &str) -> Config {
    let src = format!(
        r#"[gateway]
listen = "127.0.0.1:0"
eui = "AA555A00000000FF"

[storage]
path = {:?}

[[application]]
id = "farm"

[[device]]
application = "farm"
id = '{device_id}'
dev_eui = "70B3D57ED0000001"
dev_addr = "26000001"
nwk_s_key = "{}"
app_s_key = "{}"

[[stream]]
name = "cloud"
server = "mqtt://user:UrLpAsS@broker.example.com:1883"
username = "gw"
password = "{}"

[[stream]]
name = "tb"
kind = "http"
url = "https://thingsboard.example.com/api/v1/{}/telemetry?code={}"
headers = {{ "Authorization" = "Bearer {}" }}

[[stream]]
name = "ws"
kind = "websocket"
url = "wss://{}:x@ws.example.com/lorawan"

[[stream]]
name = "mail"
kind = "smtp"
server = "smtps://mail.example.com"
username = "gw"
password = "{}"
from = "gw@example.com"
to = ["ops@example.com"]
"#,
        dir.join("db").display().to_string(),
        SECRETS[0],
        SECRETS[1],
        SECRETS[2],
        SECRETS[4],
        SECRETS[5],
        SECRETS[6],
        SECRETS[8],
        SECRETS[7],
    );
    Config::parse(&src, "t.toml").unwrap_or_else(|e| panic!("{e}\n{src}"))
}

/// A document from a real store and registry of `cfg`, with one uplink of its device.
fn live_doc(cfg: &Config, dir: &std::path::Path) -> StatusDoc {
    live_doc_with(cfg, dir, None)
}

fn live_doc_with(
    cfg: &Config,
    dir: &std::path::Path,
    dev_status: Option<crate::model::DevStatus>,
) -> StatusDoc {
    let specs: Vec<_> = cfg
        .streams
        .iter()
        .map(|s| (s.name.clone(), s.when_full))
        .collect();
    let (store, _) = Store::open(&cfg.storage, &specs).unwrap();
    let mut registry = crate::devices::registry(cfg, &store).unwrap();
    registry.device_mut(0).mac.dev_status = dev_status;
    let activity = Activity::new();
    let dev_eui = Eui64::from_u64(0x70B3_D57E_D000_0001);
    for f_cnt in 0..3 {
        activity.uplink(UplinkNote {
            dev_eui,
            at_us: now_us(),
            f_cnt,
            data_rate: Some(DataRateLabel {
                dr: Some(5),
                spreading_factor: 7,
                bandwidth_khz: 125,
            }),
            signal: SignalPoint {
                f_cnt,
                rssi: -60 - f_cnt as i32,
                snr: 7.5,
            },
            dev_status: None,
        });
    }
    activity.sample_queues(1, [("cloud".to_string(), 3)]);
    activity.sample_queues(2, [("cloud".to_string(), 5)]);
    let sources = Sources {
        metrics: crate::metrics::Metrics::new(),
        store,
        gateways: Gateways::new(10, false),
        started: std::time::Instant::now(),
    };
    let _ = dir;
    doc(
        sources.health(),
        device_facts(&registry),
        &activity,
        &stream_infos(cfg),
        now_us(),
    )
}

#[test]
fn page_and_json_hold_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = secret_config(dir.path(), "soil-1");
    let d = live_doc(&cfg, dir.path());
    let (page, json) = (html(&d), json(&d));
    for s in SECRETS {
        for (what, text) in [("page", &page), ("json", &json)] {
            assert!(
                !text.to_lowercase().contains(&s.to_lowercase()),
                "{s} on the {what}:\n{text}"
            );
        }
    }
    // What the page is for is there.
    for text in [&page, &json] {
        assert!(text.contains("soil-1"), "{text}");
        assert!(text.contains("70B3D57ED0000001"), "{text}");
        assert!(text.contains("https://thingsboard.example.com"), "{text}");
        assert!(text.contains("mqtt://broker.example.com:1883"), "{text}");
        assert!(text.contains("wss://ws.example.com"), "{text}");
    }
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["devices"][0]["f_cnt"], 2);
    assert_eq!(v["devices"][0]["signal"].as_array().unwrap().len(), 3);
    assert_eq!(v["streams"].as_array().unwrap().len(), 4);
    assert!(page.contains("<polyline"), "{page}");
    // The queue depth samples, and their chart.
    let cloud = d.streams.iter().find(|s| s.name == "cloud").unwrap();
    assert_eq!(cloud.depth_history, vec![3, 5]);
    assert!(
        page.contains("aria-label=\"queue depth over time\""),
        "{page}"
    );
}

#[test]
fn names_and_gateway_data_from_input_are_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let evil = "<script>alert(1)</script>";
    let cfg = secret_config(dir.path(), "x\"><img src=y onerror=z>");
    let mut d = live_doc(&cfg, dir.path());
    d.gateways.push(GatewayView {
        eui: "AA555A0000000001".into(),
        pull_addr: None,
        push_addr: Some("127.0.0.1:1700".into()),
        last_seen_s: 1.0,
        online: true,
        rx_frames: 1,
        address_changes: 0,
        stat: Some(GatewayStat {
            time: evil.into(),
            lati: None,
            long: None,
            alti: None,
            rxnb: 1,
            rxok: 1,
            rxfw: 1,
            ackr: None,
            dwnb: 0,
            txnb: 0,
            temp: None,
        }),
    });
    d.alerts.push(AlertView {
        id: "a1".into(),
        kind: "device_silent",
        subject: evil.into(),
        since_us: 0,
    });
    let page = html(&d);
    assert!(!page.contains(evil), "{page}");
    assert!(!page.contains("<img"), "{page}");
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{page}"
    );
    assert!(
        page.contains("x&quot;&gt;&lt;img src=y onerror=z&gt;"),
        "{page}"
    );
    // The page's only script is its own.
    assert_eq!(page.matches("<script>").count(), 1, "{page}");
}

#[test]
fn the_policy_allows_exactly_the_page_s_own_script_and_style() {
    let csp = content_security_policy();
    assert!(
        csp.starts_with("default-src 'none'; script-src 'sha256-"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe"), "{csp}");
    // The hash is of the script as it appears between the tags.
    let page_script = format!("<script>{SCRIPT}</script>");
    assert!(html(&empty_doc()).contains(&page_script));
    assert!(csp.contains(&sha256_b64(SCRIPT)));
}

fn empty_doc() -> StatusDoc {
    StatusDoc {
        status: "ok",
        version: "0",
        uptime_s: 0,
        now_us: 0,
        store_writable: true,
        gateways: vec![],
        gateways_total: 0,
        devices: vec![],
        devices_total: 0,
        streams: vec![],
        alerts: vec![],
        frames: vec![],
    }
}

#[test]
fn the_json_stays_bounded_with_many_devices() {
    // Every bounded list at its cap, with long ids: the answer stays small for a Pi.
    let mut d = empty_doc();
    let row = DeviceRow {
        id: "d".repeat(64),
        application: "a".repeat(64),
        dev_eui: "70B3D57ED0000001".into(),
        dev_addr: Some("26000001".into()),
        last_seen_us: Some(1),
        f_cnt: Some(u32::MAX),
        data_rate: "DR5 (SF7BW125)".into(),
        uplinks: u64::MAX,
        battery: Some("100%".into()),
        signal: vec![(u32::MAX, -120, -20.5); crate::activity::DEVICE_HISTORY],
    };
    d.devices = vec![row; MAX_PAGE_DEVICES];
    let n = json(&d).len();
    assert!(n < 512 * 1024, "{n} bytes");
}

#[test]
fn battery_shows_as_percent_external_power_or_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = secret_config(dir.path(), "soil-1");
    for (battery, shown) in [
        (128u8, Some("50%")),
        (254, Some("100%")),
        (0, Some("external power")),
        (255, Some("unknown")),
    ] {
        let st = crate::model::DevStatus {
            battery,
            margin: 5,
            received_at_us: 1,
        };
        let d = live_doc_with(&cfg, dir.path(), Some(st));
        assert_eq!(d.devices[0].battery.as_deref(), shown, "battery {battery}");
        assert!(html(&d).contains(&format!("<td>{}</td>", shown.unwrap())));
    }
    let d = live_doc_with(&cfg, dir.path(), None);
    assert_eq!(d.devices[0].battery, None);
    assert!(!json(&d).contains("battery"));
}
