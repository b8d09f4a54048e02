//! `gantry daemon`: the Engine API (crate `gantry-daemon`) over this
//! store, through the same core calls the CLI commands make.

use crate::context::Context;
use crate::output::parse_rfc3339;
use anyhow::{bail, Result};
use gantry_core::images::Summary;
use gantry_core::pull::{Progress, PullOptions, Status};
use gantry_core::{ErrorClass, Reference};
use gantry_daemon::api::{ImportRequest, RegistryAuth};
use gantry_daemon::{Engine, EngineError, Listen};
use serde_json::{json, Value};
use std::process::ExitCode;
use std::sync::Arc;

pub fn run(mut ctx: Context, hosts: &[String], allow_remote_tcp: bool, group: Option<&str>) -> Result<ExitCode> {
    // Its clients' identities are what they send (and the config's
    // auth_file), never the login of whoever started the daemon.
    ctx.credentials_from_environment = false;
    let gid = group.map(gid_of).transpose()?;
    let mut listens = Vec::new();
    for h in hosts {
        let l = Listen::parse(h)?;
        if !l.is_local() && !allow_remote_tcp {
            bail!(
                "{l} can be reached from other machines, and the Engine API has no authentication: whoever reaches it controls the store (use a loopback address or a unix socket, or pass --allow-remote-tcp)"
            );
        }
        if !listens.contains(&l) {
            listens.push(l);
        }
    }
    let groups: Vec<(Listen, u32)> = gid
        .map(|g| listens.iter().map(|l| (l.clone(), g)).collect())
        .unwrap_or_default();
    let engine: Arc<dyn Engine> = Arc::new(Daemon { ctx });
    gantry_daemon::run_many(vec![(listens, engine)], |addrs| announce(addrs, &groups))?;
    Ok(ExitCode::SUCCESS)
}

/// Gives each unix socket its group, then says one line per listener once
/// all listen (scripts and tests wait for it).
fn announce(addrs: &[Listen], groups: &[(Listen, u32)]) -> std::result::Result<(), String> {
    for (listen, gid) in groups {
        if let Listen::Unix(path) = listen {
            rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(*gid)))
                .map_err(|e| format!("giving {} to group {gid}: {e}", path.display()))?;
        }
    }
    for a in addrs {
        crate::commands::stderr_line(&format!("gantry daemon: listening on {a}"));
    }
    Ok(())
}

