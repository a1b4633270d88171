//! MAC commands of LoRaWAN 1.0.x (LoRaWAN 1.0.4 §5 "MAC Commands"; 1.0.2 and 1.0.3 define the
//! same commands and layouts), in both directions and on both sides:
//!
//! - network → device ([`DownlinkMac`]): LinkCheckAns, LinkADRReq, DutyCycleReq,
//!   RXParamSetupReq, DevStatusReq, NewChannelReq, RXTimingSetupReq, TxParamSetupReq,
//!   DlChannelReq, DeviceTimeAns — encoded by the network, decoded by (simulated) devices;
//! - device → network ([`UplinkMac`]): LinkCheckReq, LinkADRAns, DutyCycleAns,
//!   RXParamSetupAns, DevStatusAns, NewChannelAns, RXTimingSetupAns, TxParamSetupAns,
//!   DlChannelAns, DeviceTimeReq — parsed by the network, encoded by (simulated) devices.
//!
//! Byte order is the specification's: multi-byte fields little-endian, frequencies 24 bits in
//! 100 Hz units (§5.6), bit fields as drawn in §5 (e.g. LinkADRReq DataRate_TXPower =
//! DR << 4 | TXPower, Redundancy = ChMaskCntl << 4 | NbTrans). Parsing never panics: a command
//! cut short or an unknown CID ends the parse with a typed [`MacError`] and the commands read
//! before it (an unknown CID's length is unknown, so nothing after it can be read, §5).
//! Commands of LoRaWAN 1.1 and class B (ResetInd, RekeyInd, PingSlot*, BeaconFreq*, ...) are
//! unknown here, as they are to a 1.0.x network.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Largest FOpts field: MAC commands beyond 15 bytes go in an FPort 0 payload (§4.3.1.6).
pub const FOPTS_MAX_LEN: usize = 15;

/// Command identifiers (LoRaWAN 1.0.4 §5, Table "MAC commands"); the request and its answer
/// share the CID.
pub mod cid {
    pub const LINK_CHECK: u8 = 0x02;
    pub const LINK_ADR: u8 = 0x03;
    pub const DUTY_CYCLE: u8 = 0x04;
    pub const RX_PARAM_SETUP: u8 = 0x05;
    pub const DEV_STATUS: u8 = 0x06;
    pub const NEW_CHANNEL: u8 = 0x07;
    pub const RX_TIMING_SETUP: u8 = 0x08;
    pub const TX_PARAM_SETUP: u8 = 0x09;
    pub const DL_CHANNEL: u8 = 0x0A;
    pub const DEVICE_TIME: u8 = 0x0D;
}

/// LinkCheck CID (kept for lorastream's existing callers).
pub const LINK_CHECK: u8 = cid::LINK_CHECK;
/// DeviceTime CID (kept for lorastream's existing callers).
pub const DEVICE_TIME: u8 = cid::DEVICE_TIME;

/// One MAC command: CID and payload (a copy of lorastream's `lorawan::frame::MacCmd`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacCmd {
    pub cid: u8,
    pub payload: Vec<u8>,
}

impl MacCmd {
    /// Bytes on the air: CID + payload.
    pub fn encoded_len(&self) -> usize {
        1 + self.payload.len()
    }

    /// CID followed by the payload.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.encoded_len());
        v.push(self.cid);
        v.extend_from_slice(&self.payload);
        v
    }
}

/// Which side sent the commands: the payload length of a CID depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Device → network (answers and device requests).
    Uplink,
    /// Network → device (requests and network answers).
    Downlink,
}

/// Errors of MAC command encoding and parsing.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MacError {
    #[error(
        "unknown MAC command CID 0x{cid:02X} at byte {at}: its length is unknown, so nothing \
         after it can be read"
    )]
    UnknownCid { cid: u8, at: usize },
    #[error("MAC command 0x{cid:02X} at byte {at} needs {need} payload bytes, {have} left")]
    Truncated {
        cid: u8,
        at: usize,
        need: usize,
        have: usize,
    },
    #[error("MAC command 0x{cid:02X} has a {have}-byte payload, expected {need}")]
    BadLength { cid: u8, need: usize, have: usize },
    #[error("{field} = {value} is outside {min}..={max}")]
    OutOfRange {
        field: &'static str,
        value: i64,
        min: i64,
        max: i64,
    },
    #[error("frequency {0} Hz cannot be sent: not a multiple of 100 Hz, or above 1677.7215 MHz")]
    BadFrequency(u32),
}

/// Commands read from a FOpts field or an FPort 0 payload, and what stopped the parse.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed<T> {
    pub commands: Vec<T>,
    /// `None` when every byte was read.
    pub error: Option<MacError>,
}

/// Payload length of each device → network command of 1.0.x, by CID (§5).
pub fn uplink_len(cid: u8) -> Option<usize> {
    Some(match cid {
        cid::LINK_CHECK => 0,      // LinkCheckReq
        cid::LINK_ADR => 1,        // LinkADRAns: Status
        cid::DUTY_CYCLE => 0,      // DutyCycleAns
        cid::RX_PARAM_SETUP => 1,  // RXParamSetupAns: Status
        cid::DEV_STATUS => 2,      // DevStatusAns: Battery, Margin
        cid::NEW_CHANNEL => 1,     // NewChannelAns: Status
        cid::RX_TIMING_SETUP => 0, // RXTimingSetupAns
        cid::TX_PARAM_SETUP => 0,  // TxParamSetupAns
        cid::DL_CHANNEL => 1,      // DlChannelAns: Status
        cid::DEVICE_TIME => 0,     // DeviceTimeReq
        _ => return None,
    })
}

/// Payload length of each network → device command of 1.0.x, by CID (§5).
pub fn downlink_len(cid: u8) -> Option<usize> {
    Some(match cid {
        cid::LINK_CHECK => 2,      // LinkCheckAns: Margin, GwCnt
        cid::LINK_ADR => 4,        // LinkADRReq: DataRate_TXPower, ChMask (2), Redundancy
        cid::DUTY_CYCLE => 1,      // DutyCycleReq: DutyCyclePL
        cid::RX_PARAM_SETUP => 4,  // RXParamSetupReq: DLsettings, Frequency (3)
        cid::DEV_STATUS => 0,      // DevStatusReq
        cid::NEW_CHANNEL => 5,     // NewChannelReq: ChIndex, Freq (3), DrRange
        cid::RX_TIMING_SETUP => 1, // RXTimingSetupReq: Settings
        cid::TX_PARAM_SETUP => 1,  // TxParamSetupReq: EIRP_DwellTime
        cid::DL_CHANNEL => 4,      // DlChannelReq: ChIndex, Freq (3)
        cid::DEVICE_TIME => 5,     // DeviceTimeAns: seconds (4), fractional second
        _ => return None,
    })
}

