//! The plugin host: loads WebAssembly components, checks their contract
//! version, compiles each once (caching the artefact under the store root),
//! and runs every call in a sandbox.
//!
//! The sandbox of a plugin instance: a memory cap (a `ResourceLimiter`), a
//! CPU deadline (epoch interruption, counting only time spent in the guest),
//! WASI with no preopened directory, no sockets and no environment, and
//! only the capabilities its world imports — `http` filtered to the
//! endpoints the core asked for, or `fs` confined to the driver's home. A
//! trap, a timeout or a refused allocation fails that one call with a clear
//! error and throws the instance away; the host and the store carry on.

pub mod bindings;
mod driver;
mod host_impls;
mod transport;

pub use driver::WasmDriver;
pub use transport::WasmTransport;

use crate::confined::Home;
use crate::http::HttpPolicy;
use bindings::WitError;
use gantry_core::{ErrorClass, PluginError};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// The contract this host speaks.
pub const CONTRACT: &str = "gantry:plugin";
pub const CONTRACT_VERSION: &str = "0.1.0";

/// A host-owned stream handed to a guest as a `byte-stream` resource.
pub struct ByteStream(pub Box<dyn Read + Send>);

/// Errors of loading a plugin.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("plugin {name}: reading {path}: {source}")]
    Read {
        name: String,
        path: String,
        source: std::io::Error,
    },
    #[error("plugin {name}: not a valid component: {message}")]
    Compile { name: String, message: String },
    #[error("plugin {name} was built against {CONTRACT}@{found}, this gantry speaks {CONTRACT}@{CONTRACT_VERSION}")]
    Version { name: String, found: String },
    #[error("plugin {name} is not a {kind} component (it exports no {CONTRACT}/{kind})")]
    Kind { name: String, kind: &'static str },
    #[error("plugin {name}: cannot link: {message}")]
    Link { name: String, message: String },
}

/// Sandbox limits of every instance of one plugin.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub memory_bytes: usize,
    /// Guest time one call may use.
    pub cpu: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            cpu: Duration::from_secs(10),
        }
    }
}

struct MemoryCap {
    cap: usize,
    hit: bool,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.cap {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 16)
    }
}

/// The state of one sandboxed instance.
pub struct Sandbox {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryCap,
    stderr: MemoryOutputPipe,
    /// For transports: where outgoing HTTP may go.
    http: Option<Arc<HttpPolicy>>,
    /// For drivers: the only directory they may touch.
    home: Option<Arc<Home>>,
    call_start: Instant,
    /// Time spent in host functions during the current call (not guest CPU).
    host_time: Duration,
    cpu: Duration,
    timed_out: bool,
}

impl WasiView for Sandbox {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl Sandbox {
    fn new(limits: Limits, http: Option<Arc<HttpPolicy>>, home: Option<Arc<Home>>) -> Sandbox {
        let stderr = MemoryOutputPipe::new(16 << 10);
        // No preopens, no env, no args, no network: WASI only for std's needs.
        let wasi = WasiCtxBuilder::new()
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .build();
        Sandbox {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryCap {
                cap: limits.memory_bytes,
                hit: false,
            },
            stderr,
            http,
            home,
            call_start: Instant::now(),
            host_time: Duration::ZERO,
            cpu: limits.cpu,
            timed_out: false,
        }
    }

    /// Runs host work, keeping its time out of the guest's CPU budget.
    fn host<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let t = Instant::now();
        let r = f(self);
        self.host_time += t.elapsed();
        r
    }
}

/// Shared engine, with a ticker driving epoch deadlines.
pub struct PluginHost {
    engine: Engine,
    cache_dir: PathBuf,
}

const TICK: Duration = Duration::from_millis(10);

