//! The WebSocket stream (`kind = "websocket"`): lorastream connects out to a `ws://` or `wss://`
//! server and sends each queued record as one text message in the stream's format; the server
//! sends downlinks back on the same connection (no inbound port on the gateway).
//!
//! Guarantees (README "Stream over a WebSocket"):
//! - **At least once, in order.** Records are read through the catch-up lanes
//!   ([`super::lanes`]), each device in order, at most `inflight` unacknowledged. With
//!   `ack = "server"` (the default) a record leaves the queue when the server answers
//!   `{"ack": "<correlation id>"}` (the message's `correlation_ids[0]`); acks may come in any
//!   order. With `ack = "write"` a record leaves the queue once the message is written to the
//!   socket: weaker, since a message in the kernel's buffers or the server's hands when the
//!   connection breaks is lost. Copies sent twice (an ack lost with the connection) carry the
//!   same correlation id.
//! - **Reconnects** run in the one reconnect loop ([`super::connect`]): backoff with jitter, and
//!   the next connection reads the queue again from its oldest unacknowledged record.
//! - **A dead peer** is found by WebSocket Pings every `keep_alive_s` (they also keep NAT
//!   mappings open): no frame at all from the server for twice that ends the connection. A
//!   message unacknowledged for `timeout_s` ends it too (its records are sent again on the next).
//! - **Downlinks** arrive as text messages holding the contract's downlink JSON with
//!   `end_device_ids` naming the device (and optionally `"op": "replace"`); they are handed to
//!   the scheduler one at a time, in arrival order, through [`DownlinkHandle::submit`]
//!   (stored before the next message is read). Downlink events (`downlink_queued`, `_sent`,
//!   ...) go back as messages. A message that is neither an ack nor a downlink is counted
//!   (`lorastream_stream_errors_total{reason="ws_bad_message"}`) and logged, rate-limited; the
//!   connection goes on.
//! - **Secrets**: header values are never logged; logged URLs lose user info and query.
//!
//! [`DownlinkHandle::submit`]: crate::downlink::DownlinkHandle::submit

mod wire;

use super::connect::{self, Retry, Session, SessionEnd};
use super::error::{SessionError, SetupError};
use super::lanes::Lanes;
use super::{tls, StreamContext};
use crate::config::{WebSocketConfig, WsAck};
use crate::downlink::json as downlink_json;
use crate::logs::LogLimiter;
use crate::model::{redact_url, DownlinkEvent};
use futures_util::{SinkExt, StreamExt};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig as WsProtocol};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
pub use wire::Incoming;

/// How long a stop waits for outstanding acks before closing the connection.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// The largest message taken from the server (a downlink request is a few hundred bytes).
const MAX_INCOMING: usize = 256 * 1024;

/// The socket under the WebSocket: TCP, or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Ws = WebSocketStream<Box<dyn Io>>;

pub(crate) struct WsStream {
    ctx: StreamContext,
    url: url::Url,
    /// `url` for log lines, secrets removed.
    shown: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    tls: Option<Arc<rustls::ClientConfig>>,
    ack: WsAck,
    inflight: usize,
    keep_alive: Duration,
    timeout: Duration,
    events: mpsc::Receiver<DownlinkEvent>,
    warn: LogLimiter,
}

/// One connection's window: when each unacknowledged record was sent (by sequence number),
/// and the record each correlation id names.
#[derive(Default)]
struct Window {
    by_seq: BTreeMap<u64, Instant>,
    by_cid: HashMap<String, u64>,
}

impl Window {
    fn insert(&mut self, seq: u64, cid: String) {
        self.by_cid.insert(cid, seq);
        self.by_seq.insert(seq, Instant::now());
    }

    /// The record a server's ack names, removed from the window.
    fn acked(&mut self, cid: &str) -> Option<u64> {
        let seq = self.by_cid.remove(cid)?;
        self.by_seq.remove(&seq);
        Some(seq)
    }

    fn len(&self) -> usize {
        self.by_seq.len()
    }

    /// When the oldest unacknowledged message was sent.
    fn oldest(&self) -> Option<Instant> {
        self.by_seq.values().min().copied()
    }
}

