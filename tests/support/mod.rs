//! Shared test harness: brokers (embedded or mosquitto), an MQTT subscriber, configs, devices.
#![allow(dead_code)]

pub mod broker;
pub mod iothub;
pub mod logs;
pub mod pki;
pub mod records;
pub mod streaming;

use lorastream::config::Config;
use lorastream::model::{AesKey, DevAddr};
use lorastream::sim::SimDevice;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Poll `f` every 20 ms until it is true or `timeout` passes.
pub async fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// The storage engines of this build, for tests that run against each (`[storage] backend`):
/// redb always, sled with the `sled` cargo feature. `LORASTREAM_TEST_BACKENDS=sled` narrows
/// the list (CI's second run, with the feature, tests only what the first did not).
pub fn backends() -> Vec<&'static str> {
    let mut b = vec!["redb"];
    if cfg!(feature = "sled") {
        b.push("sled");
    }
    if let Ok(only) = std::env::var("LORASTREAM_TEST_BACKENDS") {
        b.retain(|e| only.split(',').any(|o| o.trim() == *e));
        assert!(
            !b.is_empty(),
            "LORASTREAM_TEST_BACKENDS={only}: no such engine in this build"
        );
    }
    b
}

/// The engine a name of [`backends`] stands for.
pub fn storage_backend(name: &str) -> lorastream::config::StorageBackend {
    match name {
        "sled" => lorastream::config::StorageBackend::Sled,
        _ => lorastream::config::StorageBackend::Redb,
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---- skip gates: one rule for every optional part ----
//
// A test that needs something this machine may not have (Debian's mosquitto, root for mounts
// and FUSE, Python with ChirpStack's protobuf classes, Debian's chromium) is skipped with a
// line on stderr, unless the matching variable makes it mandatory (CI sets them all): then a
// missing part is a failure, never a silent pass.

/// Skip (false, with a line on stderr) or fail (when `var=1`) because `why`.
fn skip_or_fail(test: &str, var: &str, why: &str) -> bool {
    if std::env::var(var).is_ok_and(|v| v == "1") {
        panic!("{test}: {var}=1 but {why}");
    }
    // Straight to stderr: the harness captures the output of passing tests, and a skip must
    // be seen.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {why} ({var}=1 makes this a failure)"
    );
    false
}

/// True when Debian's mosquitto can run; otherwise skip, or fail with
/// `LORASTREAM_TEST_MOSQUITTO=1`.
pub fn needs_mosquitto(test: &str) -> bool {
    Mosquitto::available()
        || skip_or_fail(
            test,
            "LORASTREAM_TEST_MOSQUITTO",
            "the mosquitto binary is not installed",
        )
}

/// Debian's `chromium` (or `LORASTREAM_CHROMIUM`) for the status page tests, when installed;
/// otherwise skip, or fail with `LORASTREAM_TEST_BROWSER=1`.
pub fn needs_browser(test: &str) -> Option<std::path::PathBuf> {
    let candidates = std::env::var_os("LORASTREAM_CHROMIUM")
        .map(std::path::PathBuf::from)
        .into_iter()
        .chain(
            ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
                .iter()
                .map(std::path::PathBuf::from),
        );
    for c in candidates {
        if c.is_file() {
            return Some(c);
        }
    }
    skip_or_fail(
        test,
        "LORASTREAM_TEST_BROWSER",
        "Debian's chromium is not installed (apt install chromium)",
    );
    None
}

/// True when `check` says the root-only part is there (Ok); otherwise skip, or fail with
/// `LORASTREAM_TEST_ROOT=1`.
pub fn needs_root(test: &str, check: Result<(), String>) -> bool {
    match check {
        Ok(()) => true,
        Err(why) => skip_or_fail(test, "LORASTREAM_TEST_ROOT", &why),
    }
}

/// Debian's OpenSSH server and client (`/usr/sbin/sshd`, `ssh`, `ssh-keygen`) for the SSH test
/// of the IoT Hub tunnel, when installed; otherwise skip, or fail with `LORASTREAM_TEST_SSH=1`.
pub fn needs_ssh(test: &str) -> bool {
    let ok = |c: &str, a: &str| {
        Command::new(c)
            .arg(a)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    };
    if std::path::Path::new("/usr/sbin/sshd").is_file() && ok("ssh", "-V") && ok("ssh-keygen", "-?")
    {
        return true;
    }
    skip_or_fail(
        test,
        "LORASTREAM_TEST_SSH",
        "OpenSSH is not installed (apt install openssh-server openssh-client)",
    )
}

/// The Python interpreter of the format checks (tests/py/): `LORASTREAM_PYTHON`, or `python3`.
pub fn python_interpreter() -> String {
    std::env::var("LORASTREAM_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".into())
}

/// True when the Python interpreter runs and imports `modules`; otherwise skip, or fail with
/// `LORASTREAM_TEST_PYTHON=1` (CI, which installs tests/py/requirements.txt).
pub fn needs_python(test: &str, modules: &[&str]) -> bool {
    let py = python_interpreter();
    let code = modules
        .iter()
        .map(|m| format!("import {m}"))
        .collect::<Vec<_>>()
        .join("; ");
    let why = match Command::new(&py).arg("-c").arg(&code).output() {
        Ok(o) if o.status.success() => return true,
        Ok(o) => format!(
            "{py} cannot import {} ({}); pip install -r tests/py/requirements.txt, or set LORASTREAM_PYTHON",
            modules.join(", "),
            String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("").trim()
        ),
        Err(e) => format!("cannot run {py}: {e}; install python3 or set LORASTREAM_PYTHON"),
    };
    skip_or_fail(test, "LORASTREAM_TEST_PYTHON", &why)
}

/// Runs `tests/py/<script> <args>` with `input` on stdin: (exit 0, stdout, stderr).
pub fn python(script: &str, args: &[&str], input: &[u8]) -> (bool, String, String) {
    let py = python_interpreter();
    let path = format!("{}/tests/py/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new(&py)
        .arg(&path)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {py} {path}: {e}"));
    // Written from a thread: a large input must not block on a full pipe while the script
    // writes its output.
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().expect("python output");
    let _ = writer.join();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Debian's mosquitto on a port of its own: the one launcher of the test suite. With
/// [`Mosquitto::start_persistent`] it keeps sessions on disk and [`Mosquitto::stop`] (SIGTERM)
/// lets it save them.
pub struct Mosquitto {
    pub port: u16,
    child: Option<Child>,
    conf: std::path::PathBuf,
    /// Keeps a temporary config file alive.
    _temp: Option<tempfile::NamedTempFile>,
}

impl Mosquitto {
    pub fn available() -> bool {
        Command::new("mosquitto")
            .arg("-h")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    }

    pub async fn start(extra_conf: &str) -> Mosquitto {
        let port = free_port();
        Self::start_raw(
            &format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra_conf}\n"),
            port,
        )
        .await
    }

    /// mosquitto with a whole config file of the test's; `port` is the one to wait for.
    pub async fn start_raw(conf_text: &str, port: u16) -> Mosquitto {
        let mut conf = tempfile::NamedTempFile::new().unwrap();
        use std::io::Write;
        write!(conf, "{conf_text}").unwrap();
        let mut m = Mosquitto {
            port,
            child: None,
            conf: conf.path().to_path_buf(),
            _temp: Some(conf),
        };
        m.restart().await;
        m
    }

    /// mosquitto with persistence in `dir` (its config and log there too): a subscriber's
    /// persistent session keeps collecting while the subscriber or the broker restarts.
    pub async fn start_persistent(dir: &Path) -> Mosquitto {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        // `user root`: as root mosquitto would switch to the `mosquitto` user, which cannot
        // write its database into the test's private temp dir.
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nuser root\npersistence true\npersistence_location {}/\nmax_queued_messages 1000000\nmax_queued_bytes 0\n",
                dir.display()
            ),
        )
        .unwrap();
        let mut m = Mosquitto {
            port,
            child: None,
            conf,
            _temp: None,
        };
        m.restart().await;
        m
    }

    pub async fn restart(&mut self) {
        let log = self.conf.with_extension("log");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            )
            .spawn()
            .expect("mosquitto could not be started");
        self.child = Some(child);
        let port = self.port;
        assert!(
            wait_until(Duration::from_secs(10), || std::net::TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok())
            .await,
            "mosquitto did not start listening on {port}"
        );
    }

    /// What mosquitto logged so far (its connection lines name each client's id and session:
    /// `New client connected from ... as ID (p2, c0, k30)`, c0 = a persistent session).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.conf.with_extension("log")).unwrap_or_default()
    }

    /// The process id, while it runs (to stop it with SIGSTOP, as a hung broker).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGTERM: mosquitto closes every connection and saves its database (when persistent).
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
            let end = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The broker a test runs against.
