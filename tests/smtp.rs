//! The e-mail stream (`kind = "smtp"`) end to end: alerts fired by the real daemon (library
//! entry point, `device_silent` of devices that never send) go to a real SMTP server on this
//! machine — aiosmtpd (tests/py/smtpd.py, pinned in tests/py/requirements.txt) with STARTTLS
//! or implicit TLS on a certificate from tests/support/pki.rs, and AUTH — which records every
//! e-mail and answers 4xx or 5xx when a test asks.
//!
//! Needs Python with aiosmtpd (`LORASTREAM_PYTHON`); skipped without it, a failure with
//! `LORASTREAM_TEST_PYTHON=1` (CI).

mod support;

use lorastream::daemon::Daemon;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(15);
const USER: &str = "gateway-01";
/// The account's password: it must never show in a log line.
const PASSWORD: &str = "pa55-3e1d7b-never-logged";
const WRONG: &str = "wr0ng-9f2c44-never-logged";

// ---- log capture: every test of this binary logs here, and none may log a password ----

fn capture_logs() {
    support::logs::capture("lorastream=trace");
}

fn logs() -> String {
    support::logs::text()
}

fn assert_no_password_logged() {
    let l = logs();
    assert!(
        !l.contains(PASSWORD) && !l.contains(WRONG),
        "a password appeared in a log line"
    );
}

// ---- the SMTP server ----

struct Smtpd {
    child: Child,
    stdin: ChildStdin,
    port: u16,
    events: Arc<Mutex<Vec<Value>>>,
    /// The CA that signed the server's certificate (the stream's `ca_file`).
    ca: PathBuf,
}

impl Smtpd {
    /// aiosmtpd on 127.0.0.1 (port 0) with a certificate for 127.0.0.1, requiring AUTH as
    /// [`USER`]/[`PASSWORD`]; STARTTLS, or TLS from the first byte with `implicit`.
    fn start(dir: &Path, implicit: bool) -> Smtpd {
        Smtpd::start_with(dir, if implicit { "--implicit" } else { "" })
    }

    /// With `flag` = "--implicit", "--plain" (no TLS offered) or "".
    fn start_with(dir: &Path, flag: &str) -> Smtpd {
        let ca = pki::Ca::new(dir, "smtp");
        let cert = ca.issue(dir, "smtp-server", &["127.0.0.1"]);
        let script = format!("{}/tests/py/smtpd.py", env!("CARGO_MANIFEST_DIR"));
        let mut cmd = Command::new(python_interpreter());
        cmd.arg(script)
            .arg("--cert")
            .arg(&cert.cert)
            .arg("--key")
            .arg(&cert.key)
            .args(["--user", USER, "--password", PASSWORD])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if !flag.is_empty() {
            cmd.arg(flag);
        }
        let mut child = cmd.spawn().expect("start tests/py/smtpd.py");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = events.clone();
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if v["event"] == "ready" {
                    let _ = port_tx.send(v["port"].as_u64().unwrap_or(0) as u16);
                }
                ev.lock().unwrap().push(v);
            }
        });
        let port = port_rx
            .recv_timeout(T)
            .expect("the SMTP server did not start");
        Smtpd {
            child,
            stdin,
            port,
            events,
            ca: ca.pem_path.clone(),
        }
    }

    fn of(&self, event: &str) -> Vec<Value> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["event"] == event)
            .cloned()
            .collect()
    }

    /// Every e-mail the server answered (whatever its answer).
    fn mails(&self) -> Vec<Value> {
        self.of("mail")
    }

    /// The e-mails the server accepted.
    fn accepted(&self) -> Vec<Value> {
        self.mails()
            .into_iter()
            .filter(|m| m["code"] == 250)
            .collect()
    }

    /// Answer the next e-mail with `reply` (e.g. "451 4.3.0 try later"); returns once the
    /// server has it queued.
    async fn reply_next(&mut self, reply: &str) {
        let before = self.of("control").len();
        writeln!(self.stdin, "reply {reply}").unwrap();
        self.stdin.flush().unwrap();
        assert!(wait_until(T, || self.of("control").len() > before).await);
    }
}

impl Drop for Smtpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- configs and metrics ----

