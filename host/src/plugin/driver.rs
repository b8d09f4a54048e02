//! `WasmDriver`: the core's `GraphDriver` trait over a driver component.

use super::bindings::driver::{DriverPlugin, DriverPluginPre};
use super::{Limits, LoadError, PluginHost, Pool, Sandbox};
use crate::confined::Home;
use gantry_core::plugin::{ByteStream, GraphDriver};
use gantry_core::PluginError;
use std::path::Path;
use std::sync::Arc;
use wasmtime::component::HasSelf;

pub struct WasmDriver {
    name: String,
    pool: Pool<DriverPlugin>,
    home: Arc<Home>,
}

impl WasmDriver {
    /// Loads driver `name` with its home at `home` and `options` from the config.
    pub fn load(
        host: &PluginHost,
        name: &str,
        path: &Path,
        home: &Path,
        limits: Limits,
        options: Vec<(String, String)>,
    ) -> Result<Self, LoadError> {
        let pre = host.prepare(name, path, "driver", |l| {
            DriverPlugin::add_to_linker::<Sandbox, HasSelf<Sandbox>>(l, |s| s)
        })?;
        let pre = DriverPluginPre::new(pre).map_err(|e| LoadError::Link {
            name: name.to_string(),
            message: e.to_string(),
        })?;
        let home = Arc::new(Home::open(home).map_err(|source| LoadError::Read {
            name: name.to_string(),
            path: home.display().to_string(),
            source,
        })?);
        Ok(WasmDriver {
            name: name.to_string(),
            pool: Pool::new(
                host,
                format!("driver/{name}"),
                limits,
                None,
                Some(home.clone()),
                Box::new(move |store| {
                    let d = pre.instantiate(&mut *store)?;
                    Ok(d.gantry_plugin_driver().call_init(&mut *store, &options)?.map(|()| d))
                }),
            ),
            home,
        })
    }
}

/// What the core's `GraphDriver` trait leaves out, for the conformance
/// suite (and, later, container layers).
impl WasmDriver {
    pub fn create_read_write(&self, id: &str, parent: Option<&str>) -> Result<(), PluginError> {
        self.pool.call("create-read-write", |s, d| {
            d.gantry_plugin_driver().call_create_read_write(s, id, parent)
        })
    }

    /// What layer `id` changed relative to `parent`: (path, kind) with
    /// kind `modify`, `add` or `delete`.
    pub fn changes(&self, id: &str, parent: Option<&str>) -> Result<Vec<(String, &'static str)>, PluginError> {
        use super::bindings::driver::gantry::plugin::fs::ChangeKind;
        let list = self
            .pool
            .call("changes", |s, d| d.gantry_plugin_driver().call_changes(s, id, parent))?;
        Ok(list
            .into_iter()
            .map(|c| {
                let kind = match c.kind {
                    ChangeKind::Modify => "modify",
                    ChangeKind::Add => "add",
                    ChangeKind::Delete => "delete",
                };
                (c.path, kind)
            })
            .collect())
    }

    pub fn diff_size(&self, id: &str, parent: Option<&str>) -> Result<u64, PluginError> {
        self.pool.call("diff-size", |s, d| {
            d.gantry_plugin_driver().call_diff_size(s, id, parent)
        })
    }
}

impl GraphDriver for WasmDriver {
    fn name(&self) -> &str {
        &self.name
    }

    fn create(&self, id: &str, parent: Option<&str>) -> Result<(), PluginError> {
        self.pool
            .call("create", |s, d| d.gantry_plugin_driver().call_create(s, id, parent))
    }

    fn remove(&self, id: &str) -> Result<(), PluginError> {
        self.pool
            .call("remove", |s, d| d.gantry_plugin_driver().call_remove(s, id))
    }

    fn exists(&self, id: &str) -> Result<bool, PluginError> {
        self.pool
            .call("exists", |s, d| Ok(Ok(d.gantry_plugin_driver().call_exists(s, id)?)))
    }

    fn get(&self, id: &str) -> Result<std::os::fd::OwnedFd, PluginError> {
        let rel = self
            .pool
            .call("get", |s, d| d.gantry_plugin_driver().call_get(s, id, ""))?;
        // Opened by the host, beneath the home, without links: the handle
        // is what callers read through.
        self.home.dir(&rel).map_err(|e| super::bad_path(&self.name, &rel, e))
    }

    fn put(&self, id: &str) -> Result<(), PluginError> {
        self.pool.call("put", |s, d| d.gantry_plugin_driver().call_put(s, id))
    }

    fn apply_diff(&self, id: &str, parent: Option<&str>, diff: ByteStream) -> Result<u64, PluginError> {
        self.pool.call("apply-diff", |s, d| {
            let (r, mut rest) = super::lend(s, diff, |s, borrow| {
                d.gantry_plugin_driver().call_apply_diff(s, id, parent, borrow)
            })?;
            if r.is_ok() {
                // The diffID covers the whole stream: read what the driver left.
                if let Err(e) = std::io::copy(&mut rest.0, &mut std::io::sink()) {
                    return Ok(Err(super::host_impls::io_error(e)));
                }
            }
            Ok(r)
        })
    }

    fn diff(&self, id: &str, parent: Option<&str>) -> Result<ByteStream, PluginError> {
        self.pool.call("diff", |s, d| {
            let r = d.gantry_plugin_driver().call_diff(&mut *s, id, parent)?;
            s.data_mut().stream_returned(r)
        })
    }

    fn status(&self) -> Result<Vec<(String, String)>, PluginError> {
        self.pool
            .call("status", |s, d| Ok(Ok(d.gantry_plugin_driver().call_status(s)?)))
    }
}
