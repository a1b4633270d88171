//! The UDP socket loop: ACK, parse, hand receptions to the uplink stage.
//!
//! Guarantee: a datagram never stops the loop. Malformed ones are counted
//! (`lorastream_udp_errors_total{reason}`) and logged at debug level with the sender, since a
//! misconfigured forwarder can send thousands per minute.

use super::gwmp::{self, tx_ack_result, Datagram, Reception};
use crate::metrics::Metrics;
use crate::model::Eui64;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What we know about one packet forwarder.
#[derive(Debug, Clone)]
pub struct GatewayState {
    /// Where PULL_DATA came from: downlinks (PULL_RESP) go there.
    pub pull_addr: Option<SocketAddr>,
    pub push_addr: Option<SocketAddr>,
    pub last_seen: Instant,
    pub version: u8,
    pub rx_frames: u64,
    /// The last `stat` object, as sent.
    pub last_stat: Option<serde_json::Value>,
}

/// Known forwarders, shared between the socket loop, downlinks and `/health`.
#[derive(Clone, Default)]
pub struct Gateways(Arc<Mutex<HashMap<Eui64, GatewayState>>>);

impl Gateways {
    fn update(&self, eui: Eui64, f: impl FnOnce(&mut GatewayState)) -> bool {
        let Ok(mut m) = self.0.lock() else {
            return false;
        };
        let mut new = false;
        let g = m.entry(eui).or_insert_with(|| {
            new = true;
            GatewayState {
                pull_addr: None,
                push_addr: None,
                last_seen: Instant::now(),
                version: 2,
                rx_frames: 0,
                last_stat: None,
            }
        });
        g.last_seen = Instant::now();
        f(g);
        new
    }

    pub fn get(&self, eui: &Eui64) -> Option<GatewayState> {
        self.0.lock().ok()?.get(eui).cloned()
    }

    pub fn len(&self) -> usize {
        self.0.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What `/health` shows of each forwarder, sorted by EUI.
    pub fn view(&self) -> Vec<GatewayView> {
        let Ok(m) = self.0.lock() else {
            return Vec::new();
        };
        let mut v: Vec<GatewayView> = m
            .iter()
            .map(|(eui, g)| GatewayView {
                eui: eui.to_string(),
                pull_addr: g.pull_addr.map(|a| a.to_string()),
                push_addr: g.push_addr.map(|a| a.to_string()),
                last_seen_s: g.last_seen.elapsed().as_secs_f64(),
                // PULL_DATA comes every few seconds; 60 s of silence means the forwarder is gone.
                online: g.last_seen.elapsed() < Duration::from_secs(60),
                rx_frames: g.rx_frames,
                stat: g.last_stat.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.eui.cmp(&b.eui));
        v
    }
}

/// One forwarder in `/health`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GatewayView {
    pub eui: String,
    /// Where downlinks (PULL_RESP) go.
    pub pull_addr: Option<String>,
    pub push_addr: Option<String>,
    pub last_seen_s: f64,
    pub online: bool,
    pub rx_frames: u64,
    /// The last `stat` object, as sent.
    pub stat: Option<serde_json::Value>,
}

/// Receptions of one PUSH_DATA, as handed to the uplink stage.
pub(crate) type Batch = Vec<Reception>;

/// A TX_ACK: the forwarder's answer to one PULL_RESP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TxAck {
    pub gateway: Eui64,
    pub token: u16,
    /// `Err("TOO_LATE")` etc.; an empty TX_ACK or `"NONE"` is success.
    pub result: Result<(), String>,
}

/// Why a downlink could not be handed to a forwarder.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    #[error("gateway {0} has not sent PULL_DATA yet: no downlink path")]
    NoRoute(Eui64),
    #[error("cannot encode PULL_RESP: {0}")]
    Encode(String),
    #[error("UDP send failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Sends PULL_RESP datagrams to forwarders (shared with the downlink scheduler).
#[derive(Clone)]
pub(crate) struct Downlinker {
    socket: Arc<UdpSocket>,
    gateways: Gateways,
    token: Arc<std::sync::atomic::AtomicU16>,
}

impl Downlinker {
    pub(crate) fn new(socket: Arc<UdpSocket>, gateways: Gateways) -> Self {
        Downlinker {
            socket,
            gateways,
            token: Arc::new(std::sync::atomic::AtomicU16::new(rand::random())),
        }
    }

