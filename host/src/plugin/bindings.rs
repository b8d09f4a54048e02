//! The one place `bindgen!` runs over `wit/`.
//!
//! The host owns the `byte-stream` resource (`with:`), so a stream's bytes
//! stay on the host side; the driver world reuses the transport world's
//! `types` interface so both share one resource table type.

pub mod transport {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "gantry:plugin/transport-plugin",
        with: {
            "gantry:plugin/types.byte-stream": crate::plugin::ByteStream,
        },
    });
}

pub mod driver {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "gantry:plugin/driver-plugin",
        with: {
            "gantry:plugin/types": super::transport::gantry::plugin::types,
        },
    });
}

pub use transport::gantry::plugin::types::Error as WitError;
