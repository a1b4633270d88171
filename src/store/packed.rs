//! How a queue's records lie in its engine table: packed into blocks of about one page.
//!
//! One engine entry per record cost 2.3× the record bytes on disk with redb: a B-tree fed
//! ascending keys splits each full leaf in half and never adds to the left half again, so
//! leaves stay half full, and each entry carries its key and two offsets besides. Records are
//! therefore written in **blocks**: an entry keyed by the sequence number of its first record
//! (u64 BE, as before), whose value is [`BLOCK`] followed by, per record, the distance of its
//! sequence number from the key (varint), its length (varint) and its bytes. A block is closed
//! at [`BLOCK_BYTES`], so that it and its key fill one 4 KiB leaf page by themselves.
//!
//! Rules every function here keeps:
//! - an entry's key is at or below every sequence number in it, and entries do not overlap,
//!   so the entry holding `seq` is the one with the largest key at or below `seq`;
//! - an entry whose value does not start with [`BLOCK`] is one record keyed by its own
//!   sequence number: what lorastream wrote before blocks (a record starts with its version
//!   tag 0xFE, or with a variant index below 3 for version 1; see [`super::records`]), and
//!   what it still writes for a record too large for a block. Stores queued by an older
//!   version are read as they are and packed as they drain; nothing is migrated;
//! - a block rewritten because some of its records were acknowledged keeps its key.
//!
//! Only the committer writes queue tables (under the commit lock): [`write`] reads the blocks
//! a commit touches from the engine's last committed state and turns the queue's record puts
//! and deletes into whole-block puts and deletes in the same atomic batch. A failed commit
//! changes nothing, and the next attempt starts again from the engine.

use super::backend::{Backend, Batch};
use super::uplink_record::Cur;
use super::StoreError;
use crate::vec_write::varint;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

/// First byte of a block: never the first byte of a record.
const BLOCK: u8 = 0xFD;
/// Largest value of a block: a redb leaf page (4,096 bytes) holds a 4-byte header, two 4-byte
/// offsets, the 8-byte key and this, with room to spare.
const BLOCK_BYTES: usize = 4_000;
/// Entries read per engine call when walking a table.
const ENTRIES_PER_READ: usize = 16;

/// The sequence number a queue key holds (u64 BE).
pub(super) fn key_seq(k: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(k).ok().map(u64::from_be_bytes)
}

/// The records of one entry, in order: a block's, or the entry itself as one record.
struct Records<'a> {
    base: u64,
    rest: &'a [u8],
    single: Option<&'a [u8]>,
}

