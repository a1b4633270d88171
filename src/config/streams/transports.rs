//! `kind = "websocket"` and `kind = "smtp"`: their typed settings, builders (which take their
//! keys from the `[[stream]]` table, see the parent module) and `lorastream check` printing.
//! Every default is in [`defaults`](super::defaults)' neighbour [`ws_smtp_defaults`].

use super::{check_headers, client_cert, inflight, KeyError, Keys, Table, TlsFiles};
use crate::model::{redact_url, Secret};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

impl super::StreamConfig {
    /// False for a stream that carries alerts only (`kind = "smtp"` with `alerts_only`): the
    /// uplink stage queues no device records for it.
    pub fn takes_records(&self) -> bool {
        !matches!(&self.kind, super::StreamKind::Smtp(m) if m.alerts_only)
    }

    /// Takes remote commands (`commands = true` on an mqtt or aws-iot stream).
    pub fn commands(&self) -> bool {
        match &self.kind {
            super::StreamKind::Mqtt(m) => m.commands,
            super::StreamKind::AwsIot(a) => a.mqtt.commands,
            super::StreamKind::AzureIotHub(a) => a.commands,
            _ => false,
        }
    }
}

/// Defaults of the WebSocket and SMTP kinds (README and config.example.toml show the same).
pub mod ws_smtp_defaults {
    use std::time::Duration;

    /// Messages sent and not yet acknowledged by the server (`ack = "server"`).
    pub const WS_INFLIGHT: u16 = 100;
    /// A WebSocket Ping this often keeps NATs open; no frame from the server for twice this
    /// long means a dead peer.
    pub const WS_KEEP_ALIVE: Duration = Duration::from_secs(30);
    /// Connect + handshake limit, and the longest a sent message may wait for its ack before
    /// the connection is given up (its messages are sent again on the next one).
    pub const WS_TIMEOUT: Duration = Duration::from_secs(30);
    /// Messages per e-mail.
    pub const SMTP_BATCH_MAX: usize = 50;
    /// Messages arriving within this window go out as one e-mail (contract).
    pub const SMTP_BATCH_WAIT: Duration = Duration::from_secs(5);
    /// E-mails per hour at most (a chatty device must not get the account blocked).
    pub const SMTP_MAX_PER_HOUR: u32 = 20;
    pub const SMTP_SUBJECT: &str =
        "[lorastream] {{ alert.state }}: {{ alert.kind }} on {{ alert.subject }}";
    /// SMTP connect, each command and the whole DATA transfer.
    pub const SMTP_TIMEOUT: Duration = Duration::from_secs(30);
}
use ws_smtp_defaults as d;

/// What acknowledges a WebSocket message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WsAck {
    /// The server answers `{"ack": "<correlation id>"}` for each message.
    #[default]
    Server,
    /// Written to the socket counts as delivered (weaker: what the peer had not processed
    /// when the connection broke is lost).
    Write,
}

/// `kind = "websocket"`.
#[derive(Debug, Clone, PartialEq)]
pub struct WebSocketConfig {
    /// `ws://` or `wss://`.
    pub url: url::Url,
    pub headers: BTreeMap<String, Secret>,
    pub tls: TlsFiles,
    pub ack: WsAck,
    pub inflight: u16,
    pub keep_alive: Duration,
    pub timeout: Duration,
}

/// The headers of the WebSocket handshake (RFC 6455 §4.1) that lorastream sets itself.
const WS_RESERVED: [&str; 7] = [
    "host",
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "content-length",
];

