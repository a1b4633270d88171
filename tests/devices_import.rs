//! `lorastream devices import` and `[gateway] devices_dir`, through the real binary and a real
//! daemon: exports of The Things Stack (JSON, CSV) and ChirpStack (JSON) become files that
//! `lorastream check` accepts as they are, and the imported ABP keys open real uplinks.

mod support;

use base64::Engine as _;
use lorastream::config::Config;
use lorastream::daemon::Daemon;
use lorastream::model::{AesKey, DevAddr, Eui64};
use lorastream::sim::{Forwarder, Radio, SimDevice};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use support::{install_crypto, wait_until};

const T: Duration = Duration::from_secs(15);

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lorastream"))
}

fn sample(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/import")
        .join(name)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A config file in `dir` with a relative `devices_dir = "devices.d"` (created), the store
/// and a file stream in `dir`.
fn setup(dir: &Path, apps: &[&str]) -> PathBuf {
    std::fs::create_dir(dir.join("devices.d")).unwrap();
    let mut src = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\ndedup_window_ms = 50\neui = \"AA555A00000000FF\"\nextra_channels = []\ndevices_dir = \"devices.d\"\n\n[storage]\npath = {:?}\nflush_every_ms = 0\n\n[metrics]\nlisten = \"\"\n\n[[stream]]\nname = \"up\"\nkind = \"file\"\npath = {:?}\n",
        dir.join("db").display().to_string(),
        dir.join("up.jsonl").display().to_string()
    );
    for a in apps {
        src.push_str(&format!("\n[[application]]\nid = \"{a}\"\n"));
    }
    let path = dir.join("lorastream.toml");
    std::fs::write(&path, src).unwrap();
    path
}

fn import(config: &Path, file: &Path, extra: &[&str]) -> Output {
    bin()
        .args(["devices", "import"])
        .arg(file)
        .arg("-c")
        .arg(config)
        .args(extra)
        .output()
        .unwrap()
}

fn check(config: &Path) -> Output {
    bin().arg("check").arg("-c").arg(config).output().unwrap()
}

/// Every key of the samples, in the spellings they are written in.
const SAMPLE_KEYS: &[&str] = &[
    "9B35FAFC785474A8CF1CE995A77629D2",
    "087FFD12C7707F44A609E6CA50C98EC8",
    "C4BB03090BCAA05854057E3C5102A6AE",
    "501904FF71F9C573C8388235914B8589",
    "2B882D3E5CF475DF1493B4FECDFE9E74",
    "CAD7F144ED7DA8D01AAF738E93136BD1",
    "EEC841A2084B6D4572A72864EB36FC48",
    "BD5C0A7E36E1E5D58C95B9AC5DFD9E0D",
    "771B93459C432D45CBCDCD0902DF8D9A",
];

fn assert_no_secret(what: &str, s: &str) {
    let up = s.to_uppercase();
    for k in SAMPLE_KEYS {
        assert!(!up.contains(k), "{what} shows a key:\n{s}");
    }
}

