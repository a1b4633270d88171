//! The group committer and the store's disk health: each `flush_every_ms` window made durable
//! by a journal fsync, checkpoints into the engine, durable writes that cannot wait, and what
//! happens while the disk refuses writes (engine reopened, commits retried with a backoff,
//! memory held bounded). See the module docs of [`crate::store`] for the durability model.

use super::backend::{Backend, Batch};
use super::{
    Store, StoreError, StoreHealth, CHECKPOINT_BYTES, CHECKPOINT_EVERY, CHECKPOINT_JOURNAL_BYTES,
    DEVICES, JOURNAL_GEN, LAZY_COMMIT_EVERY, MAX_PENDING_DELETES, MEMORY_FALLBACK_BYTES, META,
};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The committer's view of the disk.
#[derive(Default)]
pub(super) struct Health {
    failed: Option<String>,
    retry_at: Option<Instant>,
    backoff: Duration,
    failures: u64,
    commits: u64,
    last_commit: Option<Instant>,
}

impl Store {
    /// Over the memory bound while the disk refuses writes: drop the oldest unsaved records.
    pub(super) fn shed_memory(&self) {
        let mut queues = self.all_queues().to_vec();
        queues.sort_by_key(|q| std::cmp::Reverse(q.unsaved_bytes()));
        for q in queues {
            if self.inner.shared.unsaved_bytes.load(Ordering::Relaxed) <= MEMORY_FALLBACK_BYTES {
                break;
            }
            q.shed_unsaved(MEMORY_FALLBACK_BYTES);
        }
    }

    /// A write failed; with `reschedule` (a commit or reopen), the next retry is backed off.
    pub(super) fn note_failure(&self, e: &str, reschedule: bool) {
        let mut h = self.inner.health.lock().unwrap_or_else(|p| p.into_inner());
        h.failures += 1;
        let first = h.failed.is_none();
        if reschedule || first {
            h.backoff = if first {
                Duration::from_millis(500)
            } else {
                (h.backoff * 2).min(Duration::from_secs(10))
            };
            h.retry_at = Some(Instant::now() + h.backoff);
        }
        h.failed = Some(e.to_string());
        self.inner.writable.store(false, Ordering::Relaxed);
        drop(h);
        // The committer retries (and sheds memory) every window while the disk fails.
        self.inner.shared.work_arrived();
        if first && self.log_state_change() {
            tracing::error!(error = %e, path = %self.inner.cfg.path.display(),
                "the store cannot write (disk full or failing); keeping new records in memory (at most {} MiB) and retrying",
                MEMORY_FALLBACK_BYTES >> 20);
        }
    }

    pub(super) fn note_success(&self) {
        let mut h = self.inner.health.lock().unwrap_or_else(|p| p.into_inner());
        h.commits += 1;
        h.last_commit = Some(Instant::now());
        if let Some(e) = h.failed.take() {
            let failures = h.failures;
            if self.log_state_change() {
                tracing::warn!(previous_error = %e, failures, "the store writes to disk again");
            }
        }
        h.retry_at = None;
        self.inner.writable.store(true, Ordering::Relaxed);
    }

