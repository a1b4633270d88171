//! The UDP socket loop: ACK, parse, hand receptions to the uplink stage.
//!
//! Guarantee: a datagram never stops the loop, and what any sender can make the daemon keep is
//! bounded (docs/reliability.md):
//! - malformed datagrams are counted (`lorastream_udp_errors_total{reason}`) and logged at debug
//!   level with the sender, since a misconfigured forwarder can send thousands per minute;
//! - the forwarder table holds at most `[gateway] max_gateways` entries: a new forwarder takes
//!   the place of one silent for [`OFFLINE_AFTER`], or is refused (`gateway_table_full`);
//! - of a forwarder's `stat` only the known fields are kept, its `time` text cut short;
//! - with `[gateway] allowed_gateways`, datagrams of any other EUI are dropped before anything
//!   is done with them (`gateway_not_allowed`);
//! - a known forwarder's source address changing is logged (rate-limited) and counted
//!   (`lorastream_gateway_address_changes_total`); with `pin_gateway_address`, a new address is
//!   taken only once the old one was silent for [`OFFLINE_AFTER`] (refused meanwhile:
//!   `gateway_address_pinned`), so one spoofed PULL_DATA cannot redirect a gateway's downlinks;
//! - a TX_ACK is handed to the scheduler only for a token we sent to that gateway and have not
//!   seen answered (`tx_ack_unexpected` otherwise), so a burst of spoofed TX_ACKs costs a
//!   lookup each and cannot crowd out the genuine ones;
//! - radio frames with a defect (CRC error, shorter than any LoRaWAN frame, longer than a LoRa
//!   PHY payload, proprietary or RFU) get a rate-limited log line and
//!   `lorastream_radio_defects_total{kind}`; oversized ones are dropped here.

use super::gwmp::{self, tx_ack_result, Datagram, Reception};
use crate::logs::LogLimiter;
use crate::metrics::Metrics;
use crate::model::Eui64;
use crate::model::FastMap;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A forwarder silent this long is offline: its table entry may be reused, and with
/// `pin_gateway_address` its address may change. PULL_DATA comes every 10 s by default.
pub const OFFLINE_AFTER: Duration = Duration::from_secs(60);
/// Forwarders listed in `/health` at most (the most recently heard); the rest are counted.
pub const HEALTH_GATEWAYS: usize = 100;
/// Longest `stat.time` kept (a forwarder sends about 23 characters).
const MAX_STAT_TIME: usize = 40;
/// Largest LoRa PHY payload (the radio's length field is one byte).
pub const MAX_PHY_PAYLOAD: usize = 255;
/// Shortest LoRaWAN frame: MHDR, DevAddr, FCtrl, FCnt, MIC.
pub const MIN_PHY_PAYLOAD: usize = 12;
/// PULL_RESP tokens waiting for their TX_ACK, at most; older than [`TOKEN_TTL`] are forgotten.
const MAX_TOKENS: usize = 4096;
const TOKEN_TTL: Duration = Duration::from_secs(10);

/// The known fields of a forwarder's `stat` object, sizes bounded.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GatewayStat {
    pub time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lati: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub long: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alti: Option<i64>,
    pub rxnb: u64,
    pub rxok: u64,
    pub rxfw: u64,
    pub ackr: Option<f64>,
    pub dwnb: u64,
    pub txnb: u64,
    pub temp: Option<f64>,
}

impl From<&semtech_udp::push_data::Stat> for GatewayStat {
    fn from(s: &semtech_udp::push_data::Stat) -> Self {
        let mut time = s.time.clone();
        if time.len() > MAX_STAT_TIME {
            let mut cut = MAX_STAT_TIME;
            while !time.is_char_boundary(cut) {
                cut -= 1;
            }
            time.truncate(cut);
        }
        GatewayStat {
            time,
            lati: s.lati,
            long: s.long,
            alti: s.alti,
            rxnb: s.rxnb,
            rxok: s.rxok,
            rxfw: s.rxfw,
            ackr: s.ackr,
            dwnb: s.dwnb,
            txnb: s.txnb,
            temp: s.temp,
        }
    }
}

