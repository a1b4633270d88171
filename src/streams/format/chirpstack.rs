//! ChirpStack v4 integration events as protobuf-JSON (`format = "chirpstack"`).
//!
//! Role: publish lorastream's records in the exact JSON that ChirpStack's MQTT integration
//! publishes with `json = true`, so consumers written for ChirpStack (Node-RED flows, dashboards,
//! its integrations' consumers) work unchanged, and parse the downlink commands those consumers
//! send on `application/{application_id}/device/{dev_eui}/command/down`.
//!
//! Sources (chirpstack/chirpstack, v4.x; checked against the `chirpstack-api` 4.20.0 Python
//! package's descriptors):
//! - `api/proto/integration/integration.proto`: `UplinkEvent`, `JoinEvent`, `AckEvent`,
//!   `TxAckEvent`, `StatusEvent`, `DeviceInfo`, `DownlinkCommand`.
//! - `api/proto/gw/gw.proto`: `UplinkRxInfo`, `UplinkTxInfo`, `Modulation`,
//!   `LoraModulationInfo`, `DownlinkTxInfo`, `Timing`, `DelayTimingInfo`, enums `CodeRate` and
//!   `CRCStatus`.
//! - `api/proto/common/common.proto`: enum `DeviceClass`.
//! - `api/rust/build.rs`: the JSON is made by `pbjson` (`serde_json::to_vec(&event)` in
//!   `chirpstack/src/integration/mqtt.rs`), and only the `integration` package is built with
//!   `emit_fields()`. So, exactly as ChirpStack does:
//!   - in `integration.*` messages every scalar, string, bytes, enum, map and repeated field is
//!     written even when it holds its default (`"adr": false`, `"tags": {}`, `"regionConfigId": ""`);
//!   - in `gw.*` / `common.*` messages defaults are left out (`rfChain: 0`, an empty `context`,
//!     `polarizationInversion: false` never appear);
//!   - message-typed fields (`time`, `deviceInfo`, `object`, `txInfo`, `relayRxInfo`,
//!     `joinServerContext`, `location`) appear only when set.
//!
//! Encodings (proto3 JSON mapping as pbjson implements it): lowerCamelCase names; enums as
//! their names (`"CR_4_5"`, `"CRC_OK"`, `"CLASS_A"`); `bytes` as standard base64 with padding;
//! `uint32`/`int32`/`float` as JSON numbers (no 64-bit integers occur in these messages);
//! `google.protobuf.Timestamp` as chrono's `to_rfc3339()` (`+00:00`, 0/3/6/9 fraction digits,
//! pbjson-types `timestamp.rs`); `google.protobuf.Duration` as `"1s"`; `google.protobuf.Struct`
//! numbers are doubles, so `object` writes `21` as `21.0` (what ChirpStack publishes,
//! chirpstack/chirpstack#77).
//!
//! Guarantees: the output of a record is a pure function of its inputs (ids derive from the
//! record's ULID), so a redelivery after a restart is byte-identical; building an event never
//! fails; parsing a downlink command never panics and reports every refusal as a
//! [`CommandError`].

use crate::lorawan::region::Region;
use crate::model::{
    new_id, DevAddr, DownlinkEvent, DownlinkEventKind, DownlinkItem, DownlinkOp, DownlinkRequest,
    Eui64, Join, RequestError, RxInfo, TxSettings, Uplink, MAX_PAYLOAD,
};
use base64::Engine;
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

// ---------------------------------------------------------------------------------------------
// Inputs that the model does not carry.

/// `common.DeviceClass` (common.proto). ChirpStack writes the class the device currently runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DeviceClass {
    #[default]
    A,
    B,
    C,
}

impl DeviceClass {
    /// The enum value name, as protobuf-JSON writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceClass::A => "CLASS_A",
            DeviceClass::B => "CLASS_B",
            DeviceClass::C => "CLASS_C",
        }
    }
}

/// What every event of one device needs besides the record itself: the device's class and
/// tags (lorastream has no device profiles; tags are empty until the config grows them) and
/// ChirpStack's names of the region (see [`region_names`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventMeta {
    pub device_class: DeviceClass,
    pub tags: BTreeMap<String, String>,
    /// ChirpStack's region configuration id (`"eu868"`): `UplinkEvent.regionConfigId` and
    /// `rxInfo[].metadata.region_config_id`.
    pub region_config_id: &'static str,
    /// ChirpStack's `common.Region` name (`"EU868"`): `rxInfo[].metadata.region_common_name`.
    pub region_common_name: &'static str,
}

/// ChirpStack's `(region_common_name, region_config_id)` for `[gateway] region` (and
/// `sub_band` for US915/AU915).
///
/// Common names are the `common.Region` enum names. Config ids are the ids of the region files
/// ChirpStack ships (`eu868`, `as923`); for US915/AU915 ChirpStack ships one file per 8-channel
/// sub-band, `us915_0` for channels 0-7 (lorastream's `sub_band = 1`) to `us915_7`, so the
/// configured sub-band picks it; without one, the plain lower-case name (`us915`).
pub fn region_names(region: Region, sub_band: Option<u8>) -> (&'static str, &'static str) {
    const US: [&str; 8] = [
        "us915_0", "us915_1", "us915_2", "us915_3", "us915_4", "us915_5", "us915_6", "us915_7",
    ];
    const AU: [&str; 8] = [
        "au915_0", "au915_1", "au915_2", "au915_3", "au915_4", "au915_5", "au915_6", "au915_7",
    ];
    let band = sub_band
        .and_then(|b| usize::from(b).checked_sub(1))
        .filter(|&b| b < 8);
    match region {
        Region::EU868 => ("EU868", "eu868"),
        Region::US915 => ("US915", band.map_or("us915", |b| US[b])),
        Region::AU915 => ("AU915", band.map_or("au915", |b| AU[b])),
        // ChirpStack's common.Region names and its default region configuration ids.
        Region::AS923_1 => ("AS923", "as923"),
        Region::AS923_2 => ("AS923_2", "as923_2"),
        Region::AS923_3 => ("AS923_3", "as923_3"),
        Region::AS923_4 => ("AS923_4", "as923_4"),
        Region::KR920 => ("KR920", "kr920"),
        Region::IN865 => ("IN865", "in865"),
    }
}

/// The device an ack/txack/status event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRef<'a> {
    pub application: &'a str,
    pub device: &'a str,
    pub dev_eui: Eui64,
}

