//! Semtech UDP packet-forwarder protocol (GWMP), the pure codec.
//!
//! The 12-byte header (version, token, identifier, gateway EUI) is checked by hand before any
//! JSON is touched, so every well-formed PUSH_DATA gets its PUSH_ACK even when its JSON is bad.
//! JSON bodies are read by `rxpk` when they have the usual shape, else with the `semtech-udp`
//! crate's types, and when those refuse the body, one `rxpk` at a time: the crate parses a
//! datagram all-or-nothing, and one odd field from one forwarder must not lose the other
//! frames of the same datagram (see crate-notes, "semtech-udp 0.12").

use crate::model::{now_us, CodingRateText, Eui64, RxInfo, TxSettings};
use semtech_udp::push_data::{RxPk, Stat, CRC};
use semtech_udp::{CodingRate, DataRate};

/// Protocol versions we answer. Version 1 forwarders send the same JSON.
pub const VERSIONS: [u8; 2] = [1, 2];

pub const PUSH_DATA: u8 = 0;
pub const PUSH_ACK: u8 = 1;
pub const PULL_DATA: u8 = 2;
pub const PULL_RESP: u8 = 3;
pub const PULL_ACK: u8 = 4;
pub const TX_ACK: u8 = 5;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GwmpError {
    #[error("datagram too short ({0} bytes)")]
    TooShort(usize),
    #[error("unknown protocol version {0}")]
    Version(u8),
    #[error("unexpected packet identifier {0:#04x}")]
    Identifier(u8),
    #[error("invalid JSON: {0}")]
    Json(String),
    /// A PULL_RESP we would send is not right for the reference forwarder (a bug of ours).
    #[error("PULL_RESP not sent: {0}")]
    Encode(String),
}

impl GwmpError {
    /// Label for the `lorastream_udp_errors_total{reason}` metric.
    pub fn reason(&self) -> &'static str {
        match self {
            GwmpError::TooShort(_) => "too_short",
            GwmpError::Version(_) => "bad_version",
            GwmpError::Identifier(_) => "bad_identifier",
            GwmpError::Json(_) => "bad_json",
            GwmpError::Encode(_) => "encode",
        }
    }
}

/// A datagram from a packet forwarder, header decoded, body untouched.
#[derive(Debug, PartialEq, Eq)]
pub enum Datagram<'a> {
    PushData {
        version: u8,
        token: u16,
        gateway: Eui64,
        body: &'a [u8],
    },
    PullData {
        version: u8,
        token: u16,
        gateway: Eui64,
    },
    TxAck {
        version: u8,
        token: u16,
        gateway: Eui64,
        body: &'a [u8],
    },
}

/// Decode the header of an upstream datagram.
pub fn decode(buf: &[u8]) -> Result<Datagram<'_>, GwmpError> {
    if buf.len() < 4 {
        return Err(GwmpError::TooShort(buf.len()));
    }
    let version = buf[0];
    if !VERSIONS.contains(&version) {
        return Err(GwmpError::Version(version));
    }
    let token = u16::from_be_bytes([buf[1], buf[2]]);
    let id = buf[3];
    if !matches!(id, PUSH_DATA | PULL_DATA | TX_ACK) {
        return Err(GwmpError::Identifier(id));
    }
    if buf.len() < 12 {
        return Err(GwmpError::TooShort(buf.len()));
    }
    let mut eui = [0u8; 8];
    eui.copy_from_slice(&buf[4..12]);
    let gateway = Eui64(eui);
    // Some forwarders terminate the JSON with a NUL byte.
    let body = match &buf[12..] {
        [rest @ .., 0] => rest,
        b => b,
    };
    Ok(match id {
        PUSH_DATA => Datagram::PushData {
            version,
            token,
            gateway,
            body,
        },
        PULL_DATA => Datagram::PullData {
            version,
            token,
            gateway,
        },
        _ => Datagram::TxAck {
            version,
            token,
            gateway,
            body,
        },
    })
}

