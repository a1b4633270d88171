//! The durable store: every uplink lands here before any stream sees it.
//!
//! Layout (tables of one storage engine under `[storage] path`, see `backend.rs`):
//!
//! | table         | key                  | value                          |
//! |---------------|----------------------|--------------------------------|
//! | `meta`        | `"schema"`           | `lorastream-store-v1`          |
//! | `devices`     | DevEUI (8 bytes)     | [`SessionState`] (postcard)    |
//! | `devices`     | DevEUI + `d`         | FCntDown (see `sessions.rs`)   |
//! | `otaa`        | DevEUI (+ `p`)       | joined / pending OTAA session  |
//! | `otaa`        | DevEUI + `n` / + `j` | used DevNonces / last JoinNonce |
//! | `down`        | DevEUI + sequence    | [`DownlinkItem`](crate::model::DownlinkItem) |
//! | `q:{stream}`  | sequence (u64, BE)   | [`Record`] (postcard)          |
//!
//! Each stream has its own queue table, so a dead stream's backlog never blocks another (mirror
//! streams), and a record leaves a queue only through [`Queue::ack`], which streams call when
//! their destination acknowledged it (MQTT PUBACK, HTTP 2xx, a written line). Sequence numbers
//! only grow, so key order is arrival order and per-device order is kept.
//!
//! ## Durability: group commits
//! [`Store::append`] takes one loop iteration of the uplink stage (records for every matching
//! queue plus the devices' new FCntUp) and
//! - with `flush_every_ms = 0`, commits it to the engine in one atomic, fsynced commit before it
//!   returns (and with it every pending delete);
//! - otherwise writes it to the journal (`journal.rs`, one `write(2)`: survives a SIGKILL in the
//!   page cache) and keeps it in memory. The committer ([`Store::run_committer`]) makes each
//!   `flush_every_ms` window durable with one fdatasync of the journal (a power cut loses at
//!   most that window) and commits everything to the engine in one atomic, fsynced commit (a
//!   checkpoint) every [`CHECKPOINT_EVERY`] or [`CHECKPOINT_BYTES`], then deletes the journal
//!   generations it covered and records the newest one in `meta`. An engine commit costs several
//!   pages however little it carries, a journal fsync about one: that is what keeps the bytes
//!   written per uplink low at low rates (docs/benchmarks.md).
//!
//! Acknowledgements are not written at once: they are deletes batched into the next checkpoint
//! (with `flush_every_ms = 0`: the next commit, at the latest after [`LAZY_COMMIT_EVERY`]). A
//! record acknowledged before its checkpoint never reaches the engine. Losing a delete only
//! means an at-least-once redelivery with the same correlation id. Every window in which the
//! journal was written ends with its fsync, also when the cloud has already acknowledged every
//! record of it: the devices' new FCntUp is in the same frames, and a power cut must not let a
//! replayed frame older than the window through (tests/powercut.rs checks exactly that).
//!
//! ## A full or failing disk
//! A commit that fails leaves everything in memory (`unsaved`), so streams keep delivering live
//! traffic; the engine is reopened (sled and redb both refuse all further I/O after an I/O
//! error) and the commit retried with a backoff until the disk takes writes again. Memory held
//! this way is bounded by [`MEMORY_FALLBACK_BYTES`]: beyond it the oldest unsaved records are
//! dropped and counted `write_failed`. A store that cannot be opened is moved aside (never
//! deleted) and a fresh one is created.

mod backend;
mod downlinks;
mod journal;
mod queue;
mod sessions;

pub use queue::{Queue, QueueStats};
pub use sessions::OtaaSession;

use crate::config::{StorageBackend, StorageConfig, WhenFull};
use crate::lorawan::session::SessionState;
use crate::model::{Eui64, Record};
use backend::{Backend, Batch};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

