//! An IoT-Hub-like MQTT broker for the tests: MQTT 3.1.1 on rumqttc's packet codec, over TLS
//! (tokio-rustls, certificates from `pki.rs`) and over WebSocket (`/$iothub/websocket`,
//! subprotocol `mqtt`), that enforces Azure IoT Hub's device-side rules as its docs state them
//! ("Communicate with an IoT hub using the MQTT protocol", "Control access to IoT Hub with SAS"):
//!
//! - CONNECT: ClientId = the device id of the username `{hostname}/{deviceId}/?api-version=…`
//!   (a known api-version); the device is registered; the password is a SAS token whose `sr` is
//!   `{hostname}/devices/{deviceId}` (or the hub, for a policy), not expired by the hub's clock,
//!   and signed (HMAC-SHA256 over `{sr as sent}\n{se}`) with the device key, or with the key of
//!   the policy named by `skn`. Anything else: CONNACK "not authorized" (5), then close.
//! - One connection per device id: a new one closes the old one.
//! - The token's expiry closes the connection.
//! - Publishing is allowed on `devices/{id}/messages/events/…` and the device's twin topics
//!   only; anything else (or QoS 2, or a message over 256 KB) closes the connection. Subscribing
//!   is allowed to the devicebound, twin and method topics; other filters get a failure code.
//! - Cloud-to-device messages wait in a per-device queue and are delivered (QoS 1, on
//!   `devices/{id}/messages/devicebound/{property bag}`) to a connection subscribed to them;
//!   one leaves the queue only on the device's PUBACK, otherwise it is redelivered.
//! - Device streams (preview): to a connection subscribed to `$iothub/streams/POST/#`, a stream
//!   request is published (QoS 0) on `$iothub/streams/POST/{name}/?$rid={rid}&$url={streaming
//!   endpoint, URL-encoded}&$auth={token}&$ip=...`, as the Azure SDKs' tests show it; the
//!   device answers on `$iothub/streams/res/{status}/?$rid={rid}`. The streaming endpoint
//!   itself is `streaming.rs`.
//!
//! The signature check is written here from the docs, not taken from lorastream, so that the
//! two cannot share a mistake (lorastream's signer is pinned by Microsoft's published vectors).
#![allow(dead_code)]

use async_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use async_tungstenite::tungstenite::Message;
use base64::Engine;
use bytes::BytesMut;
use futures_util::StreamExt;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode,
    UnsubAck,
};
use rumqttc::mqttbytes::QoS;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

const MAX: usize = 512 * 1024;
const MAX_MESSAGE: usize = 256 * 1024;
const API_VERSIONS: [&str; 4] = ["2016-11-14", "2018-06-30", "2020-09-30", "2021-04-12"];

/// A device-to-cloud message as the hub received it.
#[derive(Debug, Clone)]
pub struct D2c {
    pub device: String,
    pub topic: String,
    /// Property bag, percent-decoded.
    pub props: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub conn: u64,
}

