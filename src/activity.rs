//! What the status page shows that no other part keeps: each device's last uplinks (signal
//! history), the last radio frames, the open alerts and each stream's queue depth over time.
//!
//! Everything here is bounded ([`DEVICE_HISTORY`] uplinks per device, at most [`MAX_DEVICES`]
//! devices, [`FRAMES`] frames, [`MAX_ALERTS`] alerts, [`QUEUE_SAMPLES`] samples per stream),
//! held in memory only (a restart starts empty), and written under a `std::sync::Mutex` held for
//! a few copies, never across an `.await`. No payload and no key is ever kept.

use crate::model::{DevStatus, Eui64};
use serde::Serialize;
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

/// What is known of a device from its uplinks since the start.
#[derive(Debug, Clone, Default)]
pub struct DeviceActivity {
    /// Unix µs of its last accepted uplink.
    pub last_seen_us: i64,
    pub f_cnt: u32,
    /// "DR5 (SF7BW125)", or the spreading factor alone outside the region's table.
    pub data_rate: String,
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
    pub device: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dev_addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub f_cnt: Option<u32>,
    /// Best reception's gateway and signal; how many gateways heard it.
    pub gateway: String,
    pub gateways: usize,
    pub rssi: i32,
    pub snr: f32,
    pub frequency_hz: u32,
    pub data_rate: String,
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
    devices: HashMap<Eui64, DeviceActivity>,
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
    pub data_rate: String,
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
            data_rate: "DR5".into(),
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
                gateway: String::new(),
                gateways: 1,
                rssi: 0,
                snr: 0.0,
                frequency_hz: 0,
                data_rate: String::new(),
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
}
