use super::*;
use crate::lorawan::mac::{DevStatusAns, NewChannelAns, RxParamSetupAns};
use Region::EU868;

fn policy() -> Policy {
    let (channels, extra_channels) =
        Policy::channels_for(EU868, None, region::extra_channels(EU868));
    Policy {
        region: EU868,
        adr: true,
        margin_db: 10.0,
        adr_min_history: 5,
        uplink_dwell: false,
        rx: RxSettings::region_default(EU868),
        channels,
        extra_channels,
        dev_status_interval_us: 0,
        max_attempts: 3,
    }
}

/// A device that already has every channel of the policy (as after a CFList).
fn device() -> MacState {
    MacState::joined(&policy())
}

fn up<'a>(f_cnt: u32, dr: u8, snr: f32, answers: &'a [UplinkMac]) -> UplinkFacts<'a> {
    UplinkFacts {
        f_cnt,
        dr: Some(dr),
        max_snr: snr,
        adr_bit: true,
        adr_ack_req: false,
        answers,
        gateway: Some(Eui64::from_u64(1)),
        now_us: 1_000_000 + i64::from(f_cnt) * 1_000_000,
    }
}

fn all_ack() -> UplinkMac {
    UplinkMac::LinkAdrAns(LinkAdrAns {
        power_ack: true,
        dr_ack: true,
        ch_mask_ack: true,
    })
}

#[test]
fn a_strong_device_at_sf12_is_moved_to_dr5_once_it_has_enough_history_and_acknowledges() {
    let p = policy();
    let mut s = device();
    // SF12 (DR0) heard at +10 dB: margin 10 - (-20) - 10 = 20 dB, 6 steps: DR5 and lower power.
    for f in 0..4 {
        let o = s.on_uplink(&p, &up(f, 0, 10.0, &[]));
        assert!(
            !o.needs_downlink,
            "no decision before {} uplinks",
            p.adr_min_history
        );
        assert!(!s.has_pending());
    }
    let o = s.on_uplink(&p, &up(4, 0, 10.0, &[]));
    assert!(o.needs_downlink);
    let (cmds, ev) = s.take_commands(15, &p);
    assert!(ev.is_empty());
    assert_eq!(cmds.len(), 1, "EU868: one LinkADRReq (ChMaskCntl 0)");
    // DataRate_TXPower: DR5 (0x5_) and TXPower 1 (6 steps: 5 for the DR, 1 for the power);
    // ChMask 0x00FF: channels 0..7 (3 defaults + 5 CFList channels); NbTrans 1.
    assert_eq!(cmds[0].cid, mac::cid::LINK_ADR);
    assert_eq!(cmds[0].payload, vec![0x51, 0xFF, 0x00, 0x01]);
    // Nothing applied before the answer.
    assert_eq!(s.dr, Some(0));
    // The device answers from its next uplink, sent with the new settings.
    let o = s.on_uplink(&p, &up(5, 5, -5.0, &[all_ack()]));
    assert_eq!(
        o.events,
        vec![MacEvent::AdrApplied(TxParams {
            dr: 5,
            tx_power: 1,
            nb_trans: 1
        })]
    );
    assert!(!s.has_pending());
    assert_eq!((s.dr, s.adr.tx_power), (Some(5), 1));
}

#[test]
fn a_refused_link_adr_req_is_not_asked_again_with_the_same_parameters() {
    let p = policy();
    let mut s = device();
    for f in 0..5 {
        s.on_uplink(&p, &up(f, 0, 10.0, &[]));
    }
    s.take_commands(15, &p);
    let nack = UplinkMac::LinkAdrAns(LinkAdrAns {
        power_ack: true,
        dr_ack: false,
        ch_mask_ack: true,
    });
    let o = s.on_uplink(&p, &up(5, 0, 10.0, &[nack]));
    assert!(matches!(o.events[..], [MacEvent::AdrRefused(_)]));
    for f in 6..30 {
        let o = s.on_uplink(&p, &up(f, 0, 10.0, &[]));
        assert!(!o.needs_downlink && !s.has_pending(), "uplink {f}");
    }
}

