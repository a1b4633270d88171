//! The storage engines behind the store, and the one narrow interface they share.
//!
//! Everything above this file (queues, sessions, downlinks, the journal, group commits) is
//! engine-independent and speaks only these operations on named tables of byte keys and
//! values, sorted by key:
//!
//! | operation | guarantee |
//! |---|---|
//! | [`Backend::commit`] | a [`Batch`] of puts and deletes over any tables is applied all or nothing; with `durable` it is on disk (fsync) when it returns |
//! | [`Backend::get`], [`Backend::range`], [`Backend::prefix`], [`Backend::floor`], [`Backend::last`], [`Backend::scan`] | read the last committed state |
//! | [`Backend::table_names`], [`Backend::drop_table`] | queues of removed streams are freed |
//!
//! It is an enum rather than a trait object: there are exactly two engines, both known at
//! compile time, and a `match` per operation keeps each engine's code in one place without
//! boxing or generic parameters leaking into `Store`/`Queue`. Adding a third engine means one
//! more variant and one more arm per operation.
//!
//! Engines (crate-notes, "sled 0.34.7"):
//! - **sled** 0.34.7: a log-structured B-tree, one sled tree per table, batches applied in a
//!   multi-tree transaction. Unmaintained; its own flush timer is switched off (the store
//!   commits and flushes itself). 8 MiB cache instead of its 1 GiB default, `LowSpace` mode.
//! - **redb** 2.6: a single-file copy-on-write B-tree with checksummed commits. Each durable
//!   commit is `Durability::Immediate` (1-phase commit with checksums: after a crash the newest
//!   commit slot whose checksum verifies is used, so a torn commit falls back to the previous
//!   one). Opening a file that was not closed cleanly runs redb's repair, which re-verifies
//!   every checksum and rebuilds the allocator state.
//!
//! Both poison themselves after an I/O error (sled keeps a global error; redb answers
//! `PreviousIo` to every later read and write), so the store reopens the engine after a failed
//! commit (see `Store::reopen`).

use super::StoreError;
use crate::config::{StorageBackend, StorageConfig};
use std::ops::Bound;
use std::path::{Path, PathBuf};

/// File name of the redb database inside `[storage] path`.
pub(crate) const REDB_FILE: &str = "lorastream.redb";
/// sled's data file under `[storage] path` (also without the `sled` feature: a sled store is
/// still recognised, to say what it is instead of starting an empty store beside it).
const SLED_DATA_FILE: &str = "db";

/// A key and its value, as stored.
pub(crate) type Kv = (Vec<u8>, Vec<u8>);

/// Puts and deletes to apply atomically, in the order they were added.
///
/// Kept compact because a checkpoint can carry tens of thousands of operations (the deletes of
/// a draining backlog, the records of a checkpoint, a whole table when migrating): table names
/// are kept once and referred to by index, and every key and value is copied back to back into
/// one buffer, so an operation costs 12 bytes plus its bytes, not three allocations.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    tables: Vec<String>,
    ops: Vec<Op>,
    bytes: Vec<u8>,
}

/// One operation: its table (an index into `Batch::tables`) and the lengths of its key and
/// value in `Batch::bytes` (at the running offset), [`DELETE`] for a delete.
#[derive(Debug, Clone, Copy)]
struct Op {
    table: u32,
    key_len: u32,
    value_len: u32,
}

/// `Op::value_len` of a delete (no value is that long: records and sessions are bounded).
const DELETE: u32 = u32::MAX;