impl PluginHost {
    pub fn new(cache_dir: &Path) -> anyhow::Result<PluginHost> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("starting the WebAssembly engine: {e}"))?;
        let weak = engine.weak();
        std::thread::spawn(move || loop {
            std::thread::sleep(TICK);
            match weak.upgrade() {
                Some(e) => e.increment_epoch(),
                None => return,
            }
        });
        Ok(PluginHost {
            engine,
            cache_dir: cache_dir.to_path_buf(),
        })
    }

    /// Loads and compiles (or fetches from the cache) the component at `path`.
    fn component(&self, name: &str, path: &Path) -> Result<Component, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            name: name.to_string(),
            path: path.display().to_string(),
            source,
        })?;
        let key = {
            use sha2::Digest as _;
            let mut h = sha2::Sha256::new();
            h.update(env!("CARGO_PKG_VERSION"));
            h.update(&bytes);
            hex::encode(h.finalize())
        };
        let cached = self.cache_dir.join(format!("{key}.cwasm"));
        if cached.is_file() {
            // SAFETY: the artefact was written by this same binary version
            // (the cache key includes it) into the private store root.
            if let Ok(c) = unsafe { Component::deserialize_file(&self.engine, &cached) } {
                return Ok(c);
            }
        }
        let c = Component::new(&self.engine, &bytes).map_err(|e| LoadError::Compile {
            name: name.to_string(),
            message: first_line(&e),
        })?;
        if let Ok(art) = c.serialize() {
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.cache_dir);
            let _ = gantry_core::store::write_atomic(&cached, &art);
        }
        Ok(c)
    }

    /// Reads the contract version a component was built against before
    /// instantiating it, and checks it exports `kind`.
    fn check_contract(&self, name: &str, c: &Component, kind: &'static str) -> Result<(), LoadError> {
        let ty = c.component_type();
        let mut exports_kind = false;
        let names: Vec<String> = ty
            .imports(&self.engine)
            .map(|(n, _)| n.to_string())
            .chain(ty.exports(&self.engine).map(|(n, _)| {
                if n.starts_with(&format!("{CONTRACT}/{kind}@")) {
                    exports_kind = true;
                }
                n.to_string()
            }))
            .collect();
        for n in &names {
            if let Some(rest) = n.strip_prefix(&format!("{CONTRACT}/")) {
                let found = rest.split_once('@').map(|(_, v)| v).unwrap_or("(unversioned)");
                if found != CONTRACT_VERSION {
                    return Err(LoadError::Version {
                        name: name.to_string(),
                        found: found.to_string(),
                    });
                }
            }
        }
        if !exports_kind {
            return Err(LoadError::Kind {
                name: name.to_string(),
                kind,
            });
        }
        Ok(())
    }

    /// Loads the component at `path`, checks it is a `kind` component of
    /// this contract, and links it with WASI and its world's imports (`add`).
    fn prepare(
        &self,
        name: &str,
        path: &Path,
        kind: &'static str,
        add: impl FnOnce(&mut Linker<Sandbox>) -> wasmtime::Result<()>,
    ) -> Result<wasmtime::component::InstancePre<Sandbox>, LoadError> {
        let c = self.component(name, path)?;
        self.check_contract(name, &c, kind)?;
        let link_err = |message: String| LoadError::Link {
            name: name.to_string(),
            message,
        };
        let mut linker = Linker::new(&self.engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| link_err(e.to_string()))?;
        add(&mut linker).map_err(|e| link_err(e.to_string()))?;
        linker.instantiate_pre(&c).map_err(|e| link_err(first_line(&e)))
    }
}

/// A pool of ready instances of one plugin; a call takes one (or makes
/// one), and a trapped instance is dropped instead of returned.
struct Pool<B> {
    label: String,
    engine: Engine,
    limits: Limits,
    http: Option<Arc<HttpPolicy>>,
    home: Option<Arc<Home>>,
    #[allow(clippy::type_complexity)]
    make: Box<dyn Fn(&mut Store<Sandbox>) -> wasmtime::Result<Result<B, WitError>> + Send + Sync>,
    free: Mutex<Vec<(Store<Sandbox>, B)>>,
}

