use super::*;
use crate::config::WhenFull;
use crate::model::DevAddr;
use std::path::Path;

/// Every store test runs against every engine of the build (sled with the `sled` feature);
/// `LORASTREAM_TEST_BACKENDS=sled` narrows the list (as tests/support::backends()).
fn backends() -> Vec<StorageBackend> {
    let mut b = vec![StorageBackend::Redb];
    if cfg!(feature = "sled") {
        b.push(StorageBackend::Sled);
    }
    if let Ok(only) = std::env::var("LORASTREAM_TEST_BACKENDS") {
        b.retain(|e| only.split(',').any(|o| o.trim() == e.name()));
    }
    b
}

fn cfg_for(backend: StorageBackend, dir: &Path, max_bytes: u64, flush: u64) -> StorageConfig {
    StorageConfig {
        path: dir.join("db"),
        backend,
        max_bytes,
        flush_every_ms: flush,
        ..Default::default()
    }
}

fn uplink(n: u32) -> Record {
    let mut u = crate::sim::fixtures::uplink(1, n);
    (u.application, u.device) = ("app".into(), "dev".into());
    Record::Uplink(u)
}

fn fcnts(q: &Queue) -> Vec<u32> {
    q.read_after(None, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(_, r)| match r {
            Record::Uplink(u) => u.f_cnt,
            _ => 0,
        })
        .collect()
}

/// The store's committer on its own task, and the token that stops it.
fn spawn_committer(
    s: &Store,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let cancel = tokio_util::sync::CancellationToken::new();
    let committer = tokio::spawn(
        s.clone()
            .run_committer(cancel.clone(), crate::liveness::Heartbeat::detached()),
    );
    (cancel, committer)
}

fn streams(names: &[&str]) -> Vec<(String, WhenFull)> {
    names
        .iter()
        .map(|n| (n.to_string(), WhenFull::DropOldest))
        .collect()
}

#[tokio::test]
async fn append_read_ack_and_reopen() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg_for(backend, dir.path(), 1 << 20, 0);
        {
            let (s, _) = Store::open(&c, &streams(&["a", "b"])).unwrap();
            for n in 0..5 {
                let r = uplink(n);
                append_to(&s, &r, &[0, 1]).await;
            }
            let a = s.queue("a").unwrap();
            let items = a.read_after(None, 2).unwrap();
            assert_eq!(items.len(), 2);
            assert!(a.ack(items[0].0).unwrap());
            assert!(!a.ack(items[0].0).unwrap(), "second ack is a no-op");
            assert_eq!(fcnts(&a), vec![1, 2, 3, 4]);
            assert_eq!(a.read_after(Some(items[1].0), 10).unwrap().len(), 3);
            let st = SessionState {
                dev_addr: DevAddr(7),
                f_cnt_up: Some(9),
                f_cnt_down: 2,
            };
            s.save_session(Eui64::from_u64(7), &st).await.unwrap();
            // Acks are batched into the next commit; a graceful stop commits them.
            s.flush().await.unwrap();
        }
        // Reopen: queues and sessions are still there; the queue of stream "b", removed from
        // the config, is kept on disk (and reported), not deleted.
        let (s, report) = Store::open(&c, &streams(&["a"])).unwrap();
        assert_eq!(report.kept_queues, vec![("b".to_string(), 5)]);
        assert!(s.queue("b").is_none());
        let a = s.queue("a").unwrap();
        assert_eq!(fcnts(&a), vec![1, 2, 3, 4]);
        assert_eq!(a.len(), 4);
        let sessions = s.load_sessions().unwrap();
        assert_eq!(sessions[0].1.f_cnt_up, Some(9));
        // New records get larger sequence numbers than the surviving ones.
        let r = uplink(5);
        append_to(&s, &r, &[0]).await;
        assert_eq!(fcnts(&a), vec![1, 2, 3, 4, 5]);
        s.flush().await.unwrap();
        drop((a, s));
        // "b" comes back: its records are all there, in order, and new ones go after them.
        let (s, report) = Store::open(&c, &streams(&["a", "b"])).unwrap();
        assert!(report.kept_queues.is_empty());
        let b = s.queue("b").unwrap();
        assert_eq!(fcnts(&b), vec![0, 1, 2, 3, 4]);
        append_to(&s, &uplink(9), &[1]).await;
        assert_eq!(fcnts(&b), vec![0, 1, 2, 3, 4, 9]);
        s.flush().await.unwrap();
        drop((b, s));
        // Dropped on request, only when no longer configured, only when it exists.
        let names = |v: &[&str]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert!(matches!(
            super::drop_queue(&c, "b", &names(&["a", "b"])),
            Err(StoreError::QueueInUse(_))
        ));
        assert_eq!(super::drop_queue(&c, "b", &names(&["a"])).unwrap(), 6);
        assert!(matches!(
            super::drop_queue(&c, "b", &names(&["a"])),
            Err(StoreError::NoSuchQueue(_))
        ));
        let (s, report) = Store::open(&c, &streams(&["a"])).unwrap();
        assert!(report.kept_queues.is_empty());
        assert_eq!(fcnts(&s.queue("a").unwrap()), vec![1, 2, 3, 4, 5]);
    }
}

