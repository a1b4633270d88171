//! Background chores that keep a long-running daemon in shape: expiring queued messages older
//! than `[storage] max_age`, handing freed heap back to the kernel, and one malloc arena for
//! all threads.

use crate::store::Store;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often freed heap memory is handed back to the kernel ([`trim_heap`]).
const TRIM_EVERY: Duration = Duration::from_secs(30);
/// How often old records are looked for.
const EXPIRE_EVERY: Duration = Duration::from_secs(60);
/// Records looked at per queue in one expiry step ([`Store::expire_step`]).
const EXPIRE_STEP: usize = 512;

/// Drop queued records older than `max_age`, once a minute (and once at start, after a long
/// power-off), until `cancel`.
///
/// Records carry the wall-clock time they were received, and the wall clock jumps (NTP's first
/// sync on a gateway without a battery-backed clock, a hand-set date): a jump forward larger
/// than `max_age` would expire the whole backlog at once. So the age is measured twice and
/// the smaller one counts: by the wall clock, and by the monotonic clock since start added to
/// the wall clock read at start ([`expiry_cutoff`]). A jump in either direction while running
/// can then only delay an expiry, never cause one; what happened while the daemon was not
/// running is known only from the wall clock.
pub(super) async fn expire_old(store: Store, max_age: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(EXPIRE_EVERY);
    let started = (crate::model::now_us(), Instant::now());
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let cutoff = expiry_cutoff(crate::model::now_us(), started, Instant::now(), max_age);
        let mut expired = 0;
        // In steps of a few milliseconds on a blocking thread: a backlog of a million that
        // expires at once neither holds up the runtime's workers nor a stop (which checks
        // `cancel` between steps, and waits for the one under way).
        let outcome = loop {
            if cancel.is_cancelled() {
                break Ok(());
            }
            let s = store.clone();
            match tokio::task::spawn_blocking(move || s.expire_step(cutoff, EXPIRE_STEP)).await {
                Ok(Ok((n, done))) => {
                    expired += n;
                    if done {
                        break Ok(());
                    }
                }
                Ok(Err(e)) => break Err(e.to_string()),
                Err(e) => break Err(e.to_string()),
            }
        };
        if expired > 0 {
            tracing::warn!(
                expired,
                "queued messages older than [storage] max_age dropped"
            );
        }
        if let Err(error) = outcome {
            tracing::error!(%error, "cannot expire old messages");
        }
    }
}

/// Records received (wall clock, µs) before the returned time are older than `max_age` by both
/// clocks: the wall clock now, and the wall clock at start (`started`) plus the monotonic time
/// since.
pub(super) fn expiry_cutoff(
    wall_now_us: i64,
    started: (i64, Instant),
    mono_now: Instant,
    max_age: Duration,
) -> i64 {
    let age = max_age.as_micros().min(i64::MAX as u128) as i64;
    let since_start = mono_now.saturating_duration_since(started.1).as_micros() as i64;
    let steady_now = started.0.saturating_add(since_start);
    wall_now_us.min(steady_now).saturating_sub(age)
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

/// glibc malloc arenas the daemon's threads share at most ([`limit_heap_arenas`]).
const ARENA_MAX: i32 = 1;

/// Cap glibc's malloc arenas at [`ARENA_MAX`]; called once, before the runtime's threads start.
///
/// glibc gives each thread that allocates an arena of its own, up to 8 per core (16 on two
/// cores). The runtime's two workers and its blocking threads (the store's commits and fsyncs)
/// used 9 arenas at 15,000 uplinks/s, each keeping its own free chunks and top pad: 13.1 MiB
/// of arena pages for a heap of at most 8.6 MB in use (docs/benchmarks.md, "Peak RSS at
/// 15,000 uplinks/s"). With one arena, the main one, peak RSS at that rate was ~2 MiB lower
/// with no measurable CPU cost (with 2 arenas it was lower in one run of two): each thread
/// keeps a small cache of freed chunks (tcache) in front of the arena, so sharing it costs
/// little lock contention. `MALLOC_ARENA_MAX` or `GLIBC_TUNABLES` set by the user win: then
/// nothing is changed. Other C libraries have no such setting.
pub(crate) fn limit_heap_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set_by_user = std::env::var_os("MALLOC_ARENA_MAX").is_some()
            || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("arena_max"));
        if !set_by_user {
            // SAFETY: mallopt only sets one of glibc's malloc parameters; no pointers are passed.
            unsafe { libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX) };
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wall_clock_jump_never_ages_records() {
        let hour = Duration::from_secs(3600);
        let t0 = Instant::now();
        let wall0 = 1_800_000_000_000_000i64;
        let later = t0 + Duration::from_secs(60);
        // No jump: one minute after start, records older than an hour before that expire.
        assert_eq!(
            expiry_cutoff(wall0 + 60_000_000, (wall0, t0), later, hour),
            wall0 + 60_000_000 - 3_600_000_000
        );
        // The wall clock jumps a day forward: the monotonic clock says one minute passed.
        let day = 86_400_000_000i64;
        assert_eq!(
            expiry_cutoff(wall0 + 60_000_000 + day, (wall0, t0), later, hour),
            wall0 + 60_000_000 - 3_600_000_000
        );
        // Backward: the wall clock counts (later expiry, never an earlier one).
        assert_eq!(
            expiry_cutoff(wall0 - day, (wall0, t0), later, hour),
            wall0 - day - 3_600_000_000
        );
    }
}
