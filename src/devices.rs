//! The device registry the pipeline works with: built from the configured devices, then given
//! back what the store kept across restarts (OTAA sessions, frame counters).
//!
//! The registry itself (lookup by DevAddr, MIC, counters) is pure and lives in
//! [`crate::lorawan::session`]; this is where the config and the store meet it.

use crate::config::{Activation, Config};
use crate::lorawan::mac_state::{self, MacState, Policy, RxSettings};
use crate::lorawan::session::{Device, Registry, Session, SessionState};
use crate::store::{OtaaSession, Store, StoreError};
use std::sync::Arc;
use std::time::Duration;

/// A network command not answered after this many downlinks is given up.
const MAC_MAX_ATTEMPTS: u8 = 3;
/// ADR decides once the history holds this many uplinks.
const ADR_MIN_HISTORY: usize = 10;

/// The registry for `cfg`'s devices, with their stored OTAA sessions, counters and MAC state.
pub fn registry(cfg: &Config, store: &Store) -> Result<Registry, StoreError> {
    let mut registry = from_config(cfg);
    restore_otaa(&mut registry, store)?;
    for (eui, st) in store.load_sessions()? {
        if let Some(idx) = registry.devices().iter().position(|d| d.dev_eui == eui) {
            registry.restore(idx, st);
        }
    }
    for (eui, bytes) in store.load_mac_states()? {
        let Some(idx) = registry.devices().iter().position(|d| d.dev_eui == eui) else {
            continue;
        };
        match mac_state::stored::decode(&bytes) {
            Some(m) => registry.device_mut(idx).mac = m,
            None => {
                tracing::warn!(dev_eui = %eui, "the stored MAC state of a device cannot be read (written by a newer version?); starting from its defaults")
            }
        }
    }
    Ok(registry)
}

/// What the network wants of every device's MAC layer (`adr` is the gateway's; the uplink
/// stage also asks the device's own `adr`).
pub fn mac_policy(cfg: &Config) -> Policy {
    let g = &cfg.gateway;
    let plan = crate::downlink::window::RxPlan::new(g.region, g.rx2_dr);
    let (channels, extra_channels) =
        Policy::channels_for(g.region, g.sub_band, &g.extra_channels_hz());
    Policy {
        region: g.region,
        adr: g.adr,
        margin_db: g.adr_margin_db,
        adr_min_history: ADR_MIN_HISTORY,
        // AS923 devices boot with the 400 ms dwell time on (RP002-1.0.4 AS923), and
        // lorastream never lifts it (no TxParamSetupReq): ADR keeps to the data rates it allows.
        uplink_dwell: g.region.is_as923(),
        rx: RxSettings {
            rx1_dr_offset: plan.rx1_dr_offset,
            rx2_dr: plan.rx2_dr,
            rx2_freq_hz: plan.rx2_freq_hz,
            rx_delay: 1,
        },
        channels,
        extra_channels,
        dev_status_interval_us: i64::try_from(
            cfg.gateway
                .dev_status_interval
                .min(Duration::from_secs(10 * 365 * 24 * 3600))
                .as_micros(),
        )
        .unwrap_or(i64::MAX),
        max_attempts: MAC_MAX_ATTEMPTS,
    }
}

/// Devices of the config as registry entries (ABP sessions; OTAA devices wait for a join).
/// Their MAC state starts as the network wants it (an ABP device is configured for this
/// gateway, an OTAA device's JoinAccept tells it); a stored state replaces it.
pub fn from_config(cfg: &Config) -> Registry {
    let policy = mac_policy(cfg);
    let devices = cfg
        .devices
        .iter()
        .map(|d| {
            let (session, app_key, join_eui) = match &d.activation {
                Activation::Abp {
                    dev_addr,
                    nwk_s_key,
                    app_s_key,
                } => (
                    Some(Session {
                        dev_addr: *dev_addr,
                        nwk_s_key: *nwk_s_key,
                        app_s_key: *app_s_key,
                        state: SessionState {
                            dev_addr: *dev_addr,
                            ..Default::default()
                        },
                    }),
                    None,
                    None,
                ),
                Activation::Otaa { join_eui, app_key } => (None, Some(*app_key), *join_eui),
            };
            Device {
                id: Arc::from(d.id.as_str()),
                application: Arc::from(d.application.as_str()),
                dev_eui: d.dev_eui,
                class: d.class,
                app_key,
                join_eui,
                dev_nonce_counts_up: d.lorawan_version.dev_nonce_counts_up(),
                pending: None,
                session,
                adr: d.adr,
                resets_f_cnt: d.resets_f_cnt,
                mac: MacState::abp(&policy),
                removed: false,
            }
        })
        .collect();
    Registry::new(devices)
}

/// Put the joined (and pending) sessions of OTAA devices back into the registry.
fn restore_otaa(registry: &mut Registry, store: &Store) -> Result<(), StoreError> {
    let otaa: Vec<(usize, crate::model::Eui64)> = registry
        .devices()
        .iter()
        .enumerate()
        .filter(|(_, d)| d.app_key.is_some())
        .map(|(i, d)| (i, d.dev_eui))
        .collect();
    let to_session = |s: OtaaSession| {
        let (nwk_s_key, app_s_key) = s.keys();
        Session {
            dev_addr: s.dev_addr,
            nwk_s_key,
            app_s_key,
            state: SessionState {
                dev_addr: s.dev_addr,
                ..Default::default()
            },
        }
    };
    for (i, eui) in otaa {
        let (active, pending) = store.otaa_sessions(eui)?;
        if let Some(a) = active {
            registry.set_session(i, to_session(a));
        }
        if let Some(p) = pending {
            registry.set_pending(i, to_session(p));
        }
    }
    Ok(())
}
