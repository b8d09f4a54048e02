//! `NativeDriver`: the core's `GraphDriver` over a native shared library,
//! the trusted fast path (`runtime = "native"`, refused unless the config
//! sets `allow_native_plugins`).
//!
//! A native plugin runs in gantry's own process with gantry's privileges:
//! no memory cap, no deadline, nothing stops it from touching any file. What
//! the host still does: it checks the library's ABI stamp and contract
//! version before calling anything else, speaks to it only through the C ABI
//! of `gantry-native-abi` (JSON messages, copied across; no Rust types, no
//! allocation crossing), offers it the same confined `fs` capability a
//! component gets, and verifies every digest and size of what it produces,
//! as for any driver. Calls run one at a time on a thread of the plugin's
//! own, as a component instance's do, so a plugin's thread-local state from
//! `init` is there for every later call.

use crate::confined::{self, Home, OverlaySpec, Whiteouts};
use crate::plugin::contract_accepts;
use gantry_core::plugin::{ByteStream, GraphDriver};
use gantry_core::{ErrorClass, PluginError};
use gantry_native_abi::{
    vec_sink, AbiFn, DriverCall, DriverCallFn, DriverReply, FsCall, FsReply, HostTable, SinkFn, TextFn, WireChange,
    WireError, ABI_VERSION, SYM_ABI, SYM_CONTRACT, SYM_DRIVER_CALL, SYM_KIND,
};
use std::collections::HashMap;
use std::ffi::c_void;
use std::io::{self, Read};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};

/// Why a native plugin did not load.
#[derive(Debug, thiserror::Error)]
pub enum NativeLoadError {
    #[error("native plugin {name}: native plugins are off (set allow_native_plugins = true to trust one)")]
    NotAllowed { name: String },
    #[error("native plugin {name}: cannot load {path}: {message}")]
    Open {
        name: String,
        path: String,
        message: String,
    },
    #[error("native plugin {name}: {path} has no {symbol} (not a gantry native plugin)")]
    Symbol { name: String, path: String, symbol: String },
    #[error("native plugin {name}: built for native ABI {found}, this gantry speaks {ABI_VERSION}")]
    Abi { name: String, found: u32 },
    #[error(
        "native plugin {name}: built against gantry:plugin@{found}, this gantry loads {} to {}",
        crate::plugin::CONTRACT_OLDEST,
        crate::plugin::CONTRACT_VERSION
    )]
    Contract { name: String, found: String },
    #[error("native plugin {name}: it is a {found} plugin, not a driver")]
    Kind { name: String, found: String },
}

/// Host-side state a native plugin reaches through `fs_call`.
struct HostState {
    home: Arc<Home>,
    streams: Mutex<HashMap<u64, Box<dyn Read + Send>>>,
    next: std::sync::atomic::AtomicU64,
}

impl HostState {
    fn push(&self, s: Box<dyn Read + Send>) -> u64 {
        let h = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.streams.lock().unwrap_or_else(|p| p.into_inner()).insert(h, s);
        h
    }

    fn take(&self, h: u64) -> Option<Box<dyn Read + Send>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner()).remove(&h)
    }

    /// Runs `f` on stream `h`, which stays the host's.
    fn with_stream<R>(
        &self,
        h: u64,
        f: impl FnOnce(&mut Box<dyn Read + Send>) -> Result<R, WireError>,
    ) -> Result<R, WireError> {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let s = streams
            .get_mut(&h)
            .ok_or_else(|| WireError::NotFound(format!("no stream {h}")))?;
        f(s)
    }
}

type Job = Box<dyn FnOnce(&Worker) + Send>;

/// Lives on the plugin's thread: the library and what calls need.
struct Worker {
    call: DriverCallFn,
    state: Arc<HostState>,
    _lib: libloading::Library,
}

