//! `[[stream]]`: one typed settings struct per kind, with every default in [`defaults`].
//!
//! A `[[stream]]` table is read into [`RawStream`] (every kind's keys, all optional, unknown keys
//! refused by serde), then [`build`] hands it to its kind's builder, which *takes* the keys it
//! uses; a key left over belongs to another kind and is an error naming the keys the kind does
//! take. The list of a kind's keys is therefore its builder, not a second list to keep in step.
//!
//! What comes out ([`StreamConfig`], [`StreamKind`]) holds parsed values only: URLs, durations,
//! enums for every closed set, the effective client id. [`StreamConfig::effective`] prints it
//! for `lorastream check`, defaults included, secrets as `***`, URLs without credentials.

use super::locate::Source;
use super::{ConfigError, WhenFull};
use crate::model::{redact_url, Eui64, Scope, Secret};
use crate::streams::format::template::{Sample, Template};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Every stream default, in one place (README and config.example.toml show the same values).
pub mod defaults {
    use std::time::Duration;

    /// MQTT (and AWS IoT): unacknowledged QoS 1 publishes.
    pub const MQTT_INFLIGHT: u16 = 100;
    pub const MQTT_KEEP_ALIVE: Duration = Duration::from_secs(30);
    /// A PUBACK, SUBACK or PINGRESP missing this long means the broker hangs: reconnect.
    pub const MQTT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
    pub const TOPIC_PREFIX: &str = "lorastream";
    /// Azure IoT Hub: SAS token lifetime (the Azure SDKs use one hour too); renewed at 80 %.
    pub const AZURE_SAS_TTL: Duration = Duration::from_secs(3600);
    /// Per-device connections without traffic this long are closed.
    pub const AZURE_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
    pub const AZURE_MAX_CONNECTIONS: usize = 100;
    /// Unacknowledged publishes per connection.
    pub const AZURE_INFLIGHT: u16 = 32;
    /// IoT Hub allows keep-alives up to 1767 s; shorter detects a dead link sooner.
    pub const AZURE_KEEP_ALIVE: Duration = Duration::from_secs(60);
    pub const AZURE_DEVICE_ID: &str = "{device}";
    /// IoT Hub device-stream tunnels (`tunnel_ports`): closed after this long without a byte
    /// either way.
    pub const AZURE_TUNNEL_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
    /// Tunnels open at once; a request beyond it is refused.
    pub const AZURE_TUNNEL_MAX: usize = 4;
    /// HTTP: uplinks per POST (contract).
    pub const HTTP_BATCH_MAX: usize = 100;
    /// How long a short batch waits to fill.
    pub const HTTP_BATCH_WAIT: Duration = Duration::from_millis(200);
    /// Request timeout (connect + send + response body).
    pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
    /// `poll_url` period.
    pub const HTTP_POLL_INTERVAL: Duration = Duration::from_secs(30);
    /// `format = "template"`: the type of the rendered bodies when `content_type` is not set
    /// (HTTP `Content-Type`, IoT Hub `$.ct`). Set `content_type` for JSON or CSV templates.
    pub const TEMPLATE_CONTENT_TYPE: &str = "text/plain; charset=utf-8";
    /// Largest `template_file` read.
    pub const TEMPLATE_MAX_BYTES: u64 = 1024 * 1024;
}

/// The `kind` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub(super) enum Kind {
    #[default]
    Mqtt,
    AzureIotHub,
    AwsIot,
    Http,
    File,
    Stdout,
    Websocket,
    Smtp,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Mqtt => "mqtt",
            Kind::AzureIotHub => "azure-iot-hub",
            Kind::AwsIot => "aws-iot",
            Kind::Http => "http",
            Kind::File => "file",
            Kind::Stdout => "stdout",
            Kind::Websocket => "websocket",
            Kind::Smtp => "smtp",
        }
    }
}

/// The `format` key: the layout of a stream's messages (docs/formats.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// The Things Stack v3 message layouts.
    #[default]
    Tts,
    /// ChirpStack v4 integration events (protobuf JSON) and MQTT topics.
    #[serde(rename = "chirpstack")]
    ChirpStack,
    /// The `tts` messages as XML documents.
    Xml,
    /// Bodies rendered by a Jinja-style template (`template_file`) from the `tts` JSON.
    Template,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Tts => "tts",
            Format::ChirpStack => "chirpstack",
            Format::Xml => "xml",
            Format::Template => "template",
        }
    }
}

/// A stream's format with its settings, checked at load.
#[derive(Debug, Clone, PartialEq)]
pub enum FormatConfig {
    Tts,
    ChirpStack,
    Xml,
    Template(TemplateConfig),
}

impl FormatConfig {
    pub fn kind(&self) -> Format {
        match self {
            FormatConfig::Tts => Format::Tts,
            FormatConfig::ChirpStack => Format::ChirpStack,
            FormatConfig::Xml => Format::Xml,
            FormatConfig::Template(_) => Format::Template,
        }
    }
}

/// `format = "template"`: the template, compiled and checked when the file is loaded.
#[derive(Debug, Clone)]
pub struct TemplateConfig {
    pub file: PathBuf,
    /// `content_type`: HTTP `Content-Type` and IoT Hub `$.ct` of the bodies.
    pub content_type: String,
    pub template: Arc<Template>,
}

impl PartialEq for TemplateConfig {
    fn eq(&self, o: &Self) -> bool {
        self.file == o.file
            && self.content_type == o.content_type
            && self.template.source() == o.template.source()
    }
}

