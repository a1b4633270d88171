//! The HTTP webhook stream (`kind = "http"`): uplinks are POSTed as JSON arrays, a record leaves
//! the queue only when the server answered 2xx, and downlinks come back in response bodies (and
//! from an optional `poll_url`), so the gateway needs no inbound port.
//!
//! Guarantees (README "Stream to an HTTP webhook", docs/formats.md "HTTP webhook"):
//! - **At least once, in order.** One batch is in flight at a time. Batches are read from the
//!   queue through the catch-up lanes ([`super::lanes`]), so each device's records leave in
//!   order; within a batch records are in queue order. A batch is retried until the server
//!   answers 2xx (then every record is acknowledged with `queue.ack(seq)`), or, with
//!   `on_client_error = "drop"`, until it answers a 4xx other than 408/429 (then the records are
//!   removed as dead letters, counted). Copies sent twice (a timeout after the server had the
//!   batch, a stop mid-request) keep their `correlation_ids`.
//! - **Retries** follow [`Backoff`] (0.5 s to 60 s, full jitter) for 5xx, 408, 429, 3xx,
//!   connection errors and timeouts; a `Retry-After` (delay-seconds or HTTP-date, RFC 9110
//!   §10.2.3) makes the next attempt wait at least that long, capped at [`RETRY_AFTER_CAP`].
//!   A 413 halves the batch (down to one record) before it counts as a refusal.
//! - **Downlinks** in a 2xx body (of any POST) or a `poll_url` body —
//!   `{"downlinks": {"<device_id>": {"push": [...], "replace": [...]}}}` with the contract's
//!   downlink items — are handed to the scheduler exactly like MQTT `down/push`/`down/replace`
//!   (the scheduler checks the stream's scope), one device at a time, and stored before the
//!   next request of the same kind leaves. A bad body is logged and counted; the stream goes on.
//! - **Downlink events** of this stream are POSTed to `url` as JSON arrays with the header
//!   `X-Lorastream-Kind: downlink_events`, best effort: held in memory (at most
//!   [`MAX_EVENTS`], oldest dropped and counted), retried like uplinks, dropped on a 4xx.
//! - **Secrets.** Custom `headers` are marked sensitive and never logged; logged URLs lose their
//!   query and user info (function keys often live there); server error bodies are logged
//!   with any header value blanked out.
//! - **Stop.** On the cancel token no new request starts; a request in flight gets
//!   [`STOP_GRACE`] to finish (its records stay queued otherwise).

use super::backoff::Backoff;
use super::format::{record_json, Delivery};
use super::lanes::Lanes;
use super::session::FailureLog;
use super::{tls, StreamContext};
use crate::config::StreamConfig;
use crate::downlink::{json as downlink_json, Input as DownlinkInput};
use crate::model::{
    now_us, redact_url, redact_url_str, DownlinkEvent, DownlinkOp, DownlinkRequest, Record, Secret,
};
use crate::store::DropReason;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use serde::Deserialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Uplinks per POST when `batch_max` is not set (contract).
pub const DEFAULT_BATCH_MAX: usize = 100;
/// How long a short batch waits to fill when `batch_wait_ms` is not set.
pub const DEFAULT_BATCH_WAIT: Duration = Duration::from_millis(200);
/// Request timeout (connect + send + response body) when `timeout_s` is not set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// `poll_url` period when `poll_interval_s` is not set.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(30);
/// A `Retry-After` longer than this is shortened to it: an hour-long "come back later" should
/// not leave a gateway's queue unattended that long.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(300);
/// A request in flight when the daemon stops gets this long to finish (the daemon's whole stop
/// is bounded by `app::STOP_DEADLINE`).
pub const STOP_GRACE: Duration = Duration::from_secs(2);
/// Downlink events held in memory while the server is unreachable.
pub const MAX_EVENTS: usize = 1000;
/// Response bodies are read up to this size; a larger one is a bad body.
const MAX_BODY: usize = 1 << 20;
/// The header that tells uplink batches from downlink events (both go to `url`).
pub const KIND_HEADER: &str = "x-lorastream-kind";