/// A group given by name (from the group database) or number.
fn gid_of(group: &str) -> Result<u32> {
    if let Ok(n) = group.parse::<u32>() {
        return Ok(n);
    }
    let name = std::ffi::CString::new(group).map_err(|_| anyhow::anyhow!("bad group name {group:?}"))?;
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 16 << 10];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf` outlives `grp`'s
    // borrowed strings, which are not used after it.
    let rc = unsafe { libc::getgrnam_r(name.as_ptr(), &mut grp, buf.as_mut_ptr().cast(), buf.len(), &mut found) };
    if rc != 0 || found.is_null() {
        bail!("no group {} on this machine", group.escape_default());
    }
    Ok(grp.gr_gid)
}

/// One tenant of a multi-tenant daemon: a socket, a store root, and a
/// gantry config of its own (plugins, sandbox limits, registries and the
/// `allowed_registries` allow-list).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Tenant {
    name: String,
    socket: std::path::PathBuf,
    root: std::path::PathBuf,
    config: Option<std::path::PathBuf>,
    /// The group that may use this tenant's socket (a name or a gid).
    group: Option<GroupName>,
    /// The most the tenant's store may hold, in GiB (over its config's).
    max_store_gib: Option<f64>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum GroupName {
    Id(u32),
    Name(String),
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Tenants {
    tenant: Vec<Tenant>,
}

/// `gantry daemon --tenants FILE`: one socket per tenant, each answered by
/// an engine over that tenant's own store and plugin instances — no store,
/// plugin instance, token cache or allow-list is shared.
pub fn run_tenants(file: &std::path::Path) -> Result<ExitCode> {
    use anyhow::Context as _;
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let t: Tenants = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", file.display(), e.message()))?;
    // Relative paths in the file mean beside it, as in a config.
    let base = std::path::absolute(file).with_context(|| format!("resolving {}", file.display()))?;
    let base = base.parent().unwrap_or(std::path::Path::new("/"));
    let mut names = std::collections::HashSet::new();
    let mut servers: Vec<(Vec<Listen>, Arc<dyn Engine>)> = Vec::new();
    let mut groups = Vec::new();
    for mut tenant in t.tenant {
        tenant.socket = crate::config::resolve(base, &tenant.socket);
        tenant.root = crate::config::resolve(base, &tenant.root);
        tenant.config = tenant.config.map(|c| crate::config::resolve(base, &c));
        if !names.insert(tenant.name.clone()) {
            bail!("{}: tenant {:?} is listed twice", file.display(), tenant.name);
        }
        let socket = Listen::Unix(tenant.socket.clone());
        if servers.iter().any(|(s, _)| s.contains(&socket)) {
            bail!(
                "{}: two tenants share the socket {}",
                file.display(),
                tenant.socket.display()
            );
        }
        let mut ctx =
            Context::open(tenant.config.as_deref(), &tenant.root).with_context(|| format!("tenant {}", tenant.name))?;
        // A tenant's registry identity is its own: its auth_file, or what
        // its clients send; never the daemon's environment.
        ctx.credentials_from_environment = false;
        if let Some(gib) = tenant.max_store_gib {
            ctx.set_max_store_gib(gib)
                .with_context(|| format!("{}: tenant {:?}", file.display(), tenant.name))?;
        }
        if let Some(g) = &tenant.group {
            let gid = match g {
                GroupName::Id(n) => *n,
                GroupName::Name(n) => gid_of(n).with_context(|| format!("tenant {}", tenant.name))?,
            };
            groups.push((socket.clone(), gid));
        }
        servers.push((vec![socket], Arc::new(Daemon { ctx })));
    }
    if servers.is_empty() {
        bail!("{}: no [[tenant]]", file.display());
    }
    gantry_daemon::run_many(servers, |addrs| announce(addrs, &groups))?;
    Ok(ExitCode::SUCCESS)
}

struct Daemon {
    ctx: Context,
}

/// A core error as the Engine API classes it.
fn engine_error(e: gantry_core::Error) -> EngineError {
    let m = e.to_string();
    match e.class() {
        ErrorClass::NotFound => EngineError::NotFound(m),
        ErrorClass::Invalid => EngineError::Invalid(m),
        ErrorClass::Denied => EngineError::Conflict(m),
        ErrorClass::Unauthorized => EngineError::Unauthorized(m),
        _ => EngineError::Internal(m),
    }
}

fn any_error(e: anyhow::Error) -> EngineError {
    match e.downcast::<gantry_core::Error>() {
        Ok(e) => engine_error(e),
        Err(e) => EngineError::Internal(format!("{e:#}")),
    }
}

/// Pull progress as Docker's JSON messages: every change of a layer's
/// state, and its byte counts at most every 100 ms (as dockerd's progress
/// reader does), not once per read.
struct Messages<'a> {
    send: &'a (dyn Fn(Value) + Sync),
    last: std::sync::Mutex<std::collections::HashMap<String, (Status, std::time::Instant)>>,
}

impl<'a> Messages<'a> {
    fn new(send: &'a (dyn Fn(Value) + Sync)) -> Self {
        Messages {
            send,
            last: Default::default(),
        }
    }
}

impl Progress for Messages<'_> {
    fn layer(&self, id: &str, status: Status, current: u64, total: u64) {
        {
            let now = std::time::Instant::now();
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((s, at)) = last.get(id) {
                if *s == status && now.duration_since(*at) < std::time::Duration::from_millis(100) && current < total {
                    return;
                }
            }
            last.insert(id.to_string(), (status, now));
        }
        let mut m = json!({"status": status.docker_text(), "id": id, "progressDetail": {}});
        if total > 0 && current < total {
            m["progressDetail"] = json!({"current": current, "total": total});
        }
        (self.send)(m);
    }

    fn line(&self, text: &str) {
        // `TAG: Pulling from NAME` is `{"status": "Pulling from NAME", "id": "TAG"}`.
        match text.split_once(": ") {
            Some((id, rest)) if !id.contains(' ') => (self.send)(json!({"status": rest, "id": id})),
            _ => (self.send)(json!({ "status": text })),
        }
    }
}

/// Push progress as Docker's JSON messages.
struct PushMessages<'a>(&'a (dyn Fn(Value) + Sync));

impl gantry_core::push::PushProgress for PushMessages<'_> {
    fn layer(&self, layer: &str, status: &str) {
        if layer.is_empty() {
            (self.0)(json!({ "status": status }));
        } else {
            (self.0)(json!({"status": status, "id": layer, "progressDetail": {}}));
        }
    }
}

fn credentials_of(a: RegistryAuth) -> gantry_core::plugin::Credentials {
    gantry_core::plugin::Credentials {
        username: a.username,
        password: a.password,
        identity_token: a.identity_token,
    }
}

/// `rmi`'s lines (`Untagged: …`, `Deleted: …`) as Docker's
/// `[{"Untagged": …}, {"Deleted": …}]`.
fn removal_messages(lines: &[String]) -> impl Iterator<Item = Value> + '_ {
    lines.iter().map(|l| match l.split_once(": ") {
        Some((k, v)) => json!({ k: v }),
        None => json!({ "Untagged": l }),
    })
}

fn no_such(e: gantry_core::Error) -> EngineError {
    match e {
        gantry_core::Error::NoSuchImage(n) => EngineError::NotFound(format!("No such image: {n}")),
        e => engine_error(e),
    }
}

impl Daemon {
    /// An import's options, every argument checked.
    fn import_options(&self, r: &ImportRequest) -> Result<gantry_core::import::ImportOptions, EngineError> {
        gantry_core::import::ImportOptions::checked(
            r.reference.as_deref(),
            r.message.clone(),
            "-",
            r.changes.clone(),
            r.platform.as_deref(),
        )
        .map_err(engine_error)
    }

    /// Refuses a registry outside this store's allow-list.
    fn allowed(&self, r: &Reference) -> Result<(), EngineError> {
        self.allowed_domain(&r.domain)
    }

    /// A tenant's `allowed_registries` (a 403 outside them).
    fn allowed_domain(&self, domain: &str) -> Result<(), EngineError> {
        match &self.ctx.config.allowed_registries {
            Some(list) if !list.iter().any(|a| a == domain) => Err(EngineError::Forbidden(format!(
                "registry {} is not allowed here",
                domain.escape_default()
            ))),
            _ => Ok(()),
        }
    }
}

impl Engine for Daemon {
    fn valid_reference(&self, reference: &str) -> Result<(), EngineError> {
        let r = Reference::parse(reference).map_err(engine_error)?;
        self.allowed(&r)
    }

    fn push(
        &self,
        reference: &str,
        auth: Option<RegistryAuth>,
        progress: &(dyn Fn(Value) + Sync),
    ) -> Result<(), EngineError> {
        // Work in flight: other tenants' guest code gives way meanwhile.
        let _busy = self.ctx.host.busy();
        let r = Reference::parse(reference).map_err(engine_error)?;
        self.allowed(&r)?;
        let transport = self.ctx.shared_transport().map_err(any_error)?;
        let from_file = self.ctx.credentials().map_err(any_error)?;
        let given = auth.map(credentials_of);
        let domain = r.domain.clone();
        let credentials = move |d: &str| match &given {
            Some(c) if d == domain => Ok(Some(c.clone())),
            _ => from_file(d),
        };
        let lines = PushMessages(progress);
        let pusher = gantry_core::push::Pusher {
            store: &self.ctx.store,
            driver: self.ctx.driver().map_err(any_error)?,
            transport: &*transport,
            registries: &self.ctx.config.registries,
            credentials: &credentials,
            progress: &lines,
            concurrency: self.ctx.config.max_concurrent_uploads,
        };
        progress(json!({ "status": format!("The push refers to repository [{}]", r.name()) }));
        let o = pusher.push(&r).map_err(no_such)?;
        progress(json!({ "status": format!("{}: digest: {} size: {}", o.tag, o.digest, o.size) }));
        progress(json!({"progressDetail": {}, "aux": {"Tag": o.tag, "Digest": o.digest, "Size": o.size}}));
        Ok(())
    }

    fn save(&self, names: &[String], out: &mut dyn std::io::Write) -> Result<(), EngineError> {
        // Work in flight: other tenants' guest code gives way meanwhile.
        let _busy = self.ctx.host.busy();
        let driver = self.ctx.driver().map_err(any_error)?;
        gantry_core::save::save(&self.ctx.store, driver, names, gantry_core::save::Format::Docker, out).map_err(no_such)
    }

    fn load(&self, input: &mut dyn std::io::Read, progress: &(dyn Fn(Value) + Sync)) -> Result<(), EngineError> {
        // Work in flight: other tenants' guest code gives way meanwhile.
        let _busy = self.ctx.host.busy();
        let loader = gantry_core::load::Loader {
            store: &self.ctx.store,
            driver: self.ctx.driver().map_err(any_error)?,
            progress: &gantry_core::pull::Quiet,
            max_layer_bytes: self.ctx.config.max_layer_size_mib << 20,
            max_depth: self.ctx.config.max_layer_depth,
            platform: gantry_core::platform::Platform::host(),
        };
        let loaded = loader
            .load_stream(input, &self.ctx.store.load_spool())
            .map_err(engine_error)?;
        for l in loaded.images {
            if l.tags.is_empty() {
                progress(json!({ "stream": format!("Loaded image ID: {}\n", l.id) }));
            }
            for t in l.tags {
                progress(json!({ "stream": format!("Loaded image: {}\n", t.familiar_string()) }));
            }
        }
        Ok(())
    }

    fn prune(&self, select: &(dyn Fn(&Summary) -> bool + Sync)) -> Result<Value, EngineError> {
        // Work in flight: other tenants' guest code gives way meanwhile.
        let _busy = self.ctx.host.busy();
        let store = &self.ctx.store;
        let driver = self.ctx.driver().map_err(any_error)?;
        let mut deleted = Vec::new();
        let mut reclaimed = 0u64;
        for image in self.list()? {
            if !select(&image) {
                continue;
            }
            // A tagged image (pruned with `dangling=false`) loses every tag.
            let lines = match gantry_core::images::remove(store, driver, &image.id.to_string(), true) {
                Ok(lines) => lines,
                // Removed meanwhile by another client.
                Err(gantry_core::Error::NoSuchImage(_)) => continue,
                Err(e) => return Err(engine_error(e)),
            };
            deleted.extend(removal_messages(&lines));
            reclaimed += image.size;
        }
        Ok(
            json!({ "ImagesDeleted": if deleted.is_empty() { Value::Null } else { Value::Array(deleted) }, "SpaceReclaimed": reclaimed }),
        )
    }

    fn auth(&self, server: &str, auth: RegistryAuth) -> Result<(), EngineError> {
        let domain = gantry_core::endpoint::login_domain(server);
        self.allowed_domain(&domain)?;
        let transport = self.ctx.shared_transport().map_err(any_error)?;
        gantry_core::endpoint::login(&*transport, &domain, &self.ctx.config.registries, &credentials_of(auth))
            .map(drop)
            .map_err(engine_error)
    }

    fn check_import(&self, request: &ImportRequest) -> Result<(), EngineError> {
        self.import_options(request).map(drop)
    }

    fn import(
        &self,
        request: &ImportRequest,
        input: &mut (dyn std::io::Read + Send),
        progress: &(dyn Fn(Value) + Sync),
    ) -> Result<(), EngineError> {
        // Work in flight: other tenants' guest code gives way meanwhile.
        let _busy = self.ctx.host.busy();
        let options = self.import_options(request)?;
        let importer = gantry_core::import::Importer {
            store: &self.ctx.store,
            driver: self.ctx.driver().map_err(any_error)?,
            max_layer_bytes: self.ctx.config.max_layer_size_mib << 20,
        };
        let id = importer.import(input, &options).map_err(engine_error)?;
        progress(json!({ "status": id.to_string() }));
        Ok(())
    }

    fn info(&self) -> Result<Value, EngineError> {
        let store = &self.ctx.store;
        let images = store.images.list().map_err(engine_error)?.len();
        let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
        let proc = |p: &str| std::fs::read_to_string(p).unwrap_or_default().trim().to_string();
        let mem_kib: u64 = proc("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        Ok(json!({
            "ID": "",
            "Images": images,
            "Driver": self.ctx.config.driver.kind,
            "DriverStatus": [],
            "DockerRootDir": store.root().display().to_string(),
            "Name": proc("/proc/sys/kernel/hostname"),
            "KernelVersion": proc("/proc/sys/kernel/osrelease"),
            "OperatingSystem": "gantry (images only)",
            "NCPU": ncpu,
            "MemTotal": mem_kib * 1024,
            "Plugins": {"Volume": [], "Network": [], "Authorization": null, "Log": []},
            "RegistryConfig": {"InsecureRegistryCIDRs": ["127.0.0.0/8"], "IndexConfigs": {}, "Mirrors": []},
            "SecurityOptions": [],
            "Warnings": [],
        }))
    }

    fn list(&self) -> Result<Vec<Summary>, EngineError> {
        gantry_core::images::summaries(&self.ctx.store).map_err(engine_error)
    }

    fn disk_usage(&self) -> Result<gantry_core::images::DiskUsage, EngineError> {
        gantry_core::images::disk_usage(&self.ctx.store).map_err(engine_error)
    }

    fn distribution(
        &self,
        reference: &str,
        auth: Option<RegistryAuth>,
    ) -> Result<gantry_core::pull::Distribution, EngineError> {
        let r = Reference::parse(reference).map_err(engine_error)?;
        self.allowed(&r)?;
        let domain = r.domain.clone();
        self.ctx
            .with_puller_auth(
                &gantry_core::pull::Quiet,
                self.ctx.pull_options(),
                auth.map(|a| (domain, credentials_of(a))),
                |puller| puller.inspect_distribution(&r).map_err(anyhow::Error::from),
            )
            .map_err(|e| match e.downcast::<gantry_core::Error>() {
                // The registry's DENIED is dockerd's 403 here (a push's
                // refusal is not this).
                Ok(e) if e.class() == ErrorClass::Denied => EngineError::Forbidden(e.to_string()),
                Ok(e) => engine_error(e),
                Err(e) => EngineError::Internal(format!("{e:#}")),
            })
    }

    fn inspect(&self, name: &str) -> Result<Value, EngineError> {
        super::inspect::image_json(&self.ctx, name).map_err(no_such)
    }

    fn history(&self, name: &str) -> Result<Value, EngineError> {
        let store = &self.ctx.store;
        let id = gantry_core::images::lookup(store, name).map_err(no_such)?;
        let mut rows: Vec<Value> = super::history::entries(&self.ctx, &id)
            .map_err(engine_error)?
            .into_iter()
            .map(|e| {
                json!({
                    "Id": "<missing>",
                    "Created": parse_rfc3339(&e.created).unwrap_or(0),
                    "CreatedBy": e.created_by,
                    "Tags": null,
                    "Size": e.size,
                    "Comment": e.comment,
                })
            })
            .collect();
        rows.reverse();
        if let Some(top) = rows.first_mut() {
            top["Id"] = json!(id);
            let tags: Vec<String> = store
                .refs
                .refs_of(&id)
                .map_err(engine_error)?
                .iter()
                .filter(|r| r.tag.is_some())
                .map(|r| r.familiar_string())
                .collect();
            top["Tags"] = json!(tags);
        }
        Ok(Value::Array(rows))
    }

    fn tag(&self, name: &str, target: &str) -> Result<(), EngineError> {
        gantry_core::images::tag(&self.ctx.store, name, target).map_err(no_such)
    }

    fn remove(&self, name: &str, force: bool) -> Result<Vec<Value>, EngineError> {
        let driver = self.ctx.driver().map_err(any_error)?;
        let lines = gantry_core::images::remove(&self.ctx.store, driver, name, force).map_err(no_such)?;
        Ok(removal_messages(&lines).collect())
    }

    fn pull(
        &self,
        reference: &str,
        auth: Option<RegistryAuth>,
        progress: &(dyn Fn(Value) + Sync),
        cancel: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<(), EngineError> {
        // Work in flight: other tenants' guest code gives way meanwhile.
        let _busy = self.ctx.host.busy();
        let r = Reference::parse(reference).map_err(engine_error)?;
        self.allowed(&r)?;
        let messages = Messages::new(progress);
        let options = PullOptions {
            cancel: Some(cancel),
            ..self.ctx.pull_options()
        };
        let domain = r.domain.clone();
        let outcome = self
            .ctx
            .with_puller_auth(
                &messages,
                options,
                auth.map(|a| (domain, credentials_of(a))),
                |puller| puller.pull(&r).map_err(anyhow::Error::from),
            )
            .map_err(any_error)?;
        let what = if outcome.downloaded {
            "Downloaded newer image for"
        } else {
            "Image is up to date for"
        };
        progress(json!({ "status": format!("Status: {what} {}", r.familiar_string()) }));
        Ok(())
    }
}