#[test]
fn adr_ack_req_always_asks_for_a_downlink() {
    let p = policy();
    let mut s = device();
    let mut u = up(0, 5, -5.0, &[]);
    u.adr_ack_req = true;
    assert!(s.on_uplink(&p, &u).needs_downlink);
    u.adr_bit = false;
    u.f_cnt = 1;
    assert!(s.on_uplink(&p, &u).needs_downlink);
}

#[test]
fn dev_status_is_asked_one_interval_after_the_first_uplink_and_the_answer_is_kept() {
    let mut p = policy();
    p.dev_status_interval_us = 10_000_000;
    let mut s = device();
    let o = s.on_uplink(&p, &up(0, 5, 0.0, &[]));
    assert!(!o.needs_downlink, "not at the first uplink");
    for f in 1..10 {
        assert!(!s.on_uplink(&p, &up(f, 5, 0.0, &[])).needs_downlink);
    }
    assert!(s.on_uplink(&p, &up(10, 5, 0.0, &[])).needs_downlink);
    let (cmds, _) = s.take_commands(15, &p);
    assert_eq!(
        cmds,
        vec![MacCmd {
            cid: 0x06,
            payload: vec![]
        }]
    );
    let ans = UplinkMac::DevStatusAns(DevStatusAns {
        battery: 128,
        margin: -7,
    });
    let u = up(11, 5, 0.0, std::slice::from_ref(&ans));
    let o = s.on_uplink(&p, &u);
    let st = DevStatus {
        battery: 128,
        margin: -7,
        received_at_us: u.now_us,
    };
    assert_eq!(o.events, vec![MacEvent::DevStatus(st)]);
    assert_eq!(s.dev_status, Some(st));
    assert!(!s.has_pending() && !o.needs_downlink);
}

#[test]
fn an_abp_device_is_moved_to_the_networks_rx2_and_told_the_extra_channels() {
    let mut p = policy();
    p.rx.rx2_dr = 3; // TTN's EU868 RX2 (SF9)
    let mut s = MacState::booted(EU868);
    assert_eq!(s.channels, Some(vec![0, 1, 2]));
    let o = s.on_uplink(&p, &up(0, 5, 0.0, &[]));
    assert!(o.needs_downlink);
    let kinds: Vec<u8> = s.pending.iter().map(|c| c.cmd.cid()).collect();
    assert_eq!(kinds, vec![0x05, 0x07, 0x07, 0x07, 0x07, 0x07]);
    // RXParamSetupReq (5 bytes) and two NewChannelReq (6 each) fit FOpts' 15 bytes... no:
    // 5 + 6 = 11, a second NewChannelReq would make 17.
    let (cmds, _) = s.take_commands(15, &p);
    assert_eq!(cmds.len(), 2);
    // RXParamSetupReq: DLsettings 0x03 (offset 0, DR3), 869.525 MHz = 8695250 (0x84ADD2) LE.
    assert_eq!(cmds[0].payload, vec![0x03, 0xD2, 0xAD, 0x84]);
    // NewChannelReq: index 3, 867.1 MHz = 8671000 (0x844F18) LE, DrRange DR0..DR5 (0x50).
    assert_eq!(cmds[1].payload, vec![3, 0x18, 0x4F, 0x84, 0x50]);
    let answers = [
        UplinkMac::RxParamSetupAns(RxParamSetupAns {
            rx1_dr_offset_ack: true,
            rx2_dr_ack: true,
            channel_ack: true,
        }),
        UplinkMac::NewChannelAns(NewChannelAns {
            channel_freq_ok: true,
            dr_range_ok: true,
        }),
    ];
    let o = s.on_uplink(&p, &up(1, 5, 0.0, &answers));
    assert!(
        o.needs_downlink,
        "RXParamSetupAns is sticky, and channels wait"
    );
    assert_eq!(s.rx.rx2_dr, 3);
    assert_eq!(s.channels, Some(vec![0, 1, 2, 3]));
    // A repeated (sticky) RXParamSetupAns changes nothing and asks for a downlink again.
    let o = s.on_uplink(&p, &up(2, 5, 0.0, &answers[..1]));
    assert!(o.needs_downlink && o.events.is_empty());
}