impl<B> Pool<B> {
    fn new_store(&self) -> Store<Sandbox> {
        let mut store = Store::new(
            &self.engine,
            Sandbox::new(self.limits, self.http.clone(), self.home.clone()),
        );
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_callback(|mut ctx| {
            let s = ctx.data_mut();
            let guest = s.call_start.elapsed().saturating_sub(s.host_time);
            if guest > s.cpu {
                s.timed_out = true;
                return Err(wasmtime::Trap::Interrupt.into());
            }
            Ok(UpdateDeadline::Continue(1))
        });
        store.set_epoch_deadline(1);
        store
    }

    fn begin(store: &mut Store<Sandbox>) {
        let s = store.data_mut();
        s.call_start = Instant::now();
        s.host_time = Duration::ZERO;
        s.timed_out = false;
        store.set_epoch_deadline(1);
    }

    /// Runs `op` on an instance, mapping guest errors and traps.
    fn call<R>(
        &self,
        op: &str,
        f: impl FnOnce(&mut Store<Sandbox>, &B) -> wasmtime::Result<Result<R, WitError>>,
    ) -> Result<R, PluginError> {
        let taken = self.free.lock().unwrap().pop();
        let (mut store, inst) = match taken {
            Some(x) => x,
            None => {
                let mut store = self.new_store();
                Self::begin(&mut store);
                match (self.make)(&mut store) {
                    Ok(Ok(b)) => (store, b),
                    Ok(Err(e)) => return Err(wit_error(&self.label, e)),
                    Err(trap) => return Err(self.crash(&store, "instantiate", trap)),
                }
            }
        };
        Self::begin(&mut store);
        match f(&mut store, &inst) {
            Ok(r) => {
                self.free.lock().unwrap().push((store, inst));
                r.map_err(|e| wit_error(&self.label, e))
            }
            Err(trap) => Err(self.crash(&store, op, trap)),
        }
    }

    fn crash(&self, store: &Store<Sandbox>, op: &str, trap: wasmtime::Error) -> PluginError {
        let s = store.data();
        let message = if s.timed_out {
            format!("plugin {} ran past its CPU deadline of {:?} in {op}", self.label, s.cpu)
        } else if s.limiter.hit {
            format!(
                "plugin {} exceeded its memory limit of {} MiB in {op}",
                self.label,
                s.limiter.cap >> 20
            )
        } else {
            let code = trap
                .downcast_ref::<wasmtime::Trap>()
                .map(|t| t.to_string())
                .unwrap_or_else(|| first_line(&trap));
            match panic_message(&String::from_utf8_lossy(&s.stderr.contents())) {
                Some(p) => format!("plugin {} trapped in {op}: {p}", self.label),
                None => format!("plugin {} trapped in {op}: {code}", self.label),
            }
        };
        PluginError::new(ErrorClass::Crashed, message)
    }
}

/// The panic a Rust guest wrote to its stderr: "panicked at FILE:LINE: MESSAGE".
fn panic_message(stderr: &str) -> Option<String> {
    let mut lines = stderr.lines();
    let at = lines.find(|l| l.contains("panicked at"))?;
    let place = at.split("panicked at").nth(1)?.trim().trim_end_matches(':');
    let msg = lines.next().unwrap_or("").trim();
    Some(format!("panicked at {place}: {msg}"))
}

fn first_line(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or("").to_string()
}

/// A guest's typed error as the core's.
fn wit_error(label: &str, e: WitError) -> PluginError {
    let (class, m) = match e {
        WitError::NotFound(m) => (ErrorClass::NotFound, m),
        WitError::Unauthorized(m) => (ErrorClass::Unauthorized, m),
        WitError::Denied(m) => (ErrorClass::Denied, m),
        WitError::Unsupported(m) => (ErrorClass::Unsupported, m),
        WitError::Unreachable(m) => (ErrorClass::Unreachable, m),
        WitError::Transient(m) => (ErrorClass::Transient, m),
        WitError::Invalid(m) => (ErrorClass::Invalid, m),
        WitError::Internal(m) => (ErrorClass::Internal, format!("plugin {label}: {m}")),
    };
    PluginError::new(class, m)
}

use std::os::unix::fs::DirBuilderExt;
