//! The uplink stage: receptions → dedup window → session lookup, MIC, FCnt, decrypt → payload
//! codec → store.
//!
//! One task runs the uplink decisions in arrival order; the device [`Registry`] it updates is
//! shared with the downlink scheduler (FCntDown, keys) behind a `std::sync::Mutex` held for
//! microseconds and never across an `.await`. Everything that comes out of a loop iteration
//! (new uplinks, raw gateway frames, the new counters of their devices) goes to the store in
//! one [`Store::append`], which is also where the `flush_every_ms = 0` fsync happens, so its
//! cost is shared by a whole burst. Only then is the scheduler told (class A opportunities),
//! and only then are JoinRequests answered ([`join`]).
//!
//! The payload codec of each accepted uplink runs after the registry lock is released and before
//! the append ([`crate::codec`]): its result (or its error: the uplink is stored all the same)
//! is part of the stored record.
//!
//! The stage stops when the ingress task drops its sender: it then releases every pending dedup
//! group at once and stores it, so a graceful stop loses nothing that was received.
//!
//! - [`routes`]: which stream queues take which records;
//! - [`join`]: the OTAA answer.

mod join;
mod routes;

pub use join::JoinSettings;
pub use routes::{Routes, SharedRoutes};

use crate::activity::{Activity, DataRateLabel, FrameView, SignalPoint, UplinkNote};
use crate::codec::Codecs;
use crate::downlink::{DownlinkHandle, SharedRegistry, UplinkInfo};
use crate::ingress::gwmp::Reception;
use crate::ingress::udp::Batch;
use crate::liveness::Heartbeat;
use crate::logs::LogLimiter;
use crate::lorawan::dedup::Dedup;
use crate::lorawan::frame::{self, FrameKind};
use crate::lorawan::mac;
use crate::lorawan::mac_state::{self, MacEvent, MacState, Policy, UplinkFacts};
use crate::lorawan::otaa::JoinRequest;
use crate::lorawan::region;
use crate::lorawan::session::JoinVerdict;
use crate::lorawan::session::{Registry, SessionState, Verdict};
use crate::metrics::Metrics;
use crate::model::{new_id, now_us, Eui64, GatewayFrame, Record, TxSettings, Uplink};
use crate::store::{DeviceUpdate, Entry, Store};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Receptions (`rx_metadata`) one uplink or join keeps at most: the best by SNR, then RSSI.
pub const MAX_RX_METADATA: usize = 32;

/// What one loop iteration produces (stored together, then acted on).
#[derive(Default)]
struct Outputs {
    records: Vec<Record>,
    /// Devices' counters and MAC state to save with the records.
    devices: Vec<DeviceUpdate>,
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

/// How long after its dedup window ends a group may wait to be released when nothing else
/// wakes the stage. Every batch of uplinks that arrives releases all groups due by then, so
/// under traffic (an uplink every few milliseconds) the window's own timer hardly ever fires
/// and the stage wakes once per arrival instead of twice (docs/benchmarks.md, "Dedup windows
/// released by the next arrival"); in a quiet moment an uplink waits at most this much
/// beyond its window (the RX1 answer has ~800 ms to spare).
pub const RELEASE_SLACK: Duration = Duration::from_millis(10);

pub struct UplinkStage {
    registry: SharedRegistry,
    downlinks: Option<DownlinkHandle>,
    store: Store,
    routes: SharedRoutes,
    metrics: Metrics,
    codecs: Arc<Codecs>,
    dedup: Dedup<Reception>,
    warn: LogLimiter,
    unrouted_log: LogLimiter,
    /// Codec errors are input-driven (any device can send any bytes): their own limit, so
    /// they cannot crowd out the stage's other warnings.
    codec_warn: LogLimiter,
    join: JoinSettings,
    /// What the network wants of devices' MAC layers (ADR, RX settings, DevStatus).
    mac: Policy,
    /// The status page's recent activity (signal history, last frames).
    activity: Activity,
}

/// The network settings the stage applies (from `[gateway]`).
#[derive(Debug, Clone)]
pub struct Network {
    /// How long copies of a frame from several gateways are awaited.
    pub dedup_window: Duration,
    pub join: JoinSettings,
    /// What the network wants of devices' MAC layers.
    pub mac: Policy,
}

impl UplinkStage {
    pub fn new(
        registry: SharedRegistry,
        downlinks: Option<DownlinkHandle>,
        store: Store,
        routes: SharedRoutes,
        metrics: Metrics,
        codecs: Arc<Codecs>,
        net: Network,
    ) -> Self {
        UplinkStage {
            registry,
            downlinks,
            store,
            routes,
            metrics,
            codecs,
            dedup: Dedup::new(net.dedup_window),
            warn: LogLimiter::new(),
            unrouted_log: LogLimiter::new(),
            codec_warn: LogLimiter::new(),
            join: net.join,
            mac: net.mac,
            activity: Activity::new(),
        }
    }