impl Worker {
    fn call(&self, req: &DriverCall) -> Result<DriverReply, WireError> {
        let body = serde_json::to_vec(req).map_err(|e| WireError::Internal(e.to_string()))?;
        let table = HostTable {
            abi: ABI_VERSION,
            ctx: Arc::as_ptr(&self.state) as *mut c_void,
            fs_call: host_fs_call,
        };
        let mut out: Vec<u8> = Vec::new();
        // SAFETY: the library passed its ABI stamp check; `table`, `body`
        // and `out` outlive the call, and `vec_sink` copies into `out`.
        unsafe {
            (self.call)(
                &table,
                body.as_ptr(),
                body.len(),
                &mut out as *mut Vec<u8> as *mut c_void,
                vec_sink,
            )
        };
        serde_json::from_slice::<Result<DriverReply, WireError>>(&out)
            .map_err(|e| WireError::Internal(format!("an unreadable reply: {e}")))?
    }
}

pub struct NativeDriver {
    name: String,
    jobs: Mutex<mpsc::Sender<Job>>,
}

fn symbol<T: Copy>(lib: &libloading::Library, name: &str, path: &Path, sym: &[u8]) -> Result<T, NativeLoadError> {
    // SAFETY: the symbol's type is the one the native ABI names for it.
    unsafe { lib.get::<T>(sym) }
        .map(|s| *s)
        .map_err(|_| NativeLoadError::Symbol {
            name: name.to_string(),
            path: path.display().to_string(),
            symbol: String::from_utf8_lossy(&sym[..sym.len() - 1]).into_owned(),
        })
}

fn text(f: TextFn) -> String {
    // SAFETY: the ABI says these return a static NUL-terminated string.
    let p = unsafe { f() };
    if p.is_null() {
        return String::new();
    }
    // SAFETY: as above.
    unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

impl NativeDriver {
    /// Loads the native driver at `path`, checks its stamps, and calls its
    /// `init` with `options`. `allowed` is the config's consent.
    pub fn load(
        name: &str,
        path: &Path,
        home: &Path,
        options: Vec<(String, String)>,
        allowed: bool,
    ) -> Result<Self, PluginError> {
        if !allowed {
            return Err(load_error(NativeLoadError::NotAllowed { name: name.to_string() }));
        }
        let home = Arc::new(Home::open(home).map_err(|e| {
            PluginError::new(
                ErrorClass::Internal,
                format!("native plugin {name}: opening its home: {e}"),
            )
        })?);
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), NativeLoadError>>();
        let (n, p) = (name.to_string(), path.to_path_buf());
        std::thread::Builder::new()
            .name(format!("native/{name}"))
            .spawn(move || {
                let worker = match open(&n, &p, home) {
                    Ok(w) => {
                        let _ = ready_tx.send(Ok(()));
                        w
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                for job in rx {
                    job(&worker);
                }
            })
            .map_err(|e| PluginError::new(ErrorClass::Internal, format!("native plugin {name}: {e}")))?;
        ready_rx
            .recv()
            .map_err(|_| PluginError::new(ErrorClass::Internal, format!("native plugin {name} did not start")))?
            .map_err(load_error)?;
        let d = NativeDriver {
            name: name.to_string(),
            jobs: Mutex::new(tx),
        };
        d.call(DriverCall::Init { options })?;
        Ok(d)
    }

    /// Runs `f` on the plugin's thread and waits for it.
    fn on_worker<R: Send + 'static>(&self, f: impl FnOnce(&Worker) -> R + Send + 'static) -> Result<R, PluginError> {
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move |w| {
            let _ = tx.send(f(w));
        });
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .map_err(|_| self.gone())?;
        rx.recv().map_err(|_| self.gone())
    }

    fn gone(&self) -> PluginError {
        PluginError::new(ErrorClass::Internal, format!("native plugin {} stopped", self.name))
    }

    fn call(&self, req: DriverCall) -> Result<DriverReply, PluginError> {
        let label = self.name.clone();
        self.on_worker(move |w| w.call(&req))?
            .map_err(|e| wire_error(&label, e))
    }

    fn unexpected(&self) -> PluginError {
        PluginError::new(
            ErrorClass::Internal,
            format!("native plugin {} answered with an unexpected reply", self.name),
        )
    }

    fn unit(&self, req: DriverCall) -> Result<(), PluginError> {
        match self.call(req)? {
            DriverReply::Unit => Ok(()),
            _ => Err(self.unexpected()),
        }
    }

    pub fn create_read_write(&self, id: &str, parent: Option<&str>) -> Result<(), PluginError> {
        self.unit(DriverCall::CreateReadWrite {
            id: id.into(),
            parent: parent.map(Into::into),
        })
    }

    pub fn changes(&self, id: &str, parent: Option<&str>) -> Result<Vec<(String, &'static str)>, PluginError> {
        match self.call(DriverCall::Changes {
            id: id.into(),
            parent: parent.map(Into::into),
        })? {
            DriverReply::Changes(c) => Ok(c
                .into_iter()
                .map(|c| {
                    let kind = match c.kind.as_str() {
                        "add" => "add",
                        "delete" => "delete",
                        _ => "modify",
                    };
                    (c.path, kind)
                })
                .collect()),
            _ => Err(self.unexpected()),
        }
    }

    pub fn diff_size(&self, id: &str, parent: Option<&str>) -> Result<u64, PluginError> {
        match self.call(DriverCall::DiffSize {
            id: id.into(),
            parent: parent.map(Into::into),
        })? {
            DriverReply::Size(n) => Ok(n),
            _ => Err(self.unexpected()),
        }
    }
}

