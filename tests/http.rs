//! The HTTP webhook stream end to end: simulated packet forwarders (real UDP) → the daemon's
//! library entry point → a real HTTP server in this test (hyper on a TCP port 0, and HTTPS with
//! rcgen certificates and a required client certificate) that records every request and answers
//! what the test tells it (200, 500, 429 with Retry-After, 400, a hang, or not listening at all).
//! Downlinks come back in POST answers and from `poll_url`, and reach the forwarder as PULL_RESP,
//! decrypted here with the device keys.

mod support;

use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use lorastream::config::Config;
use lorastream::daemon::Daemon;
use lorastream::model::Eui64;
use lorastream::sim::{Forwarder, Radio, SimDevice};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;
use tokio::net::TcpListener;

const T: Duration = Duration::from_secs(20);
/// The custom header's value: it must never show in a log line.
const SECRET: &str = "k3y-7f1c9e2a-never-logged";

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

// ---- log capture: every test of this binary logs here, and none may log the secret ----

fn capture_logs() {
    support::logs::capture("lorastream=trace,reqwest=trace,hyper_util=trace");
}

fn logs() -> String {
    support::logs::text()
}

fn assert_secret_never_logged() {
    let l = logs();
    assert!(
        !l.contains(SECRET),
        "the header value appeared in a log line"
    );
}

// ---- the webhook server ----

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
    at: Instant,
    status: u16,
}

impl Seen {
    fn kind(&self) -> &str {
        self.headers
            .get("x-lorastream-kind")
            .map(String::as_str)
            .unwrap_or("")
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    /// The documents of a body: a JSON array's items, or one object (`batch_max = 1`).
    fn docs(&self) -> Vec<Value> {
        match self.json() {
            Value::Array(a) => a,
            v @ Value::Object(_) => vec![v],
            _ => Vec::new(),
        }
    }
    fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

#[derive(Clone, Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    delay: Duration,
}

impl Reply {
    fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
        }
    }
    fn ok() -> Reply {
        Reply::status(200).body("OK")
    }
    fn body(mut self, b: impl Into<String>) -> Reply {
        self.body = b.into();
        self
    }
    fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.into(), v.into()));
        self
    }
    fn delay(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
}

type Responder = Box<dyn FnMut(&Seen) -> Reply + Send>;

struct Hook {
    addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    responder: Arc<Mutex<Responder>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Hook {
    async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> Hook {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut h = Hook {
            addr: listener.local_addr().unwrap(),
            tls,
            seen: Arc::default(),
            responder: Arc::new(Mutex::new(Box::new(|_| Reply::ok()))),
            task: None,
        };
        h.serve(listener);
        h
    }

    fn serve(&mut self, listener: TcpListener) {
        let (seen, responder, tls) = (self.seen.clone(), self.responder.clone(), self.tls.clone());
        self.task = Some(tokio::spawn(async move {
            // Connections live in this set: aborting the server closes them all.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let (seen, responder, tls) = (seen.clone(), responder.clone(), tls.clone());
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        handle(req, seen.clone(), responder.clone())
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(cfg) => {
                            if let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg).accept(sock).await {
                                let _ = http
                                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                                    .await;
                            }
                        }
                        None => {
                            let _ = http
                                .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                                .await;
                        }
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        }));
    }

