//! The HTTP webhook stream (`kind = "http"`): uplinks are POSTed in batches in the stream's
//! format (a JSON array of `tts` or `chirpstack` messages, one `<messages>` XML document, or
//! rendered templates; with `batch_max = 1` one message per request, TTS webhook style), a
//! record leaves the queue only when the server answered 2xx, and downlinks come back in
//! response bodies (and from an optional `poll_url`), so the gateway needs no inbound port.
//!
//! Guarantees (README "Stream to an HTTP webhook", docs/formats.md "HTTP webhook"):
//! - **At least once, in order.** One batch is in flight at a time. Batches are read from the
//!   queue through the catch-up lanes ([`super::lanes`]), so each device's records leave in
//!   order; within a batch records are in queue order. A batch is retried until the server
//!   answers 2xx (then every record is acknowledged with `queue.ack(seq)`), or, with
//!   `on_client_error = "drop"`, until it answers a 4xx other than 408/429 (then the records are
//!   removed as dead letters, counted). Copies sent twice (a timeout after the server had the
//!   batch, a stop mid-request) keep their `correlation_ids`.
//! - **Retries**: a 5xx, 408, 429, 3xx, connection error or timeout ends the delivery session;
//!   [`crate::streams::connect`] backs off (0.5 s to 60 s, full jitter), at least as long as a
//!   `Retry-After` asks (delay-seconds or HTTP-date, RFC 9110 §10.2.3, capped at
//!   [`exchange::RETRY_AFTER_CAP`]), and the next session reads the queue from its oldest
//!   record again. A 413 halves the batch (down to one record); one record alone refused with
//!   413 is dropped as `too_large` ([`super::too_large`]): the server will never take it.
//! - **Downlinks** in a 2xx body (of any POST) or a `poll_url` body —
//!   `{"downlinks": {"<device_id>": {"push": [...], "replace": [...]}}}` with the contract's
//!   downlink items — are handed to the scheduler exactly like MQTT `down/push`/`down/replace`
//!   (the scheduler checks the stream's scope), one device at a time, and stored before the
//!   next request of the same kind leaves. A bad body is logged and counted; the stream goes on.
//! - **Downlink events** of this stream are POSTed to `url` as JSON arrays with the header
//!   `X-Lorastream-Kind: downlink_events`, best effort: held in memory (at most
//!   [`downlinks::MAX_EVENTS`], oldest dropped and counted), retried like uplinks, dropped on
//!   a 4xx.
//! - **Secrets.** Custom `headers` are marked sensitive and never logged; logged URLs lose their
//!   query and user info (function keys often live there); server error bodies are logged
//!   with any header value blanked out.
//! - **Stop.** On the cancel token no new request starts; a request in flight gets
//!   [`exchange::STOP_GRACE`] to finish (its records stay queued otherwise).
//!
//! Files: this one (the stream and its uplink deliveries), `exchange.rs` (one request and its
//! answer), `downlinks.rs` (downlinks in bodies and polls, downlink events).

use super::connect::{self, Retry, Session, SessionEnd};
use super::error::{SessionError, SetupError};
use super::format::{render_or_drop, Delivery};
use super::lanes::Lanes;
use super::{tls, StreamContext};
use crate::config::{HttpConfig, OnClientError, PollConfig};
use crate::model::{now_us, redact_url, DownlinkEvent, Record, Secret};
use crate::store::DropReason;
use exchange::{Outcome, Purpose};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

pub(crate) mod downlinks;
mod exchange;

/// The header that tells uplink batches from downlink events (both go to `url`).
pub const KIND_HEADER: &str = "x-lorastream-kind";

pub(crate) struct HttpStream {
    ctx: StreamContext,
    client: reqwest::Client,
    url: reqwest::Url,
    poll: Option<PollConfig>,
    batch_max: usize,
    batch_wait: Duration,
    drop_refused: bool,
    /// Header values, to blank them out of logged server text.
    secrets: Vec<Secret>,
    events: Option<mpsc::Receiver<DownlinkEvent>>,
}

