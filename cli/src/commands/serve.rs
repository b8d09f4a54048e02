//! `gantry serve`: the registry server (crate `gantry-serve`): a registry
//! of its own that takes pushes (`<root>/registry`), this store's images
//! (`--from-store`), or a pull-through cache of other registries
//! (`--mirror-of`, cached in `<root>/mirror`).

use crate::context::Context;
use anyhow::{anyhow, bail, Context as _, Result};
use gantry_core::store::Store;
use gantry_core::text::escape_line;
use gantry_serve::api::{Auth, Backend};
use gantry_serve::registry_storage::Registry;
use gantry_serve::s3_client::{S3Client, S3Config};
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
    pub uploads: UploadArgs,
    pub token: TokenArgs,
    pub operate: OperateArgs,
}

/// Distribution's token auth for a registry of its own: every request
/// needs a bearer token from the realm granting its scope.
#[derive(clap::Args, Debug, Clone)]
pub struct TokenArgs {
    /// Require bearer tokens from this token server (distribution's
    /// `auth.token` realm); clients are sent there by the 401's challenge.
    #[arg(long, value_name = "URL", requires_all = ["token_service", "token_issuer", "token_certs"], conflicts_with = "htpasswd")]
    pub token_realm: Option<String>,
    /// The service the tokens must be for (their `aud`).
    #[arg(long, value_name = "NAME", requires = "token_realm")]
    pub token_service: Option<String>,
    /// The issuer the tokens must come from (their `iss`).
    #[arg(long, value_name = "NAME", requires = "token_realm")]
    pub token_issuer: Option<String>,
    /// The issuer's certificates (PEM bundle): a token must be signed by
    /// the key of one of them.
    #[arg(long, value_name = "FILE", requires = "token_realm")]
    pub token_certs: Option<std::path::PathBuf>,
}