    /// Record devices' uplinks and the received frames on `activity` (the status page).
    pub fn with_activity(mut self, activity: Activity) -> Self {
        self.activity = activity;
        self
    }

    /// The status page's line for a frame: its best reception, no payload.
    fn frame_view(&self, phy: &[u8], kind: &'static str, rx: &[Reception]) -> FrameView {
        let best = rx.iter().max_by(|a, b| {
            a.rx.snr
                .total_cmp(&b.rx.snr)
                .then(a.rx.rssi.cmp(&b.rx.rssi))
        });
        let header = frame::peek_data_up(phy).ok();
        FrameView {
            at_us: now_us(),
            kind,
            result: "",
            device: None,
            dev_addr: header.as_ref().map(|h| h.dev_addr),
            f_cnt: header.as_ref().map(|h| u32::from(h.f_cnt16)),
            gateway: best.map(|r| r.rx.gateway),
            gateways: rx.len(),
            rssi: best.map_or(0, |r| r.rx.rssi),
            snr: best.map_or(0.0, |r| r.rx.snr),
            frequency_hz: best.map_or(0, |r| r.settings.frequency_hz),
            data_rate: best.map(|r| data_rate_label(self.mac.region, &r.settings)),
            size: phy.len(),
        }
    }

    /// Run until `rx` is closed, then store whatever is still in the dedup window. Beats
    /// `heartbeat` every time round (the systemd watchdog, `crate::liveness`).
    pub async fn run(mut self, mut rx: mpsc::Receiver<Batch>, mut heartbeat: Heartbeat) {
        let mut out = Outputs::default();
        let mut groups = Vec::new();
        // One timer for the dedup window's next deadline, moved only when that changes: a
        // new `sleep_until` per pass registered and removed a timer for every uplink (~1,100
        // instructions, issue 16). It is set [`RELEASE_SLACK`] after the deadline.
        let window_end = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(window_end);
        let mut armed = None;
        loop {
            heartbeat.beat();
            let deadline = self.dedup.next_deadline();
            if let Some(d) = deadline.filter(|d| armed != Some(*d)) {
                window_end.as_mut().reset((d + RELEASE_SLACK).into());
                armed = Some(d);
            }
            let closed = tokio::select! {
                _ = heartbeat.tick() => continue,
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
                _ = &mut window_end, if deadline.is_some() => false,
            };
            if closed {
                self.dedup.drain(&mut groups);
            } else {
                self.dedup.pop_expired(Instant::now(), &mut groups);
            }
            for (phy, rx) in groups.drain(..) {
                self.decide(&phy, rx, &mut out);
            }
            self.decode_payloads(&mut out.records).await;
            self.store_all(&mut out.records, &mut out.devices).await;
            // Only once stored: the downlink scheduler may answer in RX1/RX2. Before the
            // promotions below: their fsync must not eat into the time left for RX1, and a
            // cloud's downlink queued while it runs must not overtake the opportunity.
            if let Some(h) = &self.downlinks {
                for u in out.opportunities.drain(..) {
                    if !h.opportunity(u) {
                        self.metrics.downlink_event("opportunity_dropped");
                    }
                }
            }
            out.opportunities.clear();
            for eui in out.promote.drain(..) {
                if let Err(e) = self.store.promote_otaa(eui).await {
                    tracing::error!(dev_eui = %eui, error = %e, "cannot store the session of a joined device");
                }
            }
            let joins: Vec<JoinCandidate> = out.joins.drain(..).collect();
            for j in joins {
                self.answer_join(j, &mut out.records).await;
            }
            // Join events for the streams.
            self.store_all(&mut out.records, &mut out.devices).await;
            if closed {
                return;
            }
        }
    }

