//! Opening a store: the configured engine (or a migration from the other one), the schema,
//! quarantine of an unreadable store (moved aside, never deleted), the replay of a killed
//! daemon's last journal window, and the removal of queues no stream uses any more. Also
//! [`inspect`], which reads a store that no daemon holds without changing anything.

use super::backend::{Backend, Batch};
use super::committer::Health;
use super::queue::{Queue, QueueStats};
use super::{
    journal, packed, queue_table, Inner, OpenReport, Shared, Store, StoreError, DOWN, JOURNAL_GEN,
    META, QUEUE_PREFIX, SCHEMA,
};
use crate::config::{StorageBackend, StorageConfig, WhenFull};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::Notify;

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
    /// Queues of streams that are no longer configured are kept (and reported); the journal of
    /// a killed daemon is replayed.
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
            // A sled store met a build without sled: nothing is wrong with it, so it is left
            // exactly as it is (never moved aside), and the error says what to do.
            Err(e @ StoreError::EngineMissing { .. }) => return Err(e),
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
        let replay = journal::replay(&cfg.path, committed_gen);
        if !replay.puts.is_empty() || !replay.deletes.is_empty() {
            // Every put, then every delete: sequence numbers are never reused, so a delete
            // can only name a record put before it (journal.rs).
            let mut b = Batch::default();
            // Queue records go into their table's blocks (packed.rs), the rest as they are.
            type Records = BTreeMap<u64, Arc<Vec<u8>>>;
            let mut queues: BTreeMap<&str, (Records, Vec<u64>)> = BTreeMap::new();
            for (t, k, v) in &replay.puts {
                match packed::key_seq(k) {
                    Some(seq) if t.starts_with(QUEUE_PREFIX) => {
                        let q = queues.entry(t.as_str()).or_default();
                        q.0.insert(seq, Arc::new(v.clone()));
                    }
                    _ => b.put(t, k, v),
                }
            }
            for (t, k) in &replay.deletes {
                if let (true, Some(seq)) = (t.starts_with(QUEUE_PREFIX), packed::key_seq(k)) {
                    queues.entry(t.as_str()).or_default().1.push(seq);
                }
            }
            for (t, (puts, mut deletes)) in queues {
                deletes.sort_unstable();
                deletes.dedup();
                let puts: Vec<(u64, Arc<Vec<u8>>)> = puts.into_iter().collect();
                packed::write(&engine, t, &puts, &deletes, &mut b)?;
            }
            engine.commit(&b, true)?;
            report.journal_replayed = replay.puts.len() as u64;
            report.acks_replayed = replay.deletes.len() as u64;
            tracing::warn!(
                entries = replay.puts.len(),
                acknowledged = replay.deletes.len(),
                "recovered the last group-commit window from the journal"
            );
        }
        if let Some(g) = replay.last {
            journal::remove_upto(&cfg.path, g);
        }
        // Owner-only, whatever the umask: the store holds session keys.
        secure(&cfg.path);
        let (ledger, lost) = match super::ledger::Ledger::open(&cfg.path) {
            Ok((l, lost)) => (Some(l), lost),
            Err(e) => {
                tracing::warn!(path = %cfg.path.display(), error = %e, "cannot keep the memory-only ledger: records held in memory on a full disk would be lost by a kill without a count");
                (None, 0)
            }
        };
        if lost > 0 {
            tracing::error!(records = lost, "the previous run ended (killed or crashed) while holding records in memory only (the disk was full and the journal's reserve used up): they are lost");
        }
        report.lost_at_last_stop = lost;

        // The backlog of a stream removed from the config stays on disk (a config edit must
        // not delete undelivered data): it is delivered if the stream comes back, and
        // `lorastream queue --drop` frees it. Its sequence numbers are never reused.
        let mut next_seq = 0u64;
        for name in engine.table_names()? {
            let Some(q) = name.strip_prefix(QUEUE_PREFIX) else {
                continue;
            };
            if !streams.iter().any(|(n, _)| n == q) {
                let mut n = 0u64;
                packed::scan(&engine, &name, |_, _| n += 1)?;
                if let Some(last) = packed::last_seq(&engine, &name)? {
                    next_seq = next_seq.max(last + 1);
                }
                tracing::warn!(stream = %q, records = n, "stream no longer configured: its queue is kept on disk (not counted in [storage] max_bytes); add the stream back to deliver it, or stop the daemon and run `lorastream queue --drop {q}` to delete it");
                report.kept_queues.push((q.to_string(), n));
            }
        }

        let shared = Arc::new(Shared {
            total_bytes: AtomicU64::new(0),
            max_bytes: cfg.max_bytes,
            unsaved_bytes: AtomicU64::new(0),
            engine: RwLock::new(None),
            memory_only: AtomicU64::new(0),
            ledger: Mutex::new(ledger),
            committer_idle: std::sync::atomic::AtomicBool::new(false),
            committer_wake: tokio::sync::Notify::new(),
        });
        let mut queues = BTreeMap::new();
        for (name, when_full) in streams {
            let q = Queue::open(name.clone(), &engine, *when_full, shared.clone())?;
            queues.insert(name.clone(), q);
            if let Some(last) = packed::last_seq(&engine, &queue_table(name))? {
                next_seq = next_seq.max(last + 1);
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
        let journal = Mutex::new(journal::Journal::new(
            &cfg.path,
            committed_gen,
            cfg.reserve_bytes,
        ));
        let store = Store {
            inner: Arc::new(Inner {
                cfg: cfg.clone(),
                shared,
                queues: RwLock::new(queues.into_values().collect::<Vec<_>>().into()),
                next_seq: AtomicU64::new(next_seq),
                journal,
                group_commit: cfg.flush_every_ms > 0,
                lost_at_last_stop: report.lost_at_last_stop,
                sessions: Mutex::new(Default::default()),
                commit_lock: Mutex::new(()),
                health: Mutex::new(Health::default()),
                writable: AtomicBool::new(true),
                needs_reopen: AtomicBool::new(false),
                journal_dirty: AtomicBool::new(false),
                journal_unsynced: AtomicBool::new(false),
                last_state_log: Mutex::new(None),
                kick: Notify::new(),
                commit_seconds: prometheus_client::metrics::histogram::Histogram::new(
                    crate::metrics::COMMIT_BUCKETS,
                ),
            }),
        };
        Ok((store, report))
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
        memory_only: AtomicU64::new(0),
        ledger: Mutex::new(None),
        committer_idle: std::sync::atomic::AtomicBool::new(false),
        committer_wake: tokio::sync::Notify::new(),
    });
    let committed_gen = engine
        .get(META, JOURNAL_GEN)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map(u64::from_be_bytes);
    let journal::Replay { puts, deletes, .. } = journal::replay(&cfg.path, committed_gen);
    let deleted: std::collections::HashSet<(&str, &[u8])> = deletes
        .iter()
        .map(|(t, k)| (t.as_str(), k.as_slice()))
        .collect();
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
        let (mut n, mut bytes) = (0i64, 0i64);
        let mut seen = std::collections::HashSet::new();
        for (t, k, v) in &puts {
            if *t == name
                && seen.insert(k.clone())
                && !deleted.contains(&(t.as_str(), k.as_slice()))
                && stored(&engine, &name, k)?.is_none()
            {
                n += 1;
                bytes += v.len() as i64;
            }
        }
        // Acknowledged records still in the engine.
        let mut gone = std::collections::HashSet::new();
        for (t, k) in &deletes {
            if *t == name && gone.insert(k.clone()) {
                if let Some(v) = stored(&engine, &name, k)? {
                    n -= 1;
                    bytes -= v.len() as i64;
                }
            }
        }
        queue.count_extra(n, bytes);
        out.push(queue.stats());
    }
    Ok(out)
}

