//! Tar-split: what it takes to rebuild a layer's tar byte for byte from the
//! layer's directory, as Docker's `tar-split.json.gz` does.
//!
//! [`Splitter`] sits in the stream the driver unpacks, passing every byte
//! through unchanged while it parses tar headers itself: header blocks,
//! extension records and padding are kept verbatim, a regular file's
//! contents only as (name, size). [`assemble`] replays that record, reading
//! file contents from the unpacked directory, so `save` writes the very tar
//! whose digest is the layer's diffID. The core checks that digest again
//! while saving; a record is a hint, never trusted.

use crate::error::{Error, Result};
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

/// One piece of a tar stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Segment {
    /// Bytes kept as they were (headers, extension records, padding, trailer).
    Raw {
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// The contents of regular file `name`, `size` bytes long.
    File { name: String, size: u64 },
}

mod b64 {
    use base64::Engine as _;
    pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)
    }
}

enum State {
    /// Collecting a 512-byte header.
    Header,
    /// Inside an extension record (PAX or GNU long name) of this many bytes.
    Meta { left: u64, kind: u8, buf: Vec<u8> },
    /// Inside a regular file's contents, then `pad` bytes of padding.
    Payload { left: u64, pad: u64 },
    /// Padding up to the next 512-byte boundary.
    Pad { left: u64 },
    /// After the end-of-archive marker (or an unparsable header): raw to the end.
    Tail,
}

/// The record being built, shared with whoever reads it after the stream ends.
#[derive(Default)]
pub struct Record {
    segments: Vec<Segment>,
}

impl Record {
    fn raw(&mut self, b: &[u8]) {
        if b.is_empty() {
            return;
        }
        if let Some(Segment::Raw { data }) = self.segments.last_mut() {
            data.extend_from_slice(b);
        } else {
            self.segments.push(Segment::Raw { data: b.to_vec() });
        }
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The record as gzip-compressed JSON lines.
    pub fn encode(&self) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        for s in &self.segments {
            serde_json::to_writer(&mut gz, s).expect("serialisable");
            gz.write_all(b"\n").expect("in memory");
        }
        gz.finish().expect("in memory")
    }

    pub fn decode(bytes: &[u8]) -> Result<Record> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_string(&mut text)
            .map_err(|e| Error::Integrity(format!("tar-split record is corrupt: {e}")))?;
        let segments = text
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| Error::Integrity(format!("tar-split record is corrupt: {e}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Record { segments })
    }

    /// The length of the tar the record rebuilds.
    pub fn tar_len(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Raw { data } => data.len() as u64,
                Segment::File { size, .. } => *size,
            })
            .sum()
    }
}

/// Passes a tar stream through, recording its [`Segment`]s.
pub struct Splitter<R> {
    inner: R,
    state: State,
    header: Vec<u8>,
    /// A name set by a PAX `path` or GNU long-name record for the next entry.
    next_name: Option<String>,
    record: Arc<Mutex<Record>>,
}

impl<R: Read> Splitter<R> {
    pub fn new(inner: R) -> (Self, Arc<Mutex<Record>>) {
        let record = Arc::new(Mutex::new(Record::default()));
        (
            Splitter {
                inner,
                state: State::Header,
                header: Vec::with_capacity(512),
                next_name: None,
                record: record.clone(),
            },
            record,
        )
    }

    fn consume(&mut self, mut b: &[u8]) {
        let record = self.record.clone();
        let mut rec = record.lock().unwrap();
        while !b.is_empty() {
            let mut header_done = false;
            match &mut self.state {
                State::Tail => {
                    rec.raw(b);
                    return;
                }
                State::Header => {
                    let take = (512 - self.header.len()).min(b.len());
                    self.header.extend_from_slice(&b[..take]);
                    rec.raw(&b[..take]);
                    b = &b[take..];
                    header_done = self.header.len() == 512;
                }
                State::Meta { left, kind, buf } => {
                    let take = (*left as usize).min(b.len());
                    buf.extend_from_slice(&b[..take]);
                    rec.raw(&b[..take]);
                    b = &b[take..];
                    *left -= take as u64;
                    if *left == 0 {
                        let (kind, data) = (*kind, std::mem::take(buf));
                        self.next_name = extension_name(kind, &data).or(self.next_name.take());
                        let pad = pad_of(data.len() as u64);
                        self.state = if pad > 0 {
                            State::Pad { left: pad }
                        } else {
                            State::Header
                        };
                    }
                }
                State::Payload { left, pad } => {
                    let take = (*left as usize).min(b.len());
                    b = &b[take..];
                    *left -= take as u64;
                    if *left == 0 {
                        let pad = *pad;
                        self.state = if pad > 0 {
                            State::Pad { left: pad }
                        } else {
                            State::Header
                        };
                    }
                }
                State::Pad { left } => {
                    let take = (*left as usize).min(b.len());
                    rec.raw(&b[..take]);
                    b = &b[take..];
                    *left -= take as u64;
                    if *left == 0 {
                        self.state = State::Header;
                    }
                }
            }
            if header_done {
                let (state, file) = self.parse_header();
                if let Some(f) = file {
                    rec.segments.push(f);
                }
                self.state = state;
                self.header.clear();
            }
        }
    }

