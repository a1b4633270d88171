//! The commonest stored record, an `Uplink` of the current version, written and read at its
//! offsets instead of through serde (issue 16: postcard's serializer and deserializer spent
//! ~1,300 and ~3,200 instructions per uplink on ~200 bytes, one visitor call per byte of an EUI).
//!
//! Both follow postcard's layout exactly (varints of the same length limits, zigzag for signed
//! integers, `0`/`1` for booleans and options). The writer's bytes are postcard's; the reader
//! declines anything it is not sure of: a record it does not answer for is read by postcard
//! as before, so an unusual or damaged record gets postcard's verdict. The payload codec's
//! output (a nested enum of JSON text) goes through postcard even here. Tests compare both
//! with postcard on random and damaged records.

use crate::model::{CodecOutput, DevAddr, DevStatus, Eui64, RxInfo, TxSettings, Uplink};
use crate::vec_write::{extend, varint, zigzag};
use std::sync::Arc;

/// Append `Record::Uplink(u)` as postcard encodes it.
pub fn write(u: &Uplink, b: &mut Vec<u8>) -> Result<(), postcard::Error> {
    // `Record::Uplink` is variant 0.
    b.push(0);
    varint128(b, u.id);
    zigzag(b, u.received_at_us);
    text(b, &u.application);
    text(b, &u.device);
    extend(b, &u.dev_eui.0);
    varint(b, u.dev_addr.0.into());
    match u.f_port {
        None => b.push(0),
        Some(p) => extend(b, &[1, p]),
    }
    varint(b, u.f_cnt.into());
    extend(b, &[u8::from(u.confirmed), u8::from(u.adr)]);
    varint(b, u.payload.len() as u64);
    extend(b, &u.payload);
    varint(b, u.settings.frequency_hz.into());
    b.push(u.settings.spreading_factor);
    varint(b, u.settings.bandwidth_hz.into());
    text(b, &u.settings.coding_rate);
    varint(b, u.rx.len() as u64);
    for r in &u.rx {
        extend(b, &r.gateway.0);
        varint(b, r.tmst.into());
        match &r.time {
            None => b.push(0),
            Some(t) => {
                b.push(1);
                text(b, t);
            }
        }
        zigzag(b, r.rssi.into());
        zigzag(b, r.channel_rssi.into());
        extend(b, &r.snr.to_le_bytes());
        varint(b, r.channel.into());
        varint(b, r.rf_chain.into());
        zigzag(b, r.received_at_us);
    }
    match u.dev_status {
        None => b.push(0),
        Some(d) => {
            extend(b, &[1, d.battery, d.margin as u8]);
            zigzag(b, d.received_at_us);
        }
    }
    match &u.codec {
        None => b.push(0),
        Some(c) => {
            b.push(1);
            *b = crate::postcard_buf::append(c, std::mem::take(b))?;
        }
    }
    Ok(())
}

/// A `u128` varint: 64-bit arithmetic until what is left fits (u128 shifts cost several
/// instructions each).
fn varint128(b: &mut Vec<u8>, mut n: u128) {
    while n > u128::from(u64::MAX) {
        b.push(n as u8 | 0x80);
        n >>= 7;
    }
    varint(b, n as u64);
}

/// A string: its length, then its bytes.
fn text(b: &mut Vec<u8>, s: &str) {
    varint(b, s.len() as u64);
    extend(b, s.as_bytes());
}

