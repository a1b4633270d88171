//! First-run traps (issue 15), through the binary as an operator runs it:
//! - `check` warns about devices no stream takes, and the daemon counts their uplinks;
//! - `check --online` tries the store directory, the ports and each stream for real (a
//!   mosquitto with a password file: the right password connects, a wrong one fails with the
//!   hint; a port held by another program and an unwritable store fail);
//! - `simulate` acts only as the devices named with `--device` (a loud warning otherwise),
//!   prints the downlinks it gets, decrypted, and fails when no PUSH_ACK comes back;
//! - hex values written with `0x` (vendor sheets, the TTS console's C view) are accepted, and a
//!   config file the user may not read says what to do.

mod support;

use lorastream::daemon::Daemon;
use lorastream::model::{DownlinkItem, DownlinkOp, DownlinkRequest, Eui64};
use lorastream::sim::{Forwarder, Radio};
use std::process::Command;
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(10);

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lorastream"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A config file in `dir` (store in `dir/db`, loopback UDP on `udp`), `rest` appended.
fn write_config(dir: &std::path::Path, udp: &str, rest: &str) -> std::path::PathBuf {
    let p = dir.join("lorastream.toml");
    std::fs::write(
        &p,
        format!(
            "[gateway]\nlisten = \"{udp}\"\neui = \"AA555A00000000FF\"\n\n[storage]\npath = {:?}\n\n[metrics]\nlisten = \"\"\n\n{rest}",
            dir.join("db").display().to_string()
        ),
    )
    .unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_no_stream_takes_are_warned_about_and_counted() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let (d1, mut d2) = (device(1), device(2));
    let rest = format!(
        "[[application]]\nid = \"farm\"\n\n[[application]]\nid = \"lab\"\n\n{}{}[[stream]]\nname = \"out\"\nkind = \"stdout\"\napplication = \"farm\"\n",
        device_toml(&d1, "farm"),
        device_toml(&d2, "lab")
    );
    let path = write_config(dir.path(), "127.0.0.1:0", &rest);
    let out = bin().args(["check", "-c"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("warning: 1 device(s) whose uplinks no stream takes"),
        "{err}"
    );
    assert!(err.contains("dev-2") && !err.contains("dev-1"), "{err}");

    let cfg = config(dir.path(), &rest);
    let daemon = Daemon::start(&cfg).await.unwrap();
    let mut f = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(1))
        .await
        .unwrap();
    f.send(&[(&d2.uplink(1, b"x", false).unwrap(), Radio::default())])
        .await
        .unwrap();
    assert!(wait_until(T, || daemon.metrics().uplinks_without_stream() == 1).await);
    assert_eq!(daemon.metrics().uplinks("accepted"), 1);
    daemon.stop().await;
}

