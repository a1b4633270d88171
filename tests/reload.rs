//! Reloading the devices without a restart (issue 14, part 1; `SIGHUP`): devices added,
//! changed and removed apply at once; kept devices keep their frame counters; a removed device
//! that comes back keeps the counters the store holds; other changed sections are reported as
//! needing a restart. Through the real daemon (in-process) and, for `SIGHUP` and
//! `devices_dir`, through the binary.

mod support;

use lorastream::daemon::Daemon;
use lorastream::model::{DownlinkItem, DownlinkOp, DownlinkRequest, Eui64};
use lorastream::sim::{Forwarder, Radio, SimDevice};
use std::io::BufRead;
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(10);

fn class_c(d: &SimDevice) -> String {
    device_toml(d, "farm").replace("[[device]]\n", "[[device]]\nclass = \"C\"\n")
}

async fn up(f: &mut Forwarder, d: &mut SimDevice, f_cnt: u32, tmst: u32) {
    d.f_cnt = f_cnt;
    let p = d.uplink(1, b"r", false).unwrap();
    f.send(&[(
        &p,
        Radio {
            tmst,
            ..Radio::default()
        },
    )])
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_added_changed_and_removed_without_a_restart() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let (mut d1, mut d2, mut d3) = (device(1), device(2), device(3));
    let out = dir.path().join("out.jsonl");
    let stream = format!(
        "[[stream]]\nname = \"out\"\nkind = \"file\"\npath = {:?}\n",
        out.display().to_string()
    );
    let app = "[[application]]\nid = \"farm\"\n\n";
    let cfg = config(
        dir.path(),
        &format!(
            "{app}{}{}{stream}",
            device_toml(&d1, "farm"),
            device_toml(&d3, "farm")
        ),
    );
    let daemon = Daemon::start(&cfg).await.unwrap();
    let m = daemon.metrics().clone();
    let mut f = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(1))
        .await
        .unwrap();
    f.pull().await.unwrap();
    up(&mut f, &mut d1, 0, 1_000_000).await;
    up(&mut f, &mut d1, 1, 3_000_000).await;
    up(&mut f, &mut d3, 0, 5_000_000).await;
    assert!(wait_until(T, || m.uplinks("accepted") == 3).await);

    // dev-1 becomes class C, dev-2 arrives in a new application with a payload codec, dev-3
    // goes; a stream is added too.
    let lab = "[[application]]\nid = \"lab\"\ncodec = \"cayennelpp\"\n\n";
    let new = config(
        dir.path(),
        &format!(
            "{app}{lab}{}{}{stream}\n[[stream]]\nname = \"more\"\nkind = \"stdout\"\n",
            class_c(&d1),
            device_toml(&d2, "lab")
        ),
    );
    let r = daemon.reload(&new).await.unwrap();
    assert_eq!(
        (
            r.devices.added,
            r.devices.changed,
            r.devices.removed,
            r.devices.unchanged
        ),
        (1, 1, 1, 0),
        "{r:?}"
    );
    // The stream is added at once; "out" (unchanged) keeps running.
    assert!(r.needs_restart.is_empty(), "{r:?}");
    assert_eq!(r.streams.added, vec!["more".to_string()], "{r:?}");
    assert_eq!((r.streams.unchanged, r.streams.removed.len()), (1, 0));

    // dev-1 kept its counter (1): FCnt 0 is a replay, 2 is new.
    up(&mut f, &mut d1, 0, 7_000_000).await;
    assert!(wait_until(T, || m.uplinks("replay") == 1).await);
    up(&mut f, &mut d1, 2, 9_000_000).await;
    assert!(wait_until(T, || m.uplinks("accepted") == 4).await);
    // dev-2 is known at once, the formats name it, and its application's codec decodes it
    // (CayenneLPP: channel 3, temperature 27.2 °C).
    let p = d2.uplink(1, &[0x03, 0x67, 0x01, 0x10], false).unwrap();
    f.send(&[(
        &p,
        Radio {
            tmst: 11_000_000,
            ..Radio::default()
        },
    )])
    .await
    .unwrap();
    assert!(wait_until(T, || m.uplinks("accepted") == 5).await);
    assert!(
        wait_until(T, || {
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            text.contains("\"device_id\":\"dev-2\"") && text.contains("\"temperature_3\":27.2")
        })
        .await,
        "{}",
        std::fs::read_to_string(&out).unwrap_or_default()
    );
    // dev-3 is gone: its DevAddr is unknown now.
    up(&mut f, &mut d3, 1, 13_000_000).await;
    assert!(wait_until(T, || m.uplinks("unknown_dev_addr") == 1).await);

    // dev-1 is class C now: a downlink goes out at once, without waiting for an uplink.
    while f.pull_resp(Duration::from_millis(300)).await.is_some() {}
    daemon
        .request_downlink(DownlinkRequest {
            stream: "out".into(),
            application: "farm".into(),
            device: "dev-1".into(),
            op: DownlinkOp::Push,
            items: Ok(vec![DownlinkItem {
                id: lorastream::model::new_id(),
                f_port: 5,
                payload: b"now".to_vec(),
                confirmed: false,
                priority: "NORMAL".into(),
                correlation_ids: vec![],
                stream: "out".into(),
                decoded_payload: None,
            }]),
            names: None,
        })
        .await;
    let pr = f.pull_resp(T).await.expect("a class C downlink at once");
    assert_eq!(pr.txpk["imme"], true, "{}", pr.json);
    let dl = d1.open(&pr.phy, 0).unwrap();
    assert!(dl.mic_ok);
    assert_eq!(dl.opened.frm_payload, b"now");

    // dev-3 comes back with the same keys: the counters the store kept still hold. The
    // runtime's thread count changes too: that takes a restart, and is reported so.
    let back = config(
        dir.path(),
        &format!(
            "{app}{lab}{}{}{}{stream}\n[runtime]\nworker_threads = 3\n",
            class_c(&d1),
            device_toml(&d2, "lab"),
            device_toml(&d3, "farm")
        ),
    );
    let r = daemon.reload(&back).await.unwrap();
    assert_eq!((r.devices.added, r.devices.unchanged), (1, 2), "{r:?}");
    assert_eq!(r.needs_restart, vec!["[runtime]"], "{r:?}");
    up(&mut f, &mut d3, 0, 15_000_000).await;
    assert!(wait_until(T, || m.uplinks("repeat") == 1).await);
    up(&mut f, &mut d3, 2, 17_000_000).await;
    assert!(wait_until(T, || m.uplinks("accepted") == 6).await);
    daemon.stop().await;
}