/// A confirmed downlink was acknowledged by the device, or was not (`integration.AckEvent`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack<'a> {
    pub device: DeviceRef<'a>,
    /// The uplink that carried (or lacked) the ACK bit: its ULID becomes `deduplicationId`.
    /// `None` (e.g. a timeout with no uplink) writes `""`.
    pub uplink_id: Option<u128>,
    pub time_us: i64,
    /// The downlink's ULID (`DownlinkItem::id`), written as the UUID `queueItemId`.
    pub queue_item_id: u128,
    pub acknowledged: bool,
    pub f_cnt_down: u32,
}

/// When the gateway transmits (`gw.Timing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxTiming {
    /// Class C: at once (`{"immediately": {}}`).
    Immediately,
    /// Class A / join: this long after the uplink's concentrator timestamp (RX1 1 s, RX2 2 s,
    /// join 5 s/6 s): `{"delay": {"delay": "1s"}}`.
    Delay(Duration),
}

/// How a downlink was sent (`gw.DownlinkTxInfo`).
#[derive(Debug, Clone, PartialEq)]
pub struct DownlinkTx {
    pub settings: TxSettings,
    pub power_dbm: i32,
    pub timing: TxTiming,
    /// The uplink's concentrator timestamp a delayed downlink counts from; written as
    /// `context` the way ChirpStack's Semtech UDP backends do (4 bytes, big-endian).
    pub context_tmst: Option<u32>,
}

/// A gateway accepted a downlink for transmission (`integration.TxAckEvent`).
#[derive(Debug, Clone, PartialEq)]
pub struct TxAck<'a> {
    pub device: DeviceRef<'a>,
    /// The downlink's ULID: `queueItemId` (UUID) and, its low 32 bits, `downlinkId`
    /// (ChirpStack's per-frame `uint32` id; consumers only correlate with it).
    pub queue_item_id: u128,
    pub time_us: i64,
    pub f_cnt_down: u32,
    pub gateway: Eui64,
    pub tx: DownlinkTx,
}

/// A DevStatusAns (LoRaWAN 1.0.4 §5.5) was received (`integration.StatusEvent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevStatus<'a> {
    pub device: DeviceRef<'a>,
    /// The uplink that carried the answer: `deduplicationId`.
    pub uplink_id: u128,
    pub time_us: i64,
    /// Battery byte: 0 = external power, 1..=254 = level, 255 = cannot measure.
    pub battery: u8,
    /// Demodulation margin in dB, −32..=31 (see [`margin_from_byte`]).
    pub margin: i8,
}

/// The signed 6-bit margin of a DevStatusAns byte (bits 5..0, two's complement; LoRaWAN
/// 1.0.4 §5.5).
pub fn margin_from_byte(b: u8) -> i8 {
    let m = (b & 0x3f) as i8;
    if m & 0x20 != 0 {
        m - 0x40
    } else {
        m
    }
}

// ---------------------------------------------------------------------------------------------
// Topics.

/// The events lorastream publishes (topic suffix `event/{..}`). Current ChirpStack v4 publishes
/// all of them on the one event topic, not retained (`chirpstack/src/integration/mqtt.rs`;
/// early v4 releases used a retained `state` topic for join/status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Up,
    Join,
    Ack,
    TxAck,
    Status,
    /// `integration.LogEvent`: here, a downlink that failed.
    Log,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Up => "up",
            Event::Join => "join",
            Event::Ack => "ack",
            Event::TxAck => "txack",
            Event::Status => "status",
            Event::Log => "log",
        }
    }
}

/// `application/{application_id}/device/{dev_eui}/event/{event}`, the DevEUI in lower case as
/// ChirpStack writes EUIs (lrwn `EUI64` Display).
pub fn event_topic(application_id: &str, dev_eui: Eui64, event: Event) -> String {
    format!(
        "application/{application_id}/device/{}/event/{}",
        dev_eui.to_lower_hex(),
        event.as_str()
    )
}

/// `application/{application_id}/device/{dev_eui}/command/down`.
pub fn command_down_topic(application_id: &str, dev_eui: Eui64) -> String {
    format!(
        "application/{application_id}/device/{}/command/down",
        dev_eui.to_lower_hex()
    )
}

/// The subscription that receives the downlink commands of one application, or of all.
pub fn command_subscription(application_id: Option<&str>) -> String {
    format!(
        "application/{}/device/+/command/down",
        application_id.unwrap_or("+")
    )
}

/// A parsed command topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandTopic {
    pub application_id: String,
    pub dev_eui: Eui64,
    /// `"down"` is the only command ChirpStack knows; others are refused by [`parse_command`].
    pub command: String,
}

/// Parses `application/{application_id}/device/{dev_eui}/command/{command}`.
pub fn parse_command_topic(topic: &str) -> Result<CommandTopic, CommandError> {
    let parts: Vec<&str> = topic.split('/').collect();
    match parts.as_slice() {
        ["application", app, "device", eui, "command", cmd]
            if !app.is_empty() && !cmd.is_empty() =>
        {
            let dev_eui = eui
                .parse::<Eui64>()
                .map_err(|source| CommandError::TopicDevEui {
                    value: (*eui).to_string(),
                    source,
                })?;
            Ok(CommandTopic {
                application_id: (*app).to_string(),
                dev_eui,
                command: (*cmd).to_string(),
            })
        }
        _ => Err(CommandError::Topic(topic.to_string())),
    }
}

// ---------------------------------------------------------------------------------------------
// Value encodings.

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A ULID as the UUID text ChirpStack uses for ids (`deduplicationId`, `queueItemId`): the same
/// 128 bits, lower-case 8-4-4-4-12. Stable for one record across redeliveries.
pub fn uuid_string(id: u128) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        (id >> 96) as u32,
        (id >> 80) as u16,
        (id >> 64) as u16,
        (id >> 48) as u16,
        id & 0xffff_ffff_ffff
    )
}

/// A `google.protobuf.Timestamp` as pbjson-types writes it: chrono's `to_rfc3339()`, i.e.
/// `SecondsFormat::AutoSi` (no fraction, or 3, 6 or 9 digits, whichever shows every non-zero
/// digit) and `+00:00` rather than `Z`.
pub fn pb_timestamp(t: SystemTime) -> String {
    // Four-digit years only (humantime refuses later ones): a clock that far off is clamped.
    let d = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .min(Duration::new(253_402_300_799, 999_999_999));
    let whole = UNIX_EPOCH + Duration::from_secs(d.as_secs());
    // humantime writes `YYYY-MM-DDTHH:MM:SSZ` for whole seconds.
    let base = humantime::format_rfc3339_seconds(whole).to_string();
    let base = base.trim_end_matches('Z');
    let nanos = d.subsec_nanos();
    let frac = if nanos == 0 {
        String::new()
    } else if nanos % 1_000_000 == 0 {
        format!(".{:03}", nanos / 1_000_000)
    } else if nanos % 1_000 == 0 {
        format!(".{:06}", nanos / 1_000)
    } else {
        format!(".{nanos:09}")
    };
    format!("{base}{frac}+00:00")
}

