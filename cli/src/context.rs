//! What every command starts from: the config, the store, and the plugin
//! registry. Plugins load lazily: a command that needs no driver (`images`,
//! `inspect`, `tag`) runs even when the driver fails to load, and the
//! failure is reported by the first command that needs it.

use crate::config::Config;
use anyhow::{anyhow, Context as _, Result};
use gantry_core::store::Store;
use gantry_host::plugin::{AnyDriver, NativeDriver, PluginHost, WasmDriver, WasmTransport};
use gantry_host::registry::{Entry, Kind, Runtime};
use std::path::Path;
use std::sync::OnceLock;

pub struct Context {
    pub config: Config,
    pub store: Store,
    /// What start-up cleaning removed (left by a crash).
    pub cleared: Vec<String>,
    /// Whether this process was alone on the store when it opened it (and
    /// so could clear what a crash left).
    pub alone: bool,
    pub host: PluginHost,
    driver: OnceLock<std::result::Result<AnyDriver, String>>,
    /// The transport, loaded once and shared by every pull and push of
    /// this process (its instance pool and connections with it).
    transport: OnceLock<std::result::Result<std::sync::Arc<WasmTransport>, String>>,
    /// Blob downloads shared by every pull of this process: two daemon
    /// clients pulling the same image fetch each blob once.
    downloads: gantry_core::pull::DownloadPool,
    /// Trust, client certificates and proxies of every outbound
    /// connection, built once from the config.
    network: OnceLock<std::sync::Arc<gantry_http::Network>>,
    /// Whether credentials may come from the environment's Docker config
    /// (`$DOCKER_CONFIG`, `~/.docker`) when the config names no
    /// `auth_file`: the CLI's user runs it as themself; a daemon serves
    /// others, so it never does (see [`Context::credentials`]).
    pub credentials_from_environment: bool,
}

impl Context {
    pub fn open(config_path: Option<&Path>, root: &Path) -> Result<Context> {
        // Built while the config and the store open.
        let engine = std::thread::spawn(PluginHost::build_engine);
        let mut config = Config::load(config_path)?;
        if config.driver.kind == "auto" {
            let choice = gantry_host::drivers::choose(root).map_err(|e| anyhow!(e))?;
            if let Some(notice) = &choice.notice {
                eprintln!("gantry: {notice}");
            }
            config.driver.kind = choice.driver;
        }
        let (store, alone) = Store::open(root, &config.driver.kind).context("opening the store")?;
        store.set_durable(config.durable);
        store.set_keep_content(config.keep_content);
        if let Some(gib) = config.max_store_gib {
            store.set_quota(crate::config::gib_bytes(gib));
        }
        let cache = config
            .plugin_cache_dir
            .clone()
            .unwrap_or_else(|| store.root().join("plugins-cache"));
        let engine = engine
            .join()
            .map_err(|_| anyhow!("building the plugin engine panicked"))??;
        let host = PluginHost::with_engine(engine, &cache);
        let mut ctx = Context {
            config,
            store,
            cleared: Vec::new(),
            alone,
            host,
            driver: OnceLock::new(),
            transport: OnceLock::new(),
            downloads: Default::default(),
            network: OnceLock::new(),
            credentials_from_environment: true,
        };
        if alone {
            // Nobody else is using the store: clear what a crash left. The
            // driver is needed only when layers were left half made; if it
            // cannot load, they wait for a run where it can.
            // Mounts a killed process left in the driver's home.
            gantry_host::confined::clear_stale_mounts(&ctx.store.driver_home())
                .context("clearing mounts left behind")?;
            let mut cleared = gantry_core::fsck::clear_spools(&ctx.store).context("clearing leftovers")?;
            if gantry_core::fsck::needs_sweep(&ctx.store)? {
                if let Ok(driver) = ctx.driver() {
                    cleared.extend(gantry_core::fsck::sweep(&ctx.store, driver).context("clearing leftovers")?);
                }
            }
            ctx.cleared = cleared;
        }
        ctx.store.share()?;
        Ok(ctx)
    }

    /// Gives the store a quota of `gib` GiB (a tenant's, over its config's).
    pub fn set_max_store_gib(&mut self, gib: f64) -> Result<()> {
        if !crate::config::valid_gib(gib) {
            anyhow::bail!("max_store_gib must be more than 0");
        }
        self.config.max_store_gib = Some(gib);
        self.store.set_quota(crate::config::gib_bytes(gib));
        Ok(())
    }

