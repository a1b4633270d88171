//! The durable store: every uplink lands here before any stream sees it.
//!
//! Layout in one sled database (`[storage] path`):
//!
//! | tree          | key                  | value                          |
//! |---------------|----------------------|--------------------------------|
//! | `meta`        | `"schema"`           | `lorastream-store-v1`          |
//! | `devices`     | DevEUI (8 bytes)     | [`SessionState`] (postcard)    |
//! | `devices`     | DevEUI + `d`         | FCntDown (see `sessions.rs`)   |
//! | `otaa`        | DevEUI (+ `p`)       | joined / pending OTAA session  |
//! | `otaa`        | DevEUI + `n` / + `j` | used DevNonces / last JoinNonce |
//! | `down`        | DevEUI + sequence    | [`DownlinkItem`](crate::model::DownlinkItem) |
//! | `q:{stream}`  | sequence (u64, BE)   | [`Record`] (postcard)          |
//!
//! Each stream has its own queue tree, so a dead stream's backlog never blocks another (mirror
//! streams), and a record leaves a queue only through [`Queue::ack`], which streams call when
//! their destination acknowledged it (MQTT PUBACK, HTTP 2xx, a written line). Sequence numbers
//! only grow, so key order is arrival order and per-device order is kept.
//!
//! Durability: sled writes to its log at once and fsyncs every `flush_every_ms`; with `0`,
//! [`Store::append`] fsyncs before it returns, so an uplink counts as queued only once it is on
//! disk. A store that cannot be opened is moved aside (never deleted) and a fresh one is created.
//!
//! `sled::Db::flush` alone is not an fsync: it writes sled's buffers and calls
//! `sync_file_range(2)`, which makes no promise after a power cut (no metadata, no disk cache;
//! see its man page). [`Store::fsync`] therefore follows it with `fdatasync` of sled's data file.
//! Found by the power-cut test (`tests/powercut.rs`, docs/powercut.md).

mod downlinks;
mod queue;
mod sessions;

pub use queue::{Queue, QueueStats};
pub use sessions::OtaaSession;

use crate::config::{StorageConfig, WhenFull};
use crate::lorawan::session::SessionState;
use crate::model::{Eui64, Record};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

const SCHEMA: &[u8] = b"lorastream-store-v1";
/// The file in `[storage] path` where sled keeps its log and pages.
const SLED_DATA_FILE: &str = "db";
const QUEUE_PREFIX: &str = "q:";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O error: {0}")]
    Sled(#[from] sled::Error),
    #[error("cannot encode record: {0}")]
    Encode(#[from] postcard::Error),
    #[error("store at {path} was written by something else (schema {found:?}); move it away")]
    Schema { path: PathBuf, found: String },
    #[error("cannot fsync the store file {path}: {source} (is the disk full or failing?)")]
    Sync {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot move the unreadable store {path} aside: {source}")]
    Quarantine {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why a record did not enter (or left) a queue without being delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// `max_bytes` reached with `when_full = "drop_oldest"`: the oldest record made room.
    QueueFullOldest,
    /// `max_bytes` reached with `when_full = "reject_new"`: the new record was refused.
    QueueFullRejected,
    /// The record could not be decoded (corruption); it was removed.
    Corrupt,
    /// The store could not write (disk full, I/O error).
    WriteFailed,
    /// Older than `[storage] max_age`.
    Expired,
    /// The destination refused it for good (an HTTP 4xx with `on_client_error = "drop"`).
    DeadLetter,
    /// The destination can never take it (e.g. over Azure IoT Hub's 256 KB message limit).
    TooLarge,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFullOldest => "queue_full_drop_oldest",
            DropReason::QueueFullRejected => "queue_full_reject_new",
            DropReason::Corrupt => "corrupt",
            DropReason::WriteFailed => "write_failed",
            DropReason::Expired => "expired",
            DropReason::DeadLetter => "dead_letter",
            DropReason::TooLarge => "too_large",
        }
    }
}

/// What happened on open, for the log and `/health`.
#[derive(Debug, Default, Clone)]
pub struct OpenReport {
    /// Where an unreadable store was moved.
    pub quarantined: Option<PathBuf>,
    /// Queues of streams no longer in the config, freed: (name, records).
    pub removed_queues: Vec<(String, u64)>,
}

pub(crate) struct Shared {
    pub(crate) total_bytes: AtomicU64,
    pub(crate) max_bytes: u64,
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    devices: sled::Tree,
    otaa: sled::Tree,
    down: sled::Tree,
    queues: Arc<RwLock<BTreeMap<String, Queue>>>,
    shared: Arc<Shared>,
    next_seq: Arc<AtomicU64>,
    flush_each_append: bool,
    /// sled's data file, opened once more so that [`Store::fsync`] can fdatasync it.
    data_file: Arc<(PathBuf, std::fs::File)>,
}

/// One record to append and the queues it goes to.
pub struct Entry<'a> {
    pub record: &'a Record,
    pub queues: &'a [usize],
}

