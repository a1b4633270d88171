//! A device's side of the MAC layer, for simulated devices (tests, the ADR benchmark): it
//! applies the network's commands from a downlink as a LoRaWAN 1.0.3 device does (§5) and
//! answers them in its next uplink, repeating the answers the specification makes sticky
//! until a downlink arrives, and it runs the device's half of ADR (ADR_ACK_CNT, ADRACKReq,
//! stepping back when the network stays silent, §4.3.1.1).
//!
//! It is written from the specification on its own: it shares only the byte codec
//! (`lorawan::mac`) with the daemon, not the network-side logic it is used to test.

use crate::lorawan::mac::{
    self, DevStatusAns, DlChannelAns, DownlinkMac, LinkAdrAns, LinkAdrReq, MacCmd, NewChannelAns,
    RxParamSetupAns, UplinkMac,
};
use crate::lorawan::region::Region;

/// ADR_ACK_LIMIT and ADR_ACK_DELAY (RP002-1.0.4 "Default settings", every region).
pub const ADR_ACK_LIMIT: u32 = 64;
pub const ADR_ACK_DELAY: u32 = 32;

/// What a simulated device knows of its MAC layer.
#[derive(Debug, Clone)]
pub struct DeviceMac {
    pub region: Region,
    /// Data rate of the next uplink.
    pub dr: u8,
    /// TXPower index (0 = the region's maximum).
    pub tx_power: u8,
    pub nb_trans: u8,
    /// Uplink channels enabled (index → on).
    pub channels: Vec<bool>,
    /// Uplink channels defined (a frequency known: the region's defaults, NewChannelReq).
    pub defined: Vec<bool>,
    pub rx1_dr_offset: u8,
    pub rx2_dr: u8,
    pub rx2_freq_hz: u32,
    pub rx_delay: u8,
    /// DevStatusAns: battery (0 external, 1..=254, 255 unknown) and margin.
    pub battery: u8,
    pub margin: i8,
    /// ADR bit in uplinks.
    pub adr: bool,
    /// Answers for the next uplink only.
    answers: Vec<UplinkMac>,
    /// Answers repeated in every uplink until a downlink arrives.
    sticky: Vec<UplinkMac>,
    adr_ack_cnt: u32,
}

/// The uplink data rates of a region a device may be set to (LoRa, 125 kHz and the region's
/// wide channels): EU-like DR0..DR5 (DR6 SF7/250 kHz too), US915 DR0..DR4, AU915 DR0..DR6.
fn uplink_drs(region: Region) -> std::ops::RangeInclusive<u8> {
    match region {
        Region::US915 => 0..=4,
        Region::KR920 | Region::IN865 => 0..=5,
        _ => 0..=6,
    }
}

/// TXPower indexes a region defines for end-devices (RP002-1.0.4: EU868 0..7, US915 0..14,
/// AU915 0..14, AS923 0..7, KR920 0..7, IN865 0..10).
fn max_tx_power(region: Region) -> u8 {
    match region {
        Region::US915 | Region::AU915 => 14,
        Region::IN865 => 10,
        _ => 7,
    }
}

impl DeviceMac {
    /// A device that boots at `dr` with the region's defaults: three channels in
    /// network-defined regions (16 possible), all 72 in US915/AU915.
    pub fn new(region: Region, dr: u8) -> DeviceMac {
        let (channels, rx2_dr, rx2_freq_hz) = match region {
            Region::US915 | Region::AU915 => (vec![true; 72], 8, 923_300_000),
            Region::EU868 => ((0..16).map(|i| i < 3).collect(), 0, 869_525_000),
            Region::KR920 => ((0..16).map(|i| i < 3).collect(), 0, 921_900_000),
            Region::IN865 => ((0..16).map(|i| i < 3).collect(), 2, 866_550_000),
            // AS923-1; the -2/-3/-4 variants shift the frequency (not needed by the tests).
            _ => ((0..16).map(|i| i < 2).collect(), 2, 923_200_000),
        };
        DeviceMac {
            region,
            dr,
            tx_power: 0,
            nb_trans: 1,
            defined: channels.clone(),
            channels,
            rx1_dr_offset: 0,
            rx2_dr,
            rx2_freq_hz,
            rx_delay: 1,
            battery: 200,
            margin: 10,
            adr: true,
            answers: Vec::new(),
            sticky: Vec::new(),
            adr_ack_cnt: 0,
        }
    }

