//! The generic MQTT stream (`kind = "mqtt"`): QoS 1 publishes, deleted from the queue on PUBACK.
//!
//! How acknowledgements are matched: see [`client::Inflight`] (a FIFO of record sequence
//! numbers kept in rumqttc's order; `pkid → seq` on write; delete on PUBACK). Here the feeder
//! task and the event-loop task share it under a lock.
//!
//! Connections are never resumed: on any error the client and event loop are dropped, and the
//! next session ([`crate::streams::connect`], backoff with jitter) re-reads the queue from its
//! oldest record. The queue is the only truth, so rumqttc's in-memory pending list (which it
//! drops silently when the broker has no session) does not matter. The price is that records in
//! flight during a disconnect are sent again, with the same correlation id.
//!
//! Topics, bodies, the downlink topics and how downlinks and their events are read and written
//! are the stream's format's ([`crate::streams::format::Formatter`]): lorastream's topics
//! (`.../up`, `.../down/push`, `.../down/replace`) or ChirpStack's (`application/.../event/up`,
//! `.../command/down`). Downlinks go through the connection's [`client::Intake`]: one at a
//! time, in arrival order, each PUBACKed once stored.
//!
//! AWS IoT Core (`kind = "aws-iot"`) is this stream with its cloud's rules: X.509 client
//! certificate, Amazon Root CA 1 as the default trust, ALPN `x-amzn-mqtt-ca` on port 443 (SNI is
//! always sent), the thing name as client id, a persistent session (downlinks published while
//! the gateway was offline are delivered on reconnect), 128 KiB payloads, and an optional,
//! rate-limited device-shadow update.
//!
//! Sizes (docs/reliability.md): a record whose PUBLISH would be over the destination's limit
//! (256 KiB here, AWS IoT's 128 KiB) is dropped as `too_large` before it is published
//! ([`super::too_large`]), since rumqttc would end the connection on it and the next session
//! would meet it again. Incoming packets are read up to [`client::MAX_INCOMING_PACKET`]; a
//! downlink message over [`client::MAX_DOWNLINK_MESSAGE`] is refused alone.

pub(crate) mod client;

