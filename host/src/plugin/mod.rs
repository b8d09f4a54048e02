//! The plugin host: loads WebAssembly components, checks their contract
//! version, compiles each once (caching the artefact under the store root),
//! and runs every call in a sandbox.
//!
//! The sandbox of a plugin instance:
//! - a memory cap on the sum of all its memories and tables, and caps on
//!   how many instances, memories and tables it may make (a `ResourceLimiter`);
//! - a CPU deadline per call (epoch interruption, counting time in the guest,
//!   including time it sleeps through WASI clocks; a sleep is cut short at
//!   the deadline, so a sleeping guest cannot outlast it);
//! - a wall-clock deadline per call, which also bounds the host work the
//!   guest starts: every host call checks it on entry, and long host
//!   operations (unpack, copy, changes, disk usage) check it as they go;
//! - a cap on live host-owned handles (streams, packs, HTTP bodies);
//! - WASI with no preopened directory, no sockets and no environment, and
//!   only the capabilities its world imports — `http` filtered per call and
//!   per hop, or `fs` confined to the driver's home.
//!
//! A trap, a deadline or a limit fails that one call with a clear error and
//! throws the instance away; the host and the store carry on.

mod any;
pub mod bindings;
mod driver;
mod host_impls;
mod native;
mod priority;
pub use priority::Busy;
mod transport;

pub use any::AnyDriver;
pub use driver::WasmDriver;
pub use native::{describe_native, is_native, NativeDriver, NativeLoadError};
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
/// The contract's version, read from the WIT package line at build time.
pub const CONTRACT_VERSION: &str = env!("GANTRY_CONTRACT_VERSION");
/// The oldest version still loaded: the oldest frozen `wit/since_v*/`.
pub const CONTRACT_OLDEST: &str = env!("GANTRY_CONTRACT_OLDEST");

/// Whether a guest built against contract `version` loads in this host.
///
/// Versions on the host's 0.x track (or, from 1.0, its major) only add
/// imports the guest may ignore, so wasmtime links an older guest to the
/// newer host interfaces by semver: no conversion is needed on the track.
/// A guest newer than the host, older than the oldest frozen version, or on
/// another track is refused before it is instantiated.
pub fn contract_accepts(version: &str) -> bool {
    fn parse(v: &str) -> Option<(u64, u64, u64)> {
        let mut it = v.split('.').map(|n| n.parse::<u64>().ok());
        let r = (it.next()??, it.next()??, it.next()??);
        it.next().is_none().then_some(r)
    }
    let (Some(v), Some(lo), Some(hi)) = (parse(version), parse(CONTRACT_OLDEST), parse(CONTRACT_VERSION)) else {
        return false;
    };
    let track = |x: (u64, u64, u64)| if x.0 == 0 { (0, x.1) } else { (x.0, 0) };
    track(v) == track(hi) && lo <= v && v <= hi
}

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
    #[error("plugin {name} was built against {CONTRACT}@{found}, this gantry loads {CONTRACT}@{CONTRACT_OLDEST} to {CONTRACT_VERSION}")]
    Version { name: String, found: String },
    #[error("plugin {name} is not a {kind} component (it exports no {CONTRACT}/{kind})")]
    Kind { name: String, kind: &'static str },
    #[error("plugin {name}: cannot link: {message}")]
    Link { name: String, message: String },
    #[error("starting the WebAssembly engine: {0}")]
    Engine(String),
}

/// Sandbox limits of every instance of one plugin.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// All linear memories and tables of an instance together.
    pub memory_bytes: usize,
    /// Guest time one call may use (computing or sleeping).
    pub cpu: Duration,
    /// Time one call may take in all, host work it started included.
    pub wall: Duration,
    /// Host-owned handles (streams) an instance may hold at once.
    pub handles: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            cpu: Duration::from_secs(10),
            wall: Duration::from_secs(300),
            handles: 64,
        }
    }
}

/// Core instances, memories and tables one plugin instance may create: a
/// component built by the kit needs a handful.
const MAX_CORE_INSTANCES: usize = 32;
const MAX_MEMORIES: usize = 8;
const MAX_TABLES: usize = 32;
/// What one table element is counted as against the memory cap.
const TABLE_ELEMENT_BYTES: usize = 16;

