//! Counters and the `/metrics` (Prometheus text) and `/health` (JSON) endpoint, which also
//! serves the status page (`/` and `/api/status`, made by `crate::web`).
//!
//! Every stage gets a clone of [`Metrics`] and counts what it does, in particular everything it
//! refuses (bad datagrams, MIC failures, replays, drops), so an operator can tell "nothing came
//! in" from "everything was rejected". Values that live elsewhere (queue depths, the forwarder
//! table, the store's disk) are read at scrape time: the daemon gives [`Metrics::set_snapshot`]
//! a function returning a [`Snapshot`], and a collector encodes it. A scrape changes nothing.

use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type Labels = Vec<(&'static str, String)>;

/// Buckets of the class A scheduling latency, seconds: RX1 opens 1 s after the uplink (the
/// dedup window is in it), so what matters is well below and near 1 s.
const SCHEDULE_BUCKETS: [f64; 11] = [0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 0.9, 1.0, 2.0, 5.0];

/// Buckets of a store commit (fsync included), seconds: an SD card takes 5-500 ms.
pub const COMMIT_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// The counters of a one-label family found again without building a label set: the uplink
/// path counts several times per uplink, and `Family::get_or_create` allocates the label set,
/// hashes it and takes the family's lock each time (issue 16). The counters are the family's
/// own (a `Counter` clone shares its value), so `/metrics` shows the same numbers.
struct Hot {
    label: &'static str,
    seen: RwLock<Vec<(String, Counter)>>,
}

/// Label values a [`Hot`] remembers at most (the rest go through the family every time).
const HOT_MAX: usize = 64;

impl Hot {
    fn new(label: &'static str) -> Hot {
        Hot {
            label,
            seen: RwLock::new(Vec::new()),
        }
    }

    fn inc_by(&self, family: &Family<Labels, Counter>, value: &str, n: u64) {
        if let Ok(seen) = self.seen.read() {
            if let Some((_, c)) = seen.iter().find(|(v, _)| v == value) {
                c.inc_by(n);
                return;
            }
        }
        let c = family
            .get_or_create(&vec![(self.label, value.to_string())])
            .clone();
        c.inc_by(n);
        if let Ok(mut seen) = self.seen.write() {
            if seen.len() < HOT_MAX && !seen.iter().any(|(v, _)| v == value) {
                seen.push((value.to_string(), c));
            }
        }
    }
}

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
    mac_events: Family<Labels, Counter>,
    stream_connected: Family<Labels, Gauge>,
    stream_published: Family<Labels, Counter>,
    stream_errors: Family<Labels, Counter>,
    stream_rate_limited: Family<Labels, Counter>,
    http_requests: Family<Labels, Counter>,
    stream_connections: Family<Labels, Gauge>,
    radio_defects: Family<Labels, Counter>,
    gateway_address_changes: Counter,
    metrics_connections_refused: Counter,
    uplinks_without_stream: Counter,
    remote_commands: Family<Labels, Counter>,
    /// IoT Hub device-stream tunnels: requests by result, and open now.
    tunnels: Family<Labels, Counter>,
    tunnels_open: Family<Labels, Gauge>,
    downlinks_too_large: Family<Labels, Counter>,
    /// Payload codec calls that gave no decoded payload, by codec.
    codec_errors: Family<Labels, Counter>,
    /// Operator alerts (`[[alert]]`): open now, and messages made, by kind (and state).
    alerts_open: Family<Labels, Gauge>,
    alerts: Family<Labels, Counter>,
    /// Where scrape-time values come from ([`Metrics::set_snapshot`]).
    snapshot: Arc<RwLock<Option<SnapshotFn>>>,
    /// Uplink arrival → PULL_RESP sent (class A), seconds.
    sched_latency: Histogram,
    /// The same, last and maximum since start, microseconds (for `/health`; not exported).
    sched_last_us: Arc<std::sync::atomic::AtomicI64>,
    sched_max_us: Arc<std::sync::atomic::AtomicI64>,
    hot_udp_datagrams: Hot,
    hot_frames: Hot,
    hot_uplinks: Hot,
    hot_downlinks: Hot,
    hot_mac_events: Hot,
    hot_stream_published: Hot,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("lorastream");
        let inner_snapshot: Arc<RwLock<Option<SnapshotFn>>> = Arc::new(RwLock::new(None));
        macro_rules! reg {
            ($name:literal, $help:literal, $m:expr) => {{
                let m = $m;
                r.register($name, $help, m.clone());
                m
            }};
        }
        // A constant 1 whose labels say which build runs (`lorastream --version`).
        let build_info = Family::<Labels, Gauge>::default();
        build_info
            .get_or_create(&vec![
                ("version", env!("CARGO_PKG_VERSION").into()),
                ("commit", crate::COMMIT.into()),
            ])
            .set(1);
        r.register(
            "build_info",
            "The running build: crate version and git commit (always 1)",
            build_info,
        );
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
            mac_events: reg!(
                "mac_events",
                "The MAC layer of devices: commands sent, settings applied or refused, DevStatus answers, commands given up, by event",
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
            stream_rate_limited: reg!(
                "stream_rate_limited",
                "Times a stream reached its rate limit (smtp max_per_hour) and left records waiting in its queue",
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
            radio_defects: reg!(
                "radio_defects",
                "Received radio frames with a defect (crc_bad, too_short, oversized, proprietary, rfu); oversized ones are dropped",
                Family::default()
            ),
            gateway_address_changes: reg!(
                "gateway_address_changes",
                "Times a known packet forwarder's source address changed (restart, NAT, or a spoofed datagram)",
                Counter::default()
            ),
            metrics_connections_refused: reg!(
                "metrics_connections_refused",
                "Connections to the /metrics and /health listener closed at once because MAX_CONNECTIONS were open",
                Counter::default()
            ),
            remote_commands: reg!(
                "remote_commands",
                "Remote commands received over the streams, by command and result (ok, error, busy)",
                Family::default()
            ),
            tunnels: reg!(
                "tunnels",
                "IoT Hub device-stream requests (remote access tunnels), by stream and result: refused (port not in tunnel_ports), busy (tunnel_max open), malformed, endpoint_error, local_error (nothing listens on the port), closed_local, closed_remote, idle_timeout, stopped",
                Family::default()
            ),
            tunnels_open: reg!(
                "tunnels_open",
                "Remote access tunnels open now, by stream",
                Family::default()
            ),
            uplinks_without_stream: reg!(
                "uplinks_without_stream",
                "Accepted uplinks (and joins) that no stream takes: their device is outside every stream's scope",
                Counter::default()
            ),
            downlinks_too_large: reg!(
                "downlink_messages_too_large",
                "Downlink messages from a stream's destination refused because of their size, by stream",
                Family::default()
            ),
            codec_errors: reg!(
                "codec_errors",
                "Uplinks whose payload codec failed (error, timeout, memory limit, bad output), by codec; they are delivered without decoded_payload",
                Family::default()
            ),
            alerts_open: reg!(
                "alerts_open",
                "Alerts firing now, by kind",
                Family::default()
            ),
            alerts: reg!(
                "alerts",
                "Alert messages made (fired or resolved), by kind and state",
                Family::default()
            ),
            snapshot: inner_snapshot.clone(),
            sched_latency: reg!("downlink_schedule_latency_seconds", "Uplink arrival to PULL_RESP sent (class A; includes the dedup window)", Histogram::new(SCHEDULE_BUCKETS)),
            sched_last_us: Arc::default(),
            sched_max_us: Arc::default(),
            hot_udp_datagrams: Hot::new("type"),
            hot_frames: Hot::new("result"),
            hot_uplinks: Hot::new("result"),
            hot_downlinks: Hot::new("kind"),
            hot_mac_events: Hot::new("event"),
            hot_stream_published: Hot::new("stream"),
            registry: {
                r.register_collector(Box::new(SnapshotCollector(inner_snapshot.clone())));
                r
            },
        };
        Metrics {
            inner: Arc::new(inner),
        }
    }

    pub fn udp_datagram(&self, kind: &'static str) {
        let i = &self.inner;
        i.hot_udp_datagrams.inc_by(&i.udp_datagrams, kind, 1);
    }
    pub fn udp_error(&self, reason: &'static str) {
        self.inner
            .udp_errors
            .get_or_create(&vec![("reason", reason.into())])
            .inc();
    }
    pub fn radio_defect(&self, kind: &'static str) {
        self.inner
            .radio_defects
            .get_or_create(&vec![("kind", kind.into())])
            .inc();
    }
    pub fn gateway_address_changed(&self) {
        self.inner.gateway_address_changes.inc();
    }
    pub fn metrics_connection_refused(&self) {
        self.inner.metrics_connections_refused.inc();
    }
    pub fn metrics_connections_refused(&self) -> u64 {
        self.inner.metrics_connections_refused.get()
    }
    pub fn remote_command(&self, command: &'static str, result: &'static str) {
        self.inner
            .remote_commands
            .get_or_create(&vec![
                ("command", command.into()),
                ("result", result.into()),
            ])
            .inc();
    }
    /// One device-stream request ended with `result` (see the metric's help).
    pub fn tunnel(&self, stream: &str, result: &'static str) {
        self.inner
            .tunnels
            .get_or_create(&vec![("stream", stream.into()), ("result", result.into())])
            .inc();
    }
    pub fn tunnels(&self, stream: &str, result: &'static str) -> u64 {
        self.inner
            .tunnels
            .get(&vec![("stream", stream.into()), ("result", result.into())])
            .map_or(0, |c| c.get())
    }
    /// A tunnel opened (+1) or closed (-1).
    pub fn tunnels_open_add(&self, stream: &str, delta: i64) {
        self.inner
            .tunnels_open
            .get_or_create(&vec![("stream", stream.into())])
            .inc_by(delta);
    }
    pub fn tunnels_open(&self, stream: &str) -> i64 {
        self.inner
            .tunnels_open
            .get(&vec![("stream", stream.into())])
            .map_or(0, |g| g.get())
    }
    pub fn uplink_without_stream(&self) {
        self.inner.uplinks_without_stream.inc();
    }
    pub fn uplinks_without_stream(&self) -> u64 {
        self.inner.uplinks_without_stream.get()
    }
    pub fn downlink_too_large(&self, stream: &str) {
        self.inner
            .downlinks_too_large
            .get_or_create(&vec![("stream", stream.into())])
            .inc();
    }
    /// Receptions beyond `MAX_RX_METADATA` of one frame, left out of its uplink.
    pub fn frame_receptions_dropped(&self, n: u64) {
        self.inner
            .frames
            .get_or_create(&vec![("result", "reception_over_cap".into())])
            .inc_by(n);
    }
    pub fn frame(&self, result: &'static str) {
        let i = &self.inner;
        i.hot_frames.inc_by(&i.frames, result, 1);
    }
    pub fn uplink(&self, result: &'static str) {
        let i = &self.inner;
        i.hot_uplinks.inc_by(&i.uplinks, result, 1);
    }
    /// Current count of an uplink result (for `/health`, tests and the demo).
    pub fn uplinks(&self, result: &'static str) -> u64 {
        self.inner
            .uplinks
            .get_or_create(&vec![("result", result.into())])
            .get()
    }
    pub fn downlink_event(&self, kind: &'static str) {
        let i = &self.inner;
        i.hot_downlinks.inc_by(&i.downlinks, kind, 1);
    }
    pub fn mac_event(&self, event: &'static str) {
        let i = &self.inner;
        i.hot_mac_events.inc_by(&i.mac_events, event, 1);
    }
    pub fn mac_events(&self, event: &'static str) -> u64 {
        self.inner
            .mac_events
            .get_or_create(&vec![("event", event.into())])
            .get()
    }
    pub fn downlinks(&self, kind: &'static str) -> u64 {
        self.inner
            .downlinks
            .get_or_create(&vec![("kind", kind.into())])
            .get()
    }
    pub fn codec_error(&self, codec: &'static str) {
        self.inner
            .codec_errors
            .get_or_create(&vec![("codec", codec.into())])
            .inc();
    }
    /// Codec errors so far (tests, `/health`).
    pub fn codec_errors(&self, codec: &'static str) -> u64 {
        self.inner
            .codec_errors
            .get_or_create(&vec![("codec", codec.into())])
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
    /// `n` alerts of `kind` are open now.
    pub fn set_alerts_open(&self, kind: &str, n: usize) {
        self.inner
            .alerts_open
            .get_or_create(&vec![("kind", kind.into())])
            .set(n as i64);
    }
    pub fn alerts_open(&self, kind: &str) -> i64 {
        self.inner
            .alerts_open
            .get_or_create(&vec![("kind", kind.into())])
            .get()
    }
    /// An alert message was made (`state`: firing or resolved).
    pub fn alert(&self, kind: &str, state: &'static str) {
        self.inner
            .alerts
            .get_or_create(&vec![("kind", kind.into()), ("state", state.into())])
            .inc();
    }
    pub fn alerts(&self, kind: &str, state: &'static str) -> u64 {
        self.inner
            .alerts
            .get_or_create(&vec![("kind", kind.into()), ("state", state.into())])
            .get()
    }
    pub fn stream_published(&self, stream: &str, n: u64) {
        let i = &self.inner;
        i.hot_stream_published
            .inc_by(&i.stream_published, stream, n);
    }
    pub fn stream_error(&self, stream: &str, reason: &'static str) {
        self.inner
            .stream_errors
            .get_or_create(&vec![("stream", stream.into()), ("reason", reason.into())])
            .inc();
    }
    /// The stream reached its rate limit: records wait in its queue.
    pub fn stream_rate_limited(&self, stream: &str) {
        self.inner
            .stream_rate_limited
            .get_or_create(&vec![("stream", stream.into())])
            .inc();
    }
    pub fn stream_rate_limits(&self, stream: &str) -> u64 {
        self.inner
            .stream_rate_limited
            .get_or_create(&vec![("stream", stream.into())])
            .get()
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

    /// Where scrape-time values come from: set by the daemon when it starts, and cleared when
    /// it stops ([`Metrics::clear_snapshot`]), so that a `Metrics` kept by someone else does not
    /// keep the store open.
    pub fn set_snapshot(&self, f: impl Fn() -> Snapshot + Send + Sync + 'static) {
        if let Ok(mut s) = self.inner.snapshot.write() {
            *s = Some(Box::new(f));
        }
    }

    /// Forget the snapshot source (the daemon stopped).
    pub fn clear_snapshot(&self) {
        if let Ok(mut s) = self.inner.snapshot.write() {
            *s = None;
        }
    }

    /// Record the time from an uplink's arrival to its answer's PULL_RESP.
    pub fn observe_schedule_latency(&self, d: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        self.inner.sched_latency.observe(d.as_secs_f64());
        let us = d.as_micros().min(i64::MAX as u128) as i64;
        self.inner.sched_last_us.store(us, Relaxed);
        self.inner.sched_max_us.fetch_max(us, Relaxed);
    }

    /// (last, max) scheduling latency in microseconds.
    pub fn schedule_latency_us(&self) -> (i64, i64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.inner.sched_last_us.load(Relaxed),
            self.inner.sched_max_us.load(Relaxed),
        )
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        if encode(&mut s, &self.inner.registry).is_err() {
            s.clear();
        }
        // The standard process metrics (their usual names, without our prefix), before the
        // OpenMetrics end marker.
        let process = crate::metrics_process::encode();
        match s.rfind("# EOF") {
            Some(i) => s.insert_str(i, &process),
            None => s.push_str(&process),
        }
        s
    }
}

type SnapshotFn = Box<dyn Fn() -> Snapshot + Send + Sync>;

/// Values that live elsewhere, read at scrape time.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub queues: Vec<QueueGauges>,
    /// Packet forwarders in the table.
    pub gateways: usize,
    pub store_writable: bool,
    pub store_unsaved_bytes: u64,
    pub store_write_failures: u64,
    /// Record copies held in memory only (a kill loses them).
    pub store_memory_only: u64,
    /// Records the previous run lost (held in memory only when it ended).
    pub store_lost_at_last_stop: u64,
    /// Durations of the store's commits (the store's own histogram).
    pub store_commit_seconds: Option<Histogram>,
}

