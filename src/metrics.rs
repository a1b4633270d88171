//! Counters and the `/metrics` (Prometheus text) and `/health` (JSON) endpoint.
//!
//! Every stage gets a clone of [`Metrics`] and counts what it does, in particular everything it
//! refuses (bad datagrams, MIC failures, replays, drops), so an operator can tell "nothing came
//! in" from "everything was rejected". Values that live elsewhere (queue depths, gateway list)
//! are filled in at scrape time by the `snapshot` closure that `app` passes to [`serve`].

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type Labels = Vec<(&'static str, String)>;

/// All counters of one daemon instance (no globals: two daemons in one test process each have
/// their own).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    udp_datagrams: Family<Labels, Counter>,
    udp_errors: Family<Labels, Counter>,
    frames: Family<Labels, Counter>,
    uplinks: Family<Labels, Counter>,
    store_errors: Counter,
    downlinks: Family<Labels, Counter>,
    stream_connected: Family<Labels, Gauge>,
    stream_published: Family<Labels, Counter>,
    stream_errors: Family<Labels, Counter>,
    http_requests: Family<Labels, Counter>,
    stream_connections: Family<Labels, Gauge>,
    queue_depth: Family<Labels, Gauge>,
    queue_bytes: Family<Labels, Gauge>,
    queue_oldest: Family<Labels, Gauge<f64, AtomicU64>>,
    queue_delivered: Family<Labels, Gauge>,
    queue_dropped: Family<Labels, Gauge>,
    gateways: Gauge,
    store_writable: Gauge,
    store_unsaved_bytes: Gauge,
    store_write_failures: Gauge,
    /// Uplink arrival → PULL_RESP sent, microseconds: last and maximum since start.
    sched_last_us: Gauge,
    sched_max_us: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("lorastream");
        macro_rules! reg {
            ($name:literal, $help:literal, $m:expr) => {{
                let m = $m;
                r.register($name, $help, m.clone());
                m
            }};
        }
        let inner = Inner {
            udp_datagrams: reg!(
                "udp_datagrams",
                "Datagrams received from packet forwarders, by type",
                Family::default()
            ),
            udp_errors: reg!(
                "udp_errors",
                "Datagrams or rxpk entries rejected, by reason",
                Family::default()
            ),
            frames: reg!(
                "frames",
                "Radio frames received (each reception), by result",
                Family::default()
            ),
            uplinks: reg!(
                "uplinks",
                "Deduplicated uplinks, by result (accepted, mic_failed, replay, ...)",
                Family::default()
            ),
            store_errors: reg!(
                "store_errors",
                "Appends that did not reach the disk (disk full, I/O error): queued in memory only",
                Counter::default()
            ),
            downlinks: reg!(
                "downlinks",
                "Downlink events and scheduler outcomes, by kind",
                Family::default()
            ),
            stream_connected: reg!(
                "stream_connected",
                "1 when the stream's destination is connected",
                Family::default()
            ),
            stream_published: reg!(
                "stream_published",
                "Messages sent to the destination (acked or not)",
                Family::default()
            ),
            stream_errors: reg!(
                "stream_errors",
                "Problems a stream met and went on from, by stream and reason",
                Family::default()
            ),
            http_requests: reg!(
                "http_requests",
                "Requests of HTTP streams, by stream, purpose (uplinks, events, poll, probe) and result (2xx, 3xx, 4xx, 5xx, timeout, error)",
                Family::default()
            ),
            stream_connections: reg!(
                "stream_connections",
                "Open connections of streams that hold several (Azure IoT Hub, identity = device)",
                Family::default()
            ),
            queue_depth: reg!(
                "queue_depth",
                "Records waiting in the stream's queue",
                Family::default()
            ),
            queue_bytes: reg!(
                "queue_bytes",
                "Bytes waiting in the stream's queue",
                Family::default()
            ),
            queue_oldest: reg!(
                "queue_oldest_age_seconds",
                "Age of the oldest queued record",
                Family::default()
            ),
            queue_delivered: reg!(
                "queue_delivered",
                "Records acknowledged by the destination since start",
                Family::default()
            ),
            queue_dropped: reg!(
                "queue_dropped",
                "Records dropped from the queue since start, by reason",
                Family::default()
            ),
            gateways: reg!("gateways", "Packet forwarders seen", Gauge::default()),
            store_writable: reg!("store_writable", "1 while the store's disk takes writes; 0 while commits fail (disk full, I/O error)", Gauge::default()),
            store_unsaved_bytes: reg!("store_unsaved_bytes", "Queued bytes not yet checkpointed into the storage engine (journaled, or in memory only while the disk refuses writes)", Gauge::default()),
            store_write_failures: reg!("store_write_failures", "Failed store writes (commits, journal writes, engine reopens) since start", Gauge::default()),
            sched_last_us: reg!("downlink_schedule_latency_last_us", "Uplink arrival to PULL_RESP sent (class A), last, microseconds (includes the dedup window)", Gauge::default()),
            sched_max_us: reg!("downlink_schedule_latency_max_us", "Uplink arrival to PULL_RESP sent (class A), maximum since start, microseconds", Gauge::default()),
            registry: r,
        };
        Metrics {
            inner: Arc::new(inner),
        }
    }

    pub fn udp_datagram(&self, kind: &'static str) {
        self.inner
            .udp_datagrams
            .get_or_create(&vec![("type", kind.into())])
            .inc();
    }
    pub fn udp_error(&self, reason: &'static str) {
        self.inner
            .udp_errors
            .get_or_create(&vec![("reason", reason.into())])
            .inc();
    }
    pub fn frame(&self, result: &'static str) {
        self.inner
            .frames
            .get_or_create(&vec![("result", result.into())])
            .inc();
    }
    pub fn uplink(&self, result: &'static str) {
        self.inner
            .uplinks
            .get_or_create(&vec![("result", result.into())])
            .inc();
    }
    /// Current count of an uplink result (for `/health`, tests and the demo).
    pub fn uplinks(&self, result: &'static str) -> u64 {
        self.inner
            .uplinks
            .get_or_create(&vec![("result", result.into())])
            .get()
    }
    pub fn downlink_event(&self, kind: &'static str) {
        self.inner
            .downlinks
            .get_or_create(&vec![("kind", kind.into())])
            .inc();
    }
    pub fn downlinks(&self, kind: &'static str) -> u64 {
        self.inner
            .downlinks
            .get_or_create(&vec![("kind", kind.into())])
            .get()
    }
    pub fn store_error(&self) {
        self.inner.store_errors.inc();
    }
    pub fn stream_connected(&self, stream: &str, up: bool) {
        self.inner
            .stream_connected
            .get_or_create(&vec![("stream", stream.into())])
            .set(i64::from(up));
    }
    pub fn is_stream_connected(&self, stream: &str) -> bool {
        self.inner
            .stream_connected
            .get_or_create(&vec![("stream", stream.into())])
            .get()
            == 1
    }
    pub fn stream_published(&self, stream: &str, n: u64) {
        self.inner
            .stream_published
            .get_or_create(&vec![("stream", stream.into())])
            .inc_by(n);
    }
    pub fn stream_error(&self, stream: &str, reason: &'static str) {
        self.inner
            .stream_errors
            .get_or_create(&vec![("stream", stream.into()), ("reason", reason.into())])
            .inc();
    }
    pub fn stream_errors(&self, stream: &str, reason: &'static str) -> u64 {
        self.inner
            .stream_errors
            .get_or_create(&vec![("stream", stream.into()), ("reason", reason.into())])
            .get()
    }
    /// One HTTP exchange: `purpose` is uplinks, events, poll or probe; `result` a status class
    /// (`2xx` ...), `timeout` or `error` (no answer: refused, reset, TLS, DNS).
    pub fn http_request(&self, stream: &str, purpose: &'static str, result: &'static str) {
        self.inner
            .http_requests
            .get_or_create(&Self::http_labels(stream, purpose, result))
            .inc();
    }
    pub fn http_requests(&self, stream: &str, purpose: &'static str, result: &'static str) -> u64 {
        self.inner
            .http_requests
            .get_or_create(&Self::http_labels(stream, purpose, result))
            .get()
    }
    fn http_labels(stream: &str, purpose: &'static str, result: &'static str) -> Labels {
        vec![
            ("stream", stream.into()),
            ("purpose", purpose.into()),
            ("result", result.into()),
        ]
    }

    /// Open connections of a stream that holds several (one per device identity).
    pub fn set_stream_connections(&self, stream: &str, n: usize) {
        self.inner
            .stream_connections
            .get_or_create(&vec![("stream", stream.into())])
            .set(n as i64);
    }
    /// Open connections, for streams that report them (None for single-connection streams).
    pub fn stream_connections(&self, stream: &str) -> Option<i64> {
        self.inner
            .stream_connections
            .get(&vec![("stream", stream.into())])
            .map(|g| g.get())
    }

    /// Fill the scrape-time gauges of one queue.
    pub fn set_queue(&self, s: &crate::store::QueueStats) {
        let l = vec![("stream", s.stream.clone())];
        self.inner.queue_depth.get_or_create(&l).set(s.depth as i64);
        self.inner.queue_bytes.get_or_create(&l).set(s.bytes as i64);
        self.inner
            .queue_oldest
            .get_or_create(&l)
            .set(s.oldest_age_s);
        self.inner
            .queue_delivered
            .get_or_create(&l)
            .set(s.delivered as i64);
        for (reason, n) in &s.dropped {
            self.inner
                .queue_dropped
                .get_or_create(&vec![
                    ("stream", s.stream.clone()),
                    ("reason", (*reason).into()),
                ])
                .set(*n as i64);
        }
    }

    /// Fill the scrape-time gauges of the store's disk side.
    pub fn set_store(&self, h: &crate::store::StoreHealth) {
        self.inner.store_writable.set(i64::from(h.writable));
        self.inner
            .store_unsaved_bytes
            .set(h.unsaved_bytes.min(i64::MAX as u64) as i64);
        self.inner
            .store_write_failures
            .set(h.write_failures.min(i64::MAX as u64) as i64);
    }

    /// Record the time from an uplink's arrival to its answer's PULL_RESP.
    pub fn observe_schedule_latency(&self, d: std::time::Duration) {
        let us = d.as_micros().min(i64::MAX as u128) as i64;
        self.inner.sched_last_us.set(us);
        if us > self.inner.sched_max_us.get() {
            self.inner.sched_max_us.set(us);
        }
    }

    /// (last, max) scheduling latency in microseconds.
    pub fn schedule_latency_us(&self) -> (i64, i64) {
        (
            self.inner.sched_last_us.get(),
            self.inner.sched_max_us.get(),
        )
    }

    pub fn set_gateways(&self, n: usize) {
        self.inner.gateways.set(n as i64);
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        if encode(&mut s, &self.inner.registry).is_err() {
            s.clear();
        }
        s
    }
}

