//! Gzip on every core, deterministically: what `push` compresses a layer
//! with when it has no original blob.
//!
//! The input is cut into fixed blocks, each compressed on its own (raw
//! deflate ending in a sync flush, no dictionary carried over) by a pool of
//! threads; the blocks are written in order inside one gzip member, with
//! the CRC-32 and length of the whole. The output depends only on the
//! input, the block size and the level — never on timing or the number of
//! threads — so an interrupted upload's bytes can be produced again and
//! skipped (see `push`). Hand-written rather than a crate's: gzp and
//! pigz-style encoders prime each block with the previous one's window,
//! which ties the output to their pipeline, and this is about 100 lines
//! over the zlib-rs backend the rest of gantry uses.

use flate2::{Compress, Compression, FlushCompress, Status};
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::mpsc;

/// Input per block: small enough that several are in flight per core with
/// little memory, large enough that the lost window costs little.
const BLOCK: usize = 256 << 10;

/// Compresses one block as raw deflate, ending byte-aligned (sync flush).
fn deflate_block(input: &[u8], level: u32) -> Vec<u8> {
    let mut c = Compress::new(Compression::new(level), false);
    let mut out = Vec::with_capacity(input.len() + input.len() / 64 + 64);
    loop {
        let consumed = c.total_in() as usize;
        let status = c
            .compress_vec(&input[consumed..], &mut out, FlushCompress::Sync)
            .expect("deflate of a buffer");
        let done = c.total_in() as usize == input.len() && out.len() < out.capacity();
        if done || status == Status::StreamEnd {
            return out;
        }
        out.reserve(out.capacity().max(4096));
    }
}

/// Writes the gzip of everything written to it into `out`, compressing
/// on `threads` threads. Call [`ParGz::finish`] at the end.
pub struct ParGz<'s, W: Write> {
    out: W,
    block: Vec<u8>,
    crc: crc32fast::Hasher,
    len: u64,
    next: u64,
    written: u64,
    jobs: Option<mpsc::SyncSender<(u64, Vec<u8>)>>,
    done: mpsc::Receiver<(u64, Vec<u8>)>,
    pending: BTreeMap<u64, Vec<u8>>,
    in_flight: usize,
    limit: usize,
    _scope: std::marker::PhantomData<&'s ()>,
}

impl<'s, W: Write> ParGz<'s, W> {
    /// Starts the workers inside `scope`.
    pub fn new<'e>(scope: &'s std::thread::Scope<'s, 'e>, out: W, level: u32, threads: usize) -> io::Result<Self> {
        let threads = threads.max(1);
        let (jobs, rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(threads);
        let (tx, done) = mpsc::channel();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        for _ in 0..threads {
            let (rx, tx) = (rx.clone(), tx.clone());
            scope.spawn(move || loop {
                let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                let Ok((i, data)) = job else { return };
                if tx.send((i, deflate_block(&data, level))).is_err() {
                    return;
                }
            });
        }
        let mut out = out;
        // No name, no time, OS unknown: the same header every time.
        out.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff])?;
        Ok(ParGz {
            out,
            block: Vec::with_capacity(BLOCK),
            crc: crc32fast::Hasher::new(),
            len: 0,
            next: 0,
            written: 0,
            jobs: Some(jobs),
            done,
            pending: BTreeMap::new(),
            in_flight: 0,
            limit: threads * 2 + 1,
            _scope: std::marker::PhantomData,
        })
    }

    /// Writes every finished block that is next in order; waits for one
    /// when `wait` (or while too many are in flight).
    fn drain(&mut self, wait: bool) -> io::Result<()> {
        loop {
            while let Some(b) = self.pending.remove(&self.written) {
                self.out.write_all(&b)?;
                self.written += 1;
            }
            let must = (wait && self.written < self.next) || self.in_flight >= self.limit;
            if !must {
                match self.done.try_recv() {
                    Ok((i, b)) => {
                        self.in_flight -= 1;
                        self.pending.insert(i, b);
                        continue;
                    }
                    Err(_) => return Ok(()),
                }
            }
            let (i, b) = self
                .done
                .recv()
                .map_err(|_| io::Error::other("a compression thread stopped"))?;
            self.in_flight -= 1;
            self.pending.insert(i, b);
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.block, Vec::with_capacity(BLOCK));
        self.jobs
            .as_ref()
            .expect("not finished")
            .send((self.next, data))
            .map_err(|_| io::Error::other("the compression threads stopped"))?;
        self.next += 1;
        self.in_flight += 1;
        self.drain(false)
    }

    /// Writes the last blocks, the end of the deflate stream and the gzip
    /// trailer; returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.submit()?;
        self.drain(true)?;
        self.jobs = None;
        // An empty final block (fixed Huffman), then CRC-32 and length.
        self.out.write_all(&[0x03, 0x00])?;
        let crc = std::mem::take(&mut self.crc).finalize();
        self.out.write_all(&crc.to_le_bytes())?;
        self.out.write_all(&(self.len as u32).to_le_bytes())?;
        self.out.flush()?;
        Ok(self.out)
    }
}

impl<W: Write> Write for ParGz<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(BLOCK - self.block.len());
        self.block.extend_from_slice(&buf[..n]);
        self.crc.update(&buf[..n]);
        self.len += n as u64;
        if self.block.len() == BLOCK {
            self.submit()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Compresses `input` whole (for tests and small callers).
pub fn compress(input: &[u8], level: u32, threads: usize) -> Vec<u8> {
    std::thread::scope(|s| {
        let mut z = ParGz::new(s, Vec::new(), level, threads).expect("writing to memory");
        z.write_all(input).expect("writing to memory");
        z.finish().expect("writing to memory")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample(len: usize) -> Vec<u8> {
        let mut x: u64 = 7;
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Half noise, half text: both kinds of block.
                if (i / 100_000) % 2 == 0 {
                    x as u8
                } else {
                    b"layer "[i % 6]
                }
            })
            .collect()
    }

    #[test]
    fn output_is_gzip_and_the_same_whatever_the_threads() {
        for len in [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17, 2_000_000] {
            let input = sample(len);
            let one = compress(&input, 1, 1);
            for threads in [2, 3, 8] {
                assert_eq!(compress(&input, 1, threads), one, "len {len}, {threads} threads");
            }
            let mut back = Vec::new();
            flate2::read::GzDecoder::new(&one[..]).read_to_end(&mut back).unwrap();
            assert_eq!(back, input, "len {len}");
            // Standard readers agree (MultiGzDecoder too: one member).
            let mut multi = Vec::new();
            flate2::read::MultiGzDecoder::new(&one[..])
                .read_to_end(&mut multi)
                .unwrap();
            assert_eq!(multi, input);
        }
    }
}
