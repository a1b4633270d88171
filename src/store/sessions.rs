//! Device session state in the store.
//!
//! FCntUp (written by the uplink stage with each uplink) and FCntDown (written by the downlink
//! scheduler, fsynced before any downlink leaves) live under different keys, so neither task
//! can overwrite the other's newer value with an older copy. A downlink counter is never reused
//! after a crash: it is on disk before the PULL_RESP is sent.

use super::backend::Batch;
use super::{Store, StoreError, DEVICES, OTAA};
use crate::lorawan::otaa;
use crate::lorawan::session::SessionState;
use crate::model::{AesKey, DevAddr, Eui64};
use serde::{Deserialize, Serialize};

/// The persisted FCntDown of a session.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct FCntDown {
    dev_addr: DevAddr,
    next: u32,
}

/// A session obtained by an OTAA join, with its keys (the gateway holds keys anyway).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtaaSession {
    pub dev_addr: DevAddr,
    pub nwk_s_key: [u8; 16],
    pub app_s_key: [u8; 16],
    /// Join parameters the device was given (RX1 DR offset, RX2 DR, RX delay).
    pub rx1_dr_offset: u8,
    pub rx2_dr: u8,
    pub rx_delay: u8,
}

impl std::fmt::Debug for OtaaSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtaaSession")
            .field("dev_addr", &self.dev_addr)
            .field("keys", &"***")
            .finish()
    }
}

impl OtaaSession {
    pub fn keys(&self) -> (AesKey, AesKey) {
        (AesKey(self.nwk_s_key), AesKey(self.app_s_key))
    }
}

fn down_key(eui: Eui64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[..8].copy_from_slice(&eui.0);
    k[8] = b'd';
    k
}

/// The key of a device's MAC state.
pub(super) fn mac_key(eui: Eui64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[..8].copy_from_slice(&eui.0);
    k[8] = b'm';
    k
}

fn pending_key(eui: Eui64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[..8].copy_from_slice(&eui.0);
    k[8] = b'p';
    k
}

fn nonce_key(eui: Eui64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[..8].copy_from_slice(&eui.0);
    k[8] = b'n';
    k
}

fn join_nonce_key(eui: Eui64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[..8].copy_from_slice(&eui.0);
    k[8] = b'j';
    k
}

/// How many DevNonces are remembered per device (LoRaWAN 1.0.x asks the network to keep "a
/// certain number" of the last ones; 1.0.2/1.0.3 devices pick them at random).
pub const DEV_NONCE_HISTORY: usize = 256;

impl Store {
    /// Saved counters of every device (FCntUp and FCntDown merged).
    pub fn load_sessions(&self) -> Result<Vec<(Eui64, SessionState)>, StoreError> {
        let mut ups: Vec<(Eui64, SessionState)> = Vec::new();
        let mut downs: Vec<(Eui64, FCntDown)> = Vec::new();
        let mut all = std::collections::BTreeMap::new();
        self.engine()?.scan(DEVICES, |k, v| {
            all.insert(k.to_vec(), v.to_vec());
        })?;
        // FCntUp appended but not yet checkpointed (up to a minute of it) is newer than the
        // engine's: a reload that restores a device from here must not let those frames be
        // replayed.
        if let Ok(s) = self.inner.sessions.lock() {
            for (k, v) in s.iter().filter(|(k, _)| k.len() == 8) {
                all.insert(k.clone(), v.clone());
            }
        }
        for (k, v) in all {
            let Ok(eui) = <[u8; 8]>::try_from(&k[..k.len().min(8)]) else {
                continue;
            };
            match k.len() {
                8 => match postcard::from_bytes::<SessionState>(&v) {
                    Ok(st) => ups.push((Eui64(eui), st)),
                    Err(_) => {
                        tracing::warn!(dev_eui = %Eui64(eui), "ignoring an unreadable device state")
                    }
                },
                9 if k[8] == b'd' => {
                    if let Ok(d) = postcard::from_bytes::<FCntDown>(&v) {
                        downs.push((Eui64(eui), d));
                    }
                }
                _ => {}
            }
        }
        for (eui, d) in downs {
            match ups.iter_mut().find(|(e, _)| *e == eui) {
                Some((_, st)) if st.dev_addr == d.dev_addr => {
                    st.f_cnt_down = st.f_cnt_down.max(d.next)
                }
                // Counters of two sessions: the FCntUp of the old one is on disk, the new
                // one's only in the journal window a power cut lost (a joined OTAA device),
                // or the other way round. Both are given: the registry restores the one
                // whose DevAddr its session has, so a reserved FCntDown is never dropped.
                _ => ups.push((
                    eui,
                    SessionState {
                        dev_addr: d.dev_addr,
                        f_cnt_up: None,
                        f_cnt_down: d.next,
                    },
                )),
            }
        }
        Ok(ups)
    }

