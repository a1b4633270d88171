//! The network's MAC layer for one device (LoRaWAN 1.0.x §5): what the device was told and
//! acknowledged, the network commands waiting for an answer, the ADR state, the last
//! DevStatusAns and the gateway that heard the device last.
//!
//! Pure and persisted: the uplink stage calls [`MacState::on_uplink`] with each accepted
//! uplink's MAC answers and radio facts (under the registry lock) and stores the state with the
//! device's counters; the downlink scheduler takes the commands to send with
//! [`MacState::take_commands`] when it builds a frame. Nothing here does I/O or reads a clock.
//!
//! Rules:
//! - A network command stays pending until its answer arrives (answers are matched in order,
//!   per command), and is sent again with every downlink to the device, at most
//!   [`Policy::max_attempts`] times; then it is given up (reported, and for ADR the history
//!   restarts, so a deaf device is not asked again before [`Policy::adr_min_history`] more
//!   uplinks; other commands, and commands the device refused, are not queued again before
//!   [`QUIET_UPLINKS`] more uplinks).
//! - Settings are recorded only when the device acknowledged them: a LinkADRAns with every
//!   bit set applies the data rate, power, NbTrans and channel mask of the LinkADRReq block;
//!   a refused block is not asked again with the same parameters.
//! - RXParamSetupAns, RXTimingSetupAns and DlChannelAns are repeated by the device in every
//!   uplink until it receives a downlink (LoRaWAN 1.0.2+ §5.4, §5.7): their arrival asks for
//!   a downlink.
//! - ADRACKReq asks for a downlink (any downlink resets the device's ADR_ACK_CNT, §4.3.1.1).

use super::adr::{self, AdrParams, AdrState, TxParams};
use super::mac::{
    self, DownlinkMac, LinkAdrAns, MacCmd, NewChannelReq, RxParamSetupReq, UplinkMac,
};
use super::region::{self, Region};
use crate::model::{DevStatus, Eui64};
use serde::{Deserialize, Serialize};

/// A device's receive-window settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RxSettings {
    pub rx1_dr_offset: u8,
    pub rx2_dr: u8,
    pub rx2_freq_hz: u32,
    /// RX1 delay in seconds (RXTimingSetupReq "Del"; 0 means 1).
    pub rx_delay: u8,
}

impl RxSettings {
    /// What a device uses after boot (ABP) or before it joins: the region's defaults.
    pub fn region_default(region: Region) -> RxSettings {
        let (rx2_freq_hz, rx2_dr) = region::rx2_default(region);
        RxSettings {
            rx1_dr_offset: 0,
            rx2_dr,
            rx2_freq_hz,
            rx_delay: 1,
        }
    }
}

/// What the network wants every device to use (from the configuration).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub region: Region,
    /// ADR is managed for this device (`[gateway] adr` and the device's `adr`).
    pub adr: bool,
    /// Installation margin of the ADR algorithm (dB).
    pub margin_db: f32,
    /// ADR acts only once the history holds this many uplinks: one lucky reception must not
    /// move a device.
    pub adr_min_history: usize,
    /// The device's UplinkDwellTime (AS923: on after boot), which limits ADR's data rates.
    pub uplink_dwell: bool,
    /// The receive windows the network answers in.
    pub rx: RxSettings,
    /// Uplink channels a device should have enabled (the gateway listens there).
    pub channels: Vec<usize>,
    /// Regions with channels defined by the network: channels beyond the defaults, as
    /// (index, frequency), that a device must be told of (NewChannelReq) unless its JoinAccept
    /// had them (CFList).
    pub extra_channels: Vec<(u8, u32)>,
    /// Ask for DevStatus this often (µs); 0 = never.
    pub dev_status_interval_us: i64,
    /// A network command not answered after this many downlinks is given up.
    pub max_attempts: u8,
}

impl Policy {
    /// The channels a region's device should use: the sub-band's for US915/AU915 when the
    /// gateway listens on one, else all of them; the defaults plus the extra channels
    /// (`extra`, Hz) elsewhere, numbered after the defaults.
    pub fn channels_for(
        region: Region,
        sub_band: Option<u8>,
        extra: &[u32],
    ) -> (Vec<usize>, Vec<(u8, u32)>) {
        if region.has_fixed_channels() {
            let all = (0..region::uplink_channel_count(region)).collect();
            let chans = sub_band
                .and_then(|sb| region::sub_band_channels(region, sb))
                .unwrap_or(all);
            return (chans, Vec::new());
        }
        let defaults = region::default_channels(region).len();
        let extra: Vec<(u8, u32)> = extra
            .iter()
            .enumerate()
            .map(|(i, f)| ((defaults + i) as u8, *f))
            .collect();
        let chans = (0..defaults).chain(extra.iter().map(|(i, _)| usize::from(*i)));
        (chans.collect(), extra)
    }
}