impl D2c {
    pub fn prop(&self, k: &str) -> Option<&str> {
        self.props
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// An accepted connection.
#[derive(Debug, Clone)]
pub struct Connected {
    pub device: String,
    pub conn: u64,
    pub websocket: bool,
    pub policy: Option<String>,
    /// The token's `se`.
    pub expiry: u64,
    pub at: std::time::Instant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Close {
    Disconnect,
    Dropped,
    Replaced,
    TokenExpired,
    Violation(String),
    HubStopped,
}

#[derive(Debug, Default)]
pub struct Log {
    pub d2c: Vec<D2c>,
    pub connected: Vec<Connected>,
    /// (client id, reason) of refused CONNECTs.
    pub refused: Vec<(String, String)>,
    /// (connection, device, why it closed).
    pub closed: Vec<(u64, String, Close)>,
    pub open_now: usize,
    pub max_open: usize,
    /// Twin reported-properties patches, (device, patch).
    pub twin_patches: Vec<(String, serde_json::Value)>,
    /// Cloud-to-device messages the device acknowledged: (device, message id).
    pub completed: Vec<(String, String)>,
    /// Connections subscribed to device-stream requests.
    pub stream_subscribed: Vec<u64>,
    /// Device-stream answers: (rid, status), in arrival order.
    pub stream_answers: Vec<(String, u16)>,
}

struct C2d {
    mid: String,
    topic: String,
    body: Vec<u8>,
    /// (connection, pkid) while delivered and not acknowledged.
    inflight: Option<(u64, u16)>,
}

struct Handle {
    id: u64,
    kick: CancellationToken,
    poke: mpsc::UnboundedSender<()>,
}

/// A direct method call: (rid, method, payload).
type MethodCall = (String, String, Vec<u8>);

struct State {
    hostname: String,
    devices: Mutex<HashMap<String, Vec<u8>>>,
    policies: Mutex<HashMap<String, Vec<u8>>>,
    skew_s: AtomicI64,
    hold_acks: AtomicBool,
    next_conn: AtomicU64,
    next_mid: AtomicU64,
    conns: Mutex<HashMap<String, Handle>>,
    c2d: Mutex<HashMap<String, VecDeque<C2d>>>,
    /// Direct method calls waiting for the device's connection.
    methods: Mutex<HashMap<String, VecDeque<MethodCall>>>,
    /// Direct method answers by rid: (status, payload).
    method_answers: Mutex<HashMap<String, (u16, Vec<u8>)>>,
    /// Device-stream request topics waiting for the device's connection.
    stream_requests: Mutex<HashMap<String, VecDeque<String>>>,
    log: Mutex<Log>,
}

pub struct IotHub {
    port: u16,
    ws_port: u16,
    state: Arc<State>,
    tls: Arc<rustls::ServerConfig>,
    stop: CancellationToken,
}

fn b64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn pct_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Property bag → pairs (keys and values percent-decoded).
pub fn parse_bag(bag: &str) -> Vec<(String, String)> {
    bag.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (pct_decode(k), pct_decode(v))
        })
        .collect()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

impl IotHub {
    /// A hub `hostname` serving TLS with `server` (cert, key) on two free ports (MQTT/TLS and
    /// MQTT over WebSocket/TLS).
    pub async fn start(hostname: &str, server: &super::pki::Issued) -> IotHub {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&server.cert)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&server.key).unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let mut hub = IotHub {
            port: 0,
            ws_port: 0,
            state: Arc::new(State {
                hostname: hostname.to_string(),
                devices: Mutex::default(),
                policies: Mutex::default(),
                skew_s: AtomicI64::new(0),
                hold_acks: AtomicBool::new(false),
                next_conn: AtomicU64::new(1),
                next_mid: AtomicU64::new(1),
                conns: Mutex::default(),
                c2d: Mutex::default(),
                methods: Mutex::default(),
                method_answers: Mutex::default(),
                stream_requests: Mutex::default(),
                log: Mutex::default(),
            }),
            tls: Arc::new(tls),
            stop: CancellationToken::new(),
        };
        hub.listen().await;
        hub
    }

    /// Register a device with its primary key (base64).
    pub fn add_device(&self, id: &str, key_b64: &str) {
        self.state
            .devices
            .lock()
            .unwrap()
            .insert(id.to_string(), b64(key_b64));
    }

    /// A shared-access policy (with DeviceConnect) and its key (base64).
    pub fn add_policy(&self, name: &str, key_b64: &str) {
        self.state
            .policies
            .lock()
            .unwrap()
            .insert(name.to_string(), b64(key_b64));
    }

    /// The hub's clock runs `s` seconds ahead of this machine's (tokens expire earlier).
    pub fn set_clock_skew(&self, s: i64) {
        self.state.skew_s.store(s, Ordering::SeqCst);
    }

    /// Stop answering device-to-cloud publishes with PUBACK.
    pub fn hold_acks(&self, hold: bool) {
        self.state.hold_acks.store(hold, Ordering::SeqCst);
    }

    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn ws_port(&self) -> u16 {
        self.ws_port
    }
    pub fn hostname(&self) -> &str {
        &self.state.hostname
    }