/// [`pb_timestamp`] of Unix microseconds (times before 1970 are clamped to the epoch, as in
/// the TTS layout).
pub fn pb_timestamp_us(us: i64) -> String {
    pb_timestamp(UNIX_EPOCH + Duration::from_micros(us.max(0) as u64))
}

/// `gw.CodeRate` of a Semtech `codr` string; `None` = `CR_UNDEFINED` (left out).
fn code_rate(cr: &str) -> Option<&'static str> {
    Some(match cr.trim().to_ascii_uppercase().as_str() {
        "4/5" => "CR_4_5",
        "4/6" | "2/3" => "CR_4_6",
        "4/7" => "CR_4_7",
        "4/8" | "2/4" | "1/2" => "CR_4_8",
        "4/5LI" => "CR_LI_4_5",
        "4/6LI" => "CR_LI_4_6",
        "4/8LI" => "CR_LI_4_8",
        _ => return None,
    })
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}
fn is_zero_i32(v: &i32) -> bool {
    *v == 0
}
fn is_zero_f32(v: &f32) -> bool {
    *v == 0.0
}
fn is_false(v: &bool) -> bool {
    !*v
}

/// `google.protobuf.Struct`: the decoded payload with every number as a double, as pbjson-types
/// `Value::NumberValue(f64)` serializes it (integers > 2^53 lose precision there too).
struct PbStruct<'a>(&'a serde_json::Map<String, serde_json::Value>);
struct PbValue<'a>(&'a serde_json::Value);

impl Serialize for PbStruct<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            m.serialize_entry(k, &PbValue(v))?;
        }
        m.end()
    }
}

impl Serialize for PbValue<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde_json::Value as V;
        match self.0 {
            V::Null => s.serialize_unit(),
            V::Bool(b) => s.serialize_bool(*b),
            // A JSON number always has an f64 form (serde_json without arbitrary_precision).
            V::Number(n) => s.serialize_f64(n.as_f64().unwrap_or_default()),
            V::String(t) => s.serialize_str(t),
            V::Array(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for v in a {
                    seq.serialize_element(&PbValue(v))?;
                }
                seq.end()
            }
            V::Object(o) => PbStruct(o).serialize(s),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Messages. Field order = declaration order in the .proto files, as pbjson writes them.

/// `integration.DeviceInfo` (emit_fields: all written).
///
/// lorastream has no tenants and no device profiles; these are the choices:
/// - `tenantId`, `tenantName`: `""`. There is no tenant; the proto3 default says "not set"
///   without inventing a UUID that a consumer could mistake for a real ChirpStack tenant.
/// - `applicationId`: the lorastream application id (`farm`). ChirpStack uses a UUID, but
///   consumers use it only as it appears in the topic, which carries the same string.
/// - `applicationName`: the application id too (lorastream applications have no other name).
/// - `deviceProfileId`, `deviceProfileName`: `""` (no device profiles).
/// - `deviceName`: the lorastream device id (`soil-1`), ChirpStack's human name for a device.
/// - `devEui`: lower-case hex, as ChirpStack writes it.
/// - `deviceClassEnabled`: the device's configured class.
/// - `tags`: [`EventMeta::tags`] (`{}` today).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DeviceInfo<'a> {
    tenant_id: &'a str,
    tenant_name: &'a str,
    application_id: &'a str,
    application_name: &'a str,
    device_profile_id: &'a str,
    device_profile_name: &'a str,
    device_name: &'a str,
    dev_eui: String,
    device_class_enabled: &'static str,
    tags: &'a BTreeMap<String, String>,
}

fn device_info<'a>(
    application: &'a str,
    device: &'a str,
    dev_eui: Eui64,
    meta: &'a EventMeta,
) -> DeviceInfo<'a> {
    DeviceInfo {
        tenant_id: "",
        tenant_name: "",
        application_id: application,
        application_name: application,
        device_profile_id: "",
        device_profile_name: "",
        device_name: device,
        dev_eui: dev_eui.to_lower_hex(),
        device_class_enabled: meta.device_class.as_str(),
        tags: &meta.tags,
    }
}

/// `gw.LoraModulationInfo` (defaults left out).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LoraModulationInfo {
    #[serde(skip_serializing_if = "is_zero_u32")]
    bandwidth: u32,
    #[serde(skip_serializing_if = "is_zero_u32")]
    spreading_factor: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    code_rate: Option<&'static str>,
    /// Downlinks are sent with inverted polarity (`ipol: true` in PULL_RESP); uplinks are not,
    /// so the field is absent there.
    #[serde(skip_serializing_if = "is_false")]
    polarization_inversion: bool,
}

/// `gw.Modulation` (a oneof: only `lora` here).
#[derive(Serialize)]
struct Modulation {
    lora: LoraModulationInfo,
}

fn modulation(s: &TxSettings, polarization_inversion: bool) -> Modulation {
    Modulation {
        lora: LoraModulationInfo {
            bandwidth: s.bandwidth_hz,
            spreading_factor: u32::from(s.spreading_factor),
            code_rate: code_rate(&s.coding_rate),
            polarization_inversion,
        },
    }
}

/// `gw.UplinkTxInfo`.
#[derive(Serialize)]
struct UplinkTxInfo {
    #[serde(skip_serializing_if = "is_zero_u32")]
    frequency: u32,
    modulation: Modulation,
}