/// What a native library says it is: (ABI, contract version, kind), read
/// from its stamps without calling anything else. Loading it runs its
/// initialisers, so this too needs the operator's consent.
pub fn describe_native(path: &Path, allowed: bool) -> Result<(u32, String, String), PluginError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !allowed {
        return Err(load_error(NativeLoadError::NotAllowed { name }));
    }
    // The operator allowed native plugins (see `library`).
    let lib = library(&name, path).map_err(load_error)?;
    let abi: AbiFn = symbol(&lib, &name, path, SYM_ABI).map_err(load_error)?;
    // SAFETY: as in `open`.
    let found = unsafe { abi() };
    if found != ABI_VERSION {
        return Ok((found, String::new(), String::new()));
    }
    let contract = text(symbol::<TextFn>(&lib, &name, path, SYM_CONTRACT).map_err(load_error)?);
    let kind = text(symbol::<TextFn>(&lib, &name, path, SYM_KIND).map_err(load_error)?);
    Ok((found, contract, kind))
}

/// Whether the file at `path` is a native library (ELF) rather than a component.
pub fn is_native(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| &magic == b"\x7fELF")
}

/// Loads the library at `path`, always by an absolute path: `dlopen` given
/// a bare name searches the system's library paths, and a relative one the
/// current directory. A config's relative paths were made absolute beside
/// the config file when it was read; what is left relative here (a path
/// given on the command line) means the current directory, said explicitly.
fn library(name: &str, path: &Path) -> Result<libloading::Library, NativeLoadError> {
    let open_error = |message: String| NativeLoadError::Open {
        name: name.to_string(),
        path: path.display().to_string(),
        message,
    };
    let absolute = std::path::absolute(path).map_err(|e| open_error(e.to_string()))?;
    // SAFETY: loading a library runs its initialisers: that is the trust
    // the operator gave by allowing native plugins.
    unsafe { libloading::Library::new(&absolute) }.map_err(|e| open_error(e.to_string()))
}

fn open(name: &str, path: &Path, home: Arc<Home>) -> Result<Worker, NativeLoadError> {
    let lib = library(name, path)?;
    // The stamp first: nothing else is touched in a library of another ABI.
    let abi: AbiFn = symbol(&lib, name, path, SYM_ABI)?;
    // SAFETY: `gantry_native_abi` takes nothing and returns a u32 in every ABI version.
    let found = unsafe { abi() };
    if found != ABI_VERSION {
        return Err(NativeLoadError::Abi {
            name: name.to_string(),
            found,
        });
    }
    let contract = text(symbol::<TextFn>(&lib, name, path, SYM_CONTRACT)?);
    if !contract_accepts(&contract) {
        return Err(NativeLoadError::Contract {
            name: name.to_string(),
            found: contract,
        });
    }
    let kind = text(symbol::<TextFn>(&lib, name, path, SYM_KIND)?);
    if kind != "driver" {
        return Err(NativeLoadError::Kind {
            name: name.to_string(),
            found: kind,
        });
    }
    let call: DriverCallFn = symbol(&lib, name, path, SYM_DRIVER_CALL)?;
    Ok(Worker {
        call,
        state: Arc::new(HostState {
            home,
            streams: Mutex::new(HashMap::new()),
            next: std::sync::atomic::AtomicU64::new(1),
        }),
        _lib: lib,
    })
}

