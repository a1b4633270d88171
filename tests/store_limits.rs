//! `[storage] max_bytes` with `when_full` and its per-stream override, through the daemon: two
//! streams whose broker is down fill the cap; the one that drops oldest keeps the newest
//! uplinks, the one that rejects new keeps the oldest; every drop is counted per stream and
//! reason in `/metrics`. Both storage engines.

mod support;

use lorastream::daemon::Daemon;
use lorastream::model::Eui64;
use lorastream::sim::{Forwarder, Radio};
use std::time::Duration;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_stream_when_full_decides_what_a_full_store_drops() {
    install_crypto();
    for backend in support::backends() {
        let backend = storage_backend(backend);
        let mut broker = support::broker::TestBroker::start().await;
        broker.stop().await;
        let dir = tempfile::tempdir().unwrap();
        let mut d = device(1);
        let url = broker.url();
        let mut cfg = config(
            dir.path(),
            &format!(
                "[[application]]\nid = \"farm\"\n\n{}\
                 [[stream]]\nname = \"keep-newest\"\nserver = \"{url}\"\n\n\
                 [[stream]]\nname = \"keep-oldest\"\nserver = \"{url}\"\nwhen_full = \"reject_new\"\n",
                device_toml(&d, "farm"),
            ),
        );
        cfg.storage.backend = backend;
        cfg.storage.max_bytes = 65_536;
        cfg.storage.flush_every_ms = 100;
        cfg.gateway.dedup_window_ms = 0;
        let daemon = Daemon::start(&cfg).await.unwrap();
        let newest = daemon.store().queue("keep-newest").unwrap();
        let oldest = daemon.store().queue("keep-oldest").unwrap();
        let mut f = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(1))
            .await
            .unwrap();
        const N: u32 = 600;
        for i in 0..N {
            let p = d.uplink(1, &[i as u8; 32], false).unwrap();
            f.send(&[(&p, Radio::default())]).await.unwrap();
            if i % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        assert!(
            wait_until(Duration::from_secs(20), || daemon
                .metrics()
                .uplinks("accepted")
                == u64::from(N))
            .await
        );
        // "accepted" is counted when the uplink is decided, a moment before it is appended:
        // wait until every one of them is queued or dropped in both queues.
        let settled = |q: &lorastream::store::Queue| {
            let s = q.stats();
            s.depth + s.dropped.values().sum::<u64>() == u64::from(N)
        };
        assert!(
            wait_until(Duration::from_secs(20), || settled(&newest)
                && settled(&oldest))
            .await,
            "{:?} {:?}",
            newest.stats(),
            oldest.stats()
        );
        let (sn, so) = (newest.stats(), oldest.stats());
        assert!(
            daemon.store().total_bytes() <= 65_536,
            "{backend:?}: {}",
            daemon.store().total_bytes()
        );
        let evicted = sn
            .dropped
            .get("queue_full_drop_oldest")
            .copied()
            .unwrap_or(0);
        let rejected = so
            .dropped
            .get("queue_full_reject_new")
            .copied()
            .unwrap_or(0);
        assert!(evicted > 0 && rejected > 0, "{backend:?}: {sn:?} {so:?}");
        assert_eq!(sn.depth + evicted, u64::from(N), "{sn:?}");
        assert_eq!(so.depth + rejected, u64::from(N), "{so:?}");
        let f_cnts = |q: &lorastream::store::Queue| -> Vec<u32> {
            q.read_after(None, usize::MAX)
                .unwrap()
                .into_iter()
                .map(|(_, r)| match r {
                    lorastream::model::Record::Uplink(u) => u.f_cnt,
                    _ => u32::MAX,
                })
                .collect()
        };
        // drop_oldest keeps the newest uplinks, reject_new the oldest.
        assert_eq!(f_cnts(&newest).last(), Some(&(N - 1)), "{backend:?}");
        assert_eq!(f_cnts(&oldest).first(), Some(&0), "{backend:?}");
        assert!(*f_cnts(&oldest).last().unwrap() < N - 1);
        let m = daemon.metrics().clone();
        let text = m.encode();
        assert!(
            text.contains(&format!(
                "lorastream_queue_dropped_total{{stream=\"keep-newest\",reason=\"queue_full_drop_oldest\"}} {evicted}"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "lorastream_queue_dropped_total{{stream=\"keep-oldest\",reason=\"queue_full_reject_new\"}} {rejected}"
            )),
            "{text}"
        );
        daemon.stop().await;
    }
}

/// `[storage] max_age`: records older than it are dropped (counted as `expired`) by the
/// daemon's expiry pass, which runs at start and then once a minute; newer ones stay. The
/// uplinks are queued by one daemon (broker down), which stops; the next one starts with
/// `max_age = 1s` more than a second later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_age_expires_old_records_at_start_and_counts_them() {
    install_crypto();
    for backend in support::backends() {
        let backend = storage_backend(backend);
        let mut broker = support::broker::TestBroker::start().await;
        broker.stop().await;
        let dir = tempfile::tempdir().unwrap();
        let mut d = device(1);
        let mut cfg = config(
            dir.path(),
            &format!(
                "[[application]]\nid = \"farm\"\n\n{}[[stream]]\nname = \"cloud\"\nserver = \"{}\"\n",
                device_toml(&d, "farm"),
                broker.url()
            ),
        );
        cfg.storage.backend = backend;
        cfg.gateway.dedup_window_ms = 0;
        let send = |d: &mut lorastream::sim::SimDevice, n: u8| d.uplink(1, &[n; 8], false).unwrap();

        let daemon = Daemon::start(&cfg).await.unwrap();
        let mut f = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(1))
            .await
            .unwrap();
        for i in 0..5 {
            f.send(&[(&send(&mut d, i), Radio::default())])
                .await
                .unwrap();
        }
        let q = daemon.store().queue("cloud").unwrap();
        assert!(wait_until(Duration::from_secs(10), || q.len() == 5).await);
        drop(q);
        daemon.stop().await;

        tokio::time::sleep(Duration::from_millis(1500)).await;
        cfg.storage.max_age = Some(Duration::from_secs(1));
        let daemon = Daemon::start(&cfg).await.unwrap();
        let q = daemon.store().queue("cloud").unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || q
                .stats()
                .dropped
                .get("expired")
                .copied()
                == Some(5))
            .await,
            "{backend:?}: {:?}",
            q.stats()
        );
        assert_eq!(q.len(), 0, "{backend:?}");
        // A new uplink is younger than max_age: it stays queued.
        let mut f = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(1))
            .await
            .unwrap();
        f.send(&[(&send(&mut d, 9), Radio::default())])
            .await
            .unwrap();
        assert!(wait_until(Duration::from_secs(10), || q.len() == 1).await);
        assert!(
            daemon
                .metrics()
                .encode()
                .contains("lorastream_queue_dropped_total{stream=\"cloud\",reason=\"expired\"} 5"),
            "{backend:?}"
        );
        drop(q);
        daemon.stop().await;
    }
}
