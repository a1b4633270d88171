//! The one reconnect loop: every stream kind runs its sessions inside [`run`].
//!
//! A *session* is one connection (MQTT, IoT Hub, an open file) or, for HTTP, one run of
//! deliveries until a failure. When a session fails, [`run`] logs it readably (the first three
//! failures, then every tenth, so an outage of days stays readable), marks the stream
//! disconnected, waits with exponential backoff and full jitter ([`Backoff`]) — at least as long
//! as the destination asked (HTTP `Retry-After`) — and starts the next session, which re-reads
//! the queue from its oldest unacknowledged record. A session that lived
//! [`HEALTHY_SESSION`] counts as a success: the backoff starts over.
//!
//! Where one stream holds many connections (IoT Hub, one per device), each connection's retry
//! state is a [`Retry`], the same backoff and log rule without the loop.

use super::backoff::Backoff;
use super::error::SessionError;
use super::StreamContext;
use std::future::Future;
use std::time::{Duration, Instant};

/// A session that lived this long was a success: the backoff starts over.
pub(crate) const HEALTHY_SESSION: Duration = Duration::from_secs(30);

/// How a session ended.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    /// The stream was asked to stop.
    Stopped,
    /// Start the next session at once (e.g. an IoT Hub SAS token about to expire).
    Renew,
    /// Failed: back off (at least `retry_after`), then start the next session.
    Failed {
        error: SessionError,
        retry_after: Option<Duration>,
    },
}

impl SessionEnd {
    pub fn failed(error: impl Into<SessionError>) -> SessionEnd {
        SessionEnd::Failed {
            error: error.into(),
            retry_after: None,
        }
    }
}

/// A stream kind's sessions.
pub(crate) trait Session: Send {
    /// What a session is, for log lines ("MQTT connection", "HTTP delivery").
    const WHAT: &'static str;

    /// Where it connects, for log lines (no credentials).
    fn server(&self) -> String;

    /// One session, from its start to its end.
    fn session(&mut self) -> impl Future<Output = SessionEnd> + Send;

    /// What to check when a session failed like this.
    fn hint(&self, e: &SessionError) -> Option<&'static str> {
        e.hint()
    }
}

/// Backoff and failure counting for one connection.
#[derive(Debug)]
pub(crate) struct Retry {
    backoff: Backoff,
    failures: u64,
}

/// A failure as [`Retry::failed`] sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Failure {
    /// Wait this long before the next attempt.
    pub delay: Duration,
    /// Consecutive failures, this one included.
    pub count: u64,
    /// Log this one (the first three, then every tenth).
    pub log: bool,
}

impl Retry {
    pub fn new(base: Duration, cap: Duration) -> Retry {
        Retry {
            backoff: Backoff::new(base, cap),
            failures: 0,
        }
    }

    /// The defaults of connection-oriented streams: 1 s, doubling up to a minute.
    pub fn connection() -> Retry {
        Retry::new(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// Count a failure; `at_least` is a wait the destination asked for.
    pub fn failed(&mut self, at_least: Option<Duration>) -> Failure {
        self.failures += 1;
        Failure {
            delay: self.backoff.next_delay().max(at_least.unwrap_or_default()),
            count: self.failures,
            log: self.failures <= 3 || self.failures % 10 == 0,
        }
    }

    /// A success: the next failure starts the backoff over.
    pub fn reset(&mut self) {
        self.backoff.reset();
        self.failures = 0;
    }
}

/// Run `s`'s sessions until the stream is stopped.
pub(crate) async fn run<S: Session>(s: &mut S, ctx: &StreamContext, mut retry: Retry) {
    loop {
        if ctx.cancel.is_cancelled() {
            return;
        }
        let started = Instant::now();
        let end = s.session().await;
        ctx.metrics.stream_connected(&ctx.name, false);
        match end {
            SessionEnd::Stopped => return,
            SessionEnd::Renew => retry.reset(),
            SessionEnd::Failed { error, retry_after } => {
                if started.elapsed() >= HEALTHY_SESSION {
                    retry.reset();
                }
                let f = retry.failed(retry_after);
                if f.log {
                    tracing::warn!(
                        stream = %ctx.name,
                        server = %s.server(),
                        error = %error,
                        hint = s.hint(&error),
                        retry_in_ms = f.delay.as_millis() as u64,
                        failures = f.count,
                        "{} failed", S::WHAT
                    );
                }
                tokio::select! {
                    _ = ctx.cancel.cancelled() => return,
                    _ = tokio::time::sleep(f.delay) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_logged_first_three_then_every_tenth_and_reset() {
        let mut r = Retry::new(Duration::from_millis(10), Duration::from_millis(100));
        let logged: Vec<u64> = (0..30)
            .map(|_| r.failed(None))
            .filter(|f| f.log)
            .map(|f| f.count)
            .collect();
        assert_eq!(logged, vec![1, 2, 3, 10, 20, 30]);
        assert!(r.failed(Some(Duration::from_secs(5))).delay >= Duration::from_secs(5));
        r.reset();
        let f = r.failed(None);
        assert_eq!(f.count, 1);
        assert!(f.delay <= Duration::from_millis(10));
    }
}