fn seconds(
    key: &'static str,
    v: Option<u64>,
    default: Duration,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Duration, KeyError> {
    match v {
        None => Ok(default),
        Some(s) if range.contains(&s) => Ok(Duration::from_secs(s)),
        Some(s) => Err((
            key,
            format!(
                "{s} is not within {}..={} seconds",
                range.start(),
                range.end()
            ),
        )),
    }
}

pub(super) fn websocket(k: &mut Keys) -> Result<WebSocketConfig, KeyError> {
    let url = take!(k, url);
    let headers = take!(k, headers);
    let ca_file = take!(k, ca_file);
    let cert_file = take!(k, cert_file);
    let key_file = take!(k, key_file);
    let ack = take!(k, ack);
    let window = take!(k, inflight);
    let keep = take!(k, keep_alive_s);
    let timeout = take!(k, timeout_s);
    k.no_leftovers()?;
    let url = match url.as_deref().map(url::Url::parse) {
        Some(Ok(u)) if matches!(u.scheme(), "ws" | "wss") && u.host_str().is_some() => u,
        Some(Ok(u)) => {
            return Err((
                "url",
                format!(
                    "{:?} must be a ws:// or wss:// URL with a host",
                    redact_url(&u)
                ),
            ))
        }
        Some(Err(e)) => return Err(("url", format!("not a URL: {e}"))),
        None => {
            return Err((
                "url",
                "kind = \"websocket\" needs url = \"wss://...\" (where to connect)".into(),
            ))
        }
    };
    let headers = headers.unwrap_or_default();
    check_headers(&headers, &WS_RESERVED)?;
    Ok(WebSocketConfig {
        url,
        headers,
        tls: TlsFiles {
            ca_file,
            client_cert: client_cert(cert_file, key_file)?,
        },
        ack: ack.unwrap_or_default(),
        inflight: inflight(window, d::WS_INFLIGHT)?,
        keep_alive: seconds("keep_alive_s", keep, d::WS_KEEP_ALIVE, 1..=3600)?,
        timeout: seconds("timeout_s", timeout, d::WS_TIMEOUT, 1..=600)?,
    })
}

pub(super) fn print_websocket(t: &mut Table, w: &WebSocketConfig) {
    t.s("url", redact_url(&w.url));
    if !w.headers.is_empty() {
        t.masked_map("headers", &w.headers);
    }
    t.tls(&w.tls)
        .s(
            "ack",
            match w.ack {
                WsAck::Server => "server",
                WsAck::Write => "write",
            },
        )
        .n("inflight", w.inflight.into())
        .n("keep_alive_s", w.keep_alive.as_secs())
        .n("timeout_s", w.timeout.as_secs());
}

/// How an SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmtpTls {
    /// `smtp://`: STARTTLS, required (RFC 3207); the default for `smtp://`.
    Starttls,
    /// `smtps://`: TLS from the first byte (RFC 8314 §3.3); the default for `smtps://`.
    Implicit,
    /// `smtp://` in the clear (a relay on the same host or a trusted LAN only).
    None,
}

impl SmtpTls {
    pub fn name(self) -> &'static str {
        match self {
            SmtpTls::Starttls => "starttls",
            SmtpTls::Implicit => "implicit",
            SmtpTls::None => "none",
        }
    }
}

/// `kind = "smtp"`.
#[derive(Debug, Clone, PartialEq)]
pub struct SmtpConfig {
    pub host: String,
    /// The URL's port, or 587 (`smtp://`, submission, RFC 6409) / 465 (`smtps://`, RFC 8314).
    pub port: u16,
    pub tls: SmtpTls,
    pub ca_file: Option<std::path::PathBuf>,
    pub credentials: Option<(String, Secret)>,
    pub from: String,
    pub to: Vec<String>,
    /// Template of the subject; the first message of an e-mail is its context.
    pub subject: String,
    /// Template of each message's part of the body; None: the alert's sentence and facts, or
    /// the message's JSON.
    pub body: Option<String>,
    pub batch_max: usize,
    pub batch_wait: Duration,
    pub max_per_hour: u32,
    /// Only alerts are mailed (uplinks of the stream's scope are not queued for it).
    pub alerts_only: bool,
    pub timeout: Duration,
}

/// An e-mail address as `addr-spec` (RFC 5322 §3.4.1), roughly: one `@`, something either
/// side, no spaces or angle brackets (a display name is not taken here).
fn address(key: &'static str, a: &str) -> Result<(), KeyError> {
    let ok = a.split('@').count() == 2
        && a.split('@').all(|p| !p.is_empty())
        && !a.contains(|c: char| c.is_whitespace() || c == '<' || c == '>' || c == ',');
    if ok {
        Ok(())
    } else {
        Err((
            key,
            format!("{a:?} is not an e-mail address (user@example.com)"),
        ))
    }
}

