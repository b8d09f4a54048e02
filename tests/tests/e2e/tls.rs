//! Private registries as company networks have them (issue 22): HTTPS with
//! a certificate of an internal CA, under a name only the network resolves,
//! sometimes requiring client certificates, reached through a forward
//! proxy that wants credentials. Where docker, skopeo and curl pull, gantry
//! must too: trust from a `certs.d` directory, `SSL_CERT_FILE` or
//! `insecure`; mutual TLS from `client.cert`/`client.key`; `HTTPS_PROXY`
//! (CONNECT by name, credentials never printed) and `NO_PROXY` — for pull,
//! push and the serve mirror's upstream. A refusal is one line naming the
//! certificate, and leaves the store as it was.
//!
//! The registry is docker-registry with TLS on 127.0.0.1; gantry knows it as
//! `reg.internal.test:PORT`, resolved by the config's `[network.hosts]`.

use crate::{assert_export_matches_umoci, peers, publish, Published};
use gantry_tests::forward::{basic, ForwardProxy};
use gantry_tests::gantry::Gantry;
use gantry_tests::image::{Image, Layer};
use gantry_tests::registry::Registry;
use gantry_tests::require;
use gantry_tests::tls::{certs_d, TestCa};
use std::path::{Path, PathBuf};

const HOST: &str = "reg.internal.test";
const USER: &str = "proxy-user";
const SECRET: &str = "s3cret-pw";

/// A TLS registry of a test CA holding `t/control:v1` and `t/app:v1`.
struct Setup {
    dir: tempfile::TempDir,
    ca: TestCa,
    reg: Registry,
    app: Published,
}

/// Whether the peers are here (a skip says why).
fn tls_peers() -> bool {
    peers() && require("openssl")
}

fn app_image() -> Image {
    Image::new(vec![
        Layer::new()
            .dir("etc", 0o755)
            .file("etc/os-release", 0o644, b"ID=internal\n")
            .tar(),
        Layer::new()
            .dir("srv", 0o750)
            .file("srv/app", 0o755, &[7u8; 70_000])
            .symlink("srv/current", "app")
            .tar(),
    ])
}

impl Setup {
    /// With `mutual`, the registry requires a client certificate of the
    /// same CA (skopeo fills it with one).
    fn start(mutual: bool) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new(dir.path());
        let (cert, key) = ca.server_cert(&[HOST], &["127.0.0.1"]);
        let mut reg = Registry::start_tls(&cert, &key, mutual.then(|| ca.cert()).as_deref());
        if mutual {
            let (c, k) = ca.client_cert("skopeo");
            reg.set_client_cert(&c, &k);
        }
        publish(&reg, "t/control", "v1", &crate::control_image());
        let (app, _, _) = publish(&reg, "t/app", "v1", &app_image());
        Setup { dir, ca, reg, app }
    }

    /// `reg.internal.test:PORT`
    fn host(&self) -> String {
        format!("{HOST}:{}", self.reg.port)
    }

    /// `reg.internal.test:PORT/REPO`
    fn name(&self, repo: &str) -> String {
        format!("{}/{repo}", self.host())
    }

    /// A `certs.d` tree of its own (`label`) for `host_port`, with this
    /// CA's certificate and `client` if given.
    fn certs(&self, label: &str, host_port: &str, ca: bool, client: Option<(&Path, &Path)>) -> PathBuf {
        let ca_cert = self.ca.cert();
        certs_d(
            &self.dir.path().join(label),
            host_port,
            ca.then_some(ca_cert.as_path()),
            client,
        )
    }

    /// A `certs.d` tree trusting this CA for the registry's name.
    fn trusted(&self) -> PathBuf {
        self.certs("trusted", &self.host(), true, None)
    }

    /// A `certs.d` tree with nothing in it.
    fn untrusted(&self) -> PathBuf {
        let d = self.dir.path().join("untrusted");
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

/// A gantry config: the suite's driver, `reg.internal.test` resolved to
/// loopback, `certs_dirs = [certs]`, `network` (more `[network]` keys) and
/// `rest` (more tables).
fn config(certs: &Path, network: &str, rest: &str) -> String {
    format!(
        "[transport]\ntype = \"v2\"\n[driver]\ntype = \"{}\"\n\
         [network]\ncerts_dirs = [\"{}\"]\n{network}\
         [network.hosts]\n\"{HOST}\" = \"127.0.0.1\"\n{rest}",
        Gantry::test_driver(),
        certs.display()
    )
}

/// A store with `config`, and `env` set for every command.
fn store(config: &str, env: &[(&str, &str)]) -> Gantry {
    let mut g = Gantry::bare().with_config(config);
    g.env.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    g
}

/// No byte of `secret` in `text`, nor its Basic form.
fn assert_hidden(text: &str, secret: &str, what: &str) {
    assert!(!text.contains(secret), "{what} shows the proxy password:\n{text}");
    let b64 = basic(USER, secret);
    let b64 = b64.trim_start_matches("Basic ");
    assert!(
        !text.contains(b64),
        "{what} shows the proxy credentials (base64):\n{text}"
    );
}

/// Runs and expects success; the secret appears in neither stream nor in
/// any file of the store. Returns stdout.
fn ok_hiding(g: &Gantry, args: &[&str], secret: &str) -> String {
    let r = g.run(args);
    let (out, err) = (r.stdout(), r.stderr());
    assert!(
        r.out.status.success(),
        "gantry {}: expected success:\n{out}\n{err}",
        args.join(" ")
    );
    assert_hidden(&out, secret, "stdout");
    assert_hidden(&err, secret, "stderr");
    assert_store_hides(g, secret);
    out
}

fn assert_store_hides(g: &Gantry, secret: &str) {
    fn walk(dir: &Path, secret: &str) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                walk(&p, secret);
            } else if md.is_file() {
                let data = std::fs::read(&p).unwrap();
                let text = String::from_utf8_lossy(&data);
                assert_hidden(&text, secret, &p.display().to_string());
            }
        }
    }
    walk(g.root_path(), secret);
}

