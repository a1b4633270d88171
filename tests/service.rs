//! The daemon as systemd runs it, for real: the `lorastream run` binary with a `NOTIFY_SOCKET`
//! datagram socket this test binds (sd_notify(3): READY=1 once the UDP socket answers,
//! WATCHDOG=1 keep-alives, RELOADING=1 on SIGHUP, STOPPING=1), SIGHUP that never kills it, the
//! log lines a person reads (no colour codes on a pipe, no `Some(..)`/`None`/quoted values,
//! version and commit first, JSON lines), and the watchdog stopping its keep-alives while the
//! store's disk is frozen (`fsfreeze` on a loop-mounted ext4; root only).

mod support;

use lorastream::model::{AesKey, Eui64};
use lorastream::sim::{Forwarder, Radio, SimDevice};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{device, device_toml, free_port, needs_root, wait_until};
use tokio::net::UnixDatagram;

/// The service manager's end of the notify protocol: a datagram socket in `dir`.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        NotifySocket { sock, path }
    }

    /// The next datagram, or None after `timeout`.
    async fn next(&self, timeout: Duration) -> Option<String> {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(timeout, self.sock.recv(&mut buf))
            .await
            .ok()?
            .ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Skip datagrams until one starts with `prefix`; returns it.
    async fn until(&self, prefix: &str, timeout: Duration) -> Option<String> {
        let end = Instant::now() + timeout;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.next(left).await {
                Some(m) if m.starts_with(prefix) => return Some(m),
                Some(_) => {}
                None => return None,
            }
        }
        None
    }

    /// Datagrams that arrive within `d`.
    async fn collect_for(&self, d: Duration) -> Vec<String> {
        let end = Instant::now() + d;
        let mut out = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.next(left).await {
                Some(m) => out.push(m),
                None => break,
            }
        }
        out
    }
}

/// `lorastream run` as a child process, its stderr collected line by line.
struct Daemon {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    fn spawn(config: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lorastream"));
        cmd.arg("run")
            .arg("-c")
            .arg(config)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("JOURNAL_STREAM")
            .env_remove("NO_COLOR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(stderr).lines() {
                match l {
                    Ok(l) => sink.lock().unwrap().push(l),
                    Err(_) => break,
                }
            }
        });
        Daemon { child, lines }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn logged(&self, needle: &str) -> bool {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
    }

    /// SIGTERM and wait for the exit (the contract: within 5 s).
    async fn stop(mut self) -> (std::process::ExitStatus, Vec<String>) {
        self.signal(libc::SIGTERM);
        let end = Instant::now() + Duration::from_secs(8);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // Let the reader thread take the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let lines = self.log();
                return (st, lines);
            }
            assert!(
                Instant::now() < end,
                "no exit within 8 s of SIGTERM:\n{}",
                self.log().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp() -> std::net::SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A config file in `dir`: UDP on `udp`, the store under `store`, no metrics, `log` as the
/// `[log]` body, `rest` appended.
fn write_config(
    dir: &Path,
    store: &Path,
    udp: std::net::SocketAddr,
    log: &str,
    rest: &str,
) -> PathBuf {
    let path = dir.join("lorastream.toml");
    std::fs::write(
        &path,
        format!(
            "[gateway]\nlisten = \"{udp}\"\ndedup_window_ms = 50\n\n[storage]\npath = {:?}\n\n[metrics]\nlisten = \"\"\n\n[log]\n{log}\n\n[[application]]\nid = \"app\"\n\n{rest}",
            store.display().to_string()
        ),
    )
    .unwrap();
    path
}

/// PULL_DATA → PULL_ACK on `udp`: the socket is bound and served.
async fn pull_ack(udp: std::net::SocketAddr) -> bool {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let eui = Eui64::from_u64(0xAA55_5A00_0000_0001);
    s.send_to(&lorastream::sim::pull_data(eui, 7), udp)
        .await
        .unwrap();
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), s.recv(&mut b)).await,
        Ok(Ok(n)) if n >= 4 && b[3] == lorastream::ingress::gwmp::PULL_ACK
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_protocol_ready_watchdog_reload_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind(dir.path());
    let udp = free_udp();
    let dev = device(1);
    let body = format!(
        "{}[[stream]]\nname = \"console\"\nkind = \"stdout\"\n",
        device_toml(&dev, "app")
    );
    let cfg = write_config(
        dir.path(),
        &dir.path().join("db"),
        udp,
        "level = \"info\"",
        &body,
    );
    let d = Daemon::spawn(
        &cfg,
        &[
            ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
            // WatchdogSec=2: keep-alives every 0.5 s.
            ("WATCHDOG_USEC", "2000000"),
        ],
    );
    let ready = notify
        .next(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("no READY=1:\n{}", d.log().join("\n")));
    assert!(ready.starts_with("READY=1\nSTATUS="), "{ready:?}");
    assert!(ready.contains("1 devices, 1 streams"), "{ready:?}");
    // Ready means ready: the UDP socket answers at once.
    assert!(pull_ack(udp).await, "READY=1 before the UDP socket answers");
    let keepalives = notify.collect_for(Duration::from_secs(3)).await;
    let n = keepalives.iter().filter(|m| *m == "WATCHDOG=1\n").count();
    assert!(
        n >= 3,
        "{n} keep-alives in 3 s with WatchdogSec=2: {keepalives:?}"
    );

    // systemctl reload: SIGHUP re-reads the file; the daemon stays up.
    let mut d = d;
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("level = \"info\"", "level = \"debug\""),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    let reloading = notify
        .until("RELOADING=1", Duration::from_secs(10))
        .await
        .expect("RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading:?}");
    assert!(notify
        .until("READY=1", Duration::from_secs(10))
        .await
        .is_some());
    assert!(
        wait_until(Duration::from_secs(5), || d
            .logged("SIGHUP: [log] level applied"))
        .await,
        "{}",
        d.log().join("\n")
    );
    assert!(d.running(), "SIGHUP must not stop the daemon");

    // An invalid file is refused; the daemon keeps running with what it has.
    std::fs::write(&cfg, "[gateway]\nlisten = \"nowhere\"\n").unwrap();
    d.signal(libc::SIGHUP);
    assert!(notify
        .until("READY=1", Duration::from_secs(10))
        .await
        .is_some());
    assert!(
        wait_until(Duration::from_secs(5), || d
            .logged("configuration not reloaded"))
        .await,
        "{}",
        d.log().join("\n")
    );
    assert!(d.logged("lorastream.toml:2: [gateway] key `listen`"));
    assert!(d.running());
    assert!(pull_ack(udp).await);
    // Keep-alives went on through both reloads.
    assert!(notify
        .until("WATCHDOG=1", Duration::from_secs(3))
        .await
        .is_some());

    d.signal(libc::SIGTERM);
    assert!(notify
        .until("STOPPING=1", Duration::from_secs(5))
        .await
        .is_some());
    let (status, lines) = d.stop().await;
    assert!(status.success(), "{status}:\n{}", lines.join("\n"));
}