/// Declares [`RawStream`] with the kind-specific keys as options, and the list of those that
/// are set (for the "not used by this kind" check), from one list.
macro_rules! raw_stream {
    ($($(#[$doc:meta])* $key:ident : $ty:ty),* $(,)?) => {
        /// One `[[stream]]` as written.
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(super) struct RawStream {
            name: String,
            #[serde(default)]
            kind: Kind,
            // Scope: at most one of these.
            application: Option<String>,
            device: Option<String>,
            /// A gateway EUI, or "*" for every gateway: raw frames, known device or not.
            gateway: Option<String>,
            #[serde(default)]
            format: Format,
            /// `format = "template"`: the template file, and the type of what it renders.
            template_file: Option<PathBuf>,
            content_type: Option<String>,
            downlinks: Option<bool>,
            /// Per-stream override of `[storage] when_full`.
            when_full: Option<WhenFull>,
            $( $(#[$doc])* #[serde(default)] $key: Option<$ty>, )*
        }

        impl RawStream {
            /// Kind-specific keys that are set.
            fn set_keys(&self) -> Vec<&'static str> {
                let mut v = Vec::new();
                $( if self.$key.is_some() { v.push(stringify!($key)); } )*
                v
            }
        }
    };
}

raw_stream! {
    // mqtt, aws-iot, azure-iot-hub
    server: String,
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
    username: String,
    password: Secret,
    client_id: String,
    /// MQTT clean session: false (default) keeps the broker's session (subscriptions and the
    /// QoS 1 downlinks published while lorastream was away) across reconnects and restarts.
    clean_session: bool,
    /// Take remote commands on `{prefix}/gateways/{eui}/command/{name}` (default false).
    commands: bool,
    topic_prefix: String,
    inflight: u16,
    keep_alive_s: u64,
    response_timeout_s: u64,
    // file
    path: PathBuf,
    // aws-iot
    shadow: bool,
    // http
    url: String,
    headers: BTreeMap<String, Secret>,
    batch_max: usize,
    batch_wait_ms: u64,
    timeout_s: u64,
    on_client_error: OnClientError,
    poll_url: String,
    poll_interval_s: u64,
    // azure-iot-hub
    hostname: String,
    identity: IdentityKind,
    device_id: String,
    policy_name: String,
    policy_key: Secret,
    device_key: Secret,
    device_keys: BTreeMap<String, Secret>,
    sas_ttl_s: u64,
    idle_timeout_s: u64,
    max_connections: usize,
    downlink_format: DownlinkFormat,
    twin: bool,
    /// Local TCP ports reachable through IoT Hub device streams (identity = "gateway").
    tunnel_ports: Vec<u32>,
    tunnel_idle_timeout_s: u64,
    tunnel_max: usize,
    // websocket, smtp: see transports.rs
    ack: transports::WsAck,
    from: String,
    to: Vec<String>,
    subject: String,
    body: String,
    tls: transports::SmtpTls,
    max_per_hour: u32,
    batch_wait: String,
    alerts_only: bool,
}

/// A kind builder's error: the key and what is wrong with it.
type KeyError = (&'static str, String);

/// The raw table while a kind builder takes its keys; records which keys the kind asked for.
struct Keys {
    raw: RawStream,
    asked: Vec<&'static str>,
}

/// Take a kind-specific key out of the raw table (recording that the kind uses it).
macro_rules! take {
    ($k:expr, $f:ident) => {{
        $k.asked.push(stringify!($f));
        $k.raw.$f.take()
    }};
}

/// The WebSocket and SMTP kinds (their settings, builders and printing).
mod transports;
pub use transports::{SmtpConfig, SmtpTls, WebSocketConfig, WsAck};

impl Keys {
    /// After a builder took its keys: any other kind-specific key set is misplaced.
    fn no_leftovers(&self) -> Result<(), KeyError> {
        match self.raw.set_keys().first() {
            None => Ok(()),
            Some(k) => Err((
                k,
                format!(
                    "not used by kind = {:?} (it takes: {})",
                    self.raw.kind.name(),
                    if self.asked.is_empty() {
                        "no extra keys".to_string()
                    } else {
                        self.asked.join(", ")
                    }
                ),
            )),
        }
    }
}

/// What the builders need from the rest of the file.
pub(super) struct Context {
    pub gateway_eui: Option<Eui64>,
    pub when_full: WhenFull,
}

/// One `[[stream]]`, typed.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamConfig {
    pub name: String,
    pub scope: Scope,
    pub format: FormatConfig,
    /// Take downlinks from this stream's destination.
    pub downlinks: bool,
    /// `when_full` of this stream's queue (its own, or `[storage] when_full`).
    pub when_full: WhenFull,
    pub kind: StreamKind,
}

/// The kind of a stream, with its settings.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamKind {
    Mqtt(MqttConfig),
    AwsIot(AwsConfig),
    AzureIotHub(Box<AzureConfig>),
    Http(Box<HttpConfig>),
    File { path: PathBuf },
    Stdout,
    WebSocket(Box<WebSocketConfig>),
    Smtp(Box<SmtpConfig>),
}

impl StreamKind {
    pub fn name(&self) -> &'static str {
        match self {
            StreamKind::Mqtt(_) => "mqtt",
            StreamKind::AwsIot(_) => "aws-iot",
            StreamKind::AzureIotHub(_) => "azure-iot-hub",
            StreamKind::Http(_) => "http",
            StreamKind::File { .. } => "file",
            StreamKind::Stdout => "stdout",
            StreamKind::WebSocket(_) => "websocket",
            StreamKind::Smtp(_) => "smtp",
        }
    }
}

/// How an MQTT client reaches its broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `mqtt://`
    Tcp,
    /// `mqtts://`
    Tls,
    /// `ws://` (MQTT over WebSocket)
    Ws,
    /// `wss://`
    Wss,
}

impl Transport {
    pub fn is_tls(self) -> bool {
        matches!(self, Transport::Tls | Transport::Wss)
    }
}

/// A broker URL: `mqtt://`, `mqtts://`, `ws://` or `wss://`. Prints without credentials or
/// query ([`crate::model::redact_url`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    url: url::Url,
    transport: Transport,
}

impl ServerUrl {
    pub fn parse(s: &str) -> Result<ServerUrl, String> {
        let url = url::Url::parse(s)
            .map_err(|e| format!("{:?}: {e}", crate::model::redact_url_str(s)))?;
        let transport = match url.scheme() {
            "mqtt" => Transport::Tcp,
            "mqtts" => Transport::Tls,
            "ws" => Transport::Ws,
            "wss" => Transport::Wss,
            other => {
                return Err(format!(
                    "scheme {other:?} is not mqtt://, mqtts://, ws:// or wss://"
                ))
            }
        };
        if url.host_str().is_none_or(str::is_empty) {
            return Err(format!("{:?} has no host", redact_url(&url)));
        }
        Ok(ServerUrl { url, transport })
    }

    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The URL as configured (with credentials: only for the connection itself).
    pub fn url(&self) -> &url::Url {
        &self.url
    }

    /// Host name or address (IPv6 without brackets).
    pub fn host(&self) -> &str {
        self.url
            .host_str()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
    }

    /// The port, or the scheme's default (1883, 8883, 80, 443).
    pub fn port(&self) -> u16 {
        self.url.port().unwrap_or(match self.transport {
            Transport::Tcp => 1883,
            Transport::Tls => 8883,
            Transport::Ws => 80,
            Transport::Wss => 443,
        })
    }
}

impl std::fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url(&self.url))
    }
}

/// A client certificate and its private key (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// TLS files of a stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsFiles {
    /// Added to the trusted roots (or, for AWS IoT, replacing Amazon Root CA 1).
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<ClientCert>,
}