    /// Reads the header just collected and says what follows it.
    fn parse_header(&mut self) -> (State, Option<Segment>) {
        let h = &self.header;
        if h.iter().all(|b| *b == 0) {
            return (State::Tail, None);
        }
        let Some(size) = parse_size(&h[124..136]) else {
            return (State::Tail, None);
        };
        let typeflag = h[156];
        match typeflag {
            b'x' | b'g' | b'L' | b'K' => (
                State::Meta {
                    left: size,
                    kind: typeflag,
                    buf: Vec::new(),
                },
                None,
            ),
            b'0' | 0 | b'7' if size > 0 => {
                let name = self.next_name.take().unwrap_or_else(|| ustar_name(h));
                (
                    State::Payload {
                        left: size,
                        pad: pad_of(size),
                    },
                    Some(Segment::File { name, size }),
                )
            }
            _ => {
                self.next_name = None;
                let data = size + pad_of(size);
                // Other entries with data (rare) are kept verbatim.
                (
                    if data > 0 {
                        State::Pad { left: data }
                    } else {
                        State::Header
                    },
                    None,
                )
            }
        }
    }
}

impl<R: Read> Read for Splitter<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.consume(&buf[..n]);
        Ok(n)
    }
}

fn pad_of(size: u64) -> u64 {
    (512 - size % 512) % 512
}

/// A tar numeric field: octal, or base-256 when the high bit is set.
fn parse_size(f: &[u8]) -> Option<u64> {
    if f[0] & 0x80 != 0 {
        let mut v: u64 = u64::from(f[0] & 0x7f);
        for &b in &f[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let s: String = f
        .iter()
        .take_while(|b| **b != 0)
        .map(|b| *b as char)
        .collect::<String>()
        .trim()
        .to_string();
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(&s, 8).ok()
}

fn cstr(f: &[u8]) -> String {
    String::from_utf8_lossy(&f[..f.iter().position(|b| *b == 0).unwrap_or(f.len())]).into_owned()
}

fn ustar_name(h: &[u8]) -> String {
    let name = cstr(&h[0..100]);
    let is_ustar = &h[257..262] == b"ustar";
    let prefix = if is_ustar { cstr(&h[345..500]) } else { String::new() };
    if prefix.is_empty() {
        name
    } else {
        format!("{prefix}/{name}")
    }
}

fn extension_name(kind: u8, data: &[u8]) -> Option<String> {
    match kind {
        b'L' => Some(cstr(data)),
        b'x' => {
            // "<len> path=<value>\n" records.
            let mut rest = data;
            while !rest.is_empty() {
                let sp = rest.iter().position(|b| *b == b' ')?;
                let len: usize = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
                if len == 0 || len > rest.len() {
                    return None;
                }
                let rec = &rest[sp + 1..len];
                if let Some(v) = rec.strip_prefix(b"path=") {
                    return Some(String::from_utf8_lossy(v.strip_suffix(b"\n").unwrap_or(v)).into_owned());
                }
                rest = &rest[len..];
            }
            None
        }
        _ => None,
    }
}

/// Rebuilds the tar of a record, reading file contents through `open`
/// (which resolves a name inside the layer's directory).
pub fn assemble(
    record: &Record,
    mut open: impl FnMut(&str) -> io::Result<Box<dyn Read>>,
    out: &mut dyn Write,
) -> io::Result<()> {
    let mut buf = vec![0u8; 256 << 10];
    for s in &record.segments {
        match s {
            Segment::Raw { data } => out.write_all(data)?,
            Segment::File { name, size } => {
                let mut f = open(name)?.take(*size);
                let mut copied = 0u64;
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    out.write_all(&buf[..n])?;
                    copied += n as u64;
                }
                if copied != *size {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{name}: the layer's file is shorter than its tar entry"),
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(5);
        b.append_data(&mut h, "short", &b"hello"[..]).unwrap();
        let long = format!("{}/file", "d".repeat(150));
        let mut h = tar::Header::new_gnu();
        h.set_size(1000);
        b.append_data(&mut h, &long, &vec![7u8; 1000][..]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        b.append_data(&mut h, "dir/", io::empty()).unwrap();
        b.append_pax_extensions([("path", &b"pax/named/file"[..])]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(512);
        b.append_data(&mut h, "placeholder", &vec![1u8; 512][..]).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn records_and_rebuilds_byte_for_byte() {
        let tar = sample();
        let (mut s, rec) = Splitter::new(&tar[..]);
        let mut passed = Vec::new();
        // Odd read sizes cross every boundary.
        let mut buf = [0u8; 77];
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            passed.extend_from_slice(&buf[..n]);
        }
        assert_eq!(passed, tar);
        let rec = Record::decode(&rec.lock().unwrap().encode()).unwrap();
        let files: Vec<_> = rec
            .segments()
            .iter()
            .filter_map(|s| match s {
                Segment::File { name, size } => Some((name.clone(), *size)),
                _ => None,
            })
            .collect();
        assert_eq!(files[0], ("short".to_string(), 5));
        assert_eq!(files[1], (format!("{}/file", "d".repeat(150)), 1000));
        assert_eq!(files[2], ("pax/named/file".to_string(), 512));
        assert_eq!(rec.tar_len(), tar.len() as u64);
        let contents = |n: &str| -> io::Result<Box<dyn Read>> {
            Ok(Box::new(io::Cursor::new(match n {
                "short" => b"hello".to_vec(),
                "pax/named/file" => vec![1u8; 512],
                _ => vec![7u8; 1000],
            })))
        };
        let mut out = Vec::new();
        assemble(&rec, contents, &mut out).unwrap();
        assert_eq!(out, tar);
    }
}
