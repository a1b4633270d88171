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

/// The watchdog supervisor: every `W/4` it sends `WATCHDOG=1` if no loop of `liveness` is stuck
/// (see the module documentation), and logs once when one is, and once when all run again.
///
/// It runs on a thread of its own, not as a task: when the loops are stuck because the async
/// runtime is (every worker blocked behind a frozen disk, as tests/service.rs shows), a task
/// could not even say which loop stopped.
pub(crate) struct Supervisor {
    sm: ServiceManager,
    liveness: Liveness,
    limit: Duration,
    stuck: bool,
}

/// Stops the supervisor's thread when dropped or [`SupervisorThread::stop`]ped.
pub(crate) struct SupervisorThread {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Supervisor {
    pub(crate) fn new(sm: ServiceManager, liveness: Liveness) -> Supervisor {
        let limit = sm.watchdog().unwrap_or_default() / 2;
        Supervisor {
            sm,
            liveness,
            limit,
            stuck: false,
        }
    }

    /// Start the thread (nothing without a watchdog).
    pub(crate) fn spawn(self) -> SupervisorThread {
        let Some(w) = self.sm.watchdog() else {
            return SupervisorThread {
                stop: None,
                thread: None,
            };
        };
        let period = (w / 4).max(Duration::from_millis(10));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let mut sup = self;
        let thread = std::thread::Builder::new()
            .name("lorastream-watchdog".into())
            .spawn(move || loop {
                sup.check();
                match rx.recv_timeout(period) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
            });
        match thread {
            Ok(t) => SupervisorThread {
                stop: Some(tx),
                thread: Some(t),
            },
            Err(e) => {
                tracing::error!(error = %e, "cannot start the watchdog thread; systemd will restart lorastream when WatchdogSec passes");
                SupervisorThread {
                    stop: None,
                    thread: None,
                }
            }
        }
    }

    /// One round: keep-alive, or the first complaint about a stuck loop.
    pub(crate) fn check(&mut self) {
        let stale = self.liveness.stale(self.limit);
        match stale.first() {
            None => {
                self.sm.notify(Notice::Watchdog);
                if self.stuck {
                    self.stuck = false;
                    tracing::warn!(
                        "watchdog: every loop runs again; keep-alives to systemd resumed"
                    );
                }
            }
            Some((name, age)) if !self.stuck => {
                self.stuck = true;
                let others: Vec<&str> = stale.iter().skip(1).map(|(n, _)| *n).collect();
                tracing::error!(
                    stuck_for = %humantime::format_duration(Duration::from_millis(age.as_millis() as u64)),
                    also_stuck = %if others.is_empty() { "none".to_string() } else { others.join(", ") },
                    "watchdog: the {name} loop is not running; keep-alives to systemd stopped, so systemd restarts lorastream within WatchdogSec={}s unless it recovers",
                    (self.limit * 2).as_secs()
                );
            }
            Some(_) => {}
        }
    }
}

impl SupervisorThread {
    /// Stop the thread and wait for it (a stop in progress ends the loops on purpose).
    pub(crate) async fn stop(mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With paused time: keep-alives while both loops beat, none once one stops (one
    /// complaint), again when it beats again.
    #[tokio::test(start_paused = true)]
    async fn keep_alives_only_while_every_loop_beats() {
        let w = Duration::from_secs(8);
        let (sm, mut rx) = ServiceManager::channel(w);
        let liveness = sm.liveness();
        let busy = liveness.heartbeat("busy loop");
        let stopped = liveness.heartbeat("stopped loop");
        let mut sup = Supervisor::new(sm.clone(), liveness.clone());
        fn round(
            sup: &mut Supervisor,
            rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
        ) -> Option<String> {
            sup.check();
            rx.try_recv().ok()
        }
        // Both fresh (W/2 = 4 s is the limit).
        for _ in 0..2 {
            assert_eq!(round(&mut sup, &mut rx).as_deref(), Some("WATCHDOG=1\n"));
            tokio::time::advance(Duration::from_secs(2)).await;
            busy.beat();
        }
        // 4 s since "stopped loop" beat: still within the limit.
        assert_eq!(round(&mut sup, &mut rx).as_deref(), Some("WATCHDOG=1\n"));
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(2)).await;
            busy.beat();
            assert_eq!(
                round(&mut sup, &mut rx),
                None,
                "a keep-alive while a loop is stuck"
            );
        }
        assert!(sup.stuck);
        assert_eq!(liveness.stale(w / 2)[0].0, "stopped loop");
        // The loop recovers: keep-alives resume.
        stopped.beat();
        assert_eq!(round(&mut sup, &mut rx).as_deref(), Some("WATCHDOG=1\n"));
        assert!(!sup.stuck);
    }

    /// The thread sends keep-alives on its own and stops when told.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_supervisor_thread_sends_keep_alives_until_stopped() {
        let (sm, mut rx) = ServiceManager::channel(Duration::from_millis(400));
        let liveness = sm.liveness();
        let hb = liveness.heartbeat("loop");
        let beater = std::thread::spawn(move || {
            for _ in 0..40 {
                hb.beat();
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let t = Supervisor::new(sm, liveness).spawn();
        let first = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(first.unwrap().as_deref(), Some("WATCHDOG=1\n"));
        t.stop().await;
        while rx.try_recv().is_ok() {}
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(rx.try_recv().is_err(), "keep-alives after stop");
        beater.join().unwrap();
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
