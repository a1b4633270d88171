//! The OTAA answer (LoRaWAN 1.0.x §6.2): a JoinRequest whose MIC checked out gets its DevNonce
//! checked and recorded, a new DevAddr and session keys, a pending session, and a JoinAccept
//! handed to the downlink scheduler; a `join` record tells the streams.

use super::{JoinCandidate, UplinkStage};
use crate::downlink::{window, JoinAcceptJob};
use crate::lorawan::otaa;
use crate::lorawan::session::{Session, SessionState};
use crate::model::{new_id, Join, Record};
use crate::store::OtaaSession;
use std::time::Instant;

/// What OTAA needs from the config.
#[derive(Debug, Clone)]
pub struct JoinSettings {
    /// Region and the RX settings the JoinAccept gives (DLSettings).
    pub plan: window::RxPlan,
    pub net_id: u32,
    /// US915/AU915: the gateway's sub-band, for a channel-mask CFList.
    pub sub_band: Option<u8>,
    /// Elsewhere: the extra uplink channels (Hz), for a frequency CFList.
    pub extra_channels: Vec<u32>,
}

impl JoinSettings {
    /// The CFList of a JoinAccept (`lorawan::region::join_cf_list`): the extra channels, or
    /// for US915/AU915 the configured sub-band's channel mask.
    pub fn cf_list(&self) -> Option<[u8; 16]> {
        crate::lorawan::region::join_cf_list(self.plan.region, self.sub_band, &self.extra_channels)
    }
}

impl UplinkStage {
    /// A valid JoinRequest: check the DevNonce, make a session, send the JoinAccept.
    pub(super) async fn answer_join(&mut self, j: JoinCandidate, records: &mut Vec<Record>) {
        let Some(best) =
            j.rx.iter()
                .max_by(|a, b| a.rx.snr.total_cmp(&b.rx.snr))
                .cloned()
        else {
            return;
        };
        let eui = j.request.dev_eui;
        let counts_up = self
            .registry
            .lock()
            .map(|r| r.device(j.device).dev_nonce_counts_up)
            .unwrap_or(false);
        // DevNonce must not repeat (1.0.x §6.2.4); recorded, with the next JoinNonce, and
        // fsynced before answering.
        let app_nonce = match self
            .store
            .accept_join(eui, j.request.dev_nonce, counts_up)
            .await
        {
            Ok(Some(join_nonce)) => join_nonce,
            Ok(None) => {
                self.metrics.uplink("join_replay");
                if self.warn.allow() {
                    tracing::warn!(dev_eui = %eui, dev_nonce = j.request.dev_nonce, counts_up, "JoinRequest with a DevNonce used before (or, for a LoRaWAN 1.0.4 device, not above the last one) ignored: replay");
                }
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot record a DevNonce; JoinRequest ignored");
                return;
            }
        };
        let (app_key, application, device, dev_addr) = {
            let Ok(reg) = self.registry.lock() else {
                return;
            };
            let d = reg.device(j.device);
            let Some(app_key) = d.app_key else { return };
            // A free DevAddr within the NetID.
            let mut dev_addr = otaa::dev_addr_for(self.join.net_id, rand::random());
            while reg.dev_addr_in_use(dev_addr) {
                dev_addr = otaa::dev_addr_for(self.join.net_id, rand::random());
            }
            (app_key, d.application.clone(), d.id.clone(), dev_addr)
        };
        let (nwk_s_key, app_s_key) =
            otaa::derive_session_keys(&app_key, app_nonce, self.join.net_id, j.request.dev_nonce);
        let plan = self.join.plan;
        let ja = otaa::JoinAccept {
            app_nonce,
            net_id: self.join.net_id,
            dev_addr,
            rx1_dr_offset: plan.rx1_dr_offset,
            rx2_dr: plan.rx2_dr,
            // RX1 one second after the uplink (RECEIVE_DELAY1), as for ABP devices.
            rx_delay: 1,
            cf_list: self.join.cf_list(),
        };
        let phy = otaa::encode_join_accept(&ja, &app_key);
        let pending = OtaaSession {
            dev_addr,
            nwk_s_key: nwk_s_key.0,
            app_s_key: app_s_key.0,
            rx1_dr_offset: plan.rx1_dr_offset,
            rx2_dr: plan.rx2_dr,
            rx_delay: 1,
        };
        if let Err(e) = self.store.save_otaa_pending(eui, &pending).await {
            tracing::error!(error = %e, "cannot store a new session; JoinRequest ignored");
            return;
        }
        if let Ok(mut reg) = self.registry.lock() {
            reg.set_pending(
                j.device,
                Session {
                    dev_addr,
                    nwk_s_key,
                    app_s_key,
                    state: SessionState {
                        dev_addr,
                        ..Default::default()
                    },
                },
            );
        }
        self.metrics.uplink("join_accepted");
        tracing::info!(%device, dev_eui = %eui, %dev_addr, "OTAA join accepted");
        if let Some(h) = &self.downlinks {
            let mut rx: Vec<_> = j.rx.iter().map(|r| r.rx.clone()).collect();
            rx.sort_by(|a, b| b.snr.total_cmp(&a.snr).then(b.rssi.cmp(&a.rssi)));
            let job = JoinAcceptJob {
                device: j.device,
                phy,
                rx,
                settings: best.settings.clone(),
                arrived: j
                    .rx
                    .iter()
                    .map(|r| r.arrived)
                    .min()
                    .unwrap_or_else(Instant::now),
            };
            if !h.join_accept(job) {
                self.metrics.downlink_event("join_accept_dropped");
            }
        }
        records.push(Record::Join(Join {
            id: new_id(),
            received_at_us: best.rx.received_at_us,
            application: application.to_string(),
            device: device.to_string(),
            dev_eui: eui,
            join_eui: j.request.join_eui,
            dev_addr,
            settings: best.settings.clone(),
            rx: j.rx.into_iter().map(|r| r.rx).collect(),
        }));
    }
}