/// A PULL_RESP datagram: version, token, identifier, then `{"txpk":{...}}`.
///
/// The reference packet forwarder (`lora_pkt_fwd`, parson) reads a present-but-`null` number
/// as 0 — a `"prea":null` becomes the minimum 6-symbol preamble instead of LoRa's 8 — so a
/// `txpk` with a `null` anywhere is refused here rather than sent.
///
/// The `txpk` object is serialised straight after the header, in the struct's member order
/// (not through a `serde_json::Value`, which sorted the members and cost a map of owned keys
/// per downlink, issue 16); the order of JSON members means nothing to a forwarder.
pub fn pull_resp(
    version: u8,
    token: u16,
    txpk: semtech_udp::pull_resp::TxPk,
) -> Result<Vec<u8>, GwmpError> {
    let t = token.to_be_bytes();
    // Header, ~200 bytes of members, and the base64 of a PHYPayload of up to ~250 bytes.
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&[version, t[0], t[1], PULL_RESP]);
    out.extend_from_slice(br#"{"txpk":"#);
    serde_json::to_writer(&mut out, &txpk).map_err(|e| GwmpError::Encode(e.to_string()))?;
    out.push(b'}');
    let body = &out[4..];
    // Base64 `data` has no ':', so this only matches a JSON member set to null.
    if body.windows(5).any(|w| w == b":null") {
        return Err(GwmpError::Encode(format!(
            "a txpk field is null: {}",
            String::from_utf8_lossy(body)
        )));
    }
    Ok(out)
}

/// PUSH_ACK / PULL_ACK: version, token, identifier.
pub fn ack(version: u8, token: u16, id: u8) -> [u8; 4] {
    let t = token.to_be_bytes();
    [version, t[0], t[1], id]
}

/// Parse a TX_ACK body: empty, `{"txpk_ack":{"error":"NONE"}}` or a warning are success.
pub fn tx_ack_result(body: &[u8]) -> Result<(), String> {
    let body = body
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .map(|i| &body[i..])
        .unwrap_or(&[]);
    if body.is_empty() {
        return Ok(());
    }
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| "INVALID_TX_ACK".to_string())?;
    match v["txpk_ack"]["error"].as_str() {
        None | Some("NONE") | Some("") => Ok(()),
        Some(e) => Err(e.to_string()),
    }
}

/// One received frame, converted from an `rxpk`.
#[derive(Debug, Clone, PartialEq)]
pub struct Reception {
    /// When the datagram arrived (RX windows count from the end of the uplink).
    pub arrived: std::time::Instant,
    pub phy_payload: Vec<u8>,
    pub crc_ok: bool,
    pub settings: TxSettings,
    pub rx: RxInfo,
}

/// The content of a PUSH_DATA body.
#[derive(Debug, Default)]
pub struct PushData {
    pub receptions: Vec<Reception>,
    pub stat: Option<Stat>,
    /// `rxpk` entries that could not be parsed (each is logged by the caller).
    pub bad_rxpk: Vec<String>,
}

