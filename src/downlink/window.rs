//! RX window parameters per region (LoRaWAN Regional Parameters RP002-1.0.x), and the `txpk`
//! that asks a forwarder to transmit in one.

use crate::config::Region;
use crate::model::TxSettings;
use semtech_udp::pull_resp::{PhyData, Time, TxPk};
use semtech_udp::{Bandwidth, CodingRate, DataRate, Modulation, SpreadingFactor};
use std::time::Duration;

/// JOIN_ACCEPT_DELAY1 (RP002 "default settings"); DELAY2 is one second later.
pub const JOIN_ACCEPT_DELAY1: Duration = Duration::from_secs(5);

/// Where and how to transmit.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub freq_hz: u32,
    pub dr: u8,
    pub sf: u8,
    pub bw_hz: u32,
    pub power_dbm: u64,
}

/// (SF, bandwidth) of a data rate, per region (RP002 "data rate" tables).
fn dr_params(region: Region, dr: u8) -> Option<(u8, u32)> {
    use Region::*;
    Some(match (region, dr) {
        (EU868 | AS923, 0..=5) => (12 - dr, 125_000),
        (EU868 | AS923, 6) => (7, 250_000),
        (US915, 0..=3) => (10 - dr, 125_000),
        (US915, 4) => (8, 500_000),
        (AU915, 0..=5) => (12 - dr, 125_000),
        (AU915, 6) => (8, 500_000),
        (US915 | AU915, 8..=13) => (12 - (dr - 8), 500_000),
        _ => return None,
    })
}

/// Uplink data rate of a reception.
pub fn uplink_dr(region: Region, s: &TxSettings) -> Option<u8> {
    (0..=6).find(|&dr| dr_params(region, dr) == Some((s.spreading_factor, s.bandwidth_hz)))
}

/// Largest FRMPayload without FOpts (RP002 "maximum payload size" N, no repeater, dwell off).
pub fn max_payload(region: Region, w: &Window) -> usize {
    use Region::*;
    match (region, w.dr) {
        (EU868 | AS923, 0..=2) => 51,
        (EU868 | AS923, 3) => 115,
        (EU868 | AS923, _) => 222,
        (US915 | AU915, 8) => 53,
        (US915 | AU915, 9) => 129,
        (US915 | AU915, _) => 242,
    }
}

fn power(region: Region) -> u64 {
    match region {
        // EIRP 16 dBm max in most EU868 sub-bands; 14 dBm conducted is the common default.
        Region::EU868 | Region::AS923 => 14,
        Region::US915 | Region::AU915 => 20,
    }
}

fn window(region: Region, freq_hz: u32, dr: u8) -> Option<Window> {
    let (sf, bw_hz) = dr_params(region, dr)?;
    Some(Window {
        freq_hz,
        dr,
        sf,
        bw_hz,
        power_dbm: power(region),
    })
}

/// RX1 for an uplink (frequency mapping and RX1 DR offset of the region).
pub fn rx1(region: Region, up: &TxSettings, dr_offset: u8) -> Option<Window> {
    let up_dr = uplink_dr(region, up)?;
    match region {
        Region::EU868 | Region::AS923 => {
            window(region, up.frequency_hz, up_dr.saturating_sub(dr_offset))
        }
        Region::US915 | Region::AU915 => {
            // Uplink channel from the frequency: 125 kHz channels 0..63, 500 kHz 64..71.
            let (base125, base500) = if region == Region::US915 {
                (902_300_000, 903_000_000)
            } else {
                (915_200_000, 915_900_000)
            };
            let ch = if up.bandwidth_hz == 500_000 {
                64 + (up.frequency_hz.checked_sub(base500)? + 800_000) / 1_600_000
            } else {
                (up.frequency_hz.checked_sub(base125)? + 100_000) / 200_000
            };
            let freq = 923_300_000 + (ch % 8) * 600_000;
            // RX1 DR table: US915 maps DR0..4 to DR10..13, AU915 DR0..6 to DR8..13, minus offset.
            let (base, top) = if region == Region::US915 {
                (10u8, 13u8)
            } else {
                (8u8, 13u8)
            };
            let dr = (base + up_dr).min(top).saturating_sub(dr_offset).max(8);
            window(region, freq, dr)
        }
    }
}

/// RX2 (region default, or a configured data rate).
pub fn rx2(region: Region, dr: Option<u8>) -> Window {
    let (freq, default_dr) = match region {
        Region::EU868 => (869_525_000, 0),
        Region::US915 | Region::AU915 => (923_300_000, 8),
        Region::AS923 => (923_200_000, 2),
    };
    let dr = dr.unwrap_or(default_dr);
    window(region, freq, dr)
        .or_else(|| window(region, freq, default_dr))
        .unwrap_or(Window {
            freq_hz: freq,
            dr: default_dr,
            sf: 12,
            bw_hz: 125_000,
            power_dbm: power(region),
        })
}