pub enum Broker {
    Embedded(broker::TestBroker),
    Mosquitto(Mosquitto),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    Embedded,
    Mosquitto,
}

/// Brokers to run every broker test against: the embedded one always; mosquitto when it is
/// installed, and mandatory (a missing binary fails) with LORASTREAM_TEST_MOSQUITTO=1 (CI).
pub fn broker_kinds() -> Vec<BrokerKind> {
    let mut v = vec![BrokerKind::Embedded];
    if needs_mosquitto("(broker tests against mosquitto)") {
        v.push(BrokerKind::Mosquitto);
    }
    v
}

impl Broker {
    pub async fn start(kind: BrokerKind) -> Broker {
        match kind {
            BrokerKind::Embedded => Broker::Embedded(broker::TestBroker::start().await),
            BrokerKind::Mosquitto => Broker::Mosquitto(Mosquitto::start("").await),
        }
    }
    pub fn port(&self) -> u16 {
        match self {
            Broker::Embedded(b) => b.port(),
            Broker::Mosquitto(m) => m.port,
        }
    }
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port())
    }
    pub async fn stop(&mut self) {
        match self {
            Broker::Embedded(b) => b.stop().await,
            Broker::Mosquitto(m) => m.stop().await,
        }
    }
    pub async fn restart(&mut self) {
        match self {
            Broker::Embedded(b) => b.restart().await,
            Broker::Mosquitto(m) => m.restart().await,
        }
    }
}

