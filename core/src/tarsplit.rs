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
//!
//! Memory stays bounded whatever the input: the record is streamed as
//! gzip-compressed JSON lines into a file as the tar passes ([`RecordWriter`]),
//! raw bytes in pieces of at most [`RAW_PIECE`] (so gigabytes of trailing
//! data or padding are never held), extension records (PAX, GNU long names)
//! are refused above [`MAX_EXTENSION`] (Go's archive/tar limit), and a record
//! is read back one line at a time ([`RecordReader`]). Names are bytes: one
//! that is not UTF-8 is kept in `name_b64`.
//!
//! Every header is parsed once, into an [`EntryHeader`], as it passes; the
//! layer rules (`layer_rules`) judge it there, before the driver has seen
//! it, and [`replay_rules`] reads the same headers back from a stored
//! layer's record.

use crate::error::{Error, Result};
use std::io::{self, BufRead, Read, Write};
use std::sync::{Arc, Mutex};

/// The largest PAX or GNU long-name record accepted (as Go's archive/tar).
pub const MAX_EXTENSION: u64 = 1 << 20;
/// Raw bytes are recorded in pieces of at most this many.
pub const RAW_PIECE: usize = 64 << 10;
/// The longest line a record may have when read back.
const MAX_LINE: usize = 4 * RAW_PIECE;

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
    File {
        /// The name, when it is UTF-8 (lossy otherwise, for people).
        name: String,
        /// The exact name, when it is not UTF-8.
        #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_b64")]
        name_b64: Option<Vec<u8>>,
        size: u64,
    },
}

impl Segment {
    fn file(name: Vec<u8>, size: u64) -> Segment {
        match String::from_utf8(name) {
            Ok(name) => Segment::File {
                name,
                name_b64: None,
                size,
            },
            Err(e) => Segment::File {
                name: String::from_utf8_lossy(e.as_bytes()).into_owned(),
                name_b64: Some(e.into_bytes()),
                size,
            },
        }
    }

    /// The exact name of a `File` segment.
    pub fn name_bytes(&self) -> Option<&[u8]> {
        match self {
            Segment::File { name_b64: Some(b), .. } => Some(b),
            Segment::File { name, .. } => Some(name.as_bytes()),
            Segment::Raw { .. } => None,
        }
    }