    /// Send one `txpk` to a gateway; returns the token its TX_ACK will carry.
    pub(crate) async fn send(
        &self,
        gateway: Eui64,
        txpk: semtech_udp::pull_resp::TxPk,
    ) -> Result<u16, SendError> {
        use semtech_udp::SerializablePacket;
        let g = self
            .gateways
            .get(&gateway)
            .ok_or(SendError::NoRoute(gateway))?;
        let addr = g.pull_addr.ok_or(SendError::NoRoute(gateway))?;
        let token = self
            .token
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .wrapping_add(1);
        let pkt = semtech_udp::pull_resp::Packet {
            random_token: token,
            data: semtech_udp::pull_resp::Data::from_txpk(txpk),
        };
        let mut buf = vec![0u8; 2048];
        let n = pkt
            .serialize(&mut buf)
            .map_err(|e| SendError::Encode(e.to_string()))? as usize;
        // Answer in the protocol version the forwarder speaks.
        buf[0] = g.version;
        self.socket.send_to(&buf[..n], addr).await?;
        Ok(token)
    }
}

/// Bind the forwarder socket with a large receive buffer.
pub(crate) fn bind(addr: SocketAddr, recv_buffer: usize) -> std::io::Result<UdpSocket> {
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // The kernel caps this at net.core.rmem_max; README.md (Troubleshooting) says how to raise it.
    if let Err(e) = s.set_recv_buffer_size(recv_buffer) {
        tracing::warn!(error = %e, "cannot set the UDP receive buffer size");
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    let got = s.recv_buffer_size().unwrap_or(0);
    if got < recv_buffer {
        tracing::info!(
            requested = recv_buffer,
            granted = got,
            "UDP receive buffer smaller than configured (raise net.core.rmem_max)"
        );
    }
    UdpSocket::from_std(s.into())
}

/// Run the socket loop until `cancel` or until the uplink stage goes away.
pub(crate) async fn run(
    socket: Arc<UdpSocket>,
    uplinks: mpsc::Sender<Batch>,
    tx_acks: mpsc::Sender<TxAck>,
    gateways: Gateways,
    metrics: Metrics,
    cancel: CancellationToken,
    mut heartbeat: crate::liveness::Heartbeat,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        heartbeat.beat();
        let (n, from) = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = heartbeat.tick() => continue,
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // ICMP "port unreachable" from an earlier send shows up here on Linux;
                    // never fatal.
                    tracing::debug!(error = %e, "UDP receive error");
                    continue;
                }
            },
        };
        let dgram = &buf[..n];
        // Forwarders send only upstream packet types; anything else is counted below.
        match gwmp::decode(dgram) {
            Err(e) => {
                metrics.udp_error(e.reason());
                tracing::debug!(%from, error = %e, "ignoring datagram");
            }
            Ok(Datagram::PullData {
                version,
                token,
                gateway,
            }) => {
                metrics.udp_datagram("pull_data");
                let _ = socket
                    .send_to(&gwmp::ack(version, token, gwmp::PULL_ACK), from)
                    .await;
                if gateways.update(gateway, |g| {
                    g.pull_addr = Some(from);
                    g.version = version;
                }) {
                    tracing::info!(%gateway, %from, "packet forwarder connected (PULL_DATA)");
                }
            }
            Ok(Datagram::PushData {
                version,
                token,
                gateway,
                body,
            }) => {
                metrics.udp_datagram("push_data");
                // ACK first: PUSH_ACK only says "received", and a forwarder that misses it
                // reports packet loss in its statistics.
                let _ = socket
                    .send_to(&gwmp::ack(version, token, gwmp::PUSH_ACK), from)
                    .await;
                let parsed = match gwmp::parse_push_data(body, gateway) {
                    Ok(p) => p,
                    Err(e) => {
                        metrics.udp_error(e.reason());
                        tracing::debug!(%gateway, %from, error = %e, "ignoring PUSH_DATA body");
                        continue;
                    }
                };
                for e in &parsed.bad_rxpk {
                    metrics.udp_error("bad_rxpk");
                    tracing::debug!(%gateway, error = %e, "ignoring one rxpk/stat entry");
                }
                let frames = parsed.receptions.len() as u64;
                let stat = parsed
                    .stat
                    .as_ref()
                    .and_then(|s| serde_json::to_value(s).ok());
                if gateways.update(gateway, |g| {
                    g.push_addr = Some(from);
                    g.version = version;
                    g.rx_frames += frames;
                    if stat.is_some() {
                        g.last_stat = stat;
                    }
                }) {
                    tracing::info!(%gateway, %from, "packet forwarder connected (PUSH_DATA)");
                }
                if parsed.receptions.is_empty() {
                    continue;
                }
                if uplinks.send(parsed.receptions).await.is_err() {
                    return;
                }
            }
            Ok(Datagram::TxAck {
                gateway,
                token,
                body,
                ..
            }) => {
                metrics.udp_datagram("tx_ack");
                let ack = TxAck {
                    gateway,
                    token,
                    result: tx_ack_result(body),
                };
                tracing::debug!(%gateway, token, result = ack.result.as_ref().err().map_or("ok", |e| e.as_str()), "TX_ACK");
                // Never block the socket loop on the scheduler.
                if tx_acks.try_send(ack).is_err() {
                    metrics.udp_error("tx_ack_dropped");
                }
            }
        }
    }
}
