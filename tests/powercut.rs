//! Power cuts: the daemon's store on a FUSE filesystem that forgets everything not synced
//! (`tests/powercut_fs`), cut at random moments under load, remounted, the daemon started again.
//!
//! For each store backend and `flush_every_ms` of 0 and 100, a series of cuts (seeded; the seed
//! is printed): the store must open (a store moved aside counts as a failure), every uplink
//! PUSH_ACKed at least `dedup_window_ms + flush_every_ms + MARGIN` before its cut must be
//! delivered in the end, and replays of such uplinks must stay refused (FCnt state durable with
//! the records). The results table goes to stdout and to `target/tmp/powercut-results.md`.
//!
//! Needs root and /dev/fuse: skipped with the reason otherwise, mandatory with
//! `LORASTREAM_TEST_ROOT=1` (CI). `LORASTREAM_POWERCUT_CUTS` sets the cuts per backend
//! (default 10, half with each flush setting); `LORASTREAM_FAULT_SEED` repeats a run;
//! `LORASTREAM_POWERCUT_FS=strict` uses the POSIX-minimum directory model. See docs/powercut.md.

mod faultkit;
mod powercut_fs;
mod support;

use faultkit::*;
use powercut_fs::{DirModel, Disk};
use rand::{Rng, SeedableRng};
use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};
use support::BrokerKind;

/// Skip (true) unless this machine can mount the test filesystem (see `support::needs_root`).
fn skip(test: &str) -> bool {
    !support::needs_root(test, powercut_fs::available())
}

// ---------------------------------------------------------------------------------------------
// The tool itself

fn write_sync(p: &Path, data: &[u8], sync: bool) {
    let mut f = std::fs::File::create(p).unwrap();
    f.write_all(data).unwrap();
    if sync {
        f.sync_all().unwrap();
    }
}

fn sync_dir(p: &Path) {
    std::fs::File::open(p).unwrap().sync_all().unwrap();
}

