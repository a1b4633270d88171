//! Wiring: builds every stage from the config, connects them with bounded channels, and stops
//! them in data-path order.
//!
//! ```text
//!  UDP ──▶ ingress::udp ──(mpsc, bounded)──▶ uplink stage ──▶ store ──▶ stream 1 ──▶ broker
//!  (PUSH_ACK at once)                         (dedup, MIC,      (fsync      stream 2 ──▶ …
//!                                              FCnt, decrypt)    policy)     ▲ ack = delete
//! ```
//!
//! Stop order (SIGTERM, SIGINT, [`Daemon::stop`]): ingress stops reading; the uplink stage
//! stores everything still in its dedup window; streams finish what is in flight (bounded);
//! the store is flushed. The whole stop is bounded by [`STOP_DEADLINE`].

use crate::config::{Config, WhenFull};
use crate::downlink::{Input as DownlinkInput, Scheduler, StreamLink};
use crate::ingress::udp::{self, Downlinker, Gateways};
use crate::lorawan::session::{Device, Registry, Session, SessionState};
use crate::metrics::{self, Metrics};
use crate::model::Eui64;
use crate::store::{Store, StoreError};
use crate::streams::{Stream, StreamContext, StreamError};
use crate::uplink::{restore_sessions, Routes, UplinkStage};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The contract: a graceful stop takes at most 5 s.
pub const STOP_DEADLINE: Duration = Duration::from_millis(4_500);

/// How often freed heap memory is handed back to the kernel ([`trim_heap`]).
const TRIM_EVERY: Duration = Duration::from_secs(30);

/// Give the kernel back the heap pages that are free.
///
/// glibc's malloc keeps what a program frees in its arenas (one per thread that allocates, up
/// to 8 per core) and returns it only when the very top of a heap is free. A backlog drain
/// allocates in bursts (engine pages, batches, MQTT packets) on several threads, so without
/// this RSS ratchets up with every outage and never comes down: the soak benchmark measured
/// 13 MB before the first outage and 51 MB after six, flat in between (docs/benchmarks.md).
/// `malloc_trim(0)` releases every free page of every arena (`madvise(MADV_DONTNEED)`); with
/// heaps this size it took 0.5–2 ms in that benchmark. Other C libraries have no such call.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let t = Instant::now();
        // SAFETY: malloc_trim only takes glibc's own arena locks; no pointers are passed.
        let released = unsafe { libc::malloc_trim(0) } == 1;
        tracing::trace!(
            released,
            took_us = t.elapsed().as_micros() as u64,
            "heap trimmed"
        );
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot open the store at {path}: {source}")]
    Store { path: String, source: StoreError },
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Stream(#[from] StreamError),
}

/// A running daemon.
pub struct Daemon {
    udp_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    metrics: Metrics,
    store: Store,
    gateways: Gateways,
    ingress_cancel: CancellationToken,
    streams_cancel: CancellationToken,
    misc_cancel: CancellationToken,
    ingress: JoinHandle<()>,
    uplink: JoinHandle<()>,
    streams: Vec<JoinHandle<()>>,
    scheduler: JoinHandle<()>,
    misc: Vec<JoinHandle<()>>,
    downlinks: tokio::sync::mpsc::Sender<DownlinkInput>,
    started: Instant,
}

/// Devices of the config as registry entries (ABP sessions; OTAA devices wait for a join).
pub fn registry_from(cfg: &Config) -> Registry {
    let devices = cfg
        .device_configs()
        .map(|d| Device {
            id: d.id.clone(),
            application: d.application.clone(),
            dev_eui: d.dev_eui,
            class: d.class,
            app_key: d.app_key,
            join_eui: d.join_eui,
            dev_nonce_counts_up: d.lorawan_version.dev_nonce_counts_up(),
            pending: None,
            session: match (d.dev_addr, d.nwk_s_key, d.app_s_key) {
                (Some(dev_addr), Some(nwk_s_key), Some(app_s_key)) => Some(Session {
                    dev_addr,
                    nwk_s_key,
                    app_s_key,
                    state: SessionState {
                        dev_addr,
                        ..Default::default()
                    },
                }),
                _ => None,
            },
        })
        .collect();
    Registry::new(devices)
}

