//! PHYPayload handling for LoRaWAN 1.0.x data frames: header peek, MIC, FRMPayload crypto.
//!
//! Received frames are read here directly (LoRaWAN 1.0.x §4: the header by its offsets, the
//! MIC with AES-CMAC, FRMPayload with AES in counter mode), each session key's AES schedule
//! and CMAC subkeys prepared once per uplink ([`KeyCipher`]); frames are built with the
//! `lorawan` crate's creator. Both take and return our own types, so the rest of the daemon
//! never touches the crate's byte-order conventions (its `DevAddr` is LSB first; ours is the
//! number people write). The tests check the reader against the crate's parser and against
//! published vectors.

use crate::model::{AesKey, DevAddr};
use aes::cipher::{BlockEncrypt, KeyInit};
use lorawan::keys::{AppSKey, NewSKey};
use lorawan::parser::{MType, MHDR};

/// Why a frame could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame too short ({0} bytes)")]
    TooShort(usize),
    #[error("not a LoRaWAN R1 frame (MHDR {0:#04x})")]
    NotLoRaWan(u8),
    #[error("malformed data frame")]
    Malformed,
    #[error("payload too large for a LoRaWAN frame ({0} bytes)")]
    TooLarge(usize),
}

/// The kind of a PHYPayload, from its MHDR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    JoinRequest,
    JoinAccept,
    DataUp {
        confirmed: bool,
    },
    DataDown {
        confirmed: bool,
    },
    /// RFU or proprietary frames: forwarded raw to gateway-level streams only.
    Other,
}

impl FrameKind {
    /// TTS-style name of the message type.
    pub fn name(self) -> &'static str {
        match self {
            FrameKind::JoinRequest => "JOIN_REQUEST",
            FrameKind::JoinAccept => "JOIN_ACCEPT",
            FrameKind::DataUp { confirmed: false } => "UNCONFIRMED_UP",
            FrameKind::DataUp { confirmed: true } => "CONFIRMED_UP",
            FrameKind::DataDown { confirmed: false } => "UNCONFIRMED_DOWN",
            FrameKind::DataDown { confirmed: true } => "CONFIRMED_DOWN",
            FrameKind::Other => "PROPRIETARY",
        }
    }
}

/// The kind of a frame from its first byte; `Other` for non-LoRaWAN-R1 frames.
pub fn kind(phy: &[u8]) -> FrameKind {
    let Some(&b0) = phy.first() else {
        return FrameKind::Other;
    };
    let mhdr = MHDR::new(b0);
    if b0 & 0b11 != 0 {
        return FrameKind::Other;
    }
    match mhdr.mtype() {
        MType::JoinRequest => FrameKind::JoinRequest,
        MType::JoinAccept => FrameKind::JoinAccept,
        MType::UnconfirmedDataUp => FrameKind::DataUp { confirmed: false },
        MType::ConfirmedDataUp => FrameKind::DataUp { confirmed: true },
        MType::UnconfirmedDataDown => FrameKind::DataDown { confirmed: false },
        MType::ConfirmedDataDown => FrameKind::DataDown { confirmed: true },
        _ => FrameKind::Other,
    }
}

/// What can be read from a data-up frame without keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataUpHeader {
    pub dev_addr: DevAddr,
    pub f_cnt16: u16,
    pub confirmed: bool,
    pub adr: bool,
    /// ADRACKReq (LoRaWAN 1.0.x §4.3.1.1): the device asks for any downlink to know it is
    /// still heard at its data rate.
    pub adr_ack_req: bool,
    pub ack: bool,
    pub f_port: Option<u8>,
}

/// A session key ready for use: its AES encryption schedule and its CMAC subkeys (RFC 4493
/// §2.3), computed once per uplink and key (the `lorawan` crate expanded the key for the MIC
/// and again for the decryption, with the decryption schedule it never used, issue 16).
#[derive(Clone)]
pub struct KeyCipher {
    aes: aes::Aes128Enc,
    k1: [u8; 16],
    k2: [u8; 16],
}

