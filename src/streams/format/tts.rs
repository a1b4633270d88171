//! The Things Stack v3 layouts (`format = "tts"`, the default), and the JSON that the `xml` and
//! `template` formats are made from.
//!
//! Device uplinks use the TTS v3 uplink-message layout, so consumers written for TTS work
//! unchanged. Raw gateway frames (gateway-scoped streams) use the layout of a TTS gateway uplink:
//! `raw_payload` plus the same `settings` and `rx_metadata` objects. Joins use TTS's
//! `join_accept` message.
//!
//! What a record does not carry comes in [`UplinkExtras`]: the device's JoinEUI (OTAA devices,
//! `end_device_ids.join_eui`), the network's NetID (`uplink_message.network_ids`), and what a
//! payload codec made of the payload (`decoded_payload`, `decoded_payload_warnings`,
//! `lorastream.codec_error`). Absent values leave their fields out.
//!
//! Messages delivered after waiting in the queue carry a `lorastream` object saying so (see
//! [`Delivery`]); live messages do not, so TTS consumers see exactly the TTS layout.
//!
//! Guarantees: the output is a pure function of its inputs (ids come from the record), valid
//! JSON, one line (no raw newline), and building it never fails.

use super::Decoded;
use crate::model::{
    correlation_id, Eui64, GatewayFrame, Join, NetId, Record, RxInfo, TxSettings, Uplink,
};
use base64::Engine;
use serde::Serialize;
use std::time::Duration;

/// A record younger than this when sent counts as live.
pub const LIVE_THRESHOLD: Duration = Duration::from_secs(10);

/// How a record is being delivered.
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    /// Unix µs at which it is being sent.
    pub now_us: i64,
}

/// Unix µs as RFC 3339 with microseconds, UTC (`2026-11-22T10:00:00.123456Z`), as TTS writes
/// `received_at`. Clamped to 1970-01-01 .. 9999-12-31T23:59:59.999999Z (a clock that far off
/// must not end a stream: `humantime` refuses years past 9999).
pub fn rfc3339(us: i64) -> String {
    String::from_utf8_lossy(&rfc3339_bytes(us)).into_owned()
}

/// The last microsecond RFC 3339's four-digit years can write.
const RFC3339_MAX_US: i64 = 253_402_300_799_999_999;

/// What [`rfc3339`] writes, into a fixed buffer without `fmt` (two or three per uplink, issue
/// 16). A unit test compares it with `humantime::format_rfc3339_micros`.
fn rfc3339_bytes(us: i64) -> [u8; 27] {
    let us = us.clamp(0, RFC3339_MAX_US) as u64;
    let (secs, micros) = (us / 1_000_000, us % 1_000_000);
    let (days, sod) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (proleptic Gregorian), after H. Hinnant's
    // `civil_from_days`: eras of 400 years start on 0000-03-01.
    let z = days + 719_468;
    let (era, doe) = (z / 146_097, z % 146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let mut b = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, sod / 3_600);
    put(14, 2, sod / 60 % 60);
    put(17, 2, sod % 60);
    put(20, 6, micros);
    b
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[derive(Serialize)]
struct GatewayIds {
    gateway_id: String,
    eui: String,
}

fn gateway_ids(eui: Eui64) -> GatewayIds {
    GatewayIds {
        gateway_id: format!("eui-{}", eui.to_lower_hex()),
        eui: eui.to_string(),
    }
}

#[derive(Serialize)]
struct RxMetadata<'a> {
    gateway_ids: GatewayIds,
    #[serde(skip_serializing_if = "Option::is_none")]
    time: Option<&'a str>,
    timestamp: u32,
    rssi: i32,
    channel_rssi: i32,
    snr: f32,
    channel_index: u32,
    rf_chain: u32,
    received_at: String,
}

fn rx_metadata(r: &RxInfo) -> RxMetadata<'_> {
    RxMetadata {
        gateway_ids: gateway_ids(r.gateway),
        time: r.time.as_deref(),
        timestamp: r.tmst,
        rssi: r.rssi,
        channel_rssi: r.channel_rssi,
        snr: r.snr,
        channel_index: r.channel,
        rf_chain: r.rf_chain,
        received_at: rfc3339(r.received_at_us),
    }
}

#[derive(Serialize)]
struct Lora<'a> {
    bandwidth: u32,
    spreading_factor: u8,
    #[serde(skip_serializing_if = "str::is_empty")]
    coding_rate: &'a str,
}

#[derive(Serialize)]
struct DataRate<'a> {
    lora: Lora<'a>,
}

#[derive(Serialize)]
struct Settings<'a> {
    data_rate: DataRate<'a>,
    /// TTS encodes uint64 as a JSON string.
    frequency: String,
    timestamp: u32,
}

fn settings(s: &TxSettings, tmst: u32) -> Settings<'_> {
    Settings {
        data_rate: DataRate {
            lora: Lora {
                bandwidth: s.bandwidth_hz,
                spreading_factor: s.spreading_factor,
                coding_rate: &s.coding_rate,
            },
        },
        frequency: s.frequency_hz.to_string(),
        timestamp: tmst,
    }
}

/// Present only on messages that waited in the queue.
#[derive(Serialize)]
struct Buffered {
    buffered: bool,
    /// How long the message was held before this delivery, in seconds.
    held_s: f64,
}

fn buffered(received_at_us: i64, d: Delivery) -> Option<Buffered> {
    let held = (d.now_us - received_at_us).max(0);
    (held as u128 >= LIVE_THRESHOLD.as_micros()).then(|| Buffered {
        buffered: true,
        held_s: held as f64 / 1e6,
    })
}

#[cfg(test)]
#[derive(Serialize)]
struct ApplicationIds<'a> {
    application_id: &'a str,
}

