//! Configuration: one TOML file, every section optional, unknown keys rejected.
//!
//! Errors name the file, the line and the key (`lorastream.toml:14: [[device]] "soil-1": key
//! `dev_addr`: expected 8 hex digits, got 7`), because the person reading them is editing that
//! file over SSH on a gateway. Syntax and type errors come from the `toml` crate with their span;
//! cross-references (a device naming an unknown application, a stream scoped to an unknown
//! device, duplicate ids) are checked in [`Config::validate`], which finds the key's line in the
//! entry's text.
//!
//! Defaults match `config.example.toml`; `lorastream check` prints the effective configuration
//! with every secret shown as `***`.

use crate::lorawan::session::DeviceClass;
use crate::model::{AesKey, DevAddr, Eui64, Secret};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Where the daemon looks when `-c` is not given.
pub const DEFAULT_PATH: &str = "/etc/lorastream/lorastream.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}:{line}: {entry}key `{key}`: {message}")]
    Invalid {
        path: String,
        line: usize,
        entry: String,
        key: String,
        message: String,
    },
}

fn de_from_str<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let s = String::deserialize(d)?;
    s.parse::<T>().map_err(serde::de::Error::custom)
}

fn de_opt_from_str<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let s = Option::<String>::deserialize(d)?;
    s.map(|s| s.parse::<T>().map_err(serde::de::Error::custom))
        .transpose()
}

fn ser_display<S: Serializer, T: std::fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn ser_opt_display<S: Serializer, T: std::fmt::Display>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

fn ser_masked<S: Serializer, T>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("***"),
        None => s.serialize_none(),
    }
}

/// A URL without what may hold a key (see [`crate::model::redact_url`]): webhook keys often
/// live in the query (e.g. `?code=` of Azure Functions).
fn ser_url_masked<S: Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(u) => s.serialize_str(&crate::model::redact_url_str(u)),
        None => s.serialize_none(),
    }
}

/// The whole file.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub storage: StorageConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    #[serde(rename = "application")]
    pub applications: Vec<ApplicationConfig>,
    #[serde(rename = "device")]
    pub devices: Vec<Spanned<DeviceConfig>>,
    #[serde(rename = "stream")]
    pub streams: Vec<Spanned<StreamConfig>>,
}

/// LoRaWAN region: the downlink tables (RX1/RX2, data rates, payload sizes, power) of
/// `downlink::window`, from LoRaWAN Regional Parameters RP002-1.0.x. AS923 is AS923-1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
pub enum Region {
    #[default]
    EU868,
    US915,
    AU915,
    AS923,
}

impl Region {
    /// LoRa data rates a gateway transmits with (RP002-1.0.3 "Data Rate and End-device Output
    /// Power encoding": EU868/AS923 DR0..6; US915/AU915 DR8..13, the 500 kHz downlink rates).
    pub fn downlink_drs(self) -> std::ops::RangeInclusive<u8> {
        match self {
            Region::EU868 | Region::AS923 => 0..=6,
            Region::US915 | Region::AU915 => 8..=13,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// UDP address the packet forwarders send to.
    pub listen: String,
    pub region: Region,
    /// Receptions of the same frame within this window are merged into one uplink.
    pub dedup_window_ms: u64,
    /// SO_RCVBUF of the UDP socket; bursts beyond it are lost by the kernel, so keep it large.
    pub udp_recv_buffer: usize,
    /// The EUI of this gateway, used for the MQTT last will (`gateways/{eui}/status`) and the
    /// default client id. Optional; without it the status is published per forwarder seen.
    #[serde(
        deserialize_with = "de_opt_from_str",
        serialize_with = "ser_opt_display"
    )]
    pub eui: Option<Eui64>,
    /// NetID for OTAA DevAddrs (6 hex digits). 000000 and 000001 are for private networks;
    /// DevAddrs get the NetID's 7-bit NwkID as their top bits.
    pub net_id: String,
    /// RX2 data rate for every device (default: the region's, e.g. DR0 in EU868; TTN uses DR3
    /// there). OTAA devices learn it from the JoinAccept; ABP devices must be set to the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rx2_dr: Option<u8>,
    /// US915/AU915: the 8-channel sub-band (1..8) the gateway listens on. JoinAccepts then carry
    /// a channel-mask CFList (type 1) enabling only those channels and their 500 kHz channel;
    /// devices of LoRaWAN 1.0.3 or later apply it, earlier ones ignore it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub_band: Option<u8>,
}

impl GatewayConfig {
    pub fn net_id(&self) -> u32 {
        u32::from_str_radix(&self.net_id, 16).unwrap_or(0)
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "0.0.0.0:1700".into(),
            region: Region::EU868,
            dedup_window_ms: 200,
            udp_recv_buffer: 8 * 1024 * 1024,
            eui: None,
            net_id: "000000".into(),
            rx2_dr: None,
            sub_band: None,
        }
    }
}

/// What to do when the queues reach `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    #[default]
    DropOldest,
    RejectNew,
}

/// The storage engine under the store (`[storage] backend`); see `src/store/backend.rs` and
/// docs/benchmarks.md for why the default is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StorageBackend {
    /// sled 0.34: log-structured; unmaintained, known power-loss corruption reports.
    Sled,
    /// redb 2.6: copy-on-write B-tree with checksummed commits.
    #[default]
    Redb,
}