/// A network command and how often it went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub cmd: DownlinkMac,
    pub attempts: u8,
}

/// The network's view of one device's MAC layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MacState {
    pub adr: AdrState,
    /// Data rate of the device's last uplink.
    pub dr: Option<u8>,
    /// Receive windows the device uses (as far as it acknowledged).
    pub rx: RxSettings,
    /// Enabled uplink channels, as far as the network knows (None: not known, e.g. a
    /// US915 device that may or may not have applied its JoinAccept's channel mask).
    pub channels: Option<Vec<usize>>,
    pub pending: Vec<Pending>,
    /// The last DevStatusAns.
    pub dev_status: Option<DevStatus>,
    /// When DevStatusReq was last queued (Unix µs; 0 = never; set on the first uplink so the
    /// first request comes one interval after the device was first heard).
    pub dev_status_asked_us: i64,
    /// The gateway that heard the device best on its last uplink (class C downlinks).
    pub last_gateway: Option<Eui64>,
    /// LinkADRReq parameters the device refused: not asked again.
    pub refused_adr: Option<TxParams>,
    /// Commands the device refused or never answered, and the uplinks since: not queued
    /// again before [`QUIET_UPLINKS`] more uplinks (a device that ignores a command must not
    /// get a downlink with every uplink).
    pub given_up: Vec<(DownlinkMac, u16)>,
}

/// Uplinks after which a refused or unanswered command may be tried again.
pub const QUIET_UPLINKS: u16 = 100;

/// What an accepted uplink tells the MAC layer.
#[derive(Debug, Clone)]
pub struct UplinkFacts<'a> {
    pub f_cnt: u32,
    /// The uplink's data rate in the region (None: not a LoRa data rate of the region).
    pub dr: Option<u8>,
    /// Best SNR over the receptions.
    pub max_snr: f32,
    pub adr_bit: bool,
    pub adr_ack_req: bool,
    /// MAC commands of the uplink (FOpts or FPort 0), parsed.
    pub answers: &'a [UplinkMac],
    pub gateway: Option<Eui64>,
    pub now_us: i64,
}

/// Something worth a log line or a metric.
#[derive(Debug, Clone, PartialEq)]
pub enum MacEvent {
    AdrApplied(TxParams),
    AdrRefused(LinkAdrAns),
    RxApplied(RxSettings),
    RxRefused,
    ChannelAdded(u8),
    ChannelRefused(u8),
    DevStatus(DevStatus),
    /// A network command (CID) was given up after `Policy::max_attempts` downlinks.
    GaveUp(u8),
}

/// What an uplink means for the downlink side.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// The device needs a downlink now, even if nothing else is queued: ADRACKReq, a sticky
    /// answer to stop, or network commands waiting.
    pub needs_downlink: bool,
    pub events: Vec<MacEvent>,
}

impl MacState {
    /// A device that booted with the region's defaults (ABP): default channels enabled.
    pub fn booted(region: Region) -> MacState {
        let channels = (!region.has_fixed_channels())
            .then(|| (0..region::default_channels(region).len()).collect());
        MacState {
            adr: AdrState::new(),
            dr: None,
            rx: RxSettings::region_default(region),
            channels,
            pending: Vec::new(),
            dev_status: None,
            dev_status_asked_us: 0,
            last_gateway: None,
            refused_adr: None,
            given_up: Vec::new(),
        }
    }

    /// A device that joined: its JoinAccept told it the policy's RX1 offset, RX2 data rate
    /// and RxDelay, and (in regions with a channel list) the extra channels of the CFList.
    /// In US915/AU915 whether the device applied a CFList channel mask is not known (LoRaWAN
    /// 1.0.2 devices ignore it): the mask goes out in a LinkADRReq. Later changes of the policy
    /// (a new `[gateway] rx2_dr`) are sent to it as MAC commands.
    pub fn joined(p: &Policy) -> MacState {
        let channels = (!p.region.has_fixed_channels()).then(|| p.channels.clone());
        MacState {
            rx: p.rx,
            channels,
            ..MacState::booted(p.region)
        }
    }

