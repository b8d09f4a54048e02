//! The TOML config: which plugins to load, their limits, and the registries.
//!
//! Each plugin owns one table and its implementation is picked by `type`;
//! an unknown key anywhere is an error, not silently ignored. Every table
//! and key may be left out: `Default` implementations are the one source of
//! the built-in values (v2 transport; the driver `auto`: overlay2 where the
//! kernel allows it, else vfs, as Docker chooses).

use anyhow::{bail, Context, Result};
use gantry_core::endpoint::Registries;
use gantry_host::registry::Runtime;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every key is optional: a missing one takes the value of
/// `Config::default()`, the one source of the built-in defaults.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Blobs downloaded at once per pull (Docker's max-concurrent-downloads).
    pub max_concurrent_downloads: usize,
    /// Blobs uploaded at once per push (Docker's max-concurrent-uploads).
    pub max_concurrent_uploads: usize,
    /// Where plugin components are looked up by type.
    pub plugin_dir: Option<PathBuf>,
    /// Where compiled components are kept (default `<root>/plugins-cache`);
    /// a directory shared by stores compiles each plugin once per machine.
    pub plugin_cache_dir: Option<PathBuf>,
    /// A Docker-style `config.json` with registry credentials (`auths`,
    /// `credsStore`, `credHelpers`).
    pub auth_file: Option<PathBuf>,
    /// Seconds a credential helper (`docker-credential-NAME get`) may take
    /// to answer before it is killed and the operation fails.
    pub credential_helper_timeout_seconds: f64,
    /// The most one layer may hold uncompressed (a bound on decompression bombs).
    pub max_layer_size_mib: u64,
    /// How long a mirror that could not be reached or kept failing is
    /// skipped (remembered in the store across processes).
    pub mirror_backoff_seconds: u64,
    /// The most layers one image may stack (Docker's overlay2 limit).
    pub max_layer_depth: usize,
    /// Whether a commit waits until layer contents and metadata are on disk
    /// (fsync), so power loss never leaves a committed layer with empty
    /// files. Hosts that prefer speed may turn it off.
    pub durable: bool,
    /// The most the store may hold, in GiB (fractions allowed): a pull,
    /// load, import or push to `gantry serve` that would pass it is refused
    /// before it fills the disk. None: no quota.
    pub max_store_gib: Option<f64>,
    /// Whether pulls keep the compressed blobs and manifests as the
    /// registry served them (`<root>/content`), so `save` and
    /// `serve --from-store` reproduce the registry's digests. Off keeps only
    /// the unpacked layers, as Docker does, for hosts short of disk.
    pub keep_content: bool,
    /// Whether plugins with `runtime = "native"` may load: they run in
    /// gantry's process with its privileges, outside any sandbox.
    pub allow_native_plugins: bool,
    pub transport: PluginConfig,
    pub driver: PluginConfig,
    pub limits: LimitsConfig,
    pub registries: Registries,
    /// How registries are reached: trust (`certs.d`), proxies, name overrides.
    pub network: gantry_http::NetworkConfig,
    /// Docker's `registry-mirrors`: mirrors of Docker Hub, tried before the
    /// `[registries."docker.io"]` ones.
    pub registry_mirrors: Vec<String>,
    /// `gantry serve --mirror-of`: what one fetch and all of them may take.
    pub mirror: MirrorConfig,
    /// `gantry serve` as a registry of its own: where it keeps what is
    /// pushed, and how `gantry serve gc` treats recent writes.
    pub serve: ServeConfig,
    /// The registries the daemon may pull from and push to for this store
    /// (a tenant's allow-list: `host[:port]`, `docker.io`); all when unset.
    pub allowed_registries: Option<Vec<String>>,
}

