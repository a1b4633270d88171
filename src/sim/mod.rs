//! A simulated packet forwarder with simulated ABP devices, for `lorastream demo`,
//! `lorastream simulate`, the tests and the benchmarks.
//!
//! Devices build real encrypted LoRaWAN 1.0.x frames; the forwarder wraps them in real GWMP v2
//! PUSH_DATA datagrams (built with the `semtech-udp` crate's types) and sends them over UDP, so
//! everything after the socket is exactly what a Raspberry Pi with a concentrator would cause.
//! [`fixtures`] has sample records for tests and benchmarks.

pub mod device_mac;
pub mod fixtures;

use crate::lorawan::frame::{encode, open_downlink, DataFrame, FrameError, MacCmd, OpenedDownlink};
use crate::model::{AesKey, DevAddr, Eui64};
use semtech_udp::push_data::{self, RxPk, RxPkV1, CRC};
use semtech_udp::{Bandwidth, CodingRate, DataRate, MacAddress, Modulation, SpreadingFactor};
use std::net::SocketAddr;
use tokio::net::UdpSocket;

/// A device with an ABP session.
#[derive(Debug, Clone)]
pub struct SimDevice {
    pub id: String,
    pub dev_addr: DevAddr,
    pub nwk_s_key: AesKey,
    pub app_s_key: AesKey,
    /// Next FCntUp.
    pub f_cnt: u32,
    /// Set the ADR bit in uplinks (the network may then manage the data rate).
    pub adr: bool,
}

/// Options of one simulated uplink.
#[derive(Debug, Clone, Copy, Default)]
pub struct UplinkOpts<'a> {
    pub f_port: Option<u8>,
    pub payload: &'a [u8],
    pub confirmed: bool,
    /// ACK of the last confirmed downlink.
    pub ack: bool,
    /// ADRACKReq.
    pub adr_ack_req: bool,
    /// MAC commands in FOpts.
    pub mac: &'a [MacCmd],
}

impl SimDevice {
    /// Build the next uplink and advance the counter.
    pub fn uplink(
        &mut self,
        f_port: u8,
        payload: &[u8],
        confirmed: bool,
    ) -> Result<Vec<u8>, FrameError> {
        self.uplink_with(Some(f_port), payload, confirmed, false, &[])
    }

    /// Build the next uplink with the ACK bit and FOpts MAC commands.
    pub fn uplink_with(
        &mut self,
        f_port: Option<u8>,
        payload: &[u8],
        confirmed: bool,
        ack: bool,
        mac: &[MacCmd],
    ) -> Result<Vec<u8>, FrameError> {
        self.uplink_opts(&UplinkOpts {
            f_port,
            payload,
            confirmed,
            ack,
            adr_ack_req: false,
            mac,
        })
    }

    /// Build the next uplink with every header option.
    pub fn uplink_opts(&mut self, o: &UplinkOpts<'_>) -> Result<Vec<u8>, FrameError> {
        let phy = encode(
            &DataFrame {
                uplink: true,
                confirmed: o.confirmed,
                dev_addr: self.dev_addr,
                f_cnt: self.f_cnt,
                adr: self.adr,
                adr_ack_req: o.adr_ack_req,
                ack: o.ack,
                f_pending: false,
                f_port: o.f_port,
                payload: o.payload,
                mac: o.mac,
            },
            &self.nwk_s_key,
            &self.app_s_key,
        )?;
        self.f_cnt = self.f_cnt.wrapping_add(1);
        Ok(phy)
    }
}

impl SimDevice {
    /// Decrypt a downlink addressed to this device (`f_cnt` = the FCntDown expected).
    pub fn open(&self, phy: &[u8], f_cnt: u32) -> Result<OpenedDownlink, FrameError> {
        open_downlink(phy, &self.nwk_s_key, &self.app_s_key, f_cnt)
    }
}