/// Parse a PUSH_DATA JSON body, entry by entry.
pub fn parse_push_data(body: &[u8], gateway: Eui64) -> Result<PushData, GwmpError> {
    #[derive(serde::Deserialize)]
    struct Raw<'a> {
        #[serde(default, borrow)]
        rxpk: Vec<&'a serde_json::value::RawValue>,
        #[serde(default, borrow)]
        stat: Option<&'a serde_json::value::RawValue>,
    }
    let received_at_us = now_us();
    let mut out = PushData::default();
    // Fast path: the whole body parses at once (the normal case). Only for an all-ASCII body,
    // which every rxpk is (see `guarded`).
    if body.is_ascii() {
        // Version-1 entries in plain JSON, read without serde (see `rxpk`).
        if let Some(read) = super::rxpk::read(body) {
            let stat = match read.stat {
                None => Some(None),
                Some(raw) => {
                    guarded(|| serde_json::from_str::<Option<Stat>>(raw)).and_then(Result::ok)
                }
            };
            if let Some(stat) = stat {
                out.receptions = read
                    .entries
                    .into_iter()
                    .map(|f| f.reception(gateway, received_at_us))
                    .collect();
                out.stat = stat;
                return Ok(out);
            }
        }
        if let Some(Ok(d)) =
            guarded(|| serde_json::from_slice::<semtech_udp::push_data::Data>(body))
        {
            out.receptions = d
                .rxpk
                .unwrap_or_default()
                .iter()
                .map(|pk| reception(pk, gateway, received_at_us))
                .collect();
            out.stat = d.stat;
            return Ok(out);
        }
    }
    // Slow path: entry by entry, so one bad entry costs only itself.
    let raw: Raw = serde_json::from_slice(body).map_err(|e| GwmpError::Json(e.to_string()))?;
    for v in raw.rxpk {
        if !v.get().is_ascii() {
            out.bad_rxpk
                .push("an rxpk with non-ASCII characters (every rxpk field is ASCII)".into());
            continue;
        }
        // From the raw text, not a `Value`: the crate's types borrow strings while parsing.
        match guarded(|| serde_json::from_str::<RxPk>(v.get())) {
            Some(Ok(pk)) => out.receptions.push(reception(&pk, gateway, received_at_us)),
            Some(Err(e)) => out.bad_rxpk.push(e.to_string()),
            None => out.bad_rxpk.push(PARSER_PANICKED.into()),
        }
    }
    if let Some(s) = raw.stat {
        match guarded(|| serde_json::from_str::<Stat>(s.get())) {
            Some(Ok(s)) => out.stat = Some(s),
            Some(Err(e)) => out.bad_rxpk.push(format!("stat: {e}")),
            None => out.bad_rxpk.push(format!("stat: {PARSER_PANICKED}")),
        }
    }
    Ok(out)
}

const PARSER_PANICKED: &str = "the semtech-udp parser failed on this entry";

/// Run one of `semtech-udp`'s parsers, which can panic on input they do not expect: 0.12's
/// `DataRate::from_str` slices `datr` at byte offsets, so a multi-byte character there panicked
/// and ended the ingress task (found by tests/fuzz_udp.rs). No rxpk field is anything but ASCII,
/// so entries with other bytes never reach the crate; and a panic in its parsing for any other
/// reason is caught here and counted like bad JSON: a datagram never ends the ingress task.
/// (The panic hook still prints the panic once per occurrence, which is how it gets reported.)
fn guarded<T>(parse: impl FnOnce() -> T) -> Option<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(parse)).ok()
}

fn coding_rate(c: Option<CodingRate>) -> CodingRateText {
    CodingRateText::from_static(match c {
        Some(CodingRate::_4_5) => "4/5",
        Some(CodingRate::_4_6) => "4/6",
        Some(CodingRate::_4_7) => "4/7",
        Some(CodingRate::_4_8) => "4/8",
        None => "",
    })
}

/// What a [`Reception`] takes from an `rxpk`, whichever reader read it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RxFields {
    pub data: Vec<u8>,
    pub crc_ok: bool,
    /// `freq`, MHz.
    pub freq: f64,
    pub datr: DataRate,
    pub codr: Option<CodingRate>,
    pub tmst: u32,
    pub time: Option<String>,
    /// The signal RSSI when the forwarder gave one, else the channel RSSI.
    pub rssi: i32,
    pub channel_rssi: i32,
    pub snr: f32,
    pub channel: u32,
    pub rf_chain: u32,
}

impl RxFields {
    pub(super) fn reception(self, gateway: Eui64, received_at_us: i64) -> Reception {
        Reception {
            arrived: std::time::Instant::now(),
            phy_payload: self.data,
            crc_ok: self.crc_ok,
            settings: TxSettings {
                frequency_hz: (self.freq * 1_000_000.0).round() as u32,
                spreading_factor: u32::from(self.datr.spreading_factor()) as u8,
                bandwidth_hz: u32::from(self.datr.bandwidth()),
                coding_rate: coding_rate(self.codr),
            },
            rx: RxInfo {
                gateway,
                tmst: self.tmst,
                time: self.time,
                rssi: self.rssi,
                channel_rssi: self.channel_rssi,
                snr: self.snr,
                channel: self.channel,
                rf_chain: self.rf_chain,
                received_at_us,
            },
        }
    }
}

