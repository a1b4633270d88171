//! Remote access through IoT Hub device streams (`tunnel_ports`, identity = "gateway"): a TCP
//! connection to `127.0.0.1:<port>` (e.g. SSH) carried over an outbound WebSocket, so that a
//! gateway behind NAT needs no inbound port.
//!
//! The protocol is the one the Azure IoT device SDKs speak over MQTT (device streams preview;
//! C SDK `iothub_client_streaming`, C# `MqttTransportHandler`): the device subscribes to
//! `$iothub/streams/POST/#`; a request arrives on `$iothub/streams/POST/{name}/?$rid={rid}&
//! $url={streaming endpoint, URL-encoded}&$auth={token}[&$ip=...]`; the device answers on
//! `$iothub/streams/res/{status}/?$rid={rid}` (200 accepts, 400 rejects) and, when accepting,
//! opens a WebSocket to `$url` with `Authorization: Bearer {token}`. The streaming endpoint
//! joins it with the service's WebSocket; bytes go both ways as binary frames.
//!
//! Guarantees:
//! - Only allow-listed ports: the stream name is the port in decimal (`22`); anything else is
//!   answered 400 and logged (rate-limited) with the reason, and nothing local is connected.
//! - At most `tunnel_max` tunnels at once (more are answered 400, result `busy`); each is torn
//!   down when either side closes, after `tunnel_idle_timeout_s` without a byte either way, and
//!   when the daemon stops. Each direction has its own loop (joined in one task), so a side
//!   that stops reading never stalls the other direction (an echo service cannot deadlock the
//!   tunnel).
//! - The streaming endpoint's certificate is verified like the hub's (the Azure roots plus the
//!   stream's `ca_file`); only `wss://` URLs are accepted.
//! - The token is never logged, and the endpoint URL is logged as its host only.
//! - A malformed request is answered 400 when it has a usable request id and ignored otherwise;
//!   it never ends the MQTT connection.

use crate::config::TunnelConfig;
use crate::logs::LogLimiter;
use crate::metrics::Metrics;
use crate::model::Secret;
use crate::streams::tls::{self, TlsError};
use futures_util::{SinkExt, StreamExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{header::AUTHORIZATION, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

/// The device-stream requests' subscription.
pub(super) const FILTER: &str = "$iothub/streams/POST/#";
const PREFIX: &str = "$iothub/streams/POST/";
/// TCP, TLS and the WebSocket handshake with the streaming endpoint must finish within this.
const ENDPOINT_TIMEOUT: Duration = Duration::from_secs(30);
/// Connecting to the local service must finish within this.
const LOCAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from the local service per WebSocket frame.
const CHUNK: usize = 16 * 1024;
/// Largest WebSocket message taken from the endpoint (bounded memory per tunnel).
const MAX_FRAME: usize = 1024 * 1024;
/// A request id longer than this, or with other characters than these, cannot be echoed safely
/// into a topic name: such a request is ignored.
const MAX_RID: usize = 128;

/// Why a tunnel could not be set up. Never contains the token.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TunnelError {
    #[error("streaming endpoint {host}: {reason}")]
    Endpoint { host: String, reason: String },
    #[error("streaming endpoint {host} answered the WebSocket handshake with HTTP {status} (token refused or expired?)")]
    EndpointRefused { host: String, status: u16 },
    #[error("127.0.0.1:{port}: {reason} (is the service running?)")]
    Local { port: u16, reason: String },
}

impl TunnelError {
    fn result(&self) -> &'static str {
        match self {
            TunnelError::Endpoint { .. } | TunnelError::EndpointRefused { .. } => "endpoint_error",
            TunnelError::Local { .. } => "local_error",
        }
    }
}

/// A request to accept.
#[derive(Debug)]
pub(super) struct Request {
    pub rid: String,
    pub port: u16,
    pub url: url::Url,
    pub token: Secret,
}

/// What to do with a message on a device-stream topic.
#[derive(Debug)]
pub(super) enum Parsed {
    /// No usable request id: nothing can be answered.
    Ignore(String),
    /// Answer 400 with this request id; `result` is the metric's, `reason` the log's.
    Refuse {
        rid: String,
        result: &'static str,
        reason: String,
    },
    Accept(Request),
}

/// The response topic for request `rid`.
pub(super) fn response_topic(status: u16, rid: &str) -> String {
    format!("$iothub/streams/res/{status}/?$rid={rid}")
}

