//! The scheduler: one task that owns all downlink state (see the module docs of
//! [`crate::downlink`] for what it does with each input).

use super::window::{self, RxPlan, Window};
use super::{Input, JoinAcceptJob, SharedRegistry, StreamLink, UplinkInfo, MAX_QUEUE};
use crate::ingress::udp::{Downlinker, SendError, TxAck};
use crate::lorawan::frame::{encode, DataFrame, MacCmd};
use crate::lorawan::mac;
use crate::lorawan::mac_state::{MacEvent, Policy};
use crate::lorawan::region::{
    JOIN_ACCEPT_DELAY1, JOIN_ACCEPT_DELAY2, RECEIVE_DELAY1, RECEIVE_DELAY2,
};
use crate::lorawan::session::DeviceClass;
use crate::metrics::Metrics;
use crate::model::{
    DownlinkEvent, DownlinkEventKind, DownlinkItem, DownlinkOp, DownlinkRequest, Eui64, FastMap,
    FastSet, RxInfo, TxSettings,
};
use crate::store::{Store, StoreError};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Confirmed downlinks are sent at most this many times before `nack`.
pub const MAX_CONFIRMED_ATTEMPTS: u8 = 3;
/// FOpts holds at most 15 bytes of MAC commands (LoRaWAN 1.0.x §4.3.1.6, FOptsLen is 4 bits).
const MAX_FOPTS: usize = 15;
/// A PULL_RESP without TX_ACK after this long is taken as sent (GWMP v1 forwarders never ACK).
const TX_ACK_TIMEOUT: Duration = Duration::from_secs(3);
/// Slots the TX_ACK map keeps when it empties (more only during a burst).
const PENDING_KEPT: usize = 64;
/// Margin to keep before a window's time for the PULL_RESP to reach the concentrator: the
/// forwarder needs the packet in its JIT queue some tens of ms ahead (lora_pkt_fwd refuses
/// with TOO_LATE below about 30 ms); 100 ms also covers a loaded Raspberry Pi.
const SCHEDULE_MARGIN: Duration = Duration::from_millis(100);

/// Why the scheduler refuses a downlink (the `error` of its `down/failed` event).
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("device {device:?} is outside the scope of stream {stream:?}")]
    OutOfScope { device: String, stream: String },
    #[error("end_device_ids names {named}, but the request is for device {device:?} of application {application:?} ({dev_eui})")]
    OtherDevice {
        named: String,
        device: String,
        application: String,
        dev_eui: Eui64,
    },
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

/// A PULL_RESP waiting for its TX_ACK. Boxed: a start with many devices sends a burst of
/// first downlinks (MAC commands to each device), and a map holding `Tx` inline kept a table
/// of that burst's size for good (0.8 MB for 1,000 devices; issue 16).
struct Pending {
    tx: Box<Tx>,
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
    /// What the network wants of devices' MAC layers (attempt limits of its commands).
    policy: Policy,
    /// `[gateway] class_c_gateway`: where class C downlinks of never-heard devices go.
    class_c_gateway: Option<Eui64>,
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
    pending: FastMap<u16, Pending>,
    /// Confirmed downlinks sent, waiting for the device's ACK: device → (store key, item).
    awaiting_ack: FastMap<usize, (Vec<u8>, DownlinkItem)>,
    /// How often each confirmed downlink (store key) has been sent.
    attempts: FastMap<Vec<u8>, u8>,
    /// Last uplink of each device (receptions best first, radio settings), for class C.
    last_heard: FastMap<usize, (Vec<RxInfo>, TxSettings)>,
    /// Class C devices that may have downlinks queued but no gateway to send them through
    /// yet (after a start, or before a forwarder's PULL_DATA): the sweep tries them again.
    /// The flag says whether the wait was reported (one log line and metric per wait).
    class_c_waiting: FastMap<usize, bool>,
    /// The FCntDown each device's session may use up to without another write: what the
    /// store holds for it. Filled at start for every session in one commit
    /// ([`Scheduler::reserve_all`]), then per device as blocks are used up.
    f_cnt_down_saved: FastMap<usize, Reserved>,
    /// Devices whose downlink queue was read empty and that nothing was queued for since:
    /// their class A opportunities need no store read, RX plan or windows when the uplink
    /// itself asks for no downlink (issue 16). Only this task queues downlinks
    /// (`on_request`), and it forgets a device before it does; a queue read while the store
    /// is reopening does not count as empty. A cache: cleared when it reaches
    /// [`KNOWN_EMPTY_MAX`] devices (a reload may have removed some).
    known_empty: FastSet<Eui64>,
}