/// The record keyed `k` (a sequence number) in the queue table `name`, if it is there.
fn stored(engine: &Backend, name: &str, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
    match packed::key_seq(k) {
        Some(seq) => packed::get(engine, name, seq),
        None => Ok(None),
    }
}

/// `lorastream queue --drop NAME`: delete the queue of a stream that is no longer configured
/// (`configured`: the streams of the configuration), from a store no daemon is using. Returns
/// the records deleted.
pub fn drop_queue(
    cfg: &StorageConfig,
    name: &str,
    configured: &[String],
) -> Result<u64, StoreError> {
    if configured.iter().any(|c| c == name) {
        return Err(StoreError::QueueInUse(name.to_string()));
    }
    let kind = if Backend::present(cfg.backend, &cfg.path)
        || !Backend::present(other(cfg.backend), &cfg.path)
    {
        cfg.backend
    } else {
        other(cfg.backend)
    };
    if !Backend::present(kind, &cfg.path) {
        return Err(StoreError::NoSuchQueue(name.to_string()));
    }
    let engine = Backend::open(kind, cfg).map_err(|e| {
        if e.is_locked() {
            StoreError::Locked {
                path: cfg.path.clone(),
            }
        } else {
            e
        }
    })?;
    let table = queue_table(name);
    if !engine.table_names()?.contains(&table) {
        return Err(StoreError::NoSuchQueue(name.to_string()));
    }
    let mut n = 0u64;
    packed::scan(&engine, &table, |_, _| n += 1)?;
    engine.drop_table(&table)?;
    Ok(n)
}

/// Make the store directory 0700 and everything in it 0600 (directories 0700), whatever the
/// umask the engines created them under: the store holds session keys. Best effort: a store
/// on a filesystem without modes (FAT) is logged once.
fn secure(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    fn walk(p: &Path, depth: u8) -> std::io::Result<()> {
        let meta = std::fs::symlink_metadata(p)?;
        let want = if meta.is_dir() { 0o700 } else { 0o600 };
        if meta.file_type().is_symlink() {
            return Ok(());
        }
        if meta.permissions().mode() & 0o777 != want {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(want))?;
        }
        if meta.is_dir() && depth < 4 {
            for e in std::fs::read_dir(p)? {
                walk(&e?.path(), depth + 1)?;
            }
        }
        Ok(())
    }
    if let Err(e) = walk(dir, 0) {
        tracing::warn!(path = %dir.display(), error = %e, "cannot make the store owner-only (0700/0600)");
    }
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