    /// The configured plugins, as registry entries.
    pub fn plugins(&self) -> Vec<(Entry, Result<std::path::PathBuf>)> {
        let mut out = Vec::new();
        for (kind, table, p) in [
            (Kind::Transport, "transport", &self.config.transport),
            (Kind::Driver, "driver", &self.config.driver),
        ] {
            let path = self.config.plugin_path(table, p);
            out.push((
                Entry {
                    kind,
                    id: p.kind.clone(),
                    runtime: p.runtime,
                    path: path.as_ref().cloned().unwrap_or_default(),
                    limits: p.limits.unwrap_or(self.config.limits).to_limits(),
                },
                path,
            ));
        }
        out
    }

    /// The graph driver, loaded on first use.
    pub fn driver(&self) -> Result<&AnyDriver> {
        self.driver
            .get_or_init(|| self.load_driver().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow!("{e}"))
    }

    /// A graph driver of the caller's own for the rest of the process
    /// (`serve --from-store` rebuilds layers through it on its threads).
    pub fn driver_for_process(&self) -> Result<&'static AnyDriver> {
        Ok(Box::leak(Box::new(self.load_driver()?)))
    }

    fn load_driver(&self) -> Result<AnyDriver> {
        let config = &self.config;
        let path = config.plugin_path("driver", &config.driver)?;
        let limits = config.driver.limits.unwrap_or(config.limits).to_limits();
        let options = config.driver.options.clone().into_iter().collect();
        if config.driver.runtime == Runtime::Native {
            return Ok(AnyDriver::Native(NativeDriver::load(
                &config.driver.kind,
                &path,
                &self.store.driver_home(),
                options,
                config.allow_native_plugins,
            )?));
        }
        Ok(AnyDriver::Wasm(WasmDriver::load(
            &self.host,
            &config.driver.kind,
            &path,
            &self.store.driver_home(),
            limits,
            options,
        )?))
    }

    /// Registry credentials by host, from the config's `auth_file`, else
    /// (the CLI only) the user's own Docker `config.json`. A daemon's
    /// clients and tenants never get the environment's login: theirs is
    /// what they send, or the `auth_file` their config names.
    pub fn credentials(
        &self,
    ) -> Result<impl Fn(&str) -> Result<Option<gantry_core::plugin::Credentials>, gantry_core::Error> + Sync> {
        let path = match &self.config.auth_file {
            Some(p) => Some(p.clone()),
            None if self.credentials_from_environment => crate::auth::default_path(),
            None => None,
        };
        let timeout = std::time::Duration::from_secs_f64(self.config.credential_helper_timeout_seconds);
        let auth = crate::auth::AuthFile::load(path.as_deref(), timeout, self.credentials_from_environment)?;
        Ok(move |domain: &str| auth.get(domain))
    }

    /// Runs `f` with a `Puller` wired to the configured transport, driver,
    /// registries and credentials.
    pub fn with_puller<R>(
        &self,
        progress: &dyn gantry_core::pull::Progress,
        options: gantry_core::pull::PullOptions,
        f: impl FnOnce(&gantry_core::pull::Puller<'_>) -> Result<R>,
    ) -> Result<R> {
        self.with_puller_auth(progress, options, None, f)
    }

    /// [`Context::with_puller`], with credentials a client sent for one
    /// registry (the daemon's `X-Registry-Auth`) used instead of the file's.
    pub fn with_puller_auth<R>(
        &self,
        progress: &dyn gantry_core::pull::Progress,
        options: gantry_core::pull::PullOptions,
        given: Option<(String, gantry_core::plugin::Credentials)>,
        f: impl FnOnce(&gantry_core::pull::Puller<'_>) -> Result<R>,
    ) -> Result<R> {
        // The driver loads while the transport does.
        let (transport, driver) = std::thread::scope(|s| {
            let driver = s.spawn(|| self.driver().map(|_| ()));
            (self.shared_transport(), driver.join())
        });
        let transport = transport?;
        driver.map_err(|_| anyhow!("loading the driver panicked"))??;
        // The v1 transport loads only when some registry enables v1.
        let v1 = if self.config.registries.values().any(|r| r.v1) {
            Some(self.v1_transport()?)
        } else {
            None
        };
        let from_file = self.credentials()?;
        let credentials = move |domain: &str| match &given {
            Some((d, c)) if d == domain => Ok(Some(c.clone())),
            _ => from_file(domain),
        };
        f(&gantry_core::pull::Puller {
            store: &self.store,
            transport: &*transport,
            v1_transport: v1.as_ref().map(|t| t as &dyn gantry_core::Transport),
            driver: self.driver()?,
            registries: &self.config.registries,
            credentials: &credentials,
            downloads: &self.downloads,
            progress,
            options,
        })
    }

    /// Pull options from the config (the platform is the caller's).
    pub fn pull_options(&self) -> gantry_core::pull::PullOptions {
        gantry_core::pull::PullOptions {
            max_concurrent_downloads: self.config.max_concurrent_downloads,
            max_layer_bytes: self.config.max_layer_size_mib << 20,
            max_depth: self.config.max_layer_depth,
            mirror_backoff: std::time::Duration::from_secs(self.config.mirror_backoff_seconds),
            ..Default::default()
        }
    }

    /// The legacy v1 transport (`gantry_transport_v1.wasm`, beside the
    /// configured one, with the `[transport]` limits).
    pub fn v1_transport(&self) -> Result<WasmTransport> {
        let table = crate::config::PluginConfig {
            limits: self.config.transport.limits,
            ..crate::config::PluginConfig::named("v1")
        };
        let path = self.config.plugin_path("transport", &table)?;
        let limits = table.limits.unwrap_or(self.config.limits).to_limits();
        Ok(WasmTransport::load(
            &self.host,
            "v1",
            &path,
            limits,
            self.config.registries.clone(),
            self.network(),
        )?)
    }

    /// How every outbound connection is made: the config's `[network]`
    /// table, the environment's proxies, the insecure registries.
    pub fn network(&self) -> std::sync::Arc<gantry_http::Network> {
        self.network
            .get_or_init(|| {
                std::sync::Arc::new(gantry_http::Network::new(&self.config.network, &self.config.registries))
            })
            .clone()
    }

    /// The configured transport, loaded on first use and kept.
    pub fn shared_transport(&self) -> Result<std::sync::Arc<WasmTransport>> {
        self.transport
            .get_or_init(|| self.transport().map(std::sync::Arc::new).map_err(|e| format!("{e:#}")))
            .clone()
            .map_err(|e| anyhow!(e))
    }

    pub fn transport(&self) -> Result<WasmTransport> {
        let path = self.config.plugin_path("transport", &self.config.transport)?;
        let limits = self.config.transport.limits.unwrap_or(self.config.limits).to_limits();
        Ok(WasmTransport::load(
            &self.host,
            &self.config.transport.kind,
            &path,
            limits,
            self.config.registries.clone(),
            self.network(),
        )?)
    }
}

/// The configured driver as a `GraphDriver` that loads it on its first
/// call: a command that turns out not to need it (an `rmi` of a name that
/// does not exist) never fails for want of it.
pub struct LazyDriver<'c>(pub &'c Context);