    /// An ABP device: its receive windows are configured as this gateway's (the README asks
    /// for it: there is no JoinAccept to tell it), its channels are the region's defaults
    /// (the extra channels go out as NewChannelReq, US915/AU915 masks as LinkADRReq).
    pub fn abp(p: &Policy) -> MacState {
        MacState {
            rx: p.rx,
            ..MacState::booted(p.region)
        }
    }

    /// Take in an accepted uplink: its answers, its radio facts, and what the policy wants.
    pub fn on_uplink(&mut self, p: &Policy, up: &UplinkFacts<'_>) -> Outcome {
        let mut out = Outcome::default();
        for g in &mut self.given_up {
            g.1 = g.1.saturating_add(1);
        }
        self.given_up.retain(|g| g.1 < QUIET_UPLINKS);
        if up.gateway.is_some() {
            self.last_gateway = up.gateway;
        }
        self.answers(p, up, &mut out);
        if let Some(dr) = up.dr {
            self.dr = Some(dr);
            if p.adr && up.adr_bit {
                self.adr.record_uplink(up.f_cnt, up.max_snr, dr);
                self.plan_adr(p, dr);
            }
        }
        self.plan_settings(p);
        if p.dev_status_interval_us > 0 {
            if self.dev_status_asked_us == 0 {
                self.dev_status_asked_us = up.now_us;
            } else if up.now_us - self.dev_status_asked_us >= p.dev_status_interval_us {
                self.dev_status_asked_us = up.now_us;
                self.queue(DownlinkMac::DevStatusReq);
            }
        }
        out.needs_downlink |= up.adr_ack_req || !self.pending.is_empty();
        out
    }

    /// Network commands for a downlink, at most `room` bytes, in order (a LinkADRReq block
    /// whole); each counts as one more attempt. Commands sent `max_attempts` times without an
    /// answer are given up first (returned as [`MacEvent::GaveUp`]).
    pub fn take_commands(&mut self, room: usize, p: &Policy) -> (Vec<MacCmd>, Vec<MacEvent>) {
        let mut events = Vec::new();
        let before = self.pending.len();
        let mut gave_up_adr = false;
        let mut dropped = Vec::new();
        self.pending.retain(|c| {
            let keep = c.attempts < p.max_attempts;
            if !keep {
                events.push(MacEvent::GaveUp(c.cmd.cid()));
                if matches!(c.cmd, DownlinkMac::LinkAdrReq(_)) {
                    gave_up_adr = true;
                } else {
                    dropped.push(c.cmd);
                }
            }
            keep
        });
        for cmd in dropped {
            self.quiet(cmd);
        }
        if gave_up_adr {
            // Wait for a new history before asking a device that never answered again.
            self.adr.reset_history();
        }
        if self.pending.len() != before {
            // One event per command given up, not one per LinkADRReq of a block.
            events.dedup();
        }
        let cmds: Vec<DownlinkMac> = self.pending.iter().map(|c| c.cmd).collect();
        let n = mac::fit(&cmds, room);
        let mut out = Vec::with_capacity(n);
        for c in self.pending.iter_mut().take(n) {
            c.attempts = c.attempts.saturating_add(1);
            // Commands are built from validated values; one that cannot be encoded is a bug,
            // and skipping it keeps the rest of the frame valid.
            if let Ok(m) = c.cmd.encode() {
                out.push(m);
            }
        }
        (out, events)
    }

