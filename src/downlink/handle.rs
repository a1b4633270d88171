//! The one way into the downlink scheduler: a typed handle over its input channel.
//!
//! - Streams call [`DownlinkHandle::submit`] for each downlink request a cloud sent. It resolves
//!   once the scheduler has stored the request (fsynced) or refused it (with a `down/failed`
//!   event to the stream), so a stream acknowledges the cloud's message (MQTT PUBACK, IoT Hub
//!   completion) only then. A stream that awaits each `submit` before the next keeps the
//!   cloud's order: the scheduler takes its inputs from one channel, one at a time.
//! - The uplink stage reports class A opportunities and JoinAccepts with
//!   [`DownlinkHandle::opportunity`] and [`DownlinkHandle::join_accept`], which never wait: an
//!   uplink is never held up by the downlink side (a full channel is counted by the caller).
//!
//! The reply channel (a oneshot) lives only here, and so does the encoding of downlinks given
//! as a `decoded_payload` (the device's payload codec, `crate::codec`).

use super::{Input, JoinAcceptJob, UplinkInfo};
use crate::codec::Codecs;
use crate::model::DownlinkRequest;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// The scheduler stopped (the daemon is stopping): the request was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the downlink scheduler has stopped")]
pub struct Stopped;

/// A cheap, cloneable handle to the scheduler.
#[derive(Clone)]
pub struct DownlinkHandle {
    tx: mpsc::Sender<Input>,
    /// Encodes the `decoded_payload` of requests, on the stream's task: a slow codec holds
    /// up that stream, never the scheduler's timing of other devices.
    codecs: Arc<Codecs>,
}

/// Inputs waiting for the scheduler at most (requests wait for room; opportunities and
/// JoinAccepts beyond it are dropped and counted).
pub(crate) const CAPACITY: usize = 1024;

/// The handle and the scheduler's end of the channel.
pub(crate) fn channel(codecs: Arc<Codecs>) -> (DownlinkHandle, mpsc::Receiver<Input>) {
    let (tx, rx) = mpsc::channel(CAPACITY);
    (DownlinkHandle { tx, codecs }, rx)
}

impl DownlinkHandle {
    /// Hand a stream's request to the scheduler and wait until it is stored or refused.
    /// Items with a `decoded_payload` are encoded first by the device's codec; one that cannot
    /// be encoded refuses the request (`down/failed`).
    pub async fn submit(&self, req: DownlinkRequest) -> Result<(), Stopped> {
        let req = self.codecs.encode_request(req).await;
        let (done, stored) = oneshot::channel();
        self.tx
            .send(Input::Request(req, done))
            .await
            .map_err(|_| Stopped)?;
        stored.await.map_err(|_| Stopped)
    }

    /// A stored uplink the scheduler may answer in RX1/RX2. False when the scheduler cannot
    /// take it now (its channel is full, or it stopped).
    pub(crate) fn opportunity(&self, u: UplinkInfo) -> bool {
        self.tx.try_send(Input::Uplink(Box::new(u))).is_ok()
    }

    /// A reload added, changed (`Some`) or removed (`None`) a stream: downlink requests and
    /// events follow the new scope and channel from the next input on.
    pub(crate) async fn set_stream_link(
        &self,
        stream: String,
        link: Option<super::StreamLink>,
    ) -> Result<(), Stopped> {
        self.tx
            .send(Input::Link(stream, link))
            .await
            .map_err(|_| Stopped)
    }

    /// A JoinAccept to send. False when the scheduler cannot take it now.
    pub(crate) fn join_accept(&self, j: JoinAcceptJob) -> bool {
        self.tx.try_send(Input::JoinAccept(Box::new(j))).is_ok()
    }
}