/// `systemctl reload` as the package runs it: a new file in `devices_dir` and SIGHUP; the
/// device's uplinks are taken without a restart, and a broken file is refused with the old
/// devices kept.
#[test]
fn sighup_reads_devices_dir_again() {
    let dir = tempfile::tempdir().unwrap();
    let devices = dir.path().join("devices.d");
    std::fs::create_dir(&devices).unwrap();
    let (d1, mut d2) = (device(1), device(2));
    let udp = format!("127.0.0.1:{}", free_port());
    let path = dir.path().join("lorastream.toml");
    std::fs::write(
        &path,
        format!(
            "[gateway]\nlisten = \"{udp}\"\ndevices_dir = {:?}\n\n[storage]\npath = {:?}\n\n[metrics]\nlisten = \"\"\n\n[[application]]\nid = \"farm\"\n\n{}[[stream]]\nname = \"out\"\nkind = \"stdout\"\n",
            devices.display().to_string(),
            dir.path().join("db").display().to_string(),
            device_toml(&d1, "farm")
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lorastream"))
        .args(["run", "-c"])
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(l);
        }
    });
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx2.send(l);
        }
    });
    let wait_for = |want: &dyn Fn(&str) -> bool, what: &str| {
        let end = std::time::Instant::now() + T;
        let mut seen = Vec::new();
        while std::time::Instant::now() < end {
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
                if want(&l) {
                    return l;
                }
                seen.push(l);
            }
        }
        panic!("{what} not seen in:\n{}", seen.join("\n"));
    };
    wait_for(&|l| l.contains("lorastream started"), "start");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let send = |d: &mut SimDevice| {
        let p = d.uplink(1, b"s", false).unwrap();
        rt.block_on(async {
            let mut f = Forwarder::connect(udp.parse().unwrap(), Eui64::from_u64(1))
                .await
                .unwrap();
            f.send(&[(&p, Radio::default())]).await.unwrap();
        });
    };
    // A broken file: refused, the old devices kept.
    std::fs::write(devices.join("bad.toml"), "[[device]]\nid = 3\n").unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    wait_for(
        &|l| l.contains("configuration not reloaded") && l.contains("bad.toml"),
        "the refusal",
    );
    std::fs::remove_file(devices.join("bad.toml")).unwrap();

    std::fs::write(devices.join("more.toml"), device_toml(&d2, "farm")).unwrap();
    unsafe { libc::kill(pid, libc::SIGHUP) };
    wait_for(
        &|l| l.contains("devices reloaded") && l.contains("added=1"),
        "the reload",
    );
    send(&mut d2);
    wait_for(&|l| l.contains("\"device_id\":\"dev-2\""), "dev-2's uplink");
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// Remote commands over the MQTT stream's own connection (`commands = true`), against
/// mosquitto and the real binary: status, devices (no key), logs, log_level, reload (which
/// reads devices_dir again), an unknown command and a request that is not JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_commands_over_mqtt() {
    if !needs_mosquitto("remote_commands_over_mqtt") {
        return;
    }
    let m = Mosquitto::start("").await;
    let dir = tempfile::tempdir().unwrap();
    let devices = dir.path().join("devices.d");
    std::fs::create_dir(&devices).unwrap();
    let d1 = device(1);
    let path = dir.path().join("lorastream.toml");
    let body = |eui: &str| {
        format!(
            "[gateway]\nlisten = \"127.0.0.1:{}\"\n{eui}devices_dir = {:?}\n\n[storage]\npath = {:?}\n\n[metrics]\nlisten = \"\"\n\n[[application]]\nid = \"farm\"\n\n{}[[stream]]\nname = \"cloud\"\nserver = \"mqtt://127.0.0.1:{}\"\ncommands = true\n",
            free_port(),
            devices.display().to_string(),
            dir.path().join("db").display().to_string(),
            device_toml(&d1, "farm"),
            m.port
        )
    };
    // Without the gateway's EUI the command topics cannot be named: refused.
    std::fs::write(&path, body("")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lorastream"))
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs [gateway] eui"));

    std::fs::write(&path, body("eui = \"AA555A00000000FF\"\n")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lorastream"))
        .args(["run", "-c"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let base = "lorastream/gateways/aa555a00000000ff/command";
    let mut replies = Subscriber::connect(m.port, &format!("{base}/+/reply")).await;
    let (client, mut el) = rumqttc::AsyncClient::new(
        rumqttc::MqttOptions::new("operator", "127.0.0.1", m.port),
        10,
    );
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let mut n = 0u64;
    let mut ask = |name: &'static str, req: serde_json::Value| {
        n += 1;
        let mut req = req;
        req["id"] = serde_json::json!(format!("r{n}"));
        let id = format!("r{n}");
        let client = client.clone();
        async move {
            client
                .publish(
                    format!("{base}/{name}"),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    req.to_string(),
                )
                .await
                .unwrap();
            id
        }
    };
    // The daemon subscribes right after connecting: ask until it answers.
    let mut status = Vec::new();
    for _ in 0..40 {
        let id = ask("status", serde_json::json!({})).await;
        status = replies
            .wait_for(1, Duration::from_millis(500), |_, v| v["id"] == id.as_str())
            .await;
        if !status.is_empty() {
            break;
        }
    }
    assert_eq!(status.len(), 1, "no reply to status");
    assert_eq!(status[0]["ok"], true, "{}", status[0]);
    assert!(status[0]["result"]["version"].is_string(), "{}", status[0]);
    assert!(status[0]["result"]["streams"].is_array(), "{}", status[0]);

    let reply = |id: String| {
        let id = id.clone();
        move |_: &str, v: &serde_json::Value| v["id"] == id.as_str()
    };
    let id = ask("devices", serde_json::json!({})).await;
    let r = replies.wait_for(1, T, reply(id)).await;
    assert_eq!(r[0]["result"][0]["id"], "dev-1", "{}", r[0]);
    assert_eq!(r[0]["result"][0]["dev_addr"], "26000001", "{}", r[0]);
    let text = r[0].to_string();
    assert!(
        !text.contains("key") && !text.contains("0101010101"),
        "{text}"
    );

    let id = ask("logs", serde_json::json!({"lines": 1000})).await;
    let r = replies.wait_for(1, T, reply(id)).await;
    let lines = r[0]["result"]["lines"].as_array().unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.as_str().unwrap_or("").contains("lorastream started")),
        "{}",
        r[0]
    );
    let id = ask("logs", serde_json::json!({"lines": 2})).await;
    let r = replies.wait_for(1, T, reply(id)).await;
    assert_eq!(r[0]["result"]["lines"].as_array().unwrap().len(), 2);

    let id = ask("log_level", serde_json::json!({"level": "debug"})).await;
    let r = replies.wait_for(1, T, reply(id)).await;
    assert_eq!(r[0]["ok"], true, "{}", r[0]);
    let id = ask("log_level", serde_json::json!({"level": "[[["})).await;
    let r = replies.wait_for(1, T, reply(id)).await;
    assert_eq!(r[0]["ok"], false, "{}", r[0]);

    std::fs::write(devices.join("more.toml"), device_toml(&device(2), "farm")).unwrap();
    let id = ask("reload", serde_json::json!({})).await;
    let r = replies.wait_for(1, T, reply(id)).await;
    assert_eq!(r[0]["ok"], true, "{}", r[0]);
    assert_eq!(r[0]["result"]["devices"]["added"], 1, "{}", r[0]);
    let id = ask("devices", serde_json::json!({})).await;
    let r = replies.wait_for(1, T, reply(id)).await;
    assert_eq!(r[0]["result"].as_array().unwrap().len(), 2, "{}", r[0]);

    // device_upsert / device_delete: a file of devices_dir, then a reload.
    let d3 = device(3);
    let dev3 = serde_json::json!({
        "application": "farm",
        "id": "dev-3",
        "dev_eui": "70B3D57ED0000003",
        "dev_addr": d3.dev_addr.to_string(),
        "nwk_s_key": hex::encode(d3.nwk_s_key.0),
        "app_s_key": hex::encode(d3.app_s_key.0),
    });
    let id = ask("device_upsert", serde_json::json!({ "device": dev3 })).await;
    let r = replies.wait_for(1, T, reply(id)).await;
    assert_eq!(r[0]["ok"], true, "{}", r[0]);
    assert_eq!(r[0]["result"]["devices"]["added"], 1, "{}", r[0]);
    let file = devices.join("remote-commands.toml");
    let good = std::fs::read_to_string(&file).unwrap();
    assert!(good.contains("dev-3"), "{good}");
    // A device the configuration refuses: nothing changes, the file is put back.
    let mut bad = dev3.clone();
    bad["dev_addr"] = serde_json::json!("XYZ");
    let id = ask("device_upsert", serde_json::json!({ "device": bad })).await;
    let r = replies.wait_for(1, T, reply(id)).await;
    assert_eq!(r[0]["ok"], false, "{}", r[0]);
    assert!(
        r[0]["error"]
            .as_str()
            .unwrap()
            .contains("remote-commands.toml"),
        "{}",
        r[0]
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), good);
    let id = ask("devices", serde_json::json!({})).await;
    let r = replies.wait_for(1, T, reply(id)).await;
    assert_eq!(r[0]["result"].as_array().unwrap().len(), 3, "{}", r[0]);
    let id = ask("device_delete", serde_json::json!({"device": "dev-1"})).await;
    let r = replies.wait_for(1, T, reply(id)).await;
    assert_eq!(r[0]["ok"], false, "{}", r[0]);
    let id = ask("device_delete", serde_json::json!({"device": "dev-3"})).await;
    let r = replies.wait_for(1, T, reply(id)).await;
    assert_eq!(r[0]["result"]["devices"]["removed"], 1, "{}", r[0]);

    // A burst: every request is answered (run, or "busy" beyond the commands running at
    // once), none is lost or left without an answer.
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(ask("devices", serde_json::json!({})).await);
    }
    let answered = replies
        .wait_for(40, T, |_, v| {
            ids.iter().any(|id| v["id"] == id.as_str())
                && (v["ok"] == true || v["error"].as_str().unwrap_or("").starts_with("busy"))
        })
        .await;
    assert_eq!(answered.len(), 40);

    let id = ask("frobnicate", serde_json::json!({})).await;
    let r = replies.wait_for(1, T, reply(id)).await;
    assert_eq!(r[0]["ok"], false);
    assert!(
        r[0]["error"].as_str().unwrap().contains("status, reload"),
        "{}",
        r[0]
    );
    client
        .publish(
            format!("{base}/status"),
            rumqttc::QoS::AtLeastOnce,
            false,
            "not json",
        )
        .await
        .unwrap();
    let r = replies
        .wait_for(1, T, |_, v| {
            v["ok"] == false && v["error"].as_str().unwrap_or("").contains("not JSON")
        })
        .await;
    assert_eq!(r.len(), 1);

    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

