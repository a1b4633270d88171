//! OTAA end to end: JoinRequest over real UDP → JoinAccept in a PULL_RESP that the test decrypts
//! with the AppKey → session keys derived as a device would → the device's uplinks decrypt.

mod support;

use lorastream::config::Config;
use lorastream::daemon::Daemon;
use lorastream::lorawan::otaa;
use lorastream::model::{AesKey, Eui64};
use lorastream::sim::{Forwarder, Radio, SimDevice};
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(10);
const APP_KEY: &str = "2B7E151628AED2A6ABF7158809CF4F3C";

fn cfg(dir: &std::path::Path, url: &str) -> Config {
    cfg_with(dir, url, "")
}

/// `device_extra`: more keys for the device table (e.g. `lorawan_version = "1.0.4"`).
fn cfg_with(dir: &std::path::Path, url: &str, device_extra: &str) -> Config {
    let mut c = config(
        dir,
        &format!(
            "[[application]]\nid = \"farm\"\n\n[[device]]\napplication = \"farm\"\nid = \"meter-7\"\ndev_eui = \"70b3d57ed0000007\"\njoin_eui = \"0000000000000001\"\napp_key = \"{APP_KEY}\"\n{device_extra}\n\n[[stream]]\nname = \"cloud\"\nserver = \"{url}\"\n"
        ),
    );
    // The region's channel plan (the shared test config has none).
    c.gateway.extra_channels = None;
    c
}

fn request(nonce: u16, key: &AesKey) -> Vec<u8> {
    otaa::encode_join_request(
        &otaa::JoinRequest {
            join_eui: Eui64::from_u64(1),
            dev_eui: "70b3d57ed0000007".parse().unwrap(),
            dev_nonce: nonce,
        },
        key,
    )
}

/// Join with `nonce`; returns the device with its session, as the device derives it.
async fn join(f: &Forwarder, fwd_send: &mut Forwarder, nonce: u16) -> SimDevice {
    join_nonce(f, fwd_send, nonce).await.0
}