    /// How many bytes of the tar this segment stands for.
    pub fn len(&self) -> u64 {
        match self {
            Segment::Raw { data } => data.len() as u64,
            Segment::File { size, .. } => *size,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
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

mod opt_b64 {
    pub fn serialize<S: serde::Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => super::b64::serialize(b, s),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        super::b64::deserialize(d).map(Some)
    }
}

/// Writes a record as gzip-compressed JSON lines while a tar passes.
pub struct RecordWriter {
    gz: Option<flate2::write::GzEncoder<Box<dyn Write + Send>>>,
    pending: Vec<u8>,
    tar_len: u64,
    /// Bytes of regular-file contents: what applying the tar writes.
    file_bytes: u64,
    error: Option<io::Error>,
}

impl RecordWriter {
    pub fn new(out: Box<dyn Write + Send>) -> RecordWriter {
        RecordWriter {
            gz: Some(flate2::write::GzEncoder::new(out, flate2::Compression::fast())),
            pending: Vec::new(),
            tar_len: 0,
            file_bytes: 0,
            error: None,
        }
    }

    /// A writer that keeps nothing.
    fn discard() -> RecordWriter {
        RecordWriter {
            gz: None,
            pending: Vec::new(),
            tar_len: 0,
            file_bytes: 0,
            error: None,
        }
    }

    fn emit(&mut self, s: &Segment) {
        if self.error.is_some() {
            return;
        }
        let Some(gz) = self.gz.as_mut() else { return };
        let r = serde_json::to_writer(&mut *gz, s)
            .map_err(io::Error::other)
            .and_then(|()| gz.write_all(b"\n"));
        if let Err(e) = r {
            self.error = Some(e);
        }
    }

    fn flush_raw(&mut self) {
        if !self.pending.is_empty() {
            let data = std::mem::take(&mut self.pending);
            self.emit(&Segment::Raw { data });
        }
    }

    fn raw(&mut self, mut b: &[u8]) {
        self.tar_len += b.len() as u64;
        if self.gz.is_none() {
            return;
        }
        while !b.is_empty() {
            let take = (RAW_PIECE - self.pending.len()).min(b.len());
            self.pending.extend_from_slice(&b[..take]);
            b = &b[take..];
            if self.pending.len() == RAW_PIECE {
                self.flush_raw();
            }
        }
    }

    fn file(&mut self, name: Vec<u8>, size: u64) {
        self.flush_raw();
        self.tar_len += size;
        // A whiteout's contents (normally none) are never written.
        let base = name.rsplit(|b| *b == b'/').next().unwrap_or(&name);
        if !base.starts_with(b".wh.") {
            self.file_bytes += size;
        }
        self.emit(&Segment::file(name, size));
    }

    /// The bytes of regular-file contents seen so far (a layer's size, as
    /// Docker counts it).
    pub fn file_bytes(&self) -> u64 {
        self.file_bytes
    }

    /// Ends the record; returns the length of the tar it rebuilds.
    pub fn finish(&mut self) -> io::Result<u64> {
        self.flush_raw();
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if let Some(gz) = self.gz.take() {
            gz.finish()?.flush()?;
        }
        Ok(self.tar_len)
    }
}

/// Reads a record back, one segment at a time.
pub struct RecordReader<R: Read> {
    lines: io::BufReader<flate2::read::GzDecoder<R>>,
    line: Vec<u8>,
}

fn corrupt(e: impl std::fmt::Display) -> Error {
    Error::Integrity(format!("tar-split record is corrupt: {e}"))
}

impl<R: Read> RecordReader<R> {
    pub fn new(r: R) -> RecordReader<R> {
        RecordReader {
            lines: io::BufReader::new(flate2::read::GzDecoder::new(r)),
            line: Vec::new(),
        }
    }

    /// The next segment, or `None` at the end.
    pub fn next_segment(&mut self) -> Result<Option<Segment>> {
        loop {
            self.line.clear();
            let n = (&mut self.lines)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut self.line)
                .map_err(corrupt)?;
            if n == 0 {
                return Ok(None);
            }
            if self.line.len() > MAX_LINE {
                return Err(corrupt("a line is too long"));
            }
            let text = self.line.trim_ascii();
            if text.is_empty() {
                continue;
            }
            return serde_json::from_slice(text).map(Some).map_err(corrupt);
        }
    }

    /// The length of the tar the record rebuilds (reads it to the end).
    pub fn tar_len(mut self) -> Result<u64> {
        let mut n = 0u64;
        while let Some(s) = self.next_segment()? {
            n += s.len();
        }
        Ok(n)
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

/// One tar entry as the core reads its header, with the extension records
/// before it applied the way the `tar` crate (the unpacker) applies them:
/// a GNU long name or link first, then PAX `path` and `linkpath`, then the
/// header's own fields (a ustar prefix only in a ustar header); PAX `size`,
/// `uid`, `gid` and `mtime` over the header's numbers. The layer rules judge
/// this, and the unpacker refuses an entry whose `tar` crate reading differs
/// from it (`host/src/confined/unpack.rs`), so it is the one view of an entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryHeader {
    /// The name, exact bytes.
    pub name: Vec<u8>,
    /// The link target of a hard or symbolic link.
    pub link: Option<Vec<u8>>,
    /// The type flag (`b'0'` a file, `b'2'` a symbolic link, …).
    pub kind: u8,
    /// The size of the data after the header (a PAX `size` record's when
    /// there is one, which a ustar field of 11 octal digits cannot exceed
    /// 8 GiB).
    pub size: u64,
    /// Device major and minor (0/0 where the header has none).
    pub dev: (u64, u64),
    /// Permission bits with set-id and sticky (`0o7777` of the mode field).
    pub mode: u32,
    /// Owner and group ids.
    pub uid: u64,
    pub gid: u64,
    /// Modification time, whole seconds since the epoch.
    pub mtime: u64,
    /// `SCHILY.xattr.*` records: attribute name (after the prefix) and value.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Extension records waiting for the entry they describe.
#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.long_name.is_none() && self.long_link.is_none() && self.pax.is_none()
    }

    /// The entry the header block `h` describes, taking what was pending.
    /// A PAX record the core cannot read, or one that would make the entry
    /// something the unpacker cannot be trusted to read the same way (a
    /// GNU sparse map, a NUL in a name, a key twice), refuses the layer.
    fn entry(&mut self, h: &[u8]) -> io::Result<EntryHeader> {
        let Pending {
            long_name,
            long_link,
            pax,
        } = std::mem::take(self);
        let kind = h[156];
        let field = |range: std::ops::Range<usize>, what: &str| {
            parse_numeric(&h[range]).ok_or_else(|| bad_header(h, &format!("its {what} field is not a number")))
        };
        let mut e = EntryHeader {
            name: Vec::new(),
            link: None,
            kind,
            size: field(124..136, "size")?,
            dev: (0, 0),
            mode: (parse_numeric(&h[100..108]).unwrap_or(0) & 0o7777) as u32,
            uid: field(108..116, "uid")?,
            gid: field(116..124, "gid")?,
            mtime: field(136..148, "mtime")?,
            xattrs: Vec::new(),
        };
        if is_ustar(h) || is_gnu(h) {
            e.dev = (
                parse_numeric(&h[329..337]).unwrap_or(0),
                parse_numeric(&h[337..345]).unwrap_or(0),
            );
        }
        let (mut pax_path, mut pax_link) = (None, None);
        if let Some(pax) = &pax {
            let records = pax_records(pax).map_err(|why| bad_header(h, &why))?;
            for (key, value) in records {
                let number = || -> io::Result<u64> {
                    decimal(value).ok_or_else(|| {
                        bad_header(
                            h,
                            &format!("its PAX {} record is not a number", String::from_utf8_lossy(key)),
                        )
                    })
                };
                match key {
                    b"path" | b"linkpath" if value.contains(&0) => {
                        return Err(bad_header(h, "a PAX name holds a NUL byte"))
                    }
                    b"path" => pax_path = Some(value.to_vec()),
                    b"linkpath" => pax_link = Some(value.to_vec()),
                    // The tar crate applies none of these to a global header.
                    _ if kind == b'g' => {}
                    b"size" => e.size = number()?,
                    b"uid" => e.uid = number()?,
                    b"gid" => e.gid = number()?,
                    b"mtime" => {
                        e.mtime = pax_time(value).ok_or_else(|| bad_header(h, "its PAX mtime record is not a time"))?
                    }
                    _ if key.starts_with(b"GNU.sparse.") => {
                        return Err(bad_header(h, "it is a GNU sparse file, which gantry does not unpack"))
                    }
                    _ => {
                        if let Some(attr) = key.strip_prefix(b"SCHILY.xattr.") {
                            e.xattrs.push((attr.to_vec(), value.to_vec()));
                        }
                    }
                }
            }
        }
        e.name = long_name
            .map(strip_one_nul)
            .or(pax_path)
            .unwrap_or_else(|| header_name(h));
        e.link = long_link.map(strip_one_nul).or(pax_link).or_else(|| {
            let l = cstr(&h[157..257]);
            (!l.is_empty()).then(|| l.to_vec())
        });
        if kind == b'S' {
            return Err(bad_header(h, "it is a GNU sparse file, which gantry does not unpack"));
        }
        Ok(e)
    }
}

/// A refused header: one line naming the entry (as the header spells it).
fn bad_header(h: &[u8], why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("tar entry {}: {why}", crate::text::quote_bytes(&header_name(h))),
    )
}