#[test]
fn check_online_tries_the_store_the_ports_and_each_stream() {
    if !needs_mosquitto("check_online_tries_the_store_the_ports_and_each_stream") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // mosquitto with one user: gw / right-password.
    let pwfile = dir.path().join("passwd");
    std::fs::write(&pwfile, "gw:right-password\n").unwrap();
    let conv = Command::new("mosquitto_passwd")
        .args(["-U"])
        .arg(&pwfile)
        .output();
    let Ok(conv) = conv else {
        panic!("mosquitto_passwd is missing (Debian package mosquitto)");
    };
    assert!(conv.status.success(), "{}", text(&conv.stderr));
    let port = free_port();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _m = rt.block_on(Mosquitto::start_raw(
        &format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\npersistence false\n",
            pwfile.display()
        ),
        port,
    ));
    let stream = |pw: &str| {
        format!("[[stream]]\nname = \"cloud\"\nserver = \"mqtt://127.0.0.1:{port}\"\nusername = \"gw\"\npassword = \"{pw}\"\n")
    };
    let udp = format!("127.0.0.1:{}", free_port());

    let path = write_config(dir.path(), &udp, &stream("right-password"));
    let out = bin()
        .args(["check", "--online", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let so = text(&out.stdout);
    assert!(out.status.success(), "{so}\n{}", text(&out.stderr));
    assert!(so.contains("ok   store: "), "{so}");
    assert!(
        so.contains(&format!("ok   [gateway] listen: UDP {udp} is free")),
        "{so}"
    );
    assert!(
        so.contains("ok   stream cloud (mqtt): CONNACK from mqtt://127.0.0.1")
            && so.contains("-check"),
        "{so}"
    );
    assert!(!so.contains("right-password"), "a secret printed:\n{so}");

    // A wrong password fails with what to check, and never shows the password.
    let path = write_config(dir.path(), &udp, &stream("wrong-password"));
    let out = bin()
        .args(["check", "--online", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let so = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{so}");
    assert!(so.contains("FAIL stream cloud (mqtt):"), "{so}");
    assert!(so.contains("check username/password"), "{so}");
    assert!(!so.contains("wrong-password") && !text(&out.stderr).contains("wrong-password"));

    // The UDP port held by another program, and a store path that cannot be a directory.
    let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let busy = held.local_addr().unwrap().to_string();
    let path = write_config(dir.path(), &busy, &stream("right-password"));
    std::fs::write(dir.path().join("db"), b"a file, not a directory").unwrap();
    let out = bin()
        .args(["check", "--online", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let so = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{so}");
    assert!(
        so.contains(&format!(
            "FAIL [gateway] listen: UDP {busy} is in use by another program"
        )),
        "{so}"
    );
    assert!(so.contains("FAIL store: cannot write in"), "{so}");
    assert!(
        text(&out.stderr).contains("2 of 3 online checks failed"),
        "{}",
        text(&out.stderr)
    );
}

fn downlink(payload: &[u8]) -> DownlinkRequest {
    DownlinkRequest {
        stream: "out".into(),
        application: "farm".into(),
        device: "dev-1".into(),
        op: DownlinkOp::Push,
        items: Ok(vec![DownlinkItem {
            id: lorastream::model::new_id(),
            f_port: 9,
            payload: payload.to_vec(),
            confirmed: false,
            priority: "NORMAL".into(),
            correlation_ids: vec![],
            stream: "out".into(),
            decoded_payload: None,
        }]),
        names: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_picks_devices_prints_downlinks_and_fails_without_push_ack() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let (d1, d2) = (device(1), device(2));
    let out_file = dir.path().join("out.jsonl");
    let rest = format!(
        "[[application]]\nid = \"farm\"\n\n{}{}[[stream]]\nname = \"out\"\nkind = \"file\"\npath = {:?}\n",
        device_toml(&d1, "farm"),
        device_toml(&d2, "farm"),
        out_file.display().to_string()
    );
    let cfg = config(dir.path(), &rest);
    let daemon = Daemon::start(&cfg).await.unwrap();
    daemon.request_downlink(downlink(b"hello")).await;
    assert!(wait_until(T, || daemon.metrics().downlinks("queued") >= 1).await);
    let path = write_config(dir.path(), "127.0.0.1:0", &rest);
    let target = daemon.udp_addr().to_string();

    let sim = |extra: &[&str], target: String| {
        let path = path.clone();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            bin()
                .args([
                    "simulate", "--count", "2", "--rate", "20", "--target", &target, "-c",
                ])
                .arg(&path)
                .args(extra)
                .output()
                .unwrap()
        })
    };
    // Only dev-1: two uplinks, both accepted; the queued downlink comes back in RX1 and is
    // printed decrypted with dev-1's keys.
    let out = sim(&["--device", "dev-1"], target.clone()).await.unwrap();
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{so}\n{se}");
    assert!(!se.contains("WARNING"), "{se}");
    assert!(so.contains("PUSH_ACKs received: 2"), "{so}");
    assert!(
        so.contains("downlink for dev-1 via 868.1 MHz SF7BW125")
            && so.contains("FPort 9 payload 68656c6c6f"),
        "{so}"
    );
    assert!(wait_until(T, || daemon.metrics().uplinks("accepted") == 2).await);
    // dev-2 was not touched: its first uplink (FCnt 0) is still accepted.
    let mut d2 = d2;
    let mut f = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(7))
        .await
        .unwrap();
    f.send(&[(&d2.uplink(1, b"x", false).unwrap(), Radio::default())])
        .await
        .unwrap();
    assert!(wait_until(T, || daemon.metrics().uplinks("accepted") == 3).await);

    // A payload and FPort of the caller's (e.g. a codec's test frame).
    let out_text = || std::fs::read_to_string(&out_file).unwrap_or_default();
    let o = sim(
        &[
            "--device",
            "dev-1",
            "--fcnt-start",
            "5",
            "--payload",
            "0a0b",
            "--f-port",
            "7",
        ],
        target.clone(),
    )
    .await
    .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        wait_until(T, || out_text()
            .contains("\"f_port\":7,\"f_cnt\":5,\"frm_payload\":\"Cgs=\""))
        .await,
        "{}",
        out_text()
    );

    // No --device: every ABP device, with a warning. An unknown id is refused.
    let out = sim(&["--fcnt-start", "10"], target.clone()).await.unwrap();
    assert!(out.status.success());
    assert!(
        text(&out.stderr).contains("WARNING: acting as ALL 2 ABP devices"),
        "{}",
        text(&out.stderr)
    );
    let out = sim(&["--device", "nope"], target.clone()).await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--device nope: no device with this id"));
    daemon.stop().await;

    // Nobody listening: no PUSH_ACK, a failure that says what to check.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let out = sim(
        &["--device", "dev-1"],
        silent.local_addr().unwrap().to_string(),
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no PUSH_ACK came back"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn hex_with_0x_is_accepted_and_an_unreadable_config_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "127.0.0.1:0",
        "[[application]]\nid = \"farm\"\n\n[[device]]\napplication = \"farm\"\nid = \"d\"\ndev_eui = \"0x70B3D57ED0000001\"\ndev_addr = \"0x26011BDA\"\nnwk_s_key = \"{ 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E, 0x0F }\"\napp_s_key = \"000102030405060708090a0b0c0d0e0f\"\n\n[[stream]]\nname = \"out\"\nkind = \"stdout\"\n",
    );
    let out = bin().args(["check", "-c"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("dev_addr = \"26011BDA\""),
        "{}",
        text(&out.stdout)
    );

    // A key of the wrong length names the file, line, key and device.
    let src = std::fs::read_to_string(&path).unwrap().replace(
        "app_s_key = \"000102030405060708090a0b0c0d0e0f\"",
        "app_s_key = \"0001020304\"",
    );
    std::fs::write(&path, src).unwrap();
    let out = bin().args(["check", "-c"]).arg(&path).output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("app_s_key") && err.contains("expected 32 hex digits, got 10"),
        "{err}"
    );

    let e = lorastream::config::ConfigError::Read {
        path: "/etc/lorastream/lorastream.toml".into(),
        source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
    };
    assert!(
        e.to_string()
            .contains("run the command with sudo, or add yourself to the group lorastream"),
        "{e}"
    );
}

/// Removing a stream from the configuration no longer deletes its undelivered records: they
/// stay on disk (`lorastream queue` lists them) until `lorastream queue --drop` is asked to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_streams_queue_is_kept_until_dropped() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(1);
    let app = format!(
        "[[application]]\nid = \"farm\"\n\n{}",
        device_toml(&d, "farm")
    );
    // A broker that is never there: the records wait in the queue.
    let dead = free_port();
    let with_cloud = format!(
        "{app}[[stream]]\nname = \"cloud\"\nserver = \"mqtt://127.0.0.1:{dead}\"\n\n[[stream]]\nname = \"out\"\nkind = \"file\"\npath = {:?}\n",
        dir.path().join("out.jsonl").display().to_string()
    );
    let daemon = Daemon::start(&config(dir.path(), &with_cloud))
        .await
        .unwrap();
    let mut f = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(1))
        .await
        .unwrap();
    for n in 0..3u32 {
        let p = d.uplink(1, b"x", false).unwrap();
        f.send(&[(
            &p,
            Radio {
                tmst: n * 1_000_000,
                ..Radio::default()
            },
        )])
        .await
        .unwrap();
        assert!(
            wait_until(T, || daemon.metrics().uplinks("accepted")
                == u64::from(n) + 1)
            .await
        );
    }
    daemon.stop().await;

    let without = write_config(
        dir.path(),
        "127.0.0.1:0",
        &format!(
            "{app}[[stream]]\nname = \"out\"\nkind = \"file\"\npath = {:?}\n",
            dir.path().join("out.jsonl").display().to_string()
        ),
    );
    // The daemon starts without the stream and keeps its queue.
    let daemon = Daemon::start(&config(
        dir.path(),
        &format!(
            "{app}[[stream]]\nname = \"out\"\nkind = \"file\"\npath = {:?}\n",
            dir.path().join("out.jsonl").display().to_string()
        ),
    ))
    .await
    .unwrap();
    daemon.stop().await;
    let out = bin().args(["queue", "-c"]).arg(&without).output().unwrap();
    let so = text(&out.stdout);
    assert!(out.status.success(), "{so}{}", text(&out.stderr));
    let cloud = so
        .lines()
        .find(|l| l.starts_with("cloud "))
        .unwrap_or_else(|| panic!("{so}"));
    assert_eq!(cloud.split_whitespace().nth(1), Some("3"), "{so}");

    let out = bin()
        .args(["queue", "--drop", "out", "-c"])
        .arg(&without)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("still in the configuration"),
        "{}",
        text(&out.stderr)
    );
    let out = bin()
        .args(["queue", "--drop", "cloud", "-c"])
        .arg(&without)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("3 undelivered records"),
        "{}",
        text(&out.stdout)
    );
    let out = bin().args(["queue", "-c"]).arg(&without).output().unwrap();
    assert!(
        !text(&out.stdout).contains("cloud"),
        "{}",
        text(&out.stdout)
    );
    let out = bin()
        .args(["queue", "--drop", "cloud", "-c"])
        .arg(&without)
        .output()
        .unwrap();
    assert!(
        text(&out.stderr).contains("no queue named"),
        "{}",
        text(&out.stderr)
    );
}

/// A metrics port another program holds (node_exporter's 9100, typically) costs the metrics
/// listener, not the uplinks: the daemon starts, says what to change, and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_port_does_not_stop_the_daemon() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut d = device(1);
    let mut cfg = config(
        dir.path(),
        &format!(
            "[[application]]\nid = \"farm\"\n\n{}[[stream]]\nname = \"out\"\nkind = \"file\"\npath = {:?}\n",
            device_toml(&d, "farm"),
            dir.path().join("out.jsonl").display().to_string()
        ),
    );
    cfg.metrics.listen = Some(held.local_addr().unwrap());
    let daemon = Daemon::start(&cfg).await.unwrap();
    assert_eq!(daemon.metrics_addr(), None);
    let mut f = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(1))
        .await
        .unwrap();
    f.send(&[(&d.uplink(1, b"x", false).unwrap(), Radio::default())])
        .await
        .unwrap();
    assert!(wait_until(T, || daemon.metrics().uplinks("accepted") == 1).await);
    daemon.stop().await;
    drop(held);
}
