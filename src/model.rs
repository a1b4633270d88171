//! Plain data types shared by every stage of the pipeline.
//!
//! Nothing here does I/O. Identifiers are stored the way people write them (MSB first, upper-case
//! hex when printed); keys are wrapped in [`AesKey`], whose `Debug`/`Display` never show the bytes,
//! so a stray `{:?}` in a log line cannot leak a session key.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// A hash map on the per-uplink path (device indexes, deduplication, the scheduler's and the
/// streams' bookkeeping): foldhash's `fast::RandomState` (a random seed per map) instead of
/// std's SipHash, which cost ~2,400 instructions per uplink (issue 16). Minimally DoS
/// resistant: keys an attacker picks (DevAddr, frame bytes) meet a seed it cannot know, and
/// every such map is bounded anyway.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// A hash set on the per-uplink path; see [`FastMap`].
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// Error for identifiers and keys written in hex.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HexError {
    #[error("expected {expected} hex digits, got {got}")]
    Length { expected: usize, got: usize },
    #[error("not a hex string (only 0-9, a-f, A-F allowed)")]
    Digit,
}

fn parse_hex<const N: usize>(s: &str) -> Result<[u8; N], HexError> {
    // People paste EUIs as "70-B3-D5-..." or "70:b3:..." too, a DevAddr from a vendor sheet as
    // "0x26011BDA", and keys from The Things Stack console's C view as
    // "{ 0x2B, 0x7E, ... }": accept the separators, the braces and a 0x before each group.
    let clean: String = s
        .split([':', '-', ' ', ',', '{', '}'])
        .map(|g| {
            g.strip_prefix("0x")
                .or_else(|| g.strip_prefix("0X"))
                .unwrap_or(g)
        })
        .collect();
    if clean.len() != N * 2 {
        return Err(HexError::Length {
            expected: N * 2,
            got: clean.len(),
        });
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(&clean, &mut out).map_err(|_| HexError::Digit)?;
    Ok(out)
}

/// A 64-bit EUI (DevEUI, JoinEUI, gateway EUI), MSB first.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct Eui64(pub [u8; 8]);

impl Eui64 {
    pub fn from_u64(v: u64) -> Self {
        Eui64(v.to_be_bytes())
    }
    pub fn to_u64(self) -> u64 {
        u64::from_be_bytes(self.0)
    }
    /// Upper-case hex, MSB first (what `Display` writes), as ASCII bytes.
    pub fn upper_hex(&self) -> [u8; 16] {
        upper_hex(self.0)
    }
    /// Wire order (LSB first), as in LoRaWAN frames.
    pub fn to_le_bytes(self) -> [u8; 8] {
        let mut b = self.0;
        b.reverse();
        b
    }
    pub fn from_le_bytes(mut b: [u8; 8]) -> Self {
        b.reverse();
        Eui64(b)
    }
    /// Lower-case hex, as in TTS gateway ids (`eui-aa555a0000000000`).
    pub fn to_lower_hex(self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Eui64 {
    /// Upper-case hex, MSB first. One `write_str` of a stack buffer: EUIs are formatted several
    /// times for every uplink (JSON ids, topics), and eight `write!` calls cost ten times more.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(std::str::from_utf8(&self.upper_hex()).unwrap_or_default())
    }
}
impl fmt::Debug for Eui64 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
impl FromStr for Eui64 {
    type Err = HexError;
    fn from_str(s: &str) -> Result<Self, HexError> {
        parse_hex::<8>(s).map(Eui64)
    }
}

/// A LoRaWAN device address, as the number people write (`26000001`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct DevAddr(pub u32);

impl DevAddr {
    pub fn to_le_bytes(self) -> [u8; 4] {
        self.0.to_le_bytes()
    }
    /// Upper-case hex, MSB first (what `Display` writes), as ASCII bytes.
    pub fn upper_hex(&self) -> [u8; 8] {
        upper_hex(self.0.to_be_bytes())
    }
}

/// `N` bytes as `2N` upper-case hex digits.
fn upper_hex<const N: usize, const M: usize>(b: [u8; N]) -> [u8; M] {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    const { assert!(M == 2 * N) };
    let mut out = [0u8; M];
    for (pair, byte) in out.chunks_exact_mut(2).zip(b) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0x0F)];
    }
    out
}
impl fmt::Display for DevAddr {
    /// Upper-case hex, MSB first, as [`Eui64`]'s: one `write_str` of a stack buffer.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(std::str::from_utf8(&self.upper_hex()).unwrap_or_default())
    }
}
impl fmt::Debug for DevAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
impl FromStr for DevAddr {
    type Err = HexError;
    fn from_str(s: &str) -> Result<Self, HexError> {
        parse_hex::<4>(s).map(|b| DevAddr(u32::from_be_bytes(b)))
    }
}