/// One stream's queue.
#[derive(Debug, Default, Clone)]
pub struct QueueGauges {
    pub stream: String,
    pub depth: u64,
    pub bytes: u64,
    pub oldest_age_s: f64,
    pub delivered: u64,
    pub dropped: Vec<(&'static str, u64)>,
}

/// Encodes a [`Snapshot`] on each scrape.
struct SnapshotCollector(Arc<RwLock<Option<SnapshotFn>>>);

impl std::fmt::Debug for SnapshotCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SnapshotCollector")
    }
}

fn counter(v: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(v);
    c
}

fn gauge(v: u64) -> Gauge {
    let g = Gauge::default();
    g.set(v.min(i64::MAX as u64) as i64);
    g
}

/// Encode one metric (a family or a single gauge) under `name`.
fn put(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    m: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    m.encode(enc.encode_descriptor(name, help, None, m.metric_type())?)
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = match self.0.read() {
            Ok(f) => match f.as_ref() {
                Some(f) => f(),
                None => return Ok(()),
            },
            Err(_) => return Ok(()),
        };
        let depth = Family::<Labels, Gauge>::default();
        let bytes = Family::<Labels, Gauge>::default();
        let oldest = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let delivered = Family::<Labels, Counter>::default();
        let dropped = Family::<Labels, Counter>::default();
        for q in &s.queues {
            let l = vec![("stream", q.stream.clone())];
            depth.get_or_create(&l).set(q.depth as i64);
            bytes.get_or_create(&l).set(q.bytes as i64);
            oldest.get_or_create(&l).set(q.oldest_age_s);
            delivered.get_or_create(&l).inc_by(q.delivered);
            for (reason, n) in &q.dropped {
                dropped
                    .get_or_create(&vec![
                        ("stream", q.stream.clone()),
                        ("reason", (*reason).into()),
                    ])
                    .inc_by(*n);
            }
        }
        let e = &mut enc;
        put(
            e,
            "queue_depth",
            "Records waiting in the stream's queue",
            &depth,
        )?;
        put(
            e,
            "queue_bytes",
            "Bytes waiting in the stream's queue",
            &bytes,
        )?;
        put(
            e,
            "queue_oldest_age_seconds",
            "Age of the oldest queued record",
            &oldest,
        )?;
        put(
            e,
            "queue_delivered",
            "Records acknowledged by the destination since start",
            &delivered,
        )?;
        put(
            e,
            "queue_dropped",
            "Records dropped from the queue since start, by reason",
            &dropped,
        )?;
        put(
            e,
            "gateways",
            "Packet forwarders seen",
            &gauge(s.gateways as u64),
        )?;
        put(
            e,
            "store_writable",
            "1 while the store's disk takes writes; 0 while commits fail (disk full, I/O error)",
            &gauge(u64::from(s.store_writable)),
        )?;
        put(e, "store_unsaved_bytes", "Queued bytes not yet checkpointed into the storage engine (journaled, or in memory only while the disk refuses writes)", &gauge(s.store_unsaved_bytes))?;
        put(
            e,
            "store_write_failures",
            "Failed store writes (commits, journal writes, engine reopens) since start",
            &counter(s.store_write_failures),
        )?;
        if let Some(h) = &s.store_commit_seconds {
            put(
                e,
                "store_commit_seconds",
                "Store commits (a checkpoint of the journal into the engine, fsync included)",
                h,
            )?;
        }
        put(
            e,
            "store_memory_only_records",
            "Queued record copies held in memory only (disk full and the journal's reserve used up): a kill or crash now loses them",
            &gauge(s.store_memory_only),
        )?;
        put(
            e,
            "store_lost_at_last_stop",
            "Records the previous run lost because it ended holding them in memory only (reported once at start)",
            &gauge(s.store_lost_at_last_stop),
        )?;
        Ok(())
    }
}

