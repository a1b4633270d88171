//! The memory-only ledger: how many queued records the store holds in memory only (the disk
//! refused them and the journal's reserve is used up or absent), kept in a small file that is
//! only ever overwritten in place, so that updating it needs no new disk block even on a full
//! disk. A daemon killed in that state loses those records; the next start reads the count,
//! reports it (log, `/health` `store.lost_at_last_stop`, `/metrics`) and resets it. Never
//! silently.
//!
//! File `<path>/memory-only.count`, 24 bytes: magic `LSMEMONL`, count (u64 LE), crc32 of the
//! first 16 bytes (u32 LE), 4 zero bytes.

use super::journal::FILE_MODE;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

const NAME: &str = "memory-only.count";
const MAGIC: &[u8; 8] = b"LSMEMONL";

pub(crate) struct Ledger {
    file: File,
}

fn encode(count: u64) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&count.to_le_bytes());
    let crc = crc32fast::hash(&b[..16]);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode(b: &[u8]) -> Option<u64> {
    let b: &[u8; 24] = b.get(..24)?.try_into().ok()?;
    if &b[..8] != MAGIC || crc32fast::hash(&b[..16]).to_le_bytes() != b[16..20] {
        return None;
    }
    Some(u64::from_le_bytes(b[8..16].try_into().ok()?))
}

impl Ledger {
    /// Open (or create) the ledger in `dir`; returns it and the count a previous run left.
    pub(crate) fn open(dir: &Path) -> std::io::Result<(Ledger, u64)> {
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(dir.join(NAME))?;
        let mut buf = [0u8; 24];
        let previous = match file.read_at(&mut buf, 0) {
            Ok(24) => decode(&buf).unwrap_or(0),
            _ => 0,
        };
        let l = Ledger { file };
        // Written whole now, while there is room: later writes only overwrite these bytes.
        l.set(0)?;
        Ok((l, previous))
    }

    /// Record `count` records held in memory only (not synced: it matters after a kill, which
    /// leaves the page cache; a power cut with a full disk is beyond it).
    pub(crate) fn set(&self, count: u64) -> std::io::Result<()> {
        self.file.write_all_at(&encode(count), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_survive_a_reopen_and_are_reset() {
        let dir = tempfile::tempdir().unwrap();
        let (l, prev) = Ledger::open(dir.path()).unwrap();
        assert_eq!(prev, 0);
        l.set(42).unwrap();
        drop(l);
        let (_l, prev) = Ledger::open(dir.path()).unwrap();
        assert_eq!(prev, 42);
        let (_l, prev) = Ledger::open(dir.path()).unwrap();
        assert_eq!(prev, 0, "reset once reported");
        assert_eq!(decode(&[0u8; 24]), None);
    }
}
