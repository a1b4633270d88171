//! Logging: the subscriber set up once by the binary, and [`LogLimiter`], which keeps a log line
//! that input can trigger (a forged frame, a misconfigured device) from flooding the journal.

use std::time::{Duration, Instant};

/// Set up logging to stderr with `level` (a tracing filter); `RUST_LOG` overrides it.
pub fn init(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Warn at most `burst` times per `period` per kind, then count silently.
pub(crate) struct LogLimiter {
    period: Duration,
    burst: u32,
    window_start: Instant,
    used: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new() -> Self {
        LogLimiter {
            period: Duration::from_secs(10),
            burst: 10,
            window_start: Instant::now(),
            used: 0,
            suppressed: 0,
        }
    }

    /// True when this warning may be logged now.
    pub fn allow(&mut self) -> bool {
        if self.window_start.elapsed() >= self.period {
            if self.suppressed > 0 {
                tracing::warn!(
                    suppressed = self.suppressed,
                    "similar warnings suppressed in the last period (see /metrics)"
                );
            }
            self.window_start = Instant::now();
            self.used = 0;
            self.suppressed = 0;
        }
        if self.used < self.burst {
            self.used += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}