/// `gw.UplinkRxInfo` (defaults left out).
///
/// - `gatewayId`: the gateway EUI, lower-case hex.
/// - `uplinkId`: ChirpStack draws a random `uint32` per reception; here the low 32 bits of the
///   record's ULID plus the reception's index, so it is stable across redeliveries and
///   distinct within one uplink.
/// - `gwTime`: the forwarder's `time` (GPS/UTC), when it sent one that parses.
/// - `nsTime`: when lorastream received the datagram (ChirpStack: when the NS received it).
/// - `rssi`, `snr`, `channel`, `rfChain`: from `rxpk`; `board`/`antenna` 0 (left out).
/// - `timeSinceGpsEpoch`, `fineTimeSinceGpsEpoch`, `location`: unset (not in the model; a
///   gateway position is not configured), so absent.
/// - `context`: the concentrator `tmst`, 4 bytes big-endian, base64, as ChirpStack's Semtech
///   UDP backend fills it; a consumer that echoes it learns the timing base.
/// - `metadata`: `region_config_id` / `region_common_name`, as ChirpStack adds to every
///   reception (left out when the region is unknown).
/// - `crcStatus`: `CRC_OK`. Device uplinks passed the MIC check, so the PHY CRC was good.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct UplinkRxInfo<'a> {
    gateway_id: String,
    #[serde(skip_serializing_if = "is_zero_u32")]
    uplink_id: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    gw_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ns_time: Option<String>,
    #[serde(skip_serializing_if = "is_zero_i32")]
    rssi: i32,
    #[serde(skip_serializing_if = "is_zero_f32")]
    snr: f32,
    #[serde(skip_serializing_if = "is_zero_u32")]
    channel: u32,
    #[serde(skip_serializing_if = "is_zero_u32")]
    rf_chain: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
    context: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    metadata: BTreeMap<&'static str, &'a str>,
    crc_status: &'static str,
}

fn rx_info<'a>(id: u128, index: usize, r: &RxInfo, meta: &'a EventMeta) -> UplinkRxInfo<'a> {
    let mut metadata = BTreeMap::new();
    if !meta.region_config_id.is_empty() {
        metadata.insert("region_config_id", meta.region_config_id);
    }
    if !meta.region_common_name.is_empty() {
        metadata.insert("region_common_name", meta.region_common_name);
    }
    UplinkRxInfo {
        gateway_id: r.gateway.to_lower_hex(),
        uplink_id: (id as u32).wrapping_add(index as u32),
        gw_time: r
            .time
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
            .map(pb_timestamp),
        ns_time: Some(pb_timestamp_us(r.received_at_us)),
        rssi: r.rssi,
        snr: r.snr,
        channel: r.channel,
        rf_chain: r.rf_chain,
        context: b64(&r.tmst.to_be_bytes()),
        metadata,
        crc_status: "CRC_OK",
    }
}

/// `integration.UplinkEvent` (emit_fields).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct UplinkEvent<'a> {
    deduplication_id: String,
    time: String,
    device_info: DeviceInfo<'a>,
    dev_addr: String,
    adr: bool,
    dr: u32,
    f_cnt: u32,
    f_port: u32,
    confirmed: bool,
    data: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    object: Option<PbStruct<'a>>,
    rx_info: Vec<UplinkRxInfo<'a>>,
    tx_info: UplinkTxInfo,
    // relayRxInfo, joinServerContext: message fields, unset (no relays; lorastream holds the
    // AppSKey) and so absent, as in ChirpStack.
    region_config_id: &'a str,
}

/// ChirpStack's `devAddr`: lower-case hex, MSB first (lrwn `DevAddr` Display).
fn dev_addr(a: DevAddr) -> String {
    format!("{:08x}", a.0)
}

/// `integration.UplinkEvent` JSON of a device uplink.
///
/// - `deduplicationId`: the uplink's ULID as a UUID (stable across redeliveries, like
///   `correlation_ids[0]` in the TTS layout).
/// - `time`: when lorastream received the uplink (`received_at` of the TTS layout).
/// - `dr`: the data rate index of the region (`lorawan::region::uplink_dr` in lorastream);
///   `None` writes 0, the field being always present in ChirpStack's JSON.
/// - `fPort`: 0 when the frame has no FPort; `data`: the decrypted FRMPayload (`""` if none).
/// - `object`: the decoded payload, only when a codec produced one.
pub fn uplink_event(
    u: &Uplink,
    dr: Option<u8>,
    object: Option<&serde_json::Map<String, serde_json::Value>>,
    meta: &EventMeta,
) -> Vec<u8> {
    let ev = UplinkEvent {
        deduplication_id: uuid_string(u.id),
        time: pb_timestamp_us(u.received_at_us),
        device_info: device_info(&u.application, &u.device, u.dev_eui, meta),
        dev_addr: dev_addr(u.dev_addr),
        adr: u.adr,
        dr: u32::from(dr.unwrap_or(0)),
        f_cnt: u.f_cnt,
        f_port: u32::from(u.f_port.unwrap_or(0)),
        confirmed: u.confirmed,
        data: b64(&u.payload),
        object: object.map(PbStruct),
        rx_info: u
            .rx
            .iter()
            .enumerate()
            .map(|(i, r)| rx_info(u.id, i, r, meta))
            .collect(),
        tx_info: UplinkTxInfo {
            frequency: u.settings.frequency_hz,
            modulation: modulation(&u.settings, false),
        },
        region_config_id: meta.region_config_id,
    };
    // Serializing plain structs with string keys into a Vec cannot fail.
    serde_json::to_vec(&ev).unwrap_or_default()
}

/// `integration.JoinEvent` (emit_fields).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JoinEvent<'a> {
    deduplication_id: String,
    time: String,
    device_info: DeviceInfo<'a>,
    dev_addr: String,
    region_config_id: &'a str,
}

/// `integration.JoinEvent` JSON of an OTAA join.
///
/// ChirpStack sends it with the first uplink after the join; lorastream's `Join` record is made
/// when the JoinAccept is sent, so `time` and `deduplicationId` are the join request's.
pub fn join_event(j: &Join, meta: &EventMeta) -> Vec<u8> {
    let ev = JoinEvent {
        deduplication_id: uuid_string(j.id),
        time: pb_timestamp_us(j.received_at_us),
        device_info: device_info(&j.application, &j.device, j.dev_eui, meta),
        dev_addr: dev_addr(j.dev_addr),
        region_config_id: meta.region_config_id,
    };
    serde_json::to_vec(&ev).unwrap_or_default()
}

/// `integration.AckEvent` (emit_fields).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AckEvent<'a> {
    deduplication_id: String,
    time: String,
    device_info: DeviceInfo<'a>,
    queue_item_id: String,
    acknowledged: bool,
    f_cnt_down: u32,
}

/// `integration.AckEvent` JSON.
pub fn ack_event(a: &Ack<'_>, meta: &EventMeta) -> Vec<u8> {
    let ev = AckEvent {
        deduplication_id: a.uplink_id.map(uuid_string).unwrap_or_default(),
        time: pb_timestamp_us(a.time_us),
        device_info: device_info(
            a.device.application,
            a.device.device,
            a.device.dev_eui,
            meta,
        ),
        queue_item_id: uuid_string(a.queue_item_id),
        acknowledged: a.acknowledged,
        f_cnt_down: a.f_cnt_down,
    };
    serde_json::to_vec(&ev).unwrap_or_default()
}

