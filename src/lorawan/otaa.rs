//! Over-the-air activation, LoRaWAN 1.0.x (§6.2): JoinRequest, session keys, JoinAccept.
//!
//! Built directly on AES-128 and CMAC rather than the `lorawan` crate's `JoinAcceptCreator`,
//! which computes the MIC and encryption over 17 bytes even when a CFList makes the frame 33
//! bytes long, so devices reject it (crate-notes, "lorawan"). The crate's own published test
//! vectors (tests/lorawan.rs of lorawan 0.9) check this implementation.
//!
//! Byte order: EUIs, DevNonce, AppNonce, NetID and DevAddr travel LSB first; our types hold them
//! as people write them.

use super::frame::FrameError;
use crate::model::{AesKey, DevAddr, Eui64};
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::Aes128;
use cmac::{Cmac, Mac};

const MHDR_JOIN_REQUEST: u8 = 0x00;
const MHDR_JOIN_ACCEPT: u8 = 0x20;

fn cmac4(key: &AesKey, parts: &[&[u8]]) -> [u8; 4] {
    let mut out = [0u8; 4];
    if let Ok(mut m) = <Cmac<Aes128> as Mac>::new_from_slice(&key.0) {
        for p in parts {
            m.update(p);
        }
        out.copy_from_slice(&m.finalize().into_bytes()[..4]);
    }
    out
}

fn aes_encrypt(key: &AesKey, block: &mut [u8; 16]) {
    Aes128::new(&key.0.into()).encrypt_block(block.into());
}

fn aes_decrypt(key: &AesKey, block: &mut [u8; 16]) {
    Aes128::new(&key.0.into()).decrypt_block(block.into());
}

/// A JoinRequest's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinRequest {
    pub join_eui: Eui64,
    pub dev_eui: Eui64,
    pub dev_nonce: u16,
}

/// Read a JoinRequest (23 bytes). Does not check the MIC: the key depends on the DevEUI.
pub fn parse_join_request(phy: &[u8]) -> Result<JoinRequest, FrameError> {
    if phy.len() != 23 {
        return Err(FrameError::TooShort(phy.len()));
    }
    if phy[0] != MHDR_JOIN_REQUEST {
        return Err(FrameError::NotLoRaWan(phy[0]));
    }
    let eui = |b: &[u8]| {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Eui64::from_le_bytes(a)
    };
    Ok(JoinRequest {
        join_eui: eui(&phy[1..9]),
        dev_eui: eui(&phy[9..17]),
        dev_nonce: u16::from_le_bytes([phy[17], phy[18]]),
    })
}

/// MIC of a JoinRequest: CMAC(AppKey, MHDR | JoinEUI | DevEUI | DevNonce)[0..4].
pub fn join_request_mic_ok(phy: &[u8], app_key: &AesKey) -> bool {
    phy.len() == 23 && cmac4(app_key, &[&phy[..19]]) == phy[19..23]
}

/// Device side: build a JoinRequest (for the simulator and the tests).
pub fn encode_join_request(r: &JoinRequest, app_key: &AesKey) -> Vec<u8> {
    let mut v = Vec::with_capacity(23);
    v.push(MHDR_JOIN_REQUEST);
    v.extend_from_slice(&r.join_eui.to_le_bytes());
    v.extend_from_slice(&r.dev_eui.to_le_bytes());
    v.extend_from_slice(&r.dev_nonce.to_le_bytes());
    let mic = cmac4(app_key, &[&v]);
    v.extend_from_slice(&mic);
    v
}

/// NwkSKey and AppSKey: AES(AppKey, 0x01|0x02 | AppNonce | NetID | DevNonce | pad).
pub fn derive_session_keys(
    app_key: &AesKey,
    app_nonce: u32,
    net_id: u32,
    dev_nonce: u16,
) -> (AesKey, AesKey) {
    let derive = |kind: u8| {
        let mut b = [0u8; 16];
        b[0] = kind;
        b[1..4].copy_from_slice(&app_nonce.to_le_bytes()[..3]);
        b[4..7].copy_from_slice(&net_id.to_le_bytes()[..3]);
        b[7..9].copy_from_slice(&dev_nonce.to_le_bytes());
        aes_encrypt(app_key, &mut b);
        AesKey(b)
    };
    (derive(0x01), derive(0x02))
}