/// Split MAC command bytes into commands by the CID lengths of `dir`. Stops at an unknown CID
/// or a command cut short; the commands before it are returned.
pub fn split(bytes: &[u8], dir: Direction) -> Parsed<MacCmd> {
    let len_of = match dir {
        Direction::Uplink => uplink_len,
        Direction::Downlink => downlink_len,
    };
    let mut commands = Vec::new();
    let mut at = 0;
    while let Some((&cid, rest)) = bytes.get(at..).and_then(<[u8]>::split_first) {
        let Some(need) = len_of(cid) else {
            let error = Some(MacError::UnknownCid { cid, at });
            return Parsed { commands, error };
        };
        let Some(payload) = rest.get(..need) else {
            let have = rest.len();
            let error = Some(MacError::Truncated {
                cid,
                at,
                need,
                have,
            });
            return Parsed { commands, error };
        };
        commands.push(MacCmd {
            cid,
            payload: payload.to_vec(),
        });
        at += 1 + need;
    }
    Parsed {
        commands,
        error: None,
    }
}

fn typed<T>(bytes: &[u8], dir: Direction, f: fn(&MacCmd) -> Result<T, MacError>) -> Parsed<T> {
    let raw = split(bytes, dir);
    let mut commands = Vec::with_capacity(raw.commands.len());
    for c in &raw.commands {
        match f(c) {
            Ok(t) => commands.push(t),
            Err(e) => {
                return Parsed {
                    commands,
                    error: Some(e),
                }
            }
        }
    }
    Parsed {
        commands,
        error: raw.error,
    }
}

/// Parse the MAC commands of an uplink (FOpts, or the decrypted FRMPayload of FPort 0).
pub fn parse_uplink(bytes: &[u8]) -> Parsed<UplinkMac> {
    typed(bytes, Direction::Uplink, UplinkMac::from_cmd)
}

/// Parse the MAC commands of a downlink (device side: simulated devices and tests).
pub fn parse_downlink(bytes: &[u8]) -> Parsed<DownlinkMac> {
    typed(bytes, Direction::Downlink, DownlinkMac::from_cmd)
}

/// The bytes of network → device commands, in order.
pub fn encode_downlink(cmds: &[DownlinkMac]) -> Result<Vec<u8>, MacError> {
    let mut out = Vec::new();
    for c in cmds {
        out.extend_from_slice(&c.encode()?.to_bytes());
    }
    Ok(out)
}

/// The bytes of device → network commands, in order (simulated devices and tests).
pub fn encode_uplink(cmds: &[UplinkMac]) -> Result<Vec<u8>, MacError> {
    let mut out = Vec::new();
    for c in cmds {
        out.extend_from_slice(&c.encode()?.to_bytes());
    }
    Ok(out)
}

/// How many of `cmds`, from the front, fit in `max_len` bytes (FOpts: [`FOPTS_MAX_LEN`]).
/// A contiguous run of LinkADRReq is one command block for the device (§5.3): it is taken
/// whole or not at all, so the answer never ends inside such a run.
pub fn fit(cmds: &[DownlinkMac], max_len: usize) -> usize {
    let mut used = 0;
    let mut i = 0;
    while i < cmds.len() {
        let run = if matches!(cmds[i], DownlinkMac::LinkAdrReq(_)) {
            cmds[i..]
                .iter()
                .take_while(|c| matches!(c, DownlinkMac::LinkAdrReq(_)))
                .count()
        } else {
            1
        };
        let len: usize = cmds[i..i + run].iter().map(DownlinkMac::encoded_len).sum();
        if used + len > max_len {
            break;
        }
        used += len;
        i += run;
    }
    i
}

fn check(field: &'static str, value: u8, max: u8) -> Result<u8, MacError> {
    if value > max {
        return Err(MacError::OutOfRange {
            field,
            value: i64::from(value),
            min: 0,
            max: i64::from(max),
        });
    }
    Ok(value)
}

/// A frequency as MAC commands carry it: 24 bits LE in 100 Hz units (§5.6 NewChannelReq).
fn freq_bytes(freq_hz: u32) -> Result<[u8; 3], MacError> {
    let units = freq_hz / 100;
    if freq_hz % 100 != 0 || units >= 1 << 24 {
        return Err(MacError::BadFrequency(freq_hz));
    }
    let b = units.to_le_bytes();
    Ok([b[0], b[1], b[2]])
}

fn freq_from(b: &[u8]) -> u32 {
    let g = |i: usize| u32::from(b.get(i).copied().unwrap_or(0));
    (g(0) | g(1) << 8 | g(2) << 16) * 100
}

fn expect_len(c: &MacCmd, need: usize) -> Result<&[u8], MacError> {
    if c.payload.len() != need {
        return Err(MacError::BadLength {
            cid: c.cid,
            need,
            have: c.payload.len(),
        });
    }
    Ok(&c.payload)
}

fn bit(b: u8, n: u8) -> bool {
    b & (1 << n) != 0
}

fn bits(flags: &[bool]) -> u8 {
    flags
        .iter()
        .enumerate()
        .fold(0, |acc, (i, &f)| acc | (u8::from(f) << i))
}

/// LinkCheckAns (§5.2): demodulation margin (dB above the demodulation floor of the best
/// reception) and number of gateways that received the LinkCheckReq.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkCheckAns {
    pub margin: u8,
    pub gw_cnt: u8,
}

impl LinkCheckAns {
    /// From the best reception's SNR and spreading factor (margin over the SF's required SNR,
    /// clamped to 0..=254, 255 being reserved) and the number of gateways.
    pub fn from_reception(best_snr: f32, sf: u8, gateways: usize) -> Self {
        let margin = (best_snr - super::region::required_snr_db(sf)).clamp(0.0, 254.0) as u8;
        LinkCheckAns {
            margin,
            gw_cnt: gateways.min(255) as u8,
        }
    }
}

/// LinkADRReq (§5.3): data rate, TXPower index, channel mask block and NbTrans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkAdrReq {
    pub dr: u8,
    pub tx_power: u8,
    /// Bit n = channel n of the block selected by `ch_mask_cntl`.
    pub ch_mask: u16,
    pub ch_mask_cntl: u8,
    /// Transmissions of each uplink (1..15; 0 means "keep 1" for the device).
    pub nb_trans: u8,
}

/// RXParamSetupReq (§5.4): RX1DROffset, RX2 data rate and RX2 frequency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RxParamSetupReq {
    pub rx1_dr_offset: u8,
    pub rx2_dr: u8,
    pub freq_hz: u32,
}

/// NewChannelReq (§5.6): create, modify (or with frequency 0 disable) channel `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewChannelReq {
    pub index: u8,
    pub freq_hz: u32,
    pub min_dr: u8,
    pub max_dr: u8,
}