/// As [`join`], with the JoinNonce (AppNonce) of the JoinAccept.
async fn join_nonce(f: &Forwarder, fwd_send: &mut Forwarder, nonce: u16) -> (SimDevice, u32) {
    let key: AesKey = APP_KEY.parse().unwrap();
    fwd_send
        .send(&[(
            &request(nonce, &key),
            Radio {
                tmst: 10_000_000,
                ..Radio::default()
            },
        )])
        .await
        .unwrap();
    let pr = f.pull_resp(T).await.expect("JoinAccept");
    // JOIN_ACCEPT_DELAY1 = 5 s, RX1 of EU868 = uplink frequency and data rate.
    assert_eq!(pr.txpk["tmst"], 15_000_000);
    assert_eq!(pr.txpk["freq"], 868.1);
    assert_eq!(pr.txpk["datr"], "SF7BW125");
    assert_eq!(pr.txpk["ipol"], true);
    let (ja, mic_ok) = otaa::decode_join_accept(&pr.phy, &key).unwrap();
    assert!(mic_ok, "JoinAccept MIC with the AppKey");
    assert_eq!(ja.net_id, 0);
    assert_eq!(ja.dev_addr.0 >> 25, 0, "NwkID of NetID 000000");
    assert_eq!(ja.rx_delay, 1);
    assert_eq!(ja.rx2_dr, 0);
    // CFList type 0: 867.1, 867.3, 867.5, 867.7, 867.9 MHz as 24-bit little-endian multiples
    // of 100 Hz (8671000 = 0x844F18, ...), then CFListType 0.
    assert_eq!(
        ja.cf_list,
        Some([
            0x18, 0x4F, 0x84, 0xE8, 0x56, 0x84, 0xB8, 0x5E, 0x84, 0x88, 0x66, 0x84, 0x58, 0x6E,
            0x84, 0x00
        ]),
        "EU868 CFList"
    );
    f.tx_ack(pr.token, None).await.unwrap();
    let (nwk_s_key, app_s_key) = otaa::derive_session_keys(&key, ja.app_nonce, ja.net_id, nonce);
    (
        SimDevice {
            id: "meter-7".into(),
            dev_addr: ja.dev_addr,
            nwk_s_key,
            app_s_key,
            f_cnt: 0,
            adr: false,
        },
        ja.app_nonce,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_then_uplinks_decrypt_with_the_derived_keys() {
    install_crypto();
    let broker = support::broker::TestBroker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = cfg(dir.path(), &broker.url());
    let mut sub = Subscriber::connect(broker.port(), "lorastream/#").await;
    let daemon = Daemon::start(&cfg).await.unwrap();
    let mut f = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(1))
        .await
        .unwrap();
    f.pull().await.unwrap();
    assert!(wait_until(T, || daemon.gateways().len() == 1).await);
    let mut other = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(1))
        .await
        .unwrap();

    let (mut dev, first_nonce) = join_nonce(&f, &mut other, 1).await;
    assert_eq!(first_nonce, 1, "JoinNonce is a per-device counter from 1");
    let j = sub
        .wait_for(1, T, |t, _| t == "lorastream/farm/devices/meter-7/join")
        .await;
    assert_eq!(j[0]["end_device_ids"]["dev_addr"], dev.dev_addr.to_string());
    assert_eq!(j[0]["end_device_ids"]["join_eui"], "0000000000000001");

    other
        .send(&[(
            &dev.uplink(3, b"after join", false).unwrap(),
            Radio::default(),
        )])
        .await
        .unwrap();
    let up = sub.wait_for(1, T, |t, _| t.ends_with("/up")).await;
    assert_eq!(up[0]["uplink_message"]["frm_payload"], "YWZ0ZXIgam9pbg==");
    assert_eq!(up[0]["end_device_ids"]["device_id"], "meter-7");

    // The same JoinRequest again (replayed DevNonce): no JoinAccept.
    let key: AesKey = APP_KEY.parse().unwrap();
    other
        .send(&[(&request(1, &key), Radio::default())])
        .await
        .unwrap();
    assert!(wait_until(T, || daemon.metrics().uplinks("join_replay") == 1).await);
    assert!(f.pull_resp(Duration::from_millis(600)).await.is_none());
    // Signed with the wrong key: refused.
    other
        .send(&[(&request(2, &AesKey([9; 16])), Radio::default())])
        .await
        .unwrap();
    assert!(wait_until(T, || daemon.metrics().uplinks("join_mic_failed") == 1).await);

    // A new join: the old session works until the device uses the new one.
    let (mut renewed, second_nonce) = join_nonce(&f, &mut other, 3).await;
    assert_eq!(
        second_nonce, 2,
        "incremented with every JoinAccept (LoRaWAN 1.0.4 §6.2.3)"
    );
    other
        .send(&[(
            &dev.uplink(3, b"old keys", false).unwrap(),
            Radio::default(),
        )])
        .await
        .unwrap();
    assert!(
        wait_until(T, || daemon.metrics().uplinks("accepted") == 2).await,
        "old session still valid"
    );
    other
        .send(&[(
            &renewed.uplink(3, b"new keys", false).unwrap(),
            Radio::default(),
        )])
        .await
        .unwrap();
    assert!(wait_until(T, || daemon.metrics().uplinks("accepted") == 3).await);
    other
        .send(&[(
            &dev.uplink(3, b"old again", false).unwrap(),
            Radio::default(),
        )])
        .await
        .unwrap();
    assert!(
        wait_until(T, || daemon.metrics().uplinks("mic_failed")
            + daemon.metrics().uplinks("unknown_dev_addr")
            == 1)
        .await,
        "the old session is gone once the new one is used"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_survives_a_restart_before_the_first_uplink() {
    install_crypto();
    let broker = support::broker::TestBroker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = cfg(dir.path(), &broker.url());
    let mut dev = {
        let daemon = Daemon::start(&cfg).await.unwrap();
        let mut f = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(1))
            .await
            .unwrap();
        f.pull().await.unwrap();
        assert!(wait_until(T, || daemon.gateways().len() == 1).await);
        let mut other = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(1))
            .await
            .unwrap();
        let d = join(&f, &mut other, 42).await;
        daemon.stop().await;
        d
    };
    let mut sub = Subscriber::connect(broker.port(), "lorastream/#").await;
    let daemon = Daemon::start(&cfg).await.unwrap();
    let mut f = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(1))
        .await
        .unwrap();
    f.send(&[(&dev.uplink(1, b"x", false).unwrap(), Radio::default())])
        .await
        .unwrap();
    let up = sub.wait_for(1, T, |t, _| t.ends_with("/up")).await;
    assert_eq!(up.len(), 1, "pending session restored after the restart");
    // And the DevNonce history too.
    let key: AesKey = APP_KEY.parse().unwrap();
    f.send(&[(&request(42, &key), Radio::default())])
        .await
        .unwrap();
    assert!(wait_until(T, || daemon.metrics().uplinks("join_replay") == 1).await);
    daemon.stop().await;
}

