//! Keyward's stream format, version 1: files and bodies of any size sealed
//! chunk by chunk in constant memory (docs/envelope.md, "Streams").
//!
//! The construction is STREAM (Hoang, Reyhanitabar, Rogaway and Vizár,
//! "Online Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance",
//! CRYPTO 2015, §7), as age's payload and Tink's streaming AEAD use it: one
//! AEAD key per stream, and chunk `i`'s nonce is `i` (88 bits, big-endian)
//! followed by one byte that is 1 for the last chunk and 0 otherwise. So a
//! chunk moved, repeated or dropped opens under the wrong counter; a stream
//! cut at a chunk boundary ends in a chunk not flagged last; a chunk added
//! after the last is one past a chunk flagged last; and all of them fail.
//!
//! ```text
//! header  = "KWSTREAM" ‖ 0x01 ‖ chunk size (u32 BE) ‖ encryption id (16) ‖ version id (16)
//!           ‖ salt (16) ‖ wrapped key length (u16 BE) ‖ wrapped data key
//! key     = HKDF-SHA256(ikm = data key, salt = salt, info = "keyward:stream:v1")
//! chunk i = AES-256-GCM(key, nonce = i (11 bytes BE) ‖ last (1 byte),
//!                       aad = SHA-256(header), plaintext chunk) ‖ tag (16)
//! ```
//!
//! Every chunk holds exactly `chunk size` bytes of plaintext but the last,
//! which holds 0 to `chunk size` (an empty stream is one empty last chunk).
//! The header is authenticated through every chunk's associated data. The
//! data key is the one `POST /v1/datakey` mints (the wrapped form names the
//! version too); the salt makes the stream key unique even if a data key
//! were reused.

use std::io::{self, Read, Write};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use super::aead::{NONCE_LEN, TAG_LEN};
use super::keys::{hkdf_sha256, random_bytes, sha256, DataKey, KEY_LEN};
use super::secret::SecretBytes;

/// The first bytes of every stream.
pub const STREAM_MAGIC: &[u8; 8] = b"KWSTREAM";
/// The format version this code writes and reads.
pub const STREAM_VERSION: u8 = 1;
/// The chunk size written by default (64 KiB).
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
/// The smallest chunk size a stream may declare.
pub const MIN_CHUNK_SIZE: u32 = 1024;
/// The largest chunk size a stream may declare (bounds a reader's memory).
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;
/// The longest wrapped data key a header may carry.
pub const MAX_WRAPPED_KEY_LEN: usize = 1024;
/// The header's length before the wrapped key.
pub const FIXED_HEADER_LEN: usize = 8 + 1 + 4 + 16 + 16 + 16 + 2;
/// The largest counter (chunks per stream: 2^32, far past any file).
const MAX_CHUNKS: u64 = u32::MAX as u64;

/// A stream's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    /// Plaintext bytes per chunk.
    pub chunk_size: u32,
    /// The encryption that wrapped the data key.
    pub encryption_id: [u8; 16],
    /// The version that wrapped it.
    pub version_id: [u8; 16],
    /// The stream key's HKDF salt.
    pub salt: [u8; 16],
    /// The data key, wrapped (as `/v1/datakey` returns it).
    pub wrapped_key: Vec<u8>,
}

/// Why a stream does not open. The messages say nothing about the key.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Not a Keyward stream, or a header this version cannot read.
    #[error("not a Keyward stream (version 1) header")]
    BadHeader,
    /// A chunk failed to authenticate: changed, moved, repeated, dropped,
    /// or data after the last chunk.
    #[error("the stream was tampered with (a chunk did not verify)")]
    Tampered,
    /// The stream ended before its last chunk (or its last chunk changed).
    #[error("the stream was cut short: it ends before its final chunk")]
    Truncated,
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl StreamHeader {
    /// A header for a new stream: a fresh salt.
    pub fn new(
        chunk_size: u32,
        encryption_id: [u8; 16],
        version_id: [u8; 16],
        wrapped_key: Vec<u8>,
    ) -> StreamHeader {
        StreamHeader {
            chunk_size: chunk_size.clamp(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE),
            encryption_id,
            version_id,
            salt: random_bytes(),
            wrapped_key,
        }
    }

    /// The header's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED_HEADER_LEN + self.wrapped_key.len());
        out.extend_from_slice(STREAM_MAGIC);
        out.push(STREAM_VERSION);
        out.extend_from_slice(&self.chunk_size.to_be_bytes());
        out.extend_from_slice(&self.encryption_id);
        out.extend_from_slice(&self.version_id);
        out.extend_from_slice(&self.salt);
        out.extend_from_slice(&(self.wrapped_key.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.wrapped_key);
        out
    }

    /// Reads a header from the start of `input`; returns it with its bytes
    /// (which every chunk authenticates).
    pub fn read_from(input: &mut impl Read) -> Result<(StreamHeader, Vec<u8>), StreamError> {
        let mut fixed = [0u8; FIXED_HEADER_LEN];
        read_exact_or(input, &mut fixed, StreamError::BadHeader)?;
        if &fixed[..8] != STREAM_MAGIC || fixed[8] != STREAM_VERSION {
            return Err(StreamError::BadHeader);
        }
        let take16 = |at: usize| -> [u8; 16] {
            let mut b = [0u8; 16];
            b.copy_from_slice(&fixed[at..at + 16]);
            b
        };
        let chunk_size = u32::from_be_bytes([fixed[9], fixed[10], fixed[11], fixed[12]]);
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(StreamError::BadHeader);
        }
        let len = u16::from_be_bytes([fixed[61], fixed[62]]) as usize;
        if len == 0 || len > MAX_WRAPPED_KEY_LEN {
            return Err(StreamError::BadHeader);
        }
        let mut wrapped_key = vec![0u8; len];
        read_exact_or(input, &mut wrapped_key, StreamError::BadHeader)?;
        let header = StreamHeader {
            chunk_size,
            encryption_id: take16(13),
            version_id: take16(29),
            salt: take16(45),
            wrapped_key,
        };
        let bytes = header.encode();
        Ok((header, bytes))
    }
}