/// What a request is for (the `purpose` label of `lorastream_http_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Uplinks,
    Events,
    Poll,
    Probe,
}

impl Purpose {
    fn as_str(self) -> &'static str {
        match self {
            Purpose::Uplinks => "uplinks",
            Purpose::Events => "events",
            Purpose::Poll => "poll",
            Purpose::Probe => "probe",
        }
    }
}

/// How an exchange ended.
#[derive(Debug)]
enum Outcome {
    /// 2xx, with the body (possibly carrying downlinks).
    Delivered(Vec<u8>),
    /// 413: the batch is too large for the server.
    TooLarge(String),
    /// A 4xx other than 408, 413 and 429: the server refuses this content.
    Refused { status: u16, detail: String },
    /// Worth retrying: 5xx, 408, 429, 3xx, no answer, timeout.
    Retry {
        why: String,
        after: Option<Duration>,
    },
}

pub struct HttpStream {
    ctx: StreamContext,
    name: String,
    client: reqwest::Client,
    url: reqwest::Url,
    poll_url: Option<reqwest::Url>,
    poll_every: Duration,
    batch_max: usize,
    batch_wait: Duration,
    drop_refused: bool,
    /// Header values, to blank them out of logged server text.
    secrets: Vec<Secret>,
    events: Option<mpsc::Receiver<DownlinkEvent>>,
}

impl HttpStream {
    pub fn new(
        cfg: &StreamConfig,
        ctx: StreamContext,
        events: mpsc::Receiver<DownlinkEvent>,
    ) -> Result<Self, String> {
        let parse = |key: &str, u: &str| {
            reqwest::Url::parse(u).map_err(|e| format!("{key} {:?}: {e}", redact_url_str(u)))
        };
        let url = parse("url", cfg.url.as_deref().unwrap_or_default())?;
        let poll_url = cfg
            .poll_url
            .as_deref()
            .map(|u| parse("poll_url", u))
            .transpose()?;

        let mut headers = HeaderMap::new();
        let mut secrets = Vec::new();
        for (k, v) in cfg.headers.iter().flatten() {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("headers: {k:?} is not a valid HTTP header name"))?;
            let mut value = HeaderValue::from_str(v.expose())
                .map_err(|_| format!("headers: the value of {k:?} is not a valid header value"))?;
            // Keeps the value out of reqwest's and hyper's Debug output.
            value.set_sensitive(true);
            headers.insert(name, value);
            if v.expose().len() >= 4 {
                secrets.push(v.clone());
            }
        }

