//! `WasmTransport`: the core's `Transport` trait over a transport component.
//!
//! Credentials belong to the client or tenant whose call carries them,
//! never to an instance: a transport caches what it learnt (the v2 one keeps
//! working tokens), so each call runs on an instance that has only ever
//! served the same credentials (`Identity`, a salted fingerprint the host
//! computes). What one client's login made work is never reused for
//! another's call, whatever the component does inside.

use super::bindings::transport::exports::gantry::plugin::transport as wit;
use super::bindings::transport::{TransportPlugin, TransportPluginPre};
use super::bindings::transport_push::exports::gantry::plugin::{push as wit_push, transport as wit_push_transport};
use super::bindings::transport_push::{TransportPushPlugin, TransportPushPluginPre};
use super::{Identity, Limits, LoadError, PluginHost, Pool, Sandbox, WitError};
use crate::http::{CallScope, HttpPolicy};
use gantry_core::endpoint::Registries;
use gantry_core::plugin::{ByteStream, Endpoint, Mounted, Resolved, Transport, Upload};
use gantry_core::{Digest, PluginError};
use std::path::Path;
use std::sync::Arc;
use wasmtime::component::HasSelf;

pub struct WasmTransport {
    name: String,
    pool: Pool<TransportPlugin>,
    /// Instances for push calls, when the component exports `push`
    /// (contract 0.1.2 on); an older transport loads without it.
    push_pool: Option<Pool<TransportPushPlugin>>,
    /// This transport's salt for [`Identity`] fingerprints.
    salt: String,
}

/// The identity of the credentials a call carries.
fn identity(salt: &str, c: Option<&gantry_core::plugin::Credentials>) -> Identity {
    match c {
        None => Identity::NONE,
        Some(c) => Identity::of(
            salt.as_bytes(),
            &[Some(&c.username), Some(&c.password), c.identity_token.as_deref()],
        ),
    }
}

/// `ep` as module `$m`'s WIT endpoint: the pull and the push world each
/// have their own copy of the type.
macro_rules! wit_endpoint {
    ($m:ident, $ep:expr) => {{
        let ep: &Endpoint = $ep;
        $m::Endpoint {
            url: ep.url.clone(),
            mirror: ep.mirror,
            credentials: ep.credentials.as_ref().map(|c| $m::Credentials {
                username: c.username.clone(),
                password: c.password.clone(),
                identity_token: c.identity_token.clone(),
            }),
        }
    }};
}

impl WasmTransport {
    pub fn load(
        host: &PluginHost,
        name: &str,
        path: &Path,
        limits: Limits,
        registries: Registries,
        network: Arc<gantry_http::Network>,
    ) -> Result<Self, LoadError> {
        let pre = host.prepare(name, path, "transport", |l| {
            TransportPlugin::add_to_linker::<Sandbox, HasSelf<Sandbox>>(l, |s| s)
        })?;
        let push_pre = TransportPushPluginPre::new(pre.clone()).ok();
        let pre = TransportPluginPre::new(pre).map_err(|e| LoadError::Link {
            name: name.to_string(),
            message: e.to_string(),
        })?;
        let http = Arc::new(HttpPolicy::new(registries, network));
        let label = format!("transport/{name}");
        let push_pool = push_pre.map(|pre| {
            let make = Box::new(move |store: &mut _| Ok(Ok(pre.instantiate(store)?)));
            Pool::new(host, label.clone(), limits, Some(http.clone()), None, make)
        });
        let make = Box::new(move |store: &mut _| Ok(Ok(pre.instantiate(store)?)));
        Ok(WasmTransport {
            name: name.to_string(),
            pool: Pool::new(host, label, limits, Some(http), None, make),
            push_pool,
            salt: gantry_core::store::random_id(),
        })
    }

    /// Runs push call `op` with the endpoint opened for writing.
    fn push_call<R>(
        &self,
        op: &str,
        ep: &Endpoint,
        f: impl FnOnce(
            &mut wasmtime::Store<Sandbox>,
            &TransportPushPlugin,
            &wit_push_transport::Endpoint,
        ) -> wasmtime::Result<Result<R, WitError>>,
    ) -> Result<R, PluginError> {
        let Some(pool) = &self.push_pool else {
            return Err(PluginError::new(
                gantry_core::ErrorClass::Unsupported,
                format!(
                    "transport {} cannot push (its component exports no push interface)",
                    self.name
                ),
            ));
        };
        let who = identity(&self.salt, ep.credentials.as_ref());
        let ep = wit_endpoint!(wit_push_transport, ep);
        pool.call_as(who, op, |s, p| {
            s.data_mut().http_scope = Some(CallScope::push(&ep.url));
            f(s, p, &ep)
        })
    }

    /// Runs `op` with the one endpoint the core asked this call to use
    /// opened: the only place (with the realm it names) the guest may reach
    /// during the call.
    fn call<R>(
        &self,
        op: &str,
        ep: &Endpoint,
        f: impl FnOnce(
            &mut wasmtime::Store<Sandbox>,
            &TransportPlugin,
            &wit::Endpoint,
        ) -> wasmtime::Result<Result<R, WitError>>,
    ) -> Result<R, PluginError> {
        let who = identity(&self.salt, ep.credentials.as_ref());
        let ep = wit_endpoint!(wit, ep);
        self.pool.call_as(who, op, |s, p| {
            s.data_mut().http_scope = Some(CallScope::pull(&ep.url));
            f(s, p, &ep)
        })
    }

    /// Opens blob (or v1 layer) `name` of `repository` at `offset`.
    fn open_stream(&self, ep: &Endpoint, repository: &str, name: &str, offset: u64) -> Result<ByteStream, PluginError> {
        self.call("open-blob", ep, |s, p, ep| {
            let r = p
                .gantry_plugin_transport()
                .call_open_blob(&mut *s, ep, repository, name, offset)?;
            s.data_mut().stream_returned(r)
        })
    }
}