#[cfg(test)]
#[derive(Serialize)]
struct EndDeviceIds<'a> {
    device_id: &'a str,
    application_ids: ApplicationIds<'a>,
    dev_eui: String,
    /// OTAA devices (TTS writes it for every device that joins).
    #[serde(skip_serializing_if = "Option::is_none")]
    join_eui: Option<String>,
    dev_addr: String,
}

#[cfg(test)]
/// TTS `NetworkIdentifiers`: which network handled the uplink. lorastream knows its NetID
/// (`[gateway] net_id`); TTS's tenant and cluster fields have no counterpart here.
#[derive(Serialize)]
struct NetworkIds {
    net_id: String,
}

#[cfg(test)]
/// `uplink_message.lorastream`: what TTS has no field for.
#[derive(Serialize)]
struct UplinkLorastream<'a> {
    /// Why the payload codec gave no `decoded_payload` (contract, "Payload codecs").
    codec_error: &'a str,
}

/// What the TTS layout of an uplink needs besides the record (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct UplinkExtras<'a> {
    /// `end_device_ids.join_eui`: the JoinEUI of an OTAA device.
    pub join_eui: Option<Eui64>,
    /// `uplink_message.network_ids.net_id`.
    pub net_id: Option<NetId>,
    /// The payload codec's result.
    pub decoded: Decoded<'a>,
}

#[cfg(test)]
/// Field order as in TTS's `ApplicationUplink` (messages.proto), so the `xml` documents read
/// the same way.
#[derive(Serialize)]
struct UplinkMessage<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    f_port: Option<u8>,
    f_cnt: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    frm_payload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    decoded_payload: Option<&'a serde_json::Map<String, serde_json::Value>>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    decoded_payload_warnings: &'a [String],
    rx_metadata: Vec<RxMetadata<'a>>,
    settings: Settings<'a>,
    confirmed: bool,
    received_at: String,
    /// The last DevStatusAns, as TTS reports it (`{"f_value": percent, "received_at"}`);
    /// absent on external power or when the device cannot tell.
    #[serde(skip_serializing_if = "Option::is_none")]
    last_battery_percentage: Option<FValue>,
    /// The link margin (dB) of that DevStatusAns (a lorastream field, TTS-like shape).
    #[serde(skip_serializing_if = "Option::is_none")]
    last_margin: Option<Margin>,
    #[serde(skip_serializing_if = "Option::is_none")]
    network_ids: Option<NetworkIds>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lorastream: Option<UplinkLorastream<'a>>,
}

#[cfg(test)]
#[derive(Serialize)]
struct FValue {
    f_value: f32,
    received_at: String,
}

#[cfg(test)]
#[derive(Serialize)]
struct Margin {
    value: i8,
    received_at: String,
}

#[cfg(test)]
#[derive(Serialize)]
struct UplinkDoc<'a> {
    end_device_ids: EndDeviceIds<'a>,
    correlation_ids: [String; 1],
    received_at: String,
    uplink_message: UplinkMessage<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lorastream: Option<Buffered>,
}