const SCHEMA: &[u8] = b"lorastream-store-v1";
const QUEUE_PREFIX: &str = "q:";
pub(crate) const META: &str = "meta";
pub(crate) const DEVICES: &str = "devices";
pub(crate) const OTAA: &str = "otaa";
pub(crate) const DOWN: &str = "down";
/// `meta` key: the newest journal generation whose content is in the engine.
const JOURNAL_GEN: &[u8] = b"journal_gen";

/// Without a journal (`flush_every_ms = 0`), deletes are committed at least this often.
pub const LAZY_COMMIT_EVERY: Duration = Duration::from_secs(1);
/// Records kept in memory only while the disk refuses writes, all queues together.
pub const MEMORY_FALLBACK_BYTES: u64 = 8 << 20;
/// With group commits, records are made durable each window by an fsync of the journal, and
/// committed to the engine (a checkpoint) this often or when [`CHECKPOINT_BYTES`] wait: an
/// engine commit costs several pages however little it carries (docs/benchmarks.md).
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);
/// Unsaved record bytes that trigger a checkpoint before [`CHECKPOINT_EVERY`].
pub const CHECKPOINT_BYTES: u64 = 2 << 20;
/// Pending deletes above this trigger a commit before [`LAZY_COMMIT_EVERY`].
const MAX_PENDING_DELETES: usize = 50_000;

pub(crate) fn queue_table(stream: &str) -> String {
    format!("{QUEUE_PREFIX}{stream}")
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O error (sled): {0}")]
    Sled(#[from] sled::Error),
    /// Boxed: redb's error type is large and this one travels through every store call.
    #[error("store I/O error (redb): {0}")]
    Redb(Box<redb::Error>),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
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
    #[error("the store at {path} is in use by another process (is a lorastream daemon running?)")]
    Locked { path: PathBuf },
    #[error("the store's disk refuses I/O; it is being reopened (will retry)")]
    Unavailable,
}

impl StoreError {
    /// Another process holds the store: never a reason to move it aside.
    fn is_locked(&self) -> bool {
        match self {
            StoreError::Redb(e) => matches!(**e, redb::Error::DatabaseAlreadyOpen),
            // sled 0.34 reports its failed `try_lock_exclusive` as a plain I/O error.
            StoreError::Sled(sled::Error::Io(e)) => {
                e.to_string().contains("could not acquire lock")
            }
            _ => false,
        }
    }

    /// The disk, not the store, is the problem (full, read-only, no permission): moving a
    /// healthy store aside would only lose its queue. Returned as an error instead (systemd
    /// restarts the daemon; see systemd/lorastream.service).
    fn is_environment(&self) -> bool {
        let io = match self {
            StoreError::Io { source, .. } => Some(source),
            StoreError::Sled(sled::Error::Io(e)) => Some(e),
            StoreError::Redb(e) => match &**e {
                redb::Error::Io(e) => Some(e),
                _ => None,
            },
            _ => None,
        };
        io.is_some_and(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::StorageFull
                    | std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::ReadOnlyFilesystem
                    | std::io::ErrorKind::QuotaExceeded
            )
        })
    }
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
    /// The disk refused writes and the memory fallback was full (or the daemon stopped).
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
    /// Records and session updates recovered from the journal (a killed daemon's last window).
    pub journal_replayed: u64,
    /// A store of the other engine was copied into this one; its files were kept here.
    pub migrated_from: Option<PathBuf>,
}

/// Health of the disk side, for `/health` and `/metrics`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StoreHealth {
    pub backend: &'static str,
    /// False while commits fail (disk full, I/O error).
    pub writable: bool,
    pub last_error: Option<String>,
    /// Failed writes (commits, journal writes, reopens) since start.
    pub write_failures: u64,
    pub commits: u64,
    /// Queued bytes not yet checkpointed into the engine (journaled; or in memory only while
    /// `writable` is false).
    pub unsaved_bytes: u64,
    pub queued_bytes: u64,
    pub size_on_disk: u64,
}

/// State shared by the store and its queues.
pub(crate) struct Shared {
    pub(crate) total_bytes: AtomicU64,
    pub(crate) max_bytes: u64,
    pub(crate) unsaved_bytes: AtomicU64,
    engine: RwLock<Option<Arc<Backend>>>,
}

