//! LoRaWAN Regional Parameters (RP002-1.0.x) as pure data: data rates, receive-window
//! timing, RX1 data-rate and frequency mapping, RX2 defaults, maximum payload sizes and downlink
//! power, per region. No I/O; `downlink::window` turns these into transmissions.
//!
//! Every number in this file is typed from RP002-1.0.3 (RP002-1.0.4 has the same values for these
//! four regions); each table names the region and the heading it comes from. The tables were
//! cross-checked against two independent implementations (the region modules of ChirpStack and
//! Semtech's LoRaMac-node) and, for transmit power, Semtech's Basic Station region set-up. Where
//! the regional-parameter revisions that 1.0.2, 1.0.3 and 1.0.4 devices implement disagree, the
//! value every one of those devices accepts is used, and the comment says so.
//!
//! Scope: LoRa modulation only (no FSK or LR-FHSS downlinks); `AS923` is AS923-1
//! (AS923_FREQ_OFFSET = 0); no repeaters, so the "not repeater compatible" payload tables apply.

use crate::model::TxSettings;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// LoRaWAN region (`[gateway] region`). AS923 is AS923-1.
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

/// RECEIVE_DELAY1 (RP002-1.0.3 "Default settings", common to all regions). The device opens
/// RX1 this long after the end of its uplink, and the `tmst` of an `rxpk` is the concentrator's
/// "RX finished" time (Semtech packet forwarder PROTOCOL.TXT), so RX1 is at `tmst + 1 s`.
pub const RECEIVE_DELAY1: Duration = Duration::from_secs(1);
/// RECEIVE_DELAY2 = RECEIVE_DELAY1 + 1 s.
pub const RECEIVE_DELAY2: Duration = Duration::from_secs(2);
/// JOIN_ACCEPT_DELAY1 (RP002-1.0.3 "Default settings").
pub const JOIN_ACCEPT_DELAY1: Duration = Duration::from_secs(5);
/// JOIN_ACCEPT_DELAY2 = JOIN_ACCEPT_DELAY1 + 1 s.
pub const JOIN_ACCEPT_DELAY2: Duration = Duration::from_secs(6);

/// (spreading factor, bandwidth in Hz) of a LoRa data rate.
///
/// RP002-1.0.3 "Data Rate and End-device Output Power encoding" of each region:
/// - EU863-870 and AS923: DR0..DR5 = SF12..SF7 / 125 kHz, DR6 = SF7 / 250 kHz (DR7 is FSK).
/// - US902-928: DR0..DR3 = SF10..SF7 / 125 kHz, DR4 = SF8 / 500 kHz (DR5, DR6 LR-FHSS,
///   DR7 RFU), DR8..DR13 = SF12..SF7 / 500 kHz (downlink only).
/// - AU915-928: DR0..DR5 = SF12..SF7 / 125 kHz, DR6 = SF8 / 500 kHz (DR7 LR-FHSS),
///   DR8..DR13 = SF12..SF7 / 500 kHz (downlink only).
pub fn data_rate(region: Region, dr: u8) -> Option<(u8, u32)> {
    use Region::*;
    Some(match (region, dr) {
        (EU868 | AS923, 0..=5) => (12 - dr, 125_000),
        (EU868 | AS923, 6) => (7, 250_000),
        (US915, 0..=3) => (10 - dr, 125_000),
        (US915, 4) => (8, 500_000),
        (AU915, 0..=5) => (12 - dr, 125_000),
        (AU915, 6) => (8, 500_000),
        (US915 | AU915, 8..=13) => (20 - dr, 500_000),
        _ => return None,
    })
}

/// Data rates a gateway may transmit with (same tables as [`data_rate`]).
pub fn is_downlink_dr(region: Region, dr: u8) -> bool {
    region.downlink_drs().contains(&dr)
}

/// Uplink data rate of a reception (LoRa uplink data rates only).
pub fn uplink_dr(region: Region, s: &TxSettings) -> Option<u8> {
    let top = match region {
        Region::US915 => 4,
        _ => 6,
    };
    (0..=top).find(|&dr| data_rate(region, dr) == Some((s.spreading_factor, s.bandwidth_hz)))
}

/// US902-928 "Receive windows", RX1 data rate by upstream DR (rows DR0..DR4) and RX1DROffset
/// (columns 0..3). DR5/DR6 (LR-FHSS) uplinks are not LoRa receptions and get no RX1 here.
const US915_RX1_DR: [[u8; 4]; 5] = [
    [10, 9, 8, 8],
    [11, 10, 9, 8],
    [12, 11, 10, 9],
    [13, 12, 11, 10],
    [13, 13, 12, 11],
];