/// `devices` test devices in application "farm", each silent from the start: a
/// `device_silent` rule (after 1 s) fires one alert per device to the stream "mail".
fn daemon_config(dir: &Path, devices: u8, stream: &str) -> lorastream::config::Config {
    let mut text = String::from("[[application]]\nid = \"farm\"\n\n");
    for n in 1..=devices {
        text.push_str(&device_toml(&device(n), "farm"));
    }
    text.push_str(&format!(
        "[[stream]]\nname = \"mail\"\nkind = \"smtp\"\napplication = \"farm\"\n{stream}\n\n\
         [[alert]]\nkind = \"device_silent\"\napplication = \"farm\"\nafter = \"1s\"\nstreams = [\"mail\"]\n"
    ));
    config(dir, &text)
}

fn smtp_stream(s: &Smtpd, scheme: &str, password: &str, extra: &str) -> String {
    format!(
        "server = \"{scheme}://127.0.0.1:{}\"\nca_file = {:?}\nusername = \"{USER}\"\npassword = \"{password}\"\n\
         from = \"gateway-01@example.com\"\nto = [\"ops@example.com\", \"oncall@example.com\"]\n{extra}",
        s.port,
        s.ca.display().to_string()
    )
}

/// The value of one series in `/metrics` text, e.g. `lorastream_queue_depth{stream="mail"}`.
fn metric(d: &Daemon, series: &str) -> Option<f64> {
    d.metrics()
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

fn queue_depth(d: &Daemon) -> f64 {
    metric(d, "lorastream_queue_depth{stream=\"mail\"}").unwrap_or(-1.0)
}

fn gate(test: &str) -> bool {
    capture_logs();
    install_crypto();
    needs_python(test, &["aiosmtpd"])
}

// ---- tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_of_the_real_daemon_arrives_as_a_templated_mail_over_starttls_with_auth() {
    if !gate("smtp alert mail") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = Smtpd::start(dir.path(), false);
    let c = daemon_config(
        dir.path(),
        1,
        &smtp_stream(
            &s,
            "smtp",
            PASSWORD,
            "subject = \"{{ alert.kind }} on {{ alert.subject }}\"\nbatch_wait = \"200ms\"\n",
        ),
    );
    let d = Daemon::start(&c).await.unwrap();
    assert!(
        wait_until(T, || s.accepted().len() == 1).await,
        "{:?}",
        s.mails()
    );
    let m = s.accepted().remove(0);
    assert_eq!(m["subject"], "device_silent on dev-1");
    let body = m["body"].as_str().unwrap();
    assert!(
        body.starts_with("Device dev-1 (application farm) has sent no uplink for"),
        "{body}"
    );
    assert!(
        body.contains("kind:     device_silent\nstate:    firing\nsubject:  dev-1\n"),
        "{body}"
    );
    assert!(body.contains("correlation id: lorastream:alert:"), "{body}");
    assert_eq!(m["from"], "gateway-01@example.com");
    assert_eq!(
        m["to"],
        serde_json::json!(["ops@example.com", "oncall@example.com"])
    );
    assert_eq!(m["tls"], true, "STARTTLS was not used");
    assert_eq!(m["user"], USER);
    assert_eq!(m["headers"]["auto-submitted"], "auto-generated");
    assert!(m["message_id"].as_str().unwrap().ends_with("@example.com>"));
    // Acknowledged: the queue is empty; counted; the stream shows connected.
    assert!(wait_until(T, || queue_depth(&d) == 0.0).await);
    assert_eq!(
        metric(&d, "lorastream_stream_published_total{stream=\"mail\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&d, "lorastream_stream_connected{stream=\"mail\"}"),
        Some(1.0)
    );
    assert!(s.of("auth").iter().all(|a| a["ok"] == true));
    d.stop().await;
    assert_no_password_logged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_within_batch_wait_go_out_as_one_mail_over_implicit_tls() {
    if !gate("smtp batching") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = Smtpd::start(dir.path(), true);
    let c = daemon_config(
        dir.path(),
        3,
        &smtp_stream(
            &s,
            "smtps",
            PASSWORD,
            "body = \"{{ alert.subject }} went quiet ({{ alert.state }})\"\nbatch_wait = \"1s\"\n",
        ),
    );
    let d = Daemon::start(&c).await.unwrap();
    assert!(wait_until(T, || queue_depth(&d) == 0.0 && !s.accepted().is_empty()).await);
    let mails = s.accepted();
    assert_eq!(mails.len(), 1, "{mails:?}");
    let m = &mails[0];
    assert_eq!(m["tls"], true);
    let subject = m["subject"].as_str().unwrap();
    assert!(
        subject.starts_with("[lorastream] firing: device_silent on dev-")
            && subject.ends_with(" (+2 more)"),
        "{subject}"
    );
    let body = m["body"].as_str().unwrap();
    for n in 1..=3 {
        assert!(
            body.contains(&format!("dev-{n} went quiet (firing)")),
            "{body}"
        );
    }
    assert_eq!(
        metric(&d, "lorastream_stream_published_total{stream=\"mail\"}"),
        Some(3.0)
    );
    d.stop().await;
    assert_no_password_logged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_per_hour_keeps_the_rest_queued_not_dropped() {
    if !gate("smtp max_per_hour") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = Smtpd::start(dir.path(), false);
    let c = daemon_config(
        dir.path(),
        2,
        &smtp_stream(
            &s,
            "smtp",
            PASSWORD,
            "batch_max = 1\nbatch_wait = \"0s\"\nmax_per_hour = 1\n",
        ),
    );
    let d = Daemon::start(&c).await.unwrap();
    let limited = "lorastream_stream_rate_limited_total{stream=\"mail\"}";
    assert!(
        wait_until(T, || s.accepted().len() == 1
            && metric(&d, limited) == Some(1.0))
        .await,
        "{:?} {:?}",
        s.mails(),
        metric(&d, limited)
    );
    // The second alert waits in the queue: counted, logged, not sent, not dropped.
    assert!(wait_until(T, || queue_depth(&d) == 1.0).await);
    // The line is logged just after the counter is incremented.
    assert!(
        wait_until(T, || logs()
            .contains("max_per_hour reached: records wait in the queue"))
        .await
    );
    assert_eq!(s.mails().len(), 1);
    assert_eq!(
        metric(
            &d,
            "lorastream_queue_dropped_total{stream=\"mail\",reason=\"dead_letter\"}"
        )
        .unwrap_or(0.0),
        0.0
    );
    d.stop().await;
    // Still there after a restart (the window is in memory: a restart starts it over).
    let d = Daemon::start(&c).await.unwrap();
    assert!(wait_until(T, || s.accepted().len() == 2 && queue_depth(&d) == 0.0).await);
    let subjects: Vec<_> = s.accepted().iter().map(|m| m["subject"].clone()).collect();
    assert_ne!(subjects[0], subjects[1]);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_logged_without_it_and_the_alert_stays_queued_until_fixed() {
    if !gate("smtp wrong password") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = Smtpd::start(dir.path(), false);
    let wrong = daemon_config(
        dir.path(),
        1,
        &smtp_stream(&s, "smtp", WRONG, "batch_wait = \"0s\"\n"),
    );
    let d = Daemon::start(&wrong).await.unwrap();
    let m = d.metrics().clone();
    // The login is refused (at the start, before any alert), the alert fires and waits.
    assert!(
        wait_until(T, || m.stream_errors("mail", "smtp_auth") >= 1
            && m.alerts("device_silent", "firing") == 1
            && queue_depth(&d) == 1.0)
        .await
    );
    assert!(s.of("auth").iter().all(|a| a["ok"] == false));
    assert!(s.mails().is_empty());
    assert_eq!(
        metric(&d, "lorastream_stream_connected{stream=\"mail\"}"),
        Some(0.0)
    );
    let l = logs();
    assert!(l.contains("the SMTP server refused the login (535)"), "{l}");
    assert!(l.contains("check username and password"), "{l}");
    d.stop().await;
    assert_no_password_logged();

    // Fixed: the queued alert goes out, once.
    let right = daemon_config(
        dir.path(),
        1,
        &smtp_stream(&s, "smtp", PASSWORD, "batch_wait = \"0s\"\n"),
    );
    let d = Daemon::start(&right).await.unwrap();
    assert!(wait_until(T, || s.accepted().len() == 1 && queue_depth(&d) == 0.0).await);
    assert!(s.accepted()[0]["subject"]
        .as_str()
        .unwrap()
        .contains("device_silent on dev-1"));
    d.stop().await;
    assert_no_password_logged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_dead_letters_the_mail_and_the_next_one_still_goes_out() {
    if !gate("smtp 5xx") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = Smtpd::start(dir.path(), false);
    s.reply_next("554 5.7.1 refused by the test").await;
    let c = daemon_config(
        dir.path(),
        2,
        &smtp_stream(&s, "smtp", PASSWORD, "batch_max = 1\nbatch_wait = \"0s\"\n"),
    );
    let d = Daemon::start(&c).await.unwrap();
    assert!(
        wait_until(T, || s.mails().len() == 2 && queue_depth(&d) == 0.0).await,
        "{:?}",
        s.mails()
    );
    let codes: Vec<_> = s.mails().iter().map(|m| m["code"].clone()).collect();
    assert_eq!(codes, vec![554, 250]);
    assert_ne!(s.mails()[0]["subject"], s.mails()[1]["subject"]);
    assert_eq!(d.metrics().stream_errors("mail", "smtp_refused"), 1);
    assert_eq!(
        metric(
            &d,
            "lorastream_queue_dropped_total{stream=\"mail\",reason=\"dead_letter\"}"
        ),
        Some(1.0)
    );
    assert!(logs().contains("refused the e-mail for good (5xx)"));
    // Nothing is retried afterwards.
    assert_eq!(s.mails().len(), 2);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_is_retried_after_the_backoff_and_then_delivered() {
    if !gate("smtp 4xx") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = Smtpd::start(dir.path(), false);
    s.reply_next("451 4.3.0 try again later").await;
    let c = daemon_config(
        dir.path(),
        1,
        &smtp_stream(&s, "smtp", PASSWORD, "batch_wait = \"0s\"\n"),
    );
    let d = Daemon::start(&c).await.unwrap();
    assert!(
        wait_until(T, || s.accepted().len() == 1 && queue_depth(&d) == 0.0).await,
        "{:?}",
        s.mails()
    );
    let mails = s.mails();
    assert_eq!(mails.len(), 2, "{mails:?}");
    assert_eq!(mails[0]["code"], 451);
    // The same e-mail again: same records, same Message-ID.
    assert_eq!(mails[0]["message_id"], mails[1]["message_id"]);
    assert_eq!(mails[0]["subject"], mails[1]["subject"]);
    assert_eq!(d.metrics().stream_errors("mail", "smtp_deferred"), 1);
    assert!(logs().contains("the SMTP server deferred the e-mail (451)"));
    assert_eq!(
        metric(
            &d,
            "lorastream_queue_dropped_total{stream=\"mail\",reason=\"dead_letter\"}"
        )
        .unwrap_or(0.0),
        0.0
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_starttls_or_an_untrusted_certificate_sends_nothing_and_no_password() {
    if !gate("smtp tls required") {
        return;
    }
    // A server that offers no STARTTLS (but AUTH in the clear): smtp:// refuses to go on.
    let dir = tempfile::tempdir().unwrap();
    let s = Smtpd::start_with(dir.path(), "--plain");
    let c = daemon_config(
        dir.path(),
        1,
        &smtp_stream(&s, "smtp", PASSWORD, "batch_wait = \"0s\"\n"),
    );
    let d = Daemon::start(&c).await.unwrap();
    let m = d.metrics().clone();
    assert!(
        wait_until(T, || m.stream_errors("mail", "smtp_connect") >= 1
            && m.alerts("device_silent", "firing") == 1
            && queue_depth(&d) == 1.0)
        .await
    );
    assert!(logs().contains("does not offer STARTTLS, which smtp:// requires"));
    assert!(
        s.of("auth").is_empty(),
        "the password went out in the clear"
    );
    assert!(s.mails().is_empty());
    d.stop().await;

    // A STARTTLS server whose certificate is not trusted (no ca_file): nothing is sent.
    let dir = tempfile::tempdir().unwrap();
    let s = Smtpd::start(dir.path(), false);
    let stream = smtp_stream(&s, "smtp", PASSWORD, "batch_wait = \"0s\"\n");
    let stream: String = stream
        .lines()
        .filter(|l| !l.starts_with("ca_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    let d = Daemon::start(&daemon_config(dir.path(), 1, &stream))
        .await
        .unwrap();
    let m = d.metrics().clone();
    assert!(
        wait_until(T, || m.stream_errors("mail", "smtp_connect") >= 1
            && m.alerts("device_silent", "firing") == 1
            && queue_depth(&d) == 1.0)
        .await
    );
    let l = logs();
    assert!(
        l.contains("TLS: STARTTLS: ") && l.contains("invalid peer certificate"),
        "no TLS error logged: {l}"
    );
    assert!(s.of("auth").is_empty() && s.mails().is_empty());
    d.stop().await;
    assert_no_password_logged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplinks_are_mailed_only_with_alerts_only_false() {
    use lorastream::model::Eui64;
    use lorastream::sim::{Forwarder, Radio};
    if !gate("smtp uplinks") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = Smtpd::start(dir.path(), false);
    let mut d1 = device(1);
    let text = format!(
        "[[application]]\nid = \"farm\"\n\n{}\
         [[stream]]\nname = \"mail\"\nkind = \"smtp\"\napplication = \"farm\"\n{}\n\
         [[stream]]\nname = \"alerts\"\nkind = \"smtp\"\napplication = \"farm\"\n{}\n",
        device_toml(&d1, "farm"),
        smtp_stream(
            &s,
            "smtp",
            PASSWORD,
            "alerts_only = false\nbatch_wait = \"0s\"\nsubject = \"uplink {{ uplink_message.f_cnt }} from {{ end_device_ids.device_id }}\"\n"
        ),
        smtp_stream(&s, "smtp", PASSWORD, "batch_wait = \"0s\"\n"),
    );
    let d = Daemon::start(&config(dir.path(), &text)).await.unwrap();
    let mut fwd = Forwarder::connect(d.udp_addr(), Eui64::from_u64(0xAA55_5A00_0000_0001))
        .await
        .unwrap();
    fwd.pull().await.unwrap();
    let p = d1.uplink(1, b"hello", false).unwrap();
    fwd.send(&[(&p, Radio::default())]).await.unwrap();
    assert!(
        wait_until(T, || s.accepted().len() == 1).await,
        "{:?}",
        s.mails()
    );
    let m = s.accepted().remove(0);
    assert_eq!(m["subject"], "uplink 0 from dev-1");
    // Without a body template: the stream's format (TTS JSON), indented.
    let body = m["body"].as_str().unwrap();
    assert!(body.contains("\"device_id\": \"dev-1\""), "{body}");
    assert!(body.contains("\"frm_payload\": \"aGVsbG8=\""), "{body}");
    // The alerts-only stream queued nothing.
    assert_eq!(
        metric(&d, "lorastream_queue_depth{stream=\"alerts\"}"),
        Some(0.0)
    );
    assert_eq!(
        metric(&d, "lorastream_queue_delivered_total{stream=\"alerts\"}").unwrap_or(0.0),
        0.0
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_552_halves_the_batch_and_one_record_alone_is_dropped_as_too_large() {
    if !gate("smtp 552") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = Smtpd::start(dir.path(), false);
    // Two alerts in one e-mail: too large; then the first alone: too large (dropped); then the
    // second alone goes out.
    s.reply_next("552 5.3.4 message size exceeds fixed limit")
        .await;
    s.reply_next("552 5.3.4 message size exceeds fixed limit")
        .await;
    let c = daemon_config(
        dir.path(),
        2,
        &smtp_stream(&s, "smtp", PASSWORD, "batch_wait = \"1s\"\n"),
    );
    let d = Daemon::start(&c).await.unwrap();
    assert!(
        wait_until(T, || s.accepted().len() == 1 && queue_depth(&d) == 0.0).await,
        "{:?}",
        s.mails()
    );
    let mails = s.mails();
    let codes: Vec<_> = mails.iter().map(|m| m["code"].clone()).collect();
    assert_eq!(codes, vec![552, 552, 250]);
    assert!(mails[0]["subject"].as_str().unwrap().ends_with("(+1 more)"));
    assert!(!mails[1]["subject"].as_str().unwrap().contains("more"));
    assert_ne!(mails[1]["subject"], mails[2]["subject"]);
    assert_eq!(
        metric(
            &d,
            "lorastream_queue_dropped_total{stream=\"mail\",reason=\"too_large\"}"
        ),
        Some(1.0)
    );
    assert!(logs().contains("refused the e-mail as too large (552)"));
    d.stop().await;
}
