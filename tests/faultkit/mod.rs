//! Harness of the fault-injection tests (`tests/faults.rs`, `tests/powercut.rs`): the real
//! `lorastream run` binary as a child process, a paced load of real GWMP/UDP uplinks whose
//! PUSH_ACKs are timed, brokers that can be stopped without losing what they already
//! delivered, the daemon's `/metrics` over HTTP, and one audit of what arrived.
//!
//! What "accepted" means here (see docs/powercut.md): the daemon PUSH_ACKs a datagram as soon
//! as it has read it, *before* the dedup window (`dedup_window_ms`, 200 ms by default) and the
//! store append, so a PUSH_ACK alone promises nothing. The guarantee the tests hold the daemon
//! to is: an uplink whose PUSH_ACK came at least `dedup_window_ms + flush_every_ms + margin`
//! before a kill or power cut was in the store, durably, and is delivered eventually. Uplinks
//! younger than that at the cut may be lost; the tests count them separately and report how old
//! the oldest lost one was.
#![allow(dead_code)]

use crate::support::broker::TestBroker;
use crate::support::{device_toml, free_port, wait_until, BrokerKind, Mosquitto};
use lorastream::model::Eui64;
use lorastream::sim::{push_data, Radio, SimDevice};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------------
// Store backends

/// Store backends every fault test runs against (`[storage] backend`): those of the build.
pub fn backends() -> Vec<&'static str> {
    crate::support::backends()
}

/// The `[storage]` line selecting `backend`.
pub fn backend_toml(backend: &str) -> String {
    format!("backend = \"{backend}\"\n")
}

// ---------------------------------------------------------------------------------------------
// The daemon as a process

/// A free UDP port on loopback (bound, read, released: the daemon binds it right after).
pub fn free_udp() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Everything a daemon's config file says.
#[derive(Clone)]
pub struct DaemonSpec {
    /// Where the config and the logs go.
    pub dir: PathBuf,
    pub store: PathBuf,
    pub udp: SocketAddr,
    pub metrics_port: u16,
    pub backend: &'static str,
    pub flush_every_ms: u64,
    /// None = the daemon's default (200 ms).
    pub dedup_window_ms: Option<u64>,
    pub max_bytes: Option<u64>,
    pub when_full: Option<&'static str>,
    /// More `[storage]` lines (e.g. `reserve_bytes = 65536\n`).
    pub storage_extra: String,
    /// `[[application]]`, `[[device]]` and `[[stream]]` tables.
    pub body: String,
    /// `RUST_LOG` for the daemon (None: inherited, else the config's level).
    pub log_filter: Option<String>,
}

impl DaemonSpec {
    pub fn new(dir: &Path, backend: &'static str, body: String) -> DaemonSpec {
        DaemonSpec {
            dir: dir.to_path_buf(),
            store: dir.join("db"),
            udp: free_udp(),
            metrics_port: free_port(),
            backend,
            flush_every_ms: 0,
            dedup_window_ms: None,
            max_bytes: None,
            when_full: None,
            storage_extra: String::new(),
            body,
            log_filter: None,
        }
    }

    pub fn dedup_window(&self) -> Duration {
        Duration::from_millis(self.dedup_window_ms.unwrap_or(200))
    }

    pub fn toml(&self) -> String {
        let mut s = format!(
            // No extra channels: the simulated devices get no NewChannelReq (see
            // support::config), so the faults measured are the store's and the streams'.
            "[gateway]\nlisten = \"{}\"\neui = \"AA555A00000000FF\"\nextra_channels = []\n",
            self.udp
        );
        if let Some(w) = self.dedup_window_ms {
            s += &format!("dedup_window_ms = {w}\n");
        }
        s += &format!(
            "\n[storage]\npath = {:?}\nflush_every_ms = {}\n{}",
            self.store.display().to_string(),
            self.flush_every_ms,
            backend_toml(self.backend)
        );
        if let Some(m) = self.max_bytes {
            s += &format!("max_bytes = {m}\n");
        }
        if let Some(w) = self.when_full {
            s += &format!("when_full = \"{w}\"\n");
        }
        s += &self.storage_extra;
        s += &format!(
            "\n[metrics]\nlisten = \"127.0.0.1:{}\"\n\n[log]\nlevel = \"info\"\n\n{}",
            self.metrics_port, self.body
        );
        s
    }
}

