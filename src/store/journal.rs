//! The write-ahead journal of the group-commit window: what makes an appended uplink survive a
//! SIGKILL at once and a power cut after its window, without an engine commit per window; and
//! what makes acknowledgements survive a SIGKILL without an engine commit.
//!
//! With `flush_every_ms > 0` an appended record lives in memory *and* in this journal: one
//! `write(2)` of a checksummed frame per append, which a killed process cannot lose (the kernel
//! has it). Once per window the committer fdatasyncs the journal (and, for a new generation
//! file, its directory), which makes the window durable against a power cut for the price of
//! about one page; the engine itself is committed only every few seconds (a checkpoint, see
//! `store/mod.rs`). Open replays every generation newer than the last checkpoint.
//!
//! Files: `<path>/journal.<generation>` (puts) and `<path>/acks.<generation>` (deletes: the
//! records acknowledged, written once per window by the committer, never fsynced: they only
//! spare redeliveries after a kill). A checkpoint starts a new generation, deletes the ones it
//! covered and records the newest covered one in the engine (`meta`/`journal_gen`), so a file
//! whose deletion did not survive a power cut is not replayed again. Replay applies every put,
//! then every delete: sequence numbers are never reused, so a delete can only name a record
//! put before it. Deletes live in files of their own so that an older lorastream, which does
//! not know them, ignores them (and only redelivers) instead of stopping at them.
//!
//! A frame is `len (u32 LE) | crc32 (u32 LE) | postcard payload`; replay stops at the first
//! frame of a file that is short or fails its checksum (a torn tail), and keeps everything
//! before it. After a failed write the file is abandoned and the next frame opens a new
//! generation, so a torn frame can never hide later ones.
//!
//! ## The reserve: a full disk
//! `<path>/journal.reserve` is a file with `[storage] reserve_bytes` preallocated
//! (`fallocate(2)`, `FALLOC_FL_KEEP_SIZE`: it looks empty, its blocks are taken). When a journal
//! write fails (the disk is full), the reserve becomes the next generation (a rename, which
//! needs no new block) and the frame is written into its preallocated space: uplinks keep
//! surviving a kill while the disk is full, until the reserve is used up. A checkpoint leaves a
//! reserve generation only once a new reserve could be made (space is back); until then the
//! committer does not try, and the reserve keeps taking the journal. Filesystems without
//! `fallocate` (FAT) get no reserve: records are then held in memory only while the disk is
//! full, and the store says so (`StoreHealth::memory_only`).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const PREFIX: &str = "journal.";
const ACKS_PREFIX: &str = "acks.";
pub(crate) const RESERVE: &str = "journal.reserve";
/// Largest frame accepted on replay (a corrupt length must not allocate gigabytes).
const MAX_FRAME: usize = 64 << 20;
/// The smallest reserve made when the disk has no room for `reserve_bytes`.
const MIN_RESERVE: u64 = 64 << 10;
/// Journal files hold session state and keys' neighbours: owner only, whatever the umask.
pub(crate) const FILE_MODE: u32 = 0o600;

/// One put, as journaled: (table, key, value).
pub(crate) type Put = (String, Vec<u8>, Vec<u8>);
/// A [`Put`] borrowed from what the append already holds (the encoded record is not copied
/// again); postcard encodes both the same way (a string, then two length-prefixed byte runs).
pub(crate) type PutRef<'a> = (&'a str, &'a [u8], &'a [u8]);
/// One delete, as journaled: (table, key).
pub(crate) type Delete = (String, Vec<u8>);
/// A [`Delete`] borrowed.
pub(crate) type DeleteRef<'a> = (&'a str, &'a [u8]);

/// The reserve as `/health` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReserveState {
    /// `reserve_bytes` are set aside, unused.
    Ready,
    /// The disk was full: the journal is writing into the reserve.
    InUse,
    /// The reserve is full too: new records are held in memory only until space returns.
    UsedUp,
    /// No reserve: `reserve_bytes = 0`, no `fallocate` here, or no room to make one.
    None,
}

