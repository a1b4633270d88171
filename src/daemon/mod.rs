//! Wiring: builds every stage from the config, connects them with bounded channels and typed
//! handles, and stops them in data-path order. Nothing here touches a frame or a record.
//!
//! ```text
//!  UDP ──▶ ingress::udp ──(mpsc, bounded)──▶ uplink stage ──▶ store ──▶ stream 1 ──▶ broker
//!  (PUSH_ACK at once)  │                      (dedup, MIC,      (fsync      stream 2 ──▶ …
//!                      │ TX_ACK               FCnt, decrypt)    policy)     ▲ ack = delete
//!                      ▼                           │ opportunity            │ downlinks
//!                   downlink scheduler ◀───────────┴── DownlinkHandle ──────┘
//! ```
//!
//! Stop order (SIGTERM, SIGINT, [`Daemon::stop`]): ingress stops reading; the uplink stage
//! stores everything still in its dedup window; streams finish what is in flight (bounded);
//! the store is flushed. The whole stop is bounded by [`STOP_DEADLINE`].
//!
//! - [`health`]: the `/health` document and the scrape-time values of `/metrics`;
//! - [`housekeeping`]: expiry of old records, heap trimming, one malloc arena;
//! - [`systemd`]: readiness, stop and reload notices, watchdog keep-alives while the main
//!   loops (ingress, uplink stage, downlink scheduler, store committer) beat.

pub mod commands;
pub mod health;
mod housekeeping;
pub(crate) use housekeeping::limit_heap_arenas;
pub mod instance;
pub mod preflight;
mod streams;
pub mod systemd;

