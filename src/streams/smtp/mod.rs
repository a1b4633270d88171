//! The e-mail stream (`kind = "smtp"`): records — alerts above all (`alerts_only`, the
//! default, queues nothing else for it) — go out as e-mails by SMTP submission, subject and
//! body from templates, several records per e-mail, at most `max_per_hour` e-mails an hour.
//!
//! Guarantees (README "Alerts by e-mail"):
//! - **At least once, in order.** Records are read through the catch-up lanes
//!   ([`super::lanes`]); one e-mail is in flight at a time, its parts in queue order. A 2xx for
//!   the e-mail acknowledges every record in it (`queue.ack`). A copy sent twice (the reply lost
//!   with the connection, a stop mid-send) has the same `Message-ID` when it holds the same
//!   records.
//! - **Batching.** After the first record arrives the stream waits up to `batch_wait` for more,
//!   up to `batch_max` per e-mail; the subject comes from the first (with "(+N more)").
//! - **Rate limit.** At most `max_per_hour` e-mails accepted by the server in any hour (a
//!   sliding window, kept in memory: a restart starts it over). Records beyond it are not
//!   dropped: they wait in the durable queue, and go out — batched, so a backlog takes few
//!   e-mails — when the window allows; each time the limit is reached a warning says so and
//!   `lorastream_stream_rate_limited_total{stream}` counts it.
//! - **Answers** (RFC 5321 §4.2.1): a 4xx for the e-mail (`smtp_deferred`) or a failure to
//!   connect, secure or log in (`smtp_connect`, `smtp_auth`) ends the session: the one
//!   reconnect loop ([`super::connect`]) backs off (1 s to 60 s, jitter) and the next session
//!   reads the queue from its oldest record. A 5xx for the e-mail (`smtp_refused`) removes its
//!   records as dead letters (`lorastream_queue_dropped_total{reason="dead_letter"}`) with a warning,
//!   and the records behind them go on. 421 and 530 are about the connection or the login, not
//!   the e-mail: retried. A 552 (too large) halves the records per e-mail; one record alone
//!   refused with 552 is dropped as `too_large` ([`super::too_large`]).
//! - **Reachability.** A session starting without a known-good server connects and logs in
//!   once (then QUIT) before it waits for records, so `lorastream_stream_connected` (and a
//!   `stream_down` alert) tells a broken mail server or password from a quiet stream.
//! - **Secrets**: the password is only sent inside TLS (config refuses it with `tls = "none"`)
//!   and never logged.
//!
//! Files: this one (the stream), `mail.rs` (subject and body), `client.rs` (one SMTP exchange),
//! `template.rs` (the `{{ path }}` templates).

mod client;
mod mail;
pub(crate) mod template;

use super::connect::{self, Retry, Session, SessionEnd};
use super::error::{SessionError, SetupError};
use super::format::{render_or_drop, Delivery};
use super::lanes::Lanes;
use super::StreamContext;
use crate::config::SmtpConfig;
use crate::model::{now_us, DownlinkEvent, Record};
use crate::store::DropReason;
use client::{Client, Failure};
use lettre::message::header::{ContentType, Header, HeaderName, HeaderValue};
use lettre::message::Mailbox;
use lettre::Message;
use mail::Part;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How long a stop waits for an e-mail being sent.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// The rate limit's window.
const HOUR: Duration = Duration::from_secs(3600);

/// `max_per_hour` as a sliding window: when the last e-mails were accepted (at most
/// `max` entries).
#[derive(Debug)]
struct Rate {
    max: usize,
    sent: VecDeque<Instant>,
}

impl Rate {
    fn new(max: u32) -> Rate {
        Rate {
            max: max.max(1) as usize,
            sent: VecDeque::new(),
        }
    }

    /// When the next e-mail may go, if not now.
    fn blocked_until(&mut self, now: Instant) -> Option<Instant> {
        while self.sent.front().is_some_and(|t| *t + HOUR <= now) {
            self.sent.pop_front();
        }
        if self.sent.len() < self.max {
            return None;
        }
        self.sent.front().map(|t| *t + HOUR)
    }

    fn sent(&mut self, now: Instant) {
        if self.sent.len() >= self.max {
            self.sent.pop_front();
        }
        self.sent.push_back(now);
    }
}

/// `Auto-Submitted: auto-generated` (RFC 3834 §5): automatic mail, not to be auto-replied to.
#[derive(Debug, Clone)]
struct AutoSubmitted;