/// A LoRaWAN NetID (24 bits), written as 6 hex digits (`000000`, `000013`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct NetId(pub u32);

impl fmt::Display for NetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:06X}", self.0)
    }
}
impl FromStr for NetId {
    type Err = HexError;
    fn from_str(s: &str) -> Result<Self, HexError> {
        parse_hex::<3>(s).map(|b| NetId(u32::from_be_bytes([0, b[0], b[1], b[2]])))
    }
}

/// Which messages a stream takes (`application = ..`, `device = ..`, `gateway = ..` of a
/// `[[stream]]`). The one place that decides whether a scope covers a device or a gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every device uplink.
    All,
    Application(String),
    Device(String),
    /// Raw frames of one gateway (`None` = every gateway, `gateway = "*"`).
    Gateway(Option<Eui64>),
}

impl Scope {
    /// Does the scope take the messages of this device?
    pub fn covers(&self, application: &str, device: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Application(a) => a == application,
            Scope::Device(d) => d == device,
            Scope::Gateway(_) => false,
        }
    }

    /// Does the scope take the raw frames of this gateway?
    pub fn covers_gateway(&self, gateway: Eui64) -> bool {
        match self {
            Scope::Gateway(None) => true,
            Scope::Gateway(Some(g)) => *g == gateway,
            _ => false,
        }
    }
}

/// An AES-128 key. Prints as `***` whatever the format.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AesKey(pub [u8; 16]);

impl fmt::Debug for AesKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}
impl fmt::Display for AesKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}
impl FromStr for AesKey {
    type Err = HexError;
    fn from_str(s: &str) -> Result<Self, HexError> {
        parse_hex::<16>(s).map(AesKey)
    }
}

/// A string secret from the config (password, SAS policy key). Prints as `***`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}
impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A URL fit for a log line or `lorastream check`: no user info, no query, no fragment (keys
/// often hide there, e.g. `?code=` of Azure Functions); a query shows as `?***`.
pub fn redact_url(u: &url::Url) -> String {
    let mut u = u.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    let had_query = u.query().is_some();
    u.set_query(None);
    u.set_fragment(None);
    if had_query {
        format!("{u}?***")
    } else {
        u.to_string()
    }
}

/// [`redact_url`] of a configured string; text that is not a URL is not shown at all.
pub fn redact_url_str(s: &str) -> String {
    match url::Url::parse(s) {
        Ok(u) => redact_url(&u),
        Err(_) => "(not a URL)".into(),
    }
}

/// Radio settings of a received frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TxSettings {
    pub frequency_hz: u32,
    pub spreading_factor: u8,
    pub bandwidth_hz: u32,
    /// "4/5" etc.; empty when the forwarder did not say.
    pub coding_rate: CodingRateText,
}

/// A LoRa coding rate as the forwarder writes it ("4/5" … "4/8", "4/5LI" … for 2.4 GHz), or
/// empty when it did not say. One of a handful of fixed strings, so it is held as a
/// `&'static str`: reception metadata is copied several times per uplink, and a `String` here
/// was an allocation each time (issue 16). Stored and published as the text; a text outside
/// the set (none was ever written) reads as empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CodingRateText(&'static str);

impl CodingRateText {
    const KNOWN: [&'static str; 7] = ["4/5", "4/6", "4/7", "4/8", "4/5LI", "4/6LI", "4/8LI"];

    /// The rate for `text`; empty when it is not one of the known rates.
    pub fn new(text: &str) -> Self {
        CodingRateText(
            Self::KNOWN
                .iter()
                .find(|k| **k == text)
                .copied()
                .unwrap_or(""),
        )
    }

    /// A rate written in the source (no lookup).
    pub(crate) const fn from_static(text: &'static str) -> Self {
        CodingRateText(text)
    }

    pub fn as_str(&self) -> &'static str {
        self.0
    }
}

impl std::ops::Deref for CodingRateText {
    type Target = str;
    fn deref(&self) -> &str {
        self.0
    }
}

impl From<&str> for CodingRateText {
    fn from(text: &str) -> Self {
        CodingRateText::new(text)
    }
}

