//! The `lorastream` binary as users run it: exit codes, messages, the demo.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lorastream"))
}

#[test]
fn version_and_help_on_every_command() {
    let out = bin().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("lorastream "));
    for cmd in ["run", "check", "demo", "simulate", "queue", "devices"] {
        let out = bin().args([cmd, "--help"]).output().unwrap();
        assert!(out.status.success(), "{cmd} --help");
        let out = bin().args([cmd, "--version"]).output().unwrap();
        assert!(out.status.success(), "{cmd} --version");
    }
    let out = bin().arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn check_accepts_the_example_and_names_file_line_key_on_errors() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");
    let out = bin().args(["check", "-c", example]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("nwk_s_key = \"***\""), "{stdout}");
    assert!(!stdout.contains("2B7E1516"), "keys are never printed");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let src = std::fs::read_to_string(example)
        .unwrap()
        .replace("dev_addr = \"26000001\"", "dev_addr = \"2600000G\"");
    std::fs::write(&bad, &src).unwrap();
    let out = bin().args(["check", "-c"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = src.lines().position(|l| l.contains("2600000G")).unwrap() + 1;
    assert!(err.contains(&format!("bad.toml:{line}:")), "{err}");
    assert!(err.contains("not a hex string"), "{err}");

    let out = bin()
        .args(["check", "-c", "/nonexistent/lorastream.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("cannot read config file /nonexistent/lorastream.toml"));

    // `run` refuses a bad config the same way.
    let out = bin().args(["run", "-c"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
}

/// A store outside /var/lib/lorastream, the one place the packaged unit lets the daemon write
/// (ProtectSystem=strict): `check` says what to add (ReadWritePaths=), and so does the error
/// of a daemon that cannot write there.
#[test]
fn a_store_outside_the_state_directory_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let store = ro.join("store");
    let cfg = dir.path().join("lorastream.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\n[storage]\npath = {:?}\n[metrics]\nlisten = \"\"\n",
            store.display().to_string()
        ),
    )
    .unwrap();
    let out = bin().args(["check", "-c"]).arg(&cfg).output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("ReadWritePaths={}", store.display())),
        "{stdout}"
    );
    // The default path needs no note.
    let out = bin()
        .args([
            "check",
            "-c",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"),
        ])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ReadWritePaths"));

    // Make `ro` unwritable: a read-only tmpfs as root (root ignores permission bits), mode
    // 0500 otherwise.
    let root = unsafe { libc::geteuid() } == 0;
    let mounted = root
        && Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
            .arg(&ro)
            .status()
            .is_ok_and(|s| s.success());
    if !mounted {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o500)).unwrap();
    }
    let out = bin().args(["run", "-c"]).arg(&cfg).output().unwrap();
    if mounted {
        let _ = Command::new("umount").arg(&ro).status();
    }
    if !mounted && root {
        eprintln!("SKIPPED the startup-error half: root without a tmpfs mount can write anywhere");
        return;
    }
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot open the store at"), "{err}");
    assert!(
        err.contains(&format!("ReadWritePaths={}", store.display())),
        "{err}"
    );
}

#[test]
fn demo_prints_decrypted_uplinks_as_json_lines() {
    let out = bin().args(["demo", "--count", "4"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let all: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let lines: Vec<&serde_json::Value> = all
        .iter()
        .filter(|v| v.get("uplink_message").is_some())
        .collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    // The downlink round trip: queued, sent in RX1, decrypted by the simulated device.
    assert!(
        all.iter().any(|v| v.get("downlink_queued").is_some()),
        "{stdout}"
    );
    let sent = all
        .iter()
        .find(|v| v.get("downlink_sent").is_some())
        .expect("downlink_sent");
    assert_eq!(sent["downlink_sent"]["rx_window"], 1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("soil-1 decrypts FPort 2: ON"), "{stderr}");
    assert_eq!(lines[0]["end_device_ids"]["device_id"], "soil-1");
    assert_eq!(
        lines[0]["uplink_message"]["rx_metadata"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(lines[3]["uplink_message"]["f_cnt"], 1);
}

mod support;

/// `lorastream queue` against a running daemon (via /health) and a stopped one (the store), for
/// both storage engines; a `kill -9` loses nothing queued (the journal of the last group-commit
/// window is counted by `queue` and replayed by the next start); a graceful stop on SIGTERM
/// within the contract's 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_command_kill_and_sigterm() {
    use lorastream::model::Eui64;
    use lorastream::sim::{Forwarder, Radio};
    use std::time::{Duration, Instant};
    for backend in support::backends() {
        let dir = tempfile::tempdir().unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let metrics_port = support::free_port();
        let closed_port = support::free_port();
        let mut d = support::device(1);
        let cfg = dir.path().join("lorastream.toml");
        std::fs::write(
            &cfg,
            format!(
                "[gateway]\nlisten = \"{udp}\"\ndedup_window_ms = 50\n\n[storage]\npath = {:?}\nbackend = \"{backend}\"\nflush_every_ms = 60000\n\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n[[application]]\nid = \"farm\"\n\n{}[[stream]]\nname = \"cloud\"\nserver = \"mqtt://127.0.0.1:{closed_port}\"\n",
                dir.path().join("db").display().to_string(),
                support::device_toml(&d, "farm")
            ),
        )
        .unwrap();
        let start = || {
            bin()
                .args(["run", "-c"])
                .arg(&cfg)
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        };
        let up = || async {
            assert!(
                support::wait_until(Duration::from_secs(10), || std::net::TcpStream::connect((
                    "127.0.0.1",
                    metrics_port
                ))
                .is_ok())
                .await,
                "daemon did not start"
            );
        };
        let table = || {
            let out = bin().args(["queue", "-c"]).arg(&cfg).output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).to_string()
        };
        let depth = |t: &str| -> Option<String> {
            t.lines()
                .find(|l| l.starts_with("cloud"))
                .and_then(|l| l.split_whitespace().nth(1).map(String::from))
        };
        let mut child = start();
        up().await;
        let mut f = Forwarder::connect(udp, Eui64::from_u64(1)).await.unwrap();
        for i in 0..5u8 {
            f.send(&[(&d.uplink(1, &[i], false).unwrap(), Radio::default())])
                .await
                .unwrap();
        }
        assert!(
            support::wait_until(Duration::from_secs(10), || depth(&table()).as_deref()
                == Some("5"))
            .await,
            "{backend}: {}",
            table()
        );
        let live = table();
        assert!(live.contains("running daemon"), "{live}");
        assert!(
            live.lines()
                .any(|l| l.starts_with("cloud") && l.contains(" no ")),
            "not connected: {live}"
        );

        // kill -9 inside the (60 s) group-commit window: the journal has them.
        send_signal(child.id(), 9);
        let _ = child.wait();
        let offline = table();
        assert!(offline.contains("daemon not running"), "{offline}");
        assert_eq!(
            depth(&offline).as_deref(),
            Some("5"),
            "{backend}: {offline}"
        );
        let mut child = start();
        up().await;
        assert_eq!(depth(&table()).as_deref(), Some("5"), "{backend}: replayed");

        // SIGTERM: graceful stop within 5 s.
        let t0 = Instant::now();
        send_signal(child.id(), 15);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "no stop within 5 s after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(status.success(), "{status:?}");
        let offline = table();
        assert!(offline.contains("daemon not running"), "{offline}");
        assert_eq!(
            depth(&offline).as_deref(),
            Some("5"),
            "{backend}: {offline}"
        );
    }
}

fn send_signal(pid: u32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}