impl Batch {
    pub(crate) fn put(&mut self, table: &str, key: &[u8], value: &[u8]) {
        self.push(table, key, Some(value));
    }
    pub(crate) fn delete(&mut self, table: &str, key: &[u8]) {
        self.push(table, key, None);
    }
    fn push(&mut self, table: &str, key: &[u8], value: Option<&[u8]>) {
        // Consecutive operations nearly always name the same table: look at the last one first.
        let table = match self.ops.last() {
            Some(op) if self.tables[op.table as usize] == table => op.table,
            _ => match self.tables.iter().position(|t| t == table) {
                Some(i) => i as u32,
                None => {
                    self.tables.push(table.to_string());
                    (self.tables.len() - 1) as u32
                }
            },
        };
        // Keys and values are the store's own encodings, bounded far below 4 GiB.
        debug_assert!(
            key.len() < DELETE as usize && value.map_or(0, <[u8]>::len) < DELETE as usize
        );
        self.bytes.extend_from_slice(key);
        let value_len = match value {
            Some(v) => {
                self.bytes.extend_from_slice(v);
                v.len() as u32
            }
            None => DELETE,
        };
        let key_len = key.len() as u32;
        self.ops.push(Op {
            table,
            key_len,
            value_len,
        });
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    pub(crate) fn len(&self) -> usize {
        self.ops.len()
    }
    /// Distinct table names, in first-use order.
    fn tables(&self) -> &[String] {
        &self.tables
    }
    /// The operations in order: (table index, key, value; `None` for a delete).
    fn ops(&self) -> impl Iterator<Item = (usize, &[u8], Option<&[u8]>)> + '_ {
        let mut at = 0usize;
        self.ops.iter().map(move |op| {
            let key = &self.bytes[at..at + op.key_len as usize];
            at += op.key_len as usize;
            let value = (op.value_len != DELETE).then(|| {
                let v = &self.bytes[at..at + op.value_len as usize];
                at += op.value_len as usize;
                v
            });
            (op.table as usize, key, value)
        })
    }
    /// The operations in order, with their table's name.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &[u8], Option<&[u8]>)> + '_ {
        self.ops().map(|(t, k, v)| (self.tables[t].as_str(), k, v))
    }
}

pub(crate) enum Backend {
    /// sled and its data file (`<path>/db`), kept open to fdatasync it: see [`sled_sync`].
    #[cfg(feature = "sled")]
    Sled(sled::Db, SledData),
    Redb(redb::Database),
}

/// sled's data file, opened a second time.
#[cfg(feature = "sled")]
pub(crate) struct SledData {
    path: PathBuf,
    file: std::fs::File,
}

/// Make what sled has written durable. `sled::Db::flush` alone is not an fsync: it writes
/// sled's buffers and calls `sync_file_range(2)`, which promises nothing after a power cut (no
/// metadata, no disk cache; see its man page). The `fdatasync` of the data file that follows is
/// what makes the data survive one. Found by tests/powercut.rs (docs/powercut.md): without it
/// `flush_every_ms = 0` lost up to ~1 s of uplinks and frame counters.
#[cfg(feature = "sled")]
fn sled_sync(db: &sled::Db, data: &SledData) -> Result<(), StoreError> {
    db.flush()?;
    data.file.sync_data().map_err(|source| StoreError::Sync {
        path: data.path.clone(),
        source,
    })
}

fn redb_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Redb(Box::new(e.into()))
}

fn def(name: &str) -> redb::TableDefinition<'_, &'static [u8], &'static [u8]> {
    redb::TableDefinition::new(name)
}

/// Turn "table does not exist" into an empty result for reads.
macro_rules! redb_table {
    ($txn:expr, $name:expr) => {
        match $txn.open_table(def($name)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Default::default()),
            Err(e) => return Err(redb_err(e)),
        }
    };
}

