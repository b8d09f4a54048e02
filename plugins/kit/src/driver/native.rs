//! The driver API over the native C ABI: the same names and signatures the
//! component bindings give (`fs::*`, `Error`, `ByteStream`, …), each call
//! sent to the host's `fs_call` as a JSON message, streams as host handles.
//! A driver written against the kit compiles to either without a change.

use super::Driver;
use gantry_native_abi::{vec_sink, DriverCall, DriverReply, FsCall, FsReply, HostTable, SinkFn, WireChange, WireError};
use std::cell::Cell;
use std::ffi::c_void;

/// The contract this driver was built against, NUL-terminated.
pub static CONTRACT: &std::ffi::CStr = {
    const V: &str = concat!(env!("GANTRY_CONTRACT_VERSION"), "\0");
    match std::ffi::CStr::from_bytes_with_nul(V.as_bytes()) {
        Ok(c) => c,
        Err(_) => panic!("a contract version with a NUL"),
    }
};

thread_local! {
    /// The host table of the call this thread is in.
    static HOST: Cell<*const HostTable> = const { Cell::new(std::ptr::null()) };
}

/// The WIT `error` variant: the wire's own, the same cases by the same names.
pub use gantry_native_abi::WireError as Error;

/// A host-owned stream, by handle.
#[derive(Debug)]
pub struct ByteStream {
    handle: u64,
    /// Borrowed streams (`apply-diff`'s) are the host's to drop.
    owned: bool,
}

impl ByteStream {
    /// Reads up to `len` bytes; empty at the end.
    pub fn read(&self, len: u32) -> Result<Vec<u8>, Error> {
        match fs_call(FsCall::StreamRead {
            handle: self.handle,
            len,
        })? {
            FsReply::Bytes(b) => Ok(b),
            _ => Err(unexpected()),
        }
    }
}