/// `gw.DelayTimingInfo`.
#[derive(Serialize)]
struct DelayTimingInfo {
    delay: String,
}

/// `gw.ImmediatelyTimingInfo` (no fields: `{}`).
#[derive(Serialize)]
struct ImmediatelyTimingInfo {}

/// `gw.Timing` (a oneof).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
enum Timing {
    Immediately(ImmediatelyTimingInfo),
    Delay(DelayTimingInfo),
}

/// A `google.protobuf.Duration` as pbjson-types writes it (`"1s"`, `"1.500s"`).
fn pb_duration(d: Duration) -> String {
    let nanos = d.subsec_nanos();
    let frac = if nanos == 0 {
        String::new()
    } else if nanos % 1_000_000 == 0 {
        format!(".{:03}", nanos / 1_000_000)
    } else if nanos % 1_000 == 0 {
        format!(".{:06}", nanos / 1_000)
    } else {
        format!(".{nanos:09}")
    };
    format!("{}{frac}s", d.as_secs())
}

/// `gw.DownlinkTxInfo` (defaults left out; `board`/`antenna` are 0).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DownlinkTxInfo {
    #[serde(skip_serializing_if = "is_zero_u32")]
    frequency: u32,
    #[serde(skip_serializing_if = "is_zero_i32")]
    power: i32,
    modulation: Modulation,
    timing: Timing,
    #[serde(skip_serializing_if = "String::is_empty")]
    context: String,
}

/// `integration.TxAckEvent` (emit_fields).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TxAckEvent<'a> {
    downlink_id: u32,
    time: String,
    device_info: DeviceInfo<'a>,
    queue_item_id: String,
    f_cnt_down: u32,
    gateway_id: String,
    tx_info: DownlinkTxInfo,
}

/// `integration.TxAckEvent` JSON.
pub fn txack_event(t: &TxAck<'_>, meta: &EventMeta) -> Vec<u8> {
    let ev = TxAckEvent {
        downlink_id: t.queue_item_id as u32,
        time: pb_timestamp_us(t.time_us),
        device_info: device_info(
            t.device.application,
            t.device.device,
            t.device.dev_eui,
            meta,
        ),
        queue_item_id: uuid_string(t.queue_item_id),
        f_cnt_down: t.f_cnt_down,
        gateway_id: t.gateway.to_lower_hex(),
        tx_info: DownlinkTxInfo {
            frequency: t.tx.settings.frequency_hz,
            power: t.tx.power_dbm,
            modulation: modulation(&t.tx.settings, true),
            timing: match t.tx.timing {
                TxTiming::Immediately => Timing::Immediately(ImmediatelyTimingInfo {}),
                TxTiming::Delay(d) => Timing::Delay(DelayTimingInfo {
                    delay: pb_duration(d),
                }),
            },
            context: t
                .tx
                .context_tmst
                .map(|tmst| b64(&tmst.to_be_bytes()))
                .unwrap_or_default(),
        },
    };
    serde_json::to_vec(&ev).unwrap_or_default()
}

/// `integration.StatusEvent` (emit_fields; field 4 is unused in the proto).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusEvent<'a> {
    deduplication_id: String,
    time: String,
    device_info: DeviceInfo<'a>,
    margin: i32,
    external_power_source: bool,
    battery_level_unavailable: bool,
    battery_level: f32,
}

/// `integration.StatusEvent` JSON, computed from the DevStatusAns as ChirpStack does
/// (`chirpstack/src/maccommand/dev_status.rs`): `externalPowerSource` = battery 0,
/// `batteryLevelUnavailable` = battery 255, `batteryLevel` = battery / 254 × 100 for 1..=254
/// (else 0.0), `margin` the signed margin.
pub fn status_event(s: &DevStatus<'_>, meta: &EventMeta) -> Vec<u8> {
    let ev = StatusEvent {
        deduplication_id: uuid_string(s.uplink_id),
        time: pb_timestamp_us(s.time_us),
        device_info: device_info(
            s.device.application,
            s.device.device,
            s.device.dev_eui,
            meta,
        ),
        margin: i32::from(s.margin),
        external_power_source: s.battery == 0,
        battery_level_unavailable: s.battery == 255,
        battery_level: if s.battery > 0 && s.battery < 255 {
            f32::from(s.battery) / 254.0 * 100.0
        } else {
            0.0
        },
    };
    serde_json::to_vec(&ev).unwrap_or_default()
}

/// A downlink failed (`integration.LogEvent`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log<'a> {
    pub device: DeviceRef<'a>,
    pub time_us: i64,
    /// Why, in a sentence (the `down/failed` reason).
    pub description: &'a str,
    /// The downlink's ULID, when the failure is about one (written as the UUID in
    /// `context.queue_item_id`).
    pub queue_item_id: Option<u128>,
}

/// `integration.LogEvent` (emit_fields).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LogEvent<'a> {
    time: String,
    device_info: DeviceInfo<'a>,
    level: &'static str,
    code: &'static str,
    description: &'a str,
    context: BTreeMap<&'static str, String>,
}

/// `integration.LogEvent` JSON of a failed downlink: level `ERROR`, code `UNKNOWN`
/// (lorastream's reasons — bad JSON, port, size, scope, a full queue — do not map one to one
/// onto ChirpStack's `LogCode`s, so none is claimed), the reason as `description`.
pub fn log_event(l: &Log<'_>, meta: &EventMeta) -> Vec<u8> {
    let mut context = BTreeMap::new();
    if let Some(id) = l.queue_item_id {
        context.insert("queue_item_id", uuid_string(id));
    }
    let ev = LogEvent {
        time: pb_timestamp_us(l.time_us),
        device_info: device_info(
            l.device.application,
            l.device.device,
            l.device.dev_eui,
            meta,
        ),
        level: "ERROR",
        code: "UNKNOWN",
        description: l.description,
        context,
    };
    serde_json::to_vec(&ev).unwrap_or_default()
}

