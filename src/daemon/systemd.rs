//! The daemon's side of systemd's service protocol (sd_notify(3), through the `sd-notify`
//! crate): `READY=1` once the UDP socket is bound, the store is open and every stream's task
//! runs (not once a broker answered: a cloud that is down at boot must not fail the start);
//! `RELOADING=1` / `READY=1` around a SIGHUP; `STOPPING=1` when a stop begins; and `WATCHDOG=1`
//! keep-alives, sent only while every watched loop beats ([`crate::liveness`]).
//!
//! Keep-alive timing, with `W` = `WatchdogSec=` (systemd passes it as `WATCHDOG_USEC`): the
//! supervisor looks every `W/4`, idle loops wake every `W/4` to beat, and a loop that has not
//! beaten for `W/2` is stuck. From then on no keep-alive goes out, so systemd kills and
//! restarts the service about `W` later, unless the loop recovers before that (a slow disk
//! that comes back). `systemd/lorastream.service` sets `W` = 30 s.
//!
//! Outside systemd (no `NOTIFY_SOCKET`) all of this is off and costs nothing.

use crate::liveness::Liveness;
use sd_notify::NotifyState;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What the daemon tells its service manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice<'a> {
    /// Started (or reloaded); the text is shown by `systemctl status`.
    Ready(&'a str),
    Reloading,
    Stopping,
    /// Every watched loop is alive.
    Watchdog,
}

#[derive(Clone, Default)]
enum Sink {
    #[default]
    None,
    Systemd,
    /// In-process tests: the datagrams as they would be sent.
    #[cfg(test)]
    Channel(tokio::sync::mpsc::UnboundedSender<String>),
}

/// The connection to the service manager: systemd when the daemon was started by it (found in
/// the environment once, by the command line), nothing otherwise.
#[derive(Clone, Default)]
pub struct ServiceManager {
    sink: Sink,
    watchdog: Option<Duration>,
    /// One warning when notifying fails, not one per keep-alive.
    warned: Arc<AtomicBool>,
}

impl ServiceManager {
    /// No service manager (tests, `demo`).
    pub fn none() -> ServiceManager {
        ServiceManager::default()
    }

    /// systemd if `NOTIFY_SOCKET` is set; the watchdog if `WATCHDOG_USEC` is set (and
    /// `WATCHDOG_PID`, when set, is this process). Reads the environment, never changes it.
    pub fn from_env() -> ServiceManager {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return ServiceManager::none();
        }
        ServiceManager {
            sink: Sink::Systemd,
            watchdog: sd_notify::watchdog_enabled().filter(|w| !w.is_zero()),
            warned: Arc::default(),
        }
    }

    /// `WatchdogSec=`, if systemd watches this process.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    pub fn is_systemd(&self) -> bool {
        !matches!(self.sink, Sink::None)
    }

    /// Send `notice` (a no-op without a service manager).
    pub fn notify(&self, notice: Notice<'_>) {
        let mono;
        let states: Vec<NotifyState<'_>> = match notice {
            Notice::Ready(status) => vec![NotifyState::Ready, NotifyState::Status(status)],
            Notice::Reloading => {
                // systemd 253+ wants the monotonic time with RELOADING=1 (sd_notify(3)).
                mono = NotifyState::monotonic_usec_now().ok();
                let mut v = vec![NotifyState::Reloading];
                v.extend(mono);
                v
            }
            Notice::Stopping => vec![NotifyState::Stopping],
            Notice::Watchdog => vec![NotifyState::Watchdog],
        };
        let result = match &self.sink {
            Sink::None => Ok(()),
            Sink::Systemd => sd_notify::notify(&states),
            #[cfg(test)]
            Sink::Channel(tx) => {
                let text: String = states.iter().map(|s| format!("{s}\n")).collect();
                let _ = tx.send(text);
                Ok(())
            }
        };
        if let Err(e) = result {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET); readiness and watchdog keep-alives are not reaching it");
            }
        }
    }

    /// The watched loops' heartbeats: idle loops wake every `W/4` when the watchdog is on.
    pub(crate) fn liveness(&self) -> Liveness {
        Liveness::new(self.watchdog.map(|w| w / 4))
    }

    #[cfg(test)]
    fn channel(
        watchdog: Duration,
    ) -> (ServiceManager, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let sm = ServiceManager {
            sink: Sink::Channel(tx),
            watchdog: Some(watchdog),
            warned: Arc::default(),
        };
        (sm, rx)
    }
}

