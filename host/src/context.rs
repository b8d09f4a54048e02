//! What every command starts from: the config, the store, and the plugins
//! loaded into their sandboxes.

use crate::config::Config;
use crate::plugin::{PluginHost, WasmDriver, WasmTransport};
use anyhow::{Context as _, Result};
use gantry_core::store::Store;
use std::path::Path;

pub struct Context {
    pub config: Config,
    pub store: Store,
    pub driver: WasmDriver,
    /// What start-up cleaning removed (left by a crash).
    pub cleared: Vec<String>,
    host: PluginHost,
}

impl Context {
    pub fn open(config_path: Option<&Path>, root: &Path) -> Result<Context> {
        let config = Config::load(config_path)?;
        let driver_path = config.plugin_path("driver", &config.driver)?;
        let (store, alone) = Store::open(root, &config.driver.kind).context("opening the store")?;
        store.set_durable(config.durable);
        let host = PluginHost::new(&store.root().join("plugins-cache"))?;
        let limits = config.driver.limits.unwrap_or(config.limits).to_limits();
        let options = config.driver.options.clone().into_iter().collect();
        let driver = WasmDriver::load(
            &host,
            &config.driver.kind,
            &driver_path,
            &store.driver_home(),
            limits,
            options,
        )?;
        let cleared = if alone {
            // Nobody else is using the store: clear what a crash left.
            gantry_core::fsck::collect_garbage(&store, &driver).context("clearing leftovers")?
        } else {
            Vec::new()
        };
        store.share()?;
        Ok(Context {
            config,
            store,
            driver,
            cleared,
            host,
        })
    }

    /// Registry credentials by host, from the configured Docker `config.json`.
    pub fn credentials(&self) -> Result<impl Fn(&str) -> Option<gantry_core::plugin::Credentials> + Sync> {
        let path = self.config.auth_file.clone().or_else(crate::auth::default_path);
        let auth = crate::auth::AuthFile::load(path.as_deref())?;
        Ok(move |domain: &str| auth.get(domain))
    }

    /// Pull options from the config (the platform is the caller's).
    pub fn pull_options(&self) -> gantry_core::pull::PullOptions {
        gantry_core::pull::PullOptions {
            max_concurrent_downloads: self.config.max_concurrent_downloads,
            max_layer_bytes: self.config.max_layer_size_mib << 20,
            max_depth: self.config.max_layer_depth,
            ..Default::default()
        }
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
        )?)
    }
}