/// Bound of [`Scheduler::known_empty`].
const KNOWN_EMPTY_MAX: usize = 100_000;

/// FCntDown values persisted ahead at a time (see `build_frame`).
const FCNT_DOWN_RESERVE: u32 = 16;

/// Sessions whose first FCntDown block is reserved in one commit at start (larger device
/// sets take several commits of this many).
const RESERVE_ALL_CHUNK: usize = 4096;

/// An FCntDown reservation: the session it belongs to and the persisted next value.
#[derive(Clone, Copy)]
struct Reserved {
    /// The session: DevAddr and NwkSKey. A rejoin (new session, FCntDown from 0) or a reload
    /// that re-keys the device gives another pair, so the reservation no longer covers it,
    /// even if a DevAddr comes back.
    dev_addr: crate::model::DevAddr,
    nwk_s_key: crate::model::AesKey,
    /// What the store holds: counters below it may be used without another write.
    bound: u32,
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
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        registry: SharedRegistry,
        store: Store,
        tx: Downlinker,
        plan: RxPlan,
        policy: Policy,
        class_c_gateway: Option<Eui64>,
        streams: HashMap<String, StreamLink>,
        metrics: Metrics,
    ) -> Self {
        // Class C downlinks queued before a restart go out once a gateway can take them.
        let class_c_waiting = registry
            .lock()
            .map(|r| {
                r.devices()
                    .iter()
                    .enumerate()
                    .filter(|(_, d)| d.class == DeviceClass::C)
                    .map(|(i, _)| (i, false))
                    .collect()
            })
            .unwrap_or_default();
        Scheduler {
            class_c_waiting,
            f_cnt_down_saved: FastMap::default(),
            known_empty: FastSet::default(),
            policy,
            class_c_gateway,
            registry,
            store,
            tx,
            plan,
            join_plan: RxPlan::new(plan.region, None),
            streams,
            metrics,
            pending: FastMap::default(),
            awaiting_ack: FastMap::default(),
            attempts: FastMap::default(),
            last_heard: FastMap::default(),
        }
    }

    /// Run until every [`super::DownlinkHandle`] is gone. `tx_acks` come from ingress.
    /// Beats `heartbeat` every time round (the systemd watchdog, `crate::liveness`). The
    /// 500 ms sweep runs only while something waits for it (a TX_ACK, a class C downlink), so
    /// an idle gateway is not woken for it.
    pub(crate) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Input>,
        mut tx_acks: mpsc::Receiver<TxAck>,
        mut heartbeat: crate::liveness::Heartbeat,
    ) {
        let mut sweep = tokio::time::interval(Duration::from_millis(500));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut acks_open = true;
        let mut sweeping = false;
        self.reserve_all(&heartbeat).await;
        loop {
            heartbeat.beat();
            let waiting = !self.pending.is_empty() || !self.class_c_waiting.is_empty();
            if waiting && !sweeping {
                // Its first sweep one period from now, as when it always ran.
                sweep.reset();
            }
            sweeping = waiting;
            tokio::select! {
                i = rx.recv() => match i {
                    Some(Input::Uplink(u)) => self.on_uplink(*u).await,
                    Some(Input::Request(r, done)) => {
                        self.on_request(r).await;
                        let _ = done.send(());
                    }
                    Some(Input::JoinAccept(j)) => self.on_join_accept(*j).await,
                    Some(Input::Link(name, link)) => match link {
                        Some(l) => {
                            self.streams.insert(name, l);
                        }
                        None => {
                            self.streams.remove(&name);
                        }
                    },
                    None => break,
                },
                a = tx_acks.recv(), if acks_open => match a {
                    Some(a) => self.on_tx_ack(a).await,
                    None => acks_open = false,
                },
                _ = sweep.tick(), if sweeping => self.sweep().await,
                _ = heartbeat.tick() => {}
            }
        }
        self.release_unused().await;
    }

    /// Every active session with its next FCntDown (in `bound`).
    fn sessions(&self) -> Vec<(usize, Eui64, Reserved)> {
        let Ok(reg) = self.registry.lock() else {
            return Vec::new();
        };
        reg.devices()
            .iter()
            .enumerate()
            // A device with a pending OTAA session keeps the per-device path: the store has
            // one FCntDown record per device, and it may hold the pending session's
            // reservation (its first downlink went out before a crash let the promotion
            // commit), which a reservation for the active session would overwrite.
            .filter(|(_, d)| !d.removed && d.pending.is_none())
            .filter_map(|(i, d)| {
                let s = d.session.as_ref()?;
                let next = Reserved {
                    dev_addr: s.dev_addr,
                    nwk_s_key: s.nwk_s_key,
                    bound: s.state.f_cnt_down,
                };
                Some((i, d.dev_eui, next))
            })
            .collect()
    }

    /// Reserve the first FCntDown block of every session the registry holds (ABP devices,
    /// joined OTAA devices) in one commit, instead of one commit per device at its first
    /// downlink: after a start the network's MAC commands go to every device early, and those
    /// per-device fsyncs dominated the cost of an uplink (issue 16, docs/benchmarks.md).
    /// Safe at any point: the store holds `next + FCNT_DOWN_RESERVE` before any counter from
    /// `next` on leaves, so a crash after this commit only skips up to 16 (as a crash after a
    /// per-device reservation does). Pending OTAA sessions are not reserved: their counter
    /// restarts at 0 when the device uses them, and their first downlink takes the
    /// per-device path, as do devices a reload adds or re-keys. A failed commit leaves every
    /// device on the per-device path. Beats `heartbeat` before each commit: a large device set
    /// takes several.
    async fn reserve_all(&mut self, heartbeat: &crate::liveness::Heartbeat) {
        let mut sessions = self.sessions();
        for (_, _, r) in &mut sessions {
            r.bound = r.bound.saturating_add(FCNT_DOWN_RESERVE);
        }
        for chunk in sessions.chunks(RESERVE_ALL_CHUNK) {
            heartbeat.beat();
            let counters: Vec<_> = chunk
                .iter()
                .map(|(_, eui, r)| (*eui, r.dev_addr, r.bound))
                .collect();
            if let Err(e) = self.store.save_f_cnt_downs(&counters).await {
                tracing::warn!(error = %e, devices = chunk.len(), "cannot reserve FCntDown at start; each device reserves at its first downlink");
                return;
            }
            self.metrics.downlink_event("f_cnt_down_reserved_at_start");
            self.f_cnt_down_saved
                .extend(chunk.iter().map(|&(device, _, r)| (device, r)));
        }
    }

    /// On a stop (no downlink leaves after this), give back the FCntDowns reserved but not
    /// used: the store holds each session's exact next counter again. Without this every
    /// restart would move every device's counter 16 further ([`Scheduler::reserve_all`]), and
    /// LoRaWAN 1.0.0-1.0.2 devices drop frames more than MAX_FCNT_GAP (16,384) ahead of the
    /// last they received. Not writing (a kill, a failed commit) is safe: the reservation
    /// stays and the next run starts above it.
    async fn release_unused(&mut self) {
        let counters: Vec<_> = self
            .sessions()
            .into_iter()
            .filter(|(device, _, next)| {
                self.f_cnt_down_saved.get(device).is_some_and(|r| {
                    r.dev_addr == next.dev_addr
                        && r.nwk_s_key == next.nwk_s_key
                        && next.bound < r.bound
                })
            })
            .map(|(_, eui, next)| (eui, next.dev_addr, next.bound))
            .collect();
        for chunk in counters.chunks(RESERVE_ALL_CHUNK) {
            if let Err(e) = self.store.save_f_cnt_downs(chunk).await {
                tracing::warn!(error = %e, "cannot give back unused FCntDowns; the next start skips them");
                return;
            }
        }
        self.f_cnt_down_saved.clear();
    }

    /// A device's DevEUI and class, without copying its names (every uplink needs these).
    fn device_class(&self, device: usize) -> Option<(Eui64, DeviceClass)> {
        let r = self.registry.lock().ok()?;
        let d = r.devices().get(device)?;
        Some((d.dev_eui, d.class))
    }

    fn device_ids(&self, device: usize) -> Option<(String, String, Eui64, DeviceClass)> {
        let r = self.registry.lock().ok()?;
        let d = r.devices().get(device)?;
        Some((
            d.application.to_string(),
            d.id.to_string(),
            d.dev_eui,
            d.class,
        ))
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
                (i, d.application.to_string(), d.dev_eui, d.class)
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
        if !in_scope {
            // Answered like an unknown device: an event would publish the device's id and
            // DevEUI on a stream that must not see them (docs/reliability.md).
            tracing::info!(stream = %r.stream, device = %r.device, "{}; ignored", Refusal::OutOfScope { device: r.device.clone(), stream: r.stream.clone() });
            self.metrics.downlink_event("out_of_scope");
            return;
        }
        let other = r.names.as_ref().and_then(|n| {
            let mut named = Vec::new();
            if let Some(d) = n.device_id.as_ref().filter(|d| **d != r.device) {
                named.push(format!("device_id {d:?}"));
            }
            if let Some(a) = n.application_id.as_ref().filter(|a| **a != app) {
                named.push(format!("application_id {a:?}"));
            }
            if let Some(e) = n.dev_eui.filter(|e| *e != dev_eui) {
                named.push(format!("dev_eui {e}"));
            }
            (!named.is_empty()).then(|| Refusal::OtherDevice {
                named: named.join(", "),
                device: r.device.clone(),
                application: app.clone(),
                dev_eui,
            })
        });
        let items = match other {
            Some(other) => Err(other.to_string()),
            None => r.items.map_err(|e| e.to_string()),
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
        // Whatever the outcome, the queue is no longer known to be empty.
        self.known_empty.remove(&dev_eui);
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
        let queue = match self.store.read_downlinks(dev_eui) {
            // The engine is being reopened after a disk error: the items stay stored and are
            // found again once it is back (`Store::downlinks`); nothing to log per uplink.
            Err(StoreError::Unavailable) => return (None, 0),
            Ok(q) => q,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the downlink queue");
                return (None, 0);
            }
        };
        let total = queue.len();
        if total == 0 {
            if self.known_empty.len() >= KNOWN_EMPTY_MAX {
                self.known_empty.clear();
            }
            self.known_empty.insert(dev_eui);
        }
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
        let Some((dev_eui, class)) = self.device_class(u.device) else {
            return;
        };
        let Some(best) = u.rx.first() else {
            return;
        };

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

        let mut answers: Vec<MacCmd> = Vec::new();
        if u.link_check_req {
            answers.push(mac::link_check_ans(
                best.snr,
                u.settings.spreading_factor,
                u.rx.len(),
            ));
        }
        if u.device_time_req {
            answers.push(mac::device_time_ans(best.received_at_us));
        }
        let (answers, fopts) = fit_fopts(answers);
        // Anything but the device's queue that makes this uplink worth a downlink.
        let needed = u.confirmed || !answers.is_empty() || u.needs_downlink;
        // The common case: a class A device with nothing queued (read empty before, nothing
        // queued since) and nothing to answer. What follows would read the queue, find it
        // empty and return; the receptions are kept for a class C route without a copy.
        if class == DeviceClass::A && !needed && self.known_empty.contains(&dev_eui) {
            self.last_heard.insert(u.device, (u.rx, u.settings));
            return;
        }
        self.last_heard
            .insert(u.device, (u.rx.clone(), u.settings.clone()));

        // The device's own receive windows (what it acknowledged).
        let (plan, delay1) = self.device_rx(u.device);
        let delay2 = delay1 + RECEIVE_DELAY2 - RECEIVE_DELAY1;
        let rx1 = plan.rx1(&u.settings);
        let rx2 = plan.rx2(Some(&u.settings));
        // The most this device can receive after this uplink: a payload above it is too large
        // for the data rate and fails; below, it waits until a window can carry it.
        let room = |w: &Option<Window>| w.as_ref().map(|w| w.max_payload.saturating_sub(fopts));
        let limit = room(&rx1).max(room(&rx2)).unwrap_or(0);
        let (item, queued) = if class == DeviceClass::A || needed {
            self.next_item(u.device, dev_eui, limit).await
        } else {
            (None, 0)
        };
        // Class C devices get their queue immediately; after an uplink only ACKs and MAC
        // commands need RX1.
        let item = if class == DeviceClass::C && !needed {
            None
        } else {
            item
        };
        if item.is_none() && !needed {
            if class == DeviceClass::C {
                self.send_class_c(u.device, dev_eui).await;
            }
            return;
        }

        // Which window is still reachable, and can carry the frame?
        let elapsed = u.arrived.elapsed();
        let rx1_open = elapsed + SCHEDULE_MARGIN < delay1;
        let rx2_open = elapsed + SCHEDULE_MARGIN < delay2;
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
            // commands go alone.
            None if item.is_some() && needed => (None, choose(0)),
            None => (item, None),
        };
        let Some(slot) = slot else {
            let device_id = self.device_ids(u.device).map(|d| d.1).unwrap_or_default();
            tracing::warn!(device = %device_id, elapsed_ms = elapsed.as_millis() as u64, "too late for RX1 and RX2; downlink kept for the next uplink");
            self.metrics.downlink_event("too_late");
            return;
        };
        let f_pending = queued > usize::from(item.is_some());
        let len = len * usize::from(item.is_some());
        let (window, delay, rx2_fallback) = match (slot, &rx1, &rx2) {
            (Slot::Rx1, Some(w1), _) => (
                w1.clone(),
                delay1,
                rx2.as_ref().filter(|_| fits(&rx2, len)).map(|w2| Fallback {
                    window: w2.clone(),
                    tmst: 0,
                    deadline: u.arrived + delay2 - SCHEDULE_MARGIN,
                }),
            ),
            (_, _, Some(w2)) => (w2.clone(), delay2, None),
            _ => return,
        };
        // Network MAC commands fill what the frame has left, in both windows it may use.
        let room = rx2_fallback
            .as_ref()
            .map_or(window.max_payload, |f| {
                window.max_payload.min(f.window.max_payload)
            })
            .saturating_sub(len + fopts);
        let Some((phy, f_cnt)) = self
            .build_frame(
                u.device,
                dev_eui,
                item.as_ref().map(|(_, i)| i),
                u.confirmed,
                f_pending,
                &answers,
                room,
            )
            .await
        else {
            return;
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
        self.transmit_via(&u.rx, tx, Some(delay), delay2).await;
    }

    /// The receive windows a device acknowledged, and its RX1 delay.
    fn device_rx(&self, device: usize) -> (RxPlan, Duration) {
        let Ok(reg) = self.registry.lock() else {
            return (self.plan, RECEIVE_DELAY1);
        };
        let rx = reg.device(device).mac.rx;
        (
            RxPlan::for_device(self.plan.region, &rx),
            Duration::from_secs(u64::from(rx.rx_delay.max(1))),
        )
    }

    /// Encode a downlink with the next FCntDown, persisting the counter first. `answers`
    /// (LinkCheckAns, DeviceTimeAns) go first; the device's waiting network commands fill up
    /// to `room` more bytes: in FOpts beside an application payload (15 bytes in all), or, in a
    /// frame without one, in FOpts when everything fits there, else as the FPort 0 payload
    /// (LoRaWAN 1.0.x §4.3.1.6: never both).
    #[allow(clippy::too_many_arguments)]
    async fn build_frame(
        &mut self,
        device: usize,
        dev_eui: Eui64,
        item: Option<&DownlinkItem>,
        ack: bool,
        f_pending: bool,
        answers: &[MacCmd],
        room: usize,
    ) -> Option<(Vec<u8>, u32)> {
        let answered: usize = answers.iter().map(|m| 1 + m.payload.len()).sum();
        let (dev_addr, nwk, app, f_cnt, commands, events) = {
            let mut reg = self.registry.lock().ok()?;
            let d = reg.device_mut(device);
            let room = if item.is_some() {
                room.min(MAX_FOPTS.saturating_sub(answered))
            } else {
                room
            };
            let (commands, events) = if d.session.is_some() {
                d.mac.take_commands(room, &self.policy)
            } else {
                (Vec::new(), Vec::new())
            };
            let s = d.session.as_mut()?;
            let f_cnt = s.state.f_cnt_down;
            s.state.f_cnt_down = f_cnt.wrapping_add(1);
            (
                s.dev_addr,
                s.nwk_s_key,
                s.app_s_key,
                f_cnt,
                commands,
                events,
            )
        };
        for e in &events {
            if let MacEvent::GaveUp(cid) = e {
                self.metrics.mac_event("gave_up");
                tracing::info!(device = %dev_eui, cid = format!("0x{cid:02X}"), attempts = self.policy.max_attempts, "the device did not answer a MAC command; given up");
            }
        }
        if !commands.is_empty() {
            self.metrics.mac_event("commands_sent");
        }
        let mut mac_cmds: Vec<MacCmd> = answers.to_vec();
        mac_cmds.extend(commands);
        let mac_len: usize = mac_cmds.iter().map(|m| 1 + m.payload.len()).sum();
        let port0 = item.is_none() && mac_len > MAX_FOPTS;
        // FCntDown is persisted ahead, FCNT_DOWN_RESERVE at a time: one fsync per 16
        // downlinks instead of one each. After a crash the device sees a gap of up to 16,
        // which LoRaWAN allows (a device takes any FCntDown above its last); reusing a
        // counter is what must never happen.
        let next = f_cnt.wrapping_add(1);
        let covered = self
            .f_cnt_down_saved
            .get(&device)
            .is_some_and(|r| r.dev_addr == dev_addr && r.nwk_s_key == nwk && next <= r.bound);
        if covered {
            // Already persisted.
        } else if let Err(e) = self
            .store
            .save_f_cnt_down(dev_eui, dev_addr, f_cnt.saturating_add(FCNT_DOWN_RESERVE))
            .await
        {
            // Without a persisted counter we must not send: a crash could reuse it.
            tracing::error!(error = %e, "cannot persist FCntDown; downlink not sent");
            return None;
        } else {
            self.metrics.downlink_event("f_cnt_down_saved");
            self.f_cnt_down_saved.insert(
                device,
                Reserved {
                    dev_addr,
                    nwk_s_key: nwk,
                    bound: f_cnt.saturating_add(FCNT_DOWN_RESERVE),
                },
            );
        }
        let (f_port, payload, fopts) = match item {
            Some(i) => (Some(i.f_port), i.payload.as_slice(), &mac_cmds[..]),
            // The encoder puts the commands in the FRMPayload (encrypted with NwkSKey).
            None if port0 => (Some(0), &[][..], &mac_cmds[..]),
            None => (None, &[][..], &mac_cmds[..]),
        };
        let frame = DataFrame {
            uplink: false,
            confirmed: item.is_some_and(|i| i.confirmed),
            dev_addr,
            f_cnt,
            adr: false,
            adr_ack_req: false,
            ack,
            f_pending,
            f_port,
            payload,
            mac: fopts,
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
                        tx: Box::new(t),
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
        let route = self
            .class_c_route(device)
            .filter(|(rx, _)| rx.iter().any(|r| self.tx.has_downlink_path(r.gateway)));
        let Some((rx, settings)) = route else {
            let reported = self.class_c_waiting.get(&device).copied().unwrap_or(false);
            if reported {
                return;
            }
            let queued = self.store.downlinks(dev_eui).map_or(0, |q| q.len());
            if queued == 0 {
                self.class_c_waiting.remove(&device);
                return;
            }
            self.class_c_waiting.insert(device, true);
            tracing::info!(%dev_eui, queued, "class C downlink waits for a gateway: none has a downlink path for this device yet (it goes through the gateway that heard the device last, else [gateway] class_c_gateway, else the only connected forwarder)");
            self.metrics.downlink_event("class_c_no_gateway");
            return;
        };
        self.class_c_waiting.remove(&device);
        let Some(win) = self.device_rx(device).0.rx2(settings.as_ref()) else {
            return;
        };
        let (item, queued) = self.next_item(device, dev_eui, win.max_payload).await;
        let Some(item) = item else { return };
        let room = win.max_payload.saturating_sub(item.1.payload.len());
        let Some((phy, f_cnt)) = self
            .build_frame(device, dev_eui, Some(&item.1), false, queued > 1, &[], room)
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

    /// Where a class C downlink goes: the gateways of the device's last uplink since start;
    /// else the gateway that heard it last before a restart (persisted); else
    /// `[gateway] class_c_gateway`; else the only gateway with a downlink path. The radio
    /// settings of the last uplink are known only in the first case.
    fn class_c_route(&self, device: usize) -> Option<(Vec<RxInfo>, Option<TxSettings>)> {
        if let Some((rx, settings)) = self.last_heard.get(&device) {
            return Some((rx.clone(), Some(settings.clone())));
        }
        let stored = self
            .registry
            .lock()
            .ok()
            .and_then(|r| r.device(device).mac.last_gateway);
        let gateway = stored
            .or(self.class_c_gateway)
            .or_else(|| self.tx.only_downlink_gateway())?;
        // `tmst` is not used for an immediate transmission.
        let rx = RxInfo {
            gateway,
            tmst: 0,
            time: None,
            rssi: 0,
            channel_rssi: 0,
            snr: 0.0,
            channel: 0,
            rf_chain: 0,
            received_at_us: 0,
        };
        Some((vec![rx], None))
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

    /// Take a PULL_RESP's entry off the TX_ACK map; once the map is empty again after a
    /// burst, its table goes back to a small one.
    fn take_pending(&mut self, token: u16) -> Option<Pending> {
        let p = self.pending.remove(&token);
        if self.pending.is_empty() && self.pending.capacity() > PENDING_KEPT {
            self.pending.shrink_to(PENDING_KEPT);
        }
        p
    }

    async fn on_tx_ack(&mut self, a: TxAck) {
        // A late TX_ACK after the timeout, a forwarder answering another one's token, or
        // garbage: nothing to do, but visible.
        if self.pending.get(&a.token).map(|p| p.tx.gateway) != Some(a.gateway) {
            self.metrics.downlink_event("tx_ack_unknown_token");
            tracing::debug!(gateway = %a.gateway, token = a.token, "TX_ACK for an unknown token ignored");
            return;
        }
        let Some(Pending { tx: p, .. }) = self.take_pending(a.token) else {
            return;
        };
        let p = *p;
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
        } else if p.slot == Slot::Immediate {
            // A class C device takes the next queued downlink at once.
            if let Some((_, _, dev_eui, _)) = self.device_ids(p.device) {
                self.send_class_c(p.device, dev_eui).await;
            }
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
            if let Some(p) = self.take_pending(t) {
                self.sent(*p.tx).await;
            }
        }
        let waiting: Vec<usize> = self.class_c_waiting.keys().copied().collect();
        for device in waiting {
            if let Some((_, _, dev_eui, _)) = self.device_ids(device) {
                self.send_class_c(device, dev_eui).await;
            }
        }
    }
}
