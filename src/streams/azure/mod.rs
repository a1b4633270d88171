//! The Azure IoT Hub stream (`kind = "azure-iot-hub"`): uplinks as device-to-cloud messages,
//! cloud-to-device messages as downlinks, over MQTT 3.1.1 with TLS (8883) or MQTT over
//! WebSocket (443, `/$iothub/websocket`), authenticated with SAS tokens.
//!
//! Guarantees, as for the other MQTT streams: a record leaves the stream's queue only when IoT
//! Hub acknowledged its QoS 1 publish (PUBACK); connections are never resumed (what was in flight
//! is sent again on the next connection, with the same correlation id); each LoRaWAN device's
//! messages are published in queue order; a cloud-to-device message is acknowledged to IoT Hub
//! only once the downlink is in the store (so IoT Hub redelivers it after a crash). A record
//! IoT Hub can never take (over 256 KB) is dropped with a counter and a log line instead of
//! blocking the queue.
//!
//! Two identity modes:
//! - `identity = "gateway"`: one IoT Hub device (`device_id`, `device_key` or a policy key) for
//!   the whole gateway; one connection; the LoRaWAN device is named in each message's properties
//!   and body. Reading the queue uses the catch-up lanes (`lanes.rs`) like the MQTT stream.
//! - `identity = "device"`: each LoRaWAN device is its own IoT Hub device (IoT Hub allows one
//!   MQTT connection per device id), so one stream queue feeds many connections. The dispatcher
//!   ([`dispatch`]) indexes the queue per device, opens connections on demand (at most
//!   `max_connections`), closes them after `idle_timeout_s` without traffic, and acknowledges
//!   records as their PUBACKs come.
//!
//! SAS tokens last `sas_ttl_s` (default 3600 s); a connection is renewed (closed after its
//! in-flight PUBACKs, then reopened with a fresh token) at 80 % of that, before IoT Hub would
//! close it at expiry.

mod conn;
mod dispatch;
pub mod wire;

use super::backoff::Backoff;
use super::lanes::Lanes;
use super::session::{self, Endpoint, FailureLog};
use super::tls;
use super::StreamContext;
use crate::config::{azure_defaults as defaults, StreamConfig};
use crate::model::{DownlinkEvent, Eui64, Secret};
use conn::{Ended, Identity, Report};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use wire::SasKey;

/// Downlink events waiting for a connection, per connection.
const EVENT_QUEUE: usize = 64;

/// What every connection of the stream shares.
pub(crate) struct Shared {
    name: String,
    ctx: StreamContext,
    /// `{hub}.azure-devices.net`: the username and the SAS resource use it.
    hostname: String,
    endpoint: Endpoint,
    sas_ttl: Duration,
    keep_alive: Duration,
    /// Unacknowledged records per connection.
    inflight: usize,
    raw_downlinks: bool,
    twin: bool,
    /// Last twin update per IoT Hub device id (rate limit across reconnects).
    last_twin: Mutex<HashMap<String, Instant>>,
}

enum Mode {
    Gateway(Identity),
    Device(dispatch::Keys),
}

pub struct AzureStream {
    shared: Arc<Shared>,
    mode: Mode,
    events: mpsc::Receiver<DownlinkEvent>,
}

fn key_of(secret: &Secret, policy: Option<&str>, what: &str) -> Result<SasKey, String> {
    SasKey::new(secret, policy).map_err(|e| format!("{what}: {e}"))
}

