//! The uplink stage: receptions → dedup window → session lookup, MIC, FCnt, decrypt → store.
//!
//! One task owns the device [`Registry`], so counters need no locks and are updated in arrival
//! order. Everything that comes out of a loop iteration (new uplinks, raw gateway frames, the
//! new counters of their devices) goes to the store in one [`Store::append`], which is also
//! where the `flush_every_ms = 0` fsync happens, so its cost is shared by a whole burst.
//!
//! The stage stops when the ingress task drops its sender: it then releases every pending dedup
//! group at once and stores it, so a graceful stop loses nothing that was received.

use crate::config::{Region, Scope};
use crate::downlink::{window, Input as DownlinkInput, JoinAcceptJob, SharedRegistry, UplinkInfo};
use crate::ingress::gwmp::Reception;
use crate::ingress::udp::Batch;
use crate::lorawan::dedup::Dedup;
use crate::lorawan::frame::{self, FrameKind};
use crate::lorawan::mac;
use crate::lorawan::otaa::{self, JoinRequest};
use crate::lorawan::session::{JoinVerdict, Session};
use crate::lorawan::session::{Registry, SessionState, Verdict};
use crate::metrics::Metrics;
use crate::model::{new_id, Eui64, GatewayFrame, Join, Record, Uplink};
use crate::store::OtaaSession;
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
        self.for_device(&u.application, &u.device, out)
    }

    fn for_device(&self, application: &str, device: &str, out: &mut Vec<usize>) {
        out.clear();
        out.extend(self.routes.iter().filter_map(|(s, i)| match s {
            Scope::All => Some(*i),
            Scope::Application(a) if a == application => Some(*i),
            Scope::Device(d) if d == device => Some(*i),
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

/// What one loop iteration produces (stored together, then acted on).
#[derive(Default)]
struct Outputs {
    records: Vec<Record>,
    sessions: Vec<(Eui64, SessionState)>,
    /// Class A opportunities for the downlink scheduler (sent after the store append).
    opportunities: Vec<UplinkInfo>,
    /// Valid JoinRequests to answer.
    joins: Vec<JoinCandidate>,
    /// OTAA devices whose pending session was just used: make it their stored session.
    promote: Vec<Eui64>,
}

struct JoinCandidate {
    device: usize,
    request: JoinRequest,
    rx: Vec<Reception>,
}

/// What OTAA needs from the config.
#[derive(Debug, Clone, Copy)]
pub struct JoinSettings {
    /// Region and the RX settings the JoinAccept gives (DLSettings).
    pub plan: window::RxPlan,
    pub net_id: u32,
    /// US915/AU915: the gateway's sub-band, for a channel-mask CFList.
    pub sub_band: Option<u8>,
}

impl JoinSettings {
    /// The CFList of a JoinAccept: EU868's five extra channels (type 0); US915/AU915 the
    /// configured sub-band (type 1) or none; none for AS923 (optional there, and which extra
    /// channels a gateway has is not known).
    pub fn cf_list(&self) -> Option<[u8; 16]> {
        match self.plan.region {
            Region::EU868 => Some(otaa::eu868_cf_list()),
            Region::US915 | Region::AU915 => self.sub_band.and_then(otaa::channel_mask_cf_list),
            Region::AS923 => None,
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
    join: JoinSettings,
}

impl UplinkStage {
    pub fn new(
        registry: SharedRegistry,
        downlinks: Option<mpsc::Sender<DownlinkInput>>,
        store: Store,
        routes: Routes,
        metrics: Metrics,
        dedup_window: Duration,
        join: JoinSettings,
    ) -> Self {
        UplinkStage {
            registry,
            downlinks,
            store,
            routes,
            metrics,
            dedup: Dedup::new(dedup_window),
            warn: LogLimiter::new(),
            join,
        }
    }

    /// Run until `rx` is closed, then store whatever is still in the dedup window.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Batch>) {
        let mut out = Outputs::default();
        let mut groups = Vec::new();
        loop {
            let deadline = self.dedup.next_deadline();
            let closed = tokio::select! {
                b = rx.recv() => match b {
                    Some(b) => {
                        self.receive(b, &mut out.records);
                        // Take what else is already waiting, so one append serves a burst.
                        for _ in 0..256 {
                            match rx.try_recv() {
                                Ok(b) => self.receive(b, &mut out.records),
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
                self.decide(&phy, rx, &mut out);
            }
            self.store_all(&mut out.records, &mut out.sessions).await;
            for eui in out.promote.drain(..) {
                if let Err(e) = self.store.promote_otaa(eui).await {
                    tracing::error!(dev_eui = %eui, error = %e, "cannot store the session of a joined device");
                }
            }
            // Only once stored: the downlink scheduler may answer in RX1/RX2.
            if let Some(tx) = &self.downlinks {
                for u in out.opportunities.drain(..) {
                    if tx.try_send(DownlinkInput::Uplink(Box::new(u))).is_err() {
                        self.metrics.downlink_event("opportunity_dropped");
                    }
                }
            }
            out.opportunities.clear();
            let joins: Vec<JoinCandidate> = out.joins.drain(..).collect();
            for j in joins {
                self.answer_join(j, &mut out.records).await;
            }
            // Join events for the streams.
            self.store_all(&mut out.records, &mut out.sessions).await;
            if closed {
                return;
            }
        }
    }

    /// A valid JoinRequest: check the DevNonce, make a session, send the JoinAccept.
    async fn answer_join(&mut self, j: JoinCandidate, records: &mut Vec<Record>) {
        let Some(best) =
            j.rx.iter()
                .max_by(|a, b| a.rx.snr.total_cmp(&b.rx.snr))
                .cloned()
        else {
            return;
        };
        let eui = j.request.dev_eui;
        let counts_up = self
            .registry
            .lock()
            .map(|r| r.device(j.device).dev_nonce_counts_up)
            .unwrap_or(false);
        // DevNonce must not repeat (1.0.x §6.2.4); recorded, with the next JoinNonce, and
        // fsynced before answering.
        let app_nonce = match self
            .store
            .accept_join(eui, j.request.dev_nonce, counts_up)
            .await
        {
            Ok(Some(join_nonce)) => join_nonce,
            Ok(None) => {
                self.metrics.uplink("join_replay");
                if self.warn.allow() {
                    tracing::warn!(dev_eui = %eui, dev_nonce = j.request.dev_nonce, counts_up, "JoinRequest with a DevNonce used before (or, for a LoRaWAN 1.0.4 device, not above the last one) ignored: replay");
                }
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot record a DevNonce; JoinRequest ignored");
                return;
            }
        };
        let (app_key, application, device, dev_addr) = {
            let Ok(reg) = self.registry.lock() else {
                return;
            };
            let d = reg.device(j.device);
            let Some(app_key) = d.app_key else { return };
            // A free DevAddr within the NetID.
            let mut dev_addr = otaa::dev_addr_for(self.join.net_id, rand::random());
            while reg.dev_addr_in_use(dev_addr) {
                dev_addr = otaa::dev_addr_for(self.join.net_id, rand::random());
            }
            (app_key, d.application.clone(), d.id.clone(), dev_addr)
        };
        let (nwk_s_key, app_s_key) =
            otaa::derive_session_keys(&app_key, app_nonce, self.join.net_id, j.request.dev_nonce);
        let plan = self.join.plan;
        let ja = otaa::JoinAccept {
            app_nonce,
            net_id: self.join.net_id,
            dev_addr,
            rx1_dr_offset: plan.rx1_dr_offset,
            rx2_dr: plan.rx2_dr,
            // RX1 one second after the uplink (RECEIVE_DELAY1), as for ABP devices.
            rx_delay: 1,
            cf_list: self.join.cf_list(),
        };
        let phy = otaa::encode_join_accept(&ja, &app_key);
        let pending = OtaaSession {
            dev_addr,
            nwk_s_key: nwk_s_key.0,
            app_s_key: app_s_key.0,
            rx1_dr_offset: plan.rx1_dr_offset,
            rx2_dr: plan.rx2_dr,
            rx_delay: 1,
        };
        if let Err(e) = self.store.save_otaa_pending(eui, &pending).await {
            tracing::error!(error = %e, "cannot store a new session; JoinRequest ignored");
            return;
        }
        if let Ok(mut reg) = self.registry.lock() {
            reg.set_pending(
                j.device,
                Session {
                    dev_addr,
                    nwk_s_key,
                    app_s_key,
                    state: SessionState {
                        dev_addr,
                        ..Default::default()
                    },
                },
            );
        }
        self.metrics.uplink("join_accepted");
        tracing::info!(%device, dev_eui = %eui, %dev_addr, "OTAA join accepted");
        if let Some(tx) = &self.downlinks {
            let mut rx: Vec<_> = j.rx.iter().map(|r| r.rx.clone()).collect();
            rx.sort_by(|a, b| b.snr.total_cmp(&a.snr).then(b.rssi.cmp(&a.rssi)));
            let job = JoinAcceptJob {
                device: j.device,
                phy,
                rx,
                settings: best.settings.clone(),
                arrived: j
                    .rx
                    .iter()
                    .map(|r| r.arrived)
                    .min()
                    .unwrap_or_else(Instant::now),
            };
            if tx
                .try_send(DownlinkInput::JoinAccept(Box::new(job)))
                .is_err()
            {
                self.metrics.downlink_event("join_accept_dropped");
            }
        }
        records.push(Record::Join(Join {
            id: new_id(),
            received_at_us: best.rx.received_at_us,
            application,
            device,
            dev_eui: eui,
            join_eui: j.request.join_eui,
            dev_addr,
            settings: best.settings.clone(),
            rx: j.rx.into_iter().map(|r| r.rx).collect(),
        }));
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
                FrameKind::JoinRequest => {
                    let phy = r.phy_payload.clone();
                    if self.dedup.push(now, &phy, r) {
                        self.metrics.frame("join_request");
                    } else {
                        self.metrics.frame("duplicate_reception");
                    }
                }
                _ => self.metrics.frame("other"),
            }
        }
    }

    fn decide(&mut self, phy: &[u8], mut rx: Vec<Reception>, out: &mut Outputs) {
        let Ok(mut registry) = self.registry.lock() else {
            return;
        };
        let registry: &mut Registry = &mut registry;
        if frame::kind(phy) == FrameKind::JoinRequest {
            match registry.open_join_request(phy) {
                JoinVerdict::Valid { device, request } => out.joins.push(JoinCandidate {
                    device,
                    request,
                    rx,
                }),
                JoinVerdict::Malformed => self.metrics.uplink("malformed"),
                JoinVerdict::UnknownDevEui(e) => {
                    self.metrics.uplink("join_unknown_dev_eui");
                    tracing::debug!(dev_eui = %e, "JoinRequest of an unknown device ignored");
                }
                JoinVerdict::MicFailed(e) => {
                    self.metrics.uplink("join_mic_failed");
                    if self.warn.allow() {
                        tracing::warn!(dev_eui = %e, "JoinRequest with an invalid MIC dropped (wrong app_key or join_eui in the config?)");
                    }
                }
            }
            return;
        }
        let (records, sessions, opportunities) =
            (&mut out.records, &mut out.sessions, &mut out.opportunities);
        match registry.open_uplink(phy) {
            Verdict::Accepted {
                device,
                f_cnt,
                header,
                opened,
                joined,
            } => {
                if joined {
                    out.promote.push(registry.device(device).dev_eui);
                }
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
                    rx: rx.iter().map(|r| r.rx.clone()).collect(),
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
                Record::Join(j) => self.routes.for_device(&j.application, &j.device, &mut tmp),
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
        match self.store.append(&entries, sessions).await {
            // Queued in memory only (the store logs the disk error, rate-limited).
            Ok(a) if a.unsaved > 0 => self.metrics.store_error(),
            Ok(_) => {}
            Err(e) => {
                self.metrics.store_error();
                if self.warn.allow() {
                    tracing::error!(error = %e, records = entries.len(), "cannot queue these uplinks; they are lost");
                }
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