    /// Stop listening and close every connection.
    async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Listen again on the same port.
    async fn restart(&mut self) {
        let end = Instant::now() + T;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < end => {
                    eprintln!("rebinding {}: {e}", self.addr);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot listen on {} again: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    fn url(&self, path: &str) -> String {
        match self.tls {
            Some(_) => format!("https://localhost:{}{path}", self.addr.port()),
            None => format!("http://127.0.0.1:{}{path}", self.addr.port()),
        }
    }

    fn respond(&self, f: impl FnMut(&Seen) -> Reply + Send + 'static) {
        *self.responder.lock().unwrap() = Box::new(f);
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn posts(&self, kind: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == "POST" && s.kind() == kind)
            .collect()
    }

    /// Uplink documents the server accepted (2xx), in arrival order.
    fn accepted(&self) -> Vec<Value> {
        self.posts("uplinks")
            .iter()
            .filter(|s| s.ok())
            .flat_map(|s| s.docs())
            .collect()
    }

    /// Downlink event documents received, in arrival order.
    fn events(&self) -> Vec<Value> {
        self.posts("downlink_events")
            .iter()
            .flat_map(|s| s.docs())
            .collect()
    }
}

async fn handle(
    req: hyper::Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    responder: Arc<Mutex<Responder>>,
) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let mut s = Seen {
        method,
        path,
        headers,
        body,
        at: Instant::now(),
        status: 0,
    };
    let reply = (responder.lock().unwrap())(&s);
    s.status = reply.status;
    seen.lock().unwrap().push(s);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut resp = hyper::Response::builder().status(reply.status);
    for (k, v) in &reply.headers {
        resp = resp.header(k, v);
    }
    Ok(resp.body(Full::new(Bytes::from(reply.body))).unwrap())
}

// ---- the daemon ----

fn gw() -> Eui64 {
    Eui64::from_u64(0xAA55_5A00_0000_0001)
}

fn cfg(dir: &Path, devices: &str, stream: &str) -> Config {
    config(
        dir,
        &format!(
            "[[application]]\nid = \"farm\"\n\n[[application]]\nid = \"other\"\n\n{devices}\
             [[stream]]\nname = \"hook\"\nkind = \"http\"\napplication = \"farm\"\n\
             headers = {{ \"X-Api-Key\" = \"{SECRET}\" }}\n{stream}\n"
        ),
    )
}

async fn uplink(fwd: &mut Forwarder, d: &mut SimDevice, payload: &[u8], tmst: u32) {
    let p = d.uplink(1, payload, false).unwrap();
    fwd.send(&[(
        &p,
        Radio {
            tmst,
            ..Radio::default()
        },
    )])
    .await
    .unwrap();
}

fn device_of(v: &Value) -> String {
    v["end_device_ids"]["device_id"]
        .as_str()
        .unwrap_or("")
        .to_string()
}
fn cid(v: &Value) -> String {
    v["correlation_ids"][0].as_str().unwrap_or("").to_string()
}
fn f_cnt(v: &Value) -> u64 {
    v["uplink_message"]["f_cnt"].as_u64().unwrap_or(u64::MAX)
}

/// Each device's FCnts in the order they were delivered.
fn per_device(docs: &[Value]) -> BTreeMap<String, Vec<u64>> {
    let mut m: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for v in docs {
        m.entry(device_of(v)).or_default().push(f_cnt(v));
    }
    m
}

fn stream_health(daemon: &Daemon) -> Value {
    serde_json::to_value(daemon.health()).unwrap()["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stream"] == "hook")
        .cloned()
        .unwrap()
}

