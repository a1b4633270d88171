//! The durable store: every uplink lands here before any stream sees it.
//!
//! Layout (tables of one storage engine under `[storage] path`, see `backend.rs`):
//!
//! | table         | key                  | value                          |
//! |---------------|----------------------|--------------------------------|
//! | `meta`        | `"schema"`           | `lorastream-store-v1`          |
//! | `devices`     | DevEUI (8 bytes)     | [`SessionState`] (postcard)    |
//! | `devices`     | DevEUI + `d`         | FCntDown (see `sessions.rs`)   |
//! | `devices`     | DevEUI + `m`         | MAC state (ADR, pending MAC commands, DevStatus) |
//! | `otaa`        | DevEUI (+ `p`)       | joined / pending OTAA session  |
//! | `otaa`        | DevEUI + `n` / + `j` | used DevNonces / last JoinNonce |
//! | `down`        | DevEUI + sequence    | [`DownlinkItem`](crate::model::DownlinkItem) |
//! | `q:{stream}`  | sequence (u64, BE) of the block's first record | a block of [`Record`]s (`packed.rs`) |
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
//!   checkpoint) when [`CHECKPOINT_BYTES`] of records wait or the journal holds
//!   [`CHECKPOINT_JOURNAL_BYTES`], at the latest [`CHECKPOINT_EVERY`] after the previous one (and
//!   at a graceful stop, [`Store::flush`]), then deletes the journal
//!   generations it covered and records the newest one in `meta`. An engine commit costs several
//!   pages however little it carries, a journal fsync about one: that is what keeps the bytes
//!   written per uplink low at low rates (docs/benchmarks.md).
//!
//! Acknowledgements are not committed at once: they are deletes batched into the next
//! checkpoint (with `flush_every_ms = 0`: the next commit, at the latest after
//! [`LAZY_COMMIT_EVERY`]). A record acknowledged before its checkpoint never reaches the
//! engine. Meanwhile the committer writes each window's acknowledgements to the journal
//! (`acks.<generation>`, one `write(2)` per window, no fsync), so a SIGKILL redelivers at most
//! the acknowledgements of the last `flush_every_ms` window, not everything since the last
//! checkpoint (with 0, deletes ride on the next append's commit, at the latest after a second); a power cut may still redeliver up to a checkpoint's worth. Losing
//! a delete only means an at-least-once redelivery with the same correlation id. Every window in which the
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
//!
//! What survives a kill meanwhile: every append is still journaled (with `flush_every_ms = 0`
//! too, once the engine refused it), and when the disk refuses the journal as well, the
//! journal continues in `[storage] reserve_bytes` of space set aside at open (`journal.rs`,
//! "The reserve"). Only when that is used up (or there is none) are records held in memory
//! alone: they are counted ([`StoreHealth::memory_only`], `/health`, `/metrics`) and the count
//! is kept in a ledger file overwritten in place (`ledger.rs`), so that a restart after a kill
//! reports how many were lost ([`OpenReport::lost_at_last_stop`]).
//!
//! Files and directories of the store are created owner-only (0600/0700) whatever the umask:
//! they hold session keys.
//!
//! ## Files
//!
//! | file | job |
//! |---|---|
//! | `mod.rs` | the store handle, its types, [`Store::append`] |
//! | `open.rs` | opening: engine choice and migration, quarantine, journal replay, [`inspect`], [`drop_queue`] |
//! | `committer.rs` | group commits and checkpoints, retries on a failing disk, [`StoreHealth`] |
//! | `journal.rs` | the append-only journal of the current window, acknowledgements, the reserve |
//! | `ledger.rs` | the count of records held in memory only, for the next start |
//! | `queue.rs` | one stream's queue (overlay of unsaved records and pending deletes) |
//! | `records.rs` | the stored form of a record, versioned; older versions still read |
//! | `backend.rs` | the storage engines (redb, sled) behind seven operations |
//! | `sessions.rs` | frame counters and OTAA sessions, nonces |
//! | `downlinks.rs` | per-device downlink queues |