/// TTS v3 uplink JSON of a device uplink, field order as in TTS's `ApplicationUplink`
/// (messages.proto), written by [`Out`] (static keys as they are, values as serde_json writes
/// them). The unit tests pin its bytes and compare them with serde's derive of the same layout.
pub fn uplink_json(u: &Uplink, x: &UplinkExtras<'_>, d: Delivery) -> Vec<u8> {
    let mut o = Out::new();
    o.raw(r#"{"end_device_ids":{"device_id":"#);
    o.value(&*u.device);
    o.raw(r#","application_ids":{"application_id":"#);
    o.value(&*u.application);
    o.raw(r#"},"dev_eui":"#);
    o.quoted(&u.dev_eui.upper_hex());
    if let Some(j) = x.join_eui {
        o.raw(r#","join_eui":"#);
        o.quoted(&j.upper_hex());
    }
    o.raw(r#","dev_addr":"#);
    o.quoted(&u.dev_addr.upper_hex());
    o.raw(r#"},"correlation_ids":["#);
    o.plain(&correlation_id("uplink", u.id));
    o.raw(r#"],"received_at":"#);
    // Written once, copied for `uplink_message.received_at`.
    let received_at = o.rfc3339(u.received_at_us);
    o.raw(r#","uplink_message":{"#);
    if let Some(p) = u.f_port {
        o.raw(r#""f_port":"#);
        o.int(p);
        o.raw(",");
    }
    o.raw(r#""f_cnt":"#);
    o.int(u.f_cnt);
    if !u.payload.is_empty() {
        o.raw(r#","frm_payload":"#);
        o.base64(&u.payload);
    }
    if let Some(p) = x.decoded.payload {
        o.raw(r#","decoded_payload":"#);
        o.value(p);
    }
    if !x.decoded.warnings.is_empty() {
        o.raw(r#","decoded_payload_warnings":"#);
        o.value(x.decoded.warnings);
    }
    o.raw(r#","rx_metadata":["#);
    for (i, r) in u.rx.iter().enumerate() {
        if i > 0 {
            o.raw(",");
        }
        o.rx_metadata(r);
    }
    o.raw(r#"],"settings":"#);
    o.settings(&u.settings, u.rx.first().map(|r| r.tmst).unwrap_or(0));
    o.raw(r#","confirmed":"#);
    o.raw(if u.confirmed { "true" } else { "false" });
    o.raw(r#","received_at":"#);
    o.copy(received_at);
    if let Some(st) = u.dev_status {
        if let Some(p) = st.battery_percentage() {
            o.raw(r#","last_battery_percentage":{"f_value":"#);
            // One decimal, as TTS shows it.
            o.value(&((p * 10.0).round() / 10.0));
            o.raw(r#","received_at":"#);
            o.rfc3339(st.received_at_us);
            o.raw("}");
        }
        o.raw(r#","last_margin":{"value":"#);
        o.int(st.margin);
        o.raw(r#","received_at":"#);
        o.rfc3339(st.received_at_us);
        o.raw("}");
    }
    if let Some(n) = x.net_id {
        o.raw(r#","network_ids":{"net_id":"#);
        o.display(n);
        o.raw("}");
    }
    if let Some(e) = x.decoded.error {
        o.raw(r#","lorastream":{"codec_error":"#);
        o.value(e);
        o.raw("}");
    }
    o.raw("}");
    if let Some(b) = buffered(u.received_at_us, d) {
        o.raw(r#","lorastream":{"buffered":"#);
        o.value(&b.buffered);
        o.raw(r#","held_s":"#);
        o.value(&b.held_s);
        o.raw("}");
    }
    o.raw("}");
    o.finish()
}

/// JSON written straight into one buffer (issue 16). serde_json escapes every key of a derived
/// `Serialize` at run time, scanning it byte by byte (~8,000 instructions per uplink); here
/// keys and punctuation are `&'static str` pieces written as they are (they hold nothing that
/// needs escaping), values go through serde_json (strings escaped, floats as serde_json writes
/// them, NaN as `null`), and ids that are hex, base64, RFC 3339 or digits are written quoted
/// as they are.
struct Out {
    buf: Vec<u8>,
    /// A value serde_json refused (none of the values written here can be refused today):
    /// `finish` then gives the empty document, as `to_json` does.
    failed: bool,
}

impl Out {
    /// Sized once for a typical uplink (~800 bytes), not grown from 8 bytes by doubling.
    fn new() -> Self {
        Out {
            buf: Vec::with_capacity(1024),
            failed: false,
        }
    }

    /// Keys and punctuation: written as they are. Inlined with a copy of constant length (a
    /// few moves per piece) rather than a call of `Vec::extend_from_slice` and `memcpy` for
    /// each of the ~40 pieces of an uplink (issue 16).
    #[inline(always)]
    fn raw(&mut self, s: &'static str) {
        let b = s.as_bytes();
        self.buf.reserve(b.len());
        let len = self.buf.len();
        // SAFETY: `reserve` made room for `b.len()` more bytes after `len`; `b` is a static
        // string, so it cannot overlap the buffer; the bytes are initialised before `set_len`.
        unsafe {
            std::ptr::copy_nonoverlapping(b.as_ptr(), self.buf.as_mut_ptr().add(len), b.len());
            self.buf.set_len(len + b.len());
        }
    }

    /// Any value, byte for byte as serde_json writes it.
    fn value<T: Serialize + ?Sized>(&mut self, v: &T) {
        if serde_json::to_writer(crate::vec_write::VecWriter(&mut self.buf), v).is_err() {
            self.failed = true;
        }
    }

    /// An integer, as serde_json writes it (both use `itoa`), without serde_json's writer
    /// round trip for each of the dozen numbers of an uplink.
    fn int<I: itoa::Integer>(&mut self, v: I) {
        let mut digits = itoa::Buffer::new();
        crate::vec_write::extend(&mut self.buf, digits.format(v).as_bytes());
    }

    /// A string known to need no escaping, quoted.
    fn plain(&mut self, s: &str) {
        debug_assert!(needs_no_escape(s), "{s:?}");
        self.buf.push(b'"');
        crate::vec_write::extend(&mut self.buf, s.as_bytes());
        self.buf.push(b'"');
    }

    /// ASCII that needs no escaping (hex ids), quoted.
    fn quoted(&mut self, s: &[u8]) {
        debug_assert!(needs_no_escape(std::str::from_utf8(s).unwrap_or("\\")));
        self.buf.push(b'"');
        crate::vec_write::extend(&mut self.buf, s);
        self.buf.push(b'"');
    }

    /// Unix µs as [`rfc3339`] writes it, quoted; returns where it is, for [`Out::copy`].
    fn rfc3339(&mut self, us: i64) -> std::ops::Range<usize> {
        let start = self.buf.len();
        self.buf.push(b'"');
        self.buf.extend_from_slice(&rfc3339_bytes(us));
        self.buf.push(b'"');
        start..self.buf.len()
    }

    /// A value whose `Display` needs no escaping (hex ids, RFC 3339), quoted; returns where it
    /// is in the buffer, for [`Out::copy`].
    fn display(&mut self, v: impl std::fmt::Display) -> std::ops::Range<usize> {
        use std::io::Write;
        let start = self.buf.len();
        self.buf.push(b'"');
        // Writing to a Vec cannot fail.
        let _ = write!(self.buf, "{v}");
        self.buf.push(b'"');
        debug_assert!(needs_no_escape(
            std::str::from_utf8(&self.buf[start + 1..self.buf.len() - 1]).unwrap_or("\\")
        ));
        start..self.buf.len()
    }

    /// Again what an earlier [`Out::display`] wrote.
    fn copy(&mut self, r: std::ops::Range<usize>) {
        self.buf.extend_from_within(r);
    }

    /// Standard base64 with padding, quoted (as [`b64`]).
    fn base64(&mut self, b: &[u8]) {
        let engine = &base64::engine::general_purpose::STANDARD;
        self.buf.push(b'"');
        let start = self.buf.len();
        let n = base64::encoded_len(b.len(), true).unwrap_or(0);
        self.buf.resize(start + n, 0);
        match engine.encode_slice(b, &mut self.buf[start..]) {
            Ok(written) => self.buf.truncate(start + written),
            Err(_) => {
                self.buf.truncate(start);
                self.failed = true;
            }
        }
        self.buf.push(b'"');
    }

    /// `"eui-<lower hex>"`, then `"<upper hex>"`: [`GatewayIds`].
    fn gateway_ids(&mut self, eui: Eui64) {
        let mut hex = [0u8; 16];
        if hex::encode_to_slice(eui.0, &mut hex).is_err() {
            self.failed = true;
        }
        self.raw(r#"{"gateway_id":"eui-"#);
        self.buf.extend_from_slice(&hex);
        self.raw(r#"","eui":""#);
        hex.make_ascii_uppercase();
        self.buf.extend_from_slice(&hex);
        self.raw(r#""}"#);
    }

    /// [`RxMetadata`].
    fn rx_metadata(&mut self, r: &RxInfo) {
        self.raw(r#"{"gateway_ids":"#);
        self.gateway_ids(r.gateway);
        if let Some(t) = &r.time {
            self.raw(r#","time":"#);
            self.value(t.as_str());
        }
        self.raw(r#","timestamp":"#);
        self.int(r.tmst);
        self.raw(r#","rssi":"#);
        self.int(r.rssi);
        self.raw(r#","channel_rssi":"#);
        self.int(r.channel_rssi);
        self.raw(r#","snr":"#);
        self.value(&r.snr);
        self.raw(r#","channel_index":"#);
        self.int(r.channel);
        self.raw(r#","rf_chain":"#);
        self.int(r.rf_chain);
        self.raw(r#","received_at":"#);
        self.rfc3339(r.received_at_us);
        self.raw("}");
    }

    /// [`Settings`].
    fn settings(&mut self, s: &TxSettings, tmst: u32) {
        self.raw(r#"{"data_rate":{"lora":{"bandwidth":"#);
        self.int(s.bandwidth_hz);
        self.raw(r#","spreading_factor":"#);
        self.int(s.spreading_factor);
        if !s.coding_rate.is_empty() {
            self.raw(r#","coding_rate":"#);
            self.value(s.coding_rate.as_str());
        }
        self.raw(r#"}},"frequency":""#);
        self.int(s.frequency_hz);
        self.raw(r#"","timestamp":"#);
        self.int(tmst);
        self.raw("}");
    }

    fn finish(self) -> Vec<u8> {
        if self.failed {
            Vec::new()
        } else {
            self.buf
        }
    }
}

/// What serde_json writes unchanged inside quotes.
fn needs_no_escape(s: &str) -> bool {
    s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\')
}

/// The same document through serde's derive: the reference the writer is checked against.
#[cfg(test)]
fn uplink_json_serde(u: &Uplink, x: &UplinkExtras<'_>, d: Delivery) -> Vec<u8> {
    let received_at = rfc3339(u.received_at_us);
    let tmst = u.rx.first().map(|r| r.tmst).unwrap_or(0);
    let doc = UplinkDoc {
        end_device_ids: EndDeviceIds {
            device_id: &u.device,
            application_ids: ApplicationIds {
                application_id: &u.application,
            },
            dev_eui: u.dev_eui.to_string(),
            join_eui: x.join_eui.map(|j| j.to_string()),
            dev_addr: u.dev_addr.to_string(),
        },
        correlation_ids: [correlation_id("uplink", u.id)],
        received_at: received_at.clone(),
        uplink_message: UplinkMessage {
            f_port: u.f_port,
            f_cnt: u.f_cnt,
            frm_payload: (!u.payload.is_empty()).then(|| b64(&u.payload)),
            decoded_payload: x.decoded.payload,
            decoded_payload_warnings: x.decoded.warnings,
            rx_metadata: u.rx.iter().map(rx_metadata).collect(),
            settings: settings(&u.settings, tmst),
            confirmed: u.confirmed,
            received_at,
            last_battery_percentage: u.dev_status.and_then(|st| {
                st.battery_percentage().map(|p| FValue {
                    // One decimal, as TTS shows it.
                    f_value: (p * 10.0).round() / 10.0,
                    received_at: rfc3339(st.received_at_us),
                })
            }),
            last_margin: u.dev_status.map(|st| Margin {
                value: st.margin,
                received_at: rfc3339(st.received_at_us),
            }),
            network_ids: x.net_id.map(|n| NetworkIds {
                net_id: n.to_string(),
            }),
            lorastream: x
                .decoded
                .error
                .map(|codec_error| UplinkLorastream { codec_error }),
        },
        lorastream: buffered(u.received_at_us, d),
    };
    to_json(&doc)
}

/// A document's JSON in a buffer sized once for a typical uplink (~800 bytes), not grown from
/// 8 bytes by doubling (issue 16).
fn to_json(doc: &impl Serialize) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    match serde_json::to_writer(&mut out, doc) {
        Ok(()) => out,
        Err(_) => Vec::new(),
    }
}

#[derive(Serialize)]
struct GatewayUplinkMessage<'a> {
    raw_payload: String,
    m_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    dev_addr: Option<String>,
    settings: Settings<'a>,
    rx_metadata: [RxMetadata<'a>; 1],
    crc_status: bool,
    received_at: String,
}

#[derive(Serialize)]
struct GatewayDoc<'a> {
    gateway_ids: GatewayIds,
    correlation_ids: [String; 1],
    received_at: String,
    uplink_message: GatewayUplinkMessage<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lorastream: Option<Buffered>,
}

/// JSON of a raw gateway frame.
pub fn gateway_json(g: &GatewayFrame, d: Delivery) -> Vec<u8> {
    let kind = crate::lorawan::frame::kind(&g.phy_payload);
    let dev_addr = crate::lorawan::frame::peek_data_up(&g.phy_payload)
        .ok()
        .map(|h| h.dev_addr.to_string());
    let received_at = rfc3339(g.rx.received_at_us);
    let doc = GatewayDoc {
        gateway_ids: gateway_ids(g.rx.gateway),
        correlation_ids: [correlation_id("frame", g.id)],
        received_at: received_at.clone(),
        uplink_message: GatewayUplinkMessage {
            raw_payload: b64(&g.phy_payload),
            m_type: kind.name(),
            dev_addr,
            settings: settings(&g.settings, g.rx.tmst),
            rx_metadata: [rx_metadata(&g.rx)],
            crc_status: g.crc_ok,
            received_at,
        },
        lorastream: buffered(g.rx.received_at_us, d),
    };
    to_json(&doc)
}

/// TTS-style join-accept message of an OTAA join.
pub fn join_json(j: &Join, d: Delivery) -> Vec<u8> {
    let received_at = rfc3339(j.received_at_us);
    let doc = serde_json::json!({
        "end_device_ids": {
            "device_id": j.device,
            "application_ids": { "application_id": j.application },
            "dev_eui": j.dev_eui.to_string(),
            "join_eui": j.join_eui.to_string(),
            "dev_addr": j.dev_addr.to_string(),
        },
        "correlation_ids": [correlation_id("join", j.id)],
        "received_at": received_at,
        "join_accept": {
            "received_at": received_at,
            "rx_metadata": j.rx.iter().map(rx_metadata).collect::<Vec<_>>(),
            "settings": settings(&j.settings, j.rx.first().map(|r| r.tmst).unwrap_or(0)),
        },
        "lorastream": buffered(j.received_at_us, d),
    });
    let mut doc = doc;
    if doc["lorastream"].is_null() {
        if let Some(o) = doc.as_object_mut() {
            o.remove("lorastream");
        }
    }
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// JSON of any record (`x` is used for uplinks only).
pub fn record_json(r: &Record, x: &UplinkExtras<'_>, d: Delivery) -> Vec<u8> {
    match r {
        Record::Uplink(u) => uplink_json(u, x, d),
        Record::GatewayFrame(g) => gateway_json(g, d),
        Record::Join(j) => join_json(j, d),
        Record::Alert(a) => alert_json(a),
    }
}

/// An alert message (contract, "WebSocket and e-mail streams, alerts"):
/// `{"alert": {"id", "kind", "state", "subject", "since", "message"}}`, plus the message's
/// `correlation_ids` (stable across redeliveries, as for uplinks) and `received_at`.
pub fn alert_json(a: &crate::model::AlertMsg) -> Vec<u8> {
    let doc = serde_json::json!({
        "alert": {
            "id": a.alert_id,
            "kind": a.kind,
            "state": if a.firing { "firing" } else { "resolved" },
            "subject": a.subject,
            "since": rfc3339(a.since_us),
            "message": a.message,
        },
        "correlation_ids": [crate::model::correlation_id("alert", a.id)],
        "received_at": rfc3339(a.at_us),
    });
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// lorastream's topic of a record under an MQTT prefix (contract, "MQTT topics": uplinks,
/// joins and gateway-level frames), for the `tts`, `xml` and `template` formats.
pub fn topic(prefix: &str, r: &Record) -> String {
    // Concatenated rather than `format!`ed: one per uplink (issue 16).
    let device_topic = |application: &str, device: &str, event: &str| {
        let mut t = String::with_capacity(
            prefix.len() + application.len() + device.len() + event.len() + 11,
        );
        for part in [prefix, "/", application, "/devices/", device, "/", event] {
            t.push_str(part);
        }
        t
    };
    match r {
        Record::Uplink(u) => device_topic(&u.application, &u.device, "up"),
        Record::Join(j) => device_topic(&j.application, &j.device, "join"),
        Record::GatewayFrame(g) => format!("{prefix}/gateways/{}/up", g.rx.gateway.to_lower_hex()),
        Record::Alert(a) => format!("{prefix}/gateways/{}/alerts", a.origin),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DevAddr;

    fn sample() -> Uplink {
        let mut u = crate::sim::fixtures::uplink(1, 70_000);
        u.id = 0x0193_0000_0000_0000_0000_0000_0000_0001;
        u.received_at_us = 1_795_000_000_123_456;
        (u.application, u.device) = ("farm".into(), "soil-1".into());
        u.dev_eui = "70b3d57ed0000001".parse().unwrap();
        u.dev_addr = DevAddr(0x2600_0001);
        u.adr = true;
        u.payload = vec![1, 2, 3, 4];
        u.rx[0].gateway = "aa555a0000000000".parse().unwrap();
        (u.rx[0].tmst, u.rx[0].rssi, u.rx[0].channel_rssi) = (2_000_123, -57, -57);
        (u.rx[0].snr, u.rx[0].channel) = (9.5, 2);
        u.rx[0].received_at_us = u.received_at_us;
        u
    }

    #[test]
    fn tts_layout_has_the_contract_fields() {
        let u = sample();
        let live = Delivery {
            now_us: u.received_at_us + 1000,
        };
        let v: serde_json::Value =
            serde_json::from_slice(&uplink_json(&u, &UplinkExtras::default(), live)).unwrap();
        assert_eq!(v["end_device_ids"]["device_id"], "soil-1");
        assert_eq!(
            v["end_device_ids"]["application_ids"]["application_id"],
            "farm"
        );
        assert_eq!(v["end_device_ids"]["dev_eui"], "70B3D57ED0000001");
        assert_eq!(v["end_device_ids"]["dev_addr"], "26000001");
        let cid = v["correlation_ids"][0].as_str().unwrap();
        assert!(cid.starts_with("lorastream:uplink:01"), "{cid}");
        assert_eq!(v["received_at"], "2026-11-18T11:06:40.123456Z");
        let m = &v["uplink_message"];
        assert_eq!(m["f_port"], 1);
        assert_eq!(m["f_cnt"], 70_000);
        assert_eq!(m["frm_payload"], "AQIDBA==");
        assert_eq!(m["confirmed"], false);
        let rx = &m["rx_metadata"][0];
        assert_eq!(rx["gateway_ids"]["gateway_id"], "eui-aa555a0000000000");
        assert_eq!(rx["gateway_ids"]["eui"], "AA555A0000000000");
        assert_eq!(rx["timestamp"], 2_000_123);
        assert_eq!(rx["rssi"], -57);
        assert_eq!(rx["snr"], 9.5);
        assert_eq!(rx["channel_index"], 2);
        let s = &m["settings"];
        assert_eq!(s["data_rate"]["lora"]["bandwidth"], 125_000);
        assert_eq!(s["data_rate"]["lora"]["spreading_factor"], 7);
        assert_eq!(s["data_rate"]["lora"]["coding_rate"], "4/5");
        assert_eq!(s["frequency"], "868100000");
        assert_eq!(s["timestamp"], 2_000_123);
        assert!(v.get("lorastream").is_none(), "live messages are plain TTS");
        // Same correlation id on every delivery.
        let again: serde_json::Value =
            serde_json::from_slice(&uplink_json(&u, &UplinkExtras::default(), live)).unwrap();
        assert_eq!(again["correlation_ids"], v["correlation_ids"]);
    }

    #[test]
    fn backlog_deliveries_say_so() {
        let u = sample();
        let late = Delivery {
            now_us: u.received_at_us + 90_000_000,
        };
        let v: serde_json::Value =
            serde_json::from_slice(&uplink_json(&u, &UplinkExtras::default(), late)).unwrap();
        assert_eq!(v["lorastream"]["buffered"], true);
        assert_eq!(v["lorastream"]["held_s"], 90.0);
        assert_eq!(v["received_at"], "2026-11-18T11:06:40.123456Z");
    }

    /// The layout of today's consumers, byte for byte: extras that are absent add nothing.
    #[test]
    fn plain_uplink_is_unchanged() {
        let u = sample();
        let live = Delivery {
            now_us: u.received_at_us,
        };
        let got = String::from_utf8(uplink_json(&u, &UplinkExtras::default(), live)).unwrap();
        let want = concat!(
            r#"{"end_device_ids":{"device_id":"soil-1","application_ids":{"application_id":"farm"},"#,
            r#""dev_eui":"70B3D57ED0000001","dev_addr":"26000001"},"#,
            r#""correlation_ids":["lorastream:uplink:01JC0000000000000000000001"],"#,
            r#""received_at":"2026-11-18T11:06:40.123456Z","uplink_message":{"f_port":1,"f_cnt":70000,"#,
            r#""frm_payload":"AQIDBA==","rx_metadata":[{"gateway_ids":{"gateway_id":"eui-aa555a0000000000","#,
            r#""eui":"AA555A0000000000"},"timestamp":2000123,"rssi":-57,"channel_rssi":-57,"snr":9.5,"#,
            r#""channel_index":2,"rf_chain":0,"received_at":"2026-11-18T11:06:40.123456Z"}],"#,
            r#""settings":{"data_rate":{"lora":{"bandwidth":125000,"spreading_factor":7,"coding_rate":"4/5"}},"#,
            r#""frequency":"868100000","timestamp":2000123},"confirmed":false,"#,
            r#""received_at":"2026-11-18T11:06:40.123456Z"}}"#
        );
        assert_eq!(got, want);
    }

    #[test]
    fn extras_fill_their_tts_fields() {
        let u = sample();
        let obj = serde_json::json!({"temperature": 21.5, "n": 3});
        let warnings = vec!["low battery".to_string()];
        let x = UplinkExtras {
            join_eui: Some("70B3D57ED00000DC".parse().unwrap()),
            net_id: Some(NetId(0x13)),
            decoded: Decoded {
                payload: obj.as_object(),
                warnings: &warnings,
                error: None,
            },
        };
        let d = Delivery { now_us: 0 };
        let v: serde_json::Value = serde_json::from_slice(&uplink_json(&u, &x, d)).unwrap();
        assert_eq!(v["end_device_ids"]["join_eui"], "70B3D57ED00000DC");
        let m = &v["uplink_message"];
        assert_eq!(m["network_ids"]["net_id"], "000013");
        assert_eq!(m["decoded_payload"]["temperature"], 21.5);
        assert_eq!(
            m["decoded_payload"]["n"], 3,
            "integers stay integers in TTS JSON"
        );
        assert_eq!(m["decoded_payload_warnings"][0], "low battery");
        assert!(m.get("lorastream").is_none());
        // A codec error: the uplink still goes out, with the reason and no decoded payload.
        let x = UplinkExtras {
            decoded: Decoded {
                error: Some("decodeUplink threw: boom"),
                ..Decoded::default()
            },
            ..UplinkExtras::default()
        };
        let v: serde_json::Value = serde_json::from_slice(&uplink_json(&u, &x, d)).unwrap();
        assert_eq!(
            v["uplink_message"]["lorastream"]["codec_error"],
            "decodeUplink threw: boom"
        );
        assert!(v["uplink_message"].get("decoded_payload").is_none());
        assert_eq!(v["uplink_message"]["frm_payload"], "AQIDBA==");
    }

    /// Every optional field and value that needs escaping, byte for byte (the writer of
    /// `uplink_json` spells the keys out itself, issue 16; these bytes are serde_json's).
    fn pinned_cases() -> Vec<String> {
        let obj = serde_json::json!({"temperature": 21.5, "n": 3, "s": "a\"b\n"});
        let warnings = vec!["low battery".to_string(), "tab\there".to_string()];
        let mut out = Vec::new();
        let mut u = sample();
        let x = UplinkExtras {
            join_eui: Some("70B3D57ED00000DC".parse().unwrap()),
            net_id: Some(NetId(0x13)),
            decoded: Decoded {
                payload: obj.as_object(),
                warnings: &warnings,
                error: Some("decodeUplink threw: \"boom\"\u{1}"),
            },
        };
        u.dev_status = Some(crate::model::DevStatus {
            battery: 200,
            margin: -7,
            received_at_us: 1_795_000_001_000_000,
        });
        let d = Delivery {
            now_us: u.received_at_us + 90_500_000,
        };
        out.push(uplink_json(&u, &x, d));
        // Two receptions, one with GPS time; names that need escaping; no FPort, no payload,
        // no coding rate; external power; a confirmed uplink.
        let mut second = u.rx[0].clone();
        second.gateway = "0016c001ff10a235".parse().unwrap();
        second.time = Some("2026-11-18T11:06:40.1Z".into());
        (second.rssi, second.snr, second.channel, second.rf_chain) = (-120, -17.25, 7, 1);
        second.tmst = u32::MAX;
        u.rx.push(second);
        (u.device, u.application) = ("dév \"1\"\\/\n".into(), "</farm>\u{7f}".into());
        (u.f_port, u.payload, u.confirmed) = (None, Vec::new(), true);
        u.settings.coding_rate = Default::default();
        u.dev_status = Some(crate::model::DevStatus {
            battery: 0,
            margin: 31,
            received_at_us: 0,
        });
        out.push(uplink_json(&u, &UplinkExtras::default(), d));
        u.dev_status = None;
        u.rx[0].snr = f32::NAN;
        u.f_port = Some(0);
        out.push(uplink_json(
            &u,
            &UplinkExtras::default(),
            Delivery { now_us: 0 },
        ));
        out.into_iter()
            .map(|b| String::from_utf8(b).unwrap())
            .collect()
    }

    const PINNED: [&str; 3] = [
        concat!(
            "{\"end_device_ids\":{\"device_id\":\"soil-1\",\"application_ids\":{\"application_id\":\"",
            "farm\"},\"dev_eui\":\"70B3D57ED0000001\",\"join_eui\":\"70B3D57ED00000DC\",\"dev_addr\":",
            "\"26000001\"},\"correlation_ids\":[\"lorastream:uplink:01JC0000000000000000000001\"],\"r",
            "eceived_at\":\"2026-11-18T11:06:40.123456Z\",\"uplink_message\":{\"f_port\":1,\"f_cnt\":",
            "70000,\"frm_payload\":\"AQIDBA==\",\"decoded_payload\":{\"n\":3,\"s\":\"a\\\"b\\n\",\"te",
            "mperature\":21.5},\"decoded_payload_warnings\":[\"low battery\",\"tab\\there\"],\"rx_met",
            "adata\":[{\"gateway_ids\":{\"gateway_id\":\"eui-aa555a0000000000\",\"eui\":\"AA555A00000",
            "00000\"},\"timestamp\":2000123,\"rssi\":-57,\"channel_rssi\":-57,\"snr\":9.5,\"channel_i",
            "ndex\":2,\"rf_chain\":0,\"received_at\":\"2026-11-18T11:06:40.123456Z\"}],\"settings\":{",
            "\"data_rate\":{\"lora\":{\"bandwidth\":125000,\"spreading_factor\":7,\"coding_rate\":\"4",
            "/5\"}},\"frequency\":\"868100000\",\"timestamp\":2000123},\"confirmed\":false,\"received",
            "_at\":\"2026-11-18T11:06:40.123456Z\",\"last_battery_percentage\":{\"f_value\":78.7,\"re",
            "ceived_at\":\"2026-11-18T11:06:41.000000Z\"},\"last_margin\":{\"value\":-7,\"received_at",
            "\":\"2026-11-18T11:06:41.000000Z\"},\"network_ids\":{\"net_id\":\"000013\"},\"lorastream",
            "\":{\"codec_error\":\"decodeUplink threw: \\\"boom\\\"\\u0001\"}},\"lorastream\":{\"buff",
            "ered\":true,\"held_s\":90.5}}",
        ),
        concat!(
            "{\"end_device_ids\":{\"device_id\":\"dév \\\"1\\\"\\\\/\\n\",\"application_ids\":{\"appl",
            "ication_id\":\"</farm>\u{7f}\"},\"dev_eui\":\"70B3D57ED0000001\",\"dev_addr\":\"26000001",
            "\"},\"correlation_ids\":[\"lorastream:uplink:01JC0000000000000000000001\"],\"received_at",
            "\":\"2026-11-18T11:06:40.123456Z\",\"uplink_message\":{\"f_cnt\":70000,\"rx_metadata\":[",
            "{\"gateway_ids\":{\"gateway_id\":\"eui-aa555a0000000000\",\"eui\":\"AA555A0000000000\"},",
            "\"timestamp\":2000123,\"rssi\":-57,\"channel_rssi\":-57,\"snr\":9.5,\"channel_index\":2,",
            "\"rf_chain\":0,\"received_at\":\"2026-11-18T11:06:40.123456Z\"},{\"gateway_ids\":{\"gate",
            "way_id\":\"eui-0016c001ff10a235\",\"eui\":\"0016C001FF10A235\"},\"time\":\"2026-11-18T11",
            ":06:40.1Z\",\"timestamp\":4294967295,\"rssi\":-120,\"channel_rssi\":-57,\"snr\":-17.25,\"",
            "channel_index\":7,\"rf_chain\":1,\"received_at\":\"2026-11-18T11:06:40.123456Z\"}],\"set",
            "tings\":{\"data_rate\":{\"lora\":{\"bandwidth\":125000,\"spreading_factor\":7}},\"freque",
            "ncy\":\"868100000\",\"timestamp\":2000123},\"confirmed\":true,\"received_at\":\"2026-11-",
            "18T11:06:40.123456Z\",\"last_margin\":{\"value\":31,\"received_at\":\"1970-01-01T00:00:0",
            "0.000000Z\"}},\"lorastream\":{\"buffered\":true,\"held_s\":90.5}}",
        ),
        concat!(
            "{\"end_device_ids\":{\"device_id\":\"dév \\\"1\\\"\\\\/\\n\",\"application_ids\":{\"appl",
            "ication_id\":\"</farm>\u{7f}\"},\"dev_eui\":\"70B3D57ED0000001\",\"dev_addr\":\"26000001",
            "\"},\"correlation_ids\":[\"lorastream:uplink:01JC0000000000000000000001\"],\"received_at",
            "\":\"2026-11-18T11:06:40.123456Z\",\"uplink_message\":{\"f_port\":0,\"f_cnt\":70000,\"rx",
            "_metadata\":[{\"gateway_ids\":{\"gateway_id\":\"eui-aa555a0000000000\",\"eui\":\"AA555A0",
            "000000000\"},\"timestamp\":2000123,\"rssi\":-57,\"channel_rssi\":-57,\"snr\":null,\"chan",
            "nel_index\":2,\"rf_chain\":0,\"received_at\":\"2026-11-18T11:06:40.123456Z\"},{\"gateway",
            "_ids\":{\"gateway_id\":\"eui-0016c001ff10a235\",\"eui\":\"0016C001FF10A235\"},\"time\":\"",
            "2026-11-18T11:06:40.1Z\",\"timestamp\":4294967295,\"rssi\":-120,\"channel_rssi\":-57,\"s",
            "nr\":-17.25,\"channel_index\":7,\"rf_chain\":1,\"received_at\":\"2026-11-18T11:06:40.123",
            "456Z\"}],\"settings\":{\"data_rate\":{\"lora\":{\"bandwidth\":125000,\"spreading_factor\"",
            ":7}},\"frequency\":\"868100000\",\"timestamp\":2000123},\"confirmed\":true,\"received_at",
            "\":\"2026-11-18T11:06:40.123456Z\"}}",
        ),
    ];

    #[test]
    fn uplink_bytes_are_pinned_for_every_optional_field() {
        let got = pinned_cases();
        assert_eq!(got.len(), PINNED.len());
        for (got, want) in got.iter().zip(PINNED) {
            assert_eq!(got, want);
        }
    }

    /// The writer and serde's derive of the layout agree on the pinned cases and on a run of
    /// varied uplinks.
    #[test]
    fn writer_equals_serde_derive() {
        let mut u = sample();
        let d = Delivery { now_us: 0 };
        for i in 0..200u32 {
            u.f_cnt = i * 7919;
            u.payload = (0..(i % 23) as u8).collect();
            u.f_port = (i % 3 != 0).then_some((i % 224) as u8);
            u.rx[0].snr = i as f32 / 4.0 - 20.0;
            u.rx[0].rssi = -(i as i32);
            u.received_at_us = 1_795_000_000_000_000 + i64::from(i) * 1_234_567;
            u.dev_status = (i % 5 == 0).then_some(crate::model::DevStatus {
                battery: (i % 256) as u8,
                margin: (i % 64) as i8 - 32,
                received_at_us: u.received_at_us - 1,
            });
            let now = Delivery {
                now_us: u.received_at_us + i64::from(i) * 100_000,
            };
            assert_eq!(
                uplink_json(&u, &UplinkExtras::default(), now),
                uplink_json_serde(&u, &UplinkExtras::default(), now),
                "{i}"
            );
        }
        assert_eq!(
            uplink_json(&u, &UplinkExtras::default(), d),
            uplink_json_serde(&u, &UplinkExtras::default(), d)
        );
    }

    #[test]
    fn rfc3339_without_fmt_matches_humantime() {
        let humantime = |us: i64| {
            humantime::format_rfc3339_micros(
                std::time::UNIX_EPOCH + Duration::from_micros(us.max(0) as u64),
            )
            .to_string()
        };
        let mut cases: Vec<i64> = vec![
            -5,
            0,
            1,
            999_999,
            86_399_999_999,
            86_400_000_000,
            951_782_400_000_000,   // 2000-02-29
            951_868_799_999_999,   // 2000-02-29T23:59:59.999999
            4_107_542_400_000_000, // 2100-03-01
            1_795_000_000_123_456,
            RFC3339_MAX_US, // 9999-12-31T23:59:59.999999
        ];
        // Every day of 1970-2106 at a varying time of day, and a spread up to the year 9999.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for day in 0..50_000i64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            cases.push(day * 86_400_000_000 + (x % 86_400_000_000) as i64);
            cases.push((x % (RFC3339_MAX_US as u64 + 1)) as i64);
        }
        for us in cases {
            assert_eq!(rfc3339(us), humantime(us), "{us}");
        }
        // Past the year 9999 (humantime refuses it): the last instant it can write.
        assert_eq!(rfc3339(RFC3339_MAX_US + 1), "9999-12-31T23:59:59.999999Z");
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59.999999Z");
    }

    #[test]
    fn topics() {
        let u = Record::Uplink(sample());
        assert_eq!(topic("lorastream", &u), "lorastream/farm/devices/soil-1/up");
    }
}