/// Starts a daemon with `cfg`, a forwarder that has sent PULL_DATA, and a second socket of the
/// same gateway for PUSH_DATA.
async fn daemon_and_forwarders(cfg: &Config) -> (Daemon, Forwarder, Forwarder) {
    let daemon = Daemon::start(cfg).await.unwrap();
    let mut f = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(1))
        .await
        .unwrap();
    f.pull().await.unwrap();
    assert!(wait_until(T, || daemon.gateways().len() == 1).await);
    let other = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(1))
        .await
        .unwrap();
    (daemon, f, other)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_accept_refused_in_rx1_goes_out_at_join_accept_delay2() {
    install_crypto();
    let broker = support::broker::TestBroker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = cfg(dir.path(), &broker.url());
    // TTN's EU868 RX2 data rate: the JoinAccept tells the device; the JoinAccept itself still
    // goes out with the default (DR0), which is what the device uses until it has joined.
    cfg.gateway.rx2_dr = Some(3);
    let (daemon, f, mut other) = daemon_and_forwarders(&cfg).await;
    let key: AesKey = APP_KEY.parse().unwrap();
    other
        .send(&[(
            &request(77, &key),
            Radio {
                tmst: 4_290_000_000,
                ..Radio::default()
            },
        )])
        .await
        .unwrap();
    let rx1 = f.pull_resp(T).await.expect("JoinAccept in RX1");
    assert_eq!(rx1.txpk["tmst"], 4_290_000_000u32.wrapping_add(5_000_000));
    f.tx_ack(rx1.token, Some("COLLISION_PACKET")).await.unwrap();
    let rx2 = f.pull_resp(T).await.expect("JoinAccept in RX2");
    assert_eq!(
        rx2.txpk["tmst"],
        4_290_000_000u32.wrapping_add(6_000_000),
        "JOIN_ACCEPT_DELAY2, u32 wrap"
    );
    assert_eq!(rx2.txpk["freq"], 869.525);
    assert_eq!(rx2.txpk["datr"], "SF12BW125");
    assert_eq!(rx2.phy, rx1.phy);
    let (ja, mic_ok) = otaa::decode_join_accept(&rx2.phy, &key).unwrap();
    assert!(mic_ok);
    assert_eq!((ja.rx1_dr_offset, ja.rx2_dr), (0, 3), "DLSettings");
    f.tx_ack(rx2.token, None).await.unwrap();
    assert!(wait_until(T, || daemon.metrics().downlinks("tx_ok") == 1).await);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lorawan_1_0_4_dev_nonce_must_count_up() {
    install_crypto();
    let broker = support::broker::TestBroker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = cfg_with(dir.path(), &broker.url(), "lorawan_version = \"1.0.4\"");
    let (daemon, f, mut other) = daemon_and_forwarders(&cfg).await;
    let key: AesKey = APP_KEY.parse().unwrap();
    join(&f, &mut other, 5).await;
    // Lower than the last one: refused, although never used (a 1.0.3 device would be fine).
    for (n, replays) in [(3u16, 1u64), (5, 2)] {
        other
            .send(&[(&request(n, &key), Radio::default())])
            .await
            .unwrap();
        assert!(
            wait_until(T, || daemon.metrics().uplinks("join_replay") == replays).await,
            "DevNonce {n}"
        );
    }
    assert!(f.pull_resp(Duration::from_millis(600)).await.is_none());
    join(&f, &mut other, 6).await;
    daemon.stop().await;
}

/// US915 end to end: a JoinRequest on uplink channel 9 is answered on downlink channel 1 at
/// JOIN_ACCEPT_DELAY1 with a channel-mask CFList for the configured sub-band; the joined device's
/// uplink decrypts with the derived keys and a downlink pushed over MQTT reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn us915_join_with_sub_band_cf_list_then_uplink_and_downlink() {
    install_crypto();
    let broker = support::broker::TestBroker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = cfg(dir.path(), &broker.url());
    cfg.gateway.region = lorastream::config::Region::US915;
    cfg.gateway.sub_band = Some(2);
    let mut sub = Subscriber::connect(broker.port(), "lorastream/#").await;
    let (daemon, f, mut other) = daemon_and_forwarders(&cfg).await;
    assert!(wait_until(T, || daemon.metrics().is_stream_connected("cloud")).await);
    let key: AesKey = APP_KEY.parse().unwrap();
    // Channel 9 (sub-band 2), DR0 = SF10/125 kHz.
    let ch9 = |tmst| Radio {
        freq_mhz: 904.1,
        sf: 10,
        tmst,
        ..Radio::default()
    };
    other
        .send(&[(&request(11, &key), ch9(20_000_000))])
        .await
        .unwrap();
    let pr = f.pull_resp(T).await.expect("JoinAccept");
    assert!(!pr.json.contains("null"), "{}", pr.json);
    assert_eq!(pr.preamble(), 8, "{}", pr.json);
    assert_eq!(pr.txpk["tmst"], 25_000_000);
    assert_eq!(pr.txpk["freq"], 923.9);
    assert_eq!(pr.txpk["datr"], "SF10BW500");
    assert_eq!(pr.txpk["powe"], 26);
    let (ja, mic_ok) = otaa::decode_join_accept(&pr.phy, &key).unwrap();
    assert!(mic_ok);
    assert_eq!((ja.rx1_dr_offset, ja.rx2_dr, ja.rx_delay), (0, 8, 1));
    assert_eq!(
        ja.cf_list,
        Some([0, 0xFF, 0, 0, 0, 0, 0, 0, 0x02, 0, 0, 0, 0, 0, 0, 0x01]),
        "CFListType 1: channels 8..15 and 65"
    );
    f.tx_ack(pr.token, None).await.unwrap();
    let (nwk_s_key, app_s_key) = otaa::derive_session_keys(&key, ja.app_nonce, ja.net_id, 11);
    let mut dev = SimDevice {
        id: "meter-7".into(),
        dev_addr: ja.dev_addr,
        nwk_s_key,
        app_s_key,
        f_cnt: 0,
        adr: false,
    };
    other
        .send(&[(&dev.uplink(2, b"us join", false).unwrap(), ch9(30_000_000))])
        .await
        .unwrap();
    let up = sub.wait_for(1, T, |t, _| t.ends_with("/up")).await;
    assert_eq!(up[0]["uplink_message"]["frm_payload"], "dXMgam9pbg==");
    // The scheduler has seen that uplink (nothing to send): a downlink queued from now on
    // waits for the next one.
    assert!(wait_until(T, || daemon.metrics().downlinks("opportunity") >= 1).await);

    // A downlink pushed over MQTT reaches the joined device after its next uplink.
    let (client, mut el) = rumqttc::AsyncClient::new(
        rumqttc::MqttOptions::new("otaa-pub", "127.0.0.1", broker.port()),
        10,
    );
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    client
        .publish(
            "lorastream/farm/devices/meter-7/down/push",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"downlinks":[{"f_port":9,"frm_payload":"aGk="}]}"#,
        )
        .await
        .unwrap();
    sub.wait_for(1, T, |t, _| t.ends_with("/down/queued")).await;
    other
        .send(&[(&dev.uplink(2, b"again", false).unwrap(), ch9(40_000_000))])
        .await
        .unwrap();
    let pr = f.pull_resp(T).await.expect("downlink");
    assert_eq!(pr.txpk["tmst"], 41_000_000);
    assert_eq!(pr.txpk["freq"], 923.9);
    let dl = dev.open(&pr.phy, 0).unwrap();
    assert!(dl.mic_ok, "FCntDown starts at 0 in the new session");
    assert_eq!(dl.opened.frm_payload, b"hi");
    daemon.stop().await;
}

