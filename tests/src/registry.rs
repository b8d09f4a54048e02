//! A real registry for the tests: Debian's `docker-registry` on 127.0.0.1,
//! filled with `skopeo copy`.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Registry {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until something accepts connections on `addr`.
pub fn wait_for(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Registry {
    pub fn start() -> Registry {
        Registry::start_with("")
    }

    /// docker-registry with its access log on, kept in a file ([`Registry::log`]).
    pub fn start_logged() -> Registry {
        Registry::start_with("#log\n")
    }

    /// What the registry logged (its access log, with `start_logged`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("registry.log")).unwrap_or_default()
    }

    /// docker-registry as a pull-through cache of `remote` (its proxy mode).
    pub fn start_proxy(remote: &str) -> Registry {
        Registry::start_with(&format!("proxy:\n  remoteurl: {remote}\n"))
    }

    /// docker-registry checking bearer tokens of `tokens` (distribution's
    /// own token auth): who may pull or push what is the registry's answer.
    pub fn start_token_auth(tokens: &crate::token::TokenServer) -> Registry {
        Registry::start_with(&format!(
            "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
            tokens.realm(),
            crate::token::SERVICE,
            crate::token::ISSUER,
            tokens.cert().display()
        ))
    }

    fn start_with(extra: &str) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let logged = extra.starts_with("#log");
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: {}\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{extra}",
            !logged,
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(if logged {
                Stdio::from(std::fs::File::create(dir.path().join("registry.log")).unwrap())
            } else {
                Stdio::null()
            })
            .stderr(if logged {
                Stdio::from(
                    std::fs::OpenOptions::new()
                        .append(true)
                        .create(true)
                        .open(dir.path().join("registry.log"))
                        .unwrap(),
                )
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("starting docker-registry");
        wait_for(&format!("127.0.0.1:{port}"));
        Registry { child, port, _dir: dir }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `skopeo copy --all oci:LAYOUT:TAG docker://ADDR/REPO:TAG`.
    pub fn push(&self, layout: &Path, tag: &str, repo_tag: &str) {
        let out = Command::new("skopeo")
            .args(["copy", "--all", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo_tag}", self.addr()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
