//! Regional parameters — LoRaWAN Regional Parameters RP002-1.0.4 — for every region lorastream
//! serves: EU868, US915, AU915, AS923-1, AS923-2, AS923-3, AS923-4, KR920 and IN865. One place
//! for data rates, receive windows, payload sizes, transmit power, default channels, join
//! CFLists, the data rates ADR may choose and the channel-mask blocks of LinkADRReq.
//!
//! Every number is typed from the region's section of RP002-1.0.4 (headings quoted at each
//! table) and was cross-checked against ChirpStack (`lrwn/src/region/*.rs`,
//! `chirpstack/configuration/region_*.toml`) and Semtech's LoRaMac-node
//! (`src/mac/region/Region*.{c,h}`). The EU868, US915, AU915 and AS923(-1) values are those of
//! lorastream's `downlink/window.rs`, unchanged. Where the regional-parameter revisions that
//! LoRaWAN 1.0.2, 1.0.3 and 1.0.4 devices implement disagree, the value every one of those
//! devices accepts is used, and the comment says so.
//!
//! Scope: LoRa modulation only (no FSK or LR-FHSS); no repeaters, so the "not repeater
//! compatible" payload tables apply. A function returns `None` for what the region does not
//! define or lorastream cannot do (an FSK data rate, an offset out of range, ...).

use crate::model::TxSettings;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::Duration;
use thiserror::Error;

/// RECEIVE_DELAY1 (RP002-1.0.4 "Default settings", common to all regions). The device opens
/// RX1 this long after the end of its uplink, and the `tmst` of an `rxpk` is the concentrator's
/// "RX finished" time (Semtech packet forwarder PROTOCOL.TXT), so RX1 is at `tmst + 1 s`.
pub const RECEIVE_DELAY1: Duration = Duration::from_secs(1);
/// RECEIVE_DELAY2 = RECEIVE_DELAY1 + 1 s.
pub const RECEIVE_DELAY2: Duration = Duration::from_secs(2);
/// JOIN_ACCEPT_DELAY1 (RP002-1.0.4 "Default settings").
pub const JOIN_ACCEPT_DELAY1: Duration = Duration::from_secs(5);
/// JOIN_ACCEPT_DELAY2 = JOIN_ACCEPT_DELAY1 + 1 s.
pub const JOIN_ACCEPT_DELAY2: Duration = Duration::from_secs(6);

/// A LoRaWAN region (RP002-1.0.4 "common name"). Serialized as the common name ("EU868",
/// "AS923-1", ...); "AS923" is read as AS923-1, the original AS923 plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, Default)]
pub enum Region {
    #[default]
    EU868,
    US915,
    AU915,
    /// AS923_FREQ_OFFSET = 0 (the original AS923 plan).
    #[serde(rename = "AS923-1", alias = "AS923")]
    AS923_1,
    /// AS923_FREQ_OFFSET = −1.8 MHz.
    #[serde(rename = "AS923-2")]
    AS923_2,
    /// AS923_FREQ_OFFSET = −6.6 MHz.
    #[serde(rename = "AS923-3")]
    AS923_3,
    /// AS923_FREQ_OFFSET = −5.9 MHz.
    #[serde(rename = "AS923-4")]
    AS923_4,
    KR920,
    IN865,
}

/// Errors of the channel-plan helpers.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RegionError {
    #[error("{region} has no uplink channel {index}")]
    NoSuchChannel { region: Region, index: usize },
    #[error("the channel mask enables no uplink channel")]
    NoChannelEnabled,
    #[error("ChMaskCntl {cntl} is not supported for {region}")]
    ChMaskCntl { region: Region, cntl: u8 },
    #[error("a CFList holds at most 5 frequencies, got {0}")]
    TooManyFrequencies(usize),
    #[error("frequency {0} Hz cannot be sent: not a multiple of 100 Hz, or above 1677.7215 MHz")]
    BadFrequency(u32),
    #[error("unknown region {0:?} (expected EU868, US915, AU915, AS923-1..4, KR920 or IN865)")]
    UnknownRegion(String),
}

impl Region {
    /// Every region, in the order of the enum.
    pub const ALL: [Region; 9] = [
        Region::EU868,
        Region::US915,
        Region::AU915,
        Region::AS923_1,
        Region::AS923_2,
        Region::AS923_3,
        Region::AS923_4,
        Region::KR920,
        Region::IN865,
    ];

    /// The RP002 common name, as serialized.
    pub fn name(self) -> &'static str {
        match self {
            Region::EU868 => "EU868",
            Region::US915 => "US915",
            Region::AU915 => "AU915",
            Region::AS923_1 => "AS923-1",
            Region::AS923_2 => "AS923-2",
            Region::AS923_3 => "AS923-3",
            Region::AS923_4 => "AS923-4",
            Region::KR920 => "KR920",
            Region::IN865 => "IN865",
        }
    }

    /// One of the four AS923 channel plans.
    pub fn is_as923(self) -> bool {
        matches!(
            self,
            Region::AS923_1 | Region::AS923_2 | Region::AS923_3 | Region::AS923_4
        )
    }

    /// US902-928 and AU915-928: 72 fixed uplink channels, switched on and off by channel masks;
    /// the other regions have 16 channels defined by the network (default channels, CFList,
    /// NewChannelReq).
    pub fn has_fixed_channels(self) -> bool {
        matches!(self, Region::US915 | Region::AU915)
    }

    /// AS923_FREQ_OFFSET in Hz (RP002-1.0.4 "AS923 ... Frequency Plan"): AS923-1 0,
    /// AS923-2 −1.80 MHz, AS923-3 −6.60 MHz, AS923-4 −5.90 MHz; 0 for the other regions.
    pub fn as923_freq_offset_hz(self) -> i32 {
        match self {
            Region::AS923_2 => -1_800_000,
            Region::AS923_3 => -6_600_000,
            Region::AS923_4 => -5_900_000,
            _ => 0,
        }
    }

    /// LoRa data rates a gateway transmits with ("Data Rate and End-device Output Power
    /// encoding"): EU868/AS923 DR0..6; KR920/IN865 DR0..5 (IN865 DR6 is RFU, DR7 FSK);
    /// US915/AU915 DR8..13, the 500 kHz downlink rates.
    pub fn downlink_drs(self) -> RangeInclusive<u8> {
        match self {
            Region::US915 | Region::AU915 => 8..=13,
            Region::KR920 | Region::IN865 => 0..=5,
            Region::EU868
            | Region::AS923_1
            | Region::AS923_2
            | Region::AS923_3
            | Region::AS923_4 => 0..=6,
        }
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Region {
    type Err = RegionError;

    /// The common name as serialized, or "AS923" for AS923-1.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "AS923" {
            return Ok(Region::AS923_1);
        }
        Region::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| RegionError::UnknownRegion(s.to_string()))
    }
}

/// 923.2 MHz + AS923_FREQ_OFFSET + `hz`, the AS923 frequencies (all offsets are negative and
/// far smaller than 923.2 MHz, so this cannot wrap).
fn as923_freq(region: Region, hz: u32) -> u32 {
    hz.saturating_add_signed(region.as923_freq_offset_hz())
}

/// (spreading factor, bandwidth in Hz) of a LoRa data rate.
///
/// RP002-1.0.4 "Data Rate and End-device Output Power encoding" of each region:
/// - EU868 and AS923: DR0..DR5 = SF12..SF7 / 125 kHz, DR6 = SF7 / 250 kHz (DR7 is FSK).
/// - KR920: DR0..DR5 = SF12..SF7 / 125 kHz (DR6.. RFU).
/// - IN865: DR0..DR5 = SF12..SF7 / 125 kHz (DR6 RFU, DR7 FSK).
/// - US915: DR0..DR3 = SF10..SF7 / 125 kHz, DR4 = SF8 / 500 kHz (DR5, DR6 LR-FHSS,
///   DR7 RFU), DR8..DR13 = SF12..SF7 / 500 kHz (downlink only).
/// - AU915: DR0..DR5 = SF12..SF7 / 125 kHz, DR6 = SF8 / 500 kHz (DR7 LR-FHSS),
///   DR8..DR13 = SF12..SF7 / 500 kHz (downlink only).
pub fn data_rate(region: Region, dr: u8) -> Option<(u8, u32)> {
    use Region::*;
    Some(match (region, dr) {
        (US915, 0..=3) => (10 - dr, 125_000),
        (US915, 4) => (8, 500_000),
        (AU915, 6) => (8, 500_000),
        (US915 | AU915, 8..=13) => (20 - dr, 500_000),
        (US915, _) => return None,
        (_, 0..=5) => (12 - dr, 125_000),
        (r, 6) if r == EU868 || r.is_as923() => (7, 250_000),
        _ => return None,
    })
}

/// Whether a gateway may transmit with this data rate (see [`Region::downlink_drs`]).
pub fn is_downlink_dr(region: Region, dr: u8) -> bool {
    region.downlink_drs().contains(&dr)
}

/// Highest LoRa uplink data rate of the region (US915 DR4, KR920/IN865 DR5, else DR6).
fn top_uplink_dr(region: Region) -> u8 {
    match region {
        Region::US915 => 4,
        Region::KR920 | Region::IN865 => 5,
        Region::EU868
        | Region::AU915
        | Region::AS923_1
        | Region::AS923_2
        | Region::AS923_3
        | Region::AS923_4 => 6,
    }
}

