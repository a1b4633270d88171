//! Downlinks: the device queues clouds fill, and the scheduler that answers in RX windows.
//!
//! Inputs (one channel, so one task owns all downlink state):
//! - [`Input::Uplink`], from the uplink stage after an uplink is stored: the class A
//!   opportunity. The scheduler answers in RX1 (RX2 if RX1 is refused) with the next queued
//!   downlink, the ACK of a confirmed uplink, and its MAC answers (LinkCheckAns, DeviceTimeAns),
//!   whichever apply; `FPending` says more is queued.
//! - [`Input::Request`], from a stream: `push`/`replace` a device's queue (persisted and fsynced
//!   before the stream acknowledges the cloud's message). Class C devices are served at once.
//! - [`Input::TxAck`], from ingress: a forwarder accepted or refused a PULL_RESP. Refused in RX1
//!   → retried in RX2; refused again → kept for the next uplink.
//! - [`Input::JoinAccept`]: an OTAA JoinAccept to send at JOIN_ACCEPT_DELAY1/2.
//!
//! FCntDown is persisted (fsync) before any PULL_RESP leaves, so a crash never reuses one.
//! Events (`queued`, `sent`, `ack`, `nack`, `failed`) go back to the stream the downlink came
//! from.

pub mod json;
pub mod window;

use crate::config::{Region, Scope};
use crate::ingress::udp::{Downlinker, TxAck};
use crate::lorawan::frame::{encode, DataFrame, MacCmd};
use crate::lorawan::mac;
use crate::lorawan::session::{DeviceClass, Registry};
use crate::metrics::Metrics;
use crate::model::{
    DownlinkEvent, DownlinkEventKind, DownlinkItem, DownlinkOp, DownlinkRequest, Eui64, RxInfo,
    TxSettings,
};
use crate::store::Store;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use window::Window;

/// The registry shared by the uplink stage (FCntUp) and the scheduler (FCntDown, keys).
pub type SharedRegistry = Arc<Mutex<Registry>>;

/// Confirmed downlinks are sent at most this many times before `nack`.
pub const MAX_CONFIRMED_ATTEMPTS: u8 = 3;
/// Queued downlinks per device.
pub const MAX_QUEUE: usize = 64;
/// A PULL_RESP without TX_ACK after this long is taken as sent (GWMP v1 forwarders never ACK).
const TX_ACK_TIMEOUT: Duration = Duration::from_secs(3);
/// Margin to keep before a window's time for the PULL_RESP to reach the concentrator.
const SCHEDULE_MARGIN: Duration = Duration::from_millis(100);

/// A class A opportunity: what the scheduler needs of an accepted uplink.
#[derive(Debug, Clone)]
pub struct UplinkInfo {
    pub device: usize,
    pub confirmed: bool,
    /// The device acknowledged our last confirmed downlink.
    pub ack: bool,
    /// MAC commands the device sent (FOpts or FPort 0).
    pub mac: Vec<MacCmd>,
    /// Best reception (the gateway to answer through).
    pub best: RxInfo,
    pub gateways: usize,
    pub settings: TxSettings,
    /// When the first reception arrived here (the RX windows count from there).
    pub arrived: Instant,
}

/// A JoinAccept ready to send.
#[derive(Debug, Clone)]
pub struct JoinAcceptJob {
    pub device: usize,
    pub phy: Vec<u8>,
    pub best: RxInfo,
    pub settings: TxSettings,
    pub arrived: Instant,
}