/// The HTTP client of a stream: its TLS settings, headers (marked sensitive), timeouts, no
/// redirects. Also the values of the headers, to keep them out of logged server answers.
pub(crate) fn client(cfg: &HttpConfig) -> Result<(reqwest::Client, Vec<Secret>), SetupError> {
    let mut headers = HeaderMap::new();
    let mut secrets = Vec::new();
    for (k, v) in &cfg.headers {
        let name =
            HeaderName::from_bytes(k.as_bytes()).map_err(|_| SetupError::Header(k.clone()))?;
        let mut value =
            HeaderValue::from_str(v.expose()).map_err(|_| SetupError::Header(k.clone()))?;
        // Keeps the value out of reqwest's and hyper's Debug output.
        value.set_sensitive(true);
        headers.insert(name, value);
        if v.expose().len() >= 4 {
            secrets.push(v.clone());
        }
    }

    let https =
        cfg.url.scheme() == "https" || cfg.poll.as_ref().is_some_and(|p| p.url.scheme() == "https");
    let client_cert = cfg
        .tls
        .client_cert
        .as_ref()
        .map(|c| (c.cert_file.as_path(), c.key_file.as_path()));
    let mut tls_cfg = if https || cfg.tls.ca_file.is_some() || client_cert.is_some() {
        Arc::unwrap_or_clone(tls::client_config(
            cfg.tls.ca_file.as_deref(),
            client_cert,
            true,
            &[],
        )?)
    } else {
        // Plain http:// only. reqwest still wants a TLS backend, and without one it would
        // ask for a process-wide rustls provider (crate-notes, "Toolchain": it panics when
        // none is installed); an empty trust store is enough for a client that never uses it.
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|source| tls::TlsError::Rustls {
            what: "TLS setup",
            source,
        })?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
    };
    tls_cfg.alpn_protocols = vec![b"http/1.1".to_vec()];

    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls_cfg)
        .default_headers(headers)
        .user_agent(concat!("lorastream/", env!("CARGO_PKG_VERSION")))
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
        // A redirected POST turns into a GET on most servers: report it instead.
        .redirect(reqwest::redirect::Policy::none())
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| SetupError::HttpClient(exchange::error_chain(&e.without_url())))?;

    Ok((client, secrets))
}

impl HttpStream {
    /// `check --online`: a HEAD request to the URL with the stream's headers and TLS (a HEAD
    /// delivers nothing). Any answer shows the server is reachable and TLS works; 401/403 are
    /// refused credentials.
    pub async fn probe(&self) -> Result<String, SessionError> {
        let shown = redact_url(&self.url);
        let resp = self
            .client
            .head(self.url.clone())
            .send()
            .await
            .map_err(|e| SessionError::Http(exchange::error_chain(&e.without_url())))?;
        let status = resp.status().as_u16();
        match status {
            401 | 403 => Err(SessionError::HttpRefused {
                status,
                detail: "the HEAD request of check --online".into(),
            }),
            _ => Ok(format!(
                "{shown} answered HTTP {status} to HEAD (reachable{}; a webhook may answer only POST)",
                if self.url.scheme() == "https" { ", TLS ok" } else { "" }
            )),
        }
    }
}

impl HttpStream {
    pub fn new(
        cfg: &HttpConfig,
        ctx: StreamContext,
        events: mpsc::Receiver<DownlinkEvent>,
    ) -> Result<Self, SetupError> {
        let (client, secrets) = client(cfg)?;
        Ok(HttpStream {
            client,
            url: cfg.url.clone(),
            poll: cfg.poll.clone(),
            batch_max: cfg.batch_max,
            batch_wait: cfg.batch_wait,
            drop_refused: cfg.on_client_error == OnClientError::Drop,
            secrets,
            events: Some(events),
            ctx,
        })
    }

    /// Deliver uplinks, downlink events and polls until the cancel token fires. The three
    /// loops share this task (not spawned), so aborting the stream's task stops all of them.
    pub async fn run(mut self) {
        let events = self.events.take();
        tracing::info!(stream = %self.ctx.name, url = %redact_url(&self.url), batch_max = self.batch_max, backlog = self.ctx.queue.len(), "HTTP stream started");
        let mut uplinks = Uplinks(&self);
        let retry = Retry::new(Duration::from_millis(500), Duration::from_secs(60));
        tokio::join!(
            connect::run(&mut uplinks, &self.ctx, retry),
            self.events_loop(events),
            self.poll_loop()
        );
        self.ctx.metrics.stream_connected(&self.ctx.name, false);
    }

    // ---- uplinks ----

