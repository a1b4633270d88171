//! Adaptive data rate, the network's side (LoRaWAN 1.0.4 §4.3.1.1 "Adaptive data-rate
//! control", §5.3 "Link ADR commands"): from a device's recent uplinks, the data rate, TXPower
//! index and NbTrans it should use, and whether a LinkADRReq is needed to tell it.
//!
//! The algorithm is ChirpStack's default ADR algorithm (`chirpstack/src/adr/default.rs`, the
//! history kept by `chirpstack/src/uplink/data.rs` and reset by
//! `chirpstack/src/maccommand/link_adr.rs`):
//!
//! 1. `snr_margin = max_snr − required_snr(uplink DR) − installation_margin`, with `max_snr` the
//!    best SNR over the last [`HISTORY_LEN`] uplinks (each uplink's SNR being the best of its
//!    receptions), the required SNR the demodulation floor of the spreading factor
//!    ([`region::required_snr_db`]: SF7 −7.5 … SF12 −20 dB) and the installation margin
//!    `adr_margin_db` (default [`DEFAULT_INSTALLATION_MARGIN_DB`]).
//! 2. `n_step = snr_margin / 3`, truncated toward zero (ChirpStack's `as isize`; so a margin
//!    between −3 and +3 dB changes nothing, a hysteresis).
//! 3. While `n_step > 0`: raise the DR by one up to the maximum, then lower the power (raise
//!    the TXPower index) up to the region's maximum index. While `n_step < 0`: raise the power
//!    (lower the index) down to index 0 — only once the history holds [`HISTORY_LEN`] uplinks
//!    sent at the current power, to avoid power flapping. The DR is never lowered (the device's
//!    own ADR backoff, ADR_ACK_LIMIT/ADR_ACK_DELAY, does that), except down to the maximum
//!    when the device is above it.
//! 4. NbTrans from the packet loss of the history (only with [`HISTORY_LEN`] uplinks, else the
//!    loss counts as 0) and the current NbTrans, ChirpStack's table:
//!
//!    | loss        | NbTrans 1 | 2 | 3 |
//!    | ----------- | --------- | - | - |
//!    | < 5 %       | 1         | 1 | 2 |
//!    | < 10 %      | 1         | 2 | 3 |
//!    | < 30 %      | 2         | 3 | 3 |
//!    | ≥ 30 %      | 3         | 3 | 3 |
//!
//! Deviations from ChirpStack, each in the safe or more accurate direction:
//! - Packet loss is `lost / (received + lost)`, the share of frames lost; ChirpStack divides by
//!   the number received (20 received, 2 lost: ChirpStack 10 % → NbTrans 2, here 9.1 % → 1).
//!   Gaps are counted from strictly increasing frame counters, so a reset or reordered
//!   counter cannot underflow (it clears the history instead, see [`AdrState::record_uplink`]).
//! - SNRs of uplinks sent at another TXPower are corrected by 2 dB per index step to the
//!   current power before taking the maximum. (ChirpStack takes them as they are; in the usual
//!   flow both reset the history when the power changes, so this only matters when it does
//!   not.)
//! - A TXPower index above the region's ADR maximum is brought down to it (more power), and
//!   ADR stays within the indices that every LoRaWAN 1.0.2+ device accepts
//!   ([`region::adr_max_tx_power_index`]: US915/AU915 0..10, not 0..14).
//! - An uplink DR the region does not define as LoRa, and NaN SNRs, change nothing.
//!
//! Everything here is pure: the caller feeds uplinks into an [`AdrState`] (which it persists,
//! it is serde-serializable), asks [`AdrState::evaluate`] after each uplink, sends the
//! LinkADRReq block from [`link_adr_requests`], and calls [`AdrState::acknowledged`] once the
//! device answered every LinkADRReq with all three ACKs (LinkADRAns).

use super::mac::LinkAdrReq;
use super::region::{self, Region, RegionError};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Uplinks kept in the history, and the number needed before the power is raised or the packet
/// loss is used (ChirpStack's `required_history_count`).
pub const HISTORY_LEN: usize = 20;

/// Installation margin (dB) kept above the demodulation floor (lorastream's `adr_margin_db`
/// default; ChirpStack's `installation_margin` default).
pub const DEFAULT_INSTALLATION_MARGIN_DB: f32 = 10.0;