impl WsStream {
    pub fn new(
        cfg: &WebSocketConfig,
        ctx: StreamContext,
        events: mpsc::Receiver<DownlinkEvent>,
    ) -> Result<Self, SetupError> {
        let mut headers = Vec::new();
        for (k, v) in &cfg.headers {
            let name =
                HeaderName::from_bytes(k.as_bytes()).map_err(|_| SetupError::Header(k.clone()))?;
            let mut value =
                HeaderValue::from_str(v.expose()).map_err(|_| SetupError::Header(k.clone()))?;
            value.set_sensitive(true);
            headers.push((name, value));
        }
        let client_cert = cfg
            .tls
            .client_cert
            .as_ref()
            .map(|c| (c.cert_file.as_path(), c.key_file.as_path()));
        // The handshake is HTTP/1.1 (RFC 6455 §4.1); say so to servers that negotiate ALPN.
        let tls = if cfg.url.scheme() == "wss" {
            Some(tls::client_config(
                cfg.tls.ca_file.as_deref(),
                client_cert,
                true,
                &[b"http/1.1"],
            )?)
        } else {
            None
        };
        Ok(WsStream {
            shown: redact_url(&cfg.url),
            url: cfg.url.clone(),
            headers,
            tls,
            ack: cfg.ack,
            inflight: usize::from(cfg.inflight),
            keep_alive: cfg.keep_alive,
            timeout: cfg.timeout,
            events,
            warn: LogLimiter::new(),
            ctx,
        })
    }

    pub async fn run(mut self) {
        let ctx = self.ctx.clone();
        tracing::info!(stream = %ctx.name, url = %self.shown, ack = ?self.ack, backlog = ctx.queue.len(), "WebSocket stream started");
        connect::run(&mut self, &ctx, Retry::connection()).await;
    }

