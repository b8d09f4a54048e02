//! gantry-http: the HTTP plumbing gantry's faces share, written once.
//!
//! - [`server`]: the accept loop both servers (`gantry serve`, `gantry
//!   daemon`) run: bounded request heads read in time, a connection cap,
//!   a graceful stop on SIGTERM/SIGINT; and [`server::raise_file_limit`].
//! - [`query`]: query parameters and percent-decoded path segments.
//! - [`body`]: a response or request body fed through a channel.
//! - [`client`]: the one place outbound connections are built (hyper,
//!   rustls), each hop checked by the core's [`gantry_core::endpoint::HopPolicy`]:
//!   redirects, the registry's own address, the resolver that keeps only
//!   what a hop may reach. Both the plugin host's HTTP ([`policy`]) and
//!   the registry mirror's upstream requests go through it.
//! - [`connect`], [`trust`], [`proxy`], [`network`]: how a connection is
//!   opened — the system trust store and `certs.d` (CAs, client
//!   certificates), insecure registries, forward proxies (`HTTPS_PROXY`,
//!   `NO_PROXY`), the config's `[network]` table.
//! - [`policy`]: the synchronous, call-scoped client transport plugins
//!   reach through the host (methods, headers, origins, realm learning).
//!
//! It never depends on wasmtime: the servers use it without the plugin
//! host.

pub mod body;
pub mod client;
pub mod connect;
pub mod network;
pub mod policy;
pub mod proxy;
pub mod query;
pub mod server;
pub mod trust;

pub use network::{Network, NetworkConfig};

pub use gantry_challenge as challenge;