/// Frame counters of the uplinks in a file stream's output (TTS JSON lines).
fn f_cnts(path: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["uplink_message"]["f_cnt"].as_u64())
        .collect()
}

/// Reloads under load: one device sends 1,000 uplinks at 200/s while ten reloads add, change
/// and remove other devices (and change the sender's own class) and streams: a stream that
/// stays unchanged delivers every uplink exactly once (its connection and queue are kept), a
/// stream changed by every reload (its file alternates) loses none, a stream added and removed
/// by turns comes and goes; every uplink is accepted, none refused as a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_reloads_under_200_uplinks_per_second_lose_nothing() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let d1 = device(1);
    let others: Vec<SimDevice> = (2..=5).map(device).collect();
    let file = |name: &str| dir.path().join(format!("{name}.jsonl"));
    let stream = |name: &str, file: &std::path::Path| {
        format!(
            "[[stream]]\nname = \"{name}\"\nkind = \"file\"\npath = {:?}\n\n",
            file.display().to_string()
        )
    };
    let app = "[[application]]\nid = \"farm\"\n\n";
    let cfg_for = |round: usize| {
        // The sender switches class A/C; others come and go.
        let me = if round % 2 == 0 {
            device_toml(&d1, "farm")
        } else {
            class_c(&d1)
        };
        let rest: String = others
            .iter()
            .enumerate()
            .filter(|(i, _)| (i + round) % 2 == 0)
            .map(|(_, d)| device_toml(d, "farm"))
            .collect();
        let mut streams = stream("out", &file("out"));
        streams += &stream("mirror", &file(&format!("mirror-{}", round % 2)));
        if round % 2 == 0 {
            streams += &stream("extra", &file("extra"));
        }
        config(dir.path(), &format!("{app}{me}{rest}{streams}"))
    };
    let daemon = Daemon::start(&cfg_for(0)).await.unwrap();
    let m = daemon.metrics().clone();
    let udp = daemon.udp_addr();
    const N: u32 = 1000;
    let sender = {
        let mut d = d1.clone();
        tokio::spawn(async move {
            let mut f = Forwarder::connect(udp, Eui64::from_u64(1)).await.unwrap();
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            for i in 0..N {
                tick.tick().await;
                d.f_cnt = i;
                let p = d.uplink(1, b"load", false).unwrap();
                f.send(&[(
                    &p,
                    Radio {
                        tmst: i * 5_000,
                        ..Radio::default()
                    },
                )])
                .await
                .unwrap();
            }
        })
    };
    let mut summaries = Vec::new();
    for round in 1..=10 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        summaries.push(daemon.reload(&cfg_for(round)).await.unwrap());
    }
    sender.await.unwrap();
    assert!(
        wait_until(T, || m.uplinks("accepted") == u64::from(N)).await,
        "accepted {} of {N}; replays {}, unknown {}; reloads {summaries:?}",
        m.uplinks("accepted"),
        m.uplinks("replay"),
        m.uplinks("unknown_dev_addr")
    );
    let all: std::collections::BTreeSet<u64> = (0..u64::from(N)).collect();
    assert!(
        wait_until(T, || {
            let mut seen: std::collections::BTreeSet<u64> =
                f_cnts(&file("mirror-0")).into_iter().collect();
            seen.extend(f_cnts(&file("mirror-1")));
            f_cnts(&file("out")).len() == N as usize && seen == all
        })
        .await,
        "out {} lines; mirror-0 {}, mirror-1 {}",
        f_cnts(&file("out")).len(),
        f_cnts(&file("mirror-0")).len(),
        f_cnts(&file("mirror-1")).len()
    );
    // The unchanged stream was never restarted: each uplink exactly once, in order.
    assert_eq!(
        f_cnts(&file("out")),
        all.iter().copied().collect::<Vec<_>>()
    );
    assert_eq!(m.uplinks("replay"), 0);
    // Every reload changed the sender (its class) and added/removed the others; "mirror"
    // changed, "extra" came and went, "out" stayed.
    for (i, r) in summaries.iter().enumerate() {
        let round = i + 1;
        let (d, s) = (&r.devices, &r.streams);
        assert!(
            d.changed == 1 && d.added == 2 && d.removed == 2,
            "{summaries:?}"
        );
        assert_eq!(
            s.changed,
            vec!["mirror".to_string()],
            "round {round}: {s:?}"
        );
        assert_eq!(s.unchanged, 1, "round {round}: {s:?}");
        let extra = vec!["extra".to_string()];
        if round % 2 == 0 {
            assert_eq!(
                (&s.added, s.removed.len()),
                (&extra, 0),
                "round {round}: {s:?}"
            );
        } else {
            assert_eq!(
                (s.added.len(), &s.removed),
                (0, &extra),
                "round {round}: {s:?}"
            );
        }
        assert!(r.needs_restart.is_empty(), "round {round}: {r:?}");
    }
    daemon.stop().await;
}