use super::connect::{self, Retry, Session, SessionEnd};
use super::error::{SessionError, SetupError};
use super::format::{render_or_drop, Delivery};
use super::tls;
use super::StreamContext;
use crate::config::{AwsConfig, MqttConfig};
use crate::model::{now_us, DownlinkEvent, Record, Secret};
use client::{Inflight, Intake, Watchdog};
use rumqttc::{
    AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS, SubscribeFilter, Transport,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::sync::Semaphore;

/// How long a stop waits for outstanding PUBACKs before closing the connection.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// CONNECT (TCP, TLS, WebSocket, CONNACK) must complete within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Shadow updates at most this often.
const SHADOW_EVERY: Duration = Duration::from_secs(60);
/// Waiting MQTT events the session handles in a row before it looks at its other inputs.
const MAX_TAKEN: u32 = 32;

pub(crate) struct MqttStream {
    ctx: StreamContext,
    /// `server` for log lines, secrets removed.
    shown: String,
    host: String,
    port: u16,
    transport: Transport,
    client_id: String,
    credentials: Option<(String, Secret)>,
    prefix: String,
    inflight: u16,
    keep_alive: Duration,
    response_timeout: Duration,
    /// Downlink events for this stream, published on `.../down/{event}`.
    events: mpsc::Receiver<DownlinkEvent>,
    /// `clean_session` as configured (false: a persistent session).
    clean_session: bool,
    /// Start the next connection with a clean session once (see [`MqttStream::after_failure`]).
    clean_once: bool,
    /// Consecutive connections the broker closed within [`TAKEN_OVER_WITHIN`] of CONNACK.
    quick_closes: u64,
    max_packet: usize,
    /// AWS: `$aws/things/{thing}/shadow/update` topic, when `shadow = true`.
    shadow_topic: Option<String>,
    /// AWS IoT: policies usually allow the thing name only, so `check --online` connects with
    /// it (and the configured session flag); elsewhere with `{client_id}-check` and a clean
    /// session, which leaves a running daemon's connection and session alone.
    aws: bool,
}

impl MqttStream {
    /// A generic MQTT stream.
    pub fn mqtt(
        cfg: &MqttConfig,
        ctx: StreamContext,
        events: mpsc::Receiver<DownlinkEvent>,
    ) -> Result<Self, SetupError> {
        let client_cert = cfg
            .tls
            .client_cert
            .as_ref()
            .map(|c| (c.cert_file.as_path(), c.key_file.as_path()));
        let ep = client::endpoint(&cfg.server, || {
            tls::client_config(cfg.tls.ca_file.as_deref(), client_cert, true, &[])
        })?;
        // Azure allows 256 KiB, AWS 128 KiB; rumqttc's default is 10 KiB each way.
        Ok(Self::new(cfg, ctx, events, ep, 256 * 1024, None, false))
    }

    /// An AWS IoT Core stream.
    pub fn aws(
        cfg: &AwsConfig,
        ctx: StreamContext,
        events: mpsc::Receiver<DownlinkEvent>,
    ) -> Result<Self, SetupError> {
        let m = &cfg.mqtt;
        let client_cert = m
            .tls
            .client_cert
            .as_ref()
            .map(|c| (c.cert_file.as_path(), c.key_file.as_path()));
        // AWS IoT on 443 picks MQTT by ALPN (AWS IoT developer guide, "Protocols").
        let alpn: &[&[u8]] = if m.server.port() == 443 {
            &[b"x-amzn-mqtt-ca"]
        } else {
            &[]
        };
        let ep = client::endpoint(&m.server, || {
            tls::client_config_pinned_roots(
                tls::AMAZON_ROOT_CA_1,
                m.tls.ca_file.as_deref(),
                client_cert,
                alpn,
            )
        })?;
        let shadow = cfg.shadow.then(|| {
            format!(
                "$aws/things/{}/shadow/update",
                m.client_id.resolve(&ctx.instance_id)
            )
        });
        Ok(Self::new(m, ctx, events, ep, 128 * 1024, shadow, true))
    }

    fn new(
        cfg: &MqttConfig,
        ctx: StreamContext,
        events: mpsc::Receiver<DownlinkEvent>,
        ep: client::Endpoint,
        max_packet: usize,
        shadow_topic: Option<String>,
        aws: bool,
    ) -> Self {
        MqttStream {
            shown: cfg.server.to_string(),
            host: ep.host,
            port: ep.port,
            transport: ep.transport,
            client_id: cfg.client_id.resolve(&ctx.instance_id),
            credentials: cfg.credentials.clone(),
            prefix: cfg.topic_prefix.clone(),
            inflight: cfg.inflight,
            keep_alive: cfg.keep_alive,
            response_timeout: cfg.response_timeout,
            events,
            clean_session: cfg.clean_session,
            clean_once: false,
            quick_closes: 0,
            max_packet,
            shadow_topic,
            aws,
            ctx,
        }
    }

    /// `check --online`: one CONNECT with this stream's server, TLS and credentials.
    pub async fn probe(&self) -> Result<String, SessionError> {
        let mut o = self.base_options();
        if !self.aws {
            o.set_client_id(format!("{}-check", self.client_id));
            o.set_clean_session(true);
        }
        let id = o.client_id();
        client::probe(o, Duration::from_secs(10)).await?;
        Ok(format!("CONNACK from {} as {id}", self.shown))
    }

    pub async fn run(mut self) {
        let ctx = self.ctx.clone();
        connect::run(&mut self, &ctx, Retry::connection()).await;
    }

    /// `{prefix}/gateways/{eui}/command/` when this stream takes remote commands.
    fn command_prefix(&self) -> Option<String> {
        self.ctx.commands.as_ref()?;
        let eui = self.ctx.gateway_eui?;
        Some(format!(
            "{}/gateways/{}/command/",
            self.prefix,
            eui.to_lower_hex()
        ))
    }

    /// A remote command: acknowledged to the broker at once (a command is not queued), run
    /// off the session loop, answered on `.../command/{name}/reply`.
    fn command(
        &self,
        client: &AsyncClient,
        state: &Arc<Mutex<Inflight>>,
        name: String,
        p: rumqttc::Publish,
    ) {
        let Some(commands) = self.ctx.commands.clone() else {
            return;
        };
        let reply_topic = format!("{}/reply", p.topic);
        let _ = client.try_ack(&p);
        let Some(slot) = commands.try_start() else {
            let reply = commands.busy(&self.ctx.name, &name, &p.payload);
            let body = serde_json::to_vec(&reply).unwrap_or_default();
            publish(client, state, &reply_topic, body, false, None);
            return;
        };
        let (client, state, stream) = (client.clone(), state.clone(), self.ctx.name.clone());
        tokio::spawn(async move {
            let reply = commands.run(&stream, &name, &p.payload).await;
            let body = serde_json::to_vec(&reply).unwrap_or_default();
            publish(&client, &state, &reply_topic, body, false, None);
            drop(slot);
        });
    }

    fn status_topic(&self) -> Option<String> {
        self.ctx
            .gateway_eui
            .map(|e| format!("{}/gateways/{}/status", self.prefix, e.to_lower_hex()))
    }

    fn options(&self) -> MqttOptions {
        let mut o = self.base_options();
        if let Some(t) = self.status_topic() {
            o.set_last_will(LastWill::new(t, "offline", QoS::AtLeastOnce, true));
        }
        o
    }

    /// The options without the last will (`check --online` must not publish "offline").
    fn base_options(&self) -> MqttOptions {
        let mut o = MqttOptions::new(&self.client_id, &self.host, self.port);
        o.set_transport(self.transport.clone());
        o.set_keep_alive(self.keep_alive);
        o.set_clean_session(self.clean_session || self.clean_once);
        o.set_inflight(self.inflight);
        // Incoming: high on purpose (see `client::MAX_INCOMING_PACKET`); outgoing: the
        // destination's limit, checked before each publish (`feed`).
        o.set_max_packet_size(client::MAX_INCOMING_PACKET, self.max_packet);
        if let Some((u, p)) = &self.credentials {
            o.set_credentials(u, p.expose());
        }
        // Downlinks are acknowledged to the broker only once they are in the store.
        o.set_manual_acks(true);
        o
    }
}

impl Session for MqttStream {
    const WHAT: &'static str = "MQTT connection";

    fn server(&self) -> String {
        self.shown.clone()
    }

    /// One connection, from CONNECT to error or stop.
    async fn session(&mut self) -> SessionEnd {
        let window = usize::from(self.inflight);
        // Request channel: the window, plus room for status publishes and subscriptions.
        let (client, mut eventloop) = AsyncClient::new(self.options(), window + 16);
        let state = Arc::new(Mutex::new(Inflight::default()));
        let permits = Arc::new(Semaphore::new(window));
        let name = self.ctx.name.clone();

        // Wait for CONNACK before feeding, so nothing is queued for a connection that never was.
        match client::until_connack(&mut eventloop, &self.ctx.cancel, CONNECT_TIMEOUT).await {
            Ok(true) => {}
            Ok(false) => return SessionEnd::Stopped,
            Err(e) => return SessionEnd::failed(e),
        }
        let connected_at = Instant::now();
        let clean = self.clean_session || std::mem::take(&mut self.clean_once);
        let mut driver = client::Driver::start(eventloop);
        tracing::info!(stream = %name, server = %self.shown, client_id = %self.client_id, clean_session = clean, backlog = self.ctx.queue.len(), "MQTT connected");
        if let Some(t) = self.status_topic() {
            publish(&client, &state, &t, b"online".to_vec(), true, None);
        }
        // The stream counts as connected (/health, metrics) once it can also take downlinks:
        // after the SUBACK of its downlink topics, so a downlink published after that point
        // cannot miss the subscription.
        let mut awaiting_suback = false;
        let mut filters: Vec<_> = Vec::new();
        if self.ctx.downlinks.is_some() {
            filters.extend(self.ctx.format.downlink_filters());
        }
        let commands = self.command_prefix();
        if let Some(c) = &commands {
            filters.push(format!("{c}+"));
        }
        if !filters.is_empty() {
            let filters = filters
                .into_iter()
                .map(|f| SubscribeFilter::new(f, QoS::AtLeastOnce));
            awaiting_suback = client.try_subscribe_many(filters).is_ok();
        }
        if !awaiting_suback {
            self.ctx.metrics.stream_connected(&name, true);
        }
        let intake = Intake::start(client.clone(), self.ctx.downlinks.clone());

        let feeder_stop = tokio_util::sync::CancellationToken::new();
        let feeder = tokio::spawn(feed(
            self.ctx.clone(),
            client.clone(),
            state.clone(),
            permits.clone(),
            self.shadow_topic.clone(),
            self.max_packet,
            feeder_stop.clone(),
        ));

        let mut stopping: Option<Instant> = None;
        let mut watchdog = Watchdog::new(self.response_timeout);
        let mut oversized_log = crate::logs::LogLimiter::new();
        // Events taken straight from the driver's queue since the last `select!`.
        let mut taken = 0;
        let end = loop {
            // Events already waiting (a burst of PUBACKs) are taken without a `select!` round,
            // which sets up its timer and futures again each time (issue 16); at most
            // `MAX_TAKEN` in a row, so a steady stream of events cannot hold off the stop, the
            // watchdog or the downlink events.
            let waiting = if taken < MAX_TAKEN {
                driver.try_next()
            } else {
                None
            };
            let ev = if let Some(ev) = waiting {
                taken += 1;
                ev
            } else {
                taken = 0;
                tokio::select! {
                    ev = driver.next() => ev,
                    _ = client::hung(watchdog.deadline()) => {
                        break SessionEnd::failed(SessionError::NoResponse(watchdog.timeout()));
                    }
                    Some(e) = self.events.recv() => {
                        if let Some((t, body)) = self.ctx.format.event_message(&e) {
                            publish(&client, &state, &t, body, false, None);
                        }
                        continue;
                    }
                    _ = self.ctx.cancel.cancelled(), if stopping.is_none() => {
                        // Stop feeding, then give outstanding PUBACKs a moment.
                        feeder_stop.cancel();
                        stopping = Some(Instant::now());
                        continue;
                    }
                    _ = tokio::time::sleep(Duration::from_millis(50)), if stopping.is_some() => {
                        let idle = permits.available_permits() >= window && intake.settled();
                        if idle || stopping.is_some_and(|t| t.elapsed() > STOP_GRACE) {
                            if let Some(t) = self.status_topic() {
                                publish(&client, &state, &t, b"offline".to_vec(), true, None);
                            }
                            driver.disconnect(&client).await;
                            break SessionEnd::Stopped;
                        }
                        continue;
                    }
                }
            };
            if let Ok(ev) = &ev {
                watchdog.saw(ev);
            }
            match ev {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let Ok(mut s) = state.lock() {
                        s.written(pkid);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(mut p))) => {
                    if let Some(name) = commands
                        .as_deref()
                        .and_then(|c| p.topic.strip_prefix(c))
                        .filter(|n| !n.is_empty() && !n.contains('/'))
                        .map(str::to_string)
                    {
                        // An oversized request is answered as not JSON.
                        client::shed_oversized(&mut p);
                        self.command(&client, &state, name, p);
                        continue;
                    }
                    let req = match client::shed_oversized(&mut p) {
                        None => self.ctx.format.downlink_request(&p.topic, &p.payload),
                        Some(len) => {
                            self.ctx.metrics.downlink_too_large(&name);
                            if oversized_log.allow() {
                                tracing::warn!(stream = %name, topic = %p.topic, len, max = client::MAX_DOWNLINK_MESSAGE, "downlink message too large: refused");
                            }
                            self.ctx
                                .format
                                .downlink_request(&p.topic, b"")
                                .map(|r| client::too_large(r, len))
                        }
                    };
                    if req.is_none() {
                        // A downlink topic that names no device (e.g. no DevEUI in a ChirpStack
                        // command topic): acknowledged, counted, logged at debug by the format.
                        self.ctx.metrics.downlink_event("unroutable");
                    }
                    if !intake.push(req, p) {
                        self.ctx.metrics.stream_error(&name, "downlinks_backlog");
                        tracing::warn!(stream = %name, "too many downlinks at once; the broker will deliver the rest again");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) if awaiting_suback => {
                    awaiting_suback = false;
                    self.ctx.metrics.stream_connected(&name, true);
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    let seq = state.lock().ok().and_then(|mut s| s.acked(ack.pkid));
                    if let Some(seq) = seq {
                        if let Err(e) = self.ctx.queue.ack(seq) {
                            tracing::error!(stream = %name, error = %e, "cannot remove an acknowledged record");
                        }
                        permits.add_permits(1);
                    }
                }
                Ok(_) => {}
                Err(e) => break SessionEnd::failed(e),
            }
        };
        feeder_stop.cancel();
        feeder.abort();
        let _ = feeder.await;
        if let SessionEnd::Failed { error, .. } = &end {
            self.after_failure(error, connected_at.elapsed());
        }
        end
    }
}

/// A connection the broker closes this soon after CONNACK, again and again, was most likely
/// taken over by another client with the same client id (MQTT 3.1.1 §3.1.4: the server
/// disconnects the existing client).
const TAKEN_OVER_WITHIN: Duration = Duration::from_secs(5);

impl MqttStream {
    /// After a connection that had its CONNACK failed: the two failures a reconnect alone
    /// cannot cure.
    fn after_failure(&mut self, e: &SessionError, lived: Duration) {
        let name = &self.ctx.name;
        // A message above the packet limit ends every connection, and with a persistent
        // session the broker sends it again after each reconnect: start one clean session,
        // which makes the broker forget it (and whatever else it held for this client).
        if let Some(len) = e.oversized_incoming() {
            if !self.clean_session {
                self.clean_once = true;
            }
            self.ctx.metrics.downlink_too_large(name);
            tracing::warn!(stream = %name, len, max = client::MAX_INCOMING_PACKET, clean_session_next = true, "a message above the MQTT packet limit ended the connection; the next connection starts a clean session so the broker drops it (and any other message it held for this client)");
        }
        if e.closed_by_peer() && lived < TAKEN_OVER_WITHIN {
            self.quick_closes += 1;
            if self.quick_closes >= 3 {
                self.ctx.metrics.stream_error(name, "session_taken_over");
                if self.quick_closes == 3 || self.quick_closes % 10 == 0 {
                    tracing::warn!(stream = %name, client_id = %self.client_id, times = self.quick_closes, "the broker closed the connection right after connecting {} times in a row: another client is probably connected with the same client id; give each gateway its own client_id (or remove client_id: the derived one is unique per installation)", self.quick_closes);
                }
            }
        } else {
            self.quick_closes = 0;
        }
    }
}

/// Queue a QoS 1 publish and its FIFO entry atomically (see the module docs).
fn publish(
    client: &AsyncClient,
    state: &Mutex<Inflight>,
    topic: impl Into<String>,
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
#[allow(clippy::too_many_arguments)]
async fn feed(
    ctx: StreamContext,
    client: AsyncClient,
    state: Arc<Mutex<Inflight>>,
    permits: Arc<Semaphore>,
    shadow_topic: Option<String>,
    max_packet: usize,
    stop: tokio_util::sync::CancellationToken,
) {
    // Backlog and live traffic share the window (see lanes.rs); per-device order is kept.
    let mut lanes = super::lanes::Lanes::new(&ctx.queue);
    let mut last_shadow: Option<std::time::Instant> = None;
    loop {
        if stop.is_cancelled() {
            return;
        }
        // The slot below is taken without awaiting when the window has room, so this is where
        // the loop gives way to other tasks under load (tokio's cooperative budget): without
        // it, a backlog kept a worker thread from the UDP ingress until the window filled.
        tokio::task::coop::consume_budget().await;
        // At least one free slot before reading: taken at once when the window has room (a
        // `select!` with the stop token per record cost ~500 instructions, issue 16).
        let first = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return,
            Err(tokio::sync::TryAcquireError::NoPermits) => tokio::select! {
                _ = stop.cancelled() => return,
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            },
        };
        let room = 1 + permits.available_permits();
        let batch = match lanes.next(&ctx.queue, room) {
            Ok(b) => b,
            Err(e) => {
                // The store may be reopening its engine after a disk error: try again soon
                // rather than leaving the connection up with nothing fed into it.
                tracing::warn!(stream = %ctx.name, error = %e, "cannot read the queue; retrying in 1 s");
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
        let mut n = 0u64;
        for (i, (seq, r)) in batch.into_iter().enumerate() {
            if i > 0 {
                // The first slot was taken above; take one per further record.
                match permits.try_acquire() {
                    Ok(p) => p.forget(),
                    Err(_) => break,
                }
            }
            let Some(body) = render_or_drop(&ctx, seq, &r, d) else {
                // Dropped: its slot is free again.
                permits.add_permits(1);
                continue;
            };
            let t = ctx.format.topic(&r);
            let size = super::too_large::mqtt_publish_size(&t, &body);
            if size > max_packet {
                super::too_large::drop_record(
                    &ctx,
                    seq,
                    &r,
                    size,
                    Some(max_packet),
                    "the MQTT packet limit",
                );
                // Its window slot is free again.
                permits.add_permits(1);
                continue;
            }
            // The topic moves into rumqttc's request (a `&str` would be copied).
            if !publish(&client, &state, t, body, false, Some(seq)) {
                // Request channel closed or full: the connection is going away.
                return;
            }
            n += 1;
            if let (Some(st), Record::Uplink(u)) = (&shadow_topic, &r) {
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
        ctx.metrics.stream_published(&ctx.name, n);
    }
}