/// TxParamSetupReq (§5.8, AS923 and AU915 per RP002): dwell time limits and MaxEIRP index
/// (see [`MAX_EIRP_DBM`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxParamSetupReq {
    pub downlink_dwell: bool,
    pub uplink_dwell: bool,
    pub max_eirp: u8,
}

/// DlChannelReq (§5.7): the RX1 frequency of uplink channel `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DlChannelReq {
    pub index: u8,
    pub freq_hz: u32,
}

/// DeviceTimeAns (§5.9): GPS-epoch seconds and the fractional second in 1/256 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceTimeAns {
    pub gps_seconds: u32,
    pub fraction: u8,
}

/// Seconds between the Unix and GPS epochs (1980-01-06).
const GPS_EPOCH_UNIX: i64 = 315_964_800;
/// GPS − UTC since 2017-01-01 (no leap second has been added since).
const LEAP_SECONDS: i64 = 18;

impl DeviceTimeAns {
    /// For a reception at `unix_us` (µs since the Unix epoch, UTC).
    pub fn from_unix_us(unix_us: i64) -> Self {
        let gps_us = unix_us - GPS_EPOCH_UNIX * 1_000_000 + LEAP_SECONDS * 1_000_000;
        DeviceTimeAns {
            gps_seconds: gps_us.div_euclid(1_000_000) as u32,
            fraction: ((gps_us.rem_euclid(1_000_000) * 256) / 1_000_000) as u8,
        }
    }
}

/// TxParamSetupReq MaxEIRP encoding (§5.8): index → dBm.
pub const MAX_EIRP_DBM: [u8; 16] = [
    8, 10, 12, 13, 14, 16, 18, 20, 21, 24, 26, 27, 29, 30, 33, 36,
];

/// The MaxEIRP index for a limit in dBm: the largest table value not above it (0 below 8 dBm).
pub fn max_eirp_index(dbm: u8) -> u8 {
    MAX_EIRP_DBM.iter().rposition(|&v| v <= dbm).unwrap_or(0) as u8
}

/// A network → device MAC command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DownlinkMac {
    LinkCheckAns(LinkCheckAns),
    LinkAdrReq(LinkAdrReq),
    /// MaxDCycle 0..15: aggregated duty cycle 1/2^MaxDCycle (§5.4 DutyCycleReq).
    DutyCycleReq {
        max_duty_cycle: u8,
    },
    RxParamSetupReq(RxParamSetupReq),
    DevStatusReq,
    NewChannelReq(NewChannelReq),
    /// Del 0..15: RX1 delay in seconds, 0 meaning 1 (§5.7 RXTimingSetupReq).
    RxTimingSetupReq {
        delay: u8,
    },
    TxParamSetupReq(TxParamSetupReq),
    DlChannelReq(DlChannelReq),
    DeviceTimeAns(DeviceTimeAns),
}

impl DownlinkMac {
    pub fn cid(&self) -> u8 {
        match self {
            DownlinkMac::LinkCheckAns(_) => cid::LINK_CHECK,
            DownlinkMac::LinkAdrReq(_) => cid::LINK_ADR,
            DownlinkMac::DutyCycleReq { .. } => cid::DUTY_CYCLE,
            DownlinkMac::RxParamSetupReq(_) => cid::RX_PARAM_SETUP,
            DownlinkMac::DevStatusReq => cid::DEV_STATUS,
            DownlinkMac::NewChannelReq(_) => cid::NEW_CHANNEL,
            DownlinkMac::RxTimingSetupReq { .. } => cid::RX_TIMING_SETUP,
            DownlinkMac::TxParamSetupReq(_) => cid::TX_PARAM_SETUP,
            DownlinkMac::DlChannelReq(_) => cid::DL_CHANNEL,
            DownlinkMac::DeviceTimeAns(_) => cid::DEVICE_TIME,
        }
    }

    /// Bytes on the air: CID + payload.
    pub fn encoded_len(&self) -> usize {
        1 + downlink_len(self.cid()).unwrap_or(0)
    }

    /// The command's bytes; fields that do not fit their bits are refused.
    pub fn encode(&self) -> Result<MacCmd, MacError> {
        let payload = match *self {
            DownlinkMac::LinkCheckAns(a) => vec![a.margin, a.gw_cnt],
            // DataRate_TXPower = DR(7:4) | TXPower(3:0); ChMask u16 LE;
            // Redundancy = RFU(7) | ChMaskCntl(6:4) | NbTrans(3:0).
            DownlinkMac::LinkAdrReq(r) => {
                let dr = check("DataRate", r.dr, 15)?;
                let p = check("TXPower", r.tx_power, 15)?;
                let cntl = check("ChMaskCntl", r.ch_mask_cntl, 7)?;
                let nb = check("NbTrans", r.nb_trans, 15)?;
                let [m0, m1] = r.ch_mask.to_le_bytes();
                vec![dr << 4 | p, m0, m1, cntl << 4 | nb]
            }
            // DutyCyclePL = RFU(7:4) | MaxDCycle(3:0).
            DownlinkMac::DutyCycleReq { max_duty_cycle } => {
                vec![check("MaxDCycle", max_duty_cycle, 15)?]
            }
            // DLsettings = RFU(7) | RX1DRoffset(6:4) | RX2DataRate(3:0); Frequency 24 bits.
            DownlinkMac::RxParamSetupReq(r) => {
                let off = check("RX1DRoffset", r.rx1_dr_offset, 7)?;
                let dr = check("RX2DataRate", r.rx2_dr, 15)?;
                let mut v = vec![off << 4 | dr];
                v.extend_from_slice(&freq_bytes(r.freq_hz)?);
                v
            }
            DownlinkMac::DevStatusReq => vec![],
            // ChIndex; Freq 24 bits; DrRange = MaxDR(7:4) | MinDR(3:0).
            DownlinkMac::NewChannelReq(r) => {
                let min = check("MinDR", r.min_dr, 15)?;
                let max = check("MaxDR", r.max_dr, 15)?;
                let mut v = vec![r.index];
                v.extend_from_slice(&freq_bytes(r.freq_hz)?);
                v.push(max << 4 | min);
                v
            }
            // Settings = RFU(7:4) | Del(3:0).
            DownlinkMac::RxTimingSetupReq { delay } => vec![check("Del", delay, 15)?],
            // EIRP_DwellTime = RFU(7:6) | DownlinkDwellTime(5) | UplinkDwellTime(4) |
            // MaxEIRP(3:0).
            DownlinkMac::TxParamSetupReq(r) => {
                let eirp = check("MaxEIRP", r.max_eirp, 15)?;
                vec![u8::from(r.downlink_dwell) << 5 | u8::from(r.uplink_dwell) << 4 | eirp]
            }
            // ChIndex; Freq 24 bits.
            DownlinkMac::DlChannelReq(r) => {
                let mut v = vec![r.index];
                v.extend_from_slice(&freq_bytes(r.freq_hz)?);
                v
            }
            // Seconds since the GPS epoch u32 LE; fractional second in 1/256 s.
            DownlinkMac::DeviceTimeAns(a) => {
                let mut v = a.gps_seconds.to_le_bytes().to_vec();
                v.push(a.fraction);
                v
            }
        };
        Ok(MacCmd {
            cid: self.cid(),
            payload,
        })
    }