#[tokio::test]
async fn cap_drop_oldest_and_reject_new_count_exactly() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let size = records::encode(&uplink(0)).unwrap().len() as u64;
        // Room for exactly 10 records (all queues together).
        let c = cfg_for(backend, dir.path(), size * 10, 100);
        let (s, _) = Store::open(
            &c,
            &[
                ("old".to_string(), WhenFull::DropOldest),
                ("new".to_string(), WhenFull::RejectNew),
            ],
        )
        .unwrap();
        let (qi_old, qi_new) = (s.queue_index("old").unwrap(), s.queue_index("new").unwrap());
        for n in 0..15 {
            let r = uplink(n);
            append_to(&s, &r, &[qi_old]).await;
        }
        let old = s.queue("old").unwrap();
        assert_eq!(fcnts(&old), (5..15).collect::<Vec<_>>());
        assert_eq!(old.stats().dropped.get("queue_full_drop_oldest"), Some(&5));
        assert_eq!(s.total_bytes(), size * 10);
        // A reject_new stream refuses new records while the cap is reached; it never evicts.
        let r = uplink(99);
        let out = append_to(&s, &r, &[qi_new]).await;
        assert_eq!(out.rejected, 1);
        let new = s.queue("new").unwrap();
        assert_eq!(new.stats().dropped.get("queue_full_reject_new"), Some(&1));
        assert!(new.is_empty());
        // Acks free room.
        for (seq, _) in old.read_after(None, 3).unwrap() {
            old.ack(seq).unwrap();
        }
        let out = append_to(&s, &r, &[qi_new]).await;
        assert_eq!(out.written, 1);
        assert_eq!(new.len(), 1);
    }
}

/// One append carrying more records than the cap (a busy uplink stage batches): a drop_oldest
/// queue keeps the newest of the batch and counts the rest as dropped oldest, never as
/// rejected; the bytes stay under the cap.
#[tokio::test]
async fn a_batch_larger_than_the_cap_keeps_its_newest_records() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let size = records::encode(&uplink(0)).unwrap().len() as u64;
        let c = cfg_for(backend, dir.path(), size * 4, 100);
        let (s, _) = Store::open(&c, &streams(&["a"])).unwrap();
        append_to(&s, &uplink(0), &[0]).await;
        let batch: Vec<Record> = (1..10).map(uplink).collect();
        let entries: Vec<Entry> = batch
            .iter()
            .map(|r| Entry {
                record: r,
                queues: &[0],
            })
            .collect();
        let out = s.append(&entries, &[]).await.unwrap();
        assert_eq!((out.written, out.rejected, out.evicted), (4, 0, 6));
        let a = s.queue("a").unwrap();
        assert_eq!(fcnts(&a), vec![6, 7, 8, 9]);
        assert_eq!(a.stats().dropped.get("queue_full_drop_oldest"), Some(&6));
        assert_eq!(a.stats().dropped.get("queue_full_reject_new"), None);
        assert_eq!(s.total_bytes(), size * 4);
        assert_eq!(a.len(), 4);
    }
}