impl Drop for ByteStream {
    fn drop(&mut self) {
        if self.owned {
            let _ = fs_call(FsCall::StreamDrop { handle: self.handle });
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Modify,
    Add,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub path: String,
    pub kind: ChangeKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhiteoutMode {
    Delete,
    Overlay,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayMount {
    pub target: String,
    pub lowers: Vec<String>,
    pub upper: Option<String>,
    pub work: Option<String>,
}

fn unexpected() -> Error {
    Error::Internal("the host answered with an unexpected reply".into())
}

fn fs_call(call: FsCall) -> Result<FsReply, Error> {
    let host = HOST.get();
    if host.is_null() {
        return Err(Error::Internal(
            "the file system is reachable only during a driver call".into(),
        ));
    }
    let req = serde_json::to_vec(&call).map_err(|e| Error::Internal(e.to_string()))?;
    let mut out: Vec<u8> = Vec::new();
    // SAFETY: `host` is the table the host passed for this call, alive
    // until the call returns; `out` outlives the callback.
    unsafe {
        ((*host).fs_call)(
            (*host).ctx,
            req.as_ptr(),
            req.len(),
            &mut out as *mut Vec<u8> as *mut c_void,
            vec_sink,
        )
    };
    serde_json::from_slice::<Result<FsReply, WireError>>(&out)
        .map_err(|e| Error::Internal(format!("a reply from the host: {e}")))?
}

fn change_of(c: WireChange) -> Change {
    let kind = match c.kind.as_str() {
        "add" => ChangeKind::Add,
        "delete" => ChangeKind::Delete,
        _ => ChangeKind::Modify,
    };
    Change { path: c.path, kind }
}

fn wire_change(c: Change) -> WireChange {
    let kind = match c.kind {
        ChangeKind::Add => "add",
        ChangeKind::Delete => "delete",
        ChangeKind::Modify => "modify",
    };
    WireChange {
        path: c.path,
        kind: kind.into(),
    }
}

/// The host's confined file operations, as the `fs` import names them.
pub mod fs {
    use super::{change_of, fs_call, unexpected, ByteStream, Error};
    pub use super::{Change, ChangeKind, OverlayMount, WhiteoutMode};
    use gantry_native_abi::{FsCall, FsReply};

    fn unit(r: FsReply) -> Result<(), Error> {
        match r {
            FsReply::Unit => Ok(()),
            _ => Err(unexpected()),
        }
    }
    fn stream(r: FsReply) -> Result<ByteStream, Error> {
        match r {
            FsReply::Stream(handle) => Ok(ByteStream { handle, owned: true }),
            _ => Err(unexpected()),
        }
    }
    fn size(r: FsReply) -> Result<u64, Error> {
        match r {
            FsReply::Size(n) => Ok(n),
            _ => Err(unexpected()),
        }
    }
    fn s(x: &str) -> String {
        x.to_string()
    }

    pub fn mkdir_all(path: &str, mode: u32) -> Result<(), Error> {
        unit(fs_call(FsCall::MkdirAll { path: s(path), mode })?)
    }
    pub fn remove_all(path: &str) -> Result<(), Error> {
        unit(fs_call(FsCall::RemoveAll { path: s(path) })?)
    }
    pub fn exists(path: &str) -> Result<bool, Error> {
        match fs_call(FsCall::Exists { path: s(path) })? {
            FsReply::Bool(b) => Ok(b),
            _ => Err(unexpected()),
        }
    }
    pub fn rename(src: &str, dst: &str) -> Result<(), Error> {
        unit(fs_call(FsCall::Rename {
            src: s(src),
            dst: s(dst),
        })?)
    }
    pub fn read_file(path: &str) -> Result<Vec<u8>, Error> {
        match fs_call(FsCall::ReadFile { path: s(path) })? {
            FsReply::Bytes(b) => Ok(b),
            _ => Err(unexpected()),
        }
    }
    pub fn write_file(path: &str, data: &[u8], mode: u32) -> Result<(), Error> {
        unit(fs_call(FsCall::WriteFile {
            path: s(path),
            data: data.to_vec(),
            mode,
        })?)
    }
    pub fn list_dir(path: &str) -> Result<Vec<String>, Error> {
        match fs_call(FsCall::ListDir { path: s(path) })? {
            FsReply::Names(n) => Ok(n),
            _ => Err(unexpected()),
        }
    }
    pub fn symlink(target: &str, path: &str) -> Result<(), Error> {
        unit(fs_call(FsCall::Symlink {
            target: s(target),
            path: s(path),
        })?)
    }
    pub fn unpack(dir: &str, diff: &ByteStream, mode: WhiteoutMode) -> Result<u64, Error> {
        size(fs_call(FsCall::Unpack {
            dir: s(dir),
            diff: diff.handle,
            overlay: mode == WhiteoutMode::Overlay,
        })?)
    }
    pub fn pack(dir: &str) -> Result<ByteStream, Error> {
        stream(fs_call(FsCall::Pack { dir: s(dir) })?)
    }
    pub fn pack_changes(lower: &str, upper: &str) -> Result<ByteStream, Error> {
        stream(fs_call(FsCall::PackChanges {
            lower: s(lower),
            upper: s(upper),
        })?)
    }
    pub fn pack_upper(dir: &str) -> Result<ByteStream, Error> {
        stream(fs_call(FsCall::PackUpper { dir: s(dir) })?)
    }
    pub fn copy_tree(src: &str, dst: &str) -> Result<(), Error> {
        unit(fs_call(FsCall::CopyTree {
            src: s(src),
            dst: s(dst),
        })?)
    }
    pub fn share_tree(src: &str, dst: &str) -> Result<(), Error> {
        unit(fs_call(FsCall::ShareTree {
            src: s(src),
            dst: s(dst),
        })?)
    }
    pub fn changes(lower: &str, upper: &str) -> Result<Vec<Change>, Error> {
        match fs_call(FsCall::Changes {
            lower: s(lower),
            upper: s(upper),
        })? {
            FsReply::Changes(c) => Ok(c.into_iter().map(change_of).collect()),
            _ => Err(unexpected()),
        }
    }
    pub fn disk_usage(dir: &str) -> Result<u64, Error> {
        size(fs_call(FsCall::DiskUsage { dir: s(dir) })?)
    }
    pub fn mount_overlay(m: &OverlayMount) -> Result<(), Error> {
        unit(fs_call(FsCall::MountOverlay {
            target: m.target.clone(),
            lowers: m.lowers.clone(),
            upper: m.upper.clone(),
            work: m.work.clone(),
        })?)
    }
    pub fn unmount(target: &str) -> Result<(), Error> {
        unit(fs_call(FsCall::Unmount { target: s(target) })?)
    }
}

fn run<T: Driver>(call: DriverCall) -> Result<DriverReply, Error> {
    use DriverReply as R;
    Ok(match call {
        DriverCall::Init { options } => T::init(options).map(|()| R::Unit)?,
        DriverCall::Create { id, parent } => T::create(id, parent).map(|()| R::Unit)?,
        DriverCall::CreateReadWrite { id, parent } => T::create_read_write(id, parent).map(|()| R::Unit)?,
        DriverCall::Remove { id } => T::remove(id).map(|()| R::Unit)?,
        DriverCall::Get { id, mount_label } => R::Text(T::get(id, mount_label)?),
        DriverCall::Put { id } => T::put(id).map(|()| R::Unit)?,
        DriverCall::Exists { id } => R::Bool(T::exists(id)),
        DriverCall::Status => R::Pairs(T::status()),
        DriverCall::ApplyDiff { id, parent, diff } => {
            let borrowed = ByteStream {
                handle: diff,
                owned: false,
            };
            R::Size(T::apply_diff(id, parent, &borrowed)?)
        }
        DriverCall::Diff { id, parent } => {
            let s = T::diff(id, parent)?;
            let handle = s.handle;
            // Handed back to the host, which now owns it.
            std::mem::forget(s);
            R::Stream(handle)
        }
        DriverCall::Changes { id, parent } => {
            R::Changes(T::changes(id, parent)?.into_iter().map(wire_change).collect())
        }
        DriverCall::DiffSize { id, parent } => R::Size(T::diff_size(id, parent)?),
        DriverCall::Cleanup => T::cleanup().map(|()| R::Unit)?,
    })
}

/// One driver call from the host: decode, run `T`, reply through `sink_fn`.
/// A panic in the driver is an `internal` error, never an unwind across
/// the boundary.
///
/// # Safety
/// `host` must be a valid host table for the duration of the call,
/// `req..req+len` readable, and `sink_fn(sink, …)` callable.
pub unsafe fn dispatch<T: Driver>(
    host: *const HostTable,
    req: *const u8,
    len: usize,
    sink: *mut c_void,
    sink_fn: SinkFn,
) {
    // SAFETY: the caller's contract above.
    let bytes = unsafe { std::slice::from_raw_parts(req, len) };
    let prev = HOST.replace(host);
    let reply: Result<DriverReply, WireError> = match serde_json::from_slice::<DriverCall>(bytes) {
        Err(e) => Err(WireError::Invalid(format!("a call the driver cannot read: {e}"))),
        Ok(call) => match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run::<T>(call))) {
            Ok(r) => r,
            Err(p) => {
                let why = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(WireError::Internal(format!("the native driver panicked: {why}")))
            }
        },
    };
    HOST.set(prev);
    let out = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"Err\":{\"Internal\":\"unencodable reply\"}}".to_vec());
    // SAFETY: the caller's contract above.
    unsafe { sink_fn(sink, out.as_ptr(), out.len()) };
}