impl Shared {
    /// The engine, unless it is being reopened after an I/O error.
    pub(crate) fn engine(&self) -> Option<Arc<Backend>> {
        self.engine.read().ok().and_then(|e| e.clone())
    }
}

#[derive(Default)]
struct Health {
    failed: Option<String>,
    retry_at: Option<Instant>,
    backoff: Duration,
    failures: u64,
    commits: u64,
    last_commit: Option<Instant>,
}

struct Inner {
    cfg: StorageConfig,
    shared: Arc<Shared>,
    queues: BTreeMap<String, Queue>,
    next_seq: AtomicU64,
    /// `Some` with group commits (`flush_every_ms > 0`). Its lock also orders appends against
    /// commit snapshots (see `journal.rs`).
    journal: Option<Mutex<journal::Journal>>,
    /// FCntUp states appended but not committed (devices table key → value).
    sessions: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
    /// One commit at a time.
    commit_lock: Mutex<()>,
    health: Mutex<Health>,
    writable: AtomicBool,
    /// The engine failed an operation: reopen it before the next one (both engines poison
    /// themselves after an I/O error).
    needs_reopen: AtomicBool,
    /// The journal was written since the last commit snapshot.
    journal_dirty: AtomicBool,
    /// The journal was written since its last fsync (or commit snapshot).
    journal_unsynced: AtomicBool,
    /// Last time a change of writability was logged (flapping is logged once per 10 s).
    last_state_log: Mutex<Option<Instant>>,
    /// Asks the committer to commit now (memory filling up).
    kick: Notify,
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// One record to append and the queues it goes to.
pub struct Entry<'a> {
    pub record: &'a Record,
    pub queues: &'a [usize],
}

/// Result of an append.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Record copies queued (one per queue).
    pub written: u64,
    /// Copies refused (`reject_new`) and oldest copies evicted (`drop_oldest`).
    pub rejected: u64,
    pub evicted: u64,
    /// Copies queued in memory only because the disk refused the write (they are delivered
    /// if the destination is up, and written when the disk takes writes again).
    pub unsaved: u64,
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

fn other(kind: StorageBackend) -> StorageBackend {
    match kind {
        StorageBackend::Sled => StorageBackend::Redb,
        StorageBackend::Redb => StorageBackend::Sled,
    }
}

/// Open the configured engine; if only the other engine's files are there, copy everything
/// into the configured one and move the old files into `<path>/migrated-from-<engine>-<time>`.
fn open_engine(cfg: &StorageConfig, report: &mut OpenReport) -> Result<Backend, StoreError> {
    let kind = cfg.backend;
    let old = other(kind);
    if Backend::present(kind, &cfg.path) || !Backend::present(old, &cfg.path) {
        return Backend::open(kind, cfg);
    }
    tracing::warn!(path = %cfg.path.display(), from = old.name(), to = kind.name(),
        "the store was written by the other engine; migrating it");
    let src = Backend::open(old, cfg)?;
    let dst = Backend::open(kind, cfg)?;
    let mut copied = 0u64;
    for table in src.table_names()? {
        let mut batch = Batch::default();
        src.scan(&table, |k, v| batch.put(&table, k, v))?;
        copied += batch.len() as u64;
        dst.commit(&batch, true)?;
    }
    drop(src);
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let aside = cfg
        .path
        .join(format!("migrated-from-{}-{secs}", old.name()));
    let io = |source| StoreError::Io {
        path: aside.clone(),
        source,
    };
    std::fs::create_dir_all(&aside).map_err(io)?;
    for f in Backend::files(old, &cfg.path) {
        if let Some(name) = f.file_name() {
            std::fs::rename(&f, aside.join(name)).map_err(io)?;
        }
    }
    tracing::warn!(entries = copied, kept_in = %aside.display(), "store migrated");
    report.migrated_from = Some(aside);
    Ok(dst)
}