fn abp(id: &str, dev_addr: u32, nwk: &str, app: &str) -> SimDevice {
    SimDevice {
        id: id.into(),
        dev_addr: DevAddr(dev_addr),
        nwk_s_key: nwk.parse::<AesKey>().unwrap(),
        app_s_key: app.parse::<AesKey>().unwrap(),
        f_cnt: 0,
        adr: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_format_imports_passes_check_and_its_abp_keys_open_uplinks() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), &["farm"]);
    for (file, output) in [
        ("tts-end-devices.json", "tts"),
        ("tts-end-devices.csv", "tts-csv"),
        ("chirpstack-devices.json", "chirpstack.toml"),
    ] {
        let out = import(&config, &sample(file), &["--output", output]);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{file}:\n{stdout}\n{stderr}");
        assert!(stdout.contains("2 devices imported"), "{file}: {stdout}");
        assert_no_secret("stdout", &stdout);
        assert_no_secret("stderr", &stderr);
        let written = dir
            .path()
            .join("devices.d")
            .join(output.trim_end_matches(".toml").to_string() + ".toml");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&written).unwrap().permissions().mode();
            assert_eq!(
                mode & 0o777 & !0o640,
                0,
                "{}: mode {mode:o}",
                written.display()
            );
        }
        // `lorastream check` takes the result as it is.
        let out = check(&config);
        assert!(
            out.status.success(),
            "check after {file}: {}",
            text(&out.stderr)
        );
        assert_no_secret("check", &text(&out.stdout));
    }
    let out = check(&config);
    let printed = text(&out.stdout);
    assert!(
        printed.contains("0 devices from")
            && printed.contains("2 from")
            && printed.contains("tts-csv.toml"),
        "{printed}"
    );

    // A daemon with that configuration opens uplinks of the three imported ABP devices with
    // the imported keys (MIC checked with NwkSKey, payload decrypted with AppSKey).
    let cfg = Config::load(&config).unwrap();
    assert_eq!(cfg.devices.len(), 6);
    let daemon = Daemon::start(&cfg).await.unwrap();
    let mut fwd = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(0xAA55_5A00_0000_0001))
        .await
        .unwrap();
    let mut devices = [
        abp(
            "valve-1",
            0x260B_1002,
            "087FFD12C7707F44A609E6CA50C98EC8",
            "C4BB03090BCAA05854057E3C5102A6AE",
        ),
        abp(
            "eui-70b3d57ed0052002",
            0x260B_2002,
            "CAD7F144ED7DA8D01AAF738E93136BD1",
            "2B882D3E5CF475DF1493B4FECDFE9E74",
        ),
        abp(
            "pump-2",
            0x260B_3002,
            "771B93459C432D45CBCDCD0902DF8D9A",
            "BD5C0A7E36E1E5D58C95B9AC5DFD9E0D",
        ),
    ];
    for (i, d) in devices.iter_mut().enumerate() {
        let phy = d.uplink(7, &[0xC0, 0xFF, 0xEE, i as u8], false).unwrap();
        let radio = Radio {
            tmst: 1_000_000 * (i as u32 + 1),
            ..Radio::default()
        };
        fwd.send(&[(&phy, radio)]).await.unwrap();
    }
    let lines = dir.path().join("up.jsonl");
    let read = || std::fs::read_to_string(&lines).unwrap_or_default();
    assert!(
        wait_until(T, || read().lines().count() >= 3).await,
        "three uplinks in the file stream: {:?}",
        read()
    );
    assert_eq!(daemon.metrics().uplinks("accepted"), 3);
    assert_eq!(daemon.metrics().uplinks("mic_failed"), 0);
    for line in read().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let id = v["end_device_ids"]["device_id"]
            .as_str()
            .unwrap()
            .to_string();
        let i = devices.iter().position(|d| d.id == id).expect(&id) as u8;
        let payload = base64::engine::general_purpose::STANDARD
            .decode(v["uplink_message"]["frm_payload"].as_str().unwrap())
            .unwrap();
        assert_eq!(payload, [0xC0, 0xFF, 0xEE, i], "{id}: {line}");
        assert_eq!(
            v["end_device_ids"]["application_ids"]["application_id"],
            "farm"
        );
    }
    daemon.stop().await;
}