pub(crate) struct Journal {
    dir: PathBuf,
    gen: u64,
    file: Option<File>,
    acks: Option<File>,
    /// An ack frame failed in this generation: no more of them until the next one (a torn
    /// frame must not hide later ones).
    acks_broken: Option<u64>,
    /// A generation file was created since the directory was last fsynced.
    dir_unsynced: bool,
    /// Frames written since the last [`Journal::sync_handle`].
    unsynced: bool,
    /// Generations up to this were closed and are not removed yet.
    to_remove: Option<u64>,
    reserve_size: u64,
    /// `journal.reserve`, preallocated and unused.
    reserve: Option<File>,
    /// Bytes preallocated in `reserve` (less than `reserve_size` when the disk had no more).
    reserve_have: u64,
    /// The current generation is a former reserve: its preallocated bytes left.
    in_reserve: Option<u64>,
    /// `fallocate` is not supported here: never try again.
    no_fallocate: bool,
    /// The reserve was taken and is full.
    used_up: bool,
    /// A write failed with nowhere else to go: no more files are tried until the next
    /// [`Journal::rotate`] (the committer's next attempt, backed off), or a full disk would get
    /// a new empty generation file per append.
    stalled: bool,
    /// Bytes written to the generations not yet covered by a checkpoint (puts and acks): what
    /// a restart after a kill would replay, and the disk space the journal holds.
    written: u64,
}

/// What [`Journal::sync_handle`] hands out: fsync it without holding the journal's lock.
pub(crate) struct SyncHandle {
    file: Option<File>,
    dir: Option<PathBuf>,
}

impl SyncHandle {
    /// fdatasync the journal file (and fsync the directory if a generation file is new, so
    /// the file itself survives a power cut).
    pub(crate) fn sync(self) -> io::Result<()> {
        if let Some(f) = self.file {
            f.sync_data()?;
        }
        if let Some(d) = self.dir {
            File::open(d)?.sync_all()?;
        }
        Ok(())
    }
}

fn gen_of(p: &Path, prefix: &str) -> Option<u64> {
    p.file_name()?.to_str()?.strip_prefix(prefix)?.parse().ok()
}

/// Files `{prefix}<generation>` under `dir`, oldest generation first.
fn files_of(dir: &Path, prefix: &str) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| gen_of(&e.path(), prefix).map(|g| (g, e.path())))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Journal (puts) files under `dir`, oldest generation first.
fn files(dir: &Path) -> Vec<(u64, PathBuf)> {
    files_of(dir, PREFIX)
}

fn open_append(p: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(p)
}

/// `len | crc | payload` for a list of `count` entries (puts or deletes) whose byte runs
/// (table, key[, value]) are `runs`, in order; `size` is about the payload's length (the
/// buffer is sized once for it).
///
/// The payload is postcard's encoding of the list (`[PutRef]` or `[DeleteRef]`): a varint
/// count, then each run as a varint length and its bytes. It is written here directly:
/// through serde, postcard writes a byte slice one element at a time (~2,400 instructions per
/// uplink for the records' bytes, issue 16). A unit test compares it with postcard's output.
fn frame<'a>(count: usize, runs: impl IntoIterator<Item = &'a [u8]>, size: usize) -> Vec<u8> {
    // The payload is encoded behind room for its header, so the frame is built in place.
    let mut frame = Vec::with_capacity(8 + size);
    frame.resize(8, 0);
    varint(&mut frame, count);
    for run in runs {
        varint(&mut frame, run.len());
        crate::vec_write::extend(&mut frame, run);
    }
    let len = (frame.len() - 8) as u32;
    let crc = crc32fast::hash(&frame[8..]);
    frame[..4].copy_from_slice(&len.to_le_bytes());
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
    frame
}

/// postcard's varint (LEB128) of a length.
fn varint(buf: &mut Vec<u8>, n: usize) {
    crate::vec_write::varint(buf, n as u64);
}

fn put_runs<'a>(puts: &'a [PutRef<'a>]) -> impl Iterator<Item = &'a [u8]> {
    puts.iter().flat_map(|(t, k, v)| [t.as_bytes(), k, v])
}

fn delete_runs<'a>(deletes: &'a [DeleteRef<'a>]) -> impl Iterator<Item = &'a [u8]> {
    deletes.iter().flat_map(|(t, k)| [t.as_bytes(), k])
}

/// Take `len` bytes of disk for `f` without changing its size. `Unsupported` where the
/// filesystem cannot.
fn preallocate(f: &File, len: u64) -> io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::fd::AsRawFd;
        let len = libc::off_t::try_from(len).map_err(io::Error::other)?;
        // SAFETY: fallocate(2) on a file descriptor we own; no pointers.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, len) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            return Err(io::Error::new(io::ErrorKind::Unsupported, e));
        }
        Err(e)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = (f, len);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "no fallocate on this platform",
        ))
    }
}