impl StorageBackend {
    pub fn name(self) -> &'static str {
        match self {
            StorageBackend::Sled => "sled",
            StorageBackend::Redb => "redb",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub path: PathBuf,
    /// The storage engine: "redb" (default) or "sled". A store written by the other engine is
    /// migrated on open (its files are kept aside).
    pub backend: StorageBackend,
    /// Cap on queued message bytes, all streams together.
    pub max_bytes: u64,
    pub when_full: WhenFull,
    /// Periodic flush of the store; the power-cut loss window. 0 = flush before an uplink
    /// counts as queued.
    pub flush_every_ms: u64,
    /// Page cache of the engine. sled's and redb's own defaults (1 GiB) are wrong for a gateway.
    pub cache_bytes: u64,
    /// Drop queued messages older than this ("7d", "12h"; empty = keep until delivered or
    /// pushed out by `max_bytes`). Expired drops are counted per stream.
    pub max_age: String,
}

impl StorageConfig {
    /// `max_age` as a duration (None when empty).
    pub fn max_age(&self) -> Option<std::time::Duration> {
        humantime::parse_duration(&self.max_age).ok()
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            path: PathBuf::from("/var/lib/lorastream"),
            backend: StorageBackend::default(),
            max_bytes: 256 * 1024 * 1024,
            when_full: WhenFull::DropOldest,
            flush_every_ms: 100,
            cache_bytes: 8 * 1024 * 1024,
            max_age: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Prometheus `/metrics` and JSON `/health`. Empty string disables the endpoint.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9100".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug`, `trace`, or a tracing filter (`lorastream=debug`).
    /// `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ApplicationConfig {
    pub id: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub application: String,
    pub id: String,
    #[serde(deserialize_with = "de_from_str", serialize_with = "ser_display")]
    pub dev_eui: Eui64,
    #[serde(default)]
    pub class: DeviceClass,
    /// OTAA: the device's LoRaWAN version, which decides the DevNonce rule: 1.0.0–1.0.3 devices
    /// pick random DevNonces (a used one is refused), 1.0.4 devices count up (a DevNonce not
    /// above the last one is refused). Default "1.0.3", which also accepts 1.0.4 devices.
    #[serde(default)]
    pub lorawan_version: LorawanVersion,
    /// ABP.
    #[serde(
        default,
        deserialize_with = "de_opt_from_str",
        serialize_with = "ser_opt_display"
    )]
    pub dev_addr: Option<DevAddr>,
    #[serde(
        default,
        deserialize_with = "de_opt_from_str",
        serialize_with = "ser_masked"
    )]
    pub nwk_s_key: Option<AesKey>,
    #[serde(
        default,
        deserialize_with = "de_opt_from_str",
        serialize_with = "ser_masked"
    )]
    pub app_s_key: Option<AesKey>,
    /// OTAA (LoRaWAN 1.0.x).
    #[serde(
        default,
        deserialize_with = "de_opt_from_str",
        serialize_with = "ser_opt_display"
    )]
    pub join_eui: Option<Eui64>,
    #[serde(
        default,
        deserialize_with = "de_opt_from_str",
        serialize_with = "ser_masked"
    )]
    pub app_key: Option<AesKey>,
}

/// LoRaWAN version of a device (1.0.x; what lorastream implements).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
pub enum LorawanVersion {
    #[serde(rename = "1.0.0")]
    V1_0_0,
    #[serde(rename = "1.0.1")]
    V1_0_1,
    #[serde(rename = "1.0.2")]
    V1_0_2,
    #[default]
    #[serde(rename = "1.0.3")]
    V1_0_3,
    #[serde(rename = "1.0.4")]
    V1_0_4,
}

impl LorawanVersion {
    /// LoRaWAN 1.0.4 §6.2.5: DevNonce is a counter; the network refuses one that is not
    /// greater than the last (earlier versions use random DevNonces).
    pub fn dev_nonce_counts_up(self) -> bool {
        self == LorawanVersion::V1_0_4
    }
}

/// Stream kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum StreamKind {
    #[default]
    Mqtt,
    AzureIotHub,
    AwsIot,
    Http,
    File,
    Stdout,
}

impl StreamKind {
    pub fn name(self) -> &'static str {
        match self {
            StreamKind::Mqtt => "mqtt",
            StreamKind::AzureIotHub => "azure-iot-hub",
            StreamKind::AwsIot => "aws-iot",
            StreamKind::Http => "http",
            StreamKind::File => "file",
            StreamKind::Stdout => "stdout",
        }
    }
}

/// JSON layout of published messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// The Things Stack v3 uplink message layout.
    #[default]
    Tts,
}

/// One `[[stream]]`. All kinds share this flat table; [`Config::validate`] rejects keys that
/// the chosen kind does not use, so a misplaced key is an error, not silently ignored.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    pub name: String,
    #[serde(default)]
    pub kind: StreamKind,
    // Scope: at most one of these.
    pub application: Option<String>,
    pub device: Option<String>,
    /// A gateway EUI, or "*" for every gateway: raw frames, known device or not.
    pub gateway: Option<String>,
    #[serde(default)]
    pub format: Format,
    #[serde(default = "yes")]
    pub downlinks: bool,
    /// Per-stream override of `[storage] when_full`.
    pub when_full: Option<WhenFull>,
    // mqtt / aws-iot / azure-iot-hub
    #[serde(serialize_with = "ser_url_masked")]
    pub server: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    #[serde(default, serialize_with = "ser_masked")]
    pub password: Option<Secret>,
    pub client_id: Option<String>,
    pub topic_prefix: Option<String>,
    /// Unacknowledged QoS 1 publishes in flight (MQTT) / the delivery window.
    pub inflight: Option<u16>,
    pub keep_alive_s: Option<u64>,
    // file
    pub path: Option<PathBuf>,
    // aws-iot
    /// Also update the thing shadow (`$aws/things/{thing}/shadow/update`) with last-seen data.
    pub shadow: Option<bool>,
    // http
    #[serde(default, serialize_with = "ser_url_masked")]
    pub url: Option<String>,
    #[serde(default, serialize_with = "ser_masked")]
    pub headers: Option<BTreeMap<String, Secret>>,
    pub batch_max: Option<usize>,
    /// Wait at most this long to fill a batch.
    pub batch_wait_ms: Option<u64>,
    pub timeout_s: Option<u64>,
    /// 4xx other than 408/429: "drop" the batch (counted as dead letters) or "retry".
    pub on_client_error: Option<String>,
    /// Fetched periodically for downlinks (firewall-friendly, no inbound port).
    #[serde(default, serialize_with = "ser_url_masked")]
    pub poll_url: Option<String>,
    pub poll_interval_s: Option<u64>,
    // azure-iot-hub
    pub hostname: Option<String>,
    pub identity: Option<String>,
    pub device_id: Option<String>,
    pub policy_name: Option<String>,
    #[serde(default, serialize_with = "ser_masked")]
    pub policy_key: Option<Secret>,
    #[serde(default, serialize_with = "ser_masked")]
    pub device_key: Option<Secret>,
    #[serde(default, serialize_with = "ser_masked")]
    pub device_keys: Option<BTreeMap<String, Secret>>,
    /// SAS token lifetime; tokens are renewed (reconnect) before they expire.
    pub sas_ttl_s: Option<u64>,
    /// Per-device connections idle this long are closed.
    pub idle_timeout_s: Option<u64>,
    /// Cap on concurrent per-device connections.
    pub max_connections: Option<usize>,
    /// Cloud-to-device body: "json" (contract downlink JSON) or "raw" (payload, `fPort` property).
    pub downlink_format: Option<String>,
    /// Update the device twin's reported properties (rate-limited).
    pub twin: Option<bool>,
}