/// Every log line of a run that touches most of the daemon's log lines (start, uplinks, a
/// replay, a bad MIC, an unknown device, malformed datagrams, a broker that refuses
/// connections, two reloads, the stop): plain text on a pipe, one event per line, values as
/// they display.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_are_plain_and_free_of_debug_formatting() {
    let dir = tempfile::tempdir().unwrap();
    let udp = free_udp();
    let mut dev = device(1);
    let closed = free_port();
    let body = format!(
        "{}[[stream]]\nname = \"cloud\"\nkind = \"mqtt\"\nserver = \"mqtt://user:secret@127.0.0.1:{closed}\"\n",
        device_toml(&dev, "app")
    );
    let cfg = write_config(
        dir.path(),
        &dir.path().join("db"),
        udp,
        "level = \"lorastream=debug,info\"",
        &body,
    );
    let mut d = Daemon::spawn(&cfg, &[]);
    assert!(
        wait_until(Duration::from_secs(30), || d.logged("lorastream started")).await,
        "{}",
        d.log().join("\n")
    );
    let gw = Eui64::from_u64(0xAA55_5A00_0000_0002);
    let mut fwd = Forwarder::connect(udp, gw).await.unwrap();
    fwd.pull().await.unwrap();
    for _ in 0..3 {
        let phy = dev.uplink(1, b"hello", false).unwrap();
        fwd.send(&[(&phy, Radio::default())]).await.unwrap();
    }
    // A replay: frame counter 0 again.
    let mut old = dev.clone();
    old.f_cnt = 0;
    let phy = old.uplink(1, b"again", false).unwrap();
    fwd.send(&[(&phy, Radio::default())]).await.unwrap();
    // Wrong network key for the same DevAddr: a MIC failure.
    let mut forged = SimDevice {
        nwk_s_key: AesKey([0xEE; 16]),
        f_cnt: 10,
        ..dev.clone()
    };
    let phy = forged.uplink(1, b"forged", false).unwrap();
    fwd.send(&[(&phy, Radio::default())]).await.unwrap();
    // Someone else's device, and datagrams that are not GWMP.
    let mut stranger = device(9);
    let phy = stranger.uplink(1, b"x", false).unwrap();
    fwd.send(&[(&phy, Radio::default())]).await.unwrap();
    fwd.send_raw(b"\x02\x00").await.unwrap();
    fwd.send_raw(b"\x02\x00\x01\x00\xaa\x55\x5a\x00\x00\x00\x00\x02{not json")
        .await
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || d.logged("old frame counter")
            && d.logged("invalid MIC")
            && d.logged("MQTT connection failed"))
        .await,
        "{}",
        d.log().join("\n")
    );
    d.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || d
            .logged("SIGHUP: devices reloaded"))
        .await
    );
    std::fs::write(&cfg, "[storage]\nmax_bytes = 1\n").unwrap();
    d.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || d
            .logged("configuration not reloaded"))
        .await
    );
    assert!(d.running());
    let (status, lines) = d.stop().await;
    assert!(status.success());
    let all = lines.join("\n");
    assert!(all.contains("lorastream stopped"), "{all}");

    // The first line names the build.
    assert!(
        lines[0].contains(&format!("lorastream {} starting", lorastream::VERSION)),
        "{}",
        lines[0]
    );
    assert!(!lorastream::COMMIT.is_empty());
    let quoted = |l: &str| {
        // key="value": a string field written with Debug.
        l.split(' ').any(|w| {
            w.split_once('=').is_some_and(|(k, v)| {
                !k.is_empty()
                    && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && v.starts_with('"')
            })
        })
    };
    for l in &lines {
        assert!(!l.contains('\x1b'), "ANSI escape on a pipe: {l:?}");
        assert!(!l.contains("Some("), "Debug of an Option: {l}");
        assert!(!l.contains("None"), "Debug of an Option: {l}");
        assert!(
            !l.contains("Ok(") && !l.contains("Err("),
            "Debug of a Result: {l}"
        );
        assert!(
            !l.contains("Custom {") && !l.contains("Os {"),
            "Debug of an io::Error: {l}"
        );
        assert!(!quoted(l), "quoted field value: {l}");
        assert!(!l.contains("secret"), "a password in the log: {l}");
        assert!(
            l.contains(" INFO ")
                || l.contains(" WARN ")
                || l.contains(" ERROR ")
                || l.contains(" DEBUG "),
            "not one event per line: {l:?}"
        );
    }
    assert!(lines.len() >= 12, "{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let udp = free_udp();
    let cfg = write_config(
        dir.path(),
        &dir.path().join("db"),
        udp,
        "level = \"info\"\nformat = \"json\"",
        "",
    );
    let d = Daemon::spawn(&cfg, &[]);
    assert!(wait_until(Duration::from_secs(30), || d.logged("lorastream started")).await);
    let (status, lines) = d.stop().await;
    assert!(status.success());
    assert!(lines.len() >= 3, "{lines:?}");
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{l}");
        assert!(v["timestamp"].is_string(), "{l}");
    }
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(
        first["message"],
        format!("lorastream {} starting", lorastream::VERSION)
    );
    // [runtime] worker_threads, unset: one.
    assert_eq!(first["worker_threads"], 1, "{}", lines[0]);
    let started = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["message"] == "lorastream started")
        .unwrap();
    assert_eq!(started["udp"], udp.to_string());
}