// ---- tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_headers_order_and_batch_wait() {
    capture_logs();
    install_crypto();
    let hook = Hook::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut d1, mut d2) = (device(1), device(2));
    let c = cfg(
        dir.path(),
        &format!("{}{}", device_toml(&d1, "farm"), device_toml(&d2, "farm")),
        &format!(
            "url = \"{}\"\nbatch_max = 5\nbatch_wait_ms = 1000\n",
            hook.url("/lorawan/up?tenant=t1")
        ),
    );
    let daemon = Daemon::start(&c).await.unwrap();
    // Idle, the stream probes the server so /health can say it is reachable.
    assert!(wait_until(T, || daemon.metrics().is_stream_connected("hook")).await);
    assert!(hook.seen().iter().any(|s| s.method == "HEAD"));
    let mut fwd = Forwarder::connect(daemon.udp_addr(), gw()).await.unwrap();

    // A burst of 12 uplinks: full batches of 5 leave at once, the last 2 after batch_wait.
    for i in 0..6u8 {
        uplink(&mut fwd, &mut d1, &[i], 1000 + u32::from(i)).await;
        uplink(&mut fwd, &mut d2, &[i], 2000 + u32::from(i)).await;
    }
    assert!(
        wait_until(T, || hook.accepted().len() == 12).await,
        "{:?}",
        hook.seen()
    );
    let posts = hook.posts("uplinks");
    assert_eq!(
        posts.len(),
        3,
        "5 + 5 + 2: {:?}",
        posts.iter().map(|p| p.docs().len()).collect::<Vec<_>>()
    );
    for p in &posts {
        assert_eq!(p.path, "/lorawan/up?tenant=t1");
        assert_eq!(p.headers["content-type"], "application/json");
        assert_eq!(p.headers["x-api-key"], SECRET);
        assert!(p.headers["user-agent"].starts_with("lorastream/"));
        let n = p.docs().len();
        assert!((1..=5).contains(&n), "batch of {n}");
    }
    assert_eq!(posts[0].docs().len(), 5);
    let docs = hook.accepted();
    // The contract's TTS document, one per uplink, each once.
    let ids: HashSet<String> = docs.iter().map(cid).collect();
    assert_eq!(ids.len(), 12);
    assert!(ids.iter().all(|c| c.starts_with("lorastream:uplink:")));
    assert_eq!(
        docs[0]["end_device_ids"]["application_ids"]["application_id"],
        "farm"
    );
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(docs[0]["uplink_message"]["frm_payload"].as_str().unwrap())
            .unwrap()
            .len(),
        1
    );
    // Per-device order.
    let order = per_device(&docs);
    assert_eq!(order["dev-1"], (0..6).collect::<Vec<u64>>());
    assert_eq!(order["dev-2"], (0..6).collect::<Vec<u64>>());
    let q = daemon.store().queue("hook").unwrap();
    assert!(wait_until(T, || q.is_empty()).await);

    // batch_wait: a lone uplink waits up to 1 s for company; one 400 ms later joins it.
    let before = hook.posts("uplinks").len();
    let t0 = Instant::now();
    uplink(&mut fwd, &mut d1, b"a", 9000).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    uplink(&mut fwd, &mut d2, b"b", 9100).await;
    assert!(wait_until(T, || hook.accepted().len() == 14).await);
    let late = &hook.posts("uplinks")[before..];
    assert_eq!(late.len(), 1, "both uplinks in one POST");
    assert_eq!(late[0].docs().len(), 2);
    let waited = late[0].at - t0;
    assert!(
        waited >= Duration::from_millis(1000) && waited < Duration::from_secs(4),
        "the batch left after {waited:?}"
    );

    let m = daemon.metrics();
    // The server saw the request before the daemon read its answer and counted it.
    assert!(wait_until(T, || m.http_requests("hook", "uplinks", "2xx") >= 4).await);
    assert_eq!(m.http_requests("hook", "uplinks", "2xx"), 4);
    assert!(m.encode().contains(
        "lorastream_http_requests_total{stream=\"hook\",purpose=\"uplinks\",result=\"2xx\"} 4"
    ));
    // The request is counted when its answer is read, the records as delivered once their
    // acknowledgement reached the store, a moment later (loop run 3 of stop 24 read 12).
    assert!(
        wait_until(T, || stream_health(&daemon)["delivered"] == 14).await,
        "{}",
        stream_health(&daemon)
    );
    let h = stream_health(&daemon);
    assert_eq!(h["connected"], true);
    daemon.stop().await;
    assert_secret_never_logged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_and_retry_after_is_honoured() {
    capture_logs();
    install_crypto();
    let hook = Hook::start(None).await;
    // First POST: 500. Second: 429 with Retry-After: 2. Then 200.
    let mut n = 0;
    hook.respond(move |s| {
        if s.method != "POST" {
            return Reply::ok();
        }
        n += 1;
        match n {
            1 => Reply::status(500).body("database down"),
            2 => Reply::status(429)
                .header("Retry-After", "2")
                .body("slow down"),
            _ => Reply::ok(),
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut d1 = device(1);
    let c = cfg(
        dir.path(),
        &device_toml(&d1, "farm"),
        &format!("url = \"{}\"\nbatch_wait_ms = 300\n", hook.url("/up")),
    );
    let daemon = Daemon::start(&c).await.unwrap();
    let mut fwd = Forwarder::connect(daemon.udp_addr(), gw()).await.unwrap();
    for i in 0..3u8 {
        uplink(&mut fwd, &mut d1, &[i], 1000 + u32::from(i)).await;
    }
    assert!(
        wait_until(T, || hook.accepted().len() == 3).await,
        "{:?}",
        hook.seen()
    );
    let posts = hook.posts("uplinks");
    let statuses: Vec<u16> = posts.iter().map(|p| p.status).collect();
    assert_eq!(&statuses[..3], &[500, 429, 200], "{statuses:?}");
    // The retry after the 429 waited at least its Retry-After.
    let gap = posts[2].at - posts[1].at;
    assert!(gap >= Duration::from_secs(2), "retried after {gap:?}");
    // The retry after the 500 backed off (base 0.5 s, full jitter).
    let gap = posts[1].at - posts[0].at;
    assert!(gap >= Duration::from_millis(450), "retried after {gap:?}");

    // At least once: every copy sent carries the same correlation ids; accepted once each.
    let accepted: Vec<String> = hook.accepted().iter().map(cid).collect();
    assert_eq!(accepted.iter().collect::<HashSet<_>>().len(), 3);
    for p in &posts {
        for d in p.docs() {
            assert!(accepted.contains(&cid(&d)), "a copy with a new id: {d}");
        }
    }
    assert_eq!(per_device(&hook.accepted())["dev-1"], vec![0, 1, 2]);
    let m = daemon.metrics();
    assert_eq!(m.http_requests("hook", "uplinks", "5xx"), 1);
    assert_eq!(m.http_requests("hook", "uplinks", "4xx"), 1);
    // The 2xx answer reaches the server's log before the daemon has read it: wait for the ack.
    let q = daemon.store().queue("hook").unwrap();
    assert!(wait_until(T, || q.is_empty()).await, "acked after the 200");
    assert!(
        logs().contains("database down"),
        "the server's answer is logged"
    );
    daemon.stop().await;
    assert_secret_never_logged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_dead_letters_in_drop_mode_and_the_stream_goes_on() {
    capture_logs();
    install_crypto();
    let hook = Hook::start(None).await;
    // The server refuses batches with dev-2 (and echoes the API key in its error text).
    hook.respond(|s| {
        let body = String::from_utf8_lossy(&s.body);
        if s.method == "POST" && body.contains("\"dev-2\"") {
            Reply::status(400).body(format!("unknown device dev-2 for key {SECRET}"))
        } else {
            Reply::ok()
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let (mut d1, mut d2) = (device(1), device(2));
    let c = cfg(
        dir.path(),
        &format!("{}{}", device_toml(&d1, "farm"), device_toml(&d2, "farm")),
        &format!(
            "url = \"{}\"\nbatch_max = 1\non_client_error = \"drop\"\n",
            hook.url("/up")
        ),
    );
    let daemon = Daemon::start(&c).await.unwrap();
    let mut fwd = Forwarder::connect(daemon.udp_addr(), gw()).await.unwrap();
    uplink(&mut fwd, &mut d2, b"x", 1000).await;
    let q = daemon.store().queue("hook").unwrap();
    assert!(
        wait_until(T, || q
            .stats()
            .dropped
            .iter()
            .any(|(r, n)| *r == "dead_letter" && *n == 1))
        .await
    );
    for i in 0..3u8 {
        uplink(&mut fwd, &mut d1, &[i], 2000 + u32::from(i)).await;
    }
    assert!(wait_until(T, || hook.accepted().len() == 3).await);
    assert!(wait_until(T, || q.is_empty()).await);
    assert_eq!(per_device(&hook.accepted())["dev-1"], vec![0, 1, 2]);
    // batch_max = 1: each POST is one JSON object (TTS webhook style), not an array of one.
    assert!(hook
        .posts("uplinks")
        .iter()
        .all(|p| p.json().is_object() && p.headers["content-type"] == "application/json"));
    // The refused batch was sent once, not retried.
    let refused: Vec<Seen> = hook
        .posts("uplinks")
        .into_iter()
        .filter(|p| p.status == 400)
        .collect();
    assert_eq!(refused.len(), 1);
    // An acknowledged record leaves the queue just before it is counted as delivered.
    assert!(wait_until(T, || stream_health(&daemon)["delivered"] == 3).await);
    let h = stream_health(&daemon);
    assert_eq!(h["dropped"]["dead_letter"], 1, "{h}");
    assert_eq!(
        h["delivered"], 3,
        "dead letters are not counted as delivered: {h}"
    );
    assert_eq!(daemon.metrics().http_requests("hook", "uplinks", "4xx"), 1);
    assert!(daemon
        .metrics()
        .encode()
        .contains("lorastream_queue_dropped_total{stream=\"hook\",reason=\"dead_letter\"} 1"));
    let l = logs();
    assert!(l.contains("dropped as dead letters"), "{l}");
    // The server's text is logged with the header value blanked.
    assert!(l.contains("unknown device dev-2 for key ***"), "{l}");
    daemon.stop().await;
    assert_secret_never_logged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_keep_the_batch_by_default() {
    capture_logs();
    install_crypto();
    let hook = Hook::start(None).await;
    // A credentials problem the operator fixes after two refusals.
    let mut n = 0;
    hook.respond(move |s| {
        if s.method != "POST" {
            return Reply::ok();
        }
        n += 1;
        if n <= 2 {
            Reply::status(401).body("bad key")
        } else {
            Reply::ok()
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut d1 = device(1);
    let c = cfg(
        dir.path(),
        &device_toml(&d1, "farm"),
        &format!("url = \"{}\"\nbatch_wait_ms = 0\n", hook.url("/up")),
    );
    let daemon = Daemon::start(&c).await.unwrap();
    let mut fwd = Forwarder::connect(daemon.udp_addr(), gw()).await.unwrap();
    uplink(&mut fwd, &mut d1, b"keep", 1000).await;
    assert!(wait_until(T, || hook.accepted().len() == 1).await);
    let statuses: Vec<u16> = hook.posts("uplinks").iter().map(|p| p.status).collect();
    assert_eq!(statuses, vec![401, 401, 200]);
    let ids: HashSet<String> = hook
        .posts("uplinks")
        .iter()
        .flat_map(|p| p.docs())
        .map(|d| cid(&d))
        .collect();
    assert_eq!(ids.len(), 1, "the same uplink each time");
    let q = daemon.store().queue("hook").unwrap();
    assert!(wait_until(T, || q.is_empty()).await);
    assert!(q.stats().dropped.is_empty());
    daemon.stop().await;
    assert_secret_never_logged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_down_then_back_and_a_hung_request_at_stop() {
    capture_logs();
    install_crypto();
    let mut hook = Hook::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut d1, mut d2) = (device(1), device(2));
    let c = cfg(
        dir.path(),
        &format!("{}{}", device_toml(&d1, "farm"), device_toml(&d2, "farm")),
        &format!(
            "url = \"{}\"\nbatch_max = 4\nbatch_wait_ms = 50\ntimeout_s = 30\n",
            hook.url("/up")
        ),
    );
    let daemon = Daemon::start(&c).await.unwrap();
    assert!(wait_until(T, || daemon.metrics().is_stream_connected("hook")).await);

    // Not listening: connections are refused; uplinks wait in the queue.
    hook.stop().await;
    let mut fwd = Forwarder::connect(daemon.udp_addr(), gw()).await.unwrap();
    for i in 0..5u8 {
        uplink(&mut fwd, &mut d1, &[i], 1000 + u32::from(i)).await;
        uplink(&mut fwd, &mut d2, &[i], 2000 + u32::from(i)).await;
    }
    let m = daemon.metrics().clone();
    assert!(wait_until(T, || m.http_requests("hook", "uplinks", "error") >= 2).await);
    assert!(!m.is_stream_connected("hook"));
    let health = serde_json::to_value(daemon.health()).unwrap();
    assert_eq!(health["status"], "degraded");
    assert!(health["streams_down"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s == "hook"));
    // Two failed requests can come before the last uplinks are out of the dedup window and
    // stored: wait for all ten (nothing can leave while the server is down).
    let q = daemon.store().queue("hook").unwrap();
    assert!(wait_until(T, || q.len() >= 10).await, "queued {}", q.len());
    assert_eq!(q.len(), 10);
    drop(q);

    hook.restart().await;
    assert!(
        wait_until(T, || hook.accepted().len() == 10).await,
        "{:?}",
        hook.seen()
    );
    let docs = hook.accepted();
    assert_eq!(
        docs.iter().map(cid).collect::<HashSet<_>>().len(),
        10,
        "no duplicates"
    );
    let order = per_device(&docs);
    assert_eq!(order["dev-1"], vec![0, 1, 2, 3, 4]);
    assert_eq!(order["dev-2"], vec![0, 1, 2, 3, 4]);
    assert!(hook.posts("uplinks").iter().all(|p| p.docs().len() <= 4));
    assert!(wait_until(T, || m.is_stream_connected("hook")).await);

    // A server that never answers: the stop still ends within the contract's 5 s, and the
    // uplink stays queued for the next start.
    hook.respond(|s| {
        if s.method == "POST" {
            Reply::ok().delay(Duration::from_secs(60))
        } else {
            Reply::ok()
        }
    });
    let before = hook.posts("uplinks").len();
    uplink(&mut fwd, &mut d1, b"hang", 9000).await;
    assert!(wait_until(T, || hook.posts("uplinks").len() > before).await);
    let hung = hook.posts("uplinks").last().unwrap().docs();
    assert_eq!(hung.len(), 1);
    let t = Instant::now();
    daemon.stop().await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        t.elapsed()
    );

    // Next start: the same uplink again, with the same correlation id.
    hook.respond(|_| Reply::ok());
    let daemon = Daemon::start(&c).await.unwrap();
    assert!(
        wait_until(T, || hook
            .accepted()
            .iter()
            .filter(|d| cid(d) == cid(&hung[0]))
            .count()
            == 2)
        .await
    );
    daemon.stop().await;
    assert_secret_never_logged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downlinks_in_post_answers_reach_the_device_and_events_come_back() {
    capture_logs();
    install_crypto();
    let hook = Hook::start(None).await;
    let answered = Arc::new(Mutex::new(false));
    let a = answered.clone();
    hook.respond(move |s| {
        let mut once = a.lock().unwrap();
        if s.kind() == "uplinks" && !*once {
            *once = true;
            // The server answers the uplink with a downlink for the device.
            return Reply::ok().header("content-type", "application/json").body(
                serde_json::json!({"downlinks": {"dev-1": {"push": [
                    {"f_port": 5, "frm_payload": b64(b"hello"), "priority": "HIGH",
                     "correlation_ids": ["my-app:42"]}
                ]}}})
                .to_string(),
            );
        }
        Reply::ok()
    });
    let dir = tempfile::tempdir().unwrap();
    let mut d1 = device(1);
    let c = cfg(
        dir.path(),
        &device_toml(&d1, "farm"),
        &format!("url = \"{}\"\nbatch_wait_ms = 0\n", hook.url("/up")),
    );
    let daemon = Daemon::start(&c).await.unwrap();
    let mut fwd = Forwarder::connect(daemon.udp_addr(), gw()).await.unwrap();
    fwd.pull().await.unwrap();
    assert!(wait_until(T, || daemon.gateways().len() == 1).await);

    uplink(&mut fwd, &mut d1, b"u1", 1_000_000).await;
    // Stored, then reported back: a downlink_queued event POSTed to the same URL.
    assert!(
        wait_until(T, || hook
            .events()
            .iter()
            .any(|e| e.get("downlink_queued").is_some()))
        .await,
        "{:?}",
        hook.seen()
    );
    // The device's next uplink opens RX1 and gets it.
    uplink(&mut fwd, &mut d1, b"u2", 5_000_000).await;
    let pr = fwd.pull_resp(T).await.expect("no PULL_RESP");
    assert_eq!(pr.txpk["tmst"], 6_000_000);
    let dl = d1.open(&pr.phy, 0).unwrap();
    assert!(dl.mic_ok);
    assert_eq!(dl.opened.f_port, Some(5));
    assert_eq!(dl.opened.frm_payload, b"hello");
    fwd.tx_ack(pr.token, None).await.unwrap();
    assert!(
        wait_until(T, || hook
            .events()
            .iter()
            .any(|e| e.get("downlink_sent").is_some()))
        .await
    );

    let ev_posts = hook.posts("downlink_events");
    for p in &ev_posts {
        assert_eq!(p.path, "/up");
        assert_eq!(p.headers["content-type"], "application/json");
        assert_eq!(p.headers["x-api-key"], SECRET);
        assert!(p.json().is_array());
    }
    let sent = hook
        .events()
        .into_iter()
        .find(|e| e.get("downlink_sent").is_some())
        .unwrap();
    assert_eq!(sent["end_device_ids"]["device_id"], "dev-1");
    assert_eq!(sent["downlink_sent"]["f_port"], 5);
    assert_eq!(sent["downlink_sent"]["priority"], "HIGH");
    assert!(sent["correlation_ids"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c == "my-app:42"));
    // Both uplinks were delivered too, and only the first answer carried a downlink.
    assert!(wait_until(T, || hook.accepted().len() == 2).await);
    daemon.stop().await;
    assert_secret_never_logged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_url_downlinks_reach_a_class_c_device_and_bad_bodies_are_survived() {
    capture_logs();
    install_crypto();
    let hook = Hook::start(None).await;
    let serve = Arc::new(Mutex::new(0u32));
    let s2 = serve.clone();
    let mut polls = 0;
    hook.respond(move |s| {
        if s.method != "GET" {
            return Reply::ok();
        }
        polls += 1;
        let mut stage = s2.lock().unwrap();
        match (*stage, polls) {
            // A broken body first: logged and counted, polling goes on.
            (_, 1) => Reply::ok().body("{\"downlinks\": oops"),
            (1, _) => {
                *stage = 2;
                Reply::ok().body(
                    serde_json::json!({"downlinks": {
                        "dev-1": {"push": [{"f_port": 9, "frm_payload": b64(b"now")}]},
                        // Not in this stream's scope (application "other").
                        "dev-3": {"push": [{"f_port": 1, "frm_payload": b64(b"no")}]},
                        // Not a device of this gateway.
                        "ghost": {"push": [{"f_port": 1, "frm_payload": "AQ=="}]}
                    }})
                    .to_string(),
                )
            }
            _ => Reply::status(204),
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut d1 = device(1);
    let d3 = device(3);
    let class_c = device_toml(&d1, "farm").replace("[[device]]\n", "[[device]]\nclass = \"C\"\n");
    let c = cfg(
        dir.path(),
        &format!("{class_c}{}", device_toml(&d3, "other")),
        &format!(
            "url = \"{}\"\npoll_url = \"{}\"\npoll_interval_s = 1\nbatch_wait_ms = 0\n",
            hook.url("/up"),
            hook.url("/down?gateway=gw1")
        ),
    );
    let daemon = Daemon::start(&c).await.unwrap();
    let m = daemon.metrics().clone();
    assert!(wait_until(T, || m.stream_errors("hook", "bad_downlink_body") == 1).await);
    let mut fwd = Forwarder::connect(daemon.udp_addr(), gw()).await.unwrap();
    fwd.pull().await.unwrap();
    // Heard once, so the scheduler knows which gateway reaches the class C device.
    uplink(&mut fwd, &mut d1, b"hi", 1000).await;
    assert!(wait_until(T, || hook.accepted().len() == 1).await);

    *serve.lock().unwrap() = 1;
    let pr = fwd
        .pull_resp(T)
        .await
        .expect("no PULL_RESP for the polled downlink");
    assert_eq!(pr.txpk["imme"], true);
    let dl = d1.open(&pr.phy, 0).unwrap();
    assert!(dl.mic_ok);
    assert_eq!(dl.opened.f_port, Some(9));
    assert_eq!(dl.opened.frm_payload, b"now");
    fwd.tx_ack(pr.token, None).await.unwrap();

    // The scope is enforced: dev-3 (another application) is answered like an unknown device:
    // counted, no PULL_RESP, and no event that would show this stream its id or DevEUI.
    assert!(wait_until(T, || m.downlinks("out_of_scope") == 1).await);
    assert!(
        wait_until(T, || hook
            .events()
            .iter()
            .any(|e| e.get("downlink_sent").is_some()))
        .await,
        "{:?}\n{}",
        hook.events(),
        logs()
    );
    assert!(fwd.pull_resp(Duration::from_millis(500)).await.is_none());
    assert!(wait_until(T, || m.downlinks("unknown_device") >= 1).await);
    let leaked: Vec<_> = hook
        .events()
        .into_iter()
        .filter(|e| {
            let t = e.to_string();
            t.contains("dev-3") || t.contains("70B3D57ED0000003")
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "out-of-scope device shown to the stream: {leaked:?}"
    );

    // Polls carry the custom headers and keep coming after a bad body and a 204.
    let gets = || -> Vec<Seen> {
        hook.seen()
            .into_iter()
            .filter(|s| s.method == "GET")
            .collect()
    };
    assert!(wait_until(T, || gets().iter().filter(|p| p.status == 204).count() >= 1).await);
    let polls = gets();
    assert!(polls
        .iter()
        .all(|p| p.path == "/down?gateway=gw1" && p.headers["x-api-key"] == SECRET));
    // The hook notes a reply as it sends it; the daemon counts it once it has read it.
    assert!(wait_until(T, || m.http_requests("hook", "poll", "2xx") >= 3).await);
    assert!(logs().contains("HTTP body with downlinks refused"));
    daemon.stop().await;
    assert_secret_never_logged();
}

/// A TLS server config for `localhost` that requires a client certificate from `ca`.
fn tls_server(dir: &Path, ca: &pki::Ca) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let server = ca.issue(dir, "localhost", &["localhost"]);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&ca.pem_path).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&server.cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(&server.key).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_ca_file_and_client_certificate_and_a_restart() {
    capture_logs();
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::Ca::new(dir.path(), "hook");
    let client = ca.issue(dir.path(), "gateway-01", &[]);
    let hook = Hook::start(Some(tls_server(dir.path(), &ca))).await;
    let mut d1 = device(1);
    let devices = device_toml(&d1, "farm");
    let base = format!(
        "url = \"{}\"\nca_file = {:?}\nbatch_wait_ms = 0\n",
        hook.url("/up"),
        ca.pem_path.display().to_string()
    );

    // Without the client certificate the server refuses the handshake: nothing is delivered,
    // the uplinks stay queued.
    let daemon = Daemon::start(&cfg(dir.path(), &devices, &base))
        .await
        .unwrap();
    let mut fwd = Forwarder::connect(daemon.udp_addr(), gw()).await.unwrap();
    for i in 0..2u8 {
        uplink(&mut fwd, &mut d1, &[i], 1000 + u32::from(i)).await;
    }
    let m = daemon.metrics().clone();
    assert!(wait_until(T, || m.http_requests("hook", "uplinks", "error") >= 1).await);
    let q = daemon.store().queue("hook").unwrap();
    assert!(wait_until(T, || q.len() == 2).await);
    assert!(hook.accepted().is_empty());
    // (A queue handle keeps the store open: let it go before the next start.)
    drop(q);
    daemon.stop().await;

    // With it (same store): the queued uplinks arrive over TLS after the restart.
    let with_cert = format!(
        "{base}cert_file = {:?}\nkey_file = {:?}\n",
        client.cert.display().to_string(),
        client.key.display().to_string()
    );
    let daemon = Daemon::start(&cfg(dir.path(), &devices, &with_cert))
        .await
        .unwrap();
    assert!(
        wait_until(T, || hook.accepted().len() == 2).await,
        "{:?}\n{}",
        hook.seen(),
        logs()
    );
    assert_eq!(per_device(&hook.accepted())["dev-1"], vec![0, 1]);
    assert_eq!(hook.posts("uplinks")[0].headers["x-api-key"], SECRET);
    let q = daemon.store().queue("hook").unwrap();
    assert!(wait_until(T, || q.is_empty()).await);
    // The delivered batch leaves the queue just before the stream is marked connected.
    assert!(wait_until(T, || daemon.metrics().is_stream_connected("hook")).await);
    daemon.stop().await;
    assert_secret_never_logged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_ca_file_is_a_clear_start_error() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.pem");
    let c = cfg(
        dir.path(),
        &device_toml(&device(1), "farm"),
        &format!(
            "url = \"https://localhost:1/up\"\nca_file = {:?}\n",
            missing.display().to_string()
        ),
    );
    let err = Daemon::start(&c)
        .await
        .err()
        .expect("start must fail")
        .to_string();
    assert!(
        err.contains("stream \"hook\"") && err.contains("nope.pem"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_too_large_halves_the_batch_instead_of_dropping_it() {
    capture_logs();
    install_crypto();
    let hook = Hook::start(None).await;
    // The server takes at most 2 documents per request.
    hook.respond(|s| {
        if s.method == "POST" && s.docs().len() > 2 {
            Reply::status(413).body("too big")
        } else {
            Reply::ok()
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut d1 = device(1);
    let c = cfg(
        dir.path(),
        &device_toml(&d1, "farm"),
        &format!(
            "url = \"{}\"\nbatch_wait_ms = 500\non_client_error = \"drop\"\n",
            hook.url("/up")
        ),
    );
    let daemon = Daemon::start(&c).await.unwrap();
    let mut fwd = Forwarder::connect(daemon.udp_addr(), gw()).await.unwrap();
    for i in 0..5u8 {
        uplink(&mut fwd, &mut d1, &[i], 1000 + u32::from(i)).await;
    }
    assert!(
        wait_until(T, || hook.accepted().len() == 5).await,
        "{:?}",
        hook.seen()
    );
    assert_eq!(per_device(&hook.accepted())["dev-1"], vec![0, 1, 2, 3, 4]);
    let sizes: Vec<(usize, u16)> = hook
        .posts("uplinks")
        .iter()
        .map(|p| (p.docs().len(), p.status))
        .collect();
    assert_eq!(sizes[0], (5, 413), "{sizes:?}");
    assert!(
        sizes
            .iter()
            .filter(|(_, s)| *s == 200)
            .all(|(n, _)| *n <= 2),
        "{sizes:?}"
    );
    let q = daemon.store().queue("hook").unwrap();
    assert!(wait_until(T, || q.is_empty()).await);
    assert!(q.stats().dropped.is_empty(), "nothing dead-lettered");
    drop(q);
    daemon.stop().await;
}

/// Measurement, not a check of behaviour: `cargo test --test http -- --ignored --nocapture
/// drain`. Queues N uplinks of 20 devices while the server is down, brings it back, and prints
/// how long the backlog takes to drain and in how many POSTs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn drain_rate_after_an_outage() {
    install_crypto();
    let n: usize = std::env::var("DRAIN_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let mut hook = Hook::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let mut devs: Vec<SimDevice> = (1..=20).map(device).collect();
    let toml: String = devs.iter().map(|d| device_toml(d, "farm")).collect();
    let c = cfg(
        dir.path(),
        &toml,
        &format!("url = \"{}\"\n", hook.url("/up")),
    );
    let daemon = Daemon::start(&c).await.unwrap();
    hook.stop().await;
    let mut fwd = Forwarder::connect(daemon.udp_addr(), gw()).await.unwrap();
    let t = Instant::now();
    for i in 0..n {
        let d = &mut devs[i % 20];
        uplink(&mut fwd, d, &[0u8; 20], i as u32).await;
        if i % 50 == 49 {
            // Stay below the UDP receive buffer and the dedup stage's pace.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let q = daemon.store().queue("hook").unwrap();
    assert!(wait_until(Duration::from_secs(300), || q.len() as usize == n).await);
    println!("queued {n} uplinks in {:?}", t.elapsed());
    hook.restart().await;
    let t = Instant::now();
    assert!(wait_until(Duration::from_secs(300), || q.is_empty()).await);
    let took = t.elapsed();
    let posts = hook.posts("uplinks");
    let ok: Vec<&Seen> = posts.iter().filter(|p| p.ok()).collect();
    let docs = hook.accepted();
    assert_eq!(docs.iter().map(cid).collect::<HashSet<_>>().len(), n);
    for (dev, fcnts) in per_device(&docs) {
        assert!(fcnts.windows(2).all(|w| w[0] < w[1]), "{dev} out of order");
    }
    println!(
        "drained {n} uplinks in {took:?} ({:.0}/s) with {} POSTs (max batch {}, {} bytes per POST on average)",
        n as f64 / took.as_secs_f64(),
        ok.len(),
        ok.iter().map(|p| p.docs().len()).max().unwrap_or(0),
        ok.iter().map(|p| p.body.len()).sum::<usize>() / ok.len().max(1)
    );
    drop(q);
    daemon.stop().await;
}

/// `format = "xml"` with `batch_max = 1`: one XML document per POST, `Content-Type:
/// application/xml`, read back by an independent parser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xml_webhook_gets_one_document_per_request() {
    capture_logs();
    install_crypto();
    let hook = Hook::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d1 = device(1);
    let c = cfg(
        dir.path(),
        &device_toml(&d1, "farm"),
        &format!(
            "url = \"{}\"\nformat = \"xml\"\nbatch_max = 1\n",
            hook.url("/up")
        ),
    );
    let daemon = Daemon::start(&c).await.unwrap();
    let mut fwd = Forwarder::connect(daemon.udp_addr(), gw()).await.unwrap();
    for i in 0..3u8 {
        uplink(&mut fwd, &mut d1, &[i, 0xA5], 1000 + u32::from(i)).await;
    }
    let posts = || -> Vec<Seen> { hook.posts("uplinks").into_iter().filter(Seen::ok).collect() };
    assert!(
        wait_until(T, || posts().len() == 3).await,
        "{:?}",
        hook.seen()
    );
    let q = daemon.store().queue("hook").unwrap();
    assert!(wait_until(T, || q.is_empty()).await);
    for (i, p) in posts().iter().enumerate() {
        assert_eq!(p.headers["content-type"], "application/xml");
        let text = std::str::from_utf8(&p.body).expect("UTF-8");
        let doc = roxmltree::Document::parse(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "application_up", "{text}");
        let find = |name: &str| {
            doc.descendants()
                .find(|n| n.has_tag_name(name))
                .and_then(|n| n.text())
                .map(str::to_string)
        };
        assert_eq!(find("device_id").as_deref(), Some("dev-1"));
        assert_eq!(find("f_cnt"), Some(i.to_string()), "in order");
        assert_eq!(find("frm_payload"), Some(b64(&[i as u8, 0xA5])));
        assert!(find("correlation_ids")
            .unwrap_or_default()
            .starts_with("lorastream:uplink:"));
    }
    daemon.stop().await;
    assert_secret_never_logged();
}