mod alerts;
mod backend;
mod committer;
mod downlinks;
mod journal;
mod ledger;
mod open;
mod packed;
mod queue;
mod records;
mod sessions;
mod uplink_record;

pub use journal::ReserveState;
pub use open::{drop_queue, inspect};
pub use queue::{Queue, QueueStats};
pub use sessions::OtaaSession;

use crate::config::{StorageBackend, StorageConfig, WhenFull};
use crate::lorawan::session::SessionState;
use crate::model::{Eui64, Record};
use backend::Backend;
use committer::Health;
use std::collections::HashSet;
use std::path::PathBuf;
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
/// committed to the engine (a checkpoint) when [`CHECKPOINT_BYTES`] of records wait or the
/// journal holds [`CHECKPOINT_JOURNAL_BYTES`], and otherwise at the latest this long after the
/// previous checkpoint (if anything is pending): an engine commit costs several pages however
/// little it carries (about 28 KiB with redb), which at a small gateway's 1 uplink/s was 2.8 KB
/// per uplink every 10 s, and is 0.5 KB every 60 s (docs/benchmarks.md). Longer saves little
/// more (0.1 KB per uplink at 300 s, against the journal's own page per window) and widens
/// what a power cut may redeliver: acknowledgements since the last checkpoint are journaled
/// without an fsync (a redelivery with the same correlation id, never a loss).
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(60);
/// Unsaved record bytes (appended, not acknowledged, not in the engine) that trigger a
/// checkpoint before [`CHECKPOINT_EVERY`]: what the store holds in memory besides the engine.
pub const CHECKPOINT_BYTES: u64 = 2 << 20;
/// Journal bytes (records and acknowledgements, acknowledged ones included) that trigger a
/// checkpoint before [`CHECKPOINT_EVERY`]: they bound the journal's disk space and what a
/// start after a kill reads back and holds in memory (4 MiB: about 0.2 s from an SD card). A
/// journaled uplink takes ~300 bytes (its record, its counters, its acknowledgement), so with
/// the cloud acknowledging this is a checkpoint every ~15 s at 1,000 uplinks/s, every ~1 s at
/// 15,000/s; below ~250/s the 60 s come first.
pub const CHECKPOINT_JOURNAL_BYTES: u64 = 4 << 20;
/// Pending deletes above this trigger a commit before [`LAZY_COMMIT_EVERY`].
const MAX_PENDING_DELETES: usize = 50_000;