/// Runs a command that must fail with one `error: ` line containing
/// `expect` (case-insensitive) and not `secret`; the store is exactly as
/// before and still consistent. Returns the line.
fn refused(g: &Gantry, args: &[&str], expect: &str, secret: &str) -> String {
    let before = g.store_listing();
    let r = g.run(args);
    let (out, err) = (r.stdout(), r.stderr());
    let shown = format!("gantry {}:\n--- stdout:\n{out}\n--- stderr:\n{err}", args.join(" "));
    assert!(!r.out.status.success(), "expected failure: {shown}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line: {shown}");
    let line = lines[0].to_string();
    assert!(line.starts_with("error: "), "{shown}");
    assert!(
        line.to_lowercase().contains(&expect.to_lowercase()),
        "expected {expect:?} in: {line}"
    );
    if !secret.is_empty() {
        assert_hidden(&out, secret, "stdout");
        assert_hidden(&err, secret, "stderr");
        assert_store_hides(g, secret);
    }
    assert_eq!(before, g.store_listing(), "the store changed after: {line}");
    g.fsck_clean();
    g.assert_tmpdir_untouched();
    eprintln!("refused: {line}");
    line
}

/// Asserts a refusal names the TLS failure, not what the plain-HTTP
/// fallback answered.
fn assert_not_the_plain_http_answer(line: &str) {
    let l = line.to_lowercase();
    assert!(
        !l.contains("http request to an https server") && !l.contains("plain http"),
        "the plain-HTTP fallback hid the certificate error: {line}"
    );
}

#[test]
fn pulls_from_a_registry_of_an_internal_ca_trusted_by_certs_d_insecure_or_ssl_cert_file() {
    if !tls_peers() {
        return;
    }
    let s = Setup::start(false);
    let app = s.name("t/app:v1");

    // The CA in the registry's certs.d directory: pulled, and the tree is
    // what umoci unpacks.
    let g = store(&config(&s.trusted(), "", ""), &[]);
    let out = g.ok(&["pull", &app]);
    assert!(
        out.contains(&format!("Status: Downloaded newer image for {app}")),
        "{out}"
    );
    g.fsck_clean();
    assert_export_matches_umoci(&g, &app, s.app.dir.path(), "v1");

    // Not trusted: one line naming the certificate; a store holding an
    // image already is exactly as it was.
    let g = store(&config(&s.trusted(), "", ""), &[]);
    g.ok(&["pull", &s.name("t/control:v1")]);
    let g = g.with_config(&config(&s.untrusted(), "", ""));
    let line = refused(&g, &["pull", &app], "certificate", "");
    assert_not_the_plain_http_answer(&line);
    // A CA for another registry does not count for this one.
    let elsewhere = s.certs("elsewhere", &format!("{HOST}:1"), true, None);
    let g = g.with_config(&config(&elsewhere, "", ""));
    refused(&g, &["pull", &app], "certificate", "");

    // `insecure` (Docker's insecure-registries): HTTPS without verifying.
    let insecure = format!("[registries.\"{}\"]\ninsecure = true\n", s.host());
    let g = store(&config(&s.untrusted(), "", &insecure), &[]);
    g.ok(&["pull", &app]);
    g.fsck_clean();

    // The CA as the system trust store, the OpenSSL way.
    let ca = s.ca.cert();
    let g = store(
        &config(&s.untrusted(), "", ""),
        &[("SSL_CERT_FILE", ca.to_str().unwrap())],
    );
    g.ok(&["pull", &app]);
    g.fsck_clean();
    assert_export_matches_umoci(&g, &app, s.app.dir.path(), "v1");
}

