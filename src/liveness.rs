//! Liveness of the daemon's main loops, for the systemd watchdog (`WatchdogSec=`).
//!
//! Each loop whose standstill would silently stop the data path (ingress, the uplink stage,
//! the downlink scheduler, the store's committer) holds a [`Heartbeat`] and calls
//! [`Heartbeat::beat`] every time it goes round. A loop that waits for input also wakes on
//! [`Heartbeat::tick`], so an idle loop still proves that it would run. Only the loop itself
//! can beat: a loop that is stuck (a blocked disk under the committer, a deadlock, a task that
//! panicked and ended) stops beating, the daemon's supervisor (`daemon::systemd`) then stops
//! sending `WATCHDOG=1`, and systemd restarts the service. Stream loops are not watched: they
//! wait on the network by design (a cloud that is down for a day is not a stuck daemon), and
//! `/health` reports them.
//!
//! Times are [`tokio::time::Instant`]s, so tests can run the supervisor on paused time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// A loop's name and its last beat (milliseconds since [`Liveness`]'s epoch).
type Beats = Vec<(&'static str, Arc<AtomicU64>)>;

/// The set of watched loops and their last beats.
#[derive(Clone)]
pub struct Liveness {
    loops: Arc<Mutex<Beats>>,
    epoch: Instant,
    tick: Option<Duration>,
}

impl Liveness {
    /// `tick`: how often an idle loop wakes to beat (`None`: no watchdog, idle loops sleep).
    pub fn new(tick: Option<Duration>) -> Liveness {
        Liveness {
            loops: Arc::new(Mutex::new(Vec::new())),
            epoch: Instant::now(),
            tick,
        }
    }

    /// Register a loop named `name` and hand it its heartbeat (beaten once already).
    pub fn heartbeat(&self, name: &'static str) -> Heartbeat {
        let last = Arc::new(AtomicU64::new(0));
        if let Ok(mut l) = self.loops.lock() {
            l.push((name, last.clone()));
        }
        let hb = Heartbeat {
            last,
            epoch: self.epoch,
            interval: self.tick.map(|t| {
                let mut i = tokio::time::interval_at(Instant::now() + t, t);
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                i
            }),
        };
        hb.beat();
        hb
    }

    /// The loops that have not beaten for longer than `limit`, with the time since their last
    /// beat, longest first.
    pub fn stale(&self, limit: Duration) -> Vec<(&'static str, Duration)> {
        let now = self.epoch.elapsed().as_millis() as u64;
        let mut out: Vec<(&'static str, Duration)> = match self.loops.lock() {
            Ok(l) => l
                .iter()
                .map(|(n, t)| {
                    let age = now.saturating_sub(t.load(Ordering::Relaxed));
                    (*n, Duration::from_millis(age))
                })
                .filter(|(_, age)| *age > limit)
                .collect(),
            Err(_) => vec![("liveness registry", Duration::ZERO)],
        };
        out.sort_by_key(|l| std::cmp::Reverse(l.1));
        out
    }
}

/// One loop's proof of life; see the module documentation.
pub struct Heartbeat {
    last: Arc<AtomicU64>,
    epoch: Instant,
    interval: Option<tokio::time::Interval>,
}

impl Heartbeat {
    /// A heartbeat nobody watches, for a stage run outside a daemon (tests, benchmarks).
    pub fn detached() -> Heartbeat {
        Liveness::new(None).heartbeat("detached")
    }

    /// The loop went round.
    pub fn beat(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves when an idle loop should wake to beat; never without a watchdog. Cancel-safe
    /// (for `select!`).
    pub async fn tick(&mut self) {
        match &mut self.interval {
            Some(i) => {
                i.tick().await;
            }
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_stops_beating_becomes_stale_and_ticks_wake_idle_loops() {
        let l = Liveness::new(Some(Duration::from_secs(1)));
        let mut a = l.heartbeat("a");
        let b = l.heartbeat("b");
        assert!(l.stale(Duration::from_millis(500)).is_empty());
        // `a` is idle but wakes on its tick and beats; `b` never goes round again.
        for _ in 0..3 {
            a.tick().await;
            a.beat();
        }
        let stale = l.stale(Duration::from_millis(1500));
        assert_eq!(stale.len(), 1, "{stale:?}");
        assert_eq!(stale[0].0, "b");
        assert_eq!(stale[0].1, Duration::from_secs(3));
        b.beat();
        assert!(l.stale(Duration::from_millis(500)).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_watchdog_idle_loops_are_not_woken() {
        let mut hb = Liveness::new(None).heartbeat("x");
        let woke = tokio::time::timeout(Duration::from_secs(3600), hb.tick()).await;
        assert!(woke.is_err());
    }
}