    /// TCP, TLS (for `wss://`) and the WebSocket handshake with the configured headers.
    /// `check --online`: the TCP connection, TLS and the WebSocket handshake with the
    /// stream's headers, then a clean close.
    pub async fn probe(&self) -> Result<String, SessionError> {
        let mut ws = tokio::time::timeout(self.timeout, self.connect())
            .await
            .map_err(|_| {
                SessionError::WebSocket(format!("no WebSocket handshake within {:?}", self.timeout))
            })??;
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            ws.close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "lorastream check --online".into(),
            })),
        )
        .await;
        Ok(format!("WebSocket handshake with {} accepted", self.shown))
    }

    async fn connect(&self) -> Result<Ws, SessionError> {
        let err = |e: String| SessionError::WebSocket(e);
        let host = self.url.host_str().unwrap_or_default().to_string();
        let port = self.url.port_or_known_default().unwrap_or(80);
        let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port)).await?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &self.tls {
            Some(cfg) => {
                let name = rustls_pki_types::ServerName::try_from(
                    host.trim_matches(['[', ']']).to_string(),
                )
                .map_err(|e| err(format!("{host:?} is not a TLS server name: {e}")))?;
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| SessionError::WebSocketTls(e.to_string()))?;
                Box::new(tls)
            }
            None => Box::new(tcp),
        };
        let mut req = self
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| err(e.to_string()))?;
        for (k, v) in &self.headers {
            req.headers_mut().insert(k.clone(), v.clone());
        }
        let mut proto = WsProtocol::default();
        proto.max_message_size = Some(MAX_INCOMING);
        proto.max_frame_size = Some(MAX_INCOMING);
        match tokio_tungstenite::client_async_with_config(req, io, Some(proto)).await {
            Ok((ws, _)) => Ok(ws),
            Err(WsError::Http(resp)) => Err(SessionError::WebSocketRefused {
                status: resp.status().as_u16(),
            }),
            Err(e) => Err(err(e.to_string())),
        }
    }

    /// One connection, from the handshake to its end.
    async fn connection(&mut self) -> SessionEnd {
        let ws = tokio::select! {
            _ = self.ctx.cancel.cancelled() => return SessionEnd::Stopped,
            r = tokio::time::timeout(self.timeout, self.connect()) => match r {
                Ok(Ok(ws)) => ws,
                Ok(Err(e)) => return SessionEnd::failed(e),
                Err(_) => return SessionEnd::failed(SessionError::WebSocket(format!(
                    "no WebSocket handshake within {:?}", self.timeout
                ))),
            },
        };
        let name = self.ctx.name.clone();
        tracing::info!(stream = %name, url = %self.shown, backlog = self.ctx.queue.len(), "WebSocket connected");
        self.ctx.metrics.stream_connected(&name, true);
        let mut c = Connection {
            ws,
            lanes: Lanes::new(&self.ctx.queue),
            window: Window::default(),
            last_rx: Instant::now(),
            drained: false,
        };
        let end = self.drive(&mut c).await;
        if !matches!(end, SessionEnd::Failed { .. }) {
            // A clean close (RFC 6455 §7.1.2): "going away".
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                c.ws.close(Some(CloseFrame {
                    code: CloseCode::Away,
                    reason: "lorastream stopping".into(),
                })),
            )
            .await;
        }
        end
    }

    async fn drive(&mut self, c: &mut Connection) -> SessionEnd {
        let mut ping = tokio::time::interval(self.keep_alive);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        let mut stopping: Option<Instant> = None;
        loop {
            // Feed while the window has room and records wait.
            if stopping.is_none() && !c.drained {
                if let Err(e) = self.feed(c).await {
                    return SessionEnd::failed(e);
                }
            }
            if let Some(since) = stopping {
                if c.window.len() == 0 || since.elapsed() >= STOP_GRACE {
                    return SessionEnd::Stopped;
                }
            }
            let ack_deadline = c
                .window
                .oldest()
                .map(|t| t + self.timeout)
                .unwrap_or_else(|| Instant::now() + self.timeout);
            let room = c.window.len() < self.inflight;
            tokio::select! {
                m = c.ws.next() => {
                    c.last_rx = Instant::now();
                    match m {
                        Some(Ok(m)) => {
                            if let Err(e) = self.incoming(c, m).await {
                                return SessionEnd::failed(e);
                            }
                        }
                        Some(Err(e)) => return SessionEnd::failed(SessionError::WebSocket(e.to_string())),
                        None => return SessionEnd::failed(SessionError::WebSocket("the server closed the connection".into())),
                    }
                }
                _ = self.ctx.queue.appended(), if room && c.drained && stopping.is_none() => {
                    c.drained = false;
                }
                Some(e) = self.events.recv() => {
                    let body = downlink_json::event_json(&e);
                    if let Err(e) = send(&mut c.ws, body, self.timeout).await {
                        return SessionEnd::failed(e);
                    }
                }
                _ = ping.tick() => {
                    if c.last_rx.elapsed() >= self.keep_alive * 2 {
                        return SessionEnd::failed(SessionError::WebSocket(format!(
                            "no frame from the server for {:?} (pings unanswered)", c.last_rx.elapsed()
                        )));
                    }
                    let ping = Message::Ping(Vec::from(*b"lorastream").into());
                    match tokio::time::timeout(self.timeout, c.ws.send(ping)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return SessionEnd::failed(SessionError::WebSocket(e.to_string())),
                        Err(_) => return SessionEnd::failed(SessionError::WebSocket("a ping could not be written (the server does not read)".into())),
                    }
                }
                _ = tokio::time::sleep_until(ack_deadline), if c.window.len() > 0 && stopping.is_none() => {
                    return SessionEnd::failed(SessionError::WebSocket(format!(
                        "a message was not acknowledged within {:?} (is the server sending {{\"ack\": \"<correlation id>\"}}? else set ack = \"write\")",
                        self.timeout
                    )));
                }
                _ = self.ctx.cancel.cancelled(), if stopping.is_none() => {
                    stopping = Some(Instant::now());
                }
                _ = tokio::time::sleep(Duration::from_millis(50)), if stopping.is_some() => {}
            }
        }
    }

    /// Send queued records while the window has room; `c.drained` when none are left.
    async fn feed(&mut self, c: &mut Connection) -> Result<(), SessionError> {
        let name = &self.ctx.name;
        while c.window.len() < self.inflight {
            let room = self.inflight - c.window.len();
            let batch = match c.lanes.next(&self.ctx.queue, room) {
                Ok(b) => b,
                Err(e) => {
                    // The store may be reopening its engine after a disk error: the next append
                    // or the reconnect reads again.
                    self.ctx.metrics.stream_error(name, "queue_read");
                    tracing::warn!(stream = %name, error = %e, "cannot read the queue");
                    c.drained = true;
                    return Ok(());
                }
            };
            if batch.is_empty() {
                c.drained = true;
                return Ok(());
            }
            let n = batch.len() as u64;
            let d = super::format::Delivery {
                now_us: crate::model::now_us(),
            };
            for (seq, r) in batch {
                // A record the format does not send (or cannot render) has left the queue.
                let Some(body) = super::format::render_or_drop(&self.ctx, seq, &r, d) else {
                    continue;
                };
                send(&mut c.ws, body, self.timeout).await?;
                match self.ack {
                    WsAck::Write => {
                        if let Err(e) = self.ctx.queue.ack(seq) {
                            self.ctx.metrics.stream_error(name, "queue_ack");
                            tracing::error!(stream = %name, seq, error = %e, "cannot remove a delivered record from the queue; it will be sent again");
                        }
                    }
                    WsAck::Server => c.window.insert(seq, r.correlation_id()),
                }
            }
            self.ctx.metrics.stream_published(name, n);
        }
        Ok(())
    }

    /// A message from the server: acks, a downlink, or something else (counted).
    async fn incoming(&mut self, c: &mut Connection, m: Message) -> Result<(), SessionError> {
        let bytes = match m {
            Message::Text(t) => t.as_bytes().to_vec(),
            Message::Binary(b) => b.to_vec(),
            Message::Close(f) => {
                return Err(SessionError::WebSocket(match f {
                    Some(f) => format!(
                        "the server closed the connection ({}: {})",
                        f.code, f.reason
                    ),
                    None => "the server closed the connection".into(),
                }))
            }
            // Pongs only show the peer is alive (last_rx); tungstenite answers pings itself.
            _ => return Ok(()),
        };
        let name = self.ctx.name.clone();
        match wire::parse(&bytes) {
            Incoming::Acks(ids) => {
                for id in ids {
                    match c.window.acked(&id) {
                        Some(seq) => {
                            if let Err(e) = self.ctx.queue.ack(seq) {
                                self.ctx.metrics.stream_error(&name, "queue_ack");
                                tracing::error!(stream = %name, seq, error = %e, "cannot remove an acknowledged record");
                            }
                        }
                        None => {
                            // A late ack of a copy from an earlier connection, or a stranger's id:
                            // harmless (the record is removed by its own ack, or sent again).
                            self.ctx.metrics.stream_error(&name, "ws_unknown_ack");
                            tracing::debug!(stream = %name, id = %id, "ack for no message in flight");
                        }
                    }
                }
            }
            Incoming::Downlink(req) => {
                let Some(handle) = self.ctx.downlinks.clone() else {
                    self.ctx.metrics.stream_error(&name, "ws_downlinks_off");
                    if self.warn.allow() {
                        tracing::warn!(stream = %name, "the server sent a downlink, but this stream has downlinks = false; ignored");
                    }
                    return Ok(());
                };
                let req = req.into_request(&name);
                // Stored (or refused with a down/failed event) before the next message is read.
                if handle.submit(req).await.is_err() {
                    return Err(SessionError::WebSocket(
                        "the downlink scheduler stopped".into(),
                    ));
                }
            }
            Incoming::Bad(why) => {
                self.ctx.metrics.stream_error(&name, "ws_bad_message");
                if self.warn.allow() {
                    tracing::warn!(stream = %name, reason = %why, "the WebSocket server sent a message that is neither an ack nor a downlink; ignored");
                }
            }
        }
        Ok(())
    }
}

