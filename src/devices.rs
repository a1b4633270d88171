//! The device registry the pipeline works with: built from the configured devices, then given
//! back what the store kept across restarts (OTAA sessions, frame counters).
//!
//! The registry itself (lookup by DevAddr, MIC, counters) is pure and lives in
//! [`crate::lorawan::session`]; this is where the config and the store meet it.

use crate::config::{Activation, Config};
use crate::lorawan::session::{Device, Registry, Session, SessionState};
use crate::store::{OtaaSession, Store, StoreError};

/// The registry for `cfg`'s devices, with their stored OTAA sessions and counters.
pub fn registry(cfg: &Config, store: &Store) -> Result<Registry, StoreError> {
    let mut registry = from_config(cfg);
    restore_otaa(&mut registry, store)?;
    for (eui, st) in store.load_sessions()? {
        if let Some(idx) = registry.devices().iter().position(|d| d.dev_eui == eui) {
            registry.restore(idx, st);
        }
    }
    Ok(registry)
}

/// Devices of the config as registry entries (ABP sessions; OTAA devices wait for a join).
pub fn from_config(cfg: &Config) -> Registry {
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
                id: d.id.clone(),
                application: d.application.clone(),
                dev_eui: d.dev_eui,
                class: d.class,
                app_key,
                join_eui,
                dev_nonce_counts_up: d.lorawan_version.dev_nonce_counts_up(),
                pending: None,
                session,
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
