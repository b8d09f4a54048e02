//! Writing a registry transport: implement [`Transport`] (every method has a
//! default that says it is not implemented) and export it with
//! [`export_transport!`](crate::export_transport). HTTP goes only through
//! [`http`], which the host filters per call and per hop.

/// The generated bindings of the `transport-plugin` world.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "transport-plugin",
        runtime_path: "wit_bindgen::rt",
        pub_export_macro: true,
        export_macro_name: "export_world",
        default_bindings_module: "gantry_kit::transport::bindings",
    });
}

pub use bindings::exports::gantry::plugin::transport::{Credentials, Endpoint, Manifest, ProbeInfo, Resolved, V1Image};
pub use bindings::gantry::plugin::http;
pub use bindings::gantry::plugin::types::{ByteStream, Error};

fn not_implemented<T>(what: &str) -> Result<T, Error> {
    Err(Error::Unsupported(format!("{what} is not implemented")))
}

/// What a registry transport does. The host verifies every digest and size
/// of what it returns; `unsupported` lets the core fall back to the next
/// endpoint.
pub trait Transport {
    /// Checks the endpoint speaks this transport's protocol.
    fn probe(ep: Endpoint) -> Result<ProbeInfo, Error> {
        let _ = ep;
        not_implemented("probe")
    }
    /// Resolves a tag or digest in `repository`.
    fn resolve(ep: Endpoint, repository: String, reference: String, accept: Vec<String>) -> Result<Resolved, Error> {
        let _ = (ep, repository, reference, accept);
        not_implemented("resolve")
    }
    /// Opens a blob from byte `offset`.
    fn open_blob(ep: Endpoint, repository: String, digest: String, offset: u64) -> Result<ByteStream, Error> {
        let _ = (ep, repository, digest, offset);
        not_implemented("open-blob")
    }
    /// Lists the tags of `repository`.
    fn list_tags(ep: Endpoint, repository: String) -> Result<Vec<String>, Error> {
        let _ = (ep, repository);
        not_implemented("list-tags")
    }
}

/// Adapts a [`Transport`] to the generated export trait.
#[doc(hidden)]
pub struct TransportExport<T>(core::marker::PhantomData<T>);

impl<T: Transport> bindings::exports::gantry::plugin::transport::Guest for TransportExport<T> {
    fn probe(ep: Endpoint) -> Result<ProbeInfo, Error> {
        T::probe(ep)
    }
    fn resolve(ep: Endpoint, repository: String, reference: String, accept: Vec<String>) -> Result<Resolved, Error> {
        T::resolve(ep, repository, reference, accept)
    }
    fn open_blob(ep: Endpoint, repository: String, digest: String, offset: u64) -> Result<ByteStream, Error> {
        T::open_blob(ep, repository, digest, offset)
    }
    fn list_tags(ep: Endpoint, repository: String) -> Result<Vec<String>, Error> {
        T::list_tags(ep, repository)
    }
}

/// Exports a type implementing [`Transport`] as the component's transport:
/// `gantry_kit::export_transport!(MyTransport);` once, at the crate's root.
#[macro_export]
macro_rules! export_transport {
    ($t:ty) => {
        type __GantryKitTransportExport = $crate::transport::TransportExport<$t>;
        $crate::transport::bindings::export_world!(__GantryKitTransportExport with_types_in $crate::transport::bindings);
    };
}