/// An upload session as the core's.
fn upload(u: wit_push::Upload) -> Upload {
    Upload {
        url: u.url,
        offset: u.offset,
    }
}

/// An upload session as the push world's.
fn wit_upload(u: &Upload) -> wit_push::Upload {
    wit_push::Upload {
        url: u.url.clone(),
        offset: u.offset,
    }
}

impl Transport for WasmTransport {
    fn name(&self) -> &str {
        &self.name
    }

    fn probe(&self, ep: &Endpoint) -> Result<String, PluginError> {
        self.call("probe", ep, |s, p, ep| p.gantry_plugin_transport().call_probe(s, ep))
            .map(|i| i.version)
    }

    fn resolve(
        &self,
        ep: &Endpoint,
        repository: &str,
        reference: &str,
        accept: &[&str],
    ) -> Result<Resolved, PluginError> {
        let accept: Vec<String> = accept.iter().map(|s| s.to_string()).collect();
        let r = self.call("resolve", ep, |s, p, ep| {
            p.gantry_plugin_transport()
                .call_resolve(s, ep, repository, reference, &accept)
        })?;
        Ok(match r {
            wit::Resolved::Manifest(m) => Resolved::Manifest {
                media_type: m.media_type,
                claimed_digest: m.claimed_digest,
                bytes: m.bytes,
            },
            wit::Resolved::V1Chain(c) => Resolved::V1Chain(c.into_iter().map(|i| (i.id, i.json)).collect()),
        })
    }

    fn open_blob(
        &self,
        ep: &Endpoint,
        repository: &str,
        digest: &Digest,
        offset: u64,
    ) -> Result<ByteStream, PluginError> {
        self.open_stream(ep, repository, digest.as_str(), offset)
    }

    fn open_v1_layer(&self, ep: &Endpoint, repository: &str, id: &str, offset: u64) -> Result<ByteStream, PluginError> {
        self.open_stream(ep, repository, id, offset)
    }

    fn list_tags(&self, ep: &Endpoint, repository: &str) -> Result<Vec<String>, PluginError> {
        self.call("list-tags", ep, |s, p, ep| {
            p.gantry_plugin_transport().call_list_tags(s, ep, repository)
        })
    }

    fn can_push(&self) -> bool {
        self.push_pool.is_some()
    }

    fn stat_blob(&self, ep: &Endpoint, repository: &str, digest: &Digest) -> Result<Option<u64>, PluginError> {
        self.push_call("stat-blob", ep, |s, p, ep| {
            p.gantry_plugin_push()
                .call_stat_blob(s, ep, repository, digest.as_str())
        })
    }

    fn mount_blob(
        &self,
        ep: &Endpoint,
        repository: &str,
        digest: &Digest,
        source: &str,
    ) -> Result<Mounted, PluginError> {
        let r = self.push_call("mount-blob", ep, |s, p, ep| {
            p.gantry_plugin_push()
                .call_mount_blob(s, ep, repository, digest.as_str(), source)
        })?;
        Ok(match r {
            wit_push::Mounted::Mounted => Mounted::Mounted,
            wit_push::Mounted::Upload(u) => Mounted::Upload(upload(u)),
        })
    }

    fn start_upload(&self, ep: &Endpoint, repository: &str) -> Result<Upload, PluginError> {
        self.push_call("start-upload", ep, |s, p, ep| {
            p.gantry_plugin_push().call_start_upload(s, ep, repository)
        })
        .map(upload)
    }

    fn upload_status(&self, ep: &Endpoint, repository: &str, url: &str) -> Result<Upload, PluginError> {
        self.push_call("upload-status", ep, |s, p, ep| {
            p.gantry_plugin_push().call_upload_status(s, ep, repository, url)
        })
        .map(upload)
    }

    fn upload_chunk(
        &self,
        ep: &Endpoint,
        repository: &str,
        session: &Upload,
        body: ByteStream,
        length: Option<u64>,
    ) -> Result<Upload, PluginError> {
        let session = wit_upload(session);
        self.push_call("upload-chunk", ep, |s, p, ep| {
            // The body stays host-side: the guest gets a borrowed handle it
            // passes back to `send-body`.
            let (r, _) = super::lend(s, body, |s, borrow| {
                p.gantry_plugin_push()
                    .call_upload_chunk(s, ep, repository, &session, borrow, length)
            })?;
            Ok(r)
        })
        .map(upload)
    }

    fn finish_upload(
        &self,
        ep: &Endpoint,
        repository: &str,
        session: &Upload,
        digest: &Digest,
        body: Option<ByteStream>,
        length: u64,
    ) -> Result<(), PluginError> {
        let session = wit_upload(session);
        self.push_call("finish-upload", ep, |s, p, ep| {
            let finish = |s: &mut wasmtime::Store<Sandbox>, body| {
                p.gantry_plugin_push()
                    .call_finish_upload(s, ep, repository, &session, digest.as_str(), body, length)
            };
            match body {
                Some(b) => Ok(super::lend(s, b, |s, borrow| finish(s, Some(borrow)))?.0),
                None => finish(s, None),
            }
        })
    }

    fn put_manifest(
        &self,
        ep: &Endpoint,
        repository: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Option<String>, PluginError> {
        let m = wit_push_transport::Manifest {
            media_type: media_type.to_string(),
            claimed_digest: None,
            bytes: bytes.to_vec(),
        };
        self.push_call("put-manifest", ep, |s, p, ep| {
            p.gantry_plugin_push()
                .call_put_manifest(s, ep, repository, reference, &m)
        })
    }
}