#[tokio::test]
async fn unreadable_store_is_moved_aside_not_deleted() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg_for(backend, dir.path(), 1 << 20, 100);
        // A regular file where the database directory should be cannot be opened by sled.
        std::fs::write(&c.path, b"not a database").unwrap();
        let (s, report) = Store::open(&c, &streams(&["a"])).unwrap();
        let aside = report.quarantined.expect("moved aside");
        assert_eq!(std::fs::read(&aside).unwrap(), b"not a database");
        let r = uplink(1);
        append_to(&s, &r, &[0]).await;
        assert_eq!(s.queue("a").unwrap().len(), 1);
    }
}

#[tokio::test]
async fn expire_drops_only_old_records_and_counts_them() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(
            &cfg_for(backend, dir.path(), 1 << 20, 100),
            &streams(&["a"]),
        )
        .unwrap();
        for (n, at) in [(0u32, 100i64), (1, 200), (2, 300), (3, 50)] {
            let mut r = uplink(n);
            if let Record::Uplink(u) = &mut r {
                u.received_at_us = at;
            }
            append_to(&s, &r, &[0]).await;
        }
        // A step looks at `budget` records at most and says when it stopped short.
        assert_eq!(s.expire_step(250, 1).unwrap(), (1, false));
        assert_eq!(fcnts(&s.queue("a").unwrap()), vec![1, 2, 3]);
        // Arrival order decides: the head is looked at, so the late "50" behind "300" stays.
        assert_eq!(s.expire_step(250, 2).unwrap(), (1, true));
        let a = s.queue("a").unwrap();
        assert_eq!(fcnts(&a), vec![2, 3]);
        assert_eq!(a.stats().dropped.get("expired"), Some(&2));
        assert_eq!(s.expire_step(250, 100).unwrap(), (0, true));
        // Everything old, in steps smaller than the queue: all of it goes, the last step done.
        assert_eq!(s.expire_step(1_000, 1).unwrap(), (1, false));
        assert_eq!(s.expire_step(1_000, 1).unwrap(), (1, false));
        assert_eq!(s.expire_step(1_000, 1).unwrap(), (0, true));
        assert_eq!(a.len(), 0);
    }
}

/// Journal generation files (puts), not the reserve.
fn journal_files(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("db"))
        .unwrap()
        .filter(|e| {
            let n = e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .into_owned();
            n.starts_with("journal.") && n != "journal.reserve"
        })
        .count()
}

/// Append one record to the given queues (no session updates).
async fn append_to(s: &Store, r: &Record, queues: &[usize]) -> Appended {
    s.append(&[Entry { record: r, queues }], &[]).await.unwrap()
}

async fn add(s: &Store, r: &Record) {
    append_to(s, r, &[0]).await;
}

#[tokio::test]
async fn the_group_commit_window_is_journaled_and_replayed_after_a_kill() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg_for(backend, dir.path(), 1 << 20, 100);
        let st = SessionState {
            dev_addr: DevAddr(1),
            f_cnt_up: Some(41),
            f_cnt_down: 0,
        };
        {
            let (s, _) = Store::open(&c, &streams(&["a"])).unwrap();
            for n in 0..5 {
                let r = uplink(n);
                s.append(
                    &[Entry {
                        record: &r,
                        queues: &[0],
                    }],
                    &[DeviceUpdate {
                        dev_eui: Eui64::from_u64(1),
                        session: st,
                        mac: None,
                    }],
                )
                .await
                .unwrap();
            }
            let a = s.queue("a").unwrap();
            assert_eq!(a.unsaved(), 5, "{backend:?}: nothing committed yet");
            assert_eq!(fcnts(&a), vec![0, 1, 2, 3, 4]);
            assert!(journal_files(dir.path()) > 0);
            // A reload reads the counters appended since the last checkpoint, not the
            // engine's older ones (which would let those frames be replayed).
            let loaded = s.load_sessions().unwrap();
            assert_eq!(loaded.len(), 1, "{backend:?}");
            assert_eq!(loaded[0].1.f_cnt_up, Some(41), "{backend:?}");
            // Dropped without a flush: what a SIGKILL leaves (the journal is in the page cache).
        }
        let (s, report) = Store::open(&c, &streams(&["a"])).unwrap();
        assert_eq!(
            report.journal_replayed, 10,
            "{backend:?}: 5 records + 5 session updates"
        );
        assert_eq!(fcnts(&s.queue("a").unwrap()), vec![0, 1, 2, 3, 4]);
        assert_eq!(s.load_sessions().unwrap()[0].1.f_cnt_up, Some(41));
        assert_eq!(
            journal_files(dir.path()),
            0,
            "replayed generations are removed"
        );
        // New sequence numbers continue after the replayed ones.
        add(&s, &uplink(5)).await;
        assert_eq!(fcnts(&s.queue("a").unwrap()), vec![0, 1, 2, 3, 4, 5]);
    }
}

