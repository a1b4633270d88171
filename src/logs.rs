//! Logging: the subscriber set up once by the binary ([`init`], with [`LogHandle`] to change the
//! level on SIGHUP), and [`LogLimiter`], which keeps a log line that input can trigger (a forged
//! frame, a misconfigured device) from flooding the journal.
//!
//! `[log] format` ([`LogFormat`]):
//! - `text` (default): one line per event on stderr, `LEVEL target: message key=value ...`.
//!   Field values are written as they display (no quotes, no `Some(..)`), control characters
//!   escaped, so one event is one line and input cannot inject terminal escapes. ANSI colours
//!   only when stderr is a terminal (and `NO_COLOR` is unset). When stderr is the systemd
//!   journal (`JOURNAL_STREAM` names it), no timestamp (the journal has one) and a `<N>`
//!   priority prefix (sd-daemon(3)), so `journalctl -p warning` filters by level.
//! - `json`: one JSON object per line on stderr, the fields at the top level.
//! - `journald`: native journal entries, each field a journal field with the `F_` prefix
//!   (`F_DEV_EUI=...`; the prefix keeps them clear of the journal's own `PRIORITY`, `UNIT`,
//!   ...). `journalctl -o verbose` shows them. Falls back to `text` where no journal runs.

use crate::config::LogFormat;
use std::fmt::{self, Write as _};
use std::time::{Duration, Instant};
use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, Layer, Registry};

type Base = tracing_subscriber::layer::Layered<reload::Layer<Targets, Registry>, Registry>;

/// Changes the level of the running subscriber (SIGHUP).
pub struct LogHandle {
    filter: reload::Handle<Targets, Registry>,
    /// `RUST_LOG` was set at start: it keeps winning over `[log] level`.
    from_env: bool,
}

impl LogHandle {
    /// Apply `[log] level` again; `Ok(false)` when `RUST_LOG` overrides it (nothing changed).
    pub fn set_level(&self, level: &str) -> Result<bool, String> {
        if self.from_env {
            return Ok(false);
        }
        let f = parse_filter(level)?;
        self.filter.reload(f).map_err(|e| e.to_string())?;
        Ok(true)
    }
}

/// What [`init`] set up, for the first log lines.
pub struct LogInit {
    pub handle: Option<LogHandle>,
    /// Why the configured format could not be used, if it could not.
    pub fallback: Option<String>,
}

/// Parse a level filter: comma-separated `target=level` directives and at most one bare level
/// for everything else (`"info"`, `"warn,lorastream=debug"`), as `RUST_LOG` is usually written.
/// `Targets` rather than `EnvFilter`: the same directives without span and field filters,
/// and without the regex engine those need (about 0.25 MB of the armv7 binary). `Targets`
/// takes any word that is not a level as a target name; targets are module paths, so anything
/// else (`[span]`, `{field}`, a typo like `[[[`) is refused here as `EnvFilter` refused it.
pub fn parse_filter(level: &str) -> Result<Targets, String> {
    let is_target = |t: &str| {
        !t.is_empty()
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '.'))
    };
    let directives: Vec<&str> = level
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err("empty filter".to_string());
    }
    for &d in &directives {
        let target = match d.split_once('=') {
            Some((t, _)) => t.trim(),
            None if d.parse::<tracing_subscriber::filter::LevelFilter>().is_ok() => continue,
            None => d,
        };
        if !is_target(target) {
            return Err(format!(
                "{d:?} is not a level or a `target=level` directive (span and field filters are not supported)"
            ));
        }
    }
    directives
        .join(",")
        .parse::<Targets>()
        .map_err(|e| e.to_string())
}

