//! How queued records are written, and how records written by older versions are read.
//!
//! A record is `[TAG, VERSION]` followed by the postcard encoding of [`Record`]. postcard is
//! not self-describing, so a record whose shape changed cannot be read with the new shape:
//! each shape a released version wrote is kept here, frozen, with a conversion to the current
//! one. A store queued by an older lorastream is therefore delivered after an upgrade, not
//! thrown away as corrupt.
//!
//! - version 1 (lorastream 0.1): no prefix at all; the bytes start with the variant index of
//!   `Record` (0, 1 or 2), read through [`v1`];
//! - version 2: `Uplink` carries the device's last DevStatusAns.
//!
//! A record of a version newer than this binary (after a downgrade) cannot be read: it counts
//! as corrupt. Changing a type inside [`Record`] means a new version and a frozen copy of the
//! previous shape here.

use crate::model::Record;

/// First byte of a versioned record: never a variant index of the unversioned encoding.
const TAG: u8 = 0xFE;
/// The version this binary writes.
const VERSION: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot encode or decode the record: {0}")]
    Postcard(#[from] postcard::Error),
    #[error("the record was written by a newer lorastream (format version {0})")]
    Newer(u8),
}

/// The bytes stored for `r`.
pub fn encode(r: &Record) -> Result<Vec<u8>, RecordError> {
    Ok(postcard::to_extend(r, vec![TAG, VERSION])?)
}

/// A stored record, of this version or an older one.
pub fn decode(b: &[u8]) -> Result<Record, RecordError> {
    match b {
        [TAG, VERSION, rest @ ..] => Ok(postcard::from_bytes(rest)?),
        [TAG, v, ..] => Err(RecordError::Newer(*v)),
        _ => Ok(postcard::from_bytes::<v1::Record>(b)?.into()),
    }
}

/// The shapes lorastream 0.1 wrote (no version prefix). Frozen: never change these.
mod v1 {
    use crate::model::{self, DevAddr, Eui64};
    use serde::Deserialize;

    #[derive(Deserialize)]
    pub struct TxSettings {
        frequency_hz: u32,
        spreading_factor: u8,
        bandwidth_hz: u32,
        coding_rate: String,
    }

    #[derive(Deserialize)]
    pub struct RxInfo {
        gateway: Eui64,
        tmst: u32,
        time: Option<String>,
        rssi: i32,
        channel_rssi: i32,
        snr: f32,
        channel: u32,
        rf_chain: u32,
        received_at_us: i64,
    }

    #[derive(Deserialize)]
    pub struct Uplink {
        id: u128,
        received_at_us: i64,
        application: String,
        device: String,
        dev_eui: Eui64,
        dev_addr: DevAddr,
        f_port: Option<u8>,
        f_cnt: u32,
        confirmed: bool,
        adr: bool,
        payload: Vec<u8>,
        settings: TxSettings,
        rx: Vec<RxInfo>,
    }

    #[derive(Deserialize)]
    pub struct GatewayFrame {
        id: u128,
        phy_payload: Vec<u8>,
        crc_ok: bool,
        settings: TxSettings,
        rx: RxInfo,
    }

    #[derive(Deserialize)]
    pub struct Join {
        id: u128,
        received_at_us: i64,
        application: String,
        device: String,
        dev_eui: Eui64,
        join_eui: Eui64,
        dev_addr: DevAddr,
        settings: TxSettings,
        rx: Vec<RxInfo>,
    }

    #[derive(Deserialize)]
    pub enum Record {
        Uplink(Uplink),
        GatewayFrame(GatewayFrame),
        Join(Join),
    }

    impl From<TxSettings> for model::TxSettings {
        fn from(s: TxSettings) -> Self {
            model::TxSettings {
                frequency_hz: s.frequency_hz,
                spreading_factor: s.spreading_factor,
                bandwidth_hz: s.bandwidth_hz,
                coding_rate: s.coding_rate,
            }
        }
    }