/// Connections the `/metrics` and `/health` listener serves at once. More are closed at once
/// (and counted): idle or slow clients cannot take the file descriptors the store and the
/// streams need. A scraper or a health check needs one.
pub const MAX_CONNECTIONS: usize = 32;

/// How long a connection may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one connection may last in all (request head, and taking the answer): a client that
/// does not read its answer cannot keep a slot.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// The `/health` answer: HTTP 200 when `healthy`, 503 otherwise (load balancers and probes go by
/// the status), with the same JSON document either way.
#[derive(Debug, Clone)]
pub struct HealthAnswer {
    pub healthy: bool,
    pub json: String,
}

/// The status page's answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// `/`: the HTML page.
    Html,
    /// `/api/status`: the JSON it polls.
    Json,
}

/// What makes the status page: `render` gives the body of each [`Page`], `csp` the page's
/// `Content-Security-Policy`.
pub struct StatusPages {
    pub render: Box<dyn Fn(Page) -> String + Send + Sync>,
    pub csp: String,
}

/// Serve `/metrics`, `/health` and the status page until `cancel` (HTTP/1.1 with hyper, one
/// request per connection). `health` makes the `/health` answer.
pub(crate) async fn serve<F>(
    listener: TcpListener,
    metrics: Metrics,
    health: F,
    status: StatusPages,
    cancel: CancellationToken,
) where
    F: Fn() -> HealthAnswer + Send + Sync + 'static,
{
    let health = Arc::new(health);
    let status = Arc::new(status);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut refused_log = crate::logs::LogLimiter::new();
    loop {
        let (sock, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics.metrics_connection_refused();
            if refused_log.allow() {
                tracing::warn!(
                    max = MAX_CONNECTIONS,
                    "metrics endpoint: too many open connections; closing new ones until some end"
                );
            }
            drop(sock);
            continue;
        };
        let metrics = metrics.clone();
        let health = health.clone();
        let status = status.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let resp = respond(&req, &metrics, &*health, &status);
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            // One request per connection (`Connection: close` on every answer): a scrape every
            // few seconds gains nothing from keep-alive, and no idle connection keeps a slot.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(sock), service);
            // Dropping the connection closes the socket: slow or silent clients end here.
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
        });
    }
}

