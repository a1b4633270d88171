//! A direct reader for the PUSH_DATA body forwarders send nearly always: version-1 `rxpk`
//! entries (SX1301 forwarders and most SX1302 ones) in plain JSON.
//!
//! Reading such a body with `semtech-udp`'s serde types cost ~8,000 instructions per entry
//! (issue 16): field names matched as strings, every value through serde's visitors, `time`
//! and `data` through intermediate strings. This reader walks the bytes once and borrows every
//! string. It answers only for what it reads exactly as the crate's `RxPkV1` does; for any
//! other shape (a version-2 entry, an escape in a string, a number with an exponent or more
//! than 15 digits, a duplicate member, an FSK frame, a member the crate would refuse, a body
//! nested deeper than [`MAX_DEPTH`]) it returns `None` and the caller reads the body with the
//! crate's types, as before. The tests compare the two readers on generated and mutated
//! bodies.

use super::gwmp::RxFields;
use base64::Engine as _;
use semtech_udp::{CodingRate, DataRate};
use std::str::FromStr;

/// Nesting this reader skips in members it does not use (serde_json's limit is 128).
const MAX_DEPTH: u32 = 32;

/// Powers of ten exact in an `f64`, for the at most 15 decimals [`Cur::number`] takes.
const POW10: [f64; 16] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
];

/// A PUSH_DATA body read by [`read`].
#[derive(Debug)]
pub(super) struct Body<'a> {
    pub entries: Vec<RxFields>,
    /// The raw JSON of the `stat` member (`null` included), when there is one.
    pub stat: Option<&'a str>,
}

/// Read a PUSH_DATA body, or `None` when the crate's types must read it (see the module).
pub(super) fn read(body: &[u8]) -> Option<Body<'_>> {
    if !body.is_ascii() {
        return None;
    }
    let mut c = Cur { b: body, i: 0 };
    let mut out = Body {
        entries: Vec::new(),
        stat: None,
    };
    let (mut seen_rxpk, mut seen_stat) = (false, false);
    c.ws();
    c.eat(b'{')?;
    c.ws();
    if !c.eat_if(b'}') {
        loop {
            c.ws();
            let key = c.string()?;
            c.colon()?;
            match key {
                b"rxpk" => {
                    if std::mem::replace(&mut seen_rxpk, true) {
                        return None;
                    }
                    if !c.literal("null") {
                        c.eat(b'[')?;
                        c.ws();
                        if !c.eat_if(b']') {
                            loop {
                                c.ws();
                                out.entries.push(entry(&mut c)?);
                                if c.list_end(b']')? {
                                    break;
                                }
                            }
                        }
                    }
                }
                b"stat" => {
                    if std::mem::replace(&mut seen_stat, true) {
                        return None;
                    }
                    let start = c.i;
                    c.skip_value(0)?;
                    out.stat = Some(std::str::from_utf8(&body[start..c.i]).ok()?);
                }
                _ => c.skip_value(0)?,
            }
            if c.list_end(b'}')? {
                break;
            }
        }
    }
    c.ws();
    (c.i == body.len()).then_some(out)
}

/// The members of `RxPkV1`, one bit each (a second occurrence is refused, as serde does).
const CHAN: u16 = 1 << 0;
const CODR: u16 = 1 << 1;
const DATA: u16 = 1 << 2;
const DATR: u16 = 1 << 3;
const FREQ: u16 = 1 << 4;
const LSNR: u16 = 1 << 5;
const MODU: u16 = 1 << 6;
const RFCH: u16 = 1 << 7;
const RSSI: u16 = 1 << 8;
const RSSIS: u16 = 1 << 9;
const SIZE: u16 = 1 << 10;
const STAT: u16 = 1 << 11;
const TMST: u16 = 1 << 12;
const TIME: u16 = 1 << 13;
/// Every member but the two `Option`s.
const REQUIRED: u16 =
    CHAN | CODR | DATA | DATR | FREQ | LSNR | MODU | RFCH | RSSI | SIZE | STAT | TMST;

