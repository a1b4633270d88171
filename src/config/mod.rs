//! Configuration: one TOML file, parsed once into typed settings.
//!
//! Every value is parsed where it is read from the file (addresses, EUIs, keys, durations, URLs,
//! enums for every closed set), so nothing downstream parses a string again and every default
//! lives here: the stream kinds' in [`streams`], the sections' in their `Default`s, which match
//! `config.example.toml` (a test holds them to it). `lorastream check` prints the result
//! ([`Config::to_toml_masked`]) with every default filled in and every secret as `***`.
//!
//! Errors name the file, the line and the key (`lorastream.toml:14: [[device]] "soil-1": key
//! `dev_addr`: expected 8 hex digits, got 7`), because the person reading them is editing that
//! file over SSH on a gateway. Values are checked by their deserializers, so the `toml` crate's
//! span points at the exact line ([`locate::Source::toml_error`]); cross-references (a device
//! naming an unknown application, a stream scoped to an unknown device, duplicate ids) are
//! checked in [`validate`], which finds the key's line in its own section or entry.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | the file, the four plain sections, loading, printing |
//! | `devices.rs` | `[[application]]`, `[[device]]`: ABP or OTAA; the files of `devices_dir` |
//! | `import/` | `lorastream devices import`: TTS and ChirpStack exports into `devices_dir` |
//! | `remote_devices.rs` | the file of `devices_dir` the `device_upsert`/`device_delete` remote commands edit |
//! | `streams.rs` | `[[stream]]`: one typed settings struct per kind, with its defaults |
//! | `validate.rs` | checks across sections and entries |
//! | `locate.rs` | lines, sections and keys for error messages |

pub mod alerts;
mod devices;
pub mod import;
pub(crate) mod locate;
pub mod remote_devices;
mod streams;
mod validate;

pub use crate::lorawan::region::Region;

/// Why `codec = "javascript"` is refused by a build without the `js` feature (Cargo.toml).
pub const NO_JAVASCRIPT: &str =
    "this build has no JavaScript codecs: rebuild with --features js (or use codec = \"cayennelpp\")";
pub use crate::model::Scope;
pub use alerts::{AlertConfig, AlertKind, AlertScope};
pub use devices::{
    Activation, ApplicationConfig, CodecConfig, CodecKind, DeviceConfig, LorawanVersion,
};
pub use import::ImportError;
pub use streams::defaults as stream_defaults;
pub use streams::{
    azure_device_id, AwsConfig, AzureConfig, AzureIdentity, AzureKey, ClientCert, ClientId,
    DownlinkFormat, Format, FormatConfig, HttpConfig, MqttConfig, OnClientError, PolicyKey,
    PollConfig, ServerUrl, StreamConfig, StreamKind, TemplateConfig, TlsFiles, Transport,
    TunnelConfig,
};
pub use streams::{SmtpConfig, SmtpTls, WebSocketConfig, WsAck};

use crate::model::{Eui64, NetId};
use locate::Source;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// Where the daemon looks when `-c` is not given.
pub const DEFAULT_PATH: &str = "/etc/lorastream/lorastream.toml";
/// The default `[storage] path`: the service's state directory (`StateDirectory=lorastream` in
/// systemd/lorastream.service), the only place the hardened unit lets the daemon write.
pub const STATE_DIR: &str = "/var/lib/lorastream";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}{}", read_hint(source))]
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
    /// `entry` is how the section or entry is named (`[gateway] `, `[[device]] "soil-1": `).
    #[error("{path}:{line}: {entry}key `{key}`: {message}")]
    Invalid {
        path: String,
        line: usize,
        entry: String,
        key: String,
        message: String,
    },
}

// ---- serde helpers: parse where the value is read, so errors carry its span ----

pub(crate) fn de_from_str<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let s = String::deserialize(d)?;
    s.parse::<T>().map_err(serde::de::Error::custom)
}

pub(crate) fn de_opt_from_str<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let s = Option::<String>::deserialize(d)?;
    s.map(|s| s.parse::<T>().map_err(serde::de::Error::custom))
        .transpose()
}

pub(crate) fn ser_display<S: Serializer, T: std::fmt::Display>(
    v: &T,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

pub(crate) fn ser_opt_display<S: Serializer, T: std::fmt::Display>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

fn de_listen<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(|_| {
        serde::de::Error::custom(format!("{s:?} is not an IP:port (e.g. \"0.0.0.0:1700\")"))
    })
}