/// An ext4 image mounted on a loop device, frozen with fsfreeze(8) on demand; thawed and
/// unmounted on drop (thawed first: a frozen file system keeps its writers in D state).
struct FreezableFs {
    /// Holds the image and the mount point; removed after the unmount in `drop`.
    _dir: tempfile::TempDir,
    mnt: PathBuf,
    frozen: bool,
}

impl FreezableFs {
    fn mount(test: &str) -> Option<FreezableFs> {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let run = |cmd: &mut Command| {
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let ok = std::fs::File::create(&img)
            .and_then(|f| f.set_len(64 << 20))
            .is_ok()
            && run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img))
            && run(Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mnt))
            && Command::new("fsfreeze").arg("--help").output().is_ok();
        let check = if ok {
            Ok(())
        } else {
            Err("cannot mount an ext4 image on a loop device (needs root, losetup, mkfs.ext4, fsfreeze)".to_string())
        };
        needs_root(test, check).then_some(FreezableFs {
            _dir: dir,
            mnt,
            frozen: false,
        })
    }

    fn freeze(&mut self, on: bool) {
        let flag = if on { "--freeze" } else { "--unfreeze" };
        let st = Command::new("fsfreeze")
            .arg(flag)
            .arg(&self.mnt)
            .status()
            .unwrap();
        assert!(st.success(), "fsfreeze {flag}");
        self.frozen = on;
    }
}

