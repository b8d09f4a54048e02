//! gantry-host: the sandboxed plugin host (wasmtime, contract checks,
//! limits), the confined file system drivers work through, and the HTTP
//! policy transports send through.
//!
//! The `gantry` binary (`cli/`) puts it to work for every command; nothing
//! here knows about commands, terminals or the config file's shape, and
//! it is the only package of the workspace that reaches wasmtime (the
//! servers and the core never do: a tidy test says so). Errors are typed per layer (`LoadError`, the WIT error);
//! `anyhow` stays in the binary.

pub mod confined;
pub mod conformance;
pub mod drivers;
pub mod http;
pub mod plugin;
pub mod registry;
