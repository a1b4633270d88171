//! Background chores that keep a long-running daemon in shape: expiring queued messages older
//! than `[storage] max_age`, and handing freed heap back to the kernel.

use crate::store::Store;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often freed heap memory is handed back to the kernel ([`trim_heap`]).
const TRIM_EVERY: Duration = Duration::from_secs(30);
/// How often old records are looked for.
const EXPIRE_EVERY: Duration = Duration::from_secs(60);

/// Drop queued records older than `max_age`, once a minute (and once at start, after a long
/// power-off), until `cancel`.
pub(super) async fn expire_old(store: Store, max_age: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(EXPIRE_EVERY);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let cutoff = crate::model::now_us() - max_age.as_micros() as i64;
        match store.expire(cutoff) {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                expired = n,
                "queued messages older than [storage] max_age dropped"
            ),
            Err(e) => tracing::error!(error = %e, "cannot expire old messages"),
        }
    }
}

/// Trim the heap every [`TRIM_EVERY`] until `cancel`.
pub(super) async fn trim_heap_regularly(cancel: CancellationToken) {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A millisecond or two of arena walking: not on a worker thread.
        let _ = tokio::task::spawn_blocking(trim_heap).await;
    }
}

/// Give the kernel back the heap pages that are free.
///
/// glibc's malloc keeps what a program frees in its arenas (one per thread that allocates, up
/// to 8 per core) and returns it only when the very top of a heap is free. A backlog drain
/// allocates in bursts (engine pages, batches, MQTT packets) on several threads, so without
/// this RSS ratchets up with every outage and never comes down: the soak benchmark measured
/// 13 MB before the first outage and 51 MB after six, flat in between (docs/benchmarks.md).
/// `malloc_trim(0)` releases every free page of every arena (`madvise(MADV_DONTNEED)`); with
/// heaps this size it took 0.5–2 ms in that benchmark. Other C libraries have no such call.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let t = Instant::now();
        // SAFETY: malloc_trim only takes glibc's own arena locks; no pointers are passed.
        let released = unsafe { libc::malloc_trim(0) } == 1;
        tracing::trace!(
            released,
            took_us = t.elapsed().as_micros() as u64,
            "heap trimmed"
        );
    }
}