/// `read_exact`, with an early end reported as `eof`.
fn read_exact_or(
    input: &mut impl Read,
    buf: &mut [u8],
    eof: StreamError,
) -> Result<(), StreamError> {
    match input.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(eof),
        Err(e) => Err(StreamError::Io(e)),
    }
}

/// Reads until `buf` is full or the input ends; returns how much was read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The sealing state of one stream: its key, its header digest and the next
/// chunk's counter.
pub struct StreamCipher {
    key: LessSafeKey,
    aad: [u8; 32],
    counter: u64,
    chunk_size: usize,
}

impl std::fmt::Debug for StreamCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamCipher(<redacted>)")
    }
}

impl StreamCipher {
    /// The cipher of the stream whose header is `header_bytes`, under
    /// `data_key`.
    pub fn new(data_key: &DataKey, header: &StreamHeader, header_bytes: &[u8]) -> StreamCipher {
        // Infallible: 32 bytes is within HKDF-SHA256's bound and is
        // AES-256's key length.
        let mut okm = zeroize::Zeroizing::new([0u8; KEY_LEN]);
        #[allow(clippy::expect_used)]
        hkdf_sha256(
            &header.salt,
            data_key.expose(),
            &[b"keyward:stream:v1"],
            okm.as_mut(),
        )
        .expect("32 bytes is within HKDF-SHA256's bound");
        #[allow(clippy::expect_used)]
        let key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, okm.as_ref())
                .expect("a 32-byte key is valid for AES-256-GCM"),
        );
        StreamCipher {
            key,
            aad: sha256(header_bytes),
            counter: 0,
            chunk_size: header.chunk_size as usize,
        }
    }

    /// Plaintext bytes per chunk.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    fn nonce(&self, last: bool) -> Nonce {
        let mut n = [0u8; NONCE_LEN];
        n[3..11].copy_from_slice(&self.counter.to_be_bytes());
        n[11] = u8::from(last);
        Nonce::assume_unique_for_key(n)
    }

    /// Seals the next chunk in place (`buf` holds its plaintext, and gets
    /// the tag appended). Errors past 2^32 chunks.
    pub fn seal_chunk(&mut self, buf: &mut Vec<u8>, last: bool) -> Result<(), StreamError> {
        if self.counter >= MAX_CHUNKS || buf.len() > self.chunk_size {
            return Err(StreamError::Io(io::Error::other(
                "stream chunk out of bounds",
            )));
        }
        self.key
            .seal_in_place_append_tag(self.nonce(last), Aad::from(&self.aad), buf)
            .map_err(|_| StreamError::Io(io::Error::other("stream chunk out of bounds")))?;
        self.counter += 1;
        Ok(())
    }

    /// Opens the next chunk in place (`buf` holds it with its tag) and
    /// truncates it to the plaintext. On failure `buf` is cleared, so no
    /// unverified plaintext survives.
    pub fn open_chunk(&mut self, buf: &mut Vec<u8>, last: bool) -> Result<(), StreamError> {
        use zeroize::Zeroize;
        if self.counter >= MAX_CHUNKS
            || buf.len() < TAG_LEN
            || buf.len() > self.chunk_size + TAG_LEN
        {
            buf.zeroize();
            return Err(StreamError::Tampered);
        }
        // A chunk not flagged last must be full.
        if !last && buf.len() != self.chunk_size + TAG_LEN {
            buf.zeroize();
            return Err(StreamError::Tampered);
        }
        let nonce = self.nonce(last);
        match self.key.open_in_place(nonce, Aad::from(&self.aad), buf) {
            Ok(plain) => {
                let len = plain.len();
                buf.truncate(len);
                self.counter += 1;
                Ok(())
            }
            Err(_) => {
                buf.zeroize();
                Err(StreamError::Tampered)
            }
        }
    }
}