/// `kind = "mqtt"` (and the MQTT side of `aws-iot`).
#[derive(Debug, Clone, PartialEq)]
pub struct MqttConfig {
    pub server: ServerUrl,
    pub tls: TlsFiles,
    /// `username` and `password`.
    pub credentials: Option<(String, Secret)>,
    pub client_id: ClientId,
    /// MQTT clean session (false: a persistent session, the default).
    pub clean_session: bool,
    /// Remote commands on `{prefix}/gateways/{eui}/command/{name}` (`commands = true`).
    pub commands: bool,
    pub topic_prefix: String,
    pub inflight: u16,
    pub keep_alive: Duration,
    /// A request (publish, subscribe, keep-alive ping) unanswered this long, with nothing else
    /// heard from the broker meanwhile, ends the connection (a hung broker).
    pub response_timeout: Duration,
}

/// An MQTT client id.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientId {
    /// `client_id` as configured.
    Set(String),
    /// Not configured: `lorastream-{gateway eui or hostname}-{stream}` (this field), followed
    /// at start by `-` and the instance id kept in the store directory
    /// ([`crate::daemon::instance`]), so two gateways never share one even when they share a
    /// host name and a copied EUI, and one gateway keeps its id (and broker session) across
    /// restarts.
    Derived(String),
}

impl ClientId {
    /// The id to connect with, given this installation's instance id.
    pub fn resolve(&self, instance: &str) -> String {
        match self {
            ClientId::Set(id) => id.clone(),
            ClientId::Derived(base) => format!("{base}-{instance}"),
        }
    }
}

/// `kind = "aws-iot"`: MQTT with AWS IoT Core's rules (thing certificate, Amazon Root CA 1).
#[derive(Debug, Clone, PartialEq)]
pub struct AwsConfig {
    pub mqtt: MqttConfig,
    /// Also update the thing shadow with last-seen data (rate-limited).
    pub shadow: bool,
}

/// `identity` of an Azure IoT Hub stream, as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub(super) enum IdentityKind {
    #[default]
    Device,
    Gateway,
}

/// A hub shared-access policy with DeviceConnect (signs for every device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyKey {
    pub name: String,
    pub key: Secret,
}

/// The key a gateway identity signs its SAS tokens with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AzureKey {
    Device(Secret),
    Policy(PolicyKey),
}

#[derive(Debug, Clone, PartialEq)]
pub enum AzureIdentity {
    /// One IoT Hub device for the whole gateway.
    Gateway { device_id: String, key: AzureKey },
    /// One IoT Hub device per LoRaWAN device, named by `device_id` (`{device}`, `{dev_eui}`).
    Device {
        device_id: String,
        policy: Option<PolicyKey>,
        /// Keyed by LoRaWAN device id or IoT Hub device id.
        device_keys: BTreeMap<String, Secret>,
        idle_timeout: Duration,
        max_connections: usize,
    },
}

/// Cloud-to-device message bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DownlinkFormat {
    /// The contract's downlink JSON.
    #[default]
    Json,
    /// The payload itself; `fPort` (and `confirmed`) as message properties.
    Raw,
}

/// `kind = "azure-iot-hub"`.
#[derive(Debug, Clone, PartialEq)]
pub struct AzureConfig {
    /// `{hub}.azure-devices.net`: in the username and the SAS resource.
    pub hostname: String,
    /// Effective: `server`, or `mqtts://{hostname}:8883`; a `wss://` URL gets IoT Hub's path.
    pub server: ServerUrl,
    /// Added to the built-in Azure roots.
    pub ca_file: Option<PathBuf>,
    pub identity: AzureIdentity,
    pub inflight: u16,
    pub keep_alive: Duration,
    pub sas_ttl: Duration,
    pub downlink_format: DownlinkFormat,
    pub twin: bool,
    /// Remote commands as direct methods of the gateway's device (`commands = true`).
    pub commands: bool,
    /// Remote access through IoT Hub device streams (`tunnel_ports`; empty = off).
    pub tunnel: TunnelConfig,
}

/// `tunnel_ports` and its limits: device streams of the gateway's IoT Hub device proxied to
/// `127.0.0.1:<port>`.
#[derive(Debug, Clone, PartialEq)]
pub struct TunnelConfig {
    /// Allowed local ports, sorted, no duplicates; empty: no device streams accepted.
    pub ports: Vec<u16>,
    pub idle_timeout: Duration,
    pub max: usize,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        TunnelConfig {
            ports: Vec::new(),
            idle_timeout: defaults::AZURE_TUNNEL_IDLE_TIMEOUT,
            max: defaults::AZURE_TUNNEL_MAX,
        }
    }
}

/// What an HTTP stream does with a 4xx (other than 408/413/429).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnClientError {
    /// Keep the batch and retry (the server or its credentials get fixed).
    #[default]
    Retry,
    /// Drop the batch, counted as dead letters.
    Drop,
}

/// `poll_url` and its period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollConfig {
    pub url: url::Url,
    pub interval: Duration,
}

/// `kind = "http"`.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    pub url: url::Url,
    pub headers: BTreeMap<String, Secret>,
    pub batch_max: usize,
    pub batch_wait: Duration,
    pub timeout: Duration,
    pub on_client_error: OnClientError,
    pub poll: Option<PollConfig>,
    pub tls: TlsFiles,
}

/// Type one `[[stream]]`.
pub(super) fn build(
    mut raw: RawStream,
    ctx: &Context,
    span: &Range<usize>,
    src: &Source,
) -> Result<StreamConfig, ConfigError> {
    let label = format!("[[stream]] {:?}: ", raw.name);
    let err = |(key, message): KeyError| src.entry_error(span, label.clone(), key, message);
    let name = raw.name.clone();
    if name.is_empty() || name.contains(['/', '\0']) {
        return Err(err(("name", "must be non-empty and contain no '/'".into())));
    }
    let scope = scope(&raw).map_err(err)?;
    let (kind_name, when_full) = (raw.kind, raw.when_full.unwrap_or(ctx.when_full));
    let format = format(
        raw.format,
        raw.template_file.take(),
        raw.content_type.take(),
        &scope,
        kind_name,
    )
    .map_err(err)?;
    let downlinks = raw.downlinks.unwrap_or(true);
    let mut k = Keys {
        raw,
        asked: Vec::new(),
    };
    let kind = match kind_name {
        Kind::Mqtt => StreamKind::Mqtt(mqtt(&mut k, ctx, &name).map_err(err)?),
        Kind::AwsIot => StreamKind::AwsIot(aws(&mut k, &name, ctx).map_err(err)?),
        Kind::AzureIotHub => StreamKind::AzureIotHub(Box::new(azure(&mut k, &scope).map_err(err)?)),
        Kind::Http => StreamKind::Http(Box::new(http(&mut k, downlinks).map_err(err)?)),
        Kind::File => {
            let path = take!(k, path);
            k.no_leftovers().map_err(err)?;
            let path = path.ok_or_else(|| err(("path", "kind = \"file\" needs path".into())))?;
            StreamKind::File { path }
        }
        Kind::Stdout => {
            k.no_leftovers().map_err(err)?;
            StreamKind::Stdout
        }
        Kind::Websocket => {
            StreamKind::WebSocket(Box::new(transports::websocket(&mut k).map_err(err)?))
        }
        Kind::Smtp => StreamKind::Smtp(Box::new(transports::smtp(&mut k).map_err(err)?)),
    };
    Ok(StreamConfig {
        name,
        scope,
        format,
        downlinks,
        when_full,
        kind,
    })
}

