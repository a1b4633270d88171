//! The WebSocket stream end to end: simulated packet forwarders (real UDP) → the daemon's
//! library entry point → a real WebSocket server in this test (tokio-tungstenite on a TCP port,
//! and over TLS with rcgen certificates and a required client certificate). The server records
//! every message and, in ack mode, answers `{"ack": "<correlation id>"}`; it can be killed
//! (every socket dropped at once) and started again on the same port, stop answering pings, and
//! send downlinks, which reach the simulated device as PULL_RESP.

mod support;

use futures_util::{SinkExt, StreamExt};
use lorastream::config::Config;
use lorastream::daemon::Daemon;
use lorastream::model::Eui64;
use lorastream::sim::{Forwarder, Radio, SimDevice};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(30);
const SECRET: &str = "ws-token-5d2e-never-logged";

// ---- the WebSocket server ----

#[derive(Default)]
struct State {
    /// Every text message received, in arrival order (duplicates included).
    messages: Mutex<Vec<Value>>,
    /// Request headers of every handshake.
    handshakes: Mutex<Vec<BTreeMap<String, String>>>,
    pings: AtomicU64,
    /// Answer `{"ack": ...}` for uplinks.
    ack: AtomicBool,
    /// Read nothing (and so answer no ping) after the handshake: a dead peer.
    mute: AtomicBool,
    /// Uplinks received and deliberately not acknowledged (`ack` off).
    unacked: AtomicU64,
    /// TLS handshakes that failed (no client certificate).
    tls_refused: AtomicU64,
}

struct WsServer {
    addr: SocketAddr,
    state: Arc<State>,
    tls: Option<Arc<rustls::ServerConfig>>,
    /// Text to send to every open connection.
    push: broadcast::Sender<String>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl WsServer {
    async fn start(ack: bool, tls: Option<Arc<rustls::ServerConfig>>) -> WsServer {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let state = Arc::new(State::default());
        state.ack.store(ack, Ordering::SeqCst);
        let (push, _) = broadcast::channel(64);
        let mut s = WsServer {
            addr: l.local_addr().unwrap(),
            state,
            tls,
            push,
            task: None,
        };
        s.serve(l);
        s
    }

    fn url(&self, path: &str) -> String {
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        let host = if self.tls.is_some() {
            "localhost".to_string()
        } else {
            self.addr.ip().to_string()
        };
        format!("{scheme}://{host}:{}{path}", self.addr.port())
    }

    fn serve(&mut self, l: TcpListener) {
        let state = self.state.clone();
        let tls = self.tls.clone();
        let push = self.push.clone();
        self.task = Some(tokio::spawn(async move {
            // Connections live in this set: aborting the server task drops them all at once.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = l.accept().await else {
                    return;
                };
                let (state, tls, push) = (state.clone(), tls.clone(), push.subscribe());
                conns.spawn(async move {
                    match tls {
                        Some(cfg) => {
                            let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await
                            else {
                                state.tls_refused.fetch_add(1, Ordering::SeqCst);
                                return;
                            };
                            connection(s, state, push).await
                        }
                        None => connection(tcp, state, push).await,
                    }
                });
            }
        }));
    }

    /// Every socket dropped at once, no close frame: a crashed server.
    async fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    async fn restart(&mut self) {
        self.kill().await;
        let l = TcpListener::bind(self.addr).await.unwrap();
        self.serve(l);
    }

    fn messages(&self) -> Vec<Value> {
        self.state.messages.lock().unwrap().clone()
    }

    fn uplinks(&self) -> Vec<Value> {
        self.messages()
            .into_iter()
            .filter(|m| m.get("uplink_message").is_some())
            .collect()
    }

    fn send(&self, text: String) {
        let _ = self.push.send(text);
    }

    fn handshakes(&self) -> Vec<BTreeMap<String, String>> {
        self.state.handshakes.lock().unwrap().clone()
    }
}