#[derive(Debug)]
pub enum Input {
    Uplink(Box<UplinkInfo>),
    /// A stream's request; `done` fires once it is stored (or refused), so the stream can
    /// acknowledge the cloud's message only then.
    Request(DownlinkRequest, Option<tokio::sync::oneshot::Sender<()>>),
    TxAck(TxAck),
    JoinAccept(Box<JoinAcceptJob>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Rx1,
    Rx2,
    Immediate,
}

/// A PULL_RESP waiting for its TX_ACK.
struct Pending {
    device: usize,
    /// Store key and item of the queued downlink it carries (None: ACK/MAC/JoinAccept only).
    item: Option<(Vec<u8>, DownlinkItem)>,
    f_cnt: Option<u32>,
    phy: Vec<u8>,
    slot: Slot,
    gateway: Eui64,
    window: Window,
    tmst: Option<u32>,
    /// Where to retry if RX1 is refused.
    rx2: Option<(Window, u32)>,
    sent_at: Instant,
}

/// Per-stream scope and event channel.
pub struct StreamLink {
    pub scope: Scope,
    pub events: mpsc::Sender<DownlinkEvent>,
}

pub struct Scheduler {
    registry: SharedRegistry,
    store: Store,
    tx: Downlinker,
    region: Region,
    streams: HashMap<String, StreamLink>,
    metrics: Metrics,
    pending: HashMap<u16, Pending>,
    /// Confirmed downlinks sent, waiting for the device's ACK: device → (key, item, attempts).
    awaiting_ack: HashMap<usize, (Vec<u8>, DownlinkItem, u8)>,
    /// Last uplink of each device, for class C routing.
    last_heard: HashMap<usize, (RxInfo, TxSettings)>,
}

impl Scheduler {
    pub fn new(
        registry: SharedRegistry,
        store: Store,
        tx: Downlinker,
        region: Region,
        streams: HashMap<String, StreamLink>,
        metrics: Metrics,
    ) -> Self {
        Scheduler {
            registry,
            store,
            tx,
            region,
            streams,
            metrics,
            pending: HashMap::new(),
            awaiting_ack: HashMap::new(),
            last_heard: HashMap::new(),
        }
    }

