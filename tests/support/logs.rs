//! Log capture for a test binary: every test of the binary logs into one buffer (the first
//! `capture` sets the global subscriber), so a test can check what was, or was never, logged
//! (secrets above all).

use std::sync::Mutex;

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;
impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Send this binary's logs, filtered by `filter` (`target=level` directives, as the daemon's
/// `[log] level`), to the buffer. Only the first call in a binary takes effect.
pub fn capture(filter: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter: tracing_subscriber::filter::Targets =
            filter.parse().expect("a valid log filter");
        let sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(|| LogWriter)
            .with_ansi(false)
            .finish()
            .with(filter);
        let _ = tracing::subscriber::set_global_default(sub);
    });
}

/// Everything logged so far.
pub fn text() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned()
}