pub(crate) fn queue_table(stream: &str) -> String {
    format!("{QUEUE_PREFIX}{stream}")
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[cfg(feature = "sled")]
    #[error("store I/O error (sled): {0}")]
    Sled(#[from] sled::Error),
    /// A sled store (or `backend = "sled"`) met a build without the `sled` feature.
    #[error("the store at {path} was written by the sled engine, which this build of lorastream does not include: start a build with the `sled` cargo feature once (it migrates the store to redb), or move {path} away to start an empty store")]
    EngineMissing { path: PathBuf },
    /// Boxed: redb's error type is large and this one travels through every store call.
    #[error("store I/O error (redb): {0}")]
    Redb(Box<redb::Error>),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode: {0}")]
    Encode(#[from] postcard::Error),
    #[error(transparent)]
    Record(#[from] records::RecordError),
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
    #[error("the disk is still full (the journal is writing into its reserve); will retry")]
    NoRoom,
    #[error("the store holds no queue named {0:?} (`lorastream queue` lists them)")]
    NoSuchQueue(String),
    #[error("stream {0:?} is still in the configuration: remove its [[stream]] first (its queue is what it delivers from)")]
    QueueInUse(String),
}

impl StoreError {
    /// Another process holds the store: never a reason to move it aside.
    fn is_locked(&self) -> bool {
        match self {
            StoreError::Redb(e) => matches!(**e, redb::Error::DatabaseAlreadyOpen),
            // sled 0.34 reports its failed `try_lock_exclusive` as a plain I/O error.
            #[cfg(feature = "sled")]
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
        self.io_error_kind().is_some_and(|k| {
            matches!(
                k,
                std::io::ErrorKind::StorageFull
                    | std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::ReadOnlyFilesystem
                    | std::io::ErrorKind::QuotaExceeded
            )
        })
    }

    /// The kind of the operating-system error underneath, if there is one (the daemon explains
    /// a read-only or forbidden store path, e.g. under systemd's `ProtectSystem=strict`).
    pub fn io_error_kind(&self) -> Option<std::io::ErrorKind> {
        let io = match self {
            StoreError::Io { source, .. } => Some(source),
            #[cfg(feature = "sled")]
            StoreError::Sled(sled::Error::Io(e)) => Some(e),
            StoreError::Redb(e) => match &**e {
                redb::Error::Io(e) => Some(e),
                _ => None,
            },
            _ => None,
        };
        io.map(|e| e.kind())
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
    /// Queues of streams no longer in the config, kept on disk until `lorastream queue --drop`
    /// (or the stream comes back): (name, records).
    pub kept_queues: Vec<(String, u64)>,
    /// Records and session updates recovered from the journal (a killed daemon's last window).
    pub journal_replayed: u64,
    /// A store of the other engine was copied into this one; its files were kept here.
    pub migrated_from: Option<PathBuf>,
    /// Records the previous run held in memory only when it ended (the disk was full and the
    /// journal's reserve used up): lost.
    pub lost_at_last_stop: u64,
    /// Acknowledgements recovered from the journal (records not sent again).
    pub acks_replayed: u64,
}

/// Health of the disk side, for `/health` and `/metrics`.
#[derive(Debug, Clone, serde::Serialize)]
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
    /// Record copies held in memory only (the disk refused them, the journal's reserve is used
    /// up or absent): a kill or crash now loses them. 0 normally.
    pub memory_only: u64,
    /// The journal's reserve of disk space for a full disk (`[storage] reserve_bytes`).
    pub reserve: ReserveState,
    /// Bytes of the reserve left while it is in use.
    pub reserve_left_bytes: u64,
    /// Records the previous run lost because it ended while holding them in memory only.
    pub lost_at_last_stop: u64,
}

/// State shared by the store and its queues.
pub(crate) struct Shared {
    pub(crate) total_bytes: AtomicU64,
    pub(crate) max_bytes: u64,
    pub(crate) unsaved_bytes: AtomicU64,
    engine: RwLock<Option<Arc<Backend>>>,
    /// Record copies in memory only (see [`StoreHealth::memory_only`]).
    pub(crate) memory_only: AtomicU64,
    /// Where [`Shared::memory_only`] is kept for the next start (None: could not be made).
    pub(crate) ledger: Mutex<Option<ledger::Ledger>>,
    /// The group committer sleeps without a tick: nothing is waiting for a journal fsync or
    /// to be journaled (see [`Shared::work_arrived`]).
    pub(crate) committer_idle: std::sync::atomic::AtomicBool,
    /// Wakes an idle committer.
    pub(crate) committer_wake: Notify,
}

impl Shared {
    /// Something the committer must handle within its window was just done (a journal write,
    /// an acknowledgement to journal, a failure): wake the committer if it sleeps. The fence
    /// pairs with the committer's between setting `committer_idle` and its last look for work:
    /// either it sees this work, or this sees it idle.
    pub(crate) fn work_arrived(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.committer_idle.load(Ordering::Relaxed)
            && self.committer_idle.swap(false, Ordering::SeqCst)
        {
            self.committer_wake.notify_one();
        }
    }

    /// `n` more (or fewer) record copies are in memory only; the ledger follows at once.
    pub(crate) fn memory_only_changed(&self, added: u64, removed: u64) {
        if added == removed {
            return;
        }
        let now = if added > removed {
            self.memory_only
                .fetch_add(added - removed, Ordering::Relaxed)
                + (added - removed)
        } else {
            let d = removed - added;
            let old = self
                .memory_only
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_sub(d))
                })
                .unwrap_or(0);
            old.saturating_sub(d)
        };
        self.write_ledger(now);
    }

    pub(crate) fn write_ledger(&self, count: u64) {
        if let Ok(l) = self.ledger.lock() {
            if let Some(l) = l.as_ref() {
                if let Err(e) = l.set(count) {
                    tracing::debug!(error = %e, "cannot update the memory-only ledger");
                }
            }
        }
    }

    /// The engine, unless it is being reopened after an I/O error.
    pub(crate) fn engine(&self) -> Option<Arc<Backend>> {
        self.engine.read().ok().and_then(|e| e.clone())
    }
}

struct Inner {
    cfg: StorageConfig,
    shared: Arc<Shared>,
    /// Every queue loaded, in the order they were opened (name order at start, then added by
    /// reloads): positions never change, so [`Entry::queues`] indexes stay valid across
    /// reloads; a removed stream's queue stays in place, detached ([`Queue::is_attached`]).
    queues: RwLock<Arc<[Queue]>>,
    next_seq: AtomicU64,
    /// The journal. Appends go there with group commits (`flush_every_ms > 0`), and with
    /// `flush_every_ms = 0` while the engine refuses writes; acknowledgements always. Its lock
    /// also orders appends and acknowledgements against commit snapshots (see `journal.rs`).
    journal: Mutex<journal::Journal>,
    /// `flush_every_ms > 0`.
    group_commit: bool,
    /// [`OpenReport::lost_at_last_stop`], for `/health`.
    lost_at_last_stop: u64,
    /// FCntUp states appended but not committed (devices table key → value). A hash map: one
    /// or two puts per uplink, and a `BTreeMap` of byte-string keys cost ~900 instructions
    /// each (issue 16); commits write them in key order.
    sessions: Mutex<crate::model::FastMap<Vec<u8>, Vec<u8>>>,
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
    /// How long the commits take (`lorastream_store_commit_seconds`).
    commit_seconds: prometheus_client::metrics::histogram::Histogram,
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl Store {
    /// The durations of this store's commits, for `/metrics` (a handle to the same histogram).
    pub fn commit_seconds(&self) -> prometheus_client::metrics::histogram::Histogram {
        self.inner.commit_seconds.clone()
    }
}

/// A device's state to save with an append: its counters and, when it changed, its MAC state
/// (already encoded, see [`crate::lorawan::mac_state::stored`]).
#[derive(Debug, Clone)]
pub struct DeviceUpdate {
    pub dev_eui: Eui64,
    pub session: SessionState,
    pub mac: Option<Vec<u8>>,
}

/// A record as appended: its sequence number and its encoding (shared by its queues).
type Encoded = (u64, Arc<Vec<u8>>);

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
    /// Copies queued in memory only because the disk refused the write and the journal's
    /// reserve could not take them either (they are delivered if the destination is up, and
    /// written when the disk takes writes again; a kill loses them).
    pub unsaved: u64,
}

impl Store {
    /// The engine in use.
    pub fn backend(&self) -> StorageBackend {
        self.inner.cfg.backend
    }

    /// The queue of a configured stream.
    pub fn queue(&self, name: &str) -> Option<Queue> {
        self.all_queues()
            .iter()
            .find(|q| q.name() == name && q.is_attached())
            .cloned()
    }

    /// Position of a stream's queue among all loaded queues (the index [`Entry::queues`]
    /// takes); stable for the life of the store.
    pub fn queue_index(&self, name: &str) -> Option<usize> {
        self.all_queues().iter().position(|q| q.name() == name)
    }

    /// The queues of configured streams, in name order.
    pub fn queues(&self) -> Vec<Queue> {
        let mut v: Vec<Queue> = self
            .all_queues()
            .iter()
            .filter(|q| q.is_attached())
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name().cmp(b.name()));
        v
    }

    /// Every loaded queue, detached ones included, by [`Store::queue_index`].
    pub(crate) fn all_queues(&self) -> Arc<[Queue]> {
        self.inner
            .queues
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A stream added (or changed) by a reload: its queue, loaded from disk if a removed
    /// stream of that name left one there, attached and with this `when_full`. Returns its
    /// index ([`Store::queue_index`]).
    ///
    /// Loading reads the whole queue (a backlog of a million takes seconds): call it on a
    /// blocking thread. Appends go on meanwhile; the list of queues is locked only to add it.
    pub fn attach_queue(&self, name: &str, when_full: WhenFull) -> Result<usize, StoreError> {
        let attach = |list: &[Queue]| {
            let i = list.iter().position(|q| q.name() == name)?;
            list[i].set_when_full(when_full);
            list[i].set_attached(true);
            Some(i)
        };
        if let Some(i) = attach(&self.all_queues()) {
            return Ok(i);
        }
        let engine = self.engine()?;
        let q = Queue::open(
            name.to_string(),
            &engine,
            when_full,
            self.inner.shared.clone(),
        )?;
        let mut list = self.inner.queues.write().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = attach(&list) {
            // Attached by another caller meanwhile (reloads run one at a time, so not today):
            // theirs counts, this copy's bytes do not.
            self.inner
                .shared
                .total_bytes
                .fetch_sub(q.queued_bytes(), Ordering::Relaxed);
            return Ok(i);
        }
        let mut v: Vec<Queue> = list.iter().cloned().collect();
        v.push(q);
        *list = v.into();
        Ok(list.len() - 1)
    }

    /// A stream removed by a reload: its queue keeps its backlog (committed as usual) and
    /// takes no new records ([`Queue::is_attached`]).
    pub fn detach_queue(&self, name: &str) {
        if let Some(q) = self.all_queues().iter().find(|q| q.name() == name) {
            q.set_attached(false);
        }
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
        devices: &[DeviceUpdate],
    ) -> Result<Appended, StoreError> {
        let queues = self.all_queues();
        let mut per_queue: Vec<Vec<(u64, Arc<Vec<u8>>)>> = vec![Vec::new(); queues.len()];
        let mut keys: Vec<Vec<(u64, u64)>> = vec![Vec::new(); queues.len()];
        let mut out = Appended::default();
        for e in entries {
            let bytes = Arc::new(records::encode(e.record)?);
            let seq = self.next_seq();
            for &qi in e.queues {
                let Some(q) = queues.get(qi) else { continue };
                let size = bytes.len() as u64;
                let before = per_queue[qi].len();
                let room = q.make_room(size, &queues, &mut per_queue[qi])?;
                if per_queue[qi].len() < before {
                    // Records of this very batch gave way (the queue held nothing older).
                    let gone = (before - per_queue[qi].len()) as u64;
                    let kept: HashSet<u64> = per_queue[qi].iter().map(|(s, _)| *s).collect();
                    keys[qi].retain(|(_, s)| kept.contains(s));
                    out.written -= gone;
                }
                match room {
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
        let mut session_puts = Vec::with_capacity(devices.len());
        for d in devices {
            session_puts.push((
                d.dev_eui.0.to_vec(),
                crate::postcard_buf::to_exact_vec(&[], &d.session)?,
            ));
            if let Some(m) = &d.mac {
                session_puts.push((sessions::mac_key(d.dev_eui).to_vec(), m.clone()));
            }
        }
        if out.written == 0 && session_puts.is_empty() {
            return Ok(out);
        }

        let writable = self.inner.writable.load(Ordering::Relaxed);
        let group = self.inner.group_commit;
        // The records of this append, should they have to be journaled after a failed commit
        // (`flush_every_ms = 0`); cheap: the encoded records are shared.
        let fallback = (!group && writable).then(|| (per_queue.clone(), session_puts.clone()));
        // Journaled (group commits, or the engine refuses writes): survives a kill.
        let mut journaled = false;
        {
            // Journal first, then memory, under the journal lock (a commit snapshot is taken
            // under the same lock, so no record is in neither).
            let mut j = self.journal();
            if group || !writable {
                journaled = self.journal_write(&mut j, &queues, &per_queue, &session_puts);
            }
            self.stage(&queues, per_queue, &keys, session_puts);
        }
        if !group {
            let committed = writable && {
                let s = self.clone();
                matches!(
                    tokio::task::spawn_blocking(move || s.commit_blocking()).await,
                    Ok(Ok(_))
                )
            };
            if !committed {
                if let Some((recs, sessions)) = fallback {
                    // The engine refused it: the journal (or its reserve) keeps it across a kill.
                    let mut j = self.journal();
                    journaled = self.journal_write(&mut j, &queues, &recs, &sessions);
                }
            } else {
                journaled = true;
            }
        }
        if !journaled {
            out.unsaved = out.written;
            // Held in memory only: counted, and kept in the ledger for the next start.
            let mut n = 0;
            for (qi, k) in keys.iter().enumerate() {
                n += queues[qi].mark_memory_only(k.iter().map(|(_, seq)| *seq));
            }
            self.inner.shared.memory_only_changed(n, 0);
        }
        if !self.inner.writable.load(Ordering::Relaxed) {
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

    fn journal(&self) -> std::sync::MutexGuard<'_, journal::Journal> {
        self.inner.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Write one frame of these records (and session counters) to the journal; false when it
    /// is in no file (the failure is noted).
    fn journal_write(
        &self,
        j: &mut journal::Journal,
        queues: &[Queue],
        per_queue: &[Vec<Encoded>],
        session_puts: &[(Vec<u8>, Vec<u8>)],
    ) -> bool {
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
        for (k, v) in session_puts {
            frame.push((DEVICES, k.as_slice(), v.as_slice()));
        }
        if frame.is_empty() {
            return true;
        }
        self.inner.journal_dirty.store(true, Ordering::Relaxed);
        self.inner.journal_unsynced.store(true, Ordering::Relaxed);
        self.inner.shared.work_arrived();
        match j.write(&frame) {
            Ok(()) => {
                if j.reserve_state() == ReserveState::InUse
                    && self.inner.writable.load(Ordering::Relaxed)
                {
                    // Durable against a kill, but the disk is full: say so at once.
                    self.note_failure(
                        "the disk is full: the journal writes into its reserve",
                        false,
                    );
                }
                true
            }
            Err(e) => {
                self.note_failure(&format!("journal write: {e}"), false);
                false
            }
        }
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
                // Keys first: a record a stream can see already counts for its device's
                // backlog in a snapshot taken after it (streams/lanes.rs).
                queues[qi].note_keys(&keys[qi]);
                queues[qi].insert(recs);
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

    /// Drop queued records received before `cutoff_us` (Unix µs) from every queue, looking at
    /// `budget` records per queue at most (a step that takes milliseconds, however large the
    /// backlog: it runs on a blocking thread and a stop waits for it). Queues are in arrival
    /// order, so only their heads are looked at. Returns how many were dropped, and whether
    /// every queue was done (`false`: call again for the rest).
    pub fn expire_step(&self, cutoff_us: i64, budget: usize) -> Result<(u64, bool), StoreError> {
        let mut n = 0;
        let mut all_done = true;
        for q in self.all_queues().iter() {
            let (k, done) = q.expire_before(cutoff_us, budget)?;
            n += k;
            all_done &= done;
        }
        Ok((n, all_done))
    }

    /// Bytes the engine occupies on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.inner
            .shared
            .engine()
            .map(|e| e.size_on_disk(&self.inner.cfg.path))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests;