/// One uplink as ADR sees it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct UplinkRecord {
    /// Full 32-bit FCntUp.
    pub f_cnt: u32,
    /// Best SNR (dB) over the uplink's receptions.
    pub max_snr: f32,
    /// TXPower index the device was using (the last one it acknowledged).
    pub tx_power: u8,
    /// Data rate of the uplink.
    pub dr: u8,
}

/// The transmit parameters ADR controls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TxParams {
    pub dr: u8,
    /// TXPower index: 0 = the region's MaxEIRP, each step 2 dB less.
    pub tx_power: u8,
    /// Transmissions of each uplink frame, 1..=15.
    pub nb_trans: u8,
}

impl Default for TxParams {
    /// After a join (or ABP boot): DR0 as far as the network knows, TXPower 0, NbTrans 1.
    fn default() -> Self {
        TxParams {
            dr: 0,
            tx_power: 0,
            nb_trans: 1,
        }
    }
}

/// The region's limits and the installation margin ADR works with.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdrParams {
    pub region: Region,
    /// Lowest uplink DR ADR may choose (informational: ADR never lowers the DR).
    pub min_dr: u8,
    /// Highest uplink DR ADR may choose.
    pub max_dr: u8,
    /// Highest TXPower index ADR may choose.
    pub max_tx_power: u8,
    /// dB kept above the demodulation floor.
    pub installation_margin_db: f32,
}

impl AdrParams {
    /// The region's ADR limits ([`region::adr_dr_range`], [`region::adr_max_tx_power_index`]);
    /// `uplink_dwell` is the device's UplinkDwellTime (AS923 at boot, AU915 when told).
    pub fn new(region: Region, uplink_dwell: bool, installation_margin_db: f32) -> Self {
        let drs = region::adr_dr_range(region, uplink_dwell);
        AdrParams {
            region,
            min_dr: *drs.start(),
            max_dr: *drs.end(),
            max_tx_power: region::adr_max_tx_power_index(region),
            installation_margin_db,
        }
    }
}

/// The best SNR of an uplink over its receptions (NaN values ignored).
pub fn max_snr(snrs: impl IntoIterator<Item = f32>) -> Option<f32> {
    snrs.into_iter()
        .filter(|s| !s.is_nan())
        .fold(None, |best, s| Some(best.map_or(s, |b: f32| b.max(s))))
}

/// Per-device ADR state: what the device acknowledged and its recent uplinks. Serialize it
/// with the device session; fields missing in stored data take their defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdrState {
    /// TXPower index the device acknowledged last (0 after a join).
    pub tx_power: u8,
    /// NbTrans the device acknowledged last (1 after a join).
    pub nb_trans: u8,
    /// The last [`HISTORY_LEN`] uplinks, oldest first, with strictly increasing FCnt.
    history: VecDeque<UplinkRecord>,
}

impl Default for AdrState {
    fn default() -> Self {
        AdrState {
            tx_power: 0,
            nb_trans: 1,
            history: VecDeque::with_capacity(HISTORY_LEN),
        }
    }
}