impl Journal {
    /// A journal in `dir`, continuing after the generations already there and after
    /// `committed` (the newest generation the engine records as covered, `meta`/`journal_gen`),
    /// with a reserve of `reserve_size` bytes (made now if there is room).
    ///
    /// Both bounds matter: replay skips every generation up to `committed`, and after a replay
    /// the directory holds no generation file at all. A journal that started from 0 again would
    /// write frames that the next replay (after a second kill before a checkpoint) skips as
    /// already committed: lost.
    pub(crate) fn new(dir: &Path, committed: Option<u64>, reserve_size: u64) -> Journal {
        let gen = files(dir)
            .into_iter()
            .chain(files_of(dir, ACKS_PREFIX))
            .map(|(g, _)| g + 1)
            .chain(committed.map(|c| c + 1))
            .max()
            .unwrap_or(0);
        let mut j = Journal {
            dir: dir.to_path_buf(),
            gen,
            file: None,
            acks: None,
            acks_broken: None,
            dir_unsynced: false,
            unsynced: false,
            to_remove: None,
            reserve_size,
            reserve: None,
            reserve_have: 0,
            in_reserve: None,
            no_fallocate: false,
            used_up: false,
            stalled: false,
            written: 0,
        };
        if let Err(e) = j.make_reserve() {
            if reserve_size > 0 {
                tracing::warn!(dir = %dir.display(), bytes = reserve_size, error = %e,
                    "cannot set disk space aside for the journal: while the disk is full, new uplinks will be held in memory only");
            }
        }
        j
    }