/// What a walk does with each entry's header.
type OnEntry<'a> = &'a mut dyn FnMut(&EntryHeader) -> io::Result<()>;

/// Reads tar headers from a stream that passes in pieces of any size.
struct Walker {
    state: State,
    header: Vec<u8>,
    pending: Pending,
}

impl Walker {
    fn new() -> Walker {
        Walker {
            state: State::Header,
            header: Vec::with_capacity(512),
            pending: Pending::default(),
        }
    }

    fn feed(&mut self, mut b: &[u8], rec: &mut RecordWriter, on_entry: OnEntry<'_>) -> io::Result<()> {
        while !b.is_empty() {
            let mut header_done = false;
            match &mut self.state {
                State::Tail => {
                    rec.raw(b);
                    return Ok(());
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
                        let pad = pad_of(data.len() as u64);
                        match kind {
                            b'L' => self.pending.long_name = Some(data),
                            b'K' => self.pending.long_link = Some(data),
                            b'x' => self.pending.pax = Some(data),
                            _ => {}
                        }
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
                self.state = self.parse_header(rec, on_entry)?;
                self.header.clear();
            }
        }
        Ok(())
    }

    /// Passes over `n` bytes of a regular file's contents (a record's
    /// `File` segment, replayed).
    fn skip_file(&mut self, n: u64) -> io::Result<()> {
        match &mut self.state {
            State::Payload { left, pad } if *left == n => {
                self.state = if *pad > 0 {
                    State::Pad { left: *pad }
                } else {
                    State::Header
                };
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a file segment where the tar has no file",
            )),
        }
    }