    /// Whether a network command is waiting.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    fn queue(&mut self, cmd: DownlinkMac) {
        if !self.pending.iter().any(|c| c.cmd == cmd)
            && !self.given_up.iter().any(|(c, _)| *c == cmd)
        {
            self.pending.push(Pending { cmd, attempts: 0 });
        }
    }

    /// Do not queue `cmd` again for a while.
    fn quiet(&mut self, cmd: DownlinkMac) {
        self.given_up.retain(|(c, _)| *c != cmd);
        self.given_up.push((cmd, 0));
    }

    /// Remove the first pending command with this CID; returns it.
    fn answered(&mut self, cid: u8) -> Option<DownlinkMac> {
        let i = self.pending.iter().position(|c| c.cmd.cid() == cid)?;
        Some(self.pending.remove(i).cmd)
    }

    fn answers(&mut self, p: &Policy, up: &UplinkFacts<'_>, out: &mut Outcome) {
        let mut adr_answers: Vec<LinkAdrAns> = Vec::new();
        for a in up.answers {
            match *a {
                UplinkMac::LinkAdrAns(ans) => adr_answers.push(ans),
                UplinkMac::RxParamSetupAns(ans) => {
                    // Sticky: repeated until a downlink comes.
                    out.needs_downlink = true;
                    if let Some(DownlinkMac::RxParamSetupReq(r)) =
                        self.answered(mac::cid::RX_PARAM_SETUP)
                    {
                        if ans.channel_ack && ans.rx2_dr_ack && ans.rx1_dr_offset_ack {
                            self.rx.rx1_dr_offset = r.rx1_dr_offset;
                            self.rx.rx2_dr = r.rx2_dr;
                            self.rx.rx2_freq_hz = r.freq_hz;
                            out.events.push(MacEvent::RxApplied(self.rx));
                        } else {
                            self.quiet(DownlinkMac::RxParamSetupReq(r));
                            out.events.push(MacEvent::RxRefused);
                        }
                    }
                }
                UplinkMac::RxTimingSetupAns => {
                    out.needs_downlink = true;
                    if let Some(DownlinkMac::RxTimingSetupReq { delay }) =
                        self.answered(mac::cid::RX_TIMING_SETUP)
                    {
                        self.rx.rx_delay = delay.max(1);
                        out.events.push(MacEvent::RxApplied(self.rx));
                    }
                }
                UplinkMac::DlChannelAns(_) => {
                    out.needs_downlink = true;
                    self.answered(mac::cid::DL_CHANNEL);
                }
                UplinkMac::DevStatusAns(s) => {
                    self.answered(mac::cid::DEV_STATUS);
                    let st = DevStatus {
                        battery: s.battery,
                        margin: s.margin,
                        received_at_us: up.now_us,
                    };
                    self.dev_status = Some(st);
                    out.events.push(MacEvent::DevStatus(st));
                }
                UplinkMac::NewChannelAns(ans) => {
                    if let Some(DownlinkMac::NewChannelReq(r)) =
                        self.answered(mac::cid::NEW_CHANNEL)
                    {
                        if ans.channel_freq_ok && ans.dr_range_ok {
                            let chans = self.channels.get_or_insert_with(Vec::new);
                            if !chans.contains(&usize::from(r.index)) {
                                chans.push(usize::from(r.index));
                                chans.sort_unstable();
                            }
                            out.events.push(MacEvent::ChannelAdded(r.index));
                        } else {
                            self.quiet(DownlinkMac::NewChannelReq(r));
                            out.events.push(MacEvent::ChannelRefused(r.index));
                        }
                    }
                }
                UplinkMac::DutyCycleAns => {
                    self.answered(mac::cid::DUTY_CYCLE);
                }
                UplinkMac::TxParamSetupAns => {
                    self.answered(mac::cid::TX_PARAM_SETUP);
                }
                // Answered by the scheduler in the next downlink (LinkCheckAns, DeviceTimeAns).
                UplinkMac::LinkCheckReq | UplinkMac::DeviceTimeReq => {}
            }
        }
        if !adr_answers.is_empty() {
            self.adr_answered(p, &adr_answers, out);
        }
    }

    /// LinkADRAns for the pending LinkADRReq block (one answer per command of the block).
    fn adr_answered(&mut self, p: &Policy, answers: &[LinkAdrAns], out: &mut Outcome) {
        let block: Vec<mac::LinkAdrReq> = self
            .pending
            .iter()
            .filter_map(|c| match c.cmd {
                DownlinkMac::LinkAdrReq(r) => Some(r),
                _ => None,
            })
            .collect();
        let Some(last) = block.last().copied() else {
            return; // an answer to nothing we asked (a repeat): ignore it
        };
        self.pending
            .retain(|c| !matches!(c.cmd, DownlinkMac::LinkAdrReq(_)));
        let desired = TxParams {
            dr: last.dr,
            tx_power: last.tx_power,
            nb_trans: last.nb_trans,
        };
        if answers.iter().all(LinkAdrAns::all_ack) {
            let blocks: Vec<region::ChMaskBlock> = block
                .iter()
                .map(|r| region::ChMaskBlock {
                    ch_mask: r.ch_mask,
                    ch_mask_cntl: r.ch_mask_cntl,
                })
                .collect();
            let before = self
                .channels
                .clone()
                .unwrap_or_else(|| (0..region::uplink_channel_count(p.region)).collect());
            if let Ok(chans) = region::apply_ch_mask_blocks(p.region, &before, &blocks) {
                self.channels = Some(chans);
            }
            self.adr.acknowledged(desired);
            self.dr = Some(desired.dr);
            self.refused_adr = None;
            out.events.push(MacEvent::AdrApplied(desired));
        } else {
            self.refused_adr = Some(desired);
            out.events.push(MacEvent::AdrRefused(
                answers
                    .iter()
                    .copied()
                    .find(|a| !a.all_ack())
                    .unwrap_or(answers[0]),
            ));
        }
    }

    /// The channels the device should have enabled: the policy's, less the extra channels
    /// it does not have yet (enabling an undefined channel makes the device refuse the whole
    /// LinkADRReq; NewChannelReq enables a channel when it defines it).
    fn wanted_channels(&self, p: &Policy) -> Vec<usize> {
        match &self.channels {
            Some(known) if !p.region.has_fixed_channels() => {
                let defaults = region::default_channels(p.region).len();
                p.channels
                    .iter()
                    .copied()
                    .filter(|c| *c < defaults || known.contains(c))
                    .collect()
            }
            _ => p.channels.clone(),
        }
    }

    /// Queue a LinkADRReq block when ADR asks for one (a full enough history), or at once
    /// when the device's channel mask is not the wanted one (a US915 device on all 72
    /// channels while the gateway hears one sub-band loses most of its uplinks).
    fn plan_adr(&mut self, p: &Policy, uplink_dr: u8) {
        if self
            .pending
            .iter()
            .any(|c| matches!(c.cmd, DownlinkMac::LinkAdrReq(_)))
        {
            return;
        }
        let wanted = self.wanted_channels(p);
        let channels_differ = self.channels.as_deref() != Some(&wanted[..]);
        let desired = if self.adr.len() >= p.adr_min_history {
            let params = AdrParams::new(p.region, p.uplink_dwell, p.margin_db);
            self.adr.evaluate(&params, uplink_dr, true, channels_differ)
        } else if channels_differ {
            Some(TxParams {
                dr: uplink_dr,
                tx_power: self.adr.tx_power,
                nb_trans: self.adr.nb_trans,
            })
        } else {
            None
        };
        let Some(desired) = desired else {
            return;
        };
        if self.refused_adr == Some(desired) {
            return;
        }
        if let Ok(reqs) = adr::link_adr_requests(p.region, desired, &wanted) {
            for r in reqs {
                self.pending.push(Pending {
                    cmd: DownlinkMac::LinkAdrReq(r),
                    attempts: 0,
                });
            }
        }
    }

    /// Queue what aligns the device's other settings with the policy.
    fn plan_settings(&mut self, p: &Policy) {
        let rx = &self.rx;
        if (rx.rx1_dr_offset, rx.rx2_dr, rx.rx2_freq_hz)
            != (p.rx.rx1_dr_offset, p.rx.rx2_dr, p.rx.rx2_freq_hz)
        {
            self.queue(DownlinkMac::RxParamSetupReq(RxParamSetupReq {
                rx1_dr_offset: p.rx.rx1_dr_offset,
                rx2_dr: p.rx.rx2_dr,
                freq_hz: p.rx.rx2_freq_hz,
            }));
        }
        if self.rx.rx_delay != p.rx.rx_delay {
            self.queue(DownlinkMac::RxTimingSetupReq {
                delay: p.rx.rx_delay,
            });
        }
        // The data rates of the region's default channels (DR0..DR5 where extra channels
        // exist), as ChirpStack and TTS give their extra channels.
        let (min_dr, max_dr) = region::default_channels(p.region)
            .first()
            .map_or((0, 5), |c| (c.min_dr, c.max_dr));
        for &(index, freq_hz) in &p.extra_channels {
            let known = self
                .channels
                .as_ref()
                .is_some_and(|c| c.contains(&usize::from(index)));
            if !known {
                self.queue(DownlinkMac::NewChannelReq(NewChannelReq {
                    index,
                    freq_hz,
                    min_dr,
                    max_dr,
                }));
            }
        }
    }
}