/// Acknowledgements reach the journal once per window (the committer's tick): a kill after it
/// redelivers none of them, for records journaled and for records already in the engine.
#[tokio::test]
async fn acknowledgements_are_journaled_and_survive_a_kill() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg_for(backend, dir.path(), 1 << 20, 100);
        {
            let (s, _) = Store::open(&c, &streams(&["a"])).unwrap();
            for n in 0..3 {
                add(&s, &uplink(n)).await;
            }
            s.flush().await.unwrap();
            for n in 3..6 {
                add(&s, &uplink(n)).await;
            }
            let a = s.queue("a").unwrap();
            let all = a.read_after(None, 10).unwrap();
            // One from the engine, two from the journal.
            for (seq, _) in all
                .iter()
                .filter(|(_, r)| matches!(r, Record::Uplink(u) if [1, 3, 4].contains(&u.f_cnt)))
            {
                assert!(a.ack(*seq).unwrap());
            }
            s.write_acks();
            // Killed: no flush.
        }
        let (s, report) = Store::open(&c, &streams(&["a"])).unwrap();
        assert_eq!(report.acks_replayed, 3, "{backend:?}");
        assert_eq!(fcnts(&s.queue("a").unwrap()), vec![0, 2, 5], "{backend:?}");
        assert_eq!(report.lost_at_last_stop, 0);
    }
}

/// A journal written after a restart is replayed after the next kill too: its generations
/// continue after the one the engine last recorded as committed (`meta`/`journal_gen`), not
/// from 0 again once the replayed files are gone, which a replay would skip as committed.
#[tokio::test]
async fn a_second_kill_after_a_replay_loses_nothing() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg_for(backend, dir.path(), 1 << 20, 100);
        {
            let (s, _) = Store::open(&c, &streams(&["a"])).unwrap();
            // Checkpoints record the covered generations in the engine.
            for n in 0..3 {
                add(&s, &uplink(n)).await;
                s.flush().await.unwrap();
            }
            add(&s, &uplink(3)).await;
            // Killed: no flush.
        }
        {
            let (s, report) = Store::open(&c, &streams(&["a"])).unwrap();
            assert_eq!(report.journal_replayed, 1, "{backend:?}");
            add(&s, &uplink(4)).await;
            add(&s, &uplink(5)).await;
            // Killed again before a checkpoint.
        }
        let (s, report) = Store::open(&c, &streams(&["a"])).unwrap();
        assert_eq!(report.journal_replayed, 2, "{backend:?}");
        assert_eq!(
            fcnts(&s.queue("a").unwrap()),
            vec![0, 1, 2, 3, 4, 5],
            "{backend:?}"
        );
    }
}

#[tokio::test]
async fn a_commit_moves_the_window_to_disk_and_removes_the_journal() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg_for(backend, dir.path(), 1 << 20, 100);
        let (s, _) = Store::open(&c, &streams(&["a"])).unwrap();
        for n in 0..3 {
            add(&s, &uplink(n)).await;
        }
        let a = s.queue("a").unwrap();
        assert_eq!(a.unsaved(), 3);
        s.flush().await.unwrap();
        assert_eq!(a.unsaved(), 0, "{backend:?}");
        assert_eq!(journal_files(dir.path()), 0, "{backend:?}");
        assert_eq!(fcnts(&a), vec![0, 1, 2]);
        assert_eq!(s.health().commits, 1);
        assert!(s.health().writable);
        // Reading across disk and memory keeps order and skips nothing.
        add(&s, &uplink(3)).await;
        let first = a.read_after(None, 2).unwrap();
        assert_eq!(a.read_after(Some(first[1].0), 10).unwrap().len(), 2);
        assert_eq!(fcnts(&a), vec![0, 1, 2, 3]);
    }
}