impl PartialEq<&str> for CodingRateText {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl fmt::Display for CodingRateText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl Serialize for CodingRateText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0)
    }
}

impl<'de> Deserialize<'de> for CodingRateText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = CodingRateText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a coding rate such as \"4/5\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<CodingRateText, E> {
                Ok(CodingRateText::new(v))
            }
        }
        d.deserialize_str(Text)
    }
}

/// One reception of a frame by one gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RxInfo {
    pub gateway: Eui64,
    /// Concentrator counter (µs) at end of reception; the base of downlink timing.
    pub tmst: u32,
    /// GPS/UTC time of reception, if the forwarder had it (RFC 3339 as sent).
    pub time: Option<String>,
    pub rssi: i32,
    pub channel_rssi: i32,
    pub snr: f32,
    pub channel: u32,
    pub rf_chain: u32,
    /// Unix time (µs) when lorastream received the datagram.
    pub received_at_us: i64,
}

/// A decrypted, deduplicated uplink of a known device: what device-level streams publish.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Uplink {
    /// ULID, the stable correlation id (`lorastream:uplink:<ulid>`).
    pub id: u128,
    pub received_at_us: i64,
    /// Shared with the device registry (stored as the text).
    #[serde(with = "arc_str")]
    pub application: Arc<str>,
    #[serde(with = "arc_str")]
    pub device: Arc<str>,
    pub dev_eui: Eui64,
    pub dev_addr: DevAddr,
    pub f_port: Option<u8>,
    pub f_cnt: u32,
    pub confirmed: bool,
    pub adr: bool,
    /// Decrypted FRMPayload (empty when there is none or for FPort 0).
    #[serde(with = "byte_run")]
    pub payload: Vec<u8>,
    pub settings: TxSettings,
    /// Every reception merged by the dedup window, best signal first.
    pub rx: Vec<RxInfo>,
    /// The device's last answer to DevStatusReq (battery, link margin), if it ever gave one.
    pub dev_status: Option<DevStatus>,
    /// What the device's payload codec made of `payload` (`None`: no codec, or no FRMPayload
    /// on an application port). Decoded once, before the uplink is stored, so every stream
    /// shows the same result.
    pub codec: Option<CodecOutput>,
}

/// The result of a payload codec's `decodeUplink` (contract, "Payload codecs").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CodecOutput {
    /// TTS `uplink_message.decoded_payload` and `decoded_payload_warnings`.
    Decoded {
        data: JsonObject,
        warnings: Vec<String>,
    },
    /// Why there is no decoded payload (`uplink_message.lorastream.codec_error`).
    Error(String),
}

/// A JSON object that is stored as its JSON text: the store's encoding (postcard) is not
/// self-describing, so a free-form value cannot be written field by field.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JsonObject(pub serde_json::Map<String, serde_json::Value>);

impl Serialize for JsonObject {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = serde_json::to_string(&self.0).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for JsonObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        serde_json::from_str(&text)
            .map(JsonObject)
            .map_err(serde::de::Error::custom)
    }
}

/// A DevStatusAns (LoRaWAN 1.0.x §5.5) and when it came.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevStatus {
    /// 0 = external power, 1..=254 = battery level (254 full), 255 = unknown.
    pub battery: u8,
    /// SNR margin (dB) of the DevStatusReq as the device received it, −32..31.
    pub margin: i8,
    pub received_at_us: i64,
}

impl DevStatus {
    /// Battery level in percent, as The Things Stack computes it ((b − 1) / 253 · 100); None
    /// on external power or when the device cannot tell.
    pub fn battery_percentage(&self) -> Option<f32> {
        match self.battery {
            0 | 255 => None,
            b => Some(f32::from(b - 1) / 253.0 * 100.0),
        }
    }

    pub fn external_power(&self) -> bool {
        self.battery == 0
    }
}

/// Byte fields of stored records. postcard writes a `Vec<u8>` as its length and its bytes,
/// but through serde one element at a time (~600 instructions per uplink for the payload,
/// issue 16); `serialize_bytes` writes the same bytes at once. Human-readable formats (JSON,
/// templates) still get a list of numbers, as for any `Vec<u8>`.
mod byte_run {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(b: &Vec<u8>, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            b.serialize(s)
        } else {
            s.serialize_bytes(b)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Run;
        impl<'de> serde::de::Visitor<'de> for Run {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Vec<u8>, A::Error> {
                let mut v = Vec::with_capacity(a.size_hint().unwrap_or(0).min(4096));
                while let Some(b) = a.next_element()? {
                    v.push(b);
                }
                Ok(v)
            }
        }
        if d.is_human_readable() {
            Vec::deserialize(d)
        } else {
            d.deserialize_byte_buf(Run)
        }
    }
}