    /// Make the reserve if there is none, or grow it to `reserve_size` (no-op when
    /// `reserve_size` is 0). On a nearly full disk a smaller reserve (down to
    /// [`MIN_RESERVE`]) is better than none: the journal can leave a used reserve only once
    /// there is a new one.
    pub(crate) fn make_reserve(&mut self) -> io::Result<()> {
        if self.reserve_size == 0 {
            return Ok(());
        }
        if let Some(f) = &self.reserve {
            if self.reserve_have < self.reserve_size && preallocate(f, self.reserve_size).is_ok() {
                self.reserve_have = self.reserve_size;
            }
            return Ok(());
        }
        if self.no_fallocate {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the filesystem cannot preallocate (fallocate)",
            ));
        }
        let p = self.dir.join(RESERVE);
        let f = OpenOptions::new()
            .create(true)
            .write(true)
            .mode(FILE_MODE)
            .open(&p)?;
        let mut size = self.reserve_size;
        loop {
            match preallocate(&f, size) {
                Ok(()) => break,
                Err(e) if e.kind() != io::ErrorKind::Unsupported && size / 2 >= MIN_RESERVE => {
                    size /= 2;
                }
                Err(e) => {
                    // What was taken of it is given back.
                    drop(f);
                    let _ = std::fs::remove_file(&p);
                    if e.kind() == io::ErrorKind::Unsupported {
                        self.no_fallocate = true;
                    }
                    return Err(e);
                }
            }
        }
        // Its name must survive a power cut before it is counted on.
        self.dir_unsynced = true;
        self.reserve = Some(f);
        self.reserve_have = size;
        self.used_up = false;
        Ok(())
    }

    pub(crate) fn reserve_state(&self) -> ReserveState {
        if self.in_reserve.is_some() {
            ReserveState::InUse
        } else if self.used_up {
            ReserveState::UsedUp
        } else if self.reserve.is_some() {
            ReserveState::Ready
        } else {
            ReserveState::None
        }
    }

    /// Bytes of an active reserve left (0 when none is in use).
    pub(crate) fn reserve_left(&self) -> u64 {
        self.in_reserve.unwrap_or(0)
    }

    /// Something to fsync so that every frame written so far is durable (None: nothing new).
    /// A generation abandoned after a failed write is not covered: its records stay in memory
    /// and reach the disk with the next engine commit.
    pub(crate) fn sync_handle(&mut self) -> io::Result<Option<SyncHandle>> {
        if !self.unsynced {
            return Ok(None);
        }
        self.unsynced = false;
        let file = match &self.file {
            Some(f) => Some(f.try_clone()?),
            None => None,
        };
        let dir = std::mem::take(&mut self.dir_unsynced).then(|| self.dir.clone());
        Ok(Some(SyncHandle { file, dir }))
    }

    /// Append one frame of puts (not synced). On a full disk the reserve takes it (see the
    /// module docs); an error means the frame is in no file.
    pub(crate) fn write(&mut self, puts: &[PutRef<'_>]) -> io::Result<()> {
        if self.stalled {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "the journal cannot be written (waiting for the next commit attempt)",
            ));
        }
        // Each put: its table, key and value, each behind a varint length (≤ 5 bytes).
        let size = 5 + puts
            .iter()
            .map(|(t, k, v)| t.len() + k.len() + v.len() + 15)
            .sum::<usize>();
        let frame = frame(puts.len(), put_runs(puts), size);
        if self.file.is_none() {
            let p = self.dir.join(format!("{PREFIX}{:020}", self.gen));
            match open_append(&p) {
                Ok(f) => {
                    self.file = Some(f);
                    self.dir_unsynced = true;
                }
                Err(e) => return self.continue_in_reserve(&frame, e),
            }
        }
        self.unsynced = true;
        let r = match self.file.as_mut() {
            Some(f) => f.write_all(&frame),
            None => Ok(()),
        };
        match r {
            Ok(()) => {
                self.written += frame.len() as u64;
                if let Some(left) = &mut self.in_reserve {
                    *left = left.saturating_sub(frame.len() as u64);
                }
                Ok(())
            }
            Err(e) => {
                // A torn frame ends this file for replay: continue in a new generation.
                if self.in_reserve.is_some() {
                    self.used_up = true;
                    tracing::error!(reserve_bytes = self.reserve_size,
                        "the journal's reserve is full too: new records are held in memory only (a kill would lose them; see /health store.memory_only)");
                }
                self.abandon();
                self.continue_in_reserve(&frame, e)
            }
        }
    }

    /// The current file failed: the next frame goes to a new generation.
    fn abandon(&mut self) {
        let had_puts = self.file.take().is_some();
        let had_acks = self.acks.take().is_some();
        if had_puts || had_acks {
            self.to_remove = Some(self.gen);
        }
        self.in_reserve = None;
        self.gen += 1;
    }

    /// A write failed with `err`: continue in the reserve, if there is one.
    fn continue_in_reserve(&mut self, frame: &[u8], err: io::Error) -> io::Result<()> {
        let Some(mut f) = self.reserve.take() else {
            self.stalled = true;
            return Err(err);
        };
        if self.file.is_some() {
            self.abandon();
        }
        let to = self.dir.join(format!("{PREFIX}{:020}", self.gen));
        if let Err(e) = std::fs::rename(self.dir.join(RESERVE), &to) {
            tracing::error!(error = %e, "cannot take the journal's reserve into use");
            self.reserve = Some(f);
            return Err(err);
        }
        tracing::warn!(reserve_bytes = self.reserve_have, first_error = %err,
            "the disk refuses journal writes: journaling into the reserved space (uplinks still survive a kill)");
        self.dir_unsynced = true;
        self.unsynced = true;
        match f.write_all(frame) {
            Ok(()) => {
                self.written += frame.len() as u64;
                self.in_reserve = Some(self.reserve_have.saturating_sub(frame.len() as u64));
                self.file = Some(f);
                Ok(())
            }
            Err(e) => {
                self.to_remove = Some(self.gen);
                self.gen += 1;
                self.used_up = true;
                self.stalled = true;
                Err(e)
            }
        }
    }

    /// Append one frame of deletes (acknowledged records) to this generation's acks file (not
    /// synced: it only spares redeliveries after a kill). Errors only cost redeliveries.
    pub(crate) fn write_acks(&mut self, deletes: &[DeleteRef<'_>]) -> io::Result<()> {
        if deletes.is_empty() || self.acks_broken == Some(self.gen) {
            return Ok(());
        }
        let size = 5 + deletes
            .iter()
            .map(|(t, k)| t.len() + k.len() + 10)
            .sum::<usize>();
        let frame = frame(deletes.len(), delete_runs(deletes), size);
        if self.acks.is_none() {
            let p = self.dir.join(format!("{ACKS_PREFIX}{:020}", self.gen));
            self.acks = Some(open_append(&p)?);
        }
        let r = match self.acks.as_mut() {
            Some(f) => f.write_all(&frame),
            None => Ok(()),
        };
        match r {
            Ok(()) => self.written += frame.len() as u64,
            Err(_) => {
                self.acks = None;
                self.acks_broken = Some(self.gen);
            }
        }
        r
    }

    /// Bytes written since the last [`Journal::rotate`] (frames of puts and of acks; a frame
    /// that failed is not counted): what a checkpoint would cover, and what a restart after a
    /// kill would have to read back.
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// Close the current generation (everything written so far belongs to the snapshot being
    /// committed); returns it. None while the journal is writing into the reserve and no new
    /// reserve can be made: the disk is still full, a checkpoint is not worth trying, and the
    /// reserve must keep taking the journal.
    ///
    /// The next frame always goes to a newer generation, also when this one has no file: the
    /// commit records the returned generation as covered (`meta`/`journal_gen`), and replay
    /// skips every frame of a covered generation.
    pub(crate) fn rotate(&mut self) -> Option<u64> {
        if self.in_reserve.is_some() {
            if self.make_reserve().is_err() {
                return None;
            }
            tracing::info!("the disk takes writes again: a new journal reserve is in place");
        }
        self.stalled = false;
        let g = self.gen;
        let had_puts = self.file.take().is_some();
        let had_acks = self.acks.take().is_some();
        if had_puts || had_acks || self.acks_broken == Some(g) {
            self.to_remove = Some(g);
        }
        self.gen += 1;
        self.in_reserve = None;
        self.written = 0;
        // The engine commit that follows makes these frames durable.
        self.unsynced = false;
        Some(g)
    }

    /// The generations up to and including `gen` are committed: returns their files, for the
    /// caller to remove ([`Removal::run`]) after it lets go of the journal's lock (unlinking a
    /// 4 MiB journal on an SD card takes milliseconds, and every append waits for that lock)
    /// and before it makes a new reserve if none is there ([`Journal::make_reserve`]: on a disk
    /// that was full, the removed files make the room for it).
    #[must_use]
    pub(crate) fn committed(&mut self, gen: u64) -> Removal {
        let upto = self.to_remove.filter(|t| *t <= gen).map(|_| gen);
        if upto.is_some() {
            self.to_remove = None;
        }
        Removal {
            dir: self.dir.clone(),
            upto,
        }
    }
}