impl AdrState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add an uplink (call once per frame, after deduplication, with the best SNR of its
    /// receptions). Returns whether it was recorded:
    /// - the same FCnt as the last entry (an NbTrans repetition, or a replay) is not recorded
    ///   (as ChirpStack: we cannot know which transmission it was);
    /// - a lower FCnt (a counter reset: rejoin, ABP device restart) clears the history first;
    /// - a NaN SNR is not recorded.
    pub fn record_uplink(&mut self, f_cnt: u32, max_snr: f32, dr: u8) -> bool {
        if max_snr.is_nan() {
            return false;
        }
        match self.history.back() {
            Some(last) if last.f_cnt == f_cnt => return false,
            Some(last) if last.f_cnt > f_cnt => self.history.clear(),
            _ => {}
        }
        while self.history.len() >= HISTORY_LEN {
            self.history.pop_front();
        }
        self.history.push_back(UplinkRecord {
            f_cnt,
            max_snr,
            tx_power: self.tx_power,
            dr,
        });
        true
    }

    /// The device answered the LinkADRReq block with all ACKs: it now uses `applied`. The
    /// history restarts when anything changed (as ChirpStack), so later decisions see uplinks
    /// sent with the new settings only.
    pub fn acknowledged(&mut self, applied: TxParams) {
        let last_dr = self.history.back().map(|r| r.dr);
        if applied.tx_power != self.tx_power
            || applied.nb_trans != self.nb_trans
            || last_dr.is_some_and(|dr| dr != applied.dr)
        {
            self.history.clear();
        }
        self.tx_power = applied.tx_power;
        self.nb_trans = applied.nb_trans;
    }

    /// Back to the state after a join (a new session).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Forget the uplink history, keeping the acknowledged parameters (a LinkADRReq the
    /// device never answered: decide again from new uplinks).
    pub fn reset_history(&mut self) {
        self.history.clear();
    }

    /// The recorded uplinks, oldest first.
    pub fn history(&self) -> impl ExactSizeIterator<Item = &UplinkRecord> {
        self.history.iter()
    }

    pub fn len(&self) -> usize {
        self.history.len()
    }

    pub fn is_empty(&self) -> bool {
        self.history.is_empty()
    }

    /// Lost frames as a percentage of the frames sent over the history (FCnt gaps); 0 until the
    /// history is full (ChirpStack's rule).
    pub fn packet_loss_percent(&self) -> f32 {
        let (Some(first), Some(last)) = (self.history.front(), self.history.back()) else {
            return 0.0;
        };
        if self.history.len() < HISTORY_LEN {
            return 0.0;
        }
        let sent = u64::from(last.f_cnt - first.f_cnt) + 1; // FCnts strictly increase
        let lost = sent.saturating_sub(self.history.len() as u64);
        lost as f32 / sent as f32 * 100.0
    }

    /// Best SNR over the history, each corrected to the current TXPower (2 dB per index).
    pub fn max_snr(&self) -> Option<f32> {
        let now = i16::from(self.tx_power);
        max_snr(
            self.history
                .iter()
                .map(|r| r.max_snr + 2.0 * f32::from(i16::from(r.tx_power) - now)),
        )
    }

    /// The transmit parameters the device should use after an uplink at `uplink_dr`.
    pub fn decide(&self, params: &AdrParams, uplink_dr: u8) -> TxParams {
        decide(params, uplink_dr, self)
    }

    /// After an uplink at `uplink_dr`: `Some(desired)` when a LinkADRReq is needed (the device
    /// has its ADR bit set and should change something, or its channel mask differs from the
    /// wanted one — the network may change the channel mask and NbTrans even without the ADR
    /// bit, §4.3.1.1), else `None`. An uplink with ADRACKReq needs a downlink in any case,
    /// with or without a LinkADRReq.
    pub fn evaluate(
        &self,
        params: &AdrParams,
        uplink_dr: u8,
        adr_bit: bool,
        channels_differ: bool,
    ) -> Option<TxParams> {
        let current = TxParams {
            dr: uplink_dr,
            tx_power: self.tx_power,
            nb_trans: self.nb_trans,
        };
        let desired = if adr_bit {
            self.decide(params, uplink_dr)
        } else {
            current
        };
        link_adr_req_needed(adr_bit, current, desired, channels_differ).then_some(desired)
    }
}

/// Whether a LinkADRReq must be sent: the channel mask must change, or the device manages its
/// data rate by ADR (ADR bit set) and the desired parameters differ from what it uses.
pub fn link_adr_req_needed(
    adr_bit: bool,
    current: TxParams,
    desired: TxParams,
    channels_differ: bool,
) -> bool {
    channels_differ || (adr_bit && desired != current)
}

/// NbTrans from the packet-loss percentage and the current NbTrans (ChirpStack's table, see the
/// module documentation).
pub fn nb_trans_for_loss(current: u8, loss_percent: f32) -> u8 {
    const TABLE: [[u8; 3]; 4] = [[1, 1, 2], [1, 2, 3], [2, 3, 3], [3, 3, 3]];
    let col = usize::from(current.clamp(1, 3) - 1);
    let row = if loss_percent < 5.0 {
        0
    } else if loss_percent < 10.0 {
        1
    } else if loss_percent < 30.0 {
        2
    } else {
        3
    };
    TABLE[row][col]
}

/// Apply `n_step` 3 dB steps: positive ones raise the DR to `max_dr`, then raise the TXPower
/// index to `max_tx_power`; negative ones lower the TXPower index to 0 (ChirpStack's
/// `get_ideal_tx_power_index_and_dr`).
pub fn apply_steps(n_step: i32, tx_power: u8, dr: u8, max_tx_power: u8, max_dr: u8) -> (u8, u8) {
    let (mut tx_power, mut dr) = (tx_power, dr);
    if n_step > 0 {
        for _ in 0..n_step {
            if dr < max_dr {
                dr += 1;
            } else if tx_power < max_tx_power {
                tx_power += 1;
            } else {
                break;
            }
        }
    } else {
        tx_power = tx_power.saturating_sub(n_step.unsigned_abs().min(255) as u8);
    }
    (tx_power, dr)
}

