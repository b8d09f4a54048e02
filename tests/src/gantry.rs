//! Runs the built `gantry` binary with a fresh `--root`, and shows all of
//! its output when an expectation fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Variables of the surrounding environment no command starts with
/// (lowercase forms too): proxies and trust stores of the machine running
/// the tests would make their outcome depend on it.
pub const NETWORK_ENV: [&str; 6] = [
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// The unprivileged user (and group) of [`Gantry::unprivileged`].
pub const NOBODY: u32 = 65534;

pub struct Gantry {
    pub root: tempfile::TempDir,
    /// `TMPDIR` of every run: gantry must never write there.
    pub tmpdir: tempfile::TempDir,
    pub config: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    /// The user and group every command runs as (`None`: the test's own).
    pub user: Option<(u32, u32)>,
    /// The binary that user runs: [`binary`] itself, or a link to it (and
    /// to the plugins beside it) in the test's directory, which that user
    /// may reach wherever the build tree is.
    exe: Option<PathBuf>,
    /// The test's own directory: `root`, `tmpdir` and the scratch space
    /// live inside it, so a test never touches a shared path. Dropped last.
    work: tempfile::TempDir,
}

/// The binary next to the test executable (`target/<profile>/gantry`).
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("gantry");
    assert!(
        bin.is_file(),
        "{} is missing: build the workspace first (make build)",
        bin.display()
    );
    bin
}

pub struct Run {
    pub args: String,
    pub out: Output,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    fn show(&self) -> String {
        format!(
            "gantry {}\n--- exit: {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.args,
            self.out.status.code(),
            self.stdout(),
            self.stderr()
        )
    }
}

impl Default for Gantry {
    fn default() -> Self {
        Self::new()
    }
}

impl Gantry {
    /// A store with the built-in config (the driver `auto`), or, when
    /// `GANTRY_TEST_DRIVER` is set, with that driver forced: the suite runs
    /// once per driver. When `GANTRY_TEST_UNPRIVILEGED` is set, its
    /// commands run as `nobody` (see [`Gantry::unprivileged`]).
    pub fn new() -> Gantry {
        let mut g = Gantry::bare();
        if std::env::var_os("GANTRY_TEST_UNPRIVILEGED").is_some_and(|v| !v.is_empty()) {
            g.run_unprivileged();
        }
        match std::env::var("GANTRY_TEST_DRIVER") {
            Ok(d) if !d.is_empty() => g.with_driver(&d),
            _ => g,
        }
    }