impl Drop for FreezableFs {
    fn drop(&mut self) {
        if self.frozen {
            let _ = Command::new("fsfreeze")
                .arg("--unfreeze")
                .arg(&self.mnt)
                .status();
        }
        let ok = Command::new("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// Thaws a mount point on drop.
struct Thaw(PathBuf);

impl Drop for Thaw {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .arg("--unfreeze")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
    }
}

/// A disk that stops answering (a frozen file system: every write blocks, as on a failing SD
/// card) under a running daemon: the loop that writes stops going round, the keep-alives stop
/// (so systemd would restart the service), the log names the loop; after the thaw keep-alives
/// come back. Nothing in the daemon is told about the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_disk_stops_the_watchdog_keepalives() {
    let Some(mut fs) = FreezableFs::mount("a_stuck_disk_stops_the_watchdog_keepalives") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind(dir.path());
    let udp = free_udp();
    let mut dev = device(2);
    let body = format!(
        "{}[[stream]]\nname = \"console\"\nkind = \"stdout\"\n",
        device_toml(&dev, "app")
    );
    let cfg = write_config(
        dir.path(),
        &fs.mnt.join("db"),
        udp,
        "level = \"info\"",
        &body,
    );
    let mut d = Daemon::spawn(
        &cfg,
        &[
            ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "2000000"),
        ],
    );
    // Declared after the daemon, so dropped before it: a failed assertion thaws the file system
    // before the daemon is killed (a process blocked on a frozen file system cannot die).
    let thaw = Thaw(fs.mnt.clone());
    assert!(notify
        .until("READY=1", Duration::from_secs(30))
        .await
        .is_some());
    assert!(notify
        .until("WATCHDOG=1", Duration::from_secs(5))
        .await
        .is_some());

    fs.freeze(true);
    let mut fwd = Forwarder::connect(udp, Eui64::from_u64(0xAA55_5A00_0000_0003))
        .await
        .unwrap();
    for _ in 0..5 {
        let phy = dev.uplink(1, b"frozen", false).unwrap();
        fwd.send(&[(&phy, Radio::default())]).await.unwrap();
    }
    assert!(
        wait_until(Duration::from_secs(15), || d.logged("watchdog: the ")).await,
        "no watchdog complaint while the disk is frozen:\n{}",
        d.log().join("\n")
    );
    // Which loop shows first depends on where the write blocked (the uplink stage's journal
    // append, the committer's fsync, or a loop waiting on a lock one of them holds).
    assert!(d.logged("loop is not running; keep-alives to systemd stopped"));
    // From the complaint on: no keep-alive for longer than WatchdogSec (systemd would kill).
    // (Keep-alives sent before the loop stuck are still queued on the socket: drop them.)
    while notify.next(Duration::from_millis(1)).await.is_some() {}
    let late = notify.collect_for(Duration::from_millis(2_500)).await;
    assert!(
        !late.iter().any(|m| m.contains("WATCHDOG=1")),
        "keep-alives while a loop is stuck: {late:?}"
    );
    assert!(d.running());

    fs.freeze(false);
    drop(thaw);
    assert!(
        notify
            .until("WATCHDOG=1", Duration::from_secs(10))
            .await
            .is_some(),
        "keep-alives did not resume after the thaw:\n{}",
        d.log().join("\n")
    );
    assert!(wait_until(Duration::from_secs(5), || d.logged("every loop runs again")).await);
    let (status, lines) = d.stop().await;
    assert!(status.success(), "{}", lines.join("\n"));
}

/// `[log] format = "journald"` where no journal runs (this machine, CI): the daemon still
/// starts, says why, and logs as text on stderr. (Under systemd, packaging/check.sh checks
/// the journal fields.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journald_format_without_a_journal_falls_back_to_text() {
    if Path::new("/run/systemd/journal/socket").exists() {
        eprintln!("SKIPPED: a journal runs here; the fallback cannot be seen");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &dir.path().join("db"),
        free_udp(),
        "level = \"info\"\nformat = \"journald\"",
        "",
    );
    let d = Daemon::spawn(&cfg, &[]);
    assert!(wait_until(Duration::from_secs(30), || d.logged("lorastream started")).await);
    assert!(d.logged("[log] format = \"journald\": no systemd journal here"));
    let (status, lines) = d.stop().await;
    assert!(status.success());
    assert!(
        lines[0].contains(" INFO lorastream::cli: lorastream "),
        "{}",
        lines[0]
    );
}