    /// Read one network → device command (RFU bits are ignored).
    pub fn from_cmd(c: &MacCmd) -> Result<Self, MacError> {
        let need = downlink_len(c.cid).ok_or(MacError::UnknownCid { cid: c.cid, at: 0 })?;
        let p = expect_len(c, need)?;
        Ok(match (c.cid, p) {
            (cid::LINK_CHECK, &[margin, gw_cnt]) => {
                DownlinkMac::LinkCheckAns(LinkCheckAns { margin, gw_cnt })
            }
            (cid::LINK_ADR, &[drp, m0, m1, red]) => DownlinkMac::LinkAdrReq(LinkAdrReq {
                dr: drp >> 4,
                tx_power: drp & 0x0F,
                ch_mask: u16::from_le_bytes([m0, m1]),
                ch_mask_cntl: (red >> 4) & 0x07,
                nb_trans: red & 0x0F,
            }),
            (cid::DUTY_CYCLE, &[d]) => DownlinkMac::DutyCycleReq {
                max_duty_cycle: d & 0x0F,
            },
            (cid::RX_PARAM_SETUP, &[dl, ..]) => DownlinkMac::RxParamSetupReq(RxParamSetupReq {
                rx1_dr_offset: (dl >> 4) & 0x07,
                rx2_dr: dl & 0x0F,
                freq_hz: freq_from(&p[1..]),
            }),
            (cid::DEV_STATUS, _) => DownlinkMac::DevStatusReq,
            (cid::NEW_CHANNEL, &[index, _, _, _, range]) => {
                DownlinkMac::NewChannelReq(NewChannelReq {
                    index,
                    freq_hz: freq_from(&p[1..4]),
                    min_dr: range & 0x0F,
                    max_dr: range >> 4,
                })
            }
            (cid::RX_TIMING_SETUP, &[s]) => DownlinkMac::RxTimingSetupReq { delay: s & 0x0F },
            (cid::TX_PARAM_SETUP, &[e]) => DownlinkMac::TxParamSetupReq(TxParamSetupReq {
                downlink_dwell: bit(e, 5),
                uplink_dwell: bit(e, 4),
                max_eirp: e & 0x0F,
            }),
            (cid::DL_CHANNEL, &[index, ..]) => DownlinkMac::DlChannelReq(DlChannelReq {
                index,
                freq_hz: freq_from(&p[1..]),
            }),
            (cid::DEVICE_TIME, &[s0, s1, s2, s3, fraction]) => {
                DownlinkMac::DeviceTimeAns(DeviceTimeAns {
                    gps_seconds: u32::from_le_bytes([s0, s1, s2, s3]),
                    fraction,
                })
            }
            // Unreachable: the length was checked against the same table.
            _ => {
                return Err(MacError::BadLength {
                    cid: c.cid,
                    need,
                    have: p.len(),
                })
            }
        })
    }
}

/// LinkADRAns status (§5.3): all three ACKs set means the whole LinkADRReq block was applied;
/// with any of them clear the device applied nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkAdrAns {
    pub power_ack: bool,
    pub dr_ack: bool,
    pub ch_mask_ack: bool,
}

impl LinkAdrAns {
    pub fn all_ack(&self) -> bool {
        self.power_ack && self.dr_ack && self.ch_mask_ack
    }
}

/// RXParamSetupAns status (§5.4); the device applied the request only if all are set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RxParamSetupAns {
    pub rx1_dr_offset_ack: bool,
    pub rx2_dr_ack: bool,
    pub channel_ack: bool,
}

impl RxParamSetupAns {
    pub fn all_ack(&self) -> bool {
        self.rx1_dr_offset_ack && self.rx2_dr_ack && self.channel_ack
    }
}

/// DevStatusAns (§5.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevStatusAns {
    /// 0 = external power source, 1 (minimum) ..= 254 (full), 255 = unable to measure.
    pub battery: u8,
    /// SNR (dB, rounded) of the last successfully received DevStatusReq, signed 6 bits:
    /// −32..=31.
    pub margin: i8,
}

impl DevStatusAns {
    /// Powered by an external source (Battery = 0).
    pub fn external_power(&self) -> bool {
        self.battery == 0
    }

    /// Battery level 0..=100 %, linear from 1 (0 %) to 254 (100 %) — the scale of The Things
    /// Stack's `battery_percentage`, (battery − 1) / 253. `None` on external power (0) and when
    /// the device cannot measure (255).
    pub fn battery_percentage(&self) -> Option<f32> {
        match self.battery {
            0 | 255 => None,
            b => Some(f32::from(b - 1) / 253.0 * 100.0),
        }
    }
}

/// NewChannelAns status (§5.6); the channel was created only if both are set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewChannelAns {
    pub dr_range_ok: bool,
    pub channel_freq_ok: bool,
}

/// DlChannelAns status (§5.7); applied only if both are set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DlChannelAns {
    pub uplink_freq_exists: bool,
    pub channel_freq_ok: bool,
}

/// A device → network MAC command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UplinkMac {
    LinkCheckReq,
    LinkAdrAns(LinkAdrAns),
    DutyCycleAns,
    RxParamSetupAns(RxParamSetupAns),
    DevStatusAns(DevStatusAns),
    NewChannelAns(NewChannelAns),
    RxTimingSetupAns,
    TxParamSetupAns,
    DlChannelAns(DlChannelAns),
    DeviceTimeReq,
}

impl UplinkMac {
    pub fn cid(&self) -> u8 {
        match self {
            UplinkMac::LinkCheckReq => cid::LINK_CHECK,
            UplinkMac::LinkAdrAns(_) => cid::LINK_ADR,
            UplinkMac::DutyCycleAns => cid::DUTY_CYCLE,
            UplinkMac::RxParamSetupAns(_) => cid::RX_PARAM_SETUP,
            UplinkMac::DevStatusAns(_) => cid::DEV_STATUS,
            UplinkMac::NewChannelAns(_) => cid::NEW_CHANNEL,
            UplinkMac::RxTimingSetupAns => cid::RX_TIMING_SETUP,
            UplinkMac::TxParamSetupAns => cid::TX_PARAM_SETUP,
            UplinkMac::DlChannelAns(_) => cid::DL_CHANNEL,
            UplinkMac::DeviceTimeReq => cid::DEVICE_TIME,
        }
    }