/// The filesystem keeps exactly what its model promises, through real syscalls on a real mount.
#[test]
fn the_test_filesystem_keeps_only_what_was_synced() {
    if skip("the_test_filesystem_keeps_only_what_was_synced") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();

    // Journal model: any fsync commits earlier name changes; data only by its own fsync.
    let disk = Disk::new(DirModel::Journal);
    let m = disk.mount(&mnt).unwrap();
    let p = |n: &str| mnt.join(n);
    write_sync(&p("d"), b"D", true);
    write_sync(&p("f"), b"F", true);
    write_sync(&p("g"), &[b'g'; 10_000], true);
    write_sync(&p("b"), b"never synced", false);
    std::fs::create_dir(p("sub")).unwrap();
    write_sync(&p("a"), b"hello", true); // commits the names a, b, d, f, g, sub
    std::fs::OpenOptions::new()
        .append(true)
        .open(p("a"))
        .unwrap()
        .write_all(b" world")
        .unwrap();
    write_sync(&p("c"), b"C", false);
    std::fs::rename(p("d"), p("e")).unwrap();
    std::fs::remove_file(p("f")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(p("g"))
        .unwrap()
        .set_len(10)
        .unwrap();
    std::fs::create_dir(p("sub2")).unwrap();
    // The live view, before the cut.
    assert_eq!(std::fs::read(p("a")).unwrap(), b"hello world");
    assert_eq!(std::fs::read(p("e")).unwrap(), b"D");
    assert!(!p("d").exists() && !p("f").exists());
    assert_eq!(std::fs::metadata(p("g")).unwrap().len(), 10);
    assert!(disk.stats().fsyncs >= 4);
    m.unmount().unwrap();
    let r = disk.cut();
    let m = disk.mount(&mnt).unwrap();
    assert_eq!(
        std::fs::read(p("a")).unwrap(),
        b"hello",
        "unsynced append lost"
    );
    assert_eq!(
        std::fs::read(p("b")).unwrap(),
        b"",
        "name durable, data never synced"
    );
    assert!(!p("c").exists(), "created after the last fsync: gone");
    assert_eq!(std::fs::read(p("d")).unwrap(), b"D", "rename undone");
    assert!(!p("e").exists());
    assert_eq!(std::fs::read(p("f")).unwrap(), b"F", "unlink undone");
    assert_eq!(
        std::fs::read(p("g")).unwrap(),
        vec![b'g'; 10_000],
        "truncate undone"
    );
    assert!(p("sub").is_dir() && !p("sub2").exists());
    assert!(r.files_reverted >= 3 && r.names_reverted >= 4, "{r:?}");
    m.unmount().unwrap();

    // Strict model: a new name needs an fsync of its directory.
    let mnt2 = tmp.path().join("mnt2");
    std::fs::create_dir(&mnt2).unwrap();
    let disk = Disk::new(DirModel::Strict);
    let m = disk.mount(&mnt2).unwrap();
    write_sync(&mnt2.join("x"), b"X", true);
    std::fs::create_dir(mnt2.join("dir")).unwrap();
    sync_dir(&mnt2);
    write_sync(&mnt2.join("dir").join("y"), b"Y", true);
    sync_dir(&mnt2.join("dir"));
    write_sync(&mnt2.join("dir").join("z"), b"Z", true);
    m.unmount().unwrap();
    disk.cut();
    let m = disk.mount(&mnt2).unwrap();
    assert_eq!(std::fs::read(mnt2.join("x")).unwrap(), b"X");
    assert_eq!(std::fs::read(mnt2.join("dir").join("y")).unwrap(), b"Y");
    assert!(
        !mnt2.join("dir").join("z").exists(),
        "fsync of a file does not commit its name"
    );
    m.unmount().unwrap();
}

/// Random writes, truncates, fsyncs and cuts through the mount, checked against a plain model
/// (live bytes, synced bytes) after every read and every cut: the tool itself loses nothing
/// that was synced and keeps nothing that was not.
#[test]
fn the_test_filesystem_matches_a_reference_model() {
    if skip("the_test_filesystem_matches_a_reference_model") {
        return;
    }
    use std::os::unix::fs::FileExt;
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let disk = Disk::new(DirModel::Journal);
    let mut m = disk.mount(&mnt).unwrap();
    const FILES: usize = 3;
    let open = |i: usize| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(mnt.join(format!("f{i}")))
            .unwrap()
    };
    let mut files: Vec<std::fs::File> = (0..FILES).map(open).collect();
    for f in &files {
        f.sync_all().unwrap();
    }
    let mut live: Vec<Vec<u8>> = vec![Vec::new(); FILES];
    let mut synced: Vec<Vec<u8>> = vec![Vec::new(); FILES];
    let mut cuts = 0;
    for step in 0..3000 {
        let i = rng.random_range(0..FILES);
        let ctx = format!("seed {seed} step {step} file {i}");
        match rng.random_range(0..100) {
            0..=49 => {
                let off = rng.random_range(0..live[i].len() + 9000);
                let len = rng.random_range(1..12_000);
                let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                files[i].write_all_at(&data, off as u64).unwrap();
                if live[i].len() < off + len {
                    live[i].resize(off + len, 0);
                }
                live[i][off..off + len].copy_from_slice(&data);
            }
            50..=59 => {
                let len = rng.random_range(0..live[i].len() + 6000);
                files[i].set_len(len as u64).unwrap();
                live[i].resize(len, 0);
            }
            60..=74 => {
                if rng.random_bool(0.5) {
                    files[i].sync_all().unwrap();
                } else {
                    files[i].sync_data().unwrap();
                }
                synced[i] = live[i].clone();
            }
            75..=97 => {
                let off = rng.random_range(0..live[i].len() + 100);
                let len = rng.random_range(0..20_000);
                let mut buf = vec![0u8; len];
                let n = files[i].read_at(&mut buf, off as u64).unwrap();
                let want = &live[i][off.min(live[i].len())..(off + len).min(live[i].len())];
                if &buf[..n] != want {
                    let first = buf[..n].iter().zip(want).position(|(a, b)| a != b);
                    panic!(
                        "{ctx}: read {off}+{len} of {}: got {n} bytes, want {}, first difference at {first:?}",
                        live[i].len(),
                        want.len()
                    );
                }
            }
            _ => {
                drop(files);
                m.unmount().unwrap();
                disk.cut();
                cuts += 1;
                m = disk.mount(&mnt).unwrap();
                files = (0..FILES).map(open).collect();
                live = synced.clone();
                for (k, f) in files.iter().enumerate() {
                    assert_eq!(
                        f.metadata().unwrap().len(),
                        live[k].len() as u64,
                        "{ctx}: size after cut"
                    );
                    let mut all = vec![0u8; live[k].len()];
                    f.read_exact_at(&mut all, 0).unwrap();
                    assert!(
                        all == live[k],
                        "{ctx}: f{k} after cut differs from its synced bytes"
                    );
                }
            }
        }
    }
    assert!(cuts >= 15, "{cuts} cuts");
    drop(files);
    m.unmount().unwrap();
}

