//! The uplink stage: receptions → dedup window → session lookup, MIC, FCnt, decrypt → store.
//!
//! One task owns the device [`Registry`], so counters need no locks and are updated in arrival
//! order. Everything that comes out of a loop iteration (new uplinks, raw gateway frames, the
//! new counters of their devices) goes to the store in one [`Store::append`], which is also
//! where the `flush_every_ms = 0` fsync happens, so its cost is shared by a whole burst.
//!
//! The stage stops when the ingress task drops its sender: it then releases every pending dedup
//! group at once and stores it, so a graceful stop loses nothing that was received.

use crate::config::Scope;
use crate::downlink::{Input as DownlinkInput, SharedRegistry, UplinkInfo};
use crate::ingress::gwmp::Reception;
use crate::ingress::udp::Batch;
use crate::lorawan::dedup::Dedup;
use crate::lorawan::frame::{self, FrameKind};
use crate::lorawan::mac;
use crate::lorawan::session::{Registry, SessionState, Verdict};
use crate::metrics::Metrics;
use crate::model::{new_id, Eui64, GatewayFrame, Record, Uplink};
use crate::store::{Entry, Store};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Which queues take which records.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    /// (scope, queue index in `Store::queues()`).
    routes: Vec<(Scope, usize)>,
}

impl Routes {
    /// `streams`: (name, scope) of every stream; indexes follow the store's queue order.
    pub fn new(store: &Store, streams: &[(String, Scope)]) -> Routes {
        let queues = store.queues();
        let routes = streams
            .iter()
            .filter_map(|(name, scope)| {
                queues
                    .iter()
                    .position(|q| q.name() == name)
                    .map(|i| (scope.clone(), i))
            })
            .collect();
        Routes { routes }
    }

    fn for_uplink(&self, u: &Uplink, out: &mut Vec<usize>) {
        out.clear();
        out.extend(self.routes.iter().filter_map(|(s, i)| match s {
            Scope::All => Some(*i),
            Scope::Application(a) if *a == u.application => Some(*i),
            Scope::Device(d) if *d == u.device => Some(*i),
            _ => None,
        }));
    }

    fn for_gateway(&self, gw: Eui64, out: &mut Vec<usize>) {
        out.clear();
        out.extend(self.routes.iter().filter_map(|(s, i)| match s {
            Scope::Gateway(None) => Some(*i),
            Scope::Gateway(Some(g)) if *g == gw => Some(*i),
            _ => None,
        }));
    }

    fn has_gateway_streams(&self) -> bool {
        self.routes
            .iter()
            .any(|(s, _)| matches!(s, Scope::Gateway(_)))
    }
}

/// Warn at most `burst` times per `period` per kind, then count silently.
struct LogLimiter {
    period: Duration,
    burst: u32,
    window_start: Instant,
    used: u32,
    suppressed: u64,
}

impl LogLimiter {
    fn new() -> Self {
        LogLimiter {
            period: Duration::from_secs(10),
            burst: 10,
            window_start: Instant::now(),
            used: 0,
            suppressed: 0,
        }
    }