/// `""` disables; anything else is an IP:port.
fn de_opt_listen<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "{s:?} is not an IP:port (e.g. \"127.0.0.1:9100\"), or \"\" to disable"
        ))
    })
}

fn ser_opt_listen<S: Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(a) => s.collect_str(a),
        None => s.serialize_str(""),
    }
}

/// A duration written like "7d" or "12h"; `""` means none.
fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Ok(None);
    }
    humantime::parse_duration(&s)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("{s:?}: {e} (write e.g. \"7d\" or \"12h\")")))
}

/// A duration written like "24h" or "90s" ("0s" where the key says what zero means).
fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!("{s:?}: {e} (write e.g. \"24h\" or \"90s\")"))
    })
}

fn ser_duration<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*v))
}

fn ser_opt_duration<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(d) => s.collect_str(&humantime::format_duration(*d)),
        None => s.serialize_str(""),
    }
}

// ---- the file ----

/// The whole configuration, typed.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub storage: StorageConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub runtime: RuntimeConfig,
    pub applications: Vec<ApplicationConfig>,
    pub devices: Vec<DeviceConfig>,
    pub streams: Vec<StreamConfig>,
    pub alerts: Vec<AlertConfig>,
    /// Where the devices came from, in the order of `devices`: the main file first, then each
    /// file of `[gateway] devices_dir` (sorted by name), with how many devices each holds.
    pub device_sources: Vec<DeviceSource>,
}

/// One file that contributed `[[device]]` tables (logged at start, printed by `check`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSource {
    pub path: PathBuf,
    pub devices: usize,
}

/// The file as written: the plain sections are already typed; entries keep their spans (for
/// error lines) until [`Config::parse`] turns them into their typed forms.
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct RawFile {
    gateway: GatewayConfig,
    storage: StorageConfig,
    metrics: MetricsConfig,
    log: LogConfig,
    runtime: RuntimeConfig,
    #[serde(rename = "application")]
    applications: Vec<Spanned<devices::RawApplication>>,
    #[serde(rename = "device")]
    devices: Vec<Spanned<devices::RawDevice>>,
    #[serde(rename = "stream")]
    streams: Vec<Spanned<streams::RawStream>>,
    #[serde(rename = "alert")]
    alerts: Vec<Spanned<alerts::RawAlert>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// UDP address the packet forwarders send to.
    #[serde(deserialize_with = "de_listen", serialize_with = "ser_display")]
    pub listen: SocketAddr,
    pub region: Region,
    /// Receptions of the same frame within this window are merged into one uplink.
    pub dedup_window_ms: u64,
    /// SO_RCVBUF of the UDP socket; bursts beyond it are lost by the kernel, so keep it large.
    pub udp_recv_buffer: usize,
    /// The EUI of this gateway, used for the MQTT last will (`gateways/{eui}/status`) and the
    /// default client id. Optional; without it the status is published per forwarder seen.
    #[serde(
        deserialize_with = "de_opt_from_str",
        serialize_with = "ser_opt_display",
        skip_serializing_if = "Option::is_none"
    )]
    pub eui: Option<Eui64>,
    /// NetID for OTAA DevAddrs (6 hex digits). 000000 and 000001 are for private networks;
    /// DevAddrs get the NetID's 7-bit NwkID as their top bits.
    #[serde(deserialize_with = "de_from_str", serialize_with = "ser_display")]
    pub net_id: NetId,
    /// RX2 data rate for every device (default: the region's, e.g. DR0 in EU868; TTN uses DR3
    /// there). OTAA devices learn it from the JoinAccept; ABP devices must be set to the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rx2_dr: Option<u8>,
    /// US915/AU915: the 8-channel sub-band (1..8) the gateway listens on. JoinAccepts then carry
    /// a channel-mask CFList (type 1) enabling only those channels and their 500 kHz channel;
    /// devices of LoRaWAN 1.0.3 or later apply it, earlier ones ignore it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub_band: Option<u8>,
    /// Regions with a channel list (EU868, AS923, KR920, IN865): the uplink channels (MHz) the
    /// gateway listens on beside the region's default ones. JoinAccepts (CFList) and ABP
    /// devices (NewChannelReq) are given them. Default: the common plan of the region
    /// ([`crate::lorawan::region::extra_channels`], EU868 867.1..867.9); `[]` = defaults only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra_channels: Option<Vec<f64>>,
    /// Manage the data rate, power and NbTrans of devices that set the ADR bit (LinkADRReq);
    /// a device may opt out with its own `adr = false`.
    pub adr: bool,
    /// Installation margin of ADR (dB kept above the demodulation floor).
    pub adr_margin_db: f32,
    /// Ask each device for its battery and link margin (DevStatusReq) this often; the first
    /// request comes one interval after the device is first heard. "0s" = never.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub dev_status_interval: Duration,
    /// Class C devices never heard since they were configured get their downlinks through
    /// this gateway (default: the only gateway with a downlink path, if there is one).
    #[serde(
        deserialize_with = "de_opt_from_str",
        serialize_with = "ser_opt_display",
        skip_serializing_if = "Option::is_none"
    )]
    pub class_c_gateway: Option<Eui64>,
    /// Packet forwarders remembered at most (docs/reliability.md): a new one beyond this takes
    /// the place of one silent for a minute, or is refused (counted).
    pub max_gateways: usize,
    /// Only these forwarders are served (empty: every one). Datagrams of others are dropped
    /// before anything else is done with them, counted and logged (rate-limited).
    #[serde(deserialize_with = "de_eui_list", serialize_with = "ser_eui_list")]
    pub allowed_gateways: Vec<Eui64>,
    /// A known forwarder's new source address is taken only once the old one has been silent
    /// for a minute (a spoofed PULL_DATA cannot redirect its downlinks).
    pub pin_gateway_address: bool,
    /// A directory of `*.toml` files holding more `[[device]]` tables (same keys as in this
    /// file), read at start and by `lorastream check`, sorted by name; other files are ignored.
    /// A relative path is relative to the directory of this file. Absent: no directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices_dir: Option<PathBuf>,
    /// Longest a payload codec may run for one uplink or downlink (JavaScript codecs): a
    /// script still running then is interrupted, and the uplink is delivered without
    /// `decoded_payload`, with the error.
    pub codec_timeout_ms: u64,
}

