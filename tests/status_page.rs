//! The status page (`/` on the metrics listener) in a real headless browser: the real
//! `lorastream run` binary, real GWMP/UDP uplinks from a simulated packet forwarder (MICs
//! computed by the simulated devices), and Debian's `chromium --headless --dump-dom`, which runs
//! the page's script (its poll of `/api/status` and the redraw) before it prints the DOM.
//!
//! Skipped with a line on stderr when chromium is not installed, unless
//! `LORASTREAM_TEST_BROWSER=1` (CI) makes that a failure.

mod faultkit;
mod support;

use faultkit::{DaemonProc, DaemonSpec};
use lorastream::model::Eui64;
use lorastream::sim::{Forwarder, Radio, SimDevice};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{device, device_toml, needs_browser};

const T: Duration = Duration::from_secs(30);
/// Markup in a forwarder's `stat.time`.
const EVIL: &str = "<script>alert(1)</script>";
/// Markup in a device id (no `/`: ids are used in MQTT topics).
const EVIL_ID: &str = "<img src=x onerror=alert(1)>";
const EVIL_ID_ESCAPED: &str = "&lt;img src=x onerror=alert(1)&gt;";

fn gw() -> Eui64 {
    Eui64::from_u64(0xAA55_5A00_0000_0001)
}

/// One HTTP/1.1 request to the daemon's metrics listener: (status line, head, body).
async fn http(port: u16, method: &str, path: &str) -> (String, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut r = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut r))
        .await
        .unwrap()
        .unwrap();
    let (head, body) = r.split_once("\r\n\r\n").unwrap_or((&r, ""));
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, head.to_string(), body.to_string())
}

async fn status_json(port: u16) -> serde_json::Value {
    let (_, _, body) = http(port, "GET", "/api/status").await;
    serde_json::from_str(&body).unwrap_or_default()
}

/// Poll `/api/status` until `f` holds (within [`T`]); the last answer.
async fn wait_status(port: u16, f: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let end = Instant::now() + T;
    loop {
        let v = status_json(port).await;
        if f(&v) {
            return v;
        }
        assert!(Instant::now() < end, "not as expected within {T:?}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `chromium --headless` with `args` and the page at `url`, in its own profile directory;
/// stdout. Killed (and failed) after a minute.
fn chromium(browser: &Path, profile: &Path, args: &[&str], url: &str) -> String {
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", browser.display()));
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "chromium exited with {st}");
            break;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    reader.join().unwrap()
}

/// The inside of `<tbody id="{id}" …>…</tbody>` in a dumped DOM, and its opening tag.
fn tbody<'a>(dom: &'a str, id: &str) -> (&'a str, &'a str) {
    let start = dom
        .find(&format!("<tbody id=\"{id}\""))
        .unwrap_or_else(|| panic!("no tbody {id} in\n{dom}"));
    let open_end = start + dom[start..].find('>').unwrap() + 1;
    let close = open_end + dom[open_end..].find("</tbody>").unwrap();
    (&dom[start..open_end], &dom[open_end..close])
}

/// A TCP relay in front of the daemon's listener, for the browser. It keeps each answer to `/`
/// it passed on, and holds the page's first `/api/status` request until the test has answered
/// on `first_poll` (the test sends an uplink then): so the DOM can only show that uplink if the
/// script fetched and drew it after the page was served.
struct Relay {
    port: u16,
    pages: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    first_poll: tokio::sync::mpsc::Receiver<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(daemon_port: u16) -> Relay {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let pages = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, first_poll) = tokio::sync::mpsc::channel(1);
        let keep = pages.clone();
        let task = tokio::spawn(async move {
            let mut tx = Some(tx);
            loop {
                let Ok((mut browser, _)) = l.accept().await else {
                    return;
                };
                // The request head (a GET has no body).
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match browser.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&req).to_string();
                let path = head.split(' ').nth(1).unwrap_or_default().to_string();
                if path == "/api/status" {
                    if let Some(tx) = tx.take() {
                        let (go, wait) = tokio::sync::oneshot::channel();
                        let _ = tx.send(go).await;
                        let _ = wait.await;
                    }
                }
                let Ok(mut daemon) =
                    tokio::net::TcpStream::connect(("127.0.0.1", daemon_port)).await
                else {
                    continue;
                };
                let _ = daemon.write_all(&req).await;
                // The daemon answers once and closes (`Connection: close`).
                let mut answer = Vec::new();
                let _ = daemon.read_to_end(&mut answer).await;
                if path == "/" {
                    keep.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&answer).to_string());
                }
                let _ = browser.write_all(&answer).await;
                let _ = browser.shutdown().await;
            }
        });
        Relay {
            port,
            pages,
            first_poll,
            task,
        }
    }
}