/// Encrypts all of `input` to `output` (the header first), one chunk in
/// memory at a time; returns the plaintext length.
pub fn encrypt_stream(
    data_key: &DataKey,
    header: &StreamHeader,
    input: &mut impl Read,
    output: &mut impl Write,
) -> Result<u64, StreamError> {
    let bytes = header.encode();
    output.write_all(&bytes)?;
    let mut cipher = StreamCipher::new(data_key, header, &bytes);
    let size = cipher.chunk_size();
    // Reads one chunk ahead, to know which chunk is the last.
    let mut current = SecretBytes::new(vec![0u8; size]);
    let mut next = SecretBytes::new(vec![0u8; size]);
    let mut have = read_full(input, current.vec_mut())?;
    let mut total = 0u64;
    let mut chunk = Vec::with_capacity(size + TAG_LEN);
    loop {
        let last = if have < size {
            true
        } else {
            let n = read_full(input, next.vec_mut())?;
            if n == 0 {
                true
            } else {
                chunk.clear();
                chunk.extend_from_slice(&current[..have]);
                cipher.seal_chunk(&mut chunk, false)?;
                output.write_all(&chunk)?;
                total += have as u64;
                std::mem::swap(&mut current, &mut next);
                have = n;
                continue;
            }
        };
        debug_assert!(last);
        chunk.clear();
        chunk.extend_from_slice(&current[..have]);
        cipher.seal_chunk(&mut chunk, true)?;
        output.write_all(&chunk)?;
        total += have as u64;
        output.flush()?;
        return Ok(total);
    }
}