/// With the cloud acknowledging everything, nothing waits in memory, but the journal keeps
/// every record until the next checkpoint: its size alone triggers one
/// ([`CHECKPOINT_JOURNAL_BYTES`]), long before [`CHECKPOINT_EVERY`], so the journal's disk
/// space and the replay after a kill stay bounded at any rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_journal_of_acknowledged_records_triggers_a_checkpoint() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg_for(backend, dir.path(), 64 << 20, 100);
        let (s, _) = Store::open(&c, &streams(&["a"])).unwrap();
        let (cancel, committer) = spawn_committer(&s);
        let a = s.queue("a").unwrap();
        let st = |n: u32| SessionState {
            dev_addr: DevAddr(1),
            f_cnt_up: Some(n),
            f_cnt_down: 0,
        };
        let mut n = 0u32;
        while s.journal().written() < CHECKPOINT_JOURNAL_BYTES && s.health().commits == 0 {
            let r = uplink(n);
            let up = [DeviceUpdate {
                dev_eui: Eui64::from_u64(1),
                session: st(n),
                mac: None,
            }];
            s.append(
                &[Entry {
                    record: &r,
                    queues: &[0],
                }],
                &up,
            )
            .await
            .unwrap();
            let (seq, _) = a.read_after(None, 1).unwrap()[0];
            assert!(a.ack(seq).unwrap());
            n += 1;
        }
        assert!(
            s.health().unsaved_bytes < CHECKPOINT_BYTES,
            "{backend:?}: the memory trigger must not be what fires"
        );
        let end = Instant::now() + CHECKPOINT_EVERY / 3;
        while s.health().commits == 0 && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            s.health().commits >= 1,
            "{backend:?}: no checkpoint after {n} acknowledged uplinks, journal {} bytes",
            s.journal().written()
        );
        assert!(
            s.journal().written() < CHECKPOINT_JOURNAL_BYTES,
            "{backend:?}: the journal starts over"
        );
        assert_eq!(s.load_sessions().unwrap()[0].1.f_cnt_up, Some(n - 1));
        cancel.cancel();
        committer.await.unwrap();
        assert!(a.is_empty());
    }
}

#[tokio::test]
async fn acks_are_batched_and_an_uncommitted_ack_only_means_a_redelivery() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg_for(backend, dir.path(), 1 << 20, 0);
        {
            let (s, _) = Store::open(&c, &streams(&["a"])).unwrap();
            for n in 0..3 {
                add(&s, &uplink(n)).await;
            }
            let a = s.queue("a").unwrap();
            assert_eq!(
                a.unsaved(),
                0,
                "{backend:?}: flush_every_ms = 0 commits in append"
            );
            let first = a.read_after(None, 1).unwrap()[0].0;
            assert!(a.ack(first).unwrap());
            assert_eq!(fcnts(&a), vec![1, 2], "gone at once for readers");
            assert_eq!(a.len(), 2);
            // No commit of the delete: as after a crash.
        }
        let (s, _) = Store::open(&c, &streams(&["a"])).unwrap();
        let a = s.queue("a").unwrap();
        assert_eq!(fcnts(&a), vec![0, 1, 2], "{backend:?}: redelivered");
        let first = a.read_after(None, 1).unwrap()[0].0;
        assert!(a.ack(first).unwrap());
        assert!(!a.ack(first).unwrap());
        s.flush().await.unwrap();
        assert_eq!(fcnts(&a), vec![1, 2]);
        drop((a, s));
        let (s, _) = Store::open(&c, &streams(&["a"])).unwrap();
        assert_eq!(fcnts(&s.queue("a").unwrap()), vec![1, 2]);
    }
}

#[tokio::test]
async fn a_record_acked_within_its_window_never_reaches_the_disk() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg_for(backend, dir.path(), 1 << 20, 100);
        let (s, _) = Store::open(&c, &streams(&["a"])).unwrap();
        add(&s, &uplink(0)).await;
        let a = s.queue("a").unwrap();
        let seq = a.read_after(None, 1).unwrap()[0].0;
        assert!(a.ack(seq).unwrap());
        assert_eq!(
            a.pending(),
            (0, 0),
            "{backend:?}: no write, no delete left to do"
        );
        assert!(!s.commit().await.unwrap(), "nothing to commit");
        assert_eq!(a.stats().delivered, 1);
    }
}

