//! The standard process metrics of Prometheus client libraries (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, ...), read from `/proc/self` at scrape time, in the text
//! format. Linux only; elsewhere (and for any value `/proc` does not give) the line is left out.

use std::fmt::Write;

/// The metrics' text (HELP, TYPE and value lines), or "" where `/proc` is not there.
pub fn encode() -> String {
    let mut out = String::new();
    let Some(stat) = read_stat() else {
        return out;
    };
    // SAFETY: sysconf and getpagesize have no preconditions.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let mut put = |name: &str, kind: &str, help: &str, v: f64| {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
        );
    };
    if ticks > 0 {
        let t = ticks as f64;
        // OpenMetrics: the family is `process_cpu_seconds`, its sample `_total`.
        put(
            "process_cpu_seconds",
            "counter",
            "Total user and system CPU time spent in seconds.",
            (stat.utime + stat.stime) as f64 / t,
        );
        if let Some(boot) = boot_time() {
            put(
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                boot as f64 + stat.start_ticks as f64 / t,
            );
        }
    }
    put(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        stat.vsize as f64,
    );
    if page > 0 {
        put(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            (stat.rss_pages * page as u64) as f64,
        );
    }
    if let Ok(d) = std::fs::read_dir("/proc/self/fd") {
        put(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            d.count() as f64,
        );
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        put(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            lim.rlim_cur as f64,
        );
    }
    // The counter's sample carries the suffix.
    out.replace("\nprocess_cpu_seconds ", "\nprocess_cpu_seconds_total ")
}

struct Stat {
    utime: u64,
    stime: u64,
    start_ticks: u64,
    vsize: u64,
    rss_pages: u64,
}

/// `/proc/self/stat`: the fields after the command name (which may hold spaces and parens).
fn read_stat() -> Option<Stat> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_stat(&s)
}

fn parse_stat(s: &str) -> Option<Stat> {
    let rest = &s[s.rfind(')')? + 2..];
    // Field 3 (state) is rest[0]; field n is rest[n - 3].
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |field: usize| f.get(field - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime: n(14)?,
        stime: n(15)?,
        start_ticks: n(22)?,
        vsize: n(23)?,
        rss_pages: n(24)?,
    })
}

/// Boot time, seconds since the epoch (`btime` of `/proc/stat`).
fn boot_time() -> Option<u64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_name_with_spaces_and_parens_is_skipped() {
        let line = "4242 (lore (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 12345 104857600 2560 18446744073709551615";
        let s = parse_stat(line).unwrap();
        assert_eq!((s.utime, s.stime), (250, 50));
        assert_eq!(s.start_ticks, 12345);
        assert_eq!(s.vsize, 104_857_600);
        assert_eq!(s.rss_pages, 2560);
    }

    #[test]
    fn this_process_reports_cpu_memory_and_fds() {
        let t = encode();
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_virtual_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(t.contains(&format!("\n{name}")), "{name} missing:\n{t}");
        }
        let rss: f64 = t
            .lines()
            .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(rss > 1e6, "{rss}");
    }
}
