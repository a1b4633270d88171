//! Command line: `run`, `check`, `queue`, `devices import`, `demo`, `simulate`. The only
//! place (with `main.rs`) that uses `anyhow`; everything below returns typed errors.

use crate::config::{Config, DEFAULT_PATH};
use crate::daemon::commands::Control;
use crate::daemon::systemd::{Notice, ServiceManager};
use crate::daemon::Daemon;
use crate::logs::LogHandle;
use crate::model::{Eui64, HexError};
use crate::sim::{demo_devices, Forwarder, Radio, SimDevice};
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "lorastream",
    version = crate::VERSION,
    about = "LoRaWAN on the gateway: Semtech UDP in, durable queue, streams to MQTT and clouds",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon.
    Run {
        /// Configuration file.
        #[arg(short, long, default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Validate a configuration file and print the effective configuration (secrets masked).
    Check {
        #[arg(short, long, default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// Also try it on this machine: the store directory is writable, the ports are free,
        /// and each stream connects with its TLS settings and credentials (nothing is sent).
        #[arg(long)]
        online: bool,
    },
    /// Show each stream's queue: depth, bytes, age of the oldest message, delivered, drops.
    /// Asks the running daemon ([metrics] listen); reads the store when no daemon runs.
    Queue {
        #[arg(short, long, default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// Print the JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Delete the queue of a stream that is no longer in the configuration (its records
        /// were never delivered). The daemon must be stopped.
        #[arg(long, value_name = "STREAM")]
        drop: Option<String>,
    },
    /// Manage devices: `lorastream devices import FILE -c CONFIG`.
    Devices {
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// Try lorastream without hardware or broker: simulated forwarders and devices, uplinks
    /// printed as JSON lines on stdout.
    Demo {
        /// Stop after this many uplinks (default: run until Ctrl-C).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Act as a packet forwarder for the ABP devices of a config, to test an installation.
    Simulate {
        #[arg(short, long, default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// Where to send (default: the config's [gateway] listen, on loopback if it is 0.0.0.0).
        #[arg(long)]
        target: Option<SocketAddr>,
        /// Uplinks per second, over all devices.
        #[arg(long, default_value_t = 1.0)]
        rate: f64,
        /// Stop after this many uplinks (default: run until Ctrl-C).
        #[arg(long)]
        count: Option<u64>,
        /// First frame counter of every device. The daemon drops counters it has seen, so a
        /// second run against the same store needs a higher start.
        #[arg(long, default_value_t = 0)]
        fcnt_start: u32,
        /// Gateway EUI the simulated forwarder reports.
        #[arg(long, default_value = "AA555A0000000001", value_parser = parse_eui)]
        gateway_eui: Eui64,
        /// Application payload size in bytes (bytes 00 01 02 ...), unless --payload gives them.
        #[arg(long, default_value_t = 12)]
        payload_size: usize,
        /// The application payload, in hex (e.g. a CayenneLPP frame `03670110`).
        #[arg(long, value_parser = parse_payload)]
        payload: Option<HexBytes>,
        /// The FPort of the uplinks (1..=223).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=223))]
        f_port: u8,
        /// Simulate only this device (its `id`; repeat for several). Without it every ABP
        /// device of the config is simulated, which moves their frame counters on the daemon.
        #[arg(long = "device", value_name = "ID")]
        devices: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum DevicesCommand {
    /// Convert a device export of The Things Stack (ttn-lw-cli JSON, console CSV) or
    /// ChirpStack v4 (JSON) into a file of `[gateway] devices_dir`. Devices that lack a key
    /// lorastream needs are reported on stderr and left out.
    Import {
        /// The export file.
        file: PathBuf,
        #[arg(short, long, default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// The application of every imported device (default: the export's own, or the
        /// configuration's only application).
        #[arg(long)]
        application: Option<String>,
        /// File name in devices_dir (default: the export's name with .toml).
        #[arg(long)]
        output: Option<String>,
        /// tts-json, tts-csv or chirpstack (default: detected from the content).
        #[arg(long, value_parser = parse_import_format)]
        format: Option<crate::config::import::Format>,
        /// Replace the output file if it exists.
        #[arg(long)]
        force: bool,
    },
}

fn parse_import_format(s: &str) -> Result<crate::config::import::Format, String> {
    s.parse()
}

/// Bytes given in hex on the command line (a newtype: clap would take a `Vec<u8>` for a list).
#[derive(Debug, Clone)]
struct HexBytes(Vec<u8>);

fn parse_payload(s: &str) -> Result<HexBytes, String> {
    hex::decode(s.trim_start_matches("0x"))
        .map(HexBytes)
        .map_err(|e| format!("not hex: {e}"))
}

fn parse_eui(s: &str) -> Result<Eui64, HexError> {
    s.parse()
}

/// Parse arguments, run, map the result to an exit code (0 ok, 1 failure, 2 usage).
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    crate::streams::tls::install_crypto_provider();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lorastream: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The async runtime of every command: tokio's default of one worker per core (the simulator
/// and the demo play both sides), or the daemon's `[runtime] worker_threads`.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    runtime_with(None)
}

fn runtime_with(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        b.worker_threads(n);
    }
    b.enable_all()
        .thread_name("lorastream")
        .build()
        .context("cannot start the async runtime")
}

fn dispatch(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Check { config, online } => Ok(check(&config, online)),
        Command::Queue { config, json, drop } => {
            let cfg = Config::load(&config)?;
            match drop {
                Some(name) => drop_queue(&cfg, &name)?,
                None => queue(&cfg, json)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { config } => {
            let cfg = Config::load(&config)?;
            let logging = crate::logs::init(&cfg.log.level, cfg.log.format);
            // The first line names the exact build (a bug report starts from it).
            tracing::info!(
                config = %config.display(),
                log_format = cfg.log.format.name(),
                pid = std::process::id(),
                worker_threads = cfg.runtime.workers().unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(1, |n| n.get())
                }),
                "lorastream {} starting",
                crate::VERSION
            );
            if let Some(why) = &logging.fallback {
                tracing::warn!("{why}");
            }
            // Before the runtime's threads allocate: they take their malloc arenas then.
            crate::daemon::limit_heap_arenas();
            runtime_with(cfg.runtime.workers())?.block_on(run(cfg, &config, logging.handle))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Devices {
            command:
                DevicesCommand::Import {
                    file,
                    config,
                    application,
                    output,
                    format,
                    force,
                },
        } => Ok(import(crate::config::import::Options {
            input: file,
            config,
            application,
            output,
            format,
            force,
        })),
        Command::Demo { count } => {
            crate::logs::init("warn", crate::config::LogFormat::Text);
            runtime()?.block_on(demo(count))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Simulate {
            config,
            target,
            rate,
            count,
            fcnt_start,
            gateway_eui,
            payload_size,
            payload,
            f_port,
            devices,
        } => {
            let cfg = Config::load(&config)?;
            crate::logs::init("info", crate::config::LogFormat::Text);
            runtime()?.block_on(simulate(
                &cfg,
                SimulateOptions {
                    target,
                    rate,
                    count,
                    fcnt_start,
                    gateway: gateway_eui,
                    payload: payload
                        .map_or_else(|| (0..payload_size).map(|i| i as u8).collect(), |p| p.0),
                    f_port,
                    devices,
                },
            ))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn check(path: &Path, online: bool) -> ExitCode {
    match Config::load(path) {
        Ok(cfg) if online => {
            print_check(path, &cfg);
            let running = find_daemon(&cfg).is_some();
            let findings = match runtime() {
                Ok(rt) => rt.block_on(crate::daemon::preflight::run(&cfg, running)),
                Err(e) => {
                    eprintln!("lorastream: error: {e:#}");
                    return ExitCode::FAILURE;
                }
            };
            println!("\n# online checks");
            let mut failed = 0;
            for f in &findings {
                println!("{f}");
                failed += usize::from(!f.ok);
            }
            if failed > 0 {
                eprintln!(
                    "lorastream: {failed} of {} online checks failed",
                    findings.len()
                );
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Ok(cfg) => {
            print_check(path, &cfg);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lorastream: invalid configuration: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The effective configuration, with notes and warnings.
fn print_check(path: &Path, cfg: &Config) {
    println!(
        "# {} is valid. Effective configuration (secrets shown as ***):\n",
        path.display()
    );
    println!("# {}\n", cfg.device_sources_summary());
    if let Some(note) = cfg.storage.outside_state_dir_note() {
        println!("# note: {note}\n");
    }
    if let [first, fallbacks @ ..] = cfg.metrics.candidates().as_slice() {
        if !fallbacks.is_empty() {
            let others: Vec<String> = fallbacks.iter().map(|a| a.to_string()).collect();
            println!(
                "# note: [metrics] listen is not set: {first}, or the first free of {} when another program (node_exporter) has {first}\n",
                others.join(", ")
            );
        }
    }
    let lost = cfg.devices_without_stream();
    if !lost.is_empty() {
        let names: Vec<&str> = lost.iter().take(20).map(|d| d.id.as_str()).collect();
        let more = lost.len().saturating_sub(names.len());
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        let msg = format!(
                    "{} device(s) whose uplinks no stream takes (no [[stream]] has their application or device in scope, or none takes records): {}{more}; their uplinks are accepted but not stored (counted in lorastream_uplinks_without_stream_total)",
                    lost.len(),
                    names.join(", ")
                );
        eprintln!("lorastream: warning: {msg}");
        println!("# warning: {msg}\n");
    }
    print!("{}", cfg.to_toml_masked());
}

/// `devices import`: one line per device on stderr (never a key), the file on stdout.
fn import(opts: crate::config::import::Options) -> ExitCode {
    match crate::config::import::run(&opts) {
        Ok(out) => {
            for r in &out.reports {
                eprintln!("lorastream: {r}");
            }
            let skipped = out.reports.len() - out.imported;
            println!(
                "wrote {} ({}): {} devices imported, {skipped} skipped; `lorastream check -c {}` shows them",
                out.path.display(),
                out.format.name(),
                out.imported,
                opts.config.display()
            );
            ExitCode::SUCCESS
        }
        Err((e, reports)) => {
            for r in &reports {
                eprintln!("lorastream: {r}");
            }
            eprintln!("lorastream: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The running daemon's `/health`, and where it answered: the first of the metrics listener's
/// candidates that answers as lorastream does (the default port falls back when another
/// program, node_exporter usually, has it: `MetricsConfig::candidates`).
fn find_daemon(cfg: &Config) -> Option<(SocketAddr, serde_json::Value)> {
    cfg.metrics
        .candidates()
        .into_iter()
        .find_map(|a| fetch_health(a).map(|h| (a, h)))
}

/// `GET /health` of a running daemon (plain HTTP/1.1 on loopback, 2 s timeout; 200 or 503).
fn fetch_health(mut addr: SocketAddr) -> Option<serde_json::Value> {
    use std::io::{Read, Write};
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    // 200 when healthy, 503 when degraded: the same document either way (a degraded daemon is
    // running and its queues are what `queue` shows).
    let (head, json) = answer.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?;
    if status != "200" && status != "503" {
        return None;
    }
    serde_json::from_str(json).ok()
}

fn queue(cfg: &Config, json: bool) -> anyhow::Result<()> {
    let (streams, source) = match find_daemon(cfg) {
        Some((addr, h)) => (h["streams"].clone(), format!("running daemon at {addr}")),
        None => {
            let stats = crate::store::inspect(&cfg.storage).with_context(|| {
                format!(
                    "no daemon answered on [metrics] listen = {}, and the store at {} cannot be opened (a daemon holds it?)",
                    match cfg.metrics.candidates().as_slice() {
                        [] => "\"\"".to_string(),
                        all => all.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(" or "),
                    },
                    cfg.storage.path.display()
                )
            })?;
            (
                serde_json::to_value(stats)?,
                format!("store {} (daemon not running)", cfg.storage.path.display()),
            )
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&streams)?);
        return Ok(());
    }
    println!("# queues, from the {source}");
    let mut rows: Vec<[String; 7]> = vec![[
        "stream".into(),
        "depth".into(),
        "bytes".into(),
        "oldest".into(),
        "delivered".into(),
        "connected".into(),
        "dropped".into(),
    ]];
    for q in streams.as_array().into_iter().flatten() {
        let dropped: Vec<String> = q["dropped"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let age = Duration::from_secs(q["oldest_age_s"].as_f64().unwrap_or(0.0) as u64);
        rows.push([
            q["stream"].as_str().unwrap_or("?").to_string(),
            q["depth"].to_string(),
            q["bytes"].to_string(),
            humantime::format_duration(age).to_string(),
            q["delivered"].to_string(),
            match q.get("connected").and_then(|c| c.as_bool()) {
                Some(true) => "yes",
                Some(false) => "no",
                None => "-",
            }
            .to_string(),
            if dropped.is_empty() {
                "-".to_string()
            } else {
                dropped.join(" ")
            },
        ]);
    }
    print!("{}", table(&rows));
    Ok(())
}

/// `queue --drop NAME`: delete a removed stream's queue from a stopped daemon's store.
fn drop_queue(cfg: &Config, name: &str) -> anyhow::Result<()> {
    let configured: Vec<String> = cfg.streams.iter().map(|s| s.name.clone()).collect();
    let n = crate::store::drop_queue(&cfg.storage, name, &configured).map_err(|e| match e {
        crate::store::StoreError::Locked { .. } => anyhow::anyhow!(
            "{e}: stop it first (`sudo systemctl stop lorastream`), drop the queue, start it again"
        ),
        e => e.into(),
    })?;
    println!("queue {name:?} deleted: {n} undelivered records");
    Ok(())
}

/// Aligned columns: the first (a name) and the last (free text) left-aligned, numbers right.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let widths: Vec<usize> = (0..N)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            let pad = widths[c].saturating_sub(cell.chars().count());
            if c > 0 {
                line.push_str("  ");
            }
            if c == 0 || c == N - 1 {
                line.push_str(cell);
                if c < N - 1 {
                    line.push_str(&" ".repeat(pad));
                }
            } else {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// SIGTERM or SIGINT.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The daemon until SIGTERM/SIGINT. SIGHUP (`systemctl reload`) re-reads the file (and
/// `devices_dir`) and applies `[log] level`, the devices and the applications; changed streams
/// and other sections are reported as needing a restart. SIGHUP never stops the daemon (its
/// default action would).
async fn run(cfg: Config, path: &Path, logs: Option<LogHandle>) -> anyhow::Result<()> {
    // Before anything slow: from here on a SIGHUP is ours, not the kernel's default (exit).
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot install the SIGHUP handler")?;
    let daemon = Daemon::start_under(&cfg, ServiceManager::from_env()).await?;
    let mut controls = daemon.take_control();
    let stop = stop_signal();
    tokio::pin!(stop);
    loop {
        #[cfg(unix)]
        tokio::select! {
            _ = &mut stop => break,
            _ = hup.recv() => {
                let _ = reload(&daemon, path, logs.as_ref()).await;
            }
            Some(c) = async {
                match controls.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => control(&daemon, path, logs.as_ref(), c).await,
        }
        #[cfg(not(unix))]
        {
            (&mut stop).await;
            break;
        }
    }
    tracing::info!("stop requested");
    daemon.stop().await;
    Ok(())
}

/// SIGHUP (and the `reload` remote command): re-read the file; an invalid one is refused and
/// the running configuration kept. The result says what changed, for the command's reply.
async fn reload(
    daemon: &Daemon,
    path: &Path,
    logs: Option<&LogHandle>,
) -> Result<serde_json::Value, String> {
    let service = daemon.service_manager();
    service.notify(Notice::Reloading);
    let r = match Config::load(path) {
        Err(e) => {
            tracing::error!(
                "SIGHUP: configuration not reloaded, the daemon keeps running with the one it has: {e}"
            );
            Err(format!("configuration not reloaded: {e}"))
        }
        Ok(new) => {
            match logs.map(|h| h.set_level(&new.log.level)) {
                Some(Ok(true)) => {
                    tracing::info!(level = %new.log.level, "SIGHUP: [log] level applied")
                }
                Some(Ok(false)) => {
                    tracing::info!(
                        "SIGHUP: RUST_LOG is set and overrides [log] level; level unchanged"
                    )
                }
                Some(Err(e)) => tracing::error!("SIGHUP: [log] level not applied: {e}"),
                None => {}
            }
            match daemon.reload(&new).await {
                Ok(r) => {
                    let d = r.devices;
                    tracing::info!(
                        added = d.added,
                        changed = d.changed,
                        rekeyed = d.rekeyed,
                        removed = d.removed,
                        unchanged = d.unchanged,
                        "SIGHUP: devices reloaded ({})",
                        new.device_sources_summary()
                    );
                    let s = &r.streams;
                    if !s.is_empty() {
                        tracing::info!(
                            added = %s.added.join(", "),
                            changed = %s.changed.join(", "),
                            removed = %s.removed.join(", "),
                            unchanged = s.unchanged,
                            "SIGHUP: streams reloaded"
                        );
                    }
                    if !r.needs_restart.is_empty() {
                        tracing::warn!(
                            sections = %r.needs_restart.join(", "),
                            "SIGHUP: these sections changed and take effect only at the next restart (systemctl restart lorastream); the daemon runs on with the ones it has"
                        );
                    }
                    Ok(serde_json::json!({
                        "devices": {
                            "added": d.added,
                            "changed": d.changed,
                            "rekeyed": d.rekeyed,
                            "removed": d.removed,
                            "unchanged": d.unchanged,
                        },
                        "streams": r.streams,
                        "needs_restart": r.needs_restart,
                    }))
                }
                Err(e) => {
                    tracing::error!("SIGHUP: configuration not reloaded, the daemon keeps running with the one it has: {e}");
                    Err(format!("configuration not reloaded: {e}"))
                }
            }
        }
    };
    service.notify(Notice::Ready("running (reloaded)"));
    r
}

/// A remote command only the run loop can carry out.
async fn control(daemon: &Daemon, path: &Path, logs: Option<&LogHandle>, c: Control) {
    match c {
        Control::Reload(reply) => {
            let _ = reply.send(reload(daemon, path, logs).await);
        }
        Control::LogLevel(level, reply) => {
            let r = match logs.map(|h| h.set_level(&level)) {
                Some(Ok(true)) => {
                    tracing::info!(level = %level, "log level changed by a remote command (until the next reload or restart)");
                    Ok(serde_json::json!({ "level": level }))
                }
                Some(Ok(false)) => Err("RUST_LOG is set and overrides the level".to_string()),
                Some(Err(e)) => Err(format!("not a log filter: {e}")),
                None => Err("no log handle in this process".to_string()),
            };
            let _ = reply.send(r);
        }
        Control::DeviceUpsert(device, reply) => {
            let _ = reply.send(
                edit_devices(daemon, path, logs, |dir| {
                    crate::config::remote_devices::upsert(dir, &device)
                })
                .await,
            );
        }
        Control::DeviceDelete(id, reply) => {
            let _ = reply.send(
                edit_devices(daemon, path, logs, |dir| {
                    crate::config::remote_devices::delete(dir, &id)
                })
                .await,
            );
        }
    }
}

/// `device_upsert` / `device_delete`: edit the remotely managed devices file, then reload; a
/// configuration that does not load with the edit gets the file back as it was.
async fn edit_devices(
    daemon: &Daemon,
    path: &Path,
    logs: Option<&LogHandle>,
    edit: impl FnOnce(
        &Path,
    ) -> Result<
        crate::config::remote_devices::Edit,
        crate::config::remote_devices::EditError,
    >,
) -> Result<serde_json::Value, String> {
    let cfg = Config::load(path).map_err(|e| format!("the configuration does not load: {e}"))?;
    let dir = cfg.gateway.devices_dir_at(path).ok_or(
        "remote device management needs [gateway] devices_dir (the devices it adds are written there)",
    )?;
    let done = edit(&dir).map_err(|e| e.to_string())?;
    match reload(daemon, path, logs).await {
        Ok(r) => {
            tracing::info!(file = %dir.join(crate::config::remote_devices::FILE).display(), "devices file changed by a remote command");
            Ok(r)
        }
        Err(e) => {
            if let Err(u) = done.undo() {
                tracing::error!(error = %u, "cannot put the remotely managed devices file back");
            }
            // The file is back as it was; so are the devices (the refused reload changed
            // nothing).
            Err(e)
        }
    }
}

/// The demo's configuration: three ABP devices, a stdout stream, a temporary store.
pub fn demo_config(store: &Path) -> anyhow::Result<Config> {
    let mut toml = format!(
        r#"
[gateway]
listen = "127.0.0.1:0"
eui = "AA555A0000000000"
# The demo devices keep the three default channels: no NewChannelReq downlinks beside the
# one the demo queues.
extra_channels = []

[storage]
path = {path:?}
flush_every_ms = 100

[metrics]
listen = ""

[[application]]
id = "demo"

[[stream]]
name = "console"
kind = "stdout"
"#,
        path = store.join("db").display().to_string()
    );
    for (d, eui) in demo_devices() {
        toml.push_str(&format!(
            "\n[[device]]\napplication = \"demo\"\nid = \"{}\"\ndev_eui = \"{eui}\"\ndev_addr = \"{}\"\nnwk_s_key = \"{}\"\napp_s_key = \"{}\"\n",
            d.id,
            d.dev_addr,
            hex::encode(d.nwk_s_key.0),
            hex::encode(d.app_s_key.0),
        ));
    }
    Config::parse(&toml, "<demo>").context("built-in demo config")
}

async fn demo(count: Option<u64>) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let cfg = demo_config(dir.path())?;
    let daemon = Daemon::start(&cfg).await?;
    eprintln!(
        "lorastream demo: daemon listening on udp://{}, store in {}; two simulated gateways, three devices.\n\
         Each line below is one decrypted uplink as a cloud stream receives it (TTS v3 JSON).",
        daemon.udp_addr(),
        dir.path().display()
    );
    let gw_a: Eui64 = "AA555A0000000000".parse()?;
    let gw_b: Eui64 = "AA555A0000000001".parse()?;
    let mut fa = Forwarder::connect(daemon.udp_addr(), gw_a).await?;
    let mut fb = Forwarder::connect(daemon.udp_addr(), gw_b).await?;
    fa.pull().await?;
    fb.pull().await?;
    let mut devices: Vec<SimDevice> = demo_devices().into_iter().map(|(d, _)| d).collect();
    // Gateway A plays the radio for downlinks: it accepts each PULL_RESP (TX_ACK) and shows
    // what soil-1 would decrypt.
    let soil = devices[0].clone();
    let gw = std::sync::Arc::clone(&fa.socket);
    let daemon_addr = daemon.udp_addr();
    let radio = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        let mut next_f_cnt = 0u32;
        while let Ok(n) = gw.recv(&mut buf).await {
            let Some(pr) = crate::sim::parse_pull_resp(&buf[..n]) else {
                continue;
            };
            let t = pr.token.to_be_bytes();
            let mut ack = vec![2, t[0], t[1], crate::ingress::gwmp::TX_ACK];
            ack.extend_from_slice(&gw_a.0);
            let _ = gw.send_to(&ack, daemon_addr).await;
            if let Ok(d) = soil.open(&pr.phy, next_f_cnt) {
                if d.mic_ok {
                    next_f_cnt += 1;
                    eprintln!(
                        "lorastream demo: gateway {gw_a} transmitted at {} MHz {} (tmst {}); {} decrypts FPort {}: {}",
                        pr.txpk["freq"], pr.txpk["datr"].as_str().unwrap_or("?"), pr.txpk["tmst"], soil.id,
                        d.opened.f_port.map_or("none".to_string(), |p| p.to_string()),
                        String::from_utf8_lossy(&d.opened.frm_payload)
                    );
                }
            }
        }
    });
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(400));
    let stop = stop_signal();
    tokio::pin!(stop);
    while count.is_none_or(|c| sent < c) {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        let i = (sent % devices.len() as u64) as usize;
        // A made-up sensor reading: temperature ×10 (i16 BE) and humidity %.
        let t = 200 + (sent as i16 % 50);
        let payload = [(t >> 8) as u8, t as u8, 40 + (sent % 30) as u8];
        if sent == 2 {
            // A cloud asks soil-1 to switch its valve on: it goes out after soil-1's next uplink.
            eprintln!("lorastream demo: queueing a downlink for soil-1 (as if a cloud had sent down/push)");
            daemon
                .request_downlink(crate::model::DownlinkRequest {
                    stream: "console".into(),
                    application: "demo".into(),
                    device: "soil-1".into(),
                    op: crate::model::DownlinkOp::Push,
                    items: crate::downlink::json::parse_request(
                        br#"{"downlinks":[{"f_port":2,"frm_payload":"T04="}]}"#,
                        "console",
                    ),
                    names: None,
                })
                .await;
        }
        let phy = devices[i].uplink(1, &payload, false)?;
        let tmst = 1_000_000u32.wrapping_add((sent as u32).wrapping_mul(400_000));
        let ra = Radio {
            tmst,
            rssi: -70,
            snr: 7.5,
            ..Radio::default()
        };
        fa.send(&[(&phy, ra)]).await?;
        // Every other frame is also heard by the second gateway: one uplink, two rx_metadata.
        if sent % 2 == 0 {
            let rb = Radio {
                tmst: tmst.wrapping_add(17),
                rssi: -95,
                snr: -2.0,
                ..Radio::default()
            };
            fb.send(&[(&phy, rb)]).await?;
        }
        sent += 1;
    }
    // Wait for the stream to print everything that was accepted.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let accepted = daemon.metrics().uplinks("accepted");
        let queued: u64 = daemon.store().queues().iter().map(|q| q.len()).sum();
        // The downlink of the round trip is shown once the gateway acknowledged it (TX_ACK).
        let downlink_done = sent <= 3 || daemon.metrics().downlinks("tx_ok") >= 1;
        if accepted >= sent && queued == 0 && downlink_done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon.stop().await;
    radio.abort();
    eprintln!("lorastream demo: {sent} uplinks sent and delivered. Next: `lorastream check -c config.example.toml`.");
    Ok(())
}

struct SimulateOptions {
    target: Option<SocketAddr>,
    rate: f64,
    count: Option<u64>,
    fcnt_start: u32,
    gateway: Eui64,
    payload: Vec<u8>,
    f_port: u8,
    /// `--device`: the ids to simulate (empty: every ABP device).
    devices: Vec<String>,
}

/// The ABP devices `simulate` acts as: those named with `--device`, or all of them (with a
/// warning: their frame counters on the daemon move on).
fn simulated_devices(cfg: &Config, o: &SimulateOptions) -> anyhow::Result<Vec<SimDevice>> {
    for id in &o.devices {
        anyhow::ensure!(
            cfg.devices.iter().any(|d| &d.id == id),
            "--device {id}: no device with this id in the config"
        );
    }
    let devices: Vec<SimDevice> = cfg
        .devices
        .iter()
        .filter(|d| o.devices.is_empty() || o.devices.contains(&d.id))
        .filter_map(|d| match &d.activation {
            crate::config::Activation::Abp {
                dev_addr,
                nwk_s_key,
                app_s_key,
            } => Some(SimDevice {
                id: d.id.clone(),
                dev_addr: *dev_addr,
                nwk_s_key: *nwk_s_key,
                app_s_key: *app_s_key,
                f_cnt: o.fcnt_start,
                adr: false,
            }),
            crate::config::Activation::Otaa { .. } => None,
        })
        .collect();
    anyhow::ensure!(
        !devices.is_empty(),
        "{}",
        if o.devices.is_empty() {
            "the config has no ABP devices to simulate"
        } else {
            "the devices named with --device are not ABP devices (simulate acts as ABP devices only)"
        }
    );
    if o.devices.is_empty() {
        eprintln!(
            "lorastream simulate: WARNING: acting as ALL {} ABP devices of the config. The daemon will record their frame counters; a real device of the same DevAddr with a lower counter is then refused as a replay. Use --device ID with test devices on a production gateway.",
            devices.len()
        );
    }
    Ok(devices)
}

/// A PULL_RESP the simulated forwarder got: one line on stdout (decrypted with the device's
/// keys when it is one of ours).
fn print_downlink(pr: &crate::sim::PullResp, devices: &[SimDevice]) {
    let t = &pr.txpk;
    let radio = format!(
        "{} MHz {} tmst {}",
        t["freq"],
        t["datr"].as_str().unwrap_or("?"),
        t.get("tmst")
            .map_or_else(|| "immediate".to_string(), |v| v.to_string())
    );
    let dev_addr = (pr.phy.len() >= 8).then(|| {
        crate::model::DevAddr(u32::from_le_bytes([
            pr.phy[1], pr.phy[2], pr.phy[3], pr.phy[4],
        ]))
    });
    let fcnt16 = (pr.phy.len() >= 8).then(|| u16::from_le_bytes([pr.phy[6], pr.phy[7]]));
    let who = dev_addr.and_then(|a| devices.iter().find(|d| d.dev_addr == a));
    match (who, fcnt16) {
        (Some(d), Some(f)) => match d.open(&pr.phy, u32::from(f)) {
            Ok(dl) => println!(
                "downlink for {} via {radio}: FCnt {} FPort {} payload {} FOpts {}{}{}{}",
                d.id,
                dl.f_cnt16,
                dl.opened.f_port.map_or("-".into(), |p| p.to_string()),
                hex::encode(&dl.opened.frm_payload),
                hex::encode(&dl.opened.f_opts),
                if dl.ack { " ACK" } else { "" },
                if dl.f_pending { " FPending" } else { "" },
                if dl.mic_ok { "" } else { " (MIC does not verify)" }
            ),
            Err(e) => println!("downlink for {} via {radio}: cannot open: {e}", d.id),
        },
        _ => println!(
            "downlink via {radio}: {} bytes, not for a simulated device (a join accept or another DevAddr)",
            pr.phy.len()
        ),
    }
}

async fn simulate(cfg: &Config, o: SimulateOptions) -> anyhow::Result<()> {
    let SimulateOptions {
        target,
        rate,
        count,
        gateway,
        ref payload,
        f_port,
        ..
    } = o;
    let mut target = target.unwrap_or(cfg.gateway.listen);
    if target.ip().is_unspecified() {
        target.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let mut devices = simulated_devices(cfg, &o)?;
    anyhow::ensure!(rate > 0.0, "--rate must be positive");
    let mut fwd = Forwarder::connect(target, gateway).await?;
    fwd.pull().await?;
    // Count PUSH_ACKs on the side (they tell whether the daemon is there and keeps up), and
    // print and acknowledge the downlinks the daemon sends.
    let acks = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reader = {
        let (acks, sock) = (acks.clone(), fwd.socket.clone());
        let keys = devices.clone();
        tokio::spawn(async move {
            let mut b = vec![0u8; 65_536];
            while let Ok(n) = sock.recv(&mut b).await {
                if n >= 4 && b[3] == crate::ingress::gwmp::PUSH_ACK {
                    acks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                } else if let Some(pr) = crate::sim::parse_pull_resp(&b[..n]) {
                    print_downlink(&pr, &keys);
                    // TX_ACK without JSON: sent (GWMP v2).
                    let t = pr.token.to_be_bytes();
                    let mut ack = vec![2, t[0], t[1], 5];
                    ack.extend_from_slice(&gateway.0);
                    let _ = sock.send_to(&ack, target).await;
                }
            }
        })
    };
    let start = Instant::now();
    let mut sent = 0u64;
    let stop = stop_signal();
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    'outer: loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        // Send what the rate allows by now (pacing in 1 ms steps).
        let due = (start.elapsed().as_secs_f64() * rate) as u64 + 1;
        while sent < due {
            if count.is_some_and(|c| sent >= c) {
                break 'outer;
            }
            let i = (sent % devices.len() as u64) as usize;
            let phy = devices[i].uplink(f_port, payload, false)?;
            let radio = Radio {
                tmst: (start.elapsed().as_micros() as u32),
                ..Radio::default()
            };
            fwd.send(&[(&phy, radio)]).await?;
            sent += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acked = acks.load(std::sync::atomic::Ordering::Relaxed);
    reader.abort();
    println!(
        "sent {sent} uplinks in {elapsed:.2} s ({:.0}/s) to {target}; PUSH_ACKs received: {acked}; next --fcnt-start {}",
        sent as f64 / elapsed.max(1e-9),
        devices.iter().map(|d| d.f_cnt).max().unwrap_or(0)
    );
    anyhow::ensure!(
        sent == 0 || acked > 0,
        "no PUSH_ACK came back from {target}: is lorastream running, and is this its [gateway] listen address (and no firewall between)?"
    );
    if acked < sent {
        eprintln!(
            "lorastream simulate: warning: {} of {sent} uplinks got no PUSH_ACK (lost on the way, or the daemon could not keep up)",
            sent - acked
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_columns_line_up_whatever_the_name_length() {
        let rows = [
            ["stream".to_string(), "depth".into(), "dropped".into()],
            [
                "a-very-long-stream-name-indeed".into(),
                "5".into(),
                "-".into(),
            ],
            ["s".into(), "12345".into(), "full=2".into()],
        ];
        let t = super::table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        let end = |l: &str, w: &str| l.find(w).map(|i| i + w.len());
        // The depth column ends at the same place on every line.
        assert_eq!(end(lines[0], "depth"), end(lines[1], " 5"));
        assert_eq!(end(lines[0], "depth"), end(lines[2], "12345"));
    }
}
