//! Sample records for tests and benchmarks, defined once: a test that needs other values
//! changes the fields it cares about (`let mut u = uplink(1, 7); u.payload = ...`).

use crate::model::{DevAddr, Eui64, Record, RxInfo, TxSettings, Uplink};

/// EU868 868.1 MHz, SF7, 125 kHz, 4/5.
pub fn settings() -> TxSettings {
    tx(868_100_000, 7, 125_000)
}

/// A LoRa reception at `frequency_hz`, spreading factor `sf`, bandwidth `bw_hz`, 4/5.
pub fn tx(frequency_hz: u32, sf: u8, bw_hz: u32) -> TxSettings {
    TxSettings {
        frequency_hz,
        spreading_factor: sf,
        bandwidth_hz: bw_hz,
        coding_rate: "4/5".into(),
    }
}

/// A reception by `gateway` (tmst 1, RSSI −50 dBm, SNR 9 dB, channel 0).
pub fn rx(gateway: Eui64) -> RxInfo {
    RxInfo {
        gateway,
        tmst: 1,
        time: None,
        rssi: -50,
        channel_rssi: -50,
        snr: 9.0,
        channel: 0,
        rf_chain: 0,
        received_at_us: 1,
    }
}

/// Uplink `f_cnt` of device `dev` (DevEUI and DevAddr `dev`, id `d{dev}`, application `app`):
/// 20 bytes on FPort 1, heard once by gateway 2. Its id is `f_cnt`, so it is deterministic.
pub fn uplink(dev: u64, f_cnt: u32) -> Uplink {
    Uplink {
        id: u128::from(f_cnt),
        received_at_us: 1,
        application: "app".into(),
        device: format!("d{dev}").into(),
        dev_eui: Eui64::from_u64(dev),
        dev_addr: DevAddr(dev as u32),
        f_port: Some(1),
        f_cnt,
        confirmed: false,
        adr: false,
        payload: vec![0xAB; 20],
        settings: settings(),
        rx: vec![rx(Eui64::from_u64(2))],
        dev_status: None,
        codec: None,
    }
}

/// [`uplink`] as a queue record.
pub fn record(dev: u64, f_cnt: u32) -> Record {
    Record::Uplink(uplink(dev, f_cnt))
}
