//! OTAA end to end: JoinRequest over real UDP → JoinAccept in a PULL_RESP that the test decrypts
//! with the AppKey → session keys derived as a device would → the device's uplinks decrypt.

mod support;

use lorastream::app::Daemon;
use lorastream::config::Config;
use lorastream::lorawan::otaa;
use lorastream::model::{AesKey, Eui64};
use lorastream::sim::{Forwarder, Radio, SimDevice};
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(10);
const APP_KEY: &str = "2B7E151628AED2A6ABF7158809CF4F3C";

fn cfg(dir: &std::path::Path, url: &str) -> Config {
    config(
        dir,
        &format!(
            "[[application]]\nid = \"farm\"\n\n[[device]]\napplication = \"farm\"\nid = \"meter-7\"\ndev_eui = \"70b3d57ed0000007\"\njoin_eui = \"0000000000000001\"\napp_key = \"{APP_KEY}\"\n\n[[stream]]\nname = \"cloud\"\nserver = \"{url}\"\n"
        ),
    )
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
    assert_eq!(ja.cf_list, Some(otaa::eu868_cf_list()), "EU868 CFList");
    f.tx_ack(pr.token, None).await.unwrap();
    let (nwk_s_key, app_s_key) = otaa::derive_session_keys(&key, ja.app_nonce, ja.net_id, nonce);
    SimDevice {
        id: "meter-7".into(),
        dev_addr: ja.dev_addr,
        nwk_s_key,
        app_s_key,
        f_cnt: 0,
    }
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

    let mut dev = join(&f, &mut other, 1).await;
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
    let mut renewed = join(&f, &mut other, 3).await;
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