impl AzureStream {
    pub fn new(
        cfg: &StreamConfig,
        ctx: StreamContext,
        events: mpsc::Receiver<DownlinkEvent>,
    ) -> Result<Self, String> {
        let hostname = cfg
            .hostname
            .clone()
            .filter(|h| !h.is_empty())
            .ok_or("azure-iot-hub needs hostname = \"<hub>.azure-devices.net\"")?;
        let mut server = cfg
            .server
            .clone()
            .unwrap_or_else(|| format!("mqtts://{hostname}:8883"));
        // MQTT over WebSocket lives at this path (IoT Hub MQTT docs, "Using the MQTT protocol
        // directly ... over WebSockets").
        if let Ok(u) = url::Url::parse(&server) {
            if u.scheme() == "wss" && (u.path().is_empty() || u.path() == "/") {
                server = format!("{}/$iothub/websocket", server.trim_end_matches('/'));
            }
        }
        let endpoint = session::endpoint(&server, || {
            tls::client_config_with_roots(&tls::AZURE_IOT_ROOTS, cfg.ca_file.as_deref(), &[])
        })?;
        if matches!(
            endpoint.transport,
            rumqttc::Transport::Tcp | rumqttc::Transport::Ws
        ) {
            return Err(format!(
                "server {server:?}: IoT Hub needs TLS (mqtts:// or wss://)"
            ));
        }
        let policy = match (&cfg.policy_name, &cfg.policy_key) {
            (Some(n), Some(k)) => Some(key_of(k, Some(n), "policy_key")?),
            _ => None,
        };
        let mode = match cfg.identity.as_deref().unwrap_or("device") {
            "gateway" => {
                let id = cfg
                    .device_id
                    .clone()
                    .ok_or("identity = \"gateway\" needs device_id")?;
                let key = match &cfg.device_key {
                    Some(k) => key_of(k, None, "device_key")?,
                    None => policy.ok_or("identity = \"gateway\" needs device_key")?,
                };
                Mode::Gateway(Identity {
                    hub_id: id,
                    key,
                    device: None,
                })
            }
            _ => {
                let mut keys = HashMap::new();
                for (dev, k) in cfg.device_keys.iter().flatten() {
                    keys.insert(dev.clone(), key_of(k, None, "device_keys")?);
                }
                Mode::Device(dispatch::Keys {
                    template: cfg
                        .device_id
                        .clone()
                        .unwrap_or_else(|| defaults::DEVICE_ID.into()),
                    by_device: keys,
                    policy,
                    idle: Duration::from_secs(
                        cfg.idle_timeout_s.unwrap_or(defaults::IDLE_TIMEOUT_S),
                    ),
                    max_connections: cfg.max_connections.unwrap_or(defaults::MAX_CONNECTIONS),
                })
            }
        };
        Ok(AzureStream {
            shared: Arc::new(Shared {
                name: cfg.name.clone(),
                ctx,
                hostname,
                endpoint,
                sas_ttl: Duration::from_secs(cfg.sas_ttl_s.unwrap_or(defaults::SAS_TTL_S)),
                keep_alive: Duration::from_secs(cfg.keep_alive_s.unwrap_or(defaults::KEEP_ALIVE_S)),
                inflight: usize::from(cfg.inflight.unwrap_or(defaults::INFLIGHT)),
                raw_downlinks: cfg.downlink_format.as_deref() == Some("raw"),
                twin: cfg.twin == Some(true),
                last_twin: Mutex::new(HashMap::new()),
            }),
            mode,
            events,
        })
    }

    pub async fn run(self) {
        match self.mode {
            Mode::Gateway(id) => run_gateway(self.shared, id, self.events).await,
            Mode::Device(keys) => {
                dispatch::Dispatcher::new(self.shared, keys)
                    .run(self.events)
                    .await
            }
        }
    }
}

/// Log a connection that ended badly, with what to check.
fn log_failure(sh: &Shared, hub_id: &str, end: &Ended, failures: u64, retry_in: Duration) {
    match end {
        Ended::Refused(code) => tracing::error!(
            stream = %sh.name, device = %hub_id, code = %code, failures,
            retry_in_ms = retry_in.as_millis() as u64,
            "IoT Hub refused the connection: check the key (device key, or policy name + key with DeviceConnect), that the device exists and is enabled in the hub, and the gateway's clock (SAS tokens expire)"
        ),
        Ended::Failed(e) => tracing::warn!(
            stream = %sh.name, device = %hub_id, server = %sh.endpoint.shown, error = %e, failures,
            retry_in_ms = retry_in.as_millis() as u64, "IoT Hub connection failed"
        ),
        Ended::Stopped | Ended::Renew => {}
    }
}