/// Stored form of a [`MacState`]: a format version byte, then postcard. A version this binary
/// does not know reads as "nothing known" (the device starts from its defaults).
pub mod stored {
    use super::MacState;
    use crate::lorawan::mac::DownlinkMac;
    use crate::vec_write::{extend, varint, zigzag};

    const VERSION: u8 = 1;

    /// Encoded once per accepted uplink, exactly sized: it waits in memory for the next
    /// checkpoint (see [`crate::postcard_buf`]). The bytes are postcard's encoding of
    /// [`MacState`] after the version byte, written field by field (issue 16: through serde,
    /// a state with its ADR history or a few pending commands cost ~1,500 instructions per
    /// uplink). Unit tests compare the bytes with postcard's for random states.
    pub fn encode(s: &MacState) -> Result<Vec<u8>, postcard::Error> {
        crate::postcard_buf::exact_with(|b| {
            b.push(VERSION);
            b.push(s.adr.tx_power);
            b.push(s.adr.nb_trans);
            let history = s.adr.history();
            varint(b, history.len() as u64);
            for r in history {
                varint(b, u64::from(r.f_cnt));
                extend(b, &r.max_snr.to_le_bytes());
                b.push(r.tx_power);
                b.push(r.dr);
            }
            match s.dr {
                None => b.push(0),
                Some(dr) => extend(b, &[1, dr]),
            }
            b.push(s.rx.rx1_dr_offset);
            b.push(s.rx.rx2_dr);
            varint(b, u64::from(s.rx.rx2_freq_hz));
            b.push(s.rx.rx_delay);
            match &s.channels {
                None => b.push(0),
                Some(c) => {
                    b.push(1);
                    varint(b, c.len() as u64);
                    for ch in c {
                        varint(b, *ch as u64);
                    }
                }
            }
            varint(b, s.pending.len() as u64);
            for p in &s.pending {
                command(b, &p.cmd);
                b.push(p.attempts);
            }
            match s.dev_status {
                None => b.push(0),
                Some(d) => {
                    extend(b, &[1, d.battery, d.margin as u8]);
                    zigzag(b, d.received_at_us);
                }
            }
            zigzag(b, s.dev_status_asked_us);
            match s.last_gateway {
                None => b.push(0),
                Some(g) => {
                    b.push(1);
                    extend(b, &g.0);
                }
            }
            match s.refused_adr {
                None => b.push(0),
                Some(t) => extend(b, &[1, t.dr, t.tx_power, t.nb_trans]),
            }
            varint(b, s.given_up.len() as u64);
            for (cmd, uplinks) in &s.given_up {
                command(b, cmd);
                varint(b, u64::from(*uplinks));
            }
            Ok::<(), postcard::Error>(())
        })
    }

