//! What the status page shows that no other part keeps: each device's last uplinks (signal
//! history), the last radio frames, the open alerts and each stream's queue depth over time.
//!
//! Everything here is bounded ([`DEVICE_HISTORY`] uplinks per device, at most [`MAX_DEVICES`]
//! devices, [`FRAMES`] frames, [`MAX_ALERTS`] alerts, [`QUEUE_SAMPLES`] samples per stream),
//! held in memory only (a restart starts empty), and written under a `std::sync::Mutex` held for
//! a few copies, never across an `.await`. No payload and no key is ever kept.
//!
//! Records are kept as plain values (DevAddr, EUI, spreading factor) and turned into text only
//! when the page or `/api/status` is asked for: the uplink stage records every frame, the page
//! is read every few seconds at most (issue 16).

use crate::model::{DevAddr, DevStatus, Eui64, FastMap};
use serde::{Serialize, Serializer};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

/// Uplinks kept per device for its RSSI/SNR chart.
pub const DEVICE_HISTORY: usize = 32;
/// Devices with activity kept at most (the registry is bounded by the config; this guards the
/// page against a config of thousands).
pub const MAX_DEVICES: usize = 10_000;
/// Radio frames kept for the "last frames" table.
pub const FRAMES: usize = 50;
/// Open alerts shown at most.
pub const MAX_ALERTS: usize = 100;
/// Queue depth samples kept per stream ([`QUEUE_SAMPLE_EVERY`] apart: ten minutes).
pub const QUEUE_SAMPLES: usize = 60;
/// How often queue depths are sampled.
pub const QUEUE_SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// Streams whose depth history is kept at most.
const MAX_STREAMS: usize = 256;

/// One accepted uplink of a device, as its chart needs it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SignalPoint {
    pub f_cnt: u32,
    /// Best reception.
    pub rssi: i32,
    pub snr: f32,
}

/// A frame's data rate as the page shows it: "DR5 (SF7BW125)", or "SF7BW125" outside the
/// region's table (formatted only when shown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataRateLabel {
    /// The region's data rate index, when the region has one for this SF and bandwidth.
    pub dr: Option<u8>,
    pub spreading_factor: u8,
    pub bandwidth_khz: u32,
}

impl std::fmt::Display for DataRateLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (sf, bw) = (self.spreading_factor, self.bandwidth_khz);
        match self.dr {
            Some(dr) => write!(f, "DR{dr} (SF{sf}BW{bw})"),
            None => write!(f, "SF{sf}BW{bw}"),
        }
    }
}

/// `None` as "", anything else as its `Display` text.
pub fn text_or_empty<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map(ToString::to_string).unwrap_or_default()
}

fn ser_text_or_empty<T: std::fmt::Display, S: Serializer>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_str(""),
    }
}

fn ser_some_text<T: std::fmt::Display, S: Serializer>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

/// What is known of a device from its uplinks since the start.
#[derive(Debug, Clone, Default)]
pub struct DeviceActivity {
    /// Unix µs of its last accepted uplink.
    pub last_seen_us: i64,
    pub f_cnt: u32,
    /// Its last uplink's data rate (`None`: not known).
    pub data_rate: Option<DataRateLabel>,
    pub uplinks: u64,
    pub history: VecDeque<SignalPoint>,
    pub dev_status: Option<DevStatus>,
}

/// One received radio frame, after its verdict.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FrameView {
    pub at_us: i64,
    /// "data_up", "join_request".
    pub kind: &'static str,
    /// "accepted", "mic_failed", "unknown_dev_addr", "replay", "repeat", "malformed", ...
    pub result: &'static str,
    /// The device, when the frame was matched to one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<std::sync::Arc<str>>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_some_text"
    )]
    pub dev_addr: Option<DevAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub f_cnt: Option<u32>,
    /// Best reception's gateway (shown as "" when none) and signal; how many gateways heard it.
    #[serde(serialize_with = "ser_text_or_empty")]
    pub gateway: Option<Eui64>,
    pub gateways: usize,
    pub rssi: i32,
    pub snr: f32,
    pub frequency_hz: u32,
    /// Shown as "" when not known.
    #[serde(serialize_with = "ser_text_or_empty")]
    pub data_rate: Option<DataRateLabel>,
    /// PHYPayload length in bytes (the payload itself is never kept).
    pub size: usize,
}

/// An open alert, as the alert engine publishes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertView {
    pub id: String,
    pub kind: &'static str,
    pub subject: String,
    pub since_us: i64,
}

#[derive(Default)]
struct State {
    devices: FastMap<Eui64, DeviceActivity>,
    frames: VecDeque<FrameView>,
    alerts: Vec<AlertView>,
    /// Per stream: (Unix µs, depth), oldest first.
    queues: HashMap<String, VecDeque<(i64, u64)>>,
}

/// The shared recent-activity board (cheap to clone; one per daemon, no globals).
#[derive(Clone, Default)]
pub struct Activity {
    inner: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Activity")
    }
}

/// An accepted uplink, as [`Activity::uplink`] records it.
#[derive(Debug, Clone)]
pub struct UplinkNote {
    pub dev_eui: Eui64,
    pub at_us: i64,
    pub f_cnt: u32,
    pub data_rate: Option<DataRateLabel>,
    pub signal: SignalPoint,
    pub dev_status: Option<DevStatus>,
}