#[cfg(feature = "sled")]
#[tokio::test]
async fn switching_the_engine_migrates_the_store_and_keeps_the_old_files() {
    for (from, to) in [
        (StorageBackend::Sled, StorageBackend::Redb),
        (StorageBackend::Redb, StorageBackend::Sled),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg_for(from, dir.path(), 1 << 20, 0);
        let st = SessionState {
            dev_addr: DevAddr(3),
            f_cnt_up: Some(77),
            f_cnt_down: 5,
        };
        {
            let (s, _) = Store::open(&c, &streams(&["a"])).unwrap();
            for n in 0..4 {
                add(&s, &uplink(n)).await;
            }
            s.save_session(Eui64::from_u64(3), &st).await.unwrap();
            s.flush().await.unwrap();
        }
        let c2 = StorageConfig {
            backend: to,
            ..c.clone()
        };
        let (s, report) = Store::open(&c2, &streams(&["a"])).unwrap();
        let aside = report.migrated_from.expect("migrated");
        assert!(aside.starts_with(&c.path) && aside.is_dir());
        assert!(
            std::fs::read_dir(&aside).unwrap().count() > 0,
            "old files kept"
        );
        assert_eq!(
            fcnts(&s.queue("a").unwrap()),
            vec![0, 1, 2, 3],
            "{from:?} → {to:?}"
        );
        let sess = s.load_sessions().unwrap();
        assert_eq!(sess[0].1.f_cnt_up, Some(77));
        assert_eq!(sess[0].1.f_cnt_down, 5);
        assert_eq!(s.backend(), to);
    }
}

/// A build without sled meets a sled store (an upgrade from a build that had it): it refuses to
/// start, says what to do, and leaves every file where it is (no empty store beside it, nothing
/// moved aside).
#[cfg(not(feature = "sled"))]
#[tokio::test]
async fn a_sled_store_without_the_sled_feature_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg_for(StorageBackend::Redb, dir.path(), 1 << 20, 100);
    std::fs::create_dir_all(&c.path).unwrap();
    std::fs::write(c.path.join("conf"), b"segment_size: 524288").unwrap();
    std::fs::write(c.path.join("db"), b"sled data").unwrap();
    let err = match Store::open(&c, &streams(&["a"])) {
        Ok(_) => panic!("a sled store must not be opened without sled"),
        Err(e) => e,
    };
    assert!(matches!(err, StoreError::EngineMissing { .. }), "{err}");
    assert!(err.to_string().contains("`sled` cargo feature"), "{err}");
    let mut names: Vec<String> = std::fs::read_dir(&c.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["conf", "db"]);
    assert_eq!(std::fs::read(c.path.join("db")).unwrap(), b"sled data");
}

#[tokio::test]
async fn a_store_in_use_is_refused_not_moved_aside() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg_for(backend, dir.path(), 1 << 20, 0);
        let (_s, _) = Store::open(&c, &streams(&["a"])).unwrap();
        match Store::open(&c, &streams(&["a"])) {
            Err(StoreError::Locked { .. }) => {}
            Err(e) => panic!("{backend:?}: {e}"),
            Ok(_) => panic!("{backend:?}: opened twice"),
        }
        assert!(
            !std::fs::read_dir(dir.path()).unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("corrupt")),
            "{backend:?}: nothing moved aside"
        );
        assert!(matches!(inspect(&c), Err(StoreError::Locked { .. })));
    }
}

#[tokio::test]
async fn a_corrupt_redb_file_is_moved_aside_and_a_fresh_store_starts() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg_for(StorageBackend::Redb, dir.path(), 1 << 20, 0);
    {
        let (s, _) = Store::open(&c, &streams(&["a"])).unwrap();
        add(&s, &uplink(0)).await;
    }
    // Overwrite the header and the commit slots.
    let file = c.path.join(backend::REDB_FILE);
    let mut b = std::fs::read(&file).unwrap();
    for x in b.iter_mut().take(4096) {
        *x = 0x5A;
    }
    std::fs::write(&file, &b).unwrap();
    let (s, report) = Store::open(&c, &streams(&["a"])).unwrap();
    let aside = report.quarantined.expect("moved aside");
    assert_eq!(
        std::fs::read(aside.join(backend::REDB_FILE)).unwrap(),
        b,
        "kept byte for byte"
    );
    add(&s, &uplink(1)).await;
    assert_eq!(fcnts(&s.queue("a").unwrap()), vec![1]);
}