    /// One delivery session: batches from the queue (through the catch-up lanes, from its
    /// oldest record) until a failure or the stop.
    async fn deliver(&self) -> SessionEnd {
        let queue = &self.ctx.queue;
        let name = &self.ctx.name;
        let mut lanes = Lanes::new(queue);
        // Read from the queue, not yet acknowledged, in lanes order (each device in order).
        let mut pending: VecDeque<(u64, Record)> = VecDeque::new();
        let mut limit = self.batch_max;
        let mut delivered_once = false;
        loop {
            if self.ctx.cancel.is_cancelled() {
                return SessionEnd::Stopped;
            }
            if pending.is_empty() {
                limit = self.batch_max;
                if !self.fill(&mut lanes, &mut pending).await {
                    return SessionEnd::Stopped;
                }
            } else if pending.len() < limit {
                // A smaller batch after a 413: top it up with what arrived meanwhile.
                self.read(&mut lanes, &mut pending, limit);
            }
            let n = pending.len().min(limit);
            let mut batch: Vec<(u64, usize)> = pending
                .iter()
                .take(n)
                .enumerate()
                .map(|(i, (seq, _))| (*seq, i))
                .collect();
            batch.sort_unstable();
            let d = Delivery { now_us: now_us() };
            let mut bodies = Vec::with_capacity(n);
            let mut unformattable = Vec::new();
            for (seq, i) in batch {
                match render_or_drop(&self.ctx, seq, &pending[i].1, d) {
                    Some(b) => bodies.push(b),
                    None => unformattable.push(i),
                }
            }
            if !unformattable.is_empty() {
                // Already removed from the queue: forget them and make the batch again.
                unformattable.sort_unstable_by(|a, b| b.cmp(a));
                for i in unformattable {
                    pending.remove(i);
                }
                continue;
            }
            let req = self
                .client
                .post(self.url.clone())
                .header(CONTENT_TYPE, self.ctx.format.content_type())
                .header(KIND_HEADER, "uplinks")
                .body(self.ctx.format.batch(bodies));
            self.ctx.metrics.stream_published(name, n as u64);
            let Some(outcome) = self.exchange_or_stop(Purpose::Uplinks, req).await else {
                return SessionEnd::Stopped;
            };
            let (status, detail) = match outcome {
                Outcome::Delivered(body) => {
                    for (seq, _) in pending.drain(..n) {
                        if let Err(e) = queue.ack(seq) {
                            self.ctx.metrics.stream_error(name, "queue_ack");
                            tracing::error!(stream = %name, seq, error = %e, "cannot remove a delivered record from the queue; it will be sent again");
                        }
                    }
                    self.ctx.metrics.stream_connected(name, true);
                    if !delivered_once {
                        delivered_once = true;
                        tracing::info!(stream = %name, url = %redact_url(&self.url), "HTTP server accepts uplinks");
                    }
                    self.route_downlinks(&body, Purpose::Uplinks).await;
                    continue;
                }
                Outcome::TooLarge(detail) if n > 1 => {
                    limit = n.div_ceil(2);
                    tracing::warn!(stream = %name, records = n, retry_with = limit, %detail, "HTTP server: 413 Payload Too Large; sending smaller batches (lower batch_max to avoid this)");
                    continue;
                }
                Outcome::TooLarge(detail) => {
                    // One record alone is too large for the server: it never will be taken.
                    if let Some((seq, r)) = pending.pop_front() {
                        // The size of the body it was sent in (one record, as one batch).
                        let size = self
                            .ctx
                            .format
                            .body(&r, Delivery { now_us: now_us() })
                            .ok()
                            .flatten()
                            .map(|b| self.ctx.format.batch(vec![b]).len())
                            .unwrap_or(0);
                        crate::streams::too_large::drop_record(
                            &self.ctx,
                            seq,
                            &r,
                            size,
                            None,
                            &format!("the webhook (413: {detail})"),
                        );
                        self.ctx.metrics.stream_connected(name, true);
                    }
                    continue;
                }
                Outcome::Refused { status, detail } => (status, detail),
                Outcome::Retry { why, after } => {
                    return SessionEnd::Failed {
                        error: SessionError::Http(why),
                        retry_after: after,
                    }
                }
            };
            if !self.drop_refused {
                // Stuck until the server (or its credentials) is fixed: /health says so.
                return SessionEnd::failed(SessionError::HttpRefused { status, detail });
            }
            self.dead_letter(&mut pending, n, status, detail);
        }
    }

