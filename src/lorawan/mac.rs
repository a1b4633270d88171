//! MAC commands of LoRaWAN 1.0.x (§5): reading the ones devices send, and the two answers the
//! gateway gives itself (LinkCheckAns, DeviceTimeAns). Everything else is logged and ignored;
//! no ADR changes are made.

use super::frame::MacCmd;

pub const LINK_CHECK: u8 = 0x02;
pub const DEVICE_TIME: u8 = 0x0D;

/// Payload length of each uplink (end-device → network) MAC command of 1.0.x, by CID.
fn uplink_len(cid: u8) -> Option<usize> {
    Some(match cid {
        0x02 => 0, // LinkCheckReq
        0x03 => 1, // LinkADRAns
        0x04 => 0, // DutyCycleAns
        0x05 => 1, // RXParamSetupAns
        0x06 => 2, // DevStatusAns
        0x07 => 1, // NewChannelAns
        0x08 => 0, // RXTimingSetupAns
        0x09 => 0, // TxParamSetupAns
        0x0A => 1, // DlChannelAns
        0x0D => 0, // DeviceTimeReq
        _ => return None,
    })
}

/// Split an uplink's MAC command bytes (FOpts, or an FPort 0 payload). Stops at an unknown CID
/// (its length is unknown, so nothing after it can be read); the rest is returned as `Err`.
pub fn parse_uplink(mut b: &[u8]) -> (Vec<MacCmd>, Option<u8>) {
    let mut out = Vec::new();
    while let Some((&cid, rest)) = b.split_first() {
        let Some(n) = uplink_len(cid) else {
            return (out, Some(cid));
        };
        if rest.len() < n {
            return (out, Some(cid));
        }
        out.push(MacCmd {
            cid,
            payload: rest[..n].to_vec(),
        });
        b = &rest[n..];
    }
    (out, None)
}

/// Required SNR for demodulation per spreading factor (Semtech SX127x/SX1302 datasheets).
fn required_snr(sf: u8) -> f32 {
    match sf {
        7 => -7.5,
        8 => -10.0,
        9 => -12.5,
        10 => -15.0,
        11 => -17.5,
        _ => -20.0,
    }
}

/// LinkCheckAns: margin (dB above the demodulation floor, best reception) and gateway count.
pub fn link_check_ans(best_snr: f32, sf: u8, gateways: usize) -> MacCmd {
    let margin = (best_snr - required_snr(sf)).clamp(0.0, 254.0) as u8;
    MacCmd {
        cid: LINK_CHECK,
        payload: vec![margin, gateways.min(255) as u8],
    }
}

/// Seconds between the Unix and GPS epochs (1980-01-06).
const GPS_EPOCH_UNIX: i64 = 315_964_800;
/// GPS − UTC since 2017-01-01 (no leap second has been added since).
const LEAP_SECONDS: i64 = 18;

/// DeviceTimeAns for a reception at `unix_us`: GPS seconds (u32 LE) and 1/256 s fraction.
pub fn device_time_ans(unix_us: i64) -> MacCmd {
    let gps_us = unix_us - GPS_EPOCH_UNIX * 1_000_000 + LEAP_SECONDS * 1_000_000;
    let secs = (gps_us.div_euclid(1_000_000)) as u32;
    let frac = ((gps_us.rem_euclid(1_000_000) * 256) / 1_000_000) as u8;
    let mut payload = secs.to_le_bytes().to_vec();
    payload.push(frac);
    MacCmd {
        cid: DEVICE_TIME,
        payload,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_and_stops_at_unknown() {
        let (cmds, bad) = parse_uplink(&[0x02, 0x06, 0xFF, 0x10, 0x0D]);
        assert_eq!(cmds.len(), 3);
        assert_eq!(cmds[0].cid, LINK_CHECK);
        assert_eq!(cmds[1].payload, vec![0xFF, 0x10]);
        assert_eq!(cmds[2].cid, DEVICE_TIME);
        assert_eq!(bad, None);
        let (cmds, bad) = parse_uplink(&[0x0D, 0x80, 0x02]);
        assert_eq!(cmds.len(), 1);
        assert_eq!(bad, Some(0x80));
        let (cmds, bad) = parse_uplink(&[0x06, 0x01]);
        assert!(cmds.is_empty());
        assert_eq!(bad, Some(0x06), "truncated payload");
    }

    #[test]
    fn answers() {
        assert_eq!(link_check_ans(5.0, 7, 2).payload, vec![12, 2]);
        assert_eq!(link_check_ans(-30.0, 12, 1).payload, vec![0, 1]);
        // 2026-01-01T00:00:00.5Z = Unix 1767225600.5 → GPS 1451260818.5
        let a = device_time_ans(1_767_225_600_500_000);
        assert_eq!(&a.payload[..4], &1_451_260_818u32.to_le_bytes());
        assert_eq!(a.payload[4], 128);
    }
}