    /// Saved MAC states (encoded: [`crate::lorawan::mac_state::stored`]), by device.
    pub fn load_mac_states(&self) -> Result<Vec<(Eui64, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        self.engine()?.scan(DEVICES, |k, v| {
            if let (9, Some(b'm')) = (k.len(), k.get(8)) {
                if let Ok(eui) = <[u8; 8]>::try_from(&k[..8]) {
                    out.push((Eui64(eui), v.to_vec()));
                }
            }
        })?;
        // A state appended but not yet checkpointed is newer than the engine's.
        if let Ok(s) = self.inner.sessions.lock() {
            for (k, v) in s.iter() {
                if k.len() == 9 && k[8] == b'm' {
                    if let Ok(eui) = <[u8; 8]>::try_from(&k[..8]) {
                        out.retain(|(e, _)| e.0 != eui);
                        out.push((Eui64(eui), v.clone()));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Persist the next FCntDown and fsync. Call before the downlink that uses the previous
    /// value leaves.
    pub async fn save_f_cnt_down(
        &self,
        dev_eui: Eui64,
        dev_addr: DevAddr,
        next: u32,
    ) -> Result<(), StoreError> {
        let mut b = Batch::default();
        b.put(
            DEVICES,
            &down_key(dev_eui),
            &postcard::to_stdvec(&FCntDown { dev_addr, next })?,
        );
        self.write_now(b).await
    }

    /// Persist the next FCntDown of several devices (DevEUI, DevAddr of the session, next) in
    /// one commit and fsync: the scheduler reserves every known session's first block at
    /// start, and gives back what a run did not use when it stops (issue 16).
    pub async fn save_f_cnt_downs(
        &self,
        counters: &[(Eui64, DevAddr, u32)],
    ) -> Result<(), StoreError> {
        let mut b = Batch::default();
        for &(dev_eui, dev_addr, next) in counters {
            b.put(
                DEVICES,
                &down_key(dev_eui),
                &postcard::to_stdvec(&FCntDown { dev_addr, next })?,
            );
        }
        self.write_now(b).await
    }

    /// Save all counters of one device and fsync (used by tests and on join).
    pub async fn save_session(
        &self,
        dev_eui: Eui64,
        state: &SessionState,
    ) -> Result<(), StoreError> {
        let mut b = Batch::default();
        b.put(DEVICES, &dev_eui.0, &postcard::to_stdvec(state)?);
        b.put(
            DEVICES,
            &down_key(dev_eui),
            &postcard::to_stdvec(&FCntDown {
                dev_addr: state.dev_addr,
                next: state.f_cnt_down,
            })?,
        );
        self.write_now(b).await
    }

    /// The active and the pending (not yet used) OTAA session of a device.
    pub fn otaa_sessions(
        &self,
        dev_eui: Eui64,
    ) -> Result<(Option<OtaaSession>, Option<OtaaSession>), StoreError> {
        let engine = self.engine()?;
        let get = |k: &[u8]| -> Result<Option<OtaaSession>, StoreError> {
            Ok(engine
                .get(OTAA, k)?
                .and_then(|v| postcard::from_bytes(&v).ok()))
        };
        Ok((get(&dev_eui.0)?, get(&pending_key(dev_eui))?))
    }

    /// Keep the session of a JoinAccept beside the active one until the device uses it; fsync
    /// before the JoinAccept leaves, so a restart in between keeps both.
    pub async fn save_otaa_pending(
        &self,
        dev_eui: Eui64,
        s: &OtaaSession,
    ) -> Result<(), StoreError> {
        let mut b = Batch::default();
        b.put(OTAA, &pending_key(dev_eui), &postcard::to_stdvec(s)?);
        self.write_now(b).await
    }

    /// The device used its pending session: it replaces the active one. Its FCntDown starts
    /// at 0 (the registry's new session does); the stored FCntDown is not written here: it
    /// belongs to the old session's DevAddr and is ignored for the new one (`load_sessions`
    /// restores counters by DevAddr), and the scheduler may already have reserved the new
    /// session's first block, which a reset to 0 committed after it would undo: a crash
    /// would then reuse those counters.
    pub async fn promote_otaa(&self, dev_eui: Eui64) -> Result<(), StoreError> {
        let Some(p) = self.engine()?.get(OTAA, &pending_key(dev_eui))? else {
            return Ok(());
        };
        // One atomic commit: the new session, the pending one gone.
        let mut b = Batch::default();
        b.put(OTAA, &dev_eui.0, &p);
        b.delete(OTAA, &pending_key(dev_eui));
        self.write_now(b).await
    }

    /// Admit a JoinRequest: check its DevNonce against the device's history with
    /// [`otaa::dev_nonce_fresh`] (`counts_up` for LoRaWAN 1.0.4 devices), record it, and take the
    /// next JoinNonce (AppNonce) of the device — a per-device counter from 1, as LoRaWAN 1.0.4
    /// §6.2.3 requires ("incremented with every Join-accept"; 1.0.4 devices may refuse one that
    /// is not greater than the last) and which suits earlier devices as well. Both are fsynced
    /// before the JoinAccept is built, so a crash can neither make a DevNonce usable twice nor
    /// reuse a JoinNonce. `None`: the DevNonce was refused (a replay).
    pub async fn accept_join(
        &self,
        dev_eui: Eui64,
        nonce: u16,
        counts_up: bool,
    ) -> Result<Option<u32>, StoreError> {
        let mut used: Vec<u16> = match self.engine()?.get(OTAA, &nonce_key(dev_eui))? {
            Some(v) => postcard::from_bytes(&v).unwrap_or_default(),
            None => Vec::new(),
        };
        if !otaa::dev_nonce_fresh(&used, nonce, counts_up) {
            return Ok(None);
        }
        used.retain(|&n| n != nonce);
        used.push(nonce);
        if used.len() > DEV_NONCE_HISTORY {
            let cut = used.len() - DEV_NONCE_HISTORY;
            used.drain(..cut);
        }
        let join_nonce = match self.engine()?.get(OTAA, &join_nonce_key(dev_eui))? {
            Some(v) => postcard::from_bytes::<u32>(&v).unwrap_or(0),
            None => 0,
        }
        .wrapping_add(1)
            & 0x00FF_FFFF;
        let mut b = Batch::default();
        b.put(OTAA, &nonce_key(dev_eui), &postcard::to_stdvec(&used)?);
        b.put(
            OTAA,
            &join_nonce_key(dev_eui),
            &postcard::to_stdvec(&join_nonce)?,
        );
        self.write_now(b).await?;
        Ok(Some(join_nonce))
    }
}

#[cfg(test)]
mod join_tests {
    use super::*;
    use crate::config::StorageConfig;

    fn open(dir: &std::path::Path) -> Store {
        let cfg = StorageConfig {
            path: dir.join("db"),
            flush_every_ms: 0,
            ..Default::default()
        };
        Store::open(&cfg, &[]).unwrap().0
    }

    /// The scheduler's reservation for a joined device's new session is what a restart finds,
    /// whichever of it and the promotion commits first, and even when the last stored FCntUp
    /// is still the old session's (the joined uplink was in a journal window a power cut lost).
    #[tokio::test]
    async fn a_new_sessions_reserved_fcnt_down_survives_its_promotion() {
        let dir = tempfile::tempdir().unwrap();
        let eui = Eui64::from_u64(7);
        let (old, new) = (DevAddr(0x2600_0001), DevAddr(0x2600_0002));
        {
            let s = open(dir.path());
            let st = SessionState {
                dev_addr: old,
                f_cnt_up: Some(5),
                f_cnt_down: 40,
            };
            s.save_session(eui, &st).await.unwrap();
            let pending = OtaaSession {
                dev_addr: new,
                nwk_s_key: [1; 16],
                app_s_key: [2; 16],
                rx1_dr_offset: 0,
                rx2_dr: 0,
                rx_delay: 1,
            };
            s.save_otaa_pending(eui, &pending).await.unwrap();
            // The first downlink on the new session reserves before the promotion commits.
            s.save_f_cnt_down(eui, new, 16).await.unwrap();
            s.promote_otaa(eui).await.unwrap();
            // Other devices reserved together at start.
            s.save_f_cnt_downs(&[
                (Eui64::from_u64(8), DevAddr(8), 17),
                (Eui64::from_u64(9), DevAddr(9), 16),
            ])
            .await
            .unwrap();
        }
        let s = open(dir.path());
        assert_eq!(s.otaa_sessions(eui).unwrap().0.unwrap().dev_addr, new);
        let mut got: Vec<([u8; 8], u32, Option<u32>, u32)> = s
            .load_sessions()
            .unwrap()
            .into_iter()
            .map(|(e, st)| (e.0, st.dev_addr.0, st.f_cnt_up, st.f_cnt_down))
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                (eui.0, old.0, Some(5), 40),
                (eui.0, new.0, None, 16),
                (Eui64::from_u64(8).0, 8, None, 17),
                (Eui64::from_u64(9).0, 9, None, 16),
            ]
        );
    }

    #[tokio::test]
    async fn dev_nonces_are_remembered_bounded_and_join_nonces_count_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let eui = Eui64::from_u64(7);
        {
            let s = open(dir.path());
            // Random DevNonces (1.0.0-1.0.3): any unused value; a used one is a replay.
            assert_eq!(s.accept_join(eui, 500, false).await.unwrap(), Some(1));
            assert_eq!(s.accept_join(eui, 20, false).await.unwrap(), Some(2));
            assert_eq!(s.accept_join(eui, 500, false).await.unwrap(), None);
            // Another device has its own history and counter.
            let other = Eui64::from_u64(8);
            assert_eq!(s.accept_join(other, 500, false).await.unwrap(), Some(1));
        }
        let s = open(dir.path());
        assert_eq!(
            s.accept_join(eui, 20, false).await.unwrap(),
            None,
            "after reopen"
        );
        assert_eq!(s.accept_join(eui, 21, false).await.unwrap(), Some(3));
        // 1.0.4: counting up from the last one.
        assert_eq!(s.accept_join(eui, 21, true).await.unwrap(), None);
        assert_eq!(s.accept_join(eui, 22, true).await.unwrap(), Some(4));
        // The history is bounded: the oldest DevNonces are forgotten.
        for n in 1000..1000 + DEV_NONCE_HISTORY as u16 {
            assert!(s.accept_join(eui, n, false).await.unwrap().is_some());
        }
        assert!(
            s.accept_join(eui, 500, false).await.unwrap().is_some(),
            "forgotten after {DEV_NONCE_HISTORY} newer ones"
        );
        assert_eq!(s.accept_join(eui, 1000 + 10, false).await.unwrap(), None);
        let stored: Vec<u16> = postcard::from_bytes(
            &s.engine()
                .unwrap()
                .get(OTAA, &nonce_key(eui))
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(stored.len(), DEV_NONCE_HISTORY);
    }
}
