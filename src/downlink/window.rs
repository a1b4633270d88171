//! Receive windows: where and how the network answers a device (frequency, data rate, power,
//! payload room), from the region's tables in [`crate::lorawan::region`], and the `txpk` that
//! asks a packet forwarder to transmit in one.
//!
//! All devices of one gateway share the network's RX settings ([`RxPlan`]): RX1DROffset 0, RX2
//! at the region's default frequency with the region's default or the configured data rate.

use crate::lorawan::region::{
    data_rate, downlink_dwell_time, downlink_eirp_dbm, is_downlink_dr, max_payload, rx1_dr,
    rx1_frequency, rx2_default, uplink_dr, Region,
};
use crate::model::TxSettings;
use semtech_udp::pull_resp::{PhyData, Time, TxPk};
use semtech_udp::{Bandwidth, CodingRate, DataRate, Modulation, SpreadingFactor};

/// Where and how to transmit.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub freq_hz: u32,
    pub dr: u8,
    pub sf: u8,
    pub bw_hz: u32,
    /// `powe` of the `txpk`: the region's downlink EIRP for this frequency (dBm).
    pub power_dbm: u64,
    /// Largest FRMPayload (N) at this data rate when FOpts is empty.
    pub max_payload: usize,
}

fn window(region: Region, freq_hz: u32, dr: u8, dwell: bool) -> Option<Window> {
    let (sf, bw_hz) = data_rate(region, dr)?;
    if !is_downlink_dr(region, dr) {
        return None;
    }
    Some(Window {
        freq_hz,
        dr,
        sf,
        bw_hz,
        power_dbm: downlink_eirp_dbm(region, freq_hz),
        max_payload: max_payload(region, dr, dwell)?,
    })
}

/// The network's receive-window settings, the same for every device of this gateway: what ABP
/// devices must be configured with and what JoinAccepts tell OTAA devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxPlan {
    pub region: Region,
    /// RX1DROffset (DLSettings); 0, the default of every region.
    pub rx1_dr_offset: u8,
    pub rx2_dr: u8,
    pub rx2_freq_hz: u32,
}

impl RxPlan {
    /// The region's defaults, with RX2's data rate replaced by `rx2_dr` if it is given and is a
    /// downlink data rate of the region (the config validates it).
    pub fn new(region: Region, rx2_dr: Option<u8>) -> RxPlan {
        let (rx2_freq_hz, default_dr) = rx2_default(region);
        RxPlan {
            region,
            rx1_dr_offset: 0,
            rx2_dr: rx2_dr
                .filter(|&d| is_downlink_dr(region, d))
                .unwrap_or(default_dr),
            rx2_freq_hz,
        }
    }

    /// A device's own settings (what it acknowledged: `lorawan::mac_state::RxSettings`).
    pub fn for_device(region: Region, rx: &crate::lorawan::mac_state::RxSettings) -> RxPlan {
        RxPlan {
            region,
            rx1_dr_offset: rx.rx1_dr_offset,
            rx2_dr: rx.rx2_dr,
            rx2_freq_hz: rx.rx2_freq_hz,
        }
    }

    /// RX1 for an uplink: the region's frequency mapping and RX1 data rate table.
    pub fn rx1(&self, up: &TxSettings) -> Option<Window> {
        let dwell = downlink_dwell_time(self.region, Some(up));
        let dr = rx1_dr(
            self.region,
            uplink_dr(self.region, up)?,
            self.rx1_dr_offset,
            dwell,
        )?;
        window(self.region, rx1_frequency(self.region, up)?, dr, dwell)
    }