/// AU915-928 "Receive windows", RX1 data rate by upstream DR (rows DR0..DR6) and RX1DROffset
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

/// AS923 "Receive windows": Effective_RX1DROffset for RX1DROffset 0..7 (6 and 7 raise the
/// downlink data rate above the uplink's).
const AS923_EFFECTIVE_RX1_DR_OFFSET: [i8; 8] = [0, 1, 2, 3, 4, 5, -1, -2];

/// RX1 data rate for an uplink data rate and RX1DROffset (RP002-1.0.3 "Receive windows" of each
/// region). `dwell` is the device's DownlinkDwellTime (AS923 only, see [`downlink_dwell_time`]).
pub fn rx1_dr(region: Region, up_dr: u8, offset: u8, dwell: bool) -> Option<u8> {
    match region {
        // EU863-870: table = MAX(0, upstream DR − RX1DROffset), offsets 0..5.
        Region::EU868 => (up_dr <= 6 && offset <= 5).then(|| up_dr.saturating_sub(offset)),
        Region::US915 => US915_RX1_DR
            .get(usize::from(up_dr))?
            .get(usize::from(offset))
            .copied(),
        Region::AU915 => AU915_RX1_DR
            .get(usize::from(up_dr))?
            .get(usize::from(offset))
            .copied(),
        // AS923: MIN(5, MAX(MinDR, upstream DR − Effective_RX1DROffset)), MinDR = 2 with
        // DownlinkDwellTime = 1, else 0.
        Region::AS923 => {
            if up_dr > 6 {
                return None;
            }
            let eff = *AS923_EFFECTIVE_RX1_DR_OFFSET.get(usize::from(offset))?;
            let min = if dwell { 2 } else { 0 };
            Some((i16::from(up_dr) - i16::from(eff)).clamp(min, 5) as u8)
        }
    }
}

/// The 125 kHz / 500 kHz uplink channel grid of US902-928 and AU915-928 ("ISM Band Channel
/// Frequencies"): channel index of an uplink frequency, if it is on the grid (±5 kHz, for
/// forwarders that report rounded MHz).
fn hybrid_channel(freq_hz: u32, bw_hz: u32, base125: u32, base500: u32) -> Option<u32> {
    let (base, step, first, count) = if bw_hz == 500_000 {
        (base500, 1_600_000, 64, 8)
    } else {
        (base125, 200_000, 0, 64)
    };
    // Nearest channel: with |offset from the grid| <= 5 kHz, the floor below is exact.
    let n = freq_hz.checked_sub(base.saturating_sub(5_000))? / step;
    let on_grid = (base + n * step).abs_diff(freq_hz) <= 5_000;
    (on_grid && n < count).then_some(first + n)
}

/// RX1 frequency for an uplink (RP002-1.0.3 "Receive windows" of each region).
pub fn rx1_frequency(region: Region, up: &TxSettings) -> Option<u32> {
    match region {
        // EU863-870 and AS923: the uplink channel's frequency.
        Region::EU868 | Region::AS923 => Some(up.frequency_hz),
        // US902-928: uplink channels 0..63 from 902.3 MHz by 200 kHz, 64..71 from 903.0 MHz by
        // 1.6 MHz; downlink channel = uplink channel modulo 8, at 923.3 MHz + 600 kHz × n.
        Region::US915 => {
            let ch = hybrid_channel(up.frequency_hz, up.bandwidth_hz, 902_300_000, 903_000_000)?;
            Some(923_300_000 + (ch % 8) * 600_000)
        }
        // AU915-928: uplink channels 0..63 from 915.2 MHz by 200 kHz, 64..71 from 915.9 MHz by
        // 1.6 MHz; the same downlink channels as US902-928.
        Region::AU915 => {
            let ch = hybrid_channel(up.frequency_hz, up.bandwidth_hz, 915_200_000, 915_900_000)?;
            Some(923_300_000 + (ch % 8) * 600_000)
        }
    }
}