        let https =
            url.scheme() == "https" || poll_url.as_ref().is_some_and(|u| u.scheme() == "https");
        let client_cert = cfg.cert_file.as_deref().zip(cfg.key_file.as_deref());
        let mut tls_cfg = if https || cfg.ca_file.is_some() || client_cert.is_some() {
            Arc::unwrap_or_clone(tls::client_config(
                cfg.ca_file.as_deref(),
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
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth()
        };
        tls_cfg.alpn_protocols = vec![b"http/1.1".to_vec()];

        let timeout = cfg
            .timeout_s
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TIMEOUT);
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls_cfg)
            .default_headers(headers)
            .user_agent(concat!("lorastream/", env!("CARGO_PKG_VERSION")))
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            // A redirected POST turns into a GET on most servers: report it instead.
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| format!("HTTP client: {}", error_chain(&e.without_url())))?;

        Ok(HttpStream {
            name: cfg.name.clone(),
            client,
            url,
            poll_url,
            poll_every: cfg
                .poll_interval_s
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_POLL_INTERVAL),
            batch_max: cfg.batch_max.unwrap_or(DEFAULT_BATCH_MAX).max(1),
            batch_wait: cfg
                .batch_wait_ms
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_BATCH_WAIT),
            drop_refused: cfg.on_client_error.as_deref() == Some("drop"),
            secrets,
            events: Some(events),
            ctx,
        })
    }

    /// Deliver uplinks, downlink events and polls until the cancel token fires. The three
    /// loops share this task (not spawned), so aborting the stream's task stops all of them.
    pub async fn run(mut self) {
        let events = self.events.take();
        tracing::info!(stream = %self.name, url = %redact_url(&self.url), batch_max = self.batch_max, backlog = self.ctx.queue.len(), "HTTP stream started");
        tokio::join!(self.uplinks(), self.events_loop(events), self.poll_loop());
        self.ctx.metrics.stream_connected(&self.name, false);
    }

    // ---- uplinks ----

    async fn uplinks(&self) {
        let queue = &self.ctx.queue;
        let mut lanes = Lanes::new(queue);
        // Read from the queue, not yet acknowledged, in lanes order (each device in order).
        let mut pending: VecDeque<(u64, Record)> = VecDeque::new();
        let mut limit = self.batch_max;
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
        let mut failures = FailureLog::default();
        // After an outage, re-split the queue into backlog and live lanes (as MQTT does on
        // reconnect), once nothing read is outstanding.
        let mut relane = false;
        loop {
            if self.ctx.cancel.is_cancelled() {
                return;
            }
            if pending.is_empty() {
                limit = self.batch_max;
                if relane {
                    lanes = Lanes::new(queue);
                    relane = false;
                }
                if !self.fill(&mut lanes, &mut pending).await {
                    return;
                }
            } else if pending.len() < limit {
                // Retrying: top the batch up with what arrived meanwhile.
                self.read(&mut lanes, &mut pending, limit);
            }
            let n = pending.len().min(limit);
            let mut batch: Vec<&(u64, Record)> = pending.iter().take(n).collect();
            batch.sort_by_key(|(seq, _)| *seq);
            let body = json_array(
                batch
                    .iter()
                    .map(|(_, r)| record_json(r, Delivery { now_us: now_us() })),
            );
            let req = self
                .client
                .post(self.url.clone())
                .header(CONTENT_TYPE, "application/json")
                .header(KIND_HEADER, "uplinks")
                .body(body);
            self.ctx.metrics.stream_published(&self.name, n as u64);
            let Some(outcome) = self.exchange_or_stop(Purpose::Uplinks, req).await else {
                return;
            };
            match outcome {
                Outcome::Delivered(body) => {
                    for (seq, _) in pending.drain(..n) {
                        if let Err(e) = queue.ack(seq) {
                            self.ctx.metrics.stream_error(&self.name, "queue_ack");
                            tracing::error!(stream = %self.name, seq, error = %e, "cannot remove a delivered record from the queue; it will be sent again");
                        }
                    }
                    self.ctx.metrics.stream_connected(&self.name, true);
                    if failures.count() > 0 {
                        tracing::info!(stream = %self.name, failures = failures.count(), "HTTP server accepts uplinks again");
                        relane = true;
                    }
                    failures.reset();
                    backoff.reset();
                    self.route_downlinks(&body, Purpose::Uplinks).await;
                    continue;
                }
                Outcome::TooLarge(detail) if n > 1 => {
                    limit = n.div_ceil(2);
                    tracing::warn!(stream = %self.name, records = n, retry_with = limit, %detail, "HTTP server: 413 Payload Too Large; sending smaller batches (lower batch_max to avoid this)");
                    continue;
                }
                Outcome::TooLarge(detail) => {
                    self.refused(&mut pending, n, 413, detail, &mut failures)
                }
                Outcome::Refused { status, detail } => {
                    self.refused(&mut pending, n, status, detail, &mut failures)
                }
                Outcome::Retry { why, after } => {
                    self.ctx.metrics.stream_connected(&self.name, false);
                    let (log, failures) = failures.failed();
                    let delay = backoff.next_delay().max(after.unwrap_or_default());
                    if log {
                        tracing::warn!(stream = %self.name, url = %redact_url(&self.url), error = %why, records = n, retry_in_ms = delay.as_millis() as u64, failures, "HTTP POST of uplinks failed; the batch stays queued");
                    }
                    if !self.sleep(delay).await {
                        return;
                    }
                    continue;
                }
            }
            // Refused in "retry" mode: back off like any failure.
            if !pending.is_empty() && !self.drop_refused {
                let delay = backoff.next_delay();
                if !self.sleep(delay).await {
                    return;
                }
            }
        }
    }

    /// A 4xx (other than 408/429) for the first `n` pending records.
    fn refused(
        &self,
        pending: &mut VecDeque<(u64, Record)>,
        n: usize,
        status: u16,
        detail: String,
        failures: &mut FailureLog,
    ) {
        if self.drop_refused {
            // The server is there and answering; it only wants none of this batch.
            self.ctx.metrics.stream_connected(&self.name, true);
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
                    self.ctx.metrics.stream_error(&self.name, "queue_ack");
                    tracing::error!(stream = %self.name, seq, error = %e, "cannot remove a refused record from the queue");
                }
            }
            self.ctx
                .metrics
                .stream_error(&self.name, "dead_letter_batch");
            // Data leaves the gateway here: every dropped batch gets its own line.
            tracing::warn!(stream = %self.name, status, server_said = %detail, records = n, first = %first, last = %last, "HTTP server refused a batch; dropped as dead letters (on_client_error = \"drop\")");
            failures.reset();
        } else {
            // Stuck until the server (or its credentials) is fixed: /health says so.
            self.ctx.metrics.stream_connected(&self.name, false);
            let (log, failures) = failures.failed();
            if log {
                tracing::warn!(stream = %self.name, status, server_said = %detail, records = n, failures, "HTTP server refused a batch; it stays queued and is retried (on_client_error = \"retry\"); fix the server or its credentials, or set on_client_error = \"drop\"");
            }
        }
    }

    /// Wait for records, then up to `batch_wait` for the batch to fill. False when stopped.
    async fn fill(&self, lanes: &mut Lanes, pending: &mut VecDeque<(u64, Record)>) -> bool {
        let queue = &self.ctx.queue;
        // While idle and not known to be reachable, probe the server now and then so that
        // /health tells an unreachable webhook from a quiet one.
        let mut probe_backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut next_probe = (!self.ctx.metrics.is_stream_connected(&self.name)).then(Instant::now);
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
                    self.ctx.metrics.stream_connected(&self.name, up);
                    next_probe = if up {
                        None
                    } else {
                        Some(Instant::now() + probe_backoff.next_delay())
                    };
                    if let Outcome::Retry { why, .. } = outcome {
                        tracing::debug!(stream = %self.name, error = %why, "HTTP server not reachable (probe)");
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
        let room = limit.saturating_sub(pending.len());
        if room == 0 {
            return;
        }
        match lanes.next(&self.ctx.queue, room) {
            Ok(v) => pending.extend(v),
            Err(e) => {
                // Corrupt records are removed by the queue itself; this is an I/O error. The
                // next wake-up (append, retry) reads again.
                self.ctx.metrics.stream_error(&self.name, "queue_read");
                tracing::error!(stream = %self.name, error = %e, "cannot read the queue");
            }
        }
    }

    // ---- downlink events ----

    async fn events_loop(&self, rx: Option<mpsc::Receiver<DownlinkEvent>>) {
        let Some(mut rx) = rx else { return };
        let mut buf: VecDeque<Vec<u8>> = VecDeque::new();
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
        let mut retry_at: Option<Instant> = None;
        let mut failures = FailureLog::default();
        let mut open = true;
        loop {
            // With nothing held, or a retry pending, wait for an event, the retry time or the
            // stop. (Events that arrived while the last batch was in flight go out at once.)
            let stopping = if buf.is_empty() || retry_at.is_some() {
                tokio::select! {
                    _ = self.ctx.cancel.cancelled() => true,
                    e = rx.recv(), if open => {
                        match e {
                            Some(e) => self.hold_event(&mut buf, e),
                            None => open = false,
                        }
                        false
                    }
                    _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                        retry_at = None;
                        false
                    }
                }
            } else {
                self.ctx.cancel.is_cancelled()
            };
            while let Ok(e) = rx.try_recv() {
                self.hold_event(&mut buf, e);
            }
            if stopping {
                // One last try for what is held, within the stop grace.
                if !buf.is_empty() {
                    let n = buf.len().min(self.batch_max);
                    let batch: Vec<Vec<u8>> = buf.drain(..n).collect();
                    let req = self.events_request(&batch);
                    let out =
                        tokio::time::timeout(STOP_GRACE, self.exchange(Purpose::Events, req)).await;
                    if !matches!(out, Ok(Outcome::Delivered(_))) || !buf.is_empty() {
                        tracing::info!(stream = %self.name, events = n + buf.len(), "downlink events not delivered before stop");
                    }
                }
                return;
            }
            if buf.is_empty() || retry_at.is_some() {
                continue;
            }
            // The batch leaves `buf` while in flight, so that events arriving meanwhile (taken
            // at once, so the scheduler's channel never fills) cannot be confused with it.
            let n = buf.len().min(self.batch_max);
            let batch: Vec<Vec<u8>> = buf.drain(..n).collect();
            let fut = self.exchange_or_stop(Purpose::Events, self.events_request(&batch));
            tokio::pin!(fut);
            let outcome = loop {
                tokio::select! {
                    o = &mut fut => break o,
                    e = rx.recv(), if open => match e {
                        Some(e) => self.hold_event(&mut buf, e),
                        None => open = false,
                    },
                }
            };
            let Some(outcome) = outcome else { return };
            match outcome {
                Outcome::Delivered(body) => {
                    backoff.reset();
                    failures.reset();
                    self.ctx.metrics.stream_connected(&self.name, true);
                    self.route_downlinks(&body, Purpose::Events).await;
                }
                Outcome::TooLarge(detail) | Outcome::Refused { detail, .. } => {
                    // Events are not stored: a refusal drops them rather than blocking those
                    // that follow.
                    for _ in 0..n {
                        self.ctx.metrics.stream_error(&self.name, "events_refused");
                    }
                    tracing::warn!(stream = %self.name, events = n, server_said = %detail, "HTTP server refused downlink events; dropped");
                }
                Outcome::Retry { why, after } => {
                    for e in batch.into_iter().rev() {
                        buf.push_front(e);
                    }
                    while buf.len() > MAX_EVENTS {
                        buf.pop_front();
                        self.ctx.metrics.downlink_event("event_dropped");
                        self.ctx.metrics.stream_error(&self.name, "events_dropped");
                    }
                    let (log, _) = failures.failed();
                    let delay = backoff.next_delay().max(after.unwrap_or_default());
                    retry_at = Some(Instant::now() + delay);
                    if log {
                        tracing::warn!(stream = %self.name, error = %why, events = buf.len(), retry_in_ms = delay.as_millis() as u64, "HTTP POST of downlink events failed; held in memory");
                    }
                }
            }
        }
    }

    fn hold_event(&self, buf: &mut VecDeque<Vec<u8>>, e: DownlinkEvent) {
        tracing::debug!(stream = %self.name, device = %e.device, event = e.kind.as_str(), "downlink event");
        if buf.len() >= MAX_EVENTS {
            buf.pop_front();
            self.ctx.metrics.downlink_event("event_dropped");
            self.ctx.metrics.stream_error(&self.name, "events_dropped");
        }
        buf.push_back(downlink_json::event_json(&e));
    }

    fn events_request(&self, batch: &[Vec<u8>]) -> reqwest::RequestBuilder {
        self.client
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(KIND_HEADER, "downlink_events")
            .body(json_array(batch.iter().cloned()))
    }

    // ---- poll_url ----

    async fn poll_loop(&self) {
        let Some(url) = &self.poll_url else { return };
        let mut failures = FailureLog::default();
        loop {
            let req = self
                .client
                .get(url.clone())
                .header("accept", "application/json");
            let Some(outcome) = self.exchange_or_stop(Purpose::Poll, req).await else {
                return;
            };
            let mut wait = self.poll_every;
            match outcome {
                Outcome::Delivered(body) => {
                    failures.reset();
                    self.route_downlinks(&body, Purpose::Poll).await;
                }
                Outcome::Retry { why, after } => {
                    let (log, failures) = failures.failed();
                    wait = wait.max(after.unwrap_or_default());
                    if log {
                        tracing::warn!(stream = %self.name, poll_url = %redact_url(url), error = %why, failures, "downlink poll failed");
                    }
                }
                Outcome::TooLarge(detail) | Outcome::Refused { detail, .. } => {
                    let (log, failures) = failures.failed();
                    if log {
                        tracing::warn!(stream = %self.name, poll_url = %redact_url(url), server_said = %detail, failures, "downlink poll refused");
                    }
                }
            }
            if !self.sleep(wait).await {
                return;
            }
        }
    }

    // ---- downlinks from response bodies ----

    /// Route the downlinks a 2xx body carries. POST answers often carry other things ("OK",
    /// `{"status":"ok"}`): only JSON with a `downlinks` member is taken. A `poll_url` answer
    /// must be JSON (or empty).
    async fn route_downlinks(&self, body: &[u8], from: Purpose) {
        let text = body.trim_ascii();
        if text.is_empty() {
            return;
        }
        let strict = from == Purpose::Poll;
        let requests = match parse_downlinks(text, &self.name) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) if !strict && !text.starts_with(b"{") => {
                tracing::debug!(stream = %self.name, error = %e, "response body is not JSON; no downlinks in it");
                return;
            }
            Err(e) => {
                self.ctx
                    .metrics
                    .stream_error(&self.name, "bad_downlink_body");
                tracing::warn!(stream = %self.name, from = from.as_str(), error = %e, "HTTP body with downlinks refused; see docs/formats.md \"HTTP webhook\"");
                return;
            }
        };
        let Some(tx) = &self.ctx.downlinks else {
            self.ctx
                .metrics
                .stream_error(&self.name, "downlinks_disabled");
            tracing::warn!(stream = %self.name, devices = requests.len(), "HTTP body carries downlinks but this stream has downlinks = false; ignored");
            return;
        };
        for req in requests {
            if req.items.is_err() {
                self.ctx.metrics.stream_error(&self.name, "bad_downlink");
            }
            let (done, stored) = tokio::sync::oneshot::channel();
            if tx
                .send(DownlinkInput::Request(req, Some(done)))
                .await
                .is_err()
            {
                return;
            }
            // Stored (or refused with a `failed` event) before the next request goes out.
            let _ = stored.await;
        }
    }

    // ---- HTTP plumbing ----

    /// [`Self::exchange`], giving up (None) when the stream is stopped and the request is not
    /// done within [`STOP_GRACE`].
    async fn exchange_or_stop(
        &self,
        purpose: Purpose,
        req: reqwest::RequestBuilder,
    ) -> Option<Outcome> {
        let fut = self.exchange(purpose, req);
        tokio::pin!(fut);
        tokio::select! {
            o = &mut fut => Some(o),
            _ = self.ctx.cancel.cancelled() => tokio::time::timeout(STOP_GRACE, fut).await.ok(),
        }
    }

    /// Send a request, read the answer, classify it, count it.
    async fn exchange(&self, purpose: Purpose, req: reqwest::RequestBuilder) -> Outcome {
        let metrics = &self.ctx.metrics;
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                let class = if e.is_timeout() { "timeout" } else { "error" };
                metrics.http_request(&self.name, purpose.as_str(), class);
                return Outcome::Retry {
                    why: error_chain(&e.without_url()),
                    after: None,
                };
            }
        };
        let status = resp.status();
        let class = match status.as_u16() {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "other",
        };
        metrics.http_request(&self.name, purpose.as_str(), class);
        let after = retry_after(resp.headers(), SystemTime::now());
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(redact_url_str);
        let (body, complete) =
            read_body(resp, if status.is_success() { MAX_BODY } else { 2048 }).await;
        if status.is_success() {
            if !complete {
                // Delivered all the same: the server said 2xx.
                self.ctx
                    .metrics
                    .stream_error(&self.name, "bad_downlink_body");
                tracing::warn!(stream = %self.name, max_bytes = MAX_BODY, "response body too large or cut short; downlinks in it ignored");
                return Outcome::Delivered(Vec::new());
            }
            return Outcome::Delivered(body);
        }
        let detail = format!("{status}: {}", self.snippet(&body));
        match status.as_u16() {
            413 => Outcome::TooLarge(detail),
            408 | 429 => Outcome::Retry { why: detail, after },
            400..=499 => Outcome::Refused {
                status: status.as_u16(),
                detail,
            },
            300..=399 => Outcome::Retry {
                why: format!(
                    "{status}: redirected to {}; set url to the final address",
                    location.as_deref().unwrap_or("?")
                ),
                after,
            },
            _ => Outcome::Retry { why: detail, after },
        }
    }

    /// Up to 200 characters of a server's text for a log line, with header values blanked.
    fn snippet(&self, body: &[u8]) -> String {
        let mut s: String = String::from_utf8_lossy(body)
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(200)
            .collect();
        for secret in &self.secrets {
            s = s.replace(secret.expose(), "***");
        }
        s.trim().to_string()
    }

    /// Sleep unless stopped first. False when stopped.
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.ctx.cancel.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

