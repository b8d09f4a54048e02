//! gantry-host, the library under the `gantry` binary: the sandboxed plugin
//! host (wasmtime, contract checks, limits), the confined file system
//! drivers work through, and the HTTP policy transports send through.
//!
//! The CLI is one face of it; `gantry serve` and `gantry daemon` will be
//! others, so nothing here knows about commands, terminals or the config
//! file's shape. Errors are typed per layer (`LoadError`, the WIT error);
//! `anyhow` stays in the binary.

pub mod confined;
pub mod conformance;
pub mod drivers;
pub mod http;
pub mod plugin;
pub mod registry;