/// A downlink event of the scheduler as a ChirpStack event (which one, and its JSON):
/// `sent` → `txack`, `ack`/`nack` → `ack` (`acknowledged` true/false), `failed` → `log`;
/// `queued` → none (ChirpStack publishes nothing when an item is enqueued).
///
/// The transmission details are read from the `sent` event's `detail` (the fields documented
/// for TTS `downlink_sent` in docs/formats.md): `f_cnt`, `gateway_ids.eui`, `timestamp`,
/// `class`, `rx_window`, `frequency`, `data_rate.lora`, `power_dbm`. `fCntDown` of an `ack`
/// comes from the detail's `f_cnt` when it has one (0 otherwise).
pub fn downlink_event(e: &DownlinkEvent, meta: &EventMeta) -> Option<(Event, Vec<u8>)> {
    let device = DeviceRef {
        application: &e.application,
        device: &e.device,
        dev_eui: e.dev_eui,
    };
    let d = &e.detail;
    let time_us = crate::model::now_us();
    let f_cnt = d["f_cnt"].as_u64().and_then(|n| u32::try_from(n).ok());
    Some(match e.kind {
        DownlinkEventKind::Queued => return None,
        DownlinkEventKind::Sent => {
            let item = e.item.as_ref()?;
            let lora = &d["data_rate"]["lora"];
            let timing = match (d["class"].as_str(), d["rx_window"].as_u64()) {
                (Some("C"), _) | (_, Some(0)) => TxTiming::Immediately,
                (_, Some(2)) => TxTiming::Delay(crate::lorawan::region::RECEIVE_DELAY2),
                _ => TxTiming::Delay(crate::lorawan::region::RECEIVE_DELAY1),
            };
            // ChirpStack's Semtech UDP backend puts the uplink's `tmst` in `context`: the
            // transmission's `tmst` less the delay.
            let context_tmst = match timing {
                TxTiming::Delay(delay) => d["timestamp"]
                    .as_u64()
                    .map(|t| (t as u32).wrapping_sub(delay.as_micros() as u32)),
                TxTiming::Immediately => None,
            };
            let tx = TxAck {
                device,
                queue_item_id: item.id,
                time_us,
                f_cnt_down: f_cnt.unwrap_or(0),
                gateway: d["gateway_ids"]["eui"]
                    .as_str()
                    .and_then(|g| g.parse().ok())
                    .unwrap_or_default(),
                tx: DownlinkTx {
                    settings: TxSettings {
                        frequency_hz: d["frequency"]
                            .as_str()
                            .and_then(|f| f.parse().ok())
                            .unwrap_or(0),
                        spreading_factor: lora["spreading_factor"]
                            .as_u64()
                            .and_then(|v| u8::try_from(v).ok())
                            .unwrap_or(0),
                        bandwidth_hz: lora["bandwidth"]
                            .as_u64()
                            .and_then(|v| u32::try_from(v).ok())
                            .unwrap_or(0),
                        coding_rate: lora["coding_rate"].as_str().unwrap_or("").into(),
                    },
                    power_dbm: d["power_dbm"]
                        .as_i64()
                        .and_then(|v| i32::try_from(v).ok())
                        .unwrap_or(0),
                    timing,
                    context_tmst,
                },
            };
            (Event::TxAck, txack_event(&tx, meta))
        }
        DownlinkEventKind::Ack | DownlinkEventKind::Nack => {
            let item = e.item.as_ref()?;
            let a = Ack {
                device,
                uplink_id: None,
                time_us,
                queue_item_id: item.id,
                acknowledged: e.kind == DownlinkEventKind::Ack,
                f_cnt_down: f_cnt.unwrap_or(0),
            };
            (Event::Ack, ack_event(&a, meta))
        }
        DownlinkEventKind::Failed => {
            let l = Log {
                device,
                time_us,
                description: d["error"].as_str().unwrap_or("downlink failed"),
                queue_item_id: e.item.as_ref().map(|i| i.id),
            };
            (Event::Log, log_event(&l, meta))
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Downlink commands (`integration.DownlinkCommand`).

/// Why a command topic or body was refused (reported as a `down/failed` event).
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("not a ChirpStack command topic (application/{{id}}/device/{{dev_eui}}/command/{{name}}): {0:?}")]
    Topic(String),
    #[error("DevEUI {value:?} in the topic: {source}")]
    TopicDevEui {
        value: String,
        source: crate::model::HexError,
    },
    #[error("unknown command {0:?} (only \"down\")")]
    UnknownCommand(String),
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the body is not a JSON object")]
    NotAnObject,
    #[error("field {field:?} given twice (as {first:?} and {second:?})")]
    Duplicate {
        field: &'static str,
        first: String,
        second: String,
    },
    #[error("field {field:?}: expected {expected}")]
    Type {
        field: &'static str,
        expected: &'static str,
    },
    #[error("devEui {value:?}: {source}")]
    DevEui {
        value: String,
        source: crate::model::HexError,
    },
    #[error("devEui {body} in the body does not match {topic} in the topic")]
    DevEuiMismatch { body: Eui64, topic: Eui64 },
    #[error("fPort {0} out of range (1..=223)")]
    FPort(u64),
    #[error("data is not base64: {0}")]
    Base64(#[source] base64::DecodeError),
    #[error("neither \"data\" nor \"object\" given")]
    NoPayload,
    #[error("id {0:?} is not a UUID")]
    Id(String),
    #[error("expiresAt {value:?} is not an RFC 3339 UTC time: {source}")]
    ExpiresAt {
        value: String,
        source: humantime::TimestampError,
    },
}

/// What to send: bytes, or an object for the device's codec (`encodeDownlink`).
#[derive(Debug, Clone, PartialEq)]
pub enum DownlinkPayload {
    Data(Vec<u8>),
    Object(serde_json::Map<String, serde_json::Value>),
}

/// A parsed `integration.DownlinkCommand`.
#[derive(Debug, Clone, PartialEq)]
pub struct DownlinkCommand {
    /// The queue item id the consumer chose (UUID), as a u128 usable as the downlink's id;
    /// `None` = lorastream assigns one (ChirpStack: "If left blank, a random UUID").
    pub id: Option<u128>,
    pub dev_eui: Eui64,
    pub confirmed: bool,
    pub f_port: u8,
    pub payload: DownlinkPayload,
    /// `expiresAt` (`DownlinkCommand` field 7 in chirpstack-api 4.20): drop the item if not
    /// sent by then. Only UTC (`Z` / `+00:00`) is accepted.
    pub expires_at: Option<SystemTime>,
}

/// Parses a command topic and its body: `command` must be `down`, the body's `devEui` must be
/// the topic's (compared as EUIs, so case does not matter; ChirpStack compares the strings).
pub fn parse_command(
    topic: &str,
    body: &[u8],
) -> Result<(CommandTopic, DownlinkCommand), CommandError> {
    let t = parse_command_topic(topic)?;
    if t.command != "down" {
        return Err(CommandError::UnknownCommand(t.command));
    }
    let cmd = parse_downlink_command(body, t.dev_eui)?;
    Ok((t, cmd))
}

/// Takes a field that pbjson accepts under both names (lowerCamelCase and the proto name);
/// naming it twice is an error there too ("duplicate field").
fn take<'a>(
    obj: &'a serde_json::Map<String, serde_json::Value>,
    field: &'static str,
    proto_name: &'static str,
) -> Result<Option<&'a serde_json::Value>, CommandError> {
    let a = obj.get(field);
    let b = if proto_name == field {
        None
    } else {
        obj.get(proto_name)
    };
    match (a, b) {
        (Some(_), Some(_)) => Err(CommandError::Duplicate {
            field,
            first: field.to_string(),
            second: proto_name.to_string(),
        }),
        // proto3 JSON: `null` means the default value.
        (Some(serde_json::Value::Null), None) | (None, Some(serde_json::Value::Null)) => Ok(None),
        (v, None) | (None, v) => Ok(v),
    }
}

/// A uint32 as proto3 JSON allows it: a number or a decimal string.
fn uint(v: &serde_json::Value, field: &'static str) -> Result<u64, CommandError> {
    let err = CommandError::Type {
        field,
        expected: "an unsigned integer (number or string)",
    };
    match v {
        serde_json::Value::Number(n) => n.as_u64().ok_or(err),
        serde_json::Value::String(s) => s.trim().parse::<u64>().map_err(|_| err),
        _ => Err(err),
    }
}

/// base64 as pbjson accepts it: standard or URL-safe alphabet, padding optional.
fn decode_base64(s: &str) -> Result<Vec<u8>, CommandError> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const CFG: GeneralPurposeConfig =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    const STD: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, CFG);
    const URL: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::URL_SAFE, CFG);
    STD.decode(s)
        .or_else(|e| match e {
            base64::DecodeError::InvalidByte(_, b'-' | b'_') => URL.decode(s),
            e => Err(e),
        })
        .map_err(CommandError::Base64)
}

