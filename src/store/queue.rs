//! One stream's queue: a table of the engine keyed by sequence number (u64 BE), its records
//! packed into blocks (`packed.rs`), seen through a small in-memory overlay, plus counters.
//!
//! The overlay is what makes group commits and a full disk work without the streams noticing:
//! - `unsaved`: records appended but not yet committed to the engine (the current group-commit
//!   window, journaled; or, while the disk refuses writes, held in memory only). Always a suffix
//!   of the queue: a commit takes all of them at once.
//! - `deleted`: records on disk that were acknowledged (or evicted, expired) whose delete is not
//!   committed yet. Acks are batched this way because losing one only means an at-least-once
//!   redelivery with the same correlation id; a record acknowledged before its commit never
//!   touches the disk at all.
//!
//! Readers (the stream task) walk the queue from a cursor they keep; [`Queue::ack`] removes a
//! record once the destination has it. Counters (records, bytes, drops) are kept in memory and
//! rebuilt by a scan on open, so the store has no second source of truth to get out of step.

use super::backend::Backend;
use super::{DropReason, Shared, StoreError};
use crate::config::WhenFull;
use crate::model::{now_us, Record};
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Drop warnings per queue and reason: at most one line per this interval (with the count).
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);

/// A stream's queue; cheap to clone.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    table: String,
    /// `true`: reject_new; `false`: drop_oldest ([`WhenFull`]); a reload may change it.
    reject_new: AtomicBool,
    /// A configured stream reads this queue. A stream removed by a reload leaves its queue
    /// detached: kept (and committed) with its backlog, taking no new records, evicted by no
    /// other queue's `drop_oldest`, shown nowhere, until the stream comes back.
    attached: AtomicBool,
    shared: Arc<Shared>,
    len: AtomicU64,
    bytes: AtomicU64,
    delivered: AtomicU64,
    drops: Mutex<BTreeMap<DropReason, u64>>,
    drop_log: Mutex<BTreeMap<DropReason, (Instant, u64)>>,
    notify: Notify,
    /// Last sequence number queued per order key (device or gateway), for the catch-up lane:
    /// it tells, without a scan, which devices have a backlog.
    last_by_key: Mutex<crate::model::FastMap<u64, u64>>,
    mem: Mutex<Mem>,
}

#[derive(Default)]
struct Mem {
    /// Appended, not committed: seq → encoded record.
    unsaved: BTreeMap<u64, Arc<Vec<u8>>>,
    /// On disk but removed; the delete is not committed yet.
    deleted: BTreeSet<u64>,
    /// Largest sequence number that may be on disk (committed, or in a commit in flight).
    disk_max: Option<u64>,
    /// No live record has a sequence number at or below this (skips committed-away heads).
    head: Option<u64>,
    /// Bumped by every commit: what was read from disk before may be stale after it.
    epoch: u64,
    /// Sizes of disk records handed to readers, so their ack needs no disk read.
    sizes: crate::model::FastMap<u64, u32>,
    /// Read-ahead: the last chunk read from disk, all entries after `ahead_from` (exclusive;
    /// None = from the first) up to its last one, valid while `ahead_epoch == epoch`.
    ahead: Vec<Raw>,
    ahead_from: Option<u64>,
    ahead_epoch: u64,
    /// Unsaved records that are in no journal file either (the disk refused them): lost by a
    /// kill. A subset of `unsaved`'s keys.
    memory_only: BTreeSet<u64>,
    /// Removed since the committer last wrote acknowledgements to the journal.
    acked: Vec<u64>,
}

/// Disk reads fetch at least this many records (the rest serves the next reads).
const READ_AHEAD: usize = 256;
/// Bound of [`Mem::sizes`] (a reader that never acks cannot grow it without limit).
const MAX_SIZES: usize = 100_000;
/// Bound of [`Mem::acked`] between two windows; beyond it a kill only redelivers more.
const MAX_ACKED: usize = 100_000;

/// What a commit took from a queue, to clean up after it succeeded.
pub(super) struct Snapshot {
    puts: Vec<(u64, Arc<Vec<u8>>)>,
    deletes: Vec<u64>,
}

