//! Buffers for secrets the size of a payload (a decrypted plaintext, encrypt's
//! `data`): cleared on drop by one fill over the whole allocation.
//!
//! Why not `zeroize::Zeroizing<Vec<u8>>`, as for keys: it clears a vector one
//! byte at a time (a volatile write and a compiler barrier per byte). For a
//! megabyte that took longer than the AES-GCM open that produced the bytes
//! (about 150 µs against 133 µs in a debug build), where a fill over the
//! slice takes 11 µs. Key-sized secrets keep `Zeroizing`.
//!
//! Neither type grows in place: a regrown vector would leave its old copy in
//! freed memory. What must grow (a response body) moves to a larger buffer
//! of this kind and drops the old one.

use std::fmt;
use std::ops::Deref;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// Clears every byte of `v`'s allocation, its spare capacity included.
fn clear(v: &mut Vec<u8>) {
    v.as_mut_slice().zeroize();
    v.spare_capacity_mut().zeroize();
}

/// Secret bytes, cleared when dropped.
#[derive(Default)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    /// Takes `bytes` (the same allocation: nothing is copied).
    pub fn new(bytes: Vec<u8>) -> SecretBytes {
        SecretBytes(bytes)
    }

    /// An empty buffer with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> SecretBytes {
        SecretBytes(Vec::with_capacity(capacity))
    }

    /// Room left before the buffer would have to grow.
    pub fn room(&self) -> usize {
        self.0.capacity() - self.0.len()
    }

    /// The allocation's size.
    pub fn capacity(&self) -> usize {
        self.0.capacity()
    }

    /// Appends `bytes`, which must fit ([`SecretBytes::room`]): the buffer
    /// never grows in place.
    pub fn extend_within(&mut self, bytes: &[u8]) {
        assert!(bytes.len() <= self.room(), "a secret buffer never regrows");
        self.0.extend_from_slice(bytes);
    }

    /// Shortens to `len` bytes; the bytes cut off stay in the allocation and
    /// are cleared with it.
    pub(super) fn truncate(&mut self, len: usize) {
        self.0.truncate(len);
    }

    /// The vector itself, for in-place decryption (which does not grow it).
    pub(super) fn vec_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }

    /// The same bytes as a string if they are UTF-8 (no copy); else the bytes
    /// back.
    pub fn into_string(mut self) -> Result<SecretString, SecretBytes> {
        match String::from_utf8(std::mem::take(&mut self.0)) {
            Ok(s) => Ok(SecretString(s)),
            Err(e) => Err(SecretBytes(e.into_bytes())),
        }
    }
}

impl Deref for SecretBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for SecretBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        clear(&mut self.0);
    }
}

impl ZeroizeOnDrop for SecretBytes {}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<{} bytes>)", self.0.len())
    }
}

/// A secret string (encrypt's `data`, decrypt's answer), cleared when
/// dropped.
#[derive(Default)]
pub struct SecretString(String);

impl SecretString {
    /// Takes `s` (the same allocation: nothing is copied).
    pub fn new(s: String) -> SecretString {
        SecretString(s)
    }
}

impl Deref for SecretString {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Drop for SecretString {
    fn drop(&mut self) {
        clear(&mut std::mem::take(&mut self.0).into_bytes());
    }
}

impl ZeroizeOnDrop for SecretString {}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretString(<{} bytes>)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `clear` zeroes the bytes in use (and, by the same fill, the spare
    /// capacity, which safe code cannot read back) and keeps the length.
    #[test]
    fn clearing_zeroes_the_bytes_in_place() {
        let mut v = b"a longer plaintext".to_vec();
        v.truncate(8);
        let at = v.as_ptr();
        clear(&mut v);
        assert_eq!(v, [0; 8]);
        assert_eq!(v.as_ptr(), at, "in place, not a copy");
        fn clears_on_drop<T: ZeroizeOnDrop>() {}
        clears_on_drop::<SecretBytes>();
        clears_on_drop::<SecretString>();
    }

    /// A string made from secret bytes is the same allocation, and bytes
    /// that are not UTF-8 come back as secret bytes.
    #[test]
    fn bytes_become_a_string_without_a_copy() {
        let bytes = SecretBytes::new("ünï".as_bytes().to_vec());
        let at = bytes.as_ptr();
        let s = bytes.into_string().expect("UTF-8");
        assert_eq!(&*s, "ünï");
        assert_eq!(s.as_ptr(), at);
        let bad = SecretBytes::new(vec![0xff, 0xfe]);
        let back = bad.into_string().expect_err("not UTF-8");
        assert_eq!(&*back, &[0xff, 0xfe]);
        assert_eq!(format!("{back:?}"), "SecretBytes(<2 bytes>)");
        assert_eq!(format!("{s:?}"), "SecretString(<5 bytes>)");
    }

    #[test]
    #[should_panic(expected = "never regrows")]
    fn a_secret_buffer_refuses_to_grow_in_place() {
        let mut b = SecretBytes::with_capacity(4);
        b.extend_within(b"1234");
        assert_eq!(b.room(), 0);
        b.extend_within(b"5");
    }
}