/// What we know about one packet forwarder.
#[derive(Debug, Clone)]
pub struct GatewayState {
    /// Where PULL_DATA came from: downlinks (PULL_RESP) go there.
    pub pull_addr: Option<SocketAddr>,
    /// Last datagram from `pull_addr`.
    pub pull_seen: Option<Instant>,
    pub push_addr: Option<SocketAddr>,
    pub push_seen: Option<Instant>,
    pub last_seen: Instant,
    pub version: u8,
    pub rx_frames: u64,
    /// The last `stat` object (known fields only).
    pub last_stat: Option<GatewayStat>,
    /// Times its PULL or PUSH source address changed.
    pub address_changes: u64,
}

/// Which of a forwarder's two sockets a datagram came from (lora_pkt_fwd uses one for
/// PUSH_DATA, one for PULL_DATA and TX_ACK).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Pull,
    Push,
}

/// What the table said to a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Taken; `new` when the forwarder was not known, `moved_from` when its address changed.
    Ok {
        new: bool,
        moved_from: Option<SocketAddr>,
    },
    /// Refused, with the reason for `lorastream_udp_errors_total`.
    Refused(&'static str),
}

struct Table {
    map: FastMap<Eui64, GatewayState>,
    max: usize,
    pin: bool,
    /// No entry can have been silent for [`OFFLINE_AFTER`] before this (`last_seen` only grows),
    /// so a flood of new EUIs against a full table costs no scan.
    no_eviction_until: Option<Instant>,
    /// PULL_RESP token → (gateway, when sent), until its TX_ACK.
    tokens: FastMap<u16, (Eui64, Instant)>,
}

/// Known forwarders, shared between the socket loop, downlinks and `/health`.
#[derive(Clone)]
pub struct Gateways(Arc<Mutex<Table>>);

impl Default for Gateways {
    fn default() -> Self {
        Gateways::new(1000, false)
    }
}

