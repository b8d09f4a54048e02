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

/// A transport that pushes as well: the same imports, one more export.
pub mod transport_push {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "gantry:plugin/transport-push-plugin",
        with: {
            "gantry:plugin/types": super::transport::gantry::plugin::types,
            "gantry:plugin/http": super::transport::gantry::plugin::http,
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

/// A native plugin's error is the same variant on the wire.
impl From<gantry_native_abi::WireError> for WitError {
    fn from(e: gantry_native_abi::WireError) -> Self {
        use gantry_native_abi::WireError as W;
        match e {
            W::NotFound(m) => WitError::NotFound(m),
            W::Unauthorized(m) => WitError::Unauthorized(m),
            W::Denied(m) => WitError::Denied(m),
            W::Unsupported(m) => WitError::Unsupported(m),
            W::Unreachable(m) => WitError::Unreachable(m),
            W::Transient(m) => WitError::Transient(m),
            W::Invalid(m) => WitError::Invalid(m),
            W::Internal(m) => WitError::Internal(m),
        }
    }
}