fn yes() -> bool {
    true
}

/// The scope a stream takes messages from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every device uplink.
    All,
    Application(String),
    Device(String),
    /// Raw frames of one gateway (`None` = every gateway).
    Gateway(Option<Eui64>),
}

impl StreamConfig {
    pub fn scope(&self) -> Scope {
        if let Some(a) = &self.application {
            Scope::Application(a.clone())
        } else if let Some(d) = &self.device {
            Scope::Device(d.clone())
        } else if let Some(g) = &self.gateway {
            Scope::Gateway(g.parse().ok())
        } else {
            Scope::All
        }
    }

    /// Names of the kind-specific keys that are set.
    fn set_keys(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        macro_rules! k {
            ($($f:ident),*) => { $( if self.$f.is_some() { v.push(stringify!($f)); } )* };
        }
        k!(
            server,
            ca_file,
            cert_file,
            key_file,
            username,
            password,
            client_id,
            topic_prefix,
            inflight,
            keep_alive_s,
            path,
            url,
            headers,
            batch_max,
            batch_wait_ms,
            timeout_s,
            on_client_error,
            poll_url,
            poll_interval_s,
            shadow,
            hostname,
            identity,
            device_id,
            policy_name,
            policy_key,
            device_key,
            device_keys,
            sas_ttl_s,
            idle_timeout_s,
            max_connections,
            downlink_format,
            twin
        );
        v
    }
}

/// Keys each kind accepts beyond the common ones.
fn allowed_keys(kind: StreamKind) -> &'static [&'static str] {
    match kind {
        StreamKind::Mqtt => &[
            "server",
            "ca_file",
            "cert_file",
            "key_file",
            "username",
            "password",
            "client_id",
            "topic_prefix",
            "inflight",
            "keep_alive_s",
        ],
        StreamKind::AwsIot => &[
            "server",
            "ca_file",
            "cert_file",
            "key_file",
            "client_id",
            "topic_prefix",
            "inflight",
            "keep_alive_s",
            "shadow",
        ],
        StreamKind::AzureIotHub => &[
            "server",
            "ca_file",
            "hostname",
            "identity",
            "device_id",
            "policy_name",
            "policy_key",
            "device_key",
            "device_keys",
            "inflight",
            "keep_alive_s",
            "sas_ttl_s",
            "idle_timeout_s",
            "max_connections",
            "downlink_format",
            "twin",
        ],
        StreamKind::Http => &[
            "url",
            "headers",
            "batch_max",
            "batch_wait_ms",
            "timeout_s",
            "on_client_error",
            "poll_url",
            "poll_interval_s",
            "ca_file",
            "cert_file",
            "key_file",
        ],
        StreamKind::File => &["path"],
        StreamKind::Stdout => &[],
    }
}

/// Azure IoT Hub defaults (README "Stream to Azure IoT Hub").
pub mod azure_defaults {
    /// SAS token lifetime (the Azure SDKs use one hour too); renewed at 80 %.
    pub const SAS_TTL_S: u64 = 3600;
    /// Per-device connections without traffic this long are closed.
    pub const IDLE_TIMEOUT_S: u64 = 300;
    pub const MAX_CONNECTIONS: usize = 100;
    /// Unacknowledged publishes per connection.
    pub const INFLIGHT: u16 = 32;
    /// IoT Hub allows keep-alives up to 1767 s; shorter detects a dead link sooner.
    pub const KEEP_ALIVE_S: u64 = 60;
    pub const DEVICE_ID: &str = "{device}";
}

/// The IoT Hub device id of a LoRaWAN device: `template` with `{device}` (its id in this file)
/// and `{dev_eui}` (16 upper-case hex digits) replaced.
pub fn azure_device_id(template: &str, device: &str, dev_eui: Eui64) -> String {
    template
        .replace("{device}", device)
        .replace("{dev_eui}", &dev_eui.to_string())
}