impl Gateways {
    /// A table of at most `max` forwarders; `pin` = `[gateway] pin_gateway_address`.
    pub fn new(max: usize, pin: bool) -> Self {
        Gateways(Arc::new(Mutex::new(Table {
            map: FastMap::default(),
            max: max.max(1),
            pin,
            no_eviction_until: None,
            tokens: FastMap::default(),
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // Plain data: a panic elsewhere cannot leave it in a state worse than stale.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A datagram from `eui` at `from` on `side`: admit it (see the module docs) and, if
    /// taken, apply `f` to the forwarder's state.
    pub(crate) fn admit(
        &self,
        eui: Eui64,
        side: Side,
        from: SocketAddr,
        f: impl FnOnce(&mut GatewayState),
    ) -> Admit {
        let now = Instant::now();
        let mut t = self.lock();
        let pin = t.pin;
        let mut new = false;
        if !t.map.contains_key(&eui) {
            if t.map.len() >= t.max {
                if t.no_eviction_until.is_some_and(|u| now < u) {
                    return Admit::Refused("gateway_table_full");
                }
                let oldest = t
                    .map
                    .iter()
                    .min_by_key(|(_, g)| g.last_seen)
                    .map(|(e, g)| (*e, g.last_seen));
                match oldest {
                    Some((e, seen)) if now.duration_since(seen) >= OFFLINE_AFTER => {
                        t.map.remove(&e);
                    }
                    Some((_, seen)) => {
                        t.no_eviction_until = Some(seen + OFFLINE_AFTER);
                        return Admit::Refused("gateway_table_full");
                    }
                    None => {}
                }
            }
            new = true;
            t.map.insert(
                eui,
                GatewayState {
                    pull_addr: None,
                    pull_seen: None,
                    push_addr: None,
                    push_seen: None,
                    last_seen: now,
                    version: 2,
                    rx_frames: 0,
                    last_stat: None,
                    address_changes: 0,
                },
            );
        }
        let Some(g) = t.map.get_mut(&eui) else {
            return Admit::Refused("gateway_table_full");
        };
        let (addr, seen) = match side {
            Side::Pull => (&mut g.pull_addr, &mut g.pull_seen),
            Side::Push => (&mut g.push_addr, &mut g.push_seen),
        };
        let mut moved_from = None;
        if let Some(old) = *addr {
            if old != from {
                if pin && seen.is_some_and(|s| now.duration_since(s) < OFFLINE_AFTER) {
                    return Admit::Refused("gateway_address_pinned");
                }
                moved_from = Some(old);
            }
        }
        *addr = Some(from);
        *seen = Some(now);
        if moved_from.is_some() {
            g.address_changes += 1;
        }
        g.last_seen = now;
        f(g);
        Admit::Ok { new, moved_from }
    }

    pub fn get(&self, eui: &Eui64) -> Option<GatewayState> {
        self.lock().map.get(eui).cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// The gateway with a downlink path (PULL_DATA seen), when exactly one has one.
    pub fn only_downlink_gateway(&self) -> Option<Eui64> {
        let t = self.lock();
        let mut with_path = t.map.iter().filter(|(_, g)| g.pull_addr.is_some());
        match (with_path.next(), with_path.next()) {
            (Some((eui, _)), None) => Some(*eui),
            _ => None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A PULL_RESP with this token is about to go to `gateway`.
    pub(crate) fn expect_tx_ack(&self, token: u16, gateway: Eui64) {
        let now = Instant::now();
        let mut t = self.lock();
        if t.tokens.len() >= MAX_TOKENS {
            t.tokens
                .retain(|_, (_, at)| now.duration_since(*at) < TOKEN_TTL);
            if t.tokens.len() >= MAX_TOKENS {
                if let Some(oldest) = t
                    .tokens
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(k, _)| *k)
                {
                    t.tokens.remove(&oldest);
                }
            }
        }
        t.tokens.insert(token, (gateway, now));
    }

    /// A TX_ACK came: true (once) if it answers a PULL_RESP we sent to that gateway.
    pub(crate) fn take_tx_ack(&self, token: u16, gateway: Eui64) -> bool {
        let mut t = self.lock();
        match t.tokens.get(&token) {
            Some((g, at)) if *g == gateway && at.elapsed() < TOKEN_TTL => {
                t.tokens.remove(&token);
                true
            }
            _ => false,
        }
    }

    /// What `/health` shows: the [`HEALTH_GATEWAYS`] most recently heard forwarders, sorted by
    /// EUI, and how many there are in all.
    pub fn view(&self) -> (Vec<GatewayView>, usize) {
        let t = self.lock();
        let total = t.map.len();
        let mut recent: Vec<(&Eui64, &GatewayState)> = t.map.iter().collect();
        if recent.len() > HEALTH_GATEWAYS {
            recent.select_nth_unstable_by_key(HEALTH_GATEWAYS - 1, |(_, g)| {
                std::cmp::Reverse(g.last_seen)
            });
            recent.truncate(HEALTH_GATEWAYS);
        }
        let mut v: Vec<GatewayView> = recent
            .into_iter()
            .map(|(eui, g)| GatewayView {
                eui: eui.to_string(),
                pull_addr: g.pull_addr.map(|a| a.to_string()),
                push_addr: g.push_addr.map(|a| a.to_string()),
                last_seen_s: g.last_seen.elapsed().as_secs_f64(),
                // PULL_DATA comes every few seconds; a minute of silence means it is gone.
                online: g.last_seen.elapsed() < OFFLINE_AFTER,
                rx_frames: g.rx_frames,
                address_changes: g.address_changes,
                stat: g.last_stat.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.eui.cmp(&b.eui));
        (v, total)
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
    /// Times its source address changed (a forwarder restart, NAT, or a spoofed datagram).
    pub address_changes: u64,
    /// The last `stat` object (known fields only).
    pub stat: Option<GatewayStat>,
}

/// The `[gateway]` settings the socket loop applies.
#[derive(Debug, Clone, Default)]
pub(crate) struct Policy {
    /// Empty: every forwarder is served.
    pub allowed: HashSet<Eui64>,
}

/// A defect of a received radio frame, for the log and `lorastream_radio_defects_total`.
pub fn radio_defect(r: &Reception) -> Option<&'static str> {
    let phy = &r.phy_payload;
    if !r.crc_ok {
        return Some("crc_bad");
    }
    if phy.len() > MAX_PHY_PAYLOAD {
        return Some("oversized");
    }
    if phy.len() < MIN_PHY_PAYLOAD {
        return Some("too_short");
    }
    // MHDR (LoRaWAN 1.0.x §4.2): MType in bits 7..5 (111 = proprietary), Major in bits 1..0
    // (00 = LoRaWAN R1, the rest RFU).
    match phy[0] {
        b if b >> 5 == 0b111 => Some("proprietary"),
        b if b & 0b11 != 0 => Some("rfu"),
        _ => None,
    }
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
    Encode(#[from] gwmp::GwmpError),
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

    /// The gateway with a downlink path, when exactly one has one.
    pub(crate) fn only_downlink_gateway(&self) -> Option<Eui64> {
        self.gateways.only_downlink_gateway()
    }

    /// Whether this gateway's forwarder has sent PULL_DATA (so a PULL_RESP can reach it).
    pub(crate) fn has_downlink_path(&self, gateway: Eui64) -> bool {
        self.gateways
            .get(&gateway)
            .is_some_and(|g| g.pull_addr.is_some())
    }

    /// Send one `txpk` to a gateway; returns the token its TX_ACK will carry.
    pub(crate) async fn send(
        &self,
        gateway: Eui64,
        txpk: semtech_udp::pull_resp::TxPk,
    ) -> Result<u16, SendError> {
        let g = self
            .gateways
            .get(&gateway)
            .ok_or(SendError::NoRoute(gateway))?;
        let addr = g.pull_addr.ok_or(SendError::NoRoute(gateway))?;
        let token = self
            .token
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .wrapping_add(1);
        // Answer in the protocol version the forwarder speaks.
        let buf = gwmp::pull_resp(g.version, token, txpk)?;
        // Expected before it is sent: the TX_ACK can come back before send_to returns.
        self.gateways.expect_tx_ack(token, gateway);
        self.socket.send_to(&buf, addr).await?;
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

/// Where the socket loop hands what it receives: uplinks to the uplink stage, TX_ACKs to the
/// downlink scheduler.
pub(crate) struct Outlets {
    pub uplinks: mpsc::Sender<Batch>,
    pub tx_acks: mpsc::Sender<TxAck>,
}

/// Run the socket loop until `cancel` or until the uplink stage goes away.
pub(crate) async fn run(
    socket: Arc<UdpSocket>,
    Outlets { uplinks, tx_acks }: Outlets,
    gateways: Gateways,
    policy: Policy,
    metrics: Metrics,
    cancel: CancellationToken,
    mut heartbeat: crate::liveness::Heartbeat,
) {
    let mut buf = vec![0u8; 65_536];
    // One limiter per kind of line, so that a flood of one kind cannot hide another.
    let mut log_new = LogLimiter::new();
    let mut log_moved = LogLimiter::new();
    let mut log_refused = LogLimiter::new();
    let mut log_radio = LogLimiter::new();
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
        let d = match gwmp::decode(dgram) {
            Ok(d) => d,
            Err(e) => {
                metrics.udp_error(e.reason());
                tracing::debug!(%from, error = %e, "ignoring datagram");
                continue;
            }
        };
        let gateway = match &d {
            Datagram::PullData { gateway, .. }
            | Datagram::PushData { gateway, .. }
            | Datagram::TxAck { gateway, .. } => *gateway,
        };
        if !policy.allowed.is_empty() && !policy.allowed.contains(&gateway) {
            metrics.udp_error("gateway_not_allowed");
            if log_refused.allow() {
                tracing::warn!(%gateway, %from, "datagram of a gateway not in [gateway] allowed_gateways dropped");
            }
            continue;
        }
        // What the table says, logged the same way for PULL_DATA and PUSH_DATA.
        let mut admitted = |admit: Admit, what: &str| -> bool {
            match admit {
                Admit::Ok { new, moved_from } => {
                    if new && log_new.allow() {
                        tracing::info!(%gateway, %from, "packet forwarder connected ({what})");
                    }
                    if let Some(old) = moved_from {
                        metrics.gateway_address_changed();
                        if log_moved.allow() {
                            tracing::warn!(%gateway, %old, new = %from, "packet forwarder's address changed ({what}): a restart or NAT, or someone sending with its EUI");
                        }
                    }
                    true
                }
                Admit::Refused(reason) => {
                    metrics.udp_error(reason);
                    if log_refused.allow() {
                        match reason {
                            "gateway_address_pinned" => {
                                tracing::warn!(%gateway, %from, "{what} from a new address refused: the gateway's address is pinned and its old one is still active (pin_gateway_address)")
                            }
                            _ => {
                                tracing::warn!(%gateway, %from, max = gateways.lock().max, "{what} of a new gateway refused: the forwarder table is full of active gateways ([gateway] max_gateways)")
                            }
                        }
                    }
                    false
                }
            }
        };
        match d {
            Datagram::PullData { version, token, .. } => {
                metrics.udp_datagram("pull_data");
                let admit = gateways.admit(gateway, Side::Pull, from, |g| g.version = version);
                if !admitted(admit, "PULL_DATA") {
                    continue;
                }
                let _ = socket
                    .send_to(&gwmp::ack(version, token, gwmp::PULL_ACK), from)
                    .await;
            }
            Datagram::PushData {
                version,
                token,
                body,
                ..
            } => {
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
                let mut receptions = parsed.receptions;
                receptions.retain(|r| {
                    let Some(defect) = radio_defect(r) else {
                        return true;
                    };
                    metrics.radio_defect(defect);
                    if log_radio.allow() {
                        tracing::warn!(%gateway, defect, size = r.phy_payload.len(), frequency_hz = r.settings.frequency_hz, "radio frame with a defect ({})", match defect {
                            "crc_bad" => "CRC error: interference or a weak signal; dropped",
                            "oversized" => "longer than a LoRa PHY payload can be; dropped",
                            "too_short" => "shorter than any LoRaWAN frame; raw frame only",
                            "proprietary" => "proprietary MType, not LoRaWAN; raw frame only",
                            _ => "RFU major version, not LoRaWAN 1.0; raw frame only",
                        });
                    }
                    // Nothing can make sense of more than a PHY payload holds, and it would
                    // be stored as a raw frame: dropped here.
                    defect != "oversized"
                });
                let frames = receptions.len() as u64;
                let stat = parsed.stat.as_ref().map(GatewayStat::from);
                let admit = gateways.admit(gateway, Side::Push, from, |g| {
                    g.version = version;
                    g.rx_frames += frames;
                    if stat.is_some() {
                        g.last_stat = stat;
                    }
                });
                if !admitted(admit, "PUSH_DATA") || receptions.is_empty() {
                    continue;
                }
                if uplinks.send(receptions).await.is_err() {
                    return;
                }
            }
            Datagram::TxAck { token, body, .. } => {
                metrics.udp_datagram("tx_ack");
                // Only the answer to a PULL_RESP we sent to this gateway goes on, once: a burst
                // of spoofed TX_ACKs costs a lookup each and never fills the channel.
                if !gateways.take_tx_ack(token, gateway) {
                    metrics.udp_error("tx_ack_unexpected");
                    tracing::debug!(%gateway, %from, token, "TX_ACK for no PULL_RESP of ours ignored");
                    continue;
                }
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