/// Calibration with a program whose durability is well known: SQLite (through python3), in WAL
/// mode with `synchronous = FULL` and in rollback-journal mode with `synchronous = EXTRA`
/// (EXTRA also fsyncs the directory after deleting the journal, which is what commits a
/// transaction in that mode), cut at random moments while it commits one row per transaction.
/// Every commit it reported must survive and the database must pass `integrity_check`: if this
/// failed, the tool (not the store under test) would be wrong. Skipped without python3.
#[test]
fn the_test_filesystem_keeps_every_sqlite_commit() {
    if skip("the_test_filesystem_keeps_every_sqlite_commit") {
        return;
    }
    if std::process::Command::new("python3")
        .args(["-c", "import sqlite3"])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED the_test_filesystem_keeps_every_sqlite_commit: no python3 with sqlite3"
        );
        return;
    }
    const WRITER: &str = r#"
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=" + sys.argv[2])
db.execute("PRAGMA synchronous=" + sys.argv[3])
db.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB)")
i = (db.execute("SELECT max(id) FROM t").fetchone()[0] or 0) + 1
while True:
    db.execute("BEGIN")
    db.execute("INSERT INTO t VALUES (?, randomblob(700))", (i,))
    db.execute("COMMIT")
    print(i, flush=True)
    i += 1
"#;
    // A writer killed before its CREATE TABLE committed (python can take longer to start than
    // the kill waits on a loaded machine) leaves no table: nothing was committed, (0, 0).
    const CHECK: &str = r#"
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
ok = db.execute("PRAGMA integrity_check").fetchone()[0]
has = db.execute("SELECT count(*) FROM sqlite_master WHERE name = 't'").fetchone()[0]
print(ok, db.execute("SELECT count(*), coalesce(max(id), 0) FROM t").fetchone() if has else (0, 0))
"#;
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (mode, sync) in [("WAL", "FULL"), ("DELETE", "EXTRA")] {
        let tmp = tempfile::tempdir().unwrap();
        let mnt = tmp.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let disk = Disk::new(DirModel::from_env());
        let mut m = disk.mount(&mnt).unwrap();
        let db = mnt.join("t.db");
        let mut committed = 0u64;
        for cut in 0..8 {
            let mut child = std::process::Command::new("python3")
                .args(["-c", WRITER])
                .arg(&db)
                .args([mode, sync])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let stdout = child.stdout.take().unwrap();
            // Reads to EOF: every commit printed before the kill counts; each one is also
            // passed on, so the cut comes only once this writer has made progress (on a busy
            // machine python may take a second just to start).
            let (seen_tx, seen_rx) = std::sync::mpsc::channel::<u64>();
            let reader = std::thread::spawn(move || {
                use std::io::BufRead;
                std::io::BufReader::new(stdout)
                    .lines()
                    .map_while(Result::ok)
                    .filter_map(|l| l.trim().parse::<u64>().ok())
                    .inspect(|n| {
                        let _ = seen_tx.send(*n);
                    })
                    .max()
            });
            let want = committed + 8;
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
                match seen_rx.recv_timeout(left) {
                    Ok(n) if n >= want => break,
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
            child.kill().unwrap();
            child.wait().unwrap();
            if let Some(n) = reader.join().unwrap() {
                committed = committed.max(n);
            }
            m.unmount().unwrap();
            let r = disk.cut();
            m = disk.mount(&mnt).unwrap();
            let out = std::process::Command::new("python3")
                .args(["-c", CHECK])
                .arg(&db)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
            // "ok (count, max)": no hole, nothing reported as committed missing (one more than
            // reported is fine: killed between COMMIT and the print).
            let nums: Vec<u64> = text
                .trim_start_matches("ok (")
                .trim_end_matches(')')
                .split(", ")
                .filter_map(|x| x.parse().ok())
                .collect();
            let fine = text.starts_with("ok (")
                && nums.len() == 2
                && nums[0] == nums[1]
                && (committed..=committed + 1).contains(&nums[1]);
            assert!(
                fine,
                "sqlite {mode}/{sync}, seed {seed}, cut {cut} ({r:?}): committed 1..={committed}, found {text:?} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            committed = nums[1];
        }
        assert!(committed > 50, "only {committed} commits");
        m.unmount().unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon under power cuts

#[derive(Default)]
struct Series {
    backend: &'static str,
    flush_every_ms: u64,
    cuts: usize,
    opened_ok: usize,
    moved_aside: usize,
    start_failed: usize,
    /// Uplinks that had to survive, and those of them that never arrived.
    must: usize,
    lost_beyond: usize,
    oldest_lost_beyond_ms: u128,
    /// Uplinks acked within the window before a cut, and those lost.
    at_risk: usize,
    lost_within: usize,
    oldest_lost_ms: u128,
    replays: u64,
    fcnt_regressions: u64,
    order_violations: usize,
    corr_conflicts: usize,
    fsyncs: u64,
    pages_lost: usize,
    notes: Vec<String>,
}

impl Series {
    fn ok(&self) -> bool {
        self.opened_ok == self.cuts
            && self.lost_beyond == 0
            && self.fcnt_regressions == 0
            && self.order_violations == 0
            && self.corr_conflicts == 0
    }

    fn row(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {}{} | {} of {} (oldest {} ms) | {} of {} | {} | {} |",
            self.backend,
            self.flush_every_ms,
            self.cuts,
            self.opened_ok,
            self.moved_aside,
            self.start_failed,
            self.must,
            self.lost_beyond,
            if self.lost_beyond > 0 {
                format!(" (oldest {} ms)", self.oldest_lost_beyond_ms)
            } else {
                String::new()
            },
            self.lost_within,
            self.at_risk,
            self.oldest_lost_ms,
            self.fcnt_regressions,
            self.replays,
            self.order_violations + self.corr_conflicts,
            if self.ok() { "pass" } else { "FAIL" },
        )
    }
}

const HEADER: &str = "| backend | flush_every_ms | cuts | store opened ok | moved aside | failed to start | uplinks that had to survive | lost beyond the window | lost within the window | replays accepted (FCnt went back) | order/correlation errors | result |\n|---|---|---|---|---|---|---|---|---|---|---|---|";

fn quarantined(mnt: &Path) -> HashSet<String> {
    std::fs::read_dir(mnt)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("db.corrupt-"))
                .collect()
        })
        .unwrap_or_default()
}