/// The live state of one connection.
struct Connection {
    ws: Ws,
    lanes: Lanes,
    window: Window,
    /// Any frame from the server (data, ping, pong) shows it is alive.
    last_rx: Instant,
    /// The last read found nothing to send: wait for an append.
    drained: bool,
}

/// Send one text message (flushed), within `timeout`.
async fn send(ws: &mut Ws, body: Vec<u8>, timeout: Duration) -> Result<(), SessionError> {
    let text = String::from_utf8(body)
        .map_err(|_| SessionError::WebSocket("a message is not UTF-8".into()))?;
    match tokio::time::timeout(timeout, ws.send(Message::text(text))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(SessionError::WebSocket(e.to_string())),
        Err(_) => Err(SessionError::WebSocket(format!(
            "a message could not be written within {timeout:?} (the server does not read)"
        ))),
    }
}

impl Session for WsStream {
    const WHAT: &'static str = "WebSocket connection";

    fn server(&self) -> String {
        self.shown.clone()
    }

    async fn session(&mut self) -> SessionEnd {
        self.connection().await
    }

    fn hint(&self, e: &SessionError) -> Option<&'static str> {
        match e {
            SessionError::WebSocketRefused { status: 401 | 403 } => {
                Some("the server refuses the credentials: check headers (API key, token)")
            }
            SessionError::WebSocketRefused { .. } => {
                Some("the server did not upgrade to WebSocket: check the URL's path")
            }
            SessionError::WebSocketTls(_) => Some(
                "TLS failed: is this a TLS port, is the server's certificate trusted (ca_file), is the clock right?",
            ),
            e => e.hint(),
        }
    }
}
