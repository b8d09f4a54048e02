//! `WasmTransport`: the core's `Transport` trait over a transport component.

use super::bindings::transport::exports::gantry::plugin::transport as wit;
use super::bindings::transport::{TransportPlugin, TransportPluginPre};
use super::{Limits, LoadError, PluginHost, Pool, Sandbox, WitError};
use crate::http::{CallScope, HttpPolicy};
use gantry_core::endpoint::Registries;
use gantry_core::plugin::{ByteStream, Endpoint, Resolved, Transport};
use gantry_core::{Digest, PluginError};
use std::path::Path;
use std::sync::Arc;
use wasmtime::component::HasSelf;

pub struct WasmTransport {
    name: String,
    pool: Pool<TransportPlugin>,
}

impl WasmTransport {
    pub fn load(
        host: &PluginHost,
        name: &str,
        path: &Path,
        limits: Limits,
        registries: Registries,
    ) -> Result<Self, LoadError> {
        let pre = host.prepare(name, path, "transport", |l| {
            TransportPlugin::add_to_linker::<Sandbox, HasSelf<Sandbox>>(l, |s| s)
        })?;
        let pre = TransportPluginPre::new(pre).map_err(|e| LoadError::Link {
            name: name.to_string(),
            message: e.to_string(),
        })?;
        let http = Arc::new(HttpPolicy::new(registries));
        Ok(WasmTransport {
            name: name.to_string(),
            pool: Pool {
                label: format!("transport/{name}"),
                engine: host.engine.clone(),
                limits,
                http: Some(http),
                home: None,
                make: Box::new(move |store| Ok(Ok(pre.instantiate(store)?))),
                free: Default::default(),
            },
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
        let ep = self.endpoint(ep);
        self.pool.call(op, |s, p| {
            s.data_mut().http_scope = Some(CallScope::pull(&ep.url));
            f(s, p, &ep)
        })
    }

    fn endpoint(&self, ep: &Endpoint) -> wit::Endpoint {
        wit::Endpoint {
            url: ep.url.clone(),
            mirror: ep.mirror,
            credentials: ep.credentials.as_ref().map(|c| wit::Credentials {
                username: c.username.clone(),
                password: c.password.clone(),
                identity_token: c.identity_token.clone(),
            }),
        }
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
        self.call("open-blob", ep, |s, p, ep| {
            let r = p
                .gantry_plugin_transport()
                .call_open_blob(&mut *s, ep, repository, digest.as_str(), offset)?;
            Ok(match r {
                // Take the stream back from the guest: its bytes never enter it.
                Ok(res) => Ok(s.data_mut().take_stream(res)?.0),
                Err(e) => Err(e),
            })
        })
    }

    fn open_v1_layer(&self, ep: &Endpoint, repository: &str, id: &str, offset: u64) -> Result<ByteStream, PluginError> {
        self.call("open-blob", ep, |s, p, ep| {
            let r = p
                .gantry_plugin_transport()
                .call_open_blob(&mut *s, ep, repository, id, offset)?;
            Ok(match r {
                Ok(res) => Ok(s.data_mut().take_stream(res)?.0),
                Err(e) => Err(e),
            })
        })
    }

    fn list_tags(&self, ep: &Endpoint, repository: &str) -> Result<Vec<String>, PluginError> {
        self.call("list-tags", ep, |s, p, ep| {
            p.gantry_plugin_transport().call_list_tags(s, ep, repository)
        })
    }
}
