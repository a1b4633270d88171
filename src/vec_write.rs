//! Appending the many short pieces an encoder writes to a `Vec<u8>`.
//!
//! postcard writes every varint, and serde_json every key, number and punctuation mark, as its
//! own slice; `Vec::extend_from_slice` is not inlined at the release profile's opt-level "s",
//! so each piece cost a call of it, then its capacity check and a call of `memcpy`: ~120
//! pieces and ~4,600 instructions per uplink (issue 16). [`extend`] is the same copy, inlined.
//!
//! (A first version copied pieces of up to 16 bytes with overlapping unaligned moves; rustc
//! 1.85, which builds the ARM packages, compiled its 2-byte case wrongly where it was inlined
//! into postcard's varints, and the unit tests run with a newer rustc did not see it. Plain
//! `copy_nonoverlapping` is what the standard library itself does.)

use std::io;

/// Append `data` to `buf`.
#[inline(always)]
pub fn extend(buf: &mut Vec<u8>, data: &[u8]) {
    let n = data.len();
    buf.reserve(n);
    let len = buf.len();
    // SAFETY: `reserve` made room for `n` more bytes after `len`; `data` is a shared borrow,
    // so it cannot overlap `buf`'s spare capacity (only `buf`'s owner, borrowed mutably here,
    // can reach it); the `n` bytes are written before `set_len`.
    unsafe {
        std::ptr::copy_nonoverlapping(data.as_ptr(), buf.as_mut_ptr().add(len), n);
        buf.set_len(len + n);
    }
}

/// Append postcard's unsigned varint of `n` (7 bits a byte, low first, the high bit set on
/// all but the last). Built in a 10-byte stack buffer, then written as one fixed-size copy
/// into reserved capacity with the length advanced by the bytes used: one capacity check
/// per varint instead of one per byte (the encoders write ~70 varint bytes per uplink).
#[inline(always)]
pub fn varint(buf: &mut Vec<u8>, mut n: u64) {
    let mut bytes = [0u8; 10];
    let mut used = 1;
    while n >= 0x80 {
        bytes[used - 1] = n as u8 | 0x80;
        n >>= 7;
        used += 1;
    }
    bytes[used - 1] = n as u8;
    buf.reserve(bytes.len());
    let len = buf.len();
    // SAFETY: `reserve` made room for 10 more bytes after `len`; `bytes` is a local array,
    // so it cannot overlap `buf`; the first `used` (≤ 10) of them are written before
    // `set_len`, and the rest of the copy lies in spare capacity, which `set_len` leaves out.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.as_mut_ptr().add(len), bytes.len());
        buf.set_len(len + used);
    }
}

/// Append postcard's encoding of a signed integer: zigzag, then [`varint`] (the same bytes
/// for an `i32` as for the `i64` it widens to).
#[inline(always)]
pub fn zigzag(buf: &mut Vec<u8>, n: i64) {
    varint(buf, ((n << 1) ^ (n >> 63)) as u64);
}

/// An `io::Write` that appends to a vector through [`extend`] (for serde_json's writer).
pub struct VecWriter<'a>(pub &'a mut Vec<u8>);

impl io::Write for VecWriter<'_> {
    #[inline]
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        extend(self.0, data);
        Ok(data.len())
    }

    #[inline]
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        extend(self.0, data);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_length_appends_exactly_the_bytes() {
        let data: Vec<u8> = (0..64u8)
            .map(|i| i.wrapping_mul(37).wrapping_add(1))
            .collect();
        for prefix in [0usize, 1, 3, 7, 8, 15, 100] {
            for n in 0..=40 {
                for start in [0usize, 1, 5] {
                    let piece = &data[start..start + n];
                    // A buffer that must grow, and one with room.
                    for cap in [prefix, prefix + 64] {
                        let mut buf = Vec::with_capacity(cap);
                        buf.extend(std::iter::repeat_n(0xAA, prefix));
                        let mut expected = buf.clone();
                        expected.extend_from_slice(piece);
                        extend(&mut buf, piece);
                        assert_eq!(buf, expected, "prefix {prefix}, n {n}, start {start}");
                    }
                }
            }
        }
    }

    /// Every varint length (1 to 10 bytes) and sign, after prefixes that leave the buffer
    /// full or with room, against postcard's own encoding.
    #[test]
    fn varints_are_postcards() {
        let mut values: Vec<u64> = vec![0, 1, 0x7F, 0x80, 0x3FFF, 0x4000, u64::MAX];
        for bits in 0..64 {
            values.extend([1u64 << bits, (1u64 << bits) - 1, (1u64 << bits) | 0x55]);
        }
        for v in values {
            for prefix in [0usize, 1, 6, 9] {
                for cap in [prefix, prefix + 3, prefix + 32] {
                    let mut buf = Vec::with_capacity(cap);
                    buf.extend(std::iter::repeat_n(0xAA, prefix));
                    let mut expected = buf.clone();
                    expected.extend(postcard::to_stdvec(&v).unwrap());
                    varint(&mut buf, v);
                    assert_eq!(buf, expected, "{v} after {prefix} bytes");
                    let signed = v as i64;
                    let mut z = Vec::with_capacity(cap);
                    zigzag(&mut z, signed);
                    assert_eq!(z, postcard::to_stdvec(&signed).unwrap(), "{signed}");
                }
            }
        }
    }

    #[test]
    fn serde_json_through_the_writer_is_serde_json() {
        let v = serde_json::json!({"a": [1, -2.5, "x\"y", null, true], "long key of more than sixteen bytes": "é"});
        let mut buf = b"prefix".to_vec();
        serde_json::to_writer(VecWriter(&mut buf), &v).unwrap();
        let mut expected = b"prefix".to_vec();
        expected.extend_from_slice(&serde_json::to_vec(&v).unwrap());
        assert_eq!(buf, expected);
    }
}
