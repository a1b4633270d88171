//! The generic MQTT stream (`kind = "mqtt"`): QoS 1 publishes, deleted from the queue on PUBACK.
//!
//! How acknowledgements are matched: see [`super::session::Inflight`] (a FIFO of record
//! sequence numbers kept in rumqttc's order; `pkid → seq` on write; delete on PUBACK). Here the
//! feeder task and the event-loop task share it under a lock.
//!
//! Connections are never resumed: on any error the client and event loop are dropped, and the
//! next connection (after a backoff with jitter) re-reads the queue from its oldest record. The
//! queue is the only truth, so rumqttc's in-memory pending list (which it drops silently when
//! the broker has no session) does not matter. The price is that records in flight during a
//! disconnect are sent again, with the same correlation id.
//!
//! AWS IoT Core (`kind = "aws-iot"`) is this stream with its cloud's rules: X.509 client
//! certificate, Amazon Root CA 1 as the default trust, ALPN `x-amzn-mqtt-ca` on port 443 (SNI is
//! always sent), the thing name as client id, a persistent session (downlinks published while
//! the gateway was offline are delivered on reconnect), 128 KiB payloads, and an optional,
//! rate-limited device-shadow update.

use super::backoff::Backoff;
use super::format::{record_json, topic, Delivery};
use super::session::{self, FailureLog, Inflight};
use super::tls;
use super::StreamContext;
use crate::config::StreamConfig;
use crate::downlink::{json as downlink_json, Input as DownlinkInput};
use crate::model::{now_us, DownlinkEvent, DownlinkOp, DownlinkRequest, Secret};
use rumqttc::{
    AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS, SubscribeFilter, Transport,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::sync::Semaphore;

/// How long a stop waits for outstanding PUBACKs before closing the connection.
const STOP_GRACE: Duration = Duration::from_secs(2);

pub struct MqttStream {
    ctx: StreamContext,
    name: String,
    host: String,
    /// `server` for log lines, secrets removed (see `session::Endpoint::shown`).
    shown: String,
    port: u16,
    transport: Transport,
    client_id: String,
    credentials: Option<(String, Secret)>,
    prefix: String,
    inflight: u16,
    keep_alive: Duration,
    /// Downlink events for this stream, published on `.../down/{event}`.
    events: tokio::sync::Mutex<mpsc::Receiver<DownlinkEvent>>,
    clean_session: bool,
    max_packet: usize,
    /// AWS: `$aws/things/{thing}/shadow/update` topic, when `shadow = true`.
    shadow_topic: Option<String>,
}

/// Shadow updates at most this often.
const SHADOW_EVERY: Duration = Duration::from_secs(60);

enum End {
    Stopped,
    Failed(String),
}

impl MqttStream {
    pub fn new(
        cfg: &StreamConfig,
        ctx: StreamContext,
        events: mpsc::Receiver<DownlinkEvent>,
    ) -> Result<Self, String> {
        let server = cfg.server.as_deref().unwrap_or_default();
        let url = url::Url::parse(server).map_err(|e| format!("server {server:?}: {e}"))?;
        let aws = cfg.kind == crate::config::StreamKind::AwsIot;
        let port443 = url.port() == Some(443);
        let tls_cfg = || {
            let client_cert = cfg.cert_file.as_deref().zip(cfg.key_file.as_deref());
            if aws {
                // AWS IoT on 443 picks MQTT by ALPN (AWS IoT developer guide, "Protocols").
                let alpn: &[&[u8]] = if port443 { &[b"x-amzn-mqtt-ca"] } else { &[] };
                tls::client_config_pinned_roots(
                    tls::AMAZON_ROOT_CA_1,
                    cfg.ca_file.as_deref(),
                    client_cert,
                    alpn,
                )
            } else {
                tls::client_config(cfg.ca_file.as_deref(), client_cert, true, &[])
            }
        };
        let session::Endpoint {
            host,
            port,
            transport,
            shown,
        } = session::endpoint(server, tls_cfg)?;
        let client_id = cfg.client_id.clone().unwrap_or_else(|| {
            let who = ctx
                .gateway_eui
                .map(|e| e.to_lower_hex())
                .unwrap_or_else(hostname);
            format!("lorastream-{who}-{}", cfg.name)
        });
        Ok(MqttStream {
            name: cfg.name.clone(),
            host,
            port,
            transport,
            shown,
            client_id,
            credentials: cfg
                .username
                .clone()
                .map(|u| (u, cfg.password.clone().unwrap_or_else(|| Secret::new("")))),
            prefix: cfg
                .topic_prefix
                .clone()
                .unwrap_or_else(|| "lorastream".into()),
            inflight: cfg.inflight.unwrap_or(100),
            keep_alive: Duration::from_secs(cfg.keep_alive_s.unwrap_or(30)),
            events: tokio::sync::Mutex::new(events),
            clean_session: !aws,
            max_packet: if aws { 128 * 1024 } else { 256 * 1024 },
            shadow_topic: (aws && cfg.shadow == Some(true))
                .then(|| {
                    cfg.client_id
                        .as_ref()
                        .map(|t| format!("$aws/things/{t}/shadow/update"))
                })
                .flatten(),
            ctx,
        })
    }

    fn status_topic(&self) -> Option<String> {
        self.ctx
            .gateway_eui
            .map(|e| format!("{}/gateways/{}/status", self.prefix, e.to_lower_hex()))
    }

    fn options(&self) -> MqttOptions {
        let mut o = MqttOptions::new(&self.client_id, &self.host, self.port);
        o.set_transport(self.transport.clone());
        o.set_keep_alive(self.keep_alive);
        o.set_clean_session(self.clean_session);
        o.set_inflight(self.inflight);
        // Azure allows 256 KiB, AWS 128 KiB; rumqttc's default is 10 KiB each way.
        o.set_max_packet_size(self.max_packet, self.max_packet);
        if let Some((u, p)) = &self.credentials {
            o.set_credentials(u, p.expose());
        }
        if let Some(t) = self.status_topic() {
            o.set_last_will(LastWill::new(t, "offline", QoS::AtLeastOnce, true));
        }
        // Downlinks are acknowledged to the broker only once they are in the store.
        o.set_manual_acks(true);
        o
    }

    /// `{prefix}/{application}/devices/{device}/down/{push|replace}` → request.
    fn downlink_request(&self, topic: &str, payload: &[u8]) -> Option<DownlinkRequest> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [application, "devices", device, "down", op] = parts.as_slice() else {
            return None;
        };
        let op = match *op {
            "push" => DownlinkOp::Push,
            "replace" => DownlinkOp::Replace,
            _ => return None,
        };
        Some(DownlinkRequest {
            stream: self.name.clone(),
            application: application.to_string(),
            device: device.to_string(),
            op,
            items: downlink_json::parse_request(payload, &self.name),
        })
    }

    pub async fn run(self) {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut failures = FailureLog::default();
        loop {
            if self.ctx.cancel.is_cancelled() {
                return;
            }
            let started = Instant::now();
            let end = self.session().await;
            self.ctx.metrics.stream_connected(&self.name, false);
            match end {
                End::Stopped => return,
                End::Failed(e) => {
                    // A connection that lived a while was a success: start the backoff over.
                    if started.elapsed() > Duration::from_secs(30) {
                        backoff.reset();
                        failures.reset();
                    }
                    let (log, failures) = failures.failed();
                    let delay = backoff.next_delay();
                    if log {
                        tracing::warn!(stream = %self.name, server = %self.shown, error = %e, retry_in_ms = delay.as_millis() as u64, failures, "MQTT connection failed");
                    }
                    tokio::select! {
                        _ = self.ctx.cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// One connection, from CONNECT to error or stop.
    async fn session(&self) -> End {
        let window = usize::from(self.inflight);
        // Request channel: the window, plus room for status publishes and subscriptions.
        let (client, mut eventloop) = AsyncClient::new(self.options(), window + 16);
        let state = Arc::new(Mutex::new(Inflight::default()));
        let permits = Arc::new(Semaphore::new(window));

        // Wait for CONNACK before feeding, so nothing is queued for a connection that never was.
        match session::until_connack(&mut eventloop, &self.ctx.cancel).await {
            Ok(true) => {}
            Ok(false) => return End::Stopped,
            Err(e) => return End::Failed(e.to_string()),
        }
        tracing::info!(stream = %self.name, server = %self.shown, backlog = self.ctx.queue.len(), "MQTT connected");
        if let Some(t) = self.status_topic() {
            publish(&client, &state, &t, b"online".to_vec(), true, None);
        }
        // The stream counts as connected (/health, metrics) once it can also take downlinks:
        // after the SUBACK of its downlink topics, so a downlink published after that point
        // cannot miss the subscription.
        let mut awaiting_suback = false;
        if self.ctx.downlinks.is_some() {
            let filters = ["push", "replace"].map(|op| {
                SubscribeFilter::new(
                    format!("{}/+/devices/+/down/{op}", self.prefix),
                    QoS::AtLeastOnce,
                )
            });
            awaiting_suback = client.try_subscribe_many(filters).is_ok();
        }
        if !awaiting_suback {
            self.ctx.metrics.stream_connected(&self.name, true);
        }
        let mut events = self.events.lock().await;

        let feeder_stop = tokio_util::sync::CancellationToken::new();
        let feeder = tokio::spawn(feed(
            self.ctx.clone(),
            client.clone(),
            state.clone(),
            permits.clone(),
            self.prefix.clone(),
            self.shadow_topic.clone(),
            feeder_stop.clone(),
        ));

        let mut stopping: Option<Instant> = None;
        let end = loop {
            let ev = tokio::select! {
                ev = eventloop.poll() => ev,
                Some(e) = events.recv() => {
                    let t = format!("{}/{}/devices/{}/down/{}", self.prefix, e.application, e.device, e.kind.as_str());
                    publish(&client, &state, &t, downlink_json::event_json(&e), false, None);
                    continue;
                }
                _ = self.ctx.cancel.cancelled(), if stopping.is_none() => {
                    // Stop feeding, then give outstanding PUBACKs a moment.
                    feeder_stop.cancel();
                    stopping = Some(Instant::now());
                    continue;
                }
                _ = tokio::time::sleep(Duration::from_millis(50)), if stopping.is_some() => {
                    let idle = permits.available_permits() >= window;
                    if idle || stopping.is_some_and(|t| t.elapsed() > STOP_GRACE) {
                        if let Some(t) = self.status_topic() {
                            publish(&client, &state, &t, b"offline".to_vec(), true, None);
                        }
                        session::disconnect(&client, &mut eventloop).await;
                        break End::Stopped;
                    }
                    continue;
                }
            };
            match ev {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let Ok(mut s) = state.lock() {
                        s.written(pkid);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let req = self.downlink_request(&p.topic, &p.payload);
                    match (req, self.ctx.downlinks.clone()) {
                        (Some(req), Some(tx)) => {
                            let client = client.clone();
                            tokio::spawn(async move {
                                let (done, stored) = tokio::sync::oneshot::channel();
                                if tx
                                    .send(DownlinkInput::Request(req, Some(done)))
                                    .await
                                    .is_ok()
                                    && stored.await.is_ok()
                                {
                                    let _ = client.ack(&p).await;
                                }
                            });
                        }
                        _ => {
                            let _ = client.try_ack(&p);
                        }
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) if awaiting_suback => {
                    awaiting_suback = false;
                    self.ctx.metrics.stream_connected(&self.name, true);
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    let seq = state.lock().ok().and_then(|mut s| s.acked(ack.pkid));
                    if let Some(seq) = seq {
                        if let Err(e) = self.ctx.queue.ack(seq) {
                            tracing::error!(stream = %self.name, error = %e, "cannot remove an acknowledged record");
                        }
                        permits.add_permits(1);
                    }
                }
                Ok(_) => {}
                Err(e) => break End::Failed(e.to_string()),
            }
        };
        feeder_stop.cancel();
        feeder.abort();
        let _ = feeder.await;
        end
    }
}

/// Queue a QoS 1 publish and its FIFO entry atomically (see the module docs).
fn publish(
    client: &AsyncClient,
    state: &Mutex<Inflight>,
    topic: &str,
    payload: Vec<u8>,
    retain: bool,
    seq: Option<u64>,
) -> bool {
    let Ok(mut s) = state.lock() else {
        return false;
    };
    s.publish(client, topic, payload, retain, seq)
}

/// Read the queue from its oldest record and publish, never more than the window unacknowledged.
async fn feed(
    ctx: StreamContext,
    client: AsyncClient,
    state: Arc<Mutex<Inflight>>,
    permits: Arc<Semaphore>,
    prefix: String,
    shadow_topic: Option<String>,
    stop: tokio_util::sync::CancellationToken,
) {
    let name = ctx.queue.name().to_string();
    // Backlog and live traffic share the window (see lanes.rs); per-device order is kept.
    let mut lanes = super::lanes::Lanes::new(&ctx.queue);
    let mut last_shadow: Option<std::time::Instant> = None;
    loop {
        // At least one free slot before reading.
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let room = 1 + permits.available_permits();
        let batch = match lanes.next(&ctx.queue, room) {
            Ok(b) => b,
            Err(e) => {
                // The store may be reopening its engine after a disk error: try again soon
                // rather than leaving the connection up with nothing fed into it.
                tracing::warn!(stream = %name, error = %e, "cannot read the queue; retrying in 1 s");
                drop(first);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        if batch.is_empty() {
            drop(first);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ctx.queue.appended() => continue,
            }
        }
        first.forget();
        let d = Delivery { now_us: now_us() };
        let n = batch.len();
        for (i, (seq, r)) in batch.into_iter().enumerate() {
            if i > 0 {
                // The first slot was taken above; take one per further record.
                match permits.try_acquire() {
                    Ok(p) => p.forget(),
                    Err(_) => break,
                }
            }
            let t = topic(&prefix, &r);
            if !publish(&client, &state, &t, record_json(&r, d), false, Some(seq)) {
                // Request channel closed or full: the connection is going away.
                return;
            }
            if let (Some(st), crate::model::Record::Uplink(u)) = (&shadow_topic, &r) {
                if last_shadow.is_none_or(|t| t.elapsed() >= SHADOW_EVERY) {
                    last_shadow = Some(std::time::Instant::now());
                    let doc = serde_json::json!({"state": {"reported": {"lorastream": {
                        "last_uplink": {
                            "application": u.application, "device": u.device, "f_cnt": u.f_cnt,
                            "rssi": u.rx.first().map(|x| x.rssi), "snr": u.rx.first().map(|x| x.snr),
                            "received_at_us": u.received_at_us,
                        },
                        "queue_depth": ctx.queue.len(),
                    }}}});
                    publish(
                        &client,
                        &state,
                        st,
                        doc.to_string().into_bytes(),
                        false,
                        None,
                    );
                }
            }
        }
        ctx.metrics.stream_published(&name, n as u64);
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "gateway".into())
}
