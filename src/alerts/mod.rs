//! Operator alerts (`[[alert]]`): the daemon watches its devices, gateways, streams and store,
//! and tells the operator once when something goes wrong and once when it is right again.
//!
//! Every [`TICK`] the engine looks at each rule's subjects:
//!
//! | kind | subject | condition | since |
//! |---|---|---|---|
//! | `device_silent` | device id | no uplink for `after` | its last uplink (or the start) |
//! | `battery_low` | device id | last DevStatusAns below `threshold` % | first seen so |
//! | `gateway_offline` | gateway EUI | no datagram for `after` | its last datagram (or the start) |
//! | `stream_down` | stream name | not connected | first seen so |
//! | `queue_filling` | stream name | queue above `threshold` % of `[storage] max_bytes` | first seen so |
//! | `store_unwritable` | `store` | the store refuses writes | first seen so |
//!
//! A condition that has held for `after` **fires**: one `firing` message. Once it has been
//! clear for `hold` (the flapping guard) the alert is **resolved**: one `resolved` message with
//! the same alert id. Messages are records ([`crate::model::AlertMsg`]) appended to the queues
//! of the rule's `streams`, so they are delivered like uplinks (at least once, acknowledged,
//! kept across restarts): MQTT `{prefix}/gateways/{eui}/alerts`, an HTTP POST, a WebSocket
//! message, an e-mail, a line.
//!
//! **Persistence.** Each open alert is stored (fsynced, `store::alerts`) before its `firing`
//! message is appended, marked with the message's id while the message is being queued, and
//! removed once its `resolved` message is queued. A restart therefore keeps open alerts open and
//! sends nothing again; only a crash between the append and the unmarking re-queues the same
//! message (same correlation id). What is *not* kept: how long a device or gateway had been
//! silent before the start (silence is counted from the start), and when a `stream_down` or
//! similar condition began.

use crate::activity::{Activity, AlertView};
use crate::config::{AlertConfig, AlertKind, AlertScope, Config};
use crate::ingress::udp::Gateways;
use crate::lorawan::session::Registry;
use crate::metrics::Metrics;
use crate::model::{new_id, now_us, AlertMsg, DevAddr, Eui64, Record};
use crate::store::{Entry, Store};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often conditions are looked at.
pub const TICK: Duration = Duration::from_secs(1);

/// An open alert as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Open {
    alert_id: String,
    since_us: i64,
    /// A message being queued (its id, and firing or resolved): queued again after a crash.
    pending: Option<(u128, bool, String)>,
}

/// What the engine knows of one (rule, subject).
#[derive(Debug, Default)]
struct Track {
    /// When the condition was first seen holding (for kinds without a time of their own).
    cond_since: Option<i64>,
    /// When an open alert's condition was first seen clear.
    clear_since: Option<i64>,
    open: Option<Open>,
}

/// One subject's state now.
struct Obs {
    subject: String,
    holds: bool,
    /// When the condition began, where the subject itself tells (a last uplink).
    since: Option<i64>,
    /// Facts for the sentence ("12%", the store's error).
    facts: String,
}

pub struct AlertEngine {
    rules: Vec<AlertConfig>,
    /// Per rule: the queue indexes of its streams.
    queues: Vec<Vec<usize>>,
    store: Store,
    metrics: Metrics,
    registry: Arc<Mutex<Registry>>,
    gateways: Gateways,
    origin: String,
    store_path: String,
    max_bytes: u64,
    stream_names: Vec<String>,
    tracks: BTreeMap<(usize, String), Track>,
    /// Per device: its counters last tick, and when they last changed (an uplink).
    heard: HashMap<Eui64, ((DevAddr, Option<u32>), i64)>,
    started_us: i64,
    /// Where the open alerts are shown (the status page).
    activity: Activity,
}

fn store_key(rule: &AlertConfig, subject: &str) -> Vec<u8> {
    format!("{}\n{subject}", rule.key()).into_bytes()
}

fn ago(us: i64) -> String {
    let s = (us.max(0) / 1_000_000) as u64;
    humantime::format_duration(Duration::from_secs(s)).to_string()
}