/// Put the joined (and pending) sessions of OTAA devices back into the registry.
fn restore_otaa(registry: &mut Registry, store: &Store) -> Result<(), StoreError> {
    let otaa: Vec<(usize, Eui64)> = registry
        .devices()
        .iter()
        .enumerate()
        .filter(|(_, d)| d.app_key.is_some())
        .map(|(i, d)| (i, d.dev_eui))
        .collect();
    for (i, eui) in otaa {
        let (active, pending) = store.otaa_sessions(eui)?;
        let to_session = |s: crate::store::OtaaSession| {
            let (nwk_s_key, app_s_key) = s.keys();
            Session {
                dev_addr: s.dev_addr,
                nwk_s_key,
                app_s_key,
                state: SessionState {
                    dev_addr: s.dev_addr,
                    ..Default::default()
                },
            }
        };
        if let Some(a) = active {
            registry.set_session(i, to_session(a));
        }
        if let Some(p) = pending {
            registry.set_pending(i, to_session(p));
        }
    }
    Ok(())
}

impl Daemon {
    /// Open the store, bind the sockets and start every task.
    pub async fn start(cfg: &Config) -> Result<Daemon, AppError> {
        let metrics = Metrics::new();
        let streams_cfg: Vec<_> = cfg.stream_configs().cloned().collect();
        let queue_specs: Vec<(String, WhenFull)> = streams_cfg
            .iter()
            .map(|s| (s.name.clone(), s.when_full.unwrap_or(cfg.storage.when_full)))
            .collect();
        let (store, report) =
            Store::open(&cfg.storage, &queue_specs).map_err(|source| AppError::Store {
                path: cfg.storage.path.display().to_string(),
                source,
            })?;
        if let Some(p) = &report.quarantined {
            tracing::error!(moved_to = %p.display(), "the previous store was unreadable and has been kept aside");
        }
        tracing::info!(
            backend = store.backend().name(),
            path = %cfg.storage.path.display(),
            flush_every_ms = cfg.storage.flush_every_ms,
            "store opened"
        );

        let mut registry = registry_from(cfg);
        let saved = store.load_sessions().map_err(|source| AppError::Store {
            path: cfg.storage.path.display().to_string(),
            source,
        })?;
        restore_otaa(&mut registry, &store).map_err(|source| AppError::Store {
            path: cfg.storage.path.display().to_string(),
            source,
        })?;
        restore_sessions(&mut registry, &saved);

        let listen: SocketAddr = cfg.gateway.listen.parse().map_err(|_| AppError::Bind {
            what: "[gateway] listen",
            addr: cfg.gateway.listen.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not an IP:port"),
        })?;
        let socket =
            udp::bind(listen, cfg.gateway.udp_recv_buffer).map_err(|source| AppError::Bind {
                what: "[gateway] listen",
                addr: cfg.gateway.listen.clone(),
                source,
            })?;
        let udp_addr = socket.local_addr().map_err(|source| AppError::Bind {
            what: "[gateway] listen",
            addr: cfg.gateway.listen.clone(),
            source,
        })?;
        let socket = Arc::new(socket);

        let ingress_cancel = CancellationToken::new();
        let streams_cancel = CancellationToken::new();
        let misc_cancel = CancellationToken::new();
        let gateways = Gateways::default();

        let registry = Arc::new(std::sync::Mutex::new(registry));
        let (down_tx, down_rx) = tokio::sync::mpsc::channel::<DownlinkInput>(1024);

        // Streams first, so nothing appended is missed.
        let scopes: Vec<_> = streams_cfg
            .iter()
            .map(|s| (s.name.clone(), s.scope()))
            .collect();
        let routes = Routes::new(&store, &scopes);
        let mut streams = Vec::new();
        let mut links = std::collections::HashMap::new();
        for s in &streams_cfg {
            let Some(queue) = store.queue(&s.name) else {
                continue;
            };
            let (ev_tx, ev_rx) = tokio::sync::mpsc::channel(256);
            links.insert(
                s.name.clone(),
                StreamLink {
                    scope: s.scope(),
                    events: ev_tx,
                },
            );
            let ctx = StreamContext {
                queue,
                metrics: metrics.clone(),
                cancel: streams_cancel.clone(),
                gateway_eui: cfg.gateway.eui,
                downlinks: s.downlinks.then(|| down_tx.clone()),
            };
            let stream = Stream::build(s, ctx, ev_rx)?;
            streams.push(tokio::spawn(stream.run()));
        }

        let downlinker = Downlinker::new(socket.clone(), gateways.clone());
        let plan = crate::downlink::window::RxPlan::new(cfg.gateway.region, cfg.gateway.rx2_dr);
        let scheduler = Scheduler::new(
            registry.clone(),
            store.clone(),
            downlinker,
            plan,
            links,
            metrics.clone(),
        );
        let scheduler = tokio::spawn(scheduler.run(down_rx));

        // TX_ACKs from ingress go to the scheduler.
        let (ack_tx, mut ack_rx) = tokio::sync::mpsc::channel(256);
        {
            let down_tx = down_tx.clone();
            tokio::spawn(async move {
                while let Some(a) = ack_rx.recv().await {
                    if down_tx.send(DownlinkInput::TxAck(a)).await.is_err() {
                        return;
                    }
                }
            });
        }

        let (tx, rx) = tokio::sync::mpsc::channel(4096);
        let downlinks = down_tx.clone();
        let stage = UplinkStage::new(
            registry,
            Some(down_tx),
            store.clone(),
            routes,
            metrics.clone(),
            Duration::from_millis(cfg.gateway.dedup_window_ms),
            crate::uplink::JoinSettings {
                plan,
                net_id: cfg.gateway.net_id(),
                sub_band: cfg.gateway.sub_band,
            },
        );
        let uplink = tokio::spawn(stage.run(rx));
        let ingress = tokio::spawn(udp::run(
            socket,
            tx,
            ack_tx,
            gateways.clone(),
            metrics.clone(),
            ingress_cancel.clone(),
        ));

        // Helper tasks that hold the store: awaited on stop.
        let mut misc: Vec<JoinHandle<()>> = Vec::new();
        // Group commits, batched acknowledgements, retries while the disk refuses writes.
        misc.push(tokio::spawn(
            store.clone().run_committer(misc_cancel.clone()),
        ));
        if let Some(max_age) = cfg.storage.max_age() {
            // Expire old records once a minute (and once at start, after a long power-off).
            let (st, cancel) = (store.clone(), misc_cancel.clone());
            misc.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let cutoff = crate::model::now_us() - max_age.as_micros() as i64;
                    match st.expire(cutoff) {
                        Ok(0) => {}
                        Ok(n) => tracing::warn!(
                            expired = n,
                            "queued messages older than [storage] max_age dropped"
                        ),
                        Err(e) => tracing::error!(error = %e, "cannot expire old messages"),
                    }
                }
            }));
        }

        {
            let cancel = misc_cancel.clone();
            misc.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(TRIM_EVERY);
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    // A millisecond or two of arena walking: not on a worker thread.
                    let _ = tokio::task::spawn_blocking(trim_heap).await;
                }
            }));
        }

        let started = Instant::now();
        let mut metrics_addr = None;
        if !cfg.metrics.listen.is_empty() {
            let l = tokio::net::TcpListener::bind(&cfg.metrics.listen)
                .await
                .map_err(|source| AppError::Bind {
                    what: "[metrics] listen",
                    addr: cfg.metrics.listen.clone(),
                    source,
                })?;
            metrics_addr = l.local_addr().ok();
            let (m, st, gw) = (metrics.clone(), store.clone(), gateways.clone());
            let snapshot = move || health(&m, &st, &gw, started);
            misc.push(tokio::spawn(metrics::serve(
                l,
                metrics.clone(),
                snapshot,
                misc_cancel.clone(),
            )));
        }

        tracing::info!(
            udp = %udp_addr,
            metrics = ?metrics_addr,
            devices = cfg.devices.len(),
            streams = streams_cfg.len(),
            queued = store.queues().iter().map(|q| q.len()).sum::<u64>(),
            "lorastream started"
        );
        Ok(Daemon {
            udp_addr,
            metrics_addr,
            metrics,
            store,
            gateways,
            ingress_cancel,
            streams_cancel,
            misc_cancel,
            ingress,
            uplink,
            streams,
            scheduler,
            misc,
            downlinks,
            started,
        })
    }

    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    pub fn store(&self) -> &Store {
        &self.store
    }
    pub fn gateways(&self) -> &Gateways {
        &self.gateways
    }

    /// Queue a downlink as if `req.stream` had received it (the demo uses this); resolves once
    /// it is stored or refused.
    pub async fn request_downlink(&self, req: crate::model::DownlinkRequest) {
        let (done, stored) = tokio::sync::oneshot::channel();
        if self
            .downlinks
            .send(DownlinkInput::Request(req, Some(done)))
            .await
            .is_ok()
        {
            let _ = stored.await;
        }
    }

    /// `/health` document.
    pub fn health(&self) -> serde_json::Value {
        health(&self.metrics, &self.store, &self.gateways, self.started)
    }

    /// Graceful stop, in data-path order, within [`STOP_DEADLINE`].
    pub async fn stop(self) {
        let deadline = tokio::time::Instant::now() + STOP_DEADLINE;
        // A task that overruns the deadline is aborted, so that when `stop` returns nothing
        // holds the store any more (a store reopened in the same process must be alone).
        async fn finish(mut t: JoinHandle<()>, deadline: tokio::time::Instant) {
            if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
                t.abort();
                let _ = t.await;
            }
        }
        drop(self.downlinks);
        self.ingress_cancel.cancel();
        finish(self.ingress, deadline).await;
        // The uplink stage ends when the ingress sender is gone, after storing its window.
        finish(self.uplink, deadline).await;
        self.streams_cancel.cancel();
        for s in self.streams {
            finish(s, deadline).await;
        }
        // The scheduler ends when its last input (uplink stage, streams, TX_ACK relay) is gone.
        finish(self.scheduler, deadline).await;
        if let Err(e) = self.store.flush().await {
            tracing::error!(error = %e, "final store flush failed");
        }
        self.misc_cancel.cancel();
        for t in self.misc {
            finish(t, deadline + Duration::from_millis(300)).await;
        }
        tracing::info!("lorastream stopped");
    }
}