    /// Spreading factor and bandwidth of the current data rate (RP002-1.0.4: EU-like DR0..5 =
    /// SF12..SF7 at 125 kHz, DR6 SF7 at 250 kHz; US915 DR0..3 = SF10..SF7, DR4 SF8 at 500 kHz;
    /// AU915 DR6 SF8 at 500 kHz).
    pub fn sf_bw(&self) -> (u8, u32) {
        match (self.region, self.dr) {
            (Region::US915, 0..=3) => (10 - self.dr, 125_000),
            (Region::US915, _) => (8, 500_000),
            (Region::AU915, 6) => (8, 500_000),
            (_, 6) => (7, 250_000),
            (_, dr) => (12 - dr.min(5), 125_000),
        }
    }

    /// Enabled channel indexes.
    pub fn enabled_channels(&self) -> Vec<usize> {
        (0..self.channels.len())
            .filter(|&i| self.channels[i])
            .collect()
    }

    /// A downlink reached the device: apply the MAC commands of its FOpts (`fopts`) or of its
    /// FPort 0 payload. Returns the commands it saw.
    pub fn on_downlink(&mut self, mac_bytes: &[u8]) -> Vec<DownlinkMac> {
        // Any downlink resets ADR_ACK_CNT and ends the sticky answers (§4.3.1.1, §5.4).
        self.adr_ack_cnt = 0;
        self.sticky.clear();
        let cmds = mac::parse_downlink(mac_bytes).commands;
        let adr_block: Vec<LinkAdrReq> = cmds
            .iter()
            .filter_map(|c| match c {
                DownlinkMac::LinkAdrReq(r) => Some(*r),
                _ => None,
            })
            .collect();
        if !adr_block.is_empty() {
            self.link_adr(&adr_block);
        }
        for c in &cmds {
            match *c {
                DownlinkMac::RxParamSetupReq(r) => {
                    let ok = r.rx2_dr <= 15 && r.rx1_dr_offset <= 7 && r.freq_hz > 0;
                    if ok {
                        self.rx1_dr_offset = r.rx1_dr_offset;
                        self.rx2_dr = r.rx2_dr;
                        self.rx2_freq_hz = r.freq_hz;
                    }
                    self.sticky
                        .push(UplinkMac::RxParamSetupAns(RxParamSetupAns {
                            rx1_dr_offset_ack: ok,
                            rx2_dr_ack: ok,
                            channel_ack: ok,
                        }));
                }
                DownlinkMac::RxTimingSetupReq { delay } => {
                    self.rx_delay = delay.max(1);
                    self.sticky.push(UplinkMac::RxTimingSetupAns);
                }
                DownlinkMac::DevStatusReq => {
                    self.answers.push(UplinkMac::DevStatusAns(DevStatusAns {
                        battery: self.battery,
                        margin: self.margin,
                    }));
                }
                DownlinkMac::NewChannelReq(r) => {
                    let i = usize::from(r.index);
                    let ok = i >= 3 && i < self.channels.len() && r.min_dr <= r.max_dr;
                    if ok {
                        self.defined[i] = r.freq_hz != 0;
                        self.channels[i] = r.freq_hz != 0;
                    }
                    self.answers.push(UplinkMac::NewChannelAns(NewChannelAns {
                        channel_freq_ok: ok,
                        dr_range_ok: ok,
                    }));
                }
                DownlinkMac::DlChannelReq(_) => {
                    self.sticky.push(UplinkMac::DlChannelAns(DlChannelAns {
                        uplink_freq_exists: true,
                        channel_freq_ok: true,
                    }));
                }
                DownlinkMac::TxParamSetupReq(_) => self.answers.push(UplinkMac::TxParamSetupAns),
                DownlinkMac::DutyCycleReq { .. } => self.answers.push(UplinkMac::DutyCycleAns),
                DownlinkMac::LinkAdrReq(_)
                | DownlinkMac::LinkCheckAns(_)
                | DownlinkMac::DeviceTimeAns(_) => {}
            }
        }
        cmds
    }