    /// Read one device → network command (RFU bits are ignored).
    pub fn from_cmd(c: &MacCmd) -> Result<Self, MacError> {
        let need = uplink_len(c.cid).ok_or(MacError::UnknownCid { cid: c.cid, at: 0 })?;
        let p = expect_len(c, need)?;
        Ok(match (c.cid, p) {
            (cid::LINK_CHECK, _) => UplinkMac::LinkCheckReq,
            // Status = RFU(7:3) | PowerACK(2) | DataRateACK(1) | ChannelMaskACK(0).
            (cid::LINK_ADR, &[s]) => UplinkMac::LinkAdrAns(LinkAdrAns {
                power_ack: bit(s, 2),
                dr_ack: bit(s, 1),
                ch_mask_ack: bit(s, 0),
            }),
            (cid::DUTY_CYCLE, _) => UplinkMac::DutyCycleAns,
            // Status = RFU(7:3) | RX1DRoffsetACK(2) | RX2DataRateACK(1) | ChannelACK(0).
            (cid::RX_PARAM_SETUP, &[s]) => UplinkMac::RxParamSetupAns(RxParamSetupAns {
                rx1_dr_offset_ack: bit(s, 2),
                rx2_dr_ack: bit(s, 1),
                channel_ack: bit(s, 0),
            }),
            // Battery; Margin = RFU(7:6) | Margin(5:0), a signed 6-bit integer.
            (cid::DEV_STATUS, &[battery, m]) => {
                let raw = (m & 0x3F) as i8;
                let margin = if raw >= 32 { raw - 64 } else { raw };
                UplinkMac::DevStatusAns(DevStatusAns { battery, margin })
            }
            // Status = RFU(7:2) | DataRateRangeOK(1) | ChannelFrequencyOK(0).
            (cid::NEW_CHANNEL, &[s]) => UplinkMac::NewChannelAns(NewChannelAns {
                dr_range_ok: bit(s, 1),
                channel_freq_ok: bit(s, 0),
            }),
            (cid::RX_TIMING_SETUP, _) => UplinkMac::RxTimingSetupAns,
            (cid::TX_PARAM_SETUP, _) => UplinkMac::TxParamSetupAns,
            // Status = RFU(7:2) | UplinkFrequencyExists(1) | ChannelFrequencyOK(0).
            (cid::DL_CHANNEL, &[s]) => UplinkMac::DlChannelAns(DlChannelAns {
                uplink_freq_exists: bit(s, 1),
                channel_freq_ok: bit(s, 0),
            }),
            (cid::DEVICE_TIME, _) => UplinkMac::DeviceTimeReq,
            // Unreachable: the length was checked against the same table.
            _ => {
                return Err(MacError::BadLength {
                    cid: c.cid,
                    need,
                    have: p.len(),
                })
            }
        })
    }

    /// The command's bytes (device side).
    pub fn encode(&self) -> Result<MacCmd, MacError> {
        let payload = match *self {
            UplinkMac::LinkCheckReq
            | UplinkMac::DutyCycleAns
            | UplinkMac::RxTimingSetupAns
            | UplinkMac::TxParamSetupAns
            | UplinkMac::DeviceTimeReq => vec![],
            UplinkMac::LinkAdrAns(a) => vec![bits(&[a.ch_mask_ack, a.dr_ack, a.power_ack])],
            UplinkMac::RxParamSetupAns(a) => {
                vec![bits(&[a.channel_ack, a.rx2_dr_ack, a.rx1_dr_offset_ack])]
            }
            UplinkMac::DevStatusAns(a) => {
                if !(-32..=31).contains(&a.margin) {
                    return Err(MacError::OutOfRange {
                        field: "Margin",
                        value: i64::from(a.margin),
                        min: -32,
                        max: 31,
                    });
                }
                vec![a.battery, (a.margin as u8) & 0x3F]
            }
            UplinkMac::NewChannelAns(a) => vec![bits(&[a.channel_freq_ok, a.dr_range_ok])],
            UplinkMac::DlChannelAns(a) => vec![bits(&[a.channel_freq_ok, a.uplink_freq_exists])],
        };
        Ok(MacCmd {
            cid: self.cid(),
            payload,
        })
    }
}

/// Split an uplink's MAC command bytes (lorastream's existing interface): the commands, and
/// the CID that stopped the parse (unknown, or cut short).
pub fn parse_uplink_raw(b: &[u8]) -> (Vec<MacCmd>, Option<u8>) {
    let p = split(b, Direction::Uplink);
    // `split` stops only at an unknown CID or a command cut short.
    let stopped = p.error.and_then(|e| match e {
        MacError::UnknownCid { cid, .. } | MacError::Truncated { cid, .. } => Some(cid),
        _ => None,
    });
    (p.commands, stopped)
}

/// LinkCheckAns: margin (dB above the demodulation floor, best reception) and gateway count.
pub fn link_check_ans(best_snr: f32, sf: u8, gateways: usize) -> MacCmd {
    let a = LinkCheckAns::from_reception(best_snr, sf, gateways);
    MacCmd {
        cid: LINK_CHECK,
        payload: vec![a.margin, a.gw_cnt],
    }
}