    /// A 4xx (other than 408/429) for the first `n` pending records, with
    /// `on_client_error = "drop"`: they leave the queue as dead letters.
    fn dead_letter(
        &self,
        pending: &mut VecDeque<(u64, Record)>,
        n: usize,
        status: u16,
        detail: String,
    ) {
        {
            // The server is there and answering; it only wants none of this batch.
            self.ctx.metrics.stream_connected(&self.ctx.name, true);
            let dropped: Vec<(u64, Record)> = pending.drain(..n).collect();
            let first = dropped
                .first()
                .map(|(_, r)| r.correlation_id())
                .unwrap_or_default();
            let last = dropped
                .last()
                .map(|(_, r)| r.correlation_id())
                .unwrap_or_default();
            for (seq, _) in &dropped {
                if let Err(e) = self
                    .ctx
                    .queue
                    .drop_undeliverable(*seq, DropReason::DeadLetter)
                {
                    self.ctx.metrics.stream_error(&self.ctx.name, "queue_ack");
                    tracing::error!(stream = %self.ctx.name, seq, error = %e, "cannot remove a refused record from the queue");
                }
            }
            self.ctx
                .metrics
                .stream_error(&self.ctx.name, "dead_letter_batch");
            // Data leaves the gateway here: every dropped batch gets its own line.
            tracing::warn!(stream = %self.ctx.name, status, server_said = %detail, records = n, first = %first, last = %last, "HTTP server refused a batch; dropped as dead letters (on_client_error = \"drop\")");
        }
    }

    /// Wait for records, then up to `batch_wait` for the batch to fill. False when stopped.
    async fn fill(&self, lanes: &mut Lanes, pending: &mut VecDeque<(u64, Record)>) -> bool {
        let queue = &self.ctx.queue;
        // While idle and not known to be reachable, probe the server now and then so that
        // /health tells an unreachable webhook from a quiet one.
        let mut probe_retry = Retry::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut next_probe =
            (!self.ctx.metrics.is_stream_connected(&self.ctx.name)).then(Instant::now);
        loop {
            self.read(lanes, pending, self.batch_max);
            if !pending.is_empty() {
                break;
            }
            let probe_at = next_probe.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = self.ctx.cancel.cancelled() => return false,
                _ = queue.appended() => {}
                _ = tokio::time::sleep_until(probe_at), if next_probe.is_some() => {
                    let req = self.client.head(self.url.clone());
                    let Some(outcome) = self.exchange_or_stop(Purpose::Probe, req).await else {
                        return false;
                    };
                    // Any answer but a 5xx/timeout/connection error shows the server is there
                    // (a webhook may well refuse HEAD).
                    let up = !matches!(outcome, Outcome::Retry { .. });
                    self.ctx.metrics.stream_connected(&self.ctx.name, up);
                    next_probe = if up {
                        None
                    } else {
                        Some(Instant::now() + probe_retry.failed(None).delay)
                    };
                    if let Outcome::Retry { why, .. } = outcome {
                        tracing::debug!(stream = %self.ctx.name, error = %why, "HTTP server not reachable (probe)");
                    }
                }
            }
        }
        if pending.len() < self.batch_max && !self.batch_wait.is_zero() {
            let deadline = Instant::now() + self.batch_wait;
            while pending.len() < self.batch_max {
                tokio::select! {
                    _ = self.ctx.cancel.cancelled() => return false,
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = queue.appended() => self.read(lanes, pending, self.batch_max),
                }
            }
        }
        true
    }

    /// Read up to `limit - pending.len()` more records.
    fn read(&self, lanes: &mut Lanes, pending: &mut VecDeque<(u64, Record)>, limit: usize) {
        lanes.top_up(&self.ctx, pending, limit);
    }
}

/// The uplink side of an HTTP stream, as a [`Session`] of [`connect::run`].
struct Uplinks<'a>(&'a HttpStream);

impl Session for Uplinks<'_> {
    const WHAT: &'static str = "HTTP delivery of uplinks";

    fn server(&self) -> String {
        redact_url(&self.0.url)
    }

    async fn session(&mut self) -> SessionEnd {
        self.0.deliver().await
    }
}