    /// The driver the suite runs with: `GANTRY_TEST_DRIVER`, else `auto`.
    pub fn test_driver() -> String {
        std::env::var("GANTRY_TEST_DRIVER")
            .ok()
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| "auto".into())
    }

    /// A store with the built-in config whatever `GANTRY_TEST_DRIVER` says.
    pub fn bare() -> Gantry {
        let work = tempfile::tempdir().unwrap();
        std::fs::create_dir(work.path().join("scratch")).unwrap();
        Gantry {
            root: tempfile::tempdir_in(work.path()).unwrap(),
            tmpdir: tempfile::tempdir_in(work.path()).unwrap(),
            config: None,
            env: Vec::new(),
            user: None,
            exe: None,
            work,
        }
    }

    /// A store whose commands run as user and group `nobody` (65534), in
    /// a test directory that user owns: gantry without root.
    pub fn unprivileged() -> Gantry {
        let mut g = Gantry::new();
        g.run_unprivileged();
        g
    }

    fn run_unprivileged(&mut self) {
        self.user = Some((NOBODY, NOBODY));
        for d in [self.work.path(), self.root.path(), self.tmpdir.path(), &self.scratch()] {
            std::os::unix::fs::chown(d, Some(NOBODY), Some(NOBODY)).unwrap();
        }
        if self.exe.is_some() {
            return;
        }
        // The build tree may be where that user cannot go (a home of mode
        // 0700): the binary and its plugins are linked (or copied) into the
        // test's directory, where gantry finds `plugins/` beside itself.
        let bin = self.work.path().join("bin");
        std::fs::create_dir_all(bin.join("plugins")).unwrap();
        let place = |from: &Path, to: &Path| {
            if std::fs::hard_link(from, to).is_err() {
                std::fs::copy(from, to).unwrap();
            }
        };
        let exe = binary();
        place(&exe, &bin.join("gantry"));
        let plugins = exe.parent().unwrap().parent().unwrap().join("wasm32-wasip2/release");
        for e in std::fs::read_dir(&plugins).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "wasm") {
                place(&p, &bin.join("plugins").join(p.file_name().unwrap()));
            }
        }
        for d in [&bin, &bin.join("plugins")] {
            std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        self.exe = Some(bin.join("gantry"));
    }

    /// The binary this store's commands run.
    pub fn exe(&self) -> PathBuf {
        self.exe.clone().unwrap_or_else(binary)
    }

    /// The plugin component `name` (`gantry_driver_vfs`, …) as this store's
    /// binary finds it.
    pub fn component(&self, name: &str) -> PathBuf {
        match &self.exe {
            Some(exe) => exe.parent().unwrap().join("plugins").join(format!("{name}.wasm")),
            None => binary()
                .parent()
                .unwrap()
                .parent()
                .unwrap()
                .join(format!("wasm32-wasip2/release/{name}.wasm")),
        }
    }

    /// Uses graph driver `driver` (v2 transport, default limits).
    pub fn with_driver(self, driver: &str) -> Gantry {
        self.with_config(&format!("[transport]\ntype = \"v2\"\n[driver]\ntype = \"{driver}\"\n"))
    }

    /// A directory of the test's own for configs, exports and canaries,
    /// outside the store root and `TMPDIR`.
    pub fn scratch(&self) -> PathBuf {
        self.work.path().join("scratch")
    }

    pub fn root_path(&self) -> &Path {
        self.root.path()
    }

    /// The graph driver this store holds layers with: `overlay2` or `vfs`.
    pub fn driver(&self) -> &'static str {
        if self.root.path().join("image/overlay2").is_dir() {
            "overlay2"
        } else {
            "vfs"
        }
    }

    /// `image/<driver>/` + `rel`: the image store of this store's driver.
    pub fn image_dir(&self, rel: &str) -> PathBuf {
        self.root.path().join("image").join(self.driver()).join(rel)
    }

    /// Each layer's own files, one directory per layer: `vfs/dir/<id>`
    /// (a full tree) or `overlay2/<id>/diff` (what the layer changed).
    pub fn layer_dirs(&self) -> Vec<PathBuf> {
        let (base, leaf) = match self.driver() {
            "overlay2" => (self.root.path().join("overlay2"), "diff"),
            _ => (self.root.path().join("vfs/dir"), ""),
        };
        let mut out: Vec<PathBuf> = std::fs::read_dir(&base)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        out.retain(|p| p.file_name().is_some_and(|n| n != "l"));
        out.sort();
        out.into_iter()
            .map(|p| if leaf.is_empty() { p } else { p.join(leaf) })
            .collect()
    }

    /// `program` (the binary, or a wrapper given the binary first) with
    /// this store's root, config and environment, and `args`.
    fn command(&self, program: &Path, pre: &[&std::ffi::OsStr], args: &[&str]) -> Command {
        self.command_as(program, pre, args, self.user)
    }

    /// [`Gantry::command`], run as `user` (`None`: as the test itself).
    fn command_as(&self, program: &Path, pre: &[&std::ffi::OsStr], args: &[&str], user: Option<(u32, u32)>) -> Command {
        let mut c = Command::new(program);
        if let Some((uid, gid)) = user {
            // std drops the supplementary groups too when it changes user.
            std::os::unix::process::CommandExt::uid(&mut c, uid);
            std::os::unix::process::CommandExt::gid(&mut c, gid);
        }
        c.args(pre);
        c.arg("--root").arg(self.root.path());
        if let Some(cfg) = &self.config {
            c.arg("--config").arg(cfg);
        }
        c.args(args).stdin(Stdio::null());
        // Never read the developer's credentials.
        c.env("DOCKER_CONFIG", self.root.path().join("no-docker-config"));
        c.env("TMPDIR", self.tmpdir.path());
        // Nor the machine's proxies or trust store: a test that wants them
        // sets them in `env`, which comes after.
        for k in NETWORK_ENV {
            c.env_remove(k);
            c.env_remove(k.to_ascii_lowercase());
        }
        // Nor the machine's object-store credentials and CA bundle.
        for k in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_SHARED_CREDENTIALS_FILE",
            "AWS_CA_BUNDLE",
        ] {
            c.env_remove(k);
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// A command ready to run with the given stdio, for tests that stream
    /// one gantry's output into another (`save | load`) or into the test.
    pub fn piped(&self, args: &[&str]) -> Command {
        self.command(&self.exe(), &[], args)
    }

    /// Starts a command without waiting (for tests that kill it).
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        let mut c = self.command(&self.exe(), &[], args);
        let log = self.work.path().join(format!("spawned-{}.log", std::process::id()));
        c.stdout(Stdio::null()).stderr(std::fs::File::create(log).unwrap());
        c.spawn().unwrap()
    }

    /// What the last [`Gantry::spawn`]ed command wrote to stderr.
    pub fn spawned_log(&self) -> String {
        std::fs::read_to_string(self.work.path().join(format!("spawned-{}.log", std::process::id())))
            .unwrap_or_default()
    }

    pub fn run(&self, args: &[&str]) -> Run {
        let mut c = self.command(&self.exe(), &[], args);
        Run {
            args: args.join(" "),
            out: c.output().unwrap(),
        }
    }

    /// Starts `gantry serve` with `args` (plus `--listen 127.0.0.1:0`) and
    /// waits until it listens. Its stderr (the access log) is kept.
    pub fn serve(&self, args: &[&str]) -> Server {
        let log = self.work.path().join(format!("serve-{}.log", std::process::id()));
        let mut all = vec!["serve", "--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let mut c = self.command(&self.exe(), &[], &all);
        c.stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
        // Waited for by `Server`'s drop.
        #[allow(clippy::zombie_processes)]
        let child = c.spawn().unwrap();
        let url = wait_for_line(&log, "gantry serve: listening on ");
        let addr = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .unwrap_or(&url)
            .to_string();
        Server { child, addr, log }
    }

    /// Starts `gantry daemon` on a socket in this store's scratch space and
    /// waits until it listens; `addr` is `unix://PATH` (a `DOCKER_HOST`).
    pub fn daemon(&self) -> Server {
        let log = self.work.path().join(format!("daemon-{}.log", std::process::id()));
        let sock = self.work.path().join("gantry.sock");
        let host = format!("unix://{}", sock.display());
        let mut c = self.command(&self.exe(), &[], &["daemon", "--host", &host]);
        c.stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
        // Waited for by `Server`'s drop.
        #[allow(clippy::zombie_processes)]
        let child = c.spawn().unwrap();
        wait_for_line(&log, "gantry daemon: listening on ");
        Server { child, addr: host, log }
    }

    /// Runs through `wrapper` (given the binary first), started as the
    /// test itself: the wrapper becomes this store's user on its own.
    pub fn run_wrapped(&self, wrapper: &Path, args: &[&str]) -> Run {
        let bin = self.exe();
        let mut c = self.command_as(wrapper, &[bin.as_os_str()], args, None);
        Run {
            args: format!("{} {}", wrapper.display(), args.join(" ")),
            out: c.output().unwrap(),
        }
    }

    /// Runs with `input` on standard input.
    pub fn run_stdin(&self, args: &[&str], input: &Path) -> Run {
        let mut c = self.command(&self.exe(), &[], args);
        c.stdin(std::fs::File::open(input).unwrap());
        Run {
            args: format!("{} < {}", args.join(" "), input.display()),
            out: c.output().unwrap(),
        }
    }

    /// Runs and returns the run with gantry's peak resident memory in KiB
    /// (its `VmHWM`). GNU time forks gantry from its own small process and
    /// reports `ru_maxrss` from `wait4`: measured from the test process
    /// itself, the figure would include the test's own memory, which a
    /// child shares until it execs.
    pub fn run_peak(&self, args: &[&str]) -> (Run, u64) {
        let report = self.work.path().join("peak-kib");
        let bin = self.exe();
        let pre = [
            "-f".as_ref(),
            "%M".as_ref(),
            "-o".as_ref(),
            report.as_os_str(),
            bin.as_os_str(),
        ];
        let mut c = self.command(Path::new("/usr/bin/time"), &pre, args);
        let out = c.output().expect("running /usr/bin/time (Debian package time)");
        let text = std::fs::read_to_string(&report).unwrap();
        // On failure GNU time writes "Command exited with non-zero status N" first.
        let peak = text
            .lines()
            .filter_map(|l| l.trim().parse::<u64>().ok())
            .next_back()
            .unwrap_or_else(|| panic!("no peak in {text:?}"));
        (
            Run {
                args: args.join(" "),
                out,
            },
            peak,
        )
    }

    /// Runs and expects success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert!(r.out.status.success(), "expected success:\n{}", r.show());
        r.stdout()
    }

    /// Runs and expects failure with a one-line error; returns that line.
    pub fn fails(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert!(!r.out.status.success(), "expected failure:\n{}", r.show());
        let err = r.stderr();
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "expected one error line:\n{}", r.show());
        assert!(lines[0].starts_with("error: "), "{}", r.show());
        lines[0].to_string()
    }

    /// Writes a config file from `toml` and uses it.
    pub fn with_config(mut self, toml: &str) -> Gantry {
        let p = self.scratch().join("gantry.toml");
        std::fs::write(&p, toml).unwrap();
        self.config = Some(p);
        self
    }

    /// A listing of every path under the root with type, size and content
    /// digest: equal before and after means the store is exactly as it was.
    pub fn store_listing(&self) -> Vec<String> {
        let mut out = Vec::new();
        walk(self.root.path(), self.root.path(), &mut out);
        out.sort();
        out
    }

    /// Nothing was written to `TMPDIR`.
    pub fn assert_tmpdir_untouched(&self) {
        let n = std::fs::read_dir(self.tmpdir.path()).unwrap().count();
        assert_eq!(n, 0, "gantry wrote into TMPDIR");
    }

    pub fn fsck_clean(&self) {
        let out = self.ok(&["fsck"]);
        assert!(out.contains("store is consistent"), "{out}");
    }
}