/// `[[application]] farm` and `[[device]]` tables for `devices`.
pub fn devices_toml(devices: &[SimDevice]) -> String {
    let mut s = "[[application]]\nid = \"farm\"\n\n".to_string();
    for d in devices {
        s += &device_toml(d, "farm");
    }
    s
}

/// A `[[stream]]` of kind mqtt.
pub fn mqtt_stream(name: &str, url: &str, prefix: &str) -> String {
    format!("[[stream]]\nname = \"{name}\"\nserver = \"{url}\"\ntopic_prefix = \"{prefix}\"\n\n")
}

/// `lorastream run` as a child process.
pub struct DaemonProc {
    child: Option<Child>,
    pub spec: DaemonSpec,
    pub log: PathBuf,
}

static STARTS: AtomicUsize = AtomicUsize::new(0);

impl DaemonProc {
    /// Start and wait until `/health` answers (store open, sockets bound, tasks running).
    pub async fn start(spec: &DaemonSpec) -> DaemonProc {
        match Self::try_start(spec).await {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`start`](Self::start), but a daemon that exits or never answers is an Err with its
    /// log, not a panic.
    pub async fn try_start(spec: &DaemonSpec) -> Result<DaemonProc, String> {
        std::fs::create_dir_all(&spec.dir).unwrap();
        let cfg = spec.dir.join("lorastream.toml");
        std::fs::write(&cfg, spec.toml()).unwrap();
        let n = STARTS.fetch_add(1, Ordering::SeqCst);
        let log = spec.dir.join(format!("daemon-{n}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lorastream"));
        cmd.args(["run", "-c"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(f) = &spec.log_filter {
            cmd.env("RUST_LOG", f);
        }
        let child = cmd.spawn().unwrap();
        let mut d = DaemonProc {
            child: Some(child),
            spec: spec.clone(),
            log,
        };
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if d.health().await.is_some() {
                return Ok(d);
            }
            if let Some(status) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                d.child = None;
                return Err(format!(
                    "lorastream run exited with {status} at start; log:\n{}",
                    d.log_text()
                ));
            }
            if Instant::now() > end {
                return Err(format!(
                    "lorastream run did not answer /health within 20 s; log:\n{}",
                    d.log_text()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL and reap. Returns the instant just before the signal was sent.
    pub fn kill9(&mut self) -> Instant {
        let t = Instant::now();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        t
    }

    /// SIGTERM and wait (at most `timeout`, then SIGKILL). Returns the exit status, if any.
    pub async fn stop(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
        let end = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            if Instant::now() > end {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The uplinks this daemon logged as stored (the `lorastream::stored` trace lines, written
    /// after the store's append returned: with `flush_every_ms = 0`, after the fsync). Needs
    /// `log_filter` with `lorastream::stored=trace`; works after a kill (the log stays).
    pub fn stored_uplinks(&self) -> HashSet<(u8, u32)> {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        s.lines()
            .filter(|l| l.contains("uplink stored"))
            .filter_map(|l| {
                let field = |name: &str| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix(name))
                        .map(|v| v.trim_matches('"').to_string())
                };
                let dev = field("device=")?.strip_prefix("dev-")?.parse().ok()?;
                let f_cnt = field("f_cnt=")?.parse().ok()?;
                Some((dev, f_cnt))
            })
            .collect()
    }

    /// The daemon's log: the last 40 lines, or the last `LORASTREAM_TEST_LOG_LINES`.
    pub fn log_text(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        let keep = std::env::var("LORASTREAM_TEST_LOG_LINES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(40);
        let from = lines.len().saturating_sub(keep);
        lines[from..].join("\n")
    }

    async fn get(&self, path: &str) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let f = async {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.spec.metrics_port))
                .await
                .ok()?;
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .ok()?;
            let mut r = String::new();
            s.read_to_string(&mut r).await.ok()?;
            // `/health` answers 503 while degraded (no forwarder, a stream down): the daemon is
            // up and answering all the same, with the same document.
            (r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.1 503"))
                .then(|| r.split("\r\n\r\n").nth(1).map(String::from))
                .flatten()
        };
        tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .ok()
            .flatten()
    }

    pub async fn health(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.get("/health").await?).ok()
    }

    pub async fn metrics(&self) -> Option<Prom> {
        Some(Prom::parse(&self.get("/metrics").await?))
    }

    /// Scrape until `f` holds (or `timeout`); returns the last scrape.
    pub async fn wait_metrics(&self, timeout: Duration, f: impl Fn(&Prom) -> bool) -> Prom {
        let end = Instant::now() + timeout;
        loop {
            let m = self.metrics().await.unwrap_or_default();
            if f(&m) || Instant::now() > end {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A parsed Prometheus text exposition.
#[derive(Debug, Clone, Default)]
pub struct Prom {
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Prom {
    pub fn parse(text: &str) -> Prom {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (head, value) = match line.rsplit_once(' ') {
                Some(x) => x,
                None => continue,
            };
            let Ok(v) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match head.split_once('{') {
                Some((n, rest)) => {
                    let mut m = BTreeMap::new();
                    for kv in rest.trim_end_matches('}').split(',') {
                        if let Some((k, v)) = kv.split_once('=') {
                            m.insert(k.to_string(), v.trim_matches('"').to_string());
                        }
                    }
                    (n.to_string(), m)
                }
                None => (head.to_string(), BTreeMap::new()),
            };
            samples.push((name, labels, v));
        }
        Prom { samples }
    }

    /// The sample `name` whose labels include `labels` (0 when absent).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v as u64)
            .unwrap_or(0)
    }

    /// The sum of every sample of `name` (all label sets).
    pub fn sum(&self, name: &str) -> u64 {
        self.samples
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, _, v)| *v as u64)
            .sum()
    }

    pub fn uplinks(&self, result: &str) -> u64 {
        self.get("lorastream_uplinks_total", &[("result", result)])
    }
    pub fn depth(&self, stream: &str) -> u64 {
        self.get("lorastream_queue_depth", &[("stream", stream)])
    }
    pub fn delivered(&self, stream: &str) -> u64 {
        self.get("lorastream_queue_delivered_total", &[("stream", stream)])
    }
    pub fn dropped(&self, stream: &str, reason: &str) -> u64 {
        self.get(
            "lorastream_queue_dropped_total",
            &[("stream", stream), ("reason", reason)],
        )
    }
    pub fn connected(&self, stream: &str) -> bool {
        self.get("lorastream_stream_connected", &[("stream", stream)]) == 1
    }
}

// ---------------------------------------------------------------------------------------------
// Load: paced uplinks over real UDP, PUSH_ACKs timed

/// One uplink the load sent.
#[derive(Debug, Clone)]
pub struct Sent {
    /// Device number (`dev-{n}`).
    pub dev: u8,
    pub f_cnt: u32,
    pub phy: Vec<u8>,
    pub sent: Instant,
    /// When its PUSH_ACK was read (None: the daemon never read it, e.g. it was down).
    pub acked: Option<Instant>,
    /// The daemon run it was sent during ([`Load::set_epoch`]).
    pub epoch: usize,
}

struct LoadInner {
    log: Mutex<Vec<Sent>>,
    /// Replays sent: uplink → wall-clock time of the (last) replay.
    replays: Mutex<HashMap<(u8, u32), std::time::SystemTime>>,
    tokens: Mutex<HashMap<u16, usize>>,
    next_token: AtomicU16,
    running: AtomicBool,
    epoch: AtomicUsize,
    socket: UdpSocket,
    target: SocketAddr,
    gateway: Eui64,
    stop: CancellationToken,
}

/// A simulated packet forwarder sending uplinks of `devices` round robin at a fixed rate, one
/// rxpk per PUSH_DATA, and timing each PUSH_ACK.
pub struct Load {
    inner: Arc<LoadInner>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The test devices `dev-1` ..= `dev-n`.
pub fn devices(n: u8) -> Vec<SimDevice> {
    (1..=n).map(crate::support::device).collect()
}

impl Load {
    pub async fn start(target: SocketAddr, devices: Vec<SimDevice>, per_second: f64) -> Load {
        // A large receive buffer: a PUSH_ACK lost to a full buffer would hide an uplink from
        // the checks (the kernel may cap it at net.core.rmem_max; that is fine).
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let _ = socket2::SockRef::from(&std_socket).set_recv_buffer_size(4 << 20);
        std_socket.set_nonblocking(true).unwrap();
        let socket = UdpSocket::from_std(std_socket).unwrap();
        let inner = Arc::new(LoadInner {
            log: Mutex::new(Vec::new()),
            replays: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            next_token: AtomicU16::new(1),
            running: AtomicBool::new(true),
            epoch: AtomicUsize::new(0),
            socket,
            target,
            gateway: Eui64::from_u64(0xAA55_5A00_0000_0001),
            stop: CancellationToken::new(),
        });
        let period = Duration::from_secs_f64(1.0 / per_second);
        let sender = {
            let inner = inner.clone();
            let mut devices = devices;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut next = 0usize;
                loop {
                    tokio::select! {
                        _ = inner.stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    if !inner.running.load(Ordering::SeqCst) || devices.is_empty() {
                        continue;
                    }
                    let i = next % devices.len();
                    let d = &mut devices[i];
                    next += 1;
                    let dev = (d.dev_addr.0 & 0xFF) as u8;
                    let f_cnt = d.f_cnt;
                    let mut payload = vec![dev];
                    payload.extend_from_slice(&f_cnt.to_be_bytes());
                    payload.extend_from_slice(&[0xA5; 7]);
                    let phy = d.uplink(1, &payload, false).unwrap();
                    inner.send(dev, f_cnt, phy).await;
                }
            })
        };
        let receiver = {
            let inner = inner.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                loop {
                    let r = tokio::select! {
                        _ = inner.stop.cancelled() => return,
                        r = inner.socket.recv_from(&mut buf) => r,
                    };
                    match r {
                        // GWMP v2 PUSH_ACK: version 2, token, identifier 1.
                        Ok((n, _)) if n >= 4 && buf[0] == 2 && buf[3] == 1 => {
                            let now = Instant::now();
                            let token = u16::from_be_bytes([buf[1], buf[2]]);
                            let idx = inner.tokens.lock().unwrap().get(&token).copied();
                            if let Some(i) = idx {
                                let mut log = inner.log.lock().unwrap();
                                log[i].acked.get_or_insert(now);
                            }
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                }
            })
        };
        Load {
            inner,
            tasks: vec![sender, receiver],
        }
    }

    pub fn pause(&self) {
        self.inner.running.store(false, Ordering::SeqCst);
    }
    pub fn resume(&self) {
        self.inner.running.store(true, Ordering::SeqCst);
    }
    pub fn set_epoch(&self, e: usize) {
        self.inner.epoch.store(e, Ordering::SeqCst);
    }

    /// A copy of everything sent so far.
    pub fn log(&self) -> Vec<Sent> {
        self.inner.log.lock().unwrap().clone()
    }

    pub fn counts(&self) -> (usize, usize) {
        let log = self.inner.log.lock().unwrap();
        (log.len(), log.iter().filter(|s| s.acked.is_some()).count())
    }

    /// Wait until every uplink sent so far has its PUSH_ACK.
    pub async fn wait_all_acked(&self, timeout: Duration) -> bool {
        wait_until(timeout, || {
            let (s, a) = self.counts();
            s == a
        })
        .await
    }

    /// Send an uplink again, byte for byte (a replay). It is not logged as a new uplink; see
    /// [`Load::replays`].
    pub async fn replay(&self, s: &Sent) {
        let token = self.inner.token();
        self.inner.tokens.lock().unwrap().remove(&token);
        self.inner
            .replays
            .lock()
            .unwrap()
            .insert((s.dev, s.f_cnt), std::time::SystemTime::now());
        let d = push_data(self.inner.gateway, token, &[(&s.phy, Radio::default())]);
        let _ = self.inner.socket.send_to(&d, self.inner.target).await;
    }

    /// Every replay sent: uplink → when.
    pub fn replays(&self) -> HashMap<(u8, u32), std::time::SystemTime> {
        self.inner.replays.lock().unwrap().clone()
    }

    pub async fn stop(mut self) -> Vec<Sent> {
        self.inner.stop.cancel();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        self.log()
    }
}

impl LoadInner {
    fn token(&self) -> u16 {
        loop {
            let t = self.next_token.fetch_add(1, Ordering::SeqCst);
            if t != 0 {
                return t;
            }
        }
    }

    async fn send(&self, dev: u8, f_cnt: u32, phy: Vec<u8>) {
        let token = self.token();
        let d = push_data(self.gateway, token, &[(&phy, Radio::default())]);
        {
            let mut log = self.log.lock().unwrap();
            log.push(Sent {
                dev,
                f_cnt,
                phy,
                sent: Instant::now(),
                acked: None,
                epoch: self.epoch.load(Ordering::SeqCst),
            });
            self.tokens.lock().unwrap().insert(token, log.len() - 1);
        }
        // Errors (nobody listening while the daemon is down) are what a forwarder lives with.
        let _ = self.socket.send_to(&d, self.target).await;
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.inner.stop.cancel();
    }
}

// ---------------------------------------------------------------------------------------------
// What arrived

/// One uplink message as a consumer received it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub dev: u8,
    pub f_cnt: u32,
    pub corr: String,
    /// The daemon's `received_at` (when it read the datagram).
    pub received_at: std::time::SystemTime,
    /// When the test's subscriber got it (None for the embedded broker's own log).
    pub at: Option<Instant>,
}

/// Parse an uplink message (TTS JSON); None for anything else.
pub fn parse_uplink(topic: &str, payload: &[u8], at: Option<Instant>) -> Option<Delivery> {
    if !topic.ends_with("/up") || topic.contains("/gateways/") {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let dev = v["end_device_ids"]["device_id"]
        .as_str()?
        .strip_prefix("dev-")?
        .parse()
        .ok()?;
    Some(Delivery {
        dev,
        f_cnt: v["uplink_message"]["f_cnt"].as_u64()? as u32,
        corr: v["correlation_ids"][0].as_str()?.to_string(),
        received_at: humantime::parse_rfc3339(v["received_at"].as_str()?).ok()?,
        at,
    })
}

/// An MQTT subscriber with a persistent session (clean_session = false, QoS 1), reconnecting
/// by itself. Every message is timestamped on arrival.
pub struct SessionSub {
    rx: mpsc::UnboundedReceiver<(String, Vec<u8>, Instant)>,
    task: tokio::task::JoinHandle<()>,
}

impl SessionSub {
    pub async fn connect(port: u16, filter: &str, client_id: &str) -> SessionSub {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let filter = filter.to_string();
        let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
        o.set_clean_session(false);
        o.set_keep_alive(Duration::from_secs(5));
        o.set_max_packet_size(1 << 20, 1 << 20);
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
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
                        let _ = tx.send((p.topic.clone(), p.payload.to_vec(), Instant::now()));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("subscriber did not get its SUBACK")
            .ok();
        SessionSub { rx, task }
    }
}

impl SessionSub {
    /// The next message (topic, payload, arrival time); None when the task ended.
    pub async fn recv(&mut self) -> Option<(String, Vec<u8>, Instant)> {
        self.rx.recv().await
    }
}

impl Drop for SessionSub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A broker the test can stop and start, and the complete record of what it delivered:
/// the embedded broker's log of every PUBLISH it received, or, for mosquitto, a subscriber
/// with a persistent session (mosquitto keeps queueing for it while it reconnects).
pub struct Sink {
    pub kind: BrokerKind,
    inner: SinkInner,
    seen: Vec<Delivery>,
}

enum SinkInner {
    Embedded(TestBroker),
    Mosquitto { broker: Mosquitto, sub: SessionSub },
}

impl Sink {
    pub async fn start(kind: BrokerKind, dir: &Path) -> Sink {
        let inner = match kind {
            BrokerKind::Embedded => SinkInner::Embedded(TestBroker::start().await),
            BrokerKind::Mosquitto => {
                let broker = Mosquitto::start_persistent(&dir.join("mosquitto")).await;
                let id = format!("fault-sub-{}-{}", std::process::id(), free_port());
                let sub = SessionSub::connect(broker.port, "+/+/devices/+/up", &id).await;
                SinkInner::Mosquitto { broker, sub }
            }
        };
        Sink {
            kind,
            inner,
            seen: Vec::new(),
        }
    }

    /// The embedded broker (panics for mosquitto): to withhold PUBACKs.
    pub fn embedded(&self) -> &TestBroker {
        match &self.inner {
            SinkInner::Embedded(b) => b,
            SinkInner::Mosquitto { .. } => panic!("not the embedded broker"),
        }
    }

    pub fn port(&self) -> u16 {
        match &self.inner {
            SinkInner::Embedded(b) => b.port(),
            SinkInner::Mosquitto { broker, .. } => broker.port,
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port())
    }

    pub async fn stop(&mut self) {
        match &mut self.inner {
            SinkInner::Embedded(b) => b.stop().await,
            SinkInner::Mosquitto { broker, .. } => broker.stop().await,
        }
    }

    pub async fn restart(&mut self) {
        match &mut self.inner {
            SinkInner::Embedded(b) => b.restart().await,
            SinkInner::Mosquitto { broker, .. } => broker.restart().await,
        }
    }

    /// Every uplink delivered so far, in arrival order.
    pub fn deliveries(&mut self) -> &[Delivery] {
        match &mut self.inner {
            SinkInner::Embedded(b) => {
                self.seen = b
                    .received()
                    .iter()
                    .filter_map(|(t, p)| parse_uplink(t, p, None))
                    .collect();
            }
            SinkInner::Mosquitto { sub, .. } => {
                while let Ok((t, p, at)) = sub.rx.try_recv() {
                    if let Some(d) = parse_uplink(&t, &p, Some(at)) {
                        self.seen.push(d);
                    }
                }
            }
        }
        &self.seen
    }

    /// Wait until every uplink in `want` was delivered at least once.
    pub async fn wait_for_all(&mut self, want: &HashSet<(u8, u32)>, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            let got: HashSet<(u8, u32)> =
                self.deliveries().iter().map(|d| (d.dev, d.f_cnt)).collect();
            if want.is_subset(&got) {
                return true;
            }
            if Instant::now() > end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The audit

/// What arrived, against what was sent.
#[derive(Debug, Default)]
pub struct Audit {
    pub sent: usize,
    pub acked: usize,
    /// Uplinks that had to arrive.
    pub must: usize,
    pub deliveries: usize,
    pub delivered_unique: usize,
    /// Deliveries of an uplink already delivered (each with the same correlation id, or it is
    /// listed in `corr_conflicts`).
    pub duplicates: usize,
    /// Uplinks that had to arrive and did not: (device, f_cnt).
    pub missing: Vec<(u8, u32)>,
    /// An uplink of a device arriving (for the first time) after a later one of the same device.
    pub order_violations: Vec<String>,
    /// The same uplink under two correlation ids, or one correlation id for two uplinks.
    pub corr_conflicts: Vec<String>,
    /// Delivered but never sent: must be empty.
    pub unexpected: Vec<(u8, u32)>,
    /// Delivered although its PUSH_ACK was never seen (UDP may lose an ACK; information only).
    pub ack_missed: usize,
}

impl Audit {
    pub fn ok(&self) -> bool {
        self.missing.is_empty()
            && self.order_violations.is_empty()
            && self.corr_conflicts.is_empty()
            && self.unexpected.is_empty()
    }

    pub fn summary(&self) -> String {
        let show = |v: &[(u8, u32)]| {
            let mut s: Vec<String> = v
                .iter()
                .take(20)
                .map(|(d, f)| format!("dev-{d}/{f}"))
                .collect();
            if v.len() > 20 {
                s.push(format!("… {} more", v.len() - 20));
            }
            s.join(" ")
        };
        format!(
            "sent {} acked {} must-arrive {} | deliveries {} unique {} duplicates {} | missing {} [{}] | order violations {} {:?} | correlation conflicts {} {:?} | unexpected {} [{}] | delivered without a seen PUSH_ACK {}",
            self.sent,
            self.acked,
            self.must,
            self.deliveries,
            self.delivered_unique,
            self.duplicates,
            self.missing.len(),
            show(&self.missing),
            self.order_violations.len(),
            self.order_violations.iter().take(5).collect::<Vec<_>>(),
            self.corr_conflicts.len(),
            self.corr_conflicts.iter().take(5).collect::<Vec<_>>(),
            self.unexpected.len(),
            show(&self.unexpected),
            self.ack_missed,
        )
    }
}

/// Check `deliveries` (in arrival order) against `sent`: every uplink for which `must` holds
/// arrived; per device, uplinks first arrive in f_cnt order; duplicates carry the same
/// correlation id, distinct uplinks distinct ones; nothing arrives that was not sent.
pub fn audit(sent: &[Sent], deliveries: &[Delivery], must: impl Fn(&Sent) -> bool) -> Audit {
    let mut a = Audit {
        sent: sent.len(),
        acked: sent.iter().filter(|s| s.acked.is_some()).count(),
        deliveries: deliveries.len(),
        ..Audit::default()
    };
    let acked: HashSet<(u8, u32)> = sent
        .iter()
        .filter(|s| s.acked.is_some())
        .map(|s| (s.dev, s.f_cnt))
        .collect();
    let all_sent: HashSet<(u8, u32)> = sent.iter().map(|s| (s.dev, s.f_cnt)).collect();
    let mut corr_of: HashMap<(u8, u32), &str> = HashMap::new();
    let mut uplink_of: HashMap<&str, (u8, u32)> = HashMap::new();
    let mut newest_first: HashMap<u8, u32> = HashMap::new();
    for d in deliveries {
        let key = (d.dev, d.f_cnt);
        match corr_of.get(&key) {
            Some(c) => {
                a.duplicates += 1;
                if *c != d.corr {
                    a.corr_conflicts.push(format!(
                        "dev-{}/{} arrived as {} and as {}",
                        d.dev, d.f_cnt, c, d.corr
                    ));
                }
                continue;
            }
            None => {
                corr_of.insert(key, &d.corr);
            }
        }
        if let Some(other) = uplink_of.insert(&d.corr, key) {
            a.corr_conflicts.push(format!(
                "{} names dev-{}/{} and dev-{}/{}",
                d.corr, other.0, other.1, d.dev, d.f_cnt
            ));
        }
        if !all_sent.contains(&key) {
            a.unexpected.push(key);
        } else if !acked.contains(&key) {
            a.ack_missed += 1;
        }
        if let Some(&prev) = newest_first.get(&d.dev) {
            if d.f_cnt < prev {
                a.order_violations.push(format!(
                    "dev-{}: f_cnt {} first arrived after {}",
                    d.dev, d.f_cnt, prev
                ));
            }
        }
        let e = newest_first.entry(d.dev).or_insert(d.f_cnt);
        *e = (*e).max(d.f_cnt);
    }
    a.delivered_unique = corr_of.len();
    for s in sent.iter().filter(|s| must(s)) {
        a.must += 1;
        if !corr_of.contains_key(&(s.dev, s.f_cnt)) {
            a.missing.push((s.dev, s.f_cnt));
        }
    }
    a
}

// ---------------------------------------------------------------------------------------------
// Which uplinks had to survive

/// Processing allowance on top of the dedup window and flush interval: how long an uplink may
/// take from its PUSH_ACK through the uplink stage to the end of its store append on a loaded
/// machine. Measured losses stay far below (see the printed "oldest lost" ages).
pub const MARGIN: Duration = Duration::from_millis(400);

pub fn uplink_keys(log: &[Sent], f: impl Fn(&Sent) -> bool) -> HashSet<(u8, u32)> {
    log.iter()
        .filter(|s| f(s))
        .map(|s| (s.dev, s.f_cnt))
        .collect()
}

pub fn uplink_keys_delivered(d: &[Delivery]) -> HashSet<(u8, u32)> {
    d.iter().map(|d| (d.dev, d.f_cnt)).collect()
}

/// One daemon process: from /health answering to its kill.
pub struct Run {
    pub ready: Instant,
    pub killed: Option<Instant>,
}

/// Must `s` have survived? It was PUSH_ACKed while a daemon run was up, at least `window`
/// before that run ended by a kill (or the run ended gracefully). Acks between a kill and the
/// next daemon's readiness are ambiguous (late reads of the dead daemon's ACKs) and excluded.
pub fn must_survive(s: &Sent, runs: &[Run], window: Duration) -> bool {
    let Some(a) = s.acked else { return false };
    runs.iter()
        .any(|r| r.ready <= a && r.killed.is_none_or(|k| a + window <= k))
}

/// Acked while a run was up but within `window` of its kill: may be lost. Returns the age at
/// the kill.
pub fn at_risk_age(s: &Sent, runs: &[Run], window: Duration) -> Option<Duration> {
    let a = s.acked?;
    runs.iter().find_map(|r| match r.killed {
        Some(k) if r.ready <= a && a < k && a + window > k => Some(k - a),
        _ => None,
    })
}

/// For each device, the newest uplink that must have survived a kill or cut that already
/// happened (and, if `delivered` is given, was delivered): replaying it must be refused.
/// Uplinks of the run that is up now are never candidates: one still in the dedup window
/// would merge with its replay into one uplink (a duplicate reception, not a refusal).
pub fn replay_candidates(
    log: &[Sent],
    runs: &[Run],
    window: Duration,
    delivered: Option<&HashSet<(u8, u32)>>,
) -> Vec<Sent> {
    let mut best: HashMap<u8, &Sent> = HashMap::new();
    let ended: Vec<Run> = runs
        .iter()
        .filter(|r| r.killed.is_some())
        .map(|r| Run {
            ready: r.ready,
            killed: r.killed,
        })
        .collect();
    for s in log {
        if must_survive(s, &ended, window)
            && delivered.is_none_or(|d| d.contains(&(s.dev, s.f_cnt)))
        {
            let e = best.entry(s.dev).or_insert(s);
            if s.f_cnt > e.f_cnt {
                *e = s;
            }
        }
    }
    best.into_values().cloned().collect()
}

/// Deliveries that are the originals, not a replay the daemon accepted again (which would
/// otherwise hide the loss of the original). A delivery is a replay's when the daemon read it
/// after the replay was sent (the original was read at least the window earlier).
pub fn without_replays(
    deliveries: &[Delivery],
    replays: &HashMap<(u8, u32), std::time::SystemTime>,
) -> (Vec<Delivery>, usize) {
    let slack = Duration::from_millis(50);
    let (mut keep, mut replayed) = (Vec::new(), 0);
    for d in deliveries {
        match replays.get(&(d.dev, d.f_cnt)) {
            Some(t) if d.received_at + slack >= *t => replayed += 1,
            _ => keep.push(d.clone()),
        }
    }
    (keep, replayed)
}

/// Percentiles of a list of durations (p50, p99, max), in ms.
pub fn percentiles(mut v: Vec<Duration>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (ms(at(0.5)), ms(at(0.99)), ms(*v.last().unwrap()))
}

/// A seed from `LORASTREAM_FAULT_SEED`, else from the clock; printed by the callers.
pub fn seed() -> u64 {
    std::env::var("LORASTREAM_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}