/// The format and, for templates, the template: read, compiled and checked now, so that a bad
/// template fails `lorastream check` (and the start) rather than the first uplink. Formats
/// that make no sense for the stream's scope are refused.
fn format(
    f: Format,
    template_file: Option<PathBuf>,
    content_type: Option<String>,
    scope: &Scope,
    kind: Kind,
) -> Result<FormatConfig, KeyError> {
    if f != Format::Template {
        if template_file.is_some() {
            return Err((
                "template_file",
                format!(
                    "is only used with format = \"template\" (this stream has format = {:?})",
                    f.name()
                ),
            ));
        }
        if content_type.is_some() {
            return Err((
                "content_type",
                format!(
                    "is only used with format = \"template\"; format = {:?} sends {}",
                    f.name(),
                    if f == Format::Xml {
                        "application/xml"
                    } else {
                        "application/json"
                    }
                ),
            ));
        }
    }
    Ok(match f {
        Format::Tts => FormatConfig::Tts,
        Format::Xml => FormatConfig::Xml,
        Format::ChirpStack => {
            if matches!(scope, Scope::Gateway(_)) {
                return Err((
                    "format",
                    "ChirpStack's integration events are about devices; raw gateway frames have none: use format = \"tts\" or \"xml\" for a gateway-scoped stream".into(),
                ));
            }
            FormatConfig::ChirpStack
        }
        Format::Template => {
            let Some(file) = template_file else {
                return Err((
                    "template_file",
                    "format = \"template\" needs template_file = \"/etc/lorastream/<name>.j2\" (a Jinja-style template; see docs/formats.md)".into(),
                ));
            };
            if content_type.is_some() && !matches!(kind, Kind::Http | Kind::AzureIotHub) {
                return Err((
                    "content_type",
                    format!(
                        "has no effect on kind = {:?}: only http (Content-Type) and azure-iot-hub ($.ct) streams send a content type",
                        kind.name()
                    ),
                ));
            }
            let content_type = match content_type {
                Some(c) => check_content_type(&c).map(|()| c),
                None => Ok(defaults::TEMPLATE_CONTENT_TYPE.to_string()),
            }
            .map_err(|m| ("content_type", m))?;
            let source = read_template(&file).map_err(|m| ("template_file", m))?;
            let sample = match scope {
                Scope::Gateway(_) => Sample::GatewayFrame,
                _ => Sample::Uplink,
            };
            let template = Template::compile_for(&file.display().to_string(), &source, sample)
                .map_err(|e| ("template_file", e.to_string()))?;
            FormatConfig::Template(TemplateConfig {
                file,
                content_type,
                template: Arc::new(template),
            })
        }
    })
}

/// The template's text, up to [`defaults::TEMPLATE_MAX_BYTES`].
fn read_template(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read;
    let f =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut text = String::new();
    f.take(defaults::TEMPLATE_MAX_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if text.len() as u64 > defaults::TEMPLATE_MAX_BYTES {
        return Err(format!(
            "{} is larger than {} bytes",
            path.display(),
            defaults::TEMPLATE_MAX_BYTES
        ));
    }
    Ok(text)
}

/// A media type as HTTP and IoT Hub take it: `type/subtype` (RFC 9110 §8.3.1 tokens), then
/// optional `; name=value` parameters, no control characters.
fn check_content_type(c: &str) -> Result<(), String> {
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    let media = c.split(';').next().unwrap_or_default().trim();
    let ok = c.bytes().all(|b| (0x20..0x7f).contains(&b) || b == b'\t')
        && media
            .split_once('/')
            .is_some_and(|(t, s)| token(t) && token(s));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{c:?} is not a media type like \"application/json\" or \"text/csv; charset=utf-8\""
        ))
    }
}

fn scope(raw: &RawStream) -> Result<Scope, KeyError> {
    match (&raw.application, &raw.device, &raw.gateway) {
        (None, None, None) => Ok(Scope::All),
        (Some(a), None, None) => Ok(Scope::Application(a.clone())),
        (None, Some(d), None) => Ok(Scope::Device(d.clone())),
        (None, None, Some(g)) if g == "*" => Ok(Scope::Gateway(None)),
        (None, None, Some(g)) => {
            g.parse::<Eui64>()
                .map(|e| Scope::Gateway(Some(e)))
                .map_err(|_| {
                    (
                        "gateway",
                        format!("{g:?} is not a gateway EUI (16 hex digits) or \"*\""),
                    )
                })
        }
        _ => Err((
            "application",
            "set at most one of application, device, gateway".into(),
        )),
    }
}

fn client_cert(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<Option<ClientCert>, KeyError> {
    match (cert, key) {
        (Some(cert_file), Some(key_file)) => Ok(Some(ClientCert {
            cert_file,
            key_file,
        })),
        (None, None) => Ok(None),
        _ => Err(("cert_file", "cert_file and key_file go together".into())),
    }
}

fn topic_prefix(p: Option<String>) -> Result<String, KeyError> {
    let p = p.unwrap_or_else(|| defaults::TOPIC_PREFIX.into());
    if p.is_empty() || p.contains(['+', '#']) || p.ends_with('/') {
        return Err((
            "topic_prefix",
            "must be non-empty, without '+', '#' or a trailing '/'".into(),
        ));
    }
    Ok(p)
}

fn inflight(n: Option<u16>, default: u16) -> Result<u16, KeyError> {
    match n {
        Some(0) => Err(("inflight", "must be at least 1".into())),
        Some(n) => Ok(n),
        None => Ok(default),
    }
}

/// MQTT keep-alive: at least 5 s (rumqttc and brokers want whole seconds, and 0 would turn off
/// the detection of a dead connection), at most MQTT's 65535 s (`max`: a cloud's own cap).
fn keep_alive(s: Option<u64>, default: Duration, max: u64) -> Result<Duration, KeyError> {
    match s {
        None => Ok(default),
        Some(s) if (5..=max).contains(&s) => Ok(Duration::from_secs(s)),
        Some(_) => Err(("keep_alive_s", format!("must be 5 to {max} seconds"))),
    }
}

/// `response_timeout_s`: 1 s to an hour.
fn response_timeout(s: Option<u64>) -> Result<Duration, KeyError> {
    match s {
        None => Ok(defaults::MQTT_RESPONSE_TIMEOUT),
        Some(s) if (1..=3600).contains(&s) => Ok(Duration::from_secs(s)),
        Some(_) => Err(("response_timeout_s", "must be 1 to 3600 seconds".into())),
    }
}

/// `commands = true` needs the gateway's EUI: the command topics name it.
fn commands_need_eui(commands: Option<bool>, ctx: &Context) -> Result<bool, KeyError> {
    match commands {
        Some(true) if ctx.gateway_eui.is_none() => Err((
            "commands",
            "needs [gateway] eui: the command topics are {topic_prefix}/gateways/{eui}/command/{name}".into(),
        )),
        c => Ok(c.unwrap_or(false)),
    }
}

/// `lorastream-{gateway eui or hostname}-{stream}` (the instance id is added at start).
fn default_client_id(ctx: &Context, stream: &str) -> String {
    let who = ctx
        .gateway_eui
        .map(|e| e.to_lower_hex())
        .unwrap_or_else(hostname);
    format!("lorastream-{who}-{stream}")
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "gateway".into())
}