/// Maximum FRMPayload size N (FOpts empty) per data rate, "Maximum payload size" tables of
/// RP002-1.0.3 (not repeater compatible). `dwell` selects the 400 ms dwell-time table where the
/// region has one (AS923; AU915 uplink data rates). `None`: the data rate cannot be used.
pub fn max_payload(region: Region, dr: u8, dwell: bool) -> Option<usize> {
    const NA: usize = 0;
    let table: &[usize] = match (region, dr) {
        // EU863-870: DR0..7.
        (Region::EU868, 0..=7) => &[51, 51, 51, 115, 242, 242, 242, 242],
        // US902-928 uplink DR0..4, downlink DR8..13.
        (Region::US915, 0..=4) => &[11, 53, 125, 242, 242],
        (Region::US915 | Region::AU915, 8..=13) => &[53, 129, 242, 242, 242, 242],
        // AU915-928 uplink DR0..6 (UplinkDwellTime 0 / 1).
        (Region::AU915, 0..=6) if !dwell => &[51, 51, 51, 115, 242, 242, 242],
        (Region::AU915, 0..=6) => &[NA, NA, 11, 53, 125, 242, 242],
        // AS923, DwellTime 0. DR2: RP002-1.0.1 raised N from 51 to 115, but the regional
        // parameters that 1.0.2/1.0.3 devices implement (RP 1.0.2rB, 1.0.3rA) say 51 and
        // LoRaMac-node drops larger downlinks, so 51 is used.
        (Region::AS923, 0..=7) if !dwell => &[51, 51, 51, 115, 242, 242, 242, 242],
        // AS923, DwellTime 1 (400 ms): DR0 and DR1 are not allowed.
        (Region::AS923, 0..=7) => &[NA, NA, 11, 53, 125, 242, 242, 242],
        _ => return None,
    };
    let first = if dr >= 8 { 8 } else { 0 };
    table
        .get(usize::from(dr - first))
        .copied()
        .filter(|&n| n != NA)
}

/// Whether the device applies the 400 ms downlink dwell time. Only AS923 has one: its devices
/// boot with the dwell-time limits on (RP002-1.0.3 AS923; also the default of ChirpStack and
/// The Things Stack), and lorastream never sends TxParamSetupReq to lift them. A device that
/// transmits at DR0 or DR1 has evidently been configured without dwell time (those data rates
/// are not allowed with UplinkDwellTime = 1), so its downlinks are not limited either.
pub fn downlink_dwell_time(region: Region, up: Option<&TxSettings>) -> bool {
    region == Region::AS923 && !matches!(up.and_then(|u| uplink_dr(region, u)), Some(0 | 1))
}

/// Downlink EIRP (dBm) sent as the `txpk` `powe`; the forwarder subtracts its configured
/// antenna gain. RP002-1.0.3 default MaxEIRP: EU863-870 +16 dBm, AS923 +16 dBm, AU915-928
/// +30 dBm; US902-928 notes that the 500 kHz downlink channels limit a gateway to +26 dBm in
/// practice. EU863-870 869.4–869.65 MHz (the RX2 channel) allows 500 mW ERP (ETSI EN 300 220
/// sub-band, CEPT ERC/REC 70-03): 27 dBm, as Semtech's Basic Station uses.
pub fn downlink_eirp_dbm(region: Region, freq_hz: u32) -> u64 {
    match region {
        Region::EU868 if (869_400_000..=869_650_000).contains(&freq_hz) => 27,
        Region::EU868 | Region::AS923 => 16,
        Region::US915 => 26,
        Region::AU915 => 30,
    }
}