/// What a JoinAccept tells the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinAccept {
    /// 24 bits.
    pub app_nonce: u32,
    /// 24 bits.
    pub net_id: u32,
    pub dev_addr: DevAddr,
    pub rx1_dr_offset: u8,
    pub rx2_dr: u8,
    /// Seconds (0 means 1).
    pub rx_delay: u8,
    pub cf_list: Option<[u8; 16]>,
}

/// Build the encrypted JoinAccept PHYPayload (17 or 33 bytes). The network "decrypts" so that
/// the device, which only has AES encryption, can decrypt it (§6.2.5).
pub fn encode_join_accept(ja: &JoinAccept, app_key: &AesKey) -> Vec<u8> {
    let mut clear = Vec::with_capacity(33);
    clear.push(MHDR_JOIN_ACCEPT);
    clear.extend_from_slice(&ja.app_nonce.to_le_bytes()[..3]);
    clear.extend_from_slice(&ja.net_id.to_le_bytes()[..3]);
    clear.extend_from_slice(&ja.dev_addr.to_le_bytes());
    clear.push(((ja.rx1_dr_offset & 0x07) << 4) | (ja.rx2_dr & 0x0F));
    clear.push(ja.rx_delay & 0x0F);
    if let Some(cf) = &ja.cf_list {
        clear.extend_from_slice(cf);
    }
    let mic = cmac4(app_key, &[&clear]);
    clear.extend_from_slice(&mic);
    // Everything after the MHDR, including the MIC, in 16-byte blocks.
    let mut out = vec![MHDR_JOIN_ACCEPT];
    for chunk in clear[1..].chunks(16) {
        let mut b = [0u8; 16];
        b.copy_from_slice(chunk);
        aes_decrypt(app_key, &mut b);
        out.extend_from_slice(&b);
    }
    out
}

/// Device side: decrypt a JoinAccept. Returns its content and whether the MIC is valid.
pub fn decode_join_accept(phy: &[u8], app_key: &AesKey) -> Result<(JoinAccept, bool), FrameError> {
    if phy.len() != 17 && phy.len() != 33 {
        return Err(FrameError::TooShort(phy.len()));
    }
    if phy[0] != MHDR_JOIN_ACCEPT {
        return Err(FrameError::NotLoRaWan(phy[0]));
    }
    let mut clear = vec![phy[0]];
    for chunk in phy[1..].chunks(16) {
        let mut b = [0u8; 16];
        b.copy_from_slice(chunk);
        aes_encrypt(app_key, &mut b);
        clear.extend_from_slice(&b);
    }
    let n = clear.len();
    let mic_ok = cmac4(app_key, &[&clear[..n - 4]]) == clear[n - 4..];
    let u24 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], 0]);
    let cf_list = (n == 33).then(|| {
        let mut c = [0u8; 16];
        c.copy_from_slice(&clear[13..29]);
        c
    });
    Ok((
        JoinAccept {
            app_nonce: u24(&clear[1..4]),
            net_id: u24(&clear[4..7]),
            dev_addr: DevAddr(u32::from_le_bytes([
                clear[7], clear[8], clear[9], clear[10],
            ])),
            rx1_dr_offset: (clear[11] >> 4) & 0x07,
            rx2_dr: clear[11] & 0x0F,
            rx_delay: clear[12] & 0x0F,
            cf_list,
        },
        mic_ok,
    ))
}

/// Whether a JoinRequest's DevNonce may be used, given the DevNonces already used by the device
/// (oldest first). LoRaWAN 1.0.0–1.0.3 §6.2.4: DevNonce is random and the network "keeps track
/// of a certain number of DevNonce values used by the end-device in the past, and ignores join
/// requests with any of these"; LoRaWAN 1.0.4 §6.2.4: DevNonce counts up from 0 and a
/// JoinRequest whose DevNonce is not greater than the last one is ignored.
pub fn dev_nonce_fresh(used: &[u16], nonce: u16, counts_up: bool) -> bool {
    if counts_up {
        used.last().is_none_or(|&last| nonce > last)
    } else {
        !used.contains(&nonce)
    }
}