/// Journal files that a checkpoint made redundant ([`Journal::committed`]).
pub(crate) struct Removal {
    dir: PathBuf,
    upto: Option<u64>,
}

impl Removal {
    /// Remove them.
    pub(crate) fn run(self) {
        if let Some(gen) = self.upto {
            remove_upto(&self.dir, gen);
        }
    }
}

/// Remove the journal and acks files of generations up to and including `gen`.
pub(crate) fn remove_upto(dir: &Path, gen: u64) {
    for (g, p) in files(dir).into_iter().chain(files_of(dir, ACKS_PREFIX)) {
        if g <= gen {
            if let Err(e) = std::fs::remove_file(&p) {
                tracing::warn!(file = %p.display(), error = %e, "cannot remove a committed journal file");
            }
        }
    }
}

/// What a killed daemon's journal holds.
#[derive(Debug, Default)]
pub(crate) struct Replay {
    /// Every intact put, oldest first.
    pub puts: Vec<Put>,
    /// Every intact delete (acknowledged records), oldest first.
    pub deletes: Vec<Delete>,
    /// The newest generation seen (None when there is no journal).
    pub last: Option<u64>,
}

/// Every intact frame of the files `{prefix}<gen>` newer than `committed`.
fn read_frames<T: serde::de::DeserializeOwned>(
    dir: &Path,
    prefix: &str,
    committed: Option<u64>,
    out: &mut Vec<T>,
) -> Option<u64> {
    let all = files_of(dir, prefix);
    let last = all.last().map(|(g, _)| *g);
    for (g, p) in all {
        // Already in the engine (a file whose deletion did not survive a power cut): replaying
        // it could only bring back older frame counters.
        if committed.is_some_and(|c| g <= c) {
            continue;
        }
        let mut buf = Vec::new();
        if let Err(e) = File::open(&p).and_then(|mut f| f.read_to_end(&mut buf)) {
            tracing::error!(file = %p.display(), error = %e, "cannot read a journal file; its records are lost");
            continue;
        }
        let mut at = 0usize;
        let mut frames = 0u64;
        while let Some(head) = buf.get(at..at + 8) {
            let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
            let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
            let Some(payload) = buf.get(at + 8..at + 8 + len).filter(|_| len <= MAX_FRAME) else {
                break;
            };
            if crc32fast::hash(payload) != crc {
                break;
            }
            match postcard::from_bytes::<Vec<T>>(payload) {
                Ok(items) => out.extend(items),
                Err(_) => break,
            }
            frames += 1;
            at += 8 + len;
        }
        if at < buf.len() {
            tracing::warn!(file = %p.display(), frames, torn_bytes = buf.len() - at,
                "journal ends with a torn frame (power cut while writing); the intact frames before it were kept");
        }
    }
    last
}