/// A PULL_RESP as the forwarder received it.
#[derive(Debug, Clone)]
pub struct PullResp {
    pub token: u16,
    /// The `txpk` object as sent.
    pub txpk: serde_json::Value,
    /// The PHYPayload to transmit.
    pub phy: Vec<u8>,
    /// The JSON text as sent.
    pub json: String,
}

impl PullResp {
    /// The preamble the reference packet forwarder (`lora_pkt_fwd`) would transmit: 8 when
    /// `prea` is absent (STD_LORA_PREAMB), else the number read with parson, where a `null`
    /// reads as 0, raised to its minimum of 6 (MIN_LORA_PREAMB).
    pub fn preamble(&self) -> u64 {
        match self.txpk.get("prea") {
            None => 8,
            Some(v) => v.as_u64().unwrap_or(0).max(6),
        }
    }
}

/// Parse a PULL_RESP datagram (None for anything else, e.g. ACKs).
pub fn parse_pull_resp(b: &[u8]) -> Option<PullResp> {
    use base64::Engine;
    if b.len() < 5 || b[3] != 3 {
        return None;
    }
    let token = u16::from_be_bytes([b[1], b[2]]);
    let json = String::from_utf8(b[4..].to_vec()).ok()?;
    let v: serde_json::Value = serde_json::from_str(&json).ok()?;
    let txpk = v.get("txpk")?.clone();
    let phy = base64::engine::general_purpose::STANDARD
        .decode(txpk["data"].as_str()?)
        .ok()?;
    Some(PullResp {
        token,
        txpk,
        phy,
        json,
    })
}

/// Radio metadata of a simulated reception.
#[derive(Debug, Clone, Copy)]
pub struct Radio {
    pub freq_mhz: f64,
    pub sf: u8,
    pub tmst: u32,
    pub rssi: i32,
    pub snr: f32,
    pub chan: u64,
    /// LoRa bandwidth in kHz: 125 (default), 250 or 500.
    pub bw_khz: u32,
}

impl Default for Radio {
    fn default() -> Self {
        Radio {
            freq_mhz: 868.1,
            sf: 7,
            tmst: 1_000_000,
            rssi: -60,
            snr: 9.5,
            chan: 0,
            bw_khz: 125,
        }
    }
}

fn sf(n: u8) -> SpreadingFactor {
    match n {
        8 => SpreadingFactor::_8,
        9 => SpreadingFactor::_9,
        10 => SpreadingFactor::_10,
        11 => SpreadingFactor::_11,
        12 => SpreadingFactor::_12,
        _ => SpreadingFactor::_7,
    }
}

/// GWMP v2 PUSH_DATA datagram carrying `frames`.
pub fn push_data(gateway: Eui64, token: u16, frames: &[(&[u8], Radio)]) -> Vec<u8> {
    use semtech_udp::SerializablePacket;
    let rxpk = frames
        .iter()
        .map(|(phy, r)| {
            RxPk::V1(RxPkV1 {
                chan: r.chan,
                codr: Some(CodingRate::_4_5),
                data: phy.to_vec(),
                datr: DataRate::new(
                    sf(r.sf),
                    match r.bw_khz {
                        250 => Bandwidth::_250KHz,
                        500 => Bandwidth::_500KHz,
                        _ => Bandwidth::_125KHz,
                    },
                ),
                freq: r.freq_mhz,
                lsnr: r.snr,
                modu: Modulation::LORA,
                rfch: 0,
                rssi: r.rssi,
                rssis: Some(r.rssi),
                size: phy.len() as u64,
                stat: CRC::OK,
                tmst: r.tmst,
                time: None,
            })
        })
        .collect();
    let pkt = push_data::Packet {
        random_token: token,
        gateway_mac: MacAddress::from(gateway.0),
        data: push_data::Data {
            rxpk: Some(rxpk),
            stat: None,
        },
    };
    let mut buf = vec![0u8; 4096 + frames.len() * 1024];
    match pkt.serialize(&mut buf) {
        Ok(n) => {
            buf.truncate(n as usize);
            buf
        }
        Err(_) => Vec::new(),
    }
}

