//! Device sessions and the uplink decision.
//!
//! The [`Registry`] holds every configured device with its current session (ABP from the config;
//! OTAA once joined) and answers one question per deduplicated frame: whose is it, is it
//! authentic, and is it new? Several devices may share a DevAddr: each candidate's NwkSKey is
//! tried and the MIC decides (LoRaWAN 1.0.x §6.1.1). The registry is plain data with no I/O and
//! no locks of its own: the daemon shares it between the uplink stage (FCntUp) and the downlink
//! scheduler (FCntDown) behind one mutex, and the caller persists [`SessionState`] after each
//! change.

use super::fcnt::{self, FCntCheck};
use super::frame::{self, DataUpHeader, Opened};
use crate::model::{AesKey, DevAddr, Eui64, FastMap};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// LoRaWAN device class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum DeviceClass {
    #[default]
    A,
    C,
}

/// Keys and counters of an active session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub dev_addr: DevAddr,
    pub nwk_s_key: AesKey,
    pub app_s_key: AesKey,
    pub state: SessionState,
}

/// The part of a session that changes and is persisted in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SessionState {
    /// DevAddr the counters belong to: a re-provisioned device starts from zero.
    pub dev_addr: DevAddr,
    /// Last accepted full FCntUp; `None` before the first uplink.
    pub f_cnt_up: Option<u32>,
    /// Next FCntDown to use.
    pub f_cnt_down: u32,
}

/// One configured device.
#[derive(Debug, Clone)]
pub struct Device {
    /// Shared with every uplink record and status-page line that names the device: cloning
    /// it per uplink is a reference count, not an allocation (issue 16).
    pub id: Arc<str>,
    pub application: Arc<str>,
    pub dev_eui: Eui64,
    pub class: DeviceClass,
    pub session: Option<Session>,
    /// OTAA: the root key and JoinEUI (None for ABP devices).
    pub app_key: Option<AesKey>,
    pub join_eui: Option<Eui64>,
    /// OTAA: the device's DevNonce is a counter (LoRaWAN 1.0.4), not a random value.
    pub dev_nonce_counts_up: bool,
    /// OTAA: a session from a JoinAccept the device has not used yet. The previous session
    /// stays valid until the first uplink on this one (LoRaWAN 1.0.x §6.2.5).
    pub pending: Option<Session>,
    /// The network may manage this device's data rate (`adr` of its `[[device]]`).
    pub adr: bool,
    /// ABP: a counter that restarts near 0 starts a new counting epoch instead of being
    /// refused as a replay (`resets_f_cnt`; see [`RESET_WINDOW`]).
    pub resets_f_cnt: bool,
    /// The network's MAC state of the device (ADR, pending commands, DevStatus, ...).
    pub mac: super::mac_state::MacState,
    /// Removed from the configuration by a reload: its index stays (work in flight names
    /// devices by index), nothing finds it any more ([`Registry::reload`]).
    pub removed: bool,
}

/// With `resets_f_cnt`, an on-air counter below this, lower than the last one, is a restart
/// of the device's counter. The price: a captured frame with such a counter is accepted again
/// once (documented in the README, "Devices that reset their frame counter").
pub const RESET_WINDOW: u16 = 16;

/// Outcome of [`Registry::open_join_request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinVerdict {
    /// Valid MIC from a configured OTAA device.
    Valid {
        device: usize,
        request: super::otaa::JoinRequest,
    },
    Malformed,
    UnknownDevEui(Eui64),
    MicFailed(Eui64),
}

/// Outcome of [`Registry::open_uplink`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Authentic and new: the session's FCntUp has been advanced in memory.
    Accepted {
        device: usize,
        f_cnt: u32,
        header: DataUpHeader,
        opened: Opened,
        /// First uplink on a session from a JoinAccept: it is now the device's session.
        joined: bool,
        /// The device restarted its counter (`resets_f_cnt`): a new counting epoch.
        reset: bool,
    },
    /// Not a data-up frame, or malformed.
    Malformed,
    /// No session has this DevAddr (probably a neighbour's device).
    UnknownDevAddr(DevAddr),
    /// Sessions with this DevAddr exist, but no key gives a valid MIC.
    MicFailed(DevAddr),
    /// Valid MIC, counter equal to the last one: a late copy or a retransmission.
    Repeat { device: usize, f_cnt: u32 },
    /// Valid MIC, counter older than the last one (or too far ahead): a replay.
    Replay { device: usize, f_cnt16: u16 },
}