/// How the server is reached and watched, in every mode.
#[derive(clap::Args, Debug, Clone)]
pub struct OperateArgs {
    /// Serve HTTPS with this certificate chain (PEM, leaf first), and
    /// HTTP/2 to clients that offer it; SIGHUP reads it and the key again.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Answer `/metrics` (Prometheus text) and `/healthz` (the storage
    /// answers) on this address, plain HTTP; port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

/// What pushes may take of the registry's disk (a registry of its own
/// only): one writer cannot fill it with abandoned or endless uploads.
#[derive(clap::Args, Debug, Clone)]
pub struct UploadArgs {
    /// The largest blob one upload may hold: bytes, or with a K, M, G or T
    /// suffix (powers of 1024). Larger uploads are refused (413).
    #[arg(long, value_name = "SIZE", default_value = "16G", value_parser = parse_size)]
    pub max_upload_size: u64,
    /// Upload sessions open at once, in all; more are refused (429).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_uploads: usize,
    /// Upload sessions open at once for one repository.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_uploads_per_repo: usize,
    /// Seconds an upload session may sit untouched before it is removed
    /// with what it holds.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    pub upload_expiry: u64,
}

impl UploadArgs {
    fn limits(&self) -> gantry_serve::fs_storage::UploadLimits {
        gantry_serve::fs_storage::UploadLimits {
            max_size: self.max_upload_size,
            max_sessions: self.max_uploads.max(1),
            max_per_repository: self.max_uploads_per_repo.max(1),
            expiry: Duration::from_secs(self.upload_expiry.max(1)),
            quota: None,
        }
    }
}

/// `123`, `512K`, `16G` (also `16GiB`, `16GB`: powers of 1024 all).
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: u64 = n.parse().map_err(|_| format!("{s:?} is not a size (e.g. 512M, 16G)"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("{s:?} is not a size (e.g. 512M, 16G)")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

pub fn run(ctx: &Context, mode: Mode) -> Result<ExitCode> {
    // A certificate that does not load stops it before anything else.
    let tls = match (&mode.operate.tls_cert, &mode.operate.tls_key) {
        (Some(cert), Some(key)) => Some(Arc::new(gantry_http::server::TlsFiles::load(cert, key)?)),
        _ => None,
    };
    if mode.htpasswd.is_some() && (mode.from_store || !mode.mirror_of.is_empty()) {
        bail!("--htpasswd guards pushes, which only a registry of its own takes (no --from-store or --mirror-of)");
    }
    if mode.token.token_realm.is_some() && (mode.from_store || !mode.mirror_of.is_empty()) {
        bail!("--token-realm guards a registry of its own (no --from-store or --mirror-of)");
    }
    let backend = match (mode.from_store, mode.mirror_of.is_empty()) {
        (true, false) => bail!("serve takes --from-store or --mirror-of, not both"),
        (false, true) => {
            let t = &mode.token;
            let auth = match (
                &mode.htpasswd,
                &t.token_realm,
                &t.token_service,
                &t.token_issuer,
                &t.token_certs,
            ) {
                (Some(p), ..) => Auth::Basic(Arc::new(gantry_serve::htpasswd::Htpasswd::read(p)?)),
                (None, Some(realm), Some(service), Some(issuer), Some(certs)) => Auth::Token(Arc::new(
                    gantry_serve::token::TokenAuth::load(realm, service, issuer, certs)?,
                )),
                _ => {
                    eprintln!(
                        "gantry serve: pushes need no credentials (give --htpasswd FILE or --token-realm … to require them)"
                    );
                    Auth::Open
                }
            };
            Backend::Registry {
                storage: open_registry(ctx, mode.uploads.limits())?,
                auth,
            }
        }
        (true, true) => {
            // A handle of the server's own, shared with its threads.
            let (store, _) = Store::open(ctx.store.root(), ctx.store.driver_name()).context("opening the store")?;
            // Images without their registry content (loaded, imported) are
            // served as `save` writes them, their layers rebuilt through the
            // driver; without one, only pulled images are served.
            let driver: Option<&'static dyn gantry_core::plugin::GraphDriver> = match ctx.driver_for_process() {
                Ok(d) => Some(d),
                Err(e) => {
                    crate::commands::stderr_line(&format!(
                        "gantry serve: images loaded or imported are not served (the graph driver did not load: {})",
                        escape_line(&format!("{e:#}"))
                    ));
                    None
                }
            };
            Backend::Storage(Arc::new(gantry_serve::from_store::StoreStorage::new(
                Arc::new(store),
                driver,
            )?))
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
                network: ctx.network(),
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
    options.tls = tls;
    options.metrics_listen = mode.operate.metrics_listen;
    let scheme = if options.tls.is_some() { "https" } else { "http" };
    gantry_serve::run(options, backend, |addr, metrics| {
        if let Some(m) = metrics {
            crate::commands::stderr_line(&format!("gantry serve: metrics and health on http://{m}"));
        }
        crate::commands::stderr_line(&format!("gantry serve: listening on {scheme}://{addr}"));
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The registry's own storage as `[serve.storage]` says: `<root>/registry`,
/// or a bucket of an object store.
fn open_registry(ctx: &Context, limits: gantry_serve::fs_storage::UploadLimits) -> Result<Registry> {
    let c = &ctx.config.serve.storage;
    match c.kind.as_str() {
        "filesystem" => {
            // What is pushed lives in the store, under its quota.
            let limits = gantry_serve::fs_storage::UploadLimits {
                quota: ctx.store.quota(),
                ..limits
            };
            let s = gantry_serve::fs_storage::FsStorage::open(&ctx.store.root().join("registry"), ctx.alone)?
                .with_upload_limits(limits);
            Ok(Registry::Fs(Arc::new(s)))
        }
        "s3" => {
            let config = S3Config {
                endpoint: c
                    .endpoint
                    .clone()
                    .ok_or_else(|| anyhow!("[serve.storage] type = \"s3\" needs an endpoint"))?,
                region: c.region.clone(),
                bucket: c
                    .bucket
                    .clone()
                    .ok_or_else(|| anyhow!("[serve.storage] type = \"s3\" needs a bucket"))?,
                prefix: c.prefix.clone(),
                path_style: c.path_style,
                access_key: c.access_key.clone(),
                secret_key: c.secret_key.clone(),
            };
            let part = c.part_size_mib.max(5) << 20;
            let network = gantry_http::Network::new(&ctx.config.network, &ctx.config.registries);
            let client = S3Client::new(&config, network)?;
            Ok(Registry::S3(Arc::new(gantry_serve::s3_storage::S3Storage::new(
                client,
                limits,
                part,
                c.redirect,
                Duration::from_millis(c.manifest_cache_ms),
            ))))
        }
        other => bail!(
            "[serve.storage] type {} is not one of \"filesystem\", \"s3\"",
            escape_line(other)
        ),
    }
}

/// `gantry serve gc`.
pub fn gc(ctx: &Context, dry_run: bool, delete_untagged: bool) -> Result<ExitCode> {
    let options = gantry_serve::gc::GcOptions {
        dry_run,
        delete_untagged,
        grace: Duration::from_secs(ctx.config.serve.gc_grace_seconds),
    };
    let registry = open_registry(ctx, gantry_serve::fs_storage::UploadLimits::default())?;
    let report = gantry_serve::gc::run(&registry, &options)?;
    let verb = if dry_run { "would remove" } else { "removed" };
    println!(
        "{verb} {} blobs ({} bytes) and {} manifests; kept {} blobs and {} manifests; spared {} recent blobs",
        report.blobs_removed,
        report.bytes_removed,
        report.manifests_removed,
        report.blobs_kept,
        report.manifests_kept,
        report.blobs_spared
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(super::parse_size("1000"), Ok(1000));
        assert_eq!(super::parse_size("512K"), Ok(512 << 10));
        assert_eq!(super::parse_size("16G"), Ok(16 << 30));
        assert_eq!(super::parse_size("2GiB"), Ok(2 << 30));
        assert!(super::parse_size("G").is_err());
        assert!(super::parse_size("1X").is_err());
        assert!(super::parse_size("99999999999T").is_err());
    }
}