    fn receive(&mut self, batch: Batch, records: &mut Vec<Record>) {
        let now = Instant::now();
        let gateway_streams = self.routes.get().has_gateway_streams();
        for r in batch {
            if !r.crc_ok {
                self.metrics.frame("crc_bad");
                let mut view = self.frame_view(&r.phy_payload, "unknown", std::slice::from_ref(&r));
                // Its header is noise.
                (view.result, view.dev_addr, view.f_cnt) = ("crc_bad", None, None);
                self.activity.frame(view);
                continue;
            }
            if gateway_streams {
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
                    if self.dedup.push(now, r, |r| &r.phy_payload) {
                        self.metrics.frame("data_up");
                    } else {
                        self.metrics.frame("duplicate_reception");
                    }
                }
                FrameKind::JoinRequest => {
                    if self.dedup.push(now, r, |r| &r.phy_payload) {
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
        // One frame relayed by many (spoofed) gateway EUIs must not become a record no
        // destination takes (docs/reliability.md): keep the best receptions by signal.
        if rx.len() > MAX_RX_METADATA {
            rx.sort_by(|a, b| {
                b.rx.snr
                    .total_cmp(&a.rx.snr)
                    .then(b.rx.rssi.cmp(&a.rx.rssi))
            });
            self.metrics
                .frame_receptions_dropped((rx.len() - MAX_RX_METADATA) as u64);
            rx.truncate(MAX_RX_METADATA);
        }
        let Ok(mut registry) = self.registry.lock() else {
            return;
        };
        let registry: &mut Registry = &mut registry;
        if frame::kind(phy) == FrameKind::JoinRequest {
            let verdict = registry.open_join_request(phy);
            let mut view = self.frame_view(phy, "join_request", &rx);
            view.result = match &verdict {
                JoinVerdict::Valid { device, .. } => {
                    view.device = Some(registry.device(*device).id.clone());
                    "valid"
                }
                JoinVerdict::Malformed => "malformed",
                JoinVerdict::UnknownDevEui(_) => "unknown_dev_eui",
                JoinVerdict::MicFailed(_) => "mic_failed",
            };
            self.activity.frame(view);
            match verdict {
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
        let (records, devices, opportunities) =
            (&mut out.records, &mut out.devices, &mut out.opportunities);
        let mut view = self.frame_view(phy, "data_up", &rx);
        match registry.open_uplink(phy) {
            Verdict::Accepted {
                device,
                f_cnt,
                header,
                opened,
                joined,
                reset,
            } => {
                // Best reception first: that gateway is the one to answer through.
                rx.sort_by(|a, b| {
                    b.rx.snr
                        .total_cmp(&a.rx.snr)
                        .then(b.rx.rssi.cmp(&a.rx.rssi))
                });
                let received_at_us = rx.iter().map(|r| r.rx.received_at_us).min().unwrap_or(0);
                let settings = rx[0].settings.clone();
                let region = self.mac.region;
                let d = registry.device_mut(device);
                if joined {
                    // A new session (LoRaWAN 1.0.x §6.2.5): the device starts from what its
                    // JoinAccept told it.
                    out.promote.push(d.dev_eui);
                    d.mac = MacState::joined(&self.mac);
                }
                if reset {
                    self.metrics.uplink("f_cnt_reset");
                    tracing::warn!(device = %d.id, f_cnt, "the device restarted its frame counter (resets_f_cnt): accepted as a new epoch");
                }
                // MAC commands: FOpts, or the whole payload on FPort 0 — never both
                // (LoRaWAN 1.0.x §4.3.1.6: such a frame is discarded).
                let fport0 = opened.f_port == Some(0);
                if fport0 && !opened.f_opts.is_empty() {
                    self.metrics.uplink("fport0_with_fopts");
                    if self.warn.allow() {
                        tracing::warn!(device = %d.id, f_cnt, "uplink with MAC commands both in FOpts and on FPort 0 discarded (LoRaWAN 1.0.x 4.3.1.6)");
                    }
                    // Its counter is used up all the same: a replay of it stays refused.
                    if let Some(s) = &d.session {
                        push_update(devices, d.dev_eui, s.state, None);
                    }
                    view.result = "fport0_with_fopts";
                    view.device = Some(d.id.clone());
                    self.activity.frame(view);
                    return;
                }
                self.metrics.uplink("accepted");
                let mac_bytes = if fport0 {
                    &opened.frm_payload
                } else {
                    &opened.f_opts
                };
                let parsed = mac::parse_uplink(mac_bytes);
                if let Some(e) = &parsed.error {
                    tracing::debug!(device = %d.id, error = %e, "MAC commands cut short; the rest is ignored");
                }
                let policy = if d.adr {
                    std::borrow::Cow::Borrowed(&self.mac)
                } else {
                    std::borrow::Cow::Owned(Policy {
                        adr: false,
                        ..self.mac.clone()
                    })
                };
                let outcome = d.mac.on_uplink(
                    &policy,
                    &UplinkFacts {
                        f_cnt,
                        dr: region::uplink_dr(region, &settings),
                        max_snr: rx.iter().map(|r| r.rx.snr).fold(f32::NAN, f32::max),
                        adr_bit: header.adr,
                        adr_ack_req: header.adr_ack_req,
                        answers: &parsed.commands,
                        gateway: rx.first().map(|r| r.rx.gateway),
                        now_us: received_at_us,
                    },
                );
                for e in &outcome.events {
                    mac_event(&self.metrics, &mut self.warn, &d.id, e);
                }
                if let Some(s) = &d.session {
                    push_update(
                        devices,
                        d.dev_eui,
                        s.state,
                        mac_state::stored::encode(&d.mac).ok(),
                    );
                }
                let asked = |c: &mac::UplinkMac| parsed.commands.iter().any(|x| x == c);
                opportunities.push(UplinkInfo {
                    device,
                    confirmed: header.confirmed,
                    ack: header.ack,
                    link_check_req: asked(&mac::UplinkMac::LinkCheckReq),
                    device_time_req: asked(&mac::UplinkMac::DeviceTimeReq),
                    needs_downlink: outcome.needs_downlink,
                    rx: rx.iter().map(|r| r.rx.clone()).collect(),
                    settings: rx[0].settings.clone(),
                    arrived: rx
                        .iter()
                        .map(|r| r.arrived)
                        .min()
                        .unwrap_or_else(Instant::now),
                });
                let d = registry.device(device);
                view.result = "accepted";
                view.device = Some(d.id.clone());
                view.f_cnt = Some(f_cnt);
                self.activity.uplink(UplinkNote {
                    dev_eui: d.dev_eui,
                    at_us: view.at_us,
                    f_cnt,
                    data_rate: view.data_rate,
                    signal: SignalPoint {
                        f_cnt,
                        rssi: view.rssi,
                        snr: view.snr,
                    },
                    dev_status: d.mac.dev_status,
                });
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
                    dev_status: d.mac.dev_status,
                    codec: None,
                }));
            }
            Verdict::Malformed => {
                view.result = "malformed";
                self.metrics.uplink("malformed");
            }
            Verdict::UnknownDevAddr(a) => {
                view.result = "unknown_dev_addr";
                // Neighbouring networks' devices are heard all the time: debug, not warn.
                self.metrics.uplink("unknown_dev_addr");
                tracing::debug!(dev_addr = %a, "uplink from an unknown DevAddr ignored");
            }
            Verdict::MicFailed(a) => {
                view.result = "mic_failed";
                self.metrics.uplink("mic_failed");
                if self.warn.allow() {
                    tracing::warn!(dev_addr = %a, "uplink with an invalid MIC dropped (wrong NwkSKey in the config, or a forged frame)");
                }
            }
            Verdict::Repeat { device, f_cnt } => {
                view.result = "repeat";
                view.device = Some(registry.device(device).id.clone());
                view.f_cnt = Some(f_cnt);
                self.metrics.uplink("repeat");
                tracing::debug!(device = %registry.device(device).id, f_cnt, "repeated frame (late copy or retransmission) ignored");
            }
            Verdict::Replay { device, f_cnt16 } => {
                view.result = "replay";
                view.device = Some(registry.device(device).id.clone());
                self.metrics.uplink("replay");
                if self.warn.allow() {
                    let d = registry.device(device);
                    tracing::warn!(
                        device = %d.id,
                        f_cnt16,
                        // An Option field is left out when None (no `Some(..)` in the line).
                        last_f_cnt = d.session.as_ref().and_then(|s| s.state.f_cnt_up),
                        "uplink with an old frame counter dropped (replay, or the device reset its counter)"
                    );
                }
            }
        }
        self.activity.frame(view);
    }

    /// Run each new uplink's payload codec; the result goes into the record. An error is
    /// counted (`lorastream_codec_errors_total{codec}`) and logged (rate-limited), and the
    /// uplink is stored with it.
    async fn decode_payloads(&mut self, records: &mut [Record]) {
        if self.codecs.is_empty() {
            return;
        }
        // All of this iteration's uplinks at once: scripts run on their own threads, so the
        // iteration waits for the slowest script, not for the sum of every call.
        let codecs = self.codecs.clone();
        let results = futures_util::future::join_all(records.iter().map(|r| {
            let codecs = &codecs;
            async move {
                match r {
                    Record::Uplink(u) => codecs.decode(u).await,
                    _ => None,
                }
            }
        }))
        .await;
        for (r, result) in records.iter_mut().zip(results) {
            let (Record::Uplink(u), Some((out, failed))) = (r, result) else {
                continue;
            };
            if let (Some(codec), crate::model::CodecOutput::Error(e)) = (failed, &out) {
                self.metrics.codec_error(codec);
                if self.codec_warn.allow() {
                    tracing::warn!(device = %u.device, f_cnt = u.f_cnt, f_port = u.f_port, codec, error = %e, "payload codec failed; the uplink is delivered without decoded_payload");
                }
            }
            u.codec = Some(out);
        }
    }

    async fn store_all(&mut self, records: &mut Vec<Record>, devices: &mut Vec<DeviceUpdate>) {
        if records.is_empty() && devices.is_empty() {
            return;
        }
        // Every record's queues, one after another in one vector (`ends[i]`: where record
        // `i`'s end), rather than a vector per record.
        let mut queues: Vec<usize> = Vec::with_capacity(records.len() * 2);
        let mut ends: Vec<usize> = Vec::with_capacity(records.len());
        let mut tmp = Vec::new();
        let now = self.routes.get();
        for r in records.iter() {
            match r {
                Record::Uplink(u) => now.for_device(&u.application, &u.device, &mut tmp),
                Record::Join(j) => now.for_device(&j.application, &j.device, &mut tmp),
                Record::GatewayFrame(g) => now.for_gateway(g.rx.gateway, &mut tmp),
                // Alerts are appended by the alert engine, never by this stage.
                Record::Alert(_) => tmp.clear(),
            }
            if tmp.is_empty() {
                if let Record::Uplink(u) = r {
                    self.unrouted(&u.device);
                } else if let Record::Join(j) = r {
                    self.unrouted(&j.device);
                }
            }
            queues.extend_from_slice(&tmp);
            ends.push(queues.len());
        }
        let entries: Vec<Entry<'_>> = records
            .iter()
            .zip(&ends)
            .scan(0, |start, (record, &end)| {
                let queues = &queues[*start..end];
                *start = end;
                Some(Entry { record, queues })
            })
            .filter(|e| !e.queues.is_empty())
            .collect();
        match self.store.append(&entries, devices).await {
            // Queued in memory only (the store logs the disk error, rate-limited).
            Ok(a) if a.unsaved > 0 => self.metrics.store_error(),
            Ok(_) => {
                // One line per uplink the store has taken (durable on disk when
                // `flush_every_ms = 0`), for tracing a single uplink's path and for the
                // crash tests; off unless the `lorastream::stored` target is at trace level.
                if tracing::enabled!(target: "lorastream::stored", tracing::Level::TRACE) {
                    for e in &entries {
                        if let Record::Uplink(u) = e.record {
                            tracing::trace!(target: "lorastream::stored", device = %u.device, f_cnt = u.f_cnt, "uplink stored");
                        }
                    }
                }
            }
            Err(e) => {
                self.metrics.store_error();
                if self.warn.allow() {
                    tracing::error!(error = %e, records = entries.len(), "cannot queue these uplinks; they are lost");
                }
            }
        }
        records.clear();
        devices.clear();
    }
}

impl UplinkStage {
    /// An accepted uplink or join that no stream takes (`lorastream check` warns about such
    /// devices): counted, and logged rate-limited.
    fn unrouted(&mut self, device: &str) {
        self.metrics.uplink_without_stream();
        if self.unrouted_log.allow() {
            tracing::warn!(device, "uplink accepted but no stream takes this device (no stream's application/device scope covers it); it is not stored");
        }
    }
}

/// Save a device's latest state with this iteration's append (one entry per device: a later
/// uplink of the same device in the iteration replaces an earlier one).
fn push_update(
    devices: &mut Vec<DeviceUpdate>,
    dev_eui: Eui64,
    session: SessionState,
    mac: Option<Vec<u8>>,
) {
    devices.retain(|u| u.dev_eui != dev_eui);
    devices.push(DeviceUpdate {
        dev_eui,
        session,
        mac,
    });
}

/// A log line and a metric for what the MAC layer did.
fn mac_event(metrics: &Metrics, warn: &mut LogLimiter, device: &str, e: &MacEvent) {
    {
        match e {
            MacEvent::AdrApplied(t) => {
                metrics.mac_event("adr_applied");
                tracing::info!(%device, dr = t.dr, tx_power = t.tx_power, nb_trans = t.nb_trans, "ADR: the device acknowledged new transmit settings");
            }
            MacEvent::AdrRefused(a) => {
                metrics.mac_event("adr_refused");
                if warn.allow() {
                    tracing::warn!(%device, power_ack = a.power_ack, dr_ack = a.dr_ack, ch_mask_ack = a.ch_mask_ack, "ADR: the device refused the new transmit settings; not asked again with the same ones");
                }
            }
            MacEvent::RxApplied(rx) => {
                metrics.mac_event("rx_applied");
                tracing::info!(%device, rx1_dr_offset = rx.rx1_dr_offset, rx2_dr = rx.rx2_dr, rx2_freq_hz = rx.rx2_freq_hz, rx_delay_s = rx.rx_delay, "the device acknowledged new receive windows");
            }
            MacEvent::RxRefused => {
                metrics.mac_event("rx_refused");
                if warn.allow() {
                    tracing::warn!(%device, "the device refused new receive windows (RXParamSetupReq); downlinks keep its current ones");
                }
            }
            MacEvent::ChannelAdded(i) => {
                metrics.mac_event("channel_added");
                tracing::debug!(%device, channel = i, "the device added a channel");
            }
            MacEvent::ChannelRefused(i) => {
                metrics.mac_event("channel_refused");
                tracing::debug!(%device, channel = i, "the device refused a channel");
            }
            MacEvent::DevStatus(st) => {
                metrics.mac_event("dev_status");
                tracing::debug!(%device, battery = st.battery, margin = st.margin, "DevStatusAns");
            }
            MacEvent::GaveUp(_) => metrics.mac_event("gave_up"),
        }
    }
}

/// "DR5 (SF7BW125)": the region's data rate and the radio settings it stands for.
fn data_rate_label(region: region::Region, s: &TxSettings) -> DataRateLabel {
    DataRateLabel {
        dr: region::uplink_dr(region, s),
        spreading_factor: s.spreading_factor,
        bandwidth_khz: s.bandwidth_hz / 1000,
    }
}
