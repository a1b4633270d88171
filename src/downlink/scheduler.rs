//! The scheduler: one task that owns all downlink state (see the module docs of
//! [`crate::downlink`] for what it does with each input).

use super::window::{self, RxPlan, Window};
use super::{Input, JoinAcceptJob, SharedRegistry, StreamLink, UplinkInfo, MAX_QUEUE};
use crate::ingress::udp::{Downlinker, SendError, TxAck};
use crate::lorawan::frame::{encode, DataFrame, MacCmd};
use crate::lorawan::mac;
use crate::lorawan::region::{
    JOIN_ACCEPT_DELAY1, JOIN_ACCEPT_DELAY2, RECEIVE_DELAY1, RECEIVE_DELAY2,
};
use crate::lorawan::session::DeviceClass;
use crate::metrics::Metrics;
use crate::model::{
    DownlinkEvent, DownlinkEventKind, DownlinkItem, DownlinkOp, DownlinkRequest, Eui64, RxInfo,
    TxSettings,
};
use crate::store::Store;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Confirmed downlinks are sent at most this many times before `nack`.
pub const MAX_CONFIRMED_ATTEMPTS: u8 = 3;
/// FOpts holds at most 15 bytes of MAC commands (LoRaWAN 1.0.x §4.3.1.6, FOptsLen is 4 bits).
const MAX_FOPTS: usize = 15;
/// A PULL_RESP without TX_ACK after this long is taken as sent (GWMP v1 forwarders never ACK).
const TX_ACK_TIMEOUT: Duration = Duration::from_secs(3);
/// Margin to keep before a window's time for the PULL_RESP to reach the concentrator: the
/// forwarder needs the packet in its JIT queue some tens of ms ahead (lora_pkt_fwd refuses
/// with TOO_LATE below about 30 ms); 100 ms also covers a loaded Raspberry Pi.
const SCHEDULE_MARGIN: Duration = Duration::from_millis(100);

/// Why the scheduler refuses a downlink (the `error` of its `down/failed` event).
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("device {device:?} is outside the scope of stream {stream:?}")]
    OutOfScope { device: String, stream: String },
    #[error("downlink queue full ({len} queued, at most {MAX_QUEUE})")]
    QueueFull { len: usize },
    #[error("store error")]
    Store,
    #[error("payload of {len} bytes is too large for the data rate the device uses (at most {max} bytes in its RX1/RX2 windows after this uplink)")]
    TooLargeForDataRate { len: usize, max: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Rx1,
    Rx2,
    Immediate,
}

/// Where to send a frame again if its RX1 transmission is refused.
#[derive(Debug, Clone)]
struct Fallback {
    window: Window,
    tmst: u32,
    /// After this, the PULL_RESP could not reach the concentrator in time for RX2.
    deadline: Instant,
}

/// A PULL_RESP waiting for its TX_ACK.
struct Pending {
    tx: Tx,
    sent_at: Instant,
}

/// What to send, where and when.
struct Tx {
    device: usize,
    /// Class A: when the uplink this answers arrived (for the scheduling latency).
    answers: Option<Instant>,
    item: Option<(Vec<u8>, DownlinkItem)>,
    f_cnt: Option<u32>,
    phy: Vec<u8>,
    slot: Slot,
    gateway: Eui64,
    window: Window,
    tmst: Option<u32>,
    rx2: Option<Fallback>,
    join_accept: bool,
}

pub(crate) struct Scheduler {
    registry: SharedRegistry,
    store: Store,
    tx: Downlinker,
    /// The network's RX settings (region, RX2 data rate).
    plan: RxPlan,
    /// The region's defaults: what a device uses before its JoinAccept (RX1DROffset 0, default
    /// RX2 data rate), so the windows of the JoinAccept itself.
    join_plan: RxPlan,
    streams: HashMap<String, StreamLink>,
    metrics: Metrics,
    pending: HashMap<u16, Pending>,
    /// Confirmed downlinks sent, waiting for the device's ACK: device → (store key, item).
    awaiting_ack: HashMap<usize, (Vec<u8>, DownlinkItem)>,
    /// How often each confirmed downlink (store key) has been sent.
    attempts: HashMap<Vec<u8>, u8>,
    /// Last uplink of each device (receptions best first, radio settings), for class C.
    last_heard: HashMap<usize, (Vec<RxInfo>, TxSettings)>,
}