/// A UUID in its hyphenated (36) or plain (32 hex digits) form.
fn parse_uuid(s: &str) -> Option<u128> {
    let hexdigits: String = if s.len() == 36 {
        let b = s.as_bytes();
        if b[8] != b'-' || b[13] != b'-' || b[18] != b'-' || b[23] != b'-' {
            return None;
        }
        s.chars().filter(|c| *c != '-').collect()
    } else {
        s.to_string()
    };
    if hexdigits.len() != 32 || !hexdigits.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(&hexdigits, 16).ok()
}

/// Parses the body of `.../command/down` for the device named in the topic.
///
/// Accepted as ChirpStack (pbjson, `ignore_unknown_fields`) accepts it: lowerCamelCase or proto
/// field names (`devEui` / `dev_eui`), numbers as numbers or strings, base64 standard or
/// URL-safe, `null` as the default, unknown fields ignored. Stricter than ChirpStack, because a
/// wrong downlink is worse than a refused one:
/// - `fPort` must be 1..=223 (ChirpStack casts to u8 and fails later);
/// - at least one of `data` / `object` must be present (`"data": ""` is an explicit empty
///   payload); when both are, `object` wins, as in ChirpStack's `handle_down_command`;
/// - `devEui` may be omitted (the topic names the device); if given it must match.
pub fn parse_downlink_command(
    body: &[u8],
    topic_dev_eui: Eui64,
) -> Result<DownlinkCommand, CommandError> {
    let v: serde_json::Value = serde_json::from_slice(body)?;
    let obj = v.as_object().ok_or(CommandError::NotAnObject)?;

    let id = match take(obj, "id", "id")? {
        None => None,
        Some(serde_json::Value::String(s)) if s.is_empty() => None,
        Some(serde_json::Value::String(s)) => {
            Some(parse_uuid(s).ok_or_else(|| CommandError::Id(s.clone()))?)
        }
        Some(_) => {
            return Err(CommandError::Type {
                field: "id",
                expected: "a string",
            })
        }
    };

    let dev_eui = match take(obj, "devEui", "dev_eui")? {
        None => topic_dev_eui,
        Some(serde_json::Value::String(s)) if s.is_empty() => topic_dev_eui,
        Some(serde_json::Value::String(s)) => {
            let e = s.parse::<Eui64>().map_err(|source| CommandError::DevEui {
                value: s.clone(),
                source,
            })?;
            if e != topic_dev_eui {
                return Err(CommandError::DevEuiMismatch {
                    body: e,
                    topic: topic_dev_eui,
                });
            }
            e
        }
        Some(_) => {
            return Err(CommandError::Type {
                field: "devEui",
                expected: "a string",
            })
        }
    };

    let confirmed = match take(obj, "confirmed", "confirmed")? {
        None => false,
        Some(serde_json::Value::Bool(b)) => *b,
        Some(_) => {
            return Err(CommandError::Type {
                field: "confirmed",
                expected: "true or false",
            })
        }
    };

    let f_port = match take(obj, "fPort", "f_port")? {
        None => 0,
        Some(v) => uint(v, "fPort")?,
    };
    let f_port = match u8::try_from(f_port) {
        Ok(p @ 1..=223) => p,
        _ => return Err(CommandError::FPort(f_port)),
    };

    let data = match take(obj, "data", "data")? {
        None => None,
        Some(serde_json::Value::String(s)) => Some(decode_base64(s)?),
        Some(_) => {
            return Err(CommandError::Type {
                field: "data",
                expected: "a base64 string",
            })
        }
    };
    let object = match take(obj, "object", "object")? {
        None => None,
        Some(serde_json::Value::Object(o)) => Some(o.clone()),
        Some(_) => {
            return Err(CommandError::Type {
                field: "object",
                expected: "a JSON object",
            })
        }
    };
    let payload = match (object, data) {
        (Some(o), _) => DownlinkPayload::Object(o),
        (None, Some(d)) => DownlinkPayload::Data(d),
        (None, None) => return Err(CommandError::NoPayload),
    };

    let expires_at = match take(obj, "expiresAt", "expires_at")? {
        None => None,
        Some(serde_json::Value::String(s)) => Some(humantime::parse_rfc3339(s.trim()).map_err(
            |source| CommandError::ExpiresAt {
                value: s.clone(),
                source,
            },
        )?),
        Some(_) => {
            return Err(CommandError::Type {
                field: "expiresAt",
                expected: "an RFC 3339 string",
            })
        }
    };

    Ok(DownlinkCommand {
        id,
        dev_eui,
        confirmed,
        f_port,
        payload,
        expires_at,
    })
}