impl KeyCipher {
    pub fn new(key: &AesKey) -> Self {
        let aes = aes::Aes128Enc::new(&key.0.into());
        let mut l = [0u8; 16].into();
        aes.encrypt_block(&mut l);
        let k1 = double(l.into());
        let k2 = double(k1);
        KeyCipher { aes, k1, k2 }
    }

    fn encrypt(&self, block: &mut [u8; 16]) {
        self.aes.encrypt_block(block.into());
    }

    /// The first four bytes of AES-CMAC (RFC 4493) over `b0` followed by `msg` (not empty).
    fn cmac4(&self, b0: [u8; 16], msg: &[u8]) -> [u8; 4] {
        let mut x = b0;
        self.encrypt(&mut x);
        // The last block (1 to 16 bytes) is completed with K1 or padded with K2.
        let last_len = match msg.len() % 16 {
            0 => 16,
            n => n,
        };
        let (head, last) = msg.split_at(msg.len() - last_len);
        for block in head.chunks_exact(16) {
            xor(&mut x, block);
            self.encrypt(&mut x);
        }
        let mut m = [0u8; 16];
        m[..last_len].copy_from_slice(last);
        if last_len == 16 {
            xor(&mut m, &self.k1);
        } else {
            m[last_len] = 0x80;
            xor(&mut m, &self.k2);
        }
        xor(&mut x, &m);
        self.encrypt(&mut x);
        [x[0], x[1], x[2], x[3]]
    }
}

/// Multiplication by x in GF(2^128), the subkey step of RFC 4493.
fn double(b: [u8; 16]) -> [u8; 16] {
    let v = u128::from_be_bytes(b);
    let d = (v << 1) ^ if v >> 127 == 1 { 0x87 } else { 0 };
    d.to_be_bytes()
}

fn xor(a: &mut [u8; 16], b: &[u8]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x ^= y;
    }
}

impl std::fmt::Debug for KeyCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyCipher(***)")
    }
}

/// The layout of a data frame (either direction), read as the `lorawan` crate reads it:
/// `None` when the crate refuses the frame (too short for its FOpts, not a data frame).
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// DevAddr, FCtrl, FCnt and FOpts.
    fhdr_len: usize,
    /// FPort, when at least one FRMPayload byte follows it (the crate's rule: a frame that
    /// ends right after FPort has neither).
    f_port: Option<u8>,
}

fn layout(phy: &[u8]) -> Option<Layout> {
    if phy.len() < 12
        || !matches!(
            kind(phy),
            FrameKind::DataUp { .. } | FrameKind::DataDown { .. }
        )
    {
        return None;
    }
    let fhdr_len = 7 + usize::from(phy[5] & 0x0f);
    if 5 + fhdr_len > phy.len() {
        return None;
    }
    let f_port = (phy.len() > fhdr_len + 6).then(|| phy[1 + fhdr_len]);
    Some(Layout { fhdr_len, f_port })
}

/// B0 (§4.4) and A_i (§4.3.3) share this shape: `first` | 0^4 | Dir | DevAddr | FCnt | 0 | last.
fn block(phy: &[u8], first: u8, f_cnt: u32, last: u8) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0] = first;
    b[5] = (phy[0] & 0x20) >> 5;
    b[6..10].copy_from_slice(&phy[1..5]);
    b[10..14].copy_from_slice(&f_cnt.to_le_bytes());
    b[15] = last;
    b
}

/// Read the header of an uplink data frame. `Err` when it is not one or is malformed.
pub fn peek_data_up(phy: &[u8]) -> Result<DataUpHeader, FrameError> {
    // MHDR(1) + FHDR(7..22) + MIC(4)
    if phy.len() < 12 {
        return Err(FrameError::TooShort(phy.len()));
    }
    let confirmed = match kind(phy) {
        FrameKind::DataUp { confirmed } => confirmed,
        _ => return Err(FrameError::NotLoRaWan(phy[0])),
    };
    let l = layout(phy).ok_or(FrameError::Malformed)?;
    let fctrl = phy[5];
    Ok(DataUpHeader {
        dev_addr: DevAddr(u32::from_le_bytes([phy[1], phy[2], phy[3], phy[4]])),
        f_cnt16: u16::from_le_bytes([phy[6], phy[7]]),
        confirmed,
        adr: fctrl & 0x80 != 0,
        adr_ack_req: fctrl & 0x40 != 0,
        ack: fctrl & 0x20 != 0,
        f_port: l.f_port,
    })
}