/// Set up logging with `level` (a level filter, see [`parse_filter`]; `RUST_LOG` overrides it)
/// and `format`. Only the first call in a process installs a subscriber (later ones return no
/// handle).
pub fn init(level: &str, format: LogFormat) -> LogInit {
    let env = std::env::var("RUST_LOG").ok();
    let from_env = env.is_some();
    let filter = env
        .as_deref()
        .map(parse_filter)
        .and_then(Result::ok)
        .or_else(|| parse_filter(level).ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    let (filter, handle) = reload::Layer::new(filter);
    let mut fallback = None;
    let output: Box<dyn Layer<Base> + Send + Sync> = match format {
        LogFormat::Text => text_layer(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(j) => j.with_syslog_identifier("lorastream".into()).boxed(),
            Err(e) => {
                fallback = Some(format!(
                    "[log] format = \"journald\": no systemd journal here ({e}); logging as text on stderr"
                ));
                text_layer()
            }
        },
    };
    // The last lines, for the `logs` remote command (plain text, no colours).
    let ring = tracing_subscriber::fmt::layer()
        .with_writer(RingWriter)
        .with_ansi(false)
        .fmt_fields(PlainFields);
    let ok = tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .with(ring)
        .try_init()
        .is_ok();
    LogInit {
        handle: ok.then_some(LogHandle {
            filter: handle,
            from_env,
        }),
        fallback,
    }
}

/// Lines the ring keeps (each at most [`RING_LINE_MAX`] bytes): about 1 MB at most.
pub const RING_LINES: usize = 1000;
const RING_LINE_MAX: usize = 1000;

fn ring() -> &'static std::sync::Mutex<std::collections::VecDeque<String>> {
    static RING: std::sync::OnceLock<std::sync::Mutex<std::collections::VecDeque<String>>> =
        std::sync::OnceLock::new();
    RING.get_or_init(Default::default)
}

/// The last `n` log lines (oldest first), as the text format writes them; empty when the
/// binary's subscriber is not installed (tests that run the daemon in-process).
pub fn recent(n: usize) -> Vec<String> {
    let Ok(r) = ring().lock() else {
        return Vec::new();
    };
    r.iter().skip(r.len().saturating_sub(n)).cloned().collect()
}

/// Writes each formatted event into the ring.
struct RingWriter;

impl std::io::Write for RingWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(b);
        if let Ok(mut r) = ring().lock() {
            for line in text.lines().filter(|l| !l.is_empty()) {
                let mut l = line.to_string();
                if l.len() > RING_LINE_MAX {
                    let mut cut = RING_LINE_MAX;
                    while !l.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    l.truncate(cut);
                }
                if r.len() == RING_LINES {
                    r.pop_front();
                }
                r.push_back(l);
            }
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RingWriter {
    type Writer = RingWriter;
    fn make_writer(&'a self) -> RingWriter {
        RingWriter
    }
}

/// Where stderr goes, for the `text` format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stderr {
    Terminal,
    /// systemd connected stderr to the journal (`JOURNAL_STREAM` is its device:inode).
    Journal,
    Other,
}

fn stderr_kind() -> Stderr {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        return Stderr::Terminal;
    }
    if let Some(js) = std::env::var_os("JOURNAL_STREAM") {
        if let Some(id) = stderr_dev_ino() {
            if js.to_string_lossy() == id {
                return Stderr::Journal;
            }
        }
    }
    Stderr::Other
}

/// `device:inode` of fd 2, as systemd writes it into `JOURNAL_STREAM` (systemd.exec(5)).
fn stderr_dev_ino() -> Option<String> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let m = std::fs::File::from(fd).metadata().ok()?;
    Some(format!("{}:{}", m.dev(), m.ino()))
}

fn text_layer() -> Box<dyn Layer<Base> + Send + Sync> {
    let kind = stderr_kind();
    let colour =
        kind == Stderr::Terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .fmt_fields(PlainFields);
    if kind == Stderr::Journal {
        layer
            .event_format(SyslogPrefix(
                tracing_subscriber::fmt::format()
                    .without_time()
                    .with_ansi(false),
            ))
            .boxed()
    } else {
        layer.boxed()
    }
}

/// sd-daemon(3) priority prefix: the journal files the line under this level.
struct SyslogPrefix<F>(F);

