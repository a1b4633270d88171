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