/// What [`Registry::reload`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: usize,
    /// Same keys, other settings (class, application, ADR, ...): run-time state kept.
    pub changed: usize,
    /// Other keys (or activation): starts over as at a restart.
    pub rekeyed: usize,
    pub removed: usize,
    pub unchanged: usize,
}

/// The same device as far as the network is concerned: the same keys and addresses.
fn same_identity(a: &Device, b: &Device) -> bool {
    let abp = |d: &Device| {
        d.app_key.is_none().then(|| {
            d.session
                .as_ref()
                .map(|s| (s.dev_addr, s.nwk_s_key, s.app_s_key))
        })
    };
    match (a.app_key, b.app_key) {
        (Some(ka), Some(kb)) => ka == kb && a.join_eui == b.join_eui,
        (None, None) => abp(a) == abp(b),
        _ => false,
    }
}

#[derive(Default)]
pub struct Registry {
    devices: Vec<Device>,
    /// DevAddr → (device, is the pending session).
    by_addr: FastMap<DevAddr, Vec<(usize, bool)>>,
    by_id: FastMap<String, usize>,
    by_eui: FastMap<Eui64, usize>,
}

impl Registry {
    pub fn new(devices: Vec<Device>) -> Self {
        let mut r = Registry {
            devices,
            ..Default::default()
        };
        r.reindex();
        r
    }

    fn reindex(&mut self) {
        self.by_addr.clear();
        self.by_id.clear();
        self.by_eui.clear();
        for (i, d) in self.devices.iter().enumerate() {
            if d.removed {
                continue;
            }
            self.by_id.insert(d.id.to_string(), i);
            self.by_eui.insert(d.dev_eui, i);
            if let Some(s) = &d.pending {
                self.by_addr.entry(s.dev_addr).or_default().push((i, true));
            }
            if let Some(s) = &d.session {
                self.by_addr.entry(s.dev_addr).or_default().push((i, false));
            }
        }
    }

    /// DevAddrs in use (to allocate a new one).
    pub fn dev_addr_in_use(&self, a: DevAddr) -> bool {
        self.by_addr.contains_key(&a)
    }

    /// Check a JoinRequest: known OTAA device and valid MIC.
    pub fn open_join_request(&self, phy: &[u8]) -> JoinVerdict {
        let Ok(request) = super::otaa::parse_join_request(phy) else {
            return JoinVerdict::Malformed;
        };
        let Some(&idx) = self.by_eui.get(&request.dev_eui) else {
            return JoinVerdict::UnknownDevEui(request.dev_eui);
        };
        let d = &self.devices[idx];
        let Some(key) = &d.app_key else {
            return JoinVerdict::UnknownDevEui(request.dev_eui);
        };
        if d.join_eui.is_some_and(|j| j != request.join_eui)
            || !super::otaa::join_request_mic_ok(phy, key)
        {
            return JoinVerdict::MicFailed(request.dev_eui);
        }
        JoinVerdict::Valid {
            device: idx,
            request,
        }
    }

    /// Record a session from a JoinAccept; it becomes active with the device's first uplink.
    pub fn set_pending(&mut self, idx: usize, session: Session) {
        if let Some(d) = self.devices.get_mut(idx) {
            d.pending = Some(session);
        }
        self.reindex();
    }