    /// Read the log.
    pub fn log<T>(&self, f: impl FnOnce(&Log) -> T) -> T {
        f(&self.state.log.lock().unwrap())
    }

    /// The connections the hub saw, for an assertion's message.
    pub fn connections_summary(&self) -> String {
        self.log(|l| {
            format!(
                "connected {}, refused {:?}, closed {:?}",
                l.connected.len(),
                l.refused,
                l.closed
            )
        })
    }

    pub fn d2c(&self) -> Vec<D2c> {
        self.log(|l| l.d2c.clone())
    }

    /// Devices with an open connection now.
    pub fn open_devices(&self) -> Vec<String> {
        let mut v: Vec<String> = self.state.conns.lock().unwrap().keys().cloned().collect();
        v.sort();
        v
    }

    /// Close a device's connection as if IoT Hub dropped it.
    pub fn kick(&self, device: &str) {
        if let Some(h) = self.state.conns.lock().unwrap().get(device) {
            h.kick.cancel();
        }
    }

    /// Queue a cloud-to-device message. `bag` is appended to the system properties IoT Hub adds
    /// (`%24.mid`, `%24.to`), written as the test likes (escaped `$` or not). Returns its id.
    pub fn send_c2d(&self, device: &str, bag: &str, body: &[u8]) -> String {
        let mid = format!("c2d-{}", self.state.next_mid.fetch_add(1, Ordering::SeqCst));
        let mut topic = format!(
            "devices/{device}/messages/devicebound/%24.mid={mid}&%24.to=%2Fdevices%2F{device}%2Fmessages%2FdeviceBound"
        );
        if !bag.is_empty() {
            topic.push('&');
            topic.push_str(bag);
        }
        self.state
            .c2d
            .lock()
            .unwrap()
            .entry(device.to_string())
            .or_default()
            .push_back(C2d {
                mid: mid.clone(),
                topic,
                body: body.to_vec(),
                inflight: None,
            });
        if let Some(h) = self.state.conns.lock().unwrap().get(device) {
            let _ = h.poke.send(());
        }
        mid
    }

