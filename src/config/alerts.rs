//! `[[alert]]`: operator alert rules, typed, with every default here (see `crate::alerts` for
//! what the daemon does with them).
//!
//! ```toml
//! [[alert]]
//! kind = "device_silent"   # device_silent | battery_low | gateway_offline | stream_down |
//!                          # queue_filling | store_unwritable
//! after = "2h"             # the condition must hold this long before the alert fires
//! application = "farm"     # scope: application / device (device kinds), gateway, stream
//! streams = ["mail"]       # where the alert's messages go
//! hold = "0s"              # a cleared condition must stay clear this long before "resolved"
//! ```

use super::locate::Source;
use super::{ConfigError, DeviceConfig, StreamConfig, StreamKind};
use crate::model::Eui64;
use serde::Deserialize;
use std::ops::Range;
use std::time::Duration;

/// Defaults of `[[alert]]` (README and config.example.toml show the same).
pub mod defaults {
    use std::time::Duration;
    pub const DEVICE_SILENT_AFTER: Duration = Duration::from_secs(2 * 3600);
    pub const GATEWAY_OFFLINE_AFTER: Duration = Duration::from_secs(300);
    pub const STREAM_DOWN_AFTER: Duration = Duration::from_secs(300);
    /// battery_low: percent.
    pub const BATTERY_THRESHOLD: u8 = 20;
    /// queue_filling: percent of `[storage] max_bytes`.
    pub const QUEUE_THRESHOLD: u8 = 80;
}

/// What an alert watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// No uplink from a device for `after`.
    DeviceSilent,
    /// A device's last DevStatusAns reports less than `threshold` percent battery.
    BatteryLow,
    /// No datagram (PULL_DATA, PUSH_DATA, stat) from a gateway for `after`.
    GatewayOffline,
    /// A stream disconnected for `after`.
    StreamDown,
    /// A stream's queue holds more than `threshold` percent of `[storage] max_bytes`.
    QueueFilling,
    /// The store refuses writes (disk full, I/O errors).
    StoreUnwritable,
}

impl AlertKind {
    pub fn name(self) -> &'static str {
        match self {
            AlertKind::DeviceSilent => "device_silent",
            AlertKind::BatteryLow => "battery_low",
            AlertKind::GatewayOffline => "gateway_offline",
            AlertKind::StreamDown => "stream_down",
            AlertKind::QueueFilling => "queue_filling",
            AlertKind::StoreUnwritable => "store_unwritable",
        }
    }

    pub const ALL: [AlertKind; 6] = [
        AlertKind::DeviceSilent,
        AlertKind::BatteryLow,
        AlertKind::GatewayOffline,
        AlertKind::StreamDown,
        AlertKind::QueueFilling,
        AlertKind::StoreUnwritable,
    ];
}

/// Which subjects a rule watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlertScope {
    /// Every device, gateway or stream (by kind); the store for `store_unwritable`.
    All,
    Application(String),
    Device(String),
    Gateway(Eui64),
    Stream(String),
}

/// One `[[alert]]`, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertConfig {
    pub kind: AlertKind,
    pub after: Duration,
    pub hold: Duration,
    pub scope: AlertScope,
    /// Percent (battery_low, queue_filling); 0 for the other kinds.
    pub threshold: u8,
    /// Stream names.
    pub streams: Vec<String>,
}

impl AlertConfig {
    /// Names the rule across restarts (its open alerts are stored under it): kind and scope.
    pub fn key(&self) -> String {
        let scope = match &self.scope {
            AlertScope::All => String::new(),
            AlertScope::Application(a) => format!("application={a}"),
            AlertScope::Device(d) => format!("device={d}"),
            AlertScope::Gateway(g) => format!("gateway={g}"),
            AlertScope::Stream(s) => format!("stream={s}"),
        };
        format!("{}/{scope}", self.kind.name())
    }