/// The fields of an entry parsed by the crate (either version).
pub(super) fn fields(pk: &RxPk) -> RxFields {
    let (channel, rf_chain) = match pk {
        RxPk::V1(v) => (v.chan as u32, v.rfch as u32),
        RxPk::V2(v) => (v.rsig.first().map(|r| r.chan as u32).unwrap_or(0), 0),
    };
    RxFields {
        data: pk.data().clone(),
        crc_ok: !matches!(pk.crc_status(), CRC::Fail),
        freq: pk.frequency(),
        datr: pk.datarate(),
        codr: pk.coding_rate(),
        tmst: pk.timestamp(),
        time: pk.time().clone(),
        rssi: pk.signal_rssi().unwrap_or_else(|| pk.channel_rssi()),
        channel_rssi: pk.channel_rssi(),
        snr: pk.snr(),
        channel,
        rf_chain,
    }
}

fn reception(pk: &RxPk, gateway: Eui64, received_at_us: i64) -> Reception {
    fields(pk).reception(gateway, received_at_us)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(body: &str) -> Vec<u8> {
        let mut v = vec![2, 0xAB, 0xCD, PUSH_DATA, 0xAA, 0x55, 0x5A, 0, 0, 0, 0, 1];
        v.extend_from_slice(body.as_bytes());
        v
    }

    const RXPK: &str = r#"{"tmst":2000123,"chan":2,"rfch":0,"freq":868.1,"stat":1,"modu":"LORA","datr":"SF7BW125","codr":"4/5","lsnr":9.5,"rssi":-57,"size":4,"data":"QAECAw=="}"#;

    #[test]
    fn header_checks() {
        assert_eq!(decode(&[2, 0, 0]), Err(GwmpError::TooShort(3)));
        assert_eq!(decode(&[9, 0, 0, 0]), Err(GwmpError::Version(9)));
        assert_eq!(decode(&[2, 0, 0, 7]), Err(GwmpError::Identifier(7)));
        assert_eq!(decode(&[2, 0, 0, 0, 1, 2]), Err(GwmpError::TooShort(6)));
        match decode(&push("{}\0")).unwrap() {
            Datagram::PushData {
                token,
                gateway,
                body,
                ..
            } => {
                assert_eq!(token, 0xABCD);
                assert_eq!(gateway.to_string(), "AA555A0000000001");
                assert_eq!(body, b"{}");
            }
            d => panic!("{d:?}"),
        }
        assert_eq!(ack(2, 0xABCD, PUSH_ACK), [2, 0xAB, 0xCD, 1]);
    }

    /// What the crate's own `Data` (the untagged `RxPk`) reads, as receptions.
    fn via_crate(body: &str) -> Vec<Reception> {
        let d: semtech_udp::push_data::Data = serde_json::from_str(body).unwrap();
        d.rxpk
            .unwrap_or_default()
            .iter()
            .map(|pk| reception(pk, Eui64::from_u64(1), 7))
            .collect()
    }

    /// Receptions without their arrival instant (the two parses run at different times).
    fn plain(r: Vec<Reception>) -> Vec<(Vec<u8>, bool, TxSettings, RxInfo)> {
        r.into_iter()
            .map(|r| (r.phy_payload, r.crc_ok, r.settings, r.rx))
            .collect()
    }

    #[test]
    fn version_1_and_2_entries_read_as_the_crate_reads_them() {
        const V2: &str = r#"{"aesk":0,"brd":263,"codr":"4/5","data":"QC65rwEA4w8CaH7LyGf/3+dxzrXkkfEsRCcXbFM=","datr":"SF12BW125","freq":868.5,"jver":2,"modu":"LORA","rsig":[{"ant":0,"chan":7,"lsnr":7.8,"rssic":-103}],"size":29,"stat":1,"time":"2022-03-31T07:51:15.709338Z","tmst":445296860}"#;
        let v1_time = RXPK.replace(
            r#""tmst""#,
            r#""time":"2022-03-31T07:51:15.709338Z","tmst""#,
        );
        for body in [
            format!(r#"{{"rxpk":[{RXPK}]}}"#),
            format!(r#"{{"rxpk":[{v1_time},{RXPK}],"stat":null}}"#),
            format!(r#"{{"rxpk":[{V2}]}}"#),
            format!(r#"{{"rxpk":[{RXPK},{V2}]}}"#),
        ] {
            let got = parse_push_data(body.as_bytes(), Eui64::from_u64(1)).unwrap();
            assert!(got.bad_rxpk.is_empty(), "{body}: {:?}", got.bad_rxpk);
            let mut got = plain(got.receptions);
            for r in &mut got {
                r.3.received_at_us = 7;
            }
            assert_eq!(got, plain(via_crate(&body)), "{body}");
        }
    }

    /// The datagram tests/fuzz_udp.rs found: a `datr` with a multi-byte character made
    /// semtech-udp 0.12 panic (`&s[..4]` inside a character) and ended the ingress task.
    #[test]
    fn a_non_ascii_datr_is_one_bad_rxpk_not_a_panic() {
        let bad = RXPK.replace("SF7BW125", "SF7\u{93}W125");
        let body = format!(r#"{{"rxpk":[{bad},{RXPK}]}}"#);
        assert!(body.contains('\u{93}'), "{body}");
        let d = parse_push_data(body.as_bytes(), Eui64::from_u64(1)).unwrap();
        assert_eq!(d.receptions.len(), 1);
        assert_eq!(d.bad_rxpk.len(), 1, "{:?}", d.bad_rxpk);
        // Whatever the characters and where they sit in the string: never a panic.
        for datr in [
            "\u{e9}",
            "S\u{e9}",
            "SF\u{e9}",
            "SF12\u{1F600}BW125",
            "\u{1F600}\u{1F600}\u{1F600}",
        ] {
            let pk = RXPK.replace("SF7BW125", datr);
            let body = format!(r#"{{"rxpk":[{pk}]}}"#);
            let d = parse_push_data(body.as_bytes(), Eui64::from_u64(1)).unwrap();
            assert!(d.receptions.is_empty() && d.bad_rxpk.len() == 1, "{datr}");
        }
    }

    #[test]
    fn one_bad_rxpk_does_not_lose_the_others() {
        let body = format!(
            r#"{{"rxpk":[{RXPK},{{"tmst":"x"}},{RXPK}],"stat":{{"time":"2026-11-22 10:00:00 GMT","rxnb":2,"rxok":2,"rxfw":2,"ackr":100.0,"dwnb":0,"txnb":0}}}}"#
        );
        let p = parse_push_data(body.as_bytes(), Eui64::from_u64(1)).unwrap();
        assert_eq!(p.receptions.len(), 2);
        assert_eq!(p.bad_rxpk.len(), 1);
        assert!(p.stat.is_some());
        let r = &p.receptions[0];
        assert_eq!(r.phy_payload, vec![0x40, 1, 2, 3]);
        assert_eq!(r.settings.frequency_hz, 868_100_000);
        assert_eq!(r.settings.spreading_factor, 7);
        assert_eq!(r.settings.bandwidth_hz, 125_000);
        assert_eq!(r.settings.coding_rate, "4/5");
        assert_eq!(r.rx.tmst, 2_000_123);
        assert_eq!(r.rx.channel, 2);
        assert_eq!(r.rx.rssi, -57);
        assert!(r.crc_ok);
        assert!(matches!(
            parse_push_data(b"{not json", Eui64::default()),
            Err(GwmpError::Json(_))
        ));
    }
}