impl Backend {
    /// Open (or create) the engine's files under `cfg.path`.
    pub(crate) fn open(kind: StorageBackend, cfg: &StorageConfig) -> Result<Backend, StoreError> {
        match kind {
            #[cfg(not(feature = "sled"))]
            StorageBackend::Sled => Err(StoreError::EngineMissing {
                path: cfg.path.clone(),
            }),
            #[cfg(feature = "sled")]
            StorageBackend::Sled => {
                let db = sled::Config::new()
                    .path(&cfg.path)
                    .cache_capacity(cfg.cache_bytes)
                    // The store commits and flushes on its own schedule (`flush_every_ms`,
                    // group commits); sled's timer would only add writes.
                    .flush_every_ms(None)
                    .mode(sled::Mode::LowSpace)
                    .open()?;
                let path = cfg.path.join(SLED_DATA_FILE);
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|source| StoreError::Io {
                        path: path.clone(),
                        source,
                    })?;
                Ok(Backend::Sled(db, SledData { path, file }))
            }
            StorageBackend::Redb => {
                std::fs::create_dir_all(&cfg.path).map_err(|source| StoreError::Io {
                    path: cfg.path.clone(),
                    source,
                })?;
                let file = cfg.path.join(REDB_FILE);
                let mut b = redb::Builder::new();
                // redb's default cache is 1 GiB; a gateway has far less memory.
                b.set_cache_size(cfg.cache_bytes.min(usize::MAX as u64) as usize);
                let shown = file.clone();
                b.set_repair_callback(move |s: &mut redb::RepairSession| {
                    tracing::warn!(file = %shown.display(), progress = format!("{:.0}%", s.progress() * 100.0),
                        "store was not closed cleanly; redb is verifying checksums and repairing");
                });
                let db = b.create(&file).map_err(redb_err)?;
                Ok(Backend::Redb(db))
            }
        }
    }

    /// Which files of `path` belong to an engine (to detect a store written by the other one).
    pub(crate) fn present(kind: StorageBackend, path: &Path) -> bool {
        match kind {
            StorageBackend::Sled => {
                path.join("conf").is_file() && path.join(SLED_DATA_FILE).is_file()
            }
            StorageBackend::Redb => path.join(REDB_FILE).is_file(),
        }
    }

    /// The engine's own files under `path` (moved aside together by a migration).
    pub(crate) fn files(kind: StorageBackend, path: &Path) -> Vec<PathBuf> {
        let names: Vec<PathBuf> = match std::fs::read_dir(path) {
            Ok(d) => d.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
            Err(_) => return Vec::new(),
        };
        names
            .into_iter()
            .filter(|p| {
                let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                match kind {
                    StorageBackend::Sled => {
                        matches!(n, "conf" | "db" | "blobs") || n.starts_with("snap.")
                    }
                    StorageBackend::Redb => n == REDB_FILE,
                }
            })
            .collect()
    }

    pub(crate) fn table_names(&self) -> Result<Vec<String>, StoreError> {
        match self {
            #[cfg(feature = "sled")]
            Backend::Sled(db, _) => Ok(db
                .tree_names()
                .into_iter()
                .map(|n| String::from_utf8_lossy(&n).into_owned())
                .filter(|n| n != "__sled__default")
                .collect()),
            Backend::Redb(db) => {
                use redb::TableHandle;
                let r = db.begin_read().map_err(redb_err)?;
                let names = r.list_tables().map_err(redb_err)?;
                Ok(names.map(|h| h.name().to_string()).collect())
            }
        }
    }

    pub(crate) fn drop_table(&self, name: &str) -> Result<(), StoreError> {
        match self {
            #[cfg(feature = "sled")]
            Backend::Sled(db, data) => {
                db.drop_tree(name)?;
                sled_sync(db, data)?;
                Ok(())
            }
            Backend::Redb(db) => {
                let w = db.begin_write().map_err(redb_err)?;
                w.delete_table(def(name)).map_err(redb_err)?;
                w.commit().map_err(redb_err)
            }
        }
    }

    pub(crate) fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            #[cfg(feature = "sled")]
            Backend::Sled(db, _) => Ok(db.open_tree(table)?.get(key)?.map(|v| v.to_vec())),
            Backend::Redb(db) => {
                let r = db.begin_read().map_err(redb_err)?;
                let t = redb_table!(r, table);
                Ok(t.get(key).map_err(redb_err)?.map(|v| v.value().to_vec()))
            }
        }
    }

    /// Up to `max` entries from `start` on, in key order.
    pub(crate) fn range(
        &self,
        table: &str,
        start: Bound<&[u8]>,
        max: usize,
    ) -> Result<Vec<Kv>, StoreError> {
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        match self {
            #[cfg(feature = "sled")]
            Backend::Sled(db, _) => {
                let t = db.open_tree(table)?;
                for kv in t.range::<&[u8], _>((start, Bound::Unbounded)) {
                    let (k, v) = kv?;
                    out.push((k.to_vec(), v.to_vec()));
                    if out.len() >= max {
                        break;
                    }
                }
            }
            Backend::Redb(db) => {
                let r = db.begin_read().map_err(redb_err)?;
                let t = redb_table!(r, table);
                for kv in t
                    .range::<&[u8]>((start, Bound::Unbounded))
                    .map_err(redb_err)?
                {
                    let (k, v) = kv.map_err(redb_err)?;
                    out.push((k.value().to_vec(), v.value().to_vec()));
                    if out.len() >= max {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Every entry whose key starts with `prefix`, in key order.
    pub(crate) fn prefix(&self, table: &str, prefix: &[u8]) -> Result<Vec<Kv>, StoreError> {
        let mut out = Vec::new();
        self.scan_from(table, prefix, |k, v| {
            if !k.starts_with(prefix) {
                return false;
            }
            out.push((k.to_vec(), v.to_vec()));
            true
        })?;
        Ok(out)
    }

    /// Visit every entry in key order (used once on open to rebuild counters).
    pub(crate) fn scan(
        &self,
        table: &str,
        mut f: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), StoreError> {
        self.scan_from(table, &[], |k, v| {
            f(k, v);
            true
        })
    }

    /// Visit entries from `from` on until `f` returns false.
    fn scan_from(
        &self,
        table: &str,
        from: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        match self {
            #[cfg(feature = "sled")]
            Backend::Sled(db, _) => {
                for kv in db.open_tree(table)?.range(from..) {
                    let (k, v) = kv?;
                    if !f(&k, &v) {
                        break;
                    }
                }
            }
            Backend::Redb(db) => {
                let r = db.begin_read().map_err(redb_err)?;
                let t = redb_table!(r, table);
                for kv in t.range::<&[u8]>(from..).map_err(redb_err)? {
                    let (k, v) = kv.map_err(redb_err)?;
                    if !f(k.value(), v.value()) {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// The entry with the largest key at or below `key`.
    pub(crate) fn floor(&self, table: &str, key: &[u8]) -> Result<Option<Kv>, StoreError> {
        match self {
            #[cfg(feature = "sled")]
            Backend::Sled(db, _) => Ok(db
                .open_tree(table)?
                .range(..=key)
                .next_back()
                .transpose()?
                .map(|(k, v)| (k.to_vec(), v.to_vec()))),
            Backend::Redb(db) => {
                let r = db.begin_read().map_err(redb_err)?;
                let t = redb_table!(r, table);
                let found = t
                    .range::<&[u8]>(..=key)
                    .map_err(redb_err)?
                    .next_back()
                    .transpose()
                    .map_err(redb_err)?
                    .map(|(k, v)| (k.value().to_vec(), v.value().to_vec()));
                Ok(found)
            }
        }
    }

    /// The entry with the largest key.
    pub(crate) fn last(&self, table: &str) -> Result<Option<Kv>, StoreError> {
        match self {
            #[cfg(feature = "sled")]
            Backend::Sled(db, _) => Ok(db
                .open_tree(table)?
                .last()?
                .map(|(k, v)| (k.to_vec(), v.to_vec()))),
            Backend::Redb(db) => {
                use redb::ReadableTable;
                let r = db.begin_read().map_err(redb_err)?;
                let t = redb_table!(r, table);
                let last = t
                    .last()
                    .map_err(redb_err)?
                    .map(|(k, v)| (k.value().to_vec(), v.value().to_vec()));
                Ok(last)
            }
        }
    }

    /// Apply `batch` atomically; with `durable`, fsync before returning.
    pub(crate) fn commit(&self, batch: &Batch, durable: bool) -> Result<(), StoreError> {
        match self {
            #[cfg(feature = "sled")]
            Backend::Sled(db, data) => {
                if !batch.is_empty() {
                    let trees = batch
                        .tables()
                        .iter()
                        .map(|n| db.open_tree(n))
                        .collect::<Result<Vec<_>, _>>()?;
                    let refs: Vec<&sled::Tree> = trees.iter().collect();
                    use sled::transaction::{ConflictableTransactionError, Transactional};
                    refs.as_slice()
                        .transaction(|views| {
                            for (i, k, v) in batch.ops() {
                                match v {
                                    Some(v) => {
                                        views[i].insert(k, v)?;
                                    }
                                    None => {
                                        views[i].remove(k)?;
                                    }
                                }
                            }
                            Ok::<(), ConflictableTransactionError<()>>(())
                        })
                        .map_err(|e| match e {
                            sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
                            sled::transaction::TransactionError::Abort(()) => StoreError::Sled(
                                sled::Error::ReportableBug("transaction aborted".into()),
                            ),
                        })?;
                }
                if durable {
                    sled_sync(db, data)?;
                }
                Ok(())
            }
            Backend::Redb(db) => {
                if batch.is_empty() && !durable {
                    return Ok(());
                }
                let mut w = db.begin_write().map_err(redb_err)?;
                w.set_durability(if durable {
                    redb::Durability::Immediate
                } else {
                    redb::Durability::None
                });
                for (i, name) in batch.tables().iter().enumerate() {
                    let mut t = w.open_table(def(name)).map_err(redb_err)?;
                    for (_, k, v) in batch.ops().filter(|(t, _, _)| *t == i) {
                        match v {
                            Some(v) => {
                                t.insert(k, v).map_err(redb_err)?;
                            }
                            None => {
                                t.remove(k).map_err(redb_err)?;
                            }
                        }
                    }
                }
                w.commit().map_err(redb_err)
            }
        }
    }

    /// Bytes the engine occupies on disk.
    pub(crate) fn size_on_disk(&self, path: &Path) -> u64 {
        match self {
            #[cfg(feature = "sled")]
            Backend::Sled(db, _) => db.size_on_disk().unwrap_or(0),
            Backend::Redb(_) => std::fs::metadata(path.join(REDB_FILE))
                .map(|m| m.len())
                .unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The compact batch gives back every operation as it was added, in order, whatever the
    /// mix of tables, puts, deletes and empty keys or values; and an engine applies it.
    #[test]
    fn batch_keeps_operations_in_order() {
        let mut b = Batch::default();
        let mut want: Vec<(String, Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        let mut x: u32 = 7;
        for i in 0..2_000u32 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let table = format!("t{}", (x >> 16) % 5);
            let key: Vec<u8> = i.to_be_bytes()[..(x as usize >> 8) % 5].to_vec();
            if x % 3 == 0 {
                b.delete(&table, &key);
                want.push((table, key, None));
            } else {
                let value = vec![(i % 251) as u8; (x as usize >> 4) % 300];
                b.put(&table, &key, &value);
                want.push((table, key, Some(value)));
            }
        }
        assert_eq!(b.len(), want.len());
        assert_eq!(b.tables().len(), 5);
        let got: Vec<(String, Vec<u8>, Option<Vec<u8>>)> = b
            .iter()
            .map(|(t, k, v)| (t.to_string(), k.to_vec(), v.map(<[u8]>::to_vec)))
            .collect();
        assert_eq!(got, want);

        // Applied by redb, the last operation on each key wins.
        let dir = tempfile::tempdir().unwrap();
        let cfg = StorageConfig {
            path: dir.path().to_path_buf(),
            ..StorageConfig::default()
        };
        let engine = Backend::open(StorageBackend::Redb, &cfg).unwrap();
        engine.commit(&b, true).unwrap();
        let mut last: std::collections::BTreeMap<(String, Vec<u8>), Option<Vec<u8>>> =
            Default::default();
        for (t, k, v) in want {
            last.insert((t, k), v);
        }
        for ((t, k), v) in last {
            assert_eq!(engine.get(&t, &k).unwrap(), v, "{t} {k:?}");
        }
    }
}