/// Why `id` cannot be an IoT Hub device id (Azure IoT Hub docs, "Device identity properties":
/// up to 128 characters, ASCII letters and digits and `- . % _ * ? ! ( ) , : = @ $ '`).
pub fn azure_device_id_error(id: &str) -> Option<String> {
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

/// Azure IoT Hub: identity mode, keys for every device in scope, device ids IoT Hub accepts.
/// `devices` are the devices in the stream's scope.
fn validate_azure(
    st: &StreamConfig,
    devices: &[&DeviceConfig],
) -> Result<(), (&'static str, String)> {
    let host = st.hostname.as_deref().unwrap_or("");
    if host.is_empty() || host.contains(['/', ':', ' ']) {
        return Err((
            "hostname",
            format!("{host:?}: set hostname = \"<hub>.azure-devices.net\" (the hub's host name, no scheme or port)"),
        ));
    }
    if let Some(server) = &st.server {
        if !(server.starts_with("mqtts://") || server.starts_with("wss://")) {
            return Err((
                "server",
                format!("{server:?}: IoT Hub needs TLS: mqtts://{host}:8883 or wss://{host}/$iothub/websocket"),
            ));
        }
    }
    let b64 = |key: &'static str, v: &Secret| {
        use base64::Engine;
        match base64::engine::general_purpose::STANDARD.decode(v.expose().trim()) {
            Ok(k) if !k.is_empty() => Ok(()),
            _ => Err((
                key,
                "is not a base64 key; copy the primary key from the Azure portal".to_string(),
            )),
        }
    };
    if st.policy_name.is_some() != st.policy_key.is_some() {
        return Err((
            "policy_name",
            "policy_name and policy_key go together (a hub shared-access policy with DeviceConnect)".into(),
        ));
    }
    if let Some(k) = &st.policy_key {
        b64("policy_key", k)?;
    }
    if let Some(k) = &st.device_key {
        b64("device_key", k)?;
    }
    for k in st.device_keys.iter().flat_map(|m| m.values()) {
        b64("device_keys", k)?;
    }
    match st.downlink_format.as_deref() {
        None | Some("json") | Some("raw") => {}
        Some(f) => {
            return Err((
                "downlink_format",
                format!("{f:?} is not \"json\" or \"raw\""),
            ))
        }
    }
    if st.sas_ttl_s.is_some_and(|t| t < 2) {
        return Err(("sas_ttl_s", "must be at least 2 (seconds)".into()));
    }
    if st.idle_timeout_s == Some(0) {
        return Err(("idle_timeout_s", "must be at least 1 (seconds)".into()));
    }
    if st.max_connections == Some(0) {
        return Err(("max_connections", "must be at least 1".into()));
    }
    if st.inflight == Some(0) {
        return Err(("inflight", "must be at least 1".into()));
    }
    if st.keep_alive_s.is_some_and(|k| !(5..=1767).contains(&k)) {
        return Err((
            "keep_alive_s",
            "must be 5 to 1767 seconds (IoT Hub's maximum)".into(),
        ));
    }
    let has_policy = st.policy_key.is_some();
    match st.identity.as_deref().unwrap_or("device") {
        "gateway" => {
            let id = st.device_id.as_deref().unwrap_or("");
            if id.is_empty() || id.contains(['{', '}']) {
                return Err((
                    "device_id",
                    "identity = \"gateway\" needs device_id = the IoT Hub device id of this gateway (no placeholders)".into(),
                ));
            }
            if let Some(e) = azure_device_id_error(id) {
                return Err(("device_id", e));
            }
            if st.device_key.is_none() && !has_policy {
                return Err((
                    "device_key",
                    "identity = \"gateway\" needs device_key (the IoT Hub device's primary key) or policy_name + policy_key".into(),
                ));
            }
            for k in ["device_keys", "idle_timeout_s", "max_connections"] {
                if st.set_keys().contains(&k) {
                    return Err((k, "is only used with identity = \"device\"".into()));
                }
            }
        }
        "device" => {
            if matches!(st.scope(), Scope::Gateway(_)) {
                return Err((
                    "identity",
                    "raw gateway frames have no LoRaWAN device: use identity = \"gateway\" for a gateway-scoped stream".into(),
                ));
            }
            if st.device_key.is_some() {
                return Err((
                    "device_key",
                    "is for identity = \"gateway\"; with identity = \"device\" use device_keys = { \"<device>\" = \"<key>\" } or policy_name + policy_key".into(),
                ));
            }
            let template = st.device_id.as_deref().unwrap_or(azure_defaults::DEVICE_ID);
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
            if !has_policy && st.device_keys.is_none() {
                return Err((
                    "policy_key",
                    "identity = \"device\" needs policy_name + policy_key (a hub policy with DeviceConnect) or device_keys".into(),
                ));
            }
            let mut ids = HashSet::new();
            for d in devices {
                let id = azure_device_id(template, &d.id, d.dev_eui);
                if let Some(e) = azure_device_id_error(&id) {
                    return Err(("device_id", format!("device {:?}: {e}", d.id)));
                }
                if !ids.insert(id.clone()) {
                    return Err(("device_id", format!("IoT Hub device id {id:?} is used by two devices")));
                }
                let keyed = st
                    .device_keys
                    .as_ref()
                    .is_some_and(|m| m.contains_key(&d.id) || m.contains_key(&id));
                if !keyed && !has_policy {
                    return Err((
                        "device_keys",
                        format!("no key for device {:?} (IoT Hub device {id:?}); add it to device_keys or set a policy key", d.id),
                    ));
                }
            }
        }
        other => {
            return Err((
                "identity",
                format!("{other:?} is not \"device\" (one IoT Hub device per LoRaWAN device) or \"gateway\" (one for the gateway)"),
            ))
        }
    }
    Ok(())
}

/// AWS IoT Core: TLS with a client certificate, a thing name, and topics within AWS limits
/// (at most 7 slashes and 256 bytes: AWS IoT developer guide, "Quotas").
fn validate_aws(st: &StreamConfig, devices: &[(&str, &str)]) -> Result<(), (&'static str, String)> {
    let server = st.server.as_deref().unwrap_or("");
    if !server.starts_with("mqtts://") {
        return Err((
            "server",
            format!("{server:?}: AWS IoT needs mqtts://<prefix>-ats.iot.<region>.amazonaws.com:8883 (or :443)"),
        ));
    }
    if st.cert_file.is_none() || st.key_file.is_none() {
        return Err((
            "cert_file",
            "AWS IoT needs cert_file and key_file (the thing's certificate and key)".into(),
        ));
    }
    if st.client_id.as_deref().is_none_or(str::is_empty) {
        return Err((
            "client_id",
            "AWS IoT needs client_id = the thing name".into(),
        ));
    }
    let prefix = st.topic_prefix.as_deref().unwrap_or("lorastream");
    if prefix.contains(['+', '#']) || prefix.ends_with('/') || prefix.is_empty() {
        return Err((
            "topic_prefix",
            "must be non-empty, without '+', '#' or a trailing '/'".into(),
        ));
    }
    // The longest topic is {prefix}/{application}/devices/{device}/down/replace.
    for (app, dev) in devices {
        let t = format!("{prefix}/{app}/devices/{dev}/down/replace");
        let slashes = t.matches('/').count();
        if slashes > 7 || t.len() > 256 {
            return Err((
                "topic_prefix",
                format!(
                    "topic {t:?} has {slashes} slashes and {} bytes; AWS IoT allows 7 and 256",
                    t.len()
                ),
            ));
        }
    }
    Ok(())
}

