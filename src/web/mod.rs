//! The operator's status page (`/` on the metrics listener) and the JSON it polls
//! (`/api/status`).
//!
//! The page is rendered on the server from a [`StatusDoc`] (so it shows everything without
//! JavaScript) and carries one small inline script ([`SCRIPT`]) that fetches `/api/status` every
//! few seconds and redraws the tables with DOM calls (`textContent`, never `innerHTML`). Nothing
//! is loaded from anywhere else: no framework, no CDN, no web font; a Raspberry Pi serves a page
//! of a few tens of kilobytes. The answer's `Content-Security-Policy` allows exactly the inline
//! script and style by hash, and `connect-src 'self'`.
//!
//! **No secret.** A [`StatusDoc`] is built field by field from plain values (ids, EUIs,
//! counters, radio metadata): no key, password, header, token or payload is ever copied into
//! it, and stream destinations are shown by their origin only ([`origin`]: no user information,
//! path or query). Every string from input (device and application ids, gateway data,
//! stream names) is HTML-escaped by [`esc`].
//!
//! **Bounded.** At most [`MAX_PAGE_DEVICES`] devices (most recently heard first), the forwarder
//! table's `HEALTH_GATEWAYS`, the activity rings of [`crate::activity`].

use crate::activity::{text_or_empty, Activity, AlertView, FrameView, QUEUE_SAMPLE_EVERY};
use crate::config::{Config, StreamKind};
use crate::daemon::health::{Health, Sources};
use crate::downlink::SharedRegistry;
use crate::ingress::udp::GatewayView;
use crate::lorawan::session::Registry;
use crate::lorawan::session::SessionState;
use crate::metrics::{Page, StatusPages};
use crate::model::{now_us, DevStatus, Eui64};
use crate::store::Store;
use serde::Serialize;
use std::fmt::Write;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Devices listed at most (the rest are counted in `devices_total`).
pub const MAX_PAGE_DEVICES: usize = 200;

/// The page's script (polls `/api/status`, redraws).
pub const SCRIPT: &str = include_str!("status.js");
/// The page's style.
pub const STYLE: &str = include_str!("status.css");

/// What a stream is, from the config (no credentials).
#[derive(Debug, Clone, Serialize)]
pub struct StreamInfo {
    pub name: String,
    pub kind: &'static str,
    /// Where it delivers: a URL's origin ([`origin`]), a host:port, a path.
    pub target: String,
}

/// The streams of `cfg`, as the page shows them.
pub fn stream_infos(cfg: &Config) -> Vec<StreamInfo> {
    stream_infos_of(&cfg.streams)
}

/// These streams, as the page shows them.
pub fn stream_infos_of(streams: &[crate::config::StreamConfig]) -> Vec<StreamInfo> {
    streams
        .iter()
        .map(|s| StreamInfo {
            name: s.name.clone(),
            kind: s.kind.name(),
            target: match &s.kind {
                StreamKind::Mqtt(m) => origin(m.server.url()),
                StreamKind::AwsIot(a) => origin(a.mqtt.server.url()),
                StreamKind::AzureIotHub(a) => origin(a.server.url()),
                StreamKind::Http(h) => origin(&h.url),
                StreamKind::WebSocket(w) => origin(&w.url),
                StreamKind::Smtp(m) => format!("{}:{}", m.host, m.port),
                StreamKind::File { path } => path.display().to_string(),
                StreamKind::Stdout => "stdout".into(),
            },
        })
        .collect()
}

/// `scheme://host:port` of a URL: no user information, and no path or query either (tokens
/// live there too: `/api/v1/{token}/telemetry`, `?code=`).
pub fn origin(u: &url::Url) -> String {
    let host = u.host_str().unwrap_or_default();
    match u.port() {
        Some(p) => format!("{}://{host}:{p}", u.scheme()),
        None => format!("{}://{host}", u.scheme()),
    }
}

/// One device row.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceRow {
    pub id: String,
    pub application: String,
    pub dev_eui: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dev_addr: Option<String>,
    /// Unix µs of its last uplink since the start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen_us: Option<i64>,
    /// The last uplink's FCnt (kept across restarts by the store).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub f_cnt: Option<u32>,
    pub data_rate: String,
    /// Uplinks since the start.
    pub uplinks: u64,
    /// "83%", "external power", "unknown"; None before any DevStatusAns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub battery: Option<String>,
    /// The last uplinks (oldest first): [FCnt, RSSI dBm, SNR dB].
    pub signal: Vec<(u32, i32, f32)>,
}

