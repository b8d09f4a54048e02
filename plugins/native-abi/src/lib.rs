//! The native plugin ABI: how gantry calls a driver built as a shared
//! library (`runtime = "native"`), for operators who trust it and want no
//! sandbox cost.
//!
//! The boundary is a small, stable C ABI, never Rust's: a library exports
//!
//! - `gantry_native_abi() -> u32`: [`ABI_VERSION`]; checked before any
//!   other symbol is touched;
//! - `gantry_native_contract() -> *const c_char`: the WIT contract version it
//!   was built against (`"0.1.1"`), checked like a component's;
//! - `gantry_native_kind() -> *const c_char`: `"driver"`;
//! - `gantry_native_driver_call(host, req, len, sink, sink_fn)`: one driver
//!   call. `req` is a JSON [`DriverCall`]; the reply, a JSON
//!   `Result<DriverReply, WireError>`, is handed to `sink_fn(sink, ptr, len)`,
//!   which copies it (no allocation ever crosses the boundary).
//!
//! The host passes a [`HostTable`] with each call: `fs_call` is the same
//! confined file capability a component imports (a JSON [`FsCall`] in, a
//! JSON `Result<FsReply, WireError>` out). Streams stay host-side and
//! cross as handles. The messages mirror the WIT `driver` and `fs`
//! interfaces one for one, so a driver written against `gantry-kit` builds
//! either way unchanged.

use serde::{Deserialize, Serialize};
use std::ffi::c_void;

/// Bumped whenever anything below changes shape.
pub const ABI_VERSION: u32 = 1;

pub const SYM_ABI: &[u8] = b"gantry_native_abi\0";
pub const SYM_CONTRACT: &[u8] = b"gantry_native_contract\0";
pub const SYM_KIND: &[u8] = b"gantry_native_kind\0";
pub const SYM_DRIVER_CALL: &[u8] = b"gantry_native_driver_call\0";

/// Receives a reply: copies `len` bytes at `ptr` into `sink`.
pub type SinkFn = unsafe extern "C" fn(sink: *mut c_void, ptr: *const u8, len: usize);

/// `gantry_native_abi` and `gantry_native_contract` / `_kind`.
pub type AbiFn = unsafe extern "C" fn() -> u32;
pub type TextFn = unsafe extern "C" fn() -> *const std::ffi::c_char;

/// `gantry_native_driver_call`.
pub type DriverCallFn =
    unsafe extern "C" fn(host: *const HostTable, req: *const u8, len: usize, sink: *mut c_void, sink_fn: SinkFn);

/// What the host offers a native plugin during a call.
#[repr(C)]
pub struct HostTable {
    pub abi: u32,
    pub ctx: *mut c_void,
    pub fs_call: unsafe extern "C" fn(ctx: *mut c_void, req: *const u8, len: usize, sink: *mut c_void, sink_fn: SinkFn),
}

/// The WIT `error` variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireError {
    NotFound(String),
    Unauthorized(String),
    Denied(String),
    Unsupported(String),
    Unreachable(String),
    Transient(String),
    Invalid(String),
    Internal(String),
}

/// The WIT `change` record; `kind` is `modify`, `add` or `delete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireChange {
    pub path: String,
    pub kind: String,
}

/// One call of the WIT `driver` interface. Streams are host handles.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum DriverCall {
    Init {
        options: Vec<(String, String)>,
    },
    Create {
        id: String,
        parent: Option<String>,
    },
    CreateReadWrite {
        id: String,
        parent: Option<String>,
    },
    Remove {
        id: String,
    },
    Get {
        id: String,
        mount_label: String,
    },
    Put {
        id: String,
    },
    Exists {
        id: String,
    },
    Status,
    ApplyDiff {
        id: String,
        parent: Option<String>,
        diff: u64,
    },
    Diff {
        id: String,
        parent: Option<String>,
    },
    Changes {
        id: String,
        parent: Option<String>,
    },
    DiffSize {
        id: String,
        parent: Option<String>,
    },
    Cleanup,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum DriverReply {
    Unit,
    Bool(bool),
    Text(String),
    Pairs(Vec<(String, String)>),
    Size(u64),
    Stream(u64),
    Changes(Vec<WireChange>),
}

/// One call of the WIT `fs` interface (and of the `byte-stream` resource).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FsCall {
    MkdirAll {
        path: String,
        mode: u32,
    },
    RemoveAll {
        path: String,
    },
    Exists {
        path: String,
    },
    Rename {
        src: String,
        dst: String,
    },
    ReadFile {
        path: String,
    },
    WriteFile {
        path: String,
        data: Vec<u8>,
        mode: u32,
    },
    ListDir {
        path: String,
    },
    Symlink {
        target: String,
        path: String,
    },
    Unpack {
        dir: String,
        diff: u64,
        overlay: bool,
    },
    Pack {
        dir: String,
    },
    PackChanges {
        lower: String,
        upper: String,
    },
    PackUpper {
        dir: String,
    },
    CopyTree {
        src: String,
        dst: String,
    },
    ShareTree {
        src: String,
        dst: String,
    },
    Changes {
        lower: String,
        upper: String,
    },
    DiskUsage {
        dir: String,
    },
    MountOverlay {
        target: String,
        lowers: Vec<String>,
        upper: Option<String>,
        work: Option<String>,
    },
    Unmount {
        target: String,
    },
    StreamRead {
        handle: u64,
        len: u32,
    },
    StreamDrop {
        handle: u64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FsReply {
    Unit,
    Bool(bool),
    Bytes(Vec<u8>),
    Names(Vec<String>),
    Size(u64),
    Stream(u64),
    Changes(Vec<WireChange>),
}

/// A sink that collects a reply into a `Vec<u8>` (pass `&mut Vec<u8>` as `sink`).
///
/// # Safety
/// `sink` must point to a live `Vec<u8>` and `ptr..ptr+len` be readable.
pub unsafe extern "C" fn vec_sink(sink: *mut c_void, ptr: *const u8, len: usize) {
    // SAFETY: the caller's contract above.
    unsafe {
        let v = &mut *(sink as *mut Vec<u8>);
        v.extend_from_slice(std::slice::from_raw_parts(ptr, len));
    }
}