impl Activity {
    pub fn new() -> Activity {
        Activity::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves plain data: keep using it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record an accepted uplink of a device.
    pub fn uplink(&self, n: UplinkNote) {
        let mut s = self.lock();
        if !s.devices.contains_key(&n.dev_eui) && s.devices.len() >= MAX_DEVICES {
            return;
        }
        let d = s.devices.entry(n.dev_eui).or_default();
        d.last_seen_us = n.at_us;
        d.f_cnt = n.f_cnt;
        d.data_rate = n.data_rate;
        d.uplinks += 1;
        if n.dev_status.is_some() {
            d.dev_status = n.dev_status;
        }
        if d.history.len() == DEVICE_HISTORY {
            d.history.pop_front();
        }
        d.history.push_back(n.signal);
    }

    /// Record a received frame (the oldest of [`FRAMES`] is forgotten).
    pub fn frame(&self, f: FrameView) {
        let mut s = self.lock();
        if s.frames.len() == FRAMES {
            s.frames.pop_front();
        }
        s.frames.push_back(f);
    }

    /// Replace the open alerts (the alert engine, after each evaluation).
    pub fn set_alerts(&self, mut alerts: Vec<AlertView>) {
        alerts.truncate(MAX_ALERTS);
        self.lock().alerts = alerts;
    }

    /// Record one depth sample per stream.
    pub fn sample_queues(&self, at_us: i64, depths: impl IntoIterator<Item = (String, u64)>) {
        let mut s = self.lock();
        for (stream, depth) in depths {
            if !s.queues.contains_key(&stream) && s.queues.len() >= MAX_STREAMS {
                continue;
            }
            let h = s.queues.entry(stream).or_default();
            if h.len() == QUEUE_SAMPLES {
                h.pop_front();
            }
            h.push_back((at_us, depth));
        }
    }

    /// A device's activity, if it sent an uplink since the start.
    pub fn device(&self, dev_eui: Eui64) -> Option<DeviceActivity> {
        self.lock().devices.get(&dev_eui).cloned()
    }

    /// The last frames, newest first.
    pub fn frames(&self) -> Vec<FrameView> {
        self.lock().frames.iter().rev().cloned().collect()
    }

    pub fn alerts(&self) -> Vec<AlertView> {
        self.lock().alerts.clone()
    }

    /// A stream's depth samples, oldest first.
    pub fn queue_history(&self, stream: &str) -> Vec<(i64, u64)> {
        self.lock()
            .queues
            .get(stream)
            .map(|h| h.iter().copied().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(f_cnt: u32) -> UplinkNote {
        UplinkNote {
            dev_eui: Eui64::from_u64(1),
            at_us: i64::from(f_cnt),
            f_cnt,
            data_rate: Some(DataRateLabel {
                dr: Some(5),
                spreading_factor: 7,
                bandwidth_khz: 125,
            }),
            signal: SignalPoint {
                f_cnt,
                rssi: -50,
                snr: 7.5,
            },
            dev_status: None,
        }
    }

    #[test]
    fn rings_stay_bounded_and_keep_the_newest() {
        let a = Activity::new();
        for i in 0..100 {
            a.uplink(note(i));
            a.frame(FrameView {
                at_us: i64::from(i),
                kind: "data_up",
                result: "accepted",
                device: None,
                dev_addr: None,
                f_cnt: Some(i),
                gateway: None,
                gateways: 1,
                rssi: 0,
                snr: 0.0,
                frequency_hz: 0,
                data_rate: None,
                size: 12,
            });
            a.sample_queues(i64::from(i), [("s".to_string(), u64::from(i))]);
        }
        let d = a.device(Eui64::from_u64(1)).unwrap();
        assert_eq!(d.history.len(), DEVICE_HISTORY);
        assert_eq!(d.history.back().unwrap().f_cnt, 99);
        assert_eq!(
            d.history.front().unwrap().f_cnt,
            100 - DEVICE_HISTORY as u32
        );
        assert_eq!(d.uplinks, 100);
        let f = a.frames();
        assert_eq!(f.len(), FRAMES);
        assert_eq!(f[0].f_cnt, Some(99));
        let q = a.queue_history("s");
        assert_eq!(q.len(), QUEUE_SAMPLES);
        assert_eq!(q.last(), Some(&(99, 99)));
    }

    #[test]
    fn frames_read_as_the_text_they_always_were() {
        let mut f = FrameView {
            at_us: 5,
            kind: "data_up",
            result: "accepted",
            device: Some("dev-1".into()),
            dev_addr: Some(DevAddr(0x2600_0001)),
            f_cnt: Some(3),
            gateway: Some(Eui64::from_u64(0xAA55_5A00_0000_0001)),
            gateways: 2,
            rssi: -95,
            snr: 12.5,
            frequency_hz: 868_100_000,
            data_rate: Some(DataRateLabel {
                dr: Some(5),
                spreading_factor: 7,
                bandwidth_khz: 125,
            }),
            size: 23,
        };
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            r#"{"at_us":5,"kind":"data_up","result":"accepted","device":"dev-1","dev_addr":"26000001","f_cnt":3,"gateway":"AA555A0000000001","gateways":2,"rssi":-95,"snr":12.5,"frequency_hz":868100000,"data_rate":"DR5 (SF7BW125)","size":23}"#
        );
        (f.device, f.dev_addr, f.f_cnt, f.gateway) = (None, None, None, None);
        f.data_rate = Some(DataRateLabel {
            dr: None,
            spreading_factor: 12,
            bandwidth_khz: 500,
        });
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            r#"{"at_us":5,"kind":"data_up","result":"accepted","gateway":"","gateways":2,"rssi":-95,"snr":12.5,"frequency_hz":868100000,"data_rate":"SF12BW500","size":23}"#
        );
        f.data_rate = None;
        assert!(serde_json::to_string(&f)
            .unwrap()
            .contains(r#""data_rate":"","#));
    }
}