/// MAC answers that fit FOpts, in order; the rest are dropped (the device asks again).
fn fit_fopts(answers: Vec<MacCmd>) -> (Vec<MacCmd>, usize) {
    let mut used = 0;
    let kept: Vec<MacCmd> = answers
        .into_iter()
        .filter(|m| {
            let n = 1 + m.payload.len();
            let fits = used + n <= MAX_FOPTS;
            if fits {
                used += n;
            }
            fits
        })
        .collect();
    (kept, used)
}

fn micros(d: Duration) -> u32 {
    d.as_micros() as u32
}

impl Scheduler {
    pub(crate) fn new(
        registry: SharedRegistry,
        store: Store,
        tx: Downlinker,
        plan: RxPlan,
        streams: HashMap<String, StreamLink>,
        metrics: Metrics,
    ) -> Self {
        Scheduler {
            registry,
            store,
            tx,
            plan,
            join_plan: RxPlan::new(plan.region, None),
            streams,
            metrics,
            pending: HashMap::new(),
            awaiting_ack: HashMap::new(),
            attempts: HashMap::new(),
            last_heard: HashMap::new(),
        }
    }

    /// Run until every [`super::DownlinkHandle`] is gone. `tx_acks` come from ingress.
    /// Beats `heartbeat` every time round (the systemd watchdog, `crate::liveness`); the
    /// 500 ms sweep keeps an idle scheduler going round.
    pub(crate) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Input>,
        mut tx_acks: mpsc::Receiver<TxAck>,
        heartbeat: crate::liveness::Heartbeat,
    ) {
        let mut sweep = tokio::time::interval(Duration::from_millis(500));
        let mut acks_open = true;
        loop {
            heartbeat.beat();
            tokio::select! {
                i = rx.recv() => match i {
                    Some(Input::Uplink(u)) => self.on_uplink(*u).await,
                    Some(Input::Request(r, done)) => {
                        self.on_request(r).await;
                        let _ = done.send(());
                    }
                    Some(Input::JoinAccept(j)) => self.on_join_accept(*j).await,
                    None => return,
                },
                a = tx_acks.recv(), if acks_open => match a {
                    Some(a) => self.on_tx_ack(a).await,
                    None => acks_open = false,
                },
                _ = sweep.tick() => self.sweep().await,
            }
        }
    }

    fn device_ids(&self, device: usize) -> Option<(String, String, Eui64, DeviceClass)> {
        let r = self.registry.lock().ok()?;
        let d = r.devices().get(device)?;
        Some((d.application.clone(), d.id.clone(), d.dev_eui, d.class))
    }

    fn emit(
        &self,
        device: usize,
        kind: DownlinkEventKind,
        item: Option<&DownlinkItem>,
        stream: &str,
        detail: serde_json::Value,
    ) {
        let Some((application, device_id, dev_eui, _)) = self.device_ids(device) else {
            return;
        };
        self.emit_for(stream, application, device_id, dev_eui, kind, item, detail);
    }

    #[allow(clippy::too_many_arguments)]
    fn emit_for(
        &self,
        stream: &str,
        application: String,
        device: String,
        dev_eui: Eui64,
        kind: DownlinkEventKind,
        item: Option<&DownlinkItem>,
        detail: serde_json::Value,
    ) {
        self.metrics.downlink_event(kind.as_str());
        let Some(link) = self.streams.get(stream) else {
            return;
        };
        let ev = DownlinkEvent {
            stream: stream.to_string(),
            application,
            device,
            dev_eui,
            kind,
            item: item.cloned(),
            detail,
        };
        if link.events.try_send(ev).is_err() {
            self.metrics.downlink_event("event_dropped");
        }
    }

    async fn on_request(&mut self, r: DownlinkRequest) {
        let found = self.registry.lock().ok().and_then(|reg| {
            reg.find(&r.device).map(|i| {
                let d = reg.device(i);
                (i, d.application.clone(), d.dev_eui, d.class)
            })
        });
        // An empty application means "the device's own" (device ids are unique across
        // applications): the HTTP stream addresses devices by id alone.
        let Some((device, app, dev_eui, class)) =
            found.filter(|(_, app, _, _)| r.application.is_empty() || *app == r.application)
        else {
            tracing::info!(stream = %r.stream, device = %r.device, application = %r.application, "downlink for an unknown device ignored");
            self.metrics.downlink_event("unknown_device");
            return;
        };
        let in_scope = self
            .streams
            .get(&r.stream)
            .is_some_and(|l| l.scope.covers(&app, &r.device));
        let items = match (in_scope, r.items) {
            (false, _) => Err(Refusal::OutOfScope {
                device: r.device.clone(),
                stream: r.stream.clone(),
            }
            .to_string()),
            (true, items) => items.map_err(|e| e.to_string()),
        };
        let items = match items {
            Ok(items) => items,
            Err(reason) => {
                tracing::info!(stream = %r.stream, device = %r.device, %reason, "downlink refused");
                self.emit(
                    device,
                    DownlinkEventKind::Failed,
                    None,
                    &r.stream,
                    serde_json::json!({ "error": reason }),
                );
                return;
            }
        };
        match self
            .store
            .downlinks_enqueue(dev_eui, &items, r.op == DownlinkOp::Replace, MAX_QUEUE)
            .await
        {
            Ok(Ok(removed)) => {
                if !removed.is_empty() {
                    self.awaiting_ack.remove(&device);
                    self.attempts.retain(|k, _| !k.starts_with(&dev_eui.0));
                }
                for it in &items {
                    self.emit(
                        device,
                        DownlinkEventKind::Queued,
                        Some(it),
                        &it.stream,
                        serde_json::json!({}),
                    );
                }
            }
            Ok(Err(len)) => {
                for it in &items {
                    self.emit(
                        device,
                        DownlinkEventKind::Failed,
                        Some(it),
                        &it.stream,
                        serde_json::json!({ "error": Refusal::QueueFull { len }.to_string() }),
                    );
                }
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot store a downlink");
                for it in &items {
                    self.emit(
                        device,
                        DownlinkEventKind::Failed,
                        Some(it),
                        &it.stream,
                        serde_json::json!({ "error": Refusal::Store.to_string() }),
                    );
                }
                return;
            }
        }
        if class == DeviceClass::C {
            self.send_class_c(device, dev_eui).await;
        }
    }

    /// Take the next queued downlink that fits `max` bytes; oversized ones fail.
    async fn next_item(
        &mut self,
        device: usize,
        dev_eui: Eui64,
        max: usize,
    ) -> (Option<(Vec<u8>, DownlinkItem)>, usize) {
        let queue = match self.store.downlinks(dev_eui) {
            Ok(q) => q,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the downlink queue");
                return (None, 0);
            }
        };
        let total = queue.len();
        for (i, (key, item)) in queue.into_iter().enumerate() {
            if item.payload.len() <= max {
                return (Some((key, item)), total - i);
            }
            let msg = Refusal::TooLargeForDataRate {
                len: item.payload.len(),
                max,
            }
            .to_string();
            self.attempts.remove(&key);
            if self
                .awaiting_ack
                .get(&device)
                .is_some_and(|(k, _)| *k == key)
            {
                self.awaiting_ack.remove(&device);
            }
            self.emit(
                device,
                DownlinkEventKind::Failed,
                Some(&item),
                &item.stream,
                serde_json::json!({ "error": msg }),
            );
            let _ = self.store.downlink_remove(&key).await;
        }
        (None, 0)
    }

    async fn on_uplink(&mut self, u: UplinkInfo) {
        // Counted first: tests and operators can tell "seen, nothing to send" from "not seen".
        self.metrics.downlink_event("opportunity");
        let Some((_, device_id, dev_eui, class)) = self.device_ids(u.device) else {
            return;
        };
        let Some(best) = u.rx.first().cloned() else {
            return;
        };
        self.last_heard
            .insert(u.device, (u.rx.clone(), u.settings.clone()));

        // A confirmed downlink in flight: this uplink acknowledges it, or not.
        if let Some((key, item)) = self.awaiting_ack.remove(&u.device) {
            let attempts = self.attempts.get(&key).copied().unwrap_or(1);
            let end = if u.ack {
                Some(DownlinkEventKind::Ack)
            } else if attempts >= MAX_CONFIRMED_ATTEMPTS {
                Some(DownlinkEventKind::Nack)
            } else {
                None
            };
            if let Some(kind) = end {
                self.emit(
                    u.device,
                    kind,
                    Some(&item),
                    &item.stream,
                    serde_json::json!({ "attempts": attempts }),
                );
                self.attempts.remove(&key);
                let _ = self.store.downlink_remove(&key).await;
            }
            // Otherwise it is still first in the queue and goes out again with a new FCntDown:
            // below for class A, at once for class C.
        }

        let answers: Vec<MacCmd> = u
            .mac
            .iter()
            .filter_map(|c| match c.cid {
                mac::LINK_CHECK => Some(mac::link_check_ans(
                    best.snr,
                    u.settings.spreading_factor,
                    u.rx.len(),
                )),
                mac::DEVICE_TIME => Some(mac::device_time_ans(best.received_at_us)),
                other => {
                    tracing::debug!(device = %device_id, cid = other, "MAC command ignored");
                    None
                }
            })
            .collect();
        let (answers, fopts) = fit_fopts(answers);

        let rx1 = self.plan.rx1(&u.settings);
        let rx2 = self.plan.rx2(Some(&u.settings));
        // The most this device can receive after this uplink: a payload above it is too large
        // for the data rate and fails; below, it waits until a window can carry it.
        let room = |w: &Option<Window>| w.as_ref().map(|w| w.max_payload.saturating_sub(fopts));
        let limit = room(&rx1).max(room(&rx2)).unwrap_or(0);
        let (item, queued) = if class == DeviceClass::A || u.confirmed || !answers.is_empty() {
            self.next_item(u.device, dev_eui, limit).await
        } else {
            (None, 0)
        };
        // Class C devices get their queue immediately; after an uplink only ACKs and MAC
        // answers need RX1.
        let item = if class == DeviceClass::C && !u.confirmed && answers.is_empty() {
            None
        } else {
            item
        };
        if item.is_none() && !u.confirmed && answers.is_empty() {
            if class == DeviceClass::C {
                self.send_class_c(u.device, dev_eui).await;
            }
            return;
        }

        // Which window is still reachable, and can carry the frame?
        let elapsed = u.arrived.elapsed();
        let rx1_open = elapsed + SCHEDULE_MARGIN < RECEIVE_DELAY1;
        let rx2_open = elapsed + SCHEDULE_MARGIN < RECEIVE_DELAY2;
        let fits =
            |w: &Option<Window>, n: usize| w.as_ref().is_some_and(|w| n + fopts <= w.max_payload);
        let choose = |n: usize| {
            if rx1_open && fits(&rx1, n) {
                Some(Slot::Rx1)
            } else if rx2_open && fits(&rx2, n) {
                Some(Slot::Rx2)
            } else {
                None
            }
        };
        let len = item.as_ref().map_or(0, |(_, i)| i.payload.len());
        let (item, slot) = match choose(len) {
            Some(slot) => (item, Some(slot)),
            // The downlink only fits a window that has passed: it waits; the ACK and MAC
            // answers go alone.
            None if item.is_some() && (u.confirmed || !answers.is_empty()) => (None, choose(0)),
            None => (item, None),
        };
        let Some(slot) = slot else {
            tracing::warn!(device = %device_id, elapsed_ms = elapsed.as_millis() as u64, "too late for RX1 and RX2; downlink kept for the next uplink");
            self.metrics.downlink_event("too_late");
            return;
        };
        let f_pending = queued > usize::from(item.is_some());
        let Some((phy, f_cnt)) = self
            .build_frame(
                u.device,
                dev_eui,
                item.as_ref().map(|(_, i)| i),
                u.confirmed,
                f_pending,
                &answers,
            )
            .await
        else {
            return;
        };
        let len = len * usize::from(item.is_some());
        let (window, delay, rx2_fallback) = match (slot, &rx1, &rx2) {
            (Slot::Rx1, Some(w1), _) => (
                w1.clone(),
                RECEIVE_DELAY1,
                rx2.as_ref().filter(|_| fits(&rx2, len)).map(|w2| Fallback {
                    window: w2.clone(),
                    tmst: 0,
                    deadline: u.arrived + RECEIVE_DELAY2 - SCHEDULE_MARGIN,
                }),
            ),
            (_, _, Some(w2)) => (w2.clone(), RECEIVE_DELAY2, None),
            _ => return,
        };
        let tx = Tx {
            device: u.device,
            answers: Some(u.arrived),
            item,
            f_cnt: Some(f_cnt),
            phy,
            slot,
            gateway: Eui64::default(),
            window,
            tmst: None,
            rx2: rx2_fallback,
            join_accept: false,
        };
        self.transmit_via(&u.rx, tx, Some(delay), RECEIVE_DELAY2)
            .await;
    }

    /// Encode a downlink with the next FCntDown, persisting the counter first.
    async fn build_frame(
        &mut self,
        device: usize,
        dev_eui: Eui64,
        item: Option<&DownlinkItem>,
        ack: bool,
        f_pending: bool,
        answers: &[MacCmd],
    ) -> Option<(Vec<u8>, u32)> {
        let (dev_addr, nwk, app, f_cnt) = {
            let mut reg = self.registry.lock().ok()?;
            let s = reg.device_mut(device).session.as_mut()?;
            let f_cnt = s.state.f_cnt_down;
            s.state.f_cnt_down = f_cnt.wrapping_add(1);
            (s.dev_addr, s.nwk_s_key, s.app_s_key, f_cnt)
        };
        if let Err(e) = self
            .store
            .save_f_cnt_down(dev_eui, dev_addr, f_cnt.wrapping_add(1))
            .await
        {
            // Without a persisted counter we must not send: a crash could reuse it.
            tracing::error!(error = %e, "cannot persist FCntDown; downlink not sent");
            return None;
        }
        let frame = DataFrame {
            uplink: false,
            confirmed: item.is_some_and(|i| i.confirmed),
            dev_addr,
            f_cnt,
            adr: false,
            ack,
            f_pending,
            f_port: item.map(|i| i.f_port),
            payload: item.map(|i| i.payload.as_slice()).unwrap_or(&[]),
            mac: answers,
        };
        match encode(&frame, &nwk, &app) {
            Ok(phy) => Some((phy, f_cnt)),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a downlink");
                None
            }
        }
    }

    /// Send `tx` through the first gateway of `rx` (receptions, best first) that has a downlink
    /// path: `tx.gateway` and `tx.tmst` (and the RX2 fallback's `tmst`) are set here for each
    /// gateway tried, from its own reception `tmst` plus `delay` (None: at once, class C) and
    /// `rx2_delay`.
    async fn transmit_via(
        &mut self,
        rx: &[RxInfo],
        mut tx: Tx,
        delay: Option<Duration>,
        rx2_delay: Duration,
    ) {
        for r in rx {
            tx.gateway = r.gateway;
            tx.tmst = delay.map(|d| r.tmst.wrapping_add(micros(d)));
            if let Some(f) = &mut tx.rx2 {
                f.tmst = r.tmst.wrapping_add(micros(rx2_delay));
            }
            match self.transmit(tx).await {
                // That gateway has no downlink path (no PULL_DATA yet): try the next one.
                Err((SendError::NoRoute(_), back)) => tx = back,
                _ => return,
            }
        }
    }

    /// Hand a frame to a forwarder. On failure the frame is handed back (a queued item stays
    /// in the store either way; this only lets the caller try another gateway).
    async fn transmit(&mut self, t: Tx) -> Result<(), (SendError, Tx)> {
        let txpk = window::txpk(&t.window, t.tmst, &t.phy);
        if let Some(arrived) = t.answers {
            // Recorded before the PULL_RESP leaves, so whoever sees the PULL_RESP sees this
            // too. RX1 opens 1 s after the uplink: it must stay far below (docs/benchmarks.md).
            self.metrics.observe_schedule_latency(arrived.elapsed());
        }
        match self.tx.send(t.gateway, txpk).await {
            Ok(token) => {
                self.metrics.downlink_event("pull_resp");
                self.pending.insert(
                    token,
                    Pending {
                        tx: t,
                        sent_at: Instant::now(),
                    },
                );
                Ok(())
            }
            Err(e) => {
                tracing::warn!(gateway = %t.gateway, error = %e, "cannot send a downlink; kept for the next opportunity");
                self.metrics.downlink_event("send_error");
                Err((e, t))
            }
        }
    }

    async fn send_class_c(&mut self, device: usize, dev_eui: Eui64) {
        if self.awaiting_ack.contains_key(&device)
            || self.pending.values().any(|p| p.tx.device == device)
        {
            return; // one at a time
        }
        let Some((rx, settings)) = self.last_heard.get(&device).cloned() else {
            tracing::info!(%dev_eui, "class C downlink queued until the device is first heard (no gateway known)");
            return;
        };
        let Some(win) = self.plan.rx2(Some(&settings)) else {
            return;
        };
        let (item, queued) = self.next_item(device, dev_eui, win.max_payload).await;
        let Some(item) = item else { return };
        let Some((phy, f_cnt)) = self
            .build_frame(device, dev_eui, Some(&item.1), false, queued > 1, &[])
            .await
        else {
            return;
        };
        let tx = Tx {
            device,
            answers: None,
            item: Some(item),
            f_cnt: Some(f_cnt),
            phy,
            slot: Slot::Immediate,
            gateway: Eui64::default(),
            window: win,
            tmst: None,
            rx2: None,
            join_accept: false,
        };
        // At once, without an RX2 fallback.
        self.transmit_via(&rx, tx, None, Duration::ZERO).await;
    }

    async fn on_join_accept(&mut self, j: JoinAcceptJob) {
        let elapsed = j.arrived.elapsed();
        // The device still has the region's default RX settings.
        let rx1 = self.join_plan.rx1(&j.settings);
        let rx2 = self.join_plan.rx2(Some(&j.settings));
        let fallback = rx2.as_ref().map(|w| Fallback {
            window: w.clone(),
            tmst: 0,
            deadline: j.arrived + JOIN_ACCEPT_DELAY2 - SCHEDULE_MARGIN,
        });
        let (slot, window, delay, fallback) = match (&rx1, &rx2) {
            (Some(w), _) if elapsed + SCHEDULE_MARGIN < JOIN_ACCEPT_DELAY1 => {
                (Slot::Rx1, w.clone(), JOIN_ACCEPT_DELAY1, fallback)
            }
            (_, Some(w)) if elapsed + SCHEDULE_MARGIN < JOIN_ACCEPT_DELAY2 => {
                (Slot::Rx2, w.clone(), JOIN_ACCEPT_DELAY2, None)
            }
            _ => {
                tracing::warn!(
                    elapsed_ms = elapsed.as_millis() as u64,
                    "too late for both JoinAccept windows; the device will send a new JoinRequest"
                );
                self.metrics.downlink_event("too_late");
                return;
            }
        };
        let tx = Tx {
            device: j.device,
            answers: None,
            item: None,
            f_cnt: None,
            phy: j.phy,
            slot,
            gateway: Eui64::default(),
            window,
            tmst: None,
            rx2: fallback,
            join_accept: true,
        };
        self.transmit_via(&j.rx, tx, Some(delay), JOIN_ACCEPT_DELAY2)
            .await;
    }

    async fn on_tx_ack(&mut self, a: TxAck) {
        // A late TX_ACK after the timeout, a forwarder answering another one's token, or
        // garbage: nothing to do, but visible.
        if self.pending.get(&a.token).map(|p| p.tx.gateway) != Some(a.gateway) {
            self.metrics.downlink_event("tx_ack_unknown_token");
            tracing::debug!(gateway = %a.gateway, token = a.token, "TX_ACK for an unknown token ignored");
            return;
        }
        let Some(Pending { tx: p, .. }) = self.pending.remove(&a.token) else {
            return;
        };
        let reason = match a.result {
            Ok(()) => return self.sent(p).await,
            Err(reason) => reason,
        };
        self.metrics.downlink_event("tx_refused");
        let what = if p.join_accept {
            "JoinAccept"
        } else {
            "downlink"
        };
        match (p.slot, p.rx2) {
            (Slot::Rx1, Some(f)) if Instant::now() < f.deadline => {
                tracing::info!(gateway = %a.gateway, %reason, "{what}: RX1 refused by the gateway; retrying in RX2");
                let tx = Tx {
                    slot: Slot::Rx2,
                    window: f.window,
                    tmst: Some(f.tmst),
                    rx2: None,
                    answers: None,
                    ..p
                };
                let _ = self.transmit(tx).await;
            }
            _ if p.join_accept => {
                tracing::warn!(gateway = %a.gateway, %reason, "JoinAccept refused by the gateway; the device will send a new JoinRequest");
            }
            _ => {
                tracing::warn!(gateway = %a.gateway, %reason, "downlink refused by the gateway; kept for the next uplink");
            }
        }
    }

    async fn sent(&mut self, p: Tx) {
        self.metrics.downlink_event("tx_ok");
        let Some((key, item)) = p.item else { return };
        let detail = serde_json::json!({
            "f_cnt": p.f_cnt,
            "gateway_ids": {
                "gateway_id": format!("eui-{}", p.gateway.to_lower_hex()),
                "eui": p.gateway.to_string(),
            },
            "timestamp": p.tmst,
            "class": if p.slot == Slot::Immediate { "C" } else { "A" },
            "rx_window": match p.slot { Slot::Rx1 => 1, Slot::Rx2 => 2, Slot::Immediate => 0 },
            "frequency": p.window.freq_hz.to_string(),
            "data_rate_index": p.window.dr,
            "data_rate": { "lora": {
                "spreading_factor": p.window.sf,
                "bandwidth": p.window.bw_hz,
                "coding_rate": "4/5",
            } },
            "power_dbm": p.window.power_dbm,
        });
        self.emit(
            p.device,
            DownlinkEventKind::Sent,
            Some(&item),
            &item.stream,
            detail,
        );
        if item.confirmed {
            *self.attempts.entry(key.clone()).or_insert(0) += 1;
            self.awaiting_ack.insert(p.device, (key, item));
        } else if let Err(e) = self.store.downlink_remove(&key).await {
            tracing::error!(error = %e, "cannot remove a sent downlink");
        }
    }

    /// Forwarders that never send TX_ACK (GWMP v1): after a while, count the PULL_RESP as sent.
    async fn sweep(&mut self) {
        let old: Vec<u16> = self
            .pending
            .iter()
            .filter(|(_, p)| p.sent_at.elapsed() > TX_ACK_TIMEOUT)
            .map(|(t, _)| *t)
            .collect();
        for t in old {
            if let Some(p) = self.pending.remove(&t) {
                self.sent(p.tx).await;
            }
        }
    }
}