/// An MQTT client that collects everything published under a filter. It reconnects by itself
/// (with its subscription) when the broker restarts.
pub struct Subscriber {
    rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    pub seen: Vec<(String, Vec<u8>)>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    pub async fn connect(port: u16, filter: &str) -> Subscriber {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let filter = filter.to_string();
        let id = format!("test-sub-{}", rand_id());
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut o = MqttOptions::new(id, "127.0.0.1", port);
            o.set_max_packet_size(1 << 20, 1 << 20);
            o.set_keep_alive(Duration::from_secs(5));
            let (client, mut el) = AsyncClient::new(o, 100);
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.subscribe(filter.clone(), QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("subscriber did not get its SUBACK")
            .ok();
        Subscriber {
            rx,
            seen: Vec::new(),
            task,
        }
    }

    /// Wait until at least `n` messages matched `pred` (counting everything seen so far).
    pub async fn wait_for(
        &mut self,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&str, &serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        let end = tokio::time::Instant::now() + timeout;
        // Parse each message once (a drain test sees thousands).
        let parse = |(t, p): &(String, Vec<u8>)| {
            let v: serde_json::Value = serde_json::from_slice(p).unwrap_or(serde_json::Value::Null);
            pred(t, &v).then_some(v)
        };
        let mut matching: Vec<serde_json::Value> = self.seen.iter().filter_map(parse).collect();
        while matching.len() < n {
            match tokio::time::timeout_at(end, self.rx.recv()).await {
                Ok(Some(m)) => {
                    if let Some(v) = parse(&m) {
                        matching.push(v);
                    }
                    self.seen.push(m);
                }
                _ => break,
            }
        }
        matching
    }

    /// Take whatever arrives within `d`.
    pub async fn drain_for(&mut self, d: Duration) {
        let end = tokio::time::Instant::now() + d;
        while let Ok(Some(m)) = tokio::time::timeout_at(end, self.rx.recv()).await {
            self.seen.push(m);
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    std::process::id() as u64 * 1000 + N.fetch_add(1, Ordering::SeqCst)
}

/// A test device: deterministic keys from `n`.
pub fn device(n: u8) -> SimDevice {
    SimDevice {
        id: format!("dev-{n}"),
        dev_addr: DevAddr(0x2600_0000 | u32::from(n)),
        nwk_s_key: AesKey([n; 16]),
        app_s_key: AesKey([n.wrapping_add(0x80); 16]),
        f_cnt: 0,
        adr: false,
    }
}

/// `[[device]]` table for a test device in `app`.
pub fn device_toml(d: &SimDevice, app: &str) -> String {
    format!(
        "[[device]]\napplication = \"{app}\"\nid = \"{}\"\ndev_eui = \"70B3D57ED00000{:02X}\"\ndev_addr = \"{}\"\nnwk_s_key = \"{}\"\napp_s_key = \"{}\"\n\n",
        d.id,
        d.dev_addr.0 & 0xFF,
        d.dev_addr,
        hex::encode(d.nwk_s_key.0),
        hex::encode(d.app_s_key.0)
    )
}

/// A config with loopback UDP on port 0, a store in `dir`, no metrics, and `rest` appended.
/// The gateway has no extra channels (`extra_channels = []`): the test devices keep the
/// region's default channels and get no NewChannelReq, so tests about other things see only
/// the downlinks they cause. tests/mac.rs and tests/otaa.rs use the region's plan.
pub fn config(dir: &Path, rest: &str) -> Config {
    let src = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\ndedup_window_ms = 100\neui = \"AA555A00000000FF\"\nextra_channels = []\n\n[storage]\npath = {:?}\nflush_every_ms = 0\n\n[metrics]\nlisten = \"\"\n\n{rest}",
        dir.join("db").display().to_string()
    );
    Config::parse(&src, "test.toml").unwrap_or_else(|e| panic!("{e}\n{src}"))
}

pub fn install_crypto() {
    lorastream::streams::tls::install_crypto_provider();
}