/// Serve `/metrics` and `/health` until `cancel`. `snapshot` refreshes scrape-time gauges and
/// returns the `/health` document.
pub async fn serve<F>(
    listener: TcpListener,
    metrics: Metrics,
    snapshot: F,
    cancel: CancellationToken,
) where
    F: Fn() -> serde_json::Value + Send + Sync + 'static,
{
    let snapshot = Arc::new(snapshot);
    loop {
        let (mut sock, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let snapshot = snapshot.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            // Read the request head (bounded in size and time); the body, if any, is ignored.
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while n < buf.len() {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let (status, ctype, body) = match path {
                "/metrics" => {
                    let _ = snapshot();
                    (
                        "200 OK",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        metrics.encode(),
                    )
                }
                "/health" => ("200 OK", "application/json", snapshot().to_string()),
                _ => (
                    "404 Not Found",
                    "text/plain",
                    "try /metrics or /health\n".to_string(),
                ),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_show_in_text() {
        let m = Metrics::new();
        m.uplink("replay");
        m.uplink("replay");
        m.udp_error("bad_json");
        let t = m.encode();
        assert!(
            t.contains("lorastream_uplinks_total{result=\"replay\"} 2"),
            "{t}"
        );
        assert!(
            t.contains("lorastream_udp_errors_total{reason=\"bad_json\"} 1"),
            "{t}"
        );
        assert_eq!(m.uplinks("replay"), 2);
    }
}