/// One IoT Hub identity for the whole gateway: one connection, the queue read through the
/// catch-up lanes, reconnecting with backoff (or at once for a token renewal).
async fn run_gateway(sh: Arc<Shared>, id: Identity, mut events: mpsc::Receiver<DownlinkEvent>) {
    let queue = sh.ctx.queue.clone();
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut failures = FailureLog::default();
    loop {
        if sh.ctx.cancel.is_cancelled() {
            return;
        }
        let (rec_tx, rec_rx) = mpsc::channel(sh.inflight);
        let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
        let (rep_tx, mut reports) = mpsc::unbounded_channel();
        let close = sh.ctx.cancel.child_token();
        let task = tokio::spawn(conn::run(
            sh.clone(),
            id.clone(),
            0,
            rec_rx,
            ev_rx,
            rep_tx,
            close.clone(),
        ));
        let started = Instant::now();
        let mut lanes: Option<Lanes> = None;
        let mut outstanding = 0usize;
        let end = loop {
            if let Some(l) = lanes.as_mut() {
                // Fill the window; records go to the connection in lane order.
                'fill: while outstanding < sh.inflight {
                    let batch = match l.next(&queue, sh.inflight - outstanding) {
                        Ok(b) => b,
                        Err(e) => {
                            tracing::error!(stream = %sh.name, error = %e, "cannot read the queue");
                            break;
                        }
                    };
                    if batch.is_empty() {
                        break;
                    }
                    for r in batch {
                        // Cannot be full (outstanding < capacity); closed = the connection
                        // ended, its Closed report is on its way, and the next session
                        // reads the queue from its oldest record again.
                        if rec_tx.try_send(r).is_err() {
                            break 'fill;
                        }
                        outstanding += 1;
                    }
                }
            }
            let connected = lanes.is_some();
            tokio::select! {
                r = reports.recv() => match r {
                    Some((_, Report::Connected)) => {
                        sh.ctx.metrics.stream_connected(&sh.name, true);
                        tracing::info!(stream = %sh.name, device = %id.hub_id, server = %sh.endpoint.shown, backlog = queue.len(), "IoT Hub connected");
                        // A new session re-reads the queue from its oldest record.
                        lanes = Some(Lanes::new(&queue));
                    }
                    Some((_, Report::Done(_))) => outstanding = outstanding.saturating_sub(1),
                    Some((_, Report::Activity)) => {}
                    Some((_, Report::Closed(e))) => break e,
                    None => break Ended::Failed("connection task ended".into()),
                },
                _ = queue.appended(), if connected && outstanding < sh.inflight => {}
                Some(e) = events.recv(), if connected => {
                    if ev_tx.try_send(e).is_err() {
                        sh.ctx.metrics.downlink_event("event_dropped");
                    }
                }
            }
        };
        let _ = task.await;
        sh.ctx.metrics.stream_connected(&sh.name, false);
        match end {
            Ended::Stopped => return,
            Ended::Renew => {
                tracing::debug!(stream = %sh.name, "SAS token renewed (reconnecting)");
                backoff.reset();
                failures.reset();
            }
            Ended::Refused(_) | Ended::Failed(_) => {
                if started.elapsed() > Duration::from_secs(30) {
                    backoff.reset();
                    failures.reset();
                }
                let (log, n) = failures.failed();
                let delay = backoff.next_delay();
                if log {
                    log_failure(&sh, &id.hub_id, &end, n, delay);
                }
                tokio::select! {
                    _ = sh.ctx.cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// The order key of a LoRaWAN device (as [`crate::model::Record::order_key`] for uplinks).
fn device_key(dev_eui: Eui64) -> u64 {
    dev_eui.to_u64() & !(1 << 63)
}