    /// A LinkADRReq block (LoRaWAN 1.0.3 §5.3): the channel masks apply in order; the data
    /// rate, power and NbTrans of the last command; all or nothing; one answer per command.
    fn link_adr(&mut self, block: &[LinkAdrReq]) {
        let mut chans = self.channels.clone();
        for r in block {
            self.apply_mask(&mut chans, r.ch_mask, r.ch_mask_cntl);
        }
        let last = block[block.len() - 1];
        // A mask that enables an undefined channel, or none at all, is refused (§5.3).
        let ch_ok =
            chans.iter().any(|&c| c) && chans.iter().zip(&self.defined).all(|(&on, &d)| !on || d);
        // 1.0.4: 0xF keeps the current value.
        let dr = if last.dr == 0xF { self.dr } else { last.dr };
        let power = if last.tx_power == 0xF {
            self.tx_power
        } else {
            last.tx_power
        };
        let dr_ok = uplink_drs(self.region).contains(&dr);
        let power_ok = power <= max_tx_power(self.region);
        if ch_ok && dr_ok && power_ok {
            self.channels = chans;
            self.dr = dr;
            self.tx_power = power;
            if last.nb_trans != 0 {
                self.nb_trans = last.nb_trans;
            }
        }
        let ans = UplinkMac::LinkAdrAns(LinkAdrAns {
            power_ack: power_ok,
            dr_ack: dr_ok,
            ch_mask_ack: ch_ok,
        });
        self.answers.extend(std::iter::repeat_n(ans, block.len()));
    }

    /// ChMask / ChMaskCntl as the region defines them (RP002-1.0.4 "LinkAdrReq command" of
    /// each region).
    fn apply_mask(&self, chans: &mut [bool], mask: u16, cntl: u8) {
        let bit = |i: usize| mask & (1 << i) != 0;
        if matches!(self.region, Region::US915 | Region::AU915) {
            match cntl {
                0..=4 => {
                    let base = usize::from(cntl) * 16;
                    for i in 0..16 {
                        if let Some(c) = chans.get_mut(base + i) {
                            *c = bit(i);
                        }
                    }
                }
                // All 125 kHz channels on (6) or off (7); ChMask gives the 500 kHz ones.
                6 | 7 => {
                    for c in chans.iter_mut().take(64) {
                        *c = cntl == 6;
                    }
                    for i in 0..8 {
                        chans[64 + i] = bit(i);
                    }
                }
                _ => {}
            }
        } else {
            match cntl {
                0 => {
                    for (i, c) in chans.iter_mut().enumerate().take(16) {
                        *c = bit(i);
                    }
                }
                // All defined channels on.
                6 => chans.copy_from_slice(&self.defined),
                _ => {}
            }
        }
    }

    /// The MAC commands of the next uplink and whether it sets ADRACKReq; counts ADR_ACK_CNT
    /// and steps back (power first, then data rate) after ADR_ACK_LIMIT + ADR_ACK_DELAY
    /// uplinks without a downlink.
    pub fn next_uplink(&mut self) -> (Vec<MacCmd>, bool) {
        let mut cmds: Vec<UplinkMac> = std::mem::take(&mut self.answers);
        cmds.extend(self.sticky.iter().copied());
        let mut out: Vec<MacCmd> = Vec::new();
        let mut used = 0;
        for c in cmds {
            if let Ok(m) = c.encode() {
                if used + m.encoded_len() <= mac::FOPTS_MAX_LEN {
                    used += m.encoded_len();
                    out.push(m);
                }
            }
        }
        let mut req = false;
        let lowest = *uplink_drs(self.region).start();
        if self.adr && (self.dr > lowest || self.tx_power > 0) {
            self.adr_ack_cnt += 1;
            req = self.adr_ack_cnt >= ADR_ACK_LIMIT;
            if self.adr_ack_cnt >= ADR_ACK_LIMIT + ADR_ACK_DELAY {
                if self.tx_power > 0 {
                    self.tx_power = 0;
                } else {
                    self.dr = self.dr.saturating_sub(1).max(lowest);
                }
                self.adr_ack_cnt = ADR_ACK_LIMIT;
            }
        } else {
            self.adr_ack_cnt = 0;
        }
        (out, req)
    }
}
