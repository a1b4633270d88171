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
    for cmd in ["run", "check", "demo", "simulate"] {
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
    assert!(
        stderr.contains("soil-1 decrypts FPort Some(2): \"ON\""),
        "{stderr}"
    );
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