impl AlertEngine {
    pub fn new(
        cfg: &Config,
        store: Store,
        metrics: Metrics,
        registry: Arc<Mutex<Registry>>,
        gateways: Gateways,
    ) -> AlertEngine {
        let queues = cfg
            .alerts
            .iter()
            .map(|r| {
                r.streams
                    .iter()
                    .filter_map(|s| store.queue_index(s))
                    .collect()
            })
            .collect();
        let origin = cfg
            .gateway
            .eui
            .map(|e| e.to_lower_hex())
            .unwrap_or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|s| s.trim().to_string())
                    .ok()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "gateway".into())
            });
        AlertEngine {
            rules: cfg.alerts.clone(),
            queues,
            store,
            metrics,
            registry,
            gateways,
            origin,
            store_path: cfg.storage.path.display().to_string(),
            max_bytes: cfg.storage.max_bytes,
            stream_names: cfg.streams.iter().map(|s| s.name.clone()).collect(),
            tracks: BTreeMap::new(),
            heard: HashMap::new(),
            started_us: now_us(),
            activity: Activity::new(),
        }
    }

    /// Show the open alerts on `activity` (the status page).
    pub fn with_activity(mut self, activity: Activity) -> Self {
        self.activity = activity;
        self
    }

    /// Evaluate the rules every [`TICK`] until `cancel`.
    pub async fn run(mut self, cancel: CancellationToken) {
        if self.rules.is_empty() {
            return;
        }
        self.restore().await;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => self.evaluate(now_us()).await,
            }
        }
    }

    /// Open alerts from the store; a message that was being queued at a crash is queued again.
    async fn restore(&mut self) {
        let stored = match self.store.alerts_load() {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the open alerts; they may be sent again");
                return;
            }
        };
        for (k, v) in stored {
            let key = String::from_utf8_lossy(&k).into_owned();
            let (rule_key, subject) = key.split_once('\n').unwrap_or((key.as_str(), ""));
            let rule = self.rules.iter().position(|r| r.key() == rule_key);
            let open: Option<Open> = postcard::from_bytes(&v).ok();
            let (Some(rule), Some(mut open)) = (rule, open) else {
                // The rule is gone from the configuration (or the entry is unreadable).
                tracing::info!(alert = %key, "forgetting an open alert whose rule is no longer configured");
                let _ = self.store.alert_put(&k, None).await;
                continue;
            };
            if let Some((id, firing, message)) = open.pending.clone() {
                self.queue(rule, subject, &open, id, firing, message).await;
                if firing {
                    open.pending = None;
                    self.save(rule, subject, Some(&open)).await;
                } else {
                    self.save(rule, subject, None).await;
                    continue;
                }
            }
            tracing::info!(alert = %open.alert_id, kind = self.rules[rule].kind.name(), subject, "alert still open from before the restart");
            self.tracks.insert(
                (rule, subject.to_string()),
                Track {
                    cond_since: Some(open.since_us),
                    clear_since: None,
                    open: Some(open),
                },
            );
        }
        self.count_open();
    }

    async fn evaluate(&mut self, now: i64) {
        self.note_uplinks(now);
        for rule in 0..self.rules.len() {
            let mut obs = self.observe(rule, now);
            // Subjects with an open alert that were not observed (a gateway not heard since the
            // start): their condition holds until they show up.
            for ((r, subject), t) in &self.tracks {
                if *r == rule && t.open.is_some() && !obs.iter().any(|o| &o.subject == subject) {
                    obs.push(Obs {
                        subject: subject.clone(),
                        holds: true,
                        since: None,
                        facts: String::new(),
                    });
                }
            }
            for o in obs {
                self.step(rule, o, now).await;
            }
        }
        self.count_open();
    }

    /// Devices whose counters moved since the last tick were heard now.
    fn note_uplinks(&mut self, now: i64) {
        let Ok(reg) = self.registry.lock() else {
            return;
        };
        for d in reg.devices().iter().filter(|d| !d.removed) {
            let counters = d
                .session
                .as_ref()
                .map(|s| (s.state.dev_addr, s.state.f_cnt_up))
                .unwrap_or_default();
            match self.heard.get_mut(&d.dev_eui) {
                Some((c, at)) if *c != counters => {
                    *c = counters;
                    *at = now;
                }
                Some(_) => {}
                None => {
                    self.heard.insert(d.dev_eui, (counters, self.started_us));
                }
            }
        }
    }

    fn observe(&self, rule: usize, now: i64) -> Vec<Obs> {
        let r = &self.rules[rule];
        let after = r.after.as_micros() as i64;
        let mut out = Vec::new();
        // Not heard since the start, with an alert open from before it: still silent (an
        // uplink or a datagram resolves it, a restart does not).
        let silent = |subject: &str, last: i64| {
            now - last >= after
                || (last <= self.started_us
                    && self
                        .tracks
                        .get(&(rule, subject.to_string()))
                        .is_some_and(|t| t.open.is_some()))
        };
        match r.kind {
            AlertKind::DeviceSilent | AlertKind::BatteryLow => {
                let Ok(reg) = self.registry.lock() else {
                    return out;
                };
                for d in reg.devices().iter().filter(|d| !d.removed) {
                    let covered = match &r.scope {
                        AlertScope::Application(a) => *d.application == **a,
                        AlertScope::Device(x) => *d.id == **x,
                        _ => true,
                    };
                    if !covered {
                        continue;
                    }
                    if r.kind == AlertKind::DeviceSilent {
                        let last = self
                            .heard
                            .get(&d.dev_eui)
                            .map(|(_, at)| *at)
                            .unwrap_or(self.started_us);
                        out.push(Obs {
                            subject: d.id.to_string(),
                            holds: silent(&d.id, last),
                            since: Some(last),
                            facts: format!("application {}", d.application),
                        });
                    } else {
                        let pct = d.mac.dev_status.and_then(|s| s.battery_percentage());
                        out.push(Obs {
                            subject: d.id.to_string(),
                            holds: pct.is_some_and(|p| p < f32::from(r.threshold)),
                            since: None,
                            facts: pct.map(|p| format!("{p:.0}%")).unwrap_or_default(),
                        });
                    }
                }
            }
            AlertKind::GatewayOffline => {
                // The most recently heard forwarders (bounded, as /health shows them).
                let (view, _) = self.gateways.view();
                let mut seen: Vec<(String, i64)> = view
                    .iter()
                    .map(|g| (g.eui.clone(), now - (g.last_seen_s * 1e6) as i64))
                    .collect();
                if let AlertScope::Gateway(e) = &r.scope {
                    let e = e.to_string();
                    seen.retain(|(g, _)| g == &e);
                    if seen.is_empty() {
                        seen.push((e, self.started_us));
                    }
                }
                for (eui, last) in seen {
                    out.push(Obs {
                        holds: silent(&eui, last),
                        subject: eui,
                        since: Some(last),
                        facts: String::new(),
                    });
                }
            }
            AlertKind::StreamDown | AlertKind::QueueFilling => {
                for name in &self.stream_names {
                    if matches!(&r.scope, AlertScope::Stream(s) if s != name) {
                        continue;
                    }
                    if r.kind == AlertKind::StreamDown {
                        out.push(Obs {
                            subject: name.clone(),
                            holds: !self.metrics.is_stream_connected(name),
                            since: None,
                            facts: String::new(),
                        });
                    } else if let Some(q) = self.store.queue(name) {
                        let pct = q.stats().bytes.saturating_mul(100) / self.max_bytes.max(1);
                        out.push(Obs {
                            subject: name.clone(),
                            holds: pct > u64::from(r.threshold),
                            since: None,
                            facts: format!("{pct}%"),
                        });
                    }
                }
            }
            AlertKind::StoreUnwritable => {
                let h = self.store.health();
                out.push(Obs {
                    subject: "store".into(),
                    holds: !h.writable,
                    since: None,
                    facts: h.last_error.unwrap_or_default(),
                });
            }
        }
        out
    }

    /// One subject: fire, resolve, or wait.
    async fn step(&mut self, rule: usize, o: Obs, now: i64) {
        let r = &self.rules[rule];
        let (after, hold) = (r.after.as_micros() as i64, r.hold.as_micros() as i64);
        let key = (rule, o.subject.clone());
        let t = self.tracks.entry(key.clone()).or_default();
        if o.holds {
            t.clear_since = None;
            let start = o.since.or(t.cond_since).unwrap_or(now);
            t.cond_since.get_or_insert(start);
            if t.open.is_none() && now - start >= after {
                let open = Open {
                    alert_id: ulid::Ulid(new_id()).to_string(),
                    since_us: start,
                    pending: None,
                };
                let message = self.sentence(rule, &o, true, start, now);
                self.fire(rule, &o.subject, open, message).await;
            }
            return;
        }
        t.cond_since = None;
        let Some(open) = t.open.clone() else {
            self.tracks.remove(&key);
            return;
        };
        let cleared = *t.clear_since.get_or_insert(now);
        if now - cleared >= hold {
            let message = self.sentence(rule, &o, false, open.since_us, now);
            self.resolve(rule, &o.subject, open, message).await;
            self.tracks.remove(&key);
        }
    }

    async fn fire(&mut self, rule: usize, subject: &str, mut open: Open, message: String) {
        let id = new_id();
        open.pending = Some((id, true, message.clone()));
        // Stored before it is queued: a restart after this point neither forgets it nor fires
        // it with a new id.
        self.save(rule, subject, Some(&open)).await;
        self.queue(rule, subject, &open, id, true, message).await;
        open.pending = None;
        self.save(rule, subject, Some(&open)).await;
        if let Some(t) = self.tracks.get_mut(&(rule, subject.to_string())) {
            t.open = Some(open);
        }
    }

    async fn resolve(&mut self, rule: usize, subject: &str, mut open: Open, message: String) {
        let id = new_id();
        open.pending = Some((id, false, message.clone()));
        self.save(rule, subject, Some(&open)).await;
        self.queue(rule, subject, &open, id, false, message).await;
        self.save(rule, subject, None).await;
    }

    async fn save(&self, rule: usize, subject: &str, open: Option<&Open>) {
        let key = store_key(&self.rules[rule], subject);
        let value = open.and_then(|o| postcard::to_stdvec(o).ok());
        if let Err(e) = self.store.alert_put(&key, value.as_deref()).await {
            tracing::error!(error = %e, subject, "cannot store an alert's state; after a restart it may be sent again or forgotten");
        }
    }

    /// Append the message to the rule's streams' queues.
    async fn queue(
        &self,
        rule: usize,
        subject: &str,
        open: &Open,
        id: u128,
        firing: bool,
        message: String,
    ) {
        let kind = self.rules[rule].kind.name();
        let msg = AlertMsg {
            id,
            alert_id: open.alert_id.clone(),
            kind: kind.to_string(),
            firing,
            subject: subject.to_string(),
            since_us: open.since_us,
            at_us: now_us(),
            message,
            origin: self.origin.clone(),
        };
        let state = if firing { "firing" } else { "resolved" };
        tracing::warn!(alert = %msg.alert_id, kind, subject, state, message = %msg.message, "alert");
        self.metrics.alert(kind, state);
        let record = Record::Alert(msg);
        let entries = [Entry {
            record: &record,
            queues: &self.queues[rule],
        }];
        if let Err(e) = self.store.append(&entries, &[]).await {
            tracing::error!(error = %e, kind, subject, "cannot queue an alert message");
        }
    }

    fn count_open(&self) {
        for k in AlertKind::ALL {
            let n = self
                .tracks
                .iter()
                .filter(|((r, _), t)| self.rules[*r].kind == k && t.open.is_some())
                .count();
            self.metrics.set_alerts_open(k.name(), n);
        }
        let mut open: Vec<AlertView> = self
            .tracks
            .iter()
            .filter_map(|((r, subject), t)| {
                let o = t.open.as_ref()?;
                Some(AlertView {
                    id: o.alert_id.clone(),
                    kind: self.rules[*r].kind.name(),
                    subject: subject.clone(),
                    since_us: o.since_us,
                })
            })
            .collect();
        open.sort_by_key(|a| a.since_us);
        self.activity.set_alerts(open);
    }

    /// The sentence of a message.
    fn sentence(&self, rule: usize, o: &Obs, firing: bool, since: i64, now: i64) -> String {
        let r = &self.rules[rule];
        let s = &o.subject;
        let dur = ago(now - since);
        match (r.kind, firing) {
            (AlertKind::DeviceSilent, true) => {
                format!("Device {s} ({}) has sent no uplink for {dur}.", o.facts)
            }
            (AlertKind::DeviceSilent, false) => {
                format!("Device {s} is heard again, after {dur} without an uplink.")
            }
            (AlertKind::BatteryLow, true) => format!(
                "Device {s} reports {} battery, below {}%.",
                o.facts, r.threshold
            ),
            (AlertKind::BatteryLow, false) => {
                let level = if o.facts.is_empty() {
                    "no battery level".to_string()
                } else {
                    format!("{} battery", o.facts)
                };
                format!(
                    "Device {s} reports {level} now (threshold {}%).",
                    r.threshold
                )
            }
            (AlertKind::GatewayOffline, true) => {
                format!("Gateway {s} has not been heard for {dur}.")
            }
            (AlertKind::GatewayOffline, false) => {
                format!("Gateway {s} is heard again, after {dur}.")
            }
            (AlertKind::StreamDown, true) => {
                format!("Stream {s} has been disconnected for {dur}.")
            }
            (AlertKind::StreamDown, false) => {
                format!("Stream {s} is connected again, after {dur}.")
            }
            (AlertKind::QueueFilling, true) => format!(
                "The queue of stream {s} holds {} of [storage] max_bytes (above {}%).",
                o.facts, r.threshold
            ),
            (AlertKind::QueueFilling, false) => format!(
                "The queue of stream {s} is below {}% of [storage] max_bytes again ({}).",
                r.threshold, o.facts
            ),
            (AlertKind::StoreUnwritable, true) => format!(
                "The store at {} refuses writes: {}. Uplinks are kept in memory only.",
                self.store_path, o.facts
            ),
            (AlertKind::StoreUnwritable, false) => format!(
                "The store at {} takes writes again, after {dur}.",
                self.store_path
            ),
        }
    }
}