fn health(
    metrics: &Metrics,
    store: &Store,
    gateways: &Gateways,
    started: Instant,
) -> serde_json::Value {
    let queues: Vec<_> = store
        .queues()
        .iter()
        .map(|q| {
            let s = q.stats();
            metrics.set_queue(&s);
            let mut v = serde_json::to_value(&s).unwrap_or_default();
            v["connected"] = metrics.is_stream_connected(&s.stream).into();
            if let Some(n) = metrics.stream_connections(&s.stream) {
                v["connections"] = n.into();
            }
            v
        })
        .collect();
    metrics.set_gateways(gateways.len());
    let store_health = store.health();
    metrics.set_store(&store_health);
    let store_health = serde_json::to_value(&store_health).unwrap_or_default();
    let gw = gateways.to_json();
    // Degraded: a destination is unreachable, or no packet forwarder talks to us.
    let streams_down: Vec<String> = queues
        .iter()
        .filter(|q| q["connected"] == false)
        .filter_map(|q| q["stream"].as_str().map(String::from))
        .collect();
    let forwarders_online = gw
        .as_array()
        .is_some_and(|a| a.iter().any(|g| g["online"] == true));
    let status = if streams_down.is_empty() && forwarders_online && store_health["writable"] == true
    {
        "ok"
    } else {
        "degraded"
    };
    serde_json::json!({
        "status": status,
        "streams_down": streams_down,
        "forwarders_online": forwarders_online,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": started.elapsed().as_secs(),
        "gateways": gw,
        "streams": queues,
        "store": store_health,
        "downlink_schedule_latency_us": {
            "last": metrics.schedule_latency_us().0,
            "max": metrics.schedule_latency_us().1,
        },
        "uplinks": {
            "accepted": metrics.uplinks("accepted"),
            "mic_failed": metrics.uplinks("mic_failed"),
            "replay": metrics.uplinks("replay"),
            "unknown_dev_addr": metrics.uplinks("unknown_dev_addr"),
        },
    })
}