fn records<'a>(key: &[u8], value: &'a [u8]) -> Records<'a> {
    let base = key_seq(key).unwrap_or(u64::MAX);
    match value.split_first() {
        Some((&BLOCK, rest)) => Records {
            base,
            rest,
            single: None,
        },
        _ => Records {
            base,
            rest: &[],
            single: key_seq(key).map(|_| value),
        },
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = (u64, &'a [u8]);
    fn next(&mut self) -> Option<(u64, &'a [u8])> {
        if let Some(v) = self.single.take() {
            return Some((self.base, v));
        }
        if self.rest.is_empty() {
            return None;
        }
        let mut cur = Cur(self.rest);
        let next = (|| {
            let delta = cur.varint(64)?;
            let len = usize::try_from(cur.varint(32)?).ok()?;
            let v = cur.take(len)?;
            Some((self.base.checked_add(delta)?, v))
        })();
        match next {
            Some((seq, v)) => {
                self.rest = cur.0;
                Some((seq, v))
            }
            None => {
                damaged(self.base, self.rest.len());
                self.rest = &[];
                None
            }
        }
    }
}

/// A damaged block (the engines checksum their pages, so only a bug would make one) ends at
/// the damage: the records before it are still delivered, the rest cannot be read. Said in
/// the log, at most ten times per 10 s.
fn damaged(key: u64, bytes: usize) {
    static LIMIT: std::sync::Mutex<Option<crate::logs::LogLimiter>> = std::sync::Mutex::new(None);
    let allow = LIMIT
        .lock()
        .map(|mut l| l.get_or_insert_with(crate::logs::LogLimiter::new).allow())
        .unwrap_or(false);
    if allow {
        tracing::error!(
            block = key,
            unreadable_bytes = bytes,
            "a block of queued records is damaged: the records after the damage cannot be read"
        );
    }
}

/// Visit every record of `table` in order.
pub(super) fn scan(
    e: &Backend,
    table: &str,
    mut f: impl FnMut(u64, &[u8]),
) -> Result<(), StoreError> {
    e.scan(table, |k, v| {
        for (seq, r) in records(k, v) {
            f(seq, r);
        }
    })
}

/// The largest sequence number in `table`.
pub(super) fn last_seq(e: &Backend, table: &str) -> Result<Option<u64>, StoreError> {
    Ok(e.last(table)?
        .and_then(|(k, v)| records(&k, &v).last().map(|(s, _)| s)))
}

/// The record `seq` of `table`.
pub(super) fn get(e: &Backend, table: &str, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(e.floor(table, &seq.to_be_bytes())?.and_then(|(k, v)| {
        records(&k, &v)
            .find(|(s, _)| *s == seq)
            .map(|(_, r)| r.to_vec())
    }))
}

/// Up to `max` records of `table` after `after` (from the first with `None`), in order.
pub(super) fn range(
    e: &Backend,
    table: &str,
    after: Option<u64>,
    max: usize,
) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let mut out = Vec::new();
    if max == 0 {
        return Ok(out);
    }
    // The entry that may hold records after `after` starts at or below it.
    let mut from: Option<Vec<u8>> = match after {
        Some(a) => e.floor(table, &a.to_be_bytes())?.map(|(k, _)| k),
        None => None,
    };
    let mut inclusive = true;
    loop {
        let lo = match (&from, inclusive) {
            (Some(k), true) => Bound::Included(k.as_slice()),
            (Some(k), false) => Bound::Excluded(k.as_slice()),
            (None, _) => Bound::Unbounded,
        };
        let entries = e.range(table, lo, ENTRIES_PER_READ)?;
        let n = entries.len();
        for (k, v) in &entries {
            for (seq, r) in records(k, v) {
                if after.is_none_or(|a| seq > a) {
                    out.push((seq, r.to_vec()));
                    if out.len() >= max {
                        return Ok(out);
                    }
                }
            }
        }
        match entries.into_iter().next_back() {
            Some((k, _)) if n >= ENTRIES_PER_READ => {
                from = Some(k);
                inclusive = false;
            }
            _ => return Ok(out),
        }
    }
}

/// One entry of the table as the commit is changing it.
struct Entry {
    key: u64,
    /// The entry was one record (not a block) in the engine.
    single: bool,
    /// Its last sequence number when it was read: no other entry starts at or below this.
    span_end: u64,
    records: Vec<(u64, Arc<Vec<u8>>)>,
    changed: bool,
}

impl Entry {
    fn from_engine(k: &[u8], v: &[u8]) -> Option<Entry> {
        let key = key_seq(k)?;
        let single = v.first() != Some(&BLOCK);
        let records: Vec<(u64, Arc<Vec<u8>>)> = records(k, v)
            .map(|(s, r)| (s, Arc::new(r.to_vec())))
            .collect();
        Some(Entry {
            key,
            single,
            span_end: records.last().map_or(key, |(s, _)| *s),
            records,
            changed: false,
        })
    }
    /// A new block starting at `key`, to be written.
    fn new(key: u64) -> Entry {
        Entry {
            key,
            single: false,
            span_end: key,
            records: Vec::new(),
            changed: true,
        }
    }
    fn bytes(&self) -> usize {
        1 + self
            .records
            .iter()
            .map(|(s, r)| encoded_len(s - self.key, r.len()))
            .sum::<usize>()
    }
}

/// The key of the entry that holds (or would hold) `seq`, the one with the largest key at or
/// below it, read into `touched` if it is not there yet; `None` below every key.
fn locate(
    e: &Backend,
    table: &str,
    seq: u64,
    touched: &mut BTreeMap<u64, Entry>,
) -> Result<Option<u64>, StoreError> {
    // Entries do not overlap: one already read that spans `seq` is the one (acknowledgements
    // come in runs, so this saves an engine lookup for all but the first of a block's).
    let near = touched
        .range(..=seq)
        .next_back()
        .map(|(&k, en)| (k, en.span_end));
    if let Some((k, end)) = near {
        if seq <= end {
            return Ok(Some(k));
        }
    }
    let on_disk = match e.floor(table, &seq.to_be_bytes())? {
        Some((k, v)) => Entry::from_engine(&k, &v),
        None => None,
    };
    Ok(match (near, on_disk) {
        (Some((k, _)), Some(en)) if k >= en.key => Some(k),
        (_, Some(en)) => {
            let k = en.key;
            touched.entry(k).or_insert(en);
            Some(k)
        }
        (near, None) => near.map(|(k, _)| k),
    })
}