/// Uplink data rate of a reception (LoRa uplink data rates only): [`data_rate`] read
/// backwards up to the region's top uplink data rate, written out (twice per uplink; a unit
/// test compares it with the search over [`data_rate`]).
pub fn uplink_dr(region: Region, s: &TxSettings) -> Option<u8> {
    use Region::*;
    let sf = s.spreading_factor;
    match (region, s.bandwidth_hz, sf) {
        (US915, 125_000, 7..=10) => Some(10 - sf),
        (US915, 500_000, 8) => Some(4),
        (US915, _, _) => None,
        (AU915, 500_000, 8) => Some(6),
        (_, 125_000, 7..=12) => Some(12 - sf),
        (r, 250_000, 7) if r == EU868 || r.is_as923() => Some(6),
        _ => None,
    }
}

/// US915 "Receive windows", RX1 data rate by upstream DR (rows DR0..DR4) and RX1DROffset
/// (columns 0..3). DR5/DR6 (LR-FHSS) uplinks are not LoRa receptions and get no RX1 here.
const US915_RX1_DR: [[u8; 4]; 5] = [
    [10, 9, 8, 8],
    [11, 10, 9, 8],
    [12, 11, 10, 9],
    [13, 12, 11, 10],
    [13, 13, 12, 11],
];

/// AU915 "Receive windows", RX1 data rate by upstream DR (rows DR0..DR6) and RX1DROffset
/// (columns 0..5).
const AU915_RX1_DR: [[u8; 6]; 7] = [
    [8, 8, 8, 8, 8, 8],
    [9, 8, 8, 8, 8, 8],
    [10, 9, 8, 8, 8, 8],
    [11, 10, 9, 8, 8, 8],
    [12, 11, 10, 9, 8, 8],
    [13, 12, 11, 10, 9, 8],
    [13, 13, 12, 11, 10, 9],
];

/// AS923 and IN865 "Receive windows": Effective_RX1DROffset for RX1DROffset 0..7 (6 and 7
/// raise the downlink data rate above the uplink's).
const EFFECTIVE_RX1_DR_OFFSET: [i8; 8] = [0, 1, 2, 3, 4, 5, -1, -2];

/// RX1 data rate for an uplink data rate and RX1DROffset (RP002-1.0.4 "Receive windows" of
/// each region). `dwell` is the device's DownlinkDwellTime (AS923 only, see
/// [`downlink_dwell_time`]).
pub fn rx1_dr(region: Region, up_dr: u8, offset: u8, dwell: bool) -> Option<u8> {
    match region {
        // EU868 and KR920: MAX(0, upstream DR − RX1DROffset), offsets 0..5 (KR920: RP002 and
        // LoRaMac-node's KR920_MAX_RX1_DR_OFFSET = 5; ChirpStack's KR920 table also lists
        // offsets 6 and 7, which KR920 devices reject).
        Region::EU868 | Region::KR920 => {
            (up_dr <= top_uplink_dr(region) && offset <= 5).then(|| up_dr.saturating_sub(offset))
        }
        Region::US915 => US915_RX1_DR
            .get(usize::from(up_dr))?
            .get(usize::from(offset))
            .copied(),
        Region::AU915 => AU915_RX1_DR
            .get(usize::from(up_dr))?
            .get(usize::from(offset))
            .copied(),
        // IN865: MIN(5, MAX(0, upstream DR − Effective_RX1DROffset)), offsets 0..7. The one
        // cell where the sources disagree, DR5 with offset 7 (RP002-1.0.1's table and
        // LoRaMac-node: DR7, i.e. FSK; ChirpStack: DR5), gets no RX1: lorastream sends LoRa
        // only, and a downlink in RX2 reaches the device under either reading.
        Region::IN865 => {
            if up_dr > 5 || (up_dr, offset) == (5, 7) {
                return None;
            }
            let eff = *EFFECTIVE_RX1_DR_OFFSET.get(usize::from(offset))?;
            Some((i16::from(up_dr) - i16::from(eff)).clamp(0, 5) as u8)
        }
        // AS923: MIN(5, MAX(MinDR, upstream DR − Effective_RX1DROffset)), MinDR = 2 with
        // DownlinkDwellTime = 1, else 0. (LoRaMac-node's RP002-1.0.1 tables give DR6/DR7 for
        // DR4..DR6 with offsets 6 and 7; the formula and ChirpStack give 5. lorastream uses
        // offset 0, where all agree.)
        Region::AS923_1 | Region::AS923_2 | Region::AS923_3 | Region::AS923_4 => {
            if up_dr > 6 {
                return None;
            }
            let eff = *EFFECTIVE_RX1_DR_OFFSET.get(usize::from(offset))?;
            let min = if dwell { 2 } else { 0 };
            Some((i16::from(up_dr) - i16::from(eff)).clamp(min, 5) as u8)
        }
    }
}

/// The 125 kHz / 500 kHz uplink channel grid of US915 and AU915 ("ISM Band Channel
/// Frequencies"): channel index of an uplink frequency, if it is on the grid (±5 kHz, for
/// forwarders that report rounded MHz).
fn hybrid_channel(freq_hz: u32, bw_hz: u32, base125: u32, base500: u32) -> Option<usize> {
    let (base, step, first, count) = if bw_hz == 500_000 {
        (base500, 1_600_000, 64, 8)
    } else {
        (base125, 200_000, 0, 64)
    };
    // Nearest channel: with |offset from the grid| <= 5 kHz, the floor below is exact.
    let n = freq_hz.checked_sub(base.saturating_sub(5_000))? / step;
    if n >= count {
        return None;
    }
    // n < 64, so no overflow below.
    let on_grid = (base + n * step).abs_diff(freq_hz) <= 5_000;
    on_grid.then_some(first + n as usize)
}

/// First 125 kHz and first 500 kHz uplink channel of US915 (902.3 / 903.0 MHz) and AU915
/// (915.2 / 915.9 MHz), "ISM Band Channel Frequencies".
fn hybrid_bases(region: Region) -> Option<(u32, u32)> {
    match region {
        Region::US915 => Some((902_300_000, 903_000_000)),
        Region::AU915 => Some((915_200_000, 915_900_000)),
        _ => None,
    }
}

/// US915/AU915: the uplink channel index (0..71) of a reception on the fixed grid. The other
/// regions' channels are numbered by the device's own channel list, so there is none.
pub fn uplink_channel_index(region: Region, freq_hz: u32, bw_hz: u32) -> Option<usize> {
    let (b125, b500) = hybrid_bases(region)?;
    hybrid_channel(freq_hz, bw_hz, b125, b500)
}

/// US915/AU915: (frequency, bandwidth) of uplink channel 0..71.
pub fn uplink_channel(region: Region, index: usize) -> Option<(u32, u32)> {
    let (b125, b500) = hybrid_bases(region)?;
    let i = u32::try_from(index).ok()?;
    match i {
        0..=63 => Some((b125 + i * 200_000, 125_000)),
        64..=71 => Some((b500 + (i - 64) * 1_600_000, 500_000)),
        _ => None,
    }
}

/// RX1 frequency for an uplink (RP002-1.0.4 "Receive windows" of each region).
pub fn rx1_frequency(region: Region, up: &TxSettings) -> Option<u32> {
    match region {
        // US915 and AU915: downlink channel = uplink channel modulo 8, at 923.3 MHz + 600 kHz·n.
        Region::US915 | Region::AU915 => {
            let ch = uplink_channel_index(region, up.frequency_hz, up.bandwidth_hz)?;
            Some(923_300_000 + (ch % 8) as u32 * 600_000)
        }
        // EU868, AS923, KR920, IN865: the uplink channel's frequency.
        Region::EU868
        | Region::KR920
        | Region::IN865
        | Region::AS923_1
        | Region::AS923_2
        | Region::AS923_3
        | Region::AS923_4 => Some(up.frequency_hz),
    }
}

/// Maximum FRMPayload size N (FOpts empty) per data rate, "Maximum payload size" tables of
/// RP002-1.0.4 (not repeater compatible). `dwell` selects the 400 ms dwell-time table where the
/// region has one (AS923; AU915 uplink data rates). `None`: the data rate cannot be used.
pub fn max_payload(region: Region, dr: u8, dwell: bool) -> Option<usize> {
    const NA: usize = 0;
    let table: &[usize] = match (region, dr) {
        // EU868: DR0..7.
        (Region::EU868, 0..=7) => &[51, 51, 51, 115, 242, 242, 242, 242],
        // KR920: DR0..5.
        (Region::KR920, 0..=5) => &[51, 51, 51, 115, 242, 242],
        // IN865: DR0..5, DR6 RFU, DR7 (FSK).
        (Region::IN865, 0..=7) => &[51, 51, 51, 115, 242, 242, NA, 242],
        // US915 uplink DR0..4, downlink DR8..13 (also AU915's).
        (Region::US915, 0..=4) => &[11, 53, 125, 242, 242],
        (Region::US915 | Region::AU915, 8..=13) => &[53, 129, 242, 242, 242, 242],
        // AU915 uplink DR0..6 (UplinkDwellTime 0 / 1).
        (Region::AU915, 0..=6) if !dwell => &[51, 51, 51, 115, 242, 242, 242],
        (Region::AU915, 0..=6) => &[NA, NA, 11, 53, 125, 242, 242],
        // AS923, DwellTime 0. DR2: RP002-1.0.1 raised N from 51 to 115, but the regional
        // parameters that 1.0.2/1.0.3 devices implement (RP 1.0.2rB, 1.0.3rA) say 51 and older
        // LoRaMac-node releases drop larger downlinks, so 51 is used.
        (r, 0..=7) if r.is_as923() && !dwell => &[51, 51, 51, 115, 242, 242, 242, 242],
        // AS923, DwellTime 1 (400 ms): DR0 and DR1 are not allowed.
        (r, 0..=7) if r.is_as923() => &[NA, NA, 11, 53, 125, 242, 242, 242],
        _ => return None,
    };
    let first = if dr >= 8 { 8 } else { 0 };
    table
        .get(usize::from(dr - first))
        .copied()
        .filter(|&n| n != NA)
}