    /// Run until every input sender is gone.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Input>) {
        let mut sweep = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                i = rx.recv() => match i {
                    Some(Input::Uplink(u)) => self.on_uplink(*u).await,
                    Some(Input::Request(r, done)) => {
                        self.on_request(r).await;
                        if let Some(d) = done {
                            let _ = d.send(());
                        }
                    }
                    Some(Input::TxAck(a)) => self.on_tx_ack(a).await,
                    Some(Input::JoinAccept(j)) => self.on_join_accept(*j).await,
                    None => return,
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
        let in_scope = match self.streams.get(&r.stream).map(|l| &l.scope) {
            Some(Scope::All) => true,
            Some(Scope::Application(a)) => *a == app,
            Some(Scope::Device(d)) => *d == r.device,
            _ => false,
        };
        let items = match (in_scope, r.items) {
            (false, _) => Err(format!(
                "device {:?} is outside the scope of stream {:?}",
                r.device, r.stream
            )),
            (true, items) => items,
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
                        serde_json::json!({ "error": format!("downlink queue full ({len} queued, at most {MAX_QUEUE})") }),
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
                        serde_json::json!({ "error": "store error" }),
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
            let msg = format!(
                "payload of {} bytes is too large for the data rate of this window (at most {max})",
                item.payload.len()
            );
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
        let Some((_, device_id, dev_eui, class)) = self.device_ids(u.device) else {
            return;
        };
        self.last_heard
            .insert(u.device, (u.best.clone(), u.settings.clone()));

        // A confirmed downlink in flight: this uplink acknowledges it, or not.
        if let Some((key, item, attempts)) = self.awaiting_ack.remove(&u.device) {
            if u.ack {
                self.emit(
                    u.device,
                    DownlinkEventKind::Ack,
                    Some(&item),
                    &item.stream,
                    serde_json::json!({}),
                );
                let _ = self.store.downlink_remove(&key).await;
            } else if attempts >= MAX_CONFIRMED_ATTEMPTS {
                self.emit(
                    u.device,
                    DownlinkEventKind::Nack,
                    Some(&item),
                    &item.stream,
                    serde_json::json!({ "attempts": attempts }),
                );
                let _ = self.store.downlink_remove(&key).await;
            } else {
                // Stays first in the queue: sent again below with a new FCntDown.
                self.awaiting_ack.insert(u.device, (key, item, attempts));
            }
        }

        let answers: Vec<MacCmd> = u
            .mac
            .iter()
            .filter_map(|c| match c.cid {
                mac::LINK_CHECK => Some(mac::link_check_ans(
                    u.best.snr,
                    u.settings.spreading_factor,
                    u.gateways,
                )),
                mac::DEVICE_TIME => Some(mac::device_time_ans(u.best.received_at_us)),
                other => {
                    tracing::debug!(device = %device_id, cid = other, "MAC command ignored");
                    None
                }
            })
            .collect();

        let rx_delay = Duration::from_secs(1);
        let rx1 = window::rx1(self.region, &u.settings, 0);
        let rx2 = window::rx2(self.region, None);
        let max = rx1
            .as_ref()
            .map(|w| window::max_payload(self.region, w))
            .unwrap_or(0)
            .min(window::max_payload(self.region, &rx2));
        let (item, queued) = if class == DeviceClass::A || u.confirmed || !answers.is_empty() {
            self.next_item(u.device, dev_eui, max).await
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

        // Which window is still reachable?
        let elapsed = u.arrived.elapsed();
        let (slot, win, tmst, retry) = match rx1 {
            Some(w1) if elapsed + SCHEDULE_MARGIN < rx_delay => {
                let t1 = u.best.tmst.wrapping_add(rx_delay.as_micros() as u32);
                let t2 = t1.wrapping_add(1_000_000);
                (Slot::Rx1, w1, t1, Some((rx2.clone(), t2)))
            }
            _ if elapsed + SCHEDULE_MARGIN < rx_delay + Duration::from_secs(1) => {
                let t2 = u
                    .best
                    .tmst
                    .wrapping_add(rx_delay.as_micros() as u32 + 1_000_000);
                (Slot::Rx2, rx2.clone(), t2, None)
            }
            _ => {
                tracing::warn!(device = %device_id, elapsed_ms = elapsed.as_millis() as u64, "too late for RX1 and RX2; downlink kept for the next uplink");
                self.metrics.downlink_event("too_late");
                return;
            }
        };
        let Some((phy, f_cnt)) = self
            .build_frame(
                u.device,
                dev_eui,
                item.as_ref().map(|(_, i)| i),
                u.confirmed,
                queued > 1,
                &answers,
            )
            .await
        else {
            return;
        };
        self.transmit(
            u.device,
            item,
            Some(f_cnt),
            phy,
            slot,
            u.best.gateway,
            win,
            Some(tmst),
            retry,
        )
        .await;
        // RX1 opens 1 s after the uplink: this must stay far below (docs/benchmarks.md).
        self.metrics.observe_schedule_latency(u.arrived.elapsed());
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
        let mut mac_bytes = 0;
        let answers: Vec<MacCmd> = answers
            .iter()
            .filter(|m| {
                mac_bytes += 1 + m.payload.len();
                mac_bytes <= 15
            })
            .cloned()
            .collect();
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
            mac: &answers,
        };
        match encode(&frame, &nwk, &app) {
            Ok(phy) => Some((phy, f_cnt)),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a downlink");
                None
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn transmit(
        &mut self,
        device: usize,
        item: Option<(Vec<u8>, DownlinkItem)>,
        f_cnt: Option<u32>,
        phy: Vec<u8>,
        slot: Slot,
        gateway: Eui64,
        win: Window,
        tmst: Option<u32>,
        rx2: Option<(Window, u32)>,
    ) {
        let txpk = window::txpk(&win, tmst, &phy);
        match self.tx.send(gateway, txpk).await {
            Ok(token) => {
                self.metrics.downlink_event("pull_resp");
                self.pending.insert(
                    token,
                    Pending {
                        device,
                        item,
                        f_cnt,
                        phy,
                        slot,
                        gateway,
                        window: win,
                        tmst,
                        rx2,
                        sent_at: Instant::now(),
                    },
                );
            }
            Err(e) => {
                tracing::warn!(%gateway, error = %e, "cannot send a downlink; kept for the next opportunity");
                self.metrics.downlink_event("send_error");
            }
        }
    }

    async fn send_class_c(&mut self, device: usize, dev_eui: Eui64) {
        if self.awaiting_ack.contains_key(&device)
            || self.pending.values().any(|p| p.device == device)
        {
            return; // one at a time
        }
        let Some((best, _)) = self.last_heard.get(&device).cloned() else {
            tracing::info!(%dev_eui, "class C downlink queued until the device is first heard (no gateway known)");
            return;
        };
        let rx2 = window::rx2(self.region, None);
        let max = window::max_payload(self.region, &rx2);
        let (item, queued) = self.next_item(device, dev_eui, max).await;
        let Some(item) = item else { return };
        let Some((phy, f_cnt)) = self
            .build_frame(device, dev_eui, Some(&item.1), false, queued > 1, &[])
            .await
        else {
            return;
        };
        self.transmit(
            device,
            Some(item),
            Some(f_cnt),
            phy,
            Slot::Immediate,
            best.gateway,
            rx2,
            None,
            None,
        )
        .await;
    }

    async fn on_join_accept(&mut self, j: JoinAcceptJob) {
        let delay1 = window::JOIN_ACCEPT_DELAY1;
        let elapsed = j.arrived.elapsed();
        let rx1 = window::rx1(self.region, &j.settings, 0);
        let rx2 = window::rx2(self.region, None);
        let t1 = j.best.tmst.wrapping_add(delay1.as_micros() as u32);
        let t2 = t1.wrapping_add(1_000_000);
        let (slot, win, tmst, retry) = match rx1 {
            Some(w) if elapsed + SCHEDULE_MARGIN < delay1 => (Slot::Rx1, w, t1, Some((rx2, t2))),
            _ => (Slot::Rx2, rx2, t2, None),
        };
        self.transmit(
            j.device,
            None,
            None,
            j.phy,
            slot,
            j.best.gateway,
            win,
            Some(tmst),
            retry,
        )
        .await;
    }

    async fn on_tx_ack(&mut self, a: TxAck) {
        let Some(p) = self.pending.remove(&a.token) else {
            tracing::debug!(token = a.token, "TX_ACK for an unknown token");
            return;
        };
        match a.result {
            Ok(()) => self.sent(p).await,
            Err(reason) => {
                self.metrics.downlink_event("tx_refused");
                if let (Slot::Rx1, Some((w2, t2))) = (p.slot, p.rx2.clone()) {
                    tracing::info!(gateway = %a.gateway, %reason, "RX1 refused by the gateway; retrying in RX2");
                    self.transmit(
                        p.device,
                        p.item,
                        p.f_cnt,
                        p.phy,
                        Slot::Rx2,
                        p.gateway,
                        w2,
                        Some(t2),
                        None,
                    )
                    .await;
                } else {
                    tracing::warn!(gateway = %a.gateway, %reason, "downlink refused by the gateway; kept for the next uplink");
                }
            }
        }
    }

    async fn sent(&mut self, p: Pending) {
        self.metrics.downlink_event("tx_ok");
        let Some((key, item)) = p.item else { return };
        let detail = serde_json::json!({
            "f_cnt": p.f_cnt,
            "gateway_ids": { "eui": p.gateway.to_string() },
            "timestamp": p.tmst,
            "class": if p.slot == Slot::Immediate { "C" } else { "A" },
            "rx_window": match p.slot { Slot::Rx1 => 1, Slot::Rx2 => 2, Slot::Immediate => 0 },
            "frequency": p.window.freq_hz.to_string(),
            "data_rate": { "lora": { "spreading_factor": p.window.sf, "bandwidth": p.window.bw_hz } },
        });
        self.emit(
            p.device,
            DownlinkEventKind::Sent,
            Some(&item),
            &item.stream,
            detail,
        );
        if item.confirmed {
            let attempts = self
                .awaiting_ack
                .get(&p.device)
                .map(|(_, _, a)| *a)
                .unwrap_or(0)
                + 1;
            self.awaiting_ack.insert(p.device, (key, item, attempts));
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
                self.sent(p).await;
            }
        }
    }
}