async fn series(
    backend: &'static str,
    flush_every_ms: u64,
    cuts: usize,
    seed: u64,
    model: DirModel,
) -> Series {
    let mut out = Series {
        backend,
        flush_every_ms,
        cuts,
        ..Series::default()
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let disk = Disk::new(model);
    let mut mounted = Some(disk.mount(&mnt).expect("mount the power-cut filesystem"));
    // The embedded broker: stopped for most runs so the store holds a backlog at the cut;
    // its log of received PUBLISHes is complete across its restarts.
    let mut sink = Sink::start(BrokerKind::Embedded, tmp.path()).await;
    let mut sink_up = true;
    let devs = devices(8);
    let body = devices_toml(&devs) + &mqtt_stream("cloud", &sink.url(), "lorastream");
    let mut spec = DaemonSpec::new(&tmp.path().join("run"), backend, body);
    spec.store = mnt.join("db");
    spec.flush_every_ms = flush_every_ms;
    let window = spec.dedup_window() + Duration::from_millis(flush_every_ms) + MARGIN;

    let mut daemon = DaemonProc::start(&spec).await;
    let mut runs = vec![Run {
        ready: Instant::now(),
        killed: None,
    }];
    let load = Load::start(spec.udp, devs, 200.0).await;
    let mut seen_aside = HashSet::new();
    for i in 0..cuts {
        // One run in three delivers (acks and deletes in flight at the cut), the others queue.
        let up = rng.random_bool(1.0 / 3.0);
        if up != sink_up {
            if up {
                sink.restart().await
            } else {
                sink.stop().await
            }
            sink_up = up;
        }
        let run_for = Duration::from_millis(rng.random_range(300..1500));
        tokio::time::sleep(run_for).await;

        // The cut: the process dies, then every unsynced byte and name change is gone.
        let t = daemon.kill9();
        runs.last_mut().unwrap().killed = Some(t);
        mounted
            .take()
            .unwrap()
            .unmount()
            .expect("unmount after the cut");
        let lost = disk.cut();
        out.pages_lost += lost.pages_lost;
        mounted = Some(disk.mount(&mnt).expect("remount after the cut"));

        let (d, failed) = match DaemonProc::try_start(&spec).await {
            Ok(d) => (d, None),
            Err(e) => {
                // Keep the evidence, then go on with a fresh store so the series completes.
                let aside = mnt.join(format!("db.failed-{i}"));
                let _ = std::fs::rename(&spec.store, &aside);
                (DaemonProc::start(&spec).await, Some(e))
            }
        };
        daemon = d;
        runs.push(Run {
            ready: Instant::now(),
            killed: None,
        });
        let aside: HashSet<String> = quarantined(&mnt).difference(&seen_aside).cloned().collect();
        seen_aside.extend(aside.iter().cloned());
        match (&failed, aside.is_empty()) {
            (Some(e), _) => {
                out.start_failed += 1;
                out.notes.push(format!(
                    "cut {i}: the daemon did not start on the cut store: {}",
                    e.lines().rev().take(6).collect::<Vec<_>>().join(" / ")
                ));
            }
            (None, false) => {
                out.moved_aside += 1;
                let why = std::fs::read_to_string(&daemon.log)
                    .unwrap_or_default()
                    .lines()
                    .find(|l| l.contains("moving it aside"))
                    .unwrap_or("")
                    .to_string();
                out.notes
                    .push(format!("cut {i}: store moved aside as {aside:?}: {why}"));
            }
            (None, true) => out.opened_ok += 1,
        }

        // FCnt state: replays of uplinks that had to survive are refused.
        let replay = replay_candidates(&load.log(), &runs, window, None);
        for s in &replay {
            load.replay(s).await;
        }
        let n = replay.len() as u64;
        let m = daemon
            .wait_metrics(Duration::from_secs(5), |m| {
                m.uplinks("repeat") + m.uplinks("replay") == n
            })
            .await;
        let refused = m.uplinks("repeat") + m.uplinks("replay");
        out.replays += n;
        if refused < n {
            out.fcnt_regressions += n - refused;
            out.notes.push(format!(
                "cut {i}: {} of {n} replays of stored uplinks accepted again",
                n - refused
            ));
        }
    }
    // The end: the broker comes back, everything that had to survive must arrive.
    if !sink_up {
        sink.restart().await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.pause();
    load.wait_all_acked(Duration::from_secs(5)).await;
    let replays = load.replays();
    let log = load.stop().await;
    let must = uplink_keys(&log, |s| must_survive(s, &runs, window));
    // Drained queue = everything the store still had reached the broker (the embedded broker
    // logs a PUBLISH before it acknowledges it).
    daemon
        .wait_metrics(Duration::from_secs(60), |m| m.depth("cloud") == 0)
        .await;
    sink.wait_for_all(&must, Duration::from_secs(2)).await;
    // Replays the daemon accepted again are FCnt regressions (counted above), not deliveries.
    let (deliveries, _) = without_replays(sink.deliveries(), &replays);
    let a = audit(&log, &deliveries, |s| must_survive(s, &runs, window));
    let delivered = uplink_keys_delivered(&deliveries);
    let mut lost_ages = Vec::new();
    for s in &log {
        if let Some(age) = at_risk_age(s, &runs, window) {
            out.at_risk += 1;
            if !delivered.contains(&(s.dev, s.f_cnt)) {
                lost_ages.push(age);
            }
        }
    }
    out.must = a.must;
    out.lost_beyond = a.missing.len();
    let missing: HashSet<(u8, u32)> = a.missing.iter().copied().collect();
    out.oldest_lost_beyond_ms = log
        .iter()
        .filter(|s| missing.contains(&(s.dev, s.f_cnt)))
        .filter_map(|s| {
            let t = s.acked?;
            runs.iter().find_map(|r| {
                r.killed
                    .filter(|k| r.ready <= t && t < *k)
                    .map(|k| (k - t).as_millis())
            })
        })
        .max()
        .unwrap_or(0);
    out.lost_within = lost_ages.len();
    out.oldest_lost_ms = lost_ages.iter().max().map(|d| d.as_millis()).unwrap_or(0);
    out.order_violations = a.order_violations.len();
    out.corr_conflicts = a.corr_conflicts.len();
    out.fsyncs = disk.stats().fsyncs;
    if !a.ok() {
        out.notes.push(a.summary());
        // Which run lost them: by the time they were acked.
        let mut per_run = vec![0usize; runs.len()];
        for s in &log {
            if a.missing.contains(&(s.dev, s.f_cnt)) {
                if let Some(r) = s
                    .acked
                    .and_then(|t| runs.iter().rposition(|r| r.ready <= t))
                {
                    per_run[r] += 1;
                }
            }
        }
        out.notes.push(format!(
            "missing by run (acked during run n, cut n ends it): {per_run:?}"
        ));
    }
    if !out.ok() {
        // Each missing uplink and each replay accepted again, placed in time.
        let at = |t: Instant| -> String {
            match runs.iter().rposition(|r| r.ready <= t) {
                Some(i) => format!(
                    "run {i} +{} ms{}",
                    (t - runs[i].ready).as_millis(),
                    runs[i]
                        .killed
                        .map(|k| format!(
                            " (cut {} ms later)",
                            k.saturating_duration_since(t).as_millis()
                        ))
                        .unwrap_or_default()
                ),
                None => "before run 0".into(),
            }
        };
        let (wall0, now) = (std::time::SystemTime::now(), Instant::now());
        let to_instant =
            |w: std::time::SystemTime| now - wall0.duration_since(w).unwrap_or_default();
        for s in log.iter().filter(|s| a.missing.contains(&(s.dev, s.f_cnt))) {
            out.notes.push(format!(
                "missing dev-{}/{}: acked {}; replayed {}",
                s.dev,
                s.f_cnt,
                s.acked.map(at).unwrap_or_default(),
                replays
                    .get(&(s.dev, s.f_cnt))
                    .map(|w| at(to_instant(*w)))
                    .unwrap_or("never".into())
            ));
        }
        for d in sink.deliveries() {
            if let Some(w) = replays.get(&(d.dev, d.f_cnt)) {
                if d.received_at + Duration::from_millis(50) >= *w {
                    let orig = log.iter().find(|s| (s.dev, s.f_cnt) == (d.dev, d.f_cnt));
                    out.notes.push(format!(
                        "replay accepted dev-{}/{}: replayed {}, original acked {}, this copy read by the daemon {}",
                        d.dev,
                        d.f_cnt,
                        at(to_instant(*w)),
                        orig.and_then(|o| o.acked).map(at).unwrap_or_default(),
                        at(to_instant(d.received_at))
                    ));
                }
            }
        }
    }
    if !out.ok() {
        // What the daemons said about their store (MQTT connection errors aside).
        let mut said = Vec::new();
        let mut logs: Vec<_> = std::fs::read_dir(&spec.dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        for l in logs {
            let text = std::fs::read_to_string(&l).unwrap_or_default();
            for line in text.lines() {
                if (line.contains("ERROR") || line.contains("WARN")) && !line.contains("MQTT") {
                    said.push(format!(
                        "{}: {line}",
                        l.file_name().unwrap().to_string_lossy()
                    ));
                }
            }
        }
        out.notes.extend(said.into_iter().take(10));
    }
    daemon.stop(Duration::from_secs(5)).await;
    drop(mounted);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn power_cuts_lose_nothing_older_than_the_durability_window() {
    if skip("power_cuts_lose_nothing_older_than_the_durability_window") {
        return;
    }
    let per_backend: usize = std::env::var("LORASTREAM_POWERCUT_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
        .max(2);
    let seed = seed();
    let model = DirModel::from_env();
    println!(
        "power cuts: seed {seed} (LORASTREAM_FAULT_SEED={seed} repeats it), {per_backend} cuts per backend, directory model {model:?}"
    );
    let t0 = Instant::now();
    let mut all = Vec::new();
    for backend in backends() {
        for (k, flush) in [0u64, 100].into_iter().enumerate() {
            let cuts = per_backend / 2 + (k == 0) as usize * (per_backend % 2);
            let s = series(backend, flush, cuts, seed.wrapping_add(k as u64), model).await;
            println!("{HEADER}\n{}", s.row());
            for n in &s.notes {
                println!("  {n}");
            }
            all.push(s);
        }
    }
    let mut table = format!(
        "Power-cut results: seed {seed}, directory model {model:?}, {per_backend} cuts per backend, {:.0} s\n\n{HEADER}\n",
        t0.elapsed().as_secs_f64()
    );
    for s in &all {
        table += &s.row();
        table.push('\n');
    }
    for s in &all {
        for n in &s.notes {
            table += &format!("\n- {} flush {}: {n}", s.backend, s.flush_every_ms);
        }
    }
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("powercut-results.md");
    let _ = std::fs::write(&path, &table);
    // Straight to stderr, so CI logs show the table of a passing run too.
    let _ = writeln!(
        std::io::stderr(),
        "{table}\n(written to {})",
        path.display()
    );
    assert!(all.iter().all(Series::ok), "power-cut failures:\n{table}");
}