/// Read a body up to `max` bytes; false when it was longer or broke off.
async fn read_body(mut resp: reqwest::Response, max: usize) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if body.len() + c.len() > max {
                    let take = max.saturating_sub(body.len());
                    body.extend_from_slice(&c[..take]);
                    return (body, false);
                }
                body.extend_from_slice(&c);
            }
            Ok(None) => return (body, true),
            Err(_) => return (body, false),
        }
    }
}

/// `[doc,doc,...]` from already serialized JSON documents.
fn json_array(docs: impl Iterator<Item = Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::with_capacity(4096);
    out.push(b'[');
    for (i, d) in docs.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&d);
    }
    out.push(b']');
    out
}

/// `Retry-After` as a delay from `now`: delay-seconds or an HTTP-date (RFC 9110 §10.2.3),
/// capped at [`RETRY_AFTER_CAP`]. A date in the past means "now".
fn retry_after(h: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let v = h.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let d = match v.parse::<u64>() {
        Ok(s) => Duration::from_secs(s),
        Err(_) => httpdate::parse_http_date(v)
            .ok()?
            .duration_since(now)
            .unwrap_or_default(),
    };
    Some(d.min(RETRY_AFTER_CAP))
}

/// An error with its causes ("error sending request: client error (Connect): tcp connect
/// error: Connection refused (os error 111)").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