    /// Invoke a direct method on a device, as the service API does, and wait for the device's
    /// answer: (status, payload as JSON), or None after `timeout` (the device did not answer,
    /// or is not connected and subscribed to the methods).
    pub async fn invoke_method(
        &self,
        device: &str,
        method: &str,
        payload: &serde_json::Value,
        timeout: Duration,
    ) -> Option<(u16, serde_json::Value)> {
        let rid = format!("{}", self.state.next_mid.fetch_add(1, Ordering::SeqCst));
        self.state
            .methods
            .lock()
            .unwrap()
            .entry(device.to_string())
            .or_default()
            .push_back((
                rid.clone(),
                method.to_string(),
                payload.to_string().into_bytes(),
            ));
        if let Some(h) = self.state.conns.lock().unwrap().get(device) {
            let _ = h.poke.send(());
        }
        let end = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < end {
            if let Some((status, body)) = self.state.method_answers.lock().unwrap().remove(&rid) {
                return Some((
                    status,
                    serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// The device's current connection is subscribed to device-stream requests.
    pub fn stream_subscribed(&self, device: &str) -> bool {
        let Some(id) = self.state.conns.lock().unwrap().get(device).map(|h| h.id) else {
            return false;
        };
        self.log(|l| l.stream_subscribed.contains(&id))
    }

    /// Ask the device for a stream, as the service API does: IoT Hub publishes the request with
    /// the streaming endpoint's `url` and `token`. The device's answer status, or None after
    /// `timeout`.
    pub async fn request_stream(
        &self,
        device: &str,
        name: &str,
        url: &str,
        token: &str,
        timeout: Duration,
    ) -> Option<u16> {
        let rid = format!("{}", self.state.next_mid.fetch_add(1, Ordering::SeqCst));
        let topic = format!(
            "$iothub/streams/POST/{name}/?$rid={rid}&$url={}&$auth={token}&$ip=127.0.0.1",
            percent_encoding::utf8_percent_encode(url, percent_encoding::NON_ALPHANUMERIC)
        );
        self.send_stream_topic(device, topic, Some(&rid), timeout)
            .await
    }

    /// Publish any topic to the device's stream subscription (malformed requests); wait for
    /// the answer to `rid` when given.
    pub async fn send_stream_topic(
        &self,
        device: &str,
        topic: String,
        rid: Option<&str>,
        timeout: Duration,
    ) -> Option<u16> {
        self.state
            .stream_requests
            .lock()
            .unwrap()
            .entry(device.to_string())
            .or_default()
            .push_back(topic);
        if let Some(h) = self.state.conns.lock().unwrap().get(device) {
            let _ = h.poke.send(());
        }
        let rid = rid?;
        let end = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < end {
            let answer = self.log(|l| {
                l.stream_answers
                    .iter()
                    .find(|(r, _)| r == rid)
                    .map(|(_, s)| *s)
            });
            if answer.is_some() {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    /// Cloud-to-device messages still queued for a device.
    pub fn c2d_pending(&self, device: &str) -> usize {
        self.state
            .c2d
            .lock()
            .unwrap()
            .get(device)
            .map_or(0, |q| q.len())
    }

    /// Close every connection and the listeners (a hub outage).
    pub async fn stop(&mut self) {
        self.stop.cancel();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// Listen again on the same ports.
    pub async fn restart(&mut self) {
        self.listen().await;
    }

    async fn bind(port: u16) -> TcpListener {
        for _ in 0..50 {
            if let Ok(l) = TcpListener::bind(("127.0.0.1", port)).await {
                return l;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("IoT Hub stand-in cannot bind port {port}");
    }

    async fn listen(&mut self) {
        let mqtt = Self::bind(self.port).await;
        let ws = Self::bind(self.ws_port).await;
        self.port = mqtt.local_addr().unwrap().port();
        self.ws_port = ws.local_addr().unwrap().port();
        self.stop = CancellationToken::new();
        for (l, websocket) in [(mqtt, false), (ws, true)] {
            let (state, stop, tls) = (self.state.clone(), self.stop.clone(), self.tls.clone());
            tokio::spawn(async move {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                loop {
                    let sock = tokio::select! {
                        _ = stop.cancelled() => return,
                        r = l.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                    };
                    let (state, stop, acceptor) = (state.clone(), stop.clone(), acceptor.clone());
                    tokio::spawn(async move {
                        let Ok(Ok(tls)) =
                            tokio::time::timeout(Duration::from_secs(10), acceptor.accept(sock))
                                .await
                        else {
                            return;
                        };
                        let io = if websocket {
                            match async_tungstenite::tokio::accept_hdr_async(tls, ws_handshake)
                                .await
                            {
                                Ok(ws) => Io::Ws(Box::new(ws)),
                                Err(_) => return,
                            }
                        } else {
                            Io::Tls(Box::new(tls))
                        };
                        connection(io, websocket, state, stop).await;
                    });
                }
            });
        }
    }
}

/// IoT Hub serves MQTT over WebSocket at `/$iothub/websocket` with subprotocol `mqtt`.
#[allow(clippy::result_large_err)]
fn ws_handshake(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    let refuse = |code: u16| {
        let mut r = ErrorResponse::new(None);
        *r.status_mut() = async_tungstenite::tungstenite::http::StatusCode::from_u16(code).unwrap();
        r
    };
    if req.uri().path() != "/$iothub/websocket" {
        return Err(refuse(404));
    }
    let mqtt = req
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|p| p.trim() == "mqtt"));
    if !mqtt {
        return Err(refuse(400));
    }
    resp.headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    Ok(resp)
}

type WsStream = async_tungstenite::WebSocketStream<
    async_tungstenite::tokio::TokioAdapter<TlsStream<TcpStream>>,
>;

enum Io {
    Tls(Box<TlsStream<TcpStream>>),
    Ws(Box<WsStream>),
}

impl Io {
    /// Append received bytes; false at the end of the stream.
    async fn read(&mut self, buf: &mut BytesMut) -> bool {
        match self {
            Io::Tls(s) => {
                let mut chunk = [0u8; 16384];
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => false,
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        true
                    }
                }
            }
            Io::Ws(s) => loop {
                match s.next().await {
                    Some(Ok(Message::Binary(b))) => {
                        buf.extend_from_slice(&b);
                        return true;
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return false,
                    Some(Ok(_)) => continue,
                }
            },
        }
    }

    async fn write(&mut self, p: &Packet) -> bool {
        let mut out = BytesMut::new();
        if p.write(&mut out, MAX).is_err() {
            return false;
        }
        match self {
            Io::Tls(s) => s.write_all(&out).await.is_ok() && s.flush().await.is_ok(),
            Io::Ws(s) => s.send(Message::binary(out.to_vec())).await.is_ok(),
        }
    }

    async fn close(&mut self) {
        match self {
            Io::Tls(s) => {
                let _ = s.shutdown().await;
            }
            Io::Ws(s) => {
                let _ = s.close(None).await;
            }
        }
    }
}

/// Check a CONNECT as IoT Hub does. Ok((device id, policy, expiry)) or why not.
fn authenticate(state: &State, c: &Connect) -> Result<(String, Option<String>, u64), String> {
    let login = c.login.as_ref().ok_or("no username/password")?;
    let host = &state.hostname;
    let rest = login
        .username
        .strip_prefix(&format!("{host}/"))
        .ok_or_else(|| format!("username {:?} does not start with {host}/", login.username))?;
    let (device, query) = rest.split_once("/?").ok_or_else(|| {
        format!(
            "username {:?} is not {{host}}/{{device}}/?api-version=…",
            login.username
        )
    })?;
    if device != c.client_id {
        return Err(format!(
            "ClientId {:?} is not the username's device {device:?}",
            c.client_id
        ));
    }
    let api = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("api-version="))
        .ok_or("username without api-version")?;
    if !API_VERSIONS.contains(&api) {
        return Err(format!("unknown api-version {api:?}"));
    }
    let device_key = state.devices.lock().unwrap().get(device).cloned();
    let Some(device_key) = device_key else {
        return Err(format!("device {device:?} is not registered"));
    };
    let token = login
        .password
        .strip_prefix("SharedAccessSignature ")
        .ok_or("password is not a SharedAccessSignature")?;
    let mut f: HashMap<&str, &str> = HashMap::new();
    for kv in token.split('&') {
        let (k, v) = kv.split_once('=').ok_or("malformed token field")?;
        f.insert(k, v);
    }
    let (sr, sig, se) = match (f.get("sr"), f.get("sig"), f.get("se")) {
        (Some(a), Some(b), Some(c)) => (*a, *b, *c),
        _ => return Err("token without sr, sig or se".into()),
    };
    let policy = f.get("skn").map(|s| pct_decode(s));
    let resource = pct_decode(sr).to_lowercase();
    let device_res = format!("{host}/devices/{device}").to_lowercase();
    let hub_res = host.to_lowercase();
    if resource != device_res && !(policy.is_some() && resource == hub_res) {
        return Err(format!("sr {resource:?} is not {device_res:?}"));
    }
    let expiry: u64 = se
        .parse()
        .map_err(|_| format!("se {se:?} is not a number"))?;
    let now = unix_now() + state.skew_s.load(Ordering::SeqCst);
    if (expiry as i64) <= now {
        return Err(format!("token expired at {expiry} (hub time {now})"));
    }
    let key = match &policy {
        Some(p) => state
            .policies
            .lock()
            .unwrap()
            .get(p)
            .cloned()
            .ok_or_else(|| format!("unknown policy {p:?}"))?,
        None => device_key,
    };
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let want = ring::hmac::sign(&k, format!("{sr}\n{se}").as_bytes());
    let got = base64::engine::general_purpose::STANDARD
        .decode(pct_decode(sig))
        .map_err(|_| "sig is not base64")?;
    if got != want.as_ref() {
        return Err("signature does not match the key".into());
    }
    Ok((device.to_string(), policy, expiry))
}

fn allowed_filter(device: &str, f: &str) -> bool {
    f == format!("devices/{device}/messages/devicebound/#")
        || f == "$iothub/twin/res/#"
        || f == "$iothub/twin/PATCH/properties/desired/#"
        || f == "$iothub/methods/POST/#"
        || f == "$iothub/streams/POST/#"
}

async fn connection(mut io: Io, websocket: bool, state: Arc<State>, stop: CancellationToken) {
    let mut inb = BytesMut::with_capacity(8192);
    // CONNECT first, within 10 s.
    let connect = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match Packet::read(&mut inb, MAX) {
                Ok(Packet::Connect(c)) => return Some(c),
                Ok(_) => return None,
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    if !io.read(&mut inb).await {
                        return None;
                    }
                }
                Err(_) => return None,
            }
        }
    })
    .await;
    let Ok(Some(c)) = connect else {
        io.close().await;
        return;
    };
    let (device, policy, expiry) = match authenticate(&state, &c) {
        Ok(v) => v,
        Err(reason) => {
            state
                .log
                .lock()
                .unwrap()
                .refused
                .push((c.client_id.clone(), reason));
            io.write(&Packet::ConnAck(ConnAck::new(
                ConnectReturnCode::NotAuthorized,
                false,
            )))
            .await;
            io.close().await;
            return;
        }
    };
    let id = state.next_conn.fetch_add(1, Ordering::SeqCst);
    let kick = CancellationToken::new();
    let (poke_tx, mut poke) = mpsc::unbounded_channel();
    // One connection per device: the newcomer replaces the old one.
    if let Some(old) = state.conns.lock().unwrap().insert(
        device.clone(),
        Handle {
            id,
            kick: kick.clone(),
            poke: poke_tx,
        },
    ) {
        old.kick.cancel();
    }
    {
        let mut l = state.log.lock().unwrap();
        l.connected.push(Connected {
            device: device.clone(),
            conn: id,
            websocket,
            policy,
            expiry,
            at: std::time::Instant::now(),
        });
        l.open_now += 1;
        l.max_open = l.max_open.max(l.open_now);
    }
    let mut why = Close::Dropped;
    if io
        .write(&Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            false,
        )))
        .await
    {
        why = serve(
            &mut io, &mut inb, &state, &device, id, expiry, &kick, &stop, &mut poke,
        )
        .await;
    }
    // The hub's books first, then the socket: a client that sees the close may reconnect at
    // once, and must not find its old connection still counted.
    {
        let mut conns = state.conns.lock().unwrap();
        if conns.get(&device).is_some_and(|h| h.id == id) {
            conns.remove(&device);
        }
    }
    // Delivered but not acknowledged: back to the queue for redelivery.
    if let Some(q) = state.c2d.lock().unwrap().get_mut(&device) {
        for m in q.iter_mut() {
            if m.inflight.is_some_and(|(c, _)| c == id) {
                m.inflight = None;
            }
        }
    }
    {
        let mut l = state.log.lock().unwrap();
        l.open_now -= 1;
        l.closed.push((id, device, why));
    }
    io.close().await;
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    io: &mut Io,
    inb: &mut BytesMut,
    state: &State,
    device: &str,
    id: u64,
    expiry: u64,
    kick: &CancellationToken,
    stop: &CancellationToken,
    poke: &mut mpsc::UnboundedReceiver<()>,
) -> Close {
    let hub_now = unix_now() + state.skew_s.load(Ordering::SeqCst);
    let expires_in = Duration::from_secs((expiry as i64 - hub_now).max(0) as u64);
    let expired = tokio::time::sleep(expires_in);
    tokio::pin!(expired);
    let mut subscribed_c2d = false;
    let mut subscribed_twin = false;
    let mut subscribed_methods = false;
    let mut subscribed_streams = false;
    let mut next_pkid: u16 = 0;
    let mut twin_version = 1u64;
    let events_prefix = format!("devices/{device}/messages/events/");
    loop {
        // Deliver queued cloud-to-device messages.
        if subscribed_c2d {
            let mut out = Vec::new();
            if let Some(q) = state.c2d.lock().unwrap().get_mut(device) {
                for m in q.iter_mut().filter(|m| m.inflight.is_none()) {
                    next_pkid = next_pkid % u16::MAX + 1;
                    m.inflight = Some((id, next_pkid));
                    let mut p = Publish::new(m.topic.clone(), QoS::AtLeastOnce, m.body.clone());
                    p.pkid = next_pkid;
                    out.push(p);
                }
            }
            for p in out {
                if !io.write(&Packet::Publish(p)).await {
                    return Close::Dropped;
                }
            }
        }
        // Deliver direct method calls (QoS 0, as IoT Hub sends them).
        if subscribed_methods {
            let calls: Vec<_> = state
                .methods
                .lock()
                .unwrap()
                .get_mut(device)
                .map(|q| q.drain(..).collect())
                .unwrap_or_default();
            for (rid, method, body) in calls {
                let t = format!("$iothub/methods/POST/{method}/?$rid={rid}");
                if !io
                    .write(&Packet::Publish(Publish::new(t, QoS::AtMostOnce, body)))
                    .await
                {
                    return Close::Dropped;
                }
            }
        }
        // Deliver device-stream requests (QoS 0).
        if subscribed_streams {
            let topics: Vec<_> = state
                .stream_requests
                .lock()
                .unwrap()
                .get_mut(device)
                .map(|q| q.drain(..).collect())
                .unwrap_or_default();
            for t in topics {
                if !io
                    .write(&Packet::Publish(Publish::new(
                        t,
                        QoS::AtMostOnce,
                        Vec::new(),
                    )))
                    .await
                {
                    return Close::Dropped;
                }
            }
        }
        let alive = tokio::select! {
            _ = stop.cancelled() => return Close::HubStopped,
            _ = kick.cancelled() => return Close::Replaced,
            _ = &mut expired => return Close::TokenExpired,
            _ = poke.recv() => true,
            ok = io.read(inb) => ok,
        };
        if !alive {
            return Close::Dropped;
        }
        loop {
            let p = match Packet::read(inb, MAX) {
                Ok(p) => p,
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => return Close::Violation(format!("bad packet: {e:?}")),
            };
            let reply = match p {
                Packet::Publish(p) => {
                    if p.qos == QoS::ExactlyOnce {
                        return Close::Violation("QoS 2".into());
                    }
                    if p.payload.len() > MAX_MESSAGE {
                        return Close::Violation(format!("message of {} bytes", p.payload.len()));
                    }
                    if let Some(bag) = p.topic.strip_prefix(&events_prefix) {
                        state.log.lock().unwrap().d2c.push(D2c {
                            device: device.to_string(),
                            topic: p.topic.clone(),
                            props: parse_bag(bag),
                            body: p.payload.to_vec(),
                            conn: id,
                        });
                    } else if let Some(q) = p
                        .topic
                        .strip_prefix("$iothub/twin/PATCH/properties/reported/?")
                    {
                        let rid = q
                            .split('&')
                            .find_map(|kv| kv.strip_prefix("$rid="))
                            .unwrap_or("")
                            .to_string();
                        let status = match serde_json::from_slice::<serde_json::Value>(&p.payload) {
                            Ok(v @ serde_json::Value::Object(_)) => {
                                state
                                    .log
                                    .lock()
                                    .unwrap()
                                    .twin_patches
                                    .push((device.to_string(), v));
                                twin_version += 1;
                                204
                            }
                            _ => 400,
                        };
                        if subscribed_twin {
                            let t = format!(
                                "$iothub/twin/res/{status}/?$rid={rid}&$version={twin_version}"
                            );
                            if !io
                                .write(&Packet::Publish(Publish::new(
                                    t,
                                    QoS::AtMostOnce,
                                    Vec::new(),
                                )))
                                .await
                            {
                                return Close::Dropped;
                            }
                        }
                    } else if let Some(rest) = p.topic.strip_prefix("$iothub/methods/res/") {
                        // `{status}/?$rid={rid}`
                        let (status, query) = rest.split_once("/?").unwrap_or((rest, ""));
                        let rid = query
                            .split('&')
                            .find_map(|kv| kv.strip_prefix("$rid="))
                            .unwrap_or("");
                        let Ok(status) = status.parse::<u16>() else {
                            return Close::Violation(format!("method answer on {:?}", p.topic));
                        };
                        state
                            .method_answers
                            .lock()
                            .unwrap()
                            .insert(rid.to_string(), (status, p.payload.to_vec()));
                    } else if let Some(rest) = p.topic.strip_prefix("$iothub/streams/res/") {
                        // `{status}/?$rid={rid}`
                        let (status, query) = rest.split_once("/?").unwrap_or((rest, ""));
                        let rid = query
                            .split('&')
                            .find_map(|kv| kv.strip_prefix("$rid="))
                            .unwrap_or("");
                        let Ok(status) = status.parse::<u16>() else {
                            return Close::Violation(format!("stream answer on {:?}", p.topic));
                        };
                        state
                            .log
                            .lock()
                            .unwrap()
                            .stream_answers
                            .push((rid.to_string(), status));
                    } else if p.topic.starts_with("$iothub/twin/GET/?") {
                        // Not used by lorastream; allowed by IoT Hub.
                    } else {
                        return Close::Violation(format!("publish on {:?}", p.topic));
                    }
                    (p.qos == QoS::AtLeastOnce && !state.hold_acks.load(Ordering::SeqCst))
                        .then(|| Packet::PubAck(PubAck::new(p.pkid)))
                }
                Packet::Subscribe(s) => {
                    let codes = s
                        .filters
                        .iter()
                        .map(|f| {
                            if !allowed_filter(device, &f.path) {
                                return SubscribeReasonCode::Failure;
                            }
                            if f.path.starts_with("devices/") {
                                subscribed_c2d = true;
                            }
                            if f.path == "$iothub/twin/res/#" {
                                subscribed_twin = true;
                            }
                            if f.path == "$iothub/methods/POST/#" {
                                subscribed_methods = true;
                            }
                            if f.path == "$iothub/streams/POST/#" {
                                subscribed_streams = true;
                                state.log.lock().unwrap().stream_subscribed.push(id);
                            }
                            SubscribeReasonCode::Success(if f.qos == QoS::AtMostOnce {
                                QoS::AtMostOnce
                            } else {
                                QoS::AtLeastOnce
                            })
                        })
                        .collect();
                    Some(Packet::SubAck(SubAck::new(s.pkid, codes)))
                }
                Packet::PubAck(a) => {
                    let mut done = None;
                    if let Some(q) = state.c2d.lock().unwrap().get_mut(device) {
                        if let Some(i) = q.iter().position(|m| m.inflight == Some((id, a.pkid))) {
                            done = q.remove(i).map(|m| m.mid);
                        }
                    }
                    if let Some(mid) = done {
                        state
                            .log
                            .lock()
                            .unwrap()
                            .completed
                            .push((device.to_string(), mid));
                    }
                    None
                }
                Packet::Unsubscribe(u) => Some(Packet::UnsubAck(UnsubAck::new(u.pkid))),
                Packet::PingReq => Some(Packet::PingResp),
                Packet::Disconnect => return Close::Disconnect,
                other => return Close::Violation(format!("unexpected {other:?}")),
            };
            if let Some(r) = reply {
                if !io.write(&r).await {
                    return Close::Dropped;
                }
            }
        }
    }
}