/// One stream row.
#[derive(Debug, Clone, Serialize)]
pub struct StreamRow {
    pub name: String,
    pub kind: &'static str,
    pub target: String,
    pub connected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<i64>,
    pub depth: u64,
    pub bytes: u64,
    pub oldest_age_s: f64,
    pub delivered: u64,
    pub dropped: u64,
    /// Queue depth samples (oldest first, `activity::QUEUE_SAMPLE_EVERY` apart).
    pub depth_history: Vec<u64>,
}

/// Everything the page shows (and `/api/status` answers).
#[derive(Debug, Clone, Serialize)]
pub struct StatusDoc {
    pub status: &'static str,
    pub version: &'static str,
    pub uptime_s: u64,
    pub now_us: i64,
    pub store_writable: bool,
    pub gateways: Vec<GatewayView>,
    pub gateways_total: usize,
    pub devices: Vec<DeviceRow>,
    pub devices_total: usize,
    pub streams: Vec<StreamRow>,
    pub alerts: Vec<AlertView>,
    /// Newest first.
    pub frames: Vec<FrameView>,
}

/// What the page shows of a registry device (copied out while the registry is locked, so the
/// lock is held for the copy only; no key is copied).
#[derive(Debug, Clone)]
pub struct DeviceFacts {
    pub id: String,
    pub application: String,
    pub dev_eui: Eui64,
    pub session: Option<SessionState>,
    pub dev_status: Option<DevStatus>,
}

/// The registry's devices, as the page needs them.
pub fn device_facts(registry: &Registry) -> Vec<DeviceFacts> {
    registry
        .devices()
        .iter()
        .filter(|d| !d.removed)
        .map(|d| DeviceFacts {
            id: d.id.to_string(),
            application: d.application.to_string(),
            dev_eui: d.dev_eui,
            session: d.session.as_ref().map(|s| s.state),
            dev_status: d.mac.dev_status,
        })
        .collect()
}