fn mqtt(k: &mut Keys, ctx: &Context, name: &str) -> Result<MqttConfig, KeyError> {
    let server = take!(k, server);
    let ca_file = take!(k, ca_file);
    let cert_file = take!(k, cert_file);
    let key_file = take!(k, key_file);
    let username = take!(k, username);
    let password = take!(k, password);
    let client_id = take!(k, client_id);
    let clean_session = take!(k, clean_session);
    let commands = take!(k, commands);
    let prefix = take!(k, topic_prefix);
    let window = take!(k, inflight);
    let keep = take!(k, keep_alive_s);
    let response = take!(k, response_timeout_s);
    k.no_leftovers()?;
    let server = server.unwrap_or_default();
    let server = ServerUrl::parse(&server).map_err(|e| {
        (
            "server",
            format!("{e}; it must start with mqtt://, mqtts://, ws:// or wss://"),
        )
    })?;
    let credentials = match (username, password) {
        (Some(u), p) => Some((u, p.unwrap_or_else(|| Secret::new("")))),
        (None, Some(_)) => return Err(("password", "set username too".into())),
        (None, None) => None,
    };
    Ok(MqttConfig {
        server,
        tls: TlsFiles {
            ca_file,
            client_cert: client_cert(cert_file, key_file)?,
        },
        credentials,
        client_id: match client_id.filter(|c| !c.is_empty()) {
            Some(id) => ClientId::Set(id),
            None => ClientId::Derived(default_client_id(ctx, name)),
        },
        clean_session: clean_session.unwrap_or(false),
        commands: commands_need_eui(commands, ctx)?,
        topic_prefix: topic_prefix(prefix)?,
        inflight: inflight(window, defaults::MQTT_INFLIGHT)?,
        keep_alive: keep_alive(keep, defaults::MQTT_KEEP_ALIVE, 65_535)?,
        response_timeout: response_timeout(response)?,
    })
}

/// AWS IoT Core: TLS with a client certificate, a thing name as client id.
fn aws(k: &mut Keys, _name: &str, ctx: &Context) -> Result<AwsConfig, KeyError> {
    let server = take!(k, server);
    let ca_file = take!(k, ca_file);
    let cert_file = take!(k, cert_file);
    let key_file = take!(k, key_file);
    let client_id = take!(k, client_id);
    let clean_session = take!(k, clean_session);
    let commands = take!(k, commands);
    let prefix = take!(k, topic_prefix);
    let window = take!(k, inflight);
    let keep = take!(k, keep_alive_s);
    let response = take!(k, response_timeout_s);
    let shadow = take!(k, shadow);
    k.no_leftovers()?;
    let s = server.unwrap_or_default();
    let server = ServerUrl::parse(&s)
        .ok()
        .filter(|u| u.transport() == Transport::Tls)
        .ok_or_else(|| {
            (
                "server",
                format!(
                    "{:?}: AWS IoT needs mqtts://<prefix>-ats.iot.<region>.amazonaws.com:8883 (or :443)",
                    crate::model::redact_url_str(&s)
                ),
            )
        })?;
    let client_cert = client_cert(cert_file, key_file)?.ok_or((
        "cert_file",
        "AWS IoT needs cert_file and key_file (the thing's certificate and key)".to_string(),
    ))?;
    let client_id = client_id.filter(|c| !c.is_empty()).ok_or((
        "client_id",
        "AWS IoT needs client_id = the thing name".to_string(),
    ))?;
    Ok(AwsConfig {
        mqtt: MqttConfig {
            server,
            tls: TlsFiles {
                ca_file,
                client_cert: Some(client_cert),
            },
            credentials: None,
            client_id: ClientId::Set(client_id),
            clean_session: clean_session.unwrap_or(false),
            commands: commands_need_eui(commands, ctx)?,
            topic_prefix: topic_prefix(prefix)?,
            inflight: inflight(window, defaults::MQTT_INFLIGHT)?,
            keep_alive: keep_alive(keep, defaults::MQTT_KEEP_ALIVE, 65_535)?,
            response_timeout: response_timeout(response)?,
        },
        shadow: shadow.unwrap_or(false),
    })
}

/// Base64 key as the Azure portal shows it.
fn azure_key(key: &'static str, v: &Secret) -> Result<(), KeyError> {
    use base64::Engine;
    match base64::engine::general_purpose::STANDARD.decode(v.expose().trim()) {
        Ok(k) if !k.is_empty() => Ok(()),
        _ => Err((
            key,
            "is not a base64 key; copy the primary key from the Azure portal".to_string(),
        )),
    }
}

/// Why `id` cannot be an IoT Hub device id (Azure IoT Hub docs, "Device identity properties":
/// up to 128 characters, ASCII letters and digits and `- . % _ * ? ! ( ) , : = @ $ '`).
pub(crate) fn azure_device_id_error(id: &str) -> Option<String> {
    if id.is_empty() || id.len() > 128 {
        return Some(format!(
            "IoT Hub device id {id:?} must have 1 to 128 characters"
        ));
    }
    id.chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-.%_*?!(),:=@$'".contains(*c)))
        .map(|c| {
            format!(
                "IoT Hub device id {id:?} contains {c:?}; IoT Hub allows letters, digits and - . % _ * ? ! ( ) , : = @ $ '"
            )
        })
}

/// The IoT Hub device id of a LoRaWAN device: `template` with `{device}` (its id in this file)
/// and `{dev_eui}` (16 upper-case hex digits) replaced.
pub fn azure_device_id(template: &str, device: &str, dev_eui: Eui64) -> String {
    template
        .replace("{device}", device)
        .replace("{dev_eui}", &dev_eui.to_string())
}