fn de_eui_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Eui64>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| {
            s.parse::<Eui64>()
                .map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
        })
        .collect()
}

fn ser_eui_list<S: Serializer>(v: &[Eui64], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|e| e.to_string()))
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 1700)),
            region: Region::EU868,
            dedup_window_ms: 200,
            udp_recv_buffer: 8 * 1024 * 1024,
            eui: None,
            net_id: NetId(0),
            rx2_dr: None,
            sub_band: None,
            extra_channels: None,
            adr: true,
            adr_margin_db: 10.0,
            dev_status_interval: Duration::from_secs(24 * 3600),
            class_c_gateway: None,
            max_gateways: 1000,
            allowed_gateways: Vec::new(),
            pin_gateway_address: false,
            devices_dir: None,
            codec_timeout_ms: 100,
        }
    }
}

impl GatewayConfig {
    /// `devices_dir` as a path: a relative one is taken from the config file's directory.
    pub fn devices_dir_at(&self, config_path: &Path) -> Option<PathBuf> {
        self.devices_dir
            .as_deref()
            .map(|d| resolve_dir(&config_path.display().to_string(), d))
    }

    pub fn dedup_window(&self) -> Duration {
        Duration::from_millis(self.dedup_window_ms)
    }

    pub fn codec_timeout(&self) -> Duration {
        Duration::from_millis(self.codec_timeout_ms)
    }

    /// The extra uplink channels in Hz: the configured ones, else the region's plan.
    pub fn extra_channels_hz(&self) -> Vec<u32> {
        match &self.extra_channels {
            Some(mhz) => mhz.iter().map(|f| mhz_to_hz(*f)).collect(),
            None => crate::lorawan::region::extra_channels(self.region).to_vec(),
        }
    }
}

/// `[gateway] devices_dir` as written, relative to the config file's directory.
fn resolve_dir(config_path: &str, dir: &Path) -> PathBuf {
    match Path::new(config_path).parent() {
        Some(base) if dir.is_relative() => base.join(dir),
        _ => dir.to_path_buf(),
    }
}

