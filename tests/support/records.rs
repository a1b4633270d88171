//! Records as the pipeline makes them, plain and hostile, for the format tests.

use lorastream::model::{DevAddr, GatewayFrame, Join, RxInfo, TxSettings, Uplink};

pub fn settings() -> TxSettings {
    TxSettings {
        frequency_hz: 868_100_000,
        spreading_factor: 7,
        bandwidth_hz: 125_000,
        coding_rate: "4/5".into(),
    }
}

pub fn rx(
    gw: &str,
    rssi: i32,
    snr: f32,
    channel: u32,
    rf_chain: u32,
    time: Option<&str>,
) -> RxInfo {
    RxInfo {
        gateway: gw.parse().expect("gateway eui"),
        tmst: 2_000_123,
        time: time.map(str::to_string),
        rssi,
        channel_rssi: rssi,
        snr,
        channel,
        rf_chain,
        received_at_us: 1_795_000_000_123_456,
    }
}

/// The contract's example uplink.
pub fn uplink() -> Uplink {
    Uplink {
        id: 0x0193_0000_0000_0000_0000_0000_0000_0001,
        received_at_us: 1_795_000_000_123_456,
        application: "farm".into(),
        device: "soil-1".into(),
        dev_eui: "70b3d57ed0000001".parse().expect("eui"),
        dev_addr: DevAddr(0x2600_0001),
        f_port: Some(1),
        f_cnt: 70_000,
        confirmed: false,
        adr: true,
        payload: vec![1, 2, 3, 4],
        settings: settings(),
        rx: vec![rx("aa555a0000000000", -57, 9.5, 2, 0, None)],
        dev_status: None,
        codec: None,
    }
}

/// Ids and values that break naive encoders.
pub const TRICKY_DEVICE: &str = "d<&\"'>\u{1}\r\n\t ]]> é€😀";
pub const TRICKY_APP: &str = "app <&> \"x\" 'y'";

/// An uplink heard by two gateways (one with GPS time), with hostile ids, no FPort and the
/// full 32-bit counter.
pub fn tricky_uplink() -> Uplink {
    Uplink {
        id: 0x01ff_ffff_ffff_ffff_ffff_ffff_ffff_fffe,
        received_at_us: 1_795_000_000_000_000,
        application: TRICKY_APP.into(),
        device: TRICKY_DEVICE.into(),
        dev_eui: "FFFFFFFFFFFFFFFE".parse().expect("eui"),
        dev_addr: DevAddr(0xfe00_0a0b),
        f_port: None,
        f_cnt: u32::MAX,
        confirmed: true,
        adr: false,
        payload: vec![],
        settings: TxSettings {
            frequency_hz: 923_300_000,
            spreading_factor: 12,
            bandwidth_hz: 500_000,
            coding_rate: "4/8".into(),
        },
        rx: vec![
            rx(
                "0016c001f153a14c",
                -120,
                -17.25,
                0,
                0,
                Some("2026-11-18T11:06:39.999999Z"),
            ),
            rx("aa555a0000000000", -30, 12.5, 7, 1, Some("not a time")),
        ],
        // The extremes of a DevStatusAns: lowest battery level, most negative margin.
        dev_status: Some(lorastream::model::DevStatus {
            battery: 1,
            margin: -32,
            received_at_us: 1_795_000_000_000_000,
        }),
        codec: None,
    }
}

pub fn join() -> Join {
    Join {
        id: 0x0193_0000_0000_0000_0000_0000_0000_0777,
        received_at_us: 1_795_000_000_500_000,
        application: "farm".into(),
        device: "meter-7".into(),
        dev_eui: "70b3d57ed0000007".parse().expect("eui"),
        join_eui: "0000000000000000".parse().expect("eui"),
        dev_addr: DevAddr(0x2600_0007),
        settings: settings(),
        rx: vec![rx("aa555a0000000000", -80, 3.0, 1, 0, None)],
    }
}

pub fn gateway_frame() -> GatewayFrame {
    GatewayFrame {
        id: 0x0193_0000_0000_0000_0000_0000_0000_0999,
        phy_payload: vec![0x40, 1, 0, 0, 0x26, 0, 1, 0, 1, 0xaa, 1, 2, 3, 4],
        crc_ok: true,
        settings: settings(),
        rx: rx("aa555a0000000000", -57, 9.5, 2, 0, None),
    }
}

/// A decoded payload with every JSON kind in it.
pub fn object() -> serde_json::Map<String, serde_json::Value> {
    let v = serde_json::json!({
        "temperature": 21.5,
        "counter": 42,
        "big": 9007199254740993u64,
        "negative": -7,
        "ok": true,
        "label": "a\"b<c>",
        "nothing": null,
        "list": [1, "two", [3.5], {"x": false}],
        "nested": {"1": {"deep": "é"}}
    });
    match v {
        serde_json::Value::Object(m) => m,
        _ => unreachable!("a JSON object literal"),
    }
}