/// The `txpk` for a window; `tmst = None` means "immediately" (class C).
pub fn txpk(w: &Window, tmst: Option<u32>, phy: &[u8]) -> TxPk {
    let sf = match w.sf {
        7 => SpreadingFactor::_7,
        8 => SpreadingFactor::_8,
        9 => SpreadingFactor::_9,
        10 => SpreadingFactor::_10,
        11 => SpreadingFactor::_11,
        _ => SpreadingFactor::_12,
    };
    let bw = match w.bw_hz {
        250_000 => Bandwidth::_250KHz,
        500_000 => Bandwidth::_500KHz,
        _ => Bandwidth::_125KHz,
    };
    TxPk {
        time: match tmst {
            Some(t) => Time::by_tmst(t),
            None => Time::immediate(),
        },
        freq: f64::from(w.freq_hz) / 1e6,
        rfch: 0,
        powe: w.power_dbm,
        modu: Modulation::LORA,
        datr: DataRate::new(sf, bw),
        codr: Some(CodingRate::_4_5),
        fdev: None,
        // Downlinks use inverted polarity so devices do not hear each other (LoRaWAN §4).
        ipol: true,
        prea: None,
        data: PhyData::new(phy.to_vec()),
        ncrc: Some(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(f: u32, sf: u8, bw: u32) -> TxSettings {
        TxSettings {
            frequency_hz: f,
            spreading_factor: sf,
            bandwidth_hz: bw,
            coding_rate: "4/5".into(),
        }
    }

    #[test]
    fn eu868_rx1_same_frequency_and_dr_offset() {
        let w = rx1(Region::EU868, &up(868_300_000, 9, 125_000), 0).unwrap();
        assert_eq!(
            (w.freq_hz, w.dr, w.sf, w.bw_hz),
            (868_300_000, 3, 9, 125_000)
        );
        let w = rx1(Region::EU868, &up(868_300_000, 9, 125_000), 2).unwrap();
        assert_eq!((w.dr, w.sf), (1, 11));
        let w = rx1(Region::EU868, &up(868_300_000, 12, 125_000), 5).unwrap();
        assert_eq!(w.dr, 0, "never below DR0");
        let r2 = rx2(Region::EU868, None);
        assert_eq!((r2.freq_hz, r2.sf, r2.bw_hz), (869_525_000, 12, 125_000));
        assert_eq!(max_payload(Region::EU868, &r2), 51);
    }

    #[test]
    fn us915_rx1_channel_mapping() {
        // Channel 9 (904.1 MHz, SF10 = DR0) → downlink channel 1: 923.9 MHz, DR10 (SF10/500).
        let w = rx1(Region::US915, &up(904_100_000, 10, 125_000), 0).unwrap();
        assert_eq!(
            (w.freq_hz, w.dr, w.sf, w.bw_hz),
            (923_900_000, 10, 10, 500_000)
        );
        // Channel 64 (903.0 MHz, SF8/500 = DR4) → 923.3 MHz, DR13.
        let w = rx1(Region::US915, &up(903_000_000, 8, 500_000), 0).unwrap();
        assert_eq!((w.freq_hz, w.dr), (923_300_000, 13));
        let r2 = rx2(Region::US915, None);
        assert_eq!(
            (r2.freq_hz, r2.dr, r2.sf, r2.bw_hz),
            (923_300_000, 8, 12, 500_000)
        );
        assert_eq!(max_payload(Region::US915, &r2), 53);
    }

    #[test]
    fn au915_and_as923() {
        // AU915 channel 0 (915.2 MHz, SF12 = DR0) → 923.3 MHz, DR8.
        let w = rx1(Region::AU915, &up(915_200_000, 12, 125_000), 0).unwrap();
        assert_eq!((w.freq_hz, w.dr), (923_300_000, 8));
        let w = rx1(Region::AS923, &up(923_400_000, 7, 125_000), 1).unwrap();
        assert_eq!((w.freq_hz, w.dr), (923_400_000, 4));
        assert_eq!(rx2(Region::AS923, None).freq_hz, 923_200_000);
        assert!(
            rx1(Region::EU868, &up(868_100_000, 6, 125_000), 0).is_none(),
            "SF6 is no EU868 DR"
        );
    }

    #[test]
    fn txpk_fields() {
        let w = rx2(Region::EU868, None);
        let v = serde_json::to_value(txpk(
            &w,
            Some(4_294_967_000u32.wrapping_add(1_000_000)),
            &[1, 2],
        ))
        .unwrap();
        assert_eq!(v["tmst"], 999_704);
        assert_eq!(v["freq"], 869.525);
        assert_eq!(v["datr"], "SF12BW125");
        assert_eq!(v["codr"], "4/5");
        assert_eq!(v["ipol"], true);
        assert_eq!(v["powe"], 14);
        assert_eq!(v["size"], 2);
        let v = serde_json::to_value(txpk(&w, None, &[1])).unwrap();
        assert_eq!(v["imme"], true);
    }
}