/// The record bytes after `[TAG, VERSION]`, if they are an `Uplink` this reader can read.
pub fn read(b: &[u8]) -> Option<Uplink> {
    let mut c = Cur(b);
    // `Record::Uplink` is variant 0.
    if c.u32()? != 0 {
        return None;
    }
    let id = c.u128()?;
    let received_at_us = c.i64()?;
    let application = Arc::from(c.str()?);
    let device = Arc::from(c.str()?);
    let dev_eui = Eui64(c.array()?);
    let dev_addr = DevAddr(c.u32()?);
    let f_port = match c.option()? {
        true => Some(c.byte()?),
        false => None,
    };
    let f_cnt = c.u32()?;
    let confirmed = c.bool()?;
    let adr = c.bool()?;
    let payload = c.bytes()?.to_vec();
    let settings = TxSettings {
        frequency_hz: c.u32()?,
        spreading_factor: c.byte()?,
        bandwidth_hz: c.u32()?,
        coding_rate: c.str()?.into(),
    };
    let n = c.len()?;
    // Each reception is at least 19 bytes: a count beyond the record is damage.
    if n > c.0.len() / 19 {
        return None;
    }
    let mut rx = Vec::with_capacity(n);
    for _ in 0..n {
        rx.push(RxInfo {
            gateway: Eui64(c.array()?),
            tmst: c.u32()?,
            time: match c.option()? {
                true => Some(c.str()?.to_owned()),
                false => None,
            },
            rssi: c.i32()?,
            channel_rssi: c.i32()?,
            snr: f32::from_le_bytes(c.array()?),
            channel: c.u32()?,
            rf_chain: c.u32()?,
            received_at_us: c.i64()?,
        });
    }
    let dev_status = match c.option()? {
        true => Some(DevStatus {
            battery: c.byte()?,
            margin: c.byte()? as i8,
            received_at_us: c.i64()?,
        }),
        false => None,
    };
    let codec = match c.option()? {
        true => Some(postcard::take_from_bytes::<CodecOutput>(c.0).ok()?.0),
        false => None,
    };
    Some(Uplink {
        id,
        received_at_us,
        application,
        device,
        dev_eui,
        dev_addr,
        f_port,
        f_cnt,
        confirmed,
        adr,
        payload,
        settings,
        rx,
        dev_status,
        codec,
    })
}

/// The unread rest of the record (also of a block of records: `packed.rs`).
pub(super) struct Cur<'a>(pub(super) &'a [u8]);

impl<'a> Cur<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    pub(super) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    /// An unsigned varint of a type of at most 64 bits, with postcard's limits: at most
    /// ⌈bits / 7⌉ bytes, and the last of that many carries no bit beyond the type.
    #[inline]
    pub(super) fn varint(&mut self, bits: u32) -> Option<u64> {
        let max = bits.div_ceil(7) as usize;
        let last_max = (1u8 << (bits % 7)) - 1;
        let mut out = 0u64;
        for (i, &b) in self.0.iter().take(max).enumerate() {
            out |= u64::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                if i + 1 == max && b > last_max {
                    return None;
                }
                self.0 = &self.0[i + 1..];
                return Some(out);
            }
        }
        None
    }

    fn u32(&mut self) -> Option<u32> {
        // The common case, a value below 128, without the loop.
        if let Some((&b, rest)) = self.0.split_first() {
            if b < 0x80 {
                self.0 = rest;
                return Some(u32::from(b));
            }
        }
        self.varint(32).map(|v| v as u32)
    }

    fn u64(&mut self) -> Option<u64> {
        self.varint(64)
    }

    /// A `u128` varint (19 bytes at most, 2 bits in the 19th), in 64-bit pieces: nine
    /// bytes of 63 bits, nine more, then the last.
    fn u128(&mut self) -> Option<u128> {
        let (mut lo, mut mid) = (0u64, 0u64);
        for (i, &b) in self.0.iter().take(19).enumerate() {
            let v = u64::from(b & 0x7F);
            match i {
                0..=8 => lo |= v << (7 * i),
                9..=17 => mid |= v << (7 * (i - 9)),
                _ => {}
            }
            if b & 0x80 == 0 {
                if i == 18 && b > 0x03 {
                    return None;
                }
                self.0 = &self.0[i + 1..];
                let top = if i == 18 { u128::from(b) << 126 } else { 0 };
                return Some(u128::from(lo) | u128::from(mid) << 63 | top);
            }
        }
        None
    }

    fn i32(&mut self) -> Option<i32> {
        let n = self.u32()?;
        Some((n >> 1) as i32 ^ -((n & 1) as i32))
    }

    fn i64(&mut self) -> Option<i64> {
        let n = self.u64()?;
        Some((n >> 1) as i64 ^ -((n & 1) as i64))
    }

    /// A length (`usize`): postcard reads it as the platform's width.
    fn len(&mut self) -> Option<usize> {
        if let Some((&b, rest)) = self.0.split_first() {
            if b < 0x80 {
                self.0 = rest;
                return Some(usize::from(b));
            }
        }
        usize::try_from(self.varint(usize::BITS)?).ok()
    }

    fn bool(&mut self) -> Option<bool> {
        match self.byte()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    /// An option's tag: is a value present?
    fn option(&mut self) -> Option<bool> {
        self.bool()
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.len()?;
        self.take(n)
    }

    fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }
}

#[cfg(test)]
mod tests;