/// Send `WATCHDOG=1` every `W/4` while no loop of `liveness` is stuck (see the module
/// documentation); log once when one is, and once when all run again. Ends on `cancel`.
pub(crate) async fn supervise(sm: ServiceManager, liveness: Liveness, cancel: CancellationToken) {
    let Some(w) = sm.watchdog() else {
        return;
    };
    let period = (w / 4).max(Duration::from_millis(10));
    let limit = w / 2;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stuck = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let stale = liveness.stale(limit);
        match stale.first() {
            None => {
                sm.notify(Notice::Watchdog);
                if stuck {
                    stuck = false;
                    tracing::warn!(
                        "watchdog: every loop runs again; keep-alives to systemd resumed"
                    );
                }
            }
            Some((name, age)) if !stuck => {
                stuck = true;
                let others: Vec<&str> = stale.iter().skip(1).map(|(n, _)| *n).collect();
                tracing::error!(
                    stuck_for = %humantime::format_duration(Duration::from_millis(age.as_millis() as u64)),
                    also_stuck = %if others.is_empty() { "none".to_string() } else { others.join(", ") },
                    "watchdog: the {name} loop is not running; keep-alives to systemd stopped, so systemd restarts lorastream within WatchdogSec={}s unless it recovers",
                    w.as_secs()
                );
            }
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With paused time: keep-alives flow while both loops beat, stop as soon as one stops,
    /// and resume when it beats again.
    #[tokio::test(start_paused = true)]
    async fn keep_alives_only_while_every_loop_beats() {
        let w = Duration::from_secs(8);
        let (sm, mut rx) = ServiceManager::channel(w);
        let liveness = sm.liveness();
        let mut busy = liveness.heartbeat("busy loop");
        let stopped = liveness.heartbeat("stopped loop");
        let cancel = CancellationToken::new();
        let sup = tokio::spawn(supervise(sm.clone(), liveness.clone(), cancel.clone()));
        let beater = tokio::spawn(async move {
            loop {
                busy.beat();
                busy.tick().await;
            }
        });
        let count = |rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>| {
            let mut n = 0;
            while let Ok(m) = rx.try_recv() {
                assert_eq!(m, "WATCHDOG=1\n");
                n += 1;
            }
            n
        };
        // 0..W/2: both fresh; keep-alives every W/4 (at 0 and 2 s, maybe 4 s).
        tokio::time::sleep(Duration::from_millis(3_900)).await;
        assert!(count(&mut rx) >= 2);
        // "stopped loop" never beat after its start: stale from W/2 on, no keep-alive after.
        tokio::time::sleep(Duration::from_secs(20)).await;
        let late = count(&mut rx);
        assert!(late <= 1, "{late} keep-alives after a loop stopped");
        assert_eq!(liveness.stale(w / 2)[0].0, "stopped loop");
        // The loop recovers: keep-alives resume.
        stopped.beat();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(count(&mut rx) >= 1);
        cancel.cancel();
        sup.await.unwrap();
        beater.abort();
    }

    #[test]
    fn ready_status_and_reloading_datagrams() {
        let (sm, mut rx) = ServiceManager::channel(Duration::from_secs(30));
        sm.notify(Notice::Ready("3 devices, 1 stream"));
        assert_eq!(
            rx.try_recv().unwrap(),
            "READY=1\nSTATUS=3 devices, 1 stream\n"
        );
        sm.notify(Notice::Reloading);
        let m = rx.try_recv().unwrap();
        assert!(m.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{m}");
        sm.notify(Notice::Stopping);
        assert_eq!(rx.try_recv().unwrap(), "STOPPING=1\n");
        assert!(!ServiceManager::none().is_systemd());
    }
}