/// FCntDown of a joined device across restarts and a rejoin: each start reserves the active
/// session's first block with every other device's (no commit of its own at its first
/// downlink), a rejoined device's new session starts at 0 and reserves for itself (the old
/// session's reservation does not cover it), and no counter of a session is ever used twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcnt_down_across_restarts_and_a_rejoin() {
    install_crypto();
    let broker = support::broker::TestBroker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = cfg(dir.path(), &broker.url());
    let mut tmst = 100_000_000u32;
    // A confirmed uplink forces a downlink (the ACK): its FCntDown, found by its MIC.
    async fn acked(
        f: &Forwarder,
        other: &mut Forwarder,
        dev: &mut SimDevice,
        tmst: &mut u32,
    ) -> u32 {
        *tmst += 10_000_000;
        let p = dev.uplink_with(Some(1), b"c", true, false, &[]).unwrap();
        let radio = Radio {
            tmst: *tmst,
            ..Radio::default()
        };
        other.send(&[(&p, radio)]).await.unwrap();
        let pr = f.pull_resp(T).await.expect("ACK downlink");
        f.tx_ack(pr.token, None).await.unwrap();
        (0..64u32)
            .find(|c| dev.open(&pr.phy, *c).is_ok_and(|o| o.mic_ok && o.ack))
            .expect("an ACK for this session with a small FCntDown")
    }

    // Run 1: join; the first downlinks of the new session (per-device reservation).
    let (daemon, f, mut other) = daemon_and_forwarders(&cfg).await;
    let mut first = join(&f, &mut other, 1).await;
    let a = acked(&f, &mut other, &mut first, &mut tmst).await;
    let b = acked(&f, &mut other, &mut first, &mut tmst).await;
    assert_eq!((a, b), (0, 1));
    assert_eq!(daemon.metrics().downlinks("f_cnt_down_saved"), 1);
    daemon.stop().await;

    // Run 2: the joined session was reserved at start; then a rejoin.
    let (daemon, f, mut other) = daemon_and_forwarders(&cfg).await;
    assert_eq!(acked(&f, &mut other, &mut first, &mut tmst).await, 2);
    assert_eq!(
        daemon.metrics().downlinks("f_cnt_down_reserved_at_start"),
        1
    );
    assert_eq!(daemon.metrics().downlinks("f_cnt_down_saved"), 0);
    let mut second = join(&f, &mut other, 2).await;
    assert_ne!(second.nwk_s_key.0, first.nwk_s_key.0);
    assert_eq!(acked(&f, &mut other, &mut second, &mut tmst).await, 0);
    assert_eq!(
        daemon.metrics().downlinks("f_cnt_down_saved"),
        1,
        "the new session reserves for itself"
    );
    assert_eq!(acked(&f, &mut other, &mut second, &mut tmst).await, 1);
    daemon.stop().await;

    // Run 3: the new session continues where it stopped, reserved at start.
    let (daemon, f, mut other) = daemon_and_forwarders(&cfg).await;
    assert_eq!(acked(&f, &mut other, &mut second, &mut tmst).await, 2);
    assert_eq!(daemon.metrics().downlinks("f_cnt_down_saved"), 0);
    daemon.stop().await;
}