    fn allow(&mut self) -> bool {
        if self.window_start.elapsed() >= self.period {
            if self.suppressed > 0 {
                tracing::warn!(
                    suppressed = self.suppressed,
                    "similar warnings suppressed in the last period (see /metrics)"
                );
            }
            self.window_start = Instant::now();
            self.used = 0;
            self.suppressed = 0;
        }
        if self.used < self.burst {
            self.used += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

pub struct UplinkStage {
    registry: SharedRegistry,
    downlinks: Option<mpsc::Sender<DownlinkInput>>,
    store: Store,
    routes: Routes,
    metrics: Metrics,
    dedup: Dedup<Reception>,
    warn: LogLimiter,
}

impl UplinkStage {
    pub fn new(
        registry: SharedRegistry,
        downlinks: Option<mpsc::Sender<DownlinkInput>>,
        store: Store,
        routes: Routes,
        metrics: Metrics,
        dedup_window: Duration,
    ) -> Self {
        UplinkStage {
            registry,
            downlinks,
            store,
            routes,
            metrics,
            dedup: Dedup::new(dedup_window),
            warn: LogLimiter::new(),
        }
    }

    /// Run until `rx` is closed, then store whatever is still in the dedup window.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Batch>) {
        let mut records: Vec<Record> = Vec::new();
        let mut sessions: Vec<(Eui64, SessionState)> = Vec::new();
        let mut groups = Vec::new();
        let mut opportunities: Vec<UplinkInfo> = Vec::new();
        loop {
            let deadline = self.dedup.next_deadline();
            let closed = tokio::select! {
                b = rx.recv() => match b {
                    Some(b) => {
                        self.receive(b, &mut records);
                        // Take what else is already waiting, so one append serves a burst.
                        for _ in 0..256 {
                            match rx.try_recv() {
                                Ok(b) => self.receive(b, &mut records),
                                Err(_) => break,
                            }
                        }
                        false
                    }
                    None => true,
                },
                _ = sleep_until(deadline), if deadline.is_some() => false,
            };
            if closed {
                self.dedup.drain(&mut groups);
            } else {
                self.dedup.pop_expired(Instant::now(), &mut groups);
            }
            for (phy, rx) in groups.drain(..) {
                self.decide(&phy, rx, &mut records, &mut sessions, &mut opportunities);
            }
            self.store_all(&mut records, &mut sessions).await;
            // Only once stored: the downlink scheduler may answer in RX1/RX2.
            if let Some(tx) = &self.downlinks {
                for u in opportunities.drain(..) {
                    if tx.try_send(DownlinkInput::Uplink(Box::new(u))).is_err() {
                        self.metrics.downlink_event("opportunity_dropped");
                    }
                }
            }
            opportunities.clear();
            if closed {
                return;
            }
        }
    }

    fn receive(&mut self, batch: Batch, records: &mut Vec<Record>) {
        let now = Instant::now();
        for r in batch {
            if !r.crc_ok {
                self.metrics.frame("crc_bad");
                continue;
            }
            if self.routes.has_gateway_streams() {
                records.push(Record::GatewayFrame(GatewayFrame {
                    id: new_id(),
                    phy_payload: r.phy_payload.clone(),
                    crc_ok: r.crc_ok,
                    settings: r.settings.clone(),
                    rx: r.rx.clone(),
                }));
            }
            match frame::kind(&r.phy_payload) {
                FrameKind::DataUp { .. } => {
                    let phy = r.phy_payload.clone();
                    if self.dedup.push(now, &phy, r) {
                        self.metrics.frame("data_up");
                    } else {
                        self.metrics.frame("duplicate_reception");
                    }
                }
                FrameKind::JoinRequest => self.metrics.frame("join_request"),
                _ => self.metrics.frame("other"),
            }
        }
    }

    fn decide(
        &mut self,
        phy: &[u8],
        mut rx: Vec<Reception>,
        records: &mut Vec<Record>,
        sessions: &mut Vec<(Eui64, SessionState)>,
        opportunities: &mut Vec<UplinkInfo>,
    ) {
        let Ok(mut registry) = self.registry.lock() else {
            return;
        };
        let registry: &mut Registry = &mut registry;
        match registry.open_uplink(phy) {
            Verdict::Accepted {
                device,
                f_cnt,
                header,
                opened,
            } => {
                self.metrics.uplink("accepted");
                let d = registry.device(device);
                if let Some(s) = &d.session {
                    sessions.retain(|(e, _)| *e != d.dev_eui);
                    sessions.push((d.dev_eui, s.state));
                }
                // Best reception first: that gateway is the one to answer through.
                rx.sort_by(|a, b| {
                    b.rx.snr
                        .total_cmp(&a.rx.snr)
                        .then(b.rx.rssi.cmp(&a.rx.rssi))
                });
                let received_at_us = rx.iter().map(|r| r.rx.received_at_us).min().unwrap_or(0);
                // MAC commands: FOpts, or the whole payload on FPort 0.
                let mut mac_bytes = opened.f_opts.clone();
                if opened.f_port == Some(0) {
                    mac_bytes.extend_from_slice(&opened.frm_payload);
                }
                let (mac, unknown) = mac::parse_uplink(&mac_bytes);
                if let Some(cid) = unknown {
                    tracing::debug!(device = %d.id, cid, "unknown MAC command; the rest of the MAC payload is ignored");
                }
                opportunities.push(UplinkInfo {
                    device,
                    confirmed: header.confirmed,
                    ack: header.ack,
                    mac,
                    best: rx[0].rx.clone(),
                    gateways: rx.len(),
                    settings: rx[0].settings.clone(),
                    arrived: rx
                        .iter()
                        .map(|r| r.arrived)
                        .min()
                        .unwrap_or_else(Instant::now),
                });
                let settings = rx[0].settings.clone();
                let payload = if opened.f_port.unwrap_or(0) > 0 {
                    opened.frm_payload
                } else {
                    Vec::new()
                };
                records.push(Record::Uplink(Uplink {
                    id: new_id(),
                    received_at_us,
                    application: d.application.clone(),
                    device: d.id.clone(),
                    dev_eui: d.dev_eui,
                    dev_addr: header.dev_addr,
                    f_port: opened.f_port,
                    f_cnt,
                    confirmed: header.confirmed,
                    adr: header.adr,
                    payload,
                    settings,
                    rx: rx.into_iter().map(|r| r.rx).collect(),
                }));
            }
            Verdict::Malformed => self.metrics.uplink("malformed"),
            Verdict::UnknownDevAddr(a) => {
                // Neighbouring networks' devices are heard all the time: debug, not warn.
                self.metrics.uplink("unknown_dev_addr");
                tracing::debug!(dev_addr = %a, "uplink from an unknown DevAddr ignored");
            }
            Verdict::MicFailed(a) => {
                self.metrics.uplink("mic_failed");
                if self.warn.allow() {
                    tracing::warn!(dev_addr = %a, "uplink with an invalid MIC dropped (wrong NwkSKey in the config, or a forged frame)");
                }
            }
            Verdict::Repeat { device, f_cnt } => {
                self.metrics.uplink("repeat");
                tracing::debug!(device = %registry.device(device).id, f_cnt, "repeated frame (late copy or retransmission) ignored");
            }
            Verdict::Replay { device, f_cnt16 } => {
                self.metrics.uplink("replay");
                if self.warn.allow() {
                    let d = registry.device(device);
                    tracing::warn!(
                        device = %d.id,
                        f_cnt16,
                        last_f_cnt = ?d.session.as_ref().and_then(|s| s.state.f_cnt_up),
                        "uplink with an old frame counter dropped (replay, or the device reset its counter)"
                    );
                }
            }
        }
    }

    async fn store_all(
        &mut self,
        records: &mut Vec<Record>,
        sessions: &mut Vec<(Eui64, SessionState)>,
    ) {
        if records.is_empty() && sessions.is_empty() {
            return;
        }
        let mut routes: Vec<Vec<usize>> = Vec::with_capacity(records.len());
        let mut tmp = Vec::new();
        for r in records.iter() {
            match r {
                Record::Uplink(u) => self.routes.for_uplink(u, &mut tmp),
                Record::GatewayFrame(g) => self.routes.for_gateway(g.rx.gateway, &mut tmp),
            }
            routes.push(tmp.clone());
        }
        let entries: Vec<Entry<'_>> = records
            .iter()
            .zip(&routes)
            .filter(|(_, q)| !q.is_empty())
            .map(|(record, queues)| Entry { record, queues })
            .collect();
        if let Err(e) = self.store.append(&entries, sessions).await {
            self.metrics.store_error();
            if self.warn.allow() {
                tracing::error!(error = %e, records = entries.len(), "cannot write to the store; these uplinks are lost");
            }
        }
        records.clear();
        sessions.clear();
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Restore saved counters into the registry.
pub fn restore_sessions(registry: &mut Registry, saved: &[(Eui64, SessionState)]) {
    for (eui, st) in saved {
        if let Some(idx) = registry.devices().iter().position(|d| d.dev_eui == *eui) {
            registry.restore(idx, *st);
        }
    }
}