    /// Reads the header just collected and says what follows it.
    fn parse_header(&mut self, rec: &mut RecordWriter, on_entry: OnEntry<'_>) -> io::Result<State> {
        let h = &self.header;
        if h.iter().all(|b| *b == 0) {
            // The end (the tar crate stops at the first zero block too).
            if !self.pending.is_empty() {
                return Err(bad_header(h, "extension records describe an entry that never comes"));
            }
            return Ok(State::Tail);
        }
        // As the tar crate checks it: a header that fails is refused, never
        // skipped, so the two readers cannot fall out of step.
        let sum: u64 = h[..148].iter().chain(&h[156..]).map(|b| u64::from(*b)).sum::<u64>() + 8 * 32;
        if parse_numeric(&h[148..156]) != Some(sum) {
            return Err(bad_header(h, "its header checksum is wrong"));
        }
        let typeflag = h[156];
        if matches!(typeflag, b'x' | b'g' | b'L' | b'K') {
            let size = parse_numeric(&h[124..136]).ok_or_else(|| bad_header(h, "its size field is not a number"))?;
            if size > MAX_EXTENSION {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a tar extension record of {size} bytes is larger than the limit of {MAX_EXTENSION}"),
                ));
            }
            if typeflag != b'g' {
                // The tar crate reads these as extensions only in a ustar
                // or GNU header, and refuses two of a kind for one entry.
                if !(is_ustar(h) || is_gnu(h)) {
                    return Err(bad_header(h, "an extension record in a pre-POSIX header"));
                }
                let twice = match typeflag {
                    b'x' => self.pending.pax.is_some(),
                    b'L' => self.pending.long_name.is_some(),
                    _ => self.pending.long_link.is_some(),
                };
                if twice {
                    return Err(bad_header(h, "two extension records of one kind for one entry"));
                }
                return Ok(State::Meta {
                    left: size,
                    kind: typeflag,
                    buf: Vec::new(),
                });
            }
        }
        // An entry (a global PAX header is one to the unpacker too, and
        // takes what was pending).
        let entry = self.pending.entry(h)?;
        on_entry(&entry)?;
        let size = entry.size;
        Ok(match typeflag {
            b'g' => State::Meta {
                left: size,
                kind: typeflag,
                buf: Vec::new(),
            },
            b'0' | 0 | b'7' if size > 0 => {
                rec.file(entry.name, size);
                State::Payload {
                    left: size,
                    pad: pad_of(size),
                }
            }
            _ => {
                let data = size + pad_of(size);
                // Other entries with data (rare) are kept verbatim.
                if data > 0 {
                    State::Pad { left: data }
                } else {
                    State::Header
                }
            }
        })
    }
}

/// Passes a tar stream through, recording its [`Segment`]s and, when it
/// has [`LayerRules`](crate::layer_rules::LayerRules), refusing an entry
/// that breaks them before a byte of its header has passed.
pub struct Splitter<R> {
    inner: R,
    walker: Walker,
    /// Where segments go; `None` for a guard that only checks the stream.
    record: Option<Arc<Mutex<RecordWriter>>>,
    /// The layer stack's rules, judging each entry.
    rules: Option<Arc<Mutex<crate::layer_rules::LayerRules>>>,
}

impl<R: Read> Splitter<R> {
    pub fn new(inner: R, record: RecordWriter) -> (Self, Arc<Mutex<RecordWriter>>) {
        let record = Arc::new(Mutex::new(record));
        (
            Splitter {
                inner,
                walker: Walker::new(),
                record: Some(record.clone()),
                rules: None,
            },
            record,
        )
    }

    /// A pass-through that records nothing and only enforces the limits
    /// (extension records): for tars parsed elsewhere, such as archives.
    pub fn guard(inner: R) -> Self {
        Splitter {
            inner,
            walker: Walker::new(),
            record: None,
            rules: None,
        }
    }

    /// Judges every entry by `rules` (a layer stack's, at the start of
    /// this layer); a refusal is an `InvalidData` error whose inner error
    /// is the [`Refusal`](crate::layer_rules::Refusal).
    pub fn with_rules(mut self, rules: Arc<Mutex<crate::layer_rules::LayerRules>>) -> Self {
        rules.lock().unwrap().begin_layer();
        self.rules = Some(rules);
        self
    }

    fn consume(&mut self, b: &[u8]) -> io::Result<()> {
        let rules = self.rules.clone();
        let mut judge = |h: &EntryHeader| -> io::Result<()> {
            match &rules {
                Some(r) => r
                    .lock()
                    .unwrap()
                    .check(h)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
                None => Ok(()),
            }
        };
        match self.record.clone() {
            Some(record) => self.walker.feed(b, &mut record.lock().unwrap(), &mut judge),
            None => self.walker.feed(b, &mut RecordWriter::discard(), &mut judge),
        }
    }
}

/// The core's reading of a tar stream, for an unpacker that parses the same
/// stream with another reader: every byte passes through unchanged, and
/// each entry's [`EntryHeader`] is queued as its header passes, so when the
/// other reader yields entry N the core's N is at the front of the queue.
/// A header the core refuses fails the read, before its bytes pass on.
///
/// The queue holds only the headers between what the tap has passed and
/// what the unpacker has taken: at most one per 512 bytes of the
/// unpacker's read-ahead buffer.
pub struct HeaderTap<R> {
    inner: R,
    walker: Walker,
    queue: HeaderQueue,
}

/// The headers a [`HeaderTap`] has read and the unpacker not yet taken.
#[derive(Clone, Default)]
pub struct HeaderQueue(std::rc::Rc<std::cell::RefCell<std::collections::VecDeque<EntryHeader>>>);

impl HeaderQueue {
    /// The oldest header not yet taken.
    pub fn pop(&self) -> Option<EntryHeader> {
        self.0.borrow_mut().pop_front()
    }

    /// How many headers wait.
    pub fn len(&self) -> usize {
        self.0.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<R: Read> HeaderTap<R> {
    pub fn new(inner: R) -> (Self, HeaderQueue) {
        let queue = HeaderQueue::default();
        (
            HeaderTap {
                inner,
                walker: Walker::new(),
                queue: queue.clone(),
            },
            queue,
        )
    }
}

impl<R: Read> Read for HeaderTap<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let queue = &self.queue;
        self.walker
            .feed(&buf[..n], &mut RecordWriter::discard(), &mut |h: &EntryHeader| {
                queue.0.borrow_mut().push_back(h.clone());
                Ok(())
            })?;
        Ok(n)
    }
}