/// Whether the device applies the 400 ms downlink dwell time. Only AS923 has one: its devices
/// boot with the dwell-time limits on (RP002-1.0.4 AS923; also the default of ChirpStack and
/// The Things Stack) until a TxParamSetupReq lifts them. A device that transmits at DR0 or DR1
/// has evidently been configured without dwell time (those data rates are not allowed with
/// UplinkDwellTime = 1), so its downlinks are not limited either.
pub fn downlink_dwell_time(region: Region, up: Option<&TxSettings>) -> bool {
    region.is_as923() && !matches!(up.and_then(|u| uplink_dr(region, u)), Some(0 | 1))
}

/// Downlink EIRP (dBm) sent as the `txpk` `powe`; the forwarder subtracts its configured
/// antenna gain. EU868: +16 dBm, and 27 dBm (500 mW ERP, ETSI EN 300 220 / ERC REC 70-03, as
/// Semtech's Basic Station uses) in the 869.4–869.65 MHz sub-band of RX2. US915: 26 dBm (the
/// 500 kHz downlink channels limit a gateway to +26 dBm in practice). AU915: +30 dBm.
/// AS923: +16 dBm. KR920: 23 dBm (ChirpStack's KR920 downlink EIRP; end-devices are limited
/// to 14 dBm). IN865: +30 dBm (RP002-1.0.4 IN865 default MaxEIRP; ChirpStack 30).
pub fn downlink_eirp_dbm(region: Region, freq_hz: u32) -> u64 {
    match region {
        Region::EU868 if (869_400_000..=869_650_000).contains(&freq_hz) => 27,
        Region::EU868 => 16,
        Region::US915 => 26,
        Region::AU915 | Region::IN865 => 30,
        Region::KR920 => 23,
        Region::AS923_1 | Region::AS923_2 | Region::AS923_3 | Region::AS923_4 => 16,
    }
}

/// RX2 defaults (frequency Hz, data rate), RP002-1.0.4 "Receive windows" / "Default settings"
/// of each region: EU868 869.525 MHz DR0; US915 and AU915 923.3 MHz DR8; AS923 923.2 MHz +
/// AS923_FREQ_OFFSET, DR2; KR920 921.9 MHz DR0; IN865 866.55 MHz DR2.
pub fn rx2_default(region: Region) -> (u32, u8) {
    match region {
        Region::EU868 => (869_525_000, 0),
        Region::US915 | Region::AU915 => (923_300_000, 8),
        Region::KR920 => (921_900_000, 0),
        Region::IN865 => (866_550_000, 2),
        r @ (Region::AS923_1 | Region::AS923_2 | Region::AS923_3 | Region::AS923_4) => {
            (as923_freq(r, 923_200_000), 2)
        }
    }
}

/// An uplink channel: frequency and allowed data-rate range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Channel {
    pub freq_hz: u32,
    pub min_dr: u8,
    pub max_dr: u8,
}

/// The channels a device has after boot or join, before any CFList or NewChannelReq
/// (RP002-1.0.4 "ISM Band Channel Frequencies" / "Default channels"), LoRa data rates only:
/// - EU868: 868.1, 868.3, 868.5 MHz, DR0..5.
/// - US915: 64 × 125 kHz from 902.3 MHz by 200 kHz (DR0..3), 8 × 500 kHz from 903.0 MHz by
///   1.6 MHz (DR4).
/// - AU915: 64 × 125 kHz from 915.2 MHz by 200 kHz (DR0..5), 8 × 500 kHz from 915.9 MHz by
///   1.6 MHz (DR6).
/// - AS923: 923.2 and 923.4 MHz + AS923_FREQ_OFFSET, DR0..5.
/// - KR920: 922.1, 922.3, 922.5 MHz, DR0..5.
/// - IN865: 865.0625, 865.4025, 865.985 MHz, DR0..5.
pub fn default_channels(region: Region) -> Vec<Channel> {
    let ch = |freq_hz, min_dr, max_dr| Channel {
        freq_hz,
        min_dr,
        max_dr,
    };
    match region {
        Region::EU868 => vec![
            ch(868_100_000, 0, 5),
            ch(868_300_000, 0, 5),
            ch(868_500_000, 0, 5),
        ],
        Region::US915 | Region::AU915 => (0..72)
            .filter_map(|i| {
                let (f, bw) = uplink_channel(region, i)?;
                Some(match (region, bw) {
                    (Region::US915, 125_000) => ch(f, 0, 3),
                    (Region::US915, _) => ch(f, 4, 4),
                    (_, 125_000) => ch(f, 0, 5),
                    _ => ch(f, 6, 6),
                })
            })
            .collect(),
        Region::KR920 => vec![
            ch(922_100_000, 0, 5),
            ch(922_300_000, 0, 5),
            ch(922_500_000, 0, 5),
        ],
        Region::IN865 => vec![
            ch(865_062_500, 0, 5),
            ch(865_402_500, 0, 5),
            ch(865_985_000, 0, 5),
        ],
        r @ (Region::AS923_1 | Region::AS923_2 | Region::AS923_3 | Region::AS923_4) => vec![
            ch(as923_freq(r, 923_200_000), 0, 5),
            ch(as923_freq(r, 923_400_000), 0, 5),
        ],
    }
}

/// The extra uplink channels (DR0..5) that lorastream's JoinAccept CFList (type 0) gives
/// devices of the regions with network-defined channels; the gateway's concentrator must
/// listen on them (together with [`default_channels`]). RP002 leaves the choice to the
/// network; these are the common 8-channel gateway plans:
/// - EU868: 867.1, 867.3, 867.5, 867.7, 867.9 MHz (TTN EU_863_870, every EU868 gateway's
///   default `global_conf.json`).
/// - AS923-1: 923.6, 923.8, 924.0, 924.2, 924.4 MHz, the 200 kHz steps above the default
///   channels (TTN AS_923_925): legal in every AS923-1 country including the 923–925 MHz ones,
///   where the 922.x MHz plan (TTN AS_920_923) is not.
/// - AS923-2: 921.8, 922.0, 922.2, 922.4, 922.6 MHz (TTN AS_923_2_TTN; the same rule, inside
///   920–923 MHz).
/// - AS923-3: 917.0, 917.2, 917.4, 917.6, 917.8 MHz (the same rule, inside 915–918 MHz; TTN
///   publishes no extra AS923-3 channels).
/// - AS923-4: 917.7, 917.9, 919.3, 919.5, 919.7 MHz (TTN IL_917_920_TTN, Israel).
/// - KR920: 922.7, 922.9, 923.1, 923.3 MHz (TTN KR_920_923_TTN; the band ends at 923.3 MHz, so
///   four, not five).
/// - IN865: none — TTN IN_865_867 and ChirpStack use only the three default channels.
/// - US915/AU915: none (their CFList is a channel mask, see [`channel_mask_cf_list`]).
pub fn extra_channels(region: Region) -> &'static [u32] {
    match region {
        Region::EU868 => &[
            867_100_000,
            867_300_000,
            867_500_000,
            867_700_000,
            867_900_000,
        ],
        Region::AS923_1 => &[
            923_600_000,
            923_800_000,
            924_000_000,
            924_200_000,
            924_400_000,
        ],
        Region::AS923_2 => &[
            921_800_000,
            922_000_000,
            922_200_000,
            922_400_000,
            922_600_000,
        ],
        Region::AS923_3 => &[
            917_000_000,
            917_200_000,
            917_400_000,
            917_600_000,
            917_800_000,
        ],
        Region::AS923_4 => &[
            917_700_000,
            917_900_000,
            919_300_000,
            919_500_000,
            919_700_000,
        ],
        Region::KR920 => &[922_700_000, 922_900_000, 923_100_000, 923_300_000],
        Region::IN865 | Region::US915 | Region::AU915 => &[],
    }
}

/// A frequency as MAC commands and CFLists carry it: 24 bits, little-endian, in 100 Hz units
/// (LoRaWAN 1.0.4 §5.6, RP002-1.0.4 "CFList").
pub fn freq_to_bytes(freq_hz: u32) -> Result<[u8; 3], RegionError> {
    let units = freq_hz / 100;
    if freq_hz % 100 != 0 || units >= 1 << 24 {
        return Err(RegionError::BadFrequency(freq_hz));
    }
    let b = units.to_le_bytes();
    Ok([b[0], b[1], b[2]])
}