/// True when the MIC of a data frame matches `nwk_s_key` with the full counter `f_cnt`.
pub fn mic_ok(phy: &[u8], nwk_s_key: &AesKey, f_cnt: u32) -> bool {
    mic_ok_with(phy, &KeyCipher::new(nwk_s_key), f_cnt)
}

/// [`mic_ok`] with a prepared key.
pub fn mic_ok_with(phy: &[u8], nwk: &KeyCipher, f_cnt: u32) -> bool {
    if layout(phy).is_none() {
        return false;
    }
    let (msg, mic) = phy.split_at(phy.len() - 4);
    nwk.cmac4(block(phy, 0x49, f_cnt, msg.len() as u8), msg) == *mic
}

/// The decrypted content of a data frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub f_port: Option<u8>,
    /// Application payload (FPort > 0), or MAC commands (FPort 0).
    pub frm_payload: Vec<u8>,
    /// MAC commands piggy-backed in FOpts (not encrypted in 1.0.x).
    pub f_opts: Vec<u8>,
}

/// Decrypt FRMPayload with AppSKey (FPort > 0) or NwkSKey (FPort 0). Does not check the MIC.
pub fn decrypt(
    phy: &[u8],
    nwk_s_key: &AesKey,
    app_s_key: &AesKey,
    f_cnt: u32,
) -> Result<Opened, FrameError> {
    decrypt_with(
        phy,
        &KeyCipher::new(nwk_s_key),
        &KeyCipher::new(app_s_key),
        f_cnt,
    )
}

/// [`decrypt`] with prepared keys. `f_cnt` is the full 32-bit counter (its upper half is used
/// with the frame's 16 bits).
pub fn decrypt_with(
    phy: &[u8],
    nwk: &KeyCipher,
    app: &KeyCipher,
    f_cnt: u32,
) -> Result<Opened, FrameError> {
    let l = layout(phy).ok_or(FrameError::Malformed)?;
    let f_opts = phy[8..1 + l.fhdr_len].to_vec();
    let mut frm_payload = match l.f_port {
        Some(_) => phy[2 + l.fhdr_len..phy.len() - 4].to_vec(),
        None => Vec::new(),
    };
    let key = if l.f_port.is_some_and(|p| p != 0) {
        app
    } else {
        nwk
    };
    // The frame's own 16 bits under the upper half of `f_cnt` (as the crate did).
    let f_cnt = (f_cnt & 0xFFFF_0000) | u32::from(u16::from_le_bytes([phy[6], phy[7]]));
    for (i, chunk) in frm_payload.chunks_mut(16).enumerate() {
        let mut s = block(phy, 0x01, f_cnt, (i + 1) as u8);
        key.encrypt(&mut s);
        for (b, k) in chunk.iter_mut().zip(s) {
            *b ^= k;
        }
    }
    Ok(Opened {
        f_port: l.f_port,
        frm_payload,
        f_opts,
    })
}

/// A downlink as a device sees it once decrypted (used by the simulator and the tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedDownlink {
    pub dev_addr: DevAddr,
    pub f_cnt16: u16,
    pub confirmed: bool,
    pub ack: bool,
    pub f_pending: bool,
    pub mic_ok: bool,
    pub opened: Opened,
}

/// Device side: check and decrypt a downlink data frame (`f_cnt` = full FCntDown expected).
pub fn open_downlink(
    phy: &[u8],
    nwk_s_key: &AesKey,
    app_s_key: &AesKey,
    f_cnt: u32,
) -> Result<OpenedDownlink, FrameError> {
    if phy.len() < 12 {
        return Err(FrameError::TooShort(phy.len()));
    }
    let confirmed = match kind(phy) {
        FrameKind::DataDown { confirmed } => confirmed,
        _ => return Err(FrameError::NotLoRaWan(phy[0])),
    };
    let nwk = KeyCipher::new(nwk_s_key);
    let opened = decrypt_with(phy, &nwk, &KeyCipher::new(app_s_key), f_cnt)?;
    let fctrl = phy[5];
    Ok(OpenedDownlink {
        dev_addr: DevAddr(u32::from_le_bytes([phy[1], phy[2], phy[3], phy[4]])),
        f_cnt16: u16::from_le_bytes([phy[6], phy[7]]),
        confirmed,
        ack: fctrl & 0x20 != 0,
        f_pending: fctrl & 0x10 != 0,
        mic_ok: mic_ok_with(phy, &nwk, f_cnt),
        opened,
    })
}

