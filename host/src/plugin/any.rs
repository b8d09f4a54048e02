//! `AnyDriver`: one graph driver of either runtime, so the CLI, the
//! conformance suite and the coming daemon hold one type.

use super::{NativeDriver, WasmDriver};
use gantry_core::PluginError;

/// A graph driver of either runtime: a sandboxed component or a trusted
/// native library. What the core needs is `GraphDriver`; the rest is for
/// the conformance suite.
pub enum AnyDriver {
    Wasm(WasmDriver),
    Native(NativeDriver),
}

impl AnyDriver {
    fn inner(&self) -> &dyn gantry_core::GraphDriver {
        match self {
            AnyDriver::Wasm(d) => d,
            AnyDriver::Native(d) => d,
        }
    }

    pub fn create_read_write(&self, id: &str, parent: Option<&str>) -> Result<(), PluginError> {
        match self {
            AnyDriver::Wasm(d) => d.create_read_write(id, parent),
            AnyDriver::Native(d) => d.create_read_write(id, parent),
        }
    }

    pub fn changes(&self, id: &str, parent: Option<&str>) -> Result<Vec<(String, &'static str)>, PluginError> {
        match self {
            AnyDriver::Wasm(d) => d.changes(id, parent),
            AnyDriver::Native(d) => d.changes(id, parent),
        }
    }

    pub fn diff_size(&self, id: &str, parent: Option<&str>) -> Result<u64, PluginError> {
        match self {
            AnyDriver::Wasm(d) => d.diff_size(id, parent),
            AnyDriver::Native(d) => d.diff_size(id, parent),
        }
    }
}

impl gantry_core::GraphDriver for AnyDriver {
    fn name(&self) -> &str {
        self.inner().name()
    }
    fn create(&self, id: &str, parent: Option<&str>) -> Result<(), PluginError> {
        self.inner().create(id, parent)
    }
    fn remove(&self, id: &str) -> Result<(), PluginError> {
        self.inner().remove(id)
    }
    fn exists(&self, id: &str) -> Result<bool, PluginError> {
        self.inner().exists(id)
    }
    fn get(&self, id: &str) -> Result<std::os::fd::OwnedFd, PluginError> {
        self.inner().get(id)
    }
    fn put(&self, id: &str) -> Result<(), PluginError> {
        self.inner().put(id)
    }
    fn apply_diff(
        &self,
        id: &str,
        parent: Option<&str>,
        diff: gantry_core::plugin::ByteStream,
    ) -> Result<u64, PluginError> {
        self.inner().apply_diff(id, parent, diff)
    }
    fn diff(&self, id: &str, parent: Option<&str>) -> Result<gantry_core::plugin::ByteStream, PluginError> {
        self.inner().diff(id, parent)
    }
    fn status(&self) -> Result<Vec<(String, String)>, PluginError> {
        self.inner().status()
    }
}