#[tokio::test]
async fn inspect_counts_disk_and_journal_without_changing_anything() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg_for(backend, dir.path(), 1 << 20, 100);
        {
            let (s, _) = Store::open(&c, &streams(&["a"])).unwrap();
            add(&s, &uplink(0)).await;
            s.flush().await.unwrap();
            add(&s, &uplink(1)).await;
            add(&s, &uplink(2)).await;
        }
        let stats = inspect(&c).unwrap();
        assert_eq!(stats.len(), 1);
        assert_eq!(
            stats[0].depth, 3,
            "{backend:?}: 1 on disk + 2 in the journal"
        );
        assert!(journal_files(dir.path()) > 0, "inspect does not replay");
    }
}

#[tokio::test]
async fn a_backlog_read_and_acked_in_small_steps_keeps_order_and_exact_counts() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg_for(backend, dir.path(), 1 << 24, 100);
        let (s, _) = Store::open(&c, &streams(&["a"])).unwrap();
        for n in 0..1500 {
            add(&s, &uplink(n)).await;
            if n % 400 == 0 {
                s.flush().await.unwrap();
            }
        }
        s.flush().await.unwrap();
        let a = s.queue("a").unwrap();
        let (mut cursor, mut got) = (None, Vec::new());
        let mut live = 1500;
        loop {
            let batch = a.read_after(cursor, 7).unwrap();
            if batch.is_empty() {
                break;
            }
            for (seq, r) in batch {
                cursor = Some(seq);
                if let Record::Uplink(u) = r {
                    got.push(u.f_cnt);
                }
                assert!(a.ack(seq).unwrap());
                assert!(!a.ack(seq).unwrap(), "counted once");
            }
            // Commits (and new records) while the reader is under way.
            if got.len() % 210 == 0 {
                s.flush().await.unwrap();
                add(&s, &uplink(live)).await;
                live += 1;
            }
        }
        assert_eq!(got, (0..live).collect::<Vec<_>>(), "{backend:?}");
        assert_eq!(a.len(), 0);
        assert_eq!(a.stats().bytes, 0);
        assert_eq!(s.total_bytes(), 0);
        assert_eq!(a.stats().delivered, u64::from(live));
        s.flush().await.unwrap();
        drop((a, s));
        let (s, _) = Store::open(&c, &streams(&["a"])).unwrap();
        assert!(
            s.queue("a").unwrap().is_empty(),
            "{backend:?}: deletes committed"
        );
    }
}

/// Streams added and removed by a reload: an attached queue takes records at once and keeps
/// them across a reopen; a detached one keeps its backlog, leaves `queues()` and is never
/// evicted for another queue's `drop_oldest`; indexes never move; attaching it again brings
/// the backlog back, with a new `when_full`.
#[tokio::test]
async fn queues_attached_and_detached_at_run_time_keep_their_records() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let size = records::encode(&uplink(0)).unwrap().len() as u64;
        let c = cfg_for(backend, dir.path(), size * 6, 100);
        {
            let (s, _) = Store::open(&c, &streams(&["b"])).unwrap();
            let a = s.attach_queue("a", WhenFull::DropOldest).unwrap();
            // Added after "b": a new index, "b" keeps 0.
            assert_eq!((a, s.queue_index("b")), (1, Some(0)));
            for n in 0..3 {
                append_to(&s, &uplink(n), &[a]).await;
            }
            s.detach_queue("a");
            assert!(s.queue("a").is_none());
            let names: Vec<String> = s.queues().iter().map(|q| q.name().to_string()).collect();
            assert_eq!(names, vec!["b".to_string()]);
            // "b" fills the cap: it evicts its own oldest, never the detached backlog.
            for n in 10..16 {
                append_to(&s, &uplink(n), &[0]).await;
            }
            let b = s.queue("b").unwrap();
            assert_eq!(fcnts(&b), vec![13, 14, 15]);
            assert_eq!(s.attach_queue("a", WhenFull::RejectNew).unwrap(), 1);
            let a_q = s.queue("a").unwrap();
            assert_eq!(fcnts(&a_q), vec![0, 1, 2]);
            // reject_new now: the cap is reached, the record is refused.
            assert_eq!(append_to(&s, &uplink(3), &[1]).await.rejected, 1);
            s.flush().await.unwrap();
        }
        // Reopened with "a" configured: its records were committed like any other.
        let (s, _) = Store::open(&c, &streams(&["a", "b"])).unwrap();
        assert_eq!(fcnts(&s.queue("a").unwrap()), vec![0, 1, 2]);
    }
}