fn varint_len(n: u64) -> usize {
    (64 - n.max(1).leading_zeros() as usize).div_ceil(7)
}

fn encoded_len(delta: u64, len: usize) -> usize {
    varint_len(delta) + varint_len(len as u64) + len
}

/// Turn a commit's record `puts` and `deletes` for `table` (each in ascending order, no
/// sequence number twice) into block puts and deletes in `batch`, reading the blocks they touch
/// from the engine.
pub(super) fn write(
    e: &Backend,
    table: &str,
    puts: &[(u64, Arc<Vec<u8>>)],
    deletes: &[u64],
    batch: &mut Batch,
) -> Result<(), StoreError> {
    if puts.is_empty() && deletes.is_empty() {
        return Ok(());
    }
    // A record put and deleted in the same commit is deleted (as if the puts came first).
    let kept: Vec<(u64, Arc<Vec<u8>>)>;
    let puts = if deletes.is_empty() {
        puts
    } else {
        kept = puts
            .iter()
            .filter(|(s, _)| deletes.binary_search(s).is_err())
            .cloned()
            .collect();
        &kept
    };
    // The entries touched, by key: read from the engine on first use, or new.
    let mut touched: BTreeMap<u64, Entry> = BTreeMap::new();
    let disk_last = last_seq(e, table)?;
    for &seq in deletes {
        if let Some(k) = locate(e, table, seq, &mut touched)? {
            if let Some(en) = touched.get_mut(&k) {
                if let Ok(i) = en.records.binary_search_by_key(&seq, |(s, _)| *s) {
                    en.records.remove(i);
                    en.changed = true;
                }
            }
        }
    }

    // Puts at or below what is on disk (a retried or replayed record) replace or join the
    // entry that holds their place; the rest are appended.
    let split = match disk_last {
        Some(d) => puts.partition_point(|(s, _)| *s <= d),
        None => 0,
    };
    let (inside, appended) = puts.split_at(split);
    for (seq, v) in inside {
        match locate(e, table, *seq, &mut touched)? {
            Some(k) => {
                if let Some(en) = touched.get_mut(&k) {
                    match en.records.binary_search_by_key(seq, |(s, _)| *s) {
                        Ok(i) => en.records[i].1 = v.clone(),
                        Err(i) => en.records.insert(i, (*seq, v.clone())),
                    }
                    en.changed = true;
                }
            }
            None => {
                // Below every key: an entry of its own.
                let mut en = Entry::new(*seq);
                en.records.push((*seq, v.clone()));
                touched.insert(*seq, en);
            }
        }
    }
    // Appends top up the last block while it has room, then fill new ones.
    let mut open: Option<Entry> = match (appended.is_empty(), disk_last) {
        (false, Some(d)) => match locate(e, table, d, &mut touched)? {
            Some(k) if touched.get(&k).is_some_and(|en| !en.single) => touched.remove(&k),
            _ => None,
        },
        _ => None,
    };
    let mut open_bytes = open.as_ref().map_or(0, Entry::bytes);
    for (seq, v) in appended {
        let fits = open
            .as_ref()
            .is_some_and(|o| open_bytes + encoded_len(seq - o.key, v.len()) <= BLOCK_BYTES);
        if !fits {
            if let Some(o) = open.take() {
                touched.insert(o.key, o);
            }
            open = Some(Entry::new(*seq));
            open_bytes = 1;
        }
        if let Some(o) = open.as_mut() {
            open_bytes += encoded_len(seq - o.key, v.len());
            o.records.push((*seq, v.clone()));
            o.changed = true;
        }
    }
    if let Some(o) = open.take() {
        touched.insert(o.key, o);
    }

    let mut buf = Vec::with_capacity(BLOCK_BYTES);
    for en in touched.values().filter(|en| en.changed) {
        let key = en.key.to_be_bytes();
        match en.records.as_slice() {
            [] => batch.delete(table, &key),
            // A record too large for a block (or alone below every key) stays an entry of
            // its own, keyed by its sequence number.
            [(seq, r)] if *seq == en.key && r.len() + 1 > BLOCK_BYTES => batch.put(table, &key, r),
            recs => {
                buf.clear();
                buf.push(BLOCK);
                for (seq, r) in recs {
                    varint(&mut buf, seq - en.key);
                    varint(&mut buf, r.len() as u64);
                    buf.extend_from_slice(r);
                }
                batch.put(table, &key, &buf);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{StorageBackend, StorageConfig};
    use std::collections::BTreeMap;

    fn engines() -> Vec<StorageBackend> {
        let mut b = vec![StorageBackend::Redb];
        if cfg!(feature = "sled") {
            b.push(StorageBackend::Sled);
        }
        b
    }

    fn open(kind: StorageBackend, dir: &std::path::Path) -> Backend {
        let cfg = StorageConfig {
            path: dir.to_path_buf(),
            ..StorageConfig::default()
        };
        Backend::open(kind, &cfg).unwrap()
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    /// A record's bytes: a version tag first, as real records have, then filler.
    fn record(seq: u64, len: usize, salt: u64) -> Vec<u8> {
        let mut v = vec![0xFE, 3];
        v.extend((0..len).map(|i| (seq as usize + i + salt as usize) as u8));
        v
    }

    fn check(e: &Backend, t: &str, model: &BTreeMap<u64, Vec<u8>>, rng: &mut Rng) {
        let mut all = Vec::new();
        scan(e, t, |s, v| all.push((s, v.to_vec()))).unwrap();
        let want: Vec<(u64, Vec<u8>)> = model.iter().map(|(s, v)| (*s, v.clone())).collect();
        assert_eq!(all, want, "scan");
        assert_eq!(last_seq(e, t).unwrap(), model.keys().next_back().copied());
        let top = model.keys().next_back().copied().unwrap_or(0) + 3;
        for _ in 0..40 {
            let seq = rng.below(top + 1);
            assert_eq!(
                get(e, t, seq).unwrap().as_ref(),
                model.get(&seq),
                "get {seq}"
            );
            let after = (rng.below(5) > 0).then(|| rng.below(top + 1));
            let max = 1 + rng.below(300) as usize;
            let want: Vec<(u64, Vec<u8>)> = match after {
                Some(a) => model.range(a + 1..),
                None => model.range(0..),
            }
            .take(max)
            .map(|(s, v)| (*s, v.clone()))
            .collect();
            assert_eq!(
                range(e, t, after, max).unwrap(),
                want,
                "range {after:?} {max}"
            );
        }
    }

    /// Random commits of appends, acknowledgements (in runs from the head and scattered),
    /// records put again (a retried commit) and records too large for a block, on a table that
    /// starts with entries of the older one-record-per-key layout: every read agrees with a
    /// plain map, on both engines.
    #[test]
    fn reads_agree_with_a_map_through_random_commits() {
        for kind in engines() {
            let dir = tempfile::tempdir().unwrap();
            let e = open(kind, dir.path());
            let t = "q:test";
            let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
            // The older layout: one entry per record.
            let mut b = Batch::default();
            for seq in (0..300u64).step_by(2) {
                let v = record(seq, 100 + (seq % 50) as usize, 0);
                b.put(t, &seq.to_be_bytes(), &v);
                model.insert(seq, v);
            }
            e.commit(&b, true).unwrap();
            check(&e, t, &model, &mut rng);
            let mut next = 300u64;
            for round in 0..120 {
                let mut puts: BTreeMap<u64, Arc<Vec<u8>>> = BTreeMap::new();
                for _ in 0..rng.below(200) {
                    next += 1 + rng.below(3);
                    let len = match rng.below(50) {
                        0 => 4_000 + rng.below(3_000) as usize,
                        _ => 20 + rng.below(400) as usize,
                    };
                    puts.insert(next, Arc::new(record(next, len, round)));
                }
                // Some records already on disk put again with other bytes.
                let on_disk: Vec<u64> = model.keys().copied().collect();
                for _ in 0..rng.below(3) {
                    if let Some(&s) = on_disk.get(rng.below(on_disk.len() as u64) as usize) {
                        puts.insert(s, Arc::new(record(s, 30, round + 1000)));
                    }
                }
                let mut deletes: Vec<u64> = Vec::new();
                let head: Vec<u64> = model
                    .keys()
                    .take(rng.below(150) as usize)
                    .copied()
                    .collect();
                deletes.extend(head);
                for _ in 0..rng.below(20) {
                    deletes.push(rng.below(next + 5));
                }
                // Sometimes a record appended in this very commit is acknowledged in it too.
                if let Some((&s, _)) = puts.iter().next_back() {
                    if rng.below(4) == 0 {
                        deletes.push(s);
                    }
                }
                deletes.sort_unstable();
                deletes.dedup();
                let puts: Vec<(u64, Arc<Vec<u8>>)> = puts.into_iter().collect();
                let mut b = Batch::default();
                write(&e, t, &puts, &deletes, &mut b).unwrap();
                e.commit(&b, true).unwrap();
                for (s, v) in &puts {
                    model.insert(*s, v.to_vec());
                }
                for s in &deletes {
                    model.remove(s);
                }
                check(&e, t, &model, &mut rng);
            }
            assert!(!model.is_empty());
        }
    }

    /// A block damaged in its middle gives the records before the damage, and nothing after.
    #[test]
    fn a_damaged_block_ends_at_the_damage() {
        let mut v = vec![BLOCK];
        for (d, r) in [(0u64, &b"ab"[..]), (1, b"cde"), (5, b"f")] {
            varint(&mut v, d);
            varint(&mut v, r.len() as u64);
            v.extend_from_slice(r);
        }
        let key = 100u64.to_be_bytes();
        let all: Vec<(u64, &[u8])> = records(&key, &v).collect();
        assert_eq!(all, vec![(100, &b"ab"[..]), (101, b"cde"), (105, b"f")]);
        // The third record's length runs past the end.
        let mut cut = v.clone();
        let n = cut.len();
        cut[n - 2] = 9;
        let some: Vec<(u64, &[u8])> = records(&key, &cut).collect();
        assert_eq!(some, vec![(100, &b"ab"[..]), (101, b"cde")]);
        // A varint that never ends.
        let mut bad = v[..1 + 2 + 2].to_vec();
        bad.extend_from_slice(&[0xFF; 12]);
        let first: Vec<(u64, &[u8])> = records(&key, &bad).collect();
        assert_eq!(first, vec![(100, &b"ab"[..])]);
    }

    /// Appended records fill blocks of nearly BLOCK_BYTES, one commit or many.
    #[test]
    fn appends_fill_whole_blocks() {
        for kind in engines() {
            let dir = tempfile::tempdir().unwrap();
            let e = open(kind, dir.path());
            let t = "q:fill";
            let mut seq = 0u64;
            let mut bytes = 0usize;
            for commit in 0..50 {
                // One record per commit for a while (a quiet gateway), then large commits.
                let n = if commit < 30 { 1 } else { 500 };
                let puts: Vec<(u64, Arc<Vec<u8>>)> = (0..n)
                    .map(|_| {
                        seq += 1;
                        (seq, Arc::new(record(seq, 115, 0)))
                    })
                    .collect();
                bytes += puts.iter().map(|(_, v)| v.len()).sum::<usize>();
                let mut b = Batch::default();
                write(&e, t, &puts, &[], &mut b).unwrap();
                e.commit(&b, true).unwrap();
            }
            let mut entries = 0usize;
            let mut full = 0usize;
            e.scan(t, |_, v| {
                entries += 1;
                assert_eq!(v[0], BLOCK);
                assert!(v.len() <= BLOCK_BYTES);
                if v.len() + 120 > BLOCK_BYTES {
                    full += 1;
                }
            })
            .unwrap();
            // Each record adds its distance and length (3 bytes here) to its bytes, and a block
            // closes when the next record (120 bytes) does not fit.
            let most = (bytes + 3 * seq as usize).div_ceil(BLOCK_BYTES - 120);
            assert!(entries <= most + 1, "{entries} blocks for {bytes} bytes");
            assert!(full + 1 >= entries, "{full} of {entries} blocks full");
        }
    }
}
