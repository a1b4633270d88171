//! `identity = "device"`: one stream queue, one IoT Hub connection per LoRaWAN device.
//!
//! IoT Hub allows one MQTT connection per device id, so each LoRaWAN device gets its own
//! connection, opened when it has something to send and closed after `idle_timeout_s` without
//! traffic. The dispatcher owns the bookkeeping:
//!
//! - **Index.** It walks the queue once, in order, from a frontier cursor and keeps, per
//!   device, the sequence numbers not yet handed to a connection (`waiting`, 8 bytes each, at
//!   most [`PER_DEVICE_CAP`] per device and [`INDEX_CAP`] in all; a device's records beyond its
//!   cap are skipped and read again, in order, when its list drains). Records are read again by
//!   sequence number when handed (the few just scanned come from a small cache).
//! - **Hand-over.** A connection gets its device's records in queue order, at most `inflight`
//!   unacknowledged (`handed`). Its PUBACKs come back as `Done(seq)` (the connection removed
//!   the record from the queue). When a connection ends, whatever it had not acknowledged goes
//!   back to the front of `waiting` (all of it is older than what waits), so the next connection
//!   sends it again first: per-device order is kept, duplicates carry the same correlation id.
//! - **Connections.** Devices with work and no connection get one, oldest work first, while
//!   fewer than `max_connections` are open. At the cap, the connection idle the longest (nothing
//!   handed, nothing waiting, and no traffic for [`MIN_HOLD`] if its last record was live) is
//!   closed to make room, so a device waits at most for someone's in-flight PUBACKs, never for
//!   an idle timeout. A device whose
//!   connection fails (refused key, network) is parked with its own backoff; its records stay
//!   queued and nobody else waits for it.
//! - **Renewal.** A connection ending for its SAS token is reopened at once if the device was
//!   active within `idle_timeout_s` (so cloud-to-device messages keep arriving); a working
//!   connection that breaks is reopened on the same terms after its backoff.

use super::conn::{self, Identity, LoraDevice, Report};
use super::wire::SasKey;
use super::{device_key, hint, Shared, EVENT_QUEUE};
use crate::config::azure_device_id;
use crate::model::{DownlinkEvent, Record};
use crate::streams::connect::{Retry, SessionEnd, HEALTHY_SESSION};
use crate::streams::format::LIVE_THRESHOLD;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Sequence numbers indexed in memory at most, all devices (a hard memory bound: 2 MiB).
pub(super) const INDEX_CAP: usize = 262_144;
/// Sequence numbers indexed per device at most. A device with more (a long outage, or a device
/// the hub refuses) has the rest skipped by the scan and read again later ([`Slot::overflow`]),
/// so one device's backlog never fills the index and stops the others.
pub(super) const PER_DEVICE_CAP: usize = 4096;
/// Records kept from the scan for a quick hand-over.
const CACHE_CAP: usize = 1024;
/// A connection that carried live traffic is not closed for another device before it has been
/// idle this long, so that a cloud-to-device message sent in reaction to the uplink still
/// finds it. Connections that only drained a backlog are closed at once when someone waits.
pub(super) const MIN_HOLD: Duration = Duration::from_secs(2);
/// Downlink events kept per device while it has no connection.
const EVENTS_PER_DEVICE: usize = 32;

/// How devices are named and keyed.
pub(super) struct Keys {
    pub template: String,
    /// Keys by LoRaWAN device id or IoT Hub device id.
    pub by_device: HashMap<String, SasKey>,
    pub policy: Option<SasKey>,
    pub idle: Duration,
    pub max_connections: usize,
}

struct Conn {
    id: u64,
    close: CancellationToken,
    records: mpsc::Sender<(u64, Record)>,
    events: mpsc::Sender<DownlinkEvent>,
    connected: bool,
    closing: bool,
    opened: Instant,
}