#[test]
fn an_unanswered_command_is_given_up_after_max_attempts_and_adr_waits_for_new_history() {
    let p = policy();
    let mut s = device();
    for f in 0..5 {
        s.on_uplink(&p, &up(f, 0, 10.0, &[]));
    }
    for _ in 0..p.max_attempts {
        assert_eq!(s.take_commands(15, &p).0.len(), 1);
    }
    let (cmds, ev) = s.take_commands(15, &p);
    assert!(cmds.is_empty());
    assert_eq!(ev, vec![MacEvent::GaveUp(mac::cid::LINK_ADR)]);
    assert!(s.adr.is_empty(), "history restarts");
    for f in 5..9 {
        assert!(!s.on_uplink(&p, &up(f, 0, 10.0, &[])).needs_downlink);
    }
    assert!(s.on_uplink(&p, &up(9, 0, 10.0, &[])).needs_downlink);
}

#[test]
fn a_link_adr_req_block_is_never_split() {
    let mut p = Policy {
        region: Region::US915,
        ..policy()
    };
    (p.channels, p.extra_channels) = Policy::channels_for(Region::US915, Some(2), &[]);
    p.rx = RxSettings::region_default(Region::US915);
    let mut s = MacState::booted(Region::US915);
    s.pending.push(Pending {
        cmd: DownlinkMac::DevStatusReq,
        attempts: 0,
    });
    for f in 0..5 {
        s.on_uplink(&p, &up(f, 0, 10.0, &[]));
    }
    // DevStatusReq (1 byte), then a two-command block (10 bytes): 11 fit, and 6 would cut
    // the block after DevStatusReq.
    assert_eq!(s.take_commands(15, &p).0.len(), 3);
    assert_eq!(s.take_commands(6, &p).0.len(), 1);
}

#[test]
fn the_stored_form_round_trips_and_an_unknown_version_reads_as_nothing() {
    let p = policy();
    let mut s = device();
    for f in 0..7 {
        s.on_uplink(&p, &up(f, 0, 3.0, &[]));
    }
    let b = stored::encode(&s).unwrap();
    assert_eq!(stored::decode(&b), Some(s.clone()));
    // The same bytes as postcard's own output after the version byte.
    assert_eq!(b, postcard::to_extend(&s, vec![1u8]).unwrap());
    let mut full = device();
    for f in 0..40 {
        full.on_uplink(&p, &up(f, 0, -7.25 + f as f32, &[]));
    }
    full.pending.push(Pending {
        cmd: DownlinkMac::DevStatusReq,
        attempts: 2,
    });
    let fb = stored::encode(&full).unwrap();
    assert_eq!(fb, postcard::to_extend(&full, vec![1u8]).unwrap());
    assert_eq!(stored::decode(&fb), Some(full));
    let mut other = b.clone();
    other[0] = 99;
    assert_eq!(stored::decode(&other), None);
}

