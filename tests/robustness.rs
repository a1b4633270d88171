//! Mutation testing of every parser that sees outside input, in `cargo test` (cargo-fuzz needs
//! a nightly compiler; the `fuzz/` targets cover the same functions for longer runs). Valid
//! inputs are mutated (bit flips, truncation, splices, random bytes) with a fixed seed; nothing
//! may panic, and the daemon's parsers must keep rejecting garbage.

use lorastream::ingress::gwmp;
use lorastream::lorawan::frame;
use lorastream::lorawan::session::{Device, DeviceClass, Registry, Session, SessionState};
use lorastream::model::{AesKey, DevAddr, Eui64};
use lorastream::sim::{push_data, Radio, SimDevice};
use rand::{Rng, SeedableRng};

fn mutate(rng: &mut rand::rngs::StdRng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..rng.random_range(1..4) {
        match rng.random_range(0..5) {
            0 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v[i] ^= 1 << rng.random_range(0..8);
            }
            1 if !v.is_empty() => {
                let n = rng.random_range(0..v.len());
                v.truncate(n);
            }
            2 => {
                let i = rng.random_range(0..=v.len());
                v.insert(i, rng.random());
            }
            3 if v.len() > 2 => {
                let i = rng.random_range(0..v.len() - 1);
                v.remove(i);
            }
            _ => {
                let n = rng.random_range(0..64);
                v = (0..n).map(|_| rng.random()).collect();
            }
        }
    }
    v
}

fn registry(d: &SimDevice) -> Registry {
    Registry::new(vec![Device {
        id: d.id.as_str().into(),
        application: "a".into(),
        dev_eui: Eui64::from_u64(1),
        class: DeviceClass::A,
        app_key: Some(AesKey([3; 16])),
        join_eui: None,
        dev_nonce_counts_up: false,
        pending: None,
        adr: true,
        resets_f_cnt: false,
        removed: false,
        mac: lorastream::lorawan::mac_state::MacState::booted(lorastream::config::Region::EU868),
        session: Some(Session {
            dev_addr: d.dev_addr,
            nwk_s_key: d.nwk_s_key,
            app_s_key: d.app_s_key,
            state: SessionState {
                dev_addr: d.dev_addr,
                ..Default::default()
            },
        }),
    }])
}

#[test]
fn datagrams_and_frames_never_panic() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x10AA);
    let mut dev = SimDevice {
        id: "d".into(),
        dev_addr: DevAddr(0x2600_0001),
        nwk_s_key: AesKey([1; 16]),
        app_s_key: AesKey([2; 16]),
        f_cnt: 0,
        adr: true,
    };
    let mut reg = registry(&dev);
    let phy = dev.uplink(1, b"seed payload", false).unwrap();
    let dgram = push_data(Eui64::from_u64(7), 1, &[(&phy, Radio::default())]);
    let mut accepted = 0;
    for _ in 0..20_000 {
        let m = mutate(&mut rng, &dgram);
        if let Ok(gwmp::Datagram::PushData { body, gateway, .. }) = gwmp::decode(&m) {
            if let Ok(p) = gwmp::parse_push_data(body, gateway) {
                for r in p.receptions {
                    let _ = frame::kind(&r.phy_payload);
                    if let lorastream::lorawan::session::Verdict::Accepted { .. } =
                        reg.open_uplink(&r.phy_payload)
                    {
                        accepted += 1;
                    }
                }
            }
        }
        let f = mutate(&mut rng, &phy);
        let _ = frame::peek_data_up(&f);
        let _ = frame::decrypt(&f, &dev.nwk_s_key, &dev.app_s_key, 0);
        let _ = frame::open_downlink(&f, &dev.nwk_s_key, &dev.app_s_key, 0);
        if let lorastream::lorawan::session::Verdict::Accepted { .. } = reg.open_uplink(&f) {
            accepted += 1;
        }
        let _ = lorastream::lorawan::mac::parse_uplink_raw(&f);
        let _ = lorastream::ingress::gwmp::tx_ack_result(&m);
        let _ = reg.open_join_request(&f);
        let _ = lorastream::lorawan::otaa::parse_join_request(&m);
        let _ = lorastream::lorawan::otaa::decode_join_accept(&f, &dev.app_s_key);
    }
    // A mutated frame with a valid MIC would be a forgery: only the unmutated original (which
    // a mutation can reproduce, e.g. by flipping a bit twice) may ever pass.
    assert!(
        accepted <= 1,
        "{accepted} mutated frames passed the MIC check"
    );
}

#[test]
fn downlink_requests_and_configs_never_panic() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xD0);
    let req = br#"{"downlinks":[{"f_port":1,"frm_payload":"AQID","confirmed":true,"priority":"HIGH","correlation_ids":["x"]}]}"#;
    for _ in 0..20_000 {
        let _ = lorastream::downlink::json::parse_request(&mutate(&mut rng, req), "s");
    }
    let cfg = include_bytes!("../config.example.toml");
    for _ in 0..2_000 {
        let m = mutate(&mut rng, cfg);
        let _ = lorastream::config::Config::parse(&String::from_utf8_lossy(&m), "fuzz.toml");
    }
}

#[test]
fn azure_cloud_to_device_messages_never_panic() {
    use lorastream::streams::azure::wire;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xA2);
    let topic = b"devices/gw/messages/devicebound/%24.mid=m1&%24.to=%2Fdevices%2Fgw%2Fmessages%2FdeviceBound&application=farm&device=d1&op=replace&fPort=5&confirmed=true";
    let body = br#"{"end_device_ids":{"device_id":"d1","application_ids":{"application_id":"farm"}},"downlinks":[{"f_port":1,"frm_payload":"AQID"}]}"#;
    for i in 0..20_000 {
        let t = String::from_utf8_lossy(&mutate(&mut rng, topic)).into_owned();
        let b = mutate(&mut rng, body);
        let props = wire::parse_devicebound(&t, "gw").unwrap_or_default();
        let device = (i % 2 == 0).then_some(("farm", "d1"));
        let _ = wire::downlink_request("s", i % 3 == 0, device, &props, &b);
    }
}