    pub(super) fn effective(&self) -> toml::Table {
        let mut t = toml::Table::new();
        let s = |v: &str| toml::Value::String(v.into());
        t.insert("kind".into(), s(self.kind.name()));
        t.insert(
            "after".into(),
            s(&humantime::format_duration(self.after).to_string()),
        );
        match &self.scope {
            AlertScope::All => {}
            AlertScope::Application(a) => drop(t.insert("application".into(), s(a))),
            AlertScope::Device(d) => drop(t.insert("device".into(), s(d))),
            AlertScope::Gateway(g) => drop(t.insert("gateway".into(), s(&g.to_string()))),
            AlertScope::Stream(x) => drop(t.insert("stream".into(), s(x))),
        }
        if matches!(self.kind, AlertKind::BatteryLow | AlertKind::QueueFilling) {
            t.insert(
                "threshold".into(),
                toml::Value::Integer(self.threshold.into()),
            );
        }
        t.insert(
            "streams".into(),
            toml::Value::Array(self.streams.iter().map(|x| s(x)).collect()),
        );
        t.insert(
            "hold".into(),
            s(&humantime::format_duration(self.hold).to_string()),
        );
        t
    }
}

/// One `[[alert]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAlert {
    kind: AlertKind,
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    hold: Option<String>,
    #[serde(default)]
    application: Option<String>,
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    stream: Option<String>,
    #[serde(default)]
    threshold: Option<u8>,
    #[serde(default)]
    streams: Vec<String>,
}

fn duration(
    key: &'static str,
    v: Option<String>,
    default: Duration,
) -> Result<Duration, (&'static str, String)> {
    match v {
        None => Ok(default),
        Some(s) => humantime::parse_duration(&s)
            .map_err(|e| (key, format!("{s:?}: {e} (write e.g. \"2h\" or \"90s\")"))),
    }
}