    /// Changes between writable and failing are logged at most once per 10 s (a disk that is
    /// just full can flap: the engine's preallocated space takes a commit, a new journal page
    /// does not).
    fn log_state_change(&self) -> bool {
        let Ok(mut last) = self.inner.last_state_log.lock() else {
            return false;
        };
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(10)) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    /// Reopen the engine after an I/O error (both engines refuse all I/O after one).
    pub(super) fn reopen(&self) -> Result<(), StoreError> {
        let old = self
            .inner
            .shared
            .engine
            .write()
            .ok()
            .and_then(|mut e| e.take());
        if let Some(old) = old {
            // Readers hold the engine for microseconds; the files must be closed before they
            // are opened again (both engines lock them).
            let end = Instant::now() + Duration::from_secs(2);
            while Arc::strong_count(&old) > 1 && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(2));
            }
            drop(old);
        }
        let e = Backend::open(self.inner.cfg.backend, &self.inner.cfg)?;
        if let Ok(mut slot) = self.inner.shared.engine.write() {
            *slot = Some(Arc::new(e));
        }
        self.inner.needs_reopen.store(false, Ordering::Relaxed);
        tracing::info!(
            backend = self.inner.cfg.backend.name(),
            "store engine reopened"
        );
        Ok(())
    }

    /// Commit everything pending (records, deletes, session counters) in one atomic, fsynced
    /// commit. Blocking: call from a blocking thread. Ok(false) when there was nothing to do.
    pub(super) fn commit_blocking(&self) -> Result<bool, StoreError> {
        let _g = self
            .inner
            .commit_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let failed_before = !self.inner.writable.load(Ordering::Relaxed);
        if self.inner.needs_reopen.load(Ordering::Relaxed) || self.inner.shared.engine().is_none() {
            if let Err(e) = self.reopen() {
                self.note_failure(&format!("reopen: {e}"), true);
                return Err(e);
            }
        }
        let engine = self.engine()?;
        let queues = self.all_queues();
        let mut batch = Batch::default();
        let (gen, snaps, sessions) = {
            let mut j = self.journal();
            let Some(gen) = j.rotate() else {
                // The journal is writing into its reserve and no new one can be made: the
                // disk is still full, and the reserve must keep taking the journal.
                drop(j);
                self.note_failure(
                    "the disk is still full (the journal writes into its reserve)",
                    true,
                );
                return Err(StoreError::NoRoom);
            };
            self.inner.journal_dirty.store(false, Ordering::Relaxed);
            self.inner.journal_unsynced.store(false, Ordering::Relaxed);
            let snaps: Vec<_> = queues.iter().map(|q| q.snapshot()).collect();
            let sessions = self
                .inner
                .sessions
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default();
            (gen, snaps, sessions)
        };
        // Packing the records into blocks reads the blocks they join from the engine: done
        // after the journal's lock is let go, so appends do not wait for it.
        for (q, snap) in queues.iter().zip(&snaps) {
            if let Err(e) = q.write_snapshot(&engine, snap, &mut batch) {
                self.inner.needs_reopen.store(true, Ordering::Relaxed);
                self.note_failure(&e.to_string(), true);
                return Err(e);
            }
        }
        let mut in_order: Vec<_> = sessions.iter().collect();
        in_order.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (k, v) in in_order {
            batch.put(DEVICES, k, v);
        }
        if !batch.is_empty() {
            batch.put(META, JOURNAL_GEN, &gen.to_be_bytes());
        }
        if batch.is_empty() && !failed_before {
            // Everything journaled up to `gen` was acknowledged before it needed committing.
            self.journal_committed(gen);
            return Ok(false);
        }
        let t0 = Instant::now();
        let r = engine.commit(&batch, true);
        self.inner
            .commit_seconds
            .observe(t0.elapsed().as_secs_f64());
        tracing::debug!(
            ops = batch.len(),
            ms = t0.elapsed().as_secs_f64() * 1e3,
            ok = r.is_ok(),
            "store commit"
        );
        match r {
            Ok(()) => {
                for (q, s) in queues.iter().zip(snaps) {
                    q.committed(s);
                }
                if let Ok(mut s) = self.inner.sessions.lock() {
                    for (k, v) in &sessions {
                        if s.get(k) == Some(v) {
                            s.remove(k);
                        }
                    }
                }
                self.journal_committed(gen);
                self.note_success();
                Ok(true)
            }
            Err(e) => {
                // Both engines poison themselves after an I/O error: the next attempt (after
                // the backoff) reopens the engine first.
                self.inner.needs_reopen.store(true, Ordering::Relaxed);
                self.note_failure(&e.to_string(), true);
                Err(e)
            }
        }
    }

    /// The journal's generations up to `gen` are in the engine: their files go, without
    /// holding the journal's lock, and then a new reserve is made if none is there.
    fn journal_committed(&self, gen: u64) {
        let removal = self.journal().committed(gen);
        removal.run();
        let _ = self.journal().make_reserve();
    }

    /// fdatasync what the journal holds (on a blocking thread, without holding its lock).
    async fn sync_journal(&self) -> std::io::Result<()> {
        // Cleared under the journal lock before the fsync: a write after this point sets it again
        // and is synced by the next window.
        let handle = {
            let mut j = self.journal();
            self.inner.journal_unsynced.store(false, Ordering::Relaxed);
            j.sync_handle()
        };
        let r = match handle {
            Ok(Some(h)) => tokio::task::spawn_blocking(move || h.sync())
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e))),
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if r.is_err() {
            self.inner.journal_unsynced.store(true, Ordering::Relaxed);
        }
        r
    }

    /// Commit now, on a blocking thread.
    pub(super) async fn commit(&self) -> Result<bool, StoreError> {
        let s = self.clone();
        match tokio::task::spawn_blocking(move || s.commit_blocking()).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable),
        }
    }

    /// The group committer: makes each `flush_every_ms` window durable (journal fsync),
    /// checkpoints into the engine at [`CHECKPOINT_BYTES`] or [`CHECKPOINT_JOURNAL_BYTES`], at
    /// the latest every [`CHECKPOINT_EVERY`], and retries
    /// (with a backoff) while the disk refuses writes. Runs until `cancel`; the daemon then calls
    /// [`Store::flush`].
    ///
    /// Beats `heartbeat` every time round (the systemd watchdog, `crate::liveness`): a commit
    /// that hangs on a blocked disk stops the beats, and systemd restarts the daemon.
    pub async fn run_committer(
        self,
        cancel: tokio_util::sync::CancellationToken,
        mut heartbeat: crate::liveness::Heartbeat,
    ) {
        let tick = Duration::from_millis(match self.inner.cfg.flush_every_ms {
            0 => 100,
            n => n,
        });
        let mut last_lazy = Instant::now();
        let mut last_commit = Instant::now();
        // A fixed period (not a sleep after each commit), so the window stays `flush_every_ms`.
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // With group commits and nothing in the journal to fsync or to journal, the committer
        // sleeps without ticking (an idle gateway is not woken 10 times a second) until work
        // arrives (`Shared::work_arrived`: it then waits out one window, so a burst still
        // shares one fsync) or a checkpoint falls due.
        let mut idle_until: Option<Option<Instant>> = None;
        loop {
            heartbeat.beat();
            if let Some(due) = idle_until {
                let shared = &self.inner.shared;
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = heartbeat.tick() => continue,
                    _ = shared.committer_wake.notified() => {
                        idle_until = None;
                        interval.reset();
                        continue;
                    }
                    _ = self.inner.kick.notified() => {}
                    _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now).into()), if due.is_some() => {}
                }
                idle_until = None;
                shared.committer_idle.store(false, Ordering::SeqCst);
            } else {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    // A long `flush_every_ms` must not look like a stuck loop.
                    _ = heartbeat.tick() => continue,
                    _ = interval.tick() => {}
                    _ = self.inner.kick.notified() => {}
                }
            }
            // This window's acknowledgements into the journal (also while the disk fails): a
            // kill redelivers at most the last window's, not everything since the last
            // checkpoint. Without group commits every append commits the pending deletes too
            // (and the lazy commit the rest within LAZY_COMMIT_EVERY): nothing to journal.
            if self.inner.group_commit {
                self.write_acks();
            }
            let (retry_at, failed) = {
                let h = self.inner.health.lock().unwrap_or_else(|p| p.into_inner());
                (h.retry_at, h.failed.is_some())
            };
            if failed && retry_at.is_some_and(|t| Instant::now() < t) {
                continue;
            }
            let (mut puts, mut dels) = (0usize, 0usize);
            for q in self.all_queues().iter() {
                let (p, d) = q.pending();
                puts += p;
                dels += d;
            }
            let sessions = self.inner.sessions.lock().map(|s| s.len()).unwrap_or(0);
            // Records must be durable at the end of each window (the power-cut contract): an
            // fsync of the journal does that for about one page, an engine commit (checkpoint)
            // costs several, so the engine is committed with CHECKPOINT_BYTES of records
            // waiting (memory) or CHECKPOINT_JOURNAL_BYTES in the journal (its disk space and
            // the replay after a kill; acknowledged records stay in it until the checkpoint),
            // and otherwise at the latest CHECKPOINT_EVERY after the last one. A window in
            // which the journal was written ends with its fsync (records and frame counters);
            // deletes and journal clean-up wait for the checkpoint (docs/benchmarks.md).
            // Without a journal (`flush_every_ms = 0`) appends commit themselves and deletes
            // are committed every LAZY_COMMIT_EVERY.
            let journal_dirty = self.inner.journal_dirty.load(Ordering::Relaxed);
            let unsaved = self.inner.shared.unsaved_bytes.load(Ordering::Relaxed);
            let journal_bytes = self.journal().written();
            let lazy_due = last_lazy.elapsed() >= LAZY_COMMIT_EVERY;
            let checkpoint = if !self.inner.group_commit {
                failed || puts > 0 || sessions > 0 || (dels > 0 && lazy_due)
            } else {
                failed
                    || dels > MAX_PENDING_DELETES
                    || unsaved >= CHECKPOINT_BYTES
                    || journal_bytes >= CHECKPOINT_JOURNAL_BYTES
                    || ((puts > 0 || dels > 0 || sessions > 0 || journal_dirty)
                        && last_commit.elapsed() >= CHECKPOINT_EVERY)
            };
            if checkpoint {
                match self.commit().await {
                    Ok(_) => {
                        last_lazy = Instant::now();
                        last_commit = Instant::now();
                    }
                    Err(e) => tracing::debug!(error = %e, "store commit failed; will retry"),
                }
            } else if self.inner.journal_unsynced.load(Ordering::Relaxed) {
                match self.sync_journal().await {
                    Ok(()) => {}
                    // The records stay in memory; the next engine commit writes them.
                    Err(e) => self.note_failure(&format!("journal fsync: {e}"), false),
                }
            }
            if !self.inner.writable.load(Ordering::Relaxed) {
                self.shed_memory();
            }
            if self.inner.group_commit {
                idle_until = self.idle_until(last_commit);
            }
        }
    }

    /// Whether the committer can sleep without ticking, and until when (`Some(None)`: until
    /// work arrives; `Some(Some(t))`: at the latest until `t`, when a checkpoint falls due; see
    /// `run_committer`). Marks it idle first and then looks for work, so that work arriving
    /// meanwhile either is seen here or wakes it (`Shared::work_arrived`).
    fn idle_until(&self, last_commit: Instant) -> Option<Option<Instant>> {
        let shared = &self.inner.shared;
        shared.committer_idle.store(true, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        let failed = self
            .inner
            .health
            .lock()
            .map(|h| h.failed.is_some())
            .unwrap_or(true);
        let queues = self.all_queues();
        let busy = failed
            || !self.inner.writable.load(Ordering::Relaxed)
            || self.inner.journal_unsynced.load(Ordering::Relaxed)
            || queues.iter().any(|q| q.has_acked());
        if busy {
            shared.committer_idle.store(false, Ordering::SeqCst);
            return None;
        }
        let (mut puts, mut dels) = (0usize, 0usize);
        for q in queues.iter() {
            let (p, d) = q.pending();
            puts += p;
            dels += d;
        }
        let sessions = self.inner.sessions.lock().map(|s| s.len()).unwrap_or(0);
        let waiting = puts > 0
            || dels > 0
            || sessions > 0
            || self.inner.journal_dirty.load(Ordering::Relaxed);
        Some(waiting.then(|| last_commit + CHECKPOINT_EVERY))
    }

    /// Write `batch` at once, durably (session counters, downlinks: things that must be on disk
    /// before the daemon acts on them).
    pub(crate) async fn write_now(&self, batch: Batch) -> Result<(), StoreError> {
        if !batch.is_empty() {
            // A direct write of a devices key supersedes an uncommitted FCntUp for it.
            if let Ok(mut s) = self.inner.sessions.lock() {
                for (t, k, _) in batch.iter() {
                    if t == DEVICES {
                        s.remove(k);
                    }
                }
            }
        }
        let s = self.clone();
        let r = tokio::task::spawn_blocking(move || {
            let _g = s
                .inner
                .commit_lock
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if s.inner.needs_reopen.load(Ordering::Relaxed) || s.inner.shared.engine().is_none() {
                s.reopen()?;
            }
            s.engine()?.commit(&batch, true)
        })
        .await
        .unwrap_or(Err(StoreError::Unavailable));
        if let Err(e) = &r {
            self.inner.needs_reopen.store(true, Ordering::Relaxed);
            self.note_failure(&e.to_string(), true);
        }
        r
    }

    /// Write this window's acknowledgements to the journal (see the module docs of
    /// [`crate::store`]).
    pub(super) fn write_acks(&self) {
        let mut j = self.journal();
        let queues = self.all_queues();
        let taken: Vec<Vec<[u8; 8]>> = queues
            .iter()
            .map(|q| q.take_acked().iter().map(|s| s.to_be_bytes()).collect())
            .collect();
        let mut frame: Vec<super::journal::DeleteRef> = Vec::new();
        for (q, keys) in queues.iter().zip(&taken) {
            for k in keys {
                frame.push((q.table(), k.as_slice()));
            }
        }
        if let Err(e) = j.write_acks(&frame) {
            // Only costs redeliveries after a kill.
            tracing::debug!(error = %e, "cannot journal acknowledgements");
        }
    }

    /// Commit everything and fsync (graceful stop). What cannot be written stays in the
    /// journal for the next start; records held in memory only are lost with the process:
    /// counted `write_failed`, and kept in the ledger for the next start to report.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.write_acks();
        let r = self.commit().await.map(|_| ());
        if r.is_err() {
            let lost: u64 = self.all_queues().iter().map(|q| q.shed_memory_only()).sum();
            self.inner.shared.write_ledger(lost);
            if lost > 0 {
                tracing::error!(records = lost, "stopping with records the full disk never took; they are lost (the next start reports them too)");
            }
        }
        r
    }

    /// Disk-side health, for `/health` and `/metrics`.
    pub fn health(&self) -> StoreHealth {
        // Read apart (one lock at a time): appends take the journal's lock, then the health's.
        let (reserve, reserve_left_bytes) = {
            let j = self.journal();
            (j.reserve_state(), j.reserve_left())
        };
        let h = self.inner.health.lock().unwrap_or_else(|p| p.into_inner());
        StoreHealth {
            backend: self.inner.cfg.backend.name(),
            writable: h.failed.is_none(),
            last_error: h.failed.clone(),
            write_failures: h.failures,
            commits: h.commits,
            unsaved_bytes: self.inner.shared.unsaved_bytes.load(Ordering::Relaxed),
            queued_bytes: self.total_bytes(),
            size_on_disk: self.size_on_disk(),
            memory_only: self.inner.shared.memory_only.load(Ordering::Relaxed),
            reserve,
            reserve_left_bytes,
            lost_at_last_stop: self.inner.lost_at_last_stop,
        }
    }
}