/// Build the page's document from the live state (reads only).
pub fn doc(
    health: Health,
    registry: Vec<DeviceFacts>,
    activity: &Activity,
    streams: &[StreamInfo],
    now_us: i64,
) -> StatusDoc {
    let mut devices: Vec<DeviceRow> = registry
        .into_iter()
        .map(|d| {
            let a = activity.device(d.dev_eui);
            let session = d.session;
            let status = d.dev_status.or(a.as_ref().and_then(|a| a.dev_status));
            DeviceRow {
                id: d.id,
                application: d.application,
                dev_eui: d.dev_eui.to_string(),
                dev_addr: session.map(|s| s.dev_addr.to_string()),
                last_seen_us: a.as_ref().map(|a| a.last_seen_us),
                f_cnt: a
                    .as_ref()
                    .map(|a| a.f_cnt)
                    .or(session.and_then(|s| s.f_cnt_up)),
                data_rate: a
                    .as_ref()
                    .map(|a| text_or_empty(&a.data_rate))
                    .unwrap_or_default(),
                uplinks: a.as_ref().map_or(0, |a| a.uplinks),
                battery: status.map(|s| {
                    if s.battery == 0 {
                        "external power".to_string()
                    } else {
                        match s.battery_percentage() {
                            Some(p) => format!("{p:.0}%"),
                            None => "unknown".to_string(),
                        }
                    }
                }),
                signal: a
                    .map(|a| {
                        a.history
                            .iter()
                            .map(|p| (p.f_cnt, p.rssi, (p.snr * 10.0).round() / 10.0))
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        })
        .collect();
    let devices_total = devices.len();
    // Most recently heard first, then the silent ones by id.
    devices.sort_by(|a, b| {
        b.last_seen_us
            .cmp(&a.last_seen_us)
            .then_with(|| a.id.cmp(&b.id))
    });
    devices.truncate(MAX_PAGE_DEVICES);
    let stream_rows = health
        .streams
        .iter()
        .map(|s| {
            let q = &s.queue;
            let info = streams.iter().find(|i| i.name == q.stream);
            StreamRow {
                name: q.stream.clone(),
                kind: info.map_or("", |i| i.kind),
                target: info.map(|i| i.target.clone()).unwrap_or_default(),
                connected: s.connected,
                connections: s.connections,
                depth: q.depth,
                bytes: q.bytes,
                oldest_age_s: q.oldest_age_s,
                delivered: q.delivered,
                dropped: q.dropped.values().sum(),
                depth_history: activity
                    .queue_history(&q.stream)
                    .into_iter()
                    .map(|(_, d)| d)
                    .collect(),
            }
        })
        .collect();
    StatusDoc {
        status: match health.status {
            crate::daemon::health::Status::Ok => "ok",
            crate::daemon::health::Status::Degraded => "degraded",
        },
        version: health.version,
        uptime_s: health.uptime_s,
        now_us,
        store_writable: health.store.writable,
        gateways: health.gateways,
        gateways_total: health.gateways_total,
        devices,
        devices_total,
        streams: stream_rows,
        alerts: activity.alerts(),
        frames: activity.frames(),
    }
}

/// The status page's answers, from the daemon's live state.
pub(crate) fn pages(
    sources: Sources,
    registry: SharedRegistry,
    activity: Activity,
    streams: Arc<std::sync::RwLock<Vec<StreamInfo>>>,
) -> StatusPages {
    let render = move |page: Page| {
        let health = sources.health();
        let facts = {
            // A poisoned lock still holds the devices: show them.
            let reg = registry.lock().unwrap_or_else(|p| p.into_inner());
            device_facts(&reg)
        };
        let d = {
            let streams = streams.read().unwrap_or_else(|p| p.into_inner());
            doc(health, facts, &activity, &streams, now_us())
        };
        match page {
            Page::Html => html(&d),
            Page::Json => json(&d),
        }
    };
    StatusPages {
        render: Box::new(render),
        csp: content_security_policy(),
    }
}

/// Sample every stream's queue depth each `QUEUE_SAMPLE_EVERY` until `cancel`.
pub(crate) async fn sample_queues(store: Store, activity: Activity, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(QUEUE_SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => activity.sample_queues(
                now_us(),
                store.queues().iter().map(|q| (q.name().to_string(), q.len())),
            ),
        }
    }
}

/// `/api/status`.
pub fn json(doc: &StatusDoc) -> String {
    serde_json::to_string(doc).unwrap_or_else(|_| "{}".into())
}

/// Escape text for HTML element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// "4 s", "3 min", "2 h", "5 d".
pub fn ago(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86_400),
    }
}

fn ago_us(now_us: i64, at_us: i64) -> String {
    ago((now_us - at_us) as f64 / 1e6)
}

/// The chart ranges: RSSI from the sensitivity floor to a device next to the gateway, SNR
/// from SF12's demodulation floor to a clean channel (fixed, so charts compare across devices).
pub const RSSI_RANGE: (f64, f64) = (-130.0, -30.0);
pub const SNR_RANGE: (f64, f64) = (-20.0, 15.0);

/// One line of a chart: values, their range (values outside are clamped), colour.
pub struct Series<'a> {
    pub values: &'a [f64],
    pub range: (f64, f64),
    pub colour: &'static str,
}

/// An inline SVG line chart of `series`, `w`×`h`.
pub fn sparkline(series: &[Series<'_>], w: u32, h: u32, label: &str) -> String {
    let mut s = format!(
        "<svg class=\"chart\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"{}\">",
        esc(label)
    );
    for l in series {
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"{}\"/>",
            l.colour,
            points(l.values, l.range, w, h)
        );
    }
    s.push_str("</svg>");
    s
}