impl Default for Config {
    /// The built-in config, used with no `--config` and for every key a
    /// file leaves out: the v2 transport, the driver `auto` (overlay2 where
    /// the kernel allows it, else vfs, as Docker chooses) and Docker's
    /// concurrency.
    fn default() -> Self {
        Config {
            max_concurrent_downloads: 3,
            max_concurrent_uploads: 5,
            plugin_dir: None,
            plugin_cache_dir: None,
            auth_file: None,
            credential_helper_timeout_seconds: 30.0,
            max_layer_size_mib: gantry_core::stage::DEFAULT_MAX_LAYER_BYTES >> 20,
            mirror_backoff_seconds: 30,
            max_layer_depth: gantry_core::stage::DEFAULT_MAX_DEPTH,
            durable: true,
            max_store_gib: None,
            keep_content: true,
            allow_native_plugins: false,
            transport: PluginConfig::named("v2"),
            driver: PluginConfig::named("auto"),
            limits: LimitsConfig::default(),
            registries: Registries::default(),
            registry_mirrors: Vec::new(),
            network: Default::default(),
            mirror: MirrorConfig::default(),
            serve: ServeConfig::default(),
            allowed_registries: None,
        }
    }
}

/// The `[mirror]` table: bounds of `gantry serve --mirror-of`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MirrorConfig {
    /// The largest blob fetched from an upstream, in MiB (default 65536:
    /// 64 GiB, as for a layer); a bigger one is refused before it is read.
    pub max_blob_mib: u64,
    /// Blob fetches from upstreams under way at once (default 64); past
    /// it a request for another missing blob is refused until one ends.
    pub max_fetches: usize,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            max_blob_mib: gantry_serve::mirror::DEFAULT_MAX_BLOB >> 20,
            max_fetches: gantry_serve::mirror::DEFAULT_MAX_FETCHES,
        }
    }
}

/// The `[serve]` table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Seconds a blob stays safe from `gantry serve gc` after it was
    /// uploaded or named by a pushed manifest (default 3600), so pushes may
    /// go on while it runs.
    pub gc_grace_seconds: u64,
    pub storage: ServeStorageConfig,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            gc_grace_seconds: 3600,
            storage: ServeStorageConfig::default(),
        }
    }
}

/// The `[serve.storage]` table: `type = "filesystem"` (`<root>/registry`,
/// the default) or `type = "s3"`, a bucket of an S3-API object store that
/// several replicas share. Credentials come from the environment or the
/// shared credentials file as AWS tools read them, unless
/// `access_key`/`secret_key` are given here.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeStorageConfig {
    #[serde(rename = "type")]
    pub kind: String,
    /// The object store's URL (`https://s3.eu-west-1.amazonaws.com`, `http://127.0.0.1:8333`).
    pub endpoint: Option<String>,
    /// The region requests are signed for (default `us-east-1`).
    pub region: String,
    pub bucket: Option<String>,
    /// Every key is written under this prefix (default none).
    pub prefix: String,
    /// Address the bucket as `ENDPOINT/BUCKET/…` rather than
    /// `BUCKET.ENDPOINT/…` (MinIO, SeaweedFS, Ceph; default false).
    pub path_style: bool,
    /// Answer blob GETs with a redirect to a presigned URL of the object
    /// store, rather than streaming the bytes through (default false:
    /// clients need not reach the object store).
    pub redirect: bool,
    /// The size of an upload's parts in MiB (at least 5; default 8).
    pub part_size_mib: usize,
    /// Milliseconds a replica answers a manifest from memory before it
    /// asks the bucket again (default 0: never; a tag moved through another
    /// replica shows on the next request).
    pub manifest_cache_ms: u64,
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
}

impl Default for ServeStorageConfig {
    fn default() -> Self {
        ServeStorageConfig {
            kind: "filesystem".into(),
            endpoint: None,
            region: "us-east-1".into(),
            bucket: None,
            prefix: String::new(),
            path_style: false,
            redirect: false,
            part_size_mib: gantry_serve::s3_storage::DEFAULT_PART_SIZE >> 20,
            manifest_cache_ms: 0,
            access_key: None,
            secret_key: None,
        }
    }
}