fn rid_ok(rid: &str) -> bool {
    !rid.is_empty()
        && rid.len() <= MAX_RID
        && rid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:%".contains(&b))
}

/// `22` → 22: ASCII digits, no sign, no leading zero, 1-65535.
fn port_of(name: &str) -> Option<u16> {
    if name.is_empty() || name.len() > 5 || name.starts_with('0') {
        return None;
    }
    if !name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    name.parse::<u16>().ok().filter(|p| *p > 0)
}

/// Parse a request topic (pure). `None`: not a device-stream request topic. The request
/// properties follow the stream name after `/?` (as IoT Hub sends them) or `/` (as the C#
/// SDK's tests write them).
pub(super) fn parse(topic: &str, allowed: &[u16]) -> Option<Parsed> {
    let rest = topic.strip_prefix(PREFIX)?;
    let Some((name, query)) = rest.split_once('/') else {
        return Some(Parsed::Ignore("no request properties".into()));
    };
    let query = query.strip_prefix('?').unwrap_or(query);
    // The raw request id: it goes back into the response topic exactly as it came.
    let rid = query.split('&').find_map(|kv| {
        kv.strip_prefix("$rid=")
            .or_else(|| kv.strip_prefix("%24rid="))
    });
    let Some(rid) = rid.filter(|r| rid_ok(r)) else {
        return Some(Parsed::Ignore("no usable $rid".into()));
    };
    let rid = rid.to_string();
    let refuse = |result: &'static str, reason: String| {
        Some(Parsed::Refuse {
            rid: rid.clone(),
            result,
            reason,
        })
    };
    let shown_name: String = name.chars().take(40).collect();
    let Some(port) = port_of(name) else {
        return refuse(
            "refused",
            format!("stream name {shown_name:?} is not a port number (the stream name must be the port, e.g. 22)"),
        );
    };
    if !allowed.contains(&port) {
        return refuse(
            "refused",
            format!("port {port} is not in tunnel_ports {allowed:?}"),
        );
    }
    let props = super::wire::parse_properties(query);
    let url = match super::wire::prop(&props, "$url").map(url::Url::parse) {
        Some(Ok(u)) if u.scheme() == "wss" && u.host_str().is_some_and(|h| !h.is_empty()) => u,
        Some(Ok(u)) => {
            return refuse(
                "malformed",
                format!("$url has scheme {:?}; only wss:// is used", u.scheme()),
            )
        }
        Some(Err(e)) => return refuse("malformed", format!("$url is not a URL: {e}")),
        None => return refuse("malformed", "no $url (streaming endpoint)".into()),
    };
    let token = match super::wire::prop(&props, "$auth") {
        Some(t) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()) => t,
        Some(_) => return refuse("malformed", "$auth is not a token".into()),
        None => return refuse("malformed", "no $auth (streaming endpoint token)".into()),
    };
    Some(Parsed::Accept(Request {
        rid,
        port,
        url,
        token: Secret::new(token),
    }))
}

/// The tunnels of one stream: settings, the slots, the endpoint's TLS.
pub(crate) struct Tunnels {
    stream: String,
    ports: Vec<u16>,
    idle: Duration,
    slots: Arc<Semaphore>,
    max: usize,
    tls: Arc<rustls::ClientConfig>,
    metrics: Metrics,
    log: Mutex<LogLimiter>,
}

impl Tunnels {
    /// None when `tunnel_ports` is empty (device streams off: no subscription).
    pub fn new(
        cfg: &TunnelConfig,
        stream: &str,
        ca_file: Option<&Path>,
        metrics: Metrics,
    ) -> Result<Option<Arc<Tunnels>>, TlsError> {
        if cfg.ports.is_empty() {
            return Ok(None);
        }
        // The WebSocket handshake is HTTP/1.1 (RFC 6455 §4.1).
        let tls = tls::client_config_with_roots(&tls::AZURE_IOT_ROOTS, ca_file, &[b"http/1.1"])?;
        Ok(Some(Arc::new(Tunnels {
            stream: stream.to_string(),
            ports: cfg.ports.clone(),
            idle: cfg.idle_timeout,
            slots: Arc::new(Semaphore::new(cfg.max)),
            max: cfg.max,
            tls,
            metrics,
            log: Mutex::new(LogLimiter::new()),
        })))
    }

    fn warn_allowed(&self) -> bool {
        self.log.lock().map(|mut l| l.allow()).unwrap_or(false)
    }