/// Decrypts the chunks after a header already read (see
/// [`StreamHeader::read_from`]) to `output`. A chunk's plaintext is written
/// only after it verified; a stream that ends before its last chunk fails
/// with [`StreamError::Truncated`] once the input ends, and bytes after the
/// last chunk with [`StreamError::Tampered`]. Returns the plaintext length.
pub fn decrypt_chunks(
    cipher: &mut StreamCipher,
    input: &mut impl Read,
    output: &mut impl Write,
) -> Result<u64, StreamError> {
    let sealed = cipher.chunk_size() + TAG_LEN;
    let mut current = vec![0u8; sealed];
    let mut next = vec![0u8; sealed];
    let mut have = read_full(input, &mut current)?;
    let mut total = 0u64;
    loop {
        if have < sealed {
            // A short chunk can only be the last; none at all (the input
            // ended right after the header) is a stream cut short.
            if have == 0 {
                return Err(StreamError::Truncated);
            }
            current.truncate(have);
            cipher.open_chunk(&mut current, true)?;
            output.write_all(&current)?;
            total += current.len() as u64;
            zeroize::Zeroize::zeroize(&mut current);
            output.flush()?;
            return Ok(total);
        }
        next.resize(sealed, 0);
        let n = read_full(input, &mut next)?;
        let last = n == 0;
        match cipher.open_chunk(&mut current, last) {
            Ok(()) => {}
            // The input ended after a full chunk that is not the last: cut
            // at a chunk boundary (or that last chunk was changed).
            Err(StreamError::Tampered) if last => return Err(StreamError::Truncated),
            Err(e) => return Err(e),
        }
        output.write_all(&current)?;
        total += current.len() as u64;
        zeroize::Zeroize::zeroize(&mut current);
        if last {
            output.flush()?;
            return Ok(total);
        }
        std::mem::swap(&mut current, &mut next);
        have = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> DataKey {
        DataKey::from_slice(&[0x42; 32]).unwrap()
    }

    fn header(chunk: u32) -> StreamHeader {
        StreamHeader {
            chunk_size: chunk,
            encryption_id: [1; 16],
            version_id: [2; 16],
            salt: [3; 16],
            wrapped_key: vec![4; 77],
        }
    }

    fn seal(plain: &[u8], chunk: u32) -> Vec<u8> {
        let mut out = Vec::new();
        encrypt_stream(&key(), &header(chunk), &mut &plain[..], &mut out).unwrap();
        out
    }

    fn open(sealed: &[u8]) -> Result<Vec<u8>, StreamError> {
        let mut input = sealed;
        let (h, bytes) = StreamHeader::read_from(&mut input)?;
        let mut cipher = StreamCipher::new(&key(), &h, &bytes);
        let mut out = Vec::new();
        decrypt_chunks(&mut cipher, &mut input, &mut out)?;
        Ok(out)
    }

    fn plain(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    const HEADER_LEN: usize = FIXED_HEADER_LEN + 77;

    #[test]
    fn streams_of_every_shape_round_trip() {
        for n in [0, 1, 1023, 1024, 1025, 2048, 5000, 3 * 1024] {
            let p = plain(n);
            let s = seal(&p, 1024);
            let chunks = if n == 0 { 1 } else { n.div_ceil(1024) };
            assert_eq!(s.len(), HEADER_LEN + n + chunks * TAG_LEN, "{n}");
            assert_eq!(open(&s).unwrap(), p, "{n}");
        }
    }

    /// The chunks of a sealed stream, after its header.
    fn chunks(s: &[u8]) -> Vec<Vec<u8>> {
        s[HEADER_LEN..]
            .chunks(1024 + TAG_LEN)
            .map(<[u8]>::to_vec)
            .collect()
    }

    fn join(s: &[u8], chunks: &[Vec<u8>]) -> Vec<u8> {
        let mut out = s[..HEADER_LEN].to_vec();
        for c in chunks {
            out.extend_from_slice(c);
        }
        out
    }

    #[test]
    fn swapped_duplicated_dropped_truncated_or_extended_streams_are_refused() {
        let p = plain(4 * 1024 + 100);
        let s = seal(&p, 1024);
        let c = chunks(&s);
        assert_eq!(c.len(), 5);
        let mut swapped = c.clone();
        swapped.swap(1, 2);
        assert!(open(&join(&s, &swapped)).is_err());
        let mut duplicated = c.clone();
        duplicated.insert(2, c[1].clone());
        assert!(open(&join(&s, &duplicated)).is_err());
        let mut dropped = c.clone();
        dropped.remove(1);
        assert!(open(&join(&s, &dropped)).is_err());
        // Cut at every chunk boundary (and inside the header).
        for k in 0..c.len() {
            assert!(
                matches!(open(&join(&s, &c[..k])), Err(StreamError::Truncated)),
                "cut after {k} chunks"
            );
        }
        for cut in [0, 10, HEADER_LEN - 1, s.len() - 1, s.len() - TAG_LEN] {
            assert!(open(&s[..cut]).is_err(), "cut at {cut}");
        }
        // Extended: a chunk (any) or a byte after the last one.
        let mut extended = c.clone();
        extended.push(c[0].clone());
        assert!(open(&join(&s, &extended)).is_err());
        let mut one_more = s.clone();
        one_more.push(0);
        assert!(open(&one_more).is_err());
        // Another header: every chunk fails.
        let mut other = s.clone();
        other[20] ^= 1;
        assert!(open(&other).is_err());
        // A flipped bit anywhere in the payload.
        for at in [HEADER_LEN, HEADER_LEN + 1500, s.len() - 1] {
            let mut bad = s.clone();
            bad[at] ^= 0x80;
            assert!(open(&bad).is_err(), "bit at {at}");
        }
        // A stream whose last chunk is full, cut after it, is whole; a
        // full stream cut one chunk early is refused.
        let full = seal(&plain(2048), 1024);
        assert_eq!(open(&full).unwrap(), plain(2048));
        assert!(matches!(
            open(&full[..HEADER_LEN + 1024 + TAG_LEN]),
            Err(StreamError::Truncated)
        ));
    }

    #[test]
    fn a_failed_chunk_releases_no_plaintext() {
        let p = plain(3 * 1024);
        let s = seal(&p, 1024);
        let mut bad = s.clone();
        bad[HEADER_LEN + 1024 + TAG_LEN + 5] ^= 1; // chunk 1
        let mut input = &bad[..];
        let (h, bytes) = StreamHeader::read_from(&mut input).unwrap();
        let mut cipher = StreamCipher::new(&key(), &h, &bytes);
        let mut out = Vec::new();
        assert!(decrypt_chunks(&mut cipher, &mut input, &mut out).is_err());
        assert_eq!(out, p[..1024], "only chunk 0, which verified");
    }

    /// The checked-in known-answer stream (tests/known-answers/stream-v1.bin),
    /// made by this format's first version from the fixed key, header and
    /// plaintext above: a change that breaks old streams fails here.
    #[test]
    fn the_known_answer_stream_still_opens() {
        let kat = include_bytes!("../../tests/known-answers/stream-v1.bin");
        assert_eq!(open(kat).unwrap(), plain(2500));
        assert_eq!(
            seal(&plain(2500), 1024),
            kat.to_vec(),
            "sealing is deterministic given the header"
        );
    }
}