/// One `rxpk` object, read as `RxPkV1`.
fn entry(c: &mut Cur<'_>) -> Option<RxFields> {
    let mut f = RxFields {
        data: Vec::new(),
        crc_ok: true,
        freq: 0.0,
        datr: DataRate::default(),
        codr: None,
        tmst: 0,
        time: None,
        rssi: 0,
        channel_rssi: 0,
        snr: 0.0,
        channel: 0,
        rf_chain: 0,
    };
    let mut rssis = None;
    let mut seen = 0u16;
    c.eat(b'{')?;
    c.ws();
    if c.eat_if(b'}') {
        return None;
    }
    loop {
        c.ws();
        // Unchecked: a name that matches one below has no escape; any other is checked.
        let key = c.raw_string()?;
        c.colon()?;
        let bit = match key {
            b"chan" => CHAN,
            b"codr" => CODR,
            b"data" => DATA,
            b"datr" => DATR,
            b"freq" => FREQ,
            b"lsnr" => LSNR,
            b"modu" => MODU,
            b"rfch" => RFCH,
            b"rssi" => RSSI,
            b"rssis" => RSSIS,
            b"size" => SIZE,
            b"stat" => STAT,
            b"tmst" => TMST,
            b"time" => TIME,
            _ => {
                checked(key)?;
                0
            }
        };
        if seen & bit != 0 {
            return None;
        }
        seen |= bit;
        match bit {
            CHAN => f.channel = c.unsigned()? as u32,
            CODR => {
                // Values matched against fixed sets, or parsed, need no check of their own
                // (an escape matches none of them).
                f.codr = match c.raw_string()? {
                    b"4/5" => Some(CodingRate::_4_5),
                    b"4/6" => Some(CodingRate::_4_6),
                    b"4/7" => Some(CodingRate::_4_7),
                    b"4/8" => Some(CodingRate::_4_8),
                    b"OFF" => None,
                    _ => return None,
                }
            }
            DATA => {
                // Any escape or control character is not base64: refused by the decoder.
                f.data = base64::engine::general_purpose::STANDARD
                    .decode(c.raw_string()?)
                    .ok()?
            }
            DATR => f.datr = DataRate::from_str(std::str::from_utf8(c.raw_string()?).ok()?).ok()?,
            FREQ => f.freq = c.float()?,
            LSNR => f.snr = c.float()? as f32,
            MODU => {
                if c.raw_string()? != b"LORA" {
                    return None;
                }
            }
            RFCH => f.rf_chain = c.unsigned()? as u32,
            RSSI => f.channel_rssi = i32::try_from(c.signed()?).ok()?,
            RSSIS => {
                if !c.literal("null") {
                    rssis = Some(i32::try_from(c.signed()?).ok()?);
                }
            }
            SIZE => {
                c.unsigned()?;
            }
            STAT => {
                f.crc_ok = match c.signed()? {
                    1 | 0 => true,
                    -1 => false,
                    _ => return None,
                }
            }
            TMST => f.tmst = u32::try_from(c.unsigned()?).ok()?,
            TIME => {
                if !c.literal("null") {
                    f.time = Some(std::str::from_utf8(c.string()?).ok()?.to_owned());
                }
            }
            _ => c.skip_value(0)?,
        }
        if c.list_end(b'}')? {
            break;
        }
    }
    if seen & REQUIRED != REQUIRED {
        return None;
    }
    f.rssi = rssis.unwrap_or(f.channel_rssi);
    Some(f)
}

/// `s` when it has no escape or control character: serde_json would read such a string
/// differently (or refuse it).
fn checked(s: &[u8]) -> Option<&[u8]> {
    (!s.iter().any(|&c| c == b'\\' || c < 0x20)).then_some(s)
}

