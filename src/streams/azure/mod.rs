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
//! in-flight PUBACKs, then reopened with a fresh token) a fifth of that before IoT Hub would
//! close it at expiry (half of it, at most a minute, for short tokens).

mod conn;
mod dispatch;
mod tunnel;
pub mod wire;

use super::connect::{self, Retry, Session, SessionEnd};
use super::error::{SessionError, SetupError};
use super::lanes::Lanes;
use super::mqtt::client::{self, Endpoint};
use super::tls;
use super::StreamContext;
use crate::config::{AzureConfig, AzureIdentity, AzureKey, DownlinkFormat, PolicyKey};
use crate::model::{DownlinkEvent, Eui64, Secret};
use conn::{Identity, Report};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use wire::SasKey;

/// Downlink events waiting for a connection, per connection.
const EVENT_QUEUE: usize = 64;

/// What to check when IoT Hub refuses a connection.
const REFUSED_HINT: &str = "check the key (device key, or policy name + key with DeviceConnect), that the device exists and is enabled in the hub, and the gateway's clock (SAS tokens expire)";

/// What every connection of the stream shares.
pub(crate) struct Shared {
    ctx: StreamContext,
    /// `{hub}.azure-devices.net`: the username and the SAS resource use it.
    hostname: String,
    endpoint: Endpoint,
    /// The server for log lines (no secrets).
    shown: String,
    sas_ttl: Duration,
    keep_alive: Duration,
    /// Unacknowledged records per connection.
    inflight: usize,
    raw_downlinks: bool,
    twin: bool,
    /// Last twin update per IoT Hub device id (rate limit across reconnects).
    last_twin: Mutex<HashMap<String, Instant>>,
    /// Device-stream tunnels (`tunnel_ports`, gateway identity); they outlive reconnects.
    tunnels: Option<Arc<tunnel::Tunnels>>,
}

enum Mode {
    Gateway(Identity),
    Device(dispatch::Keys),
}

pub(crate) struct AzureStream {
    shared: Arc<Shared>,
    mode: Mode,
    events: mpsc::Receiver<DownlinkEvent>,
}

fn key_of(secret: &Secret, policy: Option<&str>, what: &'static str) -> Result<SasKey, SetupError> {
    SasKey::new(secret, policy).map_err(|e| SetupError::Key {
        what,
        reason: e.to_string(),
    })
}

fn policy_of(p: &PolicyKey) -> Result<SasKey, SetupError> {
    key_of(&p.key, Some(&p.name), "policy_key")
}

impl AzureStream {
    pub fn new(
        cfg: &AzureConfig,
        ctx: StreamContext,
        events: mpsc::Receiver<DownlinkEvent>,
    ) -> Result<Self, SetupError> {
        let endpoint = client::endpoint(&cfg.server, || {
            tls::client_config_with_roots(&tls::AZURE_IOT_ROOTS, cfg.ca_file.as_deref(), &[])
        })?;
        let mode = match &cfg.identity {
            AzureIdentity::Gateway { device_id, key } => Mode::Gateway(Identity {
                hub_id: device_id.clone(),
                key: match key {
                    AzureKey::Device(k) => key_of(k, None, "device_key")?,
                    AzureKey::Policy(p) => policy_of(p)?,
                },
                device: None,
            }),
            AzureIdentity::Device {
                device_id,
                policy,
                device_keys,
                idle_timeout,
                max_connections,
            } => {
                let mut keys = HashMap::new();
                for (dev, k) in device_keys {
                    keys.insert(dev.clone(), key_of(k, None, "device_keys")?);
                }
                Mode::Device(dispatch::Keys {
                    template: device_id.clone(),
                    by_device: keys,
                    policy: policy.as_ref().map(policy_of).transpose()?,
                    idle: *idle_timeout,
                    max_connections: *max_connections,
                })
            }
        };
        let tunnels = tunnel::Tunnels::new(
            &cfg.tunnel,
            &ctx.name,
            cfg.ca_file.as_deref(),
            ctx.metrics.clone(),
        )?;
        Ok(AzureStream {
            shared: Arc::new(Shared {
                ctx,
                hostname: cfg.hostname.clone(),
                endpoint,
                shown: cfg.server.to_string(),
                sas_ttl: cfg.sas_ttl,
                keep_alive: cfg.keep_alive,
                inflight: usize::from(cfg.inflight),
                raw_downlinks: cfg.downlink_format == DownlinkFormat::Raw,
                twin: cfg.twin,
                last_twin: Mutex::new(HashMap::new()),
                tunnels,
            }),
            mode,
            events,
        })
    }

