//! postcard into a buffer the caller sized: the one way the daemon encodes postcard on its hot
//! paths (stored records, session and MAC state; journal frames, lists of byte runs, are
//! written by `store::journal` itself).
//!
//! `postcard::to_extend` goes through the generic `Extend` trait one byte (or one iterator) at
//! a time, and `to_stdvec` grows its vector from nothing: together several thousand
//! instructions per uplink (issue 16). [`append`] writes through `Vec::push` and
//! [`crate::vec_write::extend`] into the vector it is given, so a caller that knows roughly how large the
//! encoding is reserves once; [`to_exact_vec`] encodes into a scratch buffer per thread and
//! returns an exactly sized copy, for what stays in memory. The bytes are postcard's, whatever
//! the buffer (unit tests below).

/// Append the postcard encoding of `value` to `buf` (keeping what `buf` already holds, e.g. a
/// header or version prefix) and return it.
pub fn append<T: serde::Serialize + ?Sized>(
    value: &T,
    buf: Vec<u8>,
) -> Result<Vec<u8>, postcard::Error> {
    postcard::serialize_with_flavor(value, Buf(buf))
}

/// `prefix` then the postcard encoding of `value`, in a vector of exactly that length: encoded
/// into a scratch buffer kept per thread, then copied once. For what stays in memory a while
/// (records and session state staged until a checkpoint): a vector sized for the largest
/// record would hold 2-4 times a typical record's bytes (the 1M-uplink backlog held 7 MB more
/// with 512-byte buffers).
pub fn to_exact_vec<T: serde::Serialize + ?Sized>(
    prefix: &[u8],
    value: &T,
) -> Result<Vec<u8>, postcard::Error> {
    exact_with(|buf| {
        buf.extend_from_slice(prefix);
        *buf = append(value, std::mem::take(buf))?;
        Ok(())
    })
}

/// What `write` puts into a scratch buffer kept per thread, in a vector of exactly that
/// length (as [`to_exact_vec`], for encoders that write some fields themselves).
pub fn exact_with<E>(write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>) -> Result<Vec<u8>, E> {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(1024));
    }
    SCRATCH.with(|cell| {
        let mut buf = std::mem::take(&mut *cell.borrow_mut());
        buf.clear();
        let r = write(&mut buf);
        let out = buf.as_slice().to_vec();
        // Keep the scratch for the next call unless one huge value grew it.
        if buf.capacity() <= 64 << 10 {
            *cell.borrow_mut() = buf;
        }
        r.map(|()| out)
    })
}

/// A postcard output that appends to a `Vec<u8>`.
struct Buf(Vec<u8>);

impl postcard::ser_flavors::Flavor for Buf {
    type Output = Vec<u8>;

    #[inline]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    #[inline]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        crate::vec_write::extend(&mut self.0, data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<Vec<u8>> {
        Ok(self.0)
    }
}

#[cfg(test)]
mod tests {
    #[derive(serde::Serialize)]
    struct Sample<'a> {
        name: &'a str,
        n: u64,
        bytes: &'a [u8],
        list: Vec<(String, Vec<u8>)>,
        maybe: Option<i32>,
    }

    #[test]
    fn the_bytes_are_postcards_whatever_the_buffer() {
        let long = vec![7u8; 1000];
        let s = Sample {
            name: "déjà vu",
            n: u64::MAX - 3,
            bytes: &long,
            list: vec![("a".into(), vec![1, 2, 3]), (String::new(), Vec::new())],
            maybe: Some(-300),
        };
        let reference = postcard::to_stdvec(&s).unwrap();
        assert_eq!(super::append(&s, Vec::new()).unwrap(), reference);
        assert_eq!(
            super::append(&s, Vec::with_capacity(4096)).unwrap(),
            reference
        );
        let mut prefixed = vec![0xFE, 3];
        prefixed.extend_from_slice(&reference);
        assert_eq!(super::append(&s, vec![0xFE, 3]).unwrap(), prefixed);
        assert_eq!(
            super::append(&s, vec![0xFE, 3]).unwrap(),
            postcard::to_extend(&s, vec![0xFE, 3]).unwrap()
        );
        // Exact: the same bytes, no spare capacity, twice in a row (the scratch is reused).
        for _ in 0..2 {
            let exact = super::to_exact_vec(&[0xFE, 3], &s).unwrap();
            assert_eq!(exact, prefixed);
            assert_eq!(exact.capacity(), exact.len());
        }
        assert_eq!(super::to_exact_vec(&[], &s).unwrap(), reference);
    }
}
