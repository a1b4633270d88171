//! Downlinks: the device queues clouds fill, and the scheduler that answers in RX windows.
//!
//! Inputs (one channel, so one task owns all downlink state):
//! - [`Input::Uplink`], from the uplink stage after an uplink is stored: the class A
//!   opportunity. The scheduler answers in RX1, or in RX2 when RX1 has passed or cannot carry
//!   the frame, with the next queued downlink, the ACK of a confirmed uplink, and its MAC answers
//!   (LinkCheckAns, DeviceTimeAns), whichever apply; `FPending` says more is queued. It answers
//!   through the gateway that heard the uplink best (best SNR, then RSSI) that has a downlink
//!   path, with that gateway's `tmst`.
//! - [`Input::Request`], from a stream: `push`/`replace` a device's queue (persisted and fsynced
//!   before the stream acknowledges the cloud's message). Class C devices are served at once.
//! - [`Input::TxAck`], from ingress: a forwarder accepted or refused a PULL_RESP. Refused in RX1
//!   (TOO_LATE, TOO_EARLY, COLLISION_PACKET, COLLISION_BEACON, TX_FREQ, TX_POWER, ...) → the same
//!   frame is sent for RX2 if RX2 is still ahead and can carry it; otherwise, and when RX2 is
//!   refused too, the downlink stays queued for the next uplink (with a new FCntDown).
//! - [`Input::JoinAccept`]: an OTAA JoinAccept to send at JOIN_ACCEPT_DELAY1, or DELAY2 when
//!   the first window has passed or is refused.
//!
//! A payload larger than the biggest window the device has after an uplink (RX1 or RX2, minus
//! the MAC answers in FOpts) fails with a `down/failed` event; one that only fits a window that
//! has already passed waits for the next uplink.
//!
//! FCntDown is persisted (fsync) before any PULL_RESP leaves, so a crash never reuses one.
//! Events (`queued`, `sent`, `ack`, `nack`, `failed`) go back to the stream the downlink came
//! from.

mod handle;
pub mod json;
mod scheduler;
pub(crate) mod window;

pub(crate) use handle::channel;
pub use handle::{DownlinkHandle, Stopped};
pub(crate) use scheduler::Scheduler;

use crate::lorawan::session::Registry;
use crate::model::{DownlinkEvent, DownlinkRequest, RxInfo, Scope, TxSettings};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc;

/// The registry shared by the uplink stage (FCntUp) and the scheduler (FCntDown, keys).
pub(crate) type SharedRegistry = Arc<Mutex<Registry>>;

/// Queued downlinks per device.
pub const MAX_QUEUE: usize = 64;

/// A class A opportunity: what the scheduler needs of an accepted uplink.
#[derive(Debug, Clone)]
pub(crate) struct UplinkInfo {
    pub device: usize,
    pub confirmed: bool,
    /// The device acknowledged our last confirmed downlink.
    pub ack: bool,
    /// The device asked LinkCheckReq / DeviceTimeReq (answered in this downlink).
    pub link_check_req: bool,
    pub device_time_req: bool,
    /// The MAC layer wants a downlink now even if nothing is queued (ADRACKReq, network
    /// commands waiting, a sticky answer to stop: `lorawan::mac_state::Outcome`).
    pub needs_downlink: bool,
    /// Every reception, best first: the gateways to answer through, in order of preference.
    pub rx: Vec<RxInfo>,
    pub settings: TxSettings,
    /// When the first reception arrived here (the RX windows count from there).
    pub arrived: Instant,
}

/// A JoinAccept ready to send.
#[derive(Debug, Clone)]
pub(crate) struct JoinAcceptJob {
    pub device: usize,
    pub phy: Vec<u8>,
    /// Receptions of the JoinRequest, best first.
    pub rx: Vec<RxInfo>,
    pub settings: TxSettings,
    pub arrived: Instant,
}

#[derive(Debug)]
pub(crate) enum Input {
    Uplink(Box<UplinkInfo>),
    /// A stream's request; `done` fires once it is stored (or refused), so the stream can
    /// acknowledge the cloud's message only then ([`DownlinkHandle::submit`]).
    Request(DownlinkRequest, tokio::sync::oneshot::Sender<()>),
    JoinAccept(Box<JoinAcceptJob>),
    /// A reload added or changed a stream (`Some`: its scope and event channel) or removed
    /// it (`None`).
    Link(String, Option<StreamLink>),
}

/// Per-stream scope and event channel.
#[derive(Debug)]
pub(crate) struct StreamLink {
    pub scope: Scope,
    pub events: mpsc::Sender<DownlinkEvent>,
}