/// Type one `[[alert]]` and check its references.
pub(super) fn build(
    raw: RawAlert,
    span: &Range<usize>,
    src: &Source,
    streams: &[StreamConfig],
    devices: &[DeviceConfig],
    applications: &[String],
) -> Result<AlertConfig, ConfigError> {
    let kind = raw.kind;
    let label = format!("[[alert]] {:?}: ", kind.name());
    let err = |(key, message): (&str, String)| src.entry_error(span, label.clone(), key, message);
    use AlertKind as K;
    let default_after = match kind {
        K::DeviceSilent => defaults::DEVICE_SILENT_AFTER,
        K::GatewayOffline => defaults::GATEWAY_OFFLINE_AFTER,
        K::StreamDown => defaults::STREAM_DOWN_AFTER,
        _ => Duration::ZERO,
    };
    let after = duration("after", raw.after, default_after).map_err(err)?;
    let hold = duration("hold", raw.hold, Duration::ZERO).map_err(err)?;
    let devices_kind = matches!(kind, K::DeviceSilent | K::BatteryLow);
    let scope = match (&raw.application, &raw.device, &raw.gateway, &raw.stream) {
        (None, None, None, None) => AlertScope::All,
        (Some(a), None, None, None) if devices_kind => {
            if !applications.contains(a) {
                return Err(err(("application", format!("no [[application]] {a:?}"))));
            }
            AlertScope::Application(a.clone())
        }
        (None, Some(d), None, None) if devices_kind => {
            if !devices.iter().any(|x| &x.id == d) {
                return Err(err(("device", format!("no [[device]] {d:?}"))));
            }
            AlertScope::Device(d.clone())
        }
        (None, None, Some(g), None) if kind == K::GatewayOffline => match g.parse::<Eui64>() {
            Ok(e) => AlertScope::Gateway(e),
            Err(_) => {
                return Err(err((
                    "gateway",
                    format!("{g:?} is not a gateway EUI (16 hex digits)"),
                )))
            }
        },
        (None, None, None, Some(s)) if matches!(kind, K::StreamDown | K::QueueFilling) => {
            if !streams.iter().any(|x| &x.name == s) {
                return Err(err(("stream", format!("no [[stream]] {s:?}"))));
            }
            AlertScope::Stream(s.clone())
        }
        _ => {
            let (key, takes) = match kind {
                K::DeviceSilent | K::BatteryLow => {
                    ("application", "application or device (one of them)")
                }
                K::GatewayOffline => ("gateway", "gateway"),
                K::StreamDown | K::QueueFilling => ("stream", "stream"),
                K::StoreUnwritable => ("application", "no scope"),
            };
            return Err(err((
                key,
                format!("kind = {:?} takes {takes}", kind.name()),
            )));
        }
    };
    let threshold = match (kind, raw.threshold) {
        (K::BatteryLow | K::QueueFilling, Some(t)) if !(1..=100).contains(&t) => {
            return Err(err((
                "threshold",
                format!("{t} is not a percentage within 1..=100"),
            )))
        }
        (K::BatteryLow | K::QueueFilling, Some(t)) => t,
        (K::BatteryLow, None) => defaults::BATTERY_THRESHOLD,
        (K::QueueFilling, None) => defaults::QUEUE_THRESHOLD,
        (_, Some(_)) => {
            return Err(err((
                "threshold",
                "is only used by battery_low and queue_filling".into(),
            )))
        }
        (_, None) => 0,
    };
    if raw.streams.is_empty() {
        return Err(err((
            "streams",
            "name the streams the alert goes to, e.g. streams = [\"mail\"]".into(),
        )));
    }
    for name in &raw.streams {
        let Some(s) = streams.iter().find(|s| &s.name == name) else {
            return Err(err(("streams", format!("no [[stream]] {name:?}"))));
        };
        if matches!(s.kind, StreamKind::AzureIotHub(_)) {
            return Err(err((
                "streams",
                format!("{name:?} is an azure-iot-hub stream, which carries device messages only; send alerts to an mqtt, http, websocket, smtp or file stream"),
            )));
        }
    }
    Ok(AlertConfig {
        kind,
        after,
        hold,
        scope,
        threshold,
        streams: raw.streams,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::{AlertKind, AlertScope, Config};
    use std::time::Duration;

    const BASE: &str =
        "[[application]]\nid = \"farm\"\n\n[[stream]]\nname = \"out\"\nkind = \"stdout\"\n\n";

    fn parse(extra: &str) -> Result<Config, String> {
        Config::parse(&format!("{BASE}{extra}"), "a.toml").map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_scopes_and_errors_with_lines() {
        let c = parse(
            "[[alert]]\nkind = \"device_silent\"\napplication = \"farm\"\nstreams = [\"out\"]\n",
        )
        .unwrap();
        let a = &c.alerts[0];
        assert_eq!(a.kind, AlertKind::DeviceSilent);
        assert_eq!(a.after, Duration::from_secs(7200));
        assert_eq!(a.hold, Duration::ZERO);
        assert_eq!(a.scope, AlertScope::Application("farm".into()));
        assert_eq!(a.key(), "device_silent/application=farm");
        let c = parse("[[alert]]\nkind = \"battery_low\"\nstreams = [\"out\"]\n").unwrap();
        assert_eq!(c.alerts[0].threshold, 20);
        assert!(c.to_toml_masked().contains("[[alert]]"));

        let e = parse("[[alert]]\nkind = \"stream_down\"\nstreams = [\"nope\"]\n").unwrap_err();
        assert!(
            e.starts_with("a.toml:10:") && e.contains("`streams`") && e.contains("nope"),
            "{e}"
        );
        let e =
            parse("[[alert]]\nkind = \"gateway_offline\"\ndevice = \"x\"\nstreams = [\"out\"]\n")
                .unwrap_err();
        assert!(e.contains("takes gateway"), "{e}");
        let e = parse("[[alert]]\nkind = \"stream_down\"\nthreshold = 5\nstreams = [\"out\"]\n")
            .unwrap_err();
        assert!(e.contains("`threshold`"), "{e}");
        let e =
            parse("[[alert]]\nkind = \"queue_filling\"\nthreshold = 101\nstreams = [\"out\"]\n")
                .unwrap_err();
        assert!(e.contains("1..=100"), "{e}");
        let e =
            parse("[[alert]]\nkind = \"device_silent\"\nafter = \"soon\"\nstreams = [\"out\"]\n")
                .unwrap_err();
        assert!(e.contains("`after`"), "{e}");
        let e = parse("[[alert]]\nkind = \"store_unwritable\"\n").unwrap_err();
        assert!(e.contains("`streams`"), "{e}");
        let e = parse("[[alert]]\nkind = \"nonsense\"\nstreams = [\"out\"]\n").unwrap_err();
        assert!(e.contains("nonsense"), "{e}");
    }
}