impl<S, N, F> FormatEvent<S, N> for SyslogPrefix<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let prio = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        };
        write!(writer, "<{prio}>")?;
        self.0.format_event(ctx, writer.by_ref(), event)
    }
}

/// Field formatting of the `text` format: `message key=value ...`, every value as it displays.
/// (tracing-subscriber's default writes strings with quotes, as `Debug` does.)
struct PlainFields;

impl<'w> MakeVisitor<Writer<'w>> for PlainFields {
    type Visitor = PlainVisitor<'w>;
    fn make_visitor(&self, writer: Writer<'w>) -> PlainVisitor<'w> {
        PlainVisitor {
            writer,
            first: true,
            result: Ok(()),
        }
    }
}

struct PlainVisitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    fn put(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        let name = field.name();
        // Metadata of events from the `log` crate (tracing-log); the format shows it already.
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        let sep = if self.first { "" } else { " " };
        self.first = false;
        let mut out = Escaped(&mut self.writer);
        self.result = if name == "message" {
            write!(out.0, "{sep}").and_then(|_| out.write_fmt(value))
        } else {
            let name = name.strip_prefix("r#").unwrap_or(name);
            write!(out.0, "{sep}{name}=").and_then(|_| out.write_fmt(value))
        };
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, format_args!("{value}"));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format_args!("{value:?}"));
    }
}

impl VisitOutput<fmt::Result> for PlainVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for PlainVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

/// Writes control characters (newlines, ESC, ...) as `\n`, `\u{1b}`: one event stays one line
/// and a value from the network cannot carry terminal escape sequences.
struct Escaped<'a, 'w>(&'a mut Writer<'w>);

impl fmt::Write for Escaped<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if !s.chars().any(char::is_control) {
            return self.0.write_str(s);
        }
        for c in s.chars() {
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c if c.is_control() => write!(self.0, "\\u{{{:x}}}", c as u32)?,
                c => self.0.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Warn at most `burst` times per `period` per kind, then count silently.
pub(crate) struct LogLimiter {
    period: Duration,
    burst: u32,
    window_start: Instant,
    used: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new() -> Self {
        LogLimiter {
            period: Duration::from_secs(10),
            burst: 10,
            window_start: Instant::now(),
            used: 0,
            suppressed: 0,
        }
    }

    /// True when this warning may be logged now.
    pub fn allow(&mut self) -> bool {
        if self.window_start.elapsed() >= self.period {
            if self.suppressed > 0 {
                tracing::warn!(
                    suppressed = self.suppressed,
                    "similar warnings suppressed in the last period (see /metrics)"
                );
            }
            self.window_start = Instant::now();
            self.used = 0;
            self.suppressed = 0;
        }
        if self.used < self.burst {
            self.used += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::parse_filter;
    use tracing::Level;

    #[test]
    fn level_filters_take_targets_and_a_default() {
        let f = parse_filter("warn,lorastream::stored=trace,rumqttc=error").unwrap();
        assert!(f.would_enable("lorastream::stored", &Level::TRACE));
        assert!(f.would_enable("lorastream::stored::queue", &Level::TRACE));
        assert!(!f.would_enable("lorastream::streams", &Level::INFO));
        assert!(f.would_enable("lorastream::streams", &Level::WARN));
        assert!(!f.would_enable("rumqttc::state", &Level::WARN));
        let f = parse_filter("lorastream").unwrap();
        assert!(f.would_enable("lorastream::uplink", &Level::TRACE));
        assert!(!f.would_enable("hyper", &Level::ERROR));
        let f = parse_filter(" info, ").unwrap();
        assert!(f.would_enable("hyper", &Level::INFO));
        assert!(!f.would_enable("hyper", &Level::DEBUG));
        for bad in [
            "",
            "  ",
            " , ",
            "lorastream=loud",
            "info,lorastream=noisy",
            "[[[",
            "=debug",
            "lorastream[span]=debug",
            "info,{field}",
        ] {
            assert!(parse_filter(bad).is_err(), "{bad:?} accepted");
        }
    }
}