/// Polyline points of `v` in `range` scaled into `w`×`h` (2 px margin); one value is a flat
/// line across. The same as the script's `points`.
fn points(v: &[f64], range: (f64, f64), w: u32, h: u32) -> String {
    let (w, h) = (f64::from(w), f64::from(h));
    let (min, max) = range;
    let span = if max > min { max - min } else { 1.0 };
    let y = |v: f64| h - 2.0 - (v.clamp(min, max) - min) / span * (h - 4.0);
    if let [only] = v {
        return format!("2.0,{y:.1} {:.1},{y:.1}", w - 2.0, y = y(*only));
    }
    let step = if v.len() > 1 {
        (w - 4.0) / (v.len() - 1) as f64
    } else {
        0.0
    };
    let mut out = String::new();
    for (i, value) in v.iter().enumerate() {
        let x = 2.0 + step * i as f64;
        let _ = write!(
            out,
            "{}{x:.1},{:.1}",
            if i > 0 { " " } else { "" },
            y(*value)
        );
    }
    out
}

fn signal_chart(d: &DeviceRow) -> String {
    if d.signal.is_empty() {
        return String::new();
    }
    let rssi: Vec<f64> = d.signal.iter().map(|p| f64::from(p.1)).collect();
    let snr: Vec<f64> = d.signal.iter().map(|p| f64::from(p.2)).collect();
    sparkline(
        &[
            Series {
                values: &rssi,
                range: RSSI_RANGE,
                colour: "#1f6fd1",
            },
            Series {
                values: &snr,
                range: SNR_RANGE,
                colour: "#d1741f",
            },
        ],
        120,
        28,
        &format!("RSSI and SNR of the last {} uplinks", d.signal.len()),
    )
}

fn depth_chart(s: &StreamRow) -> String {
    if s.depth_history.len() < 2 {
        return String::new();
    }
    let v: Vec<f64> = s.depth_history.iter().map(|d| *d as f64).collect();
    let max = v.iter().copied().fold(1.0, f64::max);
    sparkline(
        &[Series {
            values: &v,
            range: (0.0, max),
            colour: "#6a3fb5",
        }],
        100,
        24,
        "queue depth over time",
    )
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "–".into())
}

/// The base64 SHA-256 of `s`, for the Content-Security-Policy.
fn sha256_b64(s: &str) -> String {
    use base64::Engine;
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(d.as_ref())
}

/// The page's `Content-Security-Policy`: its own inline script and style (by hash), fetches to
/// itself, nothing else.
pub fn content_security_policy() -> String {
    format!(
        "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        sha256_b64(SCRIPT),
        sha256_b64(STYLE)
    )
}