/// One plugin's table.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The implementation: `v2`, `overlay2`, `vfs`, `auto` (drivers: overlay2
    /// where it works, else vfs), or a third party's name.
    #[serde(rename = "type")]
    pub kind: String,
    /// The component file; default `<plugin_dir>/gantry_<table>_<type>.wasm`
    /// (`lib…so` for a native plugin, which must name its `path`).
    pub path: Option<PathBuf>,
    /// `wasm` (a sandboxed component, the default) or `native` (a trusted
    /// shared library; needs `allow_native_plugins = true`, drivers only).
    #[serde(default)]
    pub runtime: Runtime,
    /// Options handed to the plugin's `init` (drivers).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Per-plugin sandbox limits, overriding `[limits]`.
    pub limits: Option<LimitsConfig>,
}

impl PluginConfig {
    /// The table of the built-in plugin `kind`: a sandboxed component,
    /// found by its type name, with no options of its own.
    pub fn named(kind: &str) -> PluginConfig {
        PluginConfig {
            kind: kind.to_string(),
            path: None,
            runtime: Runtime::Wasm,
            options: BTreeMap::new(),
            limits: None,
        }
    }
}

/// The sandbox's limits for one plugin instance (`[limits]`, or a
/// plugin's own `limits` table).
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub memory_mib: usize,
    pub cpu_seconds: f64,
    /// Time one call may take in all, host work it started included.
    pub wall_seconds: f64,
    /// Host-owned handles (streams) one instance may hold at once.
    pub handles: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            memory_mib: 64,
            cpu_seconds: 10.0,
            wall_seconds: 300.0,
            handles: 64,
        }
    }
}

impl LimitsConfig {
    pub fn to_limits(self) -> gantry_host::plugin::Limits {
        gantry_host::plugin::Limits {
            memory_bytes: self.memory_mib << 20,
            cpu: std::time::Duration::from_secs_f64(self.cpu_seconds),
            wall: std::time::Duration::from_secs_f64(self.wall_seconds),
            handles: self.handles,
        }
    }
}

/// Whether `gib` may be a quota: a finite amount above 0.
pub fn valid_gib(gib: f64) -> bool {
    gib.is_finite() && gib > 0.0
}

/// `gib` GiB in bytes.
pub fn gib_bytes(gib: f64) -> u64 {
    (gib * (1u64 << 30) as f64) as u64
}

