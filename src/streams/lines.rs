//! Line streams: one message per line, in the stream's format, to stdout (`kind = "stdout"`,
//! used by the demo) or appended to a file (`kind = "file"`). JSON and XML messages are one
//! line each; a template's output is written as rendered, with a newline added unless it ends
//! with one. A record is acknowledged after the line is written and flushed (stdout) or fsynced
//! (file), a batch at a time.

use super::connect::{self, Retry, Session, SessionEnd};
use super::format::{render_or_drop, Delivery, Formatter};
use super::StreamContext;
use crate::model::{now_us, DownlinkEvent};
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

enum Sink {
    Stdout,
    File(PathBuf),
}

pub(crate) struct LineStream {
    ctx: StreamContext,
    sink: Sink,
    /// Downlink events are written as lines too (in the stream's format).
    events: mpsc::Receiver<DownlinkEvent>,
}

impl LineStream {
    /// `check --online`: the file can be opened for appending (created if missing, as the
    /// daemon would).
    pub fn probe(&self) -> std::io::Result<String> {
        match &self.sink {
            Sink::Stdout => Ok("stdout (nothing to connect)".into()),
            Sink::File(p) => {
                std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(p)?;
                Ok(format!("{} can be appended to", p.display()))
            }
        }
    }
}

impl LineStream {
    pub fn stdout(ctx: StreamContext, events: mpsc::Receiver<DownlinkEvent>) -> Self {
        LineStream {
            ctx,
            sink: Sink::Stdout,
            events,
        }
    }

    pub fn file(ctx: StreamContext, path: PathBuf, events: mpsc::Receiver<DownlinkEvent>) -> Self {
        LineStream {
            ctx,
            sink: Sink::File(path),
            events,
        }
    }

    pub async fn run(mut self) {
        let ctx = self.ctx.clone();
        let retry = Retry::new(Duration::from_millis(200), Duration::from_secs(30));
        connect::run(&mut self, &ctx, retry).await;
    }

    async fn write(&mut self) -> std::io::Result<()> {
        let name = self.ctx.name.clone();
        let mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = match &self.sink {
            Sink::Stdout => Box::new(tokio::io::stdout()),
            Sink::File(p) => Box::new(
                tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .await?,
            ),
        };
        self.ctx.metrics.stream_connected(&name, true);
        loop {
            let batch = self
                .ctx
                .queue
                .read_after(None, 512)
                .map_err(std::io::Error::other)?;
            if batch.is_empty() {
                // Stop only when idle, so a stop request drains what is already queued
                // (records and downlink events: `biased` checks them before the stop).
                tokio::select! {
                    biased;
                    Some(e) = self.events.recv() => {
                        if let Some(body) = self.ctx.format.event_body(&e) {
                            out.write_all(&Formatter::line(body)).await?;
                            out.flush().await?;
                        }
                        continue;
                    }
                    _ = self.ctx.queue.appended() => continue,
                    _ = self.ctx.cancel.cancelled() => return Ok(()),
                }
            }
            let d = Delivery { now_us: now_us() };
            let mut buf = Vec::with_capacity(batch.len() * 512);
            let mut written = Vec::with_capacity(batch.len());
            for (seq, r) in &batch {
                // A record the format cannot make is dropped from the queue there.
                if let Some(body) = render_or_drop(&self.ctx, *seq, r, d) {
                    buf.extend_from_slice(&Formatter::line(body));
                    written.push(*seq);
                }
            }
            out.write_all(&buf).await?;
            out.flush().await?;
            if let Sink::File(p) = &self.sink {
                // fsync through a second handle: tokio's file handle offers no sync_data on the
                // boxed writer.
                let p = p.clone();
                tokio::task::spawn_blocking(move || std::fs::File::open(p)?.sync_data())
                    .await
                    .map_err(std::io::Error::other)??;
            }
            self.ctx
                .metrics
                .stream_published(&name, written.len() as u64);
            for seq in written {
                self.ctx.queue.ack(seq).map_err(std::io::Error::other)?;
            }
        }
    }
}

impl Session for LineStream {
    const WHAT: &'static str = "writing lines";

    fn server(&self) -> String {
        match &self.sink {
            Sink::Stdout => "stdout".into(),
            Sink::File(p) => p.display().to_string(),
        }
    }

    async fn session(&mut self) -> SessionEnd {
        match self.write().await {
            Ok(()) => SessionEnd::Stopped,
            Err(e) => SessionEnd::failed(e),
        }
    }
}
