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
//! | `websocket`       | [`websocket`] | `{"ack": "<correlation id>"}` from the server (or, with `ack = "write"`, written) |
//! | `smtp`            | [`smtp`]    | the SMTP server's 2xx for the e-mail (a 5xx: dead letter) |
//!
//! What every kind shares:
//! - [`connect`]: the one reconnect loop (sessions, backoff with jitter, readable failure logs);
//! - [`lanes`]: how a session reads its queue (backlog and live traffic, each device in order);
//! - [`format`]: the message formats (`format = ...`): each record's topic, body and content
//!   type, downlink events, and how downlinks are read, decided in one place;
//! - [`tls`]: rustls client configurations;
//! - [`error`]: typed setup and session errors;
//! - [`too_large`]: the one way to drop a record a destination can never take;
//! - [`crate::downlink::DownlinkHandle`]: the one way to hand a cloud's downlink to the
//!   scheduler (in order; acknowledged to the cloud once stored).
//!
//! A stream runs until its cancel token fires; it then finishes what is in flight (bounded by
//! the daemon's stop deadline) and returns.

pub mod azure;
mod backoff;
pub(crate) mod connect;
pub(crate) mod error;
pub mod format;
pub(crate) mod http;
pub(crate) mod lanes;
pub(crate) mod lines;
pub(crate) mod mqtt;
pub(crate) mod smtp;
pub mod tls;
pub(crate) mod too_large;
pub(crate) mod websocket;

use crate::config::{StreamConfig, StreamKind};
use crate::downlink::DownlinkHandle;
use crate::metrics::Metrics;
use crate::model::{DownlinkEvent, Eui64};
use crate::store::Queue;
use error::SetupError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A stream that cannot be started.
#[derive(Debug, thiserror::Error)]
#[error("stream {stream:?}: {source}")]
pub struct StreamError {
    pub stream: String,
    #[source]
    pub source: SetupError,
}

/// What every stream gets from the daemon.
#[derive(Clone)]
pub(crate) struct StreamContext {
    /// The stream's name (and its queue's).
    pub name: String,
    pub queue: Queue,
    pub metrics: Metrics,
    pub cancel: CancellationToken,
    /// `[gateway] eui`, for the status topic.
    pub gateway_eui: Option<Eui64>,
    /// This installation's instance id (derived MQTT client ids end with it).
    pub instance_id: std::sync::Arc<str>,
    /// Remote commands, when the stream takes them (`commands = true`).
    pub commands: Option<crate::daemon::commands::Commands>,
    /// Where downlink requests go (None when the stream has `downlinks = false`).
    pub downlinks: Option<DownlinkHandle>,
    /// The stream's format.
    pub format: std::sync::Arc<format::Formatter>,
}

/// A configured stream, ready to run.
pub(crate) enum Stream {
    Mqtt(Box<mqtt::MqttStream>),
    Http(Box<http::HttpStream>),
    Azure(Box<azure::AzureStream>),
    Lines(lines::LineStream),
    WebSocket(Box<websocket::WsStream>),
    Smtp(Box<smtp::SmtpStream>),
}

impl Stream {
    /// Check what can be checked before running (TLS files, keys) and build the stream.
    pub fn build(
        cfg: &StreamConfig,
        ctx: StreamContext,
        events: mpsc::Receiver<DownlinkEvent>,
    ) -> Result<Stream, StreamError> {
        let setup = |source: SetupError| StreamError {
            stream: cfg.name.clone(),
            source,
        };
        Ok(match &cfg.kind {
            StreamKind::Mqtt(m) => Stream::Mqtt(Box::new(
                mqtt::MqttStream::mqtt(m, ctx, events).map_err(setup)?,
            )),
            StreamKind::AwsIot(a) => Stream::Mqtt(Box::new(
                mqtt::MqttStream::aws(a, ctx, events).map_err(setup)?,
            )),
            StreamKind::Http(h) => Stream::Http(Box::new(
                http::HttpStream::new(h, ctx, events).map_err(setup)?,
            )),
            StreamKind::AzureIotHub(a) => Stream::Azure(Box::new(
                azure::AzureStream::new(a, ctx, events).map_err(setup)?,
            )),
            StreamKind::Stdout => Stream::Lines(lines::LineStream::stdout(ctx, events)),
            StreamKind::File { path } => {
                Stream::Lines(lines::LineStream::file(ctx, path.clone(), events))
            }
            StreamKind::WebSocket(w) => Stream::WebSocket(Box::new(
                websocket::WsStream::new(w, ctx, events).map_err(setup)?,
            )),
            StreamKind::Smtp(m) => Stream::Smtp(Box::new(
                smtp::SmtpStream::new(m, ctx, events).map_err(setup)?,
            )),
        })
    }

    /// `lorastream check --online`: connect once as the stream would (server, TLS,
    /// credentials), deliver nothing, and say what was verified.
    pub async fn probe(&self) -> Result<String, error::SessionError> {
        match self {
            Stream::Mqtt(s) => s.probe().await,
            Stream::Http(s) => s.probe().await,
            Stream::Azure(s) => s.probe().await,
            Stream::Lines(s) => s.probe().map_err(error::SessionError::Io),
            Stream::WebSocket(s) => s.probe().await,
            Stream::Smtp(s) => s.probe().await,
        }
    }

    pub async fn run(self) {
        match self {
            Stream::Mqtt(s) => s.run().await,
            Stream::Http(s) => s.run().await,
            Stream::Azure(s) => s.run().await,
            Stream::Lines(s) => s.run().await,
            Stream::WebSocket(s) => s.run().await,
            Stream::Smtp(s) => s.run().await,
        }
    }
}