/// A message on `application/{application_id}/device/{dev_eui}/command/down` as a request for
/// the scheduler (a `push`: ChirpStack's enqueue appends). `device_id` names the configured
/// device of a DevEUI; an unknown DevEUI is handed on under its EUI, and the scheduler logs
/// and counts it as an unknown device. A topic that names no device gives `None`. Refused
/// commands (see [`parse_downlink_command`], and these) reach the stream as `down/failed`
/// (ChirpStack `log` event):
/// - `object` for a device without a payload codec (refused when it is encoded, see
///   `crate::codec::Codecs::encode_request`);
/// - `expiresAt`: lorastream keeps a queued downlink until it is sent and cannot honour it;
/// - `data` longer than any LoRaWAN data rate carries (242 bytes).
pub fn downlink_request(
    stream: &str,
    topic: &str,
    body: &[u8],
    device_id: impl Fn(Eui64) -> Option<String>,
) -> Option<DownlinkRequest> {
    let t = match parse_command_topic(topic) {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(stream, topic, error = %e, "message on a command topic ignored");
            return None;
        }
    };
    let device = device_id(t.dev_eui).unwrap_or_else(|| t.dev_eui.to_string());
    let items = if t.command == "down" {
        parse_downlink_command(body, t.dev_eui)
            .map_err(|e| RequestError::Transport(e.to_string()))
            .and_then(|c| item(c, stream))
            .map(|it| vec![it])
    } else {
        Err(RequestError::Transport(
            CommandError::UnknownCommand(t.command).to_string(),
        ))
    };
    Some(DownlinkRequest {
        stream: stream.to_string(),
        application: t.application_id,
        device,
        op: DownlinkOp::Push,
        items,
        names: None,
    })
}

/// The queue item of a parsed command.
fn item(c: DownlinkCommand, stream: &str) -> Result<DownlinkItem, RequestError> {
    if c.expires_at.is_some() {
        return Err(RequestError::Transport(
            "expiresAt is not supported (lorastream keeps a queued downlink until it is sent); leave it out".into(),
        ));
    }
    // An `object` is encoded by the device's codec on the way to the scheduler (`crate::codec`).
    let (payload, decoded_payload) = match c.payload {
        DownlinkPayload::Data(d) => (d, None),
        DownlinkPayload::Object(o) => (Vec::new(), Some(o)),
    };
    if payload.len() > MAX_PAYLOAD {
        return Err(RequestError::Transport(format!(
            "data is {} bytes; LoRaWAN carries at most {MAX_PAYLOAD}",
            payload.len()
        )));
    }
    Ok(DownlinkItem {
        id: c.id.unwrap_or_else(new_id),
        f_port: c.f_port,
        payload,
        confirmed: c.confirmed,
        priority: "NORMAL".into(),
        correlation_ids: Vec::new(),
        stream: stream.to_string(),
        decoded_payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_follow_chrono_to_rfc3339() {
        assert_eq!(pb_timestamp_us(0), "1970-01-01T00:00:00+00:00");
        assert_eq!(
            pb_timestamp_us(1_795_000_000_123_456),
            "2026-11-18T11:06:40.123456+00:00"
        );
        assert_eq!(
            pb_timestamp_us(1_795_000_000_120_000),
            "2026-11-18T11:06:40.120+00:00"
        );
        assert_eq!(
            pb_timestamp(UNIX_EPOCH + Duration::new(1, 5)),
            "1970-01-01T00:00:01.000000005+00:00"
        );
        assert_eq!(pb_timestamp_us(-5), "1970-01-01T00:00:00+00:00");
    }

    #[test]
    fn durations_follow_pbjson() {
        assert_eq!(pb_duration(Duration::from_secs(1)), "1s");
        assert_eq!(pb_duration(Duration::from_millis(1500)), "1.500s");
        assert_eq!(pb_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn uuid_text_of_ulid() {
        assert_eq!(
            uuid_string(0x0193_0000_0000_0000_0000_0000_0000_0001),
            "01930000-0000-0000-0000-000000000001"
        );
        assert_eq!(
            parse_uuid("01930000-0000-0000-0000-000000000001"),
            Some(0x0193_0000_0000_0000_0000_0000_0000_0001)
        );
        assert_eq!(parse_uuid("0193000000000000000000000000000g"), None);
        assert_eq!(parse_uuid("01930000+0000-0000-0000-000000000001"), None);
        assert_eq!(parse_uuid("é"), None);
    }

    #[test]
    fn margin_is_six_bit_signed() {
        assert_eq!(margin_from_byte(0), 0);
        assert_eq!(margin_from_byte(31), 31);
        assert_eq!(margin_from_byte(0x20), -32);
        assert_eq!(margin_from_byte(0x3f), -1);
        assert_eq!(margin_from_byte(0xc5), 5, "bits 7..6 are RFU");
    }

    #[test]
    fn code_rates() {
        assert_eq!(code_rate("4/5"), Some("CR_4_5"));
        assert_eq!(code_rate("4/8LI"), Some("CR_LI_4_8"));
        assert_eq!(code_rate(""), None);
        assert_eq!(code_rate("OFF"), None);
    }

    #[test]
    fn topics() {
        let e: Eui64 = "70B3D57ED0000001".parse().unwrap();
        assert_eq!(
            event_topic("farm", e, Event::TxAck),
            "application/farm/device/70b3d57ed0000001/event/txack"
        );
        let t = parse_command_topic(&command_down_topic("farm", e)).unwrap();
        assert_eq!(t.application_id, "farm");
        assert_eq!(t.dev_eui, e);
        assert_eq!(t.command, "down");
        assert!(matches!(
            parse_command_topic("application/farm/device/xyz/command/down"),
            Err(CommandError::TopicDevEui { .. })
        ));
        assert!(matches!(
            parse_command_topic("application/farm/device/70b3d57ed0000001/command"),
            Err(CommandError::Topic(_))
        ));
        assert!(matches!(
            parse_command(
                "application/farm/device/70b3d57ed0000001/command/flush",
                b"{}"
            ),
            Err(CommandError::UnknownCommand(_))
        ));
    }

    #[test]
    fn regions() {
        assert_eq!(region_names(Region::EU868, None), ("EU868", "eu868"));
        assert_eq!(region_names(Region::US915, Some(2)), ("US915", "us915_1"));
        assert_eq!(region_names(Region::AU915, Some(8)), ("AU915", "au915_7"));
        assert_eq!(region_names(Region::US915, None), ("US915", "us915"));
        assert_eq!(region_names(Region::US915, Some(9)), ("US915", "us915"));
        assert_eq!(region_names(Region::AS923_1, None), ("AS923", "as923"));
        assert_eq!(region_names(Region::AS923_3, None), ("AS923_3", "as923_3"));
        assert_eq!(region_names(Region::KR920, None), ("KR920", "kr920"));
    }
}
