//! `lorastream check --online`: what a configuration that parses can still get wrong on this
//! machine, tried for real before the daemon runs: the store directory is writable, the UDP
//! and metrics ports are free (or held by the running daemon), and each stream reaches its
//! server with its TLS settings and credentials (one connection each, nothing delivered; see
//! each kind's `probe`).

use crate::config::{Config, StorageConfig};
use crate::metrics::Metrics;
use crate::streams::{format, Stream, StreamContext};
use std::path::Path;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What was checked: `store`, `[gateway] listen`, `stream cloud`, ...
    pub what: String,
    pub ok: bool,
    /// What was found, or what failed and what to check.
    pub detail: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = if self.ok { "ok  " } else { "FAIL" };
        write!(f, "{mark} {}: {}", self.what, self.detail)
    }
}

fn finding(what: impl Into<String>, r: Result<String, String>) -> Finding {
    let (ok, detail) = match r {
        Ok(d) => (true, d),
        Err(d) => (false, d),
    };
    Finding {
        what: what.into(),
        ok,
        detail,
    }
}

/// Run every check. `daemon_running`: a daemon answered on `[metrics] listen`, so the ports
/// it holds are expected to be in use.
pub async fn run(cfg: &Config, daemon_running: bool) -> Vec<Finding> {
    let mut out = vec![finding("store", store(&cfg.storage))];
    out.push(finding(
        "[gateway] listen",
        port(
            || std::net::UdpSocket::bind(cfg.gateway.listen).map(drop),
            &cfg.gateway.listen.to_string(),
            "UDP",
            daemon_running,
        ),
    ));
    let candidates = cfg.metrics.candidates();
    if let Some(&listen) = candidates.first() {
        let found = port(
            || std::net::TcpListener::bind(listen).map(drop),
            &listen.to_string(),
            "TCP",
            daemon_running,
        );
        out.push(finding(
            "[metrics] listen",
            match found {
                Err(e) if candidates.len() > 1 && !daemon_running => {
                    metrics_fallback(listen, &candidates[1..]).ok_or(e)
                }
                other => other,
            },
        ));
    }
    out.extend(streams(cfg).await);
    out
}

fn who_am_i() -> String {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        "root (the packaged service runs as the user lorastream: `sudo -u lorastream lorastream check --online` checks its rights)".into()
    } else {
        format!("uid {uid}")
    }
}

/// The store directory takes a file (write, fsync, remove); a missing one is created by the
/// daemon, so its nearest existing parent must take one.
fn store(s: &StorageConfig) -> Result<String, String> {
    let mut dir: &Path = &s.path;
    let mut missing = false;
    while !dir.exists() {
        missing = true;
        dir = dir.parent().unwrap_or(Path::new("/"));
    }
    let probe = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = tempfile::Builder::new()
            .prefix(".lorastream-check")
            .tempfile_in(dir)?;
        f.write_all(b"check")?;
        f.as_file().sync_all()?;
        f.close()
    };
    let note = s
        .outside_state_dir_note()
        .map(|n| format!("; {n}"))
        .unwrap_or_default();
    match probe() {
        Ok(()) if missing => Ok(format!(
            "{} does not exist yet; the daemon can create it in {} (checked as {}){note}",
            s.path.display(),
            dir.display(),
            who_am_i()
        )),
        Ok(()) => Ok(format!(
            "{} is writable (checked as {}){note}",
            s.path.display(),
            who_am_i()
        )),
        Err(e) => Err(format!(
            "cannot write in {}: {e}{}{note}",
            dir.display(),
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                " (the directory must belong to the user the daemon runs as)"
            } else {
                ""
            }
        )),
    }
}

fn port(
    bind: impl FnOnce() -> std::io::Result<()>,
    addr: &str,
    proto: &str,
    daemon_running: bool,
) -> Result<String, String> {
    match bind() {
        Ok(()) => Ok(format!("{proto} {addr} is free")),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && daemon_running => Ok(format!(
            "{proto} {addr} is in use by the running lorastream"
        )),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(format!(
            "{proto} {addr} is in use by another program (`sudo ss -lunp` / `ss -ltnp` shows which; on a gateway often another network server such as ChirpStack's gateway bridge on 1700)"
        )),
        Err(e) => Err(format!("{proto} {addr}: {e}")),
    }
}

/// `[metrics] listen` is not set and its default `taken` is in use: the fallback port the
/// daemon would take (`metrics::bind`), if one is free.
fn metrics_fallback(
    taken: std::net::SocketAddr,
    fallbacks: &[std::net::SocketAddr],
) -> Option<String> {
    let free = fallbacks
        .iter()
        .find(|a| std::net::TcpListener::bind(a).is_ok())?;
    Some(format!(
        "TCP {taken} is in use by another program (node_exporter listens on 9100); [metrics] listen is not set, so the daemon will listen on {free} (set it to choose the port)"
    ))
}

/// Each stream, built as the daemon builds it (over a throw-away store, so nothing it holds
/// is read or changed) and connected once.
async fn streams(cfg: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    if cfg.streams.is_empty() {
        return out;
    }
    let tmp = match tempfile::tempdir() {
        Ok(t) => t,
        Err(e) => {
            out.push(finding(
                "streams",
                Err(format!("no temporary directory: {e}")),
            ));
            return out;
        }
    };
    let storage = StorageConfig {
        path: tmp.path().to_path_buf(),
        reserve_bytes: 0,
        ..StorageConfig::default()
    };
    let specs: Vec<_> = cfg
        .streams
        .iter()
        .map(|s| (s.name.clone(), s.when_full))
        .collect();
    let store = match crate::store::Store::open(&storage, &specs) {
        Ok((store, _)) => store,
        Err(e) => {
            out.push(finding("streams", Err(format!("no temporary store: {e}"))));
            return out;
        }
    };
    // The real installation's instance id when it has one: derived client ids are then the
    // daemon's (MQTT probes add `-check`).
    let instance: Arc<str> = std::fs::read_to_string(cfg.storage.path.join(super::instance::FILE))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "check".into())
        .into();
    let facts = Arc::new(format::Facts::new(cfg));
    for s in &cfg.streams {
        let what = format!("stream {} ({})", s.name, s.kind.name());
        let Some(queue) = store.queue(&s.name) else {
            continue;
        };
        let ctx = StreamContext {
            name: s.name.clone(),
            queue,
            metrics: Metrics::new(),
            cancel: CancellationToken::new(),
            gateway_eui: cfg.gateway.eui,
            instance_id: instance.clone(),
            commands: None,
            downlinks: None,
            format: Arc::new(format::Formatter::new(s, facts.clone())),
        };
        let (_tx, rx) = tokio::sync::mpsc::channel(1);
        let r = match Stream::build(s, ctx, rx) {
            Err(e) => Err(e.source.to_string()),
            Ok(stream) => stream.probe().await.map_err(|e| match e.hint() {
                Some(h) => format!("{e} ({h})"),
                None => e.to_string(),
            }),
        };
        out.push(finding(what, r));
    }
    drop(store);
    out
}