/// Waits (30 s at most) until the file `log` has a line starting with
/// `prefix`; what follows it on that line.
fn wait_for_line(log: &Path, prefix: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        // Whole lines only: the server may be midway through writing one
        // (stderr is unbuffered, a formatted line can take several writes).
        let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        if let Some(rest) = whole.lines().find_map(|l| l.strip_prefix(prefix)) {
            return rest.trim().to_string();
        }
        assert!(std::time::Instant::now() < deadline, "no line {prefix:?} came:\n{text}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let rel = p.strip_prefix(base).unwrap().display().to_string();
        // The compiled-plugin cache and lock files are not store state.
        if rel.starts_with("plugins-cache") || rel.ends_with(".lock") {
            continue;
        }
        let md = std::fs::symlink_metadata(&p).unwrap();
        if md.is_dir() {
            out.push(format!("{rel}/"));
            walk(base, &p, out);
        } else if md.is_file() {
            let data = std::fs::read(&p).unwrap();
            out.push(format!("{rel} {} {}", data.len(), crate::image::sha256(&data)));
        } else {
            out.push(format!("{rel} (special)"));
        }
    }
}

/// A running `gantry serve`, killed when dropped.
pub struct Server {
    pub child: std::process::Child,
    /// `127.0.0.1:PORT`
    pub addr: String,
    log: PathBuf,
}

impl Server {
    /// What it wrote to stderr so far (the access log).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` (SIGHUP, …) and returns at once.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits until the log holds a line containing `text`.
    pub fn wait_for(&self, text: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !self.log().lines().any(|l| l.contains(text)) {
            assert!(std::time::Instant::now() < deadline, "no {text:?} in:\n{}", self.log());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