struct Slot {
    hub_id: String,
    device: LoraDevice,
    /// None when no key signs for this device (the config check prevents it): it never
    /// connects, and its records stay queued.
    key: Option<SasKey>,
    waiting: VecDeque<u64>,
    /// The first record of this device the scan skipped because `waiting` was full; from there
    /// on the device's records are read by [`Dispatcher::refill`], in order.
    overflow: Option<u64>,
    handed: BTreeSet<u64>,
    events: VecDeque<DownlinkEvent>,
    conn: Option<Conn>,
    parked_until: Option<Instant>,
    retry: Retry,
    last_active: Instant,
    /// The last record handed over was live (not a backlog record).
    live: bool,
    /// Reopen after a token renewal until then, even without work.
    keep_until: Option<Instant>,
}

impl Slot {
    fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.events.is_empty()
    }
    fn quiet(&self) -> bool {
        self.handed.is_empty() && !self.has_work()
    }
}

pub(super) struct Dispatcher {
    sh: Arc<Shared>,
    keys: Keys,
    slots: HashMap<u64, Slot>,
    /// Connection id → slot key.
    conns: HashMap<u64, u64>,
    next_conn: u64,
    frontier: Option<u64>,
    indexed: usize,
    cache: HashMap<u64, Record>,
    reports_tx: mpsc::UnboundedSender<(u64, Report)>,
    reports: mpsc::UnboundedReceiver<(u64, Report)>,
    /// The latest connection attempt failed (for /health when nothing is connected).
    last_attempt_failed: bool,
}

impl Dispatcher {
    pub(super) fn new(sh: Arc<Shared>, keys: Keys) -> Dispatcher {
        let (reports_tx, reports) = mpsc::unbounded_channel();
        sh.ctx.metrics.stream_connected(&sh.ctx.name, true);
        sh.ctx.metrics.set_stream_connections(&sh.ctx.name, 0);
        Dispatcher {
            sh,
            keys,
            slots: HashMap::new(),
            conns: HashMap::new(),
            next_conn: 1,
            frontier: None,
            indexed: 0,
            cache: HashMap::new(),
            reports_tx,
            reports,
            last_attempt_failed: false,
        }
    }

