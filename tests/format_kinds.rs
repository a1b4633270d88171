//! Every format on the stream kinds that carry them, through a real daemon: MQTT (a real
//! broker) with `xml` and `template` bodies on lorastream's topics, `file` streams with `xml`,
//! `template` (CSV) and `chirpstack` lines; and a template that cannot render some records:
//! those are dropped and counted, the others still flow (the MQTT window does not shrink).

mod support;

use lorastream::daemon::Daemon;
use lorastream::model::Eui64;
use lorastream::sim::{Forwarder, Radio};
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xml_template_and_chirpstack_on_mqtt_and_file_streams() {
    install_crypto();
    let broker = Broker::start(BrokerKind::Embedded).await;
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(n).display().to_string();
    std::fs::write(
        path("tb.j2"),
        include_str!("../docs/templates/thingsboard.j2"),
    )
    .unwrap();
    std::fs::write(
        path("csv.j2"),
        include_str!("../docs/templates/uplinks.csv.j2"),
    )
    .unwrap();
    // Odd counters render, even ones look into a field that is not there.
    std::fs::write(
        path("half.j2"),
        "{% if uplink_message.f_cnt % 2 == 1 %}ok {{ uplink_message.f_cnt }}{% else %}{{ uplink_message.nothing.here }}{% endif %}",
    )
    .unwrap();
    let url = broker.url();
    let mut d = device(1);
    let streams = format!(
        "[[stream]]\nname = \"mx\"\nserver = \"{url}\"\ntopic_prefix = \"mx\"\nformat = \"xml\"\n\n\
         [[stream]]\nname = \"mt\"\nserver = \"{url}\"\ntopic_prefix = \"mt\"\nformat = \"template\"\ntemplate_file = {:?}\n\n\
         [[stream]]\nname = \"half\"\nserver = \"{url}\"\ntopic_prefix = \"half\"\nformat = \"template\"\ntemplate_file = {:?}\ninflight = 1\n\n\
         [[stream]]\nname = \"fx\"\nkind = \"file\"\npath = {:?}\nformat = \"xml\"\n\n\
         [[stream]]\nname = \"ft\"\nkind = \"file\"\npath = {:?}\nformat = \"template\"\ntemplate_file = {:?}\n\n\
         [[stream]]\nname = \"fc\"\nkind = \"file\"\npath = {:?}\nformat = \"chirpstack\"\n\n\
         [[stream]]\nname = \"fh\"\nkind = \"file\"\npath = {:?}\nformat = \"template\"\ntemplate_file = {:?}\n",
        path("tb.j2"),
        path("half.j2"),
        path("up.xml"),
        path("up.csv"),
        path("csv.j2"),
        path("up.cs.jsonl"),
        path("half.txt"),
        path("half.j2"),
    );
    let cfg = config(
        dir.path(),
        &format!(
            "[[application]]\nid = \"farm\"\n\n{}{streams}",
            device_toml(&d, "farm")
        ),
    );
    let mut sub = Subscriber::connect(broker.port(), "#").await;
    let daemon = Daemon::start(&cfg).await.unwrap();
    let mut fwd = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(0xAA55_5A00_0000_0001))
        .await
        .unwrap();
    const N: u32 = 6;
    for i in 0..N {
        let p = d.uplink(2, &[i as u8], false).unwrap();
        let radio = Radio {
            tmst: 1000 + i,
            ..Radio::default()
        };
        fwd.send(&[(&p, radio)]).await.unwrap();
    }
    // A file stream acknowledges a record once its line is written and fsynced; a record its
    // template cannot render is dropped (and counted) when rendered, before the lines of its
    // batch are written. So wait for the lines themselves: an empty queue alone can be seen
    // before the uplinks are stored, or after a drop but before the write.
    let lines = |f: &str| {
        std::fs::read_to_string(path(f))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    for (f, n) in [
        ("up.xml", N),
        ("up.csv", N),
        ("up.cs.jsonl", N),
        ("half.txt", N / 2),
    ] {
        assert!(
            wait_until(T, || lines(f) >= n as usize).await,
            "{f}: {} lines, expected {n}",
            lines(f)
        );
    }
    for name in ["mx", "mt", "half", "fx", "ft", "fc", "fh"] {
        let q = daemon.store().queue(name).unwrap();
        assert!(wait_until(T, || q.is_empty()).await, "{name} not drained");
    }

    // MQTT, xml: lorastream's topic, one XML document per uplink.
    let got = sub
        .wait_for(N as usize, T, |t, _| t == "mx/farm/devices/dev-1/up")
        .await;
    assert_eq!(got.len(), N as usize);
    assert!(got.iter().all(|v| v.is_null()), "XML bodies are not JSON");
    let xml: Vec<&(String, Vec<u8>)> = sub
        .seen
        .iter()
        .filter(|(t, _)| t == "mx/farm/devices/dev-1/up")
        .collect();
    assert_eq!(xml.len(), N as usize);
    for (i, (_, body)) in xml.iter().enumerate() {
        let text = std::str::from_utf8(body).unwrap();
        let doc = roxmltree::Document::parse(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let f_cnt = doc
            .descendants()
            .find(|n| n.has_tag_name("f_cnt"))
            .and_then(|n| n.text());
        assert_eq!(f_cnt, Some(i.to_string().as_str()));
    }
    // MQTT, template: ThingsBoard's flat object.
    let tb = sub
        .wait_for(N as usize, T, |t, _| t == "mt/farm/devices/dev-1/up")
        .await;
    assert_eq!(tb.len(), N as usize);
    for (i, v) in tb.iter().enumerate() {
        assert_eq!(v["values"]["f_cnt"], i);
        assert_eq!(v["values"]["device"], "dev-1");
        assert!(v["ts"].as_u64().unwrap() > 1_700_000_000_000, "{v}");
        assert_eq!(v["values"]["temperature"], serde_json::Value::Null);
    }
    // A template that fails for half the records: those are dropped and counted; the others
    // are delivered, in order, through a window of one.
    sub.wait_for(3, T, |t, _| t == "half/farm/devices/dev-1/up")
        .await;
    let half: Vec<String> = sub
        .seen
        .iter()
        .filter(|(t, _)| t == "half/farm/devices/dev-1/up")
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        .collect();
    assert_eq!(half, ["ok 1", "ok 3", "ok 5"]);
    for name in ["half", "fh"] {
        assert_eq!(
            daemon.metrics().stream_errors(name, "format_error"),
            u64::from(N / 2),
            "{name}"
        );
        let q = daemon.store().queue(name).unwrap();
        assert_eq!(
            q.stats().dropped.get("dead_letter"),
            Some(&u64::from(N / 2))
        );
    }
    assert_eq!(
        std::fs::read_to_string(path("half.txt")).unwrap(),
        "ok 1\nok 3\nok 5\n"
    );

    // Files: one XML document per line; CSV lines; ChirpStack events.
    let x = std::fs::read_to_string(path("up.xml")).unwrap();
    let lines: Vec<&str> = x.lines().collect();
    assert_eq!(lines.len(), N as usize, "{x}");
    for l in &lines {
        let doc = roxmltree::Document::parse(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert_eq!(doc.root_element().tag_name().name(), "application_up");
    }
    let csv = std::fs::read_to_string(path("up.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), N as usize, "{csv}");
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r[1], "dev-1");
        assert_eq!(r[2], i.to_string());
        assert_eq!(r[3], "2");
        assert_eq!(r[4], format!("{i:02x}"));
    }
    let cs = std::fs::read_to_string(path("up.cs.jsonl")).unwrap();
    let events: Vec<serde_json::Value> = cs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), N as usize);
    assert!(events
        .iter()
        .enumerate()
        .all(|(i, e)| e["fCnt"] == i && e["deviceInfo"]["deviceName"] == "dev-1"));
    daemon.stop().await;
}