/// RX2 defaults (RP002-1.0.3 "Receive windows" / "Default settings" of each region):
/// EU863-870 869.525 MHz DR0; US902-928 and AU915-928 923.3 MHz DR8; AS923(-1) 923.2 MHz DR2.
pub fn rx2_default(region: Region) -> (u32, u8) {
    match region {
        Region::EU868 => (869_525_000, 0),
        Region::US915 | Region::AU915 => (923_300_000, 8),
        Region::AS923 => (923_200_000, 2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Region::*;

    use crate::sim::fixtures::tx as up;

    /// Data rate tables, typed from RP002-1.0.3 ("Data Rate and End-device Output Power
    /// encoding" of each region); `None` where the DR is FSK, LR-FHSS or RFU.
    #[test]
    fn data_rate_tables() {
        let eu_as: [Option<(u8, u32)>; 8] = [
            Some((12, 125_000)),
            Some((11, 125_000)),
            Some((10, 125_000)),
            Some((9, 125_000)),
            Some((8, 125_000)),
            Some((7, 125_000)),
            Some((7, 250_000)),
            None, // FSK 50 kbps
        ];
        let us: [Option<(u8, u32)>; 14] = [
            Some((10, 125_000)),
            Some((9, 125_000)),
            Some((8, 125_000)),
            Some((7, 125_000)),
            Some((8, 500_000)),
            None, // LR-FHSS
            None, // LR-FHSS
            None, // RFU
            Some((12, 500_000)),
            Some((11, 500_000)),
            Some((10, 500_000)),
            Some((9, 500_000)),
            Some((8, 500_000)),
            Some((7, 500_000)),
        ];
        let au: [Option<(u8, u32)>; 14] = [
            Some((12, 125_000)),
            Some((11, 125_000)),
            Some((10, 125_000)),
            Some((9, 125_000)),
            Some((8, 125_000)),
            Some((7, 125_000)),
            Some((8, 500_000)),
            None, // LR-FHSS
            Some((12, 500_000)),
            Some((11, 500_000)),
            Some((10, 500_000)),
            Some((9, 500_000)),
            Some((8, 500_000)),
            Some((7, 500_000)),
        ];
        for (region, table) in [
            (EU868, &eu_as[..]),
            (AS923, &eu_as[..]),
            (US915, &us[..]),
            (AU915, &au[..]),
        ] {
            for (dr, want) in table.iter().enumerate() {
                assert_eq!(data_rate(region, dr as u8), *want, "{region:?} DR{dr}");
            }
            assert_eq!(data_rate(region, 14), None);
        }
        // Uplink DR from a reception: SF8/500 is DR4 in US915, DR6 in AU915; never DR12.
        assert_eq!(uplink_dr(US915, &up(903_000_000, 8, 500_000)), Some(4));
        assert_eq!(uplink_dr(AU915, &up(915_900_000, 8, 500_000)), Some(6));
        assert_eq!(uplink_dr(US915, &up(902_300_000, 12, 125_000)), None);
        assert_eq!(uplink_dr(EU868, &up(868_100_000, 6, 125_000)), None);
        assert!(!is_downlink_dr(US915, 4) && is_downlink_dr(US915, 8));
    }

    /// RX1 data rate tables, RP002-1.0.3 "Receive windows": rows are the upstream DR, columns
    /// RX1DROffset.
    #[test]
    fn rx1_data_rate_tables() {
        let eu: [[u8; 6]; 7] = [
            [0, 0, 0, 0, 0, 0],
            [1, 0, 0, 0, 0, 0],
            [2, 1, 0, 0, 0, 0],
            [3, 2, 1, 0, 0, 0],
            [4, 3, 2, 1, 0, 0],
            [5, 4, 3, 2, 1, 0],
            [6, 5, 4, 3, 2, 1],
        ];
        let us: [[u8; 4]; 5] = [
            [10, 9, 8, 8],
            [11, 10, 9, 8],
            [12, 11, 10, 9],
            [13, 12, 11, 10],
            [13, 13, 12, 11],
        ];
        let au: [[u8; 6]; 7] = [
            [8, 8, 8, 8, 8, 8],
            [9, 8, 8, 8, 8, 8],
            [10, 9, 8, 8, 8, 8],
            [11, 10, 9, 8, 8, 8],
            [12, 11, 10, 9, 8, 8],
            [13, 12, 11, 10, 9, 8],
            [13, 13, 12, 11, 10, 9],
        ];
        // AS923, MIN(5, MAX(MinDR, DR − Effective_RX1DROffset)); offsets 0..7.
        let as_no_dwell: [[u8; 8]; 7] = [
            [0, 0, 0, 0, 0, 0, 1, 2],
            [1, 0, 0, 0, 0, 0, 2, 3],
            [2, 1, 0, 0, 0, 0, 3, 4],
            [3, 2, 1, 0, 0, 0, 4, 5],
            [4, 3, 2, 1, 0, 0, 5, 5],
            [5, 4, 3, 2, 1, 0, 5, 5],
            [5, 5, 4, 3, 2, 1, 5, 5],
        ];
        let as_dwell: [[u8; 8]; 7] = [
            [2, 2, 2, 2, 2, 2, 2, 2],
            [2, 2, 2, 2, 2, 2, 2, 3],
            [2, 2, 2, 2, 2, 2, 3, 4],
            [3, 2, 2, 2, 2, 2, 4, 5],
            [4, 3, 2, 2, 2, 2, 5, 5],
            [5, 4, 3, 2, 2, 2, 5, 5],
            [5, 5, 4, 3, 2, 2, 5, 5],
        ];
        fn check<const N: usize>(region: Region, dwell: bool, t: &[[u8; N]]) {
            for (dr, row) in t.iter().enumerate() {
                for (off, want) in row.iter().enumerate() {
                    assert_eq!(
                        rx1_dr(region, dr as u8, off as u8, dwell),
                        Some(*want),
                        "{region:?} DR{dr} offset {off} dwell {dwell}"
                    );
                }
                assert_eq!(rx1_dr(region, dr as u8, N as u8, dwell), None, "offset {N}");
            }
            assert_eq!(rx1_dr(region, t.len() as u8 + 1, 0, dwell), None);
        }
        check(EU868, false, &eu);
        check(US915, false, &us);
        check(AU915, false, &au);
        check(AS923, false, &as_no_dwell);
        check(AS923, true, &as_dwell);
    }

    /// RX1 frequency: EU868/AS923 same channel; US915/AU915 uplink channel modulo 8 onto the
    /// eight 500 kHz downlink channels from 923.3 MHz.
    #[test]
    fn rx1_frequency_mapping() {
        let cases: [(Region, u32, u32, Option<u32>); 16] = [
            (EU868, 868_500_000, 125_000, Some(868_500_000)),
            (AS923, 923_400_000, 125_000, Some(923_400_000)),
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
            (AU915, 927_800_000, 125_000, Some(927_500_000)), // ch 63
            (AU915, 915_900_000, 500_000, Some(923_300_000)), // ch 64
            (AU915, 927_100_000, 500_000, Some(927_500_000)), // ch 71
        ];
        for (region, f, bw, want) in cases {
            assert_eq!(
                rx1_frequency(region, &up(f, 8, bw)),
                want,
                "{region:?} {f} Hz"
            );
        }
        // Forwarders report MHz with a few decimals: a few Hz off the grid is still the channel.
        assert_eq!(
            rx1_frequency(US915, &up(904_100_002, 10, 125_000)),
            Some(923_900_000)
        );
    }

    /// Maximum payload size N, RP002-1.0.3 "Maximum payload size" (not repeater compatible).
    #[test]
    fn max_payload_tables() {
        let n = None;
        let cases: [(Region, bool, &[Option<usize>]); 6] = [
            (
                EU868,
                false,
                &[
                    Some(51),
                    Some(51),
                    Some(51),
                    Some(115),
                    Some(242),
                    Some(242),
                    Some(242),
                    Some(242),
                ],
            ),
            (
                US915,
                false,
                &[
                    Some(11),
                    Some(53),
                    Some(125),
                    Some(242),
                    Some(242),
                    n,
                    n,
                    n,
                    Some(53),
                    Some(129),
                    Some(242),
                    Some(242),
                    Some(242),
                    Some(242),
                ],
            ),
            (
                AU915,
                false,
                &[
                    Some(51),
                    Some(51),
                    Some(51),
                    Some(115),
                    Some(242),
                    Some(242),
                    Some(242),
                    n,
                    Some(53),
                    Some(129),
                    Some(242),
                    Some(242),
                    Some(242),
                    Some(242),
                ],
            ),
            (
                AU915,
                true,
                &[
                    n,
                    n,
                    Some(11),
                    Some(53),
                    Some(125),
                    Some(242),
                    Some(242),
                    n,
                    Some(53),
                    Some(129),
                    Some(242),
                    Some(242),
                    Some(242),
                    Some(242),
                ],
            ),
            (
                AS923,
                false,
                // DR2: 51, not RP002-1.0.1+'s 115 (see max_payload).
                &[
                    Some(51),
                    Some(51),
                    Some(51),
                    Some(115),
                    Some(242),
                    Some(242),
                    Some(242),
                    Some(242),
                ],
            ),
            (
                AS923,
                true,
                &[
                    n,
                    n,
                    Some(11),
                    Some(53),
                    Some(125),
                    Some(242),
                    Some(242),
                    Some(242),
                ],
            ),
        ];
        for (region, dwell, table) in cases {
            for (dr, want) in table.iter().enumerate() {
                assert_eq!(
                    max_payload(region, dr as u8, dwell),
                    *want,
                    "{region:?} DR{dr} dwell {dwell}"
                );
            }
            assert_eq!(max_payload(region, 14, dwell), None);
        }
    }

    #[test]
    fn delays_rx2_defaults_and_power() {
        assert_eq!(
            (RECEIVE_DELAY1, RECEIVE_DELAY2),
            (Duration::from_secs(1), Duration::from_secs(2))
        );
        assert_eq!(
            (JOIN_ACCEPT_DELAY1, JOIN_ACCEPT_DELAY2),
            (Duration::from_secs(5), Duration::from_secs(6))
        );
        for (region, f, dr) in [
            (EU868, 869_525_000, 0),
            (US915, 923_300_000, 8),
            (AU915, 923_300_000, 8),
            (AS923, 923_200_000, 2),
        ] {
            assert_eq!(rx2_default(region), (f, dr), "{region:?}");
        }
        assert_eq!(downlink_eirp_dbm(EU868, 868_100_000), 16);
        assert_eq!(downlink_eirp_dbm(EU868, 869_400_000), 27);
        assert_eq!(downlink_eirp_dbm(EU868, 869_700_000), 16);
        assert_eq!(downlink_eirp_dbm(AS923, 923_200_000), 16);
    }
}
