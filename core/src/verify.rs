//! Streaming verification: readers that hash and count what passes through,
//! and the decompressors for layer blobs.
//!
//! The core computes every digest itself, on the bytes as they stream; a
//! digest a plugin or registry claims is only ever compared against these.

use crate::digest::Digest;
use crate::manifest::Compression;
use sha2::{Digest as _, Sha256};
use std::io::{self, BufRead, BufReader, Read};
use std::sync::{Arc, Mutex};

/// The running hash and byte count of a stream, readable after the stream
/// itself has been handed away.
#[derive(Default)]
pub struct HashState {
    inner: Mutex<(Sha256, u64)>,
}

impl HashState {
    pub fn finish(&self) -> (Digest, u64) {
        let g = self.inner.lock().unwrap();
        (Digest::from_hasher(g.0.clone()), g.1)
    }

    /// The bytes hashed so far.
    pub fn bytes(&self) -> u64 {
        self.inner.lock().unwrap().1
    }
}

/// Hashes and counts every byte read through it.
pub struct HashingReader<R> {
    inner: R,
    state: Arc<HashState>,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> (Self, Arc<HashState>) {
        let state = Arc::new(HashState::default());
        (
            HashingReader {
                inner,
                state: state.clone(),
            },
            state,
        )
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut g = self.state.inner.lock().unwrap();
        g.0.update(&buf[..n]);
        g.1 += n as u64;
        Ok(n)
    }
}

/// Fails a stream that yields more than `limit` bytes: a bound on what a
/// decompression bomb can write.
pub struct LimitedReader<R> {
    inner: R,
    left: u64,
    limit: u64,
    what: String,
}

impl<R: Read> LimitedReader<R> {
    pub fn new(inner: R, limit: u64, what: impl Into<String>) -> Self {
        LimitedReader {
            inner,
            left: limit,
            limit,
            what: what.into(),
        }
    }
}

impl<R: Read> Read for LimitedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                if self.limit.is_multiple_of(1 << 20) {
                    format!("{} exceeds the limit of {} MiB", self.what, self.limit >> 20)
                } else {
                    format!("{} exceeds the limit of {} bytes", self.what, self.limit)
                },
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Tells the compression of a blob from its first bytes (as Docker's
/// `DetectCompression` does); the media type is only a hint.
pub fn sniff(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// Wraps a blob reader in the decompressor its first bytes call for.
pub fn decompress<'r, R: Read + Send + 'r>(r: R) -> io::Result<Box<dyn Read + Send + 'r>> {
    // 64 KiB: the buffer is zeroed on its first fill (the reader has no
    // `read_buf`), which every small layer would pay for a bigger one.
    let mut r = BufReader::with_capacity(64 << 10, r);
    let head = r.fill_buf()?;
    // Docker also reads bzip2 and xz; named plainly rather than failing
    // later as a corrupt tar.
    for (magic, name) in [(&b"BZh"[..], "bzip2"), (&[0xfd, b'7', b'z', b'X', b'Z', 0][..], "xz")] {
        if head.starts_with(magic) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{name}-compressed layers are not supported (gzip, zstd or plain tar)"),
            ));
        }
    }
    Ok(match sniff(head) {
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(r)?),
        Compression::None => Box::new(r),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn hashes_what_passes_and_decompresses_by_magic() {
        let data = b"hello layer".repeat(1000);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).unwrap();
        let gz = gz.finish().unwrap();
        let zs = zstd::encode_all(&data[..], 3).unwrap();
        for blob in [gz, zs, data.clone()] {
            let (r, state) = HashingReader::new(decompress(io::Cursor::new(blob)).unwrap());
            let mut out = Vec::new();
            LimitedReader::new(r, 1 << 20, "layer").read_to_end(&mut out).unwrap();
            assert_eq!(out, data);
            assert_eq!(state.finish(), (Digest::of(&data), data.len() as u64));
        }
    }

    #[test]
    fn bzip2_and_xz_are_named() {
        for (blob, name) in [
            (&b"BZh91AY&SY"[..], "bzip2"),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0, 0][..], "xz"),
        ] {
            let err = decompress(io::Cursor::new(blob.to_vec())).err().unwrap();
            assert!(err.to_string().starts_with(name), "{err}");
        }
    }

    #[test]
    fn limit_stops_a_bomb() {
        let mut out = Vec::new();
        let err = LimitedReader::new(io::repeat(0).take(100), 10, "layer")
            .read_to_end(&mut out)
            .unwrap_err();
        assert_eq!(err.to_string(), "layer exceeds the limit of 10 bytes");
    }
}