/// MHz as written in the config to Hz, on the 100 Hz grid LoRaWAN encodes.
pub(crate) fn mhz_to_hz(mhz: f64) -> u32 {
    ((mhz * 10_000.0).round() as u32).saturating_mul(100)
}

/// What to do when the queues reach `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    #[default]
    DropOldest,
    RejectNew,
}

impl WhenFull {
    pub fn name(self) -> &'static str {
        match self {
            WhenFull::DropOldest => "drop_oldest",
            WhenFull::RejectNew => "reject_new",
        }
    }
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
    /// Drop queued messages older than this ("7d", "12h"; "" = keep until delivered or
    /// pushed out by `max_bytes`). Expired drops are counted per stream.
    #[serde(
        deserialize_with = "de_opt_duration",
        serialize_with = "ser_opt_duration"
    )]
    pub max_age: Option<Duration>,
    /// Disk space set aside (preallocated) for the journal, so that uplinks still survive a
    /// kill while the disk is full; 0 = none (docs/reliability.md).
    pub reserve_bytes: u64,
}

impl StorageConfig {
    /// For a store outside [`STATE_DIR`]: what the packaged systemd unit needs to let the
    /// daemon write there (`ProtectSystem=strict` makes every other path read-only).
    pub fn outside_state_dir_note(&self) -> Option<String> {
        if self.path.starts_with(STATE_DIR) {
            return None;
        }
        Some(format!(
            "[storage] path = {} is outside {STATE_DIR}: under the packaged systemd unit (ProtectSystem=strict) lorastream can write only to {STATE_DIR}; allow this path with `sudo systemctl edit lorastream` and the lines `[Service]` and `ReadWritePaths={}`, and make it writable for the user lorastream",
            self.path.display(),
            self.path.display()
        ))
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            path: PathBuf::from(STATE_DIR),
            backend: StorageBackend::default(),
            max_bytes: 256 * 1024 * 1024,
            when_full: WhenFull::DropOldest,
            flush_every_ms: 100,
            cache_bytes: 8 * 1024 * 1024,
            max_age: None,
            reserve_bytes: 8 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(from = "RawMetrics")]
pub struct MetricsConfig {
    /// Prometheus `/metrics` and JSON `/health`; `""` (None) disables the endpoint.
    #[serde(serialize_with = "ser_opt_listen")]
    pub listen: Option<SocketAddr>,
    /// `listen` was not written, so it is the default, 127.0.0.1:9100, which Prometheus'
    /// node_exporter uses too: when another program has it, the daemon listens on the next
    /// free one of [`METRICS_FALLBACK_PORTS`] instead ([`MetricsConfig::candidates`]). A port
    /// that was written is used as written or not at all.
    #[serde(skip)]
    pub listen_is_default: bool,
}

/// Where the metrics listener goes, in order, when `[metrics] listen` is not written and
/// 127.0.0.1:9100 is taken (by node_exporter, usually).
pub const METRICS_FALLBACK_PORTS: [u16; 2] = [9101, 9102];

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9100))),
            listen_is_default: true,
        }
    }
}

impl MetricsConfig {
    /// The addresses the daemon tries for its listener, in order (and where `queue`, `check
    /// --online` and the other commands look for a running daemon): `listen` alone when it
    /// was written (or set to another address in code), the default and then
    /// [`METRICS_FALLBACK_PORTS`] when it was not.
    pub fn candidates(&self) -> Vec<SocketAddr> {
        let Some(first) = self.listen else {
            return Vec::new();
        };
        let mut out = vec![first];
        if self.listen_is_default && Some(first) == MetricsConfig::default().listen {
            out.extend(METRICS_FALLBACK_PORTS.iter().map(|&p| {
                let mut a = first;
                a.set_port(p);
                a
            }));
        }
        out
    }
}

/// `[metrics]` as written: whether `listen` is there matters ([`MetricsConfig::listen_is_default`]).
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct RawMetrics {
    #[serde(deserialize_with = "de_written_listen")]
    listen: Option<Option<SocketAddr>>,
}

fn de_written_listen<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<SocketAddr>>, D::Error> {
    de_opt_listen(d).map(Some)
}