/// The page (`/`).
pub fn html(d: &StatusDoc) -> String {
    let mut h = String::with_capacity(16 * 1024);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>lorastream status</title><style>{STYLE}</style></head><body>\
         <header><h1>lorastream</h1> <span id=\"status\" class=\"{}\">{}</span> \
         <span class=\"muted\">version {} · up <span id=\"uptime\">{}</span> · store \
         <span id=\"store\">{}</span> · <span id=\"live\">not live (page as served)</span></span></header>",
        d.status,
        d.status,
        esc(d.version),
        ago(d.uptime_s as f64),
        if d.store_writable { "writable" } else { "NOT writable" },
    );

    // Alerts.
    h.push_str("<section><h2>Open alerts</h2><table><thead><tr><th>kind</th><th>subject</th><th>since</th><th>id</th></tr></thead><tbody id=\"alerts\">");
    for a in &d.alerts {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{} ago</td><td class=\"muted\">{}</td></tr>",
            esc(a.kind),
            esc(&a.subject),
            ago_us(d.now_us, a.since_us),
            esc(&a.id)
        );
    }
    if d.alerts.is_empty() {
        h.push_str("<tr><td colspan=\"4\" class=\"muted\">none</td></tr>");
    }
    h.push_str("</tbody></table></section>");

    // Gateways.
    let _ = write!(h, "<section><h2>Gateways <span class=\"muted\" id=\"gateways_total\">{}</span></h2><table><thead><tr><th>EUI</th><th>last seen</th><th>address</th><th>frames</th><th>rx ok / rx</th><th>tx</th><th>time</th></tr></thead><tbody id=\"gateways\">", d.gateways_total);
    for g in &d.gateways {
        let (rx, tx, time) = match &g.stat {
            Some(s) => (
                format!("{} / {}", s.rxok, s.rxnb),
                s.txnb.to_string(),
                esc(&s.time),
            ),
            None => ("–".into(), "–".into(), "–".into()),
        };
        let _ = write!(
            h,
            "<tr><td class=\"mono\">{}</td><td class=\"{}\">{} ago</td><td class=\"mono\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&g.eui),
            if g.online { "ok" } else { "bad" },
            ago(g.last_seen_s),
            esc(g.push_addr.as_deref().or(g.pull_addr.as_deref()).unwrap_or("–")),
            g.rx_frames,
            rx,
            tx,
            time
        );
    }
    h.push_str("</tbody></table></section>");

    // Devices.
    let _ = write!(h, "<section><h2>Devices <span class=\"muted\" id=\"devices_total\">{}</span></h2><table><thead><tr><th>id</th><th>application</th><th>DevEUI</th><th>last seen</th><th>FCnt</th><th>data rate</th><th>RSSI / SNR</th><th>signal (<span class=\"rssi\">RSSI</span>, <span class=\"snr\">SNR</span>)</th><th>battery</th></tr></thead><tbody id=\"devices\">", d.devices_total);
    for v in &d.devices {
        let last = v.signal.last();
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=\"mono\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&v.id),
            esc(&v.application),
            esc(&v.dev_eui),
            v.last_seen_us
                .map(|t| format!("{} ago", ago_us(d.now_us, t)))
                .unwrap_or_else(|| "not since start".into()),
            opt(v.f_cnt),
            esc(&v.data_rate),
            last.map(|p| format!("{} dBm / {} dB", p.1, p.2))
                .unwrap_or_else(|| "–".into()),
            signal_chart(v),
            esc(v.battery.as_deref().unwrap_or("–")),
        );
    }
    h.push_str("</tbody></table></section>");

    // Streams.
    h.push_str("<section><h2>Streams</h2><table><thead><tr><th>name</th><th>kind</th><th>destination</th><th>connected</th><th>queued</th><th>oldest</th><th>depth over time</th><th>delivered</th><th>dropped</th></tr></thead><tbody id=\"streams\">");
    for s in &d.streams {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=\"mono\">{}</td><td class=\"{}\">{}</td><td>{} ({} B)</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&s.name),
            esc(s.kind),
            esc(&s.target),
            if s.connected { "ok" } else { "bad" },
            if s.connected { "yes" } else { "no" },
            s.depth,
            s.bytes,
            if s.depth > 0 { ago(s.oldest_age_s) } else { "–".into() },
            depth_chart(s),
            s.delivered,
            s.dropped
        );
    }
    h.push_str("</tbody></table></section>");

    // Frames.
    h.push_str("<section><h2>Last frames</h2><table><thead><tr><th>when</th><th>kind</th><th>result</th><th>device</th><th>DevAddr</th><th>FCnt</th><th>gateway</th><th>RSSI / SNR</th><th>frequency</th><th>data rate</th><th>bytes</th></tr></thead><tbody id=\"frames\">");
    for f in &d.frames {
        let _ = write!(
            h,
            "<tr><td>{} ago</td><td>{}</td><td class=\"{}\">{}</td><td>{}</td><td class=\"mono\">{}</td><td>{}</td><td class=\"mono\">{}{}</td><td>{} dBm / {} dB</td><td>{:.1} MHz</td><td>{}</td><td>{}</td></tr>",
            ago_us(d.now_us, f.at_us),
            esc(f.kind),
            if f.result == "accepted" || f.result == "valid" { "ok" } else { "bad" },
            esc(f.result),
            esc(f.device.as_deref().unwrap_or("–")),
            esc(&f.dev_addr.map_or_else(|| "–".to_string(), |a| a.to_string())),
            opt(f.f_cnt),
            esc(&text_or_empty(&f.gateway)),
            if f.gateways > 1 { format!(" +{}", f.gateways - 1) } else { String::new() },
            f.rssi,
            f.snr,
            f64::from(f.frequency_hz) / 1e6,
            esc(&text_or_empty(&f.data_rate)),
            f.size
        );
    }
    h.push_str("</tbody></table></section>");
    let _ = writeln!(
        h,
        "<footer class=\"muted\">Live from <a href=\"api/status\">/api/status</a> · <a href=\"metrics\">/metrics</a> · <a href=\"health\">/health</a></footer><script>{SCRIPT}</script></body></html>"
    );
    h
}

#[cfg(test)]
mod tests;