/// A cursor over an ASCII body.
struct Cur<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Cur<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        self.eat_if(c).then_some(())
    }

    fn eat_if(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        self.i += usize::from(hit);
        hit
    }

    /// `:` between a member's name and its value, with the whitespace around it.
    fn colon(&mut self) -> Option<()> {
        self.ws();
        self.eat(b':')?;
        self.ws();
        Some(())
    }

    /// After a member or an element: `,` (more follow, false) or `close` (true).
    fn list_end(&mut self, close: u8) -> Option<bool> {
        self.ws();
        match self.peek()? {
            b',' => {
                self.i += 1;
                Some(false)
            }
            c if c == close => {
                self.i += 1;
                Some(true)
            }
            _ => None,
        }
    }

    fn literal(&mut self, word: &str) -> bool {
        let hit = self.b[self.i..].starts_with(word.as_bytes());
        if hit {
            self.i += word.len();
        }
        hit
    }

    /// A string without escapes or control characters, as its bytes (ASCII: see [`read`]).
    fn string(&mut self) -> Option<&'a [u8]> {
        self.raw_string().and_then(checked)
    }

    /// The bytes up to the next `"`, unchecked: for a string that is then matched against
    /// fixed names or parsed (neither accepts an escape), or passed to [`checked`].
    // A plain loop: the strings are short (names of 4 or 5 bytes, values of up to ~60), too
    // short for a vectorised search to pay for its call.
    fn raw_string(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let rest = &self.b[self.i..];
        let n = rest.iter().position(|&c| c == b'"')?;
        self.i += n + 1;
        Some(&rest[..n])
    }

    /// A number as JSON writes it, without exponent and with at most 15 digits:
    /// (negative, the digits as an integer, how many of them follow the '.').
    fn number(&mut self) -> Option<(bool, u64, u32)> {
        let negative = self.eat_if(b'-');
        let first = self.peek()?;
        let (mut mantissa, mut digits, mut frac) = (0u64, 0u32, 0u32);
        let mut in_frac = false;
        loop {
            match self.peek() {
                Some(d @ b'0'..=b'9') => {
                    if digits == 15 {
                        return None;
                    }
                    mantissa = mantissa * 10 + u64::from(d - b'0');
                    digits += 1;
                    frac += u32::from(in_frac);
                }
                Some(b'.') if !in_frac => in_frac = true,
                _ => break,
            }
            self.i += 1;
        }
        let int_digits = digits - frac;
        // JSON: at least one digit on each side of '.', no leading zeros, and (here) no exponent.
        if !first.is_ascii_digit()
            || (first == b'0' && int_digits > 1)
            || (in_frac && frac == 0)
            || matches!(self.peek(), Some(b'e' | b'E'))
        {
            return None;
        }
        Some((negative, mantissa, frac))
    }

    /// An integer serde_json gives an unsigned field: no sign, no fraction.
    fn unsigned(&mut self) -> Option<u64> {
        match self.number()? {
            (false, n, 0) => Some(n),
            _ => None,
        }
    }

    /// An integer serde_json gives a signed field (it reads `-0` as a float, refused there).
    fn signed(&mut self) -> Option<i64> {
        match self.number()? {
            (false, n, 0) => i64::try_from(n).ok(),
            (true, n, 0) if n > 0 => i64::try_from(n).ok().map(|n| -n),
            _ => None,
        }
    }

    /// A number for a float field, computed as serde_json does: the digits as an integer
    /// divided by a power of ten, both exact in an `f64` here (≤ 15 digits), so the one
    /// division is correctly rounded whichever way serde_json is built.
    fn float(&mut self) -> Option<f64> {
        let (negative, mantissa, frac) = self.number()?;
        let v = mantissa as f64 / POW10[frac as usize];
        Some(if negative { -v } else { v })
    }

    /// Skip a value the reader does not use.
    fn skip_value(&mut self, depth: u32) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' | b'[' => {
                let close = if self.b[self.i] == b'{' { b'}' } else { b']' };
                self.i += 1;
                self.ws();
                if self.eat_if(close) {
                    return Some(());
                }
                loop {
                    self.ws();
                    if close == b'}' {
                        self.string()?;
                        self.colon()?;
                    }
                    self.skip_value(depth + 1)?;
                    if self.list_end(close)? {
                        return Some(());
                    }
                }
            }
            b't' => self.literal("true").then_some(()),
            b'f' => self.literal("false").then_some(()),
            b'n' => self.literal("null").then_some(()),
            _ => self.number().map(drop),
        }
    }
}

#[cfg(test)]
mod tests;
