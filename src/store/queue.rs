//! One stream's queue: a sled tree keyed by sequence number, plus in-memory counters.
//!
//! Readers (the stream task) walk the tree from a cursor they keep; [`Queue::ack`] removes a
//! record once the destination has it. Counters (records, bytes, drops) are kept in memory and
//! rebuilt by a scan on open, so the store has no second source of truth to get out of step.

use super::{DropReason, Shared, StoreError};
use crate::config::WhenFull;
use crate::model::{now_us, Record};
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// A stream's queue; cheap to clone.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    tree: sled::Tree,
    when_full: WhenFull,
    shared: Arc<Shared>,
    len: AtomicU64,
    bytes: AtomicU64,
    delivered: AtomicU64,
    drops: Mutex<BTreeMap<DropReason, u64>>,
    notify: Notify,
    /// Last sequence number queued per order key (device or gateway), for the catch-up lane:
    /// it tells, without a scan, which devices have a backlog.
    last_by_key: Mutex<std::collections::HashMap<u64, u64>>,
}

/// A snapshot for `/health`, `/metrics` and `lorastream queue`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct QueueStats {
    pub stream: String,
    pub depth: u64,
    pub bytes: u64,
    /// Age of the oldest queued record, seconds.
    pub oldest_age_s: f64,
    pub delivered: u64,
    pub dropped: BTreeMap<&'static str, u64>,
}

pub(super) enum Room {
    Ok { evicted: u64 },
    Rejected,
}