    pub(super) async fn run(mut self, mut events: mpsc::Receiver<DownlinkEvent>) {
        let queue = self.sh.ctx.queue.clone();
        let cancel = self.sh.ctx.cancel.clone();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            self.scan();
            self.pump();
            self.publish_metrics();
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some((id, r)) = self.reports.recv() => self.on_report(id, r),
                Some(e) = events.recv() => self.on_event(e),
                _ = queue.appended(), if self.indexed < INDEX_CAP => {}
                _ = tick.tick() => self.close_idle(),
            }
        }
        // Stop: every connection drains its PUBACKs (bounded) and reports its end.
        for s in self.slots.values() {
            if let Some(c) = &s.conn {
                c.close.cancel();
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while !self.conns.is_empty() {
            match tokio::time::timeout_at(deadline, self.reports.recv()).await {
                Ok(Some((id, r))) => self.on_report(id, r),
                _ => break,
            }
        }
        self.sh
            .ctx
            .metrics
            .set_stream_connections(&self.sh.ctx.name, 0);
    }

    fn slot(&mut self, dev: LoraDevice) -> &mut Slot {
        let key = device_key(dev.dev_eui);
        let keys = &self.keys;
        let sh = &self.sh;
        self.slots.entry(key).or_insert_with(|| {
            let hub_id = azure_device_id(&keys.template, &dev.device, dev.dev_eui);
            let sas = keys
                .by_device
                .get(&dev.device)
                .or_else(|| keys.by_device.get(&hub_id))
                .or(keys.policy.as_ref())
                .cloned();
            if sas.is_none() {
                tracing::error!(stream = %sh.ctx.name, device = %dev.device, hub_device = %hub_id,
                    "no key for this device: its messages stay queued; add it to device_keys or set a policy key");
            }
            Slot {
                hub_id,
                device: dev,
                key: sas,
                waiting: VecDeque::new(),
                overflow: None,
                handed: BTreeSet::new(),
                events: VecDeque::new(),
                conn: None,
                parked_until: None,
                retry: Retry::connection(),
                last_active: Instant::now(),
                live: false,
                keep_until: None,
            }
        })
    }

    /// Index records appended since the last scan.
    fn scan(&mut self) {
        let queue = self.sh.ctx.queue.clone();
        while self.indexed < INDEX_CAP {
            let chunk = match queue.read_after(self.frontier, 256) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(stream = %self.sh.ctx.name, error = %e, "cannot read the queue");
                    return;
                }
            };
            if chunk.is_empty() {
                return;
            }
            for (seq, r) in chunk {
                self.frontier = Some(seq);
                let dev = match &r {
                    Record::Uplink(u) => LoraDevice {
                        application: u.application.to_string(),
                        device: u.device.to_string(),
                        dev_eui: u.dev_eui,
                    },
                    Record::Join(j) => LoraDevice {
                        application: j.application.clone(),
                        device: j.device.clone(),
                        dev_eui: j.dev_eui,
                    },
                    // The config check refuses gateway scopes with identity = "device", and
                    // alerts on IoT Hub streams.
                    Record::GatewayFrame(_) | Record::Alert(_) => continue,
                };
                let slot = self.slot(dev);
                if slot.overflow.is_some() || slot.waiting.len() >= PER_DEVICE_CAP {
                    slot.overflow.get_or_insert(seq);
                    continue;
                }
                slot.waiting.push_back(seq);
                self.indexed += 1;
                if self.cache.len() < CACHE_CAP {
                    self.cache.insert(seq, r);
                }
            }
        }
    }

    /// Index a device's skipped records again, from its overflow point, in order, up to the
    /// per-device cap; once the scan frontier is reached, the normal scan takes over.
    fn refill(&mut self, key: u64) {
        let queue = self.sh.ctx.queue.clone();
        let Some(slot) = self.slots.get_mut(&key) else {
            return;
        };
        let Some(from) = slot.overflow else { return };
        let mut cursor = from.checked_sub(1);
        loop {
            let chunk = match queue.read_after(cursor, 512) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(stream = %self.sh.ctx.name, error = %e, "cannot read the queue");
                    return;
                }
            };
            if chunk.is_empty() {
                slot.overflow = None;
                return;
            }
            for (seq, r) in chunk {
                if self.frontier.is_none_or(|f| seq > f) {
                    slot.overflow = None;
                    return;
                }
                cursor = Some(seq);
                let dev_eui = match &r {
                    Record::Uplink(u) => u.dev_eui,
                    Record::Join(j) => j.dev_eui,
                    Record::GatewayFrame(_) | Record::Alert(_) => continue,
                };
                if device_key(dev_eui) != key {
                    continue;
                }
                if slot.waiting.len() >= PER_DEVICE_CAP {
                    slot.overflow = Some(seq);
                    return;
                }
                slot.waiting.push_back(seq);
                self.indexed += 1;
            }
        }
    }

    fn on_event(&mut self, e: DownlinkEvent) {
        let dev = LoraDevice {
            application: e.application.clone(),
            device: e.device.clone(),
            dev_eui: e.dev_eui,
        };
        let metrics = self.sh.ctx.metrics.clone();
        let slot = self.slot(dev);
        if slot.events.len() >= EVENTS_PER_DEVICE {
            slot.events.pop_front();
            metrics.downlink_event("event_dropped");
        }
        slot.events.push_back(e);
    }

    /// Hand work to open connections, open connections for devices with work.
    fn pump(&mut self) {
        let refill: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, s)| s.overflow.is_some() && s.waiting.len() < PER_DEVICE_CAP / 2)
            .map(|(k, _)| *k)
            .collect();
        for k in refill {
            self.refill(k);
        }
        let now = Instant::now();
        let inflight = self.sh.inflight;
        let queue = self.sh.ctx.queue.clone();
        for slot in self.slots.values_mut() {
            let Some(c) = slot.conn.as_ref().filter(|c| !c.closing) else {
                continue;
            };
            while slot.handed.len() < inflight {
                let Some(&seq) = slot.waiting.front() else {
                    break;
                };
                let rec = match self.cache.remove(&seq) {
                    Some(r) => Some(r),
                    None => match queue.get(seq) {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!(stream = %self.sh.ctx.name, error = %e, "cannot read the queue");
                            break;
                        }
                    },
                };
                let Some(rec) = rec else {
                    // Gone meanwhile (evicted by max_bytes, expired): nothing to send.
                    slot.waiting.pop_front();
                    self.indexed -= 1;
                    continue;
                };
                let age_us = crate::model::now_us() - rec.received_at_us();
                let live = age_us < LIVE_THRESHOLD.as_micros() as i64;
                match c.records.try_send((seq, rec)) {
                    Ok(()) => {
                        slot.live = live;
                        slot.waiting.pop_front();
                        self.indexed -= 1;
                        slot.handed.insert(seq);
                        slot.last_active = now;
                    }
                    Err(mpsc::error::TrySendError::Full((s, r)))
                    | Err(mpsc::error::TrySendError::Closed((s, r))) => {
                        self.cache.insert(s, r);
                        break;
                    }
                }
            }
            while let Some(e) = slot.events.pop_front() {
                match c.events.try_send(e) {
                    Ok(()) => slot.last_active = now,
                    Err(mpsc::error::TrySendError::Full(e))
                    | Err(mpsc::error::TrySendError::Closed(e)) => {
                        slot.events.push_front(e);
                        break;
                    }
                }
            }
        }

        // Devices that need a connection, oldest work first; renewals last.
        let mut needy: Vec<(u64, u64)> = self
            .slots
            .iter()
            .filter(|(_, s)| s.conn.is_none() && s.key.is_some())
            .filter(|(_, s)| s.parked_until.is_none_or(|t| t <= now))
            .filter_map(|(k, s)| {
                if let Some(&seq) = s.waiting.front() {
                    Some((seq, *k))
                } else if !s.events.is_empty() {
                    Some((u64::MAX - 1, *k))
                } else if s.keep_until.is_some_and(|t| t > now) {
                    Some((u64::MAX, *k))
                } else {
                    None
                }
            })
            .collect();
        if needy.is_empty() {
            return;
        }
        needy.sort_unstable();
        let max = self.keys.max_connections;
        let mut free = max.saturating_sub(self.conns.len());
        // Connections already closing will each free a place.
        let mut freeing = self
            .slots
            .values()
            .filter(|s| s.conn.as_ref().is_some_and(|c| c.closing))
            .count();
        for (order, key) in needy {
            if free > 0 {
                free -= 1;
                self.open(key);
                continue;
            }
            if order == u64::MAX {
                // A renewal without work never pushes anyone out.
                continue;
            }
            if freeing > 0 {
                freeing -= 1;
                continue;
            }
            let victim = self
                .slots
                .iter()
                .filter(|(_, s)| {
                    s.quiet()
                        && s.conn.as_ref().is_some_and(|c| c.connected && !c.closing)
                        && (!s.live || now.duration_since(s.last_active) >= MIN_HOLD)
                })
                .min_by_key(|(_, s)| s.last_active)
                .map(|(k, _)| *k);
            let Some(v) = victim else { break };
            if let Some(c) = self.slots.get_mut(&v).and_then(|s| s.conn.as_mut()) {
                tracing::debug!(stream = %self.sh.ctx.name, "closing the longest-idle connection to make room (max_connections)");
                c.closing = true;
                c.close.cancel();
            }
        }
    }

    fn open(&mut self, key: u64) {
        let id = self.next_conn;
        self.next_conn += 1;
        let Some(slot) = self.slots.get_mut(&key) else {
            return;
        };
        let Some(sas) = slot.key.clone() else { return };
        let who = Identity {
            hub_id: slot.hub_id.clone(),
            key: sas,
            device: Some(slot.device.clone()),
        };
        let (rec_tx, rec_rx) = mpsc::channel(self.sh.inflight);
        let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
        let close = self.sh.ctx.cancel.child_token();
        tokio::spawn(conn::run(
            self.sh.clone(),
            who,
            id,
            rec_rx,
            ev_rx,
            self.reports_tx.clone(),
            close.clone(),
        ));
        slot.conn = Some(Conn {
            id,
            close,
            records: rec_tx,
            events: ev_tx,
            connected: false,
            closing: false,
            opened: Instant::now(),
        });
        slot.keep_until = None;
        self.conns.insert(id, key);
    }

    fn on_report(&mut self, id: u64, r: Report) {
        let Some(&key) = self.conns.get(&id) else {
            return;
        };
        let Some(slot) = self.slots.get_mut(&key) else {
            return;
        };
        if slot.conn.as_ref().is_none_or(|c| c.id != id) {
            return;
        }
        let now = Instant::now();
        match r {
            Report::Connected => {
                if let Some(c) = slot.conn.as_mut() {
                    c.connected = true;
                }
                slot.last_active = now;
                self.last_attempt_failed = false;
                tracing::debug!(stream = %self.sh.ctx.name, device = %slot.hub_id, "IoT Hub connected");
            }
            Report::Done(seq) => {
                slot.handed.remove(&seq);
                slot.last_active = now;
            }
            Report::Activity => slot.last_active = now,
            Report::Closed(end) => {
                self.conns.remove(&id);
                let Some(c) = slot.conn.take() else { return };
                // Not acknowledged: back to the front, in order (all older than what waits).
                let back = std::mem::take(&mut slot.handed);
                self.indexed += back.len();
                for seq in back.into_iter().rev() {
                    slot.waiting.push_front(seq);
                }
                match end {
                    SessionEnd::Stopped => {}
                    SessionEnd::Renew => {
                        slot.retry.reset();
                        let until = slot.last_active + self.keys.idle;
                        if until > now {
                            slot.keep_until = Some(until);
                        }
                    }
                    SessionEnd::Failed { error, .. } => {
                        if c.opened.elapsed() >= HEALTHY_SESSION {
                            slot.retry.reset();
                        }
                        if !c.connected {
                            self.last_attempt_failed = true;
                        } else {
                            // A working connection broke (network, the hub, an expired
                            // token): an active device gets it back after its backoff, as a
                            // renewal would, so cloud-to-device messages keep arriving.
                            let until = slot.last_active + self.keys.idle;
                            if until > now {
                                slot.keep_until = Some(until);
                            }
                        }
                        let f = slot.retry.failed(None);
                        slot.parked_until = Some(now + f.delay);
                        if f.log {
                            tracing::warn!(
                                stream = %self.sh.ctx.name,
                                device = %slot.hub_id,
                                server = %self.sh.shown,
                                error = %error,
                                hint = hint(&error),
                                retry_in_ms = f.delay.as_millis() as u64,
                                failures = f.count,
                                "IoT Hub connection failed"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Close connections without traffic for `idle_timeout_s`.
    fn close_idle(&mut self) {
        let now = Instant::now();
        for s in self.slots.values_mut() {
            let idle = now.duration_since(s.last_active) >= self.keys.idle;
            if let Some(c) = s.conn.as_mut() {
                if idle
                    && s.handed.is_empty()
                    && s.waiting.is_empty()
                    && s.events.is_empty()
                    && c.connected
                    && !c.closing
                {
                    tracing::debug!(stream = %self.sh.ctx.name, device = %s.hub_id, "idle connection closed");
                    c.closing = true;
                    c.close.cancel();
                }
            }
            if s.keep_until.is_some_and(|t| t <= now) {
                s.keep_until = None;
            }
        }
    }

    fn publish_metrics(&self) {
        let connected = self
            .slots
            .values()
            .filter(|s| s.conn.as_ref().is_some_and(|c| c.connected))
            .count();
        let m = &self.sh.ctx.metrics;
        m.set_stream_connections(&self.sh.ctx.name, connected);
        m.stream_connected(
            &self.sh.ctx.name,
            connected > 0 || !self.last_attempt_failed,
        );
    }
}