fn load_error(e: NativeLoadError) -> PluginError {
    PluginError::new(ErrorClass::Invalid, e.to_string())
}

fn wire_error(label: &str, e: WireError) -> PluginError {
    super::wit_error(label, e.into())
}

fn io_wire(e: io::Error) -> WireError {
    match e.kind() {
        io::ErrorKind::NotFound => WireError::NotFound(e.to_string()),
        io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput => WireError::Invalid(e.to_string()),
        io::ErrorKind::PermissionDenied => WireError::Denied(e.to_string()),
        io::ErrorKind::UnexpectedEof => WireError::Invalid(format!("truncated input: {e}")),
        _ => WireError::Internal(e.to_string()),
    }
}

/// The `fs` capability for native plugins: the same confined operations
/// the component import has (`host_impls.rs`), over the native messages.
fn fs(state: &HostState, call: FsCall) -> Result<FsReply, WireError> {
    let h = &state.home;
    let unit = |r: io::Result<()>| r.map(|()| FsReply::Unit).map_err(io_wire);
    let stream =
        |r: io::Result<confined::PackReader>| r.map(|s| FsReply::Stream(state.push(Box::new(s)))).map_err(io_wire);
    match call {
        FsCall::MkdirAll { path, mode } => unit(h.mkdir_all(&path, mode & 0o7777)),
        FsCall::RemoveAll { path } => unit(h.remove_all(&path)),
        FsCall::Exists { path } => h.exists(&path).map(FsReply::Bool).map_err(io_wire),
        FsCall::Rename { src, dst } => unit(h.rename(&src, &dst)),
        FsCall::ReadFile { path } => h.read_file(&path, 1 << 20).map(FsReply::Bytes).map_err(io_wire),
        FsCall::WriteFile { path, data, mode } => unit(h.write_file(&path, &data, mode & 0o777)),
        FsCall::ListDir { path } => h.list_dir(&path).map(FsReply::Names).map_err(io_wire),
        FsCall::Symlink { target, path } => unit(h.symlink(&target, &path)),
        FsCall::Unpack { dir, diff, overlay } => {
            let mode = if overlay { Whiteouts::Overlay } else { Whiteouts::Delete };
            state.with_stream(diff, |s| h.unpack(&dir, s, mode).map(FsReply::Size).map_err(io_wire))
        }
        FsCall::Pack { dir } => stream(h.pack(&dir)),
        FsCall::PackUpper { dir } => stream(h.pack_upper(&dir)),
        FsCall::PackChanges { lower, upper } => stream(h.pack_changes(&lower, &upper)),
        FsCall::CopyTree { src, dst } => unit(h.copy_tree(&src, &dst, confined::CopyMode::Copy)),
        FsCall::ShareTree { src, dst } => unit(h.copy_tree(&src, &dst, confined::CopyMode::Share)),
        FsCall::Changes { lower, upper } => {
            let list = h.changes(&lower, &upper).map_err(io_wire)?;
            Ok(FsReply::Changes(
                list.into_iter()
                    .map(|(path, kind)| WireChange {
                        path,
                        kind: kind.as_str().into(),
                    })
                    .collect(),
            ))
        }
        FsCall::DiskUsage { dir } => h.disk_usage(&dir).map(FsReply::Size).map_err(io_wire),
        FsCall::MountOverlay {
            target,
            lowers,
            upper,
            work,
        } => unit(h.mount_overlay(&OverlaySpec {
            target,
            lowers,
            upper,
            work,
        })),
        FsCall::Unmount { target } => unit(h.unmount(&target)),
        FsCall::StreamRead { handle, len } => state.with_stream(handle, |s| {
            confined::read_chunk(s, len)
                .map(FsReply::Bytes)
                .map_err(|e| WireError::Transient(e.to_string()))
        }),
        FsCall::StreamDrop { handle } => {
            state.take(handle);
            Ok(FsReply::Unit)
        }
    }
}