/// CFList type 0 (RP002-1.0.4 "CFList", regions with network-defined channels): up to five
/// frequencies for channels 3..7 (AS923: 2..6), each 24-bit LE in 100 Hz units, unused slots
/// 0, then CFListType 0.
pub fn cf_list_frequencies(freqs: &[u32]) -> Result<[u8; 16], RegionError> {
    if freqs.len() > 5 {
        return Err(RegionError::TooManyFrequencies(freqs.len()));
    }
    let mut c = [0u8; 16];
    for (slot, &f) in c.chunks_exact_mut(3).zip(freqs) {
        slot.copy_from_slice(&freq_to_bytes(f)?);
    }
    Ok(c) // c[15] = CFListType 0
}

/// US915 / AU915 CFList (CFListType 1, RP002-1.0.4 "JoinAccept CFList" of both regions):
/// ChMask0..ChMask4 (16 bits each, LSB first; bit n of ChMaskk = channel 16k + n), 5 RFU bytes,
/// then CFListType. Enables the eight 125 kHz channels of `sub_band` (1..8, channels
/// 8·(sub_band−1) .. +7) and the 500 kHz channel 64 + (sub_band−1), nothing else.
pub fn channel_mask_cf_list(sub_band: u8) -> Option<[u8; 16]> {
    if !(1..=8).contains(&sub_band) {
        return None;
    }
    let sb = usize::from(sub_band - 1);
    let mut c = [0u8; 16];
    c[sb] = 0xFF; // channels 8·sb .. 8·sb+7 are byte sb of ChMask0..3
    c[8] = 1 << sb; // ChMask4, channels 64..71
    c[15] = 1; // CFListType: channel mask
    Some(c)
}

/// The JoinAccept CFList lorastream sends: type 0 with the extra channels (`extra`, by default
/// [`extra_channels`]) where the region has network-defined channels, type 1 for the configured
/// sub-band in US915 and AU915 (none without one: the device keeps all 72 channels). Devices of
/// LoRaWAN 1.0.0–1.0.2 ignore a type 1 CFList.
pub fn join_cf_list(region: Region, sub_band: Option<u8>, extra: &[u32]) -> Option<[u8; 16]> {
    if region.has_fixed_channels() {
        return sub_band.and_then(channel_mask_cf_list);
    }
    if extra.is_empty() {
        return None;
    }
    cf_list_frequencies(extra).ok()
}

/// The frequencies (Hz) a region's uplink channels may use (RP002-1.0.4 band definitions):
/// EU868 863–870, US915 902–928, AU915 915–928, AS923 915–928, KR920 920.9–923.3,
/// IN865 865–867 MHz.
pub fn uplink_band_hz(region: Region) -> (u32, u32) {
    match region {
        Region::EU868 => (863_000_000, 870_000_000),
        Region::US915 => (902_000_000, 928_000_000),
        Region::KR920 => (920_900_000, 923_300_000),
        Region::IN865 => (865_000_000, 867_000_000),
        Region::AU915 | Region::AS923_1 | Region::AS923_2 | Region::AS923_3 | Region::AS923_4 => {
            (915_000_000, 928_000_000)
        }
    }
}

/// Default MaxEIRP (dBm) of the end-device, the base of the TXPower table (RP002-1.0.4 "Data
/// Rate and End-device Output Power encoding"): EU868 16, US915 30, AU915 30, AS923 16,
/// KR920 14, IN865 30. AS923 devices may be told another one by TxParamSetupReq.
pub fn max_eirp_dbm(region: Region) -> u8 {
    match region {
        Region::US915 | Region::AU915 | Region::IN865 => 30,
        Region::KR920 => 14,
        Region::EU868 | Region::AS923_1 | Region::AS923_2 | Region::AS923_3 | Region::AS923_4 => 16,
    }
}

/// Highest TXPower index RP002-1.0.4 defines for the region: EU868 7, US915 14, AU915 14,
/// AS923 7, KR920 7, IN865 10.
pub fn max_tx_power_index(region: Region) -> u8 {
    match region {
        Region::US915 | Region::AU915 => 14,
        Region::IN865 => 10,
        Region::EU868
        | Region::KR920
        | Region::AS923_1
        | Region::AS923_2
        | Region::AS923_3
        | Region::AS923_4 => 7,
    }
}

/// The highest TXPower index ADR uses: the one every LoRaWAN 1.0.2+ device accepts. US915 and
/// AU915 devices implementing RP 1.0.2rB/1.0.3rA know indices 0..10 only (11..14 came with
/// RP002-1.0.0) and reject the whole LinkADRReq otherwise, so 10 there (ChirpStack's US915
/// table stops at 10 too); elsewhere [`max_tx_power_index`].
pub fn adr_max_tx_power_index(region: Region) -> u8 {
    match region {
        Region::US915 | Region::AU915 => 10,
        r => max_tx_power_index(r),
    }
}

/// EIRP (dBm) of a TXPower index: MaxEIRP − 2·index (RP002-1.0.4, every region here), for the
/// indices the region defines.
pub fn tx_power_dbm(region: Region, index: u8) -> Option<i16> {
    (index <= max_tx_power_index(region))
        .then(|| i16::from(max_eirp_dbm(region)) - 2 * i16::from(index))
}

/// Uplink data rates ADR may choose (LoRa, 125 kHz — the channels every enabled uplink
/// channel supports): EU868, AU915, AS923, KR920, IN865 DR0..5; US915 DR0..3. With
/// UplinkDwellTime = 1 (AS923 at boot, AU915 when told so) DR0 and DR1 are not allowed, so
/// DR2..5. The 500 kHz (US915 DR4, AU915 DR6) and 250 kHz (EU868/AS923 DR6) rates exist on one
/// or no default channel, so ADR does not move devices there (as ChirpStack's default
/// algorithm, which only uses 125 kHz LoRa rates).
pub fn adr_dr_range(region: Region, uplink_dwell: bool) -> RangeInclusive<u8> {
    let dwell_applies = uplink_dwell && (region.is_as923() || region == Region::AU915);
    let min = if dwell_applies { 2 } else { 0 };
    match region {
        Region::US915 => 0..=3,
        _ => min..=5,
    }
}

/// Required SNR (dB) for demodulation per spreading factor (Semtech SX127x/SX1302 datasheets;
/// the same values as ChirpStack's `get_required_snr_for_sf`): SF7 −7.5 … SF12 −20.
pub fn required_snr_db(sf: u8) -> f32 {
    match sf {
        0..=7 => -7.5,
        8 => -10.0,
        9 => -12.5,
        10 => -15.0,
        11 => -17.5,
        _ => -20.0,
    }
}

/// Required SNR of a data rate, `None` for a data rate the region does not define.
pub fn required_snr_for_dr(region: Region, dr: u8) -> Option<f32> {
    data_rate(region, dr).map(|(sf, _)| required_snr_db(sf))
}

/// One LinkADRReq's channel-mask part: ChMask (bit n = channel n of the block) and ChMaskCntl
/// (LoRaWAN 1.0.4 §5.3, RP002-1.0.4 "LinkAdrReq command" of each region).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChMaskBlock {
    pub ch_mask: u16,
    pub ch_mask_cntl: u8,
}

/// US915/AU915 sub-band (1..8): its eight 125 kHz channels 8·(sb−1)..+7 and its 500 kHz
/// channel 64 + (sb−1).
pub fn sub_band_channels(region: Region, sub_band: u8) -> Option<Vec<usize>> {
    if !region.has_fixed_channels() || !(1..=8).contains(&sub_band) {
        return None;
    }
    let sb = usize::from(sub_band - 1);
    let mut v: Vec<usize> = (8 * sb..8 * sb + 8).collect();
    v.push(64 + sb);
    Some(v)
}

/// Number of uplink channel indices a device of the region can have: 72 (US915/AU915), else 16.
pub fn uplink_channel_count(region: Region) -> usize {
    if region.has_fixed_channels() {
        72
    } else {
        16
    }
}

/// The channel-mask blocks of a LinkADRReq command block that leave exactly the channels
/// `enabled` on (the device processes contiguous LinkADRReqs as one block and applies the
/// DataRate, TXPower and NbTrans of the last; LoRaWAN 1.0.4 §5.3):
/// - EU868, AS923, KR920, IN865: one block, ChMaskCntl 0, bit n = channel n (0..15).
/// - US915, AU915 (RP002-1.0.4 "LinkAdrReq command"): first a block that sets all 125 kHz
///   channels — ChMaskCntl 7 (all off) or 6 (all on) — with ChMask = the 500 kHz channels
///   64..71; then one block with ChMaskCntl k (0..3) and the exact mask of channels 16k..16k+15
///   for each group of 16 that differs from that. The shorter of the two ways is used (a
///   single sub-band: `[cntl 7, cntl k]`), as ChirpStack's
///   `get_link_adr_req_payloads_for_enabled_uplink_channel_indices` does. ChMaskCntl 5
///   (RP002-1.0.1+ sub-band control) is never used: 1.0.2 devices do not know it.
pub fn link_adr_ch_mask_blocks(
    region: Region,
    enabled: &[usize],
) -> Result<Vec<ChMaskBlock>, RegionError> {
    if enabled.is_empty() {
        return Err(RegionError::NoChannelEnabled);
    }
    let count = uplink_channel_count(region);
    if let Some(&index) = enabled.iter().find(|&&i| i >= count) {
        return Err(RegionError::NoSuchChannel { region, index });
    }
    if !region.has_fixed_channels() {
        let ch_mask = enabled.iter().fold(0u16, |m, &i| m | 1 << i);
        return Ok(vec![ChMaskBlock {
            ch_mask,
            ch_mask_cntl: 0,
        }]);
    }
    let mut groups = [0u16; 4];
    let mut wide = 0u16;
    for &i in enabled {
        if i < 64 {
            groups[i / 16] |= 1 << (i % 16);
        } else {
            wide |= 1 << (i - 64);
        }
    }
    let build = |cntl: u8, keep: fn(u16) -> bool| -> Vec<ChMaskBlock> {
        let head = ChMaskBlock {
            ch_mask: wide,
            ch_mask_cntl: cntl,
        };
        std::iter::once(head)
            .chain(
                (0u8..)
                    .zip(groups)
                    .filter(|&(_, m)| keep(m))
                    .map(|(k, ch_mask)| ChMaskBlock {
                        ch_mask,
                        ch_mask_cntl: k,
                    }),
            )
            .collect()
    };
    let all_off = build(7, |m| m != 0);
    let all_on = build(6, |m| m != 0xFFFF);
    Ok(if all_on.len() < all_off.len() {
        all_on
    } else {
        all_off
    })
}