impl LazyDriver<'_> {
    fn get(&self) -> std::result::Result<&AnyDriver, gantry_core::PluginError> {
        self.0
            .driver()
            .map_err(|e| gantry_core::PluginError::new(gantry_core::ErrorClass::Crashed, format!("{e:#}")))
    }
}

impl gantry_core::GraphDriver for LazyDriver<'_> {
    fn name(&self) -> &str {
        &self.0.config.driver.kind
    }
    fn create(&self, id: &str, parent: Option<&str>) -> std::result::Result<(), gantry_core::PluginError> {
        self.get()?.create(id, parent)
    }
    fn remove(&self, id: &str) -> std::result::Result<(), gantry_core::PluginError> {
        self.get()?.remove(id)
    }
    fn exists(&self, id: &str) -> std::result::Result<bool, gantry_core::PluginError> {
        self.get()?.exists(id)
    }
    fn get(&self, id: &str) -> std::result::Result<std::os::fd::OwnedFd, gantry_core::PluginError> {
        LazyDriver::get(self)?.get(id)
    }
    fn put(&self, id: &str) -> std::result::Result<(), gantry_core::PluginError> {
        LazyDriver::get(self)?.put(id)
    }
    fn apply_diff(
        &self,
        id: &str,
        parent: Option<&str>,
        diff: gantry_core::plugin::ByteStream,
    ) -> std::result::Result<u64, gantry_core::PluginError> {
        LazyDriver::get(self)?.apply_diff(id, parent, diff)
    }
    fn diff(
        &self,
        id: &str,
        parent: Option<&str>,
    ) -> std::result::Result<gantry_core::plugin::ByteStream, gantry_core::PluginError> {
        LazyDriver::get(self)?.diff(id, parent)
    }
    fn status(&self) -> std::result::Result<Vec<(String, String)>, gantry_core::PluginError> {
        LazyDriver::get(self)?.status()
    }
}