/// Parameters of a data frame to build (device side for uplinks, network side for downlinks).
#[derive(Debug, Clone)]
pub struct DataFrame<'a> {
    pub uplink: bool,
    pub confirmed: bool,
    pub dev_addr: DevAddr,
    pub f_cnt: u32,
    pub adr: bool,
    /// Uplinks only: ADRACKReq.
    pub adr_ack_req: bool,
    pub ack: bool,
    pub f_pending: bool,
    pub f_port: Option<u8>,
    pub payload: &'a [u8],
    /// MAC commands for FOpts (at most 15 bytes; the answers we give on downlinks).
    pub mac: &'a [MacCmd],
}

pub use super::mac::MacCmd;

impl lorawan::maccommands::SerializableMacCommand for MacCmd {
    fn payload_bytes(&self) -> &[u8] {
        &self.payload
    }
    fn cid(&self) -> u8 {
        self.cid
    }
    fn payload_len(&self) -> usize {
        self.payload.len()
    }
}

/// Build and encrypt a data frame.
pub fn encode(
    f: &DataFrame<'_>,
    nwk_s_key: &AesKey,
    app_s_key: &AesKey,
) -> Result<Vec<u8>, FrameError> {
    if f.payload.len() > 242 {
        return Err(FrameError::TooLarge(f.payload.len()));
    }
    let mut c = lorawan::creator::DataPayloadCreator::new();
    let mut fctrl = lorawan::parser::FCtrl::new(0, f.uplink);
    if f.adr {
        fctrl.set_adr();
    }
    if f.adr_ack_req && f.uplink {
        fctrl.set_adr_ack_req();
    }
    if f.ack {
        fctrl.set_ack();
    }
    // FPending is bit 4 on downlinks (ClassB on uplinks, which we never set).
    let fctrl = if f.f_pending && !f.uplink {
        lorawan::parser::FCtrl::new(fctrl.raw_value() | 0x10, f.uplink)
    } else {
        fctrl
    };
    c.set_uplink(f.uplink)
        .set_confirmed(f.confirmed)
        .set_dev_addr(&f.dev_addr.to_le_bytes())
        .set_fctrl(&fctrl)
        .set_fcnt(f.f_cnt);
    if let Some(port) = f.f_port {
        c.set_f_port(port);
    }
    let nwk = NewSKey::from(nwk_s_key.0);
    let app = AppSKey::from(app_s_key.0);
    let cmds: Vec<&dyn lorawan::maccommands::SerializableMacCommand> = f
        .mac
        .iter()
        .map(|m| m as &dyn lorawan::maccommands::SerializableMacCommand)
        .collect();
    c.build(f.payload, &cmds, &nwk, &app)
        .map(|b| b.to_vec())
        .map_err(|_| FrameError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> AesKey {
        s.parse().unwrap()
    }

    /// Widely published LoRaWAN 1.0 example (used by the lora-packet and LoRaWAN-parser test
    /// suites): DevAddr 49BE7DF1, FCnt 2, FPort 1, payload "test".
    #[test]
    fn published_vector_mic_and_decrypt() {
        let phy = hex::decode("40F17DBE4900020001954378762B11FF0D").unwrap();
        let nwk = key("44024241ed4ce9a68c6a8bc055233fd3");
        let app = key("ec925802ae430ca77fd3dd73cb2cc588");
        let h = peek_data_up(&phy).unwrap();
        assert_eq!(h.dev_addr, DevAddr(0x49BE_7DF1));
        assert_eq!(h.f_cnt16, 2);
        assert_eq!(h.f_port, Some(1));
        assert!(!h.confirmed);
        assert!(mic_ok(&phy, &nwk, 2));
        assert!(
            !mic_ok(&phy, &nwk, 0x1_0002),
            "the upper 16 bits are part of the MIC"
        );
        assert!(!mic_ok(&phy, &app, 2));
        let o = decrypt(&phy, &nwk, &app, 2).unwrap();
        assert_eq!(o.frm_payload, b"test");
        assert_eq!(o.f_port, Some(1));
    }

    #[test]
    fn encode_then_open_roundtrip_and_tamper() {
        let nwk = key("000102030405060708090a0b0c0d0e0f");
        let app = key("0f0e0d0c0b0a09080706050403020100");
        let f = DataFrame {
            uplink: true,
            confirmed: true,
            dev_addr: DevAddr(0x2600_0001),
            f_cnt: 0x1_0007,
            adr: true,
            adr_ack_req: false,
            ack: false,
            f_pending: false,
            f_port: Some(5),
            payload: b"hello",
            mac: &[],
        };
        let mut phy = encode(&f, &nwk, &app).unwrap();
        let h = peek_data_up(&phy).unwrap();
        assert_eq!(h.dev_addr, DevAddr(0x2600_0001));
        assert_eq!(h.f_cnt16, 7);
        assert!(h.confirmed && h.adr);
        assert!(mic_ok(&phy, &nwk, 0x1_0007));
        assert_eq!(
            decrypt(&phy, &nwk, &app, 0x1_0007).unwrap().frm_payload,
            b"hello"
        );
        let n = phy.len();
        phy[n - 6] ^= 1;
        assert!(!mic_ok(&phy, &nwk, 0x1_0007));
    }

    /// What the `lorawan` crate's parser reads from a frame (the reader this module had before
    /// it read frames itself): header, MIC verdict, decrypted content.
    type CrateRead = (
        Option<(u32, u16, bool, bool, bool, Option<u8>)>,
        bool,
        Option<Opened>,
    );

    fn crate_reads(phy: &[u8], nwk: &AesKey, app: &AesKey, f_cnt: u32) -> CrateRead {
        use lorawan::keys::AES128;
        use lorawan::parser::{DataHeader, DataPayload, FRMPayload, PhyPayload};
        let mut buf = phy.to_vec();
        let Ok(PhyPayload::Data(DataPayload::Encrypted(p))) = lorawan::parser::parse(&mut buf[..])
        else {
            return (None, false, None);
        };
        let fhdr = p.fhdr();
        let a = fhdr.dev_addr();
        let b = a.as_ref();
        let fctrl = fhdr.fctrl();
        let header = (
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            fhdr.fcnt(),
            fctrl.adr(),
            fctrl.adr_ack_req(),
            fctrl.ack(),
            p.f_port(),
        );
        let mic = p.validate_mic(&AES128(nwk.0), f_cnt);
        let f_opts = p.fhdr().data().to_vec();
        let d = p
            .decrypt(Some(&AES128(nwk.0)), Some(&AES128(app.0)), f_cnt)
            .unwrap();
        let frm_payload = match d.frm_payload() {
            FRMPayload::Data(b) => b.to_vec(),
            FRMPayload::MACCommands(m) => m.data().to_vec(),
            _ => Vec::new(),
        };
        let opened = Opened {
            f_port: d.f_port(),
            frm_payload,
            f_opts,
        };
        (Some(header), mic, Some(opened))
    }

    fn our_read(phy: &[u8], nwk: &AesKey, app: &AesKey, f_cnt: u32) -> CrateRead {
        let header = match kind(phy) {
            FrameKind::DataUp { .. } => peek_data_up(phy).ok().map(|h| {
                (
                    h.dev_addr.0,
                    h.f_cnt16,
                    h.adr,
                    h.adr_ack_req,
                    h.ack,
                    h.f_port,
                )
            }),
            // Downlinks: the header through the device-side reader (bit 6 is RFU there).
            FrameKind::DataDown { .. } => open_downlink(phy, nwk, app, f_cnt).ok().map(|d| {
                let fctrl = phy[5];
                let adr = fctrl & 0x80 != 0;
                (d.dev_addr.0, d.f_cnt16, adr, false, d.ack, d.opened.f_port)
            }),
            _ => None,
        };
        (
            header,
            mic_ok(phy, nwk, f_cnt),
            decrypt(phy, nwk, app, f_cnt).ok(),
        )
    }

    /// Random data frames of every length and FOpts length, real ones (with a good MIC) and
    /// tampered ones, read by both readers.
    #[test]
    fn frames_are_read_as_the_lorawan_crate_reads_them() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (mut good_mics, mut opened) = (0, 0);
        for n in 0..20_000 {
            let nwk = AesKey((next() as u128 | (next() as u128) << 64).to_le_bytes());
            let app = AesKey((next() as u128 | (next() as u128) << 64).to_le_bytes());
            let f_cnt = (next() % 0x3_0000) as u32;
            let phy = if n % 2 == 0 {
                // A real frame, maybe with FOpts, maybe tampered with.
                let mac = [MacCmd {
                    cid: 0x03,
                    payload: vec![0x07],
                }];
                let payload: Vec<u8> = (0..next() % 60).map(|_| next() as u8).collect();
                let mut phy = encode(
                    &DataFrame {
                        uplink: next() % 4 != 0,
                        confirmed: next() % 2 == 0,
                        dev_addr: DevAddr(next() as u32),
                        f_cnt,
                        adr: next() % 2 == 0,
                        adr_ack_req: next() % 2 == 0,
                        ack: next() % 2 == 0,
                        f_pending: false,
                        f_port: match next() % 4 {
                            0 => None,
                            1 => Some(0),
                            _ => Some(1 + (next() % 223) as u8),
                        },
                        payload: &payload,
                        mac: if next() % 3 == 0 { &mac } else { &[] },
                    },
                    &nwk,
                    &app,
                )
                .unwrap_or_default();
                if next() % 4 == 0 && !phy.is_empty() {
                    let at = (next() as usize) % phy.len();
                    phy[at] ^= 1 << (next() % 8);
                }
                phy
            } else {
                // Any bytes after a data MHDR (or any MHDR).
                let len = (next() % 48) as usize;
                let mut phy: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                if let Some(b) = phy.first_mut() {
                    if next() % 8 != 0 {
                        *b = [0x40, 0x60, 0x80, 0xA0][(next() % 4) as usize];
                    }
                }
                phy
            };
            let ours = our_read(&phy, &nwk, &app, f_cnt);
            assert_eq!(
                ours,
                crate_reads(&phy, &nwk, &app, f_cnt),
                "case {n}: {phy:02x?}"
            );
            good_mics += usize::from(ours.1);
            opened += usize::from(ours.2.is_some());
        }
        assert!(good_mics > 3_000 && opened > 10_000, "{good_mics} {opened}");
    }

    /// RFC 4493 §4: the subkeys and the MACs of examples 3 (40 bytes) and 4 (64 bytes).
    #[test]
    fn cmac_matches_rfc_4493() {
        let c = KeyCipher::new(&key("2b7e151628aed2a6abf7158809cf4f3c"));
        assert_eq!(hex::encode(c.k1), "fbeed618357133667c85e08f7236a8de");
        assert_eq!(hex::encode(c.k2), "f7ddac306ae266ccf90bc11ee46d513b");
        let m = hex::decode(concat!(
            "6bc1bee22e409f96e93d7e117393172a",
            "ae2d8a571e03ac9c9eb76fac45af8e51",
            "30c81c46a35ce411e5fbc1191a0a52ef",
            "f69f2445df4f9b17ad2b417be66c3710"
        ))
        .unwrap();
        let b0: [u8; 16] = m[..16].try_into().unwrap();
        assert_eq!(hex::encode(c.cmac4(b0, &m[16..40])), "dfa66747");
        assert_eq!(hex::encode(c.cmac4(b0, &m[16..64])), "51f0bebf");
    }

    #[test]
    fn garbage_is_rejected_not_panicking() {
        for len in 0..40 {
            let b: Vec<u8> = (0..len).map(|i| (i * 37 + 0x40) as u8).collect();
            let _ = peek_data_up(&b);
            let _ = kind(&b);
            let _ = mic_ok(&b, &AesKey([0; 16]), 0);
            let _ = decrypt(&b, &AesKey([0; 16]), &AesKey([0; 16]), 0);
        }
        assert_eq!(peek_data_up(&[0x40; 5]), Err(FrameError::TooShort(5)));
        assert_eq!(kind(&[0x00, 1, 2]), FrameKind::JoinRequest);
        assert_eq!(kind(&[0xE0]), FrameKind::Other);
    }

    /// A downlink whose MAC commands ride FPort 0, checked against the specification computed
    /// here with AES and CMAC directly (LoRaWAN 1.0.x §4.3.3: FRMPayload of FPort 0 encrypted
    /// with NwkSKey, A_i = 0x01 | 0^4 | Dir | DevAddr | FCnt | 0 | i; §4.4: MIC over
    /// B0 | MHDR..FRMPayload).
    #[test]
    fn fport0_downlink_matches_the_specification() {
        use aes::cipher::{BlockEncrypt, KeyInit};
        use cmac::Mac;
        let nwk = AesKey([0x2B; 16]);
        let app = AesKey([0x7E; 16]);
        // Three NewChannelReq (6 bytes each): 18 bytes, more than FOpts holds.
        let cmd = |i: u8| MacCmd {
            cid: 0x07,
            payload: vec![i, 0x18, 0x4F, 0x84, 0x50],
        };
        let mac = [cmd(3), cmd(4), cmd(5)];
        let f = DataFrame {
            uplink: false,
            confirmed: false,
            dev_addr: DevAddr(0x2600_0001),
            f_cnt: 0x1_0002,
            adr: true,
            adr_ack_req: false,
            ack: false,
            f_pending: false,
            f_port: Some(0),
            payload: &[],
            mac: &mac,
        };
        let phy = encode(&f, &nwk, &app).unwrap();
        let plain: Vec<u8> = mac.iter().flat_map(|m| m.to_bytes()).collect();
        // MHDR 0x60 (unconfirmed down), DevAddr LE, FCtrl (ADR, FOptsLen 0), FCnt LE (16 bits),
        // FPort 0, 18 encrypted bytes, 4 MIC bytes.
        assert_eq!(phy.len(), 1 + 4 + 1 + 2 + 1 + 18 + 4);
        assert_eq!(
            &phy[..9],
            &[0x60, 0x01, 0x00, 0x00, 0x26, 0x80, 0x02, 0x00, 0x00]
        );
        let aes = aes::Aes128::new(&nwk.0.into());
        let mut expected = Vec::new();
        for (i, chunk) in plain.chunks(16).enumerate() {
            let mut a = [0u8; 16];
            a[0] = 0x01;
            a[5] = 1; // downlink
            a[6..10].copy_from_slice(&0x2600_0001u32.to_le_bytes());
            a[10..14].copy_from_slice(&0x1_0002u32.to_le_bytes());
            a[15] = i as u8 + 1;
            let mut block = a.into();
            aes.encrypt_block(&mut block);
            expected.extend(chunk.iter().zip(block.iter()).map(|(p, k)| p ^ k));
        }
        assert_eq!(&phy[9..27], &expected[..]);
        let msg = &phy[..27];
        let mut b0 = [0u8; 16];
        b0[0] = 0x49;
        b0[5] = 1;
        b0[6..10].copy_from_slice(&0x2600_0001u32.to_le_bytes());
        b0[10..14].copy_from_slice(&0x1_0002u32.to_le_bytes());
        b0[15] = msg.len() as u8;
        let mut cmac = <cmac::Cmac<aes::Aes128> as Mac>::new_from_slice(&nwk.0).unwrap();
        cmac.update(&b0);
        cmac.update(msg);
        assert_eq!(&phy[27..], &cmac.finalize().into_bytes()[..4]);
        // And the device side reads the commands back.
        let o = decrypt(&phy, &nwk, &app, 0x1_0002).unwrap();
        assert_eq!(
            (o.f_port, o.frm_payload, o.f_opts.len()),
            (Some(0), plain, 0)
        );
    }
}
