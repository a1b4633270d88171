//! How full redb's B-tree pages are when a queue is appended to, the way the store appends:
//! one entry per record, keys increasing (u64 big-endian sequence numbers), records of about
//! the size of a queued uplink, one durable commit per checkpoint (2 MiB of records, the
//! store's default: about 18,000 uplinks).
//!
//! `cargo bench --bench store_fill -- [RECORDS] [RECORD_BYTES]` prints, for one record per entry
//! and for several records packed into one entry, the leaf pages, records per leaf, how full the
//! pages are and the file's size against the bytes stored (docs/benchmarks.md, "1,000,000-uplink
//! backlog"). It writes to a temporary directory and removes it.

use redb::{Database, Durability, ReadableTableMetadata, TableDefinition};

const QUEUE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("queue");
/// Records per checkpoint commit (2 MiB of ~117-byte records).
const BATCH: u64 = 18_000;

fn run(
    dir: &std::path::Path,
    records: u64,
    record_bytes: usize,
    per_entry: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let path = dir.join(format!("fill-{per_entry}.redb"));
    let db = Database::create(&path)?;
    let entry = vec![0x5au8; record_bytes * per_entry as usize];
    let mut seq = 0u64;
    while seq < records {
        let mut w = db.begin_write()?;
        w.set_durability(Durability::Immediate);
        {
            let mut t = w.open_table(QUEUE)?;
            let end = (seq + BATCH).min(records);
            while seq < end {
                t.insert(&seq.to_be_bytes()[..], &entry[..])?;
                seq += per_entry;
            }
        }
        w.commit()?;
    }
    let w = db.begin_write()?;
    let entries = w.open_table(QUEUE)?.len()?;
    let stats = w.stats()?;
    w.commit()?;
    drop(db);
    let file = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let queued = records * record_bytes as u64;
    let page = stats.page_size() as u64;
    println!(
        "{per_entry:>3} record(s) per entry: {entries} entries, {} pages allocated, {} leaf pages ({:.1} records per \
         {page}-byte leaf, leaves {:.0} % full), {} branch pages, file {:.1} MB for {:.1} MB of \
         records = {:.2}x",
        stats.allocated_pages(),
        stats.leaf_pages(),
        records as f64 / stats.leaf_pages().max(1) as f64,
        100.0 * stats.stored_bytes() as f64 / (stats.leaf_pages().max(1) as f64 * page as f64),
        stats.branch_pages(),
        file as f64 / 1e6,
        queued as f64 / 1e6,
        file as f64 / queued as f64,
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `cargo bench` passes `--bench`; only the numbers are ours.
    let nums: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let records = nums.first().copied().unwrap_or(1_000_000);
    let record_bytes = nums.get(1).copied().unwrap_or(117) as usize;
    let dir = tempfile::tempdir()?;
    println!(
        "{records} records of {record_bytes} bytes, keys u64 big-endian, {BATCH} per durable commit"
    );
    for per_entry in [1, 8, 30] {
        run(dir.path(), records, record_bytes, per_entry)?;
    }
    Ok(())
}