    /// Every device, removed ones included (check [`Device::removed`]): indexes are stable.
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// Take the devices of a new configuration (`fresh`: built from it and the store, as at
    /// start) without disturbing the others. A device found by its DevEUI with the same
    /// identity (ABP: DevAddr and session keys; OTAA: AppKey and JoinEUI) keeps its index and
    /// everything it learned at run time (frame counters, OTAA session, MAC state) and takes
    /// the new settings (id, application, class, ADR, counter resets); one whose identity
    /// changed starts as a restart would start it; a new one is added; a device no longer
    /// configured is removed (its index kept as a tombstone; a later reload may bring it back
    /// there).
    pub fn reload(&mut self, fresh: Registry) -> ReloadSummary {
        let mut sum = ReloadSummary::default();
        let mut seen = vec![false; self.devices.len()];
        // Tombstones included: a device that comes back takes its old index.
        let mut index: HashMap<Eui64, usize> = self
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| (d.dev_eui, i))
            .collect();
        for new in fresh.devices {
            match index.get(&new.dev_eui).copied() {
                None => {
                    index.insert(new.dev_eui, self.devices.len());
                    seen.push(true);
                    self.devices.push(new);
                    sum.added += 1;
                }
                Some(i) => {
                    seen[i] = true;
                    let d = &mut self.devices[i];
                    if d.removed {
                        *d = new;
                        sum.added += 1;
                    } else if same_identity(d, &new) {
                        let settings_changed = d.id != new.id
                            || d.application != new.application
                            || d.class != new.class
                            || d.adr != new.adr
                            || d.resets_f_cnt != new.resets_f_cnt
                            || d.dev_nonce_counts_up != new.dev_nonce_counts_up;
                        d.id = new.id;
                        d.application = new.application;
                        d.class = new.class;
                        d.adr = new.adr;
                        d.resets_f_cnt = new.resets_f_cnt;
                        d.dev_nonce_counts_up = new.dev_nonce_counts_up;
                        if settings_changed {
                            sum.changed += 1;
                        } else {
                            sum.unchanged += 1;
                        }
                    } else {
                        // Counters belong to the DevAddr (as the store keeps them): with the
                        // same DevAddr, what this run counted is newer than what the fresh
                        // registry read from the store (FCntUp not yet checkpointed, FCntDown
                        // sent while the reload was prepared), and going back would let
                        // replays in or send an FCntDown twice.
                        let mut new = new;
                        if let (Some(old), Some(s)) = (&d.session, &mut new.session) {
                            if old.dev_addr == s.dev_addr {
                                s.state.f_cnt_up = s.state.f_cnt_up.max(old.state.f_cnt_up);
                                s.state.f_cnt_down = s.state.f_cnt_down.max(old.state.f_cnt_down);
                            }
                        }
                        *d = new;
                        sum.rekeyed += 1;
                    }
                }
            }
        }
        for (i, was) in seen.into_iter().enumerate() {
            let d = &mut self.devices[i];
            if !was && !d.removed {
                d.removed = true;
                d.session = None;
                d.pending = None;
                d.app_key = None;
                sum.removed += 1;
            }
        }
        self.reindex();
        sum
    }

    pub fn device(&self, idx: usize) -> &Device {
        &self.devices[idx]
    }

    pub fn device_mut(&mut self, idx: usize) -> &mut Device {
        &mut self.devices[idx]
    }

    pub fn find(&self, id: &str) -> Option<usize> {
        self.by_id.get(id).copied()
    }

    /// Restore persisted counters to the session, or the pending one, with their DevAddr
    /// (ignored when neither has it). A pending session may have counters: the device used it
    /// and the scheduler reserved its FCntDown just before a crash that kept the promotion
    /// from the disk.
    pub fn restore(&mut self, idx: usize, state: SessionState) {
        let Some(d) = self.devices.get_mut(idx) else {
            return;
        };
        for s in [d.session.as_mut(), d.pending.as_mut()]
            .into_iter()
            .flatten()
        {
            if s.dev_addr == state.dev_addr {
                s.state = state;
            }
        }
    }

    /// Replace a device's session (OTAA join), keeping the DevAddr index right.
    pub fn set_session(&mut self, idx: usize, session: Session) {
        if let Some(d) = self.devices.get_mut(idx) {
            d.session = Some(session);
        }
        self.reindex();
    }

    /// Authenticate, classify and decrypt one uplink data frame.
    pub fn open_uplink(&mut self, phy: &[u8]) -> Verdict {
        let Ok(header) = frame::peek_data_up(phy) else {
            return Verdict::Malformed;
        };
        let Some(candidates) = self.by_addr.get(&header.dev_addr) else {
            return Verdict::UnknownDevAddr(header.dev_addr);
        };
        for &(idx, pending) in candidates {
            let d = &mut self.devices[idx];
            let Some(s) = (if pending {
                d.pending.as_mut()
            } else {
                d.session.as_mut()
            }) else {
                continue;
            };
            // Prepared per uplink, not kept: the `aes` crate's schedule has room for its
            // software implementation (704 bytes), so keeping both keys of 1,000 sessions
            // cost 1.5 MiB of RSS (issue 16); preparing one costs ~500 instructions.
            let nwk = frame::KeyCipher::new(&s.nwk_s_key);
            let full = fcnt::extend(s.state.f_cnt_up, header.f_cnt16);
            let mic = frame::mic_ok_with(phy, &nwk, full);
            // An ABP device that restarted its counter: the frame authenticates with the small
            // on-air counter itself (the extension assumed it rolled over, or it is "old").
            let restart = d.resets_f_cnt
                && d.app_key.is_none()
                && header.f_cnt16 < RESET_WINDOW
                && s.state
                    .f_cnt_up
                    .is_some_and(|l| u32::from(header.f_cnt16) < l)
                && !matches!(
                    fcnt::check(s.state.f_cnt_up, header.f_cnt16),
                    FCntCheck::Fresh(_)
                )
                && frame::mic_ok_with(phy, &nwk, u32::from(header.f_cnt16));
            if !mic && !restart {
                continue;
            }
            let verdict = if restart {
                FCntCheck::Fresh(u32::from(header.f_cnt16))
            } else {
                fcnt::check(s.state.f_cnt_up, header.f_cnt16)
            };
            return match verdict {
                FCntCheck::Fresh(f_cnt) => {
                    let app = frame::KeyCipher::new(&s.app_s_key);
                    let opened = match frame::decrypt_with(phy, &nwk, &app, f_cnt) {
                        Ok(o) => o,
                        Err(_) => return Verdict::Malformed,
                    };
                    s.state.f_cnt_up = Some(f_cnt);
                    if pending {
                        // The device uses its new session: the old one is gone for good.
                        d.session = d.pending.take();
                        self.reindex();
                    }
                    Verdict::Accepted {
                        device: idx,
                        f_cnt,
                        header,
                        opened,
                        joined: pending,
                        reset: restart,
                    }
                }
                FCntCheck::Repeat(f_cnt) => Verdict::Repeat { device: idx, f_cnt },
                FCntCheck::Old => Verdict::Replay {
                    device: idx,
                    f_cnt16: header.f_cnt16,
                },
            };
        }
        Verdict::MicFailed(header.dev_addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lorawan::frame::{encode, DataFrame};

    fn dev(id: &str, addr: u32, seed: u8) -> Device {
        Device {
            id: id.into(),
            application: "app".into(),
            dev_eui: Eui64::from_u64(seed as u64),
            class: DeviceClass::A,
            app_key: None,
            join_eui: None,
            dev_nonce_counts_up: false,
            pending: None,
            adr: true,
            resets_f_cnt: false,
            removed: false,
            mac: crate::lorawan::mac_state::MacState::booted(crate::lorawan::region::Region::EU868),
            session: Some(Session {
                dev_addr: DevAddr(addr),
                nwk_s_key: AesKey([seed; 16]),
                app_s_key: AesKey([seed.wrapping_add(100); 16]),
                state: SessionState {
                    dev_addr: DevAddr(addr),
                    ..Default::default()
                },
            }),
        }
    }

    fn frame_for(d: &Device, f_cnt: u32, payload: &[u8]) -> Vec<u8> {
        let s = d.session.as_ref().unwrap();
        encode(
            &DataFrame {
                uplink: true,
                confirmed: false,
                dev_addr: s.dev_addr,
                f_cnt,
                adr: false,
                adr_ack_req: false,
                ack: false,
                f_pending: false,
                f_port: Some(1),
                payload,
                mac: &[],
            },
            &s.nwk_s_key,
            &s.app_s_key,
        )
        .unwrap()
    }

    /// A reload that re-keys a device but keeps its DevAddr (e.g. only the AppSKey changed)
    /// keeps the counters this run reached when they are ahead of the fresh registry's (read
    /// from the store): neither FCntUp nor FCntDown goes back. A new DevAddr starts afresh.
    #[test]
    fn a_rekeyed_device_with_its_devaddr_keeps_the_counters_it_reached() {
        let mut live = dev("a", 0x2600_0001, 1);
        live.session.as_mut().unwrap().state.f_cnt_up = Some(70);
        live.session.as_mut().unwrap().state.f_cnt_down = 40;
        let mut r = Registry::new(vec![live]);
        // The store lags: it held FCntUp 60 and FCntDown 32 when the reload read it.
        let mut rekeyed = dev("a", 0x2600_0001, 1);
        rekeyed.session.as_mut().unwrap().app_s_key = AesKey([9; 16]);
        rekeyed.session.as_mut().unwrap().state.f_cnt_up = Some(60);
        rekeyed.session.as_mut().unwrap().state.f_cnt_down = 32;
        let sum = r.reload(Registry::new(vec![rekeyed]));
        assert_eq!(sum.rekeyed, 1);
        let s = r.devices()[0].session.as_ref().unwrap();
        assert_eq!(s.app_s_key, AesKey([9; 16]));
        assert_eq!((s.state.f_cnt_up, s.state.f_cnt_down), (Some(70), 40));
        // Another DevAddr: another session, its own counters.
        let moved = dev("a", 0x2600_0009, 1);
        r.reload(Registry::new(vec![moved]));
        let s = r.devices()[0].session.as_ref().unwrap();
        assert_eq!((s.state.f_cnt_up, s.state.f_cnt_down), (None, 0));
    }

    #[test]
    fn shared_devaddr_mic_decides_and_replays_are_caught() {
        let a = dev("a", 0x2600_0001, 1);
        let b = dev("b", 0x2600_0001, 2);
        let fb = frame_for(&b, 5, b"from-b");
        let mut r = Registry::new(vec![a, b]);
        match r.open_uplink(&fb) {
            Verdict::Accepted {
                device,
                f_cnt,
                opened,
                ..
            } => {
                assert_eq!(&*r.device(device).id, "b");
                assert_eq!(f_cnt, 5);
                assert_eq!(opened.frm_payload, b"from-b");
            }
            v => panic!("unexpected {v:?}"),
        }
        assert_eq!(
            r.open_uplink(&fb),
            Verdict::Repeat {
                device: 1,
                f_cnt: 5
            }
        );
        let old = frame_for(r.device(1), 4, b"x");
        assert_eq!(
            r.open_uplink(&old),
            Verdict::Replay {
                device: 1,
                f_cnt16: 4
            }
        );
        let stranger = frame_for(&dev("c", 0x2600_0009, 3), 1, b"x");
        assert_eq!(
            r.open_uplink(&stranger),
            Verdict::UnknownDevAddr(DevAddr(0x2600_0009))
        );
        let forged = frame_for(&dev("d", 0x2600_0001, 9), 6, b"x");
        assert_eq!(
            r.open_uplink(&forged),
            Verdict::MicFailed(DevAddr(0x2600_0001))
        );
        assert_eq!(r.open_uplink(b"\x40short"), Verdict::Malformed);
    }

    #[test]
    fn counter_rolls_over_and_restores() {
        let d = dev("a", 0x2600_0001, 1);
        let f = frame_for(&d, 0x1_0000, b"after-rollover");
        let mut r = Registry::new(vec![d]);
        r.restore(
            0,
            SessionState {
                dev_addr: DevAddr(0x2600_0001),
                f_cnt_up: Some(0xFFFF),
                f_cnt_down: 3,
            },
        );
        assert!(matches!(
            r.open_uplink(&f),
            Verdict::Accepted {
                f_cnt: 0x1_0000,
                ..
            }
        ));
        // Counters stored for another DevAddr are not applied.
        r.restore(
            0,
            SessionState {
                dev_addr: DevAddr(7),
                f_cnt_up: Some(1),
                f_cnt_down: 0,
            },
        );
        let s = r.device(0).session.as_ref().unwrap();
        assert_eq!(s.state.f_cnt_up, Some(0x1_0000));
    }

    #[test]
    fn an_abp_counter_restart_is_accepted_only_with_resets_f_cnt() {
        let verdict = |resets: bool, otaa: bool| {
            let mut d = dev("a", 0x2600_0001, 1);
            d.resets_f_cnt = resets;
            if otaa {
                d.app_key = Some(AesKey([7; 16]));
            }
            let mut r = Registry::new(vec![d]);
            for f in [100, 101] {
                let up = frame_for(r.device(0), f, b"x");
                assert!(matches!(
                    r.open_uplink(&up),
                    Verdict::Accepted { reset: false, .. }
                ));
            }
            // The device lost power and counts from 0 again.
            let restarted = frame_for(r.device(0), 0, b"again");
            let v = r.open_uplink(&restarted);
            let next = frame_for(r.device(0), 1, b"next");
            (v, r.open_uplink(&next))
        };
        let (v, next) = verdict(true, false);
        assert!(
            matches!(
                v,
                Verdict::Accepted {
                    f_cnt: 0,
                    reset: true,
                    ..
                }
            ),
            "{v:?}"
        );
        assert!(matches!(
            next,
            Verdict::Accepted {
                f_cnt: 1,
                reset: false,
                ..
            }
        ));
        // Without the option, or for a device that joins (a new session resets counters):
        // a replay.
        for (resets, otaa) in [(false, false), (true, true)] {
            let (v, _) = verdict(resets, otaa);
            assert_eq!(
                v,
                Verdict::Replay {
                    device: 0,
                    f_cnt16: 0
                },
                "{resets} {otaa}"
            );
        }
        // A restart is a counter near 0: 16 and above stays a replay.
        let mut d = dev("a", 0x2600_0001, 1);
        d.resets_f_cnt = true;
        let mut r = Registry::new(vec![d]);
        let up = frame_for(r.device(0), 100, b"x");
        r.open_uplink(&up);
        let old = frame_for(r.device(0), u32::from(RESET_WINDOW), b"x");
        assert!(matches!(r.open_uplink(&old), Verdict::Replay { .. }));
    }
}