/// HTTP webhook: http(s) URLs, sane batch and timing values, headers that are valid HTTP and
/// leave the ones lorastream sets alone (RFC 9110 §5.1 field names are tokens; §5.5 values have
/// no CR, LF or NUL).
fn validate_http(st: &StreamConfig) -> Result<(), (&'static str, String)> {
    let check_url = |key: &'static str, u: &str| -> Result<(), (&'static str, String)> {
        match url::Url::parse(u) {
            Ok(p) if matches!(p.scheme(), "http" | "https") && p.host_str().is_some() => Ok(()),
            Ok(_) => Err((
                key,
                format!("{u:?} must be an http:// or https:// URL with a host"),
            )),
            Err(e) => Err((key, format!("{u:?} is not a URL: {e}"))),
        }
    };
    match st.url.as_deref() {
        Some(u) => check_url("url", u)?,
        None => {
            return Err((
                "url",
                "kind = \"http\" needs url = \"https://...\" (where uplinks are POSTed)".into(),
            ))
        }
    }
    if let Some(u) = st.poll_url.as_deref() {
        check_url("poll_url", u)?;
        if !st.downlinks {
            return Err((
                "poll_url",
                "poll_url fetches downlinks, but this stream has downlinks = false".into(),
            ));
        }
    }
    if st.poll_interval_s.is_some() && st.poll_url.is_none() {
        return Err(("poll_interval_s", "set poll_url too (what to poll)".into()));
    }
    if st.poll_interval_s == Some(0) {
        return Err(("poll_interval_s", "must be at least 1".into()));
    }
    if let Some(n) = st.batch_max {
        if !(1..=10_000).contains(&n) {
            return Err(("batch_max", format!("{n} is not within 1..=10000")));
        }
    }
    if let Some(ms) = st.batch_wait_ms {
        if ms > 60_000 {
            return Err((
                "batch_wait_ms",
                format!("{ms} is more than 60000 (one minute)"),
            ));
        }
    }
    if let Some(t) = st.timeout_s {
        if !(1..=600).contains(&t) {
            return Err(("timeout_s", format!("{t} is not within 1..=600 seconds")));
        }
    }
    if let Some(m) = st.on_client_error.as_deref() {
        if m != "retry" && m != "drop" {
            return Err((
                "on_client_error",
                format!("{m:?} must be \"retry\" (keep the batch, the default) or \"drop\""),
            ));
        }
    }
    if st.cert_file.is_some() != st.key_file.is_some() {
        return Err(("cert_file", "cert_file and key_file go together".into()));
    }
    const SET_BY_LORASTREAM: [&str; 5] = [
        "content-type",
        "content-length",
        "host",
        "transfer-encoding",
        "x-lorastream-kind",
    ];
    for (name, value) in st.headers.iter().flatten() {
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
        if SET_BY_LORASTREAM.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(("headers", format!("{name:?} is set by lorastream itself")));
        }
        // The value is a secret: say which header is wrong, never what it holds.
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

/// 1-based line and column of a byte offset.
fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let col = offset - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, col)
}

/// Line of `key = ...` inside an entry (from its span start up to the next table header), or
/// the entry's first line.
fn key_line(src: &str, span: &Range<usize>, key: &str) -> usize {
    let start = span.start.min(src.len());
    let mut offset = start;
    for (i, l) in src[start..].split_inclusive('\n').enumerate() {
        let t = l.trim_start();
        if i > 0 && t.starts_with('[') {
            break;
        }
        if let Some(rest) = t.strip_prefix(key) {
            if rest.trim_start().starts_with('=') {
                return line_col(src, offset).0;
            }
        }
        offset += l.len();
    }
    line_col(src, start).0
}

