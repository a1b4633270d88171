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
//! - version 2: `Uplink` carries the device's last DevStatusAns, read through [`v2`] (`Alert`
//!   records came later within version 2: a new variant at the end keeps the others' bytes);
//! - version 3: `Uplink` carries its payload codec's result (`codec`).
//!
//! A record of a version newer than this binary (after a downgrade) cannot be read: it counts
//! as corrupt. Changing a type inside [`Record`] means a new version and a frozen copy of the
//! previous shape here.

use crate::model::Record;

/// First byte of a versioned record: never a variant index of the unversioned encoding.
const TAG: u8 = 0xFE;
/// The version this binary writes.
const VERSION: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot encode or decode the record: {0}")]
    Postcard(#[from] postcard::Error),
    #[error("the record was written by a newer lorastream (format version {0})")]
    Newer(u8),
}

/// The bytes stored for `r` (exactly sized: a record stays in memory until its checkpoint).
pub fn encode(r: &Record) -> Result<Vec<u8>, RecordError> {
    match r {
        Record::Uplink(u) => Ok(crate::postcard_buf::exact_with(|b| {
            b.extend_from_slice(&[TAG, VERSION]);
            super::uplink_record::write(u, b)
        })?),
        _ => Ok(crate::postcard_buf::to_exact_vec(&[TAG, VERSION], r)?),
    }
}

