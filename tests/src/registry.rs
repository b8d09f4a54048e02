//! A real registry for the tests: Debian's `docker-registry` on 127.0.0.1,
//! filled with `skopeo copy`. It speaks plain HTTP, or HTTPS with a
//! certificate of the test's own CA ([`crate::tls`]), optionally requiring
//! client certificates (mutual TLS).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Registry {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
    /// A directory with `client.cert` and `client.key` that `skopeo copy`
    /// presents (`--dest-cert-dir`), for a registry requiring one.
    cert_dir: Option<PathBuf>,
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

    /// docker-registry requiring basic auth of the users in `htpasswd`
    /// (bcrypt entries) for every request, pulls too.
    pub fn start_htpasswd(htpasswd: &Path) -> Registry {
        Registry::start_with(&format!(
            "auth:\n  htpasswd:\n    realm: gantry-test\n    path: {}\n",
            htpasswd.display()
        ))
    }

    /// docker-registry serving HTTPS on 127.0.0.1 with `cert` and `key`
    /// (PEM). With `client_cas` (a PEM file of CA certificates) it requires
    /// a client certificate signed by one of them (`http.tls.clientcas`):
    /// give [`Registry::push`] one with [`Registry::set_client_cert`].
    pub fn start_tls(cert: &Path, key: &Path, client_cas: Option<&Path>) -> Registry {
        let mut tls = format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            cert.display(),
            key.display()
        );
        if let Some(cas) = client_cas {
            tls.push_str(&format!("    clientcas:\n      - {}\n", cas.display()));
        }
        Registry::start_with(&tls)
    }

    /// The client certificate `skopeo copy` presents to this registry
    /// (copied into a directory of the registry's own, as skopeo's
    /// `--dest-cert-dir` wants it: a `*.cert` and `*.key` pair).
    pub fn set_client_cert(&mut self, cert: &Path, key: &Path) {
        let dir = self._dir.path().join("skopeo-certs");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(cert, dir.join("client.cert")).unwrap();
        std::fs::copy(key, dir.join("client.key")).unwrap();
        self.cert_dir = Some(dir);
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
        Registry {
            child,
            port,
            _dir: dir,
            cert_dir: None,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `skopeo copy --all oci:LAYOUT:TAG docker://ADDR/REPO:TAG` (HTTPS
    /// without verifying the certificate, or plain HTTP).
    pub fn push(&self, layout: &Path, tag: &str, repo_tag: &str) {
        let mut c = Command::new("skopeo");
        c.args(["copy", "--all", "--quiet", "--dest-tls-verify=false"]);
        if let Some(dir) = &self.cert_dir {
            c.arg("--dest-cert-dir").arg(dir);
        }
        let out = c
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