/// Azure IoT Hub: hostname, TLS server, identity mode and its keys, limits. Checks that need
/// the devices in scope (device ids, a key for each) are in `validate.rs`.
fn azure(k: &mut Keys, scope: &Scope) -> Result<AzureConfig, KeyError> {
    let server = take!(k, server);
    let ca_file = take!(k, ca_file);
    let hostname = take!(k, hostname);
    let identity = take!(k, identity);
    let device_id = take!(k, device_id);
    let policy_name = take!(k, policy_name);
    let policy_key = take!(k, policy_key);
    let device_key = take!(k, device_key);
    let device_keys = take!(k, device_keys);
    let window = take!(k, inflight);
    let keep = take!(k, keep_alive_s);
    let sas_ttl = take!(k, sas_ttl_s);
    let idle = take!(k, idle_timeout_s);
    let max_connections = take!(k, max_connections);
    let downlink_format = take!(k, downlink_format);
    let twin = take!(k, twin);
    let commands = take!(k, commands);
    let tunnel_ports = take!(k, tunnel_ports);
    let tunnel_idle = take!(k, tunnel_idle_timeout_s);
    let tunnel_max = take!(k, tunnel_max);
    k.no_leftovers()?;
    let tunnel = tunnel_config(tunnel_ports, tunnel_idle, tunnel_max)?;

    let host = hostname.unwrap_or_default();
    if host.is_empty() || host.contains(['/', ':', ' ']) {
        return Err((
            "hostname",
            format!("{host:?}: set hostname = \"<hub>.azure-devices.net\" (the hub's host name, no scheme or port)"),
        ));
    }
    let mut s = server.unwrap_or_else(|| format!("mqtts://{host}:8883"));
    // MQTT over WebSocket lives at this path (IoT Hub MQTT docs, "Using the MQTT protocol
    // directly ... over WebSockets").
    if let Ok(u) = url::Url::parse(&s) {
        if u.scheme() == "wss" && (u.path().is_empty() || u.path() == "/") {
            s = format!("{}/$iothub/websocket", s.trim_end_matches('/'));
        }
    }
    let server = ServerUrl::parse(&s)
        .ok()
        .filter(|u| u.transport().is_tls())
        .ok_or_else(|| {
            (
                "server",
                format!("{:?}: IoT Hub needs TLS: mqtts://{host}:8883 or wss://{host}/$iothub/websocket", crate::model::redact_url_str(&s)),
            )
        })?;
    let policy = match (policy_name, policy_key) {
        (Some(name), Some(key)) => {
            azure_key("policy_key", &key)?;
            Some(PolicyKey { name, key })
        }
        (None, None) => None,
        _ => return Err((
            "policy_name",
            "policy_name and policy_key go together (a hub shared-access policy with DeviceConnect)".into(),
        )),
    };
    if let Some(k) = &device_key {
        azure_key("device_key", k)?;
    }
    for v in device_keys.iter().flat_map(|m| m.values()) {
        azure_key("device_keys", v)?;
    }
    let sas_ttl = match sas_ttl {
        Some(t) if t < 2 => return Err(("sas_ttl_s", "must be at least 2 (seconds)".into())),
        Some(t) => Duration::from_secs(t),
        None => defaults::AZURE_SAS_TTL,
    };
    let identity = match identity.unwrap_or_default() {
        IdentityKind::Gateway => {
            let id = device_id.unwrap_or_default();
            if id.is_empty() || id.contains(['{', '}']) {
                return Err((
                    "device_id",
                    "identity = \"gateway\" needs device_id = the IoT Hub device id of this gateway (no placeholders)".into(),
                ));
            }
            if let Some(e) = azure_device_id_error(&id) {
                return Err(("device_id", e));
            }
            if device_keys.is_some() {
                return Err((
                    "device_keys",
                    "is only used with identity = \"device\"".into(),
                ));
            }
            if idle.is_some() {
                return Err((
                    "idle_timeout_s",
                    "is only used with identity = \"device\"".into(),
                ));
            }
            if max_connections.is_some() {
                return Err((
                    "max_connections",
                    "is only used with identity = \"device\"".into(),
                ));
            }
            let key = match (device_key, policy) {
                (Some(k), _) => AzureKey::Device(k),
                (None, Some(p)) => AzureKey::Policy(p),
                (None, None) => return Err((
                    "device_key",
                    "identity = \"gateway\" needs device_key (the IoT Hub device's primary key) or policy_name + policy_key".into(),
                )),
            };
            AzureIdentity::Gateway { device_id: id, key }
        }
        IdentityKind::Device => {
            if commands == Some(true) {
                return Err((
                    "commands",
                    "remote commands are IoT Hub direct methods of the gateway's own device: use identity = \"gateway\"".into(),
                ));
            }
            if !tunnel.ports.is_empty() {
                return Err((
                    "tunnel_ports",
                    "device streams go to the IoT Hub device that asks for them, the gateway's own: use identity = \"gateway\"".into(),
                ));
            }
            if matches!(scope, Scope::Gateway(_)) {
                return Err((
                    "identity",
                    "raw gateway frames have no LoRaWAN device: use identity = \"gateway\" for a gateway-scoped stream".into(),
                ));
            }
            if device_key.is_some() {
                return Err((
                    "device_key",
                    "is for identity = \"gateway\"; with identity = \"device\" use device_keys = { \"<device>\" = \"<key>\" } or policy_name + policy_key".into(),
                ));
            }
            let template = device_id.unwrap_or_else(|| defaults::AZURE_DEVICE_ID.into());
            if !(template.contains("{device}") || template.contains("{dev_eui}")) {
                return Err((
                    "device_id",
                    format!("{template:?} names one IoT Hub device for every LoRaWAN device; with identity = \"device\" use {{device}} or {{dev_eui}}, or set identity = \"gateway\""),
                ));
            }
            let rest = template.replace("{device}", "").replace("{dev_eui}", "");
            if rest.contains(['{', '}']) {
                return Err((
                    "device_id",
                    format!("{template:?}: only {{device}} and {{dev_eui}} can be used"),
                ));
            }
            if policy.is_none() && device_keys.is_none() {
                return Err((
                    "policy_key",
                    "identity = \"device\" needs policy_name + policy_key (a hub policy with DeviceConnect) or device_keys".into(),
                ));
            }
            let idle_timeout = match idle {
                Some(0) => return Err(("idle_timeout_s", "must be at least 1 (seconds)".into())),
                Some(s) => Duration::from_secs(s),
                None => defaults::AZURE_IDLE_TIMEOUT,
            };
            let max_connections = match max_connections {
                Some(0) => return Err(("max_connections", "must be at least 1".into())),
                Some(n) => n,
                None => defaults::AZURE_MAX_CONNECTIONS,
            };
            AzureIdentity::Device {
                device_id: template,
                policy,
                device_keys: device_keys.unwrap_or_default(),
                idle_timeout,
                max_connections,
            }
        }
    };
    Ok(AzureConfig {
        hostname: host,
        server,
        ca_file,
        identity,
        inflight: inflight(window, defaults::AZURE_INFLIGHT)?,
        keep_alive: match keep_alive(keep, defaults::AZURE_KEEP_ALIVE, 1767) {
            Ok(d) => d,
            Err(_) => {
                return Err((
                    "keep_alive_s",
                    "must be 5 to 1767 seconds (IoT Hub's maximum)".into(),
                ))
            }
        },
        sas_ttl,
        downlink_format: downlink_format.unwrap_or_default(),
        twin: twin.unwrap_or(false),
        commands: commands.unwrap_or(false),
        tunnel,
    })
}