/// A stored record, of this version or an older one.
pub fn decode(b: &[u8]) -> Result<Record, RecordError> {
    match b {
        [TAG, VERSION, rest @ ..] => match super::uplink_record::read(rest) {
            Some(u) => Ok(Record::Uplink(u)),
            None => Ok(postcard::from_bytes(rest)?),
        },
        [TAG, 2, rest @ ..] => Ok(postcard::from_bytes::<v2::Record>(rest)?.into()),
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
                coding_rate: model::CodingRateText::new(&s.coding_rate),
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

    impl From<GatewayFrame> for model::GatewayFrame {
        fn from(g: GatewayFrame) -> Self {
            model::GatewayFrame {
                id: g.id,
                phy_payload: g.phy_payload,
                crc_ok: g.crc_ok,
                settings: g.settings.into(),
                rx: g.rx.into(),
            }
        }
    }

    impl From<Join> for model::Join {
        fn from(j: Join) -> Self {
            model::Join {
                id: j.id,
                received_at_us: j.received_at_us,
                application: j.application,
                device: j.device,
                dev_eui: j.dev_eui,
                join_eui: j.join_eui,
                dev_addr: j.dev_addr,
                settings: j.settings.into(),
                rx: j.rx.into_iter().map(Into::into).collect(),
            }
        }
    }

    impl From<Record> for model::Record {
        fn from(r: Record) -> Self {
            match r {
                Record::Uplink(u) => model::Record::Uplink(model::Uplink {
                    id: u.id,
                    received_at_us: u.received_at_us,
                    application: u.application.into(),
                    device: u.device.into(),
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
                    codec: None,
                }),
                Record::GatewayFrame(g) => model::Record::GatewayFrame(g.into()),
                Record::Join(j) => model::Record::Join(j.into()),
            }
        }
    }
}

/// The shapes version 2 wrote: [`v1`]'s, the uplink with its DevStatusAns, and alerts.
/// Frozen: never change these.
mod v2 {
    use super::v1;
    use crate::model::{self, DevAddr, Eui64};
    use serde::Deserialize;

    #[derive(Deserialize)]
    pub struct DevStatus {
        battery: u8,
        margin: i8,
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
        settings: v1::TxSettings,
        rx: Vec<v1::RxInfo>,
        dev_status: Option<DevStatus>,
    }

    #[derive(Deserialize)]
    pub struct AlertMsg {
        id: u128,
        alert_id: String,
        kind: String,
        firing: bool,
        subject: String,
        since_us: i64,
        at_us: i64,
        message: String,
        origin: String,
    }

    #[derive(Deserialize)]
    pub enum Record {
        Uplink(Uplink),
        GatewayFrame(v1::GatewayFrame),
        Join(v1::Join),
        Alert(AlertMsg),
    }

    impl From<Record> for model::Record {
        fn from(r: Record) -> Self {
            match r {
                Record::Uplink(u) => model::Record::Uplink(model::Uplink {
                    id: u.id,
                    received_at_us: u.received_at_us,
                    application: u.application.into(),
                    device: u.device.into(),
                    dev_eui: u.dev_eui,
                    dev_addr: u.dev_addr,
                    f_port: u.f_port,
                    f_cnt: u.f_cnt,
                    confirmed: u.confirmed,
                    adr: u.adr,
                    payload: u.payload,
                    settings: u.settings.into(),
                    rx: u.rx.into_iter().map(Into::into).collect(),
                    dev_status: u.dev_status.map(|s| model::DevStatus {
                        battery: s.battery,
                        margin: s.margin,
                        received_at_us: s.received_at_us,
                    }),
                    codec: None,
                }),
                Record::GatewayFrame(g) => model::Record::GatewayFrame(g.into()),
                Record::Join(j) => model::Record::Join(j.into()),
                Record::Alert(a) => model::Record::Alert(model::AlertMsg {
                    id: a.id,
                    alert_id: a.alert_id,
                    kind: a.kind,
                    firing: a.firing,
                    subject: a.subject,
                    since_us: a.since_us,
                    at_us: a.at_us,
                    message: a.message,
                    origin: a.origin,
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

    /// The bytes version 2 wrote for an uplink with a DevStatusAns, and for an alert: the
    /// shapes of then, written out here.
    fn v2_bytes(u: &crate::model::Uplink, a: &crate::model::AlertMsg) -> (Vec<u8>, Vec<u8>) {
        #[derive(serde::Serialize)]
        struct V2Uplink<'a> {
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
            dev_status: Option<(u8, i8, i64)>,
        }
        #[derive(serde::Serialize)]
        struct V2Alert<'a> {
            id: u128,
            alert_id: &'a str,
            kind: &'a str,
            firing: bool,
            subject: &'a str,
            since_us: i64,
            at_us: i64,
            message: &'a str,
            origin: &'a str,
        }
        #[derive(serde::Serialize)]
        #[allow(dead_code)]
        enum V2Record<'a> {
            Uplink(V2Uplink<'a>),
            GatewayFrame(()),
            Join(()),
            Alert(V2Alert<'a>),
        }
        let up = V2Record::Uplink(V2Uplink {
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
            dev_status: u
                .dev_status
                .map(|s| (s.battery, s.margin, s.received_at_us)),
        });
        let alert = V2Record::Alert(V2Alert {
            id: a.id,
            alert_id: &a.alert_id,
            kind: &a.kind,
            firing: a.firing,
            subject: &a.subject,
            since_us: a.since_us,
            at_us: a.at_us,
            message: &a.message,
            origin: &a.origin,
        });
        let with_prefix = |r: &V2Record| postcard::to_extend(r, vec![TAG, 2]).unwrap();
        (with_prefix(&up), with_prefix(&alert))
    }

    #[test]
    fn records_queued_by_version_2_are_read_after_an_upgrade() {
        let mut u = fixtures::uplink(3, 11);
        u.dev_status = Some(DevStatus {
            battery: 254,
            margin: 7,
            received_at_us: 99,
        });
        let a = crate::model::AlertMsg {
            id: 5,
            alert_id: "a1".into(),
            kind: "device_silent".into(),
            firing: true,
            subject: "d3".into(),
            since_us: 1,
            at_us: 2,
            message: "silent".into(),
            origin: "gw".into(),
        };
        let (up, alert) = v2_bytes(&u, &a);
        assert_eq!(decode(&up).unwrap(), Record::Uplink(u), "codec: None");
        assert_eq!(decode(&alert).unwrap(), Record::Alert(a));
    }

    #[test]
    fn current_records_round_trip_and_newer_ones_are_refused() {
        let mut u = fixtures::uplink(2, 9);
        u.dev_status = Some(DevStatus {
            battery: 200,
            margin: -3,
            received_at_us: 5,
        });
        let mut data = serde_json::Map::new();
        data.insert("temperature_1".into(), serde_json::json!(21.5));
        data.insert("gps_2".into(), serde_json::json!({"latitude": 52.1}));
        u.codec = Some(crate::model::CodecOutput::Decoded {
            data: crate::model::JsonObject(data),
            warnings: vec!["w".into()],
        });
        let mut failed = fixtures::uplink(2, 10);
        failed.codec = Some(crate::model::CodecOutput::Error("bad".into()));
        let b = encode(&Record::Uplink(failed.clone())).unwrap();
        assert_eq!(decode(&b).unwrap(), Record::Uplink(failed));
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