/// What a device's enabled channels become after a LinkADRReq block (device-side semantics, to
/// record what an acknowledged LinkADRReq did, and for simulated devices). EU868-like regions:
/// ChMaskCntl 0 only (6, "all defined channels on", needs the device's channel list). US915 /
/// AU915: ChMaskCntl 0..4, 6 and 7. An error is what the device would reject (ChMaskACK = 0).
pub fn apply_ch_mask_blocks(
    region: Region,
    enabled: &[usize],
    blocks: &[ChMaskBlock],
) -> Result<Vec<usize>, RegionError> {
    let count = uplink_channel_count(region);
    let mut on = vec![false; count];
    for &i in enabled {
        *on.get_mut(i)
            .ok_or(RegionError::NoSuchChannel { region, index: i })? = true;
    }
    for b in blocks {
        let bits = |base: usize, n: usize, on: &mut [bool]| -> Result<(), RegionError> {
            for bit in 0..16 {
                let set = b.ch_mask & (1 << bit) != 0;
                if bit < n {
                    on[base + bit] = set;
                } else if set {
                    return Err(RegionError::NoSuchChannel {
                        region,
                        index: base + bit,
                    });
                }
            }
            Ok(())
        };
        match (region.has_fixed_channels(), b.ch_mask_cntl) {
            (false, 0) => bits(0, 16, &mut on)?,
            (true, k @ 0..=3) => bits(16 * usize::from(k), 16, &mut on)?,
            (true, 4) => bits(64, 8, &mut on)?,
            (true, k @ (6 | 7)) => {
                on[..64].iter_mut().for_each(|c| *c = k == 6);
                bits(64, 8, &mut on)?;
            }
            (_, cntl) => return Err(RegionError::ChMaskCntl { region, cntl }),
        }
    }
    let out: Vec<usize> = (0..count).filter(|&i| on[i]).collect();
    if out.is_empty() {
        return Err(RegionError::NoChannelEnabled);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Region::*;

    fn up(f: u32, sf: u8, bw: u32) -> TxSettings {
        TxSettings {
            frequency_hz: f,
            spreading_factor: sf,
            bandwidth_hz: bw,
            coding_rate: "4/5".into(),
        }
    }

    const AS923: [Region; 4] = [AS923_1, AS923_2, AS923_3, AS923_4];

    /// The written-out inverse is the search over `data_rate` it replaced.
    #[test]
    fn uplink_dr_is_data_rate_read_backwards() {
        for region in Region::ALL {
            for spreading_factor in 0..=15u8 {
                for bandwidth_hz in [0, 7_800, 62_500, 125_000, 250_000, 500_000, 1_000_000] {
                    let s = TxSettings {
                        frequency_hz: 868_100_000,
                        spreading_factor,
                        bandwidth_hz,
                        coding_rate: "4/5".into(),
                    };
                    let searched = (0..=top_uplink_dr(region)).find(|&dr| {
                        data_rate(region, dr) == Some((spreading_factor, bandwidth_hz))
                    });
                    assert_eq!(uplink_dr(region, &s), searched, "{region:?} {s:?}");
                }
            }
        }
    }

    #[test]
    fn names_and_serde() {
        for (r, name) in [
            (EU868, "\"EU868\""),
            (US915, "\"US915\""),
            (AU915, "\"AU915\""),
            (AS923_1, "\"AS923-1\""),
            (AS923_2, "\"AS923-2\""),
            (AS923_3, "\"AS923-3\""),
            (AS923_4, "\"AS923-4\""),
            (KR920, "\"KR920\""),
            (IN865, "\"IN865\""),
        ] {
            assert_eq!(serde_json::to_string(&r).unwrap(), name);
            assert_eq!(serde_json::from_str::<Region>(name).unwrap(), r);
            assert_eq!(format!("\"{r}\""), name);
            assert_eq!(name.trim_matches('"').parse::<Region>(), Ok(r));
        }
        // The original AS923 name is AS923-1.
        assert_eq!(
            serde_json::from_str::<Region>("\"AS923\"").unwrap(),
            AS923_1
        );
        assert_eq!("AS923".parse::<Region>(), Ok(AS923_1));
        assert!(serde_json::from_str::<Region>("\"AS923_2\"").is_err());
        assert!(matches!(
            "CN470".parse::<Region>(),
            Err(RegionError::UnknownRegion(_))
        ));
        assert_eq!(Region::default(), EU868);
    }

    /// RP002-1.0.4 "Data Rate and End-device Output Power encoding" of each region, written
    /// out; `None` where the DR is FSK, LR-FHSS or RFU.
    #[test]
    fn data_rate_tables() {
        let s = |sf: u8, bw: u32| Some((sf, bw));
        let eu_as = [
            s(12, 125_000),
            s(11, 125_000),
            s(10, 125_000),
            s(9, 125_000),
            s(8, 125_000),
            s(7, 125_000),
            s(7, 250_000),
            None, // FSK 50 kbps
        ];
        let kr_in = [
            s(12, 125_000),
            s(11, 125_000),
            s(10, 125_000),
            s(9, 125_000),
            s(8, 125_000),
            s(7, 125_000),
            None, // RFU
            None, // KR920 RFU, IN865 FSK
        ];
        let us = [
            s(10, 125_000),
            s(9, 125_000),
            s(8, 125_000),
            s(7, 125_000),
            s(8, 500_000),
            None, // LR-FHSS
            None, // LR-FHSS
            None, // RFU
            s(12, 500_000),
            s(11, 500_000),
            s(10, 500_000),
            s(9, 500_000),
            s(8, 500_000),
            s(7, 500_000),
        ];
        let au = [
            s(12, 125_000),
            s(11, 125_000),
            s(10, 125_000),
            s(9, 125_000),
            s(8, 125_000),
            s(7, 125_000),
            s(8, 500_000),
            None, // LR-FHSS
            s(12, 500_000),
            s(11, 500_000),
            s(10, 500_000),
            s(9, 500_000),
            s(8, 500_000),
            s(7, 500_000),
        ];
        type Table<'a> = &'a [Option<(u8, u32)>];
        let mut cases: Vec<(Region, Table)> = vec![
            (EU868, &eu_as),
            (KR920, &kr_in),
            (IN865, &kr_in),
            (US915, &us),
            (AU915, &au),
        ];
        cases.extend(AS923.iter().map(|&r| (r, &eu_as[..])));
        for (region, table) in cases {
            for (dr, want) in table.iter().enumerate() {
                assert_eq!(data_rate(region, dr as u8), *want, "{region} DR{dr}");
            }
            for dr in table.len() as u8..=15 {
                assert_eq!(data_rate(region, dr), None, "{region} DR{dr}");
            }
        }
        // Uplink DR from a reception: SF8/500 is DR4 in US915, DR6 in AU915; never DR12.
        assert_eq!(uplink_dr(US915, &up(903_000_000, 8, 500_000)), Some(4));
        assert_eq!(uplink_dr(AU915, &up(915_900_000, 8, 500_000)), Some(6));
        assert_eq!(uplink_dr(US915, &up(902_300_000, 12, 125_000)), None);
        assert_eq!(uplink_dr(EU868, &up(868_100_000, 6, 125_000)), None);
        assert_eq!(uplink_dr(KR920, &up(922_100_000, 12, 125_000)), Some(0));
        assert_eq!(uplink_dr(IN865, &up(865_062_500, 7, 125_000)), Some(5));
        assert_eq!(uplink_dr(KR920, &up(922_100_000, 7, 250_000)), None);
        assert_eq!(uplink_dr(AS923_3, &up(916_600_000, 7, 250_000)), Some(6));
        // Downlink data rates.
        assert!(!is_downlink_dr(US915, 4) && is_downlink_dr(US915, 8));
        assert!(is_downlink_dr(EU868, 6) && !is_downlink_dr(EU868, 7));
        assert!(is_downlink_dr(KR920, 5) && !is_downlink_dr(KR920, 6));
        assert!(is_downlink_dr(IN865, 0) && !is_downlink_dr(IN865, 6));
        assert!(is_downlink_dr(AS923_4, 6) && !is_downlink_dr(AU915, 6));
    }

    fn check_rx1<const N: usize>(region: Region, dwell: bool, t: &[[Option<u8>; N]]) {
        for (dr, row) in t.iter().enumerate() {
            for (off, want) in row.iter().enumerate() {
                assert_eq!(
                    rx1_dr(region, dr as u8, off as u8, dwell),
                    *want,
                    "{region} DR{dr} offset {off} dwell {dwell}"
                );
            }
            assert_eq!(rx1_dr(region, dr as u8, N as u8, dwell), None, "offset {N}");
        }
        assert_eq!(
            rx1_dr(region, t.len() as u8, 0, dwell),
            None,
            "DR{}",
            t.len()
        );
    }

    /// Wrap a table of plain values.
    fn some<const N: usize>(t: &[[u8; N]]) -> Vec<[Option<u8>; N]> {
        t.iter().map(|row| row.map(Some)).collect()
    }

    /// RX1 data rate tables, RP002-1.0.4 "Receive windows": rows are the upstream DR,
    /// columns RX1DROffset, values written out from the tables.
    #[test]
    fn rx1_data_rate_tables() {
        let eu = [
            [0, 0, 0, 0, 0, 0],
            [1, 0, 0, 0, 0, 0],
            [2, 1, 0, 0, 0, 0],
            [3, 2, 1, 0, 0, 0],
            [4, 3, 2, 1, 0, 0],
            [5, 4, 3, 2, 1, 0],
            [6, 5, 4, 3, 2, 1],
        ];
        let kr = [
            [0, 0, 0, 0, 0, 0],
            [1, 0, 0, 0, 0, 0],
            [2, 1, 0, 0, 0, 0],
            [3, 2, 1, 0, 0, 0],
            [4, 3, 2, 1, 0, 0],
            [5, 4, 3, 2, 1, 0],
        ];
        let us = [
            [10, 9, 8, 8],
            [11, 10, 9, 8],
            [12, 11, 10, 9],
            [13, 12, 11, 10],
            [13, 13, 12, 11],
        ];
        let au = [
            [8, 8, 8, 8, 8, 8],
            [9, 8, 8, 8, 8, 8],
            [10, 9, 8, 8, 8, 8],
            [11, 10, 9, 8, 8, 8],
            [12, 11, 10, 9, 8, 8],
            [13, 12, 11, 10, 9, 8],
            [13, 13, 12, 11, 10, 9],
        ];
        // AS923, offsets 0..7 (6 = −1, 7 = −2), capped at DR5, floor MinDR.
        let as_no_dwell = [
            [0, 0, 0, 0, 0, 0, 1, 2],
            [1, 0, 0, 0, 0, 0, 2, 3],
            [2, 1, 0, 0, 0, 0, 3, 4],
            [3, 2, 1, 0, 0, 0, 4, 5],
            [4, 3, 2, 1, 0, 0, 5, 5],
            [5, 4, 3, 2, 1, 0, 5, 5],
            [5, 5, 4, 3, 2, 1, 5, 5],
        ];
        let as_dwell = [
            [2, 2, 2, 2, 2, 2, 2, 2],
            [2, 2, 2, 2, 2, 2, 2, 3],
            [2, 2, 2, 2, 2, 2, 3, 4],
            [3, 2, 2, 2, 2, 2, 4, 5],
            [4, 3, 2, 2, 2, 2, 5, 5],
            [5, 4, 3, 2, 2, 2, 5, 5],
            [5, 5, 4, 3, 2, 2, 5, 5],
        ];
        // IN865 DR0..5, offsets 0..7; DR5/offset 7 is DR7 (FSK) in RP002-1.0.1's table: no
        // LoRa RX1 there.
        let n = None;
        let in865: [[Option<u8>; 8]; 6] = [
            [0, 0, 0, 0, 0, 0, 1, 2].map(Some),
            [1, 0, 0, 0, 0, 0, 2, 3].map(Some),
            [2, 1, 0, 0, 0, 0, 3, 4].map(Some),
            [3, 2, 1, 0, 0, 0, 4, 5].map(Some),
            [4, 3, 2, 1, 0, 0, 5, 5].map(Some),
            [
                Some(5),
                Some(4),
                Some(3),
                Some(2),
                Some(1),
                Some(0),
                Some(5),
                n,
            ],
        ];
        check_rx1(EU868, false, &some(&eu));
        check_rx1(KR920, false, &some(&kr));
        check_rx1(US915, false, &some(&us));
        check_rx1(AU915, false, &some(&au));
        check_rx1(IN865, false, &in865);
        for r in AS923 {
            check_rx1(r, false, &some(&as_no_dwell));
            check_rx1(r, true, &some(&as_dwell));
        }
    }

    /// RX1 frequency: same channel, except US915/AU915 (uplink channel modulo 8 onto the eight
    /// 500 kHz downlink channels from 923.3 MHz by 600 kHz).
    #[test]
    fn rx1_frequency_mapping() {
        let cases: [(Region, u32, u32, Option<u32>); 20] = [
            (EU868, 868_500_000, 125_000, Some(868_500_000)),
            (AS923_1, 923_400_000, 125_000, Some(923_400_000)),
            (AS923_2, 921_600_000, 125_000, Some(921_600_000)),
            (KR920, 922_300_000, 125_000, Some(922_300_000)),
            (IN865, 865_985_000, 125_000, Some(865_985_000)),
            (US915, 902_300_000, 125_000, Some(923_300_000)), // ch 0
            (US915, 903_700_000, 125_000, Some(927_500_000)), // ch 7
            (US915, 903_900_000, 125_000, Some(923_300_000)), // ch 8
            (US915, 904_100_000, 125_000, Some(923_900_000)), // ch 9
            (US915, 914_900_000, 125_000, Some(927_500_000)), // ch 63
            (US915, 903_000_000, 500_000, Some(923_300_000)), // ch 64
            (US915, 914_200_000, 500_000, Some(927_500_000)), // ch 71
            (US915, 902_400_000, 125_000, None),              // off the grid
            (US915, 915_100_000, 125_000, None),              // above ch 63
            (AU915, 915_200_000, 125_000, Some(923_300_000)), // ch 0
            (AU915, 916_800_000, 125_000, Some(923_300_000)), // ch 8
            (AU915, 917_000_000, 125_000, Some(923_900_000)), // ch 9
            (AU915, 927_800_000, 125_000, Some(927_500_000)), // ch 63
            (AU915, 915_900_000, 500_000, Some(923_300_000)), // ch 64
            (AU915, 927_100_000, 500_000, Some(927_500_000)), // ch 71
        ];
        for (region, f, bw, want) in cases {
            assert_eq!(
                rx1_frequency(region, &up(f, 8, bw)),
                want,
                "{region} {f} Hz"
            );
        }
        // Forwarders report MHz with a few decimals: a few Hz off the grid is still the channel.
        assert_eq!(
            rx1_frequency(US915, &up(904_100_002, 10, 125_000)),
            Some(923_900_000)
        );
        assert_eq!(uplink_channel_index(US915, 904_100_000, 125_000), Some(9));
        assert_eq!(uplink_channel_index(AU915, 927_100_000, 500_000), Some(71));
        assert_eq!(uplink_channel_index(EU868, 868_100_000, 125_000), None);
        assert_eq!(uplink_channel_index(US915, u32::MAX, 125_000), None);
        assert_eq!(uplink_channel_index(AU915, u32::MAX - 4_000, 500_000), None);
        assert_eq!(uplink_channel_index(US915, 0, 125_000), None);
        assert_eq!(uplink_channel(US915, 8), Some((903_900_000, 125_000)));
        assert_eq!(uplink_channel(AU915, 65), Some((917_500_000, 500_000)));
        assert_eq!(uplink_channel(US915, 72), None);
        assert_eq!(uplink_channel(KR920, 0), None);
    }

    /// Maximum payload size N, RP002-1.0.4 "Maximum payload size" (not repeater compatible),
    /// written out per region; AS923 DR2 without dwell time is 51 on purpose (see
    /// `max_payload`; RP002-1.0.4 itself says 115).
    #[test]
    fn max_payload_tables() {
        let n = None;
        let s = Some;
        type Case = (Region, bool, Vec<Option<usize>>);
        let mut cases: Vec<Case> = vec![
            (
                EU868,
                false,
                vec![s(51), s(51), s(51), s(115), s(242), s(242), s(242), s(242)],
            ),
            (
                KR920,
                false,
                vec![s(51), s(51), s(51), s(115), s(242), s(242), n, n],
            ),
            (
                IN865,
                false,
                vec![s(51), s(51), s(51), s(115), s(242), s(242), n, s(242)],
            ),
            (
                US915,
                false,
                vec![
                    s(11),
                    s(53),
                    s(125),
                    s(242),
                    s(242),
                    n,
                    n,
                    n,
                    s(53),
                    s(129),
                    s(242),
                    s(242),
                    s(242),
                    s(242),
                ],
            ),
            (
                AU915,
                false,
                vec![
                    s(51),
                    s(51),
                    s(51),
                    s(115),
                    s(242),
                    s(242),
                    s(242),
                    n,
                    s(53),
                    s(129),
                    s(242),
                    s(242),
                    s(242),
                    s(242),
                ],
            ),
            (
                AU915,
                true,
                vec![
                    n,
                    n,
                    s(11),
                    s(53),
                    s(125),
                    s(242),
                    s(242),
                    n,
                    s(53),
                    s(129),
                    s(242),
                    s(242),
                    s(242),
                    s(242),
                ],
            ),
        ];
        for r in AS923 {
            cases.push((
                r,
                false,
                vec![s(51), s(51), s(51), s(115), s(242), s(242), s(242), s(242)],
            ));
            cases.push((
                r,
                true,
                vec![n, n, s(11), s(53), s(125), s(242), s(242), s(242)],
            ));
        }
        for (region, dwell, table) in cases {
            for (dr, want) in table.iter().enumerate() {
                assert_eq!(
                    max_payload(region, dr as u8, dwell),
                    *want,
                    "{region} DR{dr} dwell {dwell}"
                );
            }
            assert_eq!(max_payload(region, 14, dwell), None);
        }
        // Dwell time only matters where the region has it.
        assert_eq!(max_payload(KR920, 0, true), Some(51));
        assert_eq!(max_payload(EU868, 0, true), Some(51));
    }

    /// RX2 defaults, RP002-1.0.4 "Default settings": KR920 921.9 MHz DR0, IN865 866.55 MHz
    /// DR2, AS923-1 923.2 MHz, AS923-2 921.4 MHz, AS923-3 916.6 MHz, AS923-4 917.3 MHz (all
    /// DR2), EU868 869.525 MHz DR0, US915/AU915 923.3 MHz DR8.
    #[test]
    fn rx2_defaults() {
        for (region, f, dr) in [
            (EU868, 869_525_000, 0),
            (US915, 923_300_000, 8),
            (AU915, 923_300_000, 8),
            (AS923_1, 923_200_000, 2),
            (AS923_2, 921_400_000, 2),
            (AS923_3, 916_600_000, 2),
            (AS923_4, 917_300_000, 2),
            (KR920, 921_900_000, 0),
            (IN865, 866_550_000, 2),
        ] {
            assert_eq!(rx2_default(region), (f, dr), "{region}");
        }
        assert_eq!(AS923_1.as923_freq_offset_hz(), 0);
        assert_eq!(AS923_2.as923_freq_offset_hz(), -1_800_000);
        assert_eq!(AS923_3.as923_freq_offset_hz(), -6_600_000);
        assert_eq!(AS923_4.as923_freq_offset_hz(), -5_900_000);
        assert_eq!(KR920.as923_freq_offset_hz(), 0);
    }

    #[test]
    fn downlink_eirp_and_dwell() {
        for (region, f, want) in [
            (EU868, 868_100_000, 16),
            (EU868, 869_400_000, 27),
            (EU868, 869_525_000, 27),
            (EU868, 869_650_000, 27),
            (EU868, 869_700_000, 16),
            (US915, 923_300_000, 26),
            (AU915, 923_300_000, 30),
            (AS923_1, 923_200_000, 16),
            (AS923_3, 916_600_000, 16),
            (KR920, 921_900_000, 23),
            (IN865, 866_550_000, 30),
        ] {
            assert_eq!(downlink_eirp_dbm(region, f), want, "{region} {f}");
        }
        // AS923: dwell time on at boot, off for a device seen at DR0/DR1; never elsewhere.
        assert!(downlink_dwell_time(AS923_2, None));
        assert!(downlink_dwell_time(
            AS923_2,
            Some(&up(921_400_000, 7, 125_000))
        ));
        assert!(!downlink_dwell_time(
            AS923_2,
            Some(&up(921_400_000, 12, 125_000))
        ));
        assert!(!downlink_dwell_time(
            AS923_4,
            Some(&up(917_300_000, 11, 125_000))
        ));
        assert!(!downlink_dwell_time(KR920, None));
        assert!(!downlink_dwell_time(AU915, None));
    }

    /// Default channels, RP002-1.0.4 "ISM Band Channel Frequencies" / "Default channels".
    #[test]
    fn default_channel_plans() {
        let f = |r| -> Vec<u32> { default_channels(r).iter().map(|c| c.freq_hz).collect() };
        assert_eq!(f(EU868), [868_100_000, 868_300_000, 868_500_000]);
        assert_eq!(f(KR920), [922_100_000, 922_300_000, 922_500_000]);
        assert_eq!(f(IN865), [865_062_500, 865_402_500, 865_985_000]);
        assert_eq!(f(AS923_1), [923_200_000, 923_400_000]);
        assert_eq!(f(AS923_2), [921_400_000, 921_600_000]);
        assert_eq!(f(AS923_3), [916_600_000, 916_800_000]);
        assert_eq!(f(AS923_4), [917_300_000, 917_500_000]);
        for r in [EU868, KR920, IN865, AS923_1, AS923_4] {
            assert!(default_channels(r)
                .iter()
                .all(|c| (c.min_dr, c.max_dr) == (0, 5)));
        }
        let us = default_channels(US915);
        assert_eq!(us.len(), 72);
        assert_eq!(
            us[0],
            Channel {
                freq_hz: 902_300_000,
                min_dr: 0,
                max_dr: 3
            }
        );
        assert_eq!(
            us[63],
            Channel {
                freq_hz: 914_900_000,
                min_dr: 0,
                max_dr: 3
            }
        );
        assert_eq!(
            us[64],
            Channel {
                freq_hz: 903_000_000,
                min_dr: 4,
                max_dr: 4
            }
        );
        assert_eq!(
            us[71],
            Channel {
                freq_hz: 914_200_000,
                min_dr: 4,
                max_dr: 4
            }
        );
        let au = default_channels(AU915);
        assert_eq!(au.len(), 72);
        assert_eq!(
            au[0],
            Channel {
                freq_hz: 915_200_000,
                min_dr: 0,
                max_dr: 5
            }
        );
        assert_eq!(
            au[63],
            Channel {
                freq_hz: 927_800_000,
                min_dr: 0,
                max_dr: 5
            }
        );
        assert_eq!(
            au[64],
            Channel {
                freq_hz: 915_900_000,
                min_dr: 6,
                max_dr: 6
            }
        );
        assert_eq!(
            au[71],
            Channel {
                freq_hz: 927_100_000,
                min_dr: 6,
                max_dr: 6
            }
        );
    }

    /// Join CFLists, bytes worked out by hand: frequency / 100 as 24-bit little-endian.
    #[test]
    fn join_cf_lists() {
        // EU868 867.1..867.9 MHz: 8671000 = 0x844F18, 8673000 = 0x8456E8, 8675000 = 0x845EB8,
        // 8677000 = 0x846688, 8679000 = 0x846E58 — the CFList TTN sent in the JoinAccept capture
        // that lorastream's otaa.rs tests ("184F84E85684B85E84886684586E8400").
        assert_eq!(
            join_cf_list(EU868, None, extra_channels(EU868)),
            Some([
                0x18, 0x4F, 0x84, 0xE8, 0x56, 0x84, 0xB8, 0x5E, 0x84, 0x88, 0x66, 0x84, 0x58, 0x6E,
                0x84, 0x00
            ])
        );
        // KR920 922.7/922.9/923.1/923.3 MHz: 9227000 = 0x8CCAF8, 9229000 = 0x8CD2C8,
        // 9231000 = 0x8CDA98, 9233000 = 0x8CE268; slot 5 empty.
        assert_eq!(
            join_cf_list(KR920, None, extra_channels(KR920)),
            Some([
                0xF8, 0xCA, 0x8C, 0xC8, 0xD2, 0x8C, 0x98, 0xDA, 0x8C, 0x68, 0xE2, 0x8C, 0, 0, 0, 0
            ])
        );
        // AS923-1 923.6..924.4 MHz: 9236000 = 0x8CEE20, 9238000 = 0x8CF5F0, 9240000 = 0x8CFDC0,
        // 9242000 = 0x8D0590, 9244000 = 0x8D0D60.
        assert_eq!(
            join_cf_list(AS923_1, None, extra_channels(AS923_1)),
            Some([
                0x20, 0xEE, 0x8C, 0xF0, 0xF5, 0x8C, 0xC0, 0xFD, 0x8C, 0x90, 0x05, 0x8D, 0x60, 0x0D,
                0x8D, 0x00
            ])
        );
        // AS923-2 first slot 921.8 MHz: 9218000 = 0x8CA7D0; AS923-3 first 917.0 MHz:
        // 9170000 = 0x8BEC50; AS923-4 third 919.3 MHz: 9193000 = 0x8C4628.
        assert_eq!(
            join_cf_list(AS923_2, None, extra_channels(AS923_2)).unwrap()[..3],
            [0xD0, 0xA7, 0x8C]
        );
        assert_eq!(
            join_cf_list(AS923_3, None, extra_channels(AS923_3)).unwrap()[..3],
            [0x50, 0xEC, 0x8B]
        );
        assert_eq!(
            join_cf_list(AS923_4, None, extra_channels(AS923_4)).unwrap()[6..9],
            [0x28, 0x46, 0x8C]
        );
        // IN865: default channels only.
        assert_eq!(join_cf_list(IN865, None, extra_channels(IN865)), None);
        // US915/AU915: type 1 for a sub-band (sub-band 2: channels 8..15 and 65), else none.
        assert_eq!(
            join_cf_list(US915, Some(2), extra_channels(US915)),
            Some([0x00, 0xFF, 0, 0, 0, 0, 0, 0, 0x02, 0, 0, 0, 0, 0, 0, 0x01])
        );
        assert_eq!(
            join_cf_list(AU915, Some(8), extra_channels(AU915)),
            Some([0, 0, 0, 0, 0, 0, 0, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0x01])
        );
        assert_eq!(join_cf_list(US915, None, extra_channels(US915)), None);
        assert_eq!(join_cf_list(US915, Some(9), extra_channels(US915)), None);
        assert_eq!(
            join_cf_list(EU868, Some(2), extra_channels(EU868)),
            join_cf_list(EU868, None, extra_channels(EU868))
        );
        // A configured plan replaces the region's; none means no CFList.
        assert_eq!(join_cf_list(EU868, None, &[]), None);
        assert_eq!(
            join_cf_list(EU868, None, &[868_800_000]).unwrap()[..3],
            // 868.8 MHz = 8688000 × 100 Hz = 0x849180, little-endian
            [0x80, 0x91, 0x84]
        );
        // The builder's limits.
        assert_eq!(
            cf_list_frequencies(&[1; 6]),
            Err(RegionError::TooManyFrequencies(6))
        );
        assert_eq!(
            cf_list_frequencies(&[868_100_050]),
            Err(RegionError::BadFrequency(868_100_050))
        );
        assert_eq!(freq_to_bytes(1_677_721_500), Ok([0xFF, 0xFF, 0xFF]));
        assert_eq!(
            freq_to_bytes(1_677_721_600),
            Err(RegionError::BadFrequency(1_677_721_600))
        );
        assert_eq!(cf_list_frequencies(&[]), Ok([0; 16]));
    }

    /// TXPower tables, RP002-1.0.4: index → dBm written out per region.
    #[test]
    fn tx_power_tables() {
        let cases: [(Region, &[i16]); 9] = [
            (EU868, &[16, 14, 12, 10, 8, 6, 4, 2]),
            (AS923_1, &[16, 14, 12, 10, 8, 6, 4, 2]),
            (AS923_4, &[16, 14, 12, 10, 8, 6, 4, 2]),
            (KR920, &[14, 12, 10, 8, 6, 4, 2, 0]),
            (IN865, &[30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10]),
            (
                US915,
                &[30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2],
            ),
            (
                AU915,
                &[30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2],
            ),
            (AS923_2, &[16, 14, 12, 10, 8, 6, 4, 2]),
            (AS923_3, &[16, 14, 12, 10, 8, 6, 4, 2]),
        ];
        for (region, dbm) in cases {
            for (i, want) in dbm.iter().enumerate() {
                assert_eq!(tx_power_dbm(region, i as u8), Some(*want), "{region} {i}");
            }
            assert_eq!(tx_power_dbm(region, dbm.len() as u8), None, "{region}");
            assert_eq!(usize::from(max_tx_power_index(region)), dbm.len() - 1);
        }
        // ADR stays within what RP 1.0.2rB/1.0.3rA devices accept.
        for (region, want) in [
            (EU868, 7),
            (US915, 10),
            (AU915, 10),
            (AS923_1, 7),
            (KR920, 7),
            (IN865, 10),
        ] {
            assert_eq!(adr_max_tx_power_index(region), want, "{region}");
        }
    }

    #[test]
    fn adr_data_rate_ranges() {
        for (region, dwell, want) in [
            (EU868, false, 0..=5),
            (EU868, true, 0..=5),
            (US915, false, 0..=3),
            (AU915, false, 0..=5),
            (AU915, true, 2..=5),
            (AS923_1, false, 0..=5),
            (AS923_1, true, 2..=5),
            (AS923_4, true, 2..=5),
            (KR920, false, 0..=5),
            (IN865, false, 0..=5),
        ] {
            assert_eq!(adr_dr_range(region, dwell), want, "{region} {dwell}");
        }
        assert_eq!(required_snr_db(7), -7.5);
        assert_eq!(required_snr_db(12), -20.0);
        assert_eq!(required_snr_for_dr(US915, 0), Some(-15.0)); // SF10
        assert_eq!(required_snr_for_dr(EU868, 3), Some(-12.5)); // SF9
        assert_eq!(required_snr_for_dr(KR920, 6), None);
    }

    /// LinkADRReq channel-mask blocks, worked out from RP002-1.0.4 "LinkAdrReq command".
    #[test]
    fn link_adr_blocks() {
        let b = |ch_mask, ch_mask_cntl| ChMaskBlock {
            ch_mask,
            ch_mask_cntl,
        };
        // EU868 with the 3 default + 5 CFList channels: 0..7 → 0x00FF, ChMaskCntl 0.
        assert_eq!(
            link_adr_ch_mask_blocks(EU868, &[0, 1, 2, 3, 4, 5, 6, 7]),
            Ok(vec![b(0x00FF, 0)])
        );
        assert_eq!(
            link_adr_ch_mask_blocks(KR920, &[0, 2, 15]),
            Ok(vec![b(0x8005, 0)])
        );
        assert_eq!(
            link_adr_ch_mask_blocks(AS923_3, &[16]),
            Err(RegionError::NoSuchChannel {
                region: AS923_3,
                index: 16
            })
        );
        // US915 sub-band 2 (channels 8..15, 65): all 125 kHz off + 500 kHz bit 1, then block 0
        // with channels 8..15 = 0xFF00.
        let sb2 = sub_band_channels(US915, 2).unwrap();
        assert_eq!(sb2, vec![8, 9, 10, 11, 12, 13, 14, 15, 65]);
        assert_eq!(
            link_adr_ch_mask_blocks(US915, &sb2),
            Ok(vec![b(0x0002, 7), b(0xFF00, 0)])
        );
        // AU915 sub-band 8 (channels 56..63, 71): block 3, channels 56..63 are bits 8..15.
        let sb8 = sub_band_channels(AU915, 8).unwrap();
        assert_eq!(
            link_adr_ch_mask_blocks(AU915, &sb8),
            Ok(vec![b(0x0080, 7), b(0xFF00, 3)])
        );
        // Sub-band 1: channels 0..7 and 64.
        assert_eq!(
            link_adr_ch_mask_blocks(US915, &sub_band_channels(US915, 1).unwrap()),
            Ok(vec![b(0x0001, 7), b(0x00FF, 0)])
        );
        // All 72 channels: one block, ChMaskCntl 6 (all 125 kHz on) with all 500 kHz.
        let all: Vec<usize> = (0..72).collect();
        assert_eq!(link_adr_ch_mask_blocks(US915, &all), Ok(vec![b(0x00FF, 6)]));
        // All but channel 20: ChMaskCntl 6, then block 1 without bit 4.
        let most: Vec<usize> = (0..72).filter(|&c| c != 20).collect();
        assert_eq!(
            link_adr_ch_mask_blocks(US915, &most),
            Ok(vec![b(0x00FF, 6), b(0xFFEF, 1)])
        );
        // Only 500 kHz channels.
        assert_eq!(
            link_adr_ch_mask_blocks(US915, &[64, 71]),
            Ok(vec![b(0x0081, 7)])
        );
        assert_eq!(
            link_adr_ch_mask_blocks(US915, &[]),
            Err(RegionError::NoChannelEnabled)
        );
        assert!(link_adr_ch_mask_blocks(US915, &[72]).is_err());
        assert_eq!(sub_band_channels(EU868, 1), None);
        assert_eq!(sub_band_channels(US915, 0), None);
    }

    #[test]
    fn apply_blocks_round_trip() {
        let all: Vec<usize> = (0..72).collect();
        for sb in 1..=8 {
            for region in [US915, AU915] {
                let want = sub_band_channels(region, sb).unwrap();
                let blocks = link_adr_ch_mask_blocks(region, &want).unwrap();
                assert_eq!(
                    apply_ch_mask_blocks(region, &all, &blocks),
                    Ok(want),
                    "{region} sub-band {sb}"
                );
            }
        }
        let blocks = link_adr_ch_mask_blocks(EU868, &[0, 1, 2, 5]).unwrap();
        assert_eq!(
            apply_ch_mask_blocks(EU868, &[0, 1, 2, 3, 4, 5, 6, 7], &blocks),
            Ok(vec![0, 1, 2, 5])
        );
        let b = |ch_mask, ch_mask_cntl| ChMaskBlock {
            ch_mask,
            ch_mask_cntl,
        };
        // ChMaskCntl 4: channels 64..71; bits above 7 do not exist.
        assert_eq!(
            apply_ch_mask_blocks(US915, &[0], &[b(0x0003, 4)]),
            Ok(vec![0, 64, 65])
        );
        assert!(apply_ch_mask_blocks(US915, &[0], &[b(0x0100, 4)]).is_err());
        // Everything off is refused, as a device refuses it.
        assert_eq!(
            apply_ch_mask_blocks(US915, &all, &[b(0, 7)]),
            Err(RegionError::NoChannelEnabled)
        );
        assert_eq!(
            apply_ch_mask_blocks(EU868, &[0], &[b(1, 6)]),
            Err(RegionError::ChMaskCntl {
                region: EU868,
                cntl: 6
            })
        );
        assert_eq!(
            apply_ch_mask_blocks(US915, &[0], &[b(1, 5)]),
            Err(RegionError::ChMaskCntl {
                region: US915,
                cntl: 5
            })
        );
    }
}
