//! `/health` as a typed document, and the values `/metrics` reads at scrape time.
//!
//! Both are computed from the live state on request (queues, store, forwarders, counters) and
//! change nothing: a scrape is a read.

use crate::ingress::udp::{GatewayView, Gateways};
use crate::metrics::{self, Metrics};
use crate::store::{QueueStats, Store, StoreHealth};
use serde::Serialize;
use std::time::Instant;

/// `ok`, or `degraded` when a destination is unreachable, no packet forwarder talks to us, or
/// the store's disk refuses writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Degraded,
}

/// One stream's queue and connection.
#[derive(Debug, Clone, Serialize)]
pub struct StreamHealth {
    #[serde(flatten)]
    pub queue: QueueStats,
    pub connected: bool,
    /// Open connections, for streams that hold several (IoT Hub with one identity per device).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<i64>,
}

/// Uplink arrival to PULL_RESP sent (class A), microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub last: i64,
    pub max: i64,
}

/// Deduplicated uplinks by result.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct UplinkCounts {
    pub accepted: u64,
    pub mic_failed: u64,
    pub replay: u64,
    pub unknown_dev_addr: u64,
}

/// The `/health` document.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    pub status: Status,
    pub streams_down: Vec<String>,
    pub forwarders_online: bool,
    pub version: &'static str,
    pub uptime_s: u64,
    /// The most recently heard forwarders (at most `ingress::udp::HEALTH_GATEWAYS`).
    pub gateways: Vec<GatewayView>,
    /// Forwarders known in all (`gateways` may list fewer).
    pub gateways_total: usize,
    pub streams: Vec<StreamHealth>,
    pub store: StoreHealth,
    pub downlink_schedule_latency_us: Latency,
    pub uplinks: UplinkCounts,
}

/// What `/health` and `/metrics` read.
#[derive(Clone)]
pub(crate) struct Sources {
    pub metrics: Metrics,
    pub store: Store,
    pub gateways: Gateways,
    pub started: Instant,
}

impl Sources {
    pub fn health(&self) -> Health {
        let m = &self.metrics;
        let streams: Vec<StreamHealth> = self
            .store
            .queues()
            .iter()
            .map(|q| {
                let queue = q.stats();
                StreamHealth {
                    connected: m.is_stream_connected(&queue.stream),
                    connections: m.stream_connections(&queue.stream),
                    queue,
                }
            })
            .collect();
        let store = self.store.health();
        let (gateways, gateways_total) = self.gateways.view();
        let streams_down: Vec<String> = streams
            .iter()
            .filter(|s| !s.connected)
            .map(|s| s.queue.stream.clone())
            .collect();
        let forwarders_online = gateways.iter().any(|g| g.online);
        let status = if streams_down.is_empty() && forwarders_online && store.writable {
            Status::Ok
        } else {
            Status::Degraded
        };
        let (last, max) = m.schedule_latency_us();
        Health {
            status,
            streams_down,
            forwarders_online,
            version: env!("CARGO_PKG_VERSION"),
            uptime_s: self.started.elapsed().as_secs(),
            gateways,
            gateways_total,
            streams,
            store,
            downlink_schedule_latency_us: Latency { last, max },
            uplinks: UplinkCounts {
                accepted: m.uplinks("accepted"),
                mic_failed: m.uplinks("mic_failed"),
                replay: m.uplinks("replay"),
                unknown_dev_addr: m.uplinks("unknown_dev_addr"),
            },
        }
    }
}

/// The scrape-time values of `/metrics`.
pub(crate) fn snapshot(store: &Store, gateways: &Gateways) -> metrics::Snapshot {
    let h: StoreHealth = store.health();
    metrics::Snapshot {
        queues: store
            .queues()
            .iter()
            .map(|q| {
                let s = q.stats();
                metrics::QueueGauges {
                    stream: s.stream,
                    depth: s.depth,
                    bytes: s.bytes,
                    oldest_age_s: s.oldest_age_s,
                    delivered: s.delivered,
                    dropped: s.dropped.into_iter().collect(),
                }
            })
            .collect(),
        gateways: gateways.len(),
        store_writable: h.writable,
        store_unsaved_bytes: h.unsaved_bytes,
        store_write_failures: h.write_failures,
        store_memory_only: h.memory_only,
        store_lost_at_last_stop: h.lost_at_last_stop,
        store_commit_seconds: Some(store.commit_seconds()),
    }
}