/// A GWMP PUSH_DATA with a `stat` object whose `time` is markup.
fn stat_datagram(eui: Eui64, time: &str) -> Vec<u8> {
    let mut d = vec![2, 0x12, 0x34, 0];
    d.extend_from_slice(&eui.0);
    d.extend_from_slice(
        serde_json::json!({"stat": {"time": time, "rxnb": 7, "rxok": 6, "rxfw": 6,
            "ackr": 100.0, "dwnb": 0, "txnb": 0}})
        .to_string()
        .as_bytes(),
    );
    d
}

async fn uplink(fwd: &mut Forwarder, d: &mut SimDevice, rssi: i32, snr: f32) {
    let p = d.uplink(1, b"x", false).unwrap();
    fwd.send(&[(
        &p,
        Radio {
            rssi,
            snr,
            ..Radio::default()
        },
    )])
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_gateways_devices_streams_and_frames_live_in_a_real_browser() {
    let Some(browser) = needs_browser("status_page") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut d1 = device(1);
    let mut evil = device(2);
    evil.id = EVIL_ID.into();
    let dead = support::free_port();
    let archive = dir.path().join("archive.jsonl");
    let body = format!(
        "[[application]]\nid = \"farm\"\n\n{}{}\
         [[stream]]\nname = \"archive\"\nkind = \"file\"\npath = {:?}\n\n\
         [[stream]]\nname = \"cloud\"\nserver = \"mqtt://gw:S3cretPassw0rd@127.0.0.1:{dead}\"\n\n\
         [[alert]]\nkind = \"stream_down\"\nstream = \"cloud\"\nafter = \"1s\"\nstreams = [\"archive\"]\n\n",
        device_toml(&d1, "farm"),
        device_toml(&evil, "farm"),
        archive.display().to_string()
    );
    let spec = DaemonSpec::new(dir.path(), "redb", body);
    let daemon = DaemonProc::start(&spec).await;
    let port = spec.metrics_port;

    let mut fwd = Forwarder::connect(spec.udp, gw()).await.unwrap();
    fwd.pull().await.unwrap();
    fwd.send_raw(&stat_datagram(gw(), EVIL)).await.unwrap();
    // Five uplinks of dev-1 with changing signal, one of the device named like markup.
    for i in 0..5 {
        uplink(&mut fwd, &mut d1, -70 - 5 * i, 2.5 + 2.0 * i as f32).await;
    }
    uplink(&mut fwd, &mut evil, -80, 3.0).await;
    // The dead MQTT stream's alert fires after 1 s.
    let v = wait_status(port, |v| {
        v["frames"].as_array().is_some_and(|f| f.len() == 6)
            && v["gateways"][0]["stat"]["rxnb"] == 7
            && v["alerts"].as_array().is_some_and(|a| a.len() == 1)
    })
    .await;
    assert_eq!(v["alerts"][0]["kind"], "stream_down");
    assert_eq!(v["alerts"][0]["subject"], "cloud");

    // The JSON: what the page needs, and no secret.
    let dev1 = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == "dev-1")
        .unwrap()
        .clone();
    assert_eq!(dev1["f_cnt"], 4, "{v}");
    assert_eq!(dev1["dev_eui"], "70B3D57ED0000001");
    assert_eq!(dev1["data_rate"], "DR5 (SF7BW125)");
    assert_eq!(
        dev1["signal"],
        serde_json::json!([
            [0, -70, 2.5],
            [1, -75, 4.5],
            [2, -80, 6.5],
            [3, -85, 8.5],
            [4, -90, 10.5]
        ])
    );
    assert_eq!(v["gateways"][0]["eui"], "AA555A0000000001");
    assert_eq!(v["frames"][0]["device"], EVIL_ID, "newest first");
    assert_eq!(v["frames"][1]["result"], "accepted");
    let cloud = v["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "cloud")
        .unwrap();
    assert_eq!(cloud["target"], format!("mqtt://127.0.0.1:{dead}"));
    assert_eq!(cloud["connected"], false);
    let (_, head, page) = http(port, "GET", "/").await;
    let (_, _, json) = http(port, "GET", "/api/status").await;
    for secret in [
        "S3cretPassw0rd",
        &hex::encode(d1.nwk_s_key.0),
        &hex::encode(d1.app_s_key.0),
    ] {
        assert!(!page.contains(secret), "{secret} on the page");
        assert!(!json.contains(secret), "{secret} in /api/status");
    }
    // The served page: escaped, and a policy that allows only its own script.
    assert!(!page.contains(EVIL) && !page.contains("<img"), "{page}");
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(page.contains(EVIL_ID_ESCAPED));
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains("content-security-policy: default-src 'none'; script-src 'sha256-"),
        "{head}"
    );
    assert!(head.contains("content-type: text/html; charset=utf-8"));
    assert!(head.contains("cache-control: no-store"));
    // GET and HEAD only.
    assert!(http(port, "POST", "/").await.0.contains(" 405 "));
    let (st, _, b) = http(port, "HEAD", "/api/status").await;
    assert!(st.contains(" 200 ") && b.is_empty(), "{st} {b}");

    // The browser: the DOM after the script has fetched /api/status and redrawn every table.
    // Between the page and the script's first poll, dev-1 sends FCnt 5.
    let mut relay = Relay::start(port).await;
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{}/", relay.port);
    let (b, p) = (browser.clone(), profile.path().to_path_buf());
    let run = tokio::task::spawn_blocking(move || {
        chromium(&b, &p, &["--dump-dom", "--virtual-time-budget=10000"], &url)
    });
    let go = tokio::time::timeout(T, relay.first_poll.recv())
        .await
        .expect("the page's script never polled /api/status")
        .unwrap();
    uplink(&mut fwd, &mut d1, -95, 12.5).await;
    wait_status(port, |v| {
        v["frames"].as_array().is_some_and(|f| f.len() == 7)
    })
    .await;
    go.send(()).unwrap();
    let dom = run.await.unwrap();
    relay.task.abort();
    let served = relay.pages.lock().unwrap().clone();
    assert_eq!(served.len(), 1, "one page load");
    assert_eq!(
        tbody(&served[0], "frames").1.matches("<tr>").count(),
        6,
        "the page as served has the first six frames only"
    );
    assert!(
        dom.contains("<span id=\"live\" class=\"ok\">live, updated "),
        "the script did not update the page:\n{dom}"
    );
    for id in ["alerts", "gateways", "devices", "streams", "frames"] {
        let (open, _) = tbody(&dom, id);
        assert!(
            open.contains("data-src=\"live\""),
            "{id} not drawn by the script: {open}"
        );
    }
    let (_, alerts) = tbody(&dom, "alerts");
    assert!(
        alerts.contains("<td>stream_down</td><td>cloud</td>"),
        "{alerts}"
    );
    let (_, gateways) = tbody(&dom, "gateways");
    assert!(gateways.contains("AA555A0000000001"), "{gateways}");
    assert!(gateways.contains("6 / 7"), "{gateways}");
    assert!(
        gateways.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{gateways}"
    );
    let (_, devices) = tbody(&dom, "devices");
    let row = devices
        .split("<tr>")
        .find(|r| r.contains("<td>dev-1</td>"))
        .unwrap_or_else(|| panic!("no dev-1 row in {devices}"));
    assert!(row.contains("70B3D57ED0000001"), "{row}");
    // FCnt 5: sent after the page was served, drawn by the script.
    assert!(row.contains("<td>5</td>"), "FCnt 5 not shown: {row}");
    assert!(row.contains("<td>DR5 (SF7BW125)</td>"), "{row}");
    assert!(row.contains("<td>-95 dBm / 12.5 dB</td>"), "{row}");
    // The signal chart: an inline SVG with an RSSI and an SNR line of five points each.
    assert!(row.contains("<svg class=\"chart\""), "{row}");
    assert_eq!(row.matches("<polyline").count(), 2, "{row}");
    let pts = row.split("points=\"").nth(1).unwrap();
    assert_eq!(pts[..pts.find('"').unwrap()].split(' ').count(), 6, "{row}");
    assert!(devices.contains(EVIL_ID_ESCAPED), "{devices}");
    let (_, streams) = tbody(&dom, "streams");
    assert!(streams.contains("<td>archive</td>"), "{streams}");
    assert!(streams.contains("<td>file</td>"), "{streams}");
    assert!(streams.contains("<td class=\"bad\">no</td>"), "{streams}");
    let (_, frames) = tbody(&dom, "frames");
    assert_eq!(frames.matches("<tr>").count(), 7, "{frames}");
    let newest = frames.split("<tr>").nth(1).unwrap();
    assert!(
        newest.contains("<td class=\"ok\">accepted</td><td>dev-1</td><td class=\"mono\">26000001</td><td>5</td>"),
        "the late frame first: {frames}"
    );
    assert!(
        frames.contains("<td class=\"ok\">accepted</td>"),
        "{frames}"
    );
    assert!(frames.contains("868.1 MHz"), "{frames}");
    // Markup from input never became an element.
    assert!(!dom.contains(EVIL) && !dom.contains("<img"), "{dom}");
    assert_eq!(
        dom.matches("<script>").count(),
        1,
        "only the page's own script"
    );

    // Optional: a screenshot for a human (LORASTREAM_STATUS_SCREENSHOT=/path/to.png).
    if let Ok(path) = std::env::var("LORASTREAM_STATUS_SCREENSHOT") {
        chromium(
            &browser,
            profile.path(),
            &[
                &format!("--screenshot={path}"),
                "--window-size=1400,1100",
                "--virtual-time-budget=10000",
                "--hide-scrollbars",
            ],
            &format!("http://127.0.0.1:{port}/"),
        );
    }
    drop(daemon);
}
