//! Writing a registry transport: implement [`Transport`] (every method has a
//! default that says it is not implemented) and export it with
//! [`export_transport!`](crate::export_transport). HTTP goes only through
//! [`http`], which the host filters per call and per hop.

/// The generated bindings of the `transport-push-plugin` world (a
/// transport that only pulls keeps the push methods' defaults, which say
/// they are not implemented).
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "transport-push-plugin",
        runtime_path: "wit_bindgen::rt",
        pub_export_macro: true,
        export_macro_name: "export_world",
        default_bindings_module: "gantry_kit::transport::bindings",
    });
}

pub use bindings::exports::gantry::plugin::push::{Mounted, Upload};
pub use bindings::exports::gantry::plugin::transport::{Credentials, Endpoint, Manifest, ProbeInfo, Resolved, V1Image};
pub use bindings::gantry::plugin::http;
pub use bindings::gantry::plugin::types::{ByteStream, Error};

/// Refuses a repository name a URL path could be bent by (empty
/// components, `.`/`..`, anything but `[a-z0-9._-/]`).
pub fn check_repository(repository: &str) -> Result<(), Error> {
    let ok = !repository.is_empty()
        && repository
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b))
        && !repository.split('/').any(|c| c.is_empty() || c == "." || c == "..");
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!("invalid repository name {repository:?}")))
    }
}

/// Reads a whole response body, refusing one larger than `limit` bytes.
pub fn read_all(body: &ByteStream, limit: usize) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    loop {
        let chunk = body.read(64 * 1024)?;
        if chunk.is_empty() {
            return Ok(out);
        }
        out.extend_from_slice(&chunk);
        if out.len() > limit {
            return Err(Error::Invalid(format!("response is larger than {limit} bytes")));
        }
    }
}

/// A response header by name (any case).
pub fn header<'a>(resp: &'a http::Response, name: &str) -> Option<&'a str> {
    resp.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The `Authorization` value of HTTP basic auth with `c`.
pub fn basic_auth(c: &Credentials) -> String {
    format!(
        "Basic {}",
        crate::base64(format!("{}:{}", c.username, c.password).as_bytes())
    )
}

/// The body of a blob answer asked from byte `offset`: a 200 when
/// `offset` is 0, a 206 that starts at `offset` otherwise (a registry that
/// cannot resume is `unsupported`, so the host starts over). `Ok(Err(resp))`
/// hands back any other answer for the caller to turn into an error.
pub fn resumed_body(
    resp: http::Response,
    offset: u64,
    what: &str,
) -> Result<Result<ByteStream, http::Response>, Error> {
    match resp.status {
        200 if offset == 0 => Ok(Ok(resp.body)),
        206 if offset > 0 => {
            let start = header(&resp, "content-range")
                .and_then(|r| r.strip_prefix("bytes "))
                .and_then(|r| r.split('-').next())
                .and_then(|s| s.parse::<u64>().ok());
            if start == Some(offset) {
                Ok(Ok(resp.body))
            } else {
                Err(Error::Unsupported(format!(
                    "{what}: registry answered a different range"
                )))
            }
        }
        200 => Err(Error::Unsupported(format!("{what}: registry cannot resume a download"))),
        _ => Ok(Err(resp)),
    }
}

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

    /// Pushing: the size of blob `digest` when `repository` has it.
    fn stat_blob(ep: Endpoint, repository: String, digest: String) -> Result<Option<u64>, Error> {
        let _ = (ep, repository, digest);
        not_implemented("stat-blob")
    }
    /// Pushing: links blob `digest` of `source` into `repository`.
    fn mount_blob(ep: Endpoint, repository: String, digest: String, source: String) -> Result<Mounted, Error> {
        let _ = (ep, repository, digest, source);
        not_implemented("mount-blob")
    }
    /// Pushing: opens an upload session.
    fn start_upload(ep: Endpoint, repository: String) -> Result<Upload, Error> {
        let _ = (ep, repository);
        not_implemented("start-upload")
    }
    /// Pushing: how much of session `url` the registry holds.
    fn upload_status(ep: Endpoint, repository: String, url: String) -> Result<Upload, Error> {
        let _ = (ep, repository, url);
        not_implemented("upload-status")
    }
    /// Pushing: sends `body` (hand it to [`http::send_body`], never read
    /// it) as the session's next chunk.
    fn upload_chunk(
        ep: Endpoint,
        repository: String,
        session: Upload,
        body: &ByteStream,
        length: Option<u64>,
    ) -> Result<Upload, Error> {
        let _ = (ep, repository, session, body, length);
        not_implemented("upload-chunk")
    }
    /// Pushing: ends the session as blob `digest`, sending `length` bytes
    /// of `body` (if any) with it.
    fn finish_upload(
        ep: Endpoint,
        repository: String,
        session: Upload,
        digest: String,
        body: Option<&ByteStream>,
        length: u64,
    ) -> Result<(), Error> {
        let _ = (ep, repository, session, digest, body, length);
        not_implemented("finish-upload")
    }
    /// Pushing: puts manifest `m` as `reference`.
    fn put_manifest(ep: Endpoint, repository: String, reference: String, m: Manifest) -> Result<Option<String>, Error> {
        let _ = (ep, repository, reference, m);
        not_implemented("put-manifest")
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

impl<T: Transport> bindings::exports::gantry::plugin::push::Guest for TransportExport<T> {
    fn stat_blob(ep: Endpoint, repository: String, digest: String) -> Result<Option<u64>, Error> {
        T::stat_blob(ep, repository, digest)
    }
    fn mount_blob(ep: Endpoint, repository: String, digest: String, source: String) -> Result<Mounted, Error> {
        T::mount_blob(ep, repository, digest, source)
    }
    fn start_upload(ep: Endpoint, repository: String) -> Result<Upload, Error> {
        T::start_upload(ep, repository)
    }
    fn upload_status(ep: Endpoint, repository: String, url: String) -> Result<Upload, Error> {
        T::upload_status(ep, repository, url)
    }
    fn upload_chunk(
        ep: Endpoint,
        repository: String,
        session: Upload,
        body: &ByteStream,
        length: Option<u64>,
    ) -> Result<Upload, Error> {
        T::upload_chunk(ep, repository, session, body, length)
    }
    fn finish_upload(
        ep: Endpoint,
        repository: String,
        session: Upload,
        digest: String,
        body: Option<&ByteStream>,
        length: u64,
    ) -> Result<(), Error> {
        T::finish_upload(ep, repository, session, digest, body, length)
    }
    fn put_manifest(ep: Endpoint, repository: String, reference: String, m: Manifest) -> Result<Option<String>, Error> {
        T::put_manifest(ep, repository, reference, m)
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