/// On loopback gantry tries plain HTTP after HTTPS; the TLS registry's
/// plain-HTTP answer ("Client sent an HTTP request to an HTTPS server")
/// must not hide the certificate error.
#[test]
fn a_loopback_registry_of_an_unknown_ca_fails_naming_the_certificate() {
    if !tls_peers() {
        return;
    }
    let s = Setup::start(false);
    let addr = s.reg.addr();
    let app = format!("{addr}/t/app:v1");
    // Trusted for `127.0.0.1:PORT` (the certificate has the address):
    // pulled.
    let by_ip = s.certs("by-ip", &addr, true, None);
    let g = store(&config(&by_ip, "", ""), &[]);
    g.ok(&["pull", &format!("{addr}/t/control:v1")]);
    // Not trusted: the certificate is named, the store is as it was.
    let g = g.with_config(&config(&s.untrusted(), "", ""));
    let line = refused(&g, &["pull", &app], "certificate", "");
    assert_not_the_plain_http_answer(&line);
    let g = g.with_config(&config(&by_ip, "", ""));
    g.ok(&["pull", &app]);
    g.fsck_clean();
    assert_export_matches_umoci(&g, &app, s.app.dir.path(), "v1");
}

#[test]
fn mutual_tls_takes_the_client_certificate_from_certs_d() {
    if !tls_peers() {
        return;
    }
    let s = Setup::start(true);
    let app = s.name("t/app:v1");
    let (cert, key) = s.ca.client_cert("gantry");
    let full = s.certs("mutual", &s.host(), true, Some((&cert, &key)));
    let g = store(&config(&full, "", ""), &[]);
    g.ok(&["pull", &s.name("t/control:v1")]);
    g.ok(&["pull", &app]);
    g.fsck_clean();
    assert_export_matches_umoci(&g, &app, s.app.dir.path(), "v1");

    // The CA alone: the registry refuses the connection with an alert,
    // which under TLS 1.3 comes after the client's handshake, with the
    // first answer; the error still names the certificate.
    let g = store(&config(&full, "", ""), &[]);
    g.ok(&["pull", &s.name("t/control:v1")]);
    let g = g.with_config(&config(&s.trusted(), "", ""));
    refused(&g, &["pull", &app], "certificate", "");
    // A client certificate of another CA: refused too.
    let other = TestCa::new(s.dir.path());
    let (cert, key) = other.client_cert("stranger");
    let stranger = s.certs("stranger", &s.host(), true, Some((&cert, &key)));
    let g = g.with_config(&config(&stranger, "", ""));
    refused(&g, &["pull", &app], "certificate", "");
}