/// An `Arc<str>` (de)serialised as a plain string, read without an intermediate `String`.
mod arc_str {
    use serde::{Deserializer, Serializer};
    use std::sync::Arc;

    pub fn serialize<S: Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<str>, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = Arc<str>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Arc<str>, E> {
                Ok(Arc::from(v))
            }
        }
        d.deserialize_str(Text)
    }
}

/// A raw frame as one gateway heard it: what gateway-level streams publish.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayFrame {
    pub id: u128,
    #[serde(with = "byte_run")]
    pub phy_payload: Vec<u8>,
    pub crc_ok: bool,
    pub settings: TxSettings,
    pub rx: RxInfo,
}

/// An OTAA device joined (JoinAccept sent): what device-level streams publish on `.../join`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Join {
    pub id: u128,
    pub received_at_us: i64,
    pub application: String,
    pub device: String,
    pub dev_eui: Eui64,
    pub join_eui: Eui64,
    pub dev_addr: DevAddr,
    pub settings: TxSettings,
    pub rx: Vec<RxInfo>,
}

/// What the store queues for a stream. New variants go at the end (stored records keep their
/// variant index).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Record {
    Uplink(Uplink),
    GatewayFrame(GatewayFrame),
    Join(Join),
    /// An operator alert fired or resolved (`[[alert]]`, see `crate::alerts`).
    Alert(AlertMsg),
}

/// One message of an alert: its condition started (`firing`) or ended (`resolved`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertMsg {
    /// ULID of this message (`lorastream:alert:<ulid>`): stable across redeliveries.
    pub id: u128,
    /// The alert's id, shared by its `firing` and `resolved` messages.
    pub alert_id: String,
    /// `device_silent`, `battery_low`, ...
    pub kind: String,
    pub firing: bool,
    /// What it is about: a device id, a gateway EUI, a stream name, the store.
    pub subject: String,
    /// When the condition started (Unix µs).
    pub since_us: i64,
    /// When this message was made (Unix µs).
    pub at_us: i64,
    /// A sentence for people.
    pub message: String,
    /// This gateway (`[gateway] eui` in lower-case hex, or the host name): the MQTT topic's
    /// `{prefix}/gateways/{origin}/alerts`.
    pub origin: String,
}

impl Record {
    /// Records with the same key must be delivered in order: the device for uplinks, the
    /// gateway for raw frames (two key spaces, told apart by the top bit).
    pub fn order_key(&self) -> u64 {
        match self {
            Record::Uplink(u) => u.dev_eui.to_u64() & !(1 << 63),
            Record::Join(j) => j.dev_eui.to_u64() & !(1 << 63),
            Record::GatewayFrame(g) => g.rx.gateway.to_u64() | (1 << 63),
            // All alerts in one order: a `resolved` never overtakes its `firing`.
            Record::Alert(_) => u64::MAX,
        }
    }

    pub fn received_at_us(&self) -> i64 {
        match self {
            Record::Uplink(u) => u.received_at_us,
            Record::Join(j) => j.received_at_us,
            Record::GatewayFrame(g) => g.rx.received_at_us,
            Record::Alert(a) => a.at_us,
        }
    }

    /// The correlation id its messages carry (`lorastream:uplink:…`, `:join:`, `:frame:`).
    pub fn correlation_id(&self) -> String {
        match self {
            Record::Uplink(u) => correlation_id("uplink", u.id),
            Record::Join(j) => correlation_id("join", j.id),
            Record::GatewayFrame(g) => correlation_id("frame", g.id),
            Record::Alert(a) => correlation_id("alert", a.id),
        }
    }
}

/// Unix time now in microseconds.
pub fn now_us() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    d.as_micros() as i64
}

/// A new ULID as u128 (time-ordered, 80 random bits).
pub fn new_id() -> u128 {
    ulid::Ulid::new().0
}