/// A queue written one engine entry per record (lorastream before record blocks) is read as
/// it is after an upgrade: counted, delivered in order, acknowledged; new records go into
/// blocks after it; and the entries it keeps are still there after a reopen.
#[tokio::test]
async fn a_queue_of_one_entry_per_record_is_delivered_after_an_upgrade() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg_for(backend, dir.path(), 1 << 20, 100);
        drop(Store::open(&c, &streams(&["a"])).unwrap());
        let mut size = 0u64;
        {
            let engine = backend::Backend::open(backend, &c).unwrap();
            let mut b = backend::Batch::default();
            for n in 0..50u64 {
                let v = records::encode(&uplink(n as u32)).unwrap();
                size += v.len() as u64;
                b.put(&queue_table("a"), &n.to_be_bytes(), &v);
            }
            engine.commit(&b, true).unwrap();
        }
        {
            let (s, _) = Store::open(&c, &streams(&["a"])).unwrap();
            let a = s.queue("a").unwrap();
            assert_eq!(a.len(), 50);
            assert_eq!(s.total_bytes(), size);
            assert_eq!(fcnts(&a), (0..50).collect::<Vec<_>>());
            for (seq, _) in a.read_after(None, 20).unwrap() {
                assert!(a.ack(seq).unwrap());
            }
            for n in 50..60 {
                add(&s, &uplink(n)).await;
            }
            s.flush().await.unwrap();
        }
        let (s, _) = Store::open(&c, &streams(&["a"])).unwrap();
        let a = s.queue("a").unwrap();
        assert_eq!(fcnts(&a), (20..60).collect::<Vec<_>>());
        assert_eq!(a.len(), 40);
        // The next sequence number continues after the records of the block.
        add(&s, &uplink(60)).await;
        let all = a.read_after(None, usize::MAX).unwrap();
        assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(all.len(), 41);
        s.flush().await.unwrap();
        drop((a, s));
        let engine = backend::Backend::open(backend, &c).unwrap();
        let mut entries = 0;
        engine.scan(&queue_table("a"), |_, _| entries += 1).unwrap();
        // 30 records of the older layout, and one block with the 11 new ones.
        assert_eq!(entries, 31);
    }
}

/// An idle group committer sleeps without its window's tick; an append wakes it and the
/// record's journal fsync still comes (the window's end), an acknowledgement wakes it and is
/// journaled, and each time it goes back to sleep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_committer_sleeps_and_appends_and_acknowledgements_wake_it() {
    async fn within(what: &str, f: impl Fn() -> bool) {
        let end = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < end, "{what}: not within 5 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg_for(backend, dir.path(), 64 << 20, 100);
        let (s, _) = Store::open(&c, &streams(&["a"])).unwrap();
        let (cancel, committer) = spawn_committer(&s);
        let idle = || s.inner.shared.committer_idle.load(Ordering::SeqCst);
        let unsynced = || s.inner.journal_unsynced.load(Ordering::SeqCst);
        within("idle after start", idle).await;
        add(&s, &uplink(0)).await;
        within("the append's journal fsync", || !unsynced()).await;
        within("idle again after the fsync", idle).await;
        let a = s.queue("a").unwrap();
        let (seq, _) = a.read_after(None, 1).unwrap()[0];
        assert!(a.ack(seq).unwrap());
        within("the acknowledgement journaled", || !a.has_acked()).await;
        within("idle again after the acknowledgement", idle).await;
        cancel.cancel();
        committer.await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(a.read_after(None, 10).unwrap().len(), 0, "{backend:?}");
    }
}