/// A snapshot for `/health`, `/metrics` and `lorastream queue`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct QueueStats {
    pub stream: String,
    pub depth: u64,
    pub bytes: u64,
    /// Records not yet checkpointed into the engine: in the journal (durable once their window
    /// ended), or held in memory only while the disk refuses writes (`StoreHealth::writable`).
    pub unsaved: u64,
    /// Age of the oldest queued record, seconds.
    pub oldest_age_s: f64,
    pub delivered: u64,
    pub dropped: BTreeMap<&'static str, u64>,
}

pub(super) enum Room {
    Ok { evicted: u64 },
    Rejected,
}

/// A queued record as stored: sequence number and encoded bytes (shared with the batch).
type Raw = (u64, Arc<Vec<u8>>);

impl Queue {
    /// Rebuild a queue's counters from the engine.
    pub(super) fn open(
        name: String,
        backend: &Backend,
        when_full: WhenFull,
        shared: Arc<Shared>,
    ) -> Result<Queue, StoreError> {
        let table = super::queue_table(&name);
        let (mut len, mut bytes) = (0u64, 0u64);
        let mut last = None;
        let mut last_by_key = crate::model::FastMap::default();
        super::packed::scan(backend, &table, |seq, v| {
            len += 1;
            bytes += v.len() as u64;
            last = Some(seq);
            if let Ok(r) = super::records::decode(v) {
                last_by_key.insert(r.order_key(), seq);
            }
        })?;
        shared.total_bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok(Queue {
            inner: Arc::new(Inner {
                name,
                table,
                reject_new: AtomicBool::new(when_full == WhenFull::RejectNew),
                attached: AtomicBool::new(true),
                shared,
                len: AtomicU64::new(len),
                bytes: AtomicU64::new(bytes),
                delivered: AtomicU64::new(0),
                drops: Mutex::new(BTreeMap::new()),
                drop_log: Mutex::new(BTreeMap::new()),
                notify: Notify::new(),
                last_by_key: Mutex::new(last_by_key),
                mem: Mutex::new(Mem {
                    disk_max: last,
                    ..Mem::default()
                }),
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    fn when_full(&self) -> WhenFull {
        if self.inner.reject_new.load(Ordering::Relaxed) {
            WhenFull::RejectNew
        } else {
            WhenFull::DropOldest
        }
    }

    /// A reload changed the stream's `when_full`.
    pub(super) fn set_when_full(&self, when_full: WhenFull) {
        self.inner
            .reject_new
            .store(when_full == WhenFull::RejectNew, Ordering::Relaxed);
    }

    /// Whether a configured stream reads this queue (see [`Inner::attached`]).
    pub fn is_attached(&self) -> bool {
        self.inner.attached.load(Ordering::Relaxed)
    }

    pub(super) fn set_attached(&self, attached: bool) {
        self.inner.attached.store(attached, Ordering::Relaxed);
    }

    /// The engine table that holds this queue (`q:{name}`).
    pub(super) fn table(&self) -> &str {
        &self.inner.table
    }

    fn mem(&self) -> std::sync::MutexGuard<'_, Mem> {
        // A panic while holding this lock cannot leave the maps half-updated in a way that
        // loses data (the engine is the truth); keep going with what is there.
        self.inner.mem.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The largest queued sequence number (memory or disk).
    pub(super) fn last_seq(&self) -> Option<u64> {
        let m = self.mem();
        let mem_last = m.unsaved.keys().next_back().copied();
        let disk_last = match self.inner.shared.engine() {
            Some(b) => super::packed::last_seq(&b, &self.inner.table)
                .ok()
                .flatten(),
            None => m.disk_max,
        };
        mem_last.max(disk_last)
    }

    pub fn len(&self) -> u64 {
        self.inner.len.load(Ordering::Relaxed)
    }

    /// Bytes of the records queued (memory and disk).
    pub(super) fn queued_bytes(&self) -> u64 {
        self.inner.bytes.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records not committed to disk yet.
    pub fn unsaved(&self) -> u64 {
        self.mem().unsaved.len() as u64
    }

    /// Up to `max` raw records after `cursor` (from the start with `None`), in order, from
    /// disk and memory, without the removed ones.
    fn read_raw(&self, cursor: Option<u64>, max: usize) -> Result<Vec<Raw>, StoreError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        // 1. The memory part first: a commit that moves records to disk meanwhile then shows
        //    them twice (deduplicated below), never not at all.
        let (mut from_mem, need_disk, start) = {
            let m = self.mem();
            let start = match (cursor, m.head) {
                (Some(c), Some(h)) => Some(c.max(h)),
                (c, h) => c.or(h),
            };
            let lo = match start {
                Some(s) => Bound::Excluded(s),
                None => Bound::Unbounded,
            };
            let mem: Vec<(u64, Arc<Vec<u8>>)> = m
                .unsaved
                .range((lo, Bound::Unbounded))
                .take(max)
                .map(|(s, v)| (*s, v.clone()))
                .collect();
            let on_disk = self.len().saturating_sub(m.unsaved.len() as u64);
            let need_disk = on_disk > 0 && m.disk_max.is_some_and(|d| start.is_none_or(|s| s < d));
            (mem, need_disk, start)
        };
        let mut out: Vec<(u64, Arc<Vec<u8>>)> = Vec::new();
        if need_disk {
            let Some(engine) = self.inner.shared.engine() else {
                return Err(StoreError::Unavailable);
            };
            // 2. The disk part, skipping deletes that are not committed yet. The run of deleted
            //    records at the head (acks of the last second) is remembered in `head`, so the
            //    next read from the start does not walk it again.
            let mut after = start;
            let mut leading_deleted: Option<u64> = None;
            let epoch0 = self.mem().epoch;
            loop {
                let cached: Option<Vec<Raw>> = {
                    let m = self.mem();
                    let last = m.ahead.last().map(|(s, _)| *s);
                    (m.ahead_epoch == m.epoch && m.ahead_from <= after && after < last).then(|| {
                        m.ahead
                            .iter()
                            .filter(|(s, _)| Some(*s) > after)
                            .cloned()
                            .collect()
                    })
                };
                let chunk = match cached {
                    Some(c) => c,
                    None => {
                        let want = max.saturating_sub(out.len()).max(READ_AHEAD);
                        let raw: Vec<Raw> =
                            super::packed::range(&engine, &self.inner.table, after, want)?
                                .into_iter()
                                .map(|(s, v)| (s, Arc::new(v)))
                                .collect();
                        let mut m = self.mem();
                        if m.epoch == epoch0 {
                            m.ahead = raw.clone();
                            m.ahead_from = after;
                            m.ahead_epoch = epoch0;
                        }
                        raw
                    }
                };
                if chunk.is_empty() {
                    break;
                }
                let mut m = self.mem();
                let fresh = m.epoch == epoch0;
                for (seq, v) in chunk {
                    after = Some(seq);
                    if out.len() >= max {
                        break;
                    }
                    if !m.deleted.contains(&seq) {
                        if fresh && m.sizes.len() < MAX_SIZES {
                            m.sizes.insert(seq, v.len() as u32);
                        }
                        out.push((seq, v));
                    } else if out.is_empty() {
                        leading_deleted = Some(seq);
                    }
                }
                drop(m);
                if out.len() >= max {
                    break;
                }
            }
            if let Some(l) = leading_deleted {
                let mut m = self.mem();
                // Only when this read started at the head: nothing live lies before `l` then
                // (unsaved records are newer than everything on disk).
                let from_head = start == m.head || start.is_none();
                if from_head && m.unsaved.keys().next().is_none_or(|u| *u > l) && Some(l) > m.head {
                    m.head = Some(l);
                }
            }
        }
        // 3. Merge. Memory records acknowledged meanwhile are dropped again; those committed
        //    meanwhile are still live (on disk now).
        {
            let m = self.mem();
            from_mem.retain(|(s, _)| {
                m.unsaved.contains_key(s)
                    || (m.disk_max.is_some_and(|d| *s <= d) && !m.deleted.contains(s))
            });
        }
        out.append(&mut from_mem);
        out.sort_by_key(|(s, _)| *s);
        out.dedup_by_key(|(s, _)| *s);
        out.truncate(max);
        Ok(out)
    }

    /// Up to `max` records after `cursor` (from the start with `None`), in order. Records that
    /// cannot be decoded are removed and counted as corrupt.
    pub fn read_after(
        &self,
        cursor: Option<u64>,
        max: usize,
    ) -> Result<Vec<(u64, Record)>, StoreError> {
        let raw = self.read_raw(cursor, max)?;
        let mut out = Vec::with_capacity(raw.len());
        for (seq, v) in raw {
            if let Some(r) = self.decode(seq, &v)? {
                out.push((seq, r));
            }
        }
        Ok(out)
    }

    /// Decode a queued record; one that cannot be decoded is removed and counted as corrupt.
    fn decode(&self, seq: u64, v: &[u8]) -> Result<Option<Record>, StoreError> {
        match super::records::decode(v) {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                tracing::error!(stream = %self.inner.name, seq, error = %e, "unreadable record removed from the queue");
                if self.remove(seq)? {
                    self.count_drop(DropReason::Corrupt, 1);
                }
                Ok(None)
            }
        }
    }

    /// The record with this sequence number, if it is still queued. An undecodable record is
    /// removed and counted as corrupt, as in [`Queue::read_after`].
    pub fn get(&self, seq: u64) -> Result<Option<Record>, StoreError> {
        // The first live record after `seq - 1`, from memory or disk, deletes applied.
        let Some((_, v)) = self
            .read_raw(seq.checked_sub(1), 1)?
            .into_iter()
            .find(|(s, _)| *s == seq)
        else {
            return Ok(None);
        };
        self.decode(seq, &v)
    }

    /// The destination can never take this record: remove it and count it under `reason`, so
    /// that it does not block the queue. Returns false if it was already gone.
    pub fn drop_undeliverable(&self, seq: u64, reason: DropReason) -> Result<bool, StoreError> {
        let removed = self.remove(seq)?;
        if removed {
            self.count_drop(reason, 1);
        }
        Ok(removed)
    }

    /// The destination has the record: remove it. Returns false if it was already gone
    /// (evicted, or acknowledged twice after a reconnect). The delete reaches the disk with
    /// the next commit.
    pub fn ack(&self, seq: u64) -> Result<bool, StoreError> {
        let removed = self.remove(seq)?;
        if removed {
            self.inner.delivered.fetch_add(1, Ordering::Relaxed);
        }
        Ok(removed)
    }

    fn remove(&self, seq: u64) -> Result<bool, StoreError> {
        let mut m = self.mem();
        if let Some(v) = m.unsaved.remove(&seq) {
            if m.disk_max.is_some_and(|d| seq <= d) {
                // Its commit may be in flight: make sure the put is undone.
                m.deleted.insert(seq);
            }
            let was_memory_only = m.memory_only.remove(&seq);
            if !was_memory_only && m.acked.len() < MAX_ACKED {
                // Journaled: its delete is journaled too, or a kill would bring it back.
                m.acked.push(seq);
                self.inner.shared.work_arrived();
            }
            self.inner
                .shared
                .unsaved_bytes
                .fetch_sub(v.len() as u64, Ordering::Relaxed);
            drop(m);
            if was_memory_only {
                self.inner.shared.memory_only_changed(0, 1);
            }
            self.account_removed(v.len() as u64);
            return Ok(true);
        }
        if m.deleted.contains(&seq) || m.disk_max.is_none_or(|d| seq > d) {
            return Ok(false);
        }
        if m.acked.len() < MAX_ACKED {
            m.acked.push(seq);
            self.inner.shared.work_arrived();
        }
        // Handed out from disk since the last commit: its size is known.
        if let Some(size) = m.sizes.remove(&seq) {
            m.deleted.insert(seq);
            drop(m);
            self.account_removed(u64::from(size));
            return Ok(true);
        }
        // On disk (or already deleted there): ask the engine, under the lock so a commit that
        // finishes meanwhile cannot make us count it twice.
        let engine = self.inner.shared.engine().ok_or(StoreError::Unavailable)?;
        match super::packed::get(&engine, &self.inner.table, seq)? {
            Some(v) => {
                m.deleted.insert(seq);
                drop(m);
                self.account_removed(v.len() as u64);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The oldest live record, if any.
    fn first(&self) -> Result<Option<Raw>, StoreError> {
        let first = self.read_raw(None, 1)?.into_iter().next();
        if let Some((s, _)) = &first {
            // Nothing live below it: later reads from the start can skip there directly.
            let mut m = self.mem();
            let h = s.checked_sub(1);
            if h > m.head {
                m.head = h;
            }
        }
        Ok(first)
    }

    /// Wait until something is appended (returns at once if something was appended since the
    /// last wait).
    pub async fn appended(&self) {
        self.inner.notify.notified().await
    }

    pub(super) fn wake(&self) {
        self.inner.notify.notify_one();
    }

    /// Take appended records (already counted by [`Queue::make_room`]'s caller).
    pub(super) fn insert(&self, recs: Vec<(u64, Arc<Vec<u8>>)>) {
        let mut n = 0u64;
        let mut b = 0u64;
        let mut m = self.mem();
        for (seq, v) in recs {
            n += 1;
            b += v.len() as u64;
            m.unsaved.insert(seq, v);
        }
        // Counted before the lock is released: a reader works out how many records are on
        // disk as `len - unsaved`, and must never see the new records in `unsaved` without them
        // in `len` (it would skip the disk and take a newer record for the first one).
        self.inner.len.fetch_add(n, Ordering::Relaxed);
        drop(m);
        self.inner
            .shared
            .unsaved_bytes
            .fetch_add(b, Ordering::Relaxed);
        self.inner.bytes.fetch_add(b, Ordering::Relaxed);
    }

    /// These appended records are in no journal file: held in memory only. Returns how many.
    pub(super) fn mark_memory_only(&self, seqs: impl Iterator<Item = u64>) -> u64 {
        let mut m = self.mem();
        let mut n = 0;
        for seq in seqs {
            if m.unsaved.contains_key(&seq) && m.memory_only.insert(seq) {
                n += 1;
            }
        }
        n
    }

    /// Acknowledgements are waiting to be journaled.
    pub(super) fn has_acked(&self) -> bool {
        !self.mem().acked.is_empty()
    }

    /// Records removed since the last call, for the journal's acknowledgements.
    pub(super) fn take_acked(&self) -> Vec<u64> {
        std::mem::take(&mut self.mem().acked)
    }

    /// Graceful stop with a disk that refuses writes: drop the records held in memory only
    /// (journaled ones wait in the journal for the next start); counted `write_failed`.
    /// Returns how many.
    pub(super) fn shed_memory_only(&self) -> u64 {
        let mut m = self.mem();
        let seqs: Vec<u64> = std::mem::take(&mut m.memory_only).into_iter().collect();
        let mut freed = Vec::new();
        for seq in &seqs {
            if let Some(v) = m.unsaved.remove(seq) {
                if m.disk_max.is_some_and(|d| *seq <= d) {
                    m.deleted.insert(*seq);
                }
                freed.push(v.len() as u64);
            }
        }
        drop(m);
        let n = seqs.len() as u64;
        let _ =
            self.inner
                .shared
                .memory_only
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_sub(n))
                });
        for b in &freed {
            self.inner
                .shared
                .unsaved_bytes
                .fetch_sub(*b, Ordering::Relaxed);
            self.account_removed(*b);
        }
        if !freed.is_empty() {
            self.count_drop(DropReason::WriteFailed, freed.len() as u64);
        }
        freed.len() as u64
    }

    pub(super) fn note_keys(&self, keys: &[(u64, u64)]) {
        if let Ok(mut m) = self.inner.last_by_key.lock() {
            for (key, seq) in keys {
                m.insert(*key, *seq);
            }
        }
    }

    /// Snapshot for a new delivery session: the last queued sequence number (None when empty)
    /// and, per order key, the last sequence number at or below it.
    pub fn backlog_snapshot(&self) -> (Option<u64>, crate::model::FastMap<u64, u64>) {
        let last = if self.is_empty() {
            None
        } else {
            self.last_seq()
        };
        let map = self
            .inner
            .last_by_key
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        (last, map)
    }

    fn account_removed(&self, bytes: u64) {
        let sub = |a: &AtomicU64, n: u64| {
            let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
        };
        sub(&self.inner.len, 1);
        sub(&self.inner.bytes, bytes);
        sub(&self.inner.shared.total_bytes, bytes);
    }

    /// Count a drop, and log it at most once per [`DROP_LOG_EVERY`] per reason.
    pub(super) fn count_drop(&self, reason: DropReason, n: u64) {
        let total = match self.inner.drops.lock() {
            Ok(mut d) => {
                let e = d.entry(reason).or_default();
                *e += n;
                *e
            }
            Err(_) => return,
        };
        let Ok(mut log) = self.inner.drop_log.lock() else {
            return;
        };
        let now = Instant::now();
        let (last, since) = log.entry(reason).or_insert((now - DROP_LOG_EVERY, 0));
        *since += n;
        if now.duration_since(*last) >= DROP_LOG_EVERY {
            tracing::warn!(stream = %self.inner.name, reason = reason.as_str(), dropped = *since, total_dropped = total,
                "queue dropped records (see lorastream_queue_dropped_total)");
            *last = now;
            *since = 0;
        }
    }

    /// Make room for `size` bytes under `max_bytes`, per this queue's `when_full` policy.
    /// `drop_oldest` evicts the oldest record of the largest queue that also drops oldest, so a
    /// dead stream's backlog gives way to live traffic.
    ///
    /// `pending` are this queue's records of the append in progress (reserved in the total but
    /// not inserted yet): newer than anything queued, so they give way only once the queue
    /// itself is empty — a batch larger than the cap keeps its newest records.
    pub(super) fn make_room(
        &self,
        size: u64,
        all: &[Queue],
        pending: &mut Vec<Raw>,
    ) -> Result<Room, StoreError> {
        let mut evicted = 0;
        loop {
            let total = self.inner.shared.total_bytes.load(Ordering::Relaxed);
            if total + size <= self.inner.shared.max_bytes {
                return Ok(Room::Ok { evicted });
            }
            if self.when_full() == WhenFull::RejectNew {
                self.count_drop(DropReason::QueueFullRejected, 1);
                return Ok(Room::Rejected);
            }
            let victim = all
                .iter()
                .filter(|q| {
                    q.is_attached() && q.when_full() == WhenFull::DropOldest && !q.is_empty()
                })
                .max_by_key(|q| q.inner.bytes.load(Ordering::Relaxed));
            let Some(victim) = victim else {
                if self.when_full() == WhenFull::DropOldest && !pending.is_empty() {
                    let (_, v) = pending.remove(0);
                    let n = v.len() as u64;
                    let _ = self.inner.shared.total_bytes.fetch_update(
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                        |t| Some(t.saturating_sub(n)),
                    );
                    self.count_drop(DropReason::QueueFullOldest, 1);
                    evicted += 1;
                    continue;
                }
                self.count_drop(DropReason::QueueFullRejected, 1);
                return Ok(Room::Rejected);
            };
            match victim.first()? {
                Some((seq, _)) if victim.remove(seq)? => {
                    victim.count_drop(DropReason::QueueFullOldest, 1);
                    evicted += 1;
                }
                Some(_) => {}
                None => {
                    // Counter said non-empty but nothing is there: resync and refuse this record.
                    victim.inner.len.store(0, Ordering::Relaxed);
                    self.count_drop(DropReason::QueueFullRejected, 1);
                    return Ok(Room::Rejected);
                }
            }
        }
    }

    /// Remove records at the head received before `cutoff_us`, looking at `budget` of them at
    /// most. Returns how many were removed, and whether the head is now a record received at
    /// or after `cutoff_us` (or the queue is empty): `false` = the budget ran out first.
    pub(super) fn expire_before(
        &self,
        cutoff_us: i64,
        budget: usize,
    ) -> Result<(u64, bool), StoreError> {
        let mut n = 0;
        let mut looked = 0;
        let done = loop {
            if looked == budget {
                break false;
            }
            let Some((seq, v)) = self.first()? else {
                break true;
            };
            looked += 1;
            let old = super::records::decode(&v)
                .map(|r| r.received_at_us() < cutoff_us)
                .unwrap_or(true);
            if !old {
                break true;
            }
            if self.remove(seq)? {
                n += 1;
            }
        };
        if n > 0 {
            self.count_drop(DropReason::Expired, n);
        }
        Ok((n, done))
    }

    /// While the disk refuses writes: drop the oldest records held only in memory until at
    /// most `keep_bytes` remain; counted as `write_failed`. Returns how many.
    pub(super) fn shed_unsaved(&self, keep_bytes: u64) -> u64 {
        let mut n = 0;
        loop {
            if self.inner.shared.unsaved_bytes.load(Ordering::Relaxed) <= keep_bytes {
                break;
            }
            let mut m = self.mem();
            let Some((&seq, _)) = m.unsaved.iter().next() else {
                break;
            };
            let v = m.unsaved.remove(&seq);
            if m.disk_max.is_some_and(|d| seq <= d) {
                m.deleted.insert(seq);
            }
            // Dropped and counted in this run; one that was journaled may still come back after
            // a restart (better delivered than lost).
            let was_memory_only = m.memory_only.remove(&seq);
            drop(m);
            if was_memory_only {
                self.inner.shared.memory_only_changed(0, 1);
            }
            if let Some(v) = v {
                self.inner
                    .shared
                    .unsaved_bytes
                    .fetch_sub(v.len() as u64, Ordering::Relaxed);
                self.account_removed(v.len() as u64);
                n += 1;
            }
        }
        if n > 0 {
            self.count_drop(DropReason::WriteFailed, n);
        }
        n
    }

    /// Bytes held in memory only by this queue.
    pub(super) fn unsaved_bytes(&self) -> u64 {
        self.mem().unsaved.values().map(|v| v.len() as u64).sum()
    }

    /// (records to write, deletes to apply) pending for the next commit.
    pub(super) fn pending(&self) -> (usize, usize) {
        let m = self.mem();
        (m.unsaved.len(), m.deleted.len())
    }

    /// This queue's pending writes and deletes, for the next commit.
    pub(super) fn snapshot(&self) -> Snapshot {
        let mut m = self.mem();
        let puts: Vec<(u64, Arc<Vec<u8>>)> =
            m.unsaved.iter().map(|(s, v)| (*s, v.clone())).collect();
        let deletes: Vec<u64> = m.deleted.iter().copied().collect();
        if let Some(&(last, _)) = puts.last() {
            m.disk_max = m.disk_max.max(Some(last));
        }
        Snapshot { puts, deletes }
    }

    /// Add what `snap` changes to `batch`, as whole blocks of the queue's table (see
    /// [`super::packed`]).
    pub(super) fn write_snapshot(
        &self,
        engine: &Backend,
        snap: &Snapshot,
        batch: &mut super::backend::Batch,
    ) -> Result<(), StoreError> {
        super::packed::write(engine, &self.inner.table, &snap.puts, &snap.deletes, batch)
    }

    /// The commit of `snap` is on disk: forget what it covered.
    pub(super) fn committed(&self, snap: Snapshot) {
        let mut freed = 0u64;
        let mut saved_memory_only = 0u64;
        let mut m = self.mem();
        for (seq, _) in snap.puts {
            if let Some(v) = m.unsaved.remove(&seq) {
                freed += v.len() as u64;
            }
            if m.memory_only.remove(&seq) {
                saved_memory_only += 1;
            }
        }
        for seq in snap.deletes {
            m.deleted.remove(&seq);
        }
        m.epoch += 1;
        m.ahead.clear();
        drop(m);
        self.inner
            .shared
            .unsaved_bytes
            .fetch_sub(freed, Ordering::Relaxed);
        self.inner.shared.memory_only_changed(0, saved_memory_only);
    }

    /// Add records found in the journal but not on disk to the counters (`lorastream queue`
    /// on a store whose daemon was killed).
    /// `n` may be negative: records acknowledged in the journal but still in the engine.
    pub(super) fn count_extra(&self, n: i64, bytes: i64) {
        let add = |a: &AtomicU64, d: i64| {
            let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_add_signed(d))
            });
        };
        add(&self.inner.len, n);
        add(&self.inner.bytes, bytes);
    }

    pub fn stats(&self) -> QueueStats {
        let oldest_age_s = self
            .first()
            .ok()
            .flatten()
            .and_then(|(_, v)| super::records::decode(&v).ok())
            .map(|r| ((now_us() - r.received_at_us()).max(0) as f64) / 1e6)
            .unwrap_or(0.0);
        QueueStats {
            stream: self.inner.name.clone(),
            depth: self.len(),
            bytes: self.inner.bytes.load(Ordering::Relaxed),
            unsaved: self.unsaved(),
            oldest_age_s,
            delivered: self.inner.delivered.load(Ordering::Relaxed),
            dropped: self
                .inner
                .drops
                .lock()
                .map(|d| d.iter().map(|(k, v)| (k.as_str(), *v)).collect())
                .unwrap_or_default(),
        }
    }
}