impl Header for AutoSubmitted {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("Auto-Submitted")
    }
    fn parse(_: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(AutoSubmitted)
    }
    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), "auto-generated".into())
    }
}

pub(crate) struct SmtpStream {
    ctx: StreamContext,
    client: Client,
    /// `smtp://host:port` for log lines (no credentials).
    shown: String,
    from: Mailbox,
    to: Vec<Mailbox>,
    /// The right-hand side of Message-IDs (the sender's domain).
    domain: String,
    subject: String,
    body: Option<String>,
    batch_max: usize,
    batch_wait: Duration,
    max_per_hour: u32,
    rate: Rate,
    /// An e-mail stream takes no downlinks, so it has no downlink events; kept open so the
    /// scheduler's sender stays valid.
    _events: mpsc::Receiver<DownlinkEvent>,
}

impl SmtpStream {
    /// `check --online`: the connection, TLS and login the stream uses; nothing is sent.
    pub async fn probe(&self) -> Result<String, SessionError> {
        self.client.probe().await?;
        Ok("the SMTP server accepted the connection, TLS and login (no e-mail sent)".into())
    }
}

impl SmtpStream {
    pub fn new(
        cfg: &SmtpConfig,
        ctx: StreamContext,
        events: mpsc::Receiver<DownlinkEvent>,
    ) -> Result<Self, SetupError> {
        let mailbox = |what: &'static str, a: &str| {
            a.parse::<Mailbox>().map_err(|e| SetupError::Key {
                what,
                reason: format!("{a:?} is not an e-mail address: {e}"),
            })
        };
        let from = mailbox("from", &cfg.from)?;
        let to = cfg
            .to
            .iter()
            .map(|a| mailbox("to", a))
            .collect::<Result<Vec<_>, _>>()?;
        let scheme = if cfg.tls == crate::config::SmtpTls::Implicit {
            "smtps"
        } else {
            "smtp"
        };
        Ok(SmtpStream {
            client: Client::new(cfg)?,
            shown: format!("{scheme}://{}:{}", cfg.host, cfg.port),
            domain: from.email.domain().to_string(),
            from,
            to,
            subject: cfg.subject.clone(),
            body: cfg.body.clone(),
            batch_max: cfg.batch_max.max(1),
            batch_wait: cfg.batch_wait,
            max_per_hour: cfg.max_per_hour,
            rate: Rate::new(cfg.max_per_hour),
            _events: events,
            ctx,
        })
    }

    pub async fn run(mut self) {
        let ctx = self.ctx.clone();
        tracing::info!(stream = %ctx.name, server = %self.shown, batch_max = self.batch_max,
            max_per_hour = self.max_per_hour, backlog = ctx.queue.len(), "e-mail stream started");
        connect::run(&mut self, &ctx, Retry::connection()).await;
        ctx.metrics.stream_connected(&ctx.name, false);
    }

    /// Count a session's failure by reason.
    fn count(&self, e: &SessionError) {
        let reason = match e {
            SessionError::SmtpAuth { .. } => "smtp_auth",
            SessionError::SmtpDeferred { .. } => "smtp_deferred",
            _ => "smtp_connect",
        };
        self.ctx.metrics.stream_error(&self.ctx.name, reason);
    }

    fn failed(&self, e: SessionError) -> SessionEnd {
        self.count(&e);
        SessionEnd::failed(e)
    }

    /// One delivery session: e-mails from the queue (through the catch-up lanes, from its
    /// oldest record) until a failure or the stop.
    async fn deliver(&mut self) -> SessionEnd {
        let name = self.ctx.name.clone();
        if !self.ctx.metrics.is_stream_connected(&name) {
            let probe = tokio::select! {
                _ = self.ctx.cancel.cancelled() => return SessionEnd::Stopped,
                r = self.client.probe() => r,
            };
            if let Err(e) = probe {
                return self.failed(e);
            }
            self.ctx.metrics.stream_connected(&name, true);
            tracing::info!(stream = %name, server = %self.shown, "SMTP server reachable (login accepted)");
        }
        let mut lanes = Lanes::new(&self.ctx.queue);
        let mut pending: VecDeque<(u64, Record)> = VecDeque::new();
        let mut limited = false;
        // Records per e-mail: batch_max, halved after a 552 (too large) until one is sent.
        let mut limit = self.batch_max;
        loop {
            if self.ctx.cancel.is_cancelled() {
                return SessionEnd::Stopped;
            }
            if pending.is_empty() {
                limit = self.batch_max;
                if !self.fill(&mut lanes, &mut pending).await {
                    return SessionEnd::Stopped;
                }
            }
            if let Some(until) = self.rate.blocked_until(Instant::now()) {
                if !limited {
                    limited = true;
                    self.ctx.metrics.stream_rate_limited(&name);
                    tracing::warn!(stream = %name, max_per_hour = self.max_per_hour,
                        waiting = self.ctx.queue.len(),
                        next_in_s = until.saturating_duration_since(Instant::now()).as_secs(),
                        "max_per_hour reached: records wait in the queue (not dropped) and go out, batched, when the hour allows (lorastream_stream_rate_limited_total)");
                }
                tokio::select! {
                    _ = self.ctx.cancel.cancelled() => return SessionEnd::Stopped,
                    _ = tokio::time::sleep_until(until) => {}
                }
                continue;
            }
            limited = false;
            // What arrived meanwhile (a rate-limit wait, a dead-lettered e-mail) joins this one.
            self.read(&mut lanes, &mut pending);
            let n = pending.len().min(limit);
            let Some(parts) = self.parts(&mut pending, n) else {
                continue;
            };
            let (envelope, bytes) = match self.message(&parts) {
                Ok(m) => m,
                Err(e) => {
                    // Only an address lettre cannot put in a header could do this, for every
                    // e-mail alike; say so and keep the records rather than drop them.
                    return self
                        .failed(SessionError::Smtp(format!("cannot build the e-mail: {e}")));
                }
            };
            self.ctx.metrics.stream_published(&name, n as u64);
            let cancel = self.ctx.cancel.clone();
            let sent = tokio::select! {
                r = self.client.send(&envelope, &bytes) => r,
                _ = async { cancel.cancelled().await; tokio::time::sleep(STOP_GRACE).await } => {
                    return SessionEnd::Stopped;
                }
            };
            match sent {
                Ok(()) => {
                    self.rate.sent(Instant::now());
                    for (seq, _) in pending.drain(..n) {
                        if let Err(e) = self.ctx.queue.ack(seq) {
                            self.ctx.metrics.stream_error(&name, "queue_ack");
                            tracing::error!(stream = %name, seq, error = %e, "cannot remove a delivered record from the queue; it will be sent again");
                        }
                    }
                    self.ctx.metrics.stream_connected(&name, true);
                    tracing::info!(stream = %name, records = n, to = self.to.len(), "e-mail sent");
                }
                // 552: too large for the server (RFC 5321 §4.2.3; with SIZE, RFC 1870 §6).
                Err(Failure::Refused { code: 552, text }) if n > 1 => {
                    limit = n.div_ceil(2);
                    self.ctx.metrics.stream_connected(&name, true);
                    tracing::warn!(stream = %name, records = n, retry_with = limit, server_said = %text,
                        "the SMTP server refused the e-mail as too large (552); sending fewer records per e-mail (lower batch_max to avoid this)");
                }
                Err(Failure::Refused { code: 552, text }) => {
                    // One record alone is too large for the server: it never will be taken.
                    self.ctx.metrics.stream_connected(&name, true);
                    if let Some((seq, r)) = pending.pop_front() {
                        super::too_large::drop_record(
                            &self.ctx,
                            seq,
                            &r,
                            bytes.len(),
                            None,
                            &format!("the SMTP server (552: {text})"),
                        );
                    }
                }
                Err(Failure::Refused { code, text }) => {
                    self.dead_letter(&mut pending, n, code, &text)
                }
                Err(Failure::Deferred { code, text }) => {
                    return self.failed(SessionError::SmtpDeferred { code, text })
                }
                Err(Failure::Connection(e)) => return self.failed(e),
            }
        }
    }

    /// The parts of the first `n` pending records; None when the stream's format removed some
    /// of them (already out of the queue; make the e-mail again).
    fn parts(&self, pending: &mut VecDeque<(u64, Record)>, n: usize) -> Option<Vec<Part>> {
        let d = Delivery { now_us: now_us() };
        let mut parts = Vec::with_capacity(n);
        let mut gone = Vec::new();
        for (i, (seq, r)) in pending.iter().take(n).enumerate() {
            // Without a body template a non-alert record is shown in the stream's format.
            let formatted = if self.body.is_none() && !matches!(r, Record::Alert(_)) {
                match render_or_drop(&self.ctx, *seq, r, d) {
                    Some(b) => Some(String::from_utf8_lossy(&b).into_owned()),
                    None => {
                        gone.push(i);
                        continue;
                    }
                }
            } else {
                None
            };
            parts.push(Part {
                context: serde_json::from_slice(&self.ctx.format.tts_json(r, d))
                    .unwrap_or_default(),
                formatted,
                correlation_id: r.correlation_id(),
            });
        }
        if gone.is_empty() {
            return Some(parts);
        }
        for i in gone.into_iter().rev() {
            pending.remove(i);
        }
        None
    }

    /// The e-mail of `parts`: its envelope and bytes.
    fn message(
        &self,
        parts: &[Part],
    ) -> Result<(lettre::address::Envelope, Vec<u8>), lettre::error::Error> {
        let (subject, text) = mail::compose(&self.subject, self.body.as_deref(), parts);
        let mut b = Message::builder()
            .from(self.from.clone())
            .subject(subject)
            .message_id(Some(mail::message_id(parts, &self.domain)))
            .header(ContentType::TEXT_PLAIN)
            .header(AutoSubmitted);
        for t in &self.to {
            b = b.to(t.clone());
        }
        let m = b.body(text)?;
        Ok((m.envelope().clone(), m.formatted()))
    }

    /// A 5xx for the e-mail of the first `n` pending records: they leave the queue as dead
    /// letters, and the records behind them go on.
    fn dead_letter(
        &mut self,
        pending: &mut VecDeque<(u64, Record)>,
        n: usize,
        code: u16,
        text: &str,
    ) {
        let name = &self.ctx.name;
        // The server is there and answering; it only refuses this e-mail.
        self.ctx.metrics.stream_connected(name, true);
        self.ctx.metrics.stream_error(name, "smtp_refused");
        let dropped: Vec<(u64, Record)> = pending.drain(..n).collect();
        for (seq, _) in &dropped {
            if let Err(e) = self
                .ctx
                .queue
                .drop_undeliverable(*seq, DropReason::DeadLetter)
            {
                self.ctx.metrics.stream_error(name, "queue_ack");
                tracing::error!(stream = %name, seq, error = %e, "cannot remove a refused record from the queue");
            }
        }
        let cid =
            |r: Option<&(u64, Record)>| r.map(|(_, r)| r.correlation_id()).unwrap_or_default();
        // Data leaves the gateway here: every refused e-mail gets its own line.
        tracing::warn!(stream = %name, code, server_said = %text, records = n,
            first = %cid(dropped.first()), last = %cid(dropped.last()),
            "the SMTP server refused the e-mail for good (5xx); its records are dropped as dead letters (lorastream_queue_dropped_total{{reason=\"dead_letter\"}})");
    }

    /// Wait for records, then up to `batch_wait` for the e-mail to fill. False when stopped.
    async fn fill(&mut self, lanes: &mut Lanes, pending: &mut VecDeque<(u64, Record)>) -> bool {
        let queue = self.ctx.queue.clone();
        loop {
            self.read(lanes, pending);
            if !pending.is_empty() {
                break;
            }
            tokio::select! {
                _ = self.ctx.cancel.cancelled() => return false,
                _ = queue.appended() => {}
            }
        }
        if pending.len() < self.batch_max && !self.batch_wait.is_zero() {
            let deadline = Instant::now() + self.batch_wait;
            while pending.len() < self.batch_max {
                tokio::select! {
                    _ = self.ctx.cancel.cancelled() => return false,
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = queue.appended() => self.read(lanes, pending),
                }
            }
        }
        true
    }

    /// Read up to `batch_max - pending.len()` more records.
    fn read(&mut self, lanes: &mut Lanes, pending: &mut VecDeque<(u64, Record)>) {
        lanes.top_up(&self.ctx, pending, self.batch_max);
    }
}

impl Session for SmtpStream {
    const WHAT: &'static str = "SMTP delivery";

    fn server(&self) -> String {
        self.shown.clone()
    }

    async fn session(&mut self) -> SessionEnd {
        self.deliver().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_window_slides() {
        let t0 = Instant::now();
        let mut r = Rate::new(2);
        assert_eq!(r.blocked_until(t0), None);
        r.sent(t0);
        r.sent(t0 + Duration::from_secs(10));
        assert_eq!(
            r.blocked_until(t0 + Duration::from_secs(20)),
            Some(t0 + HOUR)
        );
        // One hour after the first, one more may go; the window never holds more than max.
        assert_eq!(r.blocked_until(t0 + HOUR), None);
        r.sent(t0 + HOUR);
        assert_eq!(
            r.blocked_until(t0 + HOUR),
            Some(t0 + Duration::from_secs(10) + HOUR)
        );
        assert!(r.sent.len() <= 2);
    }
}