#[test]
fn https_proxy_tunnels_by_name_with_hidden_credentials_and_no_proxy_bypasses_it() {
    if !tls_peers() {
        return;
    }
    let s = Setup::start(false);
    let app = s.name("t/app:v1");
    let proxy = ForwardProxy::start(&[(HOST, "127.0.0.1")], Some((USER, SECRET)));
    let url = proxy.url_with_auth(USER, SECRET);
    let connect = format!("CONNECT {} HTTP/1.1", s.host());
    let cfg = config(&s.trusted(), "", "");

    // HTTPS_PROXY: every request is a CONNECT to the registry's name (the
    // proxy resolves it), each with the credentials of the URL.
    let g = store(&cfg, &[("HTTPS_PROXY", &url)]);
    ok_hiding(&g, &["pull", &app], SECRET);
    g.fsck_clean();
    assert_export_matches_umoci(&g, &app, s.app.dir.path(), "v1");
    let seen = proxy.seen();
    assert!(!seen.is_empty() && seen.iter().all(|l| *l == connect), "{seen:?}");
    let auth = proxy.auth_seen();
    assert_eq!(auth.len(), seen.len(), "a CONNECT went without credentials: {auth:?}");
    assert!(auth.iter().all(|a| *a == basic(USER, SECRET)), "{auth:?}");

    // NO_PROXY, as a domain suffix with and without the dot: the proxy
    // sees nothing, the name still resolves by the config.
    for no_proxy in [".internal.test", "internal.test"] {
        let before = proxy.seen().len();
        let g = store(&cfg, &[("HTTPS_PROXY", &url), ("NO_PROXY", no_proxy)]);
        g.ok(&["pull", &app]);
        assert_eq!(proxy.seen().len(), before, "NO_PROXY={no_proxy}: {:?}", proxy.seen());
    }

    // A wrong password: the proxy answers 407; one line naming the proxy,
    // without the password.
    let wrong = "wr0ng-pw-4711";
    let before = proxy.seen().len();
    let mut g = store(&cfg, &[]);
    g.ok(&["pull", &s.name("t/control:v1")]);
    g.env.push(("HTTPS_PROXY".into(), proxy.url_with_auth(USER, wrong)));
    let line = refused(&g, &["pull", &app], "proxy", wrong);
    assert!(
        line.contains(&format!("127.0.0.1:{}", proxy.port)),
        "the proxy is not named: {line}"
    );
    assert!(proxy.seen().len() > before, "the proxy was not asked");
    assert!(
        proxy.auth_seen().contains(&basic(USER, wrong)),
        "{:?}",
        proxy.auth_seen()
    );

    // The config's `https_proxy` works as the variable does.
    let before = proxy.seen().len();
    let with_key = config(&s.trusted(), &format!("https_proxy = \"{url}\"\n"), "");
    let g = store(&with_key, &[]);
    ok_hiding(&g, &["pull", &app], SECRET);
    let seen = proxy.seen();
    assert!(
        seen.len() > before && seen[before..].iter().all(|l| *l == connect),
        "{seen:?}"
    );
}

#[test]
fn pushes_through_the_internal_ca_and_the_proxy() {
    if !tls_peers() {
        return;
    }
    let s = Setup::start(false);
    let from = s.name("t/app:v1");
    let to = s.name("t/pushed:v1");
    // Pulled directly; pushed through the proxy.
    let mut g = store(&config(&s.trusted(), "", ""), &[]);
    g.ok(&["pull", &from]);
    g.ok(&["tag", &from, &to]);
    let proxy = ForwardProxy::start(&[(HOST, "127.0.0.1")], Some((USER, SECRET)));
    g.env.push(("HTTPS_PROXY".into(), proxy.url_with_auth(USER, SECRET)));
    let out = ok_hiding(&g, &["push", &to], SECRET);
    let last = out.lines().last().unwrap_or_default();
    assert!(last.starts_with("v1: digest: sha256:"), "{out}");
    let seen = proxy.seen();
    let connect = format!("CONNECT {} HTTP/1.1", s.host());
    assert!(!seen.is_empty() && seen.iter().all(|l| *l == connect), "{seen:?}");

    // A real client finds the pushed manifest under the digest gantry named.
    let digest = last.split_whitespace().nth(2).unwrap();
    let inspected = std::process::Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .arg(format!("docker://{}/t/pushed:v1", s.reg.addr()))
        .output()
        .unwrap();
    assert!(
        inspected.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&inspected.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&inspected.stdout).unwrap();
    assert_eq!(v["Digest"], digest);
}