impl From<RawMetrics> for MetricsConfig {
    fn from(raw: RawMetrics) -> Self {
        match raw.listen {
            None => MetricsConfig::default(),
            Some(listen) => MetricsConfig {
                listen,
                listen_is_default: false,
            },
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug`, `trace`, or a tracing filter (`lorastream=debug`).
    /// `RUST_LOG` overrides it. SIGHUP re-reads it (see `logs`).
    pub level: String,
    /// How log lines are written (see [`LogFormat`]).
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// `[runtime]`: how the daemon's own work is scheduled. Read at start only.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Threads that run the pipeline's tasks (UDP, devices, store appends, streams, the web
    /// server); 0 = one per CPU core. Disk syncs, engine commits and JavaScript codecs have
    /// threads of their own whatever this is.
    pub worker_threads: usize,
}

/// Most `[runtime] worker_threads` (beyond, threads only wait for each other).
pub const MAX_WORKER_THREADS: usize = 64;

impl Default for RuntimeConfig {
    fn default() -> Self {
        // One: on a gateway's traffic (up to a few thousand uplinks/s) two or more workers
        // spend a fifth more CPU per uplink waking each other (docs/benchmarks.md, "One
        // runtime worker"), and one takes 15,000/s with room.
        RuntimeConfig { worker_threads: 1 }
    }
}

impl RuntimeConfig {
    /// The worker count to start the runtime with (`None`: tokio's default, one per core).
    pub fn workers(&self) -> Option<usize> {
        (self.worker_threads > 0).then_some(self.worker_threads)
    }
}

/// `[log] format`: where and how the daemon's log lines go (src/logs.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One line per event on stderr: `LEVEL target: message key=value ...`. Colours only when
    /// stderr is a terminal; under systemd (stderr connected to the journal) without the
    /// timestamp and with the priority as a `<N>` prefix, so `journalctl -p warning` works.
    #[default]
    Text,
    /// One JSON object per line on stderr (`timestamp`, `level`, `target`, `fields`).
    Json,
    /// Straight to the systemd journal, every field a journal field (`DEV_EUI=...`); falls back
    /// to `text` on stderr where no journal runs.
    Journald,
}

impl LogFormat {
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
            LogFormat::Journald => "journald",
        }
    }
}

/// What to do about a config file that cannot be read, where the cause is the usual one.
fn read_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        // The package installs it root:lorastream 0640.
        std::io::ErrorKind::PermissionDenied => {
            " (run the command with sudo, or add yourself to the group lorastream: `sudo usermod -aG lorastream $USER`, then log in again)"
        }
        std::io::ErrorKind::NotFound => {
            " (give the file with -c/--config; the package installs /etc/lorastream/lorastream.toml, and config.example.toml lists every key)"
        }
        _ => "",
    }
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

    /// Parse and validate config text; `path` names it in messages, and a relative
    /// `[gateway] devices_dir` is taken relative to its directory.
    pub fn parse(src: &str, path: &str) -> Result<Config, ConfigError> {
        let source = Source::new(path, src);
        let raw: RawFile = toml::from_str(src).map_err(|e| source.toml_error(&e))?;
        validate::sections(&raw.gateway, &raw.storage, &raw.log, &source)?;
        validate::runtime(&raw.runtime, &source)?;
        let mut app_spans = Vec::with_capacity(raw.applications.len());
        for a in raw.applications {
            let span = a.span();
            app_spans.push((
                devices::build_application(a.into_inner(), &span, &source)?,
                span,
            ));
        }
        let apps: Vec<ApplicationConfig> = app_spans.iter().map(|(a, _)| a.clone()).collect();
        let applications = validate::applications(&apps, &source)?;
        // The devices_dir files, read whole before any is parsed: their sources must outlive
        // the checks across files (a duplicate names the file it is in).
        let dir_files = match &raw.gateway.devices_dir {
            Some(dir) => devices::read_dir(&resolve_dir(path, dir))
                .map_err(|m| source.section_error("[gateway]", "devices_dir", m))?,
            None => Vec::new(),
        };
        let mut sources = vec![source];
        sources.extend(dir_files.iter().map(|(p, text)| Source::new(p, text)));
        let mut device_sources = vec![DeviceSource {
            path: PathBuf::from(path),
            devices: raw.devices.len(),
        }];
        // (device, its span, the index of its source in `sources`)
        let mut located = Vec::with_capacity(raw.devices.len());
        for d in raw.devices {
            let span = d.span();
            located.push((devices::build(d.into_inner(), &span, &source)?, span, 0));
        }
        for (i, file) in sources.iter().enumerate().skip(1) {
            let found = devices::parse_file(file)?;
            device_sources.push(DeviceSource {
                path: PathBuf::from(file.path),
                devices: found.len(),
            });
            located.extend(found.into_iter().map(|(d, span)| (d, span, i)));
        }
        validate::devices(&located, &applications, &sources)?;
        #[cfg(feature = "js")]
        validate::codec_scripts(&app_spans, &located, &sources)?;
        let devices: Vec<DeviceConfig> = located.into_iter().map(|(d, _, _)| d).collect();
        let ctx = streams::Context {
            gateway_eui: raw.gateway.eui,
            when_full: raw.storage.when_full,
        };
        let mut streams = Vec::with_capacity(raw.streams.len());
        for s in raw.streams {
            let span = s.span();
            streams.push((streams::build(s.into_inner(), &ctx, &span, &source)?, span));
        }
        validate::streams(&streams, &devices, &applications, &source)?;
        let streams: Vec<StreamConfig> = streams.into_iter().map(|(s, _)| s).collect();
        let app_ids: Vec<String> = apps.iter().map(|a| a.id.clone()).collect();
        let mut alerts = Vec::with_capacity(raw.alerts.len());
        for a in raw.alerts {
            let span = a.span();
            alerts.push(alerts::build(
                a.into_inner(),
                &span,
                &source,
                &streams,
                &devices,
                &app_ids,
            )?);
        }
        Ok(Config {
            gateway: raw.gateway,
            storage: raw.storage,
            metrics: raw.metrics,
            log: raw.log,
            runtime: raw.runtime,
            applications: apps,
            devices,
            streams,
            alerts,
            device_sources,
        })
    }

    /// The payload codec of a device: its own, else its application's.
    pub fn codec_of(&self, d: &DeviceConfig) -> CodecConfig {
        match &d.codec {
            Some(c) => c.clone(),
            None => self
                .applications
                .iter()
                .find(|a| a.id == d.application)
                .map(|a| a.codec.clone())
                .unwrap_or_default(),
        }
    }

    /// `12 devices from lorastream.toml, 300 from devices.d/farm.toml` (logs, `check`).
    /// Devices whose uplinks no stream takes (no record-taking stream's scope covers them):
    /// `check` warns about them, and the daemon counts such uplinks.
    pub fn devices_without_stream(&self) -> Vec<&DeviceConfig> {
        self.devices
            .iter()
            .filter(|d| {
                !self
                    .streams
                    .iter()
                    .any(|s| s.takes_records() && s.scope.covers(&d.application, &d.id))
            })
            .collect()
    }

    pub fn device_sources_summary(&self) -> String {
        let parts: Vec<String> = self
            .device_sources
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let what = if i == 0 { " devices" } else { "" };
                format!("{}{what} from {}", s.devices, s.path.display())
            })
            .collect();
        parts.join(", ")
    }

    /// The effective configuration as TOML: every default filled in, secrets as `***`.
    pub fn to_toml_masked(&self) -> String {
        let mut doc = toml::Table::new();
        let mut section = |name: &str, v: Result<toml::Table, toml::ser::Error>| {
            if let Ok(t) = v {
                doc.insert(name.into(), toml::Value::Table(t));
            }
        };
        section("gateway", toml::Table::try_from(&self.gateway));
        section("storage", toml::Table::try_from(&self.storage));
        section("metrics", toml::Table::try_from(&self.metrics));
        section("log", toml::Table::try_from(&self.log));
        section("runtime", toml::Table::try_from(&self.runtime));
        let array = |tables: Vec<toml::Table>| {
            toml::Value::Array(tables.into_iter().map(toml::Value::Table).collect())
        };
        doc.insert(
            "application".into(),
            array(self.applications.iter().map(|a| a.effective()).collect()),
        );
        doc.insert(
            "device".into(),
            array(self.devices.iter().map(|d| d.effective()).collect()),
        );
        doc.insert(
            "stream".into(),
            array(self.streams.iter().map(|s| s.effective()).collect()),
        );
        if !self.alerts.is_empty() {
            doc.insert(
                "alert".into(),
                array(self.alerts.iter().map(|a| a.effective()).collect()),
            );
        }
        toml::to_string_pretty(&doc).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }
}

#[cfg(test)]
mod tests;