/// The `fs_call` of the host table.
///
/// # Safety
/// Called by a native plugin under the ABI's contract: `ctx` is the
/// `HostState` of its call, `req..req+len` readable.
unsafe extern "C" fn host_fs_call(ctx: *mut c_void, req: *const u8, len: usize, sink: *mut c_void, sink_fn: SinkFn) {
    // SAFETY: the contract above; `ctx` is an `Arc<HostState>` the worker keeps alive.
    let (state, bytes) = unsafe { (&*(ctx as *const HostState), std::slice::from_raw_parts(req, len)) };
    let reply = match serde_json::from_slice::<FsCall>(bytes) {
        Ok(call) => fs(state, call),
        Err(e) => Err(WireError::Invalid(format!("an fs call the host cannot read: {e}"))),
    };
    let out = serde_json::to_vec(&reply).unwrap_or_default();
    // SAFETY: the plugin's sink, as the ABI says.
    unsafe { sink_fn(sink, out.as_ptr(), out.len()) };
}

impl GraphDriver for NativeDriver {
    fn name(&self) -> &str {
        &self.name
    }

    fn create(&self, id: &str, parent: Option<&str>) -> Result<(), PluginError> {
        self.unit(DriverCall::Create {
            id: id.into(),
            parent: parent.map(Into::into),
        })
    }

    fn remove(&self, id: &str) -> Result<(), PluginError> {
        self.unit(DriverCall::Remove { id: id.into() })
    }

    fn exists(&self, id: &str) -> Result<bool, PluginError> {
        match self.call(DriverCall::Exists { id: id.into() })? {
            DriverReply::Bool(b) => Ok(b),
            _ => Err(self.unexpected()),
        }
    }

    fn get(&self, id: &str) -> Result<std::os::fd::OwnedFd, PluginError> {
        let rel = match self.call(DriverCall::Get {
            id: id.into(),
            mount_label: String::new(),
        })? {
            DriverReply::Text(t) => t,
            _ => return Err(self.unexpected()),
        };
        let name = self.name.clone();
        self.on_worker(move |w| w.state.home.dir(&rel).map_err(|e| super::bad_path(&name, &rel, e)))?
    }

    fn put(&self, id: &str) -> Result<(), PluginError> {
        self.unit(DriverCall::Put { id: id.into() })
    }

    fn apply_diff(&self, id: &str, parent: Option<&str>, diff: ByteStream) -> Result<u64, PluginError> {
        let (id, parent, label) = (id.to_string(), parent.map(str::to_string), self.name.clone());
        self.on_worker(move |w| {
            let handle = w.state.push(diff);
            let r = w.call(&DriverCall::ApplyDiff {
                id,
                parent,
                diff: handle,
            });
            let rest = w.state.take(handle);
            match r {
                Ok(DriverReply::Size(n)) => {
                    // The diffID covers the whole stream: read what the driver left.
                    if let Some(mut rest) = rest {
                        io::copy(&mut rest, &mut io::sink()).map_err(|e| wire_error(&label, io_wire(e)))?;
                    }
                    Ok(n)
                }
                Ok(_) => Err(wire_error(&label, WireError::Internal("an unexpected reply".into()))),
                Err(e) => Err(wire_error(&label, e)),
            }
        })?
    }

    fn diff(&self, id: &str, parent: Option<&str>) -> Result<ByteStream, PluginError> {
        let (id, parent, label) = (id.to_string(), parent.map(str::to_string), self.name.clone());
        self.on_worker(move |w| match w.call(&DriverCall::Diff { id, parent }) {
            Ok(DriverReply::Stream(h)) => w
                .state
                .take(h)
                .ok_or_else(|| wire_error(&label, WireError::Internal(format!("no stream {h}")))),
            Ok(_) => Err(wire_error(&label, WireError::Internal("an unexpected reply".into()))),
            Err(e) => Err(wire_error(&label, e)),
        })?
    }

    fn status(&self) -> Result<Vec<(String, String)>, PluginError> {
        match self.call(DriverCall::Status)? {
            DriverReply::Pairs(p) => Ok(p),
            _ => Err(self.unexpected()),
        }
    }
}

impl Drop for NativeDriver {
    fn drop(&mut self) {
        let _ = self.call(DriverCall::Cleanup);
    }
}