    /// A message on a device-stream topic: the answer's topic (None: not answerable), after
    /// starting the tunnel when it is accepted. `cancel` ends the tunnel (the daemon's stop).
    pub fn on_request(self: &Arc<Self>, topic: &str, cancel: &CancellationToken) -> Option<String> {
        let parsed = parse(topic, &self.ports)?;
        let req = match parsed {
            Parsed::Ignore(reason) => {
                self.metrics.tunnel(&self.stream, "malformed");
                if self.warn_allowed() {
                    tracing::warn!(stream = %self.stream, reason, "device-stream request ignored (cannot be answered)");
                }
                return None;
            }
            Parsed::Refuse {
                rid,
                result,
                reason,
            } => {
                self.metrics.tunnel(&self.stream, result);
                if self.warn_allowed() {
                    tracing::warn!(stream = %self.stream, reason, "device-stream request refused (400)");
                }
                return Some(response_topic(400, &rid));
            }
            Parsed::Accept(r) => r,
        };
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            self.metrics.tunnel(&self.stream, "busy");
            if self.warn_allowed() {
                tracing::warn!(stream = %self.stream, port = req.port, max = self.max, "device-stream request refused (400): tunnel_max tunnels are open");
            }
            return Some(response_topic(400, &req.rid));
        };
        let answer = response_topic(200, &req.rid);
        tokio::spawn(self.clone().run(req, permit, cancel.child_token()));
        Some(answer)
    }

    /// One tunnel, from the endpoint's WebSocket to its end; counted and logged once.
    async fn run(
        self: Arc<Self>,
        req: Request,
        permit: OwnedSemaphorePermit,
        stop: CancellationToken,
    ) {
        let host = req.url.host_str().unwrap_or_default().to_string();
        let port = req.port;
        self.metrics.tunnels_open_add(&self.stream, 1);
        let started = Instant::now();
        let counts = Counts::default();
        let end = tokio::select! {
            _ = stop.cancelled() => Ok(End::Stopped),
            r = self.tunnel(&req, &host, &stop, &counts) => r,
        };
        // A stop (the daemon's, or a reload restarting the stream) ends the tunnel whatever
        // either side noticed at the same moment: the WebSocket or the local socket closing
        // as a consequence must not be counted as the cause.
        let end = match end {
            Ok(_) if stop.is_cancelled() => Ok(End::Stopped),
            other => other,
        };
        self.metrics.tunnels_open_add(&self.stream, -1);
        drop(permit);
        let (up, down) = (
            counts.up.load(Ordering::Relaxed),
            counts.down.load(Ordering::Relaxed),
        );
        match end {
            Ok(e) => {
                self.metrics.tunnel(&self.stream, e.result());
                tracing::info!(stream = %self.stream, port, endpoint = %host, end = e.result(),
                    bytes_to_service = down, bytes_from_service = up,
                    seconds = started.elapsed().as_secs(), "tunnel closed");
            }
            Err(e) => {
                self.metrics.tunnel(&self.stream, e.result());
                if self.warn_allowed() {
                    tracing::warn!(stream = %self.stream, port, error = %e, "tunnel failed");
                }
            }
        }
    }

    async fn tunnel(
        &self,
        req: &Request,
        host: &str,
        stop: &CancellationToken,
        counts: &Counts,
    ) -> Result<End, TunnelError> {
        let ws = tokio::time::timeout(ENDPOINT_TIMEOUT, self.endpoint(req, host))
            .await
            .map_err(|_| TunnelError::Endpoint {
                host: host.to_string(),
                reason: format!("no WebSocket within {ENDPOINT_TIMEOUT:?}"),
            })??;
        let local =
            tokio::time::timeout(LOCAL_TIMEOUT, TcpStream::connect(("127.0.0.1", req.port)))
                .await
                .map_err(|_| TunnelError::Local {
                    port: req.port,
                    reason: format!("no connection within {LOCAL_TIMEOUT:?}"),
                })?
                .map_err(|e| TunnelError::Local {
                    port: req.port,
                    reason: e.to_string(),
                })?;
        let _ = local.set_nodelay(true);
        tracing::info!(stream = %self.stream, port = req.port, endpoint = %host, "tunnel open");
        Ok(proxy(ws, local, self.idle, stop, counts).await)
    }

    /// TCP, TLS (verified like the hub) and the WebSocket handshake with the bearer token.
    async fn endpoint(&self, req: &Request, host: &str) -> Result<Ws, TunnelError> {
        let err = |reason: String| TunnelError::Endpoint {
            host: host.to_string(),
            reason,
        };
        let bare = host.trim_matches(['[', ']']).to_string();
        let port = req.url.port_or_known_default().unwrap_or(443);
        let tcp = TcpStream::connect((bare.as_str(), port))
            .await
            .map_err(|e| err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let name = rustls_pki_types::ServerName::try_from(bare.clone())
            .map_err(|e| err(format!("not a TLS server name: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| err(format!("TLS: {e}")))?;
        let mut http = req
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| err(e.to_string()))?;
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", req.token.expose()))
            .map_err(|_| err("the token is not a valid header value".into()))?;
        auth.set_sensitive(true);
        http.headers_mut().insert(AUTHORIZATION, auth);
        let mut cfg = WebSocketConfig::default();
        cfg.max_message_size = Some(MAX_FRAME);
        cfg.max_frame_size = Some(MAX_FRAME);
        match tokio_tungstenite::client_async_with_config(http, tls, Some(cfg)).await {
            Ok((ws, _)) => Ok(ws),
            Err(WsError::Http(resp)) => Err(TunnelError::EndpointRefused {
                host: host.to_string(),
                status: resp.status().as_u16(),
            }),
            Err(e) => Err(err(e.to_string())),
        }
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// Bytes carried, for the closing log line.
#[derive(Default)]
struct Counts {
    /// From the local service to the endpoint.
    up: AtomicU64,
    /// From the endpoint to the local service.
    down: AtomicU64,
}

/// How a tunnel that was set up ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The local service closed its side (or failed).
    LocalClosed,
    /// The endpoint closed the WebSocket (the service side went away), or it broke.
    RemoteClosed,
    IdleTimeout,
    /// The daemon stops.
    Stopped,
}

impl End {
    fn result(self) -> &'static str {
        match self {
            End::LocalClosed => "closed_local",
            End::RemoteClosed => "closed_remote",
            End::IdleTimeout => "idle_timeout",
            End::Stopped => "stopped",
        }
    }
}

/// The first cause of the end wins; every loop stops at once.
struct Ending {
    first: Mutex<Option<End>>,
    stop: CancellationToken,
}

impl Ending {
    fn end(&self, e: End) {
        if let Ok(mut f) = self.first.lock() {
            f.get_or_insert(e);
        }
        self.stop.cancel();
    }
}

/// Carry bytes both ways until one side closes, the link idles out, or `stop`.
async fn proxy(
    ws: Ws,
    local: TcpStream,
    idle: Duration,
    stop: &CancellationToken,
    counts: &Counts,
) -> End {
    let (mut sink, mut source) = ws.split();
    let (mut rd, mut wr) = local.into_split();
    let ending = Ending {
        first: Mutex::new(None),
        stop: stop.child_token(),
    };
    let base = Instant::now();
    // Milliseconds after `base` of the last byte either way.
    let last = AtomicU64::new(0);
    let touch = || last.store(base.elapsed().as_millis() as u64, Ordering::Relaxed);
    let halt = &ending.stop;

    // Local service → endpoint.
    let up = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = tokio::select! {
                _ = halt.cancelled() => break,
                r = rd.read(&mut buf) => match r {
                    Ok(0) | Err(_) => { ending.end(End::LocalClosed); break; }
                    Ok(n) => n,
                },
            };
            touch();
            counts.up.fetch_add(n as u64, Ordering::Relaxed);
            let frame = Message::Binary(buf[..n].to_vec().into());
            tokio::select! {
                _ = halt.cancelled() => break,
                r = sink.send(frame) => if r.is_err() { ending.end(End::RemoteClosed); break; },
            }
        }
        // Tell the endpoint (and the service behind it) that the tunnel is over.
        let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
    };
    // Endpoint → local service.
    let down = async {
        loop {
            let m = tokio::select! {
                _ = halt.cancelled() => break,
                m = source.next() => m,
            };
            let bytes = match m {
                Some(Ok(Message::Binary(b))) => b,
                Some(Ok(Message::Text(t))) => t.as_bytes().to_vec().into(),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    ending.end(End::RemoteClosed);
                    break;
                }
                // Pings are answered by tungstenite; they keep the link, not the tunnel, alive.
                Some(Ok(_)) => continue,
            };
            touch();
            counts.down.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            tokio::select! {
                _ = halt.cancelled() => break,
                r = wr.write_all(&bytes) => if r.is_err() { ending.end(End::LocalClosed); break; },
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), wr.shutdown()).await;
    };
    let idle_watch = async {
        loop {
            let due = base + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
            tokio::select! {
                _ = halt.cancelled() => break,
                _ = tokio::time::sleep_until(due) => {
                    let now_due = base + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
                    if now_due <= Instant::now() {
                        ending.end(End::IdleTimeout);
                        break;
                    }
                }
            }
        }
    };
    tokio::join!(up, down, idle_watch);
    let first = ending.first.lock().ok().and_then(|f| *f);
    first.unwrap_or(End::Stopped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(topic: &str) -> Request {
        match parse(topic, &[22, 8022]) {
            Some(Parsed::Accept(r)) => r,
            other => panic!("{topic}: {other:?}"),
        }
    }

    fn refused(topic: &str) -> (String, &'static str, String) {
        match parse(topic, &[22, 8022]) {
            Some(Parsed::Refuse {
                rid,
                result,
                reason,
            }) => (rid, result, reason),
            other => panic!("{topic}: {other:?}"),
        }
    }

    const URL: &str = "wss%3A%2F%2Fsgw.eastus2euap-001.streams.azure-devices.net%2Fbridges%2Fx%2Fy";

    #[test]
    fn requests_as_iot_hub_and_the_csharp_sdk_write_them() {
        let r = accept(&format!(
            "$iothub/streams/POST/22/?$rid=7&$url={URL}&$auth=eyJ0.eyJl.X_HI&$ip=13.89.222.63"
        ));
        assert_eq!((r.rid.as_str(), r.port), ("7", 22));
        assert_eq!(
            r.url.as_str(),
            "wss://sgw.eastus2euap-001.streams.azure-devices.net/bridges/x/y"
        );
        assert_eq!(r.token.expose(), "eyJ0.eyJl.X_HI");
        assert_eq!(format!("{:?}", r.token), "***");
        // Without the `?`, and with an escaped `$`.
        let r = accept(&format!(
            "$iothub/streams/POST/8022/%24rid=abc-1&%24url={URL}&%24auth=t"
        ));
        assert_eq!((r.rid.as_str(), r.port), ("abc-1", 8022));
        assert_eq!(
            response_topic(200, "abc-1"),
            "$iothub/streams/res/200/?$rid=abc-1"
        );
    }

    #[test]
    fn only_allow_listed_ports_in_decimal() {
        for name in [
            "2222", "022", "+22", "22a", "ssh", "", "0", "65536", "99999999",
        ] {
            let (rid, result, reason) = refused(&format!(
                "$iothub/streams/POST/{name}/?$rid=5&$url={URL}&$auth=t"
            ));
            assert_eq!((rid.as_str(), result), ("5", "refused"), "{name}");
            assert!(
                !reason.contains("$auth") && !reason.contains("t\""),
                "{reason}"
            );
        }
        let (_, _, reason) = refused(&format!(
            "$iothub/streams/POST/2222/?$rid=5&$url={URL}&$auth=t"
        ));
        assert!(
            reason.contains("2222") && reason.contains("[22, 8022]"),
            "{reason}"
        );
    }

    #[test]
    fn malformed_requests_are_refused_or_ignored_never_a_panic() {
        for q in [
            "$rid=1",
            "$rid=1&$auth=t",
            &format!("$rid=1&$url={URL}"),
            &format!("$rid=1&$url={URL}&$auth="),
            &format!("$rid=1&$url={URL}&$auth=a%20b"),
            "$rid=1&$url=https%3A%2F%2Fx%2Fy&$auth=t",
            "$rid=1&$url=ws%3A%2F%2Fx%2Fy&$auth=t",
            "$rid=1&$url=%%%&$auth=t",
        ] {
            let (rid, result, _) = refused(&format!("$iothub/streams/POST/22/?{q}"));
            assert_eq!((rid.as_str(), result), ("1", "malformed"), "{q}");
        }
        for t in [
            "$iothub/streams/POST/22".to_string(),
            "$iothub/streams/POST/".to_string(),
            format!("$iothub/streams/POST/22/?$url={URL}&$auth=t"),
            format!("$iothub/streams/POST/22/?$rid=&$url={URL}"),
            format!("$iothub/streams/POST/22/?$rid=a/b+#&$url={URL}"),
            format!("$iothub/streams/POST/22/?$rid={}", "9".repeat(200)),
        ] {
            assert!(matches!(parse(&t, &[22]), Some(Parsed::Ignore(_))), "{t}");
        }
        assert!(parse("$iothub/methods/POST/x/?$rid=1", &[22]).is_none());
    }
}