    pub async fn run(self) {
        match self.mode {
            Mode::Gateway(id) => {
                let ctx = self.shared.ctx.clone();
                let mut g = GatewaySession {
                    sh: self.shared,
                    id,
                    events: self.events,
                };
                connect::run(&mut g, &ctx, Retry::connection()).await;
            }
            Mode::Device(keys) => {
                dispatch::Dispatcher::new(self.shared, keys)
                    .run(self.events)
                    .await
            }
        }
    }
}

/// A hint for an IoT Hub failure.
fn hint(e: &SessionError) -> Option<&'static str> {
    match e {
        SessionError::Refused(_) => Some(REFUSED_HINT),
        e => e.hint(),
    }
}

/// One IoT Hub identity for the whole gateway: one connection, the queue read through the
/// catch-up lanes.
struct GatewaySession {
    sh: Arc<Shared>,
    id: Identity,
    events: mpsc::Receiver<DownlinkEvent>,
}

impl Session for GatewaySession {
    const WHAT: &'static str = "IoT Hub connection";

    fn server(&self) -> String {
        self.sh.shown.clone()
    }

    fn hint(&self, e: &SessionError) -> Option<&'static str> {
        hint(e)
    }

    async fn session(&mut self) -> SessionEnd {
        let sh = &self.sh;
        let queue = sh.ctx.queue.clone();
        let (rec_tx, rec_rx) = mpsc::channel(sh.inflight);
        let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
        let (rep_tx, mut reports) = mpsc::unbounded_channel();
        let close = sh.ctx.cancel.child_token();
        let task = tokio::spawn(conn::run(
            sh.clone(),
            self.id.clone(),
            0,
            rec_rx,
            ev_rx,
            rep_tx,
            close.clone(),
        ));
        let mut lanes: Option<Lanes> = None;
        let mut outstanding = 0usize;
        let end = loop {
            if let Some(l) = lanes.as_mut() {
                // Fill the window; records go to the connection in lane order.
                'fill: while outstanding < sh.inflight {
                    let batch = match l.next(&queue, sh.inflight - outstanding) {
                        Ok(b) => b,
                        Err(e) => {
                            tracing::error!(stream = %sh.ctx.name, error = %e, "cannot read the queue");
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
                        sh.ctx.metrics.stream_connected(&sh.ctx.name, true);
                        tracing::info!(stream = %sh.ctx.name, device = %self.id.hub_id, server = %sh.shown, backlog = queue.len(), "IoT Hub connected");
                        // A new session re-reads the queue from its oldest record.
                        lanes = Some(Lanes::new(&queue));
                    }
                    Some((_, Report::Done(_))) => outstanding = outstanding.saturating_sub(1),
                    Some((_, Report::Activity)) => {}
                    Some((_, Report::Closed(e))) => break e,
                    None => break SessionEnd::failed(SessionError::ClientClosed),
                },
                _ = queue.appended(), if connected && outstanding < sh.inflight => {}
                Some(e) = self.events.recv(), if connected => {
                    if ev_tx.try_send(e).is_err() {
                        sh.ctx.metrics.downlink_event("event_dropped");
                    }
                }
            }
        };
        let _ = task.await;
        if matches!(end, SessionEnd::Renew) {
            tracing::debug!(stream = %sh.ctx.name, "SAS token renewed (reconnecting)");
        }
        end
    }
}

/// The order key of a LoRaWAN device (as [`crate::model::Record::order_key`] for uplinks).
fn device_key(dev_eui: Eui64) -> u64 {
    dev_eui.to_u64() & !(1 << 63)
}

impl AzureStream {
    /// `check --online`: with a gateway identity, one CONNECT as that device with a fresh SAS
    /// token (IoT Hub allows one connection per device: a running daemon's connection is
    /// replaced once, and it reconnects). Device identities are checked per device when the
    /// daemon connects them; here only the hub's TLS is.
    pub async fn probe(&self) -> Result<String, SessionError> {
        match &self.mode {
            Mode::Gateway(who) => {
                let o = conn::options(&self.shared, who);
                client::probe(o, std::time::Duration::from_secs(10)).await?;
                Ok(format!(
                    "CONNACK from {} as device {}",
                    self.shared.shown, who.hub_id
                ))
            }
            Mode::Device(_) => Ok(format!(
                "{}: identity = \"device\": each device's key is checked when the daemon connects it (not probed)",
                self.shared.shown
            )),
        }
    }
}