impl Queue {
    pub(super) fn open(
        name: String,
        tree: sled::Tree,
        when_full: WhenFull,
        shared: Arc<Shared>,
    ) -> Result<Queue, StoreError> {
        let (mut len, mut bytes) = (0u64, 0u64);
        let mut last_by_key = std::collections::HashMap::new();
        for kv in tree.iter() {
            let (k, v) = kv?;
            len += 1;
            bytes += v.len() as u64;
            if let (Some(seq), Ok(r)) = (key_seq(&k), postcard::from_bytes::<Record>(&v)) {
                last_by_key.insert(r.order_key(), seq);
            }
        }
        shared.total_bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok(Queue {
            inner: Arc::new(Inner {
                name,
                tree,
                when_full,
                shared,
                len: AtomicU64::new(len),
                bytes: AtomicU64::new(bytes),
                delivered: AtomicU64::new(0),
                drops: Mutex::new(BTreeMap::new()),
                notify: Notify::new(),
                last_by_key: Mutex::new(last_by_key),
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub(super) fn tree(&self) -> &sled::Tree {
        &self.inner.tree
    }

    pub(super) fn last_seq(&self) -> Option<u64> {
        self.inner
            .tree
            .last()
            .ok()
            .flatten()
            .and_then(|(k, _)| key_seq(&k))
    }

    pub fn len(&self) -> u64 {
        self.inner.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `max` records after `cursor` (from the start with `None`), in order. Records that
    /// cannot be decoded are removed and counted as corrupt.
    pub fn read_after(
        &self,
        cursor: Option<u64>,
        max: usize,
    ) -> Result<Vec<(u64, Record)>, StoreError> {
        let start = match cursor {
            Some(c) => Bound::Excluded(c.to_be_bytes()),
            None => Bound::Unbounded,
        };
        let mut out = Vec::with_capacity(max.min(1024));
        for kv in self
            .inner
            .tree
            .range::<[u8; 8], _>((start, Bound::Unbounded))
        {
            if out.len() >= max {
                break;
            }
            let (k, v) = kv?;
            let Some(seq) = key_seq(&k) else { continue };
            match postcard::from_bytes::<Record>(&v) {
                Ok(r) => out.push((seq, r)),
                Err(e) => {
                    tracing::error!(stream = %self.inner.name, seq, error = %e, "unreadable record removed from the queue");
                    if self.remove(seq)? {
                        self.count_drop(DropReason::Corrupt, 1);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The record with this sequence number, if it is still queued. An undecodable record is
    /// removed and counted as corrupt, as in [`Queue::read_after`].
    pub fn get(&self, seq: u64) -> Result<Option<Record>, StoreError> {
        let Some(v) = self.inner.tree.get(seq.to_be_bytes())? else {
            return Ok(None);
        };
        match postcard::from_bytes::<Record>(&v) {
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
    /// (evicted, or acknowledged twice after a reconnect).
    pub fn ack(&self, seq: u64) -> Result<bool, StoreError> {
        let removed = self.remove(seq)?;
        if removed {
            self.inner.delivered.fetch_add(1, Ordering::Relaxed);
        }
        Ok(removed)
    }

    fn remove(&self, seq: u64) -> Result<bool, StoreError> {
        match self.inner.tree.remove(seq.to_be_bytes())? {
            Some(v) => {
                self.account_removed(v.len() as u64);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Wait until something is appended (returns at once if something was appended since the
    /// last wait).
    pub async fn appended(&self) {
        self.inner.notify.notified().await
    }

    pub(super) fn wake(&self) {
        self.inner.notify.notify_one();
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
    pub fn backlog_snapshot(&self) -> (Option<u64>, std::collections::HashMap<u64, u64>) {
        let last = self.last_seq();
        let map = self
            .inner
            .last_by_key
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        (last, map)
    }

    pub(super) fn account_added(&self, n: u64, bytes: u64) {
        self.inner.len.fetch_add(n, Ordering::Relaxed);
        self.inner.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn account_removed(&self, bytes: u64) {
        self.inner.len.fetch_sub(1, Ordering::Relaxed);
        self.inner.bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.inner
            .shared
            .total_bytes
            .fetch_sub(bytes, Ordering::Relaxed);
    }

    pub(super) fn count_drop(&self, reason: DropReason, n: u64) {
        if let Ok(mut d) = self.inner.drops.lock() {
            *d.entry(reason).or_default() += n;
        }
        // Rate-limited by the caller's context is not possible here; warn once per power of two.
        let total: u64 = self
            .inner
            .drops
            .lock()
            .map(|d| d.values().sum())
            .unwrap_or(0);
        if total.is_power_of_two() {
            tracing::warn!(stream = %self.inner.name, reason = reason.as_str(), total_dropped = total, "queue dropped records");
        }
    }

    /// Make room for `size` bytes under `max_bytes`, per this queue's `when_full` policy.
    /// `drop_oldest` evicts the oldest record of the largest queue that also drops oldest, so a
    /// dead stream's backlog gives way to live traffic.
    pub(super) fn make_room(&self, size: u64, all: &[Queue]) -> Result<Room, StoreError> {
        let mut evicted = 0;
        loop {
            let total = self.inner.shared.total_bytes.load(Ordering::Relaxed);
            if total + size <= self.inner.shared.max_bytes {
                return Ok(Room::Ok { evicted });
            }
            if self.inner.when_full == WhenFull::RejectNew {
                self.count_drop(DropReason::QueueFullRejected, 1);
                return Ok(Room::Rejected);
            }
            let victim = all
                .iter()
                .filter(|q| q.inner.when_full == WhenFull::DropOldest && !q.is_empty())
                .max_by_key(|q| q.inner.bytes.load(Ordering::Relaxed));
            let Some(victim) = victim else {
                self.count_drop(DropReason::QueueFullRejected, 1);
                return Ok(Room::Rejected);
            };
            match victim.inner.tree.pop_min()? {
                Some((_, v)) => {
                    victim.account_removed(v.len() as u64);
                    victim.count_drop(DropReason::QueueFullOldest, 1);
                    evicted += 1;
                }
                None => {
                    // Counter said non-empty but the tree is: resync and refuse this record.
                    victim.inner.len.store(0, Ordering::Relaxed);
                    self.count_drop(DropReason::QueueFullRejected, 1);
                    return Ok(Room::Rejected);
                }
            }
        }
    }

    /// Remove records at the head received before `cutoff_us`.
    pub(super) fn expire_before(&self, cutoff_us: i64) -> Result<u64, StoreError> {
        let mut n = 0;
        while let Some((k, v)) = self.inner.tree.first()? {
            let old = postcard::from_bytes::<Record>(&v)
                .map(|r| r.received_at_us() < cutoff_us)
                .unwrap_or(true);
            if !old {
                break;
            }
            if let Some(seq) = key_seq(&k) {
                if self.remove(seq)? {
                    n += 1;
                }
            }
        }
        if n > 0 {
            self.count_drop(DropReason::Expired, n);
        }
        Ok(n)
    }

    pub fn stats(&self) -> QueueStats {
        let oldest_age_s = self
            .inner
            .tree
            .first()
            .ok()
            .flatten()
            .and_then(|(_, v)| postcard::from_bytes::<Record>(&v).ok())
            .map(|r| ((now_us() - r.received_at_us()).max(0) as f64) / 1e6)
            .unwrap_or(0.0);
        QueueStats {
            stream: self.inner.name.clone(),
            depth: self.len(),
            bytes: self.inner.bytes.load(Ordering::Relaxed),
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

fn key_seq(k: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(k).ok().map(u64::from_be_bytes)
}