/// Replays the tar-split record of a stored layer into `rules` (which
/// refuse nothing here: the layer is already in the store).
pub fn replay_rules<R: Read>(record: RecordReader<R>, rules: &mut crate::layer_rules::LayerRules) -> Result<()> {
    rules.begin_layer();
    each_header(record, |h| {
        rules.replay(h);
        Ok(())
    })
}

/// Hands each entry's header of a tar-split record to `on_entry`, in order.
pub fn each_header<R: Read>(
    mut record: RecordReader<R>,
    mut on_entry: impl FnMut(&EntryHeader) -> io::Result<()>,
) -> Result<()> {
    let mut walker = Walker::new();
    let mut sink = RecordWriter::discard();
    while let Some(s) = record.next_segment()? {
        match &s {
            Segment::Raw { data } => walker.feed(data, &mut sink, &mut on_entry),
            Segment::File { size, .. } => walker.skip_file(*size),
        }
        .map_err(corrupt)?;
    }
    Ok(())
}

impl<R: Read> Read for Splitter<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.consume(&buf[..n])?;
        Ok(n)
    }
}

fn pad_of(size: u64) -> u64 {
    (512 - size % 512) % 512
}

/// A tar numeric field: octal up to the first NUL, spaces trimmed, or
/// base-256 when the high bit is set (GNU, and Go for values octal cannot
/// hold), read exactly as the `tar` crate reads it; `None` for a value it
/// would read differently (a negative or over 64 bits).
fn parse_numeric(f: &[u8]) -> Option<u64> {
    if f[0] & 0x80 != 0 {
        let mut v: u64 = u64::from(f[0] & 0x7f);
        for &b in &f[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let s = std::str::from_utf8(cstr(f)).ok()?.trim();
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

/// A PAX decimal number: ASCII digits only.
fn decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// A PAX time, `seconds[.fraction]`: the whole seconds (the unpacker sets
/// no finer time than the header's). A time before the epoch is refused.
fn pax_time(v: &[u8]) -> Option<u64> {
    let (secs, frac) = match v.iter().position(|b| *b == b'.') {
        Some(i) => (&v[..i], &v[i + 1..]),
        None => (v, &[][..]),
    };
    if !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    decimal(secs)
}

/// A PAX record: key and value.
type PaxRecord<'a> = (&'a [u8], &'a [u8]);

/// The records of a PAX extended header, `"<len> <key>=<value>\n"` each,
/// read strictly: a length that does not match, a missing `=` or newline,
/// a newline inside a value (the tar crate splits records at newlines), a
/// key that is not UTF-8 or comes twice are refused, so no reader can take
/// a record this one did not.
fn pax_records(data: &[u8]) -> std::result::Result<Vec<PaxRecord<'_>>, String> {
    let mut out: Vec<PaxRecord<'_>> = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let bad = |why: &str| format!("its PAX header is malformed ({why})");
        let sp = rest.iter().position(|b| *b == b' ').ok_or_else(|| bad("no length"))?;
        let len = decimal(&rest[..sp]).ok_or_else(|| bad("a length is not a number"))?;
        if len > rest.len() as u64 || (len as usize) < sp + 3 {
            return Err(bad("a record's length is wrong"));
        }
        let rec = &rest[sp + 1..len as usize];
        let Some(rec) = rec.strip_suffix(b"\n") else {
            return Err(bad("a record does not end with a newline"));
        };
        let eq = rec
            .iter()
            .position(|b| *b == b'=')
            .ok_or_else(|| bad("a record has no '='"))?;
        let (key, value) = (&rec[..eq], &rec[eq + 1..]);
        if key.is_empty() || std::str::from_utf8(key).is_err() {
            return Err(bad("a key is empty or not UTF-8"));
        }
        if value.contains(&b'\n') {
            return Err(bad("a value holds a newline"));
        }
        if out.iter().any(|(k, _)| *k == key) {
            return Err(format!("its PAX header gives {} twice", crate::text::quote_bytes(key)));
        }
        out.push((key, value));
        rest = &rest[len as usize..];
    }
    Ok(out)
}

fn cstr(f: &[u8]) -> &[u8] {
    &f[..f.iter().position(|b| *b == 0).unwrap_or(f.len())]
}

/// A GNU long name or link: its bytes, less one trailing NUL.
fn strip_one_nul(mut v: Vec<u8>) -> Vec<u8> {
    if v.last() == Some(&0) {
        v.pop();
    }
    v
}

fn is_ustar(h: &[u8]) -> bool {
    &h[257..263] == b"ustar\0" && &h[263..265] == b"00"
}

fn is_gnu(h: &[u8]) -> bool {
    &h[257..263] == b"ustar " && &h[263..265] == b" \0"
}

/// The name in a header block: `prefix/name` in a ustar header, else the
/// name field alone (a GNU header keeps times where ustar has its prefix).
fn header_name(h: &[u8]) -> Vec<u8> {
    let name = cstr(&h[0..100]);
    let prefix = if is_ustar(h) { cstr(&h[345..500]) } else { &[][..] };
    if prefix.is_empty() {
        name.to_vec()
    } else {
        [prefix, b"/", name].concat()
    }
}

/// Rebuilds the tar of a record, reading file contents through `open`
/// (which resolves a name, as bytes, inside the layer's directory).
pub fn assemble<R: Read>(
    mut record: RecordReader<R>,
    mut open: impl FnMut(&[u8]) -> io::Result<Box<dyn Read>>,
    out: &mut dyn Write,
) -> io::Result<()> {
    let mut buf = vec![0u8; 256 << 10];
    let bad = |e: Error| io::Error::new(io::ErrorKind::InvalidData, e.to_string());
    while let Some(s) = record.next_segment().map_err(bad)? {
        match &s {
            Segment::Raw { data } => out.write_all(data)?,
            Segment::File { size, .. } => {
                let name = s.name_bytes().expect("a file segment");
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
                        format!(
                            "{}: the layer's file is shorter than its tar entry",
                            crate::text::quote_bytes(name)
                        ),
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
        b.append_pax_extensions([("path", &b"bytes/\xff\xfe"[..])]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(3);
        b.append_data(&mut h, "placeholder2", &b"raw"[..]).unwrap();
        b.into_inner().unwrap()
    }

    /// A `Write` into memory that the test can read after the writer is gone.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn split(tar: &[u8]) -> (Vec<u8>, io::Result<u64>, Vec<u8>) {
        let out = Shared::default();
        let (mut s, rec) = Splitter::new(tar, RecordWriter::new(Box::new(out.clone())));
        let mut passed = Vec::new();
        // Odd read sizes cross every boundary.
        let mut buf = [0u8; 77];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => passed.extend_from_slice(&buf[..n]),
                Err(e) => return (passed, Err(e), Vec::new()),
            }
        }
        let len = rec.lock().unwrap().finish();
        let bytes = out.0.lock().unwrap().clone();
        (passed, len, bytes)
    }

    #[test]
    fn records_and_rebuilds_byte_for_byte() {
        let tar = sample();
        let (passed, len, record) = split(&tar);
        assert_eq!(passed, tar);
        assert_eq!(len.unwrap(), tar.len() as u64);
        let mut r = RecordReader::new(&record[..]);
        let mut files = Vec::new();
        while let Some(s) = r.next_segment().unwrap() {
            if let Segment::File { size, .. } = &s {
                files.push((s.name_bytes().unwrap().to_vec(), *size));
            }
        }
        assert_eq!(files[0], (b"short".to_vec(), 5));
        assert_eq!(files[1], (format!("{}/file", "d".repeat(150)).into_bytes(), 1000));
        assert_eq!(files[2], (b"pax/named/file".to_vec(), 512));
        assert_eq!(files[3], (b"bytes/\xff\xfe".to_vec(), 3));
        assert_eq!(RecordReader::new(&record[..]).tar_len().unwrap(), tar.len() as u64);
        let contents = |n: &[u8]| -> io::Result<Box<dyn Read>> {
            Ok(Box::new(io::Cursor::new(match n {
                b"short" => b"hello".to_vec(),
                b"pax/named/file" => vec![1u8; 512],
                b"bytes/\xff\xfe" => b"raw".to_vec(),
                _ => vec![7u8; 1000],
            })))
        };
        let mut out = Vec::new();
        assemble(RecordReader::new(&record[..]), contents, &mut out).unwrap();
        assert_eq!(out, tar);
    }

    #[test]
    fn trailing_data_is_streamed_not_held() {
        // A valid tar, then 64 MiB of zeros: the record compresses them as it
        // goes, in bounded pieces, and rebuilds them exactly.
        let mut tar = sample();
        tar.extend(std::iter::repeat_n(0u8, 64 << 20));
        let (passed, len, record) = split(&tar);
        assert_eq!(passed.len(), tar.len());
        assert_eq!(len.unwrap(), tar.len() as u64);
        assert!(record.len() < 1 << 20, "the record is {} bytes", record.len());
        let mut r = RecordReader::new(&record[..]);
        while let Some(s) = r.next_segment().unwrap() {
            assert!(s.len() <= RAW_PIECE as u64 || matches!(s, Segment::File { .. }));
        }
    }

    /// The names the core judges are the names the `tar` crate (the
    /// unpacker) reads: a GNU long name before a PAX path, a PAX path
    /// before the header's, a ustar prefix only in a ustar header.
    #[test]
    fn entry_headers_name_what_the_unpacker_reads() {
        let mut b = tar::Builder::new(Vec::new());
        // A GNU header whose prefix area holds bytes (GNU keeps times there).
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.as_mut_bytes()[345..350].copy_from_slice(b"junk!");
        h.as_old_mut().name[..5].copy_from_slice(b"plain");
        h.set_cksum();
        b.append(&h, io::empty()).unwrap();
        // A PAX linkpath for a symbolic link.
        b.append_pax_extensions([("linkpath", &b"pax/target"[..])]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.as_old_mut().name[..4].copy_from_slice(b"link");
        h.set_cksum();
        b.append(&h, io::empty()).unwrap();
        // A GNU long name and a PAX path for one entry: the long name wins.
        b.get_mut().extend(gnu_longname(b"from/long-name"));
        b.append_pax_extensions([("path", &b"from/pax"[..])]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.as_old_mut().name[..6].copy_from_slice(b"header");
        h.set_cksum();
        b.append(&h, io::empty()).unwrap();
        let bytes = b.into_inner().unwrap();

        let mut ours = Vec::new();
        let mut w = Walker::new();
        w.feed(&bytes, &mut RecordWriter::discard(), &mut |h: &EntryHeader| {
            ours.push((h.name.clone(), h.link.clone()));
            Ok(())
        })
        .unwrap();
        let mut theirs = Vec::new();
        for e in tar::Archive::new(&bytes[..]).entries().unwrap() {
            let e = e.unwrap();
            theirs.push((e.path_bytes().into_owned(), e.link_name_bytes().map(|l| l.into_owned())));
        }
        assert_eq!(ours, theirs);
        assert_eq!(ours[0].0, b"plain");
        assert_eq!(ours[1].1.as_deref(), Some(&b"pax/target"[..]));
        assert_eq!(ours[2].0, b"from/long-name");
    }

    /// A GNU long-name record for `name`.
    fn gnu_longname(name: &[u8]) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_size(name.len() as u64 + 1);
        h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(name);
        out.push(0);
        out.resize(out.len().div_ceil(512) * 512, 0);
        out
    }

    /// A stored layer's record gives back the rules its tar made: a link it
    /// planted refuses a write through it in the next layer.
    #[test]
    fn a_record_replays_the_rules_of_its_layer() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        b.append_data(&mut h, "big/file", &b"abc"[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "lnk", "big").unwrap();
        let tar = b.into_inner().unwrap();
        let (_, _, record) = split(&tar);
        let mut rules = crate::layer_rules::LayerRules::new();
        replay_rules(RecordReader::new(&record[..]), &mut rules).unwrap();
        assert_eq!(rules.links(), 1);
        let rules = Arc::new(Mutex::new(rules));
        let mut next = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        next.append_data(&mut h, "lnk/evil", &b"e"[..]).unwrap();
        let next = next.into_inner().unwrap();
        let mut s = Splitter::guard(&next[..]).with_rules(rules);
        let e = io::copy(&mut s, &mut io::sink()).unwrap_err();
        assert!(e.to_string().contains("passes through a link"), "{e}");
    }

    /// One PAX record.
    fn rec(key: &str, value: &[u8]) -> Vec<u8> {
        let mut len = key.len() + value.len() + 3;
        while len.to_string().len() + key.len() + value.len() + 3 != len {
            len += 1;
        }
        [format!("{len} {key}=").as_bytes(), value, b"\n"].concat()
    }

    /// A raw header block (checksum set), owner and time 0.
    fn hdr(name: &str, kind: u8, size: u64, f: impl FnOnce(&mut tar::Header)) -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_size(size);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        f(&mut h);
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn padded(mut v: Vec<u8>) -> Vec<u8> {
        v.resize(v.len().div_ceil(512) * 512, 0);
        v
    }

    fn pax_block(records: &[Vec<u8>]) -> Vec<u8> {
        let data = records.concat();
        padded([hdr("PaxHeaders/x", b'x', data.len() as u64, |_| {}), data].concat())
    }

    fn walk(tar: &[u8]) -> io::Result<Vec<EntryHeader>> {
        let mut out = Vec::new();
        Walker::new().feed(tar, &mut RecordWriter::discard(), &mut |h: &EntryHeader| {
            out.push(h.clone());
            Ok(())
        })?;
        Ok(out)
    }

    /// Every PAX record that changes what an entry is, and base-256
    /// numbers, read as the `tar` crate reads them (and mtime, which it
    /// does not read, as Go does).
    #[test]
    fn pax_records_and_base_256_numbers_are_honoured() {
        let big = (8u64 << 30) + (1 << 20);
        let mut tar = pax_block(&[
            rec("path", b"pax/long/name"),
            rec("size", b"3"),
            rec("uid", b"3000000000"),
            rec("gid", b"42"),
            rec("mtime", b"1700000000.123456789"),
            rec("SCHILY.xattr.user.k", b"v\x00\xff"),
            rec("atime", b"1.5"),
        ]);
        tar.extend(hdr("header/name", b'0', 512, |_| {}));
        tar.extend(padded(b"abc".to_vec()));
        tar.extend(pax_block(&[rec("linkpath", b"pax/long/name")]));
        tar.extend(hdr("hard", b'1', 0, |h| h.set_link_name("wrong").unwrap()));
        let mut gnu = tar::Header::new_gnu();
        gnu.set_path("gnu/big").unwrap();
        gnu.set_size(big);
        gnu.set_uid(1 << 40);
        gnu.set_gid(7);
        gnu.set_mtime(0);
        gnu.set_mode(0o644);
        gnu.set_cksum();
        assert_eq!(gnu.as_bytes()[124], 0x80, "a base-256 size");
        // Only the header: the walk never needs the 8 GiB behind it.
        tar.extend(gnu.as_bytes());
        let got = walk(&tar).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(
            got[0],
            EntryHeader {
                name: b"pax/long/name".to_vec(),
                link: None,
                kind: b'0',
                size: 3,
                dev: (0, 0),
                mode: 0o644,
                uid: 3_000_000_000,
                gid: 42,
                mtime: 1_700_000_000,
                xattrs: vec![(b"user.k".to_vec(), b"v\x00\xff".to_vec())],
            }
        );
        assert_eq!(
            (got[1].kind, got[1].link.as_deref()),
            (b'1', Some(&b"pax/long/name"[..]))
        );
        assert_eq!((got[2].size, got[2].uid, got[2].gid), (big, 1 << 40, 7));
        // The tar crate reads the first two entries the same way.
        let cut = tar.len() - 512;
        let mut theirs = Vec::new();
        for e in tar::Archive::new(&tar[..cut]).entries().unwrap() {
            let e = e.unwrap();
            theirs.push((
                e.path_bytes().into_owned(),
                e.link_name_bytes().map(|l| l.into_owned()),
                e.size(),
                e.header().uid().unwrap(),
                e.header().gid().unwrap(),
            ));
        }
        let ours: Vec<_> = got[..2]
            .iter()
            .map(|h| (h.name.clone(), h.link.clone(), h.size, h.uid, h.gid))
            .collect();
        assert_eq!(ours, theirs);
    }

    /// Whatever another reader could take differently is refused, before a
    /// byte of the header passes.
    #[test]
    fn refuses_headers_two_readers_could_read_apart() {
        let file = || [hdr("f", b'0', 0, |_| {}), vec![0u8; 1024]].concat();
        let with_pax = |records: &[Vec<u8>]| [pax_block(records), file()].concat();
        let mut bad_sum = file();
        bad_sum[0] = b'g';
        let mut huge = hdr("f", b'0', 0, |_| {});
        huge[124..136].copy_from_slice(&[0x80, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let sum: u32 = huge[..148]
            .iter()
            .chain(&huge[156..])
            .map(|b| u32::from(*b))
            .sum::<u32>()
            + 256;
        huge[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "duplicate key",
                with_pax(&[rec("path", b"a"), rec("path", b"b")]),
                "twice",
            ),
            ("wrong length", with_pax(&[b"99 path=a\n".to_vec()]), "malformed"),
            ("no newline", with_pax(&[b"9 path=ab".to_vec()]), "malformed"),
            ("newline in value", with_pax(&[rec("path", b"a\nb")]), "malformed"),
            ("size not a number", with_pax(&[rec("size", b"+5")]), "not a number"),
            ("NUL in path", with_pax(&[rec("path", b"a\0b")]), "NUL"),
            ("PAX sparse", with_pax(&[rec("GNU.sparse.major", b"1")]), "sparse"),
            (
                "GNU sparse",
                [hdr("s", b'S', 0, |_| {}), vec![0; 1024]].concat(),
                "sparse",
            ),
            ("bad checksum", bad_sum, "checksum"),
            ("size over 64 bits", [huge, vec![0; 1024]].concat(), "not a number"),
            (
                "two PAX headers",
                [pax_block(&[rec("path", b"a")]), with_pax(&[rec("path", b"b")])].concat(),
                "two extension records",
            ),
            (
                "extension then the end",
                [pax_block(&[rec("path", b"a")]), vec![0; 1024]].concat(),
                "never comes",
            ),
        ];
        for (what, tar, expect) in cases {
            let (passed, r, _) = split(&tar);
            let e = r.expect_err(what);
            assert!(e.to_string().contains(expect), "{what}: {e}");
            assert!(passed.len() < tar.len() - 512, "{what}: the refused header passed on");
        }
    }

    #[test]
    fn refuses_an_oversized_extension_record() {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(MAX_EXTENSION + 1);
        h.set_cksum();
        let mut tar = h.as_bytes().to_vec();
        tar.extend(std::iter::repeat_n(b'a', 4096));
        let (_, r, _) = split(&tar);
        let e = r.unwrap_err();
        assert!(e.to_string().contains("extension record"), "{e}");
    }
}