#[test]
fn a_us915_device_gets_the_gateways_sub_band_at_its_first_uplink() {
    let mut p = Policy {
        region: Region::US915,
        ..policy()
    };
    (p.channels, p.extra_channels) = Policy::channels_for(Region::US915, Some(2), &[]);
    p.rx = RxSettings::region_default(Region::US915);
    let mut s = MacState::joined(&p);
    assert_eq!(
        s.channels, None,
        "a 1.0.2 device may have ignored the CFList mask"
    );
    let o = s.on_uplink(&p, &up(0, 0, 0.0, &[]));
    assert!(o.needs_downlink, "no history needed for the channel mask");
    let (cmds, _) = s.take_commands(15, &p);
    // Sub-band 2 = 125 kHz channels 8..15 and 500 kHz channel 65: ChMaskCntl 7 (all 125 kHz
    // off, 500 kHz mask 0x0002), then ChMaskCntl 0 with bits 8..15 (0xFF00), at the uplink's
    // DR0, TXPower 0, NbTrans 1.
    assert_eq!(cmds.len(), 2);
    assert_eq!(cmds[0].payload, vec![0x00, 0x02, 0x00, 0x71]);
    assert_eq!(cmds[1].payload, vec![0x00, 0x00, 0xFF, 0x01]);
    s.on_uplink(&p, &up(1, 0, 0.0, &[all_ack(), all_ack()]));
    assert_eq!(s.channels, Some((8..16).chain([65]).collect()));
    assert!(!s.has_pending());
}