/// DeviceTimeAns for a reception at `unix_us`: GPS seconds (u32 LE) and 1/256 s fraction.
pub fn device_time_ans(unix_us: i64) -> MacCmd {
    let a = DeviceTimeAns::from_unix_us(unix_us);
    let mut payload = a.gps_seconds.to_le_bytes().to_vec();
    payload.push(a.fraction);
    MacCmd {
        cid: DEVICE_TIME,
        payload,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down(bytes: &[u8]) -> Vec<DownlinkMac> {
        let p = parse_downlink(bytes);
        assert_eq!(p.error, None, "{bytes:02X?}");
        p.commands
    }

    fn up(bytes: &[u8]) -> Vec<UplinkMac> {
        let p = parse_uplink(bytes);
        assert_eq!(p.error, None, "{bytes:02X?}");
        p.commands
    }

    /// Encode `cmd`, expect `bytes`, and decode `bytes` back to `cmd`.
    fn both_ways_down(cmd: DownlinkMac, bytes: &[u8]) {
        assert_eq!(encode_downlink(&[cmd]).unwrap(), bytes, "{cmd:?}");
        assert_eq!(down(bytes), vec![cmd]);
        assert_eq!(cmd.encoded_len(), bytes.len());
    }

    fn both_ways_up(cmd: UplinkMac, bytes: &[u8]) {
        assert_eq!(encode_uplink(&[cmd]).unwrap(), bytes, "{cmd:?}");
        assert_eq!(up(bytes), vec![cmd]);
    }

    /// Network → device commands against bytes worked out from LoRaWAN 1.0.4 §5.
    #[test]
    fn downlink_layouts_from_the_spec() {
        // LinkADRReq DR5 (0101), TXPower 1 (0001) → 0x51; channels 0..2 → ChMask 0x0007 LE
        // = 07 00; ChMaskCntl 0, NbTrans 1 → 0x01.
        both_ways_down(
            DownlinkMac::LinkAdrReq(LinkAdrReq {
                dr: 5,
                tx_power: 1,
                ch_mask: 0x0007,
                ch_mask_cntl: 0,
                nb_trans: 1,
            }),
            &[0x03, 0x51, 0x07, 0x00, 0x01],
        );
        // US915 sub-band 2 block: ChMaskCntl 7 with channel 65 (bit 1) → 02 00, 0x70 | NbTrans 0;
        // then ChMaskCntl 0, channels 8..15 → 00 FF, DR3 TXPower 2 NbTrans 2 → 0x32, 0x02.
        assert_eq!(
            encode_downlink(&[
                DownlinkMac::LinkAdrReq(LinkAdrReq {
                    dr: 3,
                    tx_power: 2,
                    ch_mask: 0x0002,
                    ch_mask_cntl: 7,
                    nb_trans: 0,
                }),
                DownlinkMac::LinkAdrReq(LinkAdrReq {
                    dr: 3,
                    tx_power: 2,
                    ch_mask: 0xFF00,
                    ch_mask_cntl: 0,
                    nb_trans: 2,
                }),
            ])
            .unwrap(),
            [0x03, 0x32, 0x02, 0x00, 0x70, 0x03, 0x32, 0x00, 0xFF, 0x02]
        );
        // DutyCycleReq MaxDCycle 7 (1/128).
        both_ways_down(
            DownlinkMac::DutyCycleReq { max_duty_cycle: 7 },
            &[0x04, 0x07],
        );
        // RXParamSetupReq RX1DROffset 1, RX2 DR3 → 0x13; 869.525 MHz = 8695250 × 100 Hz
        // = 0x84ADD2 → D2 AD 84.
        both_ways_down(
            DownlinkMac::RxParamSetupReq(RxParamSetupReq {
                rx1_dr_offset: 1,
                rx2_dr: 3,
                freq_hz: 869_525_000,
            }),
            &[0x05, 0x13, 0xD2, 0xAD, 0x84],
        );
        both_ways_down(DownlinkMac::DevStatusReq, &[0x06]);
        // NewChannelReq channel 3 at 867.1 MHz (8671000 = 0x844F18 → 18 4F 84), DR0..5 → 0x50.
        both_ways_down(
            DownlinkMac::NewChannelReq(NewChannelReq {
                index: 3,
                freq_hz: 867_100_000,
                min_dr: 0,
                max_dr: 5,
            }),
            &[0x07, 0x03, 0x18, 0x4F, 0x84, 0x50],
        );
        // RXTimingSetupReq 5 s.
        both_ways_down(DownlinkMac::RxTimingSetupReq { delay: 5 }, &[0x08, 0x05]);
        // TxParamSetupReq both dwell times on (bits 5, 4), MaxEIRP index 5 (16 dBm) → 0x35.
        both_ways_down(
            DownlinkMac::TxParamSetupReq(TxParamSetupReq {
                downlink_dwell: true,
                uplink_dwell: true,
                max_eirp: 5,
            }),
            &[0x09, 0x35],
        );
        // DlChannelReq channel 2 → 923.4 MHz (9234000 = 0x8CE650 → 50 E6 8C).
        both_ways_down(
            DownlinkMac::DlChannelReq(DlChannelReq {
                index: 2,
                freq_hz: 923_400_000,
            }),
            &[0x0A, 0x02, 0x50, 0xE6, 0x8C],
        );
        // DeviceTimeAns 1451260818 s (0x5680_7B92 → 92 7B 80 56) + 128/256.
        both_ways_down(
            DownlinkMac::DeviceTimeAns(DeviceTimeAns {
                gps_seconds: 1_451_260_818,
                fraction: 128,
            }),
            &[0x0D, 0x92, 0x7B, 0x80, 0x56, 0x80],
        );
        // LinkCheckAns margin 20 dB, 3 gateways.
        both_ways_down(
            DownlinkMac::LinkCheckAns(LinkCheckAns {
                margin: 20,
                gw_cnt: 3,
            }),
            &[0x02, 0x14, 0x03],
        );
    }

    /// Vectors of ChirpStack's `lrwn/src/maccommand.rs` test `test_maccommand_set`.
    #[test]
    fn chirpstack_vectors() {
        both_ways_down(
            DownlinkMac::LinkCheckAns(LinkCheckAns {
                margin: 10,
                gw_cnt: 15,
            }),
            &[0x02, 0x0a, 0x0f],
        );
        both_ways_down(
            DownlinkMac::LinkAdrReq(LinkAdrReq {
                dr: 1,
                tx_power: 2,
                ch_mask: 1 << 2,
                ch_mask_cntl: 4,
                nb_trans: 5,
            }),
            &[0x03, 0x12, 0x04, 0x00, 0x45],
        );
        both_ways_down(
            DownlinkMac::DutyCycleReq { max_duty_cycle: 13 },
            &[0x04, 0x0d],
        );
        both_ways_down(
            DownlinkMac::RxParamSetupReq(RxParamSetupReq {
                rx1_dr_offset: 3,
                rx2_dr: 11,
                freq_hz: 26_265_700,
            }),
            &[0x05, 0x3b, 0x01, 0x02, 0x04],
        );
        both_ways_down(
            DownlinkMac::NewChannelReq(NewChannelReq {
                index: 3,
                freq_hz: 26_265_700,
                max_dr: 5,
                min_dr: 10,
            }),
            &[0x07, 0x03, 0x01, 0x02, 0x04, 0x5a],
        );
        both_ways_down(DownlinkMac::RxTimingSetupReq { delay: 15 }, &[0x08, 0x0f]);
        for (ul, dl, b) in [
            (false, false, 0x0f),
            (true, false, 0x1f),
            (false, true, 0x2f),
        ] {
            both_ways_down(
                DownlinkMac::TxParamSetupReq(TxParamSetupReq {
                    downlink_dwell: dl,
                    uplink_dwell: ul,
                    max_eirp: 15,
                }),
                &[0x09, b],
            );
        }
        both_ways_down(
            DownlinkMac::DlChannelReq(DlChannelReq {
                index: 0,
                freq_hz: 868_100_000,
            }),
            &[0x0a, 0x00, 0x28, 0x76, 0x84],
        );
        both_ways_down(
            DownlinkMac::DlChannelReq(DlChannelReq {
                index: 1,
                freq_hz: 868_200_000,
            }),
            &[0x0a, 0x01, 0x10, 0x7a, 0x84],
        );
        both_ways_down(
            DownlinkMac::DeviceTimeAns(DeviceTimeAns {
                gps_seconds: 1,
                fraction: 2,
            }),
            &[0x0d, 0x01, 0x00, 0x00, 0x00, 0x02],
        );
        let adr = |ch_mask_ack, dr_ack, power_ack| {
            UplinkMac::LinkAdrAns(LinkAdrAns {
                power_ack,
                dr_ack,
                ch_mask_ack,
            })
        };
        both_ways_up(adr(true, false, false), &[0x03, 0x01]);
        both_ways_up(adr(false, true, false), &[0x03, 0x02]);
        both_ways_up(adr(false, false, true), &[0x03, 0x04]);
        both_ways_up(adr(true, true, true), &[0x03, 0x07]);
        both_ways_up(
            UplinkMac::RxParamSetupAns(RxParamSetupAns {
                channel_ack: true,
                rx2_dr_ack: false,
                rx1_dr_offset_ack: true,
            }),
            &[0x05, 0x05],
        );
        for (battery, margin, b) in [(0, -30, [0x00, 0x22]), (255, 30, [0xff, 0x1e])] {
            both_ways_up(
                UplinkMac::DevStatusAns(DevStatusAns { battery, margin }),
                &[0x06, b[0], b[1]],
            );
        }
        for (battery, margin, b) in [(127, -1, [0x7f, 0x3f]), (127, 0, [0x7f, 0x00])] {
            both_ways_up(
                UplinkMac::DevStatusAns(DevStatusAns { battery, margin }),
                &[0x06, b[0], b[1]],
            );
        }
        for (freq, dr, b) in [
            (false, false, 0),
            (true, false, 1),
            (false, true, 2),
            (true, true, 3),
        ] {
            both_ways_up(
                UplinkMac::NewChannelAns(NewChannelAns {
                    dr_range_ok: dr,
                    channel_freq_ok: freq,
                }),
                &[0x07, b],
            );
            both_ways_up(
                UplinkMac::DlChannelAns(DlChannelAns {
                    uplink_freq_exists: dr,
                    channel_freq_ok: freq,
                }),
                &[0x0a, b],
            );
        }
        both_ways_up(UplinkMac::LinkCheckReq, &[0x02]);
        both_ways_up(UplinkMac::DutyCycleAns, &[0x04]);
        both_ways_up(UplinkMac::RxTimingSetupAns, &[0x08]);
        both_ways_up(UplinkMac::TxParamSetupAns, &[0x09]);
        both_ways_up(UplinkMac::DeviceTimeReq, &[0x0d]);
    }

    /// Device answers parsed into typed values, with RFU bits set (ignored).
    #[test]
    fn uplink_answers_typed() {
        let cmds = up(&[0x03, 0xF8 | 0x06, 0x06, 0xFE, 0x3F, 0x05, 0x07, 0x0D]);
        assert_eq!(
            cmds,
            vec![
                UplinkMac::LinkAdrAns(LinkAdrAns {
                    power_ack: true,
                    dr_ack: true,
                    ch_mask_ack: false
                }),
                UplinkMac::DevStatusAns(DevStatusAns {
                    battery: 254,
                    margin: -1
                }),
                UplinkMac::RxParamSetupAns(RxParamSetupAns {
                    rx1_dr_offset_ack: true,
                    rx2_dr_ack: true,
                    channel_ack: true
                }),
                UplinkMac::DeviceTimeReq,
            ]
        );
        let UplinkMac::LinkAdrAns(a) = cmds[0] else {
            unreachable!()
        };
        assert!(!a.all_ack());
        let UplinkMac::RxParamSetupAns(a) = cmds[2] else {
            unreachable!()
        };
        assert!(a.all_ack());
        // Margin: signed 6 bits, −32 = 0x20, 31 = 0x1F; RFU bits 7:6 ignored.
        let margin = |b: u8| match up(&[0x06, 100, b])[0] {
            UplinkMac::DevStatusAns(a) => a.margin,
            _ => unreachable!(),
        };
        assert_eq!(margin(0x20), -32);
        assert_eq!(margin(0x1F), 31);
        assert_eq!(margin(0xC5), 5);
        // Battery: 0 external, 1 → 0 %, 254 → 100 %, 255 unknown.
        let st = |battery| DevStatusAns { battery, margin: 0 };
        assert!(st(0).external_power());
        assert_eq!(st(0).battery_percentage(), None);
        assert_eq!(st(255).battery_percentage(), None);
        assert_eq!(st(1).battery_percentage(), Some(0.0));
        assert_eq!(st(254).battery_percentage(), Some(100.0));
        assert!((st(128).battery_percentage().unwrap() - 50.197_63).abs() < 1e-3);
    }

    #[test]
    fn parse_stops_at_unknown_or_short() {
        // Unknown CID 0x80 after a DeviceTimeReq: the DeviceTimeReq is kept.
        let p = parse_uplink(&[0x0D, 0x80, 0x02]);
        assert_eq!(p.commands, vec![UplinkMac::DeviceTimeReq]);
        assert_eq!(p.error, Some(MacError::UnknownCid { cid: 0x80, at: 1 }));
        // 1.1 / class B commands are unknown to 1.0.x (ResetInd 0x01, PingSlotInfoReq 0x10).
        assert_eq!(
            parse_uplink(&[0x01, 0x01]).error,
            Some(MacError::UnknownCid { cid: 0x01, at: 0 })
        );
        // DevStatusAns needs two bytes.
        let p = parse_uplink(&[0x02, 0x06, 0x01]);
        assert_eq!(p.commands, vec![UplinkMac::LinkCheckReq]);
        assert_eq!(
            p.error,
            Some(MacError::Truncated {
                cid: 0x06,
                at: 1,
                need: 2,
                have: 1
            })
        );
        // Downlink: LinkADRReq cut short.
        assert_eq!(
            parse_downlink(&[0x03, 0x51, 0x07]).error,
            Some(MacError::Truncated {
                cid: 0x03,
                at: 0,
                need: 4,
                have: 2
            })
        );
        // The same byte means different commands per direction (0x06: 0 vs 2 bytes).
        assert_eq!(down(&[0x06, 0x06]).len(), 2);
        assert_eq!(up(&[0x06, 0x06, 0x00]).len(), 1);
        // Empty input.
        assert_eq!(
            parse_uplink(&[]),
            Parsed {
                commands: vec![],
                error: None
            }
        );
        // lorastream's existing interface.
        let (cmds, bad) = parse_uplink_raw(&[0x02, 0x06, 0xFF, 0x10, 0x0D]);
        assert_eq!(cmds.len(), 3);
        assert_eq!(cmds[1].payload, vec![0xFF, 0x10]);
        assert_eq!(bad, None);
        assert_eq!(parse_uplink_raw(&[0x0D, 0x80, 0x02]).1, Some(0x80));
        assert_eq!(parse_uplink_raw(&[0x06, 0x01]), (vec![], Some(0x06)));
    }

    /// No input makes the parsers panic: every 0..3-byte string, and pseudo-random longer ones.
    #[test]
    fn parsers_never_panic() {
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                for bytes in [&[a][..], &[a, b], &[a, b, a ^ b]] {
                    let u = parse_uplink(bytes);
                    let d = parse_downlink(bytes);
                    // Whatever was read re-encodes, to no more bytes than were read.
                    let eu = encode_uplink(&u.commands).unwrap();
                    let ed = encode_downlink(&d.commands).unwrap();
                    assert!(eu.len() <= bytes.len() && ed.len() <= bytes.len());
                }
            }
        }
        let mut x: u32 = 0x1234_5678;
        for _ in 0..20_000 {
            let len = (x % 40) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    (x % 16) as u8 // mostly known CIDs, to get deep into the parser
                })
                .collect();
            let _ = parse_uplink(&bytes);
            let _ = parse_downlink(&bytes);
        }
    }

    #[test]
    fn encode_refuses_what_does_not_fit() {
        let adr = |dr, tx_power, ch_mask_cntl, nb_trans| {
            DownlinkMac::LinkAdrReq(LinkAdrReq {
                dr,
                tx_power,
                ch_mask: 0,
                ch_mask_cntl,
                nb_trans,
            })
            .encode()
        };
        assert!(adr(15, 15, 7, 15).is_ok());
        assert_eq!(
            adr(16, 0, 0, 1),
            Err(MacError::OutOfRange {
                field: "DataRate",
                value: 16,
                min: 0,
                max: 15
            })
        );
        assert!(adr(0, 16, 0, 1).is_err());
        assert!(adr(0, 0, 8, 1).is_err());
        assert!(adr(0, 0, 0, 16).is_err());
        let rx = |rx1_dr_offset, freq_hz| {
            DownlinkMac::RxParamSetupReq(RxParamSetupReq {
                rx1_dr_offset,
                rx2_dr: 0,
                freq_hz,
            })
            .encode()
        };
        assert!(rx(8, 869_525_000).is_err());
        assert_eq!(rx(0, 869_525_050), Err(MacError::BadFrequency(869_525_050)));
        assert_eq!(
            rx(0, 1_677_721_600),
            Err(MacError::BadFrequency(1_677_721_600))
        );
        assert!(DownlinkMac::RxTimingSetupReq { delay: 16 }
            .encode()
            .is_err());
        assert!(DownlinkMac::DutyCycleReq { max_duty_cycle: 16 }
            .encode()
            .is_err());
        assert!(DownlinkMac::NewChannelReq(NewChannelReq {
            index: 3,
            freq_hz: 0, // disables the channel: allowed
            min_dr: 0,
            max_dr: 16,
        })
        .encode()
        .is_err());
        assert!(UplinkMac::DevStatusAns(DevStatusAns {
            battery: 1,
            margin: 32
        })
        .encode()
        .is_err());
        assert!(UplinkMac::DevStatusAns(DevStatusAns {
            battery: 1,
            margin: -33
        })
        .encode()
        .is_err());
        // from_cmd with a wrong length.
        assert_eq!(
            UplinkMac::from_cmd(&MacCmd {
                cid: 0x06,
                payload: vec![1]
            }),
            Err(MacError::BadLength {
                cid: 0x06,
                need: 2,
                have: 1
            })
        );
    }

    #[test]
    fn fopts_fitting() {
        let adr = DownlinkMac::LinkAdrReq(LinkAdrReq {
            dr: 3,
            tx_power: 0,
            ch_mask: 0xFF00,
            ch_mask_cntl: 0,
            nb_trans: 1,
        });
        let status = DownlinkMac::DevStatusReq; // 1 byte
        let rx = DownlinkMac::RxParamSetupReq(RxParamSetupReq {
            rx1_dr_offset: 0,
            rx2_dr: 0,
            freq_hz: 869_525_000,
        }); // 5 bytes
            // 5 + 5 + 1 + 5 = 16 > 15: the RXParamSetupReq waits.
        assert_eq!(fit(&[adr, adr, status, rx], FOPTS_MAX_LEN), 3);
        // A LinkADRReq block is not split: 1 + 5 + 5 + 5 = 16 → only the DevStatusReq.
        assert_eq!(fit(&[status, adr, adr, adr], FOPTS_MAX_LEN), 1);
        assert_eq!(fit(&[adr, adr, adr], FOPTS_MAX_LEN), 3);
        assert_eq!(fit(&[adr, adr, adr, adr], FOPTS_MAX_LEN), 0);
        assert_eq!(fit(&[], FOPTS_MAX_LEN), 0);
        assert_eq!(encode_downlink(&[adr, adr, status]).unwrap().len(), 11);
    }

    #[test]
    fn max_eirp_table() {
        assert_eq!(MAX_EIRP_DBM[5], 16);
        assert_eq!(max_eirp_index(16), 5);
        assert_eq!(max_eirp_index(17), 5);
        assert_eq!(max_eirp_index(36), 15);
        assert_eq!(max_eirp_index(40), 15);
        assert_eq!(max_eirp_index(3), 0);
    }

    /// lorastream's existing answers keep their behaviour.
    #[test]
    fn link_check_and_device_time_answers() {
        assert_eq!(link_check_ans(5.0, 7, 2).payload, vec![12, 2]);
        assert_eq!(link_check_ans(-30.0, 12, 1).payload, vec![0, 1]);
        assert_eq!(link_check_ans(50.0, 12, 300).payload, vec![70, 255]);
        // 2026-01-01T00:00:00.5Z = Unix 1767225600.5 → GPS 1451260818.5
        let a = device_time_ans(1_767_225_600_500_000);
        assert_eq!(a.cid, DEVICE_TIME);
        assert_eq!(&a.payload[..4], &1_451_260_818u32.to_le_bytes());
        assert_eq!(a.payload[4], 128);
        assert_eq!(
            DownlinkMac::DeviceTimeAns(DeviceTimeAns::from_unix_us(1_767_225_600_500_000))
                .encode()
                .unwrap(),
            a
        );
    }

    #[test]
    fn serde_round_trip() {
        let cmds = vec![
            DownlinkMac::DevStatusReq,
            DownlinkMac::LinkAdrReq(LinkAdrReq {
                dr: 5,
                tx_power: 1,
                ch_mask: 7,
                ch_mask_cntl: 0,
                nb_trans: 1,
            }),
            DownlinkMac::RxTimingSetupReq { delay: 1 },
        ];
        let json = serde_json::to_string(&cmds).unwrap();
        assert_eq!(
            serde_json::from_str::<Vec<DownlinkMac>>(&json).unwrap(),
            cmds
        );
    }
}