#[test]
fn a_mirror_reaches_its_upstream_through_the_internal_ca_and_the_proxy() {
    if !tls_peers() {
        return;
    }
    let s = Setup::start(false);
    let proxy = ForwardProxy::start(&[(HOST, "127.0.0.1")], Some((USER, SECRET)));
    let url = proxy.url_with_auth(USER, SECRET);
    let mirror_store = store(&config(&s.trusted(), "", ""), &[("HTTPS_PROXY", &url)]);
    let srv = mirror_store.serve(&["--mirror-of", &format!("https://{}", s.host())]);
    // The client reaches the mirror on loopback directly.
    let g = Gantry::new();
    let name = format!("{}/t/app:v1", srv.addr);
    g.ok(&["pull", &name]);
    g.fsck_clean();
    assert_export_matches_umoci(&g, &name, s.app.dir.path(), "v1");
    let seen = proxy.seen();
    let connect = format!("CONNECT {} HTTP/1.1", s.host());
    assert!(seen.contains(&connect), "{seen:?}");
    assert!(seen.iter().all(|l| *l == connect), "{seen:?}");
    assert!(proxy.auth_seen().iter().all(|a| *a == basic(USER, SECRET)));
    assert_hidden(&srv.log(), SECRET, "the mirror's log");
    assert_store_hides(&mirror_store, SECRET);
}

#[test]
fn plain_http_to_an_insecure_registry_goes_through_http_proxy_with_its_credentials() {
    if !peers() {
        return;
    }
    // A plain-HTTP registry gantry knows by name, marked insecure: HTTPS
    // (direct, no HTTPS_PROXY) fails, plain HTTP goes through HTTP_PROXY
    // in absolute form, each request carrying the proxy's credentials.
    let reg = Registry::start();
    let (published, _, _) = publish(&reg, "t/app", "v1", &app_image());
    let host = format!("{HOST}:{}", reg.port);
    let name = format!("{host}/t/app:v1");
    let proxy = ForwardProxy::start(&[(HOST, "127.0.0.1")], Some((USER, SECRET)));
    let dir = tempfile::tempdir().unwrap();
    let rest = format!("[registries.\"{host}\"]\ninsecure = true\n");
    let g = store(
        &config(dir.path(), "", &rest),
        &[("HTTP_PROXY", &proxy.url_with_auth(USER, SECRET))],
    );
    ok_hiding(&g, &["pull", &name], SECRET);
    assert_export_matches_umoci(&g, &name, published.dir.path(), "v1");
    let seen = proxy.seen();
    let prefix = format!("http://{host}/v2/");
    assert!(
        !seen.is_empty()
            && seen
                .iter()
                .all(|l| l.split_whitespace().nth(1).is_some_and(|u| u.starts_with(&prefix))),
        "{seen:?}"
    );
    assert_eq!(proxy.auth_seen().len(), seen.len(), "{:?}", proxy.auth_seen());
    assert!(proxy.auth_seen().iter().all(|a| *a == basic(USER, SECRET)));
}

#[test]
fn the_daemon_s_login_and_fsck_repair_keep_the_same_trust() {
    if !tls_peers() {
        return;
    }
    let s = Setup::start(false);
    let body = format!(
        "{{\"username\":\"u\",\"password\":\"p\",\"serveraddress\":\"{}\"}}",
        s.host()
    );
    let auth = format!(
        "POST /v1.47/auth HTTP/1.1\r\nHost: d\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // The daemon's /auth reaches the registry with the config's CA…
    let g = store(&config(&s.trusted(), "", ""), &[]);
    let d = g.daemon();
    let r = crate::daemon::raw(&d.addr, auth.as_bytes());
    assert_eq!(crate::daemon::status(&r), 200, "{r}");
    assert!(r.contains("Login Succeeded"), "{r}");
    drop(d);
    // …and without it names the certificate.
    let h = store(&config(&s.untrusted(), "", ""), &[]);
    let d = h.daemon();
    let r = crate::daemon::raw(&d.addr, auth.as_bytes());
    assert_ne!(crate::daemon::status(&r), 200, "{r}");
    assert!(crate::daemon::message(&r).contains("certificate"), "{r}");
    drop(d);

    // fsck --repair fetches a damaged layer again through the same CA and
    // the proxy.
    let app = s.name("t/app:v1");
    g.ok(&["pull", &app]);
    assert!(crate::store::flip_a_byte(&g, "etc/os-release") >= 1);
    let proxy = ForwardProxy::start(&[(HOST, "127.0.0.1")], None);
    let mut g = g;
    g.env.push(("HTTPS_PROXY".into(), proxy.url()));
    let out = g.ok(&["fsck", "--repair"]);
    assert!(out.contains("repaired: layer"), "{out}");
    g.ok(&["fsck", "--verify-content"]);
    assert_export_matches_umoci(&g, &app, s.app.dir.path(), "v1");
    let connect = format!("CONNECT {} HTTP/1.1", s.host());
    assert!(proxy.seen().contains(&connect), "{:?}", proxy.seen());
}