/// Result of an append.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Record copies written (one per queue).
    pub written: u64,
    /// Copies refused (`reject_new`) and oldest copies evicted (`drop_oldest`).
    pub rejected: u64,
    pub evicted: u64,
}

impl Store {
    /// Open (or create) the store and the queues named in `streams` (name, when_full).
    /// Queues of streams that are no longer configured are removed.
    pub fn open(
        cfg: &StorageConfig,
        streams: &[(String, WhenFull)],
    ) -> Result<(Store, OpenReport), StoreError> {
        let mut report = OpenReport::default();
        let db = match open_db(cfg) {
            Ok(db) => db,
            Err(e) => {
                // Never delete: move aside so the data can still be examined or recovered.
                let aside = quarantine_path(&cfg.path);
                tracing::error!(
                    path = %cfg.path.display(),
                    moved_to = %aside.display(),
                    error = %e,
                    "store cannot be opened; moving it aside and starting with an empty store"
                );
                std::fs::rename(&cfg.path, &aside).map_err(|source| StoreError::Quarantine {
                    path: cfg.path.clone(),
                    source,
                })?;
                report.quarantined = Some(aside);
                open_db(cfg)?
            }
        };
        // sled creates its directory and files but never fsyncs a directory: make their names
        // (and a quarantine rename) durable, or a power cut could take the whole store along on
        // filesystems that do not commit names with file data (POSIX asks for this fsync).
        sync_dir(&cfg.path);
        if let Some(parent) = cfg.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent);
        }
        let meta = db.open_tree("meta")?;
        match meta.get("schema")? {
            None => {
                meta.insert("schema", SCHEMA)?;
            }
            Some(v) if v.as_ref() == SCHEMA => {}
            Some(v) => {
                return Err(StoreError::Schema {
                    path: cfg.path.clone(),
                    found: String::from_utf8_lossy(&v).into_owned(),
                })
            }
        }
        let devices = db.open_tree("devices")?;
        let otaa = db.open_tree("otaa")?;
        let down = db.open_tree("down")?;

        // Free the backlog of streams that were removed from the config.
        for name in db.tree_names() {
            let Some(q) = name.strip_prefix(QUEUE_PREFIX.as_bytes()) else {
                continue;
            };
            let q = String::from_utf8_lossy(q).into_owned();
            if !streams.iter().any(|(n, _)| *n == q) {
                let n = db.open_tree(&name)?.len() as u64;
                db.drop_tree(&name)?;
                tracing::warn!(stream = %q, records = n, "stream no longer configured: its queue was removed");
                report.removed_queues.push((q, n));
            }
        }

        let shared = Arc::new(Shared {
            total_bytes: AtomicU64::new(0),
            max_bytes: cfg.max_bytes,
        });
        let mut queues = BTreeMap::new();
        let mut next_seq = 0u64;
        for (name, when_full) in streams {
            let tree = db.open_tree(format!("{QUEUE_PREFIX}{name}"))?;
            let q = Queue::open(name.clone(), tree, *when_full, shared.clone())?;
            next_seq = next_seq.max(q.last_seq().map(|s| s + 1).unwrap_or(0));
            queues.insert(name.clone(), q);
        }
        let data_path = cfg.path.join(SLED_DATA_FILE);
        let data_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data_path)
            .map_err(|source| StoreError::Sync {
                path: data_path.clone(),
                source,
            })?;
        let store = Store {
            db,
            devices,
            otaa,
            down,
            queues: Arc::new(RwLock::new(queues)),
            shared,
            next_seq: Arc::new(AtomicU64::new(next_seq)),
            flush_each_append: cfg.flush_every_ms == 0,
            data_file: Arc::new((data_path, data_file)),
        };
        Ok((store, report))
    }

    /// The queue of a stream.
    pub fn queue(&self, name: &str) -> Option<Queue> {
        self.queues.read().ok()?.get(name).cloned()
    }

    /// Position of a stream's queue in [`Store::queues`] (the index [`Entry::queues`] takes).
    pub fn queue_index(&self, name: &str) -> Option<usize> {
        self.queues.read().ok()?.keys().position(|k| k == name)
    }

    /// All queues, in name order.
    pub fn queues(&self) -> Vec<Queue> {
        self.queues
            .read()
            .map(|q| q.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Queued bytes over all streams.
    pub fn total_bytes(&self) -> u64 {
        self.shared.total_bytes.load(Ordering::Relaxed)
    }

    /// Append records to their queues and save session counters, then (with
    /// `flush_every_ms = 0`) fsync. `queues` indexes are positions in [`Store::queues`].
    /// Streams are woken only after the data is in the store.
    pub async fn append(
        &self,
        entries: &[Entry<'_>],
        sessions: &[(Eui64, SessionState)],
    ) -> Result<Appended, StoreError> {
        let queues = self.queues();
        let mut batches: Vec<Option<sled::Batch>> = vec![None; queues.len()];
        let mut incoming: Vec<(u64, u64)> = vec![(0, 0); queues.len()]; // (records, bytes)
        let mut keys: Vec<Vec<(u64, u64)>> = vec![Vec::new(); queues.len()]; // (order key, seq)
        let mut out = Appended::default();
        for e in entries {
            let bytes = postcard::to_stdvec(e.record)?;
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            for &qi in e.queues {
                let Some(q) = queues.get(qi) else { continue };
                let size = bytes.len() as u64;
                match q.make_room(size, &queues)? {
                    queue::Room::Ok { evicted } => out.evicted += evicted,
                    queue::Room::Rejected => {
                        out.rejected += 1;
                        continue;
                    }
                }
                // Reserve the bytes now so the next record's room check sees them.
                self.shared.total_bytes.fetch_add(size, Ordering::Relaxed);
                batches[qi]
                    .get_or_insert_with(sled::Batch::default)
                    .insert(&seq.to_be_bytes(), bytes.as_slice());
                incoming[qi].0 += 1;
                incoming[qi].1 += size;
                keys[qi].push((e.record.order_key(), seq));
                out.written += 1;
            }
        }
        let mut failed: Option<StoreError> = None;
        for (qi, batch) in batches.into_iter().enumerate() {
            let Some(batch) = batch else { continue };
            let q = &queues[qi];
            let (n, b) = incoming[qi];
            match q.tree().apply_batch(batch) {
                Ok(()) => {
                    q.account_added(n, b);
                    q.note_keys(&keys[qi]);
                }
                Err(e) => {
                    self.shared.total_bytes.fetch_sub(b, Ordering::Relaxed);
                    q.count_drop(DropReason::WriteFailed, n);
                    out.written -= n;
                    failed = Some(e.into());
                }
            }
        }
        if !sessions.is_empty() {
            let mut batch = sled::Batch::default();
            for (eui, st) in sessions {
                batch.insert(&eui.0, postcard::to_stdvec(st)?);
            }
            if let Err(e) = self.devices.apply_batch(batch) {
                failed = Some(e.into());
            }
        }
        if self.flush_each_append && out.written > 0 {
            self.fsync().await?;
        }
        for (qi, (n, _)) in incoming.iter().enumerate() {
            if *n > 0 {
                queues[qi].wake();
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Drop queued records received before `cutoff_us` (Unix µs) from every queue; returns how
    /// many. Queues are in arrival order, so only their heads are looked at.
    pub fn expire(&self, cutoff_us: i64) -> Result<u64, StoreError> {
        let mut n = 0;
        for q in self.queues() {
            n += q.expire_before(cutoff_us)?;
        }
        Ok(n)
    }

    /// fsync, on a blocking thread that we wait for. (Not `sled::Db::flush_async`: its job runs
    /// on sled's own pool and can keep the database alive after the last handle is dropped, so
    /// a store reopened in the same process may briefly see a stale tree list.)
    ///
    /// `db.flush()` writes sled's buffers out (with `sync_file_range`, which is not durable);
    /// the `fdatasync` of the data file that follows is what makes them survive a power cut.
    pub(crate) async fn fsync(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        let file = self.data_file.clone();
        let job = move || -> Result<(), StoreError> {
            db.flush()?;
            file.1.sync_data().map_err(|source| StoreError::Sync {
                path: file.0.clone(),
                source,
            })
        };
        match tokio::task::spawn_blocking(job).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Sled(sled::Error::ReportableBug(
                "flush task failed".into(),
            ))),
        }
    }

    /// fsync everything (graceful stop).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.fsync().await?;
        Ok(())
    }

    /// Bytes sled reports on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

/// Read queue statistics from a store that no daemon is using, changing nothing (no
/// quarantine, no removal of unconfigured queues). Fails if the store is locked.
pub fn inspect(cfg: &StorageConfig) -> Result<Vec<QueueStats>, StoreError> {
    let db = sled::Config::new()
        .path(&cfg.path)
        .cache_capacity(cfg.cache_bytes)
        .open()?;
    let shared = Arc::new(Shared {
        total_bytes: AtomicU64::new(0),
        max_bytes: u64::MAX,
    });
    let mut out = Vec::new();
    for name in db.tree_names() {
        let Some(q) = name.strip_prefix(QUEUE_PREFIX.as_bytes()) else {
            continue;
        };
        let q = String::from_utf8_lossy(q).into_owned();
        let tree = db.open_tree(&name)?;
        out.push(Queue::open(q, tree, WhenFull::DropOldest, shared.clone())?.stats());
    }
    Ok(out)
}

fn open_db(cfg: &StorageConfig) -> Result<sled::Db, sled::Error> {
    let flush = if cfg.flush_every_ms == 0 {
        // We fsync ourselves after each append (Store::fsync); keep sled's timer as a backstop.
        Some(1_000)
    } else {
        Some(cfg.flush_every_ms)
    };
    sled::Config::new()
        .path(&cfg.path)
        .cache_capacity(cfg.cache_bytes)
        .flush_every_ms(flush)
        .mode(sled::Mode::LowSpace)
        .open()
}

/// fsync a directory so that its entries are durable. Best effort: some filesystems refuse
/// to fsync directories (EINVAL), and the store works without it where names are journaled.
fn sync_dir(dir: &Path) {
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        if e.kind() != std::io::ErrorKind::InvalidInput {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot fsync the store directory; a power cut right now could lose the store's file names");
        }
    }
}

fn quarantine_path(p: &Path) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut s = p.as_os_str().to_owned();
    s.push(format!(".corrupt-{secs}"));
    PathBuf::from(s)
}

#[cfg(test)]
mod tests;