use crate::config::Config;
use crate::downlink::{DownlinkHandle, Scheduler};
use crate::ingress::udp::{self, Downlinker, Gateways};
use crate::metrics::{self, Metrics};
use crate::store::{Store, StoreError};
use crate::streams::StreamError;
use crate::uplink::{JoinSettings, Network, SharedRoutes, UplinkStage};
use health::{Health, Sources};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
pub use streams::StreamChanges;
use streams::StreamSet;
use systemd::{Notice, ServiceManager};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The contract: a graceful stop takes at most 5 s.
pub const STOP_DEADLINE: Duration = Duration::from_millis(4_500);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// `hint`: empty, or what to change (a store outside the unit's writable paths).
    #[error("cannot open the store at {path}: {source}{hint}")]
    Store {
        path: String,
        source: StoreError,
        hint: String,
    },
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Instance(#[from] instance::InstanceError),
    #[error("payload codec: {0}")]
    Codec(#[from] crate::codec::CodecError),
}

/// A running daemon.
pub struct Daemon {
    udp_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    sources: Sources,
    ingress_cancel: CancellationToken,
    streams_cancel: CancellationToken,
    misc_cancel: CancellationToken,
    ingress: JoinHandle<()>,
    uplink: JoinHandle<()>,
    /// The running streams; a reload changes them (one reload at a time).
    streams: tokio::sync::Mutex<StreamSet>,
    scheduler: JoinHandle<()>,
    misc: Vec<JoinHandle<()>>,
    downlinks: DownlinkHandle,
    service: ServiceManager,
    watchdog: systemd::SupervisorThread,
    /// What a reload changes: the devices (in the registry and the formats' facts), and the
    /// configuration in effect, to tell which other changes need a restart.
    registry: crate::downlink::SharedRegistry,
    facts: Arc<crate::streams::format::Facts>,
    codecs: Arc<crate::codec::Codecs>,
    running: std::sync::Mutex<Config>,
    control: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<commands::Control>>>,
}

/// What a reload did ([`Daemon::reload`]).
#[derive(Debug, Clone, Default)]
pub struct ReloadReport {
    pub devices: crate::lorawan::session::ReloadSummary,
    pub streams: StreamChanges,
    /// Sections that changed but need a restart to take effect (`[gateway]`, `[[alert]]`,
    /// ...): the daemon runs on with the ones it has.
    pub needs_restart: Vec<&'static str>,
}

impl Daemon {
    /// Open the store, bind the sockets and start every task.
    pub async fn start(cfg: &Config) -> Result<Daemon, DaemonError> {
        Daemon::start_under(cfg, ServiceManager::none()).await
    }

    /// [`Daemon::start`] under a service manager: `READY=1` once everything runs, watchdog
    /// keep-alives while the main loops beat (see [`systemd`]).
    pub async fn start_under(cfg: &Config, service: ServiceManager) -> Result<Daemon, DaemonError> {
        let metrics = Metrics::new();
        let liveness = service.liveness();
        let store_err = |source: StoreError| {
            let denied = matches!(
                source.io_error_kind(),
                Some(std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem)
            );
            let hint = match cfg.storage.outside_state_dir_note() {
                Some(note) if denied => format!(". {note}"),
                _ => String::new(),
            };
            DaemonError::Store {
                path: cfg.storage.path.display().to_string(),
                source,
                hint,
            }
        };
        let queue_specs: Vec<_> = cfg
            .streams
            .iter()
            .map(|s| (s.name.clone(), s.when_full))
            .collect();
        let (store, report) = Store::open(&cfg.storage, &queue_specs).map_err(store_err)?;
        if let Some(p) = &report.quarantined {
            tracing::error!(moved_to = %p.display(), "the previous store was unreadable and has been kept aside");
        }
        tracing::info!(
            backend = store.backend().name(),
            path = %cfg.storage.path.display(),
            flush_every_ms = cfg.storage.flush_every_ms,
            "store opened"
        );
        let registry = crate::devices::registry(cfg, &store).map_err(store_err)?;
        let instance_id: Arc<str> = instance::load_or_create(&cfg.storage.path)?.into();

        let listen = cfg.gateway.listen;
        let bind_err = |source| DaemonError::Bind {
            what: "[gateway] listen",
            addr: listen,
            source,
        };
        let socket = udp::bind(listen, cfg.gateway.udp_recv_buffer).map_err(bind_err)?;
        let udp_addr = socket.local_addr().map_err(bind_err)?;
        let socket = Arc::new(socket);

        let ingress_cancel = CancellationToken::new();
        let streams_cancel = CancellationToken::new();
        let misc_cancel = CancellationToken::new();
        let gateways = Gateways::new(cfg.gateway.max_gateways, cfg.gateway.pin_gateway_address);
        let registry = Arc::new(std::sync::Mutex::new(registry));
        let activity = crate::activity::Activity::new();
        // Payload codecs: decoding in the uplink stage, encoding on the way to the scheduler.
        let codecs = Arc::new(crate::codec::Codecs::from_config(cfg)?);
        let (downlinks, down_rx) = crate::downlink::channel(codecs.clone());

        let facts = Arc::new(crate::streams::format::Facts::new(cfg));
        let registry_for_reload = registry.clone();
        let codecs_for_reload = codecs.clone();
        let sources = Sources {
            metrics: metrics.clone(),
            store: store.clone(),
            gateways: gateways.clone(),
            started: Instant::now(),
        };
        // Remote commands (streams with `commands = true`); `reload` and `log_level` go to
        // the run loop that takes `control_rx` ([`Daemon::take_control`]).
        let (control_tx, control_rx) = tokio::sync::mpsc::channel(4);
        let commands = commands::Commands::new(sources.clone(), registry.clone(), control_tx);
        // Streams first, so nothing appended is missed.
        let routes = SharedRoutes::default();
        let stream_infos = Arc::new(std::sync::RwLock::new(Vec::new()));
        let (streams, links) = StreamSet::start(
            streams::Shared {
                store: store.clone(),
                metrics: metrics.clone(),
                cancel: streams_cancel.clone(),
                gateway_eui: cfg.gateway.eui,
                instance_id: instance_id.clone(),
                commands,
                downlinks: downlinks.clone(),
                facts: facts.clone(),
                routes: routes.clone(),
                infos: stream_infos.clone(),
            },
            &cfg.streams,
        )?;

        let plan = crate::downlink::window::RxPlan::new(cfg.gateway.region, cfg.gateway.rx2_dr);
        let mac_policy = crate::devices::mac_policy(cfg);
        let scheduler = Scheduler::new(
            registry.clone(),
            store.clone(),
            Downlinker::new(socket.clone(), gateways.clone()),
            plan,
            mac_policy.clone(),
            cfg.gateway.class_c_gateway,
            links,
            metrics.clone(),
        );
        // TX_ACKs go from ingress straight to the scheduler.
        let (ack_tx, ack_rx) = tokio::sync::mpsc::channel(256);
        let scheduler =
            tokio::spawn(scheduler.run(down_rx, ack_rx, liveness.heartbeat("downlink scheduler")));

        let (tx, rx) = tokio::sync::mpsc::channel(4096);
        let registry_for_alerts = registry.clone();
        let registry_for_page = registry.clone();
        let stage = UplinkStage::new(
            registry,
            Some(downlinks.clone()),
            store.clone(),
            routes,
            metrics.clone(),
            codecs,
            Network {
                dedup_window: cfg.gateway.dedup_window(),
                join: JoinSettings {
                    plan,
                    net_id: cfg.gateway.net_id.0,
                    sub_band: cfg.gateway.sub_band,
                    extra_channels: cfg.gateway.extra_channels_hz(),
                },
                mac: mac_policy,
            },
        );
        let stage = stage.with_activity(activity.clone());
        let uplink = tokio::spawn(stage.run(rx, liveness.heartbeat("uplink stage")));
        let ingress = tokio::spawn(udp::run(
            socket,
            udp::Outlets {
                uplinks: tx,
                tx_acks: ack_tx,
            },
            gateways.clone(),
            udp::Policy {
                allowed: cfg.gateway.allowed_gateways.iter().copied().collect(),
            },
            metrics.clone(),
            ingress_cancel.clone(),
            liveness.heartbeat("ingress (UDP)"),
        ));

        // Helper tasks that hold the store: awaited on stop.
        let mut misc: Vec<JoinHandle<()>> = Vec::new();
        // Group commits, batched acknowledgements, retries while the disk refuses writes.
        misc.push(tokio::spawn(store.clone().run_committer(
            misc_cancel.clone(),
            liveness.heartbeat("store committer"),
        )));
        if let Some(max_age) = cfg.storage.max_age {
            misc.push(tokio::spawn(housekeeping::expire_old(
                store.clone(),
                max_age,
                misc_cancel.clone(),
            )));
        }
        misc.push(tokio::spawn(housekeeping::trim_heap_regularly(
            misc_cancel.clone(),
        )));

        // Alerts stop with ingress: nothing is queued after the final flush.
        misc.push(tokio::spawn(
            crate::alerts::AlertEngine::new(
                cfg,
                store.clone(),
                metrics.clone(),
                registry_for_alerts,
                gateways.clone(),
            )
            .with_activity(activity.clone())
            .run(ingress_cancel.clone()),
        ));

        {
            // Not `sources` itself: it holds the `Metrics`, which would then hold itself.
            let (store, gateways) = (store.clone(), sources.gateways.clone());
            metrics.set_snapshot(move || health::snapshot(&store, &gateways));
        }
        let mut metrics_addr = None;
        // A metrics port that is taken (node_exporter's 9100 is the usual one) costs the
        // metrics, /health and the status page, not the uplinks: the daemon runs on and says
        // loudly what to change; the default port falls back to the next free one.
        let listener = metrics::bind(&cfg.metrics.candidates()).await;
        if let Some(l) = listener {
            metrics_addr = l.local_addr().ok();
            let s = sources.clone();
            let health = move || {
                let h = s.health();
                metrics::HealthAnswer {
                    healthy: h.status == health::Status::Ok,
                    json: serde_json::to_string(&h).unwrap_or_default(),
                }
            };
            let status = crate::web::pages(
                sources.clone(),
                registry_for_page,
                activity.clone(),
                stream_infos,
            );
            misc.push(tokio::spawn(metrics::serve(
                l,
                metrics.clone(),
                health,
                status,
                misc_cancel.clone(),
            )));
            // Queue depth over time, for the page.
            misc.push(tokio::spawn(crate::web::sample_queues(
                store.clone(),
                activity.clone(),
                misc_cancel.clone(),
            )));
        }

        tracing::info!(
            udp = %udp_addr,
            metrics = %metrics_addr.map_or("off".to_string(), |a| a.to_string()),
            devices = cfg.devices.len(),
            streams = cfg.streams.len(),
            queued = store.queues().iter().map(|q| q.len()).sum::<u64>(),
            "lorastream started"
        );
        if cfg.gateway.devices_dir.is_some() {
            tracing::info!("devices: {}", cfg.device_sources_summary());
        }
        service.notify(Notice::Ready(&format!(
            "running: UDP {udp_addr}, {} devices, {} streams",
            cfg.devices.len(),
            cfg.streams.len()
        )));
        // After READY=1, so that the first keep-alive never overtakes it.
        let watchdog = systemd::Supervisor::new(service.clone(), liveness).spawn();
        Ok(Daemon {
            udp_addr,
            metrics_addr,
            sources,
            ingress_cancel,
            streams_cancel,
            misc_cancel,
            ingress,
            uplink,
            streams: tokio::sync::Mutex::new(streams),
            scheduler,
            misc,
            downlinks,
            service,
            watchdog,
            registry: registry_for_reload,
            facts,
            codecs: codecs_for_reload,
            running: std::sync::Mutex::new(cfg.clone()),
            control: std::sync::Mutex::new(Some(control_rx)),
        })
    }

    /// The requests of remote commands only the run loop can carry out (`reload`,
    /// `log_level`); the first call gets them.
    pub fn take_control(&self) -> Option<tokio::sync::mpsc::Receiver<commands::Control>> {
        self.control.lock().ok()?.take()
    }

    /// Take a new configuration (`SIGHUP`): devices, applications and their payload codecs
    /// apply at once, kept devices keep their counters, sessions and MAC state
    /// ([`crate::lorawan::session::Registry::reload`]); streams are added, changed and removed
    /// (see [`streams`]: unchanged ones keep their connection, every queue is kept). Other
    /// changed sections are reported in [`ReloadReport::needs_restart`] and not applied. A
    /// stream or codec that cannot be set up refuses the reload before anything changed.
    pub async fn reload(&self, new: &Config) -> Result<ReloadReport, DaemonError> {
        // One reload at a time: the stream set's lock is held throughout.
        let mut streams = self.streams.lock().await;
        let running = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let json = |v: &dyn erased_json::Json| v.json();
        let mut needs_restart = Vec::new();
        if json(&running.gateway) != json(&new.gateway) {
            needs_restart.push("[gateway]");
        }
        if json(&running.storage) != json(&new.storage) {
            needs_restart.push("[storage]");
        }
        if json(&running.metrics) != json(&new.metrics) {
            needs_restart.push("[metrics]");
        }
        if running.runtime != new.runtime {
            needs_restart.push("[runtime]");
        }
        if running.alerts != new.alerts {
            needs_restart.push("[[alert]]");
        }
        // The new sections as the running [gateway] and [storage] sections make them (the MAC
        // policy; a stream's default when_full).
        let mut merged = running.clone();
        merged.applications = new.applications.clone();
        merged.devices = new.devices.clone();
        merged.device_sources = new.device_sources.clone();
        merged.streams = new.streams.clone();
        // What can fail first: a script that no longer loads, a device table that cannot be
        // read, refuse the reload before anything changed.
        let codecs = crate::codec::Codecs::prepare(&merged)?;
        let store = &self.sources.store;
        let fresh =
            crate::devices::registry(&merged, store).map_err(|source| DaemonError::Store {
                path: merged.storage.path.display().to_string(),
                source,
                hint: String::new(),
            })?;
        // Streams next: one that cannot be built refuses the reload, the others unchanged.
        let stream_changes = streams.apply(&merged.streams, STOP_DEADLINE).await?;
        self.codecs.install(codecs);
        let devices = {
            let mut reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
            reg.reload(fresh)
        };
        self.facts.set_devices(&merged);
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = merged;
        Ok(ReloadReport {
            devices,
            streams: stream_changes,
            needs_restart,
        })
    }

    /// The service manager the daemon reports to (the command line sends reload notices).
    pub fn service_manager(&self) -> &ServiceManager {
        &self.service
    }

    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }
    pub fn metrics(&self) -> &Metrics {
        &self.sources.metrics
    }
    pub fn store(&self) -> &Store {
        &self.sources.store
    }
    pub fn gateways(&self) -> &Gateways {
        &self.sources.gateways
    }

    /// Queue a downlink as if `req.stream` had received it (the demo uses this); resolves once
    /// it is stored or refused.
    pub async fn request_downlink(&self, req: crate::model::DownlinkRequest) {
        let _ = self.downlinks.submit(req).await;
    }

    /// The `/health` document.
    pub fn health(&self) -> Health {
        self.sources.health()
    }

    /// Graceful stop, in data-path order, within [`STOP_DEADLINE`].
    pub async fn stop(self) {
        let deadline = tokio::time::Instant::now() + STOP_DEADLINE;
        // Loops end one by one now: their heartbeats stop on purpose.
        self.service.notify(Notice::Stopping);
        self.watchdog.stop().await;
        // A task that overruns the deadline is aborted, so that when `stop` returns nothing
        // holds the store any more (a store reopened in the same process must be alone).
        use streams::finish;
        drop(self.downlinks);
        self.ingress_cancel.cancel();
        finish(self.ingress, deadline).await;
        // The uplink stage ends when the ingress sender is gone, after storing its window.
        finish(self.uplink, deadline).await;
        self.streams_cancel.cancel();
        self.streams.into_inner().stop_all(deadline).await;
        // The scheduler ends when its last handle (uplink stage, streams) is gone.
        finish(self.scheduler, deadline).await;
        if let Err(e) = self.sources.store.flush().await {
            tracing::error!(error = %e, "final store flush failed");
        }
        self.sources.metrics.clear_snapshot();
        self.misc_cancel.cancel();
        for t in self.misc {
            finish(t, deadline + Duration::from_millis(300)).await;
        }
        tracing::info!("lorastream stopped");
    }
}

/// Compare configuration sections by their serialized form (they hold no secret and derive
/// `Serialize`, not `PartialEq`).
mod erased_json {
    pub trait Json {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string(self).unwrap_or_default()
        }
    }
}
