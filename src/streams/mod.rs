//! Streams: each one takes records from its own store queue and delivers them to one
//! destination, removing a record only when the destination acknowledged it.
//!
//! | kind              | module      | acknowledgement that removes a record                 |
//! |-------------------|-------------|-------------------------------------------------------|
//! | `mqtt`, `aws-iot` | [`mqtt`]    | PUBACK of the QoS 1 publish                           |
//! | `azure-iot-hub`   | [`azure`]   | PUBACK of the QoS 1 device-to-cloud message (one connection, or one per device) |
//! | `http`            | [`http`]    | a 2xx answer to the POST of the batch                 |
//! | `stdout`          | [`lines`]   | the line written and stdout flushed                   |
//! | `file`            | [`lines`]   | the line written and the file fsynced                 |
//!
//! A stream runs until its cancel token fires; it then finishes what is in flight (bounded by
//! the daemon's stop deadline) and returns. Failures to reach the destination are retried with
//! [`backoff::Backoff`], forever: the queue holds the data meanwhile. [`session`] holds what the
//! MQTT-based streams share (PUBACK matching, endpoints, CONNACK).

pub mod azure;
pub mod backoff;
pub mod format;
pub mod http;
pub mod lanes;
pub mod lines;
pub mod mqtt;
pub mod session;
pub mod tls;

use crate::config::{Scope, StreamConfig, StreamKind};
use crate::downlink::Input as DownlinkInput;
use crate::metrics::Metrics;
use crate::model::{DownlinkEvent, Eui64};
use crate::store::Queue;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("stream {stream:?}: {message}")]
    Setup { stream: String, message: String },
}

/// What every stream gets from the daemon.
#[derive(Clone)]
pub struct StreamContext {
    pub queue: Queue,
    pub metrics: Metrics,
    pub cancel: CancellationToken,
    /// `[gateway] eui`, for the status topic and default client id.
    pub gateway_eui: Option<Eui64>,
    /// Where downlink requests go (None when the stream has `downlinks = false`).
    pub downlinks: Option<mpsc::Sender<DownlinkInput>>,
}

/// A configured stream, ready to run.
pub enum Stream {
    Mqtt(Box<mqtt::MqttStream>),
    Http(Box<http::HttpStream>),
    Azure(Box<azure::AzureStream>),
    Lines(lines::LineStream),
}

impl Stream {
    /// Check what can be checked before running (TLS files, URLs) and build the stream.
    pub fn build(
        cfg: &StreamConfig,
        ctx: StreamContext,
        events: mpsc::Receiver<DownlinkEvent>,
    ) -> Result<Stream, StreamError> {
        let setup = |message: String| StreamError::Setup {
            stream: cfg.name.clone(),
            message,
        };
        Ok(match cfg.kind {
            StreamKind::Mqtt | StreamKind::AwsIot => Stream::Mqtt(Box::new(
                mqtt::MqttStream::new(cfg, ctx, events).map_err(setup)?,
            )),
            StreamKind::Http => Stream::Http(Box::new(
                http::HttpStream::new(cfg, ctx, events).map_err(setup)?,
            )),
            StreamKind::AzureIotHub => Stream::Azure(Box::new(
                azure::AzureStream::new(cfg, ctx, events).map_err(setup)?,
            )),
            StreamKind::Stdout => Stream::Lines(lines::LineStream::stdout(ctx, events)),
            StreamKind::File => {
                let path = cfg
                    .path
                    .clone()
                    .ok_or_else(|| setup("file stream needs path".into()))?;
                Stream::Lines(lines::LineStream::file(ctx, path, events))
            }
        })
    }

    pub async fn run(self) {
        match self {
            Stream::Mqtt(s) => s.run().await,
            Stream::Http(s) => s.run().await,
            Stream::Azure(s) => s.run().await,
            Stream::Lines(s) => s.run().await,
        }
    }
}

/// Scope of a stream config (re-exported for the wiring code).
pub fn scope_of(cfg: &StreamConfig) -> Scope {
    cfg.scope()
}