/// `lorastream:uplink:<ULID>`.
pub fn correlation_id(kind: &str, id: u128) -> String {
    // Concatenated rather than `format!`ed: one or more per record sent (issue 16).
    let mut buf = [0u8; ulid::ULID_LEN];
    let ulid = ulid::Ulid(id).array_to_str(&mut buf);
    let mut s = String::with_capacity(12 + kind.len() + ulid::ULID_LEN);
    s.push_str("lorastream:");
    s.push_str(kind);
    s.push(':');
    s.push_str(ulid);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte field is the same bytes in postcard as a plain `Vec<u8>` (records queued by
    /// earlier versions read the same), and still a list of numbers in JSON.
    #[test]
    fn byte_runs_keep_the_layout_of_a_vec() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Run(#[serde(with = "byte_run")] Vec<u8>);
        for len in [0usize, 1, 5, 127, 128, 300] {
            let v: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let plain = postcard::to_stdvec(&v).unwrap();
            assert_eq!(postcard::to_stdvec(&Run(v.clone())).unwrap(), plain);
            assert_eq!(postcard::from_bytes::<Run>(&plain).unwrap(), Run(v.clone()));
            assert_eq!(
                serde_json::to_string(&Run(v.clone())).unwrap(),
                serde_json::to_string(&v).unwrap()
            );
            let json = serde_json::to_string(&v).unwrap();
            assert_eq!(serde_json::from_str::<Run>(&json).unwrap(), Run(v));
        }
    }

    #[test]
    fn correlation_ids_are_the_ulid_after_the_kind() {
        for id in [
            0u128,
            1,
            0x0192_3F5A_0000_0000_0000_0000_0000_0001,
            u128::MAX,
        ] {
            assert_eq!(
                correlation_id("uplink", id),
                format!("lorastream:uplink:{}", ulid::Ulid(id))
            );
        }
        assert_eq!(
            correlation_id("join", 0),
            "lorastream:join:00000000000000000000000000"
        );
    }

    #[test]
    fn urls_lose_credentials_in_logs() {
        let u = url::Url::parse("https://user:pw@fn.example.net/api/up?code=SECRET#x").unwrap();
        let r = redact_url(&u);
        assert_eq!(r, "https://fn.example.net/api/up?***");
        assert_eq!(redact_url_str("nope"), "(not a URL)");
    }

    #[test]
    fn eui_and_devaddr_roundtrip_msb_first() {
        let e: Eui64 = "70b3d57ed0000001".parse().unwrap();
        assert_eq!(e.to_string(), "70B3D57ED0000001");
        assert_eq!(e.to_le_bytes()[0], 0x01);
        let e2: Eui64 = "70-B3-D5-7E-D0-00-00-01".parse().unwrap();
        assert_eq!(e, e2);
        let a: DevAddr = "26000001".parse().unwrap();
        assert_eq!(a.0, 0x2600_0001);
        assert_eq!(a.to_le_bytes(), [1, 0, 0, 0x26]);
        for v in [0u32, 1, 0x2600_0001, 0x00AB_CDEF, 0xFFFF_FFFF, 0x0102_0304] {
            assert_eq!(DevAddr(v).to_string(), format!("{v:08X}"));
        }
        assert_eq!(
            "2600".parse::<DevAddr>(),
            Err(HexError::Length {
                expected: 8,
                got: 4
            })
        );
        assert_eq!("zz000000".parse::<DevAddr>(), Err(HexError::Digit));
        // Vendor sheets and the TTS console's C view.
        assert_eq!("0x26000001".parse::<DevAddr>().unwrap().0, 0x2600_0001);
        assert_eq!("0X26000001".parse::<DevAddr>().unwrap().0, 0x2600_0001);
        let k: AesKey = "{ 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E, 0x0F }"
            .parse()
            .unwrap();
        assert_eq!(
            k.0,
            *b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f"
        );
        // A 0x inside a group is still no hex digit.
        assert_eq!("260x0001".parse::<DevAddr>(), Err(HexError::Digit));
    }

    #[test]
    fn keys_never_print() {
        let k: AesKey = "000102030405060708090a0b0c0d0e0f".parse().unwrap();
        assert_eq!(format!("{k:?} {k}"), "*** ***");
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "***");
    }
}

/// One downlink a cloud asked for (contract: `{"downlinks":[{...}]}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownlinkItem {
    /// ULID; `lorastream:downlink:<ulid>` in events.
    pub id: u128,
    pub f_port: u8,
    pub payload: Vec<u8>,
    pub confirmed: bool,
    /// "LOWEST" .. "HIGHEST", as TTS; kept for the events (scheduling is FIFO per device).
    pub priority: String,
    /// Correlation ids the cloud attached, echoed in every event.
    pub correlation_ids: Vec<String>,
    /// The stream that sent it: events go back there.
    pub stream: String,
    /// A payload for the device's codec (TTS `decoded_payload`, ChirpStack `object`) in place
    /// of `payload`: the scheduler encodes it (`encodeDownlink`) before the item is queued, so
    /// a stored item never has one (not written to the store).
    #[serde(skip)]
    pub decoded_payload: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Largest FRMPayload any LoRaWAN data rate can carry.
