//! The generic MQTT stream over TLS (`mqtts://`, `ca_file` added to the system roots,
//! username/password) and over WebSocket (`ws://`), against Debian's mosquitto. Skipped when
//! mosquitto is missing, unless LORASTREAM_TEST_MOSQUITTO=1 (CI).

mod support;

use lorastream::daemon::Daemon;
use lorastream::model::Eui64;
use lorastream::sim::{Forwarder, Radio};
use std::time::Duration;
use support::pki::Ca;
use support::*;

const T: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_password_and_websocket() {
    if !needs_mosquitto("mqtts_with_password_and_websocket") {
        return;
    }
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let ca = Ca::new(p, "broker");
    let server = ca.issue(p, "localhost", &["localhost"]);
    let pw = p.join("passwords");
    let ok = std::process::Command::new("mosquitto_passwd")
        .arg("-b")
        .arg("-c")
        .arg(&pw)
        .args(["gateway", "s3cret"])
        .status()
        .unwrap();
    assert!(ok.success());
    let (tls_port, ws_port, plain_port) = (free_port(), free_port(), free_port());
    let conf = format!(
        "per_listener_settings true\npersistence false\n\
         listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\npassword_file {}\nallow_anonymous false\n\
         listener {ws_port} 127.0.0.1\nprotocol websockets\nallow_anonymous true\n\
         listener {plain_port} 127.0.0.1\nallow_anonymous true\n",
        ca.pem_path.display(),
        server.cert.display(),
        server.key.display(),
        pw.display()
    );
    let _m = Mosquitto::start_raw(&conf, tls_port).await;
    // Everything published on any listener reaches subscribers of the plain one.
    let mut sub = Subscriber::connect(plain_port, "#").await;

    let mut d = device(1);
    let ca_file = ca.pem_path.display().to_string();
    let streams = format!(
        "[[stream]]\nname = \"tls\"\nserver = \"mqtts://localhost:{tls_port}\"\nca_file = {ca_file:?}\nusername = \"gateway\"\npassword = \"s3cret\"\ntopic_prefix = \"tls\"\n\n\
         [[stream]]\nname = \"badpw\"\nserver = \"mqtts://localhost:{tls_port}\"\nca_file = {ca_file:?}\nusername = \"gateway\"\npassword = \"wrong\"\ntopic_prefix = \"bad\"\n\n\
         [[stream]]\nname = \"ws\"\nserver = \"ws://127.0.0.1:{ws_port}/mqtt\"\ntopic_prefix = \"ws\"\n"
    );
    let cfg = config(
        p,
        &format!(
            "[[application]]\nid = \"farm\"\n\n{}{streams}",
            device_toml(&d, "farm")
        ),
    );
    let daemon = Daemon::start(&cfg).await.unwrap();
    let m = daemon.metrics().clone();
    assert!(
        wait_until(T, || m.is_stream_connected("tls")
            && m.is_stream_connected("ws"))
        .await,
        "{}",
        m.encode()
    );
    let mut f = Forwarder::connect(daemon.udp_addr(), Eui64::from_u64(1))
        .await
        .unwrap();
    f.send(&[(&d.uplink(1, b"hi", false).unwrap(), Radio::default())])
        .await
        .unwrap();
    let got = sub.wait_for(2, T, |t, _| t.ends_with("/up")).await;
    let topics: Vec<&str> = sub.seen.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(got.len(), 2, "{topics:?}");
    assert!(topics.contains(&"tls/farm/devices/dev-1/up"));
    assert!(topics.contains(&"ws/farm/devices/dev-1/up"));
    // A wrong password never connects, and its copy waits in its own queue.
    assert!(!m.is_stream_connected("badpw"));
    assert_eq!(daemon.store().queue("badpw").unwrap().len(), 1);
    let tls_q = daemon.store().queue("tls").unwrap();
    assert!(
        wait_until(T, || tls_q.is_empty()).await,
        "acknowledged over TLS"
    );
    daemon.stop().await;
}