/// GWMP PULL_DATA (keep-alive that opens the downlink path).
pub fn pull_data(gateway: Eui64, token: u16) -> Vec<u8> {
    let t = token.to_be_bytes();
    let mut v = vec![2, t[0], t[1], 2];
    v.extend_from_slice(&gateway.0);
    v
}

/// A simulated packet forwarder on its own UDP socket.
pub struct Forwarder {
    pub socket: std::sync::Arc<UdpSocket>,
    pub gateway: Eui64,
    target: SocketAddr,
    token: u16,
}

impl Forwarder {
    pub async fn connect(target: SocketAddr, gateway: Eui64) -> std::io::Result<Forwarder> {
        let bind: SocketAddr = if target.is_ipv4() {
            "0.0.0.0:0".parse().unwrap_or(target)
        } else {
            "[::]:0".parse().unwrap_or(target)
        };
        let socket = std::sync::Arc::new(UdpSocket::bind(bind).await?);
        Ok(Forwarder {
            socket,
            gateway,
            target,
            token: 0,
        })
    }

    fn next_token(&mut self) -> u16 {
        self.token = self.token.wrapping_add(1);
        self.token
    }

    /// Send one PUSH_DATA with these frames; returns its token.
    pub async fn send(&mut self, frames: &[(&[u8], Radio)]) -> std::io::Result<u16> {
        let t = self.next_token();
        self.socket
            .send_to(&push_data(self.gateway, t, frames), self.target)
            .await?;
        Ok(t)
    }

    /// Send a PULL_DATA.
    pub async fn pull(&mut self) -> std::io::Result<()> {
        let t = self.next_token();
        self.socket
            .send_to(&pull_data(self.gateway, t), self.target)
            .await?;
        Ok(())
    }

    /// Send a raw datagram (tests use this for malformed input).
    pub async fn send_raw(&self, b: &[u8]) -> std::io::Result<()> {
        self.socket.send_to(b, self.target).await.map(|_| ())
    }

    /// Wait for the next PULL_RESP (ACKs are skipped); None on timeout.
    pub async fn pull_resp(&self, timeout: std::time::Duration) -> Option<PullResp> {
        let mut buf = vec![0u8; 4096];
        let end = tokio::time::Instant::now() + timeout;
        loop {
            let n = tokio::time::timeout_at(end, self.recv(&mut buf))
                .await
                .ok()?
                .ok()?;
            if let Some(p) = parse_pull_resp(&buf[..n]) {
                return Some(p);
            }
        }
    }

    /// Answer a PULL_RESP: `None` = accepted, `Some("TOO_LATE")` etc. = refused.
    pub async fn tx_ack(&self, token: u16, error: Option<&str>) -> std::io::Result<()> {
        let t = token.to_be_bytes();
        let mut v = vec![2, t[0], t[1], 5];
        v.extend_from_slice(&self.gateway.0);
        let body = serde_json::json!({"txpk_ack": {"error": error.unwrap_or("NONE")}});
        v.extend_from_slice(body.to_string().as_bytes());
        self.socket.send_to(&v, self.target).await.map(|_| ())
    }

    /// Receive one datagram from the server (ACKs, PULL_RESP).
    pub async fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        let (n, _) = self.socket.recv_from(buf).await?;
        Ok(n)
    }
}

/// The built-in example devices of `lorastream demo` (keys are public test values).
pub fn demo_devices() -> Vec<(SimDevice, &'static str)> {
    let mk = |i: u8, id: &str| SimDevice {
        id: id.into(),
        dev_addr: DevAddr(0x2600_0000 | u32::from(i)),
        nwk_s_key: AesKey([0x10 + i; 16]),
        app_s_key: AesKey([0x20 + i; 16]),
        f_cnt: 0,
        adr: false,
    };
    vec![
        (mk(1, "soil-1"), "70B3D57ED0000001"),
        (mk(2, "soil-2"), "70B3D57ED0000002"),
        (mk(3, "weather-1"), "70B3D57ED0000003"),
    ]
}
