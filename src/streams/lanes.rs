//! The catch-up lane: how a stream reads its queue after a (re)connect so that a backlog drain
//! does not starve live traffic, while every device's messages stay in order.
//!
//! At the start of a delivery session the queue's last sequence number is the boundary: older
//! records are backlog, newer ones live. Two cursors walk the queue:
//! - the **backlog lane** walks everything from the oldest record, in order;
//! - the **live lane** walks records after the boundary and takes a record only if its device
//!   (order key) has no backlog left ahead of the backlog lane and was never skipped in this
//!   session; otherwise it skips it, and that device stays with the backlog lane until the lanes
//!   meet. The backlog lane skips what the live lane already took.
//!
//! Each read gives the live lane up to half of the room (the rest, or all of it when there is no
//! live traffic, goes to the backlog). When the backlog lane reaches the live lane's position,
//! the lanes merge into one cursor.

use crate::model::Record;
use crate::model::{FastMap, FastSet};
use crate::store::{Queue, StoreError};
use std::collections::BTreeSet;

pub struct Lanes {
    backlog: Option<u64>,
    live: Option<u64>,
    /// Order key → last backlog sequence number of that key.
    blocked: FastMap<u64, u64>,
    skipped: FastSet<u64>,
    /// Live records already taken, not yet passed by the backlog lane.
    taken_live: BTreeSet<u64>,
    merged: bool,
    /// "cannot read the queue" (a disk error) at most this often.
    read_errors: crate::logs::LogLimiter,
}

impl Lanes {
    /// Snapshot the queue at the start of a session.
    pub fn new(queue: &Queue) -> Lanes {
        let (boundary, blocked) = queue.backlog_snapshot();
        Lanes::from_snapshot(boundary, blocked)
    }

    /// `blocked` holds each order key's *last* record ever queued, and `boundary` the last
    /// record still queued: a key whose newest records were already acknowledged (acks come
    /// out of order while the lanes run; the newest queued record may be older), or was
    /// appended to between the two reads, shows a record past the boundary, yet may still have
    /// backlog at or below it. Such a key waits until the backlog lane has passed the whole
    /// boundary: a little later, never out of order. (Dropping it from `blocked` instead let a
    /// device's live records overtake its own backlog: tests/powercut.rs saw 32-37 records of
    /// one device first delivered after a newer one.)
    fn from_snapshot(boundary: Option<u64>, mut blocked: FastMap<u64, u64>) -> Lanes {
        if let Some(b) = boundary {
            for last in blocked.values_mut() {
                *last = (*last).min(b);
            }
        }
        Lanes {
            backlog: None,
            live: boundary,
            blocked,
            skipped: FastSet::default(),
            taken_live: BTreeSet::new(),
            merged: boundary.is_none(),
            read_errors: crate::logs::LogLimiter::new(),
        }
    }

    /// Top `pending` up to `limit` records (the batching streams: HTTP, e-mail). A queue that
    /// cannot be read (an I/O error; corrupt records are removed by the queue itself) is
    /// counted and logged, rate-limited; the next wake-up (an append, a retry) reads again.
    pub(crate) fn top_up(
        &mut self,
        ctx: &super::StreamContext,
        pending: &mut std::collections::VecDeque<(u64, Record)>,
        limit: usize,
    ) {
        let room = limit.saturating_sub(pending.len());
        if room == 0 {
            return;
        }
        match self.next(&ctx.queue, room) {
            Ok(v) => pending.extend(v),
            Err(e) => {
                ctx.metrics.stream_error(&ctx.name, "queue_read");
                if self.read_errors.allow() {
                    tracing::error!(stream = %ctx.name, error = %e, "cannot read the queue");
                }
            }
        }
    }

    /// True while a backlog remains ahead of live traffic.
    #[cfg(test)]
    fn catching_up(&self) -> bool {
        !self.merged
    }

    /// Up to `room` records to send next.
    pub fn next(&mut self, queue: &Queue, room: usize) -> Result<Vec<(u64, Record)>, StoreError> {
        // Not sized to `room` up front: that is the whole window (hundreds of records of a few
        // hundred bytes each) allocated for every read, when a read at a steady rate finds one
        // or two records (issue 16). Once the lanes have merged, the store's chunk is the batch.
        let mut out = Vec::new();
        if room == 0 {
            return Ok(out);
        }
        if !self.merged {
            let live_room = room.div_ceil(2);
            self.read_live(queue, live_room, &mut out)?;
        }
        let rest = room - out.len();
        if rest > 0 {
            self.read_backlog(queue, rest, &mut out)?;
        }
        Ok(out)
    }

