//! The write-ahead journal of the group-commit window: what makes an appended uplink survive a
//! SIGKILL at once and a power cut after its window, without an engine commit per window.
//!
//! With `flush_every_ms > 0` an appended record lives in memory *and* in this journal: one
//! `write(2)` of a checksummed frame per append, which a killed process cannot lose (the kernel
//! has it). Once per window the committer fdatasyncs the journal (and, for a new generation
//! file, its directory), which makes the window durable against a power cut for the price of
//! about one page; the engine itself is committed only every few seconds (a checkpoint, see
//! `store/mod.rs`). Open replays every generation newer than the last checkpoint.
//!
//! Files: `<path>/journal.<generation>`. A checkpoint starts a new generation, deletes the ones
//! it covered and records the newest covered one in the engine (`meta`/`journal_gen`), so a
//! file whose deletion did not survive a power cut is not replayed again. If nothing waits to
//! be delivered at the end of a window (everything was acknowledged), no fsync is needed and the
//! short-lived file's pages are usually dropped before the kernel writes them back. A frame is
//! `len (u32 LE) | crc32 (u32 LE) | postcard payload`; replay stops at the first frame of a file
//! that is short or fails its checksum (a torn tail), and keeps everything before it. After a
//! failed write the file is abandoned and the next frame opens a new generation, so a torn
//! frame can never hide later ones.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

const PREFIX: &str = "journal.";
/// Largest frame accepted on replay (a corrupt length must not allocate gigabytes).
const MAX_FRAME: usize = 64 << 20;

/// One put, as journaled: (table, key, value).
pub(crate) type Put = (String, Vec<u8>, Vec<u8>);
/// A [`Put`] borrowed from what the append already holds (the encoded record is not copied
/// again); postcard encodes both the same way (a string, then two length-prefixed byte runs).
pub(crate) type PutRef<'a> = (&'a str, &'a [u8], &'a [u8]);

pub(crate) struct Journal {
    dir: PathBuf,
    gen: u64,
    file: Option<File>,
    /// A generation file was created since the directory was last fsynced.
    dir_unsynced: bool,
    /// Frames written since the last [`Journal::sync_handle`].
    unsynced: bool,
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

fn gen_of(p: &Path) -> Option<u64> {
    p.file_name()?.to_str()?.strip_prefix(PREFIX)?.parse().ok()
}

/// Journal files under `dir`, oldest generation first.
fn files(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| gen_of(&e.path()).map(|g| (g, e.path())))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

impl Journal {
    /// A journal in `dir`, continuing after the generations already there.
    pub(crate) fn new(dir: &Path) -> Journal {
        let gen = files(dir).last().map(|(g, _)| g + 1).unwrap_or(0);
        Journal {
            dir: dir.to_path_buf(),
            gen,
            file: None,
            dir_unsynced: false,
            unsynced: false,
        }
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

    /// Append one frame (not synced).
    pub(crate) fn write(&mut self, puts: &[PutRef<'_>]) -> io::Result<()> {
        // The payload is encoded behind room for its header, so the frame is built in place.
        let mut frame = postcard::to_extend(puts, vec![0u8; 8]).map_err(io::Error::other)?;
        let len = (frame.len() - 8) as u32;
        let crc = crc32fast::hash(&frame[8..]);
        frame[..4].copy_from_slice(&len.to_le_bytes());
        frame[4..8].copy_from_slice(&crc.to_le_bytes());
        if self.file.is_none() {
            let p = self.dir.join(format!("{PREFIX}{:020}", self.gen));
            self.file = Some(OpenOptions::new().create(true).append(true).open(p)?);
            self.dir_unsynced = true;
        }
        self.unsynced = true;
        let r = match self.file.as_mut() {
            Some(f) => f.write_all(&frame),
            None => Ok(()),
        };
        if r.is_err() {
            // A torn frame ends this file for replay: continue in a new generation.
            self.file = None;
            self.gen += 1;
        }
        r
    }

    /// Close the current generation (everything written so far belongs to the snapshot being
    /// committed); returns it.
    pub(crate) fn rotate(&mut self) -> u64 {
        let g = self.gen;
        if self.file.take().is_some() {
            self.gen += 1;
        }
        // The engine commit that follows makes these frames durable.
        self.unsynced = false;
        g
    }

    /// Remove the generations up to and including `gen` (their content is committed).
    pub(crate) fn remove_upto(&self, gen: u64) {
        remove_upto(&self.dir, gen)
    }
}

pub(crate) fn remove_upto(dir: &Path, gen: u64) {
    for (g, p) in files(dir) {
        if g <= gen {
            if let Err(e) = std::fs::remove_file(&p) {
                tracing::warn!(file = %p.display(), error = %e, "cannot remove a committed journal file");
            }
        }
    }
}

/// Every intact frame of every journal file under `dir`, oldest first, and the newest
/// generation seen (None when there is no journal).
pub(crate) fn replay(dir: &Path, committed: Option<u64>) -> (Vec<Put>, Option<u64>) {
    let mut out = Vec::new();
    let all = files(dir);
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
            match postcard::from_bytes::<Vec<Put>>(payload) {
                Ok(puts) => out.extend(puts),
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
    (out, last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_replay_in_order_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::new(dir.path());
        let put = |n: u8| (vec![n], vec![n; 3]);
        let write = |j: &mut Journal, n: u8| {
            let (k, v) = put(n);
            j.write(&[("t", k.as_slice(), v.as_slice())]).unwrap();
        };
        // Borrowed puts encode exactly as owned ones (the frames earlier versions wrote).
        let (k, v) = put(1);
        assert_eq!(
            postcard::to_stdvec::<[PutRef]>(&[("t", k.as_slice(), v.as_slice())]).unwrap(),
            postcard::to_stdvec(&vec![("t".to_string(), k.clone(), v.clone())]).unwrap()
        );
        write(&mut j, 1);
        write(&mut j, 2);
        let g = j.rotate();
        write(&mut j, 3);
        let (all, last) = replay(dir.path(), None);
        assert_eq!(
            all.iter().map(|p| p.1[0]).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(last, Some(g + 1));
        // A torn frame at the end of the newest file: what is before it stays.
        let newest = files(dir.path()).last().unwrap().1.clone();
        let mut f = OpenOptions::new().append(true).open(&newest).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        assert_eq!(replay(dir.path(), None).0.len(), 3);
        assert_eq!(
            replay(dir.path(), Some(g)).0.len(),
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
                .0
                .iter()
                .map(|p| p.1[0])
                .collect::<Vec<_>>(),
            vec![3]
        );
        remove_upto(dir.path(), g);
        assert_eq!(files(dir.path()).len(), 1);
        // A new journal continues after the surviving generation.
        assert_eq!(Journal::new(dir.path()).gen, g + 2);
    }
}