/// The ADR decision for a device whose last uplink used `uplink_dr` (see the module
/// documentation for the algorithm).
pub fn decide(params: &AdrParams, uplink_dr: u8, state: &AdrState) -> TxParams {
    let current = TxParams {
        dr: uplink_dr,
        tx_power: state.tx_power,
        nb_trans: state.nb_trans,
    };
    let Some(required) = region::required_snr_for_dr(params.region, uplink_dr) else {
        return current; // not a LoRa data rate of the region
    };
    let mut out = current;
    // Lower the DR only when it is above the maximum; bring the power index into range.
    out.dr = out.dr.min(params.max_dr);
    out.tx_power = out.tx_power.min(params.max_tx_power);
    out.nb_trans = nb_trans_for_loss(current.nb_trans, state.packet_loss_percent());
    let Some(snr) = state.max_snr() else {
        return out;
    };
    let margin = snr - required - params.installation_margin_db;
    let n_step = (margin / 3.0) as i32; // truncation toward zero, as ChirpStack
    if n_step < 0 {
        let at_power = state
            .history
            .iter()
            .filter(|r| r.tx_power == state.tx_power)
            .count();
        if at_power < HISTORY_LEN {
            return out;
        }
    }
    let (tx_power, dr) = apply_steps(
        n_step,
        out.tx_power,
        out.dr,
        params.max_tx_power,
        params.max_dr,
    );
    out.tx_power = tx_power;
    out.dr = dr;
    out
}