type Body = http_body_util::Full<hyper::body::Bytes>;

fn answer(status: StatusCode, ctype: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(Body::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

/// The answer to one request (HEAD gets the same head; hyper leaves the body out).
fn respond<B>(
    req: &Request<B>,
    metrics: &Metrics,
    health: &dyn Fn() -> HealthAnswer,
    status: &StatusPages,
) -> Response<Body> {
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/health" | "/" | "/api/status") {
        return answer(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "try /, /metrics or /health\n".into(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = answer(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "GET or HEAD\n".into(),
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    if path == "/" || path == "/api/status" {
        let (page, ctype) = if path == "/" {
            (Page::Html, "text/html; charset=utf-8")
        } else {
            (Page::Json, "application/json")
        };
        let mut r = answer(StatusCode::OK, ctype, (status.render)(page));
        let h = r.headers_mut();
        // Live data: never cached; the page is never framed, sniffed or given a referrer.
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        if page == Page::Html {
            if let Ok(v) = HeaderValue::from_str(&status.csp) {
                h.insert(header::CONTENT_SECURITY_POLICY, v);
            }
        }
        return r;
    }
    if path == "/metrics" {
        return answer(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        );
    }
    let h = health();
    let status = if h.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    answer(status, "application/json", h.json)
}

/// Bind the listener of `/metrics`, `/health` and the status page on the first of
/// `candidates` ([`crate::config::MetricsConfig::candidates`]) that is free. A taken port that
/// has a next candidate is skipped with a warning (the default 127.0.0.1:9100 is node_exporter's
/// port too); when none can be had, the daemon runs on without the listener (the uplinks matter
/// more than their metrics) and says what to change.
pub(crate) async fn bind(candidates: &[std::net::SocketAddr]) -> Option<TcpListener> {
    let first = *candidates.first()?;
    for (i, addr) in candidates.iter().enumerate() {
        match TcpListener::bind(addr).await {
            Ok(l) => {
                if i > 0 {
                    tracing::warn!(
                        taken = %candidates[..i].iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", "),
                        listen = %addr,
                        "[metrics] listen is not set and its default is taken by another program (node_exporter listens on 9100): /metrics, /health and the status page are on {addr}; set [metrics] listen to choose the port"
                    );
                }
                return Some(l);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && i + 1 < candidates.len() => {}
            Err(e) => {
                let hint = if e.kind() != std::io::ErrorKind::AddrInUse {
                    String::new()
                } else if i > 0 {
                    format!("; {first} and the fallback ports after it are all taken: set [metrics] listen = \"127.0.0.1:<a free port>\" (or \"\" to turn the listener off) and restart")
                } else {
                    "; another program has this port (node_exporter listens on 9100): set [metrics] listen = \"127.0.0.1:9101\" (or \"\" to turn the listener off) and restart".to_string()
                };
                tracing::error!(addr = %addr, error = %e, "cannot listen for /metrics, /health and the status page; running without them{hint}");
                return None;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_taken_port_falls_through_to_the_next_candidate() {
        let held_a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let held_b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (a, b) = (held_a.local_addr().unwrap(), held_b.local_addr().unwrap());
        // Port 0 as the last candidate: any free port, so the test needs no fixed one.
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        let l = bind(&[a, b, any]).await.expect("the third candidate");
        let got = l.local_addr().unwrap();
        assert!(got != a && got != b, "{got}");
        assert!(bind(&[a, b]).await.is_none(), "every candidate is taken");
        assert!(bind(&[a]).await.is_none());
        assert!(bind(&[]).await.is_none());
    }

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

    /// Prometheus conventions: counters end in `_total`, durations are histograms in
    /// seconds, the standard process metrics are there, and the text still ends with the
    /// OpenMetrics end marker.
    #[test]
    fn counters_total_durations_in_seconds_and_process_metrics() {
        let m = Metrics::new();
        let h = Histogram::new(COMMIT_BUCKETS);
        h.observe(0.003);
        m.set_snapshot(move || Snapshot {
            queues: vec![QueueGauges {
                stream: "cloud".into(),
                depth: 2,
                delivered: 7,
                dropped: [("too_large", 1)].into_iter().collect(),
                ..Default::default()
            }],
            store_write_failures: 3,
            store_commit_seconds: Some(h.clone()),
            ..Default::default()
        });
        m.observe_schedule_latency(Duration::from_millis(180));
        let t = m.encode();
        for want in [
            "lorastream_queue_delivered_total{stream=\"cloud\"} 7",
            "lorastream_queue_dropped_total{stream=\"cloud\",reason=\"too_large\"} 1",
            "lorastream_store_write_failures_total 3",
            "# TYPE lorastream_store_commit_seconds histogram",
            "lorastream_store_commit_seconds_bucket{le=\"0.005\"} 1",
            "# TYPE lorastream_downlink_schedule_latency_seconds histogram",
            "lorastream_downlink_schedule_latency_seconds_bucket{le=\"0.2\"} 1",
            "lorastream_downlink_schedule_latency_seconds_bucket{le=\"0.15\"} 0",
            "\nprocess_cpu_seconds_total ",
            "\nprocess_resident_memory_bytes ",
        ] {
            assert!(t.contains(want), "{want} not in\n{t}");
        }
        assert!(!t.contains("_us"), "microsecond metrics left:\n{t}");
        assert!(t.ends_with("# EOF\n"), "{t}");
        assert_eq!(m.schedule_latency_us().0, 180_000);
    }

    #[test]
    fn build_info_names_the_version_and_commit() {
        let t = Metrics::new().encode();
        let line = format!(
            "lorastream_build_info{{version=\"{}\",commit=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION"),
            crate::COMMIT
        );
        assert!(t.contains(&line), "{line} not in\n{t}");
        assert!(t.contains("# TYPE lorastream_build_info gauge"), "{t}");
        assert!(!crate::COMMIT.is_empty());
    }
}