    /// RX2 (also the class C window); `up` is the device's last uplink, if known.
    pub fn rx2(&self, up: Option<&TxSettings>) -> Option<Window> {
        let dwell = downlink_dwell_time(self.region, up);
        window(self.region, self.rx2_freq_hz, self.rx2_dr, dwell)
    }
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
        // LoRaWAN uses coding rate 4/5 everywhere (RP002 "Preamble Format" of each region).
        codr: Some(CodingRate::_4_5),
        fdev: None,
        // Downlinks use inverted I/Q polarity so devices do not hear each other, and carry no
        // PHY payload CRC (LoRaWAN 1.0.x §4, "LoRa PHY layer").
        ipol: true,
        // LoRa's standard preamble, said explicitly: the reference forwarder reads a `null`
        // (what `None` serializes to) as 0 and transmits its minimum of 6 symbols.
        prea: Some(8),
        data: PhyData::new(phy.to_vec()),
        ncrc: Some(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Region::*;

    use crate::sim::fixtures::tx as up;

    #[test]
    fn rx2_windows_per_region() {
        for (region, f, dr, sf, bw, max, powe) in [
            (EU868, 869_525_000, 0, 12, 125_000, 51, 27),
            (US915, 923_300_000, 8, 12, 500_000, 53, 26),
            (AU915, 923_300_000, 8, 12, 500_000, 53, 30),
            // AS923 RX2 is DR2; with the boot dwell time (400 ms) it carries 11 bytes.
            (AS923_1, 923_200_000, 2, 10, 125_000, 11, 16),
        ] {
            let w = RxPlan::new(region, None).rx2(None).unwrap();
            assert_eq!(
                (w.freq_hz, w.dr, w.sf, w.bw_hz, w.max_payload, w.power_dbm),
                (f, dr, sf, bw, max, powe),
                "{region:?}"
            );
        }
        // A configured RX2 data rate (TTN's EU868 RX2 is SF9 = DR3), if the region has it.
        let p = RxPlan::new(EU868, Some(3));
        assert_eq!(p.rx2(None).unwrap().sf, 9);
        assert_eq!(RxPlan::new(US915, Some(3)).rx2_dr, 8, "DR3 is uplink-only");
    }

    #[test]
    fn rx1_windows_per_region() {
        let p = RxPlan::new(EU868, None);
        let w = p.rx1(&up(868_300_000, 9, 125_000)).unwrap();
        assert_eq!(
            (w.freq_hz, w.dr, w.sf, w.bw_hz, w.power_dbm, w.max_payload),
            (868_300_000, 3, 9, 125_000, 16, 115)
        );
        // US915 channel 9 at DR0 (SF10/125) → downlink channel 1, DR10 (SF10/500).
        let w = RxPlan::new(US915, None)
            .rx1(&up(904_100_000, 10, 125_000))
            .unwrap();
        assert_eq!(
            (w.freq_hz, w.dr, w.sf, w.bw_hz, w.power_dbm, w.max_payload),
            (923_900_000, 10, 10, 500_000, 26, 242)
        );
        // AU915 channel 0 at DR0 (SF12/125) → 923.3 MHz, DR8 (SF12/500).
        let w = RxPlan::new(AU915, None)
            .rx1(&up(915_200_000, 12, 125_000))
            .unwrap();
        assert_eq!(
            (w.freq_hz, w.dr, w.sf, w.bw_hz, w.max_payload),
            (923_300_000, 8, 12, 500_000, 53)
        );
        // AS923 at DR5 (dwell on): same channel, DR5, 242 bytes; at DR0 the device has no
        // dwell time, so RX1 is DR0 with 51 bytes and RX2 DR2 carries 51 bytes.
        let p = RxPlan::new(AS923_1, None);
        let w = p.rx1(&up(923_400_000, 7, 125_000)).unwrap();
        assert_eq!((w.freq_hz, w.dr, w.max_payload), (923_400_000, 5, 242));
        let slow = up(923_200_000, 12, 125_000);
        let w = p.rx1(&slow).unwrap();
        assert_eq!((w.dr, w.max_payload), (0, 51));
        assert_eq!(p.rx2(Some(&slow)).unwrap().max_payload, 51);
        // Off-grid or unknown modulation: no RX1.
        assert!(RxPlan::new(US915, None)
            .rx1(&up(902_400_000, 10, 125_000))
            .is_none());
        assert!(p.rx1(&up(923_200_000, 6, 125_000)).is_none());
    }

    #[test]
    fn txpk_fields() {
        let w = RxPlan::new(EU868, None).rx2(None).unwrap();
        // tmst wraps around u32 (the concentrator counter does).
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
        assert_eq!(v["ncrc"], true);
        assert_eq!(v["powe"], 27);
        assert_eq!(v["size"], 2);
        let v = serde_json::to_value(txpk(&w, None, &[1])).unwrap();
        assert_eq!(v["imme"], true);
        let w = RxPlan::new(US915, None).rx2(None).unwrap();
        let v = serde_json::to_value(txpk(&w, Some(1), &[1])).unwrap();
        assert_eq!(v["datr"], "SF12BW500");
        assert_eq!(v["freq"], 923.3);
    }

    /// Every kind of PULL_RESP, as bytes on the wire: no member is `null` (the reference
    /// forwarder reads a null number as 0), the preamble is LoRa's 8, and the fields
    /// `lora_pkt_fwd` requires for a LoRa transmission are there with the right types.
    #[test]
    fn pull_resp_bytes_have_no_null_and_an_8_symbol_preamble() {
        use crate::ingress::gwmp;
        let eu = RxPlan::new(EU868, None);
        let up = up(868_300_000, 9, 125_000);
        let join = RxPlan::new(EU868, None);
        let cases = [
            ("class A, RX1", eu.rx1(&up).unwrap(), Some(1_000_000u32)),
            ("class A, RX2", eu.rx2(Some(&up)).unwrap(), Some(2_000_000)),
            ("class C (immediately)", eu.rx2(Some(&up)).unwrap(), None),
            ("JoinAccept, RX1", join.rx1(&up).unwrap(), Some(5_000_000)),
            (
                "US915 RX1, 500 kHz",
                RxPlan::new(US915, None).rx1(&fixtures_us915()).unwrap(),
                Some(1_000_000),
            ),
        ];
        for (what, w, tmst) in cases {
            let bytes = gwmp::pull_resp(2, 0xBEEF, txpk(&w, tmst, &[0x60, 1, 2, 3])).unwrap();
            assert_eq!(&bytes[..4], &[2, 0xBE, 0xEF, gwmp::PULL_RESP], "{what}");
            let text = std::str::from_utf8(&bytes[4..]).unwrap();
            assert!(!text.contains("null"), "{what}: {text}");
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            // The same document as serde's own `{"txpk": ...}` (only the member order may
            // differ: the bytes are written without a `serde_json::Value`).
            let want = serde_json::json!({ "txpk": txpk(&w, tmst, &[0x60, 1, 2, 3]) });
            assert_eq!(v, want, "{what}: {text}");
            let t = &v["txpk"];
            assert_eq!(t["prea"], 8, "{what}: {text}");
            assert_eq!(t["modu"], "LORA", "{what}");
            assert_eq!(t["codr"], "4/5", "{what}");
            assert_eq!(t["ipol"], true, "{what}");
            assert_eq!(t["size"], 4, "{what}");
            assert!(
                t["freq"].is_f64() && t["powe"].is_u64() && t["rfch"].is_u64(),
                "{what}"
            );
            assert!(
                t["datr"].as_str().is_some_and(|d| d.starts_with("SF")),
                "{what}"
            );
            match tmst {
                Some(ts) => {
                    assert_eq!(t["tmst"], ts, "{what}");
                    assert_eq!(t["imme"], false, "{what}");
                }
                None => {
                    assert_eq!(t["imme"], true, "{what}");
                    assert!(t.get("tmst").is_none(), "{what}");
                }
            }
        }
    }

    fn fixtures_us915() -> TxSettings {
        up(904_100_000, 10, 125_000)
    }
}