impl Config {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&src, &path.display().to_string())
    }

    /// Parse and validate config text; `path` is only used in messages.
    pub fn parse(src: &str, path: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(src).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(src, s.start)).unwrap_or((0, 0));
            ConfigError::Syntax {
                path: path.to_string(),
                line,
                column,
                message: e.message().trim().to_string(),
            }
        })?;
        cfg.validate(src, path)?;
        Ok(cfg)
    }

    /// Cross-field checks. `src` is the text the config came from (for line numbers).
    pub fn validate(&self, src: &str, path: &str) -> Result<(), ConfigError> {
        let top = |key: &str, message: String| {
            let line = src
                .lines()
                .position(|l| {
                    let t = l.trim_start();
                    t.strip_prefix(key)
                        .is_some_and(|r| r.trim_start().starts_with('='))
                })
                .map(|i| i + 1)
                .unwrap_or(0);
            ConfigError::Invalid {
                path: path.into(),
                line,
                entry: String::new(),
                key: key.into(),
                message,
            }
        };
        if self.gateway.listen.parse::<SocketAddr>().is_err() {
            return Err(top(
                "listen",
                format!(
                    "[gateway] listen = {:?} is not an IP:port (e.g. \"0.0.0.0:1700\")",
                    self.gateway.listen
                ),
            ));
        }
        if !self.metrics.listen.is_empty() && self.metrics.listen.parse::<SocketAddr>().is_err() {
            return Err(top(
                "listen",
                format!(
                    "[metrics] listen = {:?} is not an IP:port (or \"\" to disable)",
                    self.metrics.listen
                ),
            ));
        }
        if self.gateway.net_id.len() != 6 || u32::from_str_radix(&self.gateway.net_id, 16).is_err()
        {
            return Err(top(
                "net_id",
                format!(
                    "{:?} is not a NetID (6 hex digits, e.g. \"000000\")",
                    self.gateway.net_id
                ),
            ));
        }
        if let Some(dr) = self.gateway.rx2_dr {
            if !self.gateway.region.downlink_drs().contains(&dr) {
                return Err(top(
                    "rx2_dr",
                    format!(
                        "DR{dr} is not a downlink data rate of {:?} (EU868/AS923: 0..6, US915/AU915: 8..13)",
                        self.gateway.region
                    ),
                ));
            }
        }
        if let Some(sb) = self.gateway.sub_band {
            if !matches!(self.gateway.region, Region::US915 | Region::AU915)
                || !(1..=8).contains(&sb)
            {
                return Err(top(
                    "sub_band",
                    format!(
                        "sub_band = {sb}: only US915 and AU915 have sub-bands, numbered 1..8 (channels 8n-8..8n-1)"
                    ),
                ));
            }
        }
        if self.gateway.dedup_window_ms > 2_000 {
            return Err(top(
                "dedup_window_ms",
                "must be at most 2000 ms (RX1 opens 1 s after the uplink)".into(),
            ));
        }
        if !self.storage.max_age.is_empty() {
            match humantime::parse_duration(&self.storage.max_age) {
                Ok(d) if d >= std::time::Duration::from_secs(60) => {}
                Ok(_) => return Err(top("max_age", "must be at least 1 minute".into())),
                Err(e) => {
                    return Err(top(
                        "max_age",
                        format!(
                            "{:?}: {e} (write e.g. \"7d\" or \"12h\")",
                            self.storage.max_age
                        ),
                    ))
                }
            }
        }
        if self.storage.max_bytes < 64 * 1024 {
            return Err(top("max_bytes", "must be at least 65536".into()));
        }

        let apps: HashSet<&str> = self.applications.iter().map(|a| a.id.as_str()).collect();
        let mut seen = HashSet::new();
        for a in &self.applications {
            if a.id.is_empty() || !seen.insert(a.id.as_str()) {
                return Err(top(
                    "id",
                    format!("[[application]] id {:?} is empty or used twice", a.id),
                ));
            }
        }

        let mut dev_ids = HashSet::new();
        let mut dev_euis = HashSet::new();
        for d in &self.devices {
            let span = d.span();
            let dv = d.get_ref();
            let err = |key: &str, message: String| ConfigError::Invalid {
                path: path.into(),
                line: key_line(src, &span, key),
                entry: format!("[[device]] {:?}: ", dv.id),
                key: key.into(),
                message,
            };
            if dv.id.is_empty() || dv.id.contains(['/', '+', '#']) {
                return Err(err(
                    "id",
                    "must be non-empty and contain no '/', '+' or '#' (it is used in MQTT topics)"
                        .into(),
                ));
            }
            if !dev_ids.insert(dv.id.as_str()) {
                return Err(err("id", "another device has the same id".into()));
            }
            if !dev_euis.insert(dv.dev_eui) {
                return Err(err(
                    "dev_eui",
                    format!("{} is used by another device", dv.dev_eui),
                ));
            }
            if !apps.contains(dv.application.as_str()) {
                return Err(err(
                    "application",
                    format!(
                        "unknown application {:?}; add an [[application]] with id = {:?}",
                        dv.application, dv.application
                    ),
                ));
            }
            let abp = [
                dv.dev_addr.is_some(),
                dv.nwk_s_key.is_some(),
                dv.app_s_key.is_some(),
            ];
            let otaa = dv.app_key.is_some();
            if abp.iter().any(|x| *x) && !abp.iter().all(|x| *x) {
                let missing = ["dev_addr", "nwk_s_key", "app_s_key"]
                    .iter()
                    .zip(abp)
                    .find(|(_, set)| !set)
                    .map(|(k, _)| *k)
                    .unwrap_or("dev_addr");
                return Err(err(
                    missing,
                    "ABP devices need dev_addr, nwk_s_key and app_s_key".into(),
                ));
            }
            if !abp[0] && !otaa {
                return Err(err(
                    "dev_addr",
                    "set dev_addr + nwk_s_key + app_s_key (ABP) or app_key (OTAA)".into(),
                ));
            }
        }

        let mut names = HashSet::new();
        for s in &self.streams {
            let span = s.span();
            let st = s.get_ref();
            let err = |key: &str, message: String| ConfigError::Invalid {
                path: path.into(),
                line: key_line(src, &span, key),
                entry: format!("[[stream]] {:?}: ", st.name),
                key: key.into(),
                message,
            };
            if st.name.is_empty() || st.name.contains(['/', '\0']) {
                return Err(err("name", "must be non-empty and contain no '/'".into()));
            }
            if !names.insert(st.name.as_str()) {
                return Err(err("name", "another stream has the same name".into()));
            }
            let scopes = [&st.application, &st.device, &st.gateway]
                .iter()
                .filter(|x| x.is_some())
                .count();
            if scopes > 1 {
                return Err(err(
                    "application",
                    "set at most one of application, device, gateway".into(),
                ));
            }
            if let Some(a) = &st.application {
                if !apps.contains(a.as_str()) {
                    return Err(err("application", format!("unknown application {a:?}")));
                }
            }
            if let Some(d) = &st.device {
                if !dev_ids.contains(d.as_str()) {
                    return Err(err("device", format!("unknown device {d:?}")));
                }
            }
            if let Some(g) = &st.gateway {
                if g != "*" && g.parse::<Eui64>().is_err() {
                    return Err(err(
                        "gateway",
                        format!("{g:?} is not a gateway EUI (16 hex digits) or \"*\""),
                    ));
                }
            }
            let allowed = allowed_keys(st.kind);
            for k in st.set_keys() {
                if !allowed.contains(&k) {
                    return Err(err(
                        k,
                        format!(
                            "not used by kind = {:?} (it takes: {})",
                            st.kind.name(),
                            if allowed.is_empty() {
                                "no extra keys".to_string()
                            } else {
                                allowed.join(", ")
                            }
                        ),
                    ));
                }
            }
            match st.kind {
                StreamKind::Mqtt => {
                    let server = st.server.as_deref().unwrap_or("");
                    if !["mqtt://", "mqtts://", "ws://", "wss://"]
                        .iter()
                        .any(|p| server.starts_with(p))
                    {
                        return Err(err(
                            "server",
                            format!(
                                "{server:?} must start with mqtt://, mqtts://, ws:// or wss://"
                            ),
                        ));
                    }
                    if st.cert_file.is_some() != st.key_file.is_some() {
                        return Err(err(
                            "cert_file",
                            "cert_file and key_file go together".into(),
                        ));
                    }
                    if let Some(p) = &st.topic_prefix {
                        if p.is_empty() || p.contains(['+', '#']) || p.ends_with('/') {
                            return Err(err(
                                "topic_prefix",
                                "must be non-empty, without '+', '#' or a trailing '/'".into(),
                            ));
                        }
                    }
                    if st.inflight == Some(0) {
                        return Err(err("inflight", "must be at least 1".into()));
                    }
                }
                StreamKind::File => {
                    if st.path.is_none() {
                        return Err(err("path", "kind = \"file\" needs path".into()));
                    }
                }
                StreamKind::Stdout => {}
                StreamKind::AzureIotHub => {
                    let in_scope = self.devices_in_scope(st);
                    validate_azure(st, &in_scope).map_err(|(k, m)| err(k, m))?
                }
                StreamKind::AwsIot => {
                    let in_scope: Vec<(&str, &str)> = self
                        .device_configs()
                        .filter(|d| match st.scope() {
                            Scope::All => true,
                            Scope::Application(a) => a == d.application,
                            Scope::Device(x) => x == d.id,
                            Scope::Gateway(_) => false,
                        })
                        .map(|d| (d.application.as_str(), d.id.as_str()))
                        .collect();
                    validate_aws(st, &in_scope).map_err(|(k, m)| err(k, m))?
                }
                StreamKind::Http => validate_http(st).map_err(|(k, m)| err(k, m))?,
                #[allow(unreachable_patterns)]
                _ => {
                    return Err(err(
                        "kind",
                        format!(
                            "kind = {:?} is not available in this version yet (use mqtt, file or stdout)",
                            st.kind.name()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The devices whose uplinks a stream takes.
    pub fn devices_in_scope(&self, st: &StreamConfig) -> Vec<&DeviceConfig> {
        self.device_configs()
            .filter(|d| match st.scope() {
                Scope::All => true,
                Scope::Application(a) => a == d.application,
                Scope::Device(x) => x == d.id,
                Scope::Gateway(_) => false,
            })
            .collect()
    }

    pub fn device_configs(&self) -> impl Iterator<Item = &DeviceConfig> {
        self.devices.iter().map(|d| d.get_ref())
    }

    pub fn stream_configs(&self) -> impl Iterator<Item = &StreamConfig> {
        self.streams.iter().map(|s| s.get_ref())
    }

    /// The effective configuration as TOML, secrets masked.
    pub fn to_toml_masked(&self) -> String {
        #[derive(Serialize)]
        struct View<'a> {
            gateway: &'a GatewayConfig,
            storage: &'a StorageConfig,
            metrics: &'a MetricsConfig,
            log: &'a LogConfig,
            application: &'a [ApplicationConfig],
            device: Vec<&'a DeviceConfig>,
            stream: Vec<&'a StreamConfig>,
        }
        let v = View {
            gateway: &self.gateway,
            storage: &self.storage,
            metrics: &self.metrics,
            log: &self.log,
            application: &self.applications,
            device: self.device_configs().collect(),
            stream: self.stream_configs().collect(),
        };
        toml::to_string_pretty(&v).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[gateway]
listen = "127.0.0.1:1700"

[storage]
path = "/tmp/x"

[[application]]
id = "farm"

[[device]]
application = "farm"
id = "soil-1"
dev_eui = "70b3d57ed0000001"
dev_addr = "26000001"
nwk_s_key = "000102030405060708090A0B0C0D0E0F"
app_s_key = "000102030405060708090a0b0c0d0e0f"

[[stream]]
name = "cloud"
kind = "mqtt"
server = "mqtt://127.0.0.1:1883"
application = "farm"
password = "s3cret"
"#;

    #[test]
    fn good_config_parses_with_defaults() {
        let c = Config::parse(GOOD, "t.toml").unwrap();
        assert_eq!(c.gateway.dedup_window_ms, 200);
        assert_eq!(c.storage.flush_every_ms, 100);
        assert_eq!(c.storage.when_full, WhenFull::DropOldest);
        let d = c.device_configs().next().unwrap();
        assert_eq!(d.dev_addr, Some(DevAddr(0x2600_0001)));
        let s = c.stream_configs().next().unwrap();
        assert_eq!(s.scope(), Scope::Application("farm".into()));
        assert!(s.downlinks);
        let printed = c.to_toml_masked();
        assert!(printed.contains("***"), "{printed}");
        assert!(!printed.contains("s3cret"));
        assert!(!printed.to_lowercase().contains("0102030405"));
    }

    #[test]
    fn empty_config_is_valid_defaults() {
        let c = Config::parse("", "t.toml").unwrap();
        assert_eq!(c.gateway.listen, "0.0.0.0:1700");
        assert_eq!(c.metrics.listen, "127.0.0.1:9100");
    }

    fn err_of(src: &str) -> String {
        Config::parse(src, "t.toml").unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let e = err_of(&GOOD.replace("dev_addr = \"26000001\"", "dev_addr = \"2600001\""));
        assert!(e.starts_with("t.toml:15:"), "{e}");
        assert!(e.contains("expected 8 hex digits, got 7"), "{e}");

        let e = err_of(&GOOD.replace(
            "application = \"farm\"\nid = \"soil-1\"",
            "application = \"farn\"\nid = \"soil-1\"",
        ));
        assert!(
            e.starts_with("t.toml:12: [[device]] \"soil-1\": key `application`"),
            "{e}"
        );
        assert!(e.contains("unknown application \"farn\""), "{e}");

        let e = err_of(&GOOD.replace("[storage]", "[storage]\nflush_evry_ms = 3"));
        assert!(e.starts_with("t.toml:6:"), "{e}");
        assert!(e.contains("unknown field `flush_evry_ms`"), "{e}");

        let e = err_of(&GOOD.replace("password = \"s3cret\"", "url = \"http://x\""));
        assert!(
            e.contains("t.toml:24: [[stream]] \"cloud\": key `url`: not used by kind = \"mqtt\""),
            "{e}"
        );

        let e = err_of(&GOOD.replace("mqtt://127", "tcp://127"));
        assert!(e.contains("key `server`"), "{e}");

        let e = err_of(&GOOD.replace("nwk_s_key = \"000102030405060708090A0B0C0D0E0F\"\n", ""));
        assert!(e.contains("key `nwk_s_key`"), "{e}");
        assert!(
            !e.contains("0102030405"),
            "keys never appear in errors: {e}"
        );

        let e = err_of(
            &GOOD
                .replace("when_full", "x")
                .replace("[storage]", "[storage]\nwhen_full = \"drop_newest\""),
        );
        assert!(e.contains("unknown variant `drop_newest`"), "{e}");

        let e = err_of(&GOOD.replace("[storage]", "[storage]\nbackend = \"rocksdb\""));
        assert!(e.starts_with("t.toml:6:"), "{e}");
        assert!(
            e.contains("unknown variant `rocksdb`, expected `sled` or `redb`"),
            "{e}"
        );
        let c = Config::parse(
            &GOOD.replace("[storage]", "[storage]\nbackend = \"sled\""),
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.storage.backend, StorageBackend::Sled);
        assert!(c.to_toml_masked().contains("backend = \"sled\""));
    }
}

#[cfg(test)]
mod http_tests {
    use super::*;

    const BASE: &str =
        "[[application]]\nid = \"farm\"\n\n[[stream]]\nname = \"hook\"\nkind = \"http\"\n";

    fn parse(extra: &str) -> Result<Config, String> {
        Config::parse(&format!("{BASE}{extra}"), "t.toml").map_err(|e| e.to_string())
    }

    #[test]
    fn a_full_http_stream_is_valid_and_its_headers_are_masked() {
        let c = parse(
            "url = \"https://example.com/up\"\nheaders = { \"X-Api-Key\" = \"k3y-s3cret\", Authorization = \"Bearer t0ken\" }\n\
             batch_max = 50\nbatch_wait_ms = 0\ntimeout_s = 10\non_client_error = \"drop\"\n\
             poll_url = \"https://example.com/down?code=x\"\npoll_interval_s = 5\n\
             ca_file = \"/etc/ca.pem\"\ncert_file = \"c.pem\"\nkey_file = \"c.key\"\n",
        )
        .unwrap();
        let printed = c.to_toml_masked();
        assert!(
            !printed.contains("k3y-s3cret") && !printed.contains("t0ken"),
            "{printed}"
        );
        assert!(
            printed.contains("https://example.com/down?***"),
            "{printed}"
        );
        assert!(
            printed.contains("url = \"https://example.com/up\""),
            "{printed}"
        );
    }

    #[test]
    fn http_mistakes_name_the_key() {
        let e = |extra: &str| parse(extra).unwrap_err();
        assert!(
            e("").contains("key `url`: kind = \"http\" needs url"),
            "{}",
            e("")
        );
        assert!(e("url = \"ftp://x/\"\n").contains("key `url`"));
        assert!(e("url = \"not a url\"\n").contains("is not a URL"));
        let ok = "url = \"http://127.0.0.1:8080/up\"\n";
        assert!(e(&format!("{ok}poll_url = \"mqtt://x\"\n")).contains("key `poll_url`"));
        assert!(e(&format!(
            "{ok}poll_url = \"http://x/p\"\ndownlinks = false\n"
        ))
        .contains("downlinks = false"));
        assert!(e(&format!("{ok}poll_interval_s = 5\n")).contains("set poll_url too"));
        assert!(e(&format!("{ok}batch_max = 0\n")).contains("key `batch_max`"));
        assert!(e(&format!("{ok}timeout_s = 0\n")).contains("key `timeout_s`"));
        assert!(e(&format!("{ok}on_client_error = \"ignore\"\n")).contains("\"retry\""));
        assert!(e(&format!("{ok}cert_file = \"c.pem\"\n")).contains("go together"));
        assert!(e(&format!("{ok}headers = {{ \"Bad Name\" = \"v\" }}\n"))
            .contains("not a valid HTTP header name"));
        assert!(e(&format!(
            "{ok}headers = {{ \"Content-Type\" = \"text/plain\" }}\n"
        ))
        .contains("set by lorastream"));
        let secret_err = e(&format!("{ok}headers = {{ \"X-Key\" = \"abc\\ndef\" }}\n"));
        assert!(
            secret_err.contains("line break") && !secret_err.contains("abc"),
            "{secret_err}"
        );
        assert!(e(&format!("{ok}server = \"mqtt://x\"\n")).contains("not used by kind = \"http\""));
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// config.example.toml stays valid, and its sections show the real defaults.
    #[test]
    fn example_config_is_valid_and_matches_defaults() {
        let src = include_str!("../config.example.toml");
        let c = Config::parse(src, "config.example.toml").unwrap();
        let d = Config::default();
        let same = |a: &dyn erased::Ser, b: &dyn erased::Ser| a.json() == b.json();
        assert!(
            same(&c.gateway, &d.gateway),
            "[gateway] defaults differ from the example"
        );
        assert!(
            same(&c.storage, &d.storage),
            "[storage] defaults differ from the example"
        );
        assert!(
            same(&c.metrics, &d.metrics),
            "[metrics] defaults differ from the example"
        );
        assert!(
            same(&c.log, &d.log),
            "[log] defaults differ from the example"
        );
    }

    mod erased {
        pub trait Ser {
            fn json(&self) -> String;
        }
        impl<T: serde::Serialize> Ser for T {
            fn json(&self) -> String {
                serde_json::to_string(self).unwrap_or_default()
            }
        }
    }
}