/// The memory cap, counted over every memory and table of the instance.
struct MemoryCap {
    cap: usize,
    /// Bytes of all memories and tables as they stand.
    total: usize,
    hit: bool,
}

impl MemoryCap {
    fn grow(&mut self, current: usize, desired: usize) -> bool {
        let next = self.total.saturating_sub(current).saturating_add(desired);
        if next > self.cap {
            self.hit = true;
            return false;
        }
        self.total = next;
        true
    }
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(&mut self, current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        Ok(self.grow(current, desired))
    }

    fn table_growing(&mut self, current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        Ok(self.grow(
            current.saturating_mul(TABLE_ELEMENT_BYTES),
            desired.saturating_mul(TABLE_ELEMENT_BYTES),
        ))
    }

    fn instances(&self) -> usize {
        MAX_CORE_INSTANCES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }
}

/// Which deadline a call ran past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    Cpu,
    Wall,
}

/// The monotonic clock a guest sees: nanoseconds since its sandbox was
/// made. The host knows its epoch, so it can bound a guest's sleep.
#[derive(Clone, Copy)]
struct SandboxClock(Instant);

impl wasmtime_wasi::HostMonotonicClock for SandboxClock {
    fn resolution(&self) -> u64 {
        1
    }
    fn now(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

thread_local! {
    /// The wall-clock deadline of the plugin call this thread is serving,
    /// while it does host work for it.
    static HOST_DEADLINE: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// Fails once the plugin call this thread is working for is past its
/// wall-clock deadline; long host operations call it as they go.
pub fn check_deadline() -> std::io::Result<()> {
    match HOST_DEADLINE.get() {
        Some(d) if Instant::now() > d => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the plugin call ran past its wall-clock deadline",
        )),
        _ => Ok(()),
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
    clock: SandboxClock,
    call_start: Instant,
    /// Time spent in host functions during the current call (not guest CPU).
    host_time: Duration,
    limits: Limits,
    timed_out: Option<Cut>,
    /// Host-owned handles the guest holds now.
    handles: usize,
    /// A limit the current call ran into (the call fails with it).
    limit_hit: Option<String>,
    /// For transports: what the current call may reach over HTTP.
    pub(crate) http_scope: Option<crate::http::CallScope>,
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
        let clock = SandboxClock(Instant::now());
        // No preopens, no env, no args, no network: WASI only for std's needs.
        let wasi = WasiCtxBuilder::new()
            .stderr(stderr.clone())
            .monotonic_clock(clock)
            .allow_tcp(false)
            .allow_udp(false)
            .build();
        Sandbox {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryCap {
                cap: limits.memory_bytes,
                total: 0,
                hit: false,
            },
            stderr,
            http,
            home,
            clock,
            call_start: Instant::now(),
            host_time: Duration::ZERO,
            limits,
            timed_out: None,
            handles: 0,
            limit_hit: None,
            http_scope: None,
        }
    }

    /// The deadline the current call is past, if any.
    fn past_deadline(&self) -> Option<Cut> {
        let wall = self.call_start.elapsed();
        if wall > self.limits.wall {
            Some(Cut::Wall)
        } else if wall.saturating_sub(self.host_time) > self.limits.cpu {
            Some(Cut::Cpu)
        } else {
            None
        }
    }

    /// How long the guest may still sleep in this call.
    fn sleep_left(&self) -> Duration {
        let wall = self.call_start.elapsed();
        let guest = wall.saturating_sub(self.host_time);
        (self.limits.cpu.saturating_sub(guest)).min(self.limits.wall.saturating_sub(wall))
    }

    /// Runs host work for the guest: refused once the call is past its
    /// deadline, bounded by the wall-clock deadline while it runs, and kept
    /// out of the guest's CPU budget.
    fn host<R>(&mut self, f: impl FnOnce(&mut Self) -> Result<R, WitError>) -> Result<R, WitError> {
        if let Some(cut) = self.past_deadline() {
            self.timed_out = Some(cut);
            return Err(WitError::Internal("the plugin call is past its deadline".into()));
        }
        let t = Instant::now();
        let before = HOST_DEADLINE.replace(Some(self.call_start + self.limits.wall));
        // Host work at the thread's own priority, guest code below it.
        let in_guest = priority::leave_guest();
        let r = f(self);
        if in_guest {
            priority::enter_guest();
        }
        HOST_DEADLINE.set(before);
        self.host_time += t.elapsed();
        if r.is_err() && self.call_start.elapsed() > self.limits.wall {
            self.timed_out = Some(Cut::Wall);
        }
        r
    }

    /// Hands a host-owned stream to the guest, within the handle cap.
    pub(crate) fn push_stream(&mut self, s: ByteStream) -> Result<wasmtime::component::Resource<ByteStream>, WitError> {
        if self.handles >= self.limits.handles {
            let msg = format!("holds more than {} open handles", self.limits.handles);
            self.limit_hit = Some(msg.clone());
            return Err(WitError::Denied(format!("the plugin {msg}")));
        }
        let r = self.table.push(s).map_err(|e| WitError::Internal(e.to_string()))?;
        self.handles += 1;
        Ok(r)
    }

    /// Takes a stream back from the guest (or drops it).
    pub(crate) fn take_stream(&mut self, r: wasmtime::component::Resource<ByteStream>) -> wasmtime::Result<ByteStream> {
        let s = self.table.delete(r)?;
        self.handles = self.handles.saturating_sub(1);
        Ok(s)
    }

    /// Takes back the stream a guest's call returned: its bytes never
    /// entered the guest.
    fn stream_returned(
        &mut self,
        r: Result<wasmtime::component::Resource<ByteStream>, WitError>,
    ) -> wasmtime::Result<Result<gantry_core::plugin::ByteStream, WitError>> {
        Ok(match r {
            Ok(res) => Ok(self.take_stream(res)?.0),
            Err(e) => Err(e),
        })
    }
}

/// Lends host-owned `stream` to the guest for call `f` as a borrowed
/// handle (the guest reads it, never owns it); what it left unread comes back.
fn lend<R>(
    store: &mut Store<Sandbox>,
    stream: gantry_core::plugin::ByteStream,
    f: impl FnOnce(&mut Store<Sandbox>, wasmtime::component::Resource<ByteStream>) -> wasmtime::Result<R>,
) -> wasmtime::Result<(R, ByteStream)> {
    let own = store.data_mut().table.push(ByteStream(stream))?;
    let borrow = wasmtime::component::Resource::<ByteStream>::new_borrow(own.rep());
    let r = f(&mut *store, borrow)?;
    let rest = store.data_mut().table.delete(own)?;
    Ok((r, rest))
}

/// A driver answered `get` with a path the host will not open.
fn bad_path(driver: &str, rel: &str, e: std::io::Error) -> PluginError {
    PluginError::new(
        ErrorClass::Invalid,
        format!("driver {driver} returned a bad path {rel:?}: {e}"),
    )
}

/// A sleep the host cut to the call's deadline.
struct Sleep(tokio::time::Instant);

#[wasmtime_wasi::async_trait]
impl wasmtime_wasi::p2::Pollable for Sleep {
    async fn ready(&mut self) {
        tokio::time::sleep_until(self.0).await
    }
}

/// The WASI clock package this host links, whose sleeps it bounds.
const WASI_MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// Replaces WASI's `subscribe-duration` and `subscribe-instant` with
/// versions that end no later than the call's deadline: a guest blocked in
/// a sleep is not interruptible by epochs, so its sleep must not outlast
/// the deadline. The time slept counts as the guest's.
fn bound_sleeps(linker: &mut Linker<Sandbox>) -> wasmtime::Result<()> {
    use wasmtime::component::Resource;
    use wasmtime_wasi::p2::DynPollable;
    fn sleep(s: &mut Sandbox, nanos: u64) -> wasmtime::Result<Resource<DynPollable>> {
        let d = Duration::from_nanos(nanos).min(s.sleep_left());
        let r = s.table.push(Sleep(tokio::time::Instant::now() + d))?;
        wasmtime_wasi::p2::subscribe(&mut s.table, r)
    }
    linker.allow_shadowing(true);
    let mut clock = linker.instance(WASI_MONOTONIC_CLOCK)?;
    clock.func_wrap("subscribe-duration", |mut cx, (nanos,): (u64,)| {
        Ok((sleep(cx.data_mut(), nanos)?,))
    })?;
    clock.func_wrap("subscribe-instant", |mut cx, (when,): (u64,)| {
        let s = cx.data_mut();
        let now = wasmtime_wasi::HostMonotonicClock::now(&s.clock);
        Ok((sleep(s, when.saturating_sub(now))?,))
    })?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Shared engine, with a ticker driving epoch deadlines.
pub struct PluginHost {
    engine: Engine,
    cache_dir: PathBuf,
    /// The tenant this host's plugins run for (one per `Context`).
    tenancy: Arc<priority::Tenancy>,
}

const TICK: Duration = Duration::from_millis(10);

impl PluginHost {
    pub fn new(cache_dir: &Path) -> Result<PluginHost, LoadError> {
        Ok(Self::with_engine(Self::build_engine()?, cache_dir))
    }

    /// The engine every plugin of a host runs in. Building it takes a few
    /// milliseconds (the compiler's settings for this CPU), so a caller
    /// with other work to do first can build it on another thread.
    pub fn build_engine() -> Result<Engine, LoadError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        Engine::new(&config).map_err(|e| LoadError::Engine(e.to_string()))
    }

    /// A host running its plugins in `engine` (from [`PluginHost::build_engine`]).
    pub fn with_engine(engine: Engine, cache_dir: &Path) -> PluginHost {
        let weak = engine.weak();
        std::thread::spawn(move || loop {
            std::thread::sleep(TICK);
            match weak.upgrade() {
                Some(e) => e.increment_epoch(),
                None => return,
            }
        });
        PluginHost {
            engine,
            cache_dir: cache_dir.to_path_buf(),
            tenancy: Default::default(),
        }
    }

    /// Marks an operation of this host's tenant in flight until the guard
    /// drops: meanwhile every other tenant's guest code runs only a share
    /// of the time (see `priority`).
    pub fn busy(&self) -> Busy {
        self.tenancy.busy()
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Loads and compiles (or fetches from the cache) the component at `path`.
    pub(crate) fn component(&self, name: &str, path: &Path) -> Result<Component, LoadError> {
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
                if !contract_accepts(found) {
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
        bound_sleeps(&mut linker).map_err(|e| link_err(e.to_string()))?;
        add(&mut linker).map_err(|e| link_err(e.to_string()))?;
        linker.instantiate_pre(&c).map_err(|e| link_err(first_line(&e)))
    }
}

/// Whose calls an instance has served: the credentials a transport call
/// carried, as a salted fingerprint the host computes ([`Identity::of`]),
/// or [`Identity::NONE`] for calls that carry none (drivers, anonymous
/// pulls). An instance keeps what its guest learnt (a transport caches
/// tokens), so it only ever serves one identity: whatever a plugin caches,
/// one client's access can never answer another client's call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Identity([u8; 32]);

impl Identity {
    pub(crate) const NONE: Identity = Identity([0; 32]);

    /// The fingerprint of `parts` under `salt` (each part length-prefixed,
    /// so no two different credential sets run together alike).
    pub(crate) fn of(salt: &[u8], parts: &[Option<&str>]) -> Identity {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(salt);
        for p in parts {
            match p {
                Some(p) => {
                    h.update([1]);
                    h.update((p.len() as u64).to_le_bytes());
                    h.update(p.as_bytes());
                }
                None => h.update([0]),
            }
        }
        Identity(h.finalize().into())
    }
}

/// Idle instances a pool keeps (the oldest goes first): enough for a few
/// clients' concurrent downloads, and a bound however many identities
/// clients bring.
const MAX_IDLE: usize = 16;

/// A pool of ready instances of one plugin; a call takes one of its
/// identity (or makes one), and a trapped instance is dropped instead of
/// returned.
struct Pool<B> {
    label: String,
    engine: Engine,
    tenancy: Arc<priority::Tenancy>,
    limits: Limits,
    http: Option<Arc<HttpPolicy>>,
    home: Option<Arc<Home>>,
    make: Make<B>,
    /// Idle instances, oldest first, each with the identity it served.
    free: Mutex<std::collections::VecDeque<(Identity, Store<Sandbox>, B)>>,
}

/// How a pool makes a ready instance in a fresh store.
type Make<B> = Box<dyn Fn(&mut Store<Sandbox>) -> wasmtime::Result<Result<B, WitError>> + Send + Sync>;

impl<B> Pool<B> {
    /// A pool of `host`'s, labelled `label` in errors, of instances `make` makes.
    fn new(
        host: &PluginHost,
        label: String,
        limits: Limits,
        http: Option<Arc<HttpPolicy>>,
        home: Option<Arc<Home>>,
        make: Make<B>,
    ) -> Pool<B> {
        Pool {
            label,
            engine: host.engine.clone(),
            tenancy: host.tenancy.clone(),
            limits,
            http,
            home,
            make,
            free: Default::default(),
        }
    }

    fn new_store(&self) -> Store<Sandbox> {
        let mut store = Store::new(
            &self.engine,
            Sandbox::new(self.limits, self.http.clone(), self.home.clone()),
        );
        store.limiter(|s| &mut s.limiter);
        let tenancy = self.tenancy.clone();
        store.epoch_deadline_callback(move |mut ctx| {
            let s = ctx.data_mut();
            if let Some(cut) = s.past_deadline() {
                s.timed_out = Some(cut);
                return Err(wasmtime::Trap::Interrupt.into());
            }
            priority::guest_computes();
            let guest_time = s.call_start.elapsed().saturating_sub(s.host_time);
            if guest_time > priority::SHARE_GRACE && tenancy.others_busy() {
                // A long computation while another tenant is working: give
                // way for the rest of the period (not counted as the guest's
                // CPU time), within the wall limit.
                let wait = (priority::SHARE_PERIOD - TICK).min(s.limits.wall.saturating_sub(s.call_start.elapsed()));
                std::thread::sleep(wait);
                s.host_time += wait;
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
        s.timed_out = None;
        s.limit_hit = None;
        s.http_scope = None;
        store.set_epoch_deadline(1);
    }

    /// Runs `op` on an instance, mapping guest errors and traps.
    fn call<R>(
        &self,
        op: &str,
        f: impl FnOnce(&mut Store<Sandbox>, &B) -> wasmtime::Result<Result<R, WitError>>,
    ) -> Result<R, PluginError> {
        self.call_as(Identity::NONE, op, f)
    }

    /// Runs `op` on an instance that has served `who` only (or a new one).
    fn call_as<R>(
        &self,
        who: Identity,
        op: &str,
        f: impl FnOnce(&mut Store<Sandbox>, &B) -> wasmtime::Result<Result<R, WitError>>,
    ) -> Result<R, PluginError> {
        let taken = {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            // The most recently used of its identity: its caches are warm.
            let i = free.iter().rposition(|(id, _, _)| *id == who);
            i.and_then(|i| free.remove(i)).map(|(_, s, b)| (s, b))
        };
        let (mut store, inst) = match taken {
            Some(x) => x,
            None => {
                let mut store = self.new_store();
                Self::begin(&mut store);
                priority::enter_guest();
                let made = (self.make)(&mut store);
                priority::leave_guest();
                match made {
                    Ok(Ok(b)) => (store, b),
                    Ok(Err(e)) => return Err(wit_error(&self.label, e)),
                    Err(trap) => return Err(self.crash(&store, "instantiate", trap)),
                }
            }
        };
        Self::begin(&mut store);
        priority::enter_guest();
        let result = f(&mut store, &inst);
        priority::leave_guest();
        match result {
            // A call that ran into a deadline or a limit fails with it, whatever
            // the guest made of the error it got, and its instance goes.
            Ok(_) if store.data().timed_out.is_some() || store.data().limit_hit.is_some() => {
                Err(self.crash(&store, op, wasmtime::Trap::Interrupt.into()))
            }
            Ok(r) => {
                store.data_mut().http_scope = None;
                let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
                free.push_back((who, store, inst));
                let evicted: Vec<_> = (MAX_IDLE..free.len()).filter_map(|_| free.pop_front()).collect();
                drop(free);
                drop(evicted);
                r.map_err(|e| wit_error(&self.label, e))
            }
            Err(trap) => Err(self.crash(&store, op, trap)),
        }
    }

    fn crash(&self, store: &Store<Sandbox>, op: &str, trap: wasmtime::Error) -> PluginError {
        let s = store.data();
        let message = if s.timed_out == Some(Cut::Cpu) {
            format!(
                "plugin {} ran past its CPU deadline of {:?} in {op}",
                self.label, s.limits.cpu
            )
        } else if s.timed_out == Some(Cut::Wall) {
            format!(
                "plugin {} ran past its wall-clock deadline of {:?} in {op}",
                self.label, s.limits.wall
            )
        } else if let Some(limit) = &s.limit_hit {
            format!("plugin {} {limit} in {op}", self.label)
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
        let class = if s.timed_out == Some(Cut::Wall) {
            ErrorClass::TimedOut
        } else {
            ErrorClass::Crashed
        };
        PluginError::new(class, message)
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
pub(crate) fn wit_error(label: &str, e: WitError) -> PluginError {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A component whose every memory is under the cap but whose memories
    /// together are over it: the cap counts them all.
    #[test]
    fn the_memory_cap_counts_every_memory_of_an_instance() {
        let engine = Engine::new(Config::new().wasm_component_model(true)).unwrap();
        let limits = Limits {
            memory_bytes: 64 << 20,
            ..Limits::default()
        };
        let instantiate = |copies: usize, pages: usize| {
            let mut text = format!("(component (core module $m (memory {pages}))");
            for i in 0..copies {
                text.push_str(&format!(" (core instance $i{i} (instantiate $m))"));
            }
            text.push(')');
            let c = Component::new(&engine, wat::parse_str(&text).unwrap()).unwrap();
            let mut store = Store::new(&engine, Sandbox::new(limits, None, None));
            store.limiter(|s| &mut s.limiter);
            let r = Linker::<Sandbox>::new(&engine).instantiate(&mut store, &c).map(|_| ());
            (r, store.data().limiter.hit)
        };
        // 200 pages = 12.5 MiB per memory.
        let (ok, hit) = instantiate(4, 200);
        assert!(ok.is_ok() && !hit, "four memories fit: {ok:?}");
        let (err, hit) = instantiate(6, 200);
        assert!(err.is_err() && hit, "six memories of 12.5 MiB are over 64 MiB");
        let (ok, _) = instantiate(MAX_MEMORIES, 1);
        assert!(ok.is_ok(), "{ok:?}");
        let (err, hit) = instantiate(MAX_MEMORIES + 1, 1);
        assert!(err.is_err() && !hit, "more memories than allowed, however small");
    }

    /// A guest that computes is niced by the epoch callback within a tick or
    /// two, and its thread is back at its own priority when the call ends
    /// (here at its CPU deadline).
    #[test]
    fn a_computing_guest_is_niced_and_its_thread_restored() {
        let host = PluginHost::new(Path::new("/nonexistent")).unwrap();
        let text = r#"(component
            (core module $m (func (export "spin") (loop $l (br $l))))
            (core instance $i (instantiate $m))
            (func (export "spin") (canon lift (core func $i "spin"))))"#;
        let component = Component::new(&host.engine, wat::parse_str(text).unwrap()).unwrap();
        let pre = Linker::<Sandbox>::new(&host.engine)
            .instantiate_pre(&component)
            .unwrap();
        let limits = Limits {
            cpu: Duration::from_secs(1),
            ..Limits::default()
        };
        let pool = Pool::new(
            &host,
            "test/spin".into(),
            limits,
            None,
            None,
            Box::new(move |store| {
                let i = pre.instantiate(&mut *store)?;
                Ok(Ok(i.get_typed_func::<(), ()>(&mut *store, "spin")?))
            }),
        );
        let prio = |t| rustix::process::getpriority_process(Some(t)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            let spinner = s.spawn(|| {
                let me = priority::tid();
                let before = prio(me);
                tx.send((me, before)).unwrap();
                let r = pool.call("spin", |store, f| Ok(Ok(f.call(&mut *store, ())?)));
                (r, before, prio(me))
            });
            let (tid, before) = rx.recv().unwrap();
            // Watched until it is niced or the call ends.
            let mut inside = before;
            while !spinner.is_finished() && inside == before {
                std::thread::sleep(Duration::from_millis(5));
                // The thread may have ended since.
                match rustix::process::getpriority_process(Some(tid)) {
                    Ok(p) => inside = p,
                    Err(_) => break,
                }
            }
            let (r, before_again, after) = spinner.join().unwrap();
            assert!(r.unwrap_err().message.contains("CPU deadline"));
            assert_eq!(before, before_again);
            assert_eq!(after, before, "back at its own priority");
            if priority::can_restore() {
                assert_eq!(inside, before + priority::GUEST_NICE, "niced while it computes");
            } else {
                assert_eq!(inside, before);
            }
        });
    }
}