impl Config {
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let (text, origin) = match path {
            Some(p) => (
                std::fs::read_to_string(p).with_context(|| format!("reading config {}", p.display()))?,
                p.display().to_string(),
            ),
            None => (String::new(), "built-in config".to_string()),
        };
        let mut c: Config = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{origin}: {}", e.message()))?;
        if let Some(p) = path {
            // Relative paths in a config file mean beside it, wherever
            // gantry runs from (a native library is never looked up by a
            // name `dlopen` would search, nor in the current directory).
            let file = std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))?;
            c.resolve_paths(file.parent().unwrap_or(Path::new("/")));
        }
        c.merge_registry_mirrors();
        c.validate(&origin)?;
        Ok(c)
    }

    /// Docker's `registry-mirrors` come first among Docker Hub's mirrors.
    fn merge_registry_mirrors(&mut self) {
        let c = self;
        if !c.registry_mirrors.is_empty() {
            let hub = c
                .registries
                .entry(gantry_core::reference::DEFAULT_DOMAIN.to_string())
                .or_default();
            let mut mirrors = std::mem::take(&mut c.registry_mirrors);
            mirrors.append(&mut hub.mirrors);
            hub.mirrors = mirrors;
        }
    }

    /// Refuses values no command could run with, naming the file.
    fn validate(&self, origin: &str) -> Result<()> {
        let c = self;
        if c.max_concurrent_downloads == 0 || c.max_concurrent_uploads == 0 {
            bail!("{origin}: max_concurrent_downloads and max_concurrent_uploads must be at least 1");
        }
        for (table, p) in [("transport", &c.transport), ("driver", &c.driver)] {
            // The type names the driver's home and image directories.
            let ok = !p.kind.is_empty()
                && p.kind
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                bail!("{origin}: {table}: invalid plugin type {:?}", p.kind);
            }
        }
        for (table, p) in [("transport", &c.transport), ("driver", &c.driver)] {
            match p.runtime {
                Runtime::Wasm => {}
                Runtime::Native if table == "driver" => {
                    if p.path.is_none() {
                        bail!("{origin}: driver: a native driver needs its path");
                    }
                }
                Runtime::Native => bail!("{origin}: {table}: only drivers may be native"),
            }
        }
        if c.mirror.max_blob_mib == 0 || c.mirror.max_fetches == 0 {
            bail!("{origin}: mirror: max_blob_mib and max_fetches must be at least 1");
        }
        let t = c.credential_helper_timeout_seconds;
        if !(t.is_finite() && t > 0.0 && t <= 3600.0) {
            bail!("{origin}: credential_helper_timeout_seconds must be between 0 and 3600");
        }
        if c.max_store_gib.is_some_and(|g| !valid_gib(g)) {
            bail!("{origin}: max_store_gib must be more than 0");
        }
        if c.max_layer_depth == 0 {
            bail!("{origin}: max_layer_depth must be at least 1");
        }
        let tables = [Some(c.limits), c.transport.limits, c.driver.limits];
        for l in tables.into_iter().flatten() {
            let seconds_ok = |v: f64| v.is_finite() && v > 0.0 && v <= 86400.0;
            if !seconds_ok(l.cpu_seconds) || !seconds_ok(l.wall_seconds) || l.handles == 0 || l.memory_mib == 0 {
                bail!("{origin}: limits: cpu_seconds and wall_seconds must be between 0 and 86400, memory_mib and handles at least 1");
            }
        }
        for (name, r) in &c.registries {
            for h in &r.redirect_hosts {
                let ok = !h.is_empty()
                    && !h.contains("://")
                    && !h
                        .bytes()
                        .any(|b| b == b'/' || b == b'@' || b.is_ascii_whitespace() || b.is_ascii_control());
                if !ok {
                    bail!("{origin}: registries.{name:?}: redirect_hosts: {h:?} is not a host or host:port");
                }
            }
            for m in &r.mirrors {
                if !(m.starts_with("https://") || m.starts_with("http://")) {
                    bail!("{origin}: registries.{name:?}: mirror {m:?} is not an http(s) URL");
                }
                if let (_, Some(prefix)) = gantry_core::endpoint::split_mirror_url(m) {
                    if !gantry_core::reference::valid_repository(&prefix) {
                        bail!("{origin}: registries.{name:?}: mirror {m:?}: its path is not a repository name prefix");
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes every relative path of the config relative to `base` (the
    /// config file's directory).
    fn resolve_paths(&mut self, base: &Path) {
        let paths = [
            &mut self.plugin_dir,
            &mut self.plugin_cache_dir,
            &mut self.auth_file,
            &mut self.transport.path,
            &mut self.driver.path,
        ];
        for p in paths.into_iter().flatten() {
            *p = resolve(base, p);
        }
    }

    /// The component file of a plugin table.
    pub fn plugin_path(&self, table: &str, p: &PluginConfig) -> Result<PathBuf> {
        if let Some(path) = &p.path {
            return Ok(path.clone());
        }
        if p.kind.is_empty()
            || !p
                .kind
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            bail!("{table}: invalid plugin type {:?}", p.kind);
        }
        let file = format!("gantry_{table}_{}.wasm", p.kind.replace('-', "_"));
        let dirs = plugin_dirs(self.plugin_dir.as_deref());
        for d in &dirs {
            if d.join(&file).is_file() {
                return Ok(d.join(&file));
            }
        }
        bail!(
            "{table} plugin {:?} not found: no {file} in {} (hint: build the plugins with `make plugins`, or set plugin_dir)",
            p.kind,
            dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
        )
    }
}

/// `path`, relative to `base` when it is relative.
pub fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// Where plugins are looked for, in order.
fn plugin_dirs(configured: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = configured {
        dirs.push(d.to_path_buf());
    }
    if let Some(d) = std::env::var_os("GANTRY_PLUGIN_DIR") {
        dirs.push(PathBuf::from(d));
    }
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        dirs.push(exe_dir.join("plugins"));
        // Inside a cargo target directory: target/release/gantry next to
        // target/wasm32-wasip2/release/*.wasm.
        if let (Some(profile), Some(target)) = (exe_dir.file_name(), exe_dir.parent()) {
            dirs.push(target.join("wasm32-wasip2").join(profile));
            dirs.push(target.join("wasm32-wasip2").join("release"));
        }
    }
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_parses_and_unknown_keys_fail() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.transport.kind, "v2");
        assert_eq!(c.driver.kind, "auto");
        let t = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(t.path(), "bogus = 1\n").unwrap();
        let e = Config::load(Some(t.path())).unwrap_err().to_string();
        assert!(e.contains("unknown field `bogus`"), "{e}");
    }

    #[test]
    fn a_file_holds_only_what_it_changes() {
        let t = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            t.path(),
            "[registries.\"r.example:5000\"]\ninsecure = true\n[limits]\nmemory_mib = 128\n",
        )
        .unwrap();
        let c = Config::load(Some(t.path())).unwrap();
        assert!(c.registries["r.example:5000"].insecure);
        assert_eq!((c.transport.kind.as_str(), c.driver.kind.as_str()), ("v2", "auto"));
        assert_eq!((c.max_concurrent_downloads, c.max_concurrent_uploads), (3, 5));
        assert_eq!((c.limits.memory_mib, c.limits.handles), (128, 64));
        assert!(c.durable && c.keep_content && !c.allow_native_plugins);
        std::fs::write(t.path(), "[driver]\ntype = \"vfs\"\nruntime = \"jvm\"\n").unwrap();
        let e = Config::load(Some(t.path())).unwrap_err().to_string();
        assert!(e.contains("unknown variant `jvm`, expected `wasm` or `native`"), "{e}");
    }

    #[test]
    fn relative_paths_are_beside_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("gantry.toml");
        std::fs::write(
            &t,
            "auth_file = \"auth.json\"\nplugin_dir = \"../plugins\"\nplugin_cache_dir = \"/var/cache/g\"\n[transport]\ntype = \"v2\"\npath = \"t/v2.wasm\"\n[driver]\ntype = \"x\"\nruntime = \"native\"\npath = \"drivers/libfast.so\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&t)).unwrap();
        let d = dir.path();
        assert_eq!(c.auth_file.as_deref(), Some(d.join("auth.json").as_path()));
        assert_eq!(c.plugin_dir.as_deref(), Some(d.join("../plugins").as_path()));
        assert_eq!(c.plugin_cache_dir.as_deref(), Some(Path::new("/var/cache/g")));
        assert_eq!(c.transport.path.as_deref(), Some(d.join("t/v2.wasm").as_path()));
        assert_eq!(c.driver.path.as_deref(), Some(d.join("drivers/libfast.so").as_path()));
    }

    #[test]
    fn redirect_hosts_are_hosts() {
        let t = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            t.path(),
            "[registries.\"10.0.0.5:5000\"]\nredirect_hosts = [\"10.0.0.6:9000\", \"minio\"]\n",
        )
        .unwrap();
        let c = Config::load(Some(t.path())).unwrap();
        assert_eq!(c.registries["10.0.0.5:5000"].redirect_hosts, ["10.0.0.6:9000", "minio"]);
        std::fs::write(t.path(), "[registries.\"r\"]\nredirect_hosts = [\"http://minio/\"]\n").unwrap();
        let e = Config::load(Some(t.path())).unwrap_err().to_string();
        assert!(e.contains("is not a host or host:port"), "{e}");
    }

    #[test]
    fn registry_mirrors_are_docker_hubs_first_mirrors() {
        let t = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            t.path(),
            "registry_mirrors = [\"https://a.example/hub\"]\n[registries.\"docker.io\"]\nmirrors = [\"https://b.example\"]\n",
        )
        .unwrap();
        let c = Config::load(Some(t.path())).unwrap();
        assert_eq!(
            c.registries["docker.io"].mirrors,
            vec!["https://a.example/hub".to_string(), "https://b.example".to_string()]
        );
        std::fs::write(t.path(), "registry_mirrors = [\"https://a.example/../x\"]").unwrap();
        let e = Config::load(Some(t.path())).unwrap_err().to_string();
        assert!(e.contains("not a repository name prefix"), "{e}");
    }
}
