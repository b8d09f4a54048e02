//! `gantry serve`: the registry server (crate `gantry-serve`): a registry
//! of its own that takes pushes (`<root>/registry`), this store's images
//! (`--from-store`), or a pull-through cache of other registries
//! (`--mirror-of`, cached in `<root>/mirror`).

use crate::context::Context;
use anyhow::{anyhow, bail, Context as _, Result};
use gantry_core::store::Store;
use gantry_serve::api::Backend;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

pub struct Mode {
    pub listen: SocketAddr,
    pub from_store: bool,
    pub mirror_of: Vec<String>,
    pub tag_ttl: u64,
    pub header_timeout: u64,
    pub htpasswd: Option<std::path::PathBuf>,
}

pub fn run(ctx: &Context, mode: Mode) -> Result<ExitCode> {
    if mode.htpasswd.is_some() && (mode.from_store || !mode.mirror_of.is_empty()) {
        bail!("--htpasswd guards pushes, which only a registry of its own takes (no --from-store or --mirror-of)");
    }
    let backend = match (mode.from_store, mode.mirror_of.is_empty()) {
        (true, false) => bail!("serve takes --from-store or --mirror-of, not both"),
        (false, true) => {
            let htpasswd = match &mode.htpasswd {
                Some(p) => Some(Arc::new(gantry_serve::htpasswd::Htpasswd::read(p)?)),
                None => {
                    eprintln!("gantry serve: pushes need no credentials (give --htpasswd FILE to require them)");
                    None
                }
            };
            let storage = gantry_serve::fs_storage::FsStorage::open(&ctx.store.root().join("registry"), ctx.alone)?;
            Backend::Registry {
                storage: Arc::new(storage),
                htpasswd,
            }
        }
        (true, true) => {
            // A handle of the server's own, shared with its threads.
            let (store, _) = Store::open(ctx.store.root(), ctx.store.driver_name()).context("opening the store")?;
            Backend::Storage(Arc::new(gantry_serve::from_store::StoreStorage::new(Arc::new(store))?))
        }
        (false, false) => {
            let upstreams = mode
                .mirror_of
                .iter()
                .map(|u| gantry_serve::mirror::Upstream::parse(u).map_err(|e| anyhow!(e)))
                .collect::<Result<Vec<_>>>()?;
            if upstreams.iter().filter(|u| u.prefix.is_none()).count() > 1 {
                bail!("at most one --mirror-of may go without a NAME= prefix");
            }
            // Ingest leftovers are cleared only when no other process shares the store.
            let local = gantry_serve::fs_storage::FsStorage::open(&ctx.store.root().join("mirror"), ctx.alone)?;
            // The upstreams follow the config's registry tables (plain HTTP,
            // redirect_hosts), as pulls do.
            let options = gantry_serve::mirror::MirrorOptions {
                tag_ttl: Duration::from_secs(mode.tag_ttl),
                max_blob: ctx.config.mirror.max_blob_mib.saturating_mul(1 << 20),
                max_fetches: ctx.config.mirror.max_fetches,
                registries: ctx.config.registries.clone(),
            };
            Backend::Mirror(Arc::new(gantry_serve::mirror::Mirror::new(
                Arc::new(local),
                upstreams,
                options,
            )))
        }
    };
    let mut options = gantry_serve::Options::new(mode.listen);
    options.header_timeout = Duration::from_secs(mode.header_timeout.max(1));
    gantry_serve::run(options, backend, |addr| {
        crate::commands::stderr_line(&format!("gantry serve: listening on http://{addr}"));
    })?;
    Ok(ExitCode::SUCCESS)
}