/// The LinkADRReq command block that sets `desired` and leaves exactly `enabled_channels` on
/// (channel-mask blocks from [`region::link_adr_ch_mask_blocks`]). Every command carries the
/// same DataRate, TXPower and NbTrans: 1.0.2+ devices use those of the last one, and the
/// others are consistent with it.
pub fn link_adr_requests(
    region: Region,
    desired: TxParams,
    enabled_channels: &[usize],
) -> Result<Vec<LinkAdrReq>, RegionError> {
    Ok(region::link_adr_ch_mask_blocks(region, enabled_channels)?
        .into_iter()
        .map(|b| LinkAdrReq {
            dr: desired.dr,
            tx_power: desired.tx_power,
            ch_mask: b.ch_mask,
            ch_mask_cntl: b.ch_mask_cntl,
            nb_trans: desired.nb_trans,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lorawan::mac::{encode_downlink, DownlinkMac};
    use Region::*;

    fn eu868() -> AdrParams {
        AdrParams::new(EU868, false, DEFAULT_INSTALLATION_MARGIN_DB)
    }

    /// A state with `n` uplinks at consecutive FCnts, all with `snr`.
    fn with_history(n: u32, snr: f32, dr: u8) -> AdrState {
        let mut s = AdrState::new();
        for f in 0..n {
            assert!(s.record_uplink(f, snr, dr));
        }
        s
    }

    #[test]
    fn params_per_region() {
        let p = eu868();
        assert_eq!((p.min_dr, p.max_dr, p.max_tx_power), (0, 5, 7));
        let p = AdrParams::new(US915, false, 10.0);
        assert_eq!((p.min_dr, p.max_dr, p.max_tx_power), (0, 3, 10));
        let p = AdrParams::new(AS923_2, true, 10.0);
        assert_eq!((p.min_dr, p.max_dr, p.max_tx_power), (2, 5, 7));
        let p = AdrParams::new(IN865, false, 10.0);
        assert_eq!((p.min_dr, p.max_dr, p.max_tx_power), (0, 5, 10));
    }

    /// SF12 (DR0) heard at +10 dB in EU868, margin 10: 10 − (−20) − 10 = 20 dB → 6 steps:
    /// DR0 → DR5 (5 steps), then TXPower 0 → 1 (1 step).
    #[test]
    fn strong_sf12_device_goes_to_dr5_with_less_power() {
        let s = with_history(1, 10.0, 0);
        let d = s.decide(&eu868(), 0);
        assert_eq!(
            d,
            TxParams {
                dr: 5,
                tx_power: 1,
                nb_trans: 1
            }
        );
        // +25 dB: 35 dB → 11 steps: DR5 and TXPower 6.
        let s = with_history(1, 25.0, 0);
        assert_eq!(s.decide(&eu868(), 0).tx_power, 6);
        // +40 dB: capped at the region's last index, 7 (EU868: 2 dBm).
        let s = with_history(1, 40.0, 0);
        assert_eq!(
            (s.decide(&eu868(), 0).dr, s.decide(&eu868(), 0).tx_power),
            (5, 7)
        );
    }

    /// SNR −18 dB at SF12: −18 + 20 − 10 = −8 dB → −2 steps; the power is already at maximum
    /// (index 0), and the DR is never lowered.
    #[test]
    fn weak_sf12_device_stays_at_dr0_full_power() {
        for n in [1, 5, 20] {
            let s = with_history(n, -18.0, 0);
            assert_eq!(s.decide(&eu868(), 0), TxParams::default(), "{n} uplinks");
        }
    }

    /// Negative steps raise the power only with 20 uplinks at the current power.
    #[test]
    fn power_is_raised_only_with_a_full_history() {
        // Device at DR5, TXPower 4; SNR −5 at SF7: −5 + 7.5 − 10 = −7.5 → −2 steps.
        let mut s = AdrState::new();
        s.acknowledged(TxParams {
            dr: 5,
            tx_power: 4,
            nb_trans: 1,
        });
        for f in 0..19 {
            s.record_uplink(f, -5.0, 5);
        }
        assert_eq!(s.decide(&eu868(), 5).tx_power, 4, "19 uplinks: wait");
        s.record_uplink(19, -5.0, 5);
        assert_eq!(s.decide(&eu868(), 5).tx_power, 2, "20 uplinks: 2 steps up");
        // −20 dB: −22.5 → −7 steps, floored at index 0.
        let mut s = AdrState::new();
        s.acknowledged(TxParams {
            dr: 5,
            tx_power: 4,
            nb_trans: 1,
        });
        for f in 0..20 {
            s.record_uplink(f, -20.0, 5);
        }
        assert_eq!(s.decide(&eu868(), 5).tx_power, 0);
    }

    /// n_step truncates toward zero: margins in (−3, +3) dB change nothing.
    #[test]
    fn small_margins_are_a_hysteresis() {
        // SF12 at −8 dB: −8 + 20 − 10 = +2 dB → 0 steps.
        assert_eq!(with_history(1, -8.0, 0).decide(&eu868(), 0).dr, 0);
        // SF12 at −7 dB: +3 dB → 1 step.
        assert_eq!(with_history(1, -7.0, 0).decide(&eu868(), 0).dr, 1);
        // At TXPower 2, SF7 at +0.5 dB: 0.5 + 7.5 − 10 = −2 dB → 0 steps, even with 20 uplinks.
        let mut s = AdrState::new();
        s.acknowledged(TxParams {
            dr: 5,
            tx_power: 2,
            nb_trans: 1,
        });
        for f in 0..20 {
            s.record_uplink(f, 0.5, 5);
        }
        assert_eq!(s.decide(&eu868(), 5).tx_power, 2);
    }

    /// NbTrans from the loss rate: lost / (received + lost) over a full history of 20.
    #[test]
    fn loss_rates_to_nb_trans() {
        // 20 received, FCnts with `lost` gaps spread out.
        let state = |lost: u32, nb_trans: u8| {
            let mut s = AdrState::new();
            s.nb_trans = nb_trans;
            let mut f = 0;
            for i in 0..20 {
                if i > 0 && i <= lost {
                    f += 1; // skip one FCnt: one frame lost
                }
                s.record_uplink(f, 0.0, 5);
                f += 1;
            }
            s
        };
        let loss = |lost: u32| state(lost, 1).packet_loss_percent();
        assert_eq!(loss(0), 0.0);
        assert!((loss(1) - 100.0 / 21.0).abs() < 1e-4); // 4.76 %
        assert!((loss(2) - 200.0 / 22.0).abs() < 1e-4); // 9.09 %
        assert!((loss(3) - 300.0 / 23.0).abs() < 1e-4); // 13.0 %
        assert!((loss(10) - 100.0 / 3.0).abs() < 1e-4); // 33.3 %
                                                        // (lost frames, current NbTrans, expected NbTrans), ChirpStack's table.
        for (lost, cur, want) in [
            (0, 1, 1),
            (0, 2, 1),
            (0, 3, 2),
            (1, 1, 1), // 4.8 %
            (1, 3, 2),
            (2, 1, 1), // 9.1 % (ChirpStack, dividing by received frames: 10 % → 2)
            (2, 2, 2),
            (2, 3, 3),
            (3, 1, 2), // 13 %
            (3, 2, 3),
            (3, 3, 3),
            (8, 1, 2), // 28.6 %
            (9, 1, 3), // 31.0 %
            (10, 1, 3),
            (10, 2, 3),
        ] {
            let s = state(lost, cur);
            assert_eq!(
                s.decide(&eu868(), 5).nb_trans,
                want,
                "{lost} lost, NbTrans {cur}, {:.1} %",
                s.packet_loss_percent()
            );
        }
        // Fewer than 20 uplinks: loss counts as 0.
        let mut s = AdrState::new();
        s.nb_trans = 3;
        s.record_uplink(0, 0.0, 5);
        s.record_uplink(10, 0.0, 5);
        assert_eq!(s.packet_loss_percent(), 0.0);
        assert_eq!(s.decide(&eu868(), 5).nb_trans, 2);
        // ChirpStack's get_nb_trans vectors.
        assert_eq!(nb_trans_for_loss(3, 4.99), 2);
        assert_eq!(nb_trans_for_loss(2, 9.99), 2);
        assert_eq!(nb_trans_for_loss(3, 30.0), 3);
        assert_eq!(nb_trans_for_loss(0, 50.0), 3, "0 counts as 1");
        assert_eq!(nb_trans_for_loss(9, 0.0), 2, "above 3 counts as 3");
    }

    /// ChirpStack's `test_get_ideal_tx_power_index_and_dr` cases:
    /// (n_step, tx_power, dr, max_tx_power, max_dr) → (tx_power, dr).
    #[test]
    fn chirpstack_step_vectors() {
        for (n, p, dr, max_p, max_dr, want) in [
            (0, 1, 3, 5, 5, (1, 3)),
            (1, 1, 4, 5, 5, (1, 5)),
            (1, 1, 5, 5, 5, (2, 5)),
            (2, 1, 3, 5, 5, (1, 5)),
            (2, 1, 4, 5, 5, (2, 5)),
            (2, 1, 5, 5, 5, (3, 5)),
            (2, 5, 5, 5, 5, (5, 5)),
            (-1, 1, 5, 5, 5, (0, 5)),
            (-1, 0, 4, 5, 5, (0, 4)),
            (-10, 0, 4, 5, 5, (0, 4)),
        ] {
            assert_eq!(apply_steps(n, p, dr, max_p, max_dr), want, "{n} {p} {dr}");
        }
        assert_eq!(apply_steps(i32::MIN, 7, 0, 7, 5), (0, 0));
        assert_eq!(apply_steps(i32::MAX, 0, 0, 7, 5), (7, 5));
    }

    /// ChirpStack's `test_handle` cases (EU868).
    #[test]
    fn chirpstack_handle_vectors() {
        // "max dr exceeded, decrease dr": DR5 with max 4 → DR4.
        let mut p = eu868();
        p.max_dr = 4;
        p.max_tx_power = 5;
        p.installation_margin_db = 0.0;
        let s = with_history(1, 0.0, 5);
        assert_eq!(s.decide(&p, 5).dr, 4);
        // "increase dr": DR0, SNR −15, required −20, margin 0 → +5 dB → 1 step → DR1.
        p.max_dr = 5;
        let s = with_history(1, -15.0, 0);
        assert_eq!(
            s.decide(&p, 0),
            TxParams {
                dr: 1,
                tx_power: 0,
                nb_trans: 1
            }
        );
    }

    #[test]
    fn region_limits() {
        // US915: ADR uses DR0..3 (125 kHz); a DR4 (500 kHz) uplink is brought to DR3. Power
        // index up to 10.
        let us = AdrParams::new(US915, false, 10.0);
        let s = with_history(1, 30.0, 0);
        // SF10 at +30: 30 + 15 − 10 = 35 → 11 steps: DR0 → DR3 (3), TXPower 0 → 8.
        assert_eq!(s.decide(&us, 0).dr, 3);
        assert_eq!(s.decide(&us, 0).tx_power, 8);
        let s = with_history(1, 40.0, 0);
        assert_eq!(s.decide(&us, 0).tx_power, 10);
        let s = with_history(1, -5.0, 4);
        assert_eq!(s.decide(&us, 4).dr, 3);
        // KR920 tops out at index 7.
        let kr = AdrParams::new(KR920, false, 10.0);
        assert_eq!(with_history(1, 40.0, 0).decide(&kr, 0).tx_power, 7);
        // An index above the maximum (config change) is brought down to it.
        let mut s = with_history(1, -30.0, 0);
        s.tx_power = 12;
        assert_eq!(s.decide(&kr, 0).tx_power, 7);
        // Not a LoRa data rate of the region: nothing changes.
        let s = with_history(1, 30.0, 7);
        assert_eq!(
            s.decide(&eu868(), 7),
            TxParams {
                dr: 7,
                ..TxParams::default()
            }
        );
        // No history: only NbTrans is looked at.
        assert_eq!(AdrState::new().decide(&eu868(), 2).dr, 2);
    }

    #[test]
    fn history_bookkeeping() {
        let mut s = AdrState::new();
        assert!(s.record_uplink(5, 1.0, 0));
        assert!(!s.record_uplink(5, 9.0, 0), "NbTrans repetition");
        assert!(!s.record_uplink(6, f32::NAN, 0));
        assert_eq!(s.len(), 1);
        assert!(s.record_uplink(7, 2.0, 0));
        // A lower FCnt: counter reset, history restarts.
        assert!(s.record_uplink(0, 3.0, 0));
        assert_eq!(s.history().map(|r| r.f_cnt).collect::<Vec<_>>(), [0]);
        // At most 20 uplinks, the newest kept.
        for f in 1..50 {
            s.record_uplink(f, f as f32, 0);
        }
        assert_eq!(s.len(), HISTORY_LEN);
        assert_eq!(s.history().next().unwrap().f_cnt, 30);
        assert_eq!(s.max_snr(), Some(49.0));
        // Acknowledged changes restart the history; an unchanged ack keeps it.
        s.acknowledged(TxParams {
            dr: 0,
            tx_power: 0,
            nb_trans: 1,
        });
        assert_eq!(s.len(), HISTORY_LEN);
        s.acknowledged(TxParams {
            dr: 5,
            tx_power: 1,
            nb_trans: 1,
        });
        assert!(s.is_empty());
        assert_eq!((s.tx_power, s.nb_trans), (1, 1));
        // Records carry the acknowledged power.
        s.record_uplink(60, 0.0, 5);
        assert_eq!(s.history().next().unwrap().tx_power, 1);
        s.reset();
        assert_eq!(s, AdrState::new());
        assert_eq!(max_snr([1.0, f32::NAN, 4.5, -3.0]), Some(4.5));
        assert_eq!(max_snr([]), None);
    }

    /// Uplinks sent at another power are corrected by 2 dB per index step.
    #[test]
    fn snr_normalized_to_current_power() {
        let mut s = AdrState::new();
        s.tx_power = 3;
        s.record_uplink(1, 0.0, 0); // at index 3 (6 dB below MaxEIRP)
        s.tx_power = 0; // e.g. restored without clearing
        assert_eq!(s.max_snr(), Some(6.0));
        s.record_uplink(2, 5.0, 0);
        assert_eq!(s.max_snr(), Some(6.0));
    }

    #[test]
    fn when_to_send_link_adr_req() {
        let s = with_history(1, 10.0, 0);
        let p = eu868();
        // ADR bit set and a better setting exists.
        assert_eq!(
            s.evaluate(&p, 0, true, false),
            Some(TxParams {
                dr: 5,
                tx_power: 1,
                nb_trans: 1
            })
        );
        // ADR bit clear: nothing, unless the channel mask must change (then with the device's
        // current settings).
        assert_eq!(s.evaluate(&p, 0, false, false), None);
        assert_eq!(s.evaluate(&p, 0, false, true), Some(TxParams::default()));
        // Nothing to change.
        let weak = with_history(1, -18.0, 0);
        assert_eq!(weak.evaluate(&p, 0, true, false), None);
        assert!(!link_adr_req_needed(
            true,
            TxParams::default(),
            TxParams::default(),
            false
        ));
    }

    /// The LinkADRReq block for US915 sub-band 2 at DR3, TXPower 2, NbTrans 1: ChMaskCntl 7 with
    /// channel 65, then ChMaskCntl 0 with channels 8..15 (LoRaWAN 1.0.4 §5.3 byte layout).
    #[test]
    fn link_adr_request_bytes() {
        let desired = TxParams {
            dr: 3,
            tx_power: 2,
            nb_trans: 1,
        };
        let channels = region::sub_band_channels(US915, 2).unwrap();
        let reqs = link_adr_requests(US915, desired, &channels).unwrap();
        let cmds: Vec<DownlinkMac> = reqs.into_iter().map(DownlinkMac::LinkAdrReq).collect();
        assert_eq!(
            encode_downlink(&cmds).unwrap(),
            [0x03, 0x32, 0x02, 0x00, 0x71, 0x03, 0x32, 0x00, 0xFF, 0x01]
        );
        // EU868, channels 0..7, DR5 TXPower 1 NbTrans 1.
        let reqs = link_adr_requests(
            EU868,
            TxParams {
                dr: 5,
                tx_power: 1,
                nb_trans: 1,
            },
            &[0, 1, 2, 3, 4, 5, 6, 7],
        )
        .unwrap();
        let cmds: Vec<DownlinkMac> = reqs.into_iter().map(DownlinkMac::LinkAdrReq).collect();
        assert_eq!(
            encode_downlink(&cmds).unwrap(),
            [0x03, 0x51, 0xFF, 0x00, 0x01]
        );
        assert!(link_adr_requests(EU868, desired, &[]).is_err());
    }

    /// Devices with a mean SNR (at full power) from −25 to +25 dB and ±3 dB of fading, 50
    /// uplinks each, every decision acknowledged at once: none keeps less than the installation
    /// margin minus the fading on average (so none is pushed below the demodulation floor),
    /// every one reaches the data rates its margin surely allows, and a strong device reaches
    /// DR5 with its first uplink.
    #[test]
    fn simulated_devices_keep_their_margin() {
        let p = eu868();
        let mut x: u32 = 0x9E37_79B9;
        let mut fading = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x % 601) as f32 / 100.0 - 3.0 // −3.0 ..= +3.0 dB
        };
        for mean in -25..=25 {
            let mean = mean as f32;
            let mut s = AdrState::new();
            let mut dr = 0u8;
            let mut first_dr5 = None;
            for f in 0..50u32 {
                let snr = mean - 2.0 * f32::from(s.tx_power) + fading();
                s.record_uplink(f, snr, dr);
                if let Some(d) = s.evaluate(&p, dr, true, false) {
                    s.acknowledged(d);
                    dr = d.dr;
                }
                if dr == 5 && first_dr5.is_none() {
                    first_dr5 = Some(f);
                }
            }
            let required = region::required_snr_for_dr(EU868, dr).unwrap();
            let avg_margin = mean - 2.0 * f32::from(s.tx_power) - required;
            assert!(
                avg_margin >= p.installation_margin_db - 3.0 || (dr, s.tx_power) == (0, 0),
                "mean {mean}: DR{dr} TXPower {} leaves {avg_margin} dB",
                s.tx_power
            );
            // Every DR with 13.5 dB of mean margin is reached (one DR lower leaves ≥ 16 dB,
            // 6 dB above the installation margin even in the worst fading: a sure step).
            let sure = (0..=5u8)
                .rev()
                .find(|&d| mean - region::required_snr_for_dr(EU868, d).unwrap() >= 13.5);
            assert!(
                sure.is_none_or(|d| dr >= d),
                "mean {mean}: DR{dr}, {sure:?}"
            );
            // SF12 → SF7 at once needs 15 dB of measured margin: a mean of +8 dB or more.
            if mean >= 8.0 {
                assert_eq!(first_dr5, Some(0), "mean {mean}");
            }
        }
    }

    #[test]
    fn state_serde() {
        let mut s = with_history(3, 4.5, 2);
        s.tx_power = 1;
        let json = serde_json::to_string(&s).unwrap();
        let back: AdrState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        // Missing fields take the defaults (old stored sessions).
        let old: AdrState = serde_json::from_str("{}").unwrap();
        assert_eq!(old, AdrState::new());
        let p: TxParams = serde_json::from_str(r#"{"dr":3,"tx_power":2,"nb_trans":1}"#).unwrap();
        assert_eq!(p.dr, 3);
    }
}