#[test]
fn an_abp_device_is_only_given_channels_it_has_defined() {
    let p = policy();
    let mut s = MacState::abp(&p);
    assert_eq!(s.channels, Some(vec![0, 1, 2]));
    // Drop the NewChannelReqs: the device never answers them.
    s.on_uplink(&p, &up(0, 0, 10.0, &[]));
    s.pending.clear();
    for f in 1..5 {
        s.on_uplink(&p, &up(f, 0, 10.0, &[]));
    }
    let adr: Vec<_> = s
        .pending
        .iter()
        .filter_map(|c| match c.cmd {
            DownlinkMac::LinkAdrReq(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(adr.len(), 1);
    assert_eq!(
        adr[0].ch_mask, 0x0007,
        "channels 0..2 only: 3..7 are not defined"
    );
    assert_eq!((adr[0].dr, adr[0].tx_power), (5, 1));
}

#[test]
fn a_device_that_ignores_a_command_is_left_in_peace_for_a_while() {
    let p = policy();
    let mut s = MacState::abp(&p);
    let mut downlinks = 0;
    // The device never answers its NewChannelReqs (5 of them, two per FOpts).
    for f in 0..200 {
        if s.on_uplink(&p, &up(f, 5, 0.0, &[])).needs_downlink {
            downlinks += 1;
            s.take_commands(15, &p);
        }
    }
    // Three rounds of three attempts for the first two channels, one for the next two, one for
    // the last... at most a handful per quiet period, not one per uplink.
    assert!(downlinks <= 30, "{downlinks} downlinks for 200 uplinks");
    assert!(
        downlinks >= 9,
        "{downlinks}: the commands are retried after the quiet period"
    );
    // A refused RXParamSetupReq is not asked again at once either.
    let mut p2 = policy();
    p2.rx.rx2_dr = 3;
    let mut s = MacState::abp(&policy());
    s.on_uplink(&p2, &up(0, 5, 0.0, &[]));
    s.pending
        .retain(|c| matches!(c.cmd, DownlinkMac::RxParamSetupReq(_)));
    let nack = UplinkMac::RxParamSetupAns(RxParamSetupAns {
        rx1_dr_offset_ack: true,
        rx2_dr_ack: false,
        channel_ack: true,
    });
    let o = s.on_uplink(&p2, &up(1, 5, 0.0, &[nack]));
    assert_eq!(o.events, vec![MacEvent::RxRefused]);
    assert!(!s
        .pending
        .iter()
        .any(|c| matches!(c.cmd, DownlinkMac::RxParamSetupReq(_))));
}

/// The encoder that writes the stored form field by field against postcard's encoding of the
/// same state, over random states (every field, empty and full lists, edge values).
#[test]
fn the_stored_form_is_postcards_encoding_for_random_states() {
    let mut seed = 0x4D41_4353u64;
    let mut next = move || {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        seed.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    for _ in 0..3_000 {
        let mut s = device();
        s.adr.tx_power = next() as u8;
        s.adr.nb_trans = next() as u8;
        let mut f_cnt = (next() % 3) as u32 * (u32::MAX / 2);
        for _ in 0..next() % 25 {
            f_cnt = f_cnt.saturating_add(1 + (next() % 300) as u32);
            let snr = match next() % 4 {
                0 => f32::from_bits(next() as u32),
                _ => (next() % 400) as f32 / 8.0 - 25.0,
            };
            s.adr.record_uplink(f_cnt, snr, (next() % 16) as u8);
        }
        s.dr = (next() % 2 == 0).then(|| next() as u8);
        s.rx.rx1_dr_offset = next() as u8;
        s.rx.rx2_dr = next() as u8;
        s.rx.rx2_freq_hz = next() as u32 >> (next() % 32);
        s.rx.rx_delay = next() as u8;
        s.channels = match next() % 3 {
            0 => None,
            1 => Some(Vec::new()),
            _ => Some(
                (0..next() % 80)
                    .map(|_| (next() >> (next() % 64)) as usize)
                    .collect(),
            ),
        };
        // Every variant, with fields from the bits of `n`.
        let cmd = |n: u64| {
            let (a, b, c, d) = (
                (n >> 8) as u8,
                (n >> 16) as u8,
                (n >> 24) as u8,
                (n >> 32) as u8,
            );
            let wide = (n >> (8 + n % 32)) as u32;
            match n % 10 {
                0 => DownlinkMac::LinkCheckAns(mac::LinkCheckAns {
                    margin: a,
                    gw_cnt: b,
                }),
                1 => DownlinkMac::LinkAdrReq(mac::LinkAdrReq {
                    dr: a,
                    tx_power: b,
                    ch_mask: (n >> 40) as u16,
                    ch_mask_cntl: c,
                    nb_trans: d,
                }),
                2 => DownlinkMac::DutyCycleReq { max_duty_cycle: a },
                3 => DownlinkMac::RxParamSetupReq(RxParamSetupReq {
                    rx1_dr_offset: a,
                    rx2_dr: b,
                    freq_hz: wide,
                }),
                4 => DownlinkMac::DevStatusReq,
                5 => DownlinkMac::NewChannelReq(NewChannelReq {
                    index: a,
                    freq_hz: wide,
                    min_dr: b,
                    max_dr: c,
                }),
                6 => DownlinkMac::RxTimingSetupReq { delay: a },
                7 => DownlinkMac::TxParamSetupReq(mac::TxParamSetupReq {
                    downlink_dwell: a & 1 == 1,
                    uplink_dwell: b & 1 == 1,
                    max_eirp: c,
                }),
                8 => DownlinkMac::DlChannelReq(mac::DlChannelReq {
                    index: a,
                    freq_hz: wide,
                }),
                _ => DownlinkMac::DeviceTimeAns(mac::DeviceTimeAns {
                    gps_seconds: wide,
                    fraction: a,
                }),
            }
        };
        s.pending = (0..next() % 7)
            .map(|_| Pending {
                cmd: cmd(next()),
                attempts: next() as u8,
            })
            .collect();
        s.dev_status = (next() % 2 == 0).then(|| DevStatus {
            battery: next() as u8,
            margin: next() as u8 as i8,
            received_at_us: next() as i64,
        });
        s.dev_status_asked_us = (next() as i64) >> (next() % 64);
        s.last_gateway = (next() % 2 == 0).then(|| Eui64::from_u64(next()));
        s.refused_adr = (next() % 2 == 0).then(|| TxParams {
            dr: next() as u8,
            tx_power: next() as u8,
            nb_trans: next() as u8,
        });
        s.given_up = (0..next() % 5)
            .map(|_| (cmd(next()), next() as u16))
            .collect();
        let ours = stored::encode(&s).unwrap();
        assert_eq!(ours, postcard::to_extend(&s, vec![1u8]).unwrap(), "{s:?}");
        let back = stored::decode(&ours).unwrap();
        assert_eq!(stored::encode(&back).unwrap(), ours);
    }
}