pub const MAX_PAYLOAD: usize = 242;

/// Why a downlink request (or one item of it) is refused; the text goes into the
/// `down/failed` event, so it says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("invalid downlink JSON: {0}")]
    Json(String),
    #[error("\"downlinks\" is empty")]
    Empty,
    #[error("downlinks[{index}].f_port {port} is not an application port (1..223)")]
    Port { index: usize, port: u32 },
    #[error("downlinks[{index}].f_port is missing")]
    NoPort { index: usize },
    #[error("downlinks[{index}].frm_payload is not base64: {reason}")]
    Base64 { index: usize, reason: String },
    #[error(
        "downlinks[{index}].frm_payload is {len} bytes; LoRaWAN carries at most {MAX_PAYLOAD}"
    )]
    TooLong { index: usize, len: usize },
    #[error("downlinks[{index}].priority {value:?} is not one of LOWEST, LOW, BELOW_NORMAL, NORMAL, ABOVE_NORMAL, HIGH, HIGHEST")]
    Priority { index: usize, value: String },
    #[error("downlinks[{index}] has neither frm_payload nor decoded_payload (send \"frm_payload\": \"\" for an empty frame)")]
    NoPayload { index: usize },
    #[error("downlinks[{index}] has only decoded_payload, and the device has no codec that encodes downlinks; send frm_payload (base64)")]
    NoEncoder { index: usize },
    #[error("downlinks[{index}].decoded_payload is not a JSON object")]
    NotObject { index: usize },
    #[error(
        "downlinks[{index}].decoded_payload: the device's codec ({codec}) refused it: {reason}"
    )]
    Encode {
        index: usize,
        codec: &'static str,
        reason: String,
    },
    #[error("end_device_ids.dev_eui {0:?} is not 16 hex digits")]
    DevEui(String),
    #[error("the message is {len} bytes; downlink messages are at most {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// A message property or body field the transport adds (Azure `op`, raw `fPort`, ...).
    #[error("{0}")]
    Transport(String),
}

/// `push` appends to the device's queue, `replace` replaces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DownlinkOp {
    Push,
    Replace,
}

/// The device a downlink body names (TTS `end_device_ids`): the scheduler refuses the request
/// when it names another device than the topic (or the transport) addressed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndDeviceIds {
    pub device_id: Option<String>,
    pub application_id: Option<String>,
    pub dev_eui: Option<Eui64>,
}

/// A request from a stream to the downlink scheduler.
#[derive(Debug, Clone, PartialEq)]
pub struct DownlinkRequest {
    pub stream: String,
    /// The device's application, checked against the config; empty = whatever application
    /// the device belongs to (device ids are unique).
    pub application: String,
    pub device: String,
    pub op: DownlinkOp,
    /// Parsed items, or why the request is invalid (reported as a `down/failed` event).
    pub items: Result<Vec<DownlinkItem>, RequestError>,
    /// The device the body named, if it named one.
    pub names: Option<EndDeviceIds>,
}

/// What happened to a downlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownlinkEventKind {
    Queued,
    Sent,
    Ack,
    Nack,
    Failed,
}

impl DownlinkEventKind {
    /// Topic suffix: `down/{queued,sent,ack,nack,failed}`.
    pub fn as_str(self) -> &'static str {
        match self {
            DownlinkEventKind::Queued => "queued",
            DownlinkEventKind::Sent => "sent",
            DownlinkEventKind::Ack => "ack",
            DownlinkEventKind::Nack => "nack",
            DownlinkEventKind::Failed => "failed",
        }
    }
}

/// An event for the stream a downlink came from.
#[derive(Debug, Clone, PartialEq)]
pub struct DownlinkEvent {
    pub stream: String,
    pub application: String,
    pub device: String,
    pub dev_eui: Eui64,
    pub kind: DownlinkEventKind,
    /// The downlink concerned (absent when a whole request was refused before parsing).
    pub item: Option<DownlinkItem>,
    /// Extra fields: gateway, tmst, frequency, data rate (sent), f_cnt, or the error message.
    pub detail: serde_json::Value,
}
