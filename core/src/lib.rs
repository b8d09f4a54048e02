//! gantry-core: the fixed, trusted part of gantry.
//!
//! It owns references, endpoint lookup, the pull pipeline (resolve → endpoint
//! loop → verify → register), digest and diffID verification, and the layer,
//! image and reference stores. It reaches the outside world only through the
//! [`Transport`] and [`GraphDriver`] traits, which the host implements over
//! sandboxed plugins. It must never depend on wasmtime or on the host, and it
//! never trusts a digest, size or path that a plugin hands it.

pub mod archive;
pub mod changes;
pub mod date;
pub mod digest;
pub mod endpoint;
pub mod error;
pub mod fsck;
pub mod images;
pub mod import;
pub mod layer_rules;
pub mod load;
pub mod manifest;
pub mod ownership;
pub mod pargz;
pub mod path;
pub mod platform;
pub mod plugin;
pub mod pull;
pub mod pull_v1;
pub mod push;
pub mod reference;
pub mod repair;
pub mod retry;
pub mod save;
pub mod stage;
pub mod store;
pub mod tarsplit;
pub mod text;
pub mod verify;

pub use digest::Digest;
pub use error::{Error, ErrorClass, PluginError};
pub use plugin::{GraphDriver, Transport};
pub use reference::Reference;