    impl From<RxInfo> for model::RxInfo {
        fn from(r: RxInfo) -> Self {
            model::RxInfo {
                gateway: r.gateway,
                tmst: r.tmst,
                time: r.time,
                rssi: r.rssi,
                channel_rssi: r.channel_rssi,
                snr: r.snr,
                channel: r.channel,
                rf_chain: r.rf_chain,
                received_at_us: r.received_at_us,
            }
        }
    }

    impl From<Record> for model::Record {
        fn from(r: Record) -> Self {
            match r {
                Record::Uplink(u) => model::Record::Uplink(model::Uplink {
                    id: u.id,
                    received_at_us: u.received_at_us,
                    application: u.application,
                    device: u.device,
                    dev_eui: u.dev_eui,
                    dev_addr: u.dev_addr,
                    f_port: u.f_port,
                    f_cnt: u.f_cnt,
                    confirmed: u.confirmed,
                    adr: u.adr,
                    payload: u.payload,
                    settings: u.settings.into(),
                    rx: u.rx.into_iter().map(Into::into).collect(),
                    dev_status: None,
                }),
                Record::GatewayFrame(g) => model::Record::GatewayFrame(model::GatewayFrame {
                    id: g.id,
                    phy_payload: g.phy_payload,
                    crc_ok: g.crc_ok,
                    settings: g.settings.into(),
                    rx: g.rx.into(),
                }),
                Record::Join(j) => model::Record::Join(model::Join {
                    id: j.id,
                    received_at_us: j.received_at_us,
                    application: j.application,
                    device: j.device,
                    dev_eui: j.dev_eui,
                    join_eui: j.join_eui,
                    dev_addr: j.dev_addr,
                    settings: j.settings.into(),
                    rx: j.rx.into_iter().map(Into::into).collect(),
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DevStatus;
    use crate::sim::fixtures;

    /// The bytes lorastream 0.1 wrote for `fixtures::uplink(1, 7)` (postcard of its Record):
    /// written out here once, so that the test does not depend on the current types.
    fn v1_bytes() -> Vec<u8> {
        let u = fixtures::uplink(1, 7);
        #[derive(serde::Serialize)]
        struct V1Uplink<'a> {
            id: u128,
            received_at_us: i64,
            application: &'a str,
            device: &'a str,
            dev_eui: crate::model::Eui64,
            dev_addr: crate::model::DevAddr,
            f_port: Option<u8>,
            f_cnt: u32,
            confirmed: bool,
            adr: bool,
            payload: &'a [u8],
            settings: &'a crate::model::TxSettings,
            rx: &'a [crate::model::RxInfo],
        }
        #[derive(serde::Serialize)]
        enum V1Record<'a> {
            Uplink(V1Uplink<'a>),
        }
        postcard::to_stdvec(&V1Record::Uplink(V1Uplink {
            id: u.id,
            received_at_us: u.received_at_us,
            application: &u.application,
            device: &u.device,
            dev_eui: u.dev_eui,
            dev_addr: u.dev_addr,
            f_port: u.f_port,
            f_cnt: u.f_cnt,
            confirmed: u.confirmed,
            adr: u.adr,
            payload: &u.payload,
            settings: &u.settings,
            rx: &u.rx,
        }))
        .unwrap()
    }

    #[test]
    fn a_record_queued_by_version_1_is_read_after_an_upgrade() {
        let old = v1_bytes();
        assert_eq!(old[0], 0, "variant index Uplink, no prefix");
        assert_eq!(decode(&old).unwrap(), fixtures::record(1, 7));
    }

    #[test]
    fn current_records_round_trip_and_newer_ones_are_refused() {
        let mut u = fixtures::uplink(2, 9);
        u.dev_status = Some(DevStatus {
            battery: 200,
            margin: -3,
            received_at_us: 5,
        });
        let r = Record::Uplink(u);
        let b = encode(&r).unwrap();
        assert_eq!(&b[..2], &[TAG, VERSION]);
        assert_eq!(decode(&b).unwrap(), r);
        let mut newer = b.clone();
        newer[1] = VERSION + 1;
        assert!(matches!(decode(&newer), Err(RecordError::Newer(_))));
        assert!(decode(&[TAG]).is_err() && decode(&[]).is_err());
    }
}