// The handshake callback's signature is tungstenite's (a large error type).
#[allow(clippy::result_large_err)]
async fn connection<S>(io: S, state: Arc<State>, mut push: broadcast::Receiver<String>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let st = state.clone();
    let cb = move |req: &Request, resp: Response| {
        let h = req
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        st.handshakes.lock().unwrap().push(h);
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(io, cb).await else {
        return;
    };
    if state.mute.load(Ordering::SeqCst) {
        // Hold the socket, read nothing: pings go unanswered.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        return;
    }
    // Acks go out in batches every 20 ms (as an array), so that messages are in flight.
    let mut pending: Vec<String> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            m = ws.next() => {
                let Some(Ok(m)) = m else { return };
                match m {
                    Message::Text(t) => {
                        let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                        let cid = v["correlation_ids"][0].as_str().map(str::to_string);
                        state.messages.lock().unwrap().push(v);
                        if let Some(cid) = cid {
                            if state.ack.load(Ordering::SeqCst) {
                                pending.push(cid);
                            } else {
                                state.unacked.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                    Message::Ping(_) => {
                        state.pings.fetch_add(1, Ordering::SeqCst);
                    }
                    Message::Close(_) => return,
                    _ => {}
                }
            }
            _ = tick.tick(), if !pending.is_empty() => {
                let ack = serde_json::json!({ "ack": std::mem::take(&mut pending) }).to_string();
                if ws.send(Message::text(ack)).await.is_err() {
                    return;
                }
            }
            p = push.recv() => {
                let Ok(p) = p else { return };
                if ws.send(Message::text(p)).await.is_err() {
                    return;
                }
            }
        }
    }
}

// ---- the daemon ----

fn gw() -> Eui64 {
    Eui64::from_u64(0xAA55_5A00_0000_0001)
}

fn cfg(dir: &Path, devices: &str, stream: &str) -> Config {
    config(
        dir,
        &format!(
            "[[application]]\nid = \"farm\"\n\n{devices}\
             [[stream]]\nname = \"ws\"\nkind = \"websocket\"\napplication = \"farm\"\n\
             headers = {{ \"Authorization\" = \"Bearer {SECRET}\" }}\n{stream}\n"
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

fn cid(v: &Value) -> String {
    v["correlation_ids"][0]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Each uplink (by correlation id) and its device and FCnt; a copy must be the same uplink.
fn distinct(msgs: &[Value]) -> BTreeMap<String, (String, u64)> {
    let mut out: BTreeMap<String, (String, u64)> = BTreeMap::new();
    for m in msgs {
        let id = (
            m["end_device_ids"]["device_id"]
                .as_str()
                .unwrap()
                .to_string(),
            m["uplink_message"]["f_cnt"].as_u64().unwrap(),
        );
        let prev = out.insert(cid(m), id.clone());
        assert!(
            prev.is_none_or(|p| p == id),
            "one correlation id for two uplinks"
        );
    }
    out
}

/// Per device, the FCnts of first arrivals must grow (order kept, copies aside).
fn assert_in_order(msgs: &[Value]) {
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut first: std::collections::HashSet<String> = Default::default();
    for m in msgs {
        if !first.insert(cid(m)) {
            continue;
        }
        let dev = m["end_device_ids"]["device_id"]
            .as_str()
            .unwrap()
            .to_string();
        let f = m["uplink_message"]["f_cnt"].as_u64().unwrap();
        if let Some(p) = seen.insert(dev.clone(), f) {
            assert!(f > p, "{dev}: FCnt {f} after {p}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_mode_server_killed_and_restarted_under_load_loses_nothing() {
    install_crypto();
    let mut server = WsServer::start(true, None).await;
    let dir = tempfile::tempdir().unwrap();
    let mut devs: Vec<SimDevice> = (1..=3).map(device).collect();
    let devices: String = devs.iter().map(|d| device_toml(d, "farm")).collect();
    let c = cfg(
        dir.path(),
        &devices,
        &format!("url = \"{}\"\n", server.url("/lorawan")),
    );
    let daemon = Daemon::start(&c).await.unwrap();
    let mut fwd = Forwarder::connect(daemon.udp_addr(), gw()).await.unwrap();
    let m = daemon.metrics().clone();
    assert!(wait_until(T, || m.is_stream_connected("ws")).await);
    let hs = server.handshakes();
    assert_eq!(hs[0]["authorization"], format!("Bearer {SECRET}"));

    // 300 uplinks at about 150/s (and 10 more while the server dies); the server is killed
    // twice while they arrive.
    let n = 300u32;
    let mut sent = 0u32;
    let mut tmst = 1_000_000u32;
    for i in 0..n {
        let d = &mut devs[(i % 3) as usize];
        uplink(&mut fwd, d, &i.to_be_bytes(), tmst).await;
        tmst += 10_000;
        if i == 100 || i == 200 {
            // Killed while messages are in flight: the server stops acking, takes a few more
            // messages, and dies with their acks unsent. They must come again.
            assert!(wait_until(T, || m.is_stream_connected("ws")).await);
            server.state.unacked.store(0, Ordering::SeqCst);
            server.state.ack.store(false, Ordering::SeqCst);
            for _ in 0..5 {
                let d = &mut devs[(i % 3) as usize];
                uplink(&mut fwd, d, b"in flight", tmst).await;
                tmst += 10_000;
                sent += 1;
            }
            assert!(wait_until(T, || server.state.unacked.load(Ordering::SeqCst) >= 3).await);
            server.kill().await;
            server.state.ack.store(true, Ordering::SeqCst);
            // Down for a moment (connections refused): the stream backs off and retries.
            tokio::time::sleep(Duration::from_millis(300)).await;
            server.restart().await;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let n = sent;
    let q = daemon.store().queue("ws").unwrap();
    assert!(
        wait_until(T, || distinct(&server.uplinks()).len() == n as usize
            && q.is_empty())
        .await,
        "delivered {} of {n}, queue {}",
        distinct(&server.uplinks()).len(),
        q.len()
    );
    let all = server.uplinks();
    let d = distinct(&all);
    for dev in ["dev-1", "dev-2", "dev-3"] {
        let fcnts: Vec<u64> = d
            .values()
            .filter(|(x, _)| x == dev)
            .map(|(_, f)| *f)
            .collect();
        assert!(fcnts.len() >= 100, "{dev}");
    }
    assert_in_order(&all);
    eprintln!(
        "ack mode: {n} uplinks, {} messages received ({} copies), {} connections",
        all.len(),
        all.len() - d.len(),
        server.handshakes().len()
    );
    assert!(server.handshakes().len() >= 3);
    // The messages in flight at each kill came again, with their correlation ids.
    assert!(all.len() - d.len() >= 6);
    drop(q);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_mode_delivers_without_acks_and_keeps_what_arrives_while_the_server_is_down() {
    install_crypto();
    let mut server = WsServer::start(false, None).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d1 = device(1);
    let c = cfg(
        dir.path(),
        &device_toml(&d1, "farm"),
        &format!("url = \"{}\"\nack = \"write\"\n", server.url("/")),
    );
    let daemon = Daemon::start(&c).await.unwrap();
    let mut fwd = Forwarder::connect(daemon.udp_addr(), gw()).await.unwrap();
    let m = daemon.metrics().clone();
    assert!(wait_until(T, || m.is_stream_connected("ws")).await);
    let q = daemon.store().queue("ws").unwrap();
    for i in 0..20u32 {
        uplink(&mut fwd, &mut d1, &[i as u8], 1000 + i).await;
    }
    // No acks at all: written counts as delivered.
    assert!(wait_until(T, || server.uplinks().len() == 20 && q.is_empty()).await);

    // Server down (connections refused): uplinks wait in the queue, then all arrive.
    server.kill().await;
    assert!(wait_until(T, || !m.is_stream_connected("ws")).await);
    for i in 20..50u32 {
        uplink(&mut fwd, &mut d1, &[i as u8], 1000 + i).await;
    }
    assert!(wait_until(T, || q.len() == 30).await, "queued {}", q.len());
    server.restart().await;
    assert!(
        wait_until(T, || distinct(&server.uplinks()).len() == 50
            && q.is_empty())
        .await,
        "{}",
        server.uplinks().len()
    );
    assert_in_order(&server.uplinks());
    drop(q);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downlinks_over_the_socket_reach_the_device_and_events_come_back() {
    install_crypto();
    let server = WsServer::start(true, None).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d1 = device(1);
    let c = cfg(
        dir.path(),
        &device_toml(&d1, "farm"),
        &format!("url = \"{}\"\n", server.url("/")),
    );
    let daemon = Daemon::start(&c).await.unwrap();
    let mut fwd = Forwarder::connect(daemon.udp_addr(), gw()).await.unwrap();
    fwd.pull().await.unwrap();
    assert!(wait_until(T, || daemon.gateways().len() == 1).await);
    let m = daemon.metrics().clone();
    assert!(wait_until(T, || m.is_stream_connected("ws")).await);

    // Garbage first: counted, the connection goes on.
    server.send("not json".into());
    server.send(r#"{"downlinks":[{"f_port":1,"frm_payload":"AA=="}]}"#.into());
    assert!(wait_until(T, || m.stream_errors("ws", "ws_bad_message") == 2).await);

    server.send(
        serde_json::json!({
            "end_device_ids": {"device_id": "dev-1", "application_ids": {"application_id": "farm"}},
            "downlinks": [{"f_port": 7, "frm_payload": "aGVsbG8=", "correlation_ids": ["app:1"]}]
        })
        .to_string(),
    );
    // Stored, then reported on the same socket.
    assert!(
        wait_until(T, || server
            .messages()
            .iter()
            .any(|v| v.get("downlink_queued").is_some()))
        .await,
        "{:?}",
        server.messages()
    );
    uplink(&mut fwd, &mut d1, b"u", 5_000_000).await;
    let pr = fwd.pull_resp(T).await.expect("no PULL_RESP");
    let dl = d1.open(&pr.phy, 0).unwrap();
    assert!(dl.mic_ok);
    assert_eq!(dl.opened.f_port, Some(7));
    assert_eq!(dl.opened.frm_payload, b"hello");
    fwd.tx_ack(pr.token, None).await.unwrap();
    assert!(
        wait_until(T, || server
            .messages()
            .iter()
            .any(|v| v.get("downlink_sent").is_some()))
        .await
    );
    // A bad item goes back as downlink_failed for the device.
    server.send(
        serde_json::json!({
            "end_device_ids": {"device_id": "dev-1"},
            "downlinks": [{"f_port": 0, "frm_payload": ""}]
        })
        .to_string(),
    );
    assert!(
        wait_until(T, || server
            .messages()
            .iter()
            .any(|v| v.get("downlink_failed").is_some()))
        .await
    );
    assert_eq!(server.uplinks().len(), 1);
    assert!(m.is_stream_connected("ws"));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_keep_the_link_and_a_dead_peer_is_left_for_a_new_connection() {
    install_crypto();
    let server = WsServer::start(true, None).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d1 = device(1);
    let c = cfg(
        dir.path(),
        &device_toml(&d1, "farm"),
        &format!("url = \"{}\"\nkeep_alive_s = 1\n", server.url("/")),
    );
    let daemon = Daemon::start(&c).await.unwrap();
    let m = daemon.metrics().clone();
    assert!(wait_until(T, || m.is_stream_connected("ws")).await);
    // Pings arrive about once a second.
    assert!(wait_until(T, || server.state.pings.load(Ordering::SeqCst) >= 2).await);
    assert_eq!(server.handshakes().len(), 1);

    // The server goes mute: its connections answer nothing after the handshake. The live
    // connection is dropped (a restart of the listener), the stream reconnects to a mute peer,
    // finds it dead within 2 × keep_alive and connects again.
    server.state.mute.store(true, Ordering::SeqCst);
    let mut fwd = Forwarder::connect(daemon.udp_addr(), gw()).await.unwrap();
    let mut server = server;
    server.restart().await;
    let before = server.handshakes().len();
    assert!(wait_until(T, || server.handshakes().len() > before).await);
    let on_mute = server.handshakes().len();
    assert!(
        wait_until(Duration::from_secs(10), || server.handshakes().len()
            > on_mute)
        .await,
        "the dead peer was not detected"
    );
    // Back to normal: an uplink sent meanwhile arrives once the server answers again.
    server.state.mute.store(false, Ordering::SeqCst);
    uplink(&mut fwd, &mut d1, b"x", 1000).await;
    assert!(wait_until(T, || server.uplinks().len() == 1).await);
    daemon.stop().await;
}

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
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    Arc::new(cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_with_ca_file_and_a_client_certificate() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::Ca::new(dir.path(), "ws");
    let client = ca.issue(dir.path(), "gateway-01", &[]);
    let server = WsServer::start(true, Some(tls_server(dir.path(), &ca))).await;
    let mut d1 = device(1);
    let c = cfg(
        dir.path(),
        &device_toml(&d1, "farm"),
        &format!(
            "url = \"{}\"\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
            server.url("/lorawan"),
            ca.pem_path.display().to_string(),
            client.cert.display().to_string(),
            client.key.display().to_string()
        ),
    );
    let daemon = Daemon::start(&c).await.unwrap();
    let mut fwd = Forwarder::connect(daemon.udp_addr(), gw()).await.unwrap();
    for i in 0..5u8 {
        uplink(&mut fwd, &mut d1, &[i], 1000 + u32::from(i)).await;
    }
    let q = daemon.store().queue("ws").unwrap();
    assert!(wait_until(T, || server.uplinks().len() == 5 && q.is_empty()).await);
    assert_eq!(
        server.handshakes()[0]["authorization"],
        format!("Bearer {SECRET}")
    );
    drop(q);
    daemon.stop().await;

    // Without the client certificate the TLS handshake is refused: nothing delivered, the
    // stream is not connected, the daemon goes on.
    let dir2 = tempfile::tempdir().unwrap();
    let c = cfg(
        dir2.path(),
        &device_toml(&device(1), "farm"),
        &format!(
            "url = \"{}\"\nca_file = {:?}\n",
            server.url("/lorawan"),
            ca.pem_path.display().to_string()
        ),
    );
    let refused = server.state.tls_refused.load(Ordering::SeqCst);
    let daemon = Daemon::start(&c).await.unwrap();
    assert!(
        wait_until(T, || server.state.tls_refused.load(Ordering::SeqCst)
            > refused)
        .await
    );
    assert!(!daemon.metrics().is_stream_connected("ws"));
    daemon.stop().await;
}