#[test]
fn missing_keys_are_reported_per_device_and_files_are_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), &["farm"]);
    let out = import(&config, &sample("tts-end-devices.json"), &[]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for line in [
        "meter-9 (70B3D57ED0051009): skipped: OTAA device without app_key",
        "soil-1 (70B3D57ED0051001): imported: OTAA",
        "valve-1 (70B3D57ED0051002): imported: ABP, DevAddr 260B1002",
    ] {
        assert!(stderr.contains(line), "{line:?} not in:\n{stderr}");
    }
    assert!(
        stderr.contains("tank-3") && stderr.contains("encrypted"),
        "{stderr}"
    );
    assert!(
        stderr.contains("edge-11") && stderr.contains("LoRaWAN 1.1"),
        "{stderr}"
    );
    assert_no_secret("stderr", &stderr);
    let written = dir.path().join("devices.d/tts-end-devices.toml");
    assert!(written.is_file());

    // The same name again: refused unless --force. The devices are in the file being
    // replaced, so they are not "already configured".
    let out = import(&config, &sample("tts-end-devices.json"), &[]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--force"),
        "{}",
        text(&out.stderr)
    );
    let out = import(&config, &sample("tts-end-devices.json"), &["--force"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Under another name they would be duplicates: reported, and nothing left to import.
    let out = import(
        &config,
        &sample("tts-end-devices.json"),
        &["--output", "again"],
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("already has the id \"soil-1\""), "{stderr}");
    assert!(stderr.contains("no device of"), "{stderr}");
    assert!(!dir.path().join("devices.d/again.toml").exists());
    assert!(check(&config).status.success());

    // ChirpStack names no application: with two configured, --application decides.
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), &["farm", "orchard"]);
    let out = import(&config, &sample("chirpstack-devices.json"), &[]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("pass --application"));
    let out = import(
        &config,
        &sample("chirpstack-devices.json"),
        &["--application", "orchard", "--format", "chirpstack"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let file =
        std::fs::read_to_string(dir.path().join("devices.d/chirpstack-devices.toml")).unwrap();
    assert!(file.contains("application = \"orchard\"") && file.contains("id = \"pump-2\""));
    let out = import(
        &config,
        &sample("chirpstack-devices.json"),
        &["--application", "barn"],
    );
    assert!(text(&out.stderr).contains("\"barn\" is not an [[application]]"));
}

#[test]
fn a_devices_file_with_an_error_is_refused_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), &["farm"]);
    std::fs::write(
        dir.path().join("devices.d/bad.toml"),
        "# hand-edited\n[[device]]\napplication = \"farm\"\nid = \"x-1\"\ndev_eui = \"70B3D57ED0059001\"\ndev_addr = \"260B90\"\nnwk_s_key = \"000102030405060708090A0B0C0D0E0F\"\napp_s_key = \"000102030405060708090A0B0C0D0E0F\"\n",
    )
    .unwrap();
    let out = check(&config);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("bad.toml:6: [[device]] \"x-1\": key `dev_addr`"),
        "{stderr}"
    );
    // The daemon refuses it the same way (it loads the same config).
    let out = bin().arg("run").arg("-c").arg(&config).output().unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("bad.toml:6:"),
        "{}",
        text(&out.stderr)
    );
    // An import into it is refused before anything is written.
    let out = import(&config, &sample("tts-end-devices.json"), &[]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("bad.toml:6:"));
    assert!(!dir.path().join("devices.d/tts-end-devices.toml").exists());

    // A config without devices_dir: the import says which key to add.
    let plain = dir.path().join("plain.toml");
    std::fs::write(&plain, "[[application]]\nid = \"farm\"\n").unwrap();
    let out = import(&plain, &sample("tts-end-devices.json"), &[]);
    assert!(
        text(&out.stderr).contains("devices_dir"),
        "{}",
        text(&out.stderr)
    );
    // A devices_dir that does not exist: the error names the key.
    std::fs::remove_file(dir.path().join("devices.d/bad.toml")).unwrap();
    std::fs::remove_dir(dir.path().join("devices.d")).unwrap();
    let out = check(&config);
    assert!(
        text(&out.stderr).contains("[gateway] key `devices_dir`"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn the_daemon_logs_how_many_devices_came_from_which_file() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), &["farm"]);
    let out = import(&config, &sample("tts-end-devices.csv"), &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut child = bin()
        .arg("run")
        .arg("-c")
        .arg(&config)
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + T;
    let mut seen = Vec::new();
    let found = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("devices: 0 devices from") => break Some(line),
            Ok(line) => seen.push(line),
            Err(_) => break None,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let line = found.unwrap_or_else(|| panic!("no devices line in:\n{}", seen.join("\n")));
    assert!(
        line.contains("2 from") && line.contains("tts-end-devices.toml"),
        "{line}"
    );
}