/// `tunnel_ports` (1-65535 each), `tunnel_idle_timeout_s` (>= 1), `tunnel_max` (1-64).
fn tunnel_config(
    ports: Option<Vec<u32>>,
    idle: Option<u64>,
    max: Option<usize>,
) -> Result<TunnelConfig, KeyError> {
    let mut out = Vec::new();
    for p in ports.unwrap_or_default() {
        match u16::try_from(p) {
            Ok(p) if p >= 1 => out.push(p),
            _ => {
                return Err((
                    "tunnel_ports",
                    format!("{p} is not a TCP port (1-65535), e.g. tunnel_ports = [22]"),
                ))
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    let idle_timeout = match idle {
        Some(0) => {
            return Err((
                "tunnel_idle_timeout_s",
                "must be at least 1 (seconds)".into(),
            ))
        }
        Some(s) => Duration::from_secs(s),
        None => defaults::AZURE_TUNNEL_IDLE_TIMEOUT,
    };
    let max = match max {
        Some(n @ 1..=64) => n,
        Some(_) => {
            return Err((
                "tunnel_max",
                "must be 1 to 64 (tunnels open at once)".into(),
            ))
        }
        None => defaults::AZURE_TUNNEL_MAX,
    };
    Ok(TunnelConfig {
        ports: out,
        idle_timeout,
        max,
    })
}

/// The headers lorastream sets itself: a custom one would break the request.
const SET_BY_LORASTREAM: [&str; 5] = [
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "x-lorastream-kind",
];

/// Custom `headers`: valid HTTP (RFC 9110 §5.1 field names are tokens; §5.5 values have no CR,
/// LF or NUL), none of those lorastream sets itself (`reserved`, lower case). The value is a
/// secret: an error names the header, never its value.
fn check_headers(headers: &BTreeMap<String, Secret>, reserved: &[&str]) -> Result<(), KeyError> {
    for (name, value) in headers {
        let token = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token {
            return Err((
                "headers",
                format!("{name:?} is not a valid HTTP header name"),
            ));
        }
        if reserved.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(("headers", format!("{name:?} is set by lorastream itself")));
        }
        if value
            .expose()
            .bytes()
            .any(|b| b == b'\r' || b == b'\n' || b == 0)
        {
            return Err((
                "headers",
                format!("the value of {name:?} contains a line break or NUL"),
            ));
        }
    }
    Ok(())
}

/// HTTP webhook: http(s) URLs, sane batch and timing values, headers that are valid HTTP and
/// leave the ones lorastream sets alone (RFC 9110 §5.1 field names are tokens; §5.5 values have
/// no CR, LF or NUL).
fn http(k: &mut Keys, downlinks: bool) -> Result<HttpConfig, KeyError> {
    let url = take!(k, url);
    let headers = take!(k, headers);
    let batch_max = take!(k, batch_max);
    let batch_wait_ms = take!(k, batch_wait_ms);
    let timeout_s = take!(k, timeout_s);
    let on_client_error = take!(k, on_client_error);
    let poll_url = take!(k, poll_url);
    let poll_interval_s = take!(k, poll_interval_s);
    let ca_file = take!(k, ca_file);
    let cert_file = take!(k, cert_file);
    let key_file = take!(k, key_file);
    k.no_leftovers()?;
    let check_url = |key: &'static str, u: &str| -> Result<url::Url, KeyError> {
        match url::Url::parse(u) {
            Ok(p) if matches!(p.scheme(), "http" | "https") && p.host_str().is_some() => Ok(p),
            Ok(_) => Err((
                key,
                format!(
                    "{:?} must be an http:// or https:// URL with a host",
                    crate::model::redact_url_str(u)
                ),
            )),
            Err(e) => Err((key, format!("{u:?} is not a URL: {e}"))),
        }
    };
    let url = match url {
        Some(u) => check_url("url", &u)?,
        None => {
            return Err((
                "url",
                "kind = \"http\" needs url = \"https://...\" (where uplinks are POSTed)".into(),
            ))
        }
    };
    let poll = match (poll_url, poll_interval_s) {
        (Some(u), interval) => {
            let url = check_url("poll_url", &u)?;
            if !downlinks {
                return Err((
                    "poll_url",
                    "poll_url fetches downlinks, but this stream has downlinks = false".into(),
                ));
            }
            let interval = match interval {
                Some(0) => return Err(("poll_interval_s", "must be at least 1".into())),
                Some(s) => Duration::from_secs(s),
                None => defaults::HTTP_POLL_INTERVAL,
            };
            Some(PollConfig { url, interval })
        }
        (None, Some(_)) => {
            return Err(("poll_interval_s", "set poll_url too (what to poll)".into()))
        }
        (None, None) => None,
    };
    let batch_max = match batch_max {
        Some(n) if !(1..=10_000).contains(&n) => {
            return Err(("batch_max", format!("{n} is not within 1..=10000")))
        }
        Some(n) => n,
        None => defaults::HTTP_BATCH_MAX,
    };
    let batch_wait = match batch_wait_ms {
        Some(ms) if ms > 60_000 => {
            return Err((
                "batch_wait_ms",
                format!("{ms} is more than 60000 (one minute)"),
            ))
        }
        Some(ms) => Duration::from_millis(ms),
        None => defaults::HTTP_BATCH_WAIT,
    };
    let timeout = match timeout_s {
        Some(t) if !(1..=600).contains(&t) => {
            return Err(("timeout_s", format!("{t} is not within 1..=600 seconds")))
        }
        Some(t) => Duration::from_secs(t),
        None => defaults::HTTP_TIMEOUT,
    };
    let headers = headers.unwrap_or_default();
    check_headers(&headers, &SET_BY_LORASTREAM)?;
    Ok(HttpConfig {
        url,
        headers,
        batch_max,
        batch_wait,
        timeout,
        on_client_error: on_client_error.unwrap_or_default(),
        poll,
        tls: TlsFiles {
            ca_file,
            client_cert: client_cert(cert_file, key_file)?,
        },
    })
}

// ---- printing the effective settings (`lorastream check`) ----

/// Builds a TOML table in key order, for `lorastream check`.
struct Table(toml::Table);

impl Table {
    fn s(&mut self, k: &str, v: impl ToString) -> &mut Self {
        self.0.insert(k.into(), toml::Value::String(v.to_string()));
        self
    }
    fn n(&mut self, k: &str, v: u64) -> &mut Self {
        self.0.insert(
            k.into(),
            toml::Value::Integer(v.min(i64::MAX as u64) as i64),
        );
        self
    }
    fn b(&mut self, k: &str, v: bool) -> &mut Self {
        self.0.insert(k.into(), toml::Value::Boolean(v));
        self
    }
    fn secret(&mut self, k: &str) -> &mut Self {
        self.s(k, "***")
    }
    fn path(&mut self, k: &str, p: &Option<PathBuf>) -> &mut Self {
        if let Some(p) = p {
            self.s(k, p.display());
        }
        self
    }
    fn tls(&mut self, t: &TlsFiles) -> &mut Self {
        self.path("ca_file", &t.ca_file);
        if let Some(c) = &t.client_cert {
            self.s("cert_file", c.cert_file.display())
                .s("key_file", c.key_file.display());
        }
        self
    }
    fn masked_map(&mut self, k: &str, m: &BTreeMap<String, Secret>) -> &mut Self {
        let t: toml::Table = m
            .keys()
            .map(|name| (name.clone(), toml::Value::String("***".into())))
            .collect();
        self.0.insert(k.into(), toml::Value::Table(t));
        self
    }
    fn mqtt(&mut self, m: &MqttConfig) -> &mut Self {
        self.s("server", &m.server).tls(&m.tls);
        if let Some((user, _)) = &m.credentials {
            self.s("username", user).secret("password");
        }
        let id = match &m.client_id {
            ClientId::Set(id) => id.clone(),
            ClientId::Derived(base) => format!("{base}-<instance id>"),
        };
        self.s("client_id", &id)
            .b("clean_session", m.clean_session)
            .b("commands", m.commands)
            .s("topic_prefix", &m.topic_prefix)
            .n("inflight", m.inflight.into())
            .n("keep_alive_s", m.keep_alive.as_secs())
            .n("response_timeout_s", m.response_timeout.as_secs())
    }
}

impl StreamConfig {
    /// `[[stream]] "cloud": ` in messages.
    pub fn label(&self) -> String {
        format!("[[stream]] {:?}: ", self.name)
    }

    /// The effective settings as `lorastream check` prints them.
    pub(super) fn effective(&self) -> toml::Table {
        let mut t = Table(toml::Table::new());
        t.s("name", &self.name).s("kind", self.kind.name());
        match &self.scope {
            Scope::All => {}
            Scope::Application(a) => {
                t.s("application", a);
            }
            Scope::Device(d) => {
                t.s("device", d);
            }
            Scope::Gateway(None) => {
                t.s("gateway", "*");
            }
            Scope::Gateway(Some(g)) => {
                t.s("gateway", g);
            }
        }
        t.s("format", self.format.kind().name());
        if let FormatConfig::Template(tc) = &self.format {
            t.s("template_file", tc.file.display())
                .s("content_type", &tc.content_type);
        }
        t.b("downlinks", self.downlinks)
            .s("when_full", self.when_full.name());
        match &self.kind {
            StreamKind::Mqtt(m) => {
                t.mqtt(m);
            }
            StreamKind::AwsIot(a) => {
                t.mqtt(&a.mqtt).b("shadow", a.shadow);
            }
            StreamKind::AzureIotHub(a) => {
                t.s("hostname", &a.hostname)
                    .s("server", &a.server)
                    .path("ca_file", &a.ca_file);
                match &a.identity {
                    AzureIdentity::Gateway { device_id, key } => {
                        t.s("identity", "gateway").s("device_id", device_id);
                        match key {
                            AzureKey::Device(_) => t.secret("device_key"),
                            AzureKey::Policy(p) => t.s("policy_name", &p.name).secret("policy_key"),
                        };
                    }
                    AzureIdentity::Device {
                        device_id,
                        policy,
                        device_keys,
                        idle_timeout,
                        max_connections,
                    } => {
                        t.s("identity", "device").s("device_id", device_id);
                        if let Some(p) = policy {
                            t.s("policy_name", &p.name).secret("policy_key");
                        }
                        if !device_keys.is_empty() {
                            t.masked_map("device_keys", device_keys);
                        }
                        t.n("idle_timeout_s", idle_timeout.as_secs())
                            .n("max_connections", *max_connections as u64);
                    }
                }
                t.n("inflight", a.inflight.into())
                    .n("keep_alive_s", a.keep_alive.as_secs())
                    .n("sas_ttl_s", a.sas_ttl.as_secs())
                    .s(
                        "downlink_format",
                        match a.downlink_format {
                            DownlinkFormat::Json => "json",
                            DownlinkFormat::Raw => "raw",
                        },
                    )
                    .b("twin", a.twin)
                    .b("commands", a.commands);
                t.0.insert(
                    "tunnel_ports".into(),
                    toml::Value::Array(
                        a.tunnel
                            .ports
                            .iter()
                            .map(|p| toml::Value::Integer(i64::from(*p)))
                            .collect(),
                    ),
                );
                t.n("tunnel_idle_timeout_s", a.tunnel.idle_timeout.as_secs())
                    .n("tunnel_max", a.tunnel.max as u64);
            }
            StreamKind::Http(h) => {
                t.s("url", redact_url(&h.url));
                if !h.headers.is_empty() {
                    t.masked_map("headers", &h.headers);
                }
                t.n("batch_max", h.batch_max as u64)
                    .n("batch_wait_ms", h.batch_wait.as_millis() as u64)
                    .n("timeout_s", h.timeout.as_secs())
                    .s(
                        "on_client_error",
                        match h.on_client_error {
                            OnClientError::Retry => "retry",
                            OnClientError::Drop => "drop",
                        },
                    );
                if let Some(p) = &h.poll {
                    t.s("poll_url", redact_url(&p.url))
                        .n("poll_interval_s", p.interval.as_secs());
                }
                t.tls(&h.tls);
            }
            StreamKind::File { path } => {
                t.s("path", path.display());
            }
            StreamKind::Stdout => {}
            StreamKind::WebSocket(w) => transports::print_websocket(&mut t, w),
            StreamKind::Smtp(m) => transports::print_smtp(&mut t, m),
        }
        t.0
    }
}