/// One device's entry: `{"push": [items], "replace": [items]}` (at least one of them).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceOps {
    #[serde(default)]
    replace: Option<Box<serde_json::value::RawValue>>,
    #[serde(default)]
    push: Option<Box<serde_json::value::RawValue>>,
}

/// Parse a body for downlinks: `Ok(None)` when it is JSON without a `downlinks` member (or
/// `null`), `Err` when it is not JSON or `downlinks` has the wrong shape. Per-device problems
/// (unknown keys, bad items) become requests whose items are the error, so the scheduler sends
/// the device's `downlink_failed` event with the reason, as for MQTT.
fn parse_downlinks(body: &[u8], stream: &str) -> Result<Option<Vec<DownlinkRequest>>, String> {
    let doc: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let downlinks = match &doc {
        serde_json::Value::Object(m) => match m.get("downlinks") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(d) => d,
        },
        _ => return Err("expected a JSON object with a \"downlinks\" member".into()),
    };
    let serde_json::Value::Object(devices) = downlinks else {
        return Err("\"downlinks\" must be an object keyed by device id, e.g. {\"downlinks\": {\"soil-1\": {\"push\": [{\"f_port\": 1, \"frm_payload\": \"AQ==\"}]}}}".into());
    };
    // Parse each device on its own: one bad entry does not spoil the others.
    let devices: BTreeMap<&String, &serde_json::Value> = devices.iter().collect();
    let mut out = Vec::new();
    for (device, v) in devices {
        let request = |op, items| DownlinkRequest {
            stream: stream.to_string(),
            // Device ids are unique: the scheduler takes the device's own application.
            application: String::new(),
            device: device.clone(),
            op,
            items,
        };
        let ops: DeviceOps = match serde_json::from_value::<DeviceOps>(v.clone()) {
            Ok(o) if o.push.is_some() || o.replace.is_some() => o,
            Ok(_) => {
                out.push(request(
                    DownlinkOp::Push,
                    Err(format!(
                        "downlinks.{device}: expected \"push\" or \"replace\" with a list of downlinks"
                    )),
                ));
                continue;
            }
            Err(e) => {
                out.push(request(
                    DownlinkOp::Push,
                    Err(format!("downlinks.{device}: {e}")),
                ));
                continue;
            }
        };
        // "replace" first, so that both together mean "this queue, then these".
        for (op, raw) in [
            (DownlinkOp::Replace, ops.replace),
            (DownlinkOp::Push, ops.push),
        ] {
            let Some(raw) = raw else { continue };
            let contract = format!("{{\"downlinks\":{}}}", raw.get());
            out.push(request(
                op,
                downlink_json::parse_request(contract.as_bytes(), stream),
            ));
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_http_date_capped() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
            retry_after(&m, now)
        };
        assert_eq!(h("3"), Some(Duration::from_secs(3)));
        assert_eq!(h(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(h("86400"), Some(RETRY_AFTER_CAP));
        assert_eq!(
            h("Sun, 06 Nov 1994 08:49:47 GMT"),
            Some(Duration::from_secs(10))
        );
        assert_eq!(h("Sun, 06 Nov 1994 08:49:00 GMT"), Some(Duration::ZERO));
        assert_eq!(h("soon"), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn downlink_bodies() {
        let ok = parse_downlinks(
            br#"{"status":"ok","downlinks":{"b":{"push":[{"f_port":2,"frm_payload":"AQI="}]},"a":{"replace":[{"f_port":1}],"push":[{"f_port":3}]}}}"#,
            "hook",
        )
        .unwrap()
        .unwrap();
        let summary: Vec<(&str, DownlinkOp, usize)> = ok
            .iter()
            .map(|r| (r.device.as_str(), r.op, r.items.as_ref().unwrap().len()))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("a", DownlinkOp::Replace, 1),
                ("a", DownlinkOp::Push, 1),
                ("b", DownlinkOp::Push, 1)
            ]
        );
        assert_eq!(ok[2].items.as_ref().unwrap()[0].payload, vec![1, 2]);
        assert_eq!(ok[2].items.as_ref().unwrap()[0].stream, "hook");
        assert!(ok.iter().all(|r| r.application.is_empty()));

        // No downlinks: nothing to do, not an error.
        assert!(parse_downlinks(b"{}", "s").unwrap().is_none());
        assert!(parse_downlinks(br#"{"downlinks":null}"#, "s")
            .unwrap()
            .is_none());
        // Wrong shapes are errors of the whole body.
        assert!(parse_downlinks(b"OK", "s")
            .unwrap_err()
            .contains("not JSON"));
        assert!(parse_downlinks(b"[1]", "s").is_err());
        assert!(parse_downlinks(br#"{"downlinks":[{"f_port":1}]}"#, "s")
            .unwrap_err()
            .contains("keyed by device id"));
        // Per-device problems travel to the scheduler as failed requests (→ downlink_failed).
        let bad = parse_downlinks(
            br#"{"downlinks":{"x":{"pus":[]},"y":{},"z":{"push":[{"f_port":0}]},"w":{"push":[{"f_port":1,"frm_payload":"%%"}]}}}"#,
            "s",
        )
        .unwrap()
        .unwrap();
        let errs: Vec<String> = bad.iter().map(|r| r.items.clone().unwrap_err()).collect();
        assert!(errs[0].contains("not base64"), "{errs:?}"); // w
        assert!(errs[1].contains("unknown field `pus`"), "{errs:?}"); // x
        assert!(errs[2].contains("\"push\" or \"replace\""), "{errs:?}"); // y
        assert!(errs[3].contains("f_port 0"), "{errs:?}"); // z
    }

    #[test]
    fn arrays_of_documents() {
        assert_eq!(json_array(std::iter::empty()), b"[]");
        assert_eq!(
            json_array([b"{}".to_vec(), b"{\"a\":1}".to_vec()].into_iter()),
            b"[{},{\"a\":1}]"
        );
    }
}