/// A DevAddr for NetID `net_id` (type 0 NetIDs: the 7-bit NwkID is the NetID's low 7 bits, in
/// the top 7 bits of the address) and a 25-bit NwkAddr.
pub fn dev_addr_for(net_id: u32, nwk_addr: u32) -> DevAddr {
    DevAddr(((net_id & 0x7F) << 25) | (nwk_addr & 0x01FF_FFFF))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors of the `lorawan` crate's test suite (lorawan 0.9, tests/lorawan.rs:
    /// `phy_join_request_payload`, `phy_join_accept_payload`, `test_derive_newskey`, ...).
    const APP_KEY: AesKey = AesKey([
        0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee,
        0xff,
    ]);
    const JOIN_REQUEST: [u8; 23] = [
        0x00, 0x04, 0x03, 0x02, 0x01, 0x04, 0x03, 0x02, 0x01, 0x05, 0x04, 0x03, 0x02, 0x05, 0x04,
        0x03, 0x02, 0x2d, 0x10, 0x6a, 0x99, 0x0e, 0x12,
    ];
    const JOIN_ACCEPT: [u8; 17] = [
        0x20, 0x49, 0x3e, 0xeb, 0x51, 0xfb, 0xa2, 0x11, 0x6f, 0x81, 0x0e, 0xdb, 0x37, 0x42, 0x97,
        0x51, 0x42,
    ];
    const JOIN_ACCEPT_CFLIST_KEY1: [u8; 33] = [
        0x20, 0xe4, 0x56, 0x73, 0xb6, 0x3c, 0xb4, 0xb9, 0xce, 0xcb, 0x2a, 0xa8, 0x3f, 0x03, 0x33,
        0xe6, 0x15, 0xd2, 0xac, 0x89, 0xee, 0xa1, 0x65, 0x98, 0x37, 0xc3, 0xaa, 0x6d, 0xf9, 0x68,
        0x98, 0x89, 0xcf,
    ];

    #[test]
    fn join_request_vector() {
        let r = parse_join_request(&JOIN_REQUEST).unwrap();
        assert_eq!(r.join_eui, "0102030401020304".parse().unwrap());
        assert_eq!(r.dev_eui, "0203040502030405".parse().unwrap());
        assert_eq!(r.dev_nonce, 0x102d);
        assert!(join_request_mic_ok(&JOIN_REQUEST, &AesKey([1; 16])));
        assert!(!join_request_mic_ok(&JOIN_REQUEST, &AesKey([2; 16])));
        assert_eq!(
            encode_join_request(&r, &AesKey([1; 16])),
            JOIN_REQUEST.to_vec()
        );
    }

    #[test]
    fn join_accept_vector_and_session_keys() {
        let (ja, mic_ok) = decode_join_accept(&JOIN_ACCEPT, &APP_KEY).unwrap();
        assert!(mic_ok);
        assert_eq!(ja.app_nonce, 0x57_0bc7);
        assert_eq!(ja.net_id, 0x22_1101);
        assert_eq!(ja.dev_addr, DevAddr(0x0203_1980));
        assert_eq!(
            (ja.rx1_dr_offset, ja.rx2_dr, ja.rx_delay, ja.cf_list),
            (0, 0, 0, None)
        );
        // The network side builds exactly the same bytes.
        assert_eq!(encode_join_accept(&ja, &APP_KEY), JOIN_ACCEPT.to_vec());
        let (nwk, app) = derive_session_keys(&APP_KEY, ja.app_nonce, ja.net_id, 0x102d);
        assert_eq!(
            nwk.0,
            [
                0x7b, 0xb2, 0x5f, 0x89, 0xe0, 0xd1, 0x37, 0x1e, 0x1f, 0xbf, 0x4d, 0x99, 0x7e, 0x14,
                0x68, 0xa3
            ]
        );
        assert_eq!(
            app.0,
            [
                0x14, 0x88, 0x20, 0xdf, 0xb1, 0xe0, 0xc9, 0xd6, 0x28, 0x9c, 0xde, 0x16, 0xc1, 0xaf,
                0x24, 0x9f
            ]
        );
    }

    #[test]
    fn join_accept_with_cf_list_vector() {
        let key = AesKey([1; 16]);
        let (ja, mic_ok) = decode_join_accept(&JOIN_ACCEPT_CFLIST_KEY1, &key).unwrap();
        assert!(mic_ok, "MIC covers the CFList too");
        assert_eq!(ja.app_nonce, 0x01_0203);
        assert_eq!(ja.rx_delay, 3);
        assert_eq!((ja.rx1_dr_offset, ja.rx2_dr), (1, 2));
        // 867.1 .. 867.9 MHz, as the crate's test says.
        let cf = ja.cf_list.unwrap();
        assert_eq!(
            &cf[..15],
            &crate::lorawan::region::join_cf_list(
                crate::lorawan::region::Region::EU868,
                None,
                crate::lorawan::region::extra_channels(crate::lorawan::region::Region::EU868),
            )
            .unwrap()[..15]
        );
        assert_eq!(
            encode_join_accept(&ja, &key),
            JOIN_ACCEPT_CFLIST_KEY1.to_vec()
        );
    }

    /// A JoinRequest/JoinAccept exchange captured from The Things Network and published by
    /// Arjan van Bentem ("Deciphering a LoRaWAN OTAA Join Accept", runkit.com/avbentem), with
    /// the session keys he derived: an EU868 JoinAccept with CFList, RX2 DR3, NetID 000013.
    #[test]
    fn ttn_published_join_exchange() {
        let app_key: AesKey = "B6B53F4A168A7A88BDF7EA135CE9CFCA".parse().unwrap();
        let jr = hex::decode("00DC0000D07ED5B3701E6FEDF57CEEAF0085CC587FE913").unwrap();
        let r = parse_join_request(&jr).unwrap();
        assert_eq!(r.join_eui, "70B3D57ED00000DC".parse().unwrap());
        assert_eq!(r.dev_eui, "00AFEE7CF5ED6F1E".parse().unwrap());
        assert_eq!(r.dev_nonce, 0xCC85);
        assert!(join_request_mic_ok(&jr, &app_key));
        assert_eq!(encode_join_request(&r, &app_key), jr);

        let phy = hex::decode("204DD85AE608B87FC4889970B7D2042C9E72959B0057AED6094B16003DF12DE145")
            .unwrap();
        let (ja, mic_ok) = decode_join_accept(&phy, &app_key).unwrap();
        assert!(mic_ok);
        assert_eq!(ja.app_nonce, 0xE5_063A);
        assert_eq!(ja.net_id, 0x00_0013);
        assert_eq!(ja.dev_addr, DevAddr(0x2601_2E43));
        assert_eq!((ja.rx1_dr_offset, ja.rx2_dr, ja.rx_delay), (0, 3, 1));
        let cf = hex::decode("184F84E85684B85E84886684586E8400").unwrap();
        assert_eq!(ja.cf_list.map(|c| c.to_vec()), Some(cf));
        assert_eq!(
            ja.cf_list,
            crate::lorawan::region::join_cf_list(
                crate::lorawan::region::Region::EU868,
                None,
                crate::lorawan::region::extra_channels(crate::lorawan::region::Region::EU868),
            ),
            "867.1..867.9 MHz, type 0"
        );
        // The network side produces TTN's bytes exactly (MIC and encryption over the CFList).
        assert_eq!(encode_join_accept(&ja, &app_key), phy);
        let (nwk, app) = derive_session_keys(&app_key, ja.app_nonce, ja.net_id, r.dev_nonce);
        assert_eq!(hex::encode_upper(nwk.0), "2C96F7028184BB0BE8AA49275290D4FC");
        assert_eq!(hex::encode_upper(app.0), "F3A5C8F0232A38C144029C165865802C");
        assert_eq!(
            dev_addr_for(ja.net_id, 0x12E43),
            ja.dev_addr,
            "TTN's NwkID 0x13"
        );
    }

    #[test]
    fn dev_nonce_rules() {
        // 1.0.0-1.0.3: random; any value not used before.
        assert!(dev_nonce_fresh(&[], 7, false));
        assert!(dev_nonce_fresh(&[9, 3], 7, false));
        assert!(!dev_nonce_fresh(&[9, 7, 3], 7, false), "replay");
        assert!(
            dev_nonce_fresh(&[9, 3], 1, false),
            "smaller is fine when random"
        );
        // 1.0.4: a counter; only values above the last one.
        assert!(dev_nonce_fresh(&[], 0, true));
        assert!(dev_nonce_fresh(&[0, 1, 2], 3, true));
        assert!(dev_nonce_fresh(&[0, 1, 2], 10, true), "gaps are allowed");
        assert!(!dev_nonce_fresh(&[0, 1, 2], 2, true), "replay");
        assert!(!dev_nonce_fresh(&[5], 4, true), "went backwards");
    }

    #[test]
    fn malformed_and_tampered() {
        assert!(parse_join_request(&JOIN_REQUEST[..22]).is_err());
        assert!(decode_join_accept(&JOIN_ACCEPT[..16], &APP_KEY).is_err());
        let mut t = JOIN_ACCEPT;
        t[5] ^= 1;
        assert!(!decode_join_accept(&t, &APP_KEY).unwrap().1);
        assert_eq!(dev_addr_for(0x000013, 0x12345), DevAddr(0x2601_2345));
        assert_eq!(dev_addr_for(0, 0x1FF_FFFF), DevAddr(0x01FF_FFFF));
    }
}