impl Store {
    /// Open (or create) the store and the queues named in `streams` (name, when_full).
    /// Queues of streams that are no longer configured are removed; the journal of a killed
    /// daemon is replayed.
    pub fn open(
        cfg: &StorageConfig,
        streams: &[(String, WhenFull)],
    ) -> Result<(Store, OpenReport), StoreError> {
        let mut report = OpenReport::default();
        // sled's background threads can hold its lock for a moment after the last handle of a
        // store closed in this same process (tests, the reopen after an I/O error): wait up to
        // a second before calling the store busy.
        let mut opened = open_engine(cfg, &mut report);
        for _ in 0..20 {
            match &opened {
                Err(e) if e.is_locked() => {
                    std::thread::sleep(Duration::from_millis(50));
                    opened = open_engine(cfg, &mut report);
                }
                _ => break,
            }
        }
        let engine = match opened {
            Ok(e) => e,
            Err(e) if e.is_locked() => {
                return Err(StoreError::Locked {
                    path: cfg.path.clone(),
                })
            }
            Err(e) if e.is_environment() => {
                tracing::error!(path = %cfg.path.display(), error = %e,
                    "cannot open the store because of its disk (full, read-only or no permission); it is left as it is");
                return Err(e);
            }
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
                open_engine(cfg, &mut report)?
            }
        };
        // Engines create their directory and files but do not fsync a directory: make the names
        // (and a quarantine rename) durable, or a power cut could take the whole store along on
        // filesystems that do not commit names with file data (POSIX asks for this fsync).
        // Found by tests/powercut.rs with LORASTREAM_POWERCUT_FS=strict (docs/powercut.md).
        sync_dir(&cfg.path);
        if let Some(parent) = cfg.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent);
        }
        match engine.get(META, b"schema")? {
            None => {
                let mut b = Batch::default();
                b.put(META, b"schema", SCHEMA);
                engine.commit(&b, true)?;
            }
            Some(v) if v == SCHEMA => {}
            Some(v) => {
                return Err(StoreError::Schema {
                    path: cfg.path.clone(),
                    found: String::from_utf8_lossy(&v).into_owned(),
                })
            }
        }

        // The last window of a daemon that was killed: apply it (puts are idempotent; later
        // frames win for session counters).
        let committed_gen = engine
            .get(META, JOURNAL_GEN)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_be_bytes);
        let (puts, last_gen) = journal::replay(&cfg.path, committed_gen);
        if !puts.is_empty() {
            let mut b = Batch::default();
            for (t, k, v) in &puts {
                b.put(t, k, v);
            }
            engine.commit(&b, true)?;
            report.journal_replayed = puts.len() as u64;
            tracing::warn!(
                entries = puts.len(),
                "recovered the last group-commit window from the journal"
            );
        }
        if let Some(g) = last_gen {
            journal::remove_upto(&cfg.path, g);
        }

        // Free the backlog of streams that were removed from the config.
        for name in engine.table_names()? {
            let Some(q) = name.strip_prefix(QUEUE_PREFIX) else {
                continue;
            };
            if !streams.iter().any(|(n, _)| n == q) {
                let mut n = 0u64;
                engine.scan(&name, |_, _| n += 1)?;
                engine.drop_table(&name)?;
                tracing::warn!(stream = %q, records = n, "stream no longer configured: its queue was removed");
                report.removed_queues.push((q.to_string(), n));
            }
        }

        let shared = Arc::new(Shared {
            total_bytes: AtomicU64::new(0),
            max_bytes: cfg.max_bytes,
            unsaved_bytes: AtomicU64::new(0),
            engine: RwLock::new(None),
        });
        let mut queues = BTreeMap::new();
        let mut next_seq = 0u64;
        for (name, when_full) in streams {
            let q = Queue::open(name.clone(), &engine, *when_full, shared.clone())?;
            queues.insert(name.clone(), q);
            if let Some((k, _)) = engine.last(&queue_table(name))? {
                if let Ok(b) = <[u8; 8]>::try_from(k.as_slice()) {
                    next_seq = next_seq.max(u64::from_be_bytes(b) + 1);
                }
            }
        }
        // Downlink keys use the same counter: never reuse one of theirs either.
        engine.scan(DOWN, |k, _| {
            if let Some(b) = k.get(8..16).and_then(|s| <[u8; 8]>::try_from(s).ok()) {
                next_seq = next_seq.max(u64::from_be_bytes(b) + 1);
            }
        })?;
        if let Ok(mut e) = shared.engine.write() {
            *e = Some(Arc::new(engine));
        }
        let journal =
            (cfg.flush_every_ms > 0).then(|| Mutex::new(journal::Journal::new(&cfg.path)));
        let store = Store {
            inner: Arc::new(Inner {
                cfg: cfg.clone(),
                shared,
                queues,
                next_seq: AtomicU64::new(next_seq),
                journal,
                sessions: Mutex::new(BTreeMap::new()),
                commit_lock: Mutex::new(()),
                health: Mutex::new(Health::default()),
                writable: AtomicBool::new(true),
                needs_reopen: AtomicBool::new(false),
                journal_dirty: AtomicBool::new(false),
                journal_unsynced: AtomicBool::new(false),
                last_state_log: Mutex::new(None),
                kick: Notify::new(),
            }),
        };
        Ok((store, report))
    }

    /// The engine in use.
    pub fn backend(&self) -> StorageBackend {
        self.inner.cfg.backend
    }

    /// The queue of a stream.
    pub fn queue(&self, name: &str) -> Option<Queue> {
        self.inner.queues.get(name).cloned()
    }

    /// Position of a stream's queue in [`Store::queues`] (the index [`Entry::queues`] takes).
    pub fn queue_index(&self, name: &str) -> Option<usize> {
        self.inner.queues.keys().position(|k| k == name)
    }

    /// All queues, in name order.
    pub fn queues(&self) -> Vec<Queue> {
        self.inner.queues.values().cloned().collect()
    }

    /// Queued bytes over all streams.
    pub fn total_bytes(&self) -> u64 {
        self.inner.shared.total_bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn next_seq(&self) -> u64 {
        self.inner.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn engine(&self) -> Result<Arc<Backend>, StoreError> {
        self.inner.shared.engine().ok_or(StoreError::Unavailable)
    }

    /// Append records to their queues and save session counters (see the module docs for when
    /// it is on disk). `queues` indexes are positions in [`Store::queues`]. Streams are woken
    /// only after the records are queued. A disk that refuses the write is not an error here:
    /// the records stay queued in memory ([`Appended::unsaved`]).
    pub async fn append(
        &self,
        entries: &[Entry<'_>],
        sessions: &[(Eui64, SessionState)],
    ) -> Result<Appended, StoreError> {
        let queues = self.queues();
        let mut per_queue: Vec<Vec<(u64, Arc<Vec<u8>>)>> = vec![Vec::new(); queues.len()];
        let mut keys: Vec<Vec<(u64, u64)>> = vec![Vec::new(); queues.len()];
        let mut out = Appended::default();
        for e in entries {
            let bytes = Arc::new(postcard::to_stdvec(e.record)?);
            let seq = self.next_seq();
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
                self.inner
                    .shared
                    .total_bytes
                    .fetch_add(size, Ordering::Relaxed);
                per_queue[qi].push((seq, bytes.clone()));
                keys[qi].push((e.record.order_key(), seq));
                out.written += 1;
            }
        }
        let mut session_puts = Vec::with_capacity(sessions.len());
        for (eui, st) in sessions {
            session_puts.push((eui.0.to_vec(), postcard::to_stdvec(st)?));
        }
        if out.written == 0 && session_puts.is_empty() {
            return Ok(out);
        }

        let writable = self.inner.writable.load(Ordering::Relaxed);
        match &self.inner.journal {
            Some(j) => {
                // Journal first, then memory, under the journal lock (a commit snapshot is
                // taken under the same lock, so no record is in neither).
                let mut j = j.lock().unwrap_or_else(|p| p.into_inner());
                // While the disk refuses writes, records stay in memory only (no journal file
                // per failed attempt); the committer writes them once it can.
                if writable {
                    // The frame borrows the encoded records: they are not copied again.
                    let seq_keys: Vec<Vec<[u8; 8]>> = per_queue
                        .iter()
                        .map(|recs| recs.iter().map(|(seq, _)| seq.to_be_bytes()).collect())
                        .collect();
                    let mut frame: Vec<journal::PutRef> = Vec::new();
                    for (qi, recs) in per_queue.iter().enumerate() {
                        let table = queues[qi].table();
                        for ((_, v), k) in recs.iter().zip(&seq_keys[qi]) {
                            frame.push((table, k.as_slice(), v.as_slice()));
                        }
                    }
                    for (k, v) in &session_puts {
                        frame.push((DEVICES, k.as_slice(), v.as_slice()));
                    }
                    self.inner.journal_dirty.store(true, Ordering::Relaxed);
                    self.inner.journal_unsynced.store(true, Ordering::Relaxed);
                    if let Err(e) = j.write(&frame) {
                        out.unsaved = out.written;
                        self.note_failure(&format!("journal write: {e}"), false);
                    }
                }
                self.stage(&queues, per_queue, &keys, session_puts);
            }
            None => {
                self.stage(&queues, per_queue, &keys, session_puts);
                if writable {
                    let s = self.clone();
                    let r = tokio::task::spawn_blocking(move || s.commit_blocking()).await;
                    if !matches!(r, Ok(Ok(_))) {
                        out.unsaved = out.written;
                    }
                } else {
                    out.unsaved = out.written;
                }
            }
        }
        if !self.inner.writable.load(Ordering::Relaxed) {
            out.unsaved = out.written;
            self.shed_memory();
        } else if self.inner.shared.unsaved_bytes.load(Ordering::Relaxed)
            > MEMORY_FALLBACK_BYTES / 2
        {
            self.inner.kick.notify_one();
        }
        for (qi, k) in keys.iter().enumerate() {
            if !k.is_empty() {
                queues[qi].wake();
            }
        }
        Ok(out)
    }

    fn stage(
        &self,
        queues: &[Queue],
        per_queue: Vec<Vec<(u64, Arc<Vec<u8>>)>>,
        keys: &[Vec<(u64, u64)>],
        session_puts: Vec<(Vec<u8>, Vec<u8>)>,
    ) {
        for (qi, recs) in per_queue.into_iter().enumerate() {
            if !recs.is_empty() {
                queues[qi].insert(recs);
                queues[qi].note_keys(&keys[qi]);
            }
        }
        if !session_puts.is_empty() {
            let mut s = self
                .inner
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for (k, v) in session_puts {
                s.insert(k, v);
            }
        }
    }

    /// Over the memory bound while the disk refuses writes: drop the oldest unsaved records.
    fn shed_memory(&self) {
        let mut queues = self.queues();
        queues.sort_by_key(|q| std::cmp::Reverse(q.unsaved_bytes()));
        for q in queues {
            if self.inner.shared.unsaved_bytes.load(Ordering::Relaxed) <= MEMORY_FALLBACK_BYTES {
                break;
            }
            q.shed_unsaved(MEMORY_FALLBACK_BYTES);
        }
    }

    /// A write failed; with `reschedule` (a commit or reopen), the next retry is backed off.
    fn note_failure(&self, e: &str, reschedule: bool) {
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
        if first && self.log_state_change() {
            tracing::error!(error = %e, path = %self.inner.cfg.path.display(),
                "the store cannot write (disk full or failing); keeping new records in memory (at most {} MiB) and retrying",
                MEMORY_FALLBACK_BYTES >> 20);
        }
    }

    fn note_success(&self) {
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
    fn reopen(&self) -> Result<(), StoreError> {
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
    fn commit_blocking(&self) -> Result<bool, StoreError> {
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
        let queues = self.queues();
        let mut batch = Batch::default();
        let (gen, snaps, sessions) = {
            let mut j = self
                .inner
                .journal
                .as_ref()
                .map(|j| j.lock().unwrap_or_else(|p| p.into_inner()));
            let gen = j.as_mut().map(|j| j.rotate());
            self.inner.journal_dirty.store(false, Ordering::Relaxed);
            self.inner.journal_unsynced.store(false, Ordering::Relaxed);
            let snaps: Vec<_> = queues.iter().map(|q| q.snapshot(&mut batch)).collect();
            let sessions = self
                .inner
                .sessions
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default();
            (gen, snaps, sessions)
        };
        for (k, v) in &sessions {
            batch.put(DEVICES, k, v);
        }
        if let (Some(g), false) = (gen, batch.is_empty()) {
            batch.put(META, JOURNAL_GEN, &g.to_be_bytes());
        }
        if batch.is_empty() && !failed_before {
            // Everything journaled up to `gen` was acknowledged before it needed committing.
            if let (Some(j), Some(g)) = (&self.inner.journal, gen) {
                if let Ok(j) = j.lock() {
                    j.remove_upto(g);
                }
            }
            return Ok(false);
        }
        let t0 = Instant::now();
        let r = engine.commit(&batch, true);
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
                if let (Some(j), Some(g)) = (&self.inner.journal, gen) {
                    if let Ok(j) = j.lock() {
                        j.remove_upto(g);
                    }
                }
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

    /// fdatasync what the journal holds (on a blocking thread, without holding its lock).
    async fn sync_journal(&self) -> std::io::Result<()> {
        let Some(j) = &self.inner.journal else {
            return Ok(());
        };
        // Cleared under the journal lock before the fsync: a write after this point sets it again
        // and is synced by the next window.
        let handle = {
            let mut j = j.lock().unwrap_or_else(|p| p.into_inner());
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
    async fn commit(&self) -> Result<bool, StoreError> {
        let s = self.clone();
        match tokio::task::spawn_blocking(move || s.commit_blocking()).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable),
        }
    }

    /// The group committer: makes each `flush_every_ms` window durable (journal fsync),
    /// checkpoints into the engine every [`CHECKPOINT_EVERY`] or [`CHECKPOINT_BYTES`], and retries
    /// (with a backoff) while the disk refuses writes. Runs until `cancel`; the daemon then calls
    /// [`Store::flush`].
    pub async fn run_committer(self, cancel: tokio_util::sync::CancellationToken) {
        let tick = Duration::from_millis(match self.inner.cfg.flush_every_ms {
            0 => 100,
            n => n,
        });
        let mut last_lazy = Instant::now();
        let mut last_commit = Instant::now();
        // A fixed period (not a sleep after each commit), so the window stays `flush_every_ms`.
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = interval.tick() => {}
                _ = self.inner.kick.notified() => {}
            }
            let (retry_at, failed) = {
                let h = self.inner.health.lock().unwrap_or_else(|p| p.into_inner());
                (h.retry_at, h.failed.is_some())
            };
            if failed && retry_at.is_some_and(|t| Instant::now() < t) {
                continue;
            }
            let (mut puts, mut dels) = (0usize, 0usize);
            for q in self.queues() {
                let (p, d) = q.pending();
                puts += p;
                dels += d;
            }
            let sessions = self.inner.sessions.lock().map(|s| s.len()).unwrap_or(0);
            // Records must be durable at the end of each window (the power-cut contract): an
            // fsync of the journal does that for about one page, an engine commit (checkpoint)
            // costs several, so the engine is committed every CHECKPOINT_EVERY, or earlier with
            // CHECKPOINT_BYTES waiting. A window in which the journal was written ends with its
            // fsync (records and frame counters); deletes and journal clean-up wait for the
            // checkpoint (docs/benchmarks.md). Without a journal (`flush_every_ms = 0`) appends
            // commit themselves and deletes are committed every LAZY_COMMIT_EVERY.
            let journal_dirty = self.inner.journal_dirty.load(Ordering::Relaxed);
            let unsaved = self.inner.shared.unsaved_bytes.load(Ordering::Relaxed);
            let lazy_due = last_lazy.elapsed() >= LAZY_COMMIT_EVERY;
            let checkpoint = match &self.inner.journal {
                None => failed || puts > 0 || sessions > 0 || (dels > 0 && lazy_due),
                Some(_) => {
                    failed
                        || dels > MAX_PENDING_DELETES
                        || unsaved >= CHECKPOINT_BYTES
                        || ((puts > 0 || dels > 0 || sessions > 0 || journal_dirty)
                            && last_commit.elapsed() >= CHECKPOINT_EVERY)
                }
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

    /// Write `batch` at once, durably (session counters, downlinks: things that must be on disk
    /// before the daemon acts on them).
    pub(crate) async fn write_now(&self, batch: Batch) -> Result<(), StoreError> {
        if !batch.is_empty() {
            // A direct write of a devices key supersedes an uncommitted FCntUp for it.
            if let Ok(mut s) = self.inner.sessions.lock() {
                for (t, k, _) in &batch.ops {
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

    /// Commit everything and fsync (graceful stop). Records that still cannot be written are
    /// lost with the process: counted `write_failed`.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let r = self.commit().await.map(|_| ());
        if r.is_err() {
            for q in self.queues() {
                q.shed_unsaved(0);
            }
        }
        r
    }

    /// Bytes the engine occupies on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.inner
            .shared
            .engine()
            .map(|e| e.size_on_disk(&self.inner.cfg.path))
            .unwrap_or(0)
    }

    /// Disk-side health, for `/health` and `/metrics`.
    pub fn health(&self) -> StoreHealth {
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
        }
    }
}

/// Read queue statistics from a store that no daemon is using, changing nothing (no
/// quarantine, no migration, no removal of unconfigured queues, no journal replay; records
/// still in the journal of a killed daemon are counted). Fails if the store is locked.
pub fn inspect(cfg: &StorageConfig) -> Result<Vec<QueueStats>, StoreError> {
    let kind = if Backend::present(cfg.backend, &cfg.path)
        || !Backend::present(other(cfg.backend), &cfg.path)
    {
        cfg.backend
    } else {
        other(cfg.backend)
    };
    if !Backend::present(kind, &cfg.path) {
        return Ok(Vec::new());
    }
    let engine = Arc::new(Backend::open(kind, cfg).map_err(|e| {
        if e.is_locked() {
            StoreError::Locked {
                path: cfg.path.clone(),
            }
        } else {
            e
        }
    })?);
    let shared = Arc::new(Shared {
        total_bytes: AtomicU64::new(0),
        max_bytes: u64::MAX,
        unsaved_bytes: AtomicU64::new(0),
        engine: RwLock::new(Some(engine.clone())),
    });
    let committed_gen = engine
        .get(META, JOURNAL_GEN)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map(u64::from_be_bytes);
    let (puts, _) = journal::replay(&cfg.path, committed_gen);
    let mut out = Vec::new();
    let mut names = engine.table_names()?;
    for (t, _, _) in &puts {
        if !names.contains(t) {
            names.push(t.clone());
        }
    }
    names.sort();
    for name in names {
        let Some(q) = name.strip_prefix(QUEUE_PREFIX) else {
            continue;
        };
        let queue = Queue::open(q.to_string(), &engine, WhenFull::DropOldest, shared.clone())?;
        let (mut n, mut bytes) = (0u64, 0u64);
        let mut seen = std::collections::HashSet::new();
        for (t, k, v) in &puts {
            if *t == name && seen.insert(k.clone()) && engine.get(&name, k)?.is_none() {
                n += 1;
                bytes += v.len() as u64;
            }
        }
        queue.count_extra(n, bytes);
        out.push(queue.stats());
    }
    Ok(out)
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

#[cfg(test)]
mod tests;