pub(super) fn smtp(k: &mut Keys) -> Result<SmtpConfig, KeyError> {
    let server = take!(k, server);
    let tls = take!(k, tls);
    let ca_file = take!(k, ca_file);
    let username = take!(k, username);
    let password = take!(k, password);
    let from = take!(k, from);
    let to = take!(k, to);
    let subject = take!(k, subject);
    let body = take!(k, body);
    let batch_max = take!(k, batch_max);
    let batch_wait = take!(k, batch_wait);
    let max_per_hour = take!(k, max_per_hour);
    let alerts_only = take!(k, alerts_only);
    let timeout = take!(k, timeout_s);
    k.no_leftovers()?;
    let server = server.ok_or((
        "server",
        "kind = \"smtp\" needs server = \"smtp://mail.example.com:587\" (or smtps://...:465)"
            .to_string(),
    ))?;
    let url = url::Url::parse(&server).map_err(|e| ("server", format!("not a URL: {e}")))?;
    let implicit = match url.scheme() {
        "smtp" => false,
        "smtps" => true,
        _ => {
            return Err((
                "server",
                format!("{:?} must start with smtp:// or smtps://", redact_url(&url)),
            ))
        }
    };
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or(("server", "has no host".to_string()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = url.port().unwrap_or(if implicit { 465 } else { 587 });
    let tls = match (implicit, tls) {
        (true, None | Some(SmtpTls::Implicit)) => SmtpTls::Implicit,
        (false, None) => SmtpTls::Starttls,
        (false, Some(t @ (SmtpTls::Starttls | SmtpTls::None))) => t,
        (true, Some(t)) => {
            return Err((
                "tls",
                format!(
                    "smtps:// is implicit TLS; tls = {:?} contradicts it",
                    t.name()
                ),
            ))
        }
        (false, Some(SmtpTls::Implicit)) => {
            return Err(("tls", "implicit TLS is written smtps://".into()))
        }
    };
    let credentials = match (username, password) {
        (Some(u), p) => Some((u, p.unwrap_or_else(|| Secret::new("")))),
        (None, Some(_)) => return Err(("password", "set username too".into())),
        (None, None) => None,
    };
    if credentials.is_some() && tls == SmtpTls::None {
        return Err((
            "username",
            "a password is never sent in the clear: use STARTTLS (tls = \"starttls\") or smtps://"
                .into(),
        ));
    }
    let from = from.ok_or((
        "from",
        "kind = \"smtp\" needs from = \"gateway@example.com\"".to_string(),
    ))?;
    address("from", &from)?;
    let to = to.unwrap_or_default();
    if to.is_empty() {
        return Err((
            "to",
            "kind = \"smtp\" needs to = [\"ops@example.com\"]".into(),
        ));
    }
    for a in &to {
        address("to", a)?;
    }
    let batch_max = match batch_max {
        Some(n) if !(1..=1000).contains(&n) => {
            return Err(("batch_max", format!("{n} is not within 1..=1000")))
        }
        Some(n) => n,
        None => d::SMTP_BATCH_MAX,
    };
    let batch_wait = match batch_wait {
        None => d::SMTP_BATCH_WAIT,
        Some(s) => match humantime::parse_duration(&s) {
            Ok(w) if w <= Duration::from_secs(3600) => w,
            Ok(_) => return Err(("batch_wait", format!("{s:?} is more than an hour"))),
            Err(e) => return Err(("batch_wait", format!("{s:?}: {e} (write e.g. \"5s\")"))),
        },
    };
    let max_per_hour = match max_per_hour {
        Some(0) => return Err(("max_per_hour", "must be at least 1".into())),
        Some(n) => n,
        None => d::SMTP_MAX_PER_HOUR,
    };
    let subject = subject.unwrap_or_else(|| d::SMTP_SUBJECT.into());
    crate::streams::smtp::template::check(&subject).map_err(|e| ("subject", e))?;
    if let Some(b) = &body {
        crate::streams::smtp::template::check(b).map_err(|e| ("body", e))?;
    }
    Ok(SmtpConfig {
        host,
        port,
        tls,
        ca_file,
        credentials,
        from,
        to,
        subject,
        body,
        batch_max,
        batch_wait,
        max_per_hour,
        alerts_only: alerts_only.unwrap_or(true),
        timeout: seconds("timeout_s", timeout, d::SMTP_TIMEOUT, 1..=600)?,
    })
}

pub(super) fn print_smtp(t: &mut Table, m: &SmtpConfig) {
    let scheme = if m.tls == SmtpTls::Implicit {
        "smtps"
    } else {
        "smtp"
    };
    t.s("server", format!("{scheme}://{}:{}", m.host, m.port))
        .s("tls", m.tls.name())
        .path("ca_file", &m.ca_file);
    if let Some((user, _)) = &m.credentials {
        t.s("username", user).secret("password");
    }
    t.s("from", &m.from);
    t.0.insert(
        "to".into(),
        toml::Value::Array(
            m.to.iter()
                .map(|a| toml::Value::String(a.clone()))
                .collect(),
        ),
    );
    t.s("subject", &m.subject);
    if let Some(b) = &m.body {
        t.s("body", b);
    }
    t.n("batch_max", m.batch_max as u64)
        .s("batch_wait", humantime::format_duration(m.batch_wait))
        .n("max_per_hour", m.max_per_hour.into())
        .b("alerts_only", m.alerts_only)
        .n("timeout_s", m.timeout.as_secs());
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, StreamKind, WsAck};
    use std::time::Duration;

    fn parse(stream: &str) -> Result<Config, String> {
        Config::parse(&format!("[[stream]]\nname = \"s\"\n{stream}"), "t.toml")
            .map_err(|e| e.to_string())
    }

    #[test]
    fn websocket_keys_defaults_and_errors() {
        let c = parse("kind = \"websocket\"\nurl = \"wss://h.example/x?token=abc\"\nheaders = { \"Authorization\" = \"Bearer s3cret\" }\n").unwrap();
        let StreamKind::WebSocket(w) = &c.streams[0].kind else {
            panic!("not websocket")
        };
        assert_eq!(w.ack, WsAck::Server);
        assert_eq!(
            (w.inflight, w.keep_alive, w.timeout),
            (100, Duration::from_secs(30), Duration::from_secs(30))
        );
        let shown = c.to_toml_masked();
        assert!(
            !shown.contains("s3cret") && !shown.contains("token=abc"),
            "{shown}"
        );
        assert!(shown.contains("ack = \"server\""), "{shown}");
        let e = parse("kind = \"websocket\"\nurl = \"https://h.example/\"\n").unwrap_err();
        assert!(
            e.starts_with("t.toml:") && e.contains("ws:// or wss://"),
            "{e}"
        );
        let e =
            parse("kind = \"websocket\"\nurl = \"ws://h/\"\nheaders = { \"Upgrade\" = \"x\" }\n")
                .unwrap_err();
        assert!(e.contains("set by lorastream"), "{e}");
        let e = parse("kind = \"websocket\"\nurl = \"ws://h/\"\nack = \"never\"\n").unwrap_err();
        assert!(e.contains("never"), "{e}");
        let e =
            parse("kind = \"websocket\"\nurl = \"ws://h/\"\ntopic_prefix = \"x\"\n").unwrap_err();
        assert!(e.contains("not used by kind = \"websocket\""), "{e}");
    }

    #[test]
    fn smtp_keys_defaults_and_errors() {
        let c = parse("kind = \"smtp\"\nserver = \"smtp://mail.example\"\nusername = \"gw\"\npassword = \"pa55-never-shown\"\nfrom = \"gw@example.com\"\nto = [\"ops@example.com\"]\n").unwrap();
        let StreamKind::Smtp(m) = &c.streams[0].kind else {
            panic!("not smtp")
        };
        assert_eq!((m.port, m.tls), (587, crate::config::SmtpTls::Starttls));
        assert_eq!(
            (m.batch_max, m.batch_wait, m.max_per_hour, m.alerts_only),
            (50, Duration::from_secs(5), 20, true)
        );
        assert!(!c.streams[0].takes_records());
        let shown = c.to_toml_masked();
        assert!(!shown.contains("pa55-never-shown"), "{shown}");
        let c = parse("kind = \"smtp\"\nserver = \"smtps://mail.example\"\nfrom = \"gw@example.com\"\nto = [\"ops@example.com\"]\nalerts_only = false\n").unwrap();
        let StreamKind::Smtp(m) = &c.streams[0].kind else {
            panic!("not smtp")
        };
        assert_eq!((m.port, m.tls), (465, crate::config::SmtpTls::Implicit));
        assert!(c.streams[0].takes_records());
        let e = parse("kind = \"smtp\"\nserver = \"smtp://mail.example\"\ntls = \"none\"\nusername = \"u\"\npassword = \"p\"\nfrom = \"gw@example.com\"\nto = [\"ops@example.com\"]\n").unwrap_err();
        assert!(e.contains("never sent in the clear"), "{e}");
        let e = parse("kind = \"smtp\"\nserver = \"smtp://mail.example\"\nfrom = \"gw@example.com\"\nto = [\"not an address\"]\n").unwrap_err();
        assert!(e.contains("`to`"), "{e}");
    }

    /// The commented-out e-mail stream of config.example.toml, uncommented, is valid and shows
    /// the defaults.
    #[test]
    fn example_smtp_block_parses_with_the_defaults() {
        let src = include_str!("../../../config.example.toml");
        let start = src
            .find("# [[stream]]                              # e-mail")
            .expect("the e-mail block");
        let block: String = src[start..]
            .lines()
            .take_while(|l| !l.is_empty())
            .map(|l| format!("{}\n", l.strip_prefix("# ").unwrap_or(l)))
            .collect();
        let block = block.replace("[[stream]]", "");
        let c = Config::parse(&format!("[[stream]]\n{block}"), "t.toml")
            .unwrap_or_else(|e| panic!("{e}\n{block}"));
        let StreamKind::Smtp(m) = &c.streams[0].kind else {
            panic!("not smtp")
        };
        use super::ws_smtp_defaults as d;
        assert_eq!(m.batch_max, d::SMTP_BATCH_MAX);
        assert_eq!(m.batch_wait, d::SMTP_BATCH_WAIT);
        assert_eq!(m.max_per_hour, d::SMTP_MAX_PER_HOUR);
        assert_eq!(m.subject, d::SMTP_SUBJECT);
        assert_eq!(m.timeout, d::SMTP_TIMEOUT);
        assert!(m.alerts_only);
    }
}