/// Every intact frame of every journal and acks file under `dir` newer than `committed`.
pub(crate) fn replay(dir: &Path, committed: Option<u64>) -> Replay {
    let mut r = Replay::default();
    let a = read_frames(dir, PREFIX, committed, &mut r.puts);
    let b = read_frames(dir, ACKS_PREFIX, committed, &mut r.deletes);
    r.last = a.max(b);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(j: &mut Journal, n: u8) {
        let (k, v) = (vec![n], vec![n; 3]);
        j.write(&[("t", k.as_slice(), v.as_slice())]).unwrap();
    }

    /// The frames' payloads are postcard's encoding of the lists, whatever the lengths (one-
    /// and two-byte varints, empty runs).
    #[test]
    fn frame_payloads_are_postcards_encoding() {
        let bytes: Vec<u8> = (0..400u32).map(|i| (i * 7) as u8).collect();
        for n in [0usize, 1, 2, 5] {
            for len in [0usize, 1, 16, 17, 127, 128, 300] {
                let puts: Vec<PutRef> = (0..n)
                    .map(|i| ("queue:x", &bytes[i..i + 8], &bytes[i..i + len]))
                    .collect();
                let deletes: Vec<DeleteRef> =
                    (0..n).map(|i| ("devices", &bytes[i..i + len])).collect();
                let f = frame(puts.len(), put_runs(&puts), 0);
                assert_eq!(f[8..], postcard::to_stdvec::<[PutRef]>(&puts).unwrap()[..]);
                let len_crc = [
                    ((f.len() - 8) as u32).to_le_bytes(),
                    crc32fast::hash(&f[8..]).to_le_bytes(),
                ]
                .concat();
                assert_eq!(f[..8], len_crc[..]);
                let f = frame(deletes.len(), delete_runs(&deletes), 0);
                assert_eq!(
                    f[8..],
                    postcard::to_stdvec::<[DeleteRef]>(&deletes).unwrap()[..]
                );
            }
        }
    }

    #[test]
    fn frames_replay_in_order_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::new(dir.path(), None, 0);
        // Borrowed puts encode exactly as owned ones (the frames earlier versions wrote).
        let (k, v) = (vec![1u8], vec![1u8; 3]);
        assert_eq!(
            postcard::to_stdvec::<[PutRef]>(&[("t", k.as_slice(), v.as_slice())]).unwrap(),
            postcard::to_stdvec(&vec![("t".to_string(), k.clone(), v.clone())]).unwrap()
        );
        write(&mut j, 1);
        write(&mut j, 2);
        let g = j.rotate().unwrap();
        write(&mut j, 3);
        let r = replay(dir.path(), None);
        assert_eq!(
            r.puts.iter().map(|p| p.1[0]).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(r.last, Some(g + 1));
        // A torn frame at the end of the newest file: what is before it stays.
        let newest = files(dir.path()).last().unwrap().1.clone();
        let mut f = OpenOptions::new().append(true).open(&newest).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        assert_eq!(replay(dir.path(), None).puts.len(), 3);
        assert_eq!(
            replay(dir.path(), Some(g)).puts.len(),
            1,
            "covered generations skipped"
        );
        // A flipped bit fails the checksum.
        let first = files(dir.path())[0].1.clone();
        let mut b = std::fs::read(&first).unwrap();
        b[10] ^= 1;
        std::fs::write(&first, b).unwrap();
        assert_eq!(
            replay(dir.path(), None)
                .puts
                .iter()
                .map(|p| p.1[0])
                .collect::<Vec<_>>(),
            vec![3]
        );
        remove_upto(dir.path(), g);
        assert_eq!(files(dir.path()).len(), 1);
        // A new journal continues after the surviving generation.
        assert_eq!(Journal::new(dir.path(), None, 0).gen, g + 2);
    }

    /// Frames written after a commit are never in a generation that commit covered: replay
    /// skips those (`committed`), so such a frame would be lost by a kill.
    #[test]
    fn frames_after_a_commit_are_replayed_after_a_kill() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::new(dir.path(), None, 0);
        // A commit with nothing journaled in its generation (`flush_every_ms = 0`: appends go
        // to the engine; the journal takes them only once a commit fails).
        let g = j.rotate().unwrap();
        write(&mut j, 1);
        assert_eq!(replay(dir.path(), Some(g)).puts.len(), 1);
        // After a restart whose replay removed every file: the journal continues after the
        // generation the engine recorded, not from 0.
        let g = j.rotate().unwrap();
        remove_upto(dir.path(), g);
        let mut j = Journal::new(dir.path(), Some(g), 0);
        write(&mut j, 2);
        assert_eq!(
            replay(dir.path(), Some(g))
                .puts
                .iter()
                .map(|p| p.1[0])
                .collect::<Vec<_>>(),
            vec![2]
        );
    }

    #[test]
    fn acks_replay_and_leave_with_their_generation() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::new(dir.path(), None, 0);
        write(&mut j, 1);
        j.write_acks(&[("t", &[1u8][..])]).unwrap();
        let g = j.rotate().unwrap();
        j.write_acks(&[("t", &[2u8][..])]).unwrap();
        let r = replay(dir.path(), None);
        assert_eq!(r.deletes.len(), 2);
        assert_eq!(r.last, Some(g + 1), "an acks file alone is a generation");
        j.committed(g).run();
        let r = replay(dir.path(), None);
        assert_eq!((r.puts.len(), r.deletes.len()), (0, 1));
        // Files are the owner's only, whatever the umask.
        use std::os::unix::fs::PermissionsExt;
        for e in std::fs::read_dir(dir.path()).unwrap() {
            let m = e.unwrap().metadata().unwrap().permissions().mode();
            assert_eq!(m & 0o777, 0o600);
        }
    }

    #[test]
    fn the_reserve_is_made_and_taken_when_a_write_fails() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::new(dir.path(), None, 1 << 20);
        if j.reserve_state() == ReserveState::None {
            // This filesystem cannot preallocate: nothing more to test here.
            return;
        }
        assert!(dir.path().join(RESERVE).exists());
        assert_eq!(
            std::fs::metadata(dir.path().join(RESERVE)).unwrap().len(),
            0
        );
        write(&mut j, 1);
        // The next write fails as on a full disk: the reserve takes the frame.
        let frame = frame(1, put_runs(&[("t", &[2u8][..], &[2u8, 2, 2][..])]), 0);
        j.continue_in_reserve(&frame, io::Error::other("ENOSPC"))
            .unwrap();
        assert_eq!(j.reserve_state(), ReserveState::InUse);
        assert!(!dir.path().join(RESERVE).exists());
        write(&mut j, 3);
        let r = replay(dir.path(), None);
        assert_eq!(
            r.puts.iter().map(|p| p.1[0]).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        // Space is back: a new reserve is made before the journal leaves the old one.
        let g = j.rotate().unwrap();
        assert!(dir.path().join(RESERVE).exists());
        j.committed(g).run();
        j.make_reserve().unwrap();
        assert_eq!(j.reserve_state(), ReserveState::Ready);
        assert!(replay(dir.path(), None).puts.is_empty());
    }
}