    /// A [`DownlinkMac`]: its variant index, then its fields in order.
    fn command(b: &mut Vec<u8>, c: &DownlinkMac) {
        match *c {
            DownlinkMac::LinkCheckAns(a) => extend(b, &[0, a.margin, a.gw_cnt]),
            DownlinkMac::LinkAdrReq(r) => {
                extend(b, &[1, r.dr, r.tx_power]);
                varint(b, u64::from(r.ch_mask));
                extend(b, &[r.ch_mask_cntl, r.nb_trans]);
            }
            DownlinkMac::DutyCycleReq { max_duty_cycle } => extend(b, &[2, max_duty_cycle]),
            DownlinkMac::RxParamSetupReq(r) => {
                extend(b, &[3, r.rx1_dr_offset, r.rx2_dr]);
                varint(b, u64::from(r.freq_hz));
            }
            DownlinkMac::DevStatusReq => b.push(4),
            DownlinkMac::NewChannelReq(r) => {
                extend(b, &[5, r.index]);
                varint(b, u64::from(r.freq_hz));
                extend(b, &[r.min_dr, r.max_dr]);
            }
            DownlinkMac::RxTimingSetupReq { delay } => extend(b, &[6, delay]),
            DownlinkMac::TxParamSetupReq(r) => extend(
                b,
                &[
                    7,
                    u8::from(r.downlink_dwell),
                    u8::from(r.uplink_dwell),
                    r.max_eirp,
                ],
            ),
            DownlinkMac::DlChannelReq(r) => {
                extend(b, &[8, r.index]);
                varint(b, u64::from(r.freq_hz));
            }
            DownlinkMac::DeviceTimeAns(a) => {
                b.push(9);
                varint(b, u64::from(a.gps_seconds));
                b.push(a.fraction);
            }
        }
    }

    pub fn decode(b: &[u8]) -> Option<MacState> {
        match b {
            [VERSION, rest @ ..] => postcard::from_bytes(rest).ok(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
