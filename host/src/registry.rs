//! The plugin registry: every plugin is a typed entry — its kind
//! (`gantry.transport`, `gantry.driver`, after containerd's plugin types),
//! its id, its runtime, the component it comes from and its limits — and is
//! loaded only when something needs it. A plugin that fails to load is an
//! entry with its error; it takes nothing else down.

use crate::plugin::{Limits, LoadError, PluginHost, CONTRACT};
use std::path::PathBuf;

/// What a plugin is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Transport,
    Driver,
}

impl Kind {
    /// The type name shown to operators.
    pub fn type_name(self) -> &'static str {
        match self {
            Kind::Transport => "gantry.transport",
            Kind::Driver => "gantry.driver",
        }
    }

    /// The WIT interface a plugin of this kind exports.
    pub fn interface(self) -> &'static str {
        match self {
            Kind::Transport => "transport",
            Kind::Driver => "driver",
        }
    }
}

/// How a plugin runs (a plugin table's `runtime` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// A WebAssembly component in the sandbox.
    #[default]
    Wasm,
    /// A trusted shared library, in gantry's own process (no sandbox).
    Native,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Wasm => "wasm",
            Runtime::Native => "native",
        }
    }
}

/// One configured plugin.
#[derive(Debug, Clone)]
pub struct Entry {
    pub kind: Kind,
    /// The implementation's name (`v2`, `vfs`, a third party's).
    pub id: String,
    pub runtime: Runtime,
    pub path: PathBuf,
    pub limits: Limits,
}

/// What a component says about itself, read before it is instantiated.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ComponentInfo {
    /// `gantry.transport` or `gantry.driver`, if it exports either.
    pub kind: Option<&'static str>,
    /// The contract version its gantry imports and exports name.
    pub contract: Option<String>,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
}

impl PluginHost {
    /// Compiles (or fetches from the cache) the component at `path` and
    /// describes its worlds without instantiating it.
    pub fn describe(&self, path: &std::path::Path) -> Result<ComponentInfo, LoadError> {
        let name = path.display().to_string();
        let c = self.component(&name, path)?;
        let ty = c.component_type();
        let engine = self.engine();
        let imports: Vec<String> = ty.imports(engine).map(|(n, _)| n.to_string()).collect();
        let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
        let prefix = format!("{CONTRACT}/");
        let contract = imports
            .iter()
            .chain(&exports)
            .filter_map(|n| n.strip_prefix(&prefix))
            .filter_map(|rest| rest.split_once('@').map(|(_, v)| v.to_string()))
            .next();
        let kind = [Kind::Transport, Kind::Driver]
            .into_iter()
            .find(|k| {
                exports
                    .iter()
                    .any(|n| n.starts_with(&format!("{prefix}{}@", k.interface())))
            })
            .map(Kind::type_name);
        Ok(ComponentInfo {
            kind,
            contract,
            imports,
            exports,
        })
    }
}