/// A stream removed by a reload keeps its backlog (detached: not shown, not delivered, not
/// evicted); a reload that brings a stream of that name back (here as another kind) delivers
/// it. A reload with a stream that cannot be set up (a CA file that holds no certificate) is
/// refused whole: the devices and streams stay as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_streams_backlog_waits_for_it_and_a_bad_stream_refuses_the_reload() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let mut d1 = device(1);
    let d2 = device(2);
    let app = "[[application]]\nid = \"farm\"\n\n";
    // Nothing listens on this port: the stream queues.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let cloud = format!("[[stream]]\nname = \"cloud\"\nserver = \"mqtt://127.0.0.1:{port}\"\n\n");
    let out = dir.path().join("cloud.jsonl");
    let cloud_as_file = format!(
        "[[stream]]\nname = \"cloud\"\nkind = \"file\"\npath = {:?}\n\n",
        out.display().to_string()
    );
    let keep = dir.path().join("keep.jsonl");
    let keep_stream = format!(
        "[[stream]]\nname = \"keep\"\nkind = \"file\"\npath = {:?}\n\n",
        keep.display().to_string()
    );
    let me = device_toml(&d1, "farm");
    let daemon = Daemon::start(&config(
        dir.path(),
        &format!("{app}{me}{cloud}{keep_stream}"),
    ))
    .await
    .unwrap();
    let m = daemon.metrics().clone();
    let mut f = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(1))
        .await
        .unwrap();
    for i in 0..5u32 {
        up(&mut f, &mut d1, i, i * 2_000_000).await;
    }
    assert!(wait_until(T, || m.uplinks("accepted") == 5).await);
    assert!(
        wait_until(T, || daemon
            .store()
            .queue("cloud")
            .is_some_and(|q| q.len() == 5))
        .await
    );

    // Removed: its five records stay, detached (no longer in /health's streams).
    let r = daemon
        .reload(&config(dir.path(), &format!("{app}{me}{keep_stream}")))
        .await
        .unwrap();
    assert_eq!(r.streams.removed, vec!["cloud".to_string()], "{r:?}");
    assert!(daemon.store().queue("cloud").is_none());
    assert!(daemon
        .health()
        .streams
        .iter()
        .all(|s| s.queue.stream != "cloud"));
    up(&mut f, &mut d1, 5, 12_000_000).await;
    assert!(wait_until(T, || f_cnts(&keep).len() == 6).await);

    // A stream that cannot be set up: refused whole, d2 not added, "cloud" not back.
    let bad_ca = dir.path().join("bad-ca.pem");
    std::fs::write(&bad_ca, "not a certificate\n").unwrap();
    let bad = format!(
        "[[stream]]\nname = \"broken\"\nserver = \"mqtts://127.0.0.1:{port}\"\nca_file = {:?}\n\n",
        bad_ca.display().to_string()
    );
    let two = device_toml(&d2, "farm");
    let refused = daemon
        .reload(&config(
            dir.path(),
            &format!("{app}{me}{two}{keep_stream}{cloud_as_file}{bad}"),
        ))
        .await;
    let e = refused
        .expect_err("a stream that cannot be set up")
        .to_string();
    assert!(e.contains("broken") && e.contains("certificate"), "{e}");
    assert!(daemon.store().queue("broken").is_none());
    assert!(daemon.store().queue("cloud").is_none());
    let names: Vec<String> = daemon
        .health()
        .streams
        .iter()
        .map(|s| s.queue.stream.clone())
        .collect();
    assert_eq!(names, vec!["keep".to_string()]);

    // Back as a file stream: the backlog of five (the sixth uplink came while it was away) is
    // delivered.
    let r = daemon
        .reload(&config(
            dir.path(),
            &format!("{app}{me}{keep_stream}{cloud_as_file}"),
        ))
        .await
        .unwrap();
    assert_eq!(r.streams.added, vec!["cloud".to_string()], "{r:?}");
    assert!(
        wait_until(T, || f_cnts(&out) == vec![0, 1, 2, 3, 4]).await,
        "{:?}",
        f_cnts(&out)
    );
    up(&mut f, &mut d1, 6, 14_000_000).await;
    assert!(wait_until(T, || f_cnts(&out) == vec![0, 1, 2, 3, 4, 6]).await);
    assert!(
        wait_until(T, || daemon
            .store()
            .queue("cloud")
            .is_some_and(|q| q.is_empty()))
        .await
    );
    daemon.stop().await;
}