    fn read_live(
        &mut self,
        queue: &Queue,
        want: usize,
        out: &mut Vec<(u64, Record)>,
    ) -> Result<(), StoreError> {
        let mut taken = 0;
        // Skipped records cost a read but no room: read in chunks until enough or the end.
        while taken < want {
            let chunk = queue.read_after(self.live, want * 4)?;
            if chunk.is_empty() {
                break;
            }
            for (seq, r) in chunk {
                self.live = Some(seq);
                if self.backlog.is_some_and(|b| seq <= b) {
                    continue;
                }
                let key = r.order_key();
                let behind = self
                    .blocked
                    .get(&key)
                    .is_some_and(|last| self.backlog.is_none_or(|b| b < *last));
                if behind || self.skipped.contains(&key) {
                    self.skipped.insert(key);
                    continue;
                }
                self.taken_live.insert(seq);
                out.push((seq, r));
                taken += 1;
                if taken == want {
                    break;
                }
            }
        }
        Ok(())
    }

    fn read_backlog(
        &mut self,
        queue: &Queue,
        want: usize,
        out: &mut Vec<(u64, Record)>,
    ) -> Result<(), StoreError> {
        let mut got = 0;
        while got < want {
            let ask = want + self.taken_live.len().min(4096);
            let chunk = queue.read_after(self.backlog, ask)?;
            if chunk.is_empty() {
                break;
            }
            // Fewer than asked for: the queue had no more just now (or the store removed an
            // unreadable record). Reading again would find nothing, at a steady rate on every
            // read; so once something was taken, it goes out and the next call reads on.
            let short = chunk.len() < ask;
            if self.merged && self.taken_live.is_empty() && out.is_empty() {
                // One cursor and nothing to skip (the steady state): the chunk as it is
                // (`ask` is `want` here, so it is not longer than that).
                self.backlog = chunk.last().map(|(seq, _)| *seq);
                got = chunk.len();
                *out = chunk;
                if short {
                    break;
                }
                continue;
            }
            for (seq, r) in chunk {
                self.backlog = Some(seq);
                if self.taken_live.remove(&seq) {
                    continue;
                }
                if !self.merged && self.live.is_none_or(|l| seq > l) {
                    // The backlog lane passed the live lane: one cursor from now on.
                    self.merged = true;
                    self.skipped.clear();
                }
                out.push((seq, r));
                got += 1;
                if got == want {
                    break;
                }
            }
            // Everything the live lane took behind the backlog cursor has been skipped over.
            if let Some(b) = self.backlog {
                self.taken_live = self.taken_live.split_off(&(b + 1));
            }
            if short && got > 0 {
                break;
            }
        }
        if !self.merged && self.backlog.is_some() && self.backlog >= self.live {
            self.merged = true;
            self.skipped.clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{StorageConfig, WhenFull};
    use crate::store::{Entry, Store};

    fn up(dev: u64, n: u32) -> Record {
        crate::sim::fixtures::record(dev, n)
    }

    fn ids(v: &[(u64, Record)]) -> Vec<(u64, u32)> {
        v.iter()
            .map(|(_, r)| match r {
                Record::Uplink(u) => (u.dev_eui.to_u64(), u.f_cnt),
                _ => (0, 0),
            })
            .collect()
    }

    /// A store in a temporary directory with one queue, "q".
    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StorageConfig {
            path: dir.path().join("db"),
            ..Default::default()
        };
        let (s, _) = Store::open(&cfg, &[("q".into(), WhenFull::DropOldest)]).unwrap();
        (dir, s)
    }

    async fn add(s: &Store, r: Record) {
        s.append(
            &[Entry {
                record: &r,
                queues: &[0],
            }],
            &[],
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn live_devices_overtake_the_backlog_but_each_device_stays_in_order() {
        let (_dir, s) = store();
        // Backlog: device 1 has 6 records.
        for n in 0..6 {
            add(&s, up(1, n)).await;
        }
        let q = s.queue("q").unwrap();
        let mut lanes = Lanes::new(&q);
        // Live traffic arrives: device 2 (no backlog) and device 1 again.
        add(&s, up(2, 0)).await;
        add(&s, up(1, 6)).await;
        add(&s, up(2, 1)).await;

        let first = lanes.next(&q, 4).unwrap();
        // Half the room for live: device 2's two records; device 1's live record waits.
        assert_eq!(ids(&first), vec![(2, 0), (2, 1), (1, 0), (1, 1)]);
        assert!(lanes.catching_up());
        let rest = lanes.next(&q, 100).unwrap();
        assert_eq!(ids(&rest), vec![(1, 2), (1, 3), (1, 4), (1, 5), (1, 6)]);
        assert!(!lanes.catching_up());
        // After the merge: one cursor, nothing twice.
        add(&s, up(2, 2)).await;
        add(&s, up(1, 7)).await;
        assert_eq!(ids(&lanes.next(&q, 10).unwrap()), vec![(2, 2), (1, 7)]);
        assert!(lanes.next(&q, 10).unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_device_appended_to_during_the_snapshot_stays_behind_its_own_backlog() {
        let (_dir, s) = store();
        add(&s, up(1, 0)).await;
        add(&s, up(1, 1)).await;
        let q = s.queue("q").unwrap();
        // The snapshot's boundary is read, then device 1 gets a live record, then the map of
        // last records per device is read: it shows device 1's live record.
        let (boundary, _) = q.backlog_snapshot();
        add(&s, up(1, 2)).await;
        let (_, last_by_key) = q.backlog_snapshot();
        add(&s, up(2, 0)).await;
        let mut lanes = Lanes::from_snapshot(boundary, last_by_key);
        // Live room 1 goes to device 2; device 1's live record waits for its backlog.
        assert_eq!(ids(&lanes.next(&q, 2).unwrap()), vec![(2, 0), (1, 0)]);
        assert_eq!(ids(&lanes.next(&q, 100).unwrap()), vec![(1, 1), (1, 2)]);
        assert!(lanes.next(&q, 100).unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_device_whose_newest_record_was_acknowledged_stays_behind_its_backlog() {
        let (_dir, s) = store();
        add(&s, up(1, 0)).await;
        add(&s, up(2, 0)).await;
        add(&s, up(1, 1)).await;
        let q = s.queue("q").unwrap();
        // Device 1's newest record is acknowledged (a previous session's live lane took it):
        // the newest record still queued is device 2's, older than device 1's last.
        let all = q.read_after(None, 10).unwrap();
        assert!(q.ack(all[2].0).unwrap());
        let mut lanes = Lanes::new(&q);
        add(&s, up(1, 2)).await;
        add(&s, up(3, 0)).await;
        assert_eq!(ids(&lanes.next(&q, 2).unwrap()), vec![(3, 0), (1, 0)]);
        assert_eq!(ids(&lanes.next(&q, 100).unwrap()), vec![(2, 0), (1, 2)]);
    }

    #[tokio::test]
    async fn merged_reads_take_what_is_there_in_order_and_never_more_than_the_room() {
        let (_dir, s) = store();
        let q = s.queue("q").unwrap();
        let mut lanes = Lanes::new(&q);
        for n in 0..5 {
            add(&s, up(1 + u64::from(n % 2), n)).await;
        }
        // Less room than records: exactly the room, oldest first.
        assert_eq!(ids(&lanes.next(&q, 2).unwrap()), vec![(1, 0), (2, 1)]);
        // More room than records: all that is left, in one read.
        assert_eq!(
            ids(&lanes.next(&q, 200).unwrap()),
            vec![(1, 2), (2, 3), (1, 4)]
        );
        assert!(lanes.next(&q, 200).unwrap().is_empty());
        // Appended after the cursor reached the end: read on from there, nothing twice.
        add(&s, up(3, 0)).await;
        assert_eq!(ids(&lanes.next(&q, 200).unwrap()), vec![(3, 0)]);
        // Acknowledged records stay behind the cursor.
        let next = lanes.next(&q, 200).unwrap();
        assert!(next.is_empty());
        add(&s, up(3, 1)).await;
        let got = lanes.next(&q, 1).unwrap();
        assert_eq!(ids(&got), vec![(3, 1)]);
        assert!(q.ack(got[0].0).unwrap());
        assert!(lanes.next(&q, 200).unwrap().is_empty());
    }

    #[tokio::test]
    async fn empty_queue_is_a_single_lane() {
        let (_dir, s) = store();
        let q = s.queue("q").unwrap();
        let mut lanes = Lanes::new(&q);
        assert!(!lanes.catching_up());
        add(&s, up(1, 0)).await;
        add(&s, up(2, 0)).await;
        assert_eq!(ids(&lanes.next(&q, 1).unwrap()), vec![(1, 0)]);
        assert_eq!(ids(&lanes.next(&q, 1).unwrap()), vec![(2, 0)]);
    }
}
